"""Stream provisioning: one stream per tenant, created on first use, idempotent."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from nats.js import JetStreamManager
from nats.js.api import DiscardPolicy, RePublish, StorageType, StreamConfig
from nats.js.errors import APIError, NotFoundError

from shared.subjects import SubjectScheme

log = logging.getLogger("arqonbus.mesh.streams")

# JetStream API error codes meaning "this replica count cannot be placed here".
_REPLICA_ERRORS = {10005, 10023, 10074}


@dataclass(frozen=True, slots=True)
class StreamPolicy:
    max_age_s: float = 86400.0
    dedupe_window_s: float = 120.0
    replicas: int = 0  # 0 = min(3, cluster size)
    max_bytes: int = -1


def tenant_stream_config(scheme: SubjectScheme, tenant: str, policy: StreamPolicy, replicas: int) -> StreamConfig:
    """The stream of one tenant: stores ``P.ev.<tenant>.>``, republishes to ``P.live...``."""
    return StreamConfig(
        name=scheme.stream_name(tenant),
        description=f"ArqonBus events of tenant {tenant}",
        subjects=[scheme.tenant_ingest_filter(tenant)],
        storage=StorageType.FILE,
        num_replicas=replicas,
        max_age=policy.max_age_s,
        max_bytes=policy.max_bytes,
        duplicate_window=policy.dedupe_window_s,
        discard=DiscardPolicy.OLD,
        allow_direct=True,
        republish=RePublish(
            src=scheme.tenant_ingest_filter(tenant), dest=scheme.tenant_live_filter(tenant)
        ),
    )


def _replica_candidates(policy: StreamPolicy) -> list[int]:
    if policy.replicas:
        return [policy.replicas]
    return [3, 2, 1]


class StreamProvisioner:
    """Makes sure a tenant's stream exists. Safe to call from many gateways at once."""

    def __init__(self, jsm: JetStreamManager, scheme: SubjectScheme, policy: StreamPolicy) -> None:
        self._jsm = jsm
        self._scheme = scheme
        self._policy = policy
        self._known: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}

    def forget(self, tenant: str) -> None:
        self._known.discard(tenant)

    async def ensure(self, tenant: str) -> int:
        """Create the tenant's stream if missing; return its replica count."""
        if tenant in self._known:
            return -1
        lock = self._locks.setdefault(tenant, asyncio.Lock())
        async with lock:
            replicas = await self._ensure_locked(tenant)
            self._known.add(tenant)
            return replicas

    async def _ensure_locked(self, tenant: str) -> int:
        name = self._scheme.stream_name(tenant)
        try:
            info = await self._jsm.stream_info(name)
            return info.config.num_replicas or 1
        except NotFoundError:
            pass
        return await self._create(tenant)

    async def _create(self, tenant: str) -> int:
        last_error: APIError | None = None
        for replicas in _replica_candidates(self._policy):
            config = tenant_stream_config(self._scheme, tenant, self._policy, replicas)
            try:
                await self._jsm.add_stream(config)
                log.info("created stream %s with %d replica(s)", config.name, replicas)
                return replicas
            except APIError as exc:
                if exc.err_code == 10058:  # already exists (another gateway won the race)
                    return replicas
                if exc.err_code not in _REPLICA_ERRORS:
                    raise
                last_error = exc
        assert last_error is not None
        raise last_error
