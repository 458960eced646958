"""The gateway's security state: KV buckets shared by every gateway, and the audit log.

One :class:`SecurityState` per gateway. It opens the buckets of the state store
(:class:`mesh.ports.StateStore`) once NATS is up and keeps watched copies of them, so that checks on the handshake and
message paths answer from memory and a change made anywhere (a key revoked, a member
banned) reaches every gateway within a watch round trip.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from arqonbus_server.gateway.policies import policy_for
from arqonbus_server.gateway.state.placement import placement_kind
from arqonbus_server.mesh.watched import WatchedBucket
from arqonbus_server.shared import subjects
from arqonbus_server.shared.inspect import LayeredPolicy

if TYPE_CHECKING:
    from arqonbus_server.mesh.ports import Broker, KVBucket, StateStore

log = logging.getLogger("arqonbus.gateway.security")

# How long a handshake waits for the first load of a bucket before answering 503.
READY_WAIT_S = 5.0
# Agent sign-in nonces expire this long after they are issued.
NONCE_TTL_S = 120.0


class SecurityState:
    def __init__(
        self,
        broker: Broker,
        state: StateStore,
        prefix: str,
        policy_file: str = "",
        region: str = "",
    ) -> None:
        self.broker = broker
        self.state = state
        self.prefix = prefix
        self.keys = self._watched(subjects.KV_KEYS)
        self.agents = self._watched(subjects.KV_AGENTS)
        self.rooms = self._watched(subjects.KV_ROOMS)
        self.policies = self._watched(subjects.KV_POLICIES)
        # Per-tenant limit overrides (gateway/state/tenant_limits.py): plans without a restart.
        self.tenants = self._watched(subjects.KV_TENANTS)
        # Content policies: a tenant's rules in KV replace the policy file's for it.
        self.content_policy = LayeredPolicy(policy_for(policy_file), self.policies.get)
        # The tenants' placements (gateway/state/placement.py): only with a region, from
        # that region's own copy.
        self.placement = self._watched(placement_kind(region)) if region else None
        self._nonces: KVBucket | None = None
        self._started = False

    def _watched(self, kind: str) -> WatchedBucket:
        name = subjects.kv_bucket_name(self.prefix, kind)
        return WatchedBucket(name, lambda: self.state.bucket(kind))

    @property
    def watched(self) -> tuple[WatchedBucket, ...]:
        placement = () if self.placement is None else (self.placement,)
        return (self.keys, self.agents, self.rooms, self.policies, self.tenants, *placement)

    def start(self) -> None:
        """Begin watching (call once NATS is connected); restarts after a reconnect."""
        if self._started:
            return
        self._started = True
        for bucket in self.watched:
            bucket.start()
        self.broker.on_reconnect(self._restart_watches)

    @property
    def loaded(self) -> bool:
        """Every watched bucket has loaded once: until then checks would fail open."""
        return all(bucket.ready.is_set() for bucket in self.watched)

    def restart(self) -> None:
        """Reload every watched bucket (changes missed meanwhile are reported)."""
        for bucket in self.watched:
            bucket.restart()

    async def _restart_watches(self) -> None:
        self.restart()

    async def nonces(self) -> KVBucket:
        """The nonce bucket (entries expire after NONCE_TTL_S); not watched."""
        if self._nonces is None:
            self._nonces = await self.state.bucket(subjects.KV_NONCES, ttl_s=NONCE_TTL_S)
        return self._nonces

    async def wait_ready(self, bucket: WatchedBucket, timeout: float = READY_WAIT_S) -> bool:
        """True once ``bucket`` has loaded; False after ``timeout`` (then answer 503)."""
        if bucket.ready.is_set():
            return True
        try:
            async with asyncio.timeout(timeout):
                await bucket.ready.wait()
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        for bucket in self.watched:
            await bucket.close()
