"""The JetStream implementation of :class:`mesh.ports.Broker`."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import logging
import math
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import nats
import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import (
    ConnectionClosedError,
    NoRespondersError,
    NoServersError,
    SlowConsumerError,
)
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext, JetStreamManager
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamInfo
from nats.js.errors import APIError, NotFoundError, ServiceUnavailableError
from nats.js.kv import KeyValue

from arqonbus_server.mesh.batch import (
    BatchItemResult,
    BatchPublisher,
    BatchPublisherClosed,
    encoded_headers,
    sweep_deadlines,
)
from arqonbus_server.mesh.carried_ids import MAX_CARRIED_IDS, CarriedIds, epoch_holding
from arqonbus_server.mesh.ingest import IngestBatcher, IngestStats, Outcome
from arqonbus_server.mesh.kv import open_bucket
from arqonbus_server.mesh.mirrors import TenantConfirmers, mirrors_to_confirm
from arqonbus_server.mesh.nats_auth import connect_failure, connect_options, redact_url
from arqonbus_server.mesh.nats_client import (
    FastHeaderClient,
    header_fields,
    header_int,
    header_line,
    header_status,
)
from arqonbus_server.mesh.ports import (
    BrokerUnavailable,
    ChannelDetail,
    ChannelStats,
    ChannelWindow,
    LiveEvent,
    LiveHandler,
    LiveSubscription,
    NoResponders,
    PublishDone,
    PublishItem,
    PublishResult,
    ReconnectHandler,
    RequestTimeout,
    ServiceHandler,
    ServiceRequest,
    StoredEvent,
    StoreQuotaExceeded,
    StreamStats,
    publish_in_task,
    trim_count,
)
from arqonbus_server.mesh.streams import StreamPolicy, StreamProvisioner, choose_replicas
from arqonbus_server.shared.regions import Placement
from arqonbus_server.shared.settings import Settings
from arqonbus_server.shared.subjects import ChannelRef, SubjectScheme

log = logging.getLogger("arqonbus.mesh.jetstream")

_TRANSIENT = (
    NatsTimeoutError,
    asyncio.TimeoutError,
    ConnectionClosedError,
    NoServersError,
    ServiceUnavailableError,
    OSError,
)
_REPLAY_IDLE_S = 5.0
_NO_STREAM_RETRIES = 8
_REPLAY_WAIT_S = 2.0
_REPLAY_STALL_CHECKS = 5
_MAX_RESYNC_ROUNDS = 10
_LIVE_PENDING_MSGS = 65_536
_LIVE_PENDING_BYTES = 64 * 1024 * 1024
_ACK_SWEEP_S = 0.1
_REPLAY_BATCH = 1000
_REPLAY_BATCH_BYTES = 1 << 20  # bounds a batch in memory, whatever the events' size
# A long replay reads through an ephemeral pull consumer (R1, in memory, no acks): JetStream
# hands a consumer's messages over with their stored headers as they are, where a batched
# direct get rebuilds six headers for each (the store's CPU per replayed event: about 7.8 µs
# by direct get, docs/performance.md "Replay through a consumer"). Short replays stay on
# direct gets: a consumer is made and deleted through the meta leader, which the thousands
# of short replays of a reconnect storm must not load; and at most _PULL_REPLAYS_MAX run at
# once on a gateway (more read by direct get).
# (Long: ARQONBUS_REPLAY_CONSUMER_MIN_SPAN stream seqs or more from its start to its end.)
_PULL_REPLAYS_MAX = 4
_PULL_BATCH = 1000  # events per pull request; about two requests' worth are asked ahead
# A request's bytes: one batch's, plus room for the largest event (a 1 MiB envelope with
# its subject and headers), so every request delivers at least one event.
_PULL_BATCH_BYTES = _REPLAY_BATCH_BYTES + (64 << 10)
_PULL_EXPIRES_S = 5.0
# channel_detail sums the bodies of a channel of at most this many events (one read of
# them all, in direct-get batches: ~10 round trips); above it, the bytes are estimated from
# _SAMPLE_WINDOWS windows of _SAMPLE_SIZE events spread over the channel (bytes_exact False).
DETAIL_EXACT_MAX = 10_000
# trim_room reads at most this many of a room's events (~200 direct-get batches: a larger
# room is read from its newest this many), for at most _TRIM_READ_S (then it trims what it
# read proves, in steps; see JetStreamBroker.trim_room).
TRIM_READ_MAX = 200_000
_TRIM_READ_S = 30.0
_SAMPLE_WINDOWS = 4
_SAMPLE_SIZE = 250
# A batched direct get with multi_last answers at most 1024 subjects (nats-server's
# maxAllowedResponses; more: status 413), so channel_stats asks for this many at a time.
_MULTI_LAST_CHUNK = 512
_MAX_SUBJECT_PAGES = 100  # STREAM.INFO pages of 100,000 subjects each: 10M channels
_LAGGING_RETRIES = 5  # a direct get answered by a replica behind the leader is asked again
_STREAM_NOT_FOUND = 10059  # JetStream's JSStreamNotFoundErr
_SERVICE_DRAIN_S = 2.0
# One queue group per command subject; the group name only has to be the same everywhere.
_HANDLER_QUEUE = "arqonbus-handlers"
_SERVICE_PENDING_MSGS = 10_000
_SERVICE_PENDING_BYTES = 64 * 1024 * 1024
# One connect pass: TCP + TLS + CONNECT (2 s each at most), twice per server, 0.5 s apart.
_CONNECT_BUDGET_PER_SERVER_S = 10.0


# A replay reader: (stream, ref, start seq, end seq, limit) -> the events it reads.
_Reader = Callable[[str, ChannelRef, int, int, int | None], AsyncGenerator[StoredEvent, None]]


class _NoDirectGet(Exception):
    """The stream does not answer direct gets (created without allow_direct)."""


class _DirectBatch:
    """The replies to one batched direct get, kept until its end marker.

    :meth:`on_raw` runs in the NATS client's read loop (``FastHeaderClient.reply_subject``)."""

    def __init__(self) -> None:
        self.items: list[tuple[int, bytes]] = []
        self._ended = False
        self._ready = asyncio.Event()
        self.no_direct_get = False

    def start(self) -> None:
        self.items = []
        self._ended = False
        self._ready.clear()
        self.no_direct_get = False

    def on_raw(self, data: bytes, headers: bytes | None, reply: bytes) -> None:
        if self._ended:
            return  # a late reply to an earlier request on this inbox
        status = header_status(headers)
        if status:
            # 204 end of batch, 404 nothing (more) matches, 408 timed out, 503 no direct get.
            self.no_direct_get = status == "503"
            self._ended = True
        else:
            seq = header_int(headers, b"Nats-Sequence")
            if seq is None:  # not where the server puts it: parse the whole block
                seq = int(header_fields(headers).get("Nats-Sequence", "0"))
            self.items.append((seq, data))
        self._ready.set()

    async def complete(self, timeout: float) -> list[tuple[int, bytes]]:
        """Every event of the batch, once its end marker arrived. BrokerUnavailable when
        nothing arrives for ``timeout`` seconds."""
        while not self._ended:
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except TimeoutError:
                raise BrokerUnavailable("replay stalled: the store stopped answering") from None
        return self.items


def ack_seqs(reply: bytes) -> tuple[int, int] | None:
    """(stream seq, consumer seq) of a consumer's message, from its ack subject; None if
    ``reply`` is not one. The subject is ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream
    seq>.<consumer seq>.<time>.<pending>``, or in the newer format a server can be set to use
    (nats-server's ``FeatureFlagJsAckFormatV2``) ``$JS.ACK.<domain>.<account hash>.<stream>.
    <consumer>.`` and the same five, perhaps followed by more tokens."""
    tokens = reply.split(b".")
    if len(tokens) == 9:
        at = 5
    elif len(tokens) >= 11:
        at = 7
    else:
        return None
    if tokens[0] != b"$JS" or tokens[1] != b"ACK":
        return None
    stream_seq, consumer_seq = tokens[at], tokens[at + 1]
    if not (stream_seq.isdigit() and consumer_seq.isdigit()):
        return None
    return int(stream_seq), int(consumer_seq)


# Statuses that end a pull request and leave the consumer as it was: the request expired,
# its bytes ran out, or its count was reached with bytes left.
_PULL_REQUEST_ENDS = (b"408 Request Timeout", b"409 Message Size Exceeds MaxBytes",
                      b"409 Batch Completed")  # fmt: skip


class _Pulled:
    """What a replay's pull requests brought, on one inbox (they all share it).

    The server hands a consumer's messages out in consumer-seq order, cycling over the
    requests waiting, so on one inbox they arrive in order whichever request each answers;
    ``credit`` counts the messages asked for and not yet come (a status ending a request
    early says how many it will not bring). :meth:`on_raw` runs in the NATS client's read
    loop."""

    __slots__ = ("arrived", "credit", "failed", "items")

    def __init__(self) -> None:
        self.items: list[tuple[int, int, bytes]] = []  # (stream seq, consumer seq, body)
        self.credit = 0
        self.failed = ""  # why the consumer cannot go on (then direct gets read the rest)
        self.arrived = asyncio.Event()

    def on_raw(self, data: bytes, headers: bytes | None, reply: bytes) -> None:
        if header_status(headers):
            assert headers is not None
            line = headers[: headers.find(b"\r\n")].partition(b" ")[2].strip()
            if line.startswith(b"100"):
                return  # a heartbeat (none are asked for)
            if line.startswith(_PULL_REQUEST_ENDS):
                self.credit -= max(0, header_int(headers, b"Nats-Pending-Messages") or 0)
            else:  # 409 Consumer Deleted, 409 Leadership Change, 400, 503, ...
                self.failed = line.decode(errors="replace")
        else:
            seqs = ack_seqs(reply)
            if seqs is None:
                self.failed = "a message without an ack subject"
            else:
                self.items.append((seqs[0], seqs[1], data))
                self.credit -= 1
        self.arrived.set()


class _NoStream(Exception):
    """No stream answered the publish (NATS no-responders status)."""


class _TtlDisabled(Exception):
    """The stream refused a TTL'd event: per-message TTLs are off (a stream made before)."""


# JetStream's "per-message TTL is disabled" (JSMessageTTLDisabledErr).
_TTL_DISABLED = 10166


class _PublishAcks:
    """Publish acks on one wildcard inbox, matched by a counter: no request per publish.

    nats-py's ``js.publish`` makes a NUID, a random token, a timer and a JSON dataclass
    for every event; the profile of the ingest benchmark showed a third of the gateway's
    time there. Here a publish is one PUB with a reply subject and one future; one task
    fails the futures whose deadline passed.
    """

    def __init__(self, nc: NatsClient, timeout: float) -> None:
        self._nc = nc
        self._timeout = timeout
        self._prefix = nc.new_inbox() + "."
        self._next = itertools.count()
        # Insertion order is deadline order: every publish has the same timeout.
        self._waiting: dict[str, tuple[asyncio.Future[PublishResult], float]] = {}
        self._sub: Subscription | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(
            self._prefix + "*",
            cb=self._on_ack,
            pending_msgs_limit=_LIVE_PENDING_MSGS * 4,
            pending_bytes_limit=_LIVE_PENDING_BYTES,
        )
        self._sweeper = asyncio.create_task(self._sweep())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        self._fail_all(BrokerUnavailable("the gateway is closing"))

    async def publish(self, subject: str, body: bytes, headers: dict[str, str]) -> PublishResult:
        token = str(next(self._next))
        future: asyncio.Future[PublishResult] = asyncio.get_running_loop().create_future()
        self._waiting[token] = (future, time.monotonic() + self._timeout)
        try:
            await self._nc.publish(subject, body, reply=self._prefix + token, headers=headers)
            return await future
        finally:
            self._waiting.pop(token, None)

    async def _on_ack(self, msg: Msg) -> None:
        entry = self._waiting.pop(msg.subject[len(self._prefix) :], None)
        if entry is None or entry[0].done():
            return
        future = entry[0]
        if msg.headers and msg.headers.get("Status") == "503":
            future.set_exception(_NoStream())
            return
        try:
            ack = orjson.loads(msg.data)
            error = ack.get("error")
            if error:
                if isinstance(error, dict) and error.get("err_code") == _TTL_DISABLED:
                    future.set_exception(_TtlDisabled())
                    return
                description = (
                    error.get("description", "error") if isinstance(error, dict) else error
                )
                if "maximum bytes exceeded" in str(description):  # the tenant's quota
                    future.set_exception(StoreQuotaExceeded(str(description)))
                    return
                future.set_exception(
                    BrokerUnavailable(f"publish rejected by JetStream: {description}")
                )
            else:
                future.set_result(PublishResult(int(ack["seq"]), bool(ack.get("duplicate"))))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            future.set_exception(BrokerUnavailable("unreadable publish ack"))

    async def _sweep(self) -> None:
        await sweep_deadlines(self._waiting, _ACK_SWEEP_S, TimeoutError)

    def _fail_all(self, exc: Exception) -> None:
        waiting, self._waiting = self._waiting, {}
        for future, _ in waiting.values():
            if not future.done():
                future.set_exception(exc)


class _LiveSub:
    def __init__(self, sub: Subscription, drain: bool = False) -> None:
        self._sub = sub
        self._drain = drain

    async def close(self) -> None:
        """Unsubscribe; with ``drain``, first hand on the messages already routed to us.

        Service requests already on their way to a handler's subscription have been
        assigned to it by the queue group; dropping them would leave their callers waiting
        for the timeout, so handler subscriptions drain instead.
        """
        with contextlib.suppress(
            *_TRANSIENT, nats.errors.BadSubscriptionError, nats.errors.ConnectionDrainingError
        ):
            if self._drain:
                await asyncio.wait_for(self._sub.drain(), _SERVICE_DRAIN_S)  # type: ignore[no-untyped-call]
            else:
                await self._sub.unsubscribe()


def _abort_sockets(nc: NatsClient) -> None:
    """Close what a failed connect left open (nats-py keeps the plain socket of a TLS upgrade)."""
    transport = getattr(nc, "_transport", None)
    for name in ("_io_writer", "_bare_io_writer"):
        writer = getattr(transport, name, None)
        if writer is not None:
            writer.transport.abort()


_TLS_DOWNGRADE = (
    "the NATS server did not switch to TLS although TLS is configured (a downgrade?): set "
    "ARQONBUS_NATS_TLS_HANDSHAKE_FIRST=true with handshake_first on the servers, and check "
    "the network path"
)


def _uses_tls_as_configured(nc: NatsClient, options: dict[str, Any]) -> bool:
    """With TLS configured, the connection must be TLS.

    nats-py upgrades to TLS only when the server's INFO asks for it, so a man in the middle
    could strip that and keep the link in plaintext. (With handshake-first, TLS comes before
    any NATS byte and this cannot happen.)
    """
    if "tls" not in options:
        return True
    transport = getattr(nc, "_transport", None)
    writer = getattr(transport, "_io_writer", None)
    return writer is not None and writer.get_extra_info("ssl_object") is not None


MSG_ID = "Nats-Msg-Id"


def _publish_headers(
    headers: Mapping[str, str] | None, dedupe_key: str, ttl_s: int | None
) -> dict[str, str]:
    """The headers of a stored event: the caller's, its dedupe key and its TTL."""
    sent = {**headers} if headers else {}
    sent[MSG_ID] = dedupe_key
    if ttl_s is not None:
        if ttl_s < 1:
            raise ValueError(f"ttl_s must be at least 1 second, not {ttl_s}")
        sent["Nats-TTL"] = f"{ttl_s}s"
    return sent


def _unacknowledged(exc: BaseException) -> BaseException:
    """A lane's failure as publish() raises it: the connection's and a batch's timeout as
    BrokerUnavailable (publish again with the same key), anything else as it is."""
    if isinstance(exc, BatchPublisherClosed):
        unavailable = BrokerUnavailable(f"publish not acknowledged: {exc}")
    elif isinstance(exc, _TRANSIENT):
        unavailable = BrokerUnavailable(f"publish not acknowledged: {type(exc).__name__}")
    else:
        return exc
    unavailable.__cause__ = exc
    return unavailable


def _header_lines(headers: Mapping[str, str] | None, dedupe_key: str, ttl_s: int | None) -> bytes:
    """The headers of a stored event (:func:`_publish_headers`) as encoded header lines;
    the usual event, with its dedupe key only, without building them as a dict."""
    if not headers and ttl_s is None:
        return header_line(MSG_ID, dedupe_key)
    return encoded_headers(_publish_headers(headers, dedupe_key, ttl_s))


def _channels_filter(scheme: SubjectScheme, tenant: str, room: str | None) -> str:
    """The ingest subjects of every channel of ``tenant`` (of its ``room`` only, if given).

    Derived from the scheme's ingest subject (shared/subjects.py formats subjects)."""
    ref = ChannelRef.of(tenant, room or "_", "_")
    base = scheme.ingest(ref).rsplit(".", 2)[0]
    return f"{base}.{ref.room}.*" if room is not None else f"{base}.*.*"


def _room_filter(scheme: SubjectScheme, tenant: str, room: str) -> str:
    """Every subject of ``room``'s channels: ``<prefix>.ev.<tenant>.<room>.>``."""
    return scheme.ingest(ChannelRef.of(tenant, room, "_")).rsplit(".", 1)[0] + ".>"


def _room_channel(subject: str) -> tuple[str, str] | None:
    """The (room, channel) of a channel's ingest subject (its last two tokens)."""
    parts = subject.split(".")
    return (parts[-2], parts[-1]) if len(parts) == 5 else None


def _header_int(msg: Msg, name: str) -> int:
    headers = msg.headers or {}
    return int(headers.get(name, "0") or 0)


class JetStreamBroker:
    """Stores events in one JetStream stream per tenant; live fan-out via RePublish."""

    def __init__(
        self,
        urls: list[str],
        scheme: SubjectScheme,
        policy: StreamPolicy,
        publish_timeout_s: float = 5.0,
        name: str = "arqonbus-gateway",
        connect_options: dict[str, Any] | None = None,
        region: str = "",
        batching: bool = True,
        pull_replay_min: int = 5_000,
    ) -> None:
        self._urls = urls
        # The gateway's region (ARQONBUS_REGION): where it creates auto-provisioned streams
        # and whose copy of a placed tenant's stream it replays from. "": one region.
        self._region = region
        self._warned_region = False
        self._batching = batching  # ARQONBUS_PUBLISH_BATCHING (mesh/ingest.py)
        self.pull_replay_min = pull_replay_min  # ARQONBUS_REPLAY_CONSUMER_MIN_SPAN; 0 = never
        self._confirmers = TenantConfirmers(self._stream_last_seq)
        self._pulls_running = 0  # replays reading through a pull consumer now
        self.pulled_replays = 0  # replays that started through a pull consumer, ever
        self._consumer_deletes: set[asyncio.Task[None]] = set()
        self._carried = CarriedIds(self._ids_before, policy.dedupe_window_s)
        self._scheme = scheme
        self._policy = policy
        self._publish_timeout = publish_timeout_s
        self._name = name
        self._connect_options = connect_options or {}
        self._nc: FastHeaderClient | None = None
        self._js: JetStreamContext | None = None
        self._jsm: JetStreamManager | None = None
        self._streams: StreamProvisioner | None = None
        self._reconnect_handlers: list[ReconnectHandler] = []
        self._closing = False
        self._first_connect = False
        self._connect_error: Exception | None = None  # why the last connect attempt failed
        self._cluster_seen = 0
        self._last_slow_log = 0.0
        self._resync: asyncio.Task[None] | None = None
        self._resync_again = False
        self._acks: _PublishAcks | None = None
        # Publishes to tenant streams, coalesced into atomic batches (mesh/ingest.py).
        self._batches: BatchPublisher | None = None
        self._ingest: IngestBatcher | None = None
        # What the batching did, over this broker's life (the gateway's metrics read it).
        self.batch_stats = IngestStats()
        self._atomic_asked: set[str] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._link_up = asyncio.Event()  # set while connected (see window)
        # Per-tenant stored-bytes quotas (gateway/state/tenant_limits.py); None = the policy's.
        self.max_bytes_for: Callable[[str], int] | None = None
        # Placement records (gateway/state/placement.py); None: no tenant is placed.
        self.placement_for: Callable[[str], Placement | None] | None = None
        # Observability (the gateway's metrics): called with "disconnect", "reconnect",
        # "slow_consumer" or "error" as they happen; it must not raise or block.
        self.on_link_event: Callable[[str], None] | None = None
        # Told each replay through a pull consumer's outcome: "read" or "cut_short".
        self.on_replay_consumer: Callable[[str], None] | None = None
        # channel_detail sums the bytes of a channel up to this many events (tests lower it).
        self.detail_exact_max = DETAIL_EXACT_MAX

    # -- connection -----------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    @property
    def scheme(self) -> SubjectScheme:
        """The names of every subject, stream and bucket this broker uses."""
        return self._scheme

    @property
    def policy(self) -> StreamPolicy:
        return self._policy

    @property
    def max_payload(self) -> int:
        return self._nc.max_payload if self._nc is not None else 1024 * 1024

    def _cluster_in_info(self) -> int:
        if self._nc is None:
            return 0
        info = self._server_info(self._nc)
        if not info.get("cluster"):
            return 1
        return max(1, len(set(info.get("connect_urls") or [])))

    def cluster_size(self) -> int:
        """The largest cluster this gateway knows of, at least 1.

        That is the largest cluster seen in the servers' INFO, or the number of distinct
        NATS servers configured, whichever is larger. The largest, not the current, so a
        node that is down when a tenant's first stream is created (even before this
        gateway ever saw it) does not lower that stream's replica count.
        """
        self._cluster_seen = max(self._cluster_seen, self._cluster_in_info())
        configured = len({urlsplit(url).netloc for url in self._urls})
        return max(1, self._cluster_seen, configured)

    async def connect(self) -> None:
        """Connect once; raises BrokerUnavailable if no server answers."""
        nc = FastHeaderClient()  # nats-py's client, headers parsed faster (mesh/nats_client.py)
        self._first_connect = True  # errors of this attempt are reported once, by the caller
        self._connect_error = None
        try:
            # One pass over the servers here; the caller retries with backoff. Once
            # connected, the client reconnects forever on its own. Bounded: after a failed TLS
            # handshake nats-py (2.16) waits forever for the plain socket to close.
            async with asyncio.timeout(_CONNECT_BUDGET_PER_SERVER_S * max(1, len(self._urls))):
                await nc.connect(
                    servers=self._urls,
                    name=self._name,
                    connect_timeout=2,
                    allow_reconnect=True,
                    max_reconnect_attempts=1,
                    reconnect_time_wait=0.5,  # type: ignore[arg-type]  # float works; stub says int
                    ping_interval=5,
                    max_outstanding_pings=2,
                    error_cb=functools.partial(self._on_error, client=nc),
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    **self._connect_options,
                )
        except (TimeoutError, NoServersError, OSError, NatsTimeoutError) as exc:
            _abort_sockets(nc)
            urls = ",".join(redact_url(url) for url in self._urls)  # never log credentials
            reason = connect_failure(self._connect_error or exc)
            raise BrokerUnavailable(f"no NATS server answered at {urls}: {reason}") from exc
        finally:
            self._first_connect = False
        if not _uses_tls_as_configured(nc, self._connect_options):
            await nc.close()
            raise BrokerUnavailable(_TLS_DOWNGRADE)
        nc.options["max_reconnect_attempts"] = -1
        self._nc = nc
        self._link_up.set()
        self._cluster_seen = max(self._cluster_seen, self._cluster_in_info())
        self._js = nc.jetstream(timeout=self._publish_timeout)
        self._jsm = nc.jsm()
        self._streams = StreamProvisioner(
            self._jsm, self._scheme, self._policy, self.cluster_size, self._placement_cluster
        )
        self._streams.max_bytes_for = self.max_bytes_for
        self._streams.is_placed = self._is_placed
        self._acks = _PublishAcks(nc, self._publish_timeout)
        await self._acks.start()
        if self._batching:
            batches = BatchPublisher(nc, self._publish_timeout)
            await batches.start()
            self._batches = batches
            self._ingest = IngestBatcher(batches, stats=self.batch_stats)
            self._ingest.on_atomic_disabled = self._allow_atomic
        where = nc.connected_url  # host and port only: a URL may carry credentials
        log.info("connected to NATS at %s", f"{where.hostname}:{where.port}" if where else "?")

    async def connect_with_retry(self, stop: asyncio.Event) -> bool:
        """Retry with jittered backoff until connected (True) or ``stop`` is set (False)."""
        delay, attempt = 0.25, 0
        while not stop.is_set():
            attempt += 1
            try:
                await self.connect()
                return True
            except BrokerUnavailable as exc:
                level = logging.WARNING if attempt == 1 else logging.DEBUG
                log.log(level, "%s; retrying with backoff (attempt %d)", exc, attempt)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), delay * (0.5 + random.random()))
            delay = min(delay * 2, 5.0)
        return False

    async def _on_error(self, exc: Exception, client: NatsClient | None = None) -> None:
        if self._first_connect or client is not self._nc:
            # A connect attempt's errors (reported once, by connect_with_retry), also those
            # nats-py delivers after the attempt has given up.
            if self._first_connect:
                self._connect_error = exc
            log.debug("NATS connect attempt failed: %s", exc)
            return
        self._link_event("slow_consumer" if isinstance(exc, SlowConsumerError) else "error")
        if isinstance(exc, SlowConsumerError):
            now = asyncio.get_running_loop().time()
            if now - self._last_slow_log > 5.0:  # one line per burst, not per message
                self._last_slow_log = now
                log.warning(
                    "NATS slow consumer on %s: live events dropped, members replay", exc.subject
                )
            self._schedule_resync()
            return
        log.warning("NATS error: %s", exc)

    async def _on_disconnected(self) -> None:
        self._link_up.clear()
        if self._closing:
            return
        log.warning("disconnected from NATS; reconnecting")
        self._link_event("disconnect")

    async def _on_reconnected(self) -> None:
        if self._nc is not None and not _uses_tls_as_configured(self._nc, self._connect_options):
            log.error("%s: dropping the connection", _TLS_DOWNGRADE)
            await self._nc.force_reconnect()
            return
        log.info("reconnected to NATS")
        self._link_event("reconnect")
        self._link_up.set()
        self._schedule_resync()

    def _link_event(self, event: str) -> None:
        if self.on_link_event is not None:
            self.on_link_event(event)

    def _schedule_resync(self) -> None:
        """Run the resync handlers once; a burst of triggers while one runs queues one more."""
        if self._resync is not None and not self._resync.done():
            self._resync_again = True
            return
        self._resync = asyncio.create_task(self._run_resync())

    async def _run_resync(self) -> None:
        for _ in range(_MAX_RESYNC_ROUNDS):
            self._resync_again = False
            for handler in list(self._reconnect_handlers):
                try:
                    await handler()
                except Exception:
                    log.exception("resync handler failed")
            if not self._resync_again:
                return

    def on_reconnect(self, handler: ReconnectHandler) -> None:
        """Call ``handler`` after a NATS reconnect or a dropped live event."""
        self._reconnect_handlers.append(handler)

    async def check_health(self, timeout: float = 5.0) -> bool:
        """True when NATS is connected and JetStream answers within ``timeout`` seconds.

        A stalled link (TCP open, nothing flowing) shows as a timeout, long before the NATS
        client's own ping notices it.
        """
        if self._jsm is None or not self.connected:
            return False
        try:
            async with asyncio.timeout(timeout):
                await self._jsm.account_info()
            return True
        except (*_TRANSIENT, APIError, TimeoutError):
            return False

    async def check_link(self, timeout: float = 5.0) -> bool:
        """True when the connected NATS server answers a ping within ``timeout`` seconds.

        Unlike :meth:`check_health` this does not need JetStream's meta leader, so it stays
        true through a NATS election; it fails when the link itself is down or stalled.
        """
        if self._nc is None or not self.connected:
            return False
        try:
            async with asyncio.timeout(timeout):
                await self._nc.flush(math.ceil(timeout))  # its own timeout takes whole seconds
            return True
        except (*_TRANSIENT, nats.errors.Error):
            return False

    async def reconnect_elsewhere(self) -> bool:
        """Drop the current NATS server for another in the pool (the link or node is bad).

        Subscriptions are restored by the NATS client; the reconnect handlers resync. False
        when there is no live connection to drop (the client is reconnecting already).
        """
        if self._nc is None or not self._nc.is_connected:
            return False
        url = self._nc.connected_url
        log.warning(
            "NATS server %s stopped answering; reconnecting elsewhere",
            url.netloc if url else "?",
        )
        await self._nc.force_reconnect()
        return True

    async def close(self, timeout: float = 5.0) -> None:
        """Drain the NATS connection: flush publishes in flight, then close."""
        if self._nc is None or self._nc.is_closed:
            return
        self._closing = True
        if self._resync is not None:
            self._resync.cancel()
        if self._consumer_deletes:  # replays' consumers: deleted now, or idle out later
            _, late = await asyncio.wait(self._consumer_deletes, timeout=min(1.0, timeout))
            for task in late:
                task.cancel()
        try:
            await asyncio.wait_for(self._nc.drain(), timeout)
        except (*_TRANSIENT, nats.errors.Error):
            # Draining fails while reconnecting (no server): just close; that may fail too,
            # on the socket of the attempt in progress, and there is nothing left to do.
            with contextlib.suppress(*_TRANSIENT, nats.errors.Error, OSError):
                await self._nc.close()
        finally:
            if self._ingest is not None:
                await self._ingest.close()
            if self._batches is not None:
                await self._batches.close()
            if self._acks is not None:
                await self._acks.close()
            await self._confirmers.close()
            self._carried.close()

    def nats_connection(self) -> NatsClient:
        """The connected NATS client, for the mesh's ops tools (mesh/regions.py), which call
        JetStream's stream API directly. Raises BrokerUnavailable before :meth:`connect`."""
        return self._require()[0]

    def _require(
        self,
    ) -> tuple[FastHeaderClient, JetStreamContext, JetStreamManager, StreamProvisioner]:
        if self._nc is None or self._js is None or self._jsm is None or self._streams is None:
            raise BrokerUnavailable("not connected to NATS yet")
        return self._nc, self._js, self._jsm, self._streams

    # -- publish --------------------------------------------------------------

    async def publish(
        self,
        ref: ChannelRef,
        body: bytes,
        dedupe_key: str,
        headers: Mapping[str, str] | None = None,
        ttl_s: int | None = None,
    ) -> PublishResult:
        """Store one event (see :meth:`mesh.ports.Broker.publish`).

        ``ttl_s`` becomes the ``Nats-TTL`` header (per-message TTL, nats-server 2.11+): the
        stream removes the event that many seconds after storing it. A stream made before
        TTLs were used refuses it once; its TTLs are then turned on and the event sent again
        (the dedupe key makes that safe). Raises ValueError when ``ttl_s`` is below 1.
        """
        _, _, _, streams = self._require()
        assert self._acks is not None
        subject = self._scheme.ingest(ref)
        sent = _publish_headers(headers, dedupe_key, ttl_s)
        placement = self._placement(ref.tenant)
        if placement is not None:
            return await self._publish_placed(ref, placement, body, dedupe_key, sent)
        # The stream keeps the headers and RePublish copies them to the live subject.
        # A stream that was just created can take a moment to take its subjects on every
        # server; a bounded retry covers it. The dedupe key makes the retry safe.
        # Create the tenant's stream before its first publish (cached afterwards): waiting
        # for "no responders" is not enough, since any wildcard subscriber answers too.
        if not streams.known(ref.tenant):
            await self.ensure_stream(ref.tenant)
        if self._ingest is not None:
            try:
                outcome = await self._ingest.publish(
                    self._scheme.stream_name(ref.tenant), subject, body, sent
                )
            except (BatchPublisherClosed, *_TRANSIENT) as exc:
                raise _unacknowledged(exc) from exc
            if isinstance(outcome, BatchItemResult):
                return PublishResult(outcome.seq, outcome.duplicate)
            # Refused for the batch's sake (e.g. a resent id): alone, as before batching.
        return await self._publish_alone(ref, subject, body, sent)

    def publish_then(
        self,
        ref: ChannelRef,
        body: bytes,
        dedupe_key: str,
        headers: Mapping[str, str] | None,
        ttl_s: int | None,
        done: PublishDone,
    ) -> None:
        """:meth:`publish`, called back (see :meth:`mesh.ports.Broker.publish_then`). The
        usual event (a known stream, batching on, no placement) goes into its stream's lane
        and its outcome is handed back from the batch's ack: no task, no future. Anything
        else takes :meth:`publish` in a task."""
        ingest, streams = self._ingest, self._streams
        if (
            ingest is None
            or streams is None
            or not streams.known(ref.tenant)
            or (ttl_s is not None and ttl_s < 1)  # publish() raises it
            or self._placement(ref.tenant) is not None
        ):
            publish_in_task(self.publish(ref, body, dedupe_key, headers, ttl_s), done)
            return
        subject = self._scheme.ingest(ref)

        def settle(outcome: Outcome | BaseException) -> None:
            if isinstance(outcome, BatchItemResult):
                done(PublishResult(outcome.seq, outcome.duplicate))
            elif isinstance(outcome, BaseException):
                done(_unacknowledged(outcome))
            else:  # refused for the batch's sake: alone, as publish() would
                alone = _publish_headers(headers, dedupe_key, ttl_s)
                publish_in_task(self._publish_alone(ref, subject, body, alone), done)

        lines = _header_lines(headers, dedupe_key, ttl_s)
        ingest.publish_then(self._scheme.stream_name(ref.tenant), subject, body, lines, settle)

    async def publish_many(
        self, ref: ChannelRef, items: Sequence[PublishItem], ttl_s: int | None = None
    ) -> list[PublishResult]:
        """Store several events (see :meth:`mesh.ports.Broker.publish_many`): through the
        stream's lane together, so a busy or large list goes out in atomic batches; a
        placed tenant's (or with batching off) one after the other."""
        _, _, _, streams = self._require()
        if (placement := self._placement(ref.tenant)) is not None:
            return await self._publish_placed_many(ref, placement, items, ttl_s)
        if self._ingest is None:
            return [
                await self.publish(ref, body, key, headers, ttl_s) for body, key, headers in items
            ]
        subject = self._scheme.ingest(ref)
        if not streams.known(ref.tenant):
            await self.ensure_stream(ref.tenant)
        # Encoded once here: the lane and the batch publisher take the header lines as is.
        sent = [(body, _header_lines(headers, key, ttl_s)) for body, key, headers in items]
        stream, start = self._scheme.stream_name(ref.tenant), 0
        results: list[PublishResult] = []
        while start < len(sent):  # a group at a time keeps the list's order
            # Read at each group: the lane lowers it when the server refuses a batch size.
            size = self._ingest.max_batch
            group = sent[start : start + size]
            try:
                outcomes = await self._ingest.publish_group(stream, subject, group)
            except (BatchPublisherClosed, *_TRANSIENT) as exc:
                raise _unacknowledged(exc) from exc
            for (body, key, headers), outcome in zip(
                items[start : start + size], outcomes, strict=True
            ):
                if isinstance(outcome, BatchItemResult):
                    results.append(PublishResult(outcome.seq, outcome.duplicate))
                else:  # the group was refused for the batch's sake: alone, in order
                    alone = _publish_headers(headers, key, ttl_s)
                    results.append(await self._publish_alone(ref, subject, body, alone))
            start += len(group)
        return results

    async def _publish_alone(
        self, ref: ChannelRef, subject: str, body: bytes, sent: dict[str, str]
    ) -> PublishResult:
        """One event, with a single publish: bounded retries while the stream has no leader
        or no TTLs yet (the dedupe key makes them safe)."""
        _, _, _, streams = self._require()
        assert self._acks is not None
        delay, ttl_on = 0.05, False
        for attempt in range(_NO_STREAM_RETRIES):
            try:
                return await self._acks.publish(subject, body, sent)
            except _TtlDisabled:
                ttl_on = await self._allow_msg_ttl(self._scheme.stream_name(ref.tenant), ttl_on)
            except _NoStream:
                # No stream leader right now (election after a node loss), or the stream
                # was deleted: back off briefly; midway, re-provision in case of the latter.
                if attempt == _NO_STREAM_RETRIES // 2:
                    streams.forget(ref.tenant)
                    await self.ensure_stream(ref.tenant)
                else:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.5)
            except _TRANSIENT as exc:
                raise BrokerUnavailable(f"publish not acknowledged: {type(exc).__name__}") from exc
        raise BrokerUnavailable("no stream answered for this tenant")

    async def _publish_placed_many(
        self,
        ref: ChannelRef,
        placement: Placement,
        items: Sequence[PublishItem],
        ttl_s: int | None,
    ) -> list[PublishResult]:
        """A placed tenant's events one after the other into its primary, in the list's
        order; with ``acks: mirrored``, one wait for the mirror to hold the highest seq (a
        mirror copies in order, so that covers every seq below it)."""
        results = [
            await self._publish_placed(
                ref, placement, body, key, _publish_headers(headers, key, ttl_s), confirm=False
            )
            for body, key, headers in items
        ]
        if results and (mirrors := mirrors_to_confirm(placement)):
            highest = max(result.seq for result in results)
            await self.wait_mirrored(ref.tenant, mirrors, highest, self._publish_timeout)
        return results

    async def _publish_placed(
        self,
        ref: ChannelRef,
        placement: Placement,
        body: bytes,
        dedupe_key: str,
        sent: dict[str, str],
        confirm: bool = True,
    ) -> PublishResult:
        """Store only in the placement's primary; with ``acks: mirrored``, ack once mirrored
        (unless ``confirm`` is False: the caller waits for the mirror itself).

        ``Nats-Expected-Stream`` makes any other stream that still captures the subject (a
        stale primary in a region that was cut off) refuse the event: BrokerUnavailable,
        and the publisher's retry with the same key is stored once by the real primary.
        The stream is never created here (``arqonbus mesh provision`` does that).
        """
        assert self._acks is not None
        # A resend of an event stored before a promotion: the promoted stream does not know
        # its id (mesh/carried_ids.py), so answer it here as the duplicate it is.
        carried = await self._carried.seq_of(placement, dedupe_key, self._publish_timeout)
        if carried is not None:
            if confirm and (mirrors := mirrors_to_confirm(placement)):
                await self.wait_mirrored(ref.tenant, mirrors, carried, self._publish_timeout)
            return PublishResult(carried, True, epoch_holding(placement, carried))
        sent["Nats-Expected-Stream"] = placement.primary.stream
        subject = self._scheme.ingest(ref)
        delay, ttl_on = 0.05, False
        for _ in range(_NO_STREAM_RETRIES):
            try:
                result = await self._acks.publish(subject, body, sent)
                break
            except _TtlDisabled:
                # A primary provisioned (or promoted from a mirror) before TTLs were used.
                ttl_on = await self._allow_msg_ttl(placement.primary.stream, ttl_on)
            except _NoStream:
                await asyncio.sleep(delay)  # no leader right now: back off, bounded
                delay = min(delay * 2, 0.5)
            except _TRANSIENT as exc:
                raise BrokerUnavailable(f"publish not acknowledged: {type(exc).__name__}") from exc
        else:
            raise BrokerUnavailable(f"stream {placement.primary.stream} did not answer")
        if confirm and (mirrors := mirrors_to_confirm(placement)):
            await self.wait_mirrored(ref.tenant, mirrors, result.seq, self._publish_timeout)
        # Nats-Expected-Stream: only this placement's primary stored it, in its epoch.
        return replace(result, epoch=placement.epoch)

    def _allow_atomic(self, stream: str) -> None:
        """A batch was refused because ``stream`` predates atomic batches: turn them on
        (in the background; its events are published alone meanwhile)."""
        if stream in self._atomic_asked or self._streams is None:
            return
        self._atomic_asked.add(stream)
        streams = self._streams

        async def turn_on() -> None:
            try:
                await streams.allow_atomic(stream)
            except Exception as exc:  # asked again after the next refusal
                self._atomic_asked.discard(stream)
                log.warning("stream %s: atomic batches not turned on: %s", stream, exc)

        task = asyncio.create_task(turn_on())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _allow_msg_ttl(self, stream: str, tried: bool) -> bool:
        """Turn per-message TTLs on for ``stream`` after it refused a TTL'd event; True.
        ``tried``: turned on already and still refused, so fail rather than loop."""
        _, _, _, streams = self._require()
        if tried:
            raise BrokerUnavailable(
                f"stream {stream} refuses per-message TTLs: upgrade NATS to nats-server 2.11+"
            )
        try:
            streams.forget_ttl(stream)
            if not await streams.allow_msg_ttl(stream):
                raise BrokerUnavailable(f"stream {stream} does not exist")
        except (*_TRANSIENT, APIError) as exc:
            raise BrokerUnavailable(f"could not turn TTLs on for {stream}: {exc}") from exc
        return True

    async def _ids_before(self, stream: str, end_seq: int, window_s: float) -> dict[str, int]:
        """``Nats-Msg-Id`` -> seq of ``stream``'s events up to ``end_seq`` stored within the
        last ``window_s`` seconds (the latest MAX_CARRIED_IDS), read by batched direct get."""
        if end_seq < 1:
            return {}
        nc, _, _, _ = self._require()
        found: collections.OrderedDict[str, int] = collections.OrderedDict()
        replies: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue()

        async def on_msg(msg: Msg) -> None:
            headers = msg.headers or {}
            if headers.get("Status"):  # 204 end of batch, 404 nothing (more)
                replies.put_nowait(None)
            else:
                seq = int(headers.get("Nats-Sequence", "0"))
                replies.put_nowait((seq, headers.get("Nats-Msg-Id", "")))

        since = time.time() - window_s
        start = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(since))
        request: dict[str, Any] = {"start_time": f"{start}Z", "batch": _REPLAY_BATCH}
        api = f"$JS.API.DIRECT.GET.{stream}"
        try:
            sub = await nc.subscribe(nc.new_inbox(), cb=on_msg)
        except _TRANSIENT as exc:
            raise BrokerUnavailable(f"reading ids failed: {type(exc).__name__}") from exc
        try:
            # Bounded: every round reads a batch or ends; the window holds a finite count.
            for _ in range(end_seq // _REPLAY_BATCH + 2):
                await nc.publish(api, orjson.dumps(request), reply=sub.subject)
                last = 0
                while (item := await asyncio.wait_for(replies.get(), _REPLAY_WAIT_S)) is not None:
                    seq, msg_id = item
                    if seq > end_seq:
                        continue
                    last = seq
                    if msg_id:
                        found[msg_id] = seq
                        if len(found) > MAX_CARRIED_IDS:
                            found.popitem(last=False)
                if last == 0 or last >= end_seq:
                    break
                request = {"seq": last + 1, "batch": _REPLAY_BATCH}
        except (*_TRANSIENT, TimeoutError) as exc:
            raise BrokerUnavailable(f"reading ids failed: {type(exc).__name__}") from exc
        finally:
            with contextlib.suppress(*_TRANSIENT):
                await sub.unsubscribe()
        return dict(found)

    async def wait_mirrored(
        self, tenant: str, mirrors: Sequence[str], seq: int, timeout: float
    ) -> None:
        """Return once a mirror's last seq (``$JS.API.STREAM.INFO``) reaches ``seq``."""
        await self._confirmers.wait(tenant, mirrors, seq, timeout)

    async def _stream_last_seq(self, stream: str) -> int:
        """The stream's last seq; 0 when it does not exist. Raises BrokerUnavailable."""
        info = await self._stream_info(stream)
        return 0 if info is None else info.state.last_seq or 0

    async def _stream_info(self, stream: str) -> StreamInfo | None:
        """The stream's info; None when it does not exist. Raises BrokerUnavailable."""
        _, _, jsm, _ = self._require()
        try:
            return await jsm.stream_info(stream)
        except NotFoundError:
            return None
        except (*_TRANSIENT, APIError) as exc:
            raise BrokerUnavailable(f"stream info of {stream} failed: {exc}") from exc

    async def _copy_range(self, stream: str, tenant: str) -> tuple[int, int]:
        """A copy's first and last seq; (0, 0) when it is missing or was promoted.

        A promoted copy (it captures the tenant's subjects) is the primary of an epoch this
        gateway has not seen yet: what it holds past the fork is another epoch's history,
        so it is not read until the placement record says so. Raises BrokerUnavailable."""
        info = await self._stream_info(stream)
        if info is None:
            return 0, 0
        if self._scheme.tenant_ingest_filter(tenant) in (info.config.subjects or ()):
            log.info("copy %s of %s was promoted: replaying from the primary", stream, tenant)
            return 0, 0
        return info.state.first_seq or 0, info.state.last_seq or 0

    def _placement(self, tenant: str) -> Placement | None:
        return self.placement_for(tenant) if self.placement_for is not None else None

    def _is_placed(self, tenant: str) -> bool:
        return self._placement(tenant) is not None

    def _primary_stream(self, tenant: str) -> str:
        """The stream that stores the tenant's events now: its placement's primary."""
        placement = self._placement(tenant)
        return placement.primary.stream if placement else self._scheme.stream_name(tenant)

    @staticmethod
    def _server_info(nc: NatsClient) -> dict[str, Any]:
        """The connected server's INFO (its cluster name and the cluster's client URLs).

        nats-py (2.16) keeps it only in the private ``_server_info``: its public properties
        give the server's version, max_payload, client id and IP, and the URLs of the pool,
        but not the cluster's name. So it is read here, in one place, defensively.
        """
        info = getattr(nc, "_server_info", None)
        return info if isinstance(info, dict) else {}

    def _placement_cluster(self) -> str | None:
        """The NATS cluster for new tenant streams: the region, when the server is in it.

        In a supercluster made by ``arqonbus mesh render`` each region's NATS cluster bears
        the region's name. A region label on a single cluster named otherwise (a heartbeat
        label only) places nothing: JetStream would find no peers there.
        """
        if not self._region or self._nc is None:
            return None
        cluster = self._server_info(self._nc).get("cluster")
        if cluster == self._region:
            return self._region
        if not self._warned_region:
            self._warned_region = True
            log.warning(
                "region %r is not the connected NATS cluster (%r): new streams are placed "
                "by JetStream, not in the region",
                self._region,
                cluster,
            )
        return None

    async def key_value(self, bucket: str, ttl_s: float | None = None) -> KeyValue:
        """The KV bucket ``bucket`` (created if missing, replicated like the streams)."""
        _, js, _, _ = self._require()
        try:
            return await open_bucket(
                js, bucket, choose_replicas(self._policy, self.cluster_size()), ttl_s
            )
        except (NatsTimeoutError, TimeoutError, ConnectionClosedError, APIError) as exc:
            raise BrokerUnavailable(f"KV bucket {bucket}: {exc}") from exc

    async def apply_quota(self, tenant: str) -> bool:
        """Update the tenant's existing stream to its stored-bytes quota (idempotent).

        A placed tenant's quota applies to its current primary (after a failover, the
        promoted stream): that is the stream that stores its events and refuses them."""
        _, _, _, streams = self._require()
        try:
            return await streams.apply_quota(tenant, self._primary_stream(tenant))
        except (*_TRANSIENT, APIError) as exc:
            raise BrokerUnavailable(f"could not update the stream of {tenant}: {exc}") from exc

    def stream_known(self, tenant: str) -> bool:
        return self._streams is not None and self._streams.known(tenant)

    async def ensure_stream(self, tenant: str) -> int:
        """Create the tenant's stream if it does not exist (idempotent)."""
        _, _, _, streams = self._require()
        try:
            return await streams.ensure(tenant)
        except (*_TRANSIENT, APIError) as exc:
            raise BrokerUnavailable(f"could not provision the stream of {tenant}: {exc}") from exc

    # -- live -----------------------------------------------------------------

    async def subscribe_live(self, ref: ChannelRef, handler: LiveHandler) -> LiveSubscription:
        nc, _, _, _ = self._require()

        async def on_msg(msg: Msg) -> None:
            seq = _header_int(msg, "Nats-Sequence")
            headers = msg.headers
            if seq and headers:  # a seq comes in a header: there are headers
                last = _header_int(msg, "Nats-Last-Sequence")
                stream, key = headers.get("Nats-Stream", ""), headers.get("Nats-Msg-Id", "")
                handler(ref, LiveEvent(seq, last, msg.data, headers, stream, key))

        return await self._subscribe(
            nc, self._scheme.live(ref), on_msg, "", _LIVE_PENDING_MSGS, _LIVE_PENDING_BYTES
        )

    async def _subscribe(
        self,
        nc: NatsClient,
        subject: str,
        on_msg: Callable[[Msg], Awaitable[None]],
        queue: str,
        pending_msgs: int,
        pending_bytes: int,
        drain: bool = False,
    ) -> _LiveSub:
        """Subscribe, then flush: once the server has the interest, messages find it."""
        try:
            sub = await nc.subscribe(
                subject,
                queue=queue,
                cb=on_msg,
                pending_msgs_limit=pending_msgs,
                pending_bytes_limit=pending_bytes,
            )
        except _TRANSIENT as exc:
            raise BrokerUnavailable(f"could not subscribe: {type(exc).__name__}") from exc
        subscription = _LiveSub(sub, drain)
        try:
            await nc.flush(timeout=max(1, int(self._publish_timeout)))
        except _TRANSIENT as exc:
            await subscription.close()
            raise BrokerUnavailable(f"could not subscribe: {type(exc).__name__}") from exc
        return subscription

    # -- service commands -------------------------------------------------------

    async def request(
        self,
        ref: ChannelRef,
        command: str,
        body: bytes,
        timeout: float,
        headers: Mapping[str, str] | None = None,
    ) -> bytes:
        nc, _, _, _ = self._require()
        if not nc.is_connected:
            # nats-py would buffer the request until a reconnect; a caller wants an answer now.
            raise BrokerUnavailable("not connected to NATS")
        try:
            subject = self._scheme.command(ref, command)
            msg = await nc.request(
                subject, body, timeout=timeout, headers=dict(headers) if headers else None
            )
        except NoRespondersError:
            raise NoResponders(command) from None
        except (TimeoutError, NatsTimeoutError):
            raise RequestTimeout(command) from None
        except _TRANSIENT as exc:
            raise BrokerUnavailable(f"request failed: {type(exc).__name__}") from exc
        return msg.data

    async def serve(
        self, ref: ChannelRef, command: str, handler: ServiceHandler
    ) -> LiveSubscription:
        nc, _, _, _ = self._require()
        if not nc.is_connected:
            raise BrokerUnavailable("not connected to NATS")

        async def on_msg(msg: Msg) -> None:
            if msg.reply:
                handler(ServiceRequest(msg.data, msg.reply, msg.headers))

        return await self._subscribe(
            nc,
            self._scheme.command(ref, command),
            on_msg,
            _HANDLER_QUEUE,
            _SERVICE_PENDING_MSGS,
            _SERVICE_PENDING_BYTES,
            drain=True,
        )

    async def respond(self, reply: str, body: bytes) -> None:
        nc, _, _, _ = self._require()
        try:
            await nc.publish(reply, body)
        except _TRANSIENT as exc:
            raise BrokerUnavailable(f"could not reply: {type(exc).__name__}") from exc

    # -- store reads ------------------------------------------------------------

    async def window(self, ref: ChannelRef) -> ChannelWindow:
        """The channel's newest seq (via the stream leader) and the stream's first seq."""
        _, _, jsm, _ = self._require()
        if not self.connected:
            # Reconnecting: wait for the link as long as a publish would, then answer
            # (a short reconnect, e.g. to another node, costs the client nothing; a long
            # outage is answered at publish_timeout_s rather than at the API timeout).
            try:
                async with asyncio.timeout(self._publish_timeout):
                    await self._link_up.wait()
            except TimeoutError:
                raise BrokerUnavailable("not connected to NATS") from None
        stream = self._primary_stream(ref.tenant)
        try:
            info = await jsm.stream_info(stream)
        except NotFoundError:
            return ChannelWindow(0, 0)
        except _TRANSIENT as exc:
            raise BrokerUnavailable(f"stream info failed: {type(exc).__name__}") from exc
        try:
            last = await jsm.get_last_msg(stream, self._scheme.ingest(ref))
            last_seq = last.seq or 0
        except NotFoundError:
            last_seq = 0
        except _TRANSIENT as exc:
            raise BrokerUnavailable(f"last message lookup failed: {type(exc).__name__}") from exc
        return ChannelWindow(last_seq, info.state.first_seq)

    async def stream_stats(self, tenant: str) -> StreamStats:
        """The tenant's stream state (messages, bytes, first and last seq) from its leader."""
        _, _, jsm, _ = self._require()
        try:
            info = await jsm.stream_info(self._primary_stream(tenant))
        except NotFoundError:
            return StreamStats(0, 0, 0, 0)
        except _TRANSIENT as exc:
            raise BrokerUnavailable(f"stream info failed: {type(exc).__name__}") from exc
        state = info.state
        if not state.messages:
            return StreamStats(0, 0, 0, 0)
        return StreamStats(state.messages, state.bytes, state.first_seq, state.last_seq)

    # -- admin reads and purge (the admin commands of issue 16) ---------------------------

    async def channel_stats(self, tenant: str, room: str | None = None) -> list[ChannelStats]:
        """Each channel's count (STREAM.INFO ``subjects_filter``, from the stream leader, all
        pages) and last seq (batched direct gets with ``multi_last``, not one per channel),
        sorted by (room, channel). A placed tenant's: its current primary's."""
        stream = self._primary_stream(tenant)
        found = await self._subject_counts(stream, _channels_filter(self._scheme, tenant, room))
        if found is None:
            return []
        counts, leader_last = found
        lasts = await self._last_seqs(stream, sorted(counts), leader_last)
        stats = []
        for subject, count in counts.items():
            room_channel = _room_channel(subject)
            if count > 0 and subject in lasts and room_channel is not None:
                stats.append(ChannelStats(*room_channel, count, lasts[subject]))
        return sorted(stats, key=lambda s: (s.room, s.channel))

    async def channel_detail(self, ref: ChannelRef) -> ChannelDetail:
        """Count (``subjects_filter``), first and last seq (from the stream leader), and the
        bodies' bytes: summed when the channel holds at most :data:`DETAIL_EXACT_MAX`
        events (``detail_exact_max``), else estimated from a sample (``bytes_exact`` False)."""
        _, _, jsm, _ = self._require()
        stream, subject = self._primary_stream(ref.tenant), self._scheme.ingest(ref)
        found = await self._subject_counts(stream, subject)
        count = found[0].get(subject, 0) if found is not None else 0
        if count == 0:
            return ChannelDetail(0, 0, 0, 0, True)
        try:
            first = (await jsm.get_msg(stream, seq=1, subject=subject, next=True)).seq or 0
            last = (await jsm.get_last_msg(stream, subject)).seq or 0
        except NotFoundError:  # removed (purged, expired) since it was counted
            return ChannelDetail(0, 0, 0, 0, True)
        except (*_TRANSIENT, APIError) as exc:
            raise BrokerUnavailable(f"message lookup failed: {type(exc).__name__}") from exc
        if count <= self.detail_exact_max:
            # Count, ends and bytes from this one read: events removed (a room's max_bytes,
            # retention) since the count above are in none of them.
            events = [(e.seq, len(e.body)) async for e in self.replay(ref, first, last)]
            if not events:
                return ChannelDetail(0, 0, 0, 0, True)
            size = sum(n for _, n in events)
            return ChannelDetail(len(events), events[0][0], events[-1][0], size, True)
        return ChannelDetail(
            count, first, last, await self._estimate(ref, first, last, count), False
        )

    async def _estimate(self, ref: ChannelRef, first: int, last: int, count: int) -> int:
        """The channel's bytes from _SAMPLE_WINDOWS windows spread over first..last."""
        sizes: list[int] = []
        step = max(1, (last - first) // _SAMPLE_WINDOWS)
        for start in range(first, last + 1, step)[:_SAMPLE_WINDOWS]:
            async with contextlib.aclosing(self.replay(ref, start, last, _SAMPLE_SIZE)) as events:
                sizes.extend([len(e.body) async for e in events])
        return round(sum(sizes) / len(sizes) * count) if sizes else 0

    async def purge_room(self, tenant: str, room: str) -> int:
        """Purge the room's subjects from the tenant's stream (its current primary); returns
        the count JetStream removed. Seqs are never reused (the stream's last seq stays).

        A mirror does not copy a purge, so a placed tenant's mirrors are purged too, each
        once; one that does not answer (its region is down) is logged and keeps the room's
        events until its own retention removes them (reads by the primary are exact)."""
        request = {"filter": _room_filter(self._scheme, tenant, room)}
        return await self._purge_everywhere(tenant, room, request)

    async def _purge_everywhere(self, tenant: str, room: str, request: dict[str, Any]) -> int:
        """One STREAM.PURGE ``request`` on the tenant's primary, then on each of its mirrors
        (a mirror keeps the primary's seqs, so a ``seq`` bound means the same events there);
        returns the primary's purged count (0: no stream)."""
        reply = await self._js_api(f"STREAM.PURGE.{self._primary_stream(tenant)}", request)
        placement = self._placement(tenant)
        for mirror in placement.mirrors if placement is not None else ():
            try:
                await self._js_api(f"STREAM.PURGE.{mirror.stream}", request)
            except BrokerUnavailable as exc:
                log.warning(
                    "room %s of %s stays in mirror %s: %s", room, tenant, mirror.stream, exc
                )
        return 0 if reply is None else int(reply.get("purged", 0))

    async def trim_room(self, tenant: str, room: str, max_bytes: int) -> int:
        """Read the room's events oldest first (batched direct gets on the room's subjects,
        up to its last seq at the stream leader when the call starts), find how many of the
        oldest go (:func:`trim_count`), then purge the room's subjects below the first kept
        seq (STREAM.PURGE ``filter`` + ``seq``: "below seq"), on the primary and each mirror
        as :meth:`purge_room` does. Concurrent trims purge below cuts computed from the same
        or newer states, so the union is what the newest state asks, and JetStream counts
        each removed event in the one purge that removed it.

        Bounded: at most :data:`TRIM_READ_MAX` events and :data:`_TRIM_READ_S` seconds are
        read. A room of more events is read from the first of its newest TRIM_READ_MAX
        (found by a binary search on direct-get counts, ~log2(last seq) requests): when
        they exceed the cap, the trim is exact (every older event goes too); when they fit,
        the cap keeps more than the bound can read and nothing is removed (logged; use
        ``purge_room`` or the tenant's stream limits). A read cut short (time, a replica
        that stays behind) removes only what the part read proves past the cap, never too
        many: the next call goes on from there."""
        trim_count((), max_bytes)  # a negative cap: ValueError before any request
        stream = self._primary_stream(tenant)
        subjects = _room_filter(self._scheme, tenant, room)
        room_last = await self._room_last_seq(stream, subjects)
        if room_last == 0:
            return 0
        start = await self._newest_start(stream, subjects, room_last)
        seqs, sizes = await self._room_sizes(stream, subjects, start, room_last)
        removed = trim_count(sizes, max_bytes)
        if removed == 0:
            if start > 1:
                log.info("trim of %s in %s: the cap holds more than the read bound", room, stream)
            return 0
        cut = seqs[removed] if removed < len(seqs) else seqs[-1] + 1
        return await self._purge_everywhere(tenant, room, {"filter": subjects, "seq": cut})

    async def _count_from(self, stream: str, subjects: str, seq: int) -> int:
        """How many of the room's events have a seq of ``seq`` or more: a batched direct get
        of one, whose ``Nats-Num-Pending`` counts the matching events after it."""
        request = {"seq": seq, "next_by_subj": subjects, "batch": 1}
        msgs, _ = await self._direct_batch(stream, request)
        return _header_int(msgs[0], "Nats-Num-Pending") + 1 if msgs else 0

    async def _newest_start(self, stream: str, subjects: str, room_last: int) -> int:
        """A seq from which at most :data:`TRIM_READ_MAX` of the room's events remain: 1
        when the room holds no more, else found by binary search (counts only fall as the
        seq rises; bounded: seqs are below 2**64)."""
        if await self._count_from(stream, subjects, 1) <= TRIM_READ_MAX:
            return 1
        low, high = 1, room_last  # more than the bound from low; at most the bound from high
        for _ in range(64):
            if high - low <= 1:
                break
            middle = (low + high) // 2
            if await self._count_from(stream, subjects, middle) <= TRIM_READ_MAX:
                high = middle
            else:
                low = middle
        return high

    async def _room_last_seq(self, stream: str, subjects: str) -> int:
        """The room's newest seq at the stream leader (``last_by_subj`` takes wildcards);
        0 when the stream or the room has no event."""
        _, _, jsm, _ = self._require()
        try:
            return (await jsm.get_last_msg(stream, subjects)).seq or 0
        except NotFoundError:
            return 0
        except (*_TRANSIENT, APIError) as exc:
            raise BrokerUnavailable(f"last message lookup failed: {exc}") from exc

    async def _room_sizes(
        self, stream: str, subjects: str, start: int, room_last: int
    ) -> tuple[list[int], list[int]]:
        """The seqs and body sizes of the room's events from ``start`` up to ``room_last``,
        within :data:`TRIM_READ_MAX` events and :data:`_TRIM_READ_S` seconds. A replica
        behind the leader ends short: it is asked again (bounded); then what was read is
        used (short of the newest events, a trim removes less, never more)."""
        seqs: list[int] = []
        sizes: list[int] = []
        deadline, short = time.monotonic() + _TRIM_READ_S, 0
        # At least one batch, however short the time: each call makes progress.
        while len(seqs) < TRIM_READ_MAX and (not seqs or time.monotonic() < deadline):
            request = {
                "seq": seqs[-1] + 1 if seqs else start,
                "next_by_subj": subjects,
                "batch": min(_REPLAY_BATCH, TRIM_READ_MAX - len(seqs)),
                "max_bytes": _REPLAY_BATCH_BYTES,
            }
            msgs, _ = await self._direct_batch(stream, request)
            for msg in msgs:
                seq = int((msg.headers or {}).get("Nats-Sequence", "0"))
                if seq > room_last:
                    return seqs, sizes
                seqs.append(seq)
                sizes.append(len(msg.data))
            if seqs and seqs[-1] >= room_last:
                return seqs, sizes
            short = 0 if msgs else short + 1
            if short > _LAGGING_RETRIES:
                break
            if short:
                await asyncio.sleep(0.05 * 2**short)  # retry backoff: the replica catches up
        log.info(
            "trim of %s in %s read %d events, up to seq %s of %d (out of time or a lagging "
            "replica): trims what that part proves, the next trim goes on",
            subjects,
            stream,
            len(seqs),
            seqs[-1] if seqs else 0,
            room_last,
        )
        return seqs, sizes

    async def _js_api(self, api: str, request: dict[str, Any]) -> dict[str, Any] | None:
        """One JetStream API request (``$JS.API.<api>``); None when the stream does not
        exist. Raises BrokerUnavailable when JetStream did not answer or refused."""
        nc, _, _, _ = self._require()
        try:
            msg = await nc.request(
                f"$JS.API.{api}", orjson.dumps(request), timeout=self._publish_timeout
            )
            reply = orjson.loads(msg.data)
        except (NoRespondersError, *_TRANSIENT) as exc:
            raise BrokerUnavailable(
                f"JetStream did not answer {api}: {type(exc).__name__}"
            ) from exc
        except orjson.JSONDecodeError:
            raise BrokerUnavailable(f"unreadable JetStream reply to {api}") from None
        error = reply.get("error") if isinstance(reply, dict) else {"description": "not a map"}
        if error:
            if isinstance(error, dict) and error.get("err_code") == _STREAM_NOT_FOUND:
                return None
            raise BrokerUnavailable(f"JetStream refused {api}: {error}")
        return reply  # type: ignore[no-any-return]

    async def _subject_counts(
        self, stream: str, subjects: str
    ) -> tuple[dict[str, int], int] | None:
        """Stored events per subject matching ``subjects`` and the stream's last seq, from
        STREAM.INFO read page by page (the server sends 100,000 subjects per page, sorted,
        with ``total`` and ``offset``). None when the stream does not exist."""
        counts: dict[str, int] = {}
        offset, last_seq = 0, 0
        for _ in range(_MAX_SUBJECT_PAGES):
            request = {"subjects_filter": subjects, "offset": offset}
            reply = await self._js_api(f"STREAM.INFO.{stream}", request)
            if reply is None:
                return None
            state = reply.get("state") or {}
            last_seq = last_seq or int(state.get("last_seq", 0))
            page: dict[str, int] = state.get("subjects") or {}
            counts.update(page)
            offset += len(page)
            if not page or offset >= int(reply.get("total", 0)):
                return counts, last_seq
        raise BrokerUnavailable(f"stream {stream} has more channels than one answer can list")

    async def _last_seqs(
        self, stream: str, subjects: list[str], leader_last: int
    ) -> dict[str, int]:
        """Each subject's last seq, by batched direct gets with ``multi_last`` (nats-server
        2.11+; one lookup per subject before), _MULTI_LAST_CHUNK subjects per request."""
        if not self._has_batched_direct_get():
            return await self._last_seqs_one_by_one(stream, subjects)
        lasts: dict[str, int] = {}
        for start in range(0, len(subjects), _MULTI_LAST_CHUNK):
            chunk = subjects[start : start + _MULTI_LAST_CHUNK]
            lasts.update(await self._multi_last(stream, chunk, leader_last))
        return lasts

    async def _multi_last(
        self, stream: str, subjects: list[str], leader_last: int
    ) -> dict[str, int]:
        """One chunk's last seqs. A replica behind the leader (its end-of-batch
        ``Nats-UpTo-Sequence`` below the leader's last seq) is asked again; a batch cut by
        ``max_bytes`` goes on from the seq after its last message, up to the same seq."""
        lasts: dict[str, int] = {}
        request: dict[str, Any] = {
            "multi_last": subjects,
            "batch": len(subjects),
            "max_bytes": _REPLAY_BATCH_BYTES,
        }
        for attempt in range(_LAGGING_RETRIES + len(subjects) + 1):  # bounded: lag + pages
            msgs, end = await self._direct_batch(stream, request)
            up_to = int(end.get("Nats-UpTo-Sequence", "0") or 0)
            if "up_to_seq" not in request and up_to < leader_last and attempt < _LAGGING_RETRIES:
                await asyncio.sleep(0.05 * 2**attempt)  # retry backoff: the replica catches up
                continue
            for msg in msgs:
                headers = msg.headers or {}
                lasts[headers.get("Nats-Subject", "")] = int(headers.get("Nats-Sequence", "0"))
            pending = int(end.get("Nats-Num-Pending", "0") or 0)
            if end.get("Status") != "204" or pending == 0 or not msgs:
                return lasts
            request["up_to_seq"] = up_to
            request["seq"] = int((msgs[-1].headers or {}).get("Nats-Sequence", "0")) + 1
        return lasts

    async def _direct_batch(
        self, stream: str, request: dict[str, Any]
    ) -> tuple[list[Msg], dict[str, str]]:
        """One batched direct get: its messages, and the headers of the status message that
        ends it (204 end of batch, 404 nothing matched, ...)."""
        nc, _, _, _ = self._require()
        replies: asyncio.Queue[Msg] = asyncio.Queue()

        async def on_msg(msg: Msg) -> None:
            replies.put_nowait(msg)

        try:
            sub = await nc.subscribe(
                nc.new_inbox(), cb=on_msg, pending_msgs_limit=4 * _REPLAY_BATCH
            )
            await nc.publish(
                f"$JS.API.DIRECT.GET.{stream}", orjson.dumps(request), reply=sub.subject
            )
        except _TRANSIENT as exc:
            raise BrokerUnavailable(f"direct get failed: {type(exc).__name__}") from exc
        msgs: list[Msg] = []
        try:
            async with asyncio.timeout(_REPLAY_WAIT_S * _REPLAY_STALL_CHECKS):
                while not ((msg := await replies.get()).headers or {}).get("Status"):
                    msgs.append(msg)
            return msgs, dict(msg.headers or {})
        except TimeoutError:
            raise BrokerUnavailable(f"stream {stream} did not answer a direct get") from None
        finally:
            with contextlib.suppress(*_TRANSIENT, nats.errors.Error):
                await sub.unsubscribe()

    async def _last_seqs_one_by_one(self, stream: str, subjects: list[str]) -> dict[str, int]:
        """Each subject's last seq from the stream leader (servers before 2.11)."""
        _, _, jsm, _ = self._require()
        lasts = {}
        for subject in subjects:
            try:
                lasts[subject] = (await jsm.get_last_msg(stream, subject)).seq or 0
            except NotFoundError:
                continue
            except (*_TRANSIENT, APIError) as exc:
                raise BrokerUnavailable(f"last message lookup failed: {exc}") from exc
        return lasts

    async def replay(
        self, ref: ChannelRef, start_seq: int, end_seq: int | None, limit: int | None = None
    ) -> AsyncGenerator[StoredEvent, None]:
        """Every stored event of ``ref`` with start_seq <= seq <= end_seq, in order.

        Without ``end_seq`` the end is the channel's newest event, read from the stream
        leader first. Events are read in batches with JetStream's batched direct get
        (``$JS.API.DIRECT.GET``, NATS 2.11+), which any replica may answer, including one
        that is still catching up (a node that just restarted) and so has fewer events.
        So the replay ends only at the end seq (or ``limit``), asking again from where it
        got to, and fails with BrokerUnavailable rather than end short of events the
        store acknowledged. A stream without direct get is read with an ordered consumer.
        """
        if end_seq is None:
            end_seq = (await self.window(ref)).last_seq
        if end_seq < start_seq:
            return
        primary = self._primary_stream(ref.tenant)
        # Each reader reads from where the one before stopped: the region's own copy (up to
        # what it holds), a pull consumer (long replays; it may stop anywhere), then direct
        # gets (or an ordered consumer on servers without them), which fail loudly.
        readers: list[tuple[_Reader, str]] = []
        local = self._local_copy(ref.tenant, primary)
        if local is not None:
            readers.append((self._replay_local, local))
        readers += [(self._replay_pulled, primary), (self._replay_stored, primary)]
        last, count = start_seq - 1, 0
        for read, stream in readers:
            if last >= end_seq or (limit is not None and count >= limit):
                return
            rest = None if limit is None else limit - count
            async with contextlib.aclosing(read(stream, ref, last + 1, end_seq, rest)) as events:
                async for event in events:
                    last, count = event.seq, count + 1
                    yield event
        if last < end_seq and (limit is None or count < limit):
            # Short of the end: fine only if retention removed the rest meanwhile.
            window = await self.window(ref)
            if window.last_seq >= end_seq and end_seq >= window.first_stream_seq:
                raise BrokerUnavailable(f"replay stopped at {last}, before {end_seq}")

    async def _replay_stored(
        self, stream: str, ref: ChannelRef, start_seq: int, end_seq: int, limit: int | None
    ) -> AsyncGenerator[StoredEvent, None]:
        """Batched direct gets; an ordered consumer where the stream answers none (that is
        known before the first event)."""
        try:
            if not self._has_batched_direct_get():
                raise _NoDirectGet()
            async with contextlib.aclosing(
                self._replay_direct(stream, ref, start_seq, end_seq, limit)
            ) as direct:
                async for event in direct:
                    yield event
            return
        except _NoDirectGet:
            pass
        async with contextlib.aclosing(
            self._replay_consumer(stream, ref, start_seq, end_seq, limit)
        ) as consumer:
            async for event in consumer:
                yield event

    def _has_batched_direct_get(self) -> bool:
        """Batched direct get came with nats-server 2.11; older servers answer one message."""
        if self._nc is None:
            return False
        try:
            version = self._nc.connected_server_version
            return (version.major, version.minor) >= (2, 11)
        except (AttributeError, TypeError, ValueError):
            return False

    def _local_copy(self, tenant: str, primary: str) -> str | None:
        """A placed tenant's stream in this gateway's region, when that is not the primary."""
        placement = self._placement(tenant)
        if placement is None or not self._region:
            return None
        local = placement.stream_in(self._region)
        return local if local is not None and local != primary else None

    async def _replay_local(
        self, stream: str, ref: ChannelRef, start_seq: int, end_seq: int, limit: int | None
    ) -> AsyncGenerator[StoredEvent, None]:
        """What the region's own copy (a mirror, read by its name) holds of the range.

        Only from a mirror that holds the start, up to its last seq, and it may end sooner
        (a mirror lags and answers 404 for what it lacks, like an end): the caller reads the
        rest from the primary.
        """
        if not self._has_batched_direct_get():
            return
        try:
            first, last = await self._copy_range(stream, ref.tenant)
        except BrokerUnavailable:
            return
        upto = min(end_seq, last)
        if upto < start_seq or first > start_seq:  # lacks the start (retention, a new copy)
            return
        try:
            async with contextlib.aclosing(
                self._replay_direct(stream, ref, start_seq, upto, limit, patient=False)
            ) as events:
                async for event in events:
                    yield event
        except (_NoDirectGet, BrokerUnavailable) as exc:
            log.debug("replay from %s stopped (%s); the primary serves the rest", stream, exc)

    async def _replay_direct(
        self,
        stream: str,
        ref: ChannelRef,
        start_seq: int,
        end_seq: int,
        limit: int | None,
        patient: bool = True,
    ) -> AsyncGenerator[StoredEvent, None]:
        """Batched direct gets of ``stream``; ``patient``: ask again after an empty batch
        short of the end (a lagging replica), else stop there.

        Two requests overlap: the next batch is asked for as soon as one is complete, so
        the store reads it while this one goes to the client (a reply subject per batch, so
        the replies of the two never mix; at most two batches, 2 x _REPLAY_BATCH_BYTES,
        held)."""
        nc, _, _, _ = self._require()
        api = f"$JS.API.DIRECT.GET.{stream}"
        subject = self._scheme.ingest(ref)
        batches = (_DirectBatch(), _DirectBatch())
        inboxes: list[str] = []

        async def ask(k: int, seq: int, count: int) -> None:
            want = _REPLAY_BATCH if limit is None else min(_REPLAY_BATCH, limit - count)
            batches[k].start()
            request = {
                "seq": seq,
                "next_by_subj": subject,
                "batch": want,
                "max_bytes": _REPLAY_BATCH_BYTES,
            }
            await nc.publish(api, orjson.dumps(request), reply=inboxes[k])

        def more(seq: int, count: int) -> bool:
            return seq <= end_seq and (limit is None or count < limit)

        next_seq, count, empty_rounds, k = start_seq, 0, 0, 0
        try:
            for batch in batches:
                inboxes.append(await nc.reply_subject(batch.on_raw))
            if not more(next_seq, count):
                return
            await ask(k, next_seq, count)
            while True:
                batch = batches[k]
                items = await batch.complete(_REPLAY_WAIT_S * _REPLAY_STALL_CHECKS)
                if batch.no_direct_get and count == 0 and not items:
                    raise _NoDirectGet()
                past_end = bool(items) and items[-1][0] > end_seq
                if limit is not None:
                    items = items[: limit - count]
                if items:
                    empty_rounds = 0
                    next_seq = items[-1][0] + 1
                    if not past_end and more(next_seq, count + len(items)):
                        await ask(1 - k, next_seq, count + len(items))  # overlaps the yields
                        k = 1 - k
                    else:
                        past_end = True
                else:
                    # An empty batch short of the end: a lagging replica answered; ask again.
                    empty_rounds += 1
                    if empty_rounds >= _REPLAY_STALL_CHECKS or not patient:
                        return
                    await asyncio.sleep(0.05 * 2**empty_rounds)  # retry backoff
                    await ask(k, next_seq, count)
                    continue
                for seq, body in items:
                    if seq > end_seq:
                        return
                    count += 1
                    yield StoredEvent(seq, body)
                if past_end:
                    return
        except _TRANSIENT as exc:
            raise BrokerUnavailable(f"replay failed: {type(exc).__name__}") from exc
        finally:
            for inbox in inboxes:
                nc.release_reply_subject(inbox)

    def _pull_fits(self, start_seq: int, end_seq: int, limit: int | None) -> bool:
        """Whether a replay is long enough for a pull consumer, and one more may run (only
        beside batched direct gets, which read whatever the consumer does not)."""
        least = self.pull_replay_min
        if least <= 0 or end_seq - start_seq + 1 < least or not self._has_batched_direct_get():
            return False
        return (limit is None or limit >= least) and self._pulls_running < _PULL_REPLAYS_MAX

    async def _replay_pulled(
        self, stream: str, ref: ChannelRef, start_seq: int, end_seq: int, limit: int | None
    ) -> AsyncGenerator[StoredEvent, None]:
        """The events of ``ref`` from ``start_seq`` through an ephemeral pull consumer, in
        order, none twice, up to ``end_seq`` or ``limit``. It stops short, without an error,
        wherever the consumer cannot go on: it could not be made, a message went missing
        (consumer seqs not contiguous: this connection dropped some), the server ended it,
        or nothing came for a while. The caller then reads the rest with direct gets.

        About two requests of _PULL_BATCH events are asked for ahead, each bounded in bytes:
        the store reads the next events while these go to the client, and a replay holds at
        most those in memory, whatever the client's pace.
        """
        if not self._pull_fits(start_seq, end_seq, limit):
            return  # short (or too many at once): the direct gets after this read it all
        nc, _, jsm, _ = self._require()
        self._pulls_running += 1
        self.pulled_replays += 1
        pulled = _Pulled()
        sub: Subscription | None = None
        consumer: str | None = None
        delivered = count = quiet = 0
        why = ""  # why the consumer stopped short (then direct gets read the rest)
        try:
            inbox = nc.new_inbox()
            sub = await nc.subscribe_raw(inbox, pulled.on_raw)
            config = ConsumerConfig(
                filter_subject=self._scheme.ingest(ref),
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=max(1, start_seq),
                ack_policy=AckPolicy.NONE,
                max_deliver=1,
                mem_storage=True,
                num_replicas=1,
                inactive_threshold=_REPLAY_IDLE_S,
            )
            consumer = (await jsm.add_consumer(stream, config)).name
            log.debug("replay of %s from %d through pull consumer %s", stream, start_seq, consumer)
            api = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
            request = orjson.dumps(
                {"batch": _PULL_BATCH, "max_bytes": _PULL_BATCH_BYTES,
                 "expires": int(_PULL_EXPIRES_S * 1e9)}
            )  # fmt: skip

            async def ask_ahead() -> None:
                while pulled.credit < 2 * _PULL_BATCH:
                    pulled.credit += _PULL_BATCH
                    await nc.publish(api, request, reply=inbox)

            not_ready = 0
            while True:
                pulled.arrived.clear()  # before looking: what comes after sets it again
                if not pulled.items:
                    if pulled.failed.startswith("503") and delivered == 0 and not_ready < 5:
                        # No responders to the first requests: the consumer was just made,
                        # and the server they reached may not know it yet (interest in its
                        # request subject spreads over the cluster a moment later). Ask
                        # again shortly rather than leave the whole replay to direct gets.
                        not_ready += 1
                        pulled.failed, pulled.credit = "", 0
                        await asyncio.sleep(0.01 * 2**not_ready)  # retry backoff
                        continue
                    if pulled.failed:
                        why = pulled.failed
                        return
                    await ask_ahead()  # also after requests that ended short (expired)
                    try:
                        async with asyncio.timeout(_REPLAY_WAIT_S):
                            await pulled.arrived.wait()
                        quiet = 0
                    except TimeoutError:
                        # Nothing for a while: a request may have ended without a word (its
                        # bytes ran out exactly); ask again, a few times, then give up.
                        quiet += 1
                        if quiet >= _REPLAY_STALL_CHECKS:
                            why = "nothing came for a while"
                            return
                        pulled.credit = 0
                    continue
                items, pulled.items = pulled.items, []
                await ask_ahead()  # the store reads the next ones while these go out
                for seq, consumer_seq, body in items:
                    if consumer_seq != delivered + 1:  # a message went missing on the way
                        why = f"consumer seq {consumer_seq} after {delivered}"
                        return
                    delivered = consumer_seq
                    if seq > end_seq:
                        return
                    count += 1
                    yield StoredEvent(seq, body)
                    if seq >= end_seq or (limit is not None and count >= limit):
                        return
        except (*_TRANSIENT, nats.errors.Error, APIError) as exc:
            why = type(exc).__name__
        finally:
            self._pulls_running -= 1
            if why:
                log.info(
                    "a replay of %s through a pull consumer stopped after %d events (%s): "
                    "direct gets read the rest",
                    stream, count, why,
                )  # fmt: skip
            if self.on_replay_consumer is not None:
                self.on_replay_consumer("cut_short" if why else "read")
            if sub is not None:
                with contextlib.suppress(*_TRANSIENT, nats.errors.Error):
                    await nc.unsubscribe_raw(sub)
            if consumer is not None:
                # In the background: the client has its events; the consumer also ends by
                # itself once idle for _REPLAY_IDLE_S.
                task = asyncio.create_task(self._delete_consumer(jsm, stream, consumer))
                self._consumer_deletes.add(task)
                task.add_done_callback(self._consumer_deletes.discard)

    async def _replay_consumer(
        self, stream: str, ref: ChannelRef, start_seq: int, end_seq: int, limit: int | None
    ) -> AsyncGenerator[StoredEvent, None]:
        nc, js, jsm, _ = self._require()
        config = ConsumerConfig(
            deliver_subject=nc.new_inbox(),
            filter_subject=self._scheme.ingest(ref),
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=max(1, start_seq),
            ack_policy=AckPolicy.NONE,
            max_deliver=1,
            flow_control=True,
            idle_heartbeat=_REPLAY_IDLE_S,
            mem_storage=True,
            num_replicas=1,
            inactive_threshold=_REPLAY_IDLE_S,
        )
        try:
            info = await jsm.add_consumer(stream, config)
        except NotFoundError:
            return
        except (*_TRANSIENT, APIError) as exc:
            raise BrokerUnavailable(f"could not start replay: {exc}") from exc
        sub = await js.subscribe_bind(stream, config, info.name, ordered_consumer=True)
        last = start_seq - 1
        count = 0
        try:
            while last < end_seq and (limit is None or count < limit):
                msg = await self._next_replayed(sub)
                if msg is None:
                    break
                seq = msg.metadata.sequence.stream
                if seq > end_seq:
                    return
                yield StoredEvent(seq, msg.data)
                last, count = seq, count + 1
        finally:
            with contextlib.suppress(*_TRANSIENT, nats.errors.Error):
                await sub.unsubscribe()
            await self._delete_consumer(jsm, stream, info.name)

    async def _next_replayed(self, sub: JetStreamContext.PushSubscription) -> Msg | None:
        """The next replayed message; None if none came for a while though more were due."""
        for _ in range(_REPLAY_STALL_CHECKS):
            try:
                return await sub.next_msg(timeout=_REPLAY_WAIT_S)
            except NatsTimeoutError:
                pass
            except _TRANSIENT as exc:
                raise BrokerUnavailable(f"replay failed: {type(exc).__name__}") from exc
            try:
                # A lagging replica catches up and delivers; a dead consumer does not answer.
                await sub.consumer_info()
            except (*_TRANSIENT, APIError) as exc:
                raise BrokerUnavailable(f"replay stalled: {type(exc).__name__}") from exc
        return None

    async def _delete_consumer(self, jsm: JetStreamManager, stream: str, name: str) -> None:
        with contextlib.suppress(*_TRANSIENT, APIError):
            await jsm.delete_consumer(stream, name)


def broker_from_settings(settings: Settings, name: str = "arqonbus") -> JetStreamBroker:
    """The JetStream broker for ``settings``: its URLs, stream policy, credentials and TLS.

    ``name`` is the NATS connection name (shown by the server's monitoring).
    Raises ConfigError when a TLS file cannot be loaded.
    """
    return JetStreamBroker(
        settings.nats_urls,
        SubjectScheme(settings.subject_prefix),
        StreamPolicy(
            max_age_s=settings.stream_max_age_s,
            dedupe_window_s=settings.dedupe_window_s,
            replicas=settings.stream_replicas,
            max_bytes=settings.tenant_max_bytes or -1,  # the tenants' stored-bytes quota
        ),
        publish_timeout_s=settings.publish_timeout_s,
        name=name,
        connect_options=connect_options(settings),
        region=settings.region,
        batching=settings.publish_batching,
        pull_replay_min=settings.replay_consumer_min_span,
    )
