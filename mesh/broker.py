"""The Broker: what the gateway needs from the bus, and what it guarantees.

Guarantees of every implementation (checked by tests/integration/test_broker.py):

* **Store before ack.** ``publish`` returns only after the event is stored
  (replicated, per the stream's replica count). At-least-once into the store.
* **Dedupe by key.** Publishing the same ``dedupe_key`` again within the dedupe
  window stores nothing and returns the original seq with ``duplicate=True``.
* **Seq strictly increasing.** Seqs are stream sequences: strictly increasing
  per tenant, and so per channel, in store order.
* **Ordered live delivery with a continuity link.** ``subscribe_live`` delivers
  each stored event of the channel, in store order, with ``prev_seq``: the seq of
  the channel's previous stored event (0 if none or removed). A consumer whose
  last seen seq is below ``prev_seq`` has missed events and must ``replay``.
  Live delivery itself is at-most-once (core NATS); ``replay`` fills any hole.
* **Replay is exact.** ``replay`` yields every stored event of the channel with
  ``start_seq <= seq <= end_seq``, in order, each once.
* **Service commands go to one handler.** ``request`` sends a command to exactly
  one of the handlers that ``serve`` it (a NATS queue group), on any gateway, and
  returns its reply. With no handler it fails at once with ``NoResponders``; with
  no reply in time, ``RequestTimeout``. Commands are neither stored nor retried.
* **Tenant isolation.** Every subject comes from :mod:`shared.subjects`; a
  channel of one tenant never maps to a subject or stream of another.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from arqonbus_server.shared.subjects import ChannelRef


class BrokerUnavailable(Exception):
    """The store could not be reached or did not answer in time. Safe to retry."""


class StoreQuotaExceeded(Exception):
    """The tenant's stream is full (its max_bytes, discard new): the event was not stored.

    Not transient: retrying succeeds only once old events expire or the quota is raised.
    """


class NoResponders(Exception):
    """No handler is registered for the service command right now."""


class RequestTimeout(Exception):
    """The handler did not reply in time; it may still have acted on the command."""


@dataclass(frozen=True, slots=True)
class ServiceRequest:
    """A service command delivered to a handler; answer with ``Broker.respond(reply, ...)``."""

    body: bytes
    reply: str


@dataclass(frozen=True, slots=True)
class PublishResult:
    seq: int
    duplicate: bool


@dataclass(frozen=True, slots=True)
class StoredEvent:
    seq: int
    body: bytes


@dataclass(frozen=True, slots=True)
class LiveEvent:
    seq: int
    prev_seq: int
    body: bytes


@dataclass(frozen=True, slots=True)
class ChannelWindow:
    """What the store holds for a channel: its newest seq and the stream's oldest."""

    last_seq: int
    first_stream_seq: int


LiveHandler = Callable[[ChannelRef, LiveEvent], None]
ServiceHandler = Callable[[ServiceRequest], None]
ReconnectHandler = Callable[[], Coroutine[Any, Any, None]]


class LiveSubscription(Protocol):
    async def close(self) -> None: ...


class Broker(Protocol):
    @property
    def connected(self) -> bool: ...

    @property
    def max_payload(self) -> int: ...

    async def ensure_stream(self, tenant: str) -> int: ...

    async def publish(self, ref: ChannelRef, body: bytes, dedupe_key: str) -> PublishResult: ...

    async def subscribe_live(self, ref: ChannelRef, handler: LiveHandler) -> LiveSubscription: ...

    async def window(self, ref: ChannelRef) -> ChannelWindow: ...

    def replay(
        self, ref: ChannelRef, start_seq: int, end_seq: int | None, limit: int | None = None
    ) -> AsyncGenerator[StoredEvent, None]: ...

    async def request(
        self, ref: ChannelRef, command: str, body: bytes, timeout: float
    ) -> bytes: ...

    async def serve(
        self, ref: ChannelRef, command: str, handler: ServiceHandler
    ) -> LiveSubscription: ...

    async def respond(self, reply: str, body: bytes) -> None: ...

    async def check_health(self) -> bool: ...

    def on_reconnect(self, handler: ReconnectHandler) -> None: ...

    async def close(self, timeout: float = 5.0) -> None: ...
