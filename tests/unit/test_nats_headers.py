"""The faster header parser (mesh/nats_client.py) gives exactly nats-py's own results."""

from __future__ import annotations

import nats.errors
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client

from arqonbus_server.mesh.nats_client import (
    encode_header_lines,
    encode_hpub,
    header_fields,
    header_int,
    header_line,
    header_status,
    parse_header_lines,
)

STORED = (
    b"Nats-Stream: arq_t1\r\nNats-Subject: arq.ev.t1.room.channel\r\nNats-Sequence: 42\r\n"
    b"Nats-Time-Stamp: 2026-12-06T11:55:00.123456789Z\r\nNats-Msg-Id: abc\r\n"
    b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n"
)
# Lines nats-py skips or keeps in its own way: no colon, whitespace or non-ASCII in a name,
# an empty name, padding around name and value, a colon in the value, bad UTF-8 in a value.
ODD = (
    b"no colon here\r\nbad name: x\r\nna\xefme: x\r\n: empty name\r\n  Pad  :  v  \r\n"
    b"Url: http://x:1/\r\nBin: \xff\xfe\r\nTab\tName: x\r\nSep\x1fName: x\r\nA:1\r\nA: 2\r\n"
)

lines = st.lists(
    st.one_of(
        st.sampled_from([b"Nats-Msg-Id", b"Nats-Sequence", b" Pad ", b"a b", b"\x1c", b""]),
        st.binary(max_size=12),
    ).flatmap(
        lambda name: st.tuples(
            st.just(name), st.sampled_from([b":", b": ", b"", b"::"]), st.binary(max_size=12)
        )
    ),
    max_size=8,
)


def test_typical_and_odd_blocks_parse_as_nats_py_parses_them() -> None:
    for raw in (STORED, ODD, b"", b"\r\n", STORED + ODD):
        assert parse_header_lines(raw) == Client._parse_header_lines(raw), raw
    assert parse_header_lines(STORED)["Nats-Sequence"] == "42"
    assert parse_header_lines(ODD)["Pad"] == "v" and "bad name" not in parse_header_lines(ODD)


@settings(max_examples=300, deadline=None)
@given(lines)
def test_any_block_parses_as_nats_py_parses_it(parts: list[tuple[bytes, bytes, bytes]]) -> None:
    raw = b"\r\n".join(name + sep + value for name, sep, value in parts)
    assert parse_header_lines(raw) == Client._parse_header_lines(raw)
    assert parse_header_lines(raw) == Client._parse_header_lines(raw)  # remembered names too


STATUS_BLOCKS = [
    b"NATS/1.0 204 EOB\r\nNats-Num-Pending: 0\r\nNats-Last-Sequence: 9\r\n\r\n",
    b"NATS/1.0 404 No Messages\r\n\r\n",
    b"NATS/1.0 503\r\n\r\n",
    b"NATS/1.0 408 Request Timeout\r\n\r\n",
    b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 1016\r\nNats-Last-Stream: 1024\r\n\r\n",
    b"NATS/1.0 abc\r\n\r\n",  # not a number: no status
    b"NATS/1.0\r\n" + STORED,
    b"NATS/1.0\r\n" + ODD + b"\r\n",
]


async def test_raw_blocks_read_as_nats_py_reads_them() -> None:
    """header_status / header_fields (the raw subscriptions' view) against nats-py's own
    parse of whole header blocks: the status, and every header but the description."""
    client = Client()
    for raw in STATUS_BLOCKS:
        theirs = await client._process_headers(raw) or {}
        assert header_status(raw) == theirs.get("Status"), raw
        if header_status(raw) is None:
            assert header_fields(raw) == theirs, raw
    assert header_status(None) is None and header_fields(None) == {}
    assert header_fields(b"NATS/1.0\r\n" + STORED)["Nats-Sequence"] == "42"


def test_an_integer_header_is_found_without_parsing_the_block() -> None:
    stored = b"NATS/1.0\r\n" + STORED
    assert header_int(stored, b"Nats-Sequence") == 42
    assert header_int(stored + b"Nats-Sequence: 43\r\n\r\n", b"Nats-Sequence") == 43  # last
    assert header_int(stored, b"Nats-Stream") is None  # not a number: parse the block
    assert header_int(stored, b"Nats-Pending") is None
    assert header_int(None, b"Nats-Sequence") is None
    assert header_int(b"NATS/1.0\r\nNats-Sequence:7", b"Nats-Sequence") is None  # no line end


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**64), st.sampled_from([b"", b" ", b"  "]))
def test_an_integer_header_agrees_with_the_parsed_block(seq: int, pad: bytes) -> None:
    raw = b"NATS/1.0\r\nNats-Stream: s\r\nNats-Sequence:" + pad + b"%d\r\n\r\n" % seq
    assert header_int(raw, b"Nats-Sequence") == int(header_fields(raw)["Nats-Sequence"]) == seq


class _Captured(Client):
    """nats-py's client that keeps the commands its publish would send."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []

    async def _send_command(self, cmd: bytes, priority: bool = False) -> None:
        self.sent.append(cmd)


async def nats_py_hpub(subject: str, reply: str, headers: dict[str, str], payload: bytes) -> bytes:
    client = _Captured()
    client._max_payload = 1 << 20
    client._status = Client.CONNECTED
    await client.publish(subject, payload, reply=reply, headers=headers)
    (command,) = client.sent
    return command


header_names = st.one_of(
    st.sampled_from(["Nats-Msg-Id", "Nats-TTL", "traceparent", " Pad ", "", "  "]),
    st.text(st.characters(codec="ascii"), max_size=10),
)
# Values with line breaks and padding too: the encoders replace CR and LF only when present.
header_values = st.one_of(st.text(max_size=20), st.text(" \r\n\tab", max_size=8))


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(header_names, header_values, max_size=5),
    st.sampled_from(["arq.ev.t.r.c", "a.b"]),
    st.sampled_from(["", "_INBOX.x.1"]),
    st.binary(max_size=40),
)
async def test_encode_hpub_sends_what_nats_py_would_or_refuses_the_same(
    headers: dict[str, str], subject: str, reply: str, payload: bytes
) -> None:
    try:
        expected: bytes | type[Exception] = await nats_py_hpub(subject, reply, headers, payload)
    except nats.errors.Error as exc:
        expected = type(exc)
    try:
        got: bytes | type[Exception] = encode_hpub(subject, reply, headers, payload)
    except nats.errors.Error as exc:
        got = type(exc)
    assert got == expected


def test_encode_hpub_puts_the_callers_own_lines_after_the_headers() -> None:
    command = encode_hpub("a.b", "r.1", {"Nats-Msg-Id": "k"}, b"{}", b"X-Own: 1\r\n")
    hdr = b"NATS/1.0\r\nNats-Msg-Id: k\r\nX-Own: 1\r\n\r\n"
    assert command == b"HPUB a.b r.1 %d %d\r\n%s{}\r\n" % (len(hdr), len(hdr) + 2, hdr)
    with pytest.raises(nats.errors.BadSubjectError):
        encode_hpub("a b", "", {}, b"")


@settings(max_examples=300, deadline=None)
@given(header_names, header_values)
def test_one_header_line_is_what_the_header_lines_of_one_header_are(name: str, value: str) -> None:
    try:
        expected: bytes | type[Exception] = encode_header_lines({name: value})
    except nats.errors.Error as exc:
        expected = type(exc)
    try:
        got: bytes | type[Exception] = header_line(name, value)
    except nats.errors.Error as exc:
        got = type(exc)
    assert got == expected
