"""One connection: decode -> authorize -> act -> encode."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from datetime import UTC, datetime

import orjson

from gateway.auth import Principal
from gateway.hub import Hub
from gateway.transport import Socket
from mesh.broker import Broker, BrokerUnavailable
from shared import commands
from shared.envelope import (
    ClientCommand,
    ClientEvent,
    encode_ack,
    encode_command_response,
    encode_error,
    encode_stored_event,
    encode_welcome,
    parse_client_frame,
    with_seq,
)
from shared.errors import (
    INTERNAL,
    LIMIT_EXCEEDED,
    MESSAGE_TOO_LARGE,
    NOT_JOINED,
    UNAVAILABLE,
    ArqonError,
    CloseCode,
)
from shared.settings import Settings
from shared.subjects import ChannelRef, SubjectScheme

log = logging.getLogger("arqonbus.gateway.session")

# Room for the Nats-Msg-Id header and protocol framing next to the stored envelope.
_NATS_HEADER_ROOM = 512


def utc_timestamp() -> str:
    """ISO 8601 UTC with milliseconds, e.g. 2025-01-01T12:00:00.000Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Session:
    def __init__(
        self,
        socket: Socket,
        principal: Principal,
        hub: Hub,
        broker: Broker,
        settings: Settings,
        node_id: str,
    ) -> None:
        self.socket = socket
        self.principal = principal
        self.id = uuid.uuid4().hex
        self._hub = hub
        self._broker = broker
        self._settings = settings
        self._scheme = SubjectScheme(settings.subject_prefix)
        self._node_id = node_id
        self._joined: set[ChannelRef] = set()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._stopping = False

    def limits(self) -> dict[str, int]:
        return {
            "max_envelope_bytes": self._settings.max_envelope_bytes,
            "max_in_flight": self._settings.max_in_flight,
            "history_max_limit": commands.HISTORY_MAX_LIMIT,
            "send_buffer_bytes": self._settings.send_buffer_bytes,
            "max_channels": self._settings.max_channels_per_connection,
        }

    async def run(self) -> None:
        self.socket.send(encode_welcome(self.id, self._node_id, self.limits()))
        try:
            while True:
                data = await self.socket.recv()
                if data is None:
                    break
                if self._stopping:
                    # Draining: drain() acks what is in flight, then closes 1012. Frames
                    # that arrive meanwhile are not acted on (the client resends them
                    # elsewhere); reading on keeps the close handshake from stalling.
                    continue
                await self.handle(data)
        finally:
            self._hub.leave_all(self.socket, list(self._joined))
            self._joined.clear()

    async def handle(self, data: bytes) -> None:
        try:
            message = parse_client_frame(data, self._settings.max_envelope_bytes)
            if isinstance(message, ClientEvent):
                await self._start_publish(message)
            else:
                await self._run_command(message)
        except ArqonError as exc:
            self.socket.send(encode_error(exc))

    # -- events -------------------------------------------------------------------

    async def _start_publish(self, event: ClientEvent) -> None:
        while len(self._in_flight) >= self._settings.max_in_flight:
            # Backpressure: stop reading this socket until a store ack frees a slot.
            await asyncio.wait(set(self._in_flight), return_when=asyncio.FIRST_COMPLETED)
        ref = ChannelRef(self.principal.tenant, event.room, event.channel)
        body = encode_stored_event(event, self.principal.id, utc_timestamp())
        if len(body) > self._broker.max_payload - _NATS_HEADER_ROOM:
            raise ArqonError(
                MESSAGE_TOO_LARGE, "the stored envelope exceeds the NATS max_payload", event.id
            )
        try:
            # Inline, in frame order: provisioning (once per tenant) must not let a
            # later event of this connection overtake an earlier one.
            await self._broker.ensure_stream(ref.tenant)
        except BrokerUnavailable as exc:
            log.warning("publish of %s failed: %s", event.id, exc)
            raise ArqonError(UNAVAILABLE, request_id=event.id) from None
        key = self._scheme.dedupe_key(ref, self.principal.id, event.id)
        task = asyncio.create_task(self._publish(event, ref, body, key))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _publish(self, event: ClientEvent, ref: ChannelRef, body: bytes, key: str) -> None:
        try:
            result = await self._broker.publish(ref, body, key)
        except BrokerUnavailable as exc:
            log.warning("publish of %s failed: %s", event.id, exc)
            self.socket.send(encode_error(ArqonError(UNAVAILABLE, request_id=event.id)))
            return
        except Exception:
            log.exception("publish of %s failed", event.id)
            self.socket.send(encode_error(ArqonError(INTERNAL, request_id=event.id)))
            return
        self.socket.send(
            encode_ack(event.id, event.room, event.channel, result.seq, result.duplicate)
        )

    async def finish_in_flight(self, timeout: float) -> None:
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=timeout)

    # -- commands -------------------------------------------------------------------

    async def _run_command(self, command: ClientCommand) -> None:
        ref = ChannelRef(self.principal.tenant, command.room, command.channel)
        try:
            name = commands.require_builtin(command.command)
            if name == commands.JOIN_CHANNEL:
                await self._join(command, ref)
            elif name == commands.LEAVE_CHANNEL:
                self._leave(command, ref)
            else:
                await self._history(command, ref)
        except ArqonError as exc:
            self._reply(command, error=exc.with_request_id(command.id))
        except BrokerUnavailable as exc:
            log.warning("command %s failed: %s", command.command, exc)
            self._reply(command, error=ArqonError(UNAVAILABLE, request_id=command.id))
        except Exception:
            log.exception("command %s failed", command.command)
            self._reply(command, error=ArqonError(INTERNAL, request_id=command.id))

    def _reply(
        self,
        command: ClientCommand,
        result: dict[str, object] | None = None,
        error: ArqonError | None = None,
    ) -> None:
        self.socket.send(
            encode_command_response(
                command, "resp_" + uuid.uuid4().hex, "arqonbus", utc_timestamp(), result, error
            )
        )

    async def _join(self, command: ClientCommand, ref: ChannelRef) -> None:
        params = commands.join_params(command.parameters)
        limit = self._settings.max_channels_per_connection
        if ref not in self._joined and len(self._joined) >= limit:
            raise ArqonError(LIMIT_EXCEEDED, f"this connection already has {limit} channels")
        member, joined = await self._hub.join(self.socket, ref, params.since_seq)
        self._joined.add(ref)
        self._reply(command, joined.as_result())
        self._hub.start(member, joined.last_seq)

    def _leave(self, command: ClientCommand, ref: ChannelRef) -> None:
        if not self._hub.leave(self.socket, ref):
            raise ArqonError(NOT_JOINED)
        self._joined.discard(ref)
        self._reply(command, {})

    async def _history(self, command: ClientCommand, ref: ChannelRef) -> None:
        """One page of stored events, bounded by ``limit`` and by bytes (half the send buffer)."""
        params = commands.history_params(command.parameters)
        budget = self._settings.send_buffer_bytes // 2
        events: list[orjson.Fragment] = []
        next_since, size, more = params.since_seq, 0, False
        replay = self._broker.replay(ref, params.since_seq + 1, None, params.limit)
        async with contextlib.aclosing(replay) as stored_events:
            async for stored in stored_events:
                delivered = with_seq(stored.body, stored.seq)
                if events and size + len(delivered) > budget:
                    more = True
                    break
                events.append(orjson.Fragment(delivered))
                size += len(delivered)
                next_since = stored.seq
        more = more or len(events) == params.limit
        self._reply(command, {"events": events, "next_since_seq": next_since, "more": more})

    # -- shutdown ----------------------------------------------------------------------

    async def drain(self, timeout: float) -> None:
        """Stop taking frames, let publishes in flight finish, then close 1012."""
        self._stopping = True
        await self.finish_in_flight(timeout)
        await self.socket.close(CloseCode.SERVICE_RESTART, "server draining: reconnect elsewhere")
