"""``arqonbus dev``: one command starts NATS and gateways, says how to connect, stops clean."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

from mesh.local import free_port

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


def free_port_run(count: int, avoid: Iterable[int] = ()) -> int:
    """The first of ``count`` consecutive ports that were all free a moment ago."""
    avoid = set(avoid)
    for _ in range(50):
        first = free_port()
        run = range(first, first + count)
        if first + count <= 65535 and not avoid & set(run) and all(map(port_is_free, run)):
            return first
    raise AssertionError(f"no run of {count} free ports found in 50 tries")


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
            sys.executable, "-m", "gateway", "dev", "--nats-nodes", "3", "--gateways", "2",
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
            await asyncio.wait_for(proc.wait(), 30)
    if proc.returncode is None:
        proc.kill()
        await proc.wait()
    for pid in children:
        if is_running(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# -- tests --------------------------------------------------------------------------------------


async def second_dev_fails(port: int, nats_port: int, data_dir: Path) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "dev", "--port", str(port),
        "--nats-port", str(nats_port), "--data-dir", str(data_dir),
        cwd=REPO, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 15)  # fails fast: no NATS started
    finally:
        await stop_leftovers(proc, pids_running_with(str(data_dir)))
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
        banner = await read_banner(proc, stderr, timeout=60)
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

        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 40) == 0
        for client in (alice, bob):
            async with asyncio.timeout(5):
                await client.closed.wait()
            assert client.close_code == 1012  # gateways drained: reconnect elsewhere
        assert [pid for pid in children if is_running(pid)] == []
        assert pids_running_with(str(data_dir)) == []
    finally:
        await stop_leftovers(proc, children)


async def test_second_dev_on_the_same_ports_fails_fast_naming_the_port(tmp_path):
    port = free_port_run(2)
    nats_port = free_port_run(3, avoid=range(port, port + 2))
    data_dir = (tmp_path / "dev").resolve()
    stderr = tmp_path / "dev.stderr"
    proc = await start_dev(port, nats_port, data_dir, stderr)
    children: list[int] = []
    try:
        banner = await read_banner(proc, stderr, timeout=60)
        children = [int(pid) for _, pid in GATEWAY_LINE.findall(banner)]
        children += pids_running_with(str(data_dir), besides=proc.pid)
        assert len(children) == 2 + 3, banner

        code, output = await second_dev_fails(port, nats_port, (tmp_path / "second").resolve())
        assert code != 0 and f"NATS port {nats_port}" in output, output
        other_nats = free_port_run(
            3, avoid=[*range(port, port + 2), *range(nats_port, nats_port + 3)]
        )
        code, output = await second_dev_fails(port, other_nats, (tmp_path / "third").resolve())
        assert code != 0 and f"gateway port {port}" in output, output
        assert proc.returncode is None and all(map(is_running, children))  # the first one is intact
    finally:
        await stop_leftovers(proc, children)
