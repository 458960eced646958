"""JetStream atomic batch publishing (ADR-50, nats-server 2.12+) on nats-py's plain PUBs.

nats-py has no batch publisher. A batch is a list of messages to ONE stream, stored all or
none, in contiguous stream sequences. On the wire every message carries ``Nats-Batch-Id``
(the same for the whole batch, at most 64 characters) and ``Nats-Batch-Sequence`` (1..n); the
last one also ``Nats-Batch-Commit: 1``. The stream must have ``allow_atomic``.

What the server answers (nats-server ``server/stream.go``, ``processJetStreamAtomicBatchMsg``):

* a message with a reply subject that is staged (not the commit) gets an EMPTY reply; one
  with an error gets a PubAck with ``error``. A reply is optional on every message (the ADR
  asks for one on the first message, the server does not require it).
* the commit message gets ``{"stream", "seq", "batch", "count"}`` once the batch is stored,
  ``seq`` being the stream sequence of the LAST message: message i (1-based) of n has
  ``seq - n + i``.
* an error abandons the whole batch: nothing of it is stored.

Here the first and the last message of a batch carry the same reply subject, a token of one
wildcard inbox subscription. The first one's reply reports an error of the batch's start at
once (too many batches in flight, a stream without ``allow_atomic``, no stream at all: the
503 no-responders status), which the commit's reply would only report as "incomplete"; its
empty reply is skipped. The messages between carry no reply, so a batch costs two replies
whatever its size. Nothing waits for the first reply before the rest is sent.

A batch of one message is a normal JetStream publish (no batch headers): atomic anyway, no
staging on the server, and a ``Nats-Msg-Id`` already stored answers ``duplicate: true`` with
its original sequence instead of failing. (Consequence: a one-message batch to a stream
without ``allow_atomic`` is stored, where a longer one raises :class:`AtomicPublishDisabled`.)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import orjson
from nats.aio.client import _validate_subject
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import BadSubscriptionError, ConnectionClosedError

from arqonbus_server.mesh.nats_client import FastHeaderClient, encode_header_lines, hpub_command
from arqonbus_server.mesh.ports import MeshError
from arqonbus_server.shared.errors import UNAVAILABLE
from arqonbus_server.shared.records import record

BATCH_ID = "Nats-Batch-Id"
BATCH_SEQUENCE = "Nats-Batch-Sequence"
BATCH_COMMIT = "Nats-Batch-Commit"
_SEQUENCE = BATCH_SEQUENCE.encode()
_COMMIT_LINE = BATCH_COMMIT.encode() + b": 1\r\n"
_BATCH_HEADER_PREFIX = "nats-batch-"

# nats-server's defaults (server/stream.go: streamDefaultMaxAtomicBatchSize,
# streamDefaultMaxAtomicBatchInflightPerStream, streamDefaultMaxBatchTimeout). An operator can
# lower the size in the server's jetstream limits (``limits { batch { max_msgs } }``): the
# server then refuses a longer batch with BatchTooLarge.
MAX_BATCH_MESSAGES = 1000
MAX_INFLIGHT_PER_STREAM = 50
SERVER_IDLE_ABANDON_S = 10.0
_MAX_SUBJECTS = 4096  # subjects (and header names) a publisher remembers as checked

# A message's own headers: names and values, or already encoded header lines
# (``Name: value\r\n`` each, as :func:`encoded_headers` makes them).
Headers = Mapping[str, str] | bytes

_SWEEP_S = 0.1  # how often expired batches are failed
_REPLY_PENDING_MSGS = 65_536
_REPLY_PENDING_BYTES = 64 * 1024 * 1024

# JetStream error codes (server/errors.json).
ERR_ATOMIC_DISABLED = 10174  # the stream has no allow_atomic
ERR_MISSING_SEQUENCE = 10175
ERR_INCOMPLETE = 10176  # a gap, an unknown batch (abandoned: idle 10 s, leader change)
ERR_UNSUPPORTED_HEADER = 10177  # Nats-Expected-Last-Msg-Id
ERR_INVALID_BATCH_ID = 10179
ERR_TOO_LARGE = 10199
ERR_INVALID_COMMIT = 10200
ERR_DUPLICATE = 10201  # a Nats-Msg-Id already stored (or twice in the batch)
ERR_TOO_MANY_INFLIGHT = 10210  # 50 per stream, 1,000 per server
ERR_DUPLICATE_IN_PROCESS = 10158  # a Nats-Msg-Id staged by a publish not yet applied


class BatchError(MeshError):
    """A batch was not (known to be) stored."""

    catalogue = UNAVAILABLE


class BatchPublisherClosed(BatchError):
    """The publisher is closed (or was never started): the batch's outcome is unknown."""


class NoStream(BatchError):
    """No stream listens on the subject (the 503 no-responders status): nothing was stored."""


class BatchRejected(BatchError):
    """JetStream refused the batch: none of its messages was stored.

    ``code`` is JetStream's error code (``err_code``, 10xxx), ``status`` its HTTP-like code.
    ``retryable``: the same batch may succeed when sent again as it is.
    """

    retryable: ClassVar[bool] = False

    def __init__(self, code: int, description: str, status: int = 400) -> None:
        super().__init__(f"batch rejected by JetStream ({code}): {description}")
        self.code = code
        self.description = description
        self.status = status


class BatchDuplicate(BatchRejected):
    """A ``Nats-Msg-Id`` of the batch is already in the stream's dedupe window (10201), or
    is being stored by a publish not yet applied (10158). The server does not say which
    message: publish the batch's messages one by one instead, and a duplicate answers
    ``duplicate: true`` with its original sequence."""


class BatchTooLarge(BatchRejected):
    """More messages than a batch may hold (1,000, or the server's max_batch_size): split it.

    Raised before anything is sent for more than :data:`MAX_BATCH_MESSAGES`."""


class BatchTooManyInflight(BatchRejected):
    """The stream (50) or the server (1,000) already has its maximum of open batches."""

    retryable = True


class BatchIncomplete(BatchRejected):
    """The server abandoned the batch before its commit: a lost message, a leader change, or
    more than 10 s between two of its messages."""

    retryable = True


class AtomicPublishDisabled(BatchRejected):
    """The stream was created without ``allow_atomic``."""


_REJECTIONS: dict[int, type[BatchRejected]] = {
    ERR_DUPLICATE: BatchDuplicate,
    ERR_DUPLICATE_IN_PROCESS: BatchDuplicate,
    ERR_TOO_LARGE: BatchTooLarge,
    ERR_TOO_MANY_INFLIGHT: BatchTooManyInflight,
    ERR_INCOMPLETE: BatchIncomplete,
    ERR_ATOMIC_DISABLED: AtomicPublishDisabled,
}


@record
class BatchItemResult:
    """Where one message of a batch was stored."""

    seq: int
    # Only a one-message batch (a plain publish) can be a duplicate: in a longer batch a
    # duplicate rejects the whole batch (BatchDuplicate).
    duplicate: bool = False


def _rejection(error: Any) -> BatchError:
    if not isinstance(error, dict):
        return BatchError(f"batch rejected by JetStream: {error}")
    code = error.get("err_code")
    description = str(error.get("description", "error"))
    status = error.get("code")
    status = status if isinstance(status, int) else 400
    if not isinstance(code, int):
        return BatchRejected(0, description, status)
    return _REJECTIONS.get(code, BatchRejected)(code, description, status)


async def sweep_deadlines(
    waiting: dict[str, tuple[asyncio.Future[Any], float]],
    period: float,
    error: Callable[[], BaseException],
) -> None:
    """Every ``period`` s, fail (with ``error()``) and drop the futures of ``waiting`` whose
    deadline passed. ``waiting`` is in deadline order (every entry has the same timeout), so
    a round stops at the first one still in time. Runs until cancelled."""
    while True:
        await asyncio.sleep(period)  # the sweep period, bounded work per round
        now = time.monotonic()
        expired = []
        for token, (future, deadline) in waiting.items():
            if deadline > now:
                break
            expired.append((token, future))
        for token, future in expired:
            waiting.pop(token, None)
            if not future.done():
                future.set_exception(error())


class BatchPublisher:
    """Publishes lists of messages to one stream as atomic batches; one instance per NATS
    connection.

    Replies come to one wildcard inbox subscription, matched by a counter token (no request
    and no NUID per batch); one task fails the batches whose deadline passed. Batches may be
    published concurrently; the server allows 50 open per stream (BatchTooManyInflight).
    """

    def __init__(self, nc: FastHeaderClient, timeout: float = 5.0) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        self._nc = nc
        self._timeout = timeout
        self._prefix = nc.new_inbox() + "."
        # Unique per publisher, so batches of two publishers never share an id: 48 random
        # bits, a dot and the token's digits. JetStream stores the id with every message of
        # the batch: against a 32-character id this short one saved the 3 NATS nodes about
        # 2-3 µs of CPU per event (docs/performance.md, "Less work per event of a frame").
        # Two publishers drawing the same bits (about 1 in 10^8 for a thousand of them) and
        # sending the same token to one stream at once would mix their messages: the server
        # refuses such a batch whole, and its events are published alone.
        self._id = secrets.token_hex(6) + "."
        self._next = itertools.count(1)
        # Insertion order is deadline order: every batch has the same timeout.
        self._waiting: dict[str, tuple[asyncio.Future[dict[str, Any]], float]] = {}
        self._sub: Subscription | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False
        self._subjects: dict[str, bytes] = {}  # checked subject -> encoded

    @property
    def in_flight(self) -> int:
        """Batches sent and not answered yet."""
        return len(self._waiting)

    async def start(self) -> None:
        if self._sub is not None or self._closed:
            raise RuntimeError("a BatchPublisher starts once")
        self._sub = await self._nc.subscribe(
            self._prefix + "*",
            cb=self._on_reply,
            pending_msgs_limit=_REPLY_PENDING_MSGS,
            pending_bytes_limit=_REPLY_PENDING_BYTES,
        )
        self._sweeper = asyncio.create_task(self._sweep())

    async def close(self) -> None:
        """Stop; the batches still waiting for their ack fail with BatchPublisherClosed."""
        if self._closed:
            return
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._sub is not None and not self._nc.is_closed:
            with contextlib.suppress(ConnectionClosedError, BadSubscriptionError):
                await self._sub.unsubscribe()
        self._fail_all(BatchPublisherClosed("the batch publisher closed before the batch's ack"))

    async def publish_batch(
        self, subject_msgs: Sequence[tuple[str, bytes, Headers]]
    ) -> list[BatchItemResult]:
        """Store ``(subject, body, headers)`` messages all or none, in this order, in one stream.

        Returns each message's sequence. Raises BatchRejected (and its subclasses:
        BatchDuplicate, BatchTooLarge, ...), NoStream, TimeoutError (no ack in time: the
        batch may still have been stored; with Nats-Msg-Ids a resend is safe), or
        BatchPublisherClosed. Errors of the connection (nats-py's) pass through: the commit
        was then not sent, and the server abandons what it staged.
        """
        count = len(subject_msgs)
        if count == 0:
            return []
        if count > MAX_BATCH_MESSAGES:
            raise BatchTooLarge(
                ERR_TOO_LARGE,
                f"{count} messages, a batch holds at most {MAX_BATCH_MESSAGES} (not sent)",
            )
        if self._sub is None or self._closed:
            raise BatchPublisherClosed("the batch publisher is not running")

        token = str(next(self._next))
        reply = self._prefix + token
        batch_id = self._id + token
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[token] = (future, time.monotonic() + self._timeout)
        try:
            # Every message encoded here and written at once (nats-py's publish per message
            # was a fifth of the gateway's CPU under ingest). The batch headers follow the
            # message's own; the first and the last message carry the reply subject.
            commands = self._encode(subject_msgs, reply, batch_id)
            payload_bytes = sum(len(body) for _, body, _ in subject_msgs)
            await self._nc.publish_encoded(b"".join(commands), count, payload_bytes)
            ack = await future
        except BaseException:
            _discard(future)
            raise
        finally:
            self._waiting.pop(token, None)
        if count == 1:  # a plain publish's ack
            return [BatchItemResult(_seq(ack), bool(ack.get("duplicate")))]
        if ack.get("batch") != batch_id or ack.get("count") != count:
            raise BatchError(f"the batch ack does not match the batch of {count}: {ack}")
        last_seq = _seq(ack)
        return [BatchItemResult(last_seq - count + i) for i in range(1, count + 1)]

    def _encode(
        self, subject_msgs: Sequence[tuple[str, bytes, Headers]], reply: str, batch_id: str
    ) -> list[bytes]:
        """The batch's commands; ValueError, before anything is sent, for what would leave
        it half sent (a message over max_payload, a batch header of the caller's), and
        nats-py's errors for a bad subject or header. One message is a plain publish."""
        max_payload = self._nc.max_payload
        count = len(subject_msgs)
        reply_b = self._encoded_subject(reply)
        batch_line = b"%s: %s\r\n%s: " % (BATCH_ID.encode(), batch_id.encode(), _SEQUENCE)
        commands: list[bytes] = []
        for i, (subject, body, headers) in enumerate(subject_msgs, 1):
            lines = headers if isinstance(headers, bytes) else encoded_headers(headers)
            if count == 1:  # no batch headers; no headers at all: PUB, as nats-py sends it
                header = b"NATS/1.0\r\n%s\r\n" % lines if lines else b""
            else:
                header = b"NATS/1.0\r\n%s%s%d\r\n%s\r\n" % (
                    lines,
                    batch_line,
                    i,
                    _COMMIT_LINE if i == count else b"",
                )
            # The server's max_payload counts the headers too (nats-py checks the body
            # only), and a message over it closes the connection.
            if len(header) + len(body) > max_payload:
                raise ValueError(
                    f"message {i} of the batch: {len(header) + len(body)} bytes with its "
                    f"headers, more than the server's max_payload of {max_payload}"
                )
            subject_b = self._encoded_subject(subject)
            to = reply_b if i in (1, count) else b""
            if header:
                commands.append(hpub_command(subject_b, to, header, body))
            else:
                commands.append(b"PUB %s %s %d\r\n%s\r\n" % (subject_b, to, len(body), body))
        return commands

    def _encoded_subject(self, subject: str) -> bytes:
        """``subject`` checked as nats-py does and encoded, remembered (a stream's lane
        sends the same few subjects over and over)."""
        encoded = self._subjects.get(subject)
        if encoded is None:
            _validate_subject(subject)
            encoded = subject.encode()
            if len(self._subjects) >= _MAX_SUBJECTS:
                self._subjects.clear()
            self._subjects[subject] = encoded
        return encoded

    async def _on_reply(self, msg: Msg) -> None:
        token = msg.subject[len(self._prefix) :]
        entry = self._waiting.get(token)
        if entry is None or entry[0].done():
            return  # the commit's reply after the start's error, or a batch timed out
        future = entry[0]
        headers = msg.headers
        status = headers.get("Status") if headers else None
        if headers and status == "503":  # no responders: nothing listens on the subject
            subject = headers.get("Nats-Subject", "the subject")
            future.set_exception(NoStream(f"no stream stores {subject}"))
        elif status:
            future.set_exception(BatchError(f"NATS status {status} for the batch"))
        elif not msg.data:
            return  # the first message's ack: the batch is open; its commit answers later
        else:
            try:
                ack = orjson.loads(msg.data)
                if not isinstance(ack, dict):
                    raise TypeError(ack)
            except (orjson.JSONDecodeError, TypeError):
                future.set_exception(BatchError(f"unreadable batch ack: {msg.data[:200]!r}"))
            else:
                error = ack.get("error")
                if error:
                    future.set_exception(_rejection(error))
                else:
                    future.set_result(ack)
        self._waiting.pop(token, None)

    async def _sweep(self) -> None:
        await sweep_deadlines(
            self._waiting,
            _SWEEP_S,
            lambda: TimeoutError(
                f"no ack for the batch within {self._timeout:g} s (it may still be stored)"
            ),
        )

    def _fail_all(self, exc: Exception) -> None:
        waiting, self._waiting = self._waiting, {}
        for future, _ in waiting.values():
            if not future.done():
                future.set_exception(exc)


_checked_keys: set[str] = set()  # header names known not to be the publisher's own


def encoded_headers(headers: Mapping[str, str]) -> bytes:
    """A message's own ``headers`` as the header lines :meth:`BatchPublisher.publish_batch`
    takes (a caller that sends the same ones again encodes them once); ValueError for a
    batch header, nats-py's BadHeaderError for a name it refuses."""
    for key in headers:
        if key not in _checked_keys:
            if key.lower().startswith(_BATCH_HEADER_PREFIX):
                raise ValueError(f"{key} is the batch publisher's header")
            if len(_checked_keys) < _MAX_SUBJECTS:
                _checked_keys.add(key)
    return encode_header_lines(headers)


def _seq(ack: dict[str, Any]) -> int:
    seq = ack.get("seq")
    if not isinstance(seq, int) or seq < 1:
        raise BatchError(f"batch ack without a sequence: {ack}")
    return seq


def _discard(future: asyncio.Future[Any]) -> None:
    """A future nobody will await: cancelled, or its exception marked as seen."""
    if future.done():
        if not future.cancelled():
            future.exception()
    else:
        future.cancel()
