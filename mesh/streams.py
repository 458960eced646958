"""Stream provisioning: one stream per tenant, created on first use, idempotent."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

from nats.errors import NoRespondersError
from nats.js import JetStreamManager
from nats.js.api import DiscardPolicy, Placement, RePublish, StorageType, StreamConfig
from nats.js.errors import APIError, NotFoundError

from arqonbus_server.shared.subjects import SubjectScheme

log = logging.getLogger("arqonbus.mesh.streams")

# JetStream API error codes.
_ALREADY_EXISTS = 10058
_NO_PLACEMENT = {10005, 10023}  # no suitable peers / insufficient resources: often transient
_REPLICAS_UNSUPPORTED = 10074  # a single server without clustering
_PLACEMENT_RETRIES = 8
_LISTEN_PROBES = 12
# A stream that another gateway is creating may not answer STREAM.INFO until its group
# has elected a leader: ask again, briefly, rather than wait out one long timeout.
_LOOKUP_TIMEOUT_S = 1.0
_LOOKUPS = 5


@dataclass(frozen=True, slots=True)
class StreamPolicy:
    max_age_s: float = 86400.0
    dedupe_window_s: float = 120.0
    replicas: int = 0  # 0 = min(3, cluster size)
    # Stored bytes per tenant (ARQONBUS_TENANT_MAX_BYTES); -1 = unlimited. A full stream
    # refuses new events (discard NEW): the publisher gets quota_exceeded, history stays.
    max_bytes: int = -1

    @property
    def discard(self) -> DiscardPolicy:
        return DiscardPolicy.NEW if self.max_bytes > 0 else DiscardPolicy.OLD


def tenant_stream_config(
    scheme: SubjectScheme,
    tenant: str,
    policy: StreamPolicy,
    replicas: int,
    placement: Placement | None = None,
) -> StreamConfig:
    """The stream of one tenant: stores ``P.ev.<tenant>.>``, republishes to ``P.live...``.

    ``placement`` pins it to a cluster (a region of a supercluster, mesh/regions.py); without
    it JetStream places the stream in the cluster of whoever creates it.
    """
    return StreamConfig(
        name=scheme.stream_name(tenant),
        description=f"ArqonBus events of tenant {tenant}",
        subjects=[scheme.tenant_ingest_filter(tenant)],
        storage=StorageType.FILE,
        num_replicas=replicas,
        max_age=policy.max_age_s,
        max_bytes=policy.max_bytes,
        duplicate_window=policy.dedupe_window_s,
        discard=policy.discard,
        allow_direct=True,
        # Per-message TTLs (the ``Nats-TTL`` header, nats-server 2.11+): a room's own
        # retention. Once on it cannot be turned off (the server refuses), so it always is.
        allow_msg_ttl=True,
        # Atomic batch publishing (nats-server 2.12+): the gateway batches what is in flight
        # to one stream (mesh/ingest.py).
        allow_atomic=True,
        placement=placement,
        republish=RePublish(
            src=scheme.tenant_ingest_filter(tenant), dest=scheme.tenant_live_filter(tenant)
        ),
    )


def choose_replicas(policy: StreamPolicy, cluster_size: int) -> int:
    """The configured count, or min(3, cluster size) when it is 0 (auto)."""
    return policy.replicas or max(1, min(3, cluster_size))


class StreamProvisioner:
    """Makes sure a tenant's stream exists. Safe to call from many gateways at once."""

    def __init__(
        self,
        jsm: JetStreamManager,
        scheme: SubjectScheme,
        policy: StreamPolicy,
        cluster_size: Callable[[], int],
        placement_cluster: Callable[[], str | None] | None = None,
    ) -> None:
        self._jsm = jsm
        # The NATS cluster new streams go to (the gateway's region), asked at each create.
        self._placement_cluster = placement_cluster
        self._cluster_size = cluster_size
        self._scheme = scheme
        self._policy = policy
        self._known: set[str] = set()
        self._ttl_streams: set[str] = set()  # streams seen with per-message TTLs on
        self._locks: dict[str, asyncio.Lock] = {}
        # A tenant's own stored-bytes quota (gateway/state/tenant_limits.py; 0 = unlimited),
        # else the policy's max_bytes for every tenant.
        self.max_bytes_for: Callable[[str], int] | None = None
        # Tenants with a placement record: their streams belong to the ops tools.
        self.is_placed: Callable[[str], bool] | None = None

    def policy_for(self, tenant: str) -> StreamPolicy:
        if self.max_bytes_for is None:
            return self._policy
        max_bytes = self.max_bytes_for(tenant)
        return replace(self._policy, max_bytes=max_bytes if max_bytes > 0 else -1)

    async def apply_quota(self, tenant: str, stream: str | None = None) -> bool:
        """Bring an existing stream's max_bytes to the tenant's quota now (idempotent).

        Called on every gateway when a tenant's limits change; a stream that does not exist
        yet gets the quota when it is created. ``stream``: the stream that stores the
        tenant's events now (a placed tenant's current primary); default, its own stream.
        True if the stream exists."""
        name = stream or self._scheme.stream_name(tenant)
        try:
            info = await asyncio.wait_for(self._jsm.stream_info(name), _LOOKUP_TIMEOUT_S * 5)
        except NotFoundError:
            return False
        await self._reconcile(info.config, self.policy_for(tenant))
        return True

    def forget(self, tenant: str) -> None:
        self._known.discard(tenant)

    def forget_ttl(self, stream: str) -> None:
        """Look at ``stream``'s TTL setting again on the next :meth:`allow_msg_ttl`."""
        self._ttl_streams.discard(stream)

    def known(self, tenant: str) -> bool:
        """:meth:`ensure` would return -1 at once."""
        return tenant in self._known or (self.is_placed is not None and self.is_placed(tenant))

    async def ensure(self, tenant: str) -> int:
        """Create the tenant's stream if missing; return its replica count.

        A placed tenant's stream is never created here (-1): ``arqonbus mesh provision``
        places it and its mirrors; until then its publishes fail, retryably."""
        if self.known(tenant):
            return -1
        lock = self._locks.setdefault(tenant, asyncio.Lock())
        async with lock:
            if tenant in self._known:  # provisioned while we waited for the lock
                return -1
            replicas = await self._ensure_locked(tenant)
            await self._wait_listening(tenant)
            self._known.add(tenant)
            return replicas

    async def _wait_listening(self, tenant: str) -> None:
        """Wait until the stream answers on this connection's server.

        A stream that was just created can take a moment before every server routes its
        subjects; publishes sent meanwhile would get "no responders", retry one by one
        and could be stored out of send order. The probe expects a stream name that
        never matches, so JetStream answers with an error and stores nothing.
        """
        nc = self._jsm._nc
        subject = self._scheme.probe(tenant)
        headers = {"Nats-Expected-Stream": "arqonbus-probe-never-matches"}
        delay = 0.02
        for _ in range(_LISTEN_PROBES):
            try:
                await nc.request(subject, b"", timeout=1.0, headers=headers)
                return
            except (NoRespondersError, TimeoutError):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
        log.warning("stream of %s still does not answer on this server; publishing anyway", tenant)

    async def _ensure_locked(self, tenant: str) -> int:
        existing = await self._existing_replicas(tenant)
        if existing is not None:
            return existing
        try:
            return await self._create(tenant)
        except TimeoutError:
            # Two gateways creating one stream at once can leave one request unanswered
            # (the other one won); look again before giving up.
            for delay in (0.1, 0.3, 1.0):
                await asyncio.sleep(delay)
                existing = await self._existing_replicas(tenant)
                if existing is not None:
                    return existing
            raise

    async def _existing_replicas(self, tenant: str) -> int | None:
        name = self._scheme.stream_name(tenant)
        for attempt in range(_LOOKUPS):
            try:
                info = await asyncio.wait_for(self._jsm.stream_info(name), _LOOKUP_TIMEOUT_S)
            except NotFoundError:
                return None
            except TimeoutError:
                if attempt == _LOOKUPS - 1:
                    raise
                log.info("stream %s did not answer yet; asking again", name)
                continue
            await self._reconcile(info.config, self.policy_for(tenant))
            return info.config.num_replicas or 1
        raise AssertionError("unreachable")

    async def allow_atomic(self, stream: str) -> bool:
        """Turn atomic batch publishing on for an existing stream (one made before it was
        used). Idempotent. False when the stream does not exist."""
        return await self._turn_on(stream, "allow_atomic", "atomic batch publishing")

    async def allow_msg_ttl(self, stream: str) -> bool:
        """Turn per-message TTLs on for an existing stream (one made before they were used).

        Idempotent and cached per stream name, so a placed tenant's new primary (after a
        failover) is looked at once too. False when the stream does not exist."""
        if stream in self._ttl_streams:
            return True
        if not await self._turn_on(stream, "allow_msg_ttl", "per-message TTLs"):
            return False
        self._ttl_streams.add(stream)
        return True

    async def _turn_on(self, stream: str, flag: str, what: str) -> bool:
        try:
            info = await asyncio.wait_for(self._jsm.stream_info(stream), _LOOKUP_TIMEOUT_S * 5)
        except NotFoundError:
            return False
        if not getattr(info.config, flag):
            setattr(info.config, flag, True)
            await self._jsm.update_stream(info.config)
            log.info("stream %s: %s turned on", stream, what)
        return True

    async def _reconcile(self, config: StreamConfig, policy: StreamPolicy) -> None:
        """Bring an existing stream to the policy: max_bytes and its discard policy, and
        per-message TTLs on (a stream made by an earlier version has them off).

        Only these fields change, so a stream created by another version keeps the rest of
        its configuration, in one update. Lowering max_bytes below what is already stored
        may make JetStream remove the oldest events to fit; raising it or turning it off
        loses nothing. Turning TTLs on changes no stored event.
        """
        want_bytes = policy.max_bytes if policy.max_bytes > 0 else -1
        have_bytes = config.max_bytes if config.max_bytes is not None else -1
        quota_ok = have_bytes == want_bytes and config.discard == policy.discard
        if quota_ok and config.allow_msg_ttl and config.allow_atomic:
            self._ttl_streams.add(config.name or "")
            return
        config.max_bytes = want_bytes
        config.discard = policy.discard
        config.allow_msg_ttl = True
        config.allow_atomic = True
        await self._jsm.update_stream(config)
        self._ttl_streams.add(config.name or "")
        log.info(
            "stream %s: max_bytes %s -> %s, discard %s, per-message TTLs and atomic batches on",
            config.name,
            have_bytes,
            want_bytes,
            config.discard.value if config.discard else "old",
        )

    async def _create(self, tenant: str) -> int:
        replicas = choose_replicas(self._policy, self._cluster_size())
        policy = self.policy_for(tenant)
        delay = 0.1
        cluster = self._placement_cluster() if self._placement_cluster is not None else None
        for attempt in range(_PLACEMENT_RETRIES):
            config = tenant_stream_config(
                self._scheme,
                tenant,
                policy,
                replicas,
                placement=Placement(cluster=cluster) if cluster else None,
            )
            try:
                await self._jsm.add_stream(config)
                log.info("created stream %s with %d replica(s)", config.name, replicas)
                return replicas
            except APIError as exc:
                if exc.err_code == _ALREADY_EXISTS:  # another gateway won the race
                    return replicas
                if exc.err_code == _REPLICAS_UNSUPPORTED and replicas > 1:
                    replicas = 1
                    continue
                if exc.err_code not in _NO_PLACEMENT or attempt == _PLACEMENT_RETRIES - 1:
                    raise
                # A cluster that just (re)started may not see its peers yet.
                log.info("stream %s: no placement yet (%s); retrying", config.name, exc.description)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")
