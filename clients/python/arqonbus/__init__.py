"""ArqonBus Python SDK: publish, subscribe, resume without loss, command/response.

Quick start::

    import asyncio
    from arqonbus import Client

    async def main() -> None:
        async with Client("ws://127.0.0.1:8765/ws", "dev:demo:alice") as client:
            ack = await client.publish("science", "general", {"message": "hello"})
            async for item in client.subscribe("science", "general", since_seq=0):
                print(item)

    asyncio.run(main())

See the README of this package for the resume guarantee and the error classes.
"""

from arqonbus._admin import ROOM_SETTINGS, SYSTEM_ROOM
from arqonbus.agent import AgentCredentials
from arqonbus.client import (
    ADMIN_COMMANDS,
    BUILTIN_COMMANDS,
    SERVICE_FIRST,
    Client,
    CommandHandler,
    History,
    Subscription,
    SubscriptionCallback,
)
from arqonbus.errors import (
    ArqonBusError,
    AuthenticationError,
    Banned,
    ClientClosed,
    CommandFailed,
    ConnectionFailed,
    ConnectionLost,
    ConnectionRejected,
    Forbidden,
    Internal,
    InvalidEnvelope,
    InvalidJson,
    InvalidName,
    InvalidParameters,
    InvalidPayload,
    Kicked,
    LimitExceeded,
    MessageTooLarge,
    Muted,
    NoResponders,
    NotJoined,
    NotRegistered,
    PolicyViolation,
    QuotaExceeded,
    RateLimited,
    RoomDeleted,
    RoomExists,
    RoomKeyRequired,
    RoomNotFound,
    Timeout,
    Unavailable,
    UnknownCommand,
    UnknownRequest,
)
from arqonbus.models import Ack, CommandRequest, Event, Gap, HistoryPage, Welcome
from arqonbus.presence import (
    Member,
    MemberConnection,
    Occupancy,
    PresenceChange,
    PresenceEvent,
    PresencePage,
)

__version__ = "0.1.0"

__all__ = [
    "ADMIN_COMMANDS",
    "BUILTIN_COMMANDS",
    "ROOM_SETTINGS",
    "SERVICE_FIRST",
    "SYSTEM_ROOM",
    "Ack",
    "AgentCredentials",
    "ArqonBusError",
    "AuthenticationError",
    "Banned",
    "Client",
    "ClientClosed",
    "CommandFailed",
    "CommandHandler",
    "CommandRequest",
    "ConnectionFailed",
    "ConnectionLost",
    "ConnectionRejected",
    "Event",
    "Forbidden",
    "Gap",
    "History",
    "HistoryPage",
    "Internal",
    "InvalidEnvelope",
    "InvalidJson",
    "InvalidName",
    "InvalidParameters",
    "InvalidPayload",
    "Kicked",
    "LimitExceeded",
    "Member",
    "MemberConnection",
    "MessageTooLarge",
    "Muted",
    "NoResponders",
    "NotJoined",
    "NotRegistered",
    "Occupancy",
    "PolicyViolation",
    "PresenceChange",
    "PresenceEvent",
    "PresencePage",
    "QuotaExceeded",
    "RateLimited",
    "RoomDeleted",
    "RoomExists",
    "RoomKeyRequired",
    "RoomNotFound",
    "Subscription",
    "SubscriptionCallback",
    "Timeout",
    "Unavailable",
    "UnknownCommand",
    "UnknownRequest",
    "Welcome",
]
