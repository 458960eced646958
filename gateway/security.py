"""The gateway's security state: KV buckets shared by every gateway, and the audit log.

One :class:`SecurityState` per gateway. It opens the buckets of :mod:`mesh.kv` once
NATS is up and keeps watched copies of them, so that checks on the handshake and
message paths answer from memory and a change made anywhere (a key revoked, a member
banned) reaches every gateway within a watch round trip.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from arqonbus_server.gateway.policies import policy_for
from arqonbus_server.mesh import kv as kvmod
from arqonbus_server.mesh.kv import WatchedBucket
from arqonbus_server.shared.inspect import LayeredPolicy

if TYPE_CHECKING:
    from nats.js.kv import KeyValue

    from arqonbus_server.mesh.jetstream import JetStreamBroker

log = logging.getLogger("arqonbus.gateway.security")

# How long a handshake waits for the first load of a bucket before answering 503.
READY_WAIT_S = 5.0


class SecurityState:
    def __init__(self, broker: JetStreamBroker, prefix: str, policy_file: str = "") -> None:
        self.broker = broker
        self.prefix = prefix
        self.keys = self._watched(kvmod.KEYS)
        self.agents = self._watched(kvmod.AGENTS)
        self.rooms = self._watched(kvmod.ROOMS)
        self.policies = self._watched(kvmod.POLICIES)
        # Per-tenant limit overrides (gateway/tenant_limits.py): plans without a restart.
        self.tenants = self._watched(kvmod.TENANTS)
        # Content policies: a tenant's rules in KV replace the policy file's for it.
        self.content_policy = LayeredPolicy(policy_for(policy_file), self.policies.get)
        self._nonces: KeyValue | None = None
        self._started = False

    def _watched(self, kind: str) -> WatchedBucket:
        name = kvmod.bucket_name(self.prefix, kind)
        return WatchedBucket(name, lambda: self.broker.key_value(name))

    @property
    def watched(self) -> tuple[WatchedBucket, ...]:
        return (self.keys, self.agents, self.rooms, self.policies, self.tenants)

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

    async def nonces(self) -> KeyValue:
        """The nonce bucket (entries expire after NONCE_TTL_S); not watched."""
        if self._nonces is None:
            self._nonces = await self.broker.key_value(
                kvmod.bucket_name(self.prefix, kvmod.NONCES), ttl_s=kvmod.NONCE_TTL_S
            )
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
