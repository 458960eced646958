"""mesh/nats_client.py FastParser: the same calls as nats-py's protocol parser, in order,
on generated streams of MSG, HMSG and control lines cut into reads at any byte."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.protocol.parser import Parser

from arqonbus_server.mesh.nats_client import FastParser


class Recorder:
    """What a parser asks of the client, in order. ``raw``: sids of raw subscriptions."""

    def __init__(self, raw: frozenset[int] = frozenset()) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.raw = raw

    def _dispatch_raw(
        self, sid: int, data: bytes, headers: bytes | None, reply: bytes, subject: bytes
    ) -> bool:
        if sid not in self.raw:
            return False
        self.calls.append(("msg", sid, bytes(subject), data, headers, bytes(reply)))
        return True

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        if sid in self.raw:  # nats-py's parser: FastHeaderClient._process_msg does this
            self.calls.append(("msg", sid, bytes(subject), data, headers, bytes(reply)))
        else:
            self.calls.append(("msg", sid, bytes(subject), bytes(reply), data, headers))

    async def _process_ping(self) -> None:
        self.calls.append(("ping",))

    async def _process_pong(self) -> None:
        self.calls.append(("pong",))

    async def _process_info(self, info: dict[str, Any]) -> None:
        self.calls.append(("info", info))

    async def _process_err(self, err: str) -> None:
        self.calls.append(("err", err))


tokens = st.text("abcXYZ09._>*-", min_size=1, max_size=12).map(str.encode)
payloads = st.binary(max_size=40) | st.sampled_from([b"", b"\r\n", b"MSG a 1 2\r\n"])
header_blocks = st.lists(st.tuples(tokens, tokens), max_size=3).map(
    lambda kv: b"NATS/1.0\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in kv) + b"\r\n"
)


@st.composite
def lines(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["msg", "hmsg", "ping", "pong", "ok", "info", "err"]))
    subject, sid = draw(tokens), draw(st.integers(1, 30))
    reply = draw(st.none() | tokens)
    head = b"%s %d " % (subject, sid) + (reply + b" " if reply else b"")
    if kind == "msg":
        body = draw(payloads)
        return b"MSG " + head + b"%d\r\n" % len(body) + body + b"\r\n"
    if kind == "hmsg":
        block, body = draw(header_blocks), draw(payloads)
        sizes = b"%d %d\r\n" % (len(block), len(block) + len(body))
        return b"HMSG " + head + sizes + block + body + b"\r\n"
    if kind == "info":
        return b"INFO " + orjson.dumps({"server_id": subject.decode()}) + b"\r\n"
    if kind == "err":
        return b"-ERR 'Slow " + subject + b"'\r\n"
    return {"ping": b"PING\r\n", "pong": b"PONG\r\n", "ok": b"+OK\r\n"}[kind]


async def feed(parser: Parser, stream: bytes, cuts: list[int]) -> None:
    edges = [0, *sorted({c % (len(stream) + 1) for c in cuts}), len(stream)]
    for a, b in itertools.pairwise(edges):
        await parser.parse(stream[a:b])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(lines(), max_size=25),
    st.lists(st.integers(0, 10_000), max_size=12),
    st.frozensets(st.integers(1, 30), max_size=5),
)
def test_same_calls_as_nats_py_whatever_the_reads(
    items: list[bytes], cuts: list[int], raw: frozenset[int]
) -> None:
    stream = b"".join(items)
    ours, theirs = Recorder(raw), Recorder(raw)

    async def both() -> None:
        await feed(FastParser(ours), stream, cuts)
        await feed(Parser(theirs), stream, cuts)

    asyncio.run(both())
    assert ours.calls == theirs.calls


def test_a_payload_split_across_reads_waits_for_the_rest() -> None:
    rec = Recorder()
    parser = FastParser(rec)
    stream = b"HMSG s 7 _INBOX.r 12 17\r\nNATS/1.0\r\n\r\nhello\r\nMSG t 8 3\r\nabc\r\n"

    async def run() -> None:
        await parser.parse(stream[:30])
        assert rec.calls == []
        await parser.parse(stream[30:])

    asyncio.run(run())
    assert rec.calls == [
        ("msg", 7, b"s", b"_INBOX.r", b"hello", b"NATS/1.0\r\n\r\n"),
        ("msg", 8, b"t", b"", b"abc", None),
    ]
    assert parser.buf == bytearray()
