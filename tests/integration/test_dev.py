"""``arqonbus dev``: one command starts NATS and gateways, says how to connect, stops clean."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
from pathlib import Path

import pytest

from arqonbus_server.mesh.local import free_port_run
from tests.timeouts import SEC

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BANNER_END = "Ctrl-C stops everything."
GATEWAY_LINE = re.compile(r"gateway:\s+(ws://\S+)\s+\(pid (\d+)\)")
TOKEN_LINE = re.compile(r"dev token:\s+dev:([A-Za-z0-9_-]+):([A-Za-z0-9_-]+)")


# -- ports and processes ------------------------------------------------------------------------


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pids_running_with(text: str, besides: int | None = None) -> list[int]:
    """PIDs of live processes (but ``besides``) whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != besides:
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                if text in cmdline and is_running(int(entry.name)):
                    found.append(int(entry.name))
    return found


def is_running(pid: int) -> bool:
    """Alive and not a zombie (an exited child waiting to be reaped is not running)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def start_dev(
    port: int, nats_port: int, data_dir: Path, stderr: Path
) -> asyncio.subprocess.Process:
    with stderr.open("wb") as err:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "arqonbus_server.gateway", "dev", "--nats-nodes", "3", "--gateways", "2",
            "--port", str(port), "--nats-port", str(nats_port), "--data-dir", str(data_dir),
            cwd=REPO, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=err, start_new_session=True,
        )  # fmt: skip


async def read_banner(proc: asyncio.subprocess.Process, stderr: Path, timeout: float) -> str:
    """Stdout lines up to the end of the banner; fails if dev exits or time runs out first."""
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(timeout):
            while not lines or BANNER_END not in lines[-1]:
                line = await proc.stdout.readline()
                if not line:
                    raise AssertionError("dev exited before printing its banner")
                lines.append(line.decode().rstrip())
    except (AssertionError, TimeoutError) as exc:
        tail = text_tail(stderr)
        raise AssertionError(
            f"no banner ({exc!r}); stdout: {lines}; stderr tail:\n{tail}"
        ) from None
    return "\n".join(lines)


def text_tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:]


async def stop_leftovers(proc: asyncio.subprocess.Process, children: list[int]) -> None:
    """After a failed test: SIGINT dev, then SIGKILL it and any child of ours still running."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 30 * SEC)
    if proc.returncode is None:
        proc.kill()
        await proc.wait()
    for pid in children:
        if is_running(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def assert_quiet_start(stderr: Path) -> None:
    """A healthy start logs no warning but dev auth's, and no line per readiness poll."""
    lines = stderr.read_text(errors="replace").splitlines()
    warnings = [line for line in lines if " WARNING " in line or " ERROR " in line]
    expected = ("INSECURE: dev authentication is on", "DEV AUTH MODE")
    assert [w for w in warnings if not any(e in w for e in expected)] == [], warnings
    assert [line for line in lines if "HTTP response sent" in line] == []
    assert len(lines) < 30, "\n".join(lines)


# -- tests --------------------------------------------------------------------------------------


async def second_dev_fails(port: int, nats_port: int, data_dir: Path) -> tuple[int, str]:
    before = set(pids_running_with(str(data_dir)))  # a first mesh on the same data dir lives on
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "arqonbus_server.gateway", "dev", "--port", str(port),
        "--nats-port", str(nats_port), "--data-dir", str(data_dir),
        cwd=REPO, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(
            proc.communicate(), 15 * SEC
        )  # fails fast: no NATS started
    finally:
        started = [pid for pid in pids_running_with(str(data_dir)) if pid not in before]
        await stop_leftovers(proc, started)
    assert proc.returncode is not None
    return proc.returncode, (out + err).decode(errors="replace")


async def test_dev_serves_across_gateways_and_stops_without_orphans(tmp_path, clients):
    port = free_port_run(2)
    nats_port = free_port_run(3, avoid=range(port, port + 2))
    data_dir = (tmp_path / "dev").resolve()
    stderr = tmp_path / "dev.stderr"
    proc = await start_dev(port, nats_port, data_dir, stderr)
    children: list[int] = []
    try:
        banner = await read_banner(proc, stderr, timeout=60 * SEC)
        gateways = GATEWAY_LINE.findall(banner)
        [(tenant, principal)] = TOKEN_LINE.findall(banner)
        assert [url for url, _ in gateways] == [f"ws://127.0.0.1:{p}/ws" for p in (port, port + 1)]
        nats_pids = pids_running_with(str(data_dir), besides=proc.pid)
        children = [int(pid) for _, pid in gateways] + nats_pids
        assert len(nats_pids) == 3 and all(map(is_running, children)), banner

        alice = await clients(gateways[0][0], tenant, principal)
        bob = await clients(gateways[1][0], tenant, "bob")
        await bob.join("lobby", "chat")
        ack = await alice.publish("lobby", "chat", {"text": "hi"})
        [event] = await bob.wait_events(1)
        assert (event["seq"], event["from"]) == (ack["payload"]["seq"], principal)

        assert_quiet_start(stderr)

        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 40 * SEC) == 0
        for client in (alice, bob):
            async with asyncio.timeout(5 * SEC):
                await client.closed.wait()
            assert client.close_code == 1012  # gateways drained: reconnect elsewhere
        assert [pid for pid in children if is_running(pid)] == []
        assert pids_running_with(str(data_dir)) == []
    finally:
        await stop_leftovers(proc, children)


async def test_a_second_dev_is_refused_by_port_or_data_dir_and_the_first_loses_nothing(
    tmp_path, clients
):
    """Two meshes on one data directory acknowledged different events under the same seq."""
    port = free_port_run(2)
    nats_port = free_port_run(3, avoid=range(port, port + 2))
    data_dir = (tmp_path / "dev").resolve()
    stderr = tmp_path / "dev.stderr"
    proc = await start_dev(port, nats_port, data_dir, stderr)
    children: list[int] = []
    try:
        banner = await read_banner(proc, stderr, timeout=60 * SEC)
        gateways = GATEWAY_LINE.findall(banner)
        children = [int(pid) for _, pid in gateways]
        children += pids_running_with(str(data_dir), besides=proc.pid)
        assert len(children) == 2 + 3, banner
        configs = {p: p.read_bytes() for p in sorted(data_dir.glob("nats/n*/nats.conf"))}
        alice = await clients(gateways[0][0], "demo", "alice")
        bob = await clients(gateways[1][0], "demo", "bob")
        await bob.join("lobby", "chat")
        first = await alice.publish("lobby", "chat", {"n": 1})

        # Same ports, another data directory: refused, naming the port (and --data-dir).
        code, output = await second_dev_fails(port, nats_port, (tmp_path / "second").resolve())
        assert code != 0 and f"NATS port {nats_port}" in output, output
        assert "--data-dir" in output, output  # a second mesh needs its own files too
        taken = [*range(port, port + 2), *range(nats_port, nats_port + 3)]
        other_nats = free_port_run(3, avoid=taken)
        code, output = await second_dev_fails(port, other_nats, (tmp_path / "third").resolve())
        assert code != 0 and f"gateway port {port}" in output, output

        # Free ports, the same data directory: refused before anything starts.
        other_port = free_port_run(2, avoid=taken)
        other_nats = free_port_run(3, avoid=[*taken, *range(other_port, other_port + 2)])
        code, output = await second_dev_fails(other_port, other_nats, data_dir)
        assert code == 2, output
        assert str(data_dir) in output and "--data-dir" in output, output
        assert f"pid {proc.pid}" in output, output  # names the mesh that holds it
        assert port_is_free(other_nats) and port_is_free(other_port)  # it started nothing

        assert proc.returncode is None and all(map(is_running, children))  # the first one is intact
        assert {p: p.read_bytes() for p in configs} == configs  # its configs not rewritten
        second = await alice.publish("lobby", "chat", {"n": 2})
        assert second["payload"].get("seq") == first["payload"]["seq"] + 1, second
        events = await bob.wait_events(2)
        assert [e["payload"]["n"] for e in events] == [1, 2]
    finally:
        await stop_leftovers(proc, children)


async def test_dev_with_no_gateways_runs_only_nats_and_says_how_to_add_one(tmp_path):
    nats_port = free_port_run(1)
    data_dir = (tmp_path / "dev").resolve()
    stderr = tmp_path / "dev.stderr"
    with stderr.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "arqonbus_server.gateway", "dev", "--nats-nodes", "1", "--gateways", "0",
            "--nats-port", str(nats_port), "--data-dir", str(data_dir),
            cwd=REPO, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=err, start_new_session=True,
        )  # fmt: skip
    children: list[int] = []
    try:
        banner = await read_banner(proc, stderr, timeout=60 * SEC)
        children = pids_running_with(str(data_dir), besides=proc.pid)
        assert f"nats://127.0.0.1:{nats_port}" in banner
        assert GATEWAY_LINE.findall(banner) == [] and len(children) == 1, banner
        assert f"arqonbus gateway --nats nats://127.0.0.1:{nats_port}" in banner
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 30 * SEC) == 0
        assert "Traceback" not in text_tail(stderr)
        assert [pid for pid in children if is_running(pid)] == []
    finally:
        await stop_leftovers(proc, children)


@pytest.mark.parametrize("value", ["-1", "two"])
async def test_dev_refuses_a_bad_gateway_count(value):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "arqonbus_server.gateway", "dev", "--gateways", value,
        cwd=REPO, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 30 * SEC)
    assert proc.returncode == 2
    assert b"--gateways" in err and b"Traceback" not in err, err
