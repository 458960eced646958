"""The JetStream side of regions: provision a mesh file's streams, fail a tenant over, fail back.

Pure decisions (what the file asks for, the plan, the placement records) live in
shared/regions.py; this module reads what exists, applies the plan and runs the promotions,
printing every step through ``say``. It needs nats-server 2.12+ (mirror promotion).

Every tenant stream is pinned to its region with ``placement.cluster``. Mirrors are created with
``mirror_direct: false`` and ``allow_direct: true``: every stream is read by its own name. A
``mirror_direct`` mirror also answers direct gets sent to the *primary's* name, from its own
store, and keeps answering after it falls behind: a sequence it has not copied yet answers 404
or an empty batch, which a reader cannot tell from "no more events". Reading a mirror by its
own name makes the reader choose it knowingly (and check its last seq first).

The placement record of each tenant is kept in every region: the KV bucket
``<prefix>_placement-<region>`` is placed in its region, and that region's gateways watch it,
so losing a region loses no other region's records. The tools write every copy that answers and
read the newest (highest epoch) of those that answer; ``mesh provision`` rewrites the copies
of a region that missed a change while it was down. Each stream of the tenant that the tools
create or promote also carries the record in its ``metadata`` (key
:data:`PLACEMENT_METADATA`), for an operator reading a stream by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js import JetStreamContext, JetStreamManager
from nats.js.api import DiscardPolicy, StorageType, StreamConfig, StreamInfo, StreamSource
from nats.js.api import Placement as NatsPlacement
from nats.js.errors import APIError, NotFoundError

from arqonbus_server.mesh.jetstream import JetStreamBroker
from arqonbus_server.mesh.ports import MeshError
from arqonbus_server.mesh.streams import StreamPolicy, tenant_stream_config
from arqonbus_server.shared.regions import (
    Change,
    MeshFile,
    Placement,
    StreamAt,
    StreamSpec,
    desired_streams,
    initial_placement,
    newest,
    placement_kind,
    plan_changes,
    promoted,
    returned_home,
)
from arqonbus_server.shared.subjects import SubjectScheme

Say = Callable[[str], None]
PLACEMENT_METADATA = "arqonbus_placement"
API_TIMEOUT_S = 5.0
HEALTH_TIMEOUT_S = 2.0  # a primary that does not answer stream info within this is unreachable
CATCH_UP_TIMEOUT_S = 120.0
META_WAIT_S = 30.0  # how long the tools wait for the meta group (an election) before failing
_POLL_S = 0.1


class RegionsRefused(MeshError, RuntimeError):
    """The operation would be unsafe or cannot run now; the message says why and what to do."""


def _policy(spec: StreamSpec) -> StreamPolicy:
    return StreamPolicy(
        max_age_s=spec.max_age_s,
        dedupe_window_s=spec.dedupe_window_s,
        replicas=spec.replicas,
        max_bytes=spec.max_bytes,
    )


def stream_config(scheme: SubjectScheme, spec: StreamSpec) -> StreamConfig:
    """The JetStream config of one primary or mirror stream, pinned to its region."""
    config = tenant_stream_config(
        scheme, spec.tenant, _policy(spec), spec.replicas, NatsPlacement(cluster=spec.region)
    )
    if spec.mirror_of is None:
        return config
    # mirror_direct false: see the module docstring (a lagging mirror's 404 would read as "no
    # more events" to whoever asked the primary's name). allow_direct: reads by its own name.
    # No subjects and no RePublish: a mirror captures nothing, and republishing from it would
    # deliver every live event twice.
    return replace(
        config,
        name=spec.name,
        description=f"ArqonBus events of tenant {spec.tenant}, mirrored in {spec.region}",
        subjects=None,
        republish=None,
        mirror=StreamSource(name=spec.mirror_of),
        mirror_direct=False,
        allow_direct=True,
        allow_atomic=False,  # the server refuses it on a mirror (10198); nothing publishes to one
    )


def spec_from_info(info: StreamInfo, tenant: str) -> StreamSpec:
    """What a stream is, in the terms of the mesh file."""
    config = info.config
    region = (info.cluster.name if info.cluster else None) or (
        config.placement.cluster if config.placement else None
    )
    return StreamSpec(
        name=config.name or "",
        tenant=tenant,
        region=region or "",
        replicas=config.num_replicas or 1,
        max_age_s=config.max_age or 0.0,
        max_bytes=config.max_bytes if config.max_bytes is not None else -1,
        mirror_of=config.mirror.name if config.mirror else None,
        dedupe_window_s=config.duplicate_window or 0.0,
    )


@dataclass(slots=True)
class RegionOps:
    """The region operations over one NATS connection (any region's servers will do: the
    JetStream API of a supercluster answers from everywhere while the meta group has quorum)."""

    nc: Client
    scheme: SubjectScheme
    say: Say = print

    @classmethod
    def of(cls, broker: JetStreamBroker, say: Say = print) -> RegionOps:
        return cls(broker.nats_connection(), broker.scheme, say)

    @property
    def jsm(self) -> JetStreamManager:
        return self.nc.jsm(timeout=API_TIMEOUT_S)

    @property
    def js(self) -> JetStreamContext:
        return self.nc.jetstream(timeout=API_TIMEOUT_S)

    # -- reading

    async def info(self, name: str, timeout: float = API_TIMEOUT_S) -> StreamInfo | None:
        """The stream's info; None if it does not exist. Raises TimeoutError if unanswered."""
        try:
            return await asyncio.wait_for(self.jsm.stream_info(name), timeout)
        except NotFoundError:
            return None

    async def actual_streams(self, mesh: MeshFile) -> dict[str, StreamSpec]:
        """The file's tenants' streams that exist (by name), as StreamSpecs."""
        found: dict[str, StreamSpec] = {}
        for want in desired_streams(mesh):
            try:
                info = await self.info(want.name)
            except TimeoutError:
                raise RegionsRefused(
                    f"stream {want.name} (region {want.region}) does not answer: is the region "
                    "down? After a region loss use `arqonbus mesh failover`."
                ) from None
            if info is not None:
                found[want.name] = spec_from_info(info, want.tenant)
        return found

    async def plan(self, mesh: MeshFile) -> list[Change]:
        placements = {t.name: p for t in mesh.tenants if (p := await self.placement(t.name))}
        return plan_changes(desired_streams(mesh), await self.actual_streams(mesh), placements)

    # -- provisioning

    async def provision(self, mesh: MeshFile, force: bool = False) -> list[Change]:
        """Apply the plan: create and update streams; a refused change only with ``force``.
        Writes the initial placement of every tenant that has none. Returns the plan."""
        changes = await self.plan(mesh)
        refused = [c for c in changes if c.action == "refuse"]
        if refused and not force:
            raise RegionsRefused(
                "not applied: "
                + "; ".join(f"{c.stream.name}: {c.why}" for c in refused)
                + ". Fix the file, or pass --force to accept the loss."
            )
        await self._ensure_placement_buckets(mesh)
        for change in changes:
            if change.action != "nothing":
                await self._apply(
                    change, initial_placement(mesh, mesh.tenant(change.stream.tenant))
                )
            else:
                await self._allow_msg_ttl(change.stream)
        for tenant in mesh.tenants:
            current = await self.placement(tenant.name)
            if current is None:
                await self._record(initial_placement(mesh, tenant))
                continue
            # Every region's copy holds the newest record (a region that was down missed the
            # failover's): write it again where it differs.
            stale = [
                region
                for region in await self._copies()
                if await _quietly(self._read_copy(region, tenant.name)) != current
            ]
            if stale:
                self.say(f"refreshing the placement of {tenant.name} in {', '.join(stale)}")
                await self._record(current)
        return changes

    async def _apply(self, change: Change, placement: Placement) -> None:
        spec = change.stream
        config = stream_config(self.scheme, spec)
        config.metadata = {PLACEMENT_METADATA: placement.to_json().decode()}
        if change.action == "create":
            await self.jsm.add_stream(config)
            self.say(f"created {spec.role} {spec.name} in {spec.region}")
            return
        info = await self.info(spec.name)
        assert info is not None  # the plan saw it
        have = spec_from_info(info, spec.tenant)
        if have.mirror_of != spec.mirror_of or have.region != spec.region:
            # Only with --force: a stream cannot become a mirror in place, nor move regions.
            await self._delete(spec.name)
            await self.jsm.add_stream(config)
            self.say(f"recreated {spec.role} {spec.name} in {spec.region} (--force)")
            return
        current = info.config
        current.num_replicas = config.num_replicas
        current.max_age = config.max_age
        current.max_bytes = config.max_bytes
        current.discard = config.discard
        current.duplicate_window = config.duplicate_window
        current.allow_msg_ttl = True  # see _allow_msg_ttl
        await self.jsm.update_stream(current)
        self.say(f"updated {spec.role} {spec.name}: {change.why}")

    async def _allow_msg_ttl(self, spec: StreamSpec) -> None:
        """Turn per-message TTLs (rooms' retention) on for a stream made before they were
        used. A primary needs them to accept a TTL'd event; a mirror copies such events
        either way but removes them when their TTL runs out only with them on. They cannot
        be turned off again (nats-server refuses), and change no stored event."""
        info = await self.info(spec.name)
        if info is None or info.config.allow_msg_ttl:
            return
        info.config.allow_msg_ttl = True
        await self.jsm.update_stream(info.config)
        self.say(f"updated {spec.role} {spec.name}: per-message TTLs on")

    # -- placement records: one copy per region, each gateway watching its own region's

    def _bucket_of(self, region: str) -> str:
        return self.scheme.kv_bucket(placement_kind(region))

    async def _ensure_placement_buckets(self, mesh: MeshFile) -> None:
        for region in mesh.regions:
            await self._placement_bucket_in(region.name, min(3, len(region.nats)))

    async def _placement_bucket_in(self, region: str, replicas: int) -> None:
        """Region ``region``'s copy of the records, placed there. The KV stream is created
        with add_stream: nats-py's create_key_value drops a bucket's placement."""
        bucket = self._bucket_of(region)
        if await self.info(f"KV_{bucket}") is not None:
            return
        await self.jsm.add_stream(
            StreamConfig(
                name=f"KV_{bucket}",
                description=f"ArqonBus tenant placements, region {region}'s copy",
                subjects=[f"$KV.{bucket}.>"],
                allow_direct=True,
                allow_rollup_hdrs=True,
                deny_delete=True,
                discard=DiscardPolicy.NEW,
                duplicate_window=120.0,
                max_msgs_per_subject=10,
                num_replicas=replicas,
                storage=StorageType.FILE,
                placement=NatsPlacement(cluster=region),
            )
        )
        self.say(f"created the placement bucket {bucket} in {region} (R{replicas})")

    async def _copies(self) -> list[str]:
        """The regions that hold a copy of the records (from the meta group's stream list)."""
        prefix = f"KV_{self._bucket_of('x')[:-1]}"
        # STREAM.NAMES, not STREAM.LIST: the meta leader answers it alone, where a list asks
        # every stream's leader and times out while a region is down.
        names: list[str] = []
        for _ in range(1000):  # pages of up to 1024 names
            data = await self._meta_request(
                "$JS.API.STREAM.NAMES", {"offset": len(names)}, META_WAIT_S
            )
            if "error" in data:
                raise RegionsRefused(f"listing the streams failed: {data['error']}")
            page = data.get("streams") or []
            names += page
            if not page or len(names) >= int(data.get("total", 0)):
                break
        return sorted(name[len(prefix) :] for name in names if name.startswith(prefix))

    async def _meta_request(self, subject: str, body: object, wait: float) -> dict[str, Any]:
        """A JetStream API request that the meta leader answers, asked again for up to
        ``wait`` s: right after a region is lost the meta group may be electing a leader
        (its leader may have been there), and the API does not answer meanwhile."""
        loop = asyncio.get_running_loop()
        deadline, said = loop.time() + wait, False
        while True:
            try:
                reply = await self.nc.request(subject, json.dumps(body).encode(), API_TIMEOUT_S)
                data: dict[str, Any] = json.loads(reply.data)
            except (TimeoutError, NatsError):
                if loop.time() >= deadline:
                    raise
                if not said:
                    self.say("   JetStream's API does not answer yet (a meta election?); waiting")
                    said = True
                continue
            if data.get("error", {}).get("code") == 503 and loop.time() < deadline:
                await asyncio.sleep(_POLL_S * 5)  # no meta leader right now: bounded retry
                continue
            return data

    async def _read_copy(self, region: str, tenant: str) -> Placement | None:
        kv = await asyncio.wait_for(self.js.key_value(self._bucket_of(region)), HEALTH_TIMEOUT_S)
        try:
            entry = await asyncio.wait_for(kv.get(tenant), HEALTH_TIMEOUT_S)
        except NotFoundError:  # KeyNotFoundError and KeyDeletedError derive from it
            return None
        return Placement.from_json(entry.value) if entry.value else None

    async def placement(self, tenant: str) -> Placement | None:
        """The newest of the tenant's records across the regions' copies that answer (None:
        none yet). Raises RegionsRefused when no copy answers."""
        regions = await self._copies()
        if not regions:
            return None
        found = await asyncio.gather(
            *(self._read_copy(region, tenant) for region in regions), return_exceptions=True
        )
        answered = [f for f in found if not isinstance(f, BaseException)]
        if not answered:
            raise RegionsRefused(
                f"no region's placement bucket answers ({', '.join(regions)}): is JetStream up?"
            )
        return newest(p for p in answered if p is not None)

    async def write_placement(self, placement: Placement) -> list[str]:
        """Write ``placement`` into every region's copy that answers; return the regions whose
        copy could not be written (a region that is down: `mesh provision` or `failback`
        writes it when the region is back). Raises RegionsRefused if no copy took it."""
        regions = await self._copies()

        async def put(region: str) -> None:
            kv = await asyncio.wait_for(
                self.js.key_value(self._bucket_of(region)), HEALTH_TIMEOUT_S
            )
            await asyncio.wait_for(kv.put(placement.tenant, placement.to_json()), HEALTH_TIMEOUT_S)

        done = await asyncio.gather(*(put(r) for r in regions), return_exceptions=True)
        missed = [r for r, d in zip(regions, done, strict=True) if isinstance(d, BaseException)]
        if len(missed) == len(regions):
            raise RegionsRefused(
                f"no region's placement bucket took the record of {placement.tenant}"
            )
        return missed

    async def _read_placement(self, tenant: str) -> Placement:
        placement = await self.placement(tenant)
        if placement is None:
            raise RegionsRefused(
                f"tenant {tenant} has no placement record: run `arqonbus mesh provision FILE` first"
            )
        return placement

    async def _record(self, placement: Placement) -> None:
        """Write ``placement`` into every region's copy and say where it could not."""
        missed = await self.write_placement(placement)
        self.say(
            f"placement of {placement.tenant}: primary {placement.primary.stream} in "
            f"{placement.primary.region}, epoch {placement.epoch} from seq "
            f"{placement.epochs[-1].start_seq if placement.epochs else 1}"
        )
        if missed:
            self.say(
                f"   not written in {', '.join(missed)} (not answering): run `arqonbus mesh "
                "provision FILE` when it is back, before its gateways take traffic"
            )

    # -- stream steps

    async def primary_answers(self, name: str) -> bool:
        """True if the stream answers stream info with a leader within HEALTH_TIMEOUT_S."""
        try:
            info = await self.info(name, HEALTH_TIMEOUT_S)
        except (TimeoutError, NatsError):
            return False
        return info is not None and info.cluster is not None and bool(info.cluster.leader)

    async def _delete(self, name: str) -> None:
        """Delete a stream and confirm it is gone: a delete of a stream whose region is down
        is a meta-layer operation that can time out and still take effect."""
        # The meta leader often takes the delete at once but answers only when the stream's
        # own group does (never, while its region is down): ask briefly, then look it up.
        for attempt in range(8):
            with contextlib.suppress(TimeoutError, NotFoundError, APIError):
                await asyncio.wait_for(self.jsm.delete_stream(name), min(1.0 + attempt, 5.0))
            with contextlib.suppress(TimeoutError):
                if await self.info(name, HEALTH_TIMEOUT_S) is None:
                    return
        raise RegionsRefused(f"stream {name} could not be deleted: is JetStream's meta quorum up?")

    async def _promote(self, name: str, tenant: str, placement: Placement) -> None:
        """Turn mirror ``name`` into the tenant's primary (nats-server 2.12+): drop ``mirror``,
        capture the tenant's subjects, republish, keep ``mirror_direct`` off."""
        info = await self.info(name)
        if info is None:
            raise RegionsRefused(f"stream {name} does not exist")
        config = info.config
        base = tenant_stream_config(self.scheme, tenant, StreamPolicy(), 1)
        config.mirror = None
        config.mirror_direct = False
        config.subjects = base.subjects
        config.republish = base.republish
        config.allow_direct = True
        config.allow_msg_ttl = True  # a mirror made before TTLs were used
        config.metadata = {
            **(config.metadata or {}),
            PLACEMENT_METADATA: placement.to_json().decode(),
        }
        await self.jsm.update_stream(config)

    async def _mirror(self, at: StreamAt, of: StreamInfo, placement: Placement) -> None:
        """(Re)create ``at`` as a mirror of ``of``: a mirror's origin cannot be changed."""
        if await self.info(at.stream) is not None:
            await self._delete(at.stream)
        spec = replace(
            spec_from_info(of, placement.tenant),
            name=at.stream,
            region=at.region,
            mirror_of=of.config.name,
        )
        config = stream_config(self.scheme, spec)
        config.metadata = {PLACEMENT_METADATA: placement.to_json().decode()}
        await self.jsm.add_stream(config)

    async def _wait_last_seq(self, name: str, last_seq: int, timeout: float) -> bool:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            info = await self.info(name)
            have = info.state.last_seq if info else 0
            if have >= last_seq:
                return True
            if asyncio.get_running_loop().time() >= deadline:
                self.say(f"  {name} holds up to seq {have}, the primary {last_seq}")
                return False
            await asyncio.sleep(_POLL_S)

    # -- failover and failback

    async def failover(self, tenant: str, to_region: str, force: bool = False) -> Placement:
        """Promote the tenant's mirror in ``to_region`` after its primary's region is lost."""
        say = self.say
        placement = await self._read_placement(tenant)
        old = placement.primary
        target = next((m for m in placement.mirrors if m.region == to_region), None)
        if target is None:
            held = ", ".join(m.region for m in placement.mirrors) or "none"
            raise RegionsRefused(
                f"tenant {tenant} has no mirror in region {to_region!r} (mirrors: {held})"
            )
        say(f"1. checking that the primary {old.stream} ({old.region}) is unreachable")
        if await self.primary_answers(old.stream):
            if not force:
                raise RegionsRefused(
                    f"the primary {old.stream} in {old.region} answers: failing over a healthy "
                    "primary loses what its mirror has not copied yet. Use `arqonbus mesh "
                    "failback` for a planned move, or pass --force."
                )
            say("   it answers; going on (--force)")
        else:
            say("   it does not answer")
        info = await self.info(target.stream)
        if info is None:
            raise RegionsRefused(f"the mirror {target.stream} does not exist")
        last_seq = info.state.last_seq
        say(f"2. mirror {target.stream} ({to_region}) holds up to seq {last_seq}")
        # With acks: mirrored an event is acknowledged once ANY mirror holds it: promoting a
        # mirror that holds less than another would drop events that were acknowledged.
        for other in placement.mirrors:
            if other == target:
                continue
            try:
                seen = await self.info(other.stream, HEALTH_TIMEOUT_S)
            except (TimeoutError, NatsError):
                say(f"   mirror {other.stream} ({other.region}) does not answer")
                continue
            ahead = seen.state.last_seq if seen is not None else 0
            say(f"   mirror {other.stream} ({other.region}) holds up to seq {ahead}")
            if ahead > last_seq and not force:
                raise RegionsRefused(
                    f"mirror {other.stream} in {other.region} holds up to seq {ahead}, more than "
                    f"{target.stream} ({last_seq}): events {last_seq + 1}-{ahead} may have been "
                    f"acknowledged. Fail over to {other.region}, or pass --force to lose them."
                )
        new = promoted(placement, to_region, last_seq)
        say(f"3. deleting the old primary {old.stream} (meta layer only)")
        await self._delete(old.stream)
        await self._promote_and_remirror(new, step=4)
        return new

    async def failback(
        self, tenant: str, force: bool = False, timeout: float = CATCH_UP_TIMEOUT_S
    ) -> Placement:
        """Move the tenant's primary back to its home region, keeping names and seqs."""
        say = self.say
        placement = await self._read_placement(tenant)
        if placement.primary.region == placement.home:
            raise RegionsRefused(f"tenant {tenant} is in its home region {placement.home} already")
        current = placement.primary
        home = StreamAt(placement.home, self.scheme.stream_name(tenant))
        say(f"1. checking that the current primary {current.stream} ({current.region}) answers")
        if not await self.primary_answers(current.stream):
            raise RegionsRefused(
                f"the current primary {current.stream} does not answer: failback copies from "
                "it. Bring its region back first."
            )
        origin = await self.info(current.stream)
        assert origin is not None
        say(f"2. creating {home.stream} in {home.region} as a mirror of {current.stream}")
        await self._mirror(home, origin, placement)
        say(f"3. waiting for {home.stream} to catch up (seq {origin.state.last_seq})")
        if not await self._wait_last_seq(home.stream, origin.state.last_seq, timeout):
            raise RegionsRefused(f"{home.stream} did not catch up within {timeout:g}s; run again")
        say(f"4. fencing {current.stream}: it captures nothing now; publishes are retried")
        await self._fence(current.stream)
        fenced = await self.info(current.stream)
        assert fenced is not None
        last_seq = fenced.state.last_seq
        say(f"5. waiting for {home.stream} to hold seq {last_seq}")
        if not await self._wait_last_seq(home.stream, last_seq, timeout) and not force:
            raise RegionsRefused(
                f"{home.stream} did not reach seq {last_seq}; {current.stream} is fenced. Run "
                "failback again, or pass --force to promote it without the missing events."
            )
        new = returned_home(placement, home.stream, last_seq)
        await self._promote_and_remirror(new, step=6)
        return new

    async def _promote_and_remirror(self, new: Placement, step: int) -> None:
        """Promote ``new.primary``, recreate ``new.mirrors`` as its mirrors, record ``new``."""
        at, start = new.primary, new.epochs[-1].start_seq
        self.say(
            f"{step}. promoting {at.stream}: it captures {new.tenant}'s events from seq {start}"
        )
        await self._promote(at.stream, new.tenant, new)
        primary = await self.info(at.stream)
        assert primary is not None
        for mirror in new.mirrors:
            self.say(
                f"{step + 1}. recreating {mirror.stream} ({mirror.region}) as a mirror of {at.stream}"
            )
            await self._mirror(mirror, primary, new)
        self.say(f"{step + 2}. writing the placement record")
        await self._record(new)

    async def _fence(self, name: str) -> None:
        info = await self.info(name)
        assert info is not None
        config = info.config
        # A subject nothing publishes to: the gateways' publishes get "no responders" (which
        # they retry with the same id) until the home stream captures the subjects.
        config.subjects = [f"{self.scheme.prefix}.fenced.{name}"]
        config.republish = None
        config.mirror_direct = False
        await self.jsm.update_stream(config)


async def _quietly(read: Awaitable[Placement | None]) -> Placement | BaseException | None:
    """A copy's record, or the error reading it (a copy that does not answer is stale)."""
    try:
        return await read
    except Exception as exc:  # any failure: the copy cannot be trusted
        return exc
