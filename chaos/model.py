"""A stateful model of ArqonBus's delivery promise, checked against a real mesh.

The promise: every subscriber's delivered sequence is, at all times, a prefix of its
channel's acknowledged sequence (the events with ``seq`` above the point it started from):
in seq order, no gap, no duplicate, nothing that was not published. Once the mesh settles it
is the whole sequence.

:class:`Mesh` is the real system, started once per run: a 3-node :class:`LocalCluster`
(R3 streams) and gateway child processes, all driven by one asyncio loop in a background
thread. :class:`BusMachine` is a hypothesis ``RuleBasedStateMachine`` whose rules subscribe,
publish, drop connections, resume, and kill gateways and NATS nodes; each example uses a
fresh tenant, so examples never see each other's events.

What the model allows, from the SDK's contract (clients/python/arqonbus/client.py):

* ``publish`` returns an :class:`Ack` once the store has the event, after resending it
  with the same id across reconnects; ``duplicate=True`` carries the original seq. So an
  acked event has exactly one seq, and a new (non-duplicate) ack's seq is above every seq
  the tenant's stream had when the publish started (publishes here never overlap).
* A publish that raised (timeout, store unavailable past its budget) has an unknown
  outcome. Its event may be stored, at one seq, and delivered there, once. Publishing
  again with the same id (as the SDK tells the application to) acks it with that seq
  (``duplicate=True``) or stores it now; then it is acked like any other event.
* A subscription hands each stored event with ``seq`` above its start once, in order:
  the start is ``since_seq`` when given, else the channel's ``last_seq`` at the join.

Presence rides on the same mesh and faults (:class:`chaos.presence_model.PresenceRules`):
connections of a few principals enter and leave channels' presence and set their state;
after the expiry bound every gateway lists exactly the live members, no ghost of a killed
gateway. The gateways run with ``ARQONBUS_PRESENCE_LEASE_S=0.5`` for that (expiry ~3 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import nats
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from nats.js.api import StreamConfig
from nats.js.errors import BadRequestError, NotFoundError

from arqonbus import ArqonBusError, Client, Gap
from arqonbus_server.mesh.local import LocalCluster
from chaos.presence_model import PRESENCE_LEASE_S, PresenceRules
from tests.support import GatewayProcess

log = logging.getLogger("arqonbus.chaos.model")

_T = TypeVar("_T")

ROOM = "sm"
_PROBE = "STATEMACHINE-NODE-CURRENT"
CHANNELS = ("c0", "c1")
MAX_SUBSCRIBERS = 4
MAX_PUBLISHERS = 3
# Bounds of the waits; generous because the machine has 2 cores shared with other runs.
RULE_TIMEOUT = 120.0
SETTLE_TIMEOUT = 45.0
REQUEST_TIMEOUT = 20.0
# A join waits out a stream leader election after a node kill (NATS raft: up to ~9 s, plus
# the gateway's own 5 s timeout per attempt that reached the old leader).
JOIN_TIMEOUT = 60.0
CONNECT_TIMEOUT = 20.0
RESOLVE_ATTEMPTS = 4
# The machine's gateways: a short presence lease (chaos/presence_model.py), so a killed
# gateway's members expire in about 3 s instead of about 12 s.
GATEWAY_ENV = {"ARQONBUS_PRESENCE_LEASE_S": str(PRESENCE_LEASE_S)}


class ModelViolation(AssertionError):
    """The mesh did something the model does not allow."""


# -- the real system ------------------------------------------------------------------------


@dataclass
class Stats:
    """What a run did, for reports."""

    examples: int = 0
    steps: int = 0
    rules: dict[str, int] = field(default_factory=dict)
    gateway_kills: int = 0
    node_kills: int = 0
    disconnects: int = 0
    publishes: int = 0
    unknown_outcomes: int = 0
    duplicate_acks: int = 0
    events_checked: int = 0
    subscribers: int = 0
    presence_sessions: int = 0
    presence_checks: int = 0  # presence settles that agreed with the model on every gateway
    presence_members_checked: int = 0
    presence_multi_gateway_members: int = 0  # checked members with sessions on 2+ gateways
    presence_ghosts_seen: int = 0  # settles that first saw a dead session still listed
    presence_settled_after_kill_max_s: float = 0.0

    def count(self, rule_name: str) -> None:
        self.steps += 1
        self.rules[rule_name] = self.rules.get(rule_name, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "examples": self.examples,
            "steps": self.steps,
            "rules": dict(sorted(self.rules.items())),
            "gateway_kills": self.gateway_kills,
            "node_kills": self.node_kills,
            "disconnects": self.disconnects,
            "publishes": self.publishes,
            "unknown_outcomes": self.unknown_outcomes,
            "duplicate_acks": self.duplicate_acks,
            "events_checked": self.events_checked,
            "subscribers": self.subscribers,
            "presence_sessions": self.presence_sessions,
            "presence_checks": self.presence_checks,
            "presence_members_checked": self.presence_members_checked,
            "presence_multi_gateway_members": self.presence_multi_gateway_members,
            "presence_ghosts_seen": self.presence_ghosts_seen,
            "presence_settled_after_kill_max_s": self.presence_settled_after_kill_max_s,
        }


class Mesh:
    """A 3-node JetStream cluster and gateway processes, run by a loop in its own thread.

    Everything asynchronous (cluster, gateways, SDK clients) lives on that loop; the
    synchronous state machine submits coroutines with :meth:`run`.
    """

    def __init__(self, base_dir: Path, gateways: int = 3) -> None:
        if gateways < 2:
            raise ValueError("the mesh needs at least 2 gateways")
        self.base_dir = base_dir
        self.gateway_count = gateways
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="mesh-loop", daemon=True)
        self.cluster: LocalCluster | None = None
        self.gateways: list[GatewayProcess] = []
        self.down_node: int | None = None
        self.last_gateway_kill = float("-inf")  # time.monotonic() of the last SIGKILL
        self.last_node_kill = float("-inf")  # time.monotonic() of the last NATS node SIGKILL
        self.stats = Stats()
        self.gateway_logs: list[str] = []  # stderr tails of killed gateways
        self.failures: list[dict[str, Any]] = []  # what the mesh looked like at each failure

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float = RULE_TIMEOUT) -> _T:
        """Run ``coro`` on the mesh's loop and return its result (or raise its error)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise ModelViolation(f"a step did not finish within {timeout:g}s") from None

    # -- lifecycle

    def start(self) -> None:
        self._thread.start()
        try:
            self.run(self._start(), timeout=180)
        except BaseException:
            self.stop()
            raise

    async def _start(self) -> None:
        self.cluster = LocalCluster(self.base_dir / "nats", nodes=3)
        await self.cluster.start(timeout=90)
        procs = [
            GatewayProcess(self.cluster.url_csv, env=GATEWAY_ENV) for _ in range(self.gateway_count)
        ]
        self.gateways = procs
        await asyncio.gather(*(p.start(timeout=60) for p in procs))

    def stop(self) -> None:
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                self.run(self._stop(), timeout=120)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)
        if not self.loop.is_running():
            self.loop.close()

    async def _stop(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.gateways), return_exceptions=True)
        if self.cluster is not None:
            await self.cluster.stop()

    # -- views

    @property
    def urls(self) -> list[str]:
        return [p.url for p in self.gateways]

    def urls_from(self, index: int) -> list[str]:
        """Every gateway URL, starting with gateway ``index`` (the client prefers it)."""
        urls = self.urls
        i = index % len(urls)
        return urls[i:] + urls[:i]

    @property
    def nats_urls(self) -> str:
        assert self.cluster is not None
        return self.cluster.url_csv

    # -- faults

    async def kill_gateway(self, index: int) -> None:
        """SIGKILL one gateway process, then start a replacement on the same port.

        The others keep serving meanwhile, and every client's URL list stays valid.
        """
        old = self.gateways[index]
        old.signal(signal.SIGKILL)
        self.last_gateway_kill = time.monotonic()
        await old.wait_exit(30)
        tail = await old.stderr()
        await old.stop()  # reaped already: only closes its log file
        self.gateway_logs = [*self.gateway_logs[-3:], tail]
        new = GatewayProcess(self.nats_urls, port=old.port, env=GATEWAY_ENV)
        self.gateways[index] = new
        await new.start(timeout=60)
        self.stats.gateway_kills += 1

    async def kill_node(self, index: int) -> None:
        assert self.cluster is not None
        if self.down_node is not None:
            raise RuntimeError("a node is down already: R3 would lose its quorum")
        await self.cluster.kill_node(index, signal.SIGKILL)
        self.last_node_kill = time.monotonic()
        self.down_node = index
        self.stats.node_kills += 1

    async def restart_node(self) -> None:
        assert self.cluster is not None
        if self.down_node is None:
            return
        index = self.down_node
        await self.cluster.start_node(index, wait_ready=True, timeout=60)
        await self._wait_node_current(index, timeout=60)
        self.down_node = None

    async def _wait_node_current(self, index: int, timeout: float) -> None:
        """Return once node ``index`` is a current replica of a new R3 stream and of every
        stream that exists. Until then it does not count towards a quorum, so another kill
        could stall a stream: LocalCluster.start_node's readiness (an R3 stream can be placed,
        checked through another node) does not prove it."""
        assert self.cluster is not None
        url = self.cluster.urls[index]
        nc = await nats.connect(servers=[url], allow_reconnect=False, connect_timeout=5)
        try:
            jsm = nc.jsm()
            with contextlib.suppress(NotFoundError):
                await jsm.delete_stream(_PROBE)
            config = StreamConfig(name=_PROBE, subjects=["_statemachine.probe"], num_replicas=3)
            last = "not checked yet"
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        with contextlib.suppress(BadRequestError):  # exists already
                            await jsm.add_stream(config)
                        infos = await jsm.streams_info()
                        short = [
                            f"{i.config.name} (R{i.config.num_replicas})"
                            for i in infos
                            if (i.config.num_replicas or 1) < 3
                        ]
                        if short:
                            # docs/operations.md (stream_replicas) promises a new stream is never created with fewer
                            # replicas because a node is down.
                            raise ModelViolation(
                                f"tenant streams with fewer than 3 replicas on a 3-node "
                                f"cluster: {short}"
                            )
                        behind = [
                            info.config.name
                            for info in infos
                            if info.cluster is None
                            or info.cluster.leader is None
                            or len(info.cluster.replicas or []) < 2
                            or not all(
                                p.current and not p.offline for p in info.cluster.replicas or []
                            )
                        ]
                        if not behind:
                            break
                        last = f"not current yet: {behind[:5]}"
                    except (TimeoutError, nats.errors.Error) as exc:
                        last = repr(exc)
                    # A replica's state has no event to wait on; poll it, bounded by the timeout.
                    await asyncio.sleep(0.2)
            with contextlib.suppress(NotFoundError):
                await jsm.delete_stream(_PROBE)
        except TimeoutError:
            raise ModelViolation(
                f"node {index} restarted but is not a current replica within {timeout:g}s ({last})"
            ) from None
        finally:
            await nc.close()

    def note_failure(self, machine: BusMachine, exc: BaseException) -> None:
        """Keep the evidence of a failed step: the error, the model, the gateways' logs."""
        if len(self.failures) >= 3:
            return
        try:
            logs = self.run(self.gateway_stderr(), timeout=30)
        except Exception as log_exc:
            logs = [f"(logs unavailable: {log_exc!r})"]
        self.failures.append(
            {
                "error": f"{type(exc).__name__}: {exc}",
                "tenant": machine.tenant,
                "model": machine.describe(),
                "gateway_logs": logs,
            }
        )

    async def gateway_stderr(self) -> list[str]:
        tails = list(self.gateway_logs)
        for proc in self.gateways:
            tails.append(await proc.stderr())
        return tails


# -- the model ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Published:
    """A publish the machine made: who, where, what."""

    id: str
    channel: str
    principal: str
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Delivered:
    seq: int
    id: str
    from_: str
    payload: dict[str, Any]


@dataclass
class ChannelModel:
    """One channel's acknowledged sequence, and the publishes whose outcome is unknown."""

    acked: dict[int, str] = field(default_factory=dict)  # seq -> id
    seq_of: dict[str, int] = field(default_factory=dict)  # id -> seq (acked)
    unknown: set[str] = field(default_factory=set)  # ids whose publish raised
    seen_unknown: dict[str, int] = field(default_factory=dict)  # unknown id -> delivered seq

    def sequence(self, after: int) -> list[tuple[int, str]]:
        """The channel's known sequence above ``after``: acked events and unknown-outcome
        events that some subscriber has been handed (at the seq it was handed at)."""
        known = dict(self.acked)
        for msg_id, seq in self.seen_unknown.items():
            known[seq] = msg_id
        return sorted((seq, msg_id) for seq, msg_id in known.items() if seq > after)

    @property
    def last_acked(self) -> int:
        return max(self.acked, default=0)


@dataclass
class Publisher:
    name: str
    client: Client


@dataclass
class Subscriber:
    """One logical subscriber: its delivered sequence continues across explicit resumes."""

    name: str
    channel: str
    start: int
    client: Client
    delivered: list[Delivered] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    incarnations: int = 1

    @property
    def last_seq(self) -> int:
        return self.delivered[-1].seq if self.delivered else self.start


class BusMachine(PresenceRules, RuleBasedStateMachine):
    """Subscribers, publishers and faults on a real mesh, checked against the model; and
    presence (chaos/presence_model.py) on the same mesh and faults."""

    mesh: ClassVar[Mesh | None] = None
    # Faults per example: a node kill can stall the stream for a leader election (seconds).
    max_gateway_kills: ClassVar[int] = 2
    max_node_kills: ClassVar[int] = 1

    def __init__(self) -> None:
        super().__init__()
        mesh = type(self).mesh
        if mesh is None:
            raise RuntimeError("set BusMachine.mesh to a started Mesh before running the machine")
        self.m = mesh
        self.m.stats.examples += 1
        self.tenant = "sm" + uuid.uuid4().hex[:12]
        self.channels = {name: ChannelModel() for name in CHANNELS}
        self.published: dict[str, Published] = {}
        self.publishers: list[Publisher] = []
        self.subscribers: list[Subscriber] = []
        self.max_seq = 0  # the highest seq the tenant's stream is known to hold
        self.failed = False
        self._counter = 0
        self.gateway_kills = 0
        self.node_kills = 0
        self.dirty = False  # something happened since the last settle
        # Kept here, not read from the mesh, so preconditions depend on this example only.
        self.node_down = False
        if self.m.down_node is not None:
            raise RuntimeError("the previous example left a node down")
        self._presence_init()

    # -- plumbing

    def _do(self, coro: Coroutine[Any, Any, _T], timeout: float = RULE_TIMEOUT) -> _T:
        try:
            return self.m.run(coro, timeout)
        except BaseException as exc:
            self.failed = True
            self.m.note_failure(self, exc)
            raise

    def _next(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}{self._counter}"

    def _client(self, gateway: int, principal: str) -> Client:
        return Client(
            self.m.urls_from(gateway),
            f"dev:{self.tenant}:{principal}",
            connect_timeout=CONNECT_TIMEOUT,
            request_timeout=REQUEST_TIMEOUT,
            max_backoff=0.5,
        )

    def _note_seq(self, seq: int) -> None:
        self.max_seq = max(self.max_seq, seq)

    # -- rules

    @initialize(gateway=st.integers(0, 7), channel=st.sampled_from(CHANNELS))
    def first_publisher(self, gateway: int, channel: str) -> None:
        """Every example starts with a publisher, a subscriber and one published event."""
        self.m.stats.count("first_publisher")
        self._do(self._add_publisher(gateway))
        self._do(self._subscribe(channel, gateway + 1, "zero", 0))
        self._do(self._publish(self.publishers[0], channel, None, None))

    @precondition(lambda self: len(self.publishers) < MAX_PUBLISHERS)
    @rule(gateway=st.integers(0, 7))
    def add_publisher(self, gateway: int) -> None:
        self.m.stats.count("add_publisher")
        self._do(self._add_publisher(gateway))

    async def _add_publisher(self, gateway: int) -> None:
        name = self._next("pub")
        client = self._client(gateway, name)
        await client.connect()
        self.publishers.append(Publisher(name, client))

    @precondition(lambda self: len(self.subscribers) < MAX_SUBSCRIBERS)
    @rule(
        channel=st.sampled_from(CHANNELS),
        gateway=st.integers(0, 7),
        since=st.sampled_from(["live", "zero", "some", "last", "beyond"]),
        pick=st.integers(0, 63),
    )
    def subscribe(self, channel: str, gateway: int, since: str, pick: int) -> None:
        self.m.stats.count("subscribe")
        self._do(self._subscribe(channel, gateway, since, pick))

    async def _subscribe(self, channel: str, gateway: int, since: str, pick: int) -> None:
        model = self.channels[channel]
        seqs = sorted(model.acked)
        since_seq: int | None
        if since == "live":
            since_seq = None
        elif since == "zero":
            since_seq = 0
        elif since == "some":
            since_seq = seqs[pick % len(seqs)] if seqs else 0
        elif since == "last":
            since_seq = model.last_acked
        else:  # beyond: past everything stored; only later events come
            since_seq = self.max_seq + 1 + pick % 3
        name = self._next("sub")
        client = self._client(gateway, name)
        await client.connect()
        sub = client.subscribe(ROOM, channel, since_seq=since_seq)
        await sub.start(timeout=JOIN_TIMEOUT)
        start = sub.last_seq
        if start is None:
            raise ModelViolation(f"{name}: the join succeeded but gave no position")
        if since_seq is None and start < model.last_acked:
            raise ModelViolation(
                f"{name}: the join of {channel} says last_seq={start}, but seq "
                f"{model.last_acked} of this channel was acked before the join"
            )
        if since_seq is not None and start != since_seq:
            raise ModelViolation(f"{name}: asked since_seq={since_seq}, got last_seq={start}")
        state = Subscriber(name, channel, start, client)
        state.task = asyncio.create_task(self._consume(state, sub))
        self.subscribers.append(state)
        self.m.stats.subscribers += 1

    async def _consume(self, state: Subscriber, sub: Any) -> None:
        try:
            async for item in sub:
                if isinstance(item, Gap):
                    state.errors.append(f"unexpected gap: {item!r} (nothing is ever expired)")
                else:
                    state.delivered.append(Delivered(item.seq, item.id, item.from_, item.payload))
                state.changed.set()
        except ArqonBusError as exc:
            state.errors.append(f"the subscription failed: {exc!r}")
        finally:
            state.changed.set()

    @rule(
        pub=st.integers(0, 7),
        channel=st.sampled_from(CHANNELS),
        count=st.integers(1, 8),
        drop=st.one_of(st.none(), st.tuples(st.integers(0, 7), st.integers(0, 3))),
        patience=st.sampled_from([None, None, 0.3, 2.0]),
    )
    def publish(
        self,
        pub: int,
        channel: str,
        count: int,
        drop: tuple[int, int] | None,
        patience: float | None,
    ) -> None:
        """Publish ``count`` events one after the other, each awaiting its ack. With
        ``drop = (i, turns)`` the publisher's connection is cut during the i-th publish,
        after ``turns`` loop turns (before, while or after its frame goes out). With
        ``patience`` each publish gives up after that many seconds (its outcome is then
        unknown); otherwise it waits for its ack."""
        self.m.stats.count("publish" if drop is None else "publish_with_drop")
        publisher = self.publishers[pub % len(self.publishers)]
        for i in range(count):
            drop_after = drop[1] if drop is not None and drop[0] % count == i else None
            self._do(self._publish(publisher, channel, drop_after, patience))

    async def _publish(
        self, publisher: Publisher, channel: str, drop_after: int | None, patience: float | None
    ) -> None:
        self.dirty = True
        msg_id = uuid.uuid4().hex
        payload = {"n": len(self.published), "by": publisher.name, "ch": channel}
        self.published[msg_id] = Published(msg_id, channel, publisher.name, payload)
        task = asyncio.create_task(
            publisher.client.publish(ROOM, channel, payload, id=msg_id, timeout=patience)
        )
        if drop_after is not None:
            for _ in range(drop_after):
                await asyncio.sleep(0)  # one loop turn, not a timed wait
            self._drop(publisher.client)
        self.m.stats.publishes += 1
        try:
            ack = await task
        except ArqonBusError as exc:
            log.warning("publish %s: outcome unknown (%r)", msg_id, exc)
            self.channels[channel].unknown.add(msg_id)
            self.m.stats.unknown_outcomes += 1
            return
        self._record_ack(channel, msg_id, ack.seq, ack.duplicate, fresh=True)

    @rule(
        pub=st.integers(0, 7),
        channel=st.sampled_from(CHANNELS),
        count=st.integers(1, 6),
        drop_after=st.one_of(st.none(), st.integers(0, 3)),
        patience=st.sampled_from([None, None, 0.3, 2.0]),
    )
    def publish_batch(
        self,
        pub: int,
        channel: str,
        count: int,
        drop_after: int | None,
        patience: float | None,
    ) -> None:
        """Publish ``count`` events in one events frame (``publish_many``), awaiting its ack;
        ``drop_after`` and ``patience`` as for :meth:`publish`. Acked, each event is checked
        as a single one would be, in the list's order (so their seqs must increase)."""
        self.m.stats.count("publish_batch" if drop_after is None else "publish_batch_with_drop")
        publisher = self.publishers[pub % len(self.publishers)]
        self._do(self._publish_batch(publisher, channel, count, drop_after, patience))

    async def _publish_batch(
        self,
        publisher: Publisher,
        channel: str,
        count: int,
        drop_after: int | None,
        patience: float | None,
    ) -> None:
        self.dirty = True
        ids = [uuid.uuid4().hex for _ in range(count)]
        payloads = []
        for msg_id in ids:
            payload = {"n": len(self.published), "by": publisher.name, "ch": channel}
            self.published[msg_id] = Published(msg_id, channel, publisher.name, payload)
            payloads.append(payload)
        task = asyncio.create_task(
            publisher.client.publish_many(ROOM, channel, payloads, ids, timeout=patience)
        )
        if drop_after is not None:
            for _ in range(drop_after):
                await asyncio.sleep(0)  # one loop turn, not a timed wait
            self._drop(publisher.client)
        self.m.stats.publishes += count
        try:
            acks = await task
        except ArqonBusError as exc:
            log.warning("batch %s..: outcome unknown (%r)", ids[0], exc)
            self.channels[channel].unknown.update(ids)
            self.m.stats.unknown_outcomes += count
            return
        if [ack.request_id for ack in acks] != ids:
            raise ModelViolation(f"the acks of a batch name {acks}, not its ids {ids}")
        for ack in acks:
            self._record_ack(channel, ack.request_id, ack.seq, ack.duplicate, fresh=True)

    def _record_ack(
        self, channel: str, msg_id: str, seq: int, duplicate: bool, fresh: bool
    ) -> None:
        model = self.channels[channel]
        if seq <= 0:
            raise ModelViolation(f"ack of {msg_id} has no seq ({seq})")
        if duplicate:
            self.m.stats.duplicate_acks += 1
        if fresh and not duplicate and seq <= self.max_seq:
            raise ModelViolation(
                f"ack of new event {msg_id} in {channel} has seq {seq}, but the stream already "
                f"held seq {self.max_seq} when it was published"
            )
        for name, other in self.channels.items():
            owner = other.acked.get(seq)
            if owner is not None and owner != msg_id:
                raise ModelViolation(
                    f"ack of {msg_id} in {channel} has seq {seq}, already acked for {owner} in {name}"
                )
            seen = [i for i, s in other.seen_unknown.items() if s == seq and i != msg_id]
            if seen:
                raise ModelViolation(
                    f"ack of {msg_id} in {channel} has seq {seq}, where {seen[0]} was delivered"
                )
        before = model.seq_of.get(msg_id)
        if before is not None and before != seq:
            raise ModelViolation(f"{msg_id} acked twice with different seqs: {before} and {seq}")
        delivered_at = model.seen_unknown.pop(msg_id, None)
        if delivered_at is not None and delivered_at != seq:
            raise ModelViolation(
                f"{msg_id} (outcome unknown) was delivered at seq {delivered_at} but acked "
                f"at seq {seq} when published again"
            )
        if delivered_at is not None and not duplicate:
            raise ModelViolation(
                f"{msg_id} was delivered at seq {seq}, yet publishing it again with the "
                "same id was not acked as a duplicate"
            )
        model.unknown.discard(msg_id)
        model.acked[seq] = msg_id
        model.seq_of[msg_id] = seq
        self._note_seq(seq)

    async def _resolve_unknown(self) -> None:
        """Publish every unknown-outcome event again with its id, as the SDK says to."""
        for channel, model in self.channels.items():
            for msg_id in sorted(model.unknown):
                record = self.published[msg_id]
                publisher = next(p for p in self.publishers if p.name == record.principal)
                for attempt in range(RESOLVE_ATTEMPTS):
                    try:
                        ack = await publisher.client.publish(
                            ROOM, channel, record.payload, id=msg_id
                        )
                    except ArqonBusError as exc:
                        if attempt == RESOLVE_ATTEMPTS - 1:
                            raise ModelViolation(
                                f"publishing {msg_id} again failed {RESOLVE_ATTEMPTS} times on "
                                f"a healthy mesh: {exc!r}"
                            ) from exc
                        continue
                    self._record_ack(channel, msg_id, ack.seq, ack.duplicate, fresh=False)
                    break

    @rule(subscriber=st.booleans(), pick=st.integers(0, 7))
    def disconnect(self, subscriber: bool, pick: int) -> None:
        """Cut a client's TCP connection abruptly; the SDK reconnects and resumes."""
        self.m.stats.count("disconnect")
        self.dirty = True
        live = [s for s in self.subscribers if s.task is not None and not s.task.done()]
        if subscriber and live:
            client = live[pick % len(live)].client
        else:
            client = self.publishers[pick % len(self.publishers)].client
        self._do(self._drop_async(client))

    async def _drop_async(self, client: Client) -> None:
        self._drop(client)

    def _drop(self, client: Client) -> None:
        # The SDK has no "fail the network" switch; aborting its transport is what a reset
        # TCP connection does.
        conn = client._conn
        if conn is not None:
            conn.transport.abort()
            self.m.stats.disconnects += 1

    @precondition(lambda self: bool(self.subscribers))
    @rule(pick=st.integers(0, 7), gateway=st.integers(0, 7))
    def resume(self, pick: int, gateway: int) -> None:
        """Close a subscriber's client, then subscribe again with since_seq = the last seq
        it was handed, through a new client (maybe on another gateway)."""
        self.m.stats.count("resume")
        self.dirty = True
        self._do(self._resume(self.subscribers[pick % len(self.subscribers)], gateway))

    async def _resume(self, state: Subscriber, gateway: int) -> None:
        await state.client.close()
        if state.task is not None:
            await asyncio.wait_for(state.task, 30)
        since = state.last_seq
        client = self._client(gateway, f"{state.name}r{state.incarnations}")
        state.incarnations += 1
        state.client = client
        await client.connect()
        sub = client.subscribe(ROOM, state.channel, since_seq=since)
        await sub.start(timeout=JOIN_TIMEOUT)
        state.task = asyncio.create_task(self._consume(state, sub))

    @precondition(lambda self: self.gateway_kills < self.max_gateway_kills)
    @rule(gateway=st.integers(0, 7))
    def kill_gateway(self, gateway: int) -> None:
        """kill -9 one gateway process and start a replacement on its port."""
        self.m.stats.count("kill_gateway")
        self.gateway_kills += 1
        self.dirty = True
        self._do(self.m.kill_gateway(gateway % len(self.m.gateways)))

    @precondition(lambda self: not self.node_down and self.node_kills < self.max_node_kills)
    @rule(node=st.integers(0, 2))
    def kill_node(self, node: int) -> None:
        """kill -9 one NATS node (the other two keep the R3 quorum)."""
        self.m.stats.count("kill_node")
        self.node_kills += 1
        self.node_down = True
        self.dirty = True
        self._do(self.m.kill_node(node))

    @precondition(lambda self: self.node_down)
    @rule()
    def restart_node(self) -> None:
        self.m.stats.count("restart_node")
        self.node_down = False
        self._do(self.m.restart_node())

    @precondition(lambda self: self.dirty and bool(self.subscribers))
    @rule(resolve=st.booleans())
    def settle(self, resolve: bool) -> None:
        """Wait until every live subscriber has everything acked so far, then compare. With
        ``resolve``, publish each unknown-outcome event again with its id first."""
        self.m.stats.count("settle")
        self.dirty = False
        self._do(self._settle(resolve=resolve))

    async def _settle(self, resolve: bool) -> None:
        if resolve:
            await self._resolve_unknown()
        self._check_all()
        for state in self.subscribers:
            await self._wait_caught_up(state)
        self._check_all(complete=True)

    async def _wait_caught_up(self, state: Subscriber) -> None:
        model = self.channels[state.channel]
        expected = model.sequence(state.start)
        target = expected[-1][0] if expected else state.start
        try:
            async with asyncio.timeout(SETTLE_TIMEOUT):
                while state.last_seq < target and not state.errors:
                    if state.task is None or state.task.done():
                        break
                    state.changed.clear()
                    await state.changed.wait()
        except TimeoutError:
            raise ModelViolation(
                f"{state.name} on {state.channel}: handed up to seq {state.last_seq} "
                f"({len(state.delivered)} events), the last acked is {target}; nothing more "
                f"came within {SETTLE_TIMEOUT:g}s (client connected={state.client.connected}, "
                f"url={state.client.url})"
            ) from None

    def describe(self) -> dict[str, Any]:
        """The model's state, for a failure report."""
        return {
            "channels": {
                name: {
                    "acked": sorted(ch.acked),
                    "unknown": sorted(ch.unknown),
                    "seen_unknown": ch.seen_unknown,
                }
                for name, ch in self.channels.items()
            },
            "subscribers": [
                {
                    "name": s.name,
                    "channel": s.channel,
                    "start": s.start,
                    "delivered": [d.seq for d in s.delivered],
                    "errors": s.errors,
                    "connected": s.client.connected,
                    "url": s.client.url,
                }
                for s in self.subscribers
            ],
            "down_node": self.m.down_node,
            "presence": self._describe_presence(),
        }

    # -- the property

    @invariant()
    def delivered_is_prefix_of_acked(self) -> None:
        if not self.failed:
            self._do(self._check_all_async())

    async def _check_all_async(self) -> None:
        self._check_all()

    def _check_all(self, complete: bool = False) -> None:
        for state in self.subscribers:
            self._check(state, complete)

    def _check(self, state: Subscriber, complete: bool) -> None:
        """``state.delivered`` is a prefix of the channel's sequence above its start (the
        whole of it with ``complete``). Runs on the loop, so no delivery interleaves."""
        if state.errors:
            raise ModelViolation(f"{state.name}: {state.errors[0]}")
        model = self.channels[state.channel]
        where = f"{state.name} on {state.channel} (start {state.start})"
        for d in state.delivered:
            record = self.published.get(d.id)
            if record is None or record.channel != state.channel:
                raise ModelViolation(f"{where}: handed seq {d.seq} id {d.id!r}, never published")
            if d.from_ != record.principal or d.payload != record.payload:
                raise ModelViolation(
                    f"{where}: seq {d.seq} id {d.id} came as from={d.from_!r} payload="
                    f"{d.payload!r}; published by {record.principal!r} with {record.payload!r}"
                )
            acked_at = model.seq_of.get(d.id)
            if acked_at is not None:
                if acked_at != d.seq:
                    raise ModelViolation(
                        f"{where}: handed {d.id} at seq {d.seq}, but it was acked at seq {acked_at}"
                    )
            elif d.id in model.unknown:
                seen = model.seen_unknown.setdefault(d.id, d.seq)
                if seen != d.seq:
                    raise ModelViolation(
                        f"{where}: handed {d.id} (outcome unknown) at seq {d.seq}; another "
                        f"subscriber was handed it at seq {seen}: stored twice"
                    )
                owner = model.acked.get(d.seq)
                if owner is not None:
                    raise ModelViolation(
                        f"{where}: handed {d.id} at seq {d.seq}, acked for {owner}"
                    )
                self._note_seq(d.seq)
            else:
                raise ModelViolation(
                    f"{where}: handed {d.id} at seq {d.seq}, but its publish is neither acked "
                    "nor of unknown outcome (it was never sent)"
                )
        got = [(d.seq, d.id) for d in state.delivered]
        want = model.sequence(state.start)
        ok = got == want if complete else got == want[: len(got)]
        if not ok:
            raise ModelViolation(
                f"{where}: handed {_describe_seqs(got)}, but the channel's sequence is "
                f"{_describe_seqs(want)}" + (" (settled: must be equal)" if complete else "")
            )

    # -- end of an example

    def teardown(self) -> None:
        try:
            if not self.failed:
                self._do(self.m.restart_node())
                self._do(self._settle(resolve=True))
                self._do(self._presence_settle())
                self.m.stats.events_checked += sum(len(s.delivered) for s in self.subscribers)
        finally:
            with contextlib.suppress(Exception):
                self.m.run(self._close_all(), timeout=60)
            if self.m.down_node is not None:
                self.m.run(self.m.restart_node())

    async def _close_all(self) -> None:
        clients = [s.client for s in self.subscribers] + [p.client for p in self.publishers]
        clients += self._presence_clients()
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        tasks = [s.task for s in self.subscribers if s.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)


def _describe_seqs(items: list[tuple[int, str]]) -> str:
    seqs = [seq for seq, _ in items]
    if len(seqs) > 40:
        return f"{len(seqs)} events {seqs[:20]} ... {seqs[-20:]}"
    return f"{len(seqs)} events {seqs}"
