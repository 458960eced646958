"""``arq`` as a real subprocess against gateway processes and a real JetStream cluster."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from arqonbus import Client, CommandFailed, CommandRequest
from arqonbus_server.mesh.local import free_port
from tests.conftest import gateway_url
from tests.timeouts import SEC, eventually

pytestmark = pytest.mark.integration

ROOM = "science"
CHANNEL = "general"
ARQ = (sys.executable, "-m", "arqonbus.cli")


@dataclass
class Run:
    code: int
    out: list[Any]  # stdout, one JSON value per line
    err: str


def _env(url: str | None, token: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARQONBUS_")}
    if url is not None:
        env["ARQONBUS_URL"] = url
    if token is not None:
        env["ARQONBUS_TOKEN"] = token
    return env


async def arq(
    *args: str,
    url: str | None = None,
    token: str | None = None,
    stdin: bytes | None = None,
    timeout: float = 30.0,
) -> Run:
    """Run ``arq`` to completion (URL and token via the environment, as a user would)."""
    proc = await asyncio.create_subprocess_exec(
        *ARQ,
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_env(url, token),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Run(proc.returncode, [orjson.loads(line) for line in out.splitlines()], err.decode())


class Tail:
    """A long-running ``arq sub`` whose output the test reads line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[Any] = []

    @classmethod
    async def start(cls, *args: str, url: str, token: str) -> Tail:
        proc = await asyncio.create_subprocess_exec(
            *ARQ,
            "sub",
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=_env(url, token),
        )
        return cls(proc)

    async def read(self, count: int, timeout: float = 30.0) -> list[Any]:
        """The next ``count`` lines of stdout."""
        assert self.proc.stdout is not None
        got: list[Any] = []
        async with asyncio.timeout(timeout):
            while len(got) < count:
                line = await self.proc.stdout.readline()
                if not line:
                    raise AssertionError(f"arq sub exited early: {await self.stderr()}")
                got.append(orjson.loads(line))
        self.lines += got
        return got

    async def stderr(self) -> str:
        assert self.proc.stderr is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait(), 5 * SEC)
        return (await self.proc.stderr.read()).decode() if self.proc.returncode is not None else ""

    async def stop(self) -> int:
        """Ctrl-C, then the exit code."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return await asyncio.wait_for(self.proc.wait(), 15 * SEC)
        except TimeoutError:
            await self.close()
            raise

    async def close(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def writer_client(start_gateway, tenant: str) -> tuple[Client, Any]:
    """An SDK publisher on an in-process gateway of the same cluster."""
    gw = await start_gateway()
    client = Client(gateway_url(gw), f"dev:{tenant}:writer")
    await client.connect()
    return client, gw


async def test_pub_from_an_argument_and_from_stdin_then_history(
    gateway_processes, nats_cluster, tenant
):
    gw = await gateway_processes(nats_cluster.url_csv)
    token = f"dev:{tenant}:alice"

    single = await arq("pub", ROOM, CHANNEL, '{"n": 0}', "--id", "first", url=gw.url, token=token)
    piped = await arq(
        "pub", ROOM, CHANNEL, "-", url=gw.url, token=token, stdin=b'{"n": 1}\n\n{"n": 2}\n'
    )
    again = await arq("pub", ROOM, CHANNEL, '{"n": 9}', "--id", "first", url=gw.url, token=token)
    history = await arq("history", "--url", gw.url, "--token", token, ROOM, CHANNEL)
    page = await arq(
        "history", ROOM, CHANNEL, "--since", str(history.out[0]["seq"]), "--limit", "1",
        url=gw.url, token=token,
    )  # fmt: skip

    assert (single.code, single.err) == (0, "")
    (ack,) = single.out
    assert ack == {"request_id": "first", "seq": ack["seq"], "duplicate": False}
    assert (piped.code, piped.err) == (0, "")
    assert [a["seq"] for a in piped.out] == sorted(a["seq"] for a in piped.out)
    assert len(piped.out) == 2 and all(not a["duplicate"] for a in piped.out)
    assert again.out == [{"request_id": "first", "seq": ack["seq"], "duplicate": True}]
    assert history.code == 0
    assert [e["payload"] for e in history.out] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert [e["seq"] for e in history.out] == [ack["seq"]] + [a["seq"] for a in piped.out]
    assert all(e["from"] == "alice" and e["room"] == ROOM for e in history.out)
    assert [e["payload"] for e in page.out] == [{"n": 1}]


async def test_sub_count_prints_delivered_envelopes(gateway_processes, nats_cluster, tenant):
    gw = await gateway_processes(nats_cluster.url_csv)
    async with Client(gw.url, f"dev:{tenant}:writer") as writer:
        acks = [await writer.publish(ROOM, CHANNEL, {"n": n}, id=f"e{n}") for n in range(3)]

    run = await arq(
        "sub", ROOM, CHANNEL, "--since", "0", "--count", "3", url=gw.url, token=f"dev:{tenant}:r"
    )

    assert (run.code, run.err) == (0, "")
    assert [e["seq"] for e in run.out] == [a.seq for a in acks]
    assert [e["id"] for e in run.out] == ["e0", "e1", "e2"]
    assert set(run.out[0]) == {
        "version", "id", "type", "room", "channel", "from", "timestamp", "payload", "seq"
    }  # fmt: skip


async def test_cmd_prints_the_result_and_reports_errors_in_one_line(
    gateway_processes, nats_cluster, tenant
):
    gw = await gateway_processes(nats_cluster.url_csv)
    token = f"dev:{tenant}:api"

    async def status(request: CommandRequest) -> dict[str, Any]:
        if request.parameters.get("check") == "disk":
            raise CommandFailed("unknown_check", "no such check: disk")
        return {"ok": True, "check": request.parameters.get("check")}

    async with Client(gw.url, f"dev:{tenant}:db") as service:
        await service.register_handler("services", "db", "status", status)
        ok = await arq(
            "cmd", "services", "db", "status", '{"check": "pool"}', url=gw.url, token=token
        )
        failed = await arq(
            "cmd", "services", "db", "status", '{"check": "disk"}', url=gw.url, token=token
        )
        nobody = await arq("cmd", "services", "db", "restart", url=gw.url, token=token)
        bad_json = await arq("cmd", "services", "db", "status", "{nope", url=gw.url, token=token)

    assert (ok.code, ok.out, ok.err) == (0, [{"ok": True, "check": "pool"}], "")
    assert failed.code == 1 and failed.out == []
    assert failed.err == "arq: unknown_check: no such check: disk\n"
    assert nobody.code == 1 and nobody.err.startswith("arq: no_responders: ")
    assert bad_json.code == 2 and bad_json.err.startswith("arq: the parameters is not valid JSON")
    for run in (failed, nobody, bad_json):
        assert run.err.count("\n") == 1 and "Traceback" not in run.err


async def test_connection_problems_are_one_line_and_exit_3(gateway_processes, nats_cluster):
    port = free_port()
    unreachable = await arq(
        "cmd", "r", "c", "status", "--connect-timeout", "0.5",
        url=f"ws://127.0.0.1:{port}/ws", token="dev:t:a",
    )  # fmt: skip
    gw = await gateway_processes(nats_cluster.url_csv)
    refused = await arq("history", ROOM, CHANNEL, url=gw.url, token="dev:only-two")
    usage = await arq("pub", ROOM, CHANNEL, "[1, 2]", url=gw.url, token="dev:t:a")
    bad_url = await arq("history", ROOM, CHANNEL, "--url", "http://x", token="dev:t:a")

    assert unreachable.code == 3
    assert unreachable.err == (
        f"arq: cannot reach any gateway (ws://127.0.0.1:{port}/ws: connection refused). "
        "Is the mesh running? Start one with make run, or pass --url.\n"
    )
    assert refused.code == 3
    assert refused.err.startswith("arq: the gateway refused the token: ")
    assert "malformed token" in refused.err and "ARQONBUS_TOKEN" in refused.err
    assert usage.code == 2 and usage.err.startswith("arq: the payload must be a JSON object")
    assert bad_url.code == 2 and "is not a WebSocket URL" in bad_url.err
    for run in (unreachable, refused, usage, bad_url):
        assert run.err.count("\n") == 1 and "Traceback" not in run.err


async def test_sub_with_resume_file_survives_a_gateway_kill_and_restart(
    gateway_processes, nats_cluster, start_gateway, tenant, tmp_path: Path
):
    gw = await gateway_processes(nats_cluster.url_csv)
    resume = tmp_path / "position"
    writer, _ = await writer_client(start_gateway, tenant)
    tail: Tail | None = None
    try:
        start = await writer.publish(ROOM, CHANNEL, {"n": "before"})
        tail = await Tail.start(
            ROOM, CHANNEL, "--since", str(start.seq), "--resume-file", str(resume),
            url=gw.url, token=f"dev:{tenant}:tail",
        )  # fmt: skip
        first = [await writer.publish(ROOM, CHANNEL, {"n": n}) for n in range(5)]
        assert [e["seq"] for e in await tail.read(5)] == [a.seq for a in first]

        gw.signal(signal.SIGKILL)
        await gw.wait_exit()
        during = [await writer.publish(ROOM, CHANNEL, {"n": n}) for n in range(5, 8)]
        await gateway_processes(nats_cluster.url_csv, port=gw.port)  # same URL, new process
        after = [await writer.publish(ROOM, CHANNEL, {"n": n}) for n in range(8, 10)]
        rest = await tail.read(5)
        assert await tail.stop() == 130  # Ctrl-C: quiet
        assert "Traceback" not in await tail.stderr()

        acked = [a.seq for a in first + during + after]
        assert [e["seq"] for e in tail.lines] == acked  # each once, in order
        assert [e["payload"]["n"] for e in tail.lines] == list(range(10))
        assert [e["seq"] for e in rest] == acked[5:]
        assert resume.read_text().strip() == str(acked[-1])

        more = [await writer.publish(ROOM, CHANNEL, {"n": n}) for n in range(10, 13)]
        again = await arq(
            "sub", ROOM, CHANNEL, "--resume-file", str(resume), "--count", "3",
            url=gw.url, token=f"dev:{tenant}:tail",
        )  # fmt: skip
        assert (again.code, again.err) == (0, "")
        assert [e["seq"] for e in again.out] == [a.seq for a in more]
        assert resume.read_text().strip() == str(more[-1].seq)
    finally:
        if tail is not None:
            await tail.close()
        await writer.close()


# -- arq presence ----------------------------------------------------------------------------


async def test_presence_lists_members_and_watch_prints_each_change(start_gateway, tenant):
    gw = await start_gateway()
    url, token = gateway_url(gw), f"dev:{tenant}:arq"
    async with Client(url, f"dev:{tenant}:alice") as alice:
        await alice.subscribe(ROOM, CHANNEL, presence=True).start()

        async def alice_listed() -> Run | None:
            run = await arq("presence", f"{ROOM}/{CHANNEL}", "--json", url=url, token=token)
            return run if run.code == 0 and run.out else None

        listed = await eventually(alice_listed, 10 * SEC, "alice listed by arq presence")
        assert [(m["principal"], m["state"], m["connections"]) for m in listed.out] == [
            ("alice", "online", 1)
        ]
        bad = await arq("presence", ROOM, url=url, token=token)
        assert bad.code == 2 and "ROOM/CHANNEL" in bad.err

        watch = await asyncio.create_subprocess_exec(
            *ARQ, "presence", f"{ROOM}/{CHANNEL}", "--watch", "--json",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=_env(url, token),
        )  # fmt: skip
        try:
            assert watch.stdout is not None and watch.stderr is not None
            async with asyncio.timeout(30 * SEC):
                assert (await watch.stderr.readline()).startswith(b"watching")
                async with Client(url, f"dev:{tenant}:bob") as bob:
                    await bob.subscribe(ROOM, CHANNEL, presence=True).start()
                    change = orjson.loads(await watch.stdout.readline())
            assert (change["principal"], change["action"], change["state"]) == (
                "bob",
                "join",
                "online",
            )
            watch.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(watch.wait(), 15 * SEC) == 130
        finally:
            if watch.returncode is None:
                watch.kill()
                await watch.wait()
