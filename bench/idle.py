"""Idle-connections workload: how many WebSocket sessions a server holds, and what each costs.

N connections are opened by several client *processes* (each holds at most
:data:`MAX_PER_CLIENT`, under the 20,000 open-file limit), each bound to its own source
address 127.0.0.2, 127.0.0.3, ... so ephemeral ports never run out. Every connection
completes the server's protocol handshake, so it is a real session:

* ``arqonbus``: ``ws://HOST:P/ws?token=dev:bench:c<i>``, then the ``welcome`` frame
* ``socketio-py`` / ``socketio-node``: Engine.IO open packet, ``40`` -> ``40{sid}``
* ``nats-ws``: ``INFO``, then ``CONNECT`` + ``PING`` -> ``PONG``

Connections are spread round-robin over the targets (several gateway processes for runs
beyond one process's open-file limit). While held, clients answer WebSocket pings,
socket.io pings (``2`` -> ``3``) and NATS ``PING``. Server RSS (VmRSS, summed over the
target PIDs) is read before the clients start and once every connection is open.

Report fields: ``upgrades_per_s`` is completed handshakes divided by the time from the
start signal to the last completed handshake (all clients together); ``open_phase_s`` is
the opening phase's wall time including connections that failed or timed out;
``rss_per_conn_kb`` is (after - before) / n_open. Kernel socket buffers are not in RSS.

Orchestrator API: ``await run_idle(kind, [(pid, url), ...], n)`` -> report dict.
Manual: ``python -m bench.idle --kind arqonbus --url ws://127.0.0.1:8765/ws --pid PID -n 20000``.
The client processes run ``python -m bench.idle client ...`` and talk JSON lines on stdio.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import resource
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

KINDS = ("arqonbus", "socketio-py", "socketio-node", "nats-ws")
MAX_PER_CLIENT = 15_000  # connections per client process (open-file hard limit is 20,000)
DEFAULT_PER_CLIENT = 10_000  # default split: n / 10,000 clients, at least 2
# Handshakes in flight per target, all clients together. The gateway listens with a backlog
# of 100: 200 in flight overflowed it (SYN retransmits, 1 s stalls, a third lower rate).
CONCURRENCY_PER_TARGET = 64
FIRST_SOURCE_HOST = 2  # client k binds 127.0.0.(2 + k)
ERROR_SAMPLES = 5
REPO_ROOT = Path(__file__).resolve().parent.parent
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)

Target = tuple[int, str]  # (server pid, base url)


# -- measurement helpers ------------------------------------------------------------


def rss_kb(pid: int) -> int:
    """VmRSS of ``pid`` in kB, from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid} (a zombie?)")


def total_rss_kb(pids: Sequence[int]) -> int:
    return sum(rss_kb(pid) for pid in dict.fromkeys(pids))


def connection_url(kind: str, base: str, index: int) -> str:
    if kind != "arqonbus":
        return base
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}token=dev:bench:c{index}"


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    rank = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[rank]


# -- client process -----------------------------------------------------------------


def _client_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.idle client")
    parser.add_argument("--kind", choices=KINDS, required=True)
    parser.add_argument("--target", action="append", required=True, help="base url (repeatable)")
    parser.add_argument("--start", type=int, required=True, help="first connection index")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--source", required=True, help="local address to bind, e.g. 127.0.0.2")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=120.0, help="opening phase budget")
    args = parser.parse_args(argv)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    needed = args.count + 64
    if hard != resource.RLIM_INFINITY and hard < needed:
        _emit({"event": "fatal", "error": f"open-file limit {hard} < {needed} needed"})
        return 2

    client = _IdleClient(args)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(client.run())
    return uvloop.run(client.run())


def _emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


class _IdleClient:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.transports: list[Any] = []
        self.listeners: list[Any] = []
        self.errors = 0
        self.error_samples: list[str] = []
        self.latencies: list[float] = []
        self.started = 0.0
        self.last_ok = 0.0  # perf_counter of the last completed handshake

    def _error(self, message: str) -> None:
        self.errors += 1
        if len(self.error_samples) < ERROR_SAMPLES:
            self.error_samples.append(message[:300])

    def _socket_factory(self, _parsed_url: Any) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # The port is picked at connect() from the full 4-tuple, not reserved at bind().
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((self.args.source, 0))
        except BaseException:
            sock.close()
            raise
        return sock

    async def _open_one(self, index: int, listener_cls: Any) -> None:
        from picows import ws_connect

        base = self.args.target[index % len(self.args.target)]
        url = connection_url(self.args.kind, base, index)
        started = time.perf_counter()
        transport = None
        try:
            async with asyncio.timeout(30):
                transport, listener = await ws_connect(
                    listener_cls,
                    url,
                    socket_factory=self._socket_factory,
                    websocket_handshake_timeout=30,
                    enable_auto_pong=True,
                    read_buffer_init_size=2048,
                    max_frame_size=1 << 20,
                )
                if listener is None:  # picows: the peer closed before the upgrade completed
                    raise ConnectionError("closed by the server during the upgrade")
                await listener.ready
        except Exception as exc:
            self._error(f"c{index} {url}: {type(exc).__name__}: {exc}")
            if transport is not None:
                transport.disconnect(False)
            return
        self.last_ok = time.perf_counter()
        self.latencies.append(self.last_ok - started)
        self.transports.append(transport)
        self.listeners.append(listener)

    async def _open_all(self) -> None:
        listener_cls = _listener_class(self.args.kind)
        indices = iter(range(self.args.start, self.args.start + self.args.count))

        async def worker() -> None:
            for index in indices:  # the shared iterator hands each index out once
                await self._open_one(index, listener_cls)

        workers = max(1, min(self.args.concurrency, self.args.count))
        try:
            async with asyncio.timeout(self.args.timeout), asyncio.TaskGroup() as group:
                for _ in range(workers):
                    group.create_task(worker())
        except TimeoutError:
            self._error(f"opening phase exceeded {self.args.timeout:.0f}s")
            # Every connection not opened by now is an error, counted once.
            self.errors = self.args.count - len(self.transports)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stdin = asyncio.StreamReader()
        pipe, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin
        )
        try:
            _emit({"event": "ready", "pid": os.getpid()})
            command = await stdin.readline()
            if command.strip() != b"go":
                return 1
            self.started = time.perf_counter()
            await self._open_all()
            elapsed = time.perf_counter() - self.started
            latencies = sorted(self.latencies)
            _emit(
                {
                    "event": "opened",
                    "n_open": len(self.transports),
                    "errors": self.errors,
                    "error_samples": self.error_samples,
                    "elapsed_s": elapsed,
                    "last_ok_s": max(0.0, self.last_ok - self.started),
                    "handshake_ms_p50": 1000 * _percentile(latencies, 0.50),
                    "handshake_ms_p99": 1000 * _percentile(latencies, 0.99),
                    "handshake_ms_max": 1000 * (latencies[-1] if latencies else 0.0),
                }
            )
            # Hold (answering pings in the listeners) until told to close, or the parent goes.
            await stdin.readline()
            dropped = sum(1 for listener in self.listeners if listener.dropped)
            await self._close_all()
            _emit({"event": "closed", "dropped_while_held": dropped})
            return 0
        finally:
            pipe.close()

    async def _close_all(self) -> None:
        from picows import WSCloseCode

        for transport in self.transports:
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(30):
                await asyncio.gather(
                    *(t.wait_disconnected() for t in self.transports), return_exceptions=True
                )


def _listener_class(kind: str) -> type:
    """A picows listener class that completes ``kind``'s handshake, then stays idle."""
    from picows import WSListener, WSMsgType

    class Base(WSListener):  # type: ignore[misc]
        __slots__ = ("dropped", "ready", "transport")

        def __init__(self) -> None:
            self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.dropped = False

        def on_ws_connected(self, transport: Any) -> None:
            self.transport = transport

        def on_ws_frame(self, transport: Any, frame: Any) -> None:
            msg_type = frame.msg_type
            if msg_type == WSMsgType.CLOSE:
                transport.send_close(frame.get_close_code())
                transport.disconnect()
            elif msg_type == WSMsgType.TEXT or msg_type == WSMsgType.BINARY:
                self.on_data(transport, frame.get_payload_as_bytes())

        def on_data(self, transport: Any, data: bytes) -> None:
            raise NotImplementedError

        def done(self) -> None:
            if not self.ready.done():
                self.ready.set_result(None)

        def fail(self, message: str) -> None:
            if not self.ready.done():
                self.ready.set_exception(ConnectionError(message))

        def on_ws_disconnected(self, transport: Any) -> None:
            if self.ready.done():
                self.dropped = True
            else:
                self.fail("disconnected during the handshake")

    class ArqonBus(Base):
        __slots__ = ()

        def on_data(self, transport: Any, data: bytes) -> None:
            if self.ready.done():
                return
            if b'"welcome"' in data:
                self.done()
            else:
                self.fail(f"expected welcome, got {data[:200]!r}")

    class SocketIO(Base):
        __slots__ = ()

        def on_data(self, transport: Any, data: bytes) -> None:
            if data == b"2":
                transport.send(WSMsgType.TEXT, b"3")
            elif data.startswith(b"40"):
                self.done()
            elif data.startswith(b"0{"):
                transport.send(WSMsgType.TEXT, b"40")
            elif data.startswith(b"44"):
                self.fail(f"connect_error {data[:200]!r}")

    class Nats(Base):
        __slots__ = ("buffer",)

        def __init__(self) -> None:
            super().__init__()
            self.buffer = b""

        def on_data(self, transport: Any, data: bytes) -> None:
            self.buffer += data
            while b"\r\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\r\n", 1)
                if line == b"PING":
                    transport.send(WSMsgType.BINARY, b"PONG\r\n")
                elif line == b"PONG":
                    self.done()
                elif line.startswith(b"INFO "):
                    transport.send(
                        WSMsgType.BINARY,
                        b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n',
                    )
                elif line.startswith(b"-ERR"):
                    self.fail(line[:200].decode(errors="replace"))
            if len(self.buffer) > 1 << 20:
                self.fail("no CRLF in 1 MB")

    if kind == "arqonbus":
        return ArqonBus
    if kind == "nats-ws":
        return Nats
    return SocketIO


# -- orchestrator ---------------------------------------------------------------------


class _ClientProc:
    def __init__(self, proc: asyncio.subprocess.Process, log: Any, source: str, count: int) -> None:
        self.proc = proc
        self.log = log
        self.source = source
        self.count = count

    async def read_event(self, event: str, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    await self.proc.wait()
                    raise RuntimeError(
                        f"idle client {self.source} exited ({self.proc.returncode}) "
                        f"waiting for {event}: {self.stderr_tail()}"
                    )
                message: dict[str, Any] = json.loads(line)
                if message.get("event") == "fatal":
                    raise RuntimeError(f"idle client {self.source}: {message['error']}")
                if message.get("event") == event:
                    return message

    def send(self, command: bytes) -> None:
        assert self.proc.stdin is not None
        if not self.proc.stdin.is_closing():
            with contextlib.suppress(ConnectionError):
                self.proc.stdin.write(command)

    def stderr_tail(self) -> str:
        self.log.seek(0)
        return str(self.log.read().decode(errors="replace")[-2000:])

    async def stop(self, timeout: float) -> None:
        """Close stdin (the client closes its sockets and exits); SIGKILL its group if it hangs."""
        try:
            if self.proc.stdin is not None and not self.proc.stdin.is_closing():
                self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, 9)
                await asyncio.wait_for(self.proc.wait(), 10)
        finally:
            self.log.close()


def _split(n: int, parts: int) -> list[int]:
    base, extra = divmod(n, parts)
    return [base + (1 if k < extra else 0) for k in range(parts)]


async def run_idle(
    kind: str,
    targets: list[tuple[int, str]],
    n: int,
    clients: int | None = None,
    timeout: float = 120,
    concurrency: int | None = None,
) -> dict[str, Any]:
    """Open ``n`` idle sessions spread over ``targets`` [(server_pid, base_url)], measure, close.

    ``timeout`` bounds the opening phase; the whole run also spends a few seconds starting
    and stopping the client processes.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: one of {', '.join(KINDS)}")
    if not targets:
        raise ValueError("at least one target (pid, url) is needed")
    if n < 1:
        raise ValueError("n must be at least 1")
    if clients is None:
        clients = max(2, math.ceil(n / DEFAULT_PER_CLIENT))
    clients = max(1, min(clients, n))
    if math.ceil(n / clients) > MAX_PER_CLIENT:
        raise ValueError(
            f"{n} connections over {clients} clients is more than {MAX_PER_CLIENT} per client"
        )
    if clients > 250:
        raise ValueError("at most 250 client processes (one source address each)")
    pids = [pid for pid, _ in targets]
    if concurrency is None:
        concurrency = CONCURRENCY_PER_TARGET * len(targets)
    urls = [url for _, url in targets]
    per_client_concurrency = max(1, math.ceil(concurrency / clients))

    run_started = time.perf_counter()
    rss_before = total_rss_kb(pids)
    procs: list[_ClientProc] = []
    start = 0
    try:
        for k, count in enumerate(_split(n, clients)):
            source = f"127.0.0.{FIRST_SOURCE_HOST + k}"
            cmd = [
                sys.executable, "-m", "bench.idle", "client", "--kind", kind,
                "--start", str(start), "--count", str(count), "--source", source,
                "--concurrency", str(per_client_concurrency), "--timeout", str(timeout),
            ]  # fmt: skip
            for url in urls:
                cmd += ["--target", url]
            start += count
            log = tempfile.TemporaryFile()  # noqa: SIM115  # closed in _ClientProc.stop
            try:
                proc = await asyncio.create_subprocess_exec(
                    *cmd,
                    cwd=REPO_ROOT,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=log,
                    start_new_session=True,
                )
            except BaseException:
                log.close()
                raise
            procs.append(_ClientProc(proc, log, source, count))

        await asyncio.gather(*(p.read_event("ready", 30) for p in procs))
        opened_at = time.perf_counter()
        for p in procs:
            p.send(b"go\n")
        reports = await asyncio.gather(*(p.read_event("opened", timeout + 30) for p in procs))
        open_phase_s = time.perf_counter() - opened_at
        rss_after = total_rss_kb(pids)

        for p in procs:
            p.send(b"close\n")
        closed = await asyncio.gather(*(p.read_event("closed", 60) for p in procs))
    finally:
        await asyncio.gather(*(p.stop(30) for p in procs), return_exceptions=True)

    n_open = sum(r["n_open"] for r in reports)
    # From "go" to the last completed handshake, all clients together: connections that
    # failed (and waited out their timeout) must not dilute the rate of those that worked.
    last_ok_s = max(r["last_ok_s"] for r in reports)
    samples = [s for r in reports for s in r["error_samples"]][:ERROR_SAMPLES]
    return {
        "kind": kind,
        "n_target": n,
        "n_open": n_open,
        "targets": len(targets),
        "clients": clients,
        "concurrency": per_client_concurrency * clients,
        "open_phase_s": round(open_phase_s, 3),
        "last_handshake_s": round(last_ok_s, 3),
        "upgrades_per_s": round(n_open / last_ok_s, 1) if last_ok_s > 0 else 0.0,
        "handshake_ms_p50": round(
            _percentile(sorted(r["handshake_ms_p50"] for r in reports), 0.5), 2
        ),
        "handshake_ms_p99": round(max(r["handshake_ms_p99"] for r in reports), 2),
        "server_rss_before_kb": rss_before,
        "server_rss_after_kb": rss_after,
        "rss_per_conn_kb": round((rss_after - rss_before) / n_open, 3) if n_open else 0.0,
        "errors": {"count": sum(r["errors"] for r in reports), "samples": samples},
        "dropped_while_held": sum(c["dropped_while_held"] for c in closed),
        "duration_s": round(time.perf_counter() - run_started, 3),
    }


# -- CLI ----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["client"]:
        return _client_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m bench.idle",
        description="Open N idle WebSocket sessions against running servers; print a JSON report.",
    )
    parser.add_argument("--kind", choices=KINDS, required=True)
    parser.add_argument("--url", action="append", required=True, help="base url (repeatable)")
    parser.add_argument(
        "--pid", action="append", type=int, required=True, help="server pid, one per --url"
    )
    parser.add_argument("-n", type=int, required=True, help="connections")
    parser.add_argument("--clients", type=int, default=None, help="client processes")
    parser.add_argument(
        "--concurrency", type=int, default=None, help="handshakes in flight (64 per target)"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="opening phase budget (s)")
    args = parser.parse_args(argv)
    if len(args.url) != len(args.pid):
        parser.error("give one --pid per --url")
    report = asyncio.run(
        run_idle(
            args.kind,
            list(zip(args.pid, args.url, strict=True)),
            args.n,
            clients=args.clients,
            timeout=args.timeout,
            concurrency=args.concurrency,
        )
    )
    print(json.dumps(report, indent=2))
    return 0 if report["n_open"] == report["n_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
