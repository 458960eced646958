"""Frame abuse against a real gateway: oversized frames, fragment floods, lying lengths.

``python -m chaos.frames --json OUT [--long]``

Each attack opens a raw WebSocket connection (a TCP socket, a hand-written upgrade and
hand-built frames, since a conforming client library refuses to send most of these),
waits for the gateway's welcome, misbehaves, and records how the gateway closed:

- ``oversized``: one text frame above the maximum message size -> 1009;
- ``fragment_overflow``: a message in 1 KiB fragments that passes the maximum in total
  -> 1009;
- ``fragment_count``: 5000 one-byte fragments, more than the gateway assembles for one
  message (MAX_FRAGMENTS, 256), the total well within the maximum size -> 1009;
- ``huge_length``: a frame header declaring a 2**63-1 byte payload, then a few bytes
  -> 1009 at once, nothing allocated for the declared size;
- ``tiny_fragments``: a valid envelope split into MAX_FRAGMENTS 1-2 byte fragments ->
  processed (answered), the connection stays open;
- ``invalid_utf8``: a text frame that is not UTF-8 -> 1007;
- ``close_mid_message``: a Close between the fragments of a message -> the Close is
  answered (1000), not failed as a protocol error.

The suite runs them many times against a gateway process, measures its RSS (/proc)
before and after, and checks that a bystander client is served throughout.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import struct
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from arqonbus_server.gateway.ws.transport import (
    MAX_FRAGMENTS,  # fragments per message the gateway assembles
)
from chaos.procfs import rss_bytes
from chaos.suite import finish, parse_suite_args

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

CLOSE_TIMEOUT_S = 15.0
HANDSHAKE_RETRIES = 50  # a 429 (per-address connection rate) is waited out this many times
HANDSHAKE_PINGS = 3  # keepalive pings answered before the welcome, at most
RSS_BUDGET_BYTES = 50 * 1024 * 1024


class AttackError(RuntimeError):
    pass


# -- raw WebSocket framing (client side: masked) ------------------------------------------


def _mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if n == 0:
        return b""
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def client_frame(
    opcode: int, payload: bytes = b"", fin: bool = True, declared_length: int | None = None
) -> bytes:
    """A masked client->server frame; ``declared_length`` lies about the payload length."""
    n = len(payload) if declared_length is None else declared_length
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        header = struct.pack("!BB", first, 0x80 | n)
    elif n < 65536:
        header = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, n)
    key = os.urandom(4)
    return header + key + _mask(payload, key)


def close_payload(code: int, reason: str = "") -> bytes:
    return struct.pack("!H", code) + reason.encode()


class RawWs:
    """One raw WebSocket connection to a gateway, past its welcome."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int, token: str, timeout: float = 15.0) -> RawWs:
        """Upgrade and read the welcome; a 429 is waited out (Retry-After), a few times."""
        async with asyncio.timeout(timeout * 4):
            for _ in range(HANDSHAKE_RETRIES):
                ws, retry_after = await cls._try_open(host, port, token, timeout)
                if ws is not None:
                    return ws
                await asyncio.sleep(retry_after)  # the server said when to come back
        raise AttackError(f"still rate-limited after {HANDSHAKE_RETRIES} tries")

    @classmethod
    async def _try_open(
        cls, host: str, port: int, token: str, timeout: float
    ) -> tuple[RawWs | None, float]:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            key = base64.b64encode(os.urandom(16)).decode()
            writer.write(
                (
                    f"GET /ws?token={token} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                    "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                    f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                ).encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            if status == 429:
                retry = 1.0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"retry-after":
                        with contextlib.suppress(ValueError):
                            retry = max(0.05, min(5.0, float(value.strip())))
                writer.close()
                return None, retry
            if status != 101:
                writer.close()
                raise AttackError(f"upgrade refused: {head.decode(errors='replace')[:200]}")
            ws = cls(reader, writer)
            opcode, payload = await ws.read_frame()
            for _ in range(HANDSHAKE_PINGS):
                # The gateway's keepalive may ping a new connection before its welcome (a
                # busy gateway, a keepalive slot visited at once): answered, as RFC 6455 says.
                if opcode != OP_PING:
                    break
                await ws.send(client_frame(OP_PONG, payload))
                opcode, payload = await ws.read_frame()
            if opcode != OP_TEXT or orjson.loads(payload).get("type") != "welcome":
                raise AttackError(f"expected the welcome, got opcode {opcode}: {payload[:200]!r}")
            return ws, 0.0

    async def read_frame(self) -> tuple[int, bytes]:
        """The next server frame (unmasked) as (opcode, payload)."""
        head = await self.reader.readexactly(2)
        opcode, n = head[0] & 0x0F, head[1] & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
        return opcode, await self.reader.readexactly(n)

    async def send(self, data: bytes) -> None:
        """Write; a peer that already closed is not an error here (the close code tells)."""
        with contextlib.suppress(ConnectionError, OSError):
            self.writer.write(data)
            await self.writer.drain()

    async def wait_close(self, timeout: float = CLOSE_TIMEOUT_S) -> int | None:
        """Read until the server's Close; its code (1005 if empty), None on EOF without one."""
        async with asyncio.timeout(timeout):
            try:
                while True:
                    opcode, payload = await self.read_frame()
                    if opcode == OP_CLOSE:
                        return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            except (asyncio.IncompleteReadError, ConnectionError):
                return None

    async def wait_reply(self, request_id: str, timeout: float = CLOSE_TIMEOUT_S) -> dict[str, Any]:
        """The first text message answering ``request_id``."""
        async with asyncio.timeout(timeout):
            while True:
                opcode, payload = await self.read_frame()
                if opcode == OP_CLOSE:
                    raise AttackError(f"closed while waiting for a reply: {payload!r}")
                if opcode != OP_TEXT:
                    continue
                message: dict[str, Any] = orjson.loads(payload)
                if (message.get("payload") or {}).get("request_id") == request_id:
                    return message

    def abort(self) -> None:
        transport = self.writer.transport
        transport.abort()


# -- the attacks --------------------------------------------------------------------------


@dataclass
class Target:
    host: str
    port: int
    max_message_bytes: int
    tenant: str = field(default_factory=lambda: "frames" + uuid.uuid4().hex[:8])

    def token(self, who: str) -> str:
        return f"dev:{self.tenant}:{who}"


@dataclass
class Outcome:
    attack: str
    ok: bool
    detail: str
    seconds: float


Attack = Callable[[RawWs, Target], Awaitable[tuple[bool, str]]]


def _code_in(code: int | None, expected: tuple[int, ...]) -> tuple[bool, str]:
    return code in expected, f"closed {code}" if code is not None else "dropped without a Close"


async def oversized(ws: RawWs, target: Target) -> tuple[bool, str]:
    await ws.send(client_frame(OP_TEXT, b"x" * (target.max_message_bytes + 1)))
    return _code_in(await ws.wait_close(), (1009,))


async def fragment_overflow(ws: RawWs, target: Target) -> tuple[bool, str]:
    piece = b"y" * 1024
    frames = target.max_message_bytes // len(piece) + 8
    data = [client_frame(OP_TEXT, piece, fin=False)]
    data += [client_frame(OP_CONT, piece, fin=False) for _ in range(frames - 1)]
    await ws.send(b"".join(data))
    return _code_in(await ws.wait_close(), (1009, 1008))


async def fragment_count(ws: RawWs, target: Target) -> tuple[bool, str]:
    count = 5000  # one-byte fragments: 5000 bytes, far below the maximum size
    data = [client_frame(OP_TEXT, b"{", fin=False)]
    data += [client_frame(OP_CONT, b" ", fin=False) for _ in range(count - 1)]
    await ws.send(b"".join(data))
    return _code_in(await ws.wait_close(), (1009, 1008))


async def huge_length(ws: RawWs, target: Target) -> tuple[bool, str]:
    header = client_frame(OP_TEXT, b"", declared_length=2**63 - 1)
    await ws.send(header + b"z" * 16)  # and nothing more
    return _code_in(await ws.wait_close(), (1009, 1002))


def split(data: bytes, parts: int) -> list[bytes]:
    """``data`` in ``parts`` pieces of (nearly) equal size."""
    size, extra = divmod(len(data), parts)
    out, at = [], 0
    for i in range(parts):
        n = size + (1 if i < extra else 0)
        out.append(data[at : at + n])
        at += n
    return out


async def tiny_fragments(ws: RawWs, target: Target) -> tuple[bool, str]:
    """A valid envelope in as many fragments as allowed (1-2 bytes each): answered."""
    request_id = "m_" + uuid.uuid4().hex[:12]
    envelope = orjson.dumps(
        {
            "id": request_id,
            "type": "event",
            "room": "abuse",
            "channel": "fragments",
            "payload": {"pad": "p" * 300},
        }
    )
    pieces = split(envelope, min(MAX_FRAGMENTS, len(envelope)))
    data = [client_frame(OP_TEXT, pieces[0], fin=False)]
    data += [client_frame(OP_CONT, piece, fin=False) for piece in pieces[1:-1]]
    data.append(client_frame(OP_CONT, pieces[-1], fin=True))
    await ws.send(b"".join(data))
    reply = await ws.wait_reply(request_id)
    if reply.get("type") != "ack":
        return False, f"answered {reply.get('type')}: {reply.get('payload')}"
    await ws.send(client_frame(OP_CLOSE, close_payload(1000)))
    ok, detail = _code_in(await ws.wait_close(), (1000,))
    return ok, f"ack for a {len(pieces)}-fragment message, then {detail}"


async def invalid_utf8(ws: RawWs, target: Target) -> tuple[bool, str]:
    await ws.send(client_frame(OP_TEXT, b'{"id": "\xff\xfe"}'))
    return _code_in(await ws.wait_close(), (1007,))


async def close_mid_message(ws: RawWs, target: Target) -> tuple[bool, str]:
    await ws.send(
        client_frame(OP_TEXT, b'{"id": ', fin=False)
        + client_frame(OP_CLOSE, close_payload(1000))
        + client_frame(OP_CONT, b'"late"}', fin=True)
    )
    return _code_in(await ws.wait_close(), (1000,))


ATTACKS: dict[str, Attack] = {
    "oversized": oversized,
    "fragment_overflow": fragment_overflow,
    "fragment_count": fragment_count,
    "huge_length": huge_length,
    "tiny_fragments": tiny_fragments,
    "invalid_utf8": invalid_utf8,
    "close_mid_message": close_mid_message,
}
# What the memory rounds repeat: the ones that make the gateway buffer or refuse data.
MEMORY_MIX = ("oversized", "fragment_overflow", "fragment_count", "huge_length", "tiny_fragments")


async def attack(target: Target, name: str) -> Outcome:
    """One connection, one attack; any error is a failed outcome, never an exception."""
    started = time.monotonic()
    ws: RawWs | None = None
    try:
        ws = await RawWs.open(target.host, target.port, target.token(f"{name}-{os.getpid()}"))
        ok, detail = await ATTACKS[name](ws, target)
    except (AttackError, OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
        ok, detail = False, f"{type(exc).__name__}: {exc}"
    finally:
        if ws is not None:
            ws.abort()
    return Outcome(name, ok, detail, time.monotonic() - started)


async def attack_many(
    target: Target, names: tuple[str, ...], count: int, concurrency: int = 8
) -> list[Outcome]:
    """``count`` attacks cycling through ``names``, ``concurrency`` at a time."""
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> Outcome:
        async with gate:
            return await attack(target, names[i % len(names)])

    return list(await asyncio.gather(*(one(i) for i in range(count))))


# -- the suite ----------------------------------------------------------------------------


@dataclass
class Round:
    attempts: int
    rss_after: int
    failures: list[Outcome]
    bystander_ok: bool


async def round_trip(ws: RawWs) -> bool:
    """Publish one event on ``ws`` and wait for its ack."""
    request_id = "m_" + uuid.uuid4().hex[:12]
    await ws.send(
        client_frame(
            OP_TEXT,
            orjson.dumps(
                {
                    "id": request_id,
                    "type": "event",
                    "room": "abuse",
                    "channel": "bystander",
                    "payload": {},
                }
            ),
        )
    )
    try:
        reply = await ws.wait_reply(request_id)
    except (AttackError, TimeoutError, asyncio.IncompleteReadError, ConnectionError):
        return False
    return reply.get("type") == "ack"


async def run(long: bool = False, workdir: Path | None = None) -> dict[str, Any]:
    from arqonbus_server.gateway.config import load_settings
    from arqonbus_server.mesh.local import LocalCluster
    from tests.support import GatewayProcess

    rounds_n, per_round = (6, 500) if long else (2, 100)
    base = workdir or Path(tempfile.mkdtemp(prefix="frames-", dir=_scratch()))
    cluster = LocalCluster(base / "nats", nodes=1)
    await cluster.start(timeout=60)
    gateway = GatewayProcess(cluster.url_csv)
    outcomes: Counter[str] = Counter()
    failures: list[Outcome] = []
    rounds: list[Round] = []
    try:
        await gateway.start(timeout=60)
        assert gateway.proc is not None
        pid = gateway.proc.pid
        target = Target("127.0.0.1", gateway.port, 2 * load_settings().max_envelope_bytes)
        bystander = await RawWs.open(target.host, target.port, target.token("bystander"))
        # Each attack once, to check its outcome and warm the gateway up before measuring.
        for name in ATTACKS:
            result = await attack(target, name)
            outcomes[f"{name}:{'ok' if result.ok else 'failed'}"] += 1
            if not result.ok:
                failures.append(result)
        rss_before = rss_bytes(pid)
        for _ in range(rounds_n):
            results = await attack_many(target, MEMORY_MIX, per_round)
            for result in results:
                outcomes[f"{result.attack}:{'ok' if result.ok else 'failed'}"] += 1
            round_failures = [r for r in results if not r.ok]
            failures += round_failures
            rounds.append(
                Round(
                    per_round,
                    rss_bytes(pid),
                    round_failures,
                    await round_trip(bystander),
                )
            )
        bystander.abort()
        rss_after = rss_bytes(pid)
        alive = gateway.proc.returncode is None
    finally:
        await gateway.stop()
        await cluster.stop()
    growth = rss_after - rss_before
    passed = (
        not failures and alive and all(r.bystander_ok for r in rounds) and growth < RSS_BUDGET_BYTES
    )
    mib = 1024 * 1024
    lines = [
        "### Frame abuse against a gateway process",
        "",
        f"{sum(r.attempts for r in rounds) + len(ATTACKS)} abusive connections; maximum message "
        f"{target.max_message_bytes} bytes; RSS budget {RSS_BUDGET_BYTES // mib} MiB growth.",
        "",
        "| attack | expected | ok | failed |",
        "| --- | --- | ---: | ---: |",
    ]
    expected = {
        "oversized": "close 1009",
        "fragment_overflow": "close 1009",
        "fragment_count": "close 1009",
        "huge_length": "close 1009, no allocation",
        "tiny_fragments": "answered, stays open",
        "invalid_utf8": "close 1007",
        "close_mid_message": "close 1000 (echoed)",
    }
    for name in ATTACKS:
        lines.append(
            f"| {name} | {expected[name]} | {outcomes[f'{name}:ok']} | {outcomes[f'{name}:failed']} |"
        )
    lines += [
        "",
        f"Gateway RSS: {rss_before / mib:.1f} MiB before, "
        + ", ".join(f"{r.rss_after / mib:.1f}" for r in rounds)
        + f" MiB after each round of {per_round}; growth {growth / mib:+.1f} MiB. "
        f"Bystander served after every round: {all(r.bystander_ok for r in rounds)}; "
        f"gateway alive: {alive}.",
    ]
    if failures:
        lines += ["", "**Failures:**", ""]
        lines += [f"- {f.attack}: {f.detail}" for f in failures[:20]]
    return {
        "name": "frames",
        "passed": passed,
        "summary_md": "\n".join(lines) + "\n",
        "details": {
            "long": long,
            "outcomes": dict(outcomes),
            "rss_before": rss_before,
            "rss_after_rounds": [r.rss_after for r in rounds],
            "rss_growth": growth,
            "rss_budget": RSS_BUDGET_BYTES,
            "bystander_ok": [r.bystander_ok for r in rounds],
            "gateway_alive": alive,
            "failures": [f"{f.attack}: {f.detail}" for f in failures[:100]],
        },
    }


def _scratch() -> Path:
    path = Path(__file__).resolve().parent.parent / ".chaos" / "frames"
    path.mkdir(parents=True, exist_ok=True)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_suite_args("python -m chaos.frames", __doc__, "3000 attacks instead of 200", argv)
    return finish(args.json, asyncio.run(run(long=args.long)))


if __name__ == "__main__":
    sys.exit(main())
