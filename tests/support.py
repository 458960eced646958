"""Test helpers: a real WebSocket client and gateways as real processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import nats
import orjson
import websockets
from nats.js import JetStreamManager
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from arqonbus_server.gateway.admin.dev import http_status
from arqonbus_server.mesh.local import LocalCluster, free_port
from tests.timeouts import SEC

Message = dict[str, Any]


@contextlib.asynccontextmanager
async def jetstream_manager(cluster: LocalCluster) -> AsyncIterator[JetStreamManager]:
    """A JetStream manager on a NATS connection of the test's own: sees what the servers hold."""
    nc = await nats.connect(cluster.urls, connect_timeout=2)
    try:
        yield nc.jsm()
    finally:
        await nc.close()


def new_id(prefix: str = "m") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


class WsClient:
    """A plain WebSocket client that records every message it receives."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.received: list[Message] = []
        self.welcome: Message | None = None
        self.closed = asyncio.Event()
        self._changed = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, url: str, tenant: str, principal: str, **kwargs: Any) -> WsClient:
        return await cls.open(url, f"dev:{tenant}:{principal}", **kwargs)

    @classmethod
    async def open(cls, url: str, token: str | None, **kwargs: Any) -> WsClient:
        """Connect with ``token`` as a Bearer header (none: no credential) and await welcome."""
        headers = dict(kwargs.pop("additional_headers", None) or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        ws = await websockets.connect(url, additional_headers=headers, **kwargs)
        client = cls(ws)
        client.welcome = await client.wait_for(lambda m: m["type"] == "welcome")
        return client

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                message = orjson.loads(raw)
                async with self._changed:
                    self.received.append(message)
                    self._changed.notify_all()
        except ConnectionClosed:
            pass
        finally:
            self.closed.set()
            async with self._changed:
                self._changed.notify_all()

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code

    async def send(self, message: Message | str | bytes) -> None:
        if isinstance(message, dict):
            message = orjson.dumps(message).decode()
        await self.ws.send(message)

    async def wait_for(
        self, predicate: Callable[[Message], bool], timeout: float = 10.0, start: int = 0
    ) -> Message:
        """The first message received at index >= ``start`` matching ``predicate``."""
        async with asyncio.timeout(timeout), self._changed:
            while True:
                for message in self.received[start:]:
                    if predicate(message):
                        return message
                if self.closed.is_set():
                    raise ConnectionError(f"closed ({self.close_code}) before the expected message")
                await self._changed.wait()

    async def reply_to(self, request_id: str, timeout: float = 10.0, start: int = 0) -> Message:
        return await self.wait_for(
            lambda m: (
                m["type"] in ("ack", "error", "command_response")
                and m["payload"].get("request_id") == request_id
            ),
            timeout,
            start,
        )

    async def publish(
        self, room: str, channel: str, payload: Message, id: str | None = None, **extra: Any
    ) -> Message:
        msg_id = id or new_id()
        start = len(self.received)
        await self.send(
            {
                "id": msg_id,
                "type": "event",
                "room": room,
                "channel": channel,
                "payload": payload,
                **extra,
            }
        )
        return await self.reply_to(msg_id, start=start)

    async def command(
        self,
        room: str,
        channel: str,
        name: str,
        parameters: Message | None = None,
        timeout_ms: int | None = None,
        reply_timeout: float = 10.0,
    ) -> Message:
        cmd_id = await self.send_command(room, channel, name, parameters, timeout_ms)
        return await self.reply_to(cmd_id, timeout=reply_timeout)

    async def send_command(
        self,
        room: str,
        channel: str,
        name: str,
        parameters: Message | None = None,
        timeout_ms: int | None = None,
    ) -> str:
        """Send a command without waiting; returns its id (its reply's request_id)."""
        cmd_id = new_id("c")
        payload: Message = {"command": name, "parameters": parameters or {}}
        if timeout_ms is not None:
            payload["timeout_ms"] = timeout_ms
        await self.send(
            {
                "version": "1.0",
                "id": cmd_id,
                "type": "command",
                "room": room,
                "channel": channel,
                "payload": payload,
            }
        )
        return cmd_id

    def deliveries(self) -> list[Message]:
        """Service commands this connection's handler was given."""
        return [m for m in self.received if m["type"] == "command"]

    async def next_delivery(self, start: int = 0, timeout: float = 10.0) -> Message:
        return await self.wait_for(lambda m: m["type"] == "command", timeout, start)

    async def answer(
        self,
        delivery: Message,
        result: Message | None = None,
        error: Message | None = None,
        response_id: str | None = None,
    ) -> str:
        """Answer a delivered service command; returns the answer's id."""
        payload: Message = {"request_id": delivery["id"]}
        if error is None:
            payload |= {"status": "success", "result": result or {}}
        else:
            payload |= {"status": "error", "error": error}
        answer_id = response_id or new_id("r")
        await self.send(
            {
                "id": answer_id,
                "type": "command_response",
                "room": delivery["room"],
                "channel": delivery["channel"],
                "payload": payload,
            }
        )
        return answer_id

    async def join(
        self, room: str, channel: str, since_seq: int | None = None, **parameters: Any
    ) -> Message:
        params = parameters if since_seq is None else {"since_seq": since_seq, **parameters}
        reply = await self.command(room, channel, "join_channel", params)
        assert reply["payload"]["status"] == "success", reply
        result: Message = reply["payload"]["result"]
        return result

    def events(self, room: str | None = None, channel: str | None = None) -> list[Message]:
        """The events received, in order; those of an ``events`` message one by one."""
        return [
            event
            for m in self.received
            if m["type"] in ("event", "events")
            and (room is None or m["room"] == room)
            and (channel is None or m["channel"] == channel)
            for event in (m["payload"]["events"] if m["type"] == "events" else (m,))
        ]

    async def wait_events(
        self, count: int, room: str | None = None, channel: str | None = None, timeout: float = 15.0
    ) -> list[Message]:
        async with asyncio.timeout(timeout), self._changed:
            while len(self.events(room, channel)) < count:
                if self.closed.is_set():
                    raise ConnectionError(
                        f"closed ({self.close_code}) with {len(self.events(room, channel))}/{count} events"
                    )
                await self._changed.wait()
        return self.events(room, channel)

    async def close(self) -> None:
        with contextlib.suppress(ConnectionClosed, OSError):
            await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


class GatewayProcess:
    """``arqonbus gateway`` as a real child process (so it can be SIGKILLed or SIGTERMed)."""

    def __init__(
        self,
        nats_urls: str,
        port: int | None = None,
        env: dict[str, str] | None = None,
        auth: str = "dev",
    ) -> None:
        self.nats_urls = nats_urls
        self.auth = auth
        self.port = port or free_port()
        self.env = {**os.environ, **(env or {})}
        self.proc: asyncio.subprocess.Process | None = None
        # A file, not a pipe: a chatty gateway must never block on a full pipe.
        self._log = tempfile.TemporaryFile()  # noqa: SIM115  # closed in stop()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def start(self, timeout: float = 30.0) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "arqonbus_server.gateway", "gateway",
            "--nats", self.nats_urls, "--listen", f"127.0.0.1:{self.port}", "--auth", self.auth,
            "--node-id", f"gw-{self.port}", "--insecure-dev-auth",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=self._log, env=self.env, start_new_session=True,
        )  # fmt: skip
        await self.wait_ready(timeout)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        assert self.proc is not None
        async with asyncio.timeout(timeout):
            while await http_status("127.0.0.1", self.port, "/readyz") != 200:
                if self.proc.returncode is not None:
                    raise RuntimeError(
                        f"gateway exited with {self.proc.returncode}: {await self.stderr()}"
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.proc.wait(), 0.05 * SEC)

    async def stderr(self) -> str:
        """The tail of what the gateway logged."""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-4000:]

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def stop(self) -> None:
        try:
            if self.proc is None or self.proc.returncode is not None:
                return
            self.signal(signal.SIGTERM)
            try:
                await self.wait_exit(20)
            except TimeoutError:
                self.signal(signal.SIGKILL)
                await self.proc.wait()
        finally:
            self._log.close()
