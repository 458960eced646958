"""Client side of the presence bench (bench/presence.py): picows sessions and member processes.

* :class:`Session`: one ArqonBus WebSocket session. It resolves the ``welcome``, matches
  ``command_response`` frames to their command by ``request_id`` (:meth:`Session.command`),
  and counts the ``presence`` frames it is sent (frames, bytes, overflow frames, changes,
  the highest ``position``) from each frame's payload (``{"type": "presence", "room",
  "channel", "payload": {"position", "changes"}}``).
* ``python -m bench.presence_client``: a member process. It opens ``--count`` sessions
  (principal ``m<index>`` each, bound to ``--source``), then obeys one JSON command per line
  on stdin and answers one JSON line on stdout:

  - ``{"op": "join"}``: ``join_channel`` with ``presence: true, presence_events: false`` on
    every session, at most ``--concurrency`` in flight; answers ``{"joined", "errors",
    "elapsed_s"}``.
  - ``{"op": "storm", "n": k}``: its first ``k`` sessions each ``leave_channel`` and
    ``join_channel`` again, as fast as the replies come; answers ``{"cycles", "errors",
    "elapsed_s"}``.
  - ``{"op": "close"}`` (or end of input): closes every session and exits.

* :class:`MemberProc`: the orchestrator's handle on one member process.

Every wait has a timeout; nothing here sleeps to synchronize.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import orjson
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

ROOM, CHANNEL = "bench", "presence"
REPO = Path(__file__).resolve().parents[1]
FIRST_SOURCE_HOST = 10  # member process k binds 127.0.0.(10 + k)
REPLY_TIMEOUT_S = 60.0
MAX_BODIES = 100_000
ERROR_SAMPLES = 5
_ids = itertools.count()


def session_url(base: str, tenant: str, principal: str) -> str:
    """The gateway URL with a dev token (``ARQONBUS_INSECURE_DEV_AUTH``) for ``principal``."""
    return f"{base}?token=dev:{tenant}:{principal}"


def presence_body(message: dict[str, Any]) -> dict[str, Any]:
    """A presence frame's ``payload`` (``position``, ``changes``; in the overflow form also
    ``overflow`` and ``occupancy``): docs/protocol.md#presence-frames."""
    payload = message.get("payload")
    if not isinstance(payload, dict):
        raise ValueError(f"a presence frame without a payload object: {str(message)[:200]}")
    return payload


class CommandFailed(RuntimeError):
    """The gateway answered a command with ``status: error`` (the catalogue error is in args)."""


class Session(WSListener):
    """One ArqonBus session (see the module docstring)."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.welcome: asyncio.Future[None] = loop.create_future()
        self.pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.transport: WSTransport | None = None
        self.frames = 0
        self.frame_bytes = 0
        self.overflow_frames = 0
        self.changes = 0
        self.position = 0
        self.frame_seen = asyncio.Event()  # set on each presence frame; the reader clears it
        self.bodies: list[dict[str, Any]] | None = None  # kept by watch(): each frame's body
        self.sizes: list[int] = []  # and its size in bytes
        self.closed = False
        self.close_reason = "no close frame: the connection was lost"

    def watch(self) -> None:
        """Keep every presence frame's body (for :func:`frame_matching`); a watcher's frames
        are one per batch window, so a bench run keeps a few thousand at most."""
        self.bodies = []

    # -- picows callbacks --

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            self.close_reason = f"{frame.get_close_code()} {frame.get_close_message()!r}"
            transport.send_close(frame.get_close_code())
            transport.disconnect()
            return
        if frame.msg_type not in (WSMsgType.TEXT, WSMsgType.BINARY):
            return
        data = frame.get_payload_as_bytes()
        if b'"type":"presence"' in data:
            self._presence(data)
        elif b'"command_response"' in data:
            self._reply(orjson.loads(data))
        elif not self.welcome.done() and b'"welcome"' in data:
            self.welcome.set_result(None)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closed = True
        error = ConnectionError(f"the gateway closed the session ({self.close_reason})")
        if not self.welcome.done():
            self.welcome.set_exception(error)
        for future in self.pending.values():
            if not future.done():
                future.set_exception(error)
        self.pending.clear()
        self.frame_seen.set()

    # -- frames --

    def _presence(self, data: bytes) -> None:
        body = presence_body(orjson.loads(data))
        self.frames += 1
        self.frame_bytes += len(data)
        if body.get("overflow"):
            self.overflow_frames += 1
        self.changes += len(body.get("changes") or ())
        self.position = max(self.position, int(body.get("position") or 0))
        if self.bodies is not None and len(self.bodies) < MAX_BODIES:
            self.bodies.append(body)
            self.sizes.append(len(data))
        self.frame_seen.set()

    def _reply(self, message: dict[str, Any]) -> None:
        payload = message.get("payload") or {}
        future = self.pending.pop(str(payload.get("request_id")), None)
        if future is not None and not future.done():
            future.set_result(payload)

    # -- commands --

    async def command(
        self, name: str, parameters: dict[str, Any] | None = None, timeout: float = REPLY_TIMEOUT_S
    ) -> dict[str, Any]:
        """Send command ``name`` and return its ``result``; :class:`CommandFailed` on an error."""
        if self.transport is None or self.closed:
            raise ConnectionError(f"the session is closed ({self.close_reason})")
        request_id = f"b{next(_ids)}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[request_id] = future
        frame = {
            "version": "1.0",
            "id": request_id,
            "type": "command",
            "room": ROOM,
            "channel": CHANNEL,
            "payload": {"command": name, "parameters": parameters or {}},
        }
        self.transport.send(WSMsgType.TEXT, orjson.dumps(frame))
        try:
            payload = await asyncio.wait_for(future, timeout)
        finally:
            self.pending.pop(request_id, None)
        if payload.get("status") != "success":
            raise CommandFailed(f"{name}: {payload.get('error')}")
        result: dict[str, Any] = payload.get("result") or {}
        return result

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.send_close()
            self.transport.disconnect()


async def frame_matching(
    watcher: Session, match: Callable[[dict[str, Any]], bool], start: int, timeout: float
) -> int:
    """The index in ``watcher.bodies`` of the first frame body from ``start`` on that ``match``
    accepts, waiting for new frames (``watcher.watch()`` must have been called) up to
    ``timeout``."""
    assert watcher.bodies is not None, "call watch() first"
    async with asyncio.timeout(timeout):
        for _ in range(MAX_BODIES + 1):  # one pass per frame at most
            for index in range(start, len(watcher.bodies)):
                if match(watcher.bodies[index]):
                    return index
            start = len(watcher.bodies)
            if watcher.closed:
                raise ConnectionError("the watcher's session closed")
            watcher.frame_seen.clear()
            await watcher.frame_seen.wait()
    raise TimeoutError(f"no matching presence frame in {MAX_BODIES} frames")


async def open_session(url: str, source: str | None = None, timeout: float = 30) -> Session:
    """Connect, await the ``welcome``; ``source``: the local address to bind (127.0.0.x)."""
    kwargs: dict[str, Any] = {"websocket_handshake_timeout": timeout, "max_frame_size": 16 << 20}
    if source:
        kwargs["local_addr"] = (source, 0)
    async with asyncio.timeout(timeout):
        _, session = await ws_connect(Session, url, **kwargs)
        if not isinstance(session, Session):  # picows: None if closed during the upgrade
            raise ConnectionError(f"{url}: closed during the upgrade")
        await session.welcome
    return session


# -- the orchestrator's side of a member process ---------------------------------------------


class MemberProc:
    """One bench/presence_client.py process: JSON lines on its stdin and stdout."""

    def __init__(self, proc: asyncio.subprocess.Process, count: int, log: IO[bytes]) -> None:
        self.proc = proc
        self.count = count
        self.log = log  # its stderr: a file, so a chatty process never blocks on a full pipe

    @classmethod
    async def start(
        cls, urls: list[str], tenant: str, start: int, count: int, k: int
    ) -> MemberProc:
        args = ["--tenant", tenant, "--start", str(start), "--count", str(count)]
        args += ["--source", f"127.0.0.{FIRST_SOURCE_HOST + k}"]
        for url in urls:
            args += ["--url", url]
        log = tempfile.TemporaryFile()  # noqa: SIM115  # closed in close()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.presence_client", *args, cwd=REPO,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=log, start_new_session=True,
            )  # fmt: skip
        except BaseException:
            log.close()
            raise
        return cls(proc, count, log)

    async def read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            self.log.seek(0)
            err = self.log.read()[-2000:].decode(errors="replace")
            raise RuntimeError(f"member process exited: {err}")
        result: dict[str, Any] = orjson.loads(line)
        return result

    def send(self, command: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(orjson.dumps(command) + b"\n")

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send({"op": "close"})
        try:
            await self._stop(timeout=30)
        finally:
            self.log.close()

    async def _stop(self, timeout: float) -> None:
        """Let it close its sessions and exit; SIGKILL it if it has not after ``timeout``."""
        if self.proc.returncode is not None:
            return
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()


def split(n: int, parts: int) -> list[int]:
    base, extra = divmod(n, parts)
    return [base + (1 if k < extra else 0) for k in range(parts)]


async def ask_all(
    procs: list[MemberProc], commands: list[dict[str, Any]], timeout: float
) -> list[dict[str, Any]]:
    for proc, command in zip(procs, commands, strict=True):
        proc.send(command)
    return list(await asyncio.gather(*(p.read(timeout) for p in procs)))


# -- the member process -------------------------------------------------------------------


class Members:
    """The sessions of one member process and the work the orchestrator asks of them."""

    def __init__(self, sessions: list[Session], concurrency: int) -> None:
        self.sessions = sessions
        self.concurrency = concurrency
        self.errors: list[str] = []

    async def _each(self, sessions: list[Session], work: Any) -> int:
        """Run ``work(session)`` on each session, ``concurrency`` at a time; how many succeeded."""
        queue = iter(sessions)
        done = 0

        async def worker() -> None:
            nonlocal done
            for session in queue:  # the shared iterator hands each session out once
                try:
                    await work(session)
                    done += 1
                except (CommandFailed, ConnectionError, TimeoutError) as exc:
                    self.errors.append(f"{type(exc).__name__}: {exc}"[:300])

        async with asyncio.TaskGroup() as group:
            for _ in range(max(1, min(self.concurrency, len(sessions)))):
                group.create_task(worker())
        return done

    async def join(self) -> dict[str, Any]:
        started = time.perf_counter()

        async def join(session: Session) -> None:
            await session.command("join_channel", {"presence": True, "presence_events": False})

        joined = await self._each(self.sessions, join)
        return self._report(joined=joined, elapsed_s=time.perf_counter() - started)

    async def storm(self, n: int) -> dict[str, Any]:
        started = time.perf_counter()

        async def cycle(session: Session) -> None:
            await session.command("leave_channel")
            await session.command("join_channel", {"presence": True, "presence_events": False})

        cycles = await self._each(self.sessions[:n], cycle)
        return self._report(cycles=cycles, elapsed_s=time.perf_counter() - started)

    def _report(self, **fields: Any) -> dict[str, Any]:
        errors, self.errors = self.errors, []
        return {**fields, "errors": len(errors), "error_samples": errors[:ERROR_SAMPLES]}


def emit(message: dict[str, Any]) -> None:
    sys.stdout.buffer.write(orjson.dumps(message) + b"\n")
    sys.stdout.buffer.flush()


async def open_members(args: argparse.Namespace) -> list[Session]:
    urls = args.url
    semaphore = asyncio.Semaphore(args.concurrency)

    async def one(index: int) -> Session:
        url = session_url(urls[index % len(urls)], args.tenant, f"m{index:06d}")
        async with semaphore:
            return await open_session(url, args.source)

    indices = range(args.start, args.start + args.count)
    return list(await asyncio.gather(*(one(i) for i in indices)))


async def member_main(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    started = time.perf_counter()
    sessions = await open_members(args)
    emit({"opened": len(sessions), "elapsed_s": time.perf_counter() - started})
    members = Members(sessions, args.concurrency)
    try:
        for _ in range(100):  # a bench asks for a handful of operations
            line = await stdin.readline()
            command = orjson.loads(line) if line.strip() else {"op": "close"}
            if command["op"] == "join":
                emit(await members.join())
            elif command["op"] == "storm":
                emit(await members.storm(int(command["n"])))
            else:
                break
    finally:
        for session in sessions:
            session.close()
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.presence_client")
    parser.add_argument("--url", action="append", required=True, help="gateway URL (repeatable)")
    parser.add_argument("--tenant", required=True)
    parser.add_argument("--start", type=int, required=True, help="first member index")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--source", default=None, help="local address to bind, e.g. 127.0.0.2")
    parser.add_argument("--concurrency", type=int, default=64, help="commands in flight")
    return parser.parse_args(argv)


def main() -> int:
    args = parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop
    except ImportError:
        return asyncio.run(member_main(args))
    return uvloop.run(member_main(args))


if __name__ == "__main__":
    sys.exit(main())
