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

from arqonbus.client import (
    BUILTIN_COMMANDS,
    Client,
    CommandHandler,
    History,
    Subscription,
    SubscriptionCallback,
)
from arqonbus.errors import (
    ArqonBusError,
    AuthenticationError,
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
    LimitExceeded,
    MessageTooLarge,
    NoResponders,
    NotJoined,
    NotRegistered,
    PolicyViolation,
    Timeout,
    Unavailable,
    UnknownCommand,
    UnknownRequest,
)
from arqonbus.models import Ack, CommandRequest, Event, Gap, HistoryPage, Welcome

__version__ = "0.1.0"

__all__ = [
    "BUILTIN_COMMANDS",
    "Ack",
    "ArqonBusError",
    "AuthenticationError",
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
    "LimitExceeded",
    "MessageTooLarge",
    "NoResponders",
    "NotJoined",
    "NotRegistered",
    "PolicyViolation",
    "Subscription",
    "SubscriptionCallback",
    "Timeout",
    "Unavailable",
    "UnknownCommand",
    "UnknownRequest",
    "Welcome",
]
