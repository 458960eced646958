"""The :class:`mesh.ports.AuditSink` in JetStream: one audit stream per tenant.

Names come from :mod:`shared.subjects` (stream ``P-audit_<tenant>``, subjects
``P.audit.<tenant>.<type>``). Audit streams use file storage, the tenant streams' replica
count, a maximum age and a maximum size beyond which the oldest events go, and a duplicate
window (the event id is the ``Nats-Msg-Id``, so a retry after a lost ack is stored once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import nats.errors
import orjson
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    PubAck,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError

from arqonbus_server.mesh.ports import BrokerUnavailable
from arqonbus_server.mesh.streams import StreamPolicy, choose_replicas
from arqonbus_server.shared.subjects import SubjectScheme

if TYPE_CHECKING:
    from nats.js.client import JetStreamContext
    from nats.js.manager import JetStreamManager

    from arqonbus_server.mesh.jetstream import JetStreamBroker
    from arqonbus_server.shared.settings import Settings

log = logging.getLogger("arqonbus.mesh.audit")

DEFAULT_MAX_AGE_S = 90 * 86400.0
DEFAULT_MAX_BYTES = 1 << 30
DUPLICATE_WINDOW_S = 120.0
# JetStream API error codes.
_ALREADY_EXISTS = 10058
_REPLICAS_UNSUPPORTED = 10074
_READ_WAIT_S = 5.0
_NO_STREAM_ATTEMPTS = 8  # about 2.5 s in all, as the KV writes (mesh/kv.py)
_FAILURES = (nats.errors.Error, TimeoutError, OSError)  # nats-py's APIError included


def audit_stream_config(
    scheme: SubjectScheme, tenant: str, replicas: int, max_age_s: float, max_bytes: int
) -> StreamConfig:
    return StreamConfig(
        name=scheme.audit_stream(tenant),
        description=f"ArqonBus audit events of tenant {tenant}",
        subjects=[scheme.audit_filter(tenant)],
        storage=StorageType.FILE,
        num_replicas=replicas,
        max_age=max_age_s,
        max_bytes=max_bytes,
        discard=DiscardPolicy.OLD,
        duplicate_window=min(DUPLICATE_WINDOW_S, max_age_s),
        allow_direct=True,
    )


class JetStreamAuditSink:
    """Audit events in JetStream, on the connection of a :class:`JetStreamBroker`."""

    def __init__(
        self,
        broker: JetStreamBroker,
        *,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        max_bytes: int = DEFAULT_MAX_BYTES,
        replicas: int = 0,
        publish_timeout_s: float = 5.0,
    ) -> None:
        self._broker = broker
        self._scheme = broker.scheme
        self._max_age_s = max_age_s
        self._max_bytes = max_bytes
        self._replicas = replicas
        self._publish_timeout = publish_timeout_s
        self._known: set[str] = set()

    @classmethod
    def from_settings(cls, broker: JetStreamBroker, settings: Settings) -> JetStreamAuditSink:
        """A sink with the limits of ``settings`` (ARQONBUS_AUDIT_*)."""
        return cls(
            broker,
            max_age_s=settings.audit_max_age_s,
            max_bytes=settings.audit_max_bytes,
            replicas=settings.stream_replicas,
            publish_timeout_s=settings.publish_timeout_s,
        )

    @property
    def connected(self) -> bool:
        return self._broker.connected

    async def _publish(
        self, js: JetStreamContext, subject: str, tenant: str, event_id: str, body: bytes
    ) -> PubAck:
        """Publish, asked again while no stream answers: right after a stream is created, its
        subjects take a moment to reach every server, and a publish meets no responder and
        stores nothing. Sending it again is safe (the event id dedupes)."""
        delay = 0.02
        for attempt in range(_NO_STREAM_ATTEMPTS):
            try:
                return await js.publish(
                    subject,
                    body,
                    timeout=self._publish_timeout,
                    stream=self._scheme.audit_stream(tenant),
                    headers={"Nats-Msg-Id": event_id},
                )
            except NoStreamResponseError:
                if attempt == _NO_STREAM_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(delay)  # a bounded backoff, not a synchronization
                delay = min(delay * 2, 0.5)
        raise AssertionError("unreachable")

    async def append(self, tenant: str, type_: str, event_id: str, body: bytes) -> int:
        subject = self._scheme.audit(tenant, type_)
        try:
            _, js, jsm, _ = self._broker._require()
            await self._ensure_stream(jsm, tenant)
            ack = await self._publish(js, subject, tenant, event_id, body)
        except (NoStreamResponseError, APIError) as exc:
            self._known.discard(tenant)  # deleted meanwhile? look again next time
            raise BrokerUnavailable(f"audit event not stored: {exc}") from exc
        except _FAILURES as exc:
            raise BrokerUnavailable(f"audit event not stored: {type(exc).__name__}") from exc
        return int(ack.seq)

    async def _ensure_stream(self, jsm: JetStreamManager, tenant: str) -> None:
        """Create the tenant's audit stream if missing (idempotent; cached per tenant)."""
        if tenant in self._known:
            return
        name = self._scheme.audit_stream(tenant)
        try:
            info = await jsm.stream_info(name)
        except NotFoundError:
            info = None
        if info is not None:
            await self._update_limits(jsm, tenant, info.config)
        else:
            await self._create(jsm, tenant)
        self._known.add(tenant)

    async def _update_limits(self, jsm: JetStreamManager, tenant: str, existing: Any) -> None:
        if existing.max_age == self._max_age_s and existing.max_bytes == self._max_bytes:
            return
        config = audit_stream_config(
            self._scheme, tenant, existing.num_replicas or 1, self._max_age_s, self._max_bytes
        )
        try:
            await jsm.update_stream(config)
            log.info("audit stream %s: limits updated", config.name)
        except APIError as exc:
            log.warning("audit stream %s: could not update its limits: %s", config.name, exc)

    async def _create(self, jsm: JetStreamManager, tenant: str) -> None:
        replicas = choose_replicas(
            StreamPolicy(replicas=self._replicas), self._broker.cluster_size()
        )
        while True:
            config = audit_stream_config(
                self._scheme, tenant, replicas, self._max_age_s, self._max_bytes
            )
            try:
                await jsm.add_stream(config)
                log.info("created audit stream %s with %d replica(s)", config.name, replicas)
            except APIError as exc:
                if exc.err_code == _REPLICAS_UNSUPPORTED and replicas > 1:
                    replicas = 1
                    continue
                if exc.err_code != _ALREADY_EXISTS:  # another gateway won the race: fine
                    raise
            return

    async def read(
        self,
        tenant: str,
        since: datetime | None = None,
        types: Iterable[str] = (),
        limit: int = 1000,
    ) -> tuple[list[dict[str, Any]], bool]:
        try:
            return await self._read(tenant, since, types, limit)
        except BrokerUnavailable:
            raise
        except _FAILURES as exc:
            raise BrokerUnavailable(f"reading the audit stream failed: {exc}") from exc

    async def _read(
        self, tenant: str, since: datetime | None, types: Iterable[str], limit: int
    ) -> tuple[list[dict[str, Any]], bool]:
        nc, js, jsm, _ = self._broker._require()
        name = self._scheme.audit_stream(tenant)
        wanted = sorted(set(types))
        filters = [self._scheme.audit(tenant, t) for t in wanted] or [
            self._scheme.audit_filter(tenant)
        ]
        config = ConsumerConfig(
            deliver_subject=nc.new_inbox(),
            deliver_policy=DeliverPolicy.BY_START_TIME if since else DeliverPolicy.ALL,
            opt_start_time=since,
            ack_policy=AckPolicy.NONE,
            max_deliver=1,
            flow_control=True,
            idle_heartbeat=_READ_WAIT_S,
            mem_storage=True,
            num_replicas=1,
            inactive_threshold=30.0,
        )
        if len(filters) == 1:
            config.filter_subject = filters[0]
        else:
            config.filter_subjects = filters
        # An R1 consumer may be placed on a replica that has not yet applied the newest
        # events, so its num_pending can fall short of what was acknowledged. Without
        # ``since``, the stream leader's count of the filtered subjects says how many to
        # read; with it, the consumer's count is all there is.
        try:
            expected = None if since else await _count(jsm, name, filters)
            if expected == 0:
                return [], False
            info = await jsm.add_consumer(name, config)
        except NotFoundError:
            return [], False
        if expected is None and not info.num_pending:
            with contextlib.suppress(Exception):
                await jsm.delete_consumer(name, info.name)
            return [], False
        sub = await js.subscribe_bind(name, config, info.name, ordered_consumer=True)
        events: list[dict[str, Any]] = []
        more = False
        seen = 0
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=_READ_WAIT_S)
                except nats.errors.TimeoutError:
                    raise BrokerUnavailable(
                        f"the audit stream {name} stopped answering; try again"
                    ) from None
                if len(events) >= limit:
                    more = True
                    break
                with contextlib.suppress(orjson.JSONDecodeError):
                    event = orjson.loads(msg.data)
                    if isinstance(event, dict) and event.get("tenant") == tenant:
                        events.append(event)
                seen += 1
                if (msg.metadata.num_pending == 0) if expected is None else seen >= expected:
                    break
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            with contextlib.suppress(Exception):
                await jsm.delete_consumer(name, info.name)
        return events, more


async def _count(jsm: JetStreamManager, stream: str, filters: list[str]) -> int:
    """How many stored events match ``filters``, as the stream leader counts them."""
    total = 0
    for subject_filter in filters:
        info = await jsm.stream_info(stream, subjects_filter=subject_filter)
        total += sum((info.state.subjects or {}).values())
    return total
