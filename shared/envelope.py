"""Envelope models, parse and serialize: the wire protocol v1 in one place.

Client -> gateway frames are parsed by :func:`parse_client_frame` into a
:class:`ClientEvent` or :class:`ClientCommand`, or rejected with an
:class:`~shared.errors.ArqonError` that carries the request id when one could
be read. Gateway -> client frames are built by the ``encode_*`` functions and
are bytes ready to put in a text frame.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from arqonbus_server.shared.errors import (
    INVALID_ENVELOPE,
    INVALID_JSON,
    MESSAGE_TOO_LARGE,
    ArqonError,
)
from arqonbus_server.shared.records import record
from arqonbus_server.shared.subjects import is_valid_name, validate_name

PROTOCOL_VERSION = "1.0"
ID_MAX = 128
CLIENT_TYPES = ("event", "events", "command", "command_response")
# Events in one ``events`` frame (a batch): they go whole into one of the store's atomic
# batches (up to 1,000 messages, mesh/ingest.py), with room left for others' publishes.
BATCH_EVENTS_MAX = 500
ERROR_MESSAGE_MAX = 1024
# Nested arrays and objects in one envelope, the envelope object included. The gateway
# re-encodes what it accepts (stored event, delivered command, handler answer) and orjson
# encodes at most 254 levels, so a deeper envelope could be parsed but never sent on.
DEPTH_MAX = 254
# A rejected value is quoted in the error message, cut to this many characters.
SHOWN_MAX = 80


@record
class ClientEvent:
    id: str
    room: str
    channel: str
    payload: Any
    # The optional ``trace`` field (W3C trace context as plain strings), see parse_trace.
    trace: Mapping[str, str] | None = None
    # The client sent a ``trace`` field that was not usable: ignored (the shell counts it).
    trace_malformed: bool = False


@dataclass(frozen=True, slots=True)
class ClientEventBatch:
    """An ``events`` frame: several events to one channel, answered by one ack."""

    id: str
    room: str
    channel: str
    events: tuple[ClientEvent, ...]


@dataclass(frozen=True, slots=True)
class ClientCommand:
    id: str
    room: str
    channel: str
    command: str
    parameters: dict[str, Any]
    # payload.timeout_ms as sent (validated by the gateway against its limits); services only
    timeout_ms: object = None
    # The optional ``trace`` field, as for events (see parse_trace); services only.
    trace: Mapping[str, str] | None = None
    trace_malformed: bool = False


@dataclass(frozen=True, slots=True)
class ResponseError:
    """The error of a command_response: a stable code, a message for people, retryable."""

    code: str
    message: str
    retryable: bool
    # The error's own fields (retry_after_ms, room, ...), sent beside the three above.
    fields: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "message": self.message,
            "retryable": self.retryable,
            **self.fields,
        }


@dataclass(frozen=True, slots=True)
class ClientResponse:
    """A handler's answer to a service command it was delivered."""

    id: str
    room: str
    channel: str
    request_id: str
    result: dict[str, Any] | None
    error: ResponseError | None


ClientMessage = ClientEvent | ClientEventBatch | ClientCommand | ClientResponse


def _decode_object(data: bytes | str, max_bytes: int) -> tuple[bytes, dict[str, Any]]:
    """A frame's bytes and its JSON object, within ``max_bytes``; ArqonError if not."""
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
    return data, obj


def parse_client_frame(data: bytes | str, max_bytes: int) -> ClientMessage:
    """Parse and validate one client frame. Raises ArqonError with a stable code."""
    data, obj = _decode_object(data, max_bytes)
    request_id = _read_id(obj)
    try:
        _check_depth(data, obj)
        return _parse_fields(obj, request_id)
    except ArqonError as exc:
        raise exc.with_request_id(request_id) from None


def _read_id(obj: dict[str, Any], field: str = "id") -> str:
    value = obj.get(field.rpartition(".")[2])
    if not isinstance(value, str) or not 1 <= len(value) <= ID_MAX:
        raise ArqonError(
            INVALID_ENVELOPE, f"field {field!r} must be a string of 1-{ID_MAX} characters"
        )
    if not value.isprintable():
        raise ArqonError(INVALID_ENVELOPE, f"field {field!r} must not contain control characters")
    return value


def _check_depth(data: bytes, obj: dict[str, Any]) -> None:
    """Refuse an envelope nested deeper than DEPTH_MAX, without recursing."""
    if data.count(b"[") + data.count(b"{") <= DEPTH_MAX:
        return  # cannot be deeper: the common case costs two byte scans
    level: list[Any] = [obj]
    for _ in range(DEPTH_MAX):  # one level of containers per round
        below: list[Any] = []
        for container in level:
            for child in container.values() if type(container) is dict else container:
                if type(child) is dict or type(child) is list:
                    below.append(child)
        if not below:
            return
        level = below
    raise ArqonError(
        INVALID_ENVELOPE,
        f"the envelope nests arrays and objects more than {DEPTH_MAX} levels deep",
    )


def _shown(value: object) -> str:
    """A rejected value for an error message: its repr, cut to SHOWN_MAX characters."""
    text = repr(value)
    return text if len(text) <= SHOWN_MAX else text[: SHOWN_MAX - 3] + "..."


def _parse_fields(obj: dict[str, Any], request_id: str) -> ClientMessage:
    version = obj.get("version", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION:
        raise ArqonError(
            INVALID_ENVELOPE, f"field 'version' must be {PROTOCOL_VERSION!r}, got {_shown(version)}"
        )
    kind = obj.get("type")
    if kind not in CLIENT_TYPES:
        raise ArqonError(
            INVALID_ENVELOPE,
            f"field 'type' must be one of {list(CLIENT_TYPES)}, got {_shown(kind)}",
        )
    room = validate_name(obj.get("room"), "room")
    channel = validate_name(obj.get("channel"), "channel")
    payload = obj.get("payload")
    if not isinstance(payload, dict):
        raise ArqonError(INVALID_ENVELOPE, "field 'payload' must be a JSON object")
    if kind == "event":
        if "trace" not in obj:
            return ClientEvent(request_id, room, channel, payload)
        trace = parse_trace(obj["trace"])
        return ClientEvent(request_id, room, channel, payload, trace, trace is None)
    if kind == "events":
        return _parse_batch(request_id, room, channel, payload)
    if kind == "command":
        command = _parse_command(request_id, room, channel, payload)
        if "trace" not in obj:
            return command
        trace = parse_trace(obj["trace"])
        return replace(command, trace=trace, trace_malformed=trace is None)
    return _parse_response(request_id, room, channel, payload)


def _parse_batch(
    request_id: str, room: str, channel: str, payload: dict[str, Any]
) -> ClientEventBatch:
    """``payload.events``: 1-BATCH_EVENTS_MAX objects ``{"id", "payload"[, "trace"]}``,
    each id once."""
    items = payload.get("events")
    if not isinstance(items, list) or not 1 <= len(items) <= BATCH_EVENTS_MAX:
        raise ArqonError(
            INVALID_ENVELOPE,
            f"field 'payload.events' must be a list of 1-{BATCH_EVENTS_MAX} events: "
            "send more in several frames",
        )
    events: list[ClientEvent] = []
    seen: set[str] = set()
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise ArqonError(
                INVALID_ENVELOPE, f"field 'payload.events[{index}]' must be a JSON object"
            )
        raw_id = item.get("id")
        if type(raw_id) is str and 1 <= len(raw_id) <= ID_MAX and raw_id.isprintable():
            event_id = raw_id
        else:
            event_id = _read_id(item, f"payload.events[{index}].id")  # raises, naming it
        if event_id in seen:
            where = f"payload.events[{index}]"
            raise ArqonError(
                INVALID_ENVELOPE,
                f"field '{where}.id' repeats {_shown(event_id)}: each event of a batch "
                "needs its own id",
            )
        seen.add(event_id)
        body = item.get("payload")
        if not isinstance(body, dict):
            raise ArqonError(
                INVALID_ENVELOPE, f"field 'payload.events[{index}].payload' must be a JSON object"
            )
        if "trace" not in item:
            events.append(ClientEvent(event_id, room, channel, body))
        else:
            trace = parse_trace(item["trace"])
            events.append(ClientEvent(event_id, room, channel, body, trace, trace is None))
    return ClientEventBatch(request_id, room, channel, tuple(events))


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
    return ClientCommand(request_id, room, channel, name, parameters, payload.get("timeout_ms"))


def _parse_response(
    response_id: str, room: str, channel: str, payload: dict[str, Any]
) -> ClientResponse:
    request_id = _read_id(payload, "payload.request_id")
    status = payload.get("status")
    if status == "success":
        result = payload.get("result")
        if result is None:
            result = {}
        if not isinstance(result, dict):
            raise ArqonError(INVALID_ENVELOPE, "field 'payload.result' must be a JSON object")
        return ClientResponse(response_id, room, channel, request_id, result, None)
    if status == "error":
        return ClientResponse(
            response_id, room, channel, request_id, None, parse_response_error(payload.get("error"))
        )
    raise ArqonError(
        INVALID_ENVELOPE,
        f"field 'payload.status' must be 'success' or 'error', got {_shown(status)}",
    )


def parse_response_error(error: object) -> ResponseError:
    """A handler's error object: ``code`` a valid name, ``message`` short, ``retryable`` bool."""
    if not isinstance(error, dict):
        raise ArqonError(INVALID_ENVELOPE, "field 'payload.error' must be a JSON object")
    code, message, retryable = error.get("code"), error.get("message"), error.get("retryable")
    if not is_valid_name(code):
        raise ArqonError(
            INVALID_ENVELOPE,
            "field 'payload.error.code' must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'",
        )
    if not isinstance(message, str) or len(message) > ERROR_MESSAGE_MAX:
        raise ArqonError(
            INVALID_ENVELOPE,
            f"field 'payload.error.message' must be a string of at most {ERROR_MESSAGE_MAX} characters",
        )
    if retryable is None:
        retryable = False
    if not isinstance(retryable, bool):
        raise ArqonError(INVALID_ENVELOPE, "field 'payload.error.retryable' must be a boolean")
    assert isinstance(code, str)
    return ResponseError(code, message, retryable)


# -- trace context (issue 13) -------------------------------------------------
# ``trace`` is {"traceparent": "...", "tracestate": "..."}: W3C trace context as plain strings.
# Only its shape is checked here; the values are read by OpenTelemetry's propagator in the
# gateway (gateway/tracing.py), which ignores what it cannot parse and applies the W3C limits
# to tracestate. A malformed field never refuses the event: it is dropped and counted.

TRACE_KEYS = ("traceparent", "tracestate")
TRACEPARENT_MAX = 256  # version 00 is 55 characters; later versions may append fields


def parse_trace(value: object) -> dict[str, str] | None:
    """The ``trace`` field as plain strings, or None when it is not usable."""
    if not isinstance(value, dict):
        return None
    parent = value.get("traceparent")
    if not isinstance(parent, str) or not 0 < len(parent) <= TRACEPARENT_MAX:
        return None
    if not parent.isascii() or not parent.isprintable():
        return None
    trace = {"traceparent": parent}
    state = value.get("tracestate")
    if isinstance(state, str) and state.isascii() and state.isprintable():
        trace["tracestate"] = state
    elif state is not None:
        return None
    return trace


def encode_trace(trace: Mapping[str, str]) -> bytes:
    """``,"trace":{...}`` as spliced into a stored envelope by :func:`with_trace`."""
    return b',"trace":' + orjson.dumps({k: trace[k] for k in TRACE_KEYS if k in trace})


def with_trace(stored: bytes, trace: Mapping[str, str] | None) -> bytes:
    """The stored envelope (an orjson object, ending in ``}``) with its ``trace`` field."""
    if not trace:
        return stored
    return b"%s%s}" % (stored[:-1], encode_trace(trace))


# -- first-message auth (issue 6) ---------------------------------------------
# A client that connects without a credential (when the gateway allows it) is sent
# ``auth_required`` and must answer with ``{"type": "auth", "payload": {"token": ...}}``.

AUTH_TOKEN_MAX = 8192


def parse_auth_frame(data: bytes | str, max_bytes: int) -> str:
    """The token of a client's ``auth`` frame. Raises ArqonError with a stable code."""
    _, obj = _decode_object(data, max_bytes)
    version = obj.get("version", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION:
        raise ArqonError(
            INVALID_ENVELOPE, f"field 'version' must be {PROTOCOL_VERSION!r}, got {_shown(version)}"
        )
    if obj.get("type") != "auth":
        raise ArqonError(
            INVALID_ENVELOPE,
            f"the first frame must have type 'auth' (got {_shown(obj.get('type'))}): send "
            '{"type": "auth", "payload": {"token": "..."}}',
        )
    payload = obj.get("payload")
    if not isinstance(payload, dict):
        raise ArqonError(INVALID_ENVELOPE, "field 'payload' must be a JSON object")
    token = payload.get("token")
    if not isinstance(token, str) or not 1 <= len(token) <= AUTH_TOKEN_MAX:
        raise ArqonError(
            INVALID_ENVELOPE,
            f"field 'payload.token' must be a string of 1-{AUTH_TOKEN_MAX} characters",
        )
    return token


def encode_auth_required(
    nonce: str | None, methods: list[str], timeout_ms: int, nonce_expires_in_s: int
) -> bytes:
    """Sent on a connection opened without a credential: send an ``auth`` frame in time."""
    return _server_message(
        "auth_required",
        {
            "nonce": nonce,
            "nonce_expires_in_s": nonce_expires_in_s,
            "methods": methods,
            "timeout_ms": timeout_ms,
        },
    )


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


def with_seq_epoch(stored: bytes, seq: int, epoch: int) -> bytes:
    """The delivered form of a placed tenant's event: ``"seq": N, "epoch": E``."""
    return b'%s,"seq":%d,"epoch":%d}' % (stored[:-1], seq, epoch)


# The bodies of one ``events`` delivery (docs/protocol.md#batched-delivery): a batch
# holds events while their delivered forms add up to at most this; a longer one goes alone.
DELIVERY_BATCH_BYTES = 65536


def delivery_batches(delivered: list[bytes]) -> list[list[bytes]]:
    """``delivered`` (in seq order) cut into runs of at most DELIVERY_BATCH_BYTES each; an
    event longer than that is a run of its own."""
    runs: list[list[bytes]] = []
    run: list[bytes] = []
    size = 0
    for body in delivered:
        if run and size + len(body) > DELIVERY_BATCH_BYTES:
            runs.append(run)
            run, size = [], 0
        run.append(body)
        size += len(body)
    if run:
        runs.append(run)
    return runs


def encode_run(room: str, channel: str, delivered: list[bytes]) -> bytes:
    """The message of one run of delivered events: the event itself when it is one, else
    an ``events`` message carrying them in order (each exactly as an ``event`` message)."""
    if len(delivered) == 1:
        return delivered[0]
    return b'{"version":"%s","type":"events","room":%s,"channel":%s,"payload":{"events":[%s]}}' % (
        PROTOCOL_VERSION.encode(),
        orjson.dumps(room),
        orjson.dumps(channel),
        b",".join(delivered),
    )


# -- gateway -> client --------------------------------------------------------


def _server_message(kind: str, payload: dict[str, Any], **fields: Any) -> bytes:
    return orjson.dumps({"version": PROTOCOL_VERSION, "type": kind, **fields, "payload": payload})


def encode_welcome(session_id: str, node: str, limits: dict[str, int | float]) -> bytes:
    return _server_message(
        "welcome",
        {"session_id": session_id, "node": node, "protocol": PROTOCOL_VERSION, "limits": limits},
    )


def encode_presence(room: str, channel: str, payload: dict[str, Any]) -> bytes:
    """A ``presence`` frame: a channel's member changes (docs/protocol.md#presence-frames)."""
    return _server_message("presence", payload, room=room, channel=channel)


def encode_ack(
    request_id: str, room: str, channel: str, seq: int, duplicate: bool, epoch: int | None = None
) -> bytes:
    payload: dict[str, Any] = {"request_id": request_id, "seq": seq}
    if duplicate:
        payload["duplicate"] = True
    if epoch is not None:  # a placed tenant (docs/protocol.md#resume-across-a-failover)
        payload["epoch"] = epoch
    return _server_message("ack", payload, room=room, channel=channel)


def encode_batch_ack(
    request_id: str,
    room: str,
    channel: str,
    seqs: list[int],
    duplicates: list[int],
    epochs: list[int] | None = None,
) -> bytes:
    """The ack of an ``events`` frame: ``seqs[i]`` is event i's; ``duplicates`` lists the
    indexes of events stored before (their original seq); ``epochs`` for a placed tenant."""
    payload: dict[str, Any] = {"request_id": request_id, "seqs": seqs}
    if duplicates:
        payload["duplicates"] = duplicates
    if epochs is not None:
        payload["epochs"] = epochs
    return _server_message("ack", payload, room=room, channel=channel)


def encode_error(error: ArqonError, extra: dict[str, Any] | None = None) -> bytes:
    payload: dict[str, Any] = {
        "request_id": error.request_id,
        "code": error.code,
        "message": error.message,
        "retryable": error.error.retryable,
        **error.fields,
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
    """A gateway's own answer: a full envelope, as in the seed's Example 4."""
    return encode_response(
        command,
        response_id,
        sender,
        timestamp,
        result,
        None
        if error is None
        else ResponseError(error.code, error.message, error.error.retryable, error.fields),
    )


def encode_response(
    command: ClientCommand,
    response_id: str,
    sender: str,
    timestamp: str,
    result: dict[str, Any] | None = None,
    error: ResponseError | None = None,
) -> bytes:
    """A command_response to ``command``, from the gateway or from a service's handler."""
    payload: dict[str, Any] = {"request_id": command.id}
    if error is None:
        payload["status"] = "success"
        payload["result"] = result if result is not None else {}
    else:
        payload["status"] = "error"
        payload["error"] = error.as_dict()
    return _server_message(
        "command_response",
        payload,
        id=response_id,
        room=command.room,
        channel=command.channel,
        **{"from": sender, "timestamp": timestamp},
    )


def encode_delivery(
    delivery_id: str,
    room: str,
    channel: str,
    sender: str,
    timestamp: str,
    payload: dict[str, Any],
    trace: Mapping[str, str] | None = None,
) -> bytes:
    """A service command as its handler receives it; it answers with request_id = delivery_id.

    ``trace``: the context the handler continues (the handler gateway's span), if traced.
    """
    return with_trace(
        orjson.dumps(
            {
                "version": PROTOCOL_VERSION,
                "type": "command",
                "id": delivery_id,
                "room": room,
                "channel": channel,
                "from": sender,
                "timestamp": timestamp,
                "payload": payload,
            }
        ),
        trace,
    )


def encode_gap(
    room: str,
    channel: str,
    after_seq: int,
    first_available_seq: int,
    extra: dict[str, Any] | None = None,
) -> bytes:
    """Tells a member that events after ``after_seq`` were dropped by retention, or (with
    ``extra`` of shared/core/resume.py, ``reason: "epoch"``) not carried over by a failover."""
    payload: dict[str, Any] = {"after_seq": after_seq, "first_available_seq": first_available_seq}
    if extra:
        payload.update(extra)
    return _server_message("gap", payload, room=room, channel=channel)


def decode_stored(stored: bytes) -> dict[str, Any]:
    obj = orjson.loads(stored)
    assert isinstance(obj, dict)
    return obj
