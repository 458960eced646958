"""Envelope models, parse and serialize: the wire protocol v1 in one place.

Client -> gateway frames are parsed by :func:`parse_client_frame` into a
:class:`ClientEvent` or :class:`ClientCommand`, or rejected with an
:class:`~shared.errors.ArqonError` that carries the request id when one could
be read. Gateway -> client frames are built by the ``encode_*`` functions and
are bytes ready to put in a text frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from shared.errors import (
    INVALID_ENVELOPE,
    INVALID_JSON,
    MESSAGE_TOO_LARGE,
    ArqonError,
)
from shared.subjects import validate_name

PROTOCOL_VERSION = "1.0"
ID_MAX = 128
CLIENT_TYPES = ("event", "command")


@dataclass(frozen=True, slots=True)
class ClientEvent:
    id: str
    room: str
    channel: str
    payload: Any


@dataclass(frozen=True, slots=True)
class ClientCommand:
    id: str
    room: str
    channel: str
    command: str
    parameters: dict[str, Any]


ClientMessage = ClientEvent | ClientCommand


def parse_client_frame(data: bytes | str, max_bytes: int) -> ClientMessage:
    """Parse and validate one client frame. Raises ArqonError with a stable code."""
    if isinstance(data, str):
        try:
            data = data.encode()
        except UnicodeEncodeError:
            raise ArqonError(INVALID_JSON, "the frame is not valid UTF-8") from None
    size = len(data)
    if size > max_bytes:
        raise ArqonError(MESSAGE_TOO_LARGE, f"envelope is {size} bytes, limit is {max_bytes}")
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ArqonError(INVALID_JSON, "could not parse the frame as JSON") from None
    if not isinstance(obj, dict):
        raise ArqonError(INVALID_ENVELOPE, "the envelope must be a JSON object")
    request_id = _read_id(obj)
    try:
        return _parse_fields(obj, request_id)
    except ArqonError as exc:
        raise exc.with_request_id(request_id) from None


def _read_id(obj: dict[str, Any]) -> str:
    value = obj.get("id")
    if not isinstance(value, str) or not 1 <= len(value) <= ID_MAX:
        raise ArqonError(INVALID_ENVELOPE, f"field 'id' must be a string of 1-{ID_MAX} characters")
    if not value.isprintable():
        raise ArqonError(INVALID_ENVELOPE, "field 'id' must not contain control characters")
    return value


def _parse_fields(obj: dict[str, Any], request_id: str) -> ClientMessage:
    version = obj.get("version", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION:
        raise ArqonError(
            INVALID_ENVELOPE, f"field 'version' must be {PROTOCOL_VERSION!r}, got {version!r}"
        )
    kind = obj.get("type")
    if kind not in CLIENT_TYPES:
        raise ArqonError(
            INVALID_ENVELOPE, f"field 'type' must be one of {list(CLIENT_TYPES)}, got {kind!r}"
        )
    room = validate_name(obj.get("room"), "room")
    channel = validate_name(obj.get("channel"), "channel")
    payload = obj.get("payload")
    if not isinstance(payload, dict):
        raise ArqonError(INVALID_ENVELOPE, "field 'payload' must be a JSON object")
    if kind == "event":
        return ClientEvent(request_id, room, channel, payload)
    return _parse_command(request_id, room, channel, payload)


def _parse_command(
    request_id: str, room: str, channel: str, payload: dict[str, Any]
) -> ClientCommand:
    name = payload.get("command")
    if not isinstance(name, str) or not name:
        raise ArqonError(INVALID_ENVELOPE, "field 'payload.command' must be a non-empty string")
    parameters = payload.get("parameters", {})
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        raise ArqonError(INVALID_ENVELOPE, "field 'payload.parameters' must be a JSON object")
    return ClientCommand(request_id, room, channel, name, parameters)


# -- gateway -> store ---------------------------------------------------------


def encode_stored_event(event: ClientEvent, sender: str, timestamp: str) -> bytes:
    """The envelope as stored: ``from`` is the authenticated sender, never the client's."""
    return orjson.dumps(
        {
            "version": PROTOCOL_VERSION,
            "id": event.id,
            "type": "event",
            "room": event.room,
            "channel": event.channel,
            "from": sender,
            "timestamp": timestamp,
            "payload": event.payload,
        }
    )


def with_seq(stored: bytes, seq: int) -> bytes:
    """The delivered form: the stored envelope plus ``"seq": N``, without re-parsing it.

    ``stored`` is always an orjson-encoded object, so it ends with ``}``.
    """
    return b'%s,"seq":%d}' % (stored[:-1], seq)


# -- gateway -> client --------------------------------------------------------


def _server_message(kind: str, payload: dict[str, Any], **fields: Any) -> bytes:
    return orjson.dumps({"version": PROTOCOL_VERSION, "type": kind, **fields, "payload": payload})


def encode_welcome(session_id: str, node: str, limits: dict[str, int]) -> bytes:
    return _server_message(
        "welcome",
        {"session_id": session_id, "node": node, "protocol": PROTOCOL_VERSION, "limits": limits},
    )


def encode_ack(request_id: str, room: str, channel: str, seq: int, duplicate: bool) -> bytes:
    payload: dict[str, Any] = {"request_id": request_id, "seq": seq}
    if duplicate:
        payload["duplicate"] = True
    return _server_message("ack", payload, room=room, channel=channel)


def encode_error(error: ArqonError, extra: dict[str, Any] | None = None) -> bytes:
    payload: dict[str, Any] = {
        "request_id": error.request_id,
        "code": error.code,
        "message": error.message,
        "retryable": error.error.retryable,
    }
    if extra:
        payload.update(extra)
    return _server_message("error", payload)


def encode_command_response(
    command: ClientCommand,
    response_id: str,
    sender: str,
    timestamp: str,
    result: dict[str, Any] | None = None,
    error: ArqonError | None = None,
) -> bytes:
    """A full envelope, as in the seed's Example 4."""
    payload: dict[str, Any] = {"request_id": command.id}
    if error is None:
        payload["status"] = "success"
        payload["result"] = result if result is not None else {}
    else:
        payload["status"] = "error"
        payload["error"] = {
            "code": error.code,
            "message": error.message,
            "retryable": error.error.retryable,
        }
    return _server_message(
        "command_response",
        payload,
        id=response_id,
        room=command.room,
        channel=command.channel,
        **{"from": sender, "timestamp": timestamp},
    )


def encode_gap(room: str, channel: str, after_seq: int, first_available_seq: int) -> bytes:
    """Tells a member that events after ``after_seq`` were dropped by retention."""
    return _server_message(
        "gap",
        {"after_seq": after_seq, "first_available_seq": first_available_seq},
        room=room,
        channel=channel,
    )


def decode_stored(stored: bytes) -> dict[str, Any]:
    obj = orjson.loads(stored)
    assert isinstance(obj, dict)
    return obj
