"""nats-py's client with a faster parser for message header blocks (same results), and
subscriptions whose messages skip nats-py's per-message machinery.

Every stored event a replay reads and every live event the gateway receives carries a
header block (``Nats-Stream``, ``Nats-Subject``, ``Nats-Sequence``, ``Nats-Time-Stamp``,
``Nats-Msg-Id``, ...). nats-py 2.16 parses it with a per-character whitespace check on each
name; a profile of a 100k-event replay put 55 % of the gateway's CPU there. This parser
gives the same dict (tests/unit/test_nats_headers.py checks it against nats-py's own on
generated input) about 3x faster: header names repeat, so each distinct raw name is
validated and decoded once and remembered (at most ``_MAX_NAMES`` of them).

:meth:`FastHeaderClient.subscribe_raw` hands each message of a subscription to a plain
function inside the client's read loop, with the payload, the raw header block and the
reply subject (a pull consumer's ack subject holds the event's seqs): no
``Msg`` object, no headers dict unless the handler parses one, no queue and no task hop.
For a replay's batched direct gets (100k events read at once) nats-py's path of a ``Msg``,
a subscription queue and a callback task per message was half of the gateway's CPU.

:meth:`FastHeaderClient.reply_subject` gives a request its own reply subject under one
wildcard subscription per connection, routed by subject in the read loop: a short request
(a resuming client's replay of a few events) costs no ``SUB``/``UNSUB`` pair, which the
servers would also carry to every node of the cluster as interest changes. In a reconnect
storm of 5,000 clients that was 20,000 protocol messages in seconds.

:class:`FastParser` reads ``MSG`` and ``HMSG`` off the socket's bytes without nats-py's two
regular expressions, argument dict and three buffer cuts per message (the replay's next
largest cost after the above), and calls a raw subscription's handler without a coroutine.
tests/unit/test_nats_parser.py checks it against nats-py's parser on generated streams cut
at every byte.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import Callable, Mapping
from typing import cast

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.client import _validate_subject
from nats.aio.subscription import Subscription
from nats.errors import ProtocolError
from nats.protocol.parser import AWAITING_CONTROL_LINE, Parser

# What str.isspace() is true for among ASCII characters (bytes.split() misses \x1c-\x1f).
_WHITESPACE = re.compile(rb"[\s\x1c-\x1f]")
_MAX_NAMES = 4096
_names: dict[bytes, str | None] = {}


def _key(raw_name: bytes) -> str | None:
    """The header key for ``raw_name`` as nats-py makes it, or None when it skips the line."""
    name = raw_name.strip()
    if _WHITESPACE.search(name) is not None:  # whitespace inside a name: not a token
        return None
    try:
        return name.decode("ascii")
    except UnicodeDecodeError:
        return None


def parse_header_lines(raw: bytes) -> dict[str, str]:
    """``Name: Value\\r\\n`` lines -> {name: value}, exactly as nats-py 2.16's
    ``Client._parse_header_lines``."""
    out: dict[str, str] = {}
    names = _names
    for line in raw.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        try:
            key = names[name]
        except KeyError:
            key = _key(name)
            if len(names) < _MAX_NAMES:
                names[name] = key
        if key is None:
            continue
        out[key] = value.strip().decode("utf-8", "replace")
    return out


_HDR_LINE = b"NATS/1.0"


def header_status(raw: bytes | None) -> str | None:
    """The inline status of a raw header block (``NATS/1.0 404 No Messages``), as nats-py
    puts it in the ``Status`` header: the 3-character code when it is a number, else None."""
    if not raw or raw[len(_HDR_LINE) : len(_HDR_LINE) + 1] != b" ":
        return None
    code = raw[len(_HDR_LINE) + 1 : len(_HDR_LINE) + 4].strip()
    return code.decode() if code.isdigit() else None


def header_fields(raw: bytes | None) -> dict[str, str]:
    """The ``Name: Value`` headers of a raw header block (its first line, the version and
    any inline status, left out), as nats-py parses them."""
    if not raw:
        return {}
    end = raw.find(b"\r\n")
    return {} if end < 0 else parse_header_lines(raw[end + 2 :])


def header_int(raw: bytes | None, name: bytes) -> int | None:
    """The integer value of header ``name`` (e.g. ``b"Nats-Sequence"``) in a raw block,
    found without parsing the block; None when it is not there as ``\\r\\nName:`` or its
    value is not a plain number (parse the block with :func:`header_fields` then)."""
    if not raw:
        return None
    start = raw.rfind(b"\r\n" + name + b":")  # the last one, as nats-py keeps it
    if start < 0:
        return None
    start += len(name) + 3
    end = raw.find(b"\r\n", start)
    value = raw[start:end].strip() if end >= 0 else b""
    return int(value) if value.isdigit() else None


# (payload, raw header block or None, reply subject or b""), called inside the client's
# read loop: must not block.
RawHandler = Callable[[bytes, bytes | None, bytes], None]


# nats-py 2.16's header name rule and value clean-up (nats/aio/client.py), for encode_hpub.
_HEADER_KEY = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE_NEWLINES = str.maketrans({"\r": " ", "\n": " "})
_encoded_keys: dict[str, bytes] = {}  # header name -> b"Name: " (b"": nats-py skips it)


def _encoded_key(name: str) -> bytes:
    try:
        return _encoded_keys[name]
    except KeyError:
        pass
    key = name.strip()
    if key and not _HEADER_KEY.fullmatch(key):
        raise nats.errors.BadHeaderError(key)
    encoded = key.encode() + b": " if key else b""
    if len(_encoded_keys) < _MAX_NAMES:
        _encoded_keys[name] = encoded
    return encoded


def encode_hpub(
    subject: str, reply: str, headers: Mapping[str, str], payload: bytes, extra: bytes = b""
) -> bytes:
    """The ``HPUB`` command nats-py 2.16's ``publish(subject, payload, reply, headers)``
    sends, byte for byte (tests/unit/test_nats_headers.py checks it against nats-py's own),
    with its checks (BadSubjectError, BadHeaderError). ``extra``: header lines of the
    caller's own, already encoded (``Name: value\r\n``), after ``headers``."""
    _validate_subject(subject)
    if reply:
        _validate_subject(reply)
    header = b"NATS/1.0\r\n%s%s\r\n" % (encode_header_lines(headers), extra)
    return hpub_command(subject.encode(), reply.encode(), header, payload)


def encode_header_lines(headers: Mapping[str, str]) -> bytes:
    """``headers`` as nats-py writes them, one ``Name: value\r\n`` line each (BadHeaderError
    for a name it refuses)."""
    parts: list[bytes] = []
    for name, value in headers.items():
        key = _encoded_key(name)
        if key:
            parts += (key, _header_value(value), b"\r\n")
    return b"".join(parts)


def header_line(name: str, value: str) -> bytes:
    """One header as :func:`encode_header_lines` writes it (b"" for a name nats-py skips)."""
    key = _encoded_key(name)
    if not key:
        return b""
    return b"%s%s\r\n" % (key, _header_value(value))


def _header_value(value: str) -> bytes:
    """A header value as nats-py writes it: stripped, each CR or LF a space. The translate
    runs only when there is one to replace: on a dedupe key's 64 hex digits it cost about
    0.7 µs, 5 % of the gateway's CPU per event under ingest with ``events`` frames."""
    value = value.strip()
    if "\r" in value or "\n" in value:
        value = value.translate(_VALUE_NEWLINES)
    return value.encode()


def hpub_command(subject: bytes, reply: bytes, header: bytes, payload: bytes) -> bytes:
    """One ``HPUB`` command of a checked subject and reply and an encoded header block
    (``NATS/1.0\r\n`` ... ``\r\n``)."""
    return b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
        subject,
        reply,
        len(header),
        len(header) + len(payload),
        header,
        payload,
    )


class FastHeaderClient(NatsClient):
    """nats-py's Client, with :func:`parse_header_lines` for every message's headers, and
    :meth:`subscribe_raw`."""

    def __init__(self) -> None:
        super().__init__()
        self._raw_handlers: dict[int, RawHandler] = {}
        self._ps = FastParser(self)
        self._replies: dict[bytes, RawHandler] = {}  # reply subject -> its request's handler
        self._reply_sid: int | None = None  # the wildcard subscription they all come by
        self._reply_prefix = ""
        self._reply_numbers = itertools.count(1)
        self._reply_lock = asyncio.Lock()

    @staticmethod
    def _parse_header_lines(raw: bytes) -> dict[str, str]:
        return parse_header_lines(raw)

    async def publish_encoded(self, data: bytes, messages: int, payload_bytes: int) -> None:
        """Send ``messages`` publish commands encoded by :func:`encode_hpub`, in one piece,
        with nats-py's checks of the connection and its pending buffer and flusher (as its
        ``publish`` does for one). The caller checks each message against max_payload."""
        if self.is_closed:
            raise nats.errors.ConnectionClosedError
        if self.is_draining_pubs:
            raise nats.errors.ConnectionDrainingError
        if not self.is_connected and (
            self._max_pending_size <= 0
            or len(data) + self._pending_data_size > self._max_pending_size
        ):
            raise nats.errors.OutboundBufferLimitError
        self.stats["out_msgs"] += messages
        self.stats["out_bytes"] += payload_bytes
        await self._send_command(data)
        if self._flush_queue is not None and self._flush_queue.empty():
            await self._flush_pending()

    async def subscribe_raw(self, subject: str, handler: RawHandler) -> Subscription:
        """Subscribe with ``handler`` called for each message in the read loop. End it with
        :meth:`unsubscribe_raw`. nats-py's pending limits do not apply: the handler keeps
        what it must (it runs before the next message is parsed)."""
        sub = await self.subscribe(subject)
        self._raw_handlers[sub._id] = handler
        return sub

    async def unsubscribe_raw(self, sub: Subscription) -> None:
        self._raw_handlers.pop(sub._id, None)
        await sub.unsubscribe()

    async def reply_subject(self, handler: RawHandler) -> str:
        """A new reply subject whose messages go to ``handler`` in the read loop, as with
        :meth:`subscribe_raw`, until :meth:`release_reply_subject`. All of them come by
        one wildcard subscription (made by the first call), so a request costs no
        ``SUB``/``UNSUB``. A reply that comes after the release is dropped."""
        if self._reply_sid is None:
            async with self._reply_lock:
                if self._reply_sid is None:
                    prefix = self.new_inbox()
                    sub = await self.subscribe(f"{prefix}.*")
                    self._reply_prefix, self._reply_sid = prefix, sub._id
        subject = f"{self._reply_prefix}.{next(self._reply_numbers)}"
        self._replies[subject.encode()] = handler
        return subject

    def release_reply_subject(self, subject: str) -> None:
        self._replies.pop(subject.encode(), None)

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        if not self._dispatch_raw(sid, data, headers, reply, subject):
            await super()._process_msg(sid, subject, reply, data, headers)  # type: ignore[arg-type]

    def _dispatch_raw(
        self, sid: int, data: bytes, headers: bytes | None, reply: bytes, subject: bytes
    ) -> bool:
        """Hand a message of a raw subscription (or of a reply subject) to its handler;
        False: not a raw one."""
        if sid == self._reply_sid:
            self.stats["in_msgs"] += 1
            self.stats["in_bytes"] += len(data)
            routed = self._replies.get(subject)
            if routed is not None:
                routed(data, headers, reply)
            return True
        handler = self._raw_handlers.get(sid)
        if handler is None:
            return False
        self.stats["in_msgs"] += 1
        self.stats["in_bytes"] += len(data)
        if sid not in self._subs:  # unsubscribed by other means meanwhile
            self._raw_handlers.pop(sid, None)
            return True
        handler(data, headers, reply)
        return True


_CRLF = b"\r\n"


class FastParser(Parser):
    """nats-py's protocol parser with a fast path for ``MSG`` and ``HMSG`` lines.

    The same calls in the same order as nats-py's (``nc._process_msg`` per message, or the
    raw handler for a raw subscription): the buffer is walked with ``find`` and ``split``
    and cut once per read. Any other line (``PING``, ``PONG``, ``+OK``, ``-ERR``, ``INFO``)
    or an unusual ``MSG`` line goes to nats-py's parser with what follows it; after that
    parser stops in the middle of a message, it also takes the next read.
    """

    async def parse(self, data: bytes = b"") -> None:
        if self.state != AWAITING_CONTROL_LINE:
            await super().parse(data)
            return
        buf = self.buf
        buf.extend(data)
        nc = cast(FastHeaderClient, self.nc)
        pos, size = 0, len(buf)
        try:
            while pos < size:
                end = buf.find(_CRLF, pos)
                if end < 0:
                    break
                parts = bytes(buf[pos:end]).split()
                op, count = parts[0] if parts else b"", len(parts)
                if op == b"HMSG" and count in (5, 6) and parts[-1].isdigit():
                    reply = parts[3] if count == 6 else b""
                    header_size, total = int(parts[-2]), int(parts[-1])
                elif op == b"MSG" and count in (4, 5) and parts[-1].isdigit():
                    reply = parts[3] if count == 5 else b""
                    header_size, total = 0, int(parts[-1])
                else:  # not a message, or an unusual one: nats-py's parser from here on
                    del buf[:pos]
                    pos = 0
                    await super().parse()
                    return
                try:
                    sid = int(parts[2])
                except ValueError:
                    raise ProtocolError("nats: malformed MSG") from None
                start = end + 2
                stop = start + total
                if stop + 2 > size:
                    break  # the payload is still on its way: read this line again then
                pos = stop + 2
                if header_size:
                    headers: bytes | None = bytes(buf[start : start + header_size])
                    payload = bytes(buf[start + header_size : stop])
                else:
                    headers, payload = None, bytes(buf[start:stop])
                if not nc._dispatch_raw(sid, payload, headers, reply, parts[1]):
                    await nc._process_msg(sid, parts[1], reply, payload, headers)
                    if self.buf is not buf:
                        return  # reset (a reconnect) while the message was handled
        finally:
            del buf[:pos]
