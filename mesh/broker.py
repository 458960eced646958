"""The Broker's types and errors, kept importable here; the port itself is
:class:`mesh.ports.Broker` (its guarantees are checked by tests/contract/test_broker.py)."""

from __future__ import annotations

from arqonbus_server.mesh.ports import (
    Broker,
    BrokerUnavailable,
    ChannelWindow,
    LiveEvent,
    LiveHandler,
    LiveSubscription,
    NoResponders,
    PublishItem,
    PublishResult,
    ReconnectHandler,
    RequestTimeout,
    ServiceHandler,
    ServiceRequest,
    StoredEvent,
    StoreQuotaExceeded,
)

__all__ = [
    "Broker",
    "BrokerUnavailable",
    "ChannelWindow",
    "LiveEvent",
    "LiveHandler",
    "LiveSubscription",
    "NoResponders",
    "PublishItem",
    "PublishResult",
    "ReconnectHandler",
    "RequestTimeout",
    "ServiceHandler",
    "ServiceRequest",
    "StoreQuotaExceeded",
    "StoredEvent",
]
