"""The faster header parser (mesh/nats_client.py) gives exactly nats-py's own results."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client

from arqonbus_server.mesh.nats_client import parse_header_lines

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
