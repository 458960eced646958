"""The mesh's ports: what the gateway needs from NATS, and what each call guarantees.

The ports, each with a JetStream implementation (:mod:`mesh.jetstream`, :mod:`mesh.kv`,
:mod:`mesh.audit`) and an in-memory twin (:mod:`mesh.memory`). Both are held to one
contract suite, ``tests/contract/``, which checks exactly the guarantees stated here:

* :class:`Broker`: events (store, dedupe, seq, live delivery, replay), service commands,
  per-tenant stream provisioning and quotas, and the connection's health.
* :class:`StateStore`: the KV buckets of shared state (API keys, agents, nonces, rooms,
  content policies, tenant limits, connection counts), each a :class:`KVBucket` with
  get / create-if-absent / compare-and-set update / put / delete / snapshot / watch.
* :class:`AuditSink`: each tenant's audit stream, appended to and read back.
* :class:`ClusterView`: the gateways' heartbeats (the last one of each live gateway) and
  the NATS servers of the cluster (:mod:`mesh.cluster`).
* :class:`PresenceStore`: who is present in each channel (one entry per session), with
  per-gateway leases so that a dead gateway's members can be removed (:mod:`mesh.presence`).

Errors are the exceptions below. :class:`BrokerUnavailable` always means "the store did not
answer or could not be reached": nothing is known about the effect, retrying is safe
where the call says so. Every other exception is an answer about the data.
Names of subjects, streams and buckets all come from :mod:`shared.subjects`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from arqonbus_server.shared.errors import (
    INVALID_PARAMETERS,
    NO_RESPONDERS,
    QUOTA_EXCEEDED,
    TIMEOUT,
    UNAVAILABLE,
    InvalidInput,
    ServerError,
)
from arqonbus_server.shared.records import record
from arqonbus_server.shared.regions import Placement
from arqonbus_server.shared.subjects import ChannelRef

log = logging.getLogger("arqonbus.mesh.ports")

# -- errors -----------------------------------------------------------------------------


class MeshError(ServerError):
    """A port of the mesh could not do what was asked (the subclasses say why)."""


class BrokerUnavailable(MeshError):
    """The store could not be reached or did not answer in time. Safe to retry."""

    catalogue = UNAVAILABLE


class StoreQuotaExceeded(MeshError):
    """The tenant's stream is full (its max_bytes, discard new): the event was not stored.

    Not transient: retrying succeeds only once old events expire or the quota is raised.
    """

    catalogue = QUOTA_EXCEEDED


class NoResponders(MeshError):
    """No handler is registered for the service command right now."""

    catalogue = NO_RESPONDERS


class RequestTimeout(MeshError):
    """The handler did not reply in time; it may still have acted on the command."""

    catalogue = TIMEOUT


class KeyExists(MeshError):
    """:meth:`KVBucket.create` found a live value under the key (``value`` at ``revision``)."""

    catalogue = INVALID_PARAMETERS

    def __init__(self, key: str, value: bytes, revision: int) -> None:
        super().__init__(f"key {key!r} exists (revision {revision})")
        self.key = key
        self.value = value
        self.revision = revision


class KeyContended(MeshError):
    """:meth:`KVBucket.create` could not tell: the key changed under every attempt."""

    catalogue = UNAVAILABLE


class RevisionMismatch(MeshError):
    """:meth:`KVBucket.update` was refused: the key's latest revision is not the one given."""

    catalogue = UNAVAILABLE


class InvalidKey(InvalidInput):
    """The key cannot be stored (KV keys are ``[-/_=.a-zA-Z0-9]+``, no leading/trailing dot)."""


# -- data ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServiceRequest:
    """A service command delivered to a handler; answer with ``Broker.respond(reply, ...)``."""

    body: bytes
    reply: str
    headers: Mapping[str, str] | None = None  # the requester's (e.g. W3C trace context)


@record
class PublishResult:
    seq: int
    duplicate: bool
    # A placed tenant's epoch of the primary that stored it (None: not placed); see
    # Placement.epoch_of and docs/protocol.md#resume-across-a-failover.
    epoch: int | None = None


# One event of Broker.publish_many: its stored body, its dedupe key and its headers.
PublishItem = tuple[bytes, str, Mapping[str, str] | None]


@dataclass(frozen=True, slots=True)
class StoredEvent:
    seq: int
    body: bytes


@dataclass(frozen=True, slots=True)
class LiveEvent:
    seq: int
    prev_seq: int
    body: bytes
    # The message's headers as stored (the publisher's ``headers`` among them, e.g. the
    # W3C trace context of gateway/tracing.py); None when the store keeps none.
    headers: Mapping[str, str] | None = None
    # The stream that stored it ("" when unknown): for a placed tenant, which primary,
    # so which epoch (Placement.epoch_of), even before the gateway sees a new placement.
    stream: str = ""
    # The dedupe key it was published with ("" when unknown): lets the gateway that
    # published an event recognise its live copy (gateway/http/phases.py).
    dedupe_key: str = ""


@dataclass(frozen=True, slots=True)
class ChannelWindow:
    """What the store holds for a channel: its newest seq and the stream's oldest."""

    last_seq: int
    first_stream_seq: int


@dataclass(frozen=True, slots=True)
class StreamStats:
    """What a tenant's stream holds now: its events and their bytes (0, 0: no stream)."""

    messages: int
    bytes: int
    first_seq: int
    last_seq: int


@dataclass(frozen=True, slots=True)
class ChannelStats:
    """One channel with stored events: how many, and its newest seq."""

    room: str
    channel: str
    messages: int
    last_seq: int


@dataclass(frozen=True, slots=True)
class ChannelDetail:
    """What the store holds for one channel (all 0 when it holds nothing).

    ``bytes`` is exact when ``bytes_exact``; otherwise it is estimated from a sample of the
    channel's events (a channel of many events is not read in full to answer).
    """

    messages: int
    first_seq: int
    last_seq: int
    bytes: int
    bytes_exact: bool


@dataclass(frozen=True, slots=True)
class KVEntry:
    """A live value and its revision (the store's sequence of the write that set it)."""

    key: str
    value: bytes
    revision: int


@dataclass(frozen=True, slots=True)
class KVChange:
    """One change seen by a watch; ``value`` None means the key was deleted."""

    key: str
    value: bytes | None
    revision: int


LiveHandler = Callable[[ChannelRef, LiveEvent], None]
ServiceHandler = Callable[[ServiceRequest], None]
ReconnectHandler = Callable[[], Coroutine[Any, Any, None]]


class LiveSubscription(Protocol):
    async def close(self) -> None:
        """Stop delivery. Never raises; closing twice is harmless."""


def trim_count(sizes: Iterable[int], max_bytes: int) -> int:
    """How many of the oldest events (``sizes``: their bodies' lengths, oldest first) to
    remove so that the rest total at most ``max_bytes``: the rule of
    :meth:`Broker.trim_room`, in one place for every implementation."""
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be 0 or more, not {max_bytes}")
    listed = list(sizes)
    remaining, removed = sum(listed), 0
    for size in listed:
        if remaining <= max_bytes:
            break
        remaining, removed = remaining - size, removed + 1
    return removed


# What :meth:`Broker.publish_then` calls back with: publish()'s result, or what it raised.
PublishDone = Callable[[PublishResult | BaseException], None]

_settling: set[asyncio.Task[None]] = set()  # publish_in_task's tasks, held until done


def publish_in_task(work: Coroutine[Any, Any, PublishResult], done: PublishDone) -> None:
    """Run ``work`` (a publish) in a task and hand its result, or what it raised, to
    ``done``: :meth:`Broker.publish_then` for a publish that takes the awaiting path."""

    def hand_over(outcome: PublishResult | BaseException) -> None:
        try:
            done(outcome)
        except Exception:  # the caller's bug: logged here, not lost in the task
            log.exception("a publish's callback failed")

    async def settle() -> None:
        try:
            result = await work
        except asyncio.CancelledError:  # stopped (the gateway is closing): not acknowledged
            hand_over(BrokerUnavailable("publish not acknowledged: the publish was stopped"))
            raise
        except Exception as exc:
            hand_over(exc)
        else:
            hand_over(result)

    task = asyncio.create_task(settle())
    _settling.add(task)
    task.add_done_callback(_settling.discard)


# -- Broker ---------------------------------------------------------------------------------


class Broker(Protocol):
    """Events stored per tenant, delivered live per channel, and service request/reply.

    Guarantees:

    * **Store before ack.** ``publish`` returns only after the event is stored
      (replicated, per the stream's replica count). At-least-once into the store.
    * **Dedupe by key.** Publishing the same ``dedupe_key`` again within the dedupe window
      stores nothing and returns the original seq with ``duplicate=True``.
    * **Seq strictly increasing.** Seqs are strictly increasing per tenant, and so per
      channel, in store order.
    * **Ordered live delivery with a continuity link.** ``subscribe_live`` delivers each
      stored event of the channel, in store order, with ``prev_seq``: the seq of the
      channel's previous stored event (0 if none). Live delivery is at-most-once;
      a consumer whose last seen seq is below ``prev_seq`` missed events and ``replay``\\ s.
    * **Replay is exact.** ``replay`` yields every stored event of the channel with
      ``start_seq <= seq <= end_seq``, in order, each once.
    * **Service commands go to one handler.** ``request`` reaches exactly one of the
      handlers that ``serve`` the command, on any gateway, and returns its reply.
    * **Tenant isolation.** A channel of one tenant never reaches a stream, subject or
      subscription of another.
    * **Placed tenants** (``placement_for`` returns a record, shared/regions.py): their
      streams are never created here (the ops tools provision them); a publish is stored
      only by ``placement.primary.stream`` (``BrokerUnavailable`` otherwise, also for a
      stale primary cut off from the mesh), and with ``acks == "mirrored"`` and mirrors it
      returns only once a mirror holds the event (:meth:`wait_mirrored`). ``replay`` reads
      the stream in the broker's own region by its name as far as it goes (not once that
      copy was promoted: it then holds another epoch), the rest from the primary, and never
      skips. Live events name the stream that stored them (``LiveEvent.stream``), and
      quotas and stream stats apply to the current primary.
    """

    @property
    def connected(self) -> bool:
        """True while the link to the store is up."""
        ...

    @property
    def max_payload(self) -> int:
        """The largest message the store accepts, in bytes (headers included)."""
        ...

    # Per-tenant stored-bytes quota (0 or less: the configured default), read when a
    # tenant's stream is created or its quota applied. Set once by the composition root.
    max_bytes_for: Callable[[str], int] | None

    # The tenant's placement record (None: not placed; everything as in one region). Set
    # once by the composition root of a gateway with a region; read on every publish.
    placement_for: Callable[[str], Placement | None] | None

    async def connect(self) -> None:
        """Connect once. Raises BrokerUnavailable if no server answers."""
        ...

    async def connect_with_retry(self, stop: Any) -> bool:
        """Connect with jittered backoff until connected (True) or ``stop`` (an
        :class:`asyncio.Event`) is set (False). Never raises BrokerUnavailable."""
        ...

    async def ensure_stream(self, tenant: str) -> int:
        """Create the tenant's stream if missing. Idempotent and safe when callers race
        (on any gateways): all of them see one stream. Returns its replica count, or -1 when
        this broker already knew the stream. Raises BrokerUnavailable."""
        ...

    def stream_known(self, tenant: str) -> bool:
        """True when :meth:`ensure_stream` would return -1 at once, with no I/O (the stream
        is known, or the tenant is placed). A caller on the hot path asks this first and
        awaits ensure_stream only when it is False."""
        ...

    async def apply_quota(self, tenant: str) -> bool:
        """Bring the tenant's existing stream (a placed tenant's: its current primary) to its
        stored-bytes quota (``max_bytes_for``) now; idempotent. True if the stream exists (False: it gets the quota when created).
        Raises BrokerUnavailable."""
        ...

    async def publish(
        self,
        ref: ChannelRef,
        body: bytes,
        dedupe_key: str,
        headers: Mapping[str, str] | None = None,
        ttl_s: int | None = None,
    ) -> PublishResult:
        """Store one event of ``ref``'s channel (creating the tenant's stream if needed).

        ``headers`` (e.g. ``traceparent``) are stored with it and offered to live
        subscribers in ``LiveEvent.headers``. With ``ttl_s`` (a room's own retention) the
        store removes the event ``ttl_s`` seconds after storing it, even if the tenant's
        stream keeps events longer (it never keeps one longer than the stream's own limits).

        Returns once stored, with its seq, strictly greater than every seq stored before
        in the tenant. The same ``dedupe_key`` within the dedupe window stores nothing and
        returns the first publish's seq with ``duplicate=True``. A placed tenant's result
        carries the epoch of the primary that stored it (the placement the publish used).
        Raises StoreQuotaExceeded
        when the tenant's quota refuses the event (nothing stored), BrokerUnavailable when
        the store did not acknowledge (publish again with the same key: stored once).
        """
        ...

    def publish_then(
        self,
        ref: ChannelRef,
        body: bytes,
        dedupe_key: str,
        headers: Mapping[str, str] | None,
        ttl_s: int | None,
        done: PublishDone,
    ) -> None:
        """:meth:`publish`, with what it would return or raise handed to ``done``: once,
        always later (never from within this call), on the event loop. Successive calls
        reach the store in call order, as publishes awaited in tasks started in that order.

        The cheap way to publish one event at a time: no task per publish where the store
        can call back straight from its ack (the gateway's single events)."""
        ...

    async def publish_many(
        self, ref: ChannelRef, items: Sequence[PublishItem], ttl_s: int | None = None
    ) -> list[PublishResult]:
        """Store several events of ``ref``'s channel, each ``(body, dedupe_key, headers)``
        exactly as :meth:`publish` would store it alone: its result, in ``items``' order.

        The events are stored in the order given (their seqs increase along the list,
        except a duplicate's, which is its first publish's). The list is not atomic: when
        this raises (StoreQuotaExceeded, BrokerUnavailable), some of the events may be
        stored; publishing the same list again with the same keys stores each one once.
        """
        ...

    async def wait_mirrored(
        self, tenant: str, mirrors: Sequence[str], seq: int, timeout: float
    ) -> None:
        """Return once one of the ``mirrors`` (stream names) of ``tenant`` holds ``seq``
        (its last seq is ``seq`` or more). Waits of one tenant share one poller (bounded
        rate and pending count). Raises BrokerUnavailable when none did within ``timeout``
        s (also when no mirror exists): the event is stored, its ack is not given yet."""
        ...

    async def subscribe_live(self, ref: ChannelRef, handler: LiveHandler) -> LiveSubscription:
        """Call ``handler(ref, event)`` for each event stored in the channel from now on,
        in store order, with the channel's previous seq as ``prev_seq``. When this returns
        the subscription is in place: every event stored after it is offered to it.
        At-most-once: an event may be missed (``prev_seq`` shows it). Raises BrokerUnavailable.
        """
        ...

    async def window(self, ref: ChannelRef) -> ChannelWindow:
        """The channel's newest stored seq (0: none) and the tenant stream's first seq
        (0: no stream). Reflects every publish acknowledged before the call.
        Raises BrokerUnavailable."""
        ...

    async def stream_stats(self, tenant: str) -> StreamStats:
        """The tenant's stream as it is now: its stored events and bytes, first and last seq
        (all 0 when the tenant has no stream). Reflects every publish acknowledged before
        the call. Raises BrokerUnavailable."""
        ...

    async def channel_stats(self, tenant: str, room: str | None = None) -> list[ChannelStats]:
        """Every channel of ``tenant`` (of its ``room`` only, when given) that holds stored
        events, sorted by (room, channel). Reflects every publish acknowledged before the
        call; nothing of another tenant. Raises BrokerUnavailable."""
        ...

    async def channel_detail(self, ref: ChannelRef) -> ChannelDetail:
        """The channel's stored events: count, first and last seq, bytes. Reflects every
        publish acknowledged before the call. Raises BrokerUnavailable."""
        ...

    async def purge_room(self, tenant: str, room: str) -> int:
        """Remove every stored event of every channel of ``room`` (other rooms and tenants
        keep theirs); returns how many were removed. Seqs are never reused: later events of
        the room get seqs above every earlier one. Raises BrokerUnavailable."""
        ...

    async def trim_room(self, tenant: str, room: str, max_bytes: int) -> int:
        """Remove the oldest stored events of ``room`` (all its channels together) until the
        room's events total at most ``max_bytes`` (the sum of the events' bodies, as
        :attr:`ChannelDetail.bytes` counts them); returns how many were removed. Newer
        events are never removed before older ones of the room; other rooms and tenants
        keep theirs; seqs are never reused. The cap applies to the room as stored when the
        call starts (an event published meanwhile is kept). Safe to run concurrently from
        several gateways: each removes at most what the cap asks, and an event is counted
        by the one call that removed it. A room too large to read at once may be trimmed
        in steps (the implementation says when). No stream or no such room: 0. Raises
        ValueError for a negative ``max_bytes`` and BrokerUnavailable."""
        ...

    def replay(
        self, ref: ChannelRef, start_seq: int, end_seq: int | None, limit: int | None = None
    ) -> AsyncGenerator[StoredEvent, None]:
        """Every stored event of the channel with start_seq <= seq <= end_seq (None: the
        channel's newest), in seq order, each once, at most ``limit`` of them. Never ends
        short of events the store acknowledged: raises BrokerUnavailable instead."""
        ...

    async def request(
        self,
        ref: ChannelRef,
        command: str,
        body: bytes,
        timeout: float,
        headers: Mapping[str, str] | None = None,
    ) -> bytes:
        """Send a service command to exactly one of its handlers and return the reply.

        ``headers`` reach the handler in ``ServiceRequest.headers``.

        Raises NoResponders at once when no handler serves it, RequestTimeout when none
        replied within ``timeout`` s (the handler may have acted), BrokerUnavailable when
        not connected. Commands are neither stored nor retried.
        """
        ...

    async def serve(
        self, ref: ChannelRef, command: str, handler: ServiceHandler
    ) -> LiveSubscription:
        """Become one of the command's handlers: each request goes to one handler only.
        In place when this returns. Raises BrokerUnavailable."""
        ...

    async def respond(self, reply: str, body: bytes) -> None:
        """Answer a :class:`ServiceRequest` (its ``reply``). Raises BrokerUnavailable."""
        ...

    async def check_health(self, timeout: float = 5.0) -> bool:
        """True when connected and the store answers within ``timeout`` s. Never raises."""
        ...

    async def check_link(self, timeout: float = 5.0) -> bool:
        """True when the connected server answers a ping within ``timeout`` s. Never raises."""
        ...

    async def reconnect_elsewhere(self) -> bool:
        """Drop the current server for another (the link is bad); reconnect handlers run.

        True when it dropped a live connection to do so; False when there was none (the
        client is already reconnecting on its own).
        """
        ...

    def on_reconnect(self, handler: ReconnectHandler) -> None:
        """Run ``handler`` after a reconnect or a dropped live event (resync: replay)."""
        ...

    async def close(self, timeout: float = 5.0) -> None:
        """Flush what is in flight (up to ``timeout`` s), then disconnect. Never raises."""
        ...


# -- StateStore -------------------------------------------------------------------------------


class KVWatch(Protocol):
    """The changes of a bucket: first its current values, then ``None`` once, then updates.

    The initial part holds every live key once with its current value (a deleted key may
    show as a change with value None). After the ``None`` marker, each later write or delete
    arrives in the order the store applied it. :meth:`stop` ends the iteration.
    """

    def __aiter__(self) -> AsyncIterator[KVChange | None]: ...

    async def stop(self) -> None:
        """Stop watching. Never raises."""
        ...


class KVBucket(Protocol):
    """One replicated key-value bucket of shared state, the same on every gateway.

    Keys are ``[-/_=.a-zA-Z0-9]+`` (InvalidKey otherwise). Revisions are strictly increasing
    per bucket. Every method raises BrokerUnavailable when the store did not answer.
    """

    @property
    def name(self) -> str:
        """The bucket's name (``shared.subjects.kv_bucket_name``)."""
        ...

    async def get(self, key: str) -> KVEntry | None:
        """The key's latest value and revision, or None when absent or deleted."""
        ...

    async def create(self, key: str, value: bytes) -> int:
        """Store ``value`` only if the key has no live value; returns the new revision.

        Atomic: of any number of concurrent creates of one key (on any gateways or
        servers) exactly one succeeds; every other raises KeyExists naming the winner's
        value. A deleted key is created again. Raises KeyContended when the key kept
        changing under every attempt (neither outcome is known to hold).
        """
        ...

    async def update(self, key: str, value: bytes, revision: int) -> int:
        """Compare-and-set: store ``value`` only if the key's latest revision is
        ``revision``; returns the new revision. Raises RevisionMismatch otherwise (a write
        came between, or the key is absent): of concurrent updates at one revision exactly
        one succeeds."""
        ...

    async def put(self, key: str, value: bytes) -> int:
        """Store ``value`` whatever is there; returns the new revision."""
        ...

    async def delete(self, key: str) -> None:
        """Delete the key (absent afterwards; deleting an absent key is not an error)."""
        ...

    async def items(self, prefix: str = "") -> list[tuple[str, bytes]]:
        """A snapshot of the live keys starting with ``prefix`` ("" or ending with "."),
        sorted by key, with their values."""
        ...

    async def watch(self) -> KVWatch:
        """Watch the whole bucket (see :class:`KVWatch`); in place when this returns."""
        ...

    async def last_revision(self) -> int:
        """The revision of the bucket's latest write or delete (0 when there was none).

        A watch started after this returns holds, in its initial part, every write up to
        that revision; a watch that has reported a change at or past it has seen every
        write made before the call (read-your-writes for a cached copy).
        """
        ...


class StateStore(Protocol):
    """The KV buckets of shared state (kinds: ``shared.subjects.KV_*``)."""

    async def bucket(self, kind: str, ttl_s: float | None = None) -> KVBucket:
        """The bucket of ``kind``, created (replicated like the streams) if missing.

        Idempotent and safe when gateways race to create it. With ``ttl_s`` its values
        expire that long after their last write. Raises BrokerUnavailable.
        """
        ...


# -- AuditSink -------------------------------------------------------------------------------


class AuditSink(Protocol):
    """Each tenant's audit stream: security events, appended and read back in order."""

    @property
    def connected(self) -> bool:
        """True while the store can be reached (failures then count as refusals)."""
        ...

    async def append(self, tenant: str, type_: str, event_id: str, body: bytes) -> int:
        """Store one event (JSON ``body``, its ``"tenant"`` being ``tenant``) in the
        tenant's audit stream, creating the stream if missing; returns its seq, strictly
        increasing per tenant. At-least-once into the store, and dedupe by ``event_id``:
        appending the same id again within the duplicate window stores nothing. Raises
        BrokerUnavailable when it was not acknowledged (append again: stored once).
        """
        ...

    async def read(
        self,
        tenant: str,
        since: datetime | None = None,
        types: Iterable[str] = (),
        limit: int = 1000,
    ) -> tuple[list[dict[str, Any]], bool]:
        """The tenant's events stored at or after ``since`` (None: all kept), of ``types``
        (none given: all), oldest first, at most ``limit``; ``more`` is True when the limit
        cut the result. Only this tenant's stream is read; an unknown tenant has no events.
        Raises BrokerUnavailable."""
        ...


# -- ClusterView -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NatsNode:
    """One NATS server of the cluster, as it introduced itself (empty when it did not answer)."""

    url: str  # host:port of its client listener
    name: str
    version: str
    cluster: str
    jetstream: bool
    connected: bool  # the server this connection uses
    reachable: bool  # it answered within the timeout


class ClusterView(Protocol):
    """Who is in the mesh: each gateway's last heartbeat, and the NATS servers.

    Guarantees:

    * **Last heartbeat per node.** :meth:`gateways` returns, for each node, only the
      heartbeat of its latest :meth:`announce`, and reflects every announce that returned
      before the call.
    * **Bounded staleness.** A heartbeat is returned for ``ttl_s`` after its announce and
      then leaves the view (within the store's expiry delay, well under a second), so a
      node that dies without a word drops out ``ttl_s`` after its last announce. Every
      gateway of a mesh must use the same ``ttl_s``: the store keeps one per mesh.
    * **Withdraw is immediate.** After :meth:`withdraw` the node is not returned, until it
      announces again.
    * **Also live.** Each heartbeat is a message on the node's system subject
      (``shared.subjects.SubjectScheme.gateway_heartbeat``) that anyone may subscribe to.
    """

    async def announce(self, node: str, heartbeat: bytes, ttl_s: float) -> None:
        """Publish ``heartbeat`` as ``node``'s latest. Raises BrokerUnavailable."""
        ...

    async def withdraw(self, node: str) -> None:
        """Remove ``node``'s heartbeat now (a gateway that drains). Raises BrokerUnavailable."""
        ...

    async def gateways(self) -> list[bytes]:
        """The latest heartbeat of every node announced within its ``ttl_s``, ordered by
        node. Raises BrokerUnavailable."""
        ...

    def connected_server(self) -> tuple[str, str]:
        """The name and host:port of the NATS server this connection uses ("" when none)."""
        ...

    async def nats_servers(self, timeout: float = 1.0) -> list[NatsNode]:
        """Every NATS server of the cluster this connection knows of (configured, connected
        to, or gossiped by the cluster), ordered by url, each asked who it is for up to
        ``timeout`` s (``reachable`` False when it did not answer). Never raises."""
        ...


# -- PresenceStore ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PresenceEntry:
    """One session's presence in one channel (a principal with two sessions has two)."""

    principal: str
    session: str
    gateway: str  # the node token (shared.subjects.node_token) of the session's gateway
    joined_at: float  # Unix seconds
    state: str  # "online" or "idle" (shared/presence.py); absent means offline
    metadata: bytes  # a JSON object, validated by the gateway before it is stored
    updated_at: float  # Unix seconds


@dataclass(frozen=True, slots=True)
class PresenceChange:
    """One change of a channel's presence. ``entry`` None: the session left the channel."""

    position: int  # the store's position of the change: strictly increasing per store
    principal: str
    session: str
    gateway: str
    entry: PresenceEntry | None


class PresenceWatch(Protocol):
    """One channel's presence: first its current entries, then ``None`` once, then changes.

    The initial part holds every present session once (as a change with an entry), in
    position order: a session changed while it is read appears once, as it is now, and one
    removed meanwhile not at all. After the ``None`` marker, each later put or removal
    arrives in the order the store applied it, with increasing positions (a removal may
    name a session that was not present: ``remove`` of an absent entry is a change too).
    :meth:`stop` ends the iteration.
    """

    def __aiter__(self) -> AsyncIterator[PresenceChange | None]: ...

    async def stop(self) -> None:
        """Stop watching. Never raises."""
        ...


class PresenceStore(Protocol):
    """Who is present in each channel, the same on every gateway, and each gateway's lease.

    Guarantees:

    * **One entry per session and channel**, keyed by (tenant, room, channel, principal,
      gateway, session): ``put`` replaces it, ``remove`` deletes it. Positions are strictly
      increasing per store, so per channel, in the order the store applied the changes.
      Lease positions are a sequence of their own (compare them only with each other).
    * **Keys are names.** Every token (tenant, room, channel, principal, gateway, session)
      must be a valid name (:func:`shared.subjects.is_valid_name`), else InvalidKey and
      nothing is stored or read. ``metadata`` must be a JSON object, else InvalidInput; it
      is returned in orjson's compact encoding (byte-equal when it was put so encoded).
    * **Watch is exact.** :meth:`watch` of a channel yields every entry present when it
      starts and then every change of that channel and no other (no other tenant's).
    * **Leases.** A gateway renews its lease while alive; :meth:`leases` returns each
      gateway's lease with the position of its last renewal, so a reader that sees no new
      position for a while knows the gateway stopped renewing (no shared clock needed).
      :meth:`remove_gateway` removes every entry of a gateway (every tenant) and its lease;
      removals are seen by watches like any other. It is idempotent and safe to run from
      several gateways at once: each entry is removed (and counted) once in all.
    * **Replicated.** The entries live in the store with the streams' replica count: a NATS
      node lost loses none.

    Every method raises BrokerUnavailable when the store did not answer.
    """

    async def put(self, ref: ChannelRef, entry: PresenceEntry) -> int:
        """Store the session's entry in ``ref``'s channel; returns its position."""
        ...

    async def remove(self, ref: ChannelRef, principal: str, gateway: str, session: str) -> None:
        """Remove the session's entry (removing an absent one is not an error)."""
        ...

    async def entries(self, ref: ChannelRef) -> list[PresenceEntry]:
        """A snapshot of the channel's entries, sorted by (principal, gateway, session)."""
        ...

    async def watch(self, ref: ChannelRef) -> PresenceWatch:
        """Watch the channel (see :class:`PresenceWatch`); in place when this returns."""
        ...

    async def renew_lease(self, gateway: str, after: int | None = None) -> int:
        """Renew ``gateway``'s lease now; returns the renewal's position. With ``after``
        (the position of the gateway's own previous renewal) the renewal is conditional:
        RevisionMismatch, and nothing written, when another removed or renewed the lease
        since. Decided by the store's leader, unlike :meth:`leases`, which may read a
        replica that lags."""
        ...

    async def leases(self) -> dict[str, int]:
        """Every gateway's lease: gateway -> position of its latest renewal."""
        ...

    async def remove_gateway(self, gateway: str) -> int:
        """Remove every entry of ``gateway`` (in every tenant) and then its lease; returns
        how many entries this call removed. An entry changed by a put after the call began
        may be kept (so a gateway can clear its previous run's entries at start-up)."""
        ...

    async def remove_room(self, tenant: str, room: str) -> int:
        """Remove every entry of every channel of ``tenant``'s ``room`` (other rooms and
        tenants keep theirs); returns how many this call removed (concurrent calls count
        each entry once in all). An entry changed by a put after the call began may be kept."""
        ...
