"""Fuzzing of every entry point that turns client bytes into structures.

Targets: the frame decoder the gateway session calls on each inbound frame
(:func:`shared.envelope.parse_client_frame`, bytes and str), the built-in command
parameters (:mod:`shared.commands`), and the handler error parser
(:func:`shared.envelope.parse_response_error`).

The property, for any input: the function returns a valid value, or raises
:class:`~shared.errors.ArqonError` with a catalogue code that fits the entry point and a
non-empty message that says what to do. Never any other exception. What a parse accepts
must also go on through the gateway's next steps (store, deliver, answer) and round-trip.

Two engines: hypothesis with structured strategies (always; the strategies here are the
ones ``tests/unit/test_fuzz.py`` runs in ``make test``) and, when it is installed,
atheris (coverage-guided libFuzzer) on raw frame bytes, in a child process.

    python -m chaos.fuzz --json OUT [--long] [--seconds S]

Writes OUT as {"name", "passed", "summary_md", "details"}; exits 0 when no target failed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from arqonbus_server.gateway.auth import agent as auth_agent
from arqonbus_server.gateway.state.rooms import check_admin_parameters
from arqonbus_server.shared import commands, envelope, service, subjects
from arqonbus_server.shared.core.commands import checked_parameters
from arqonbus_server.shared.envelope import (
    DEPTH_MAX,
    ERROR_MESSAGE_MAX,
    ID_MAX,
    PROTOCOL_VERSION,
    ClientCommand,
    ClientEvent,
    ClientEventBatch,
    ClientResponse,
    ResponseError,
)
from arqonbus_server.shared.errors import (
    CATALOGUE,
    INVALID_ENVELOPE,
    INVALID_JSON,
    INVALID_NAME,
    INVALID_PARAMETERS,
    MESSAGE_TOO_LARGE,
    UNKNOWN_COMMAND,
    ArqonError,
    ErrorCode,
)
from arqonbus_server.shared.service import ServiceCall, ServiceReply
from arqonbus_server.shared.subjects import ChannelRef, SubjectScheme, is_valid_name
from chaos.suite import finish

MAX_BYTES = 65536  # the default max_envelope_bytes
TIMEOUT_DEFAULT_MS, TIMEOUT_MAX_MS = 5000, 60000  # the default service command timeouts
ROOT = Path(__file__).resolve().parent.parent
SCRATCH = ROOT / ".chaos" / "fuzz"

# Codes each entry point may raise; anything else is a failure too.
FRAME_CODES = frozenset({INVALID_JSON, INVALID_ENVELOPE, INVALID_NAME, MESSAGE_TOO_LARGE})
PARAMETER_CODES = frozenset({INVALID_PARAMETERS})
SERVICE_NAME_CODES = frozenset({UNKNOWN_COMMAND})
RESPONSE_ERROR_CODES = frozenset({INVALID_ENVELOPE})


# -- JSON text with everything a JSON library would refuse to write ---------------


@dataclass(frozen=True, slots=True)
class Raw:
    """A JSON fragment written as is: maybe invalid, huge, deep or not UTF-8."""

    text: bytes


@dataclass(frozen=True, slots=True)
class Pairs:
    """An object written from its (key, value) pairs, so a key can appear twice."""

    items: tuple[tuple[str, Any], ...]


def dump(value: Any) -> bytes:
    """Serialize a tree of plain JSON values, Raw fragments and Pairs objects."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Pairs | dict):
        items = value.items if isinstance(value, Pairs) else tuple(value.items())
        return b"{" + b",".join(orjson.dumps(k) + b":" + dump(v) for k, v in items) + b"}"
    if isinstance(value, list):
        return b"[" + b",".join(dump(v) for v in value) + b"]"
    return orjson.dumps(value)


# -- strategies ---------------------------------------------------------------------

NAME_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
names = st.text(NAME_ALPHABET, min_size=1, max_size=64)
# Printable text (str.isprintable): letters, marks, numbers, punctuation, symbols, space.
ids = st.text(
    st.characters(categories=("L", "M", "N", "P", "S"), include_characters=" ", codec="utf-8"),
    min_size=1,
    max_size=ID_MAX,
).filter(str.isprintable)
service_names = names.filter(lambda n: n not in commands.BUILTIN_COMMANDS)


def json_strategies(
    text_size: int, items: int, leaves: int, keys: int
) -> tuple[st.SearchStrategy[str], st.SearchStrategy[Any], st.SearchStrategy[dict[str, Any]]]:
    """Text orjson can write (no lone surrogates), JSON values, and JSON objects."""
    text = st.text(st.characters(codec="utf-8"), max_size=text_size)
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**63), max_value=2**64 - 1)
        | st.floats(allow_nan=False, allow_infinity=False)
        | text
    )
    values = st.recursive(
        scalars,
        lambda children: (
            st.lists(children, max_size=items) | st.dictionaries(text, children, max_size=items)
        ),
        max_leaves=leaves,
    )
    return text, values, st.dictionaries(text, values, max_size=keys)


json_text, json_values, json_objects = json_strategies(text_size=24, items=3, leaves=8, keys=3)

EDGE_INTS = (0, 1, -1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1)
_LITERALS = (
    b"NaN", b"-NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"1e-400", b"-0",
    b"-0.0", b"0.5", b"1E2", b"1.0", b"true", b"false", b"null", b'""', b"[]", b"{}",
    b"[null]", b'{"":null}', b'"\\ud800"', b'"\\udfff\\ud800"', b'"\\ud83d\\ude00"',
    b'"\xed\xa0\x80"', b'"\xff"', b'"\xc0\x80"', b'"\\u0000"', b'"\\u202e"', b'"\\u2028"',
    b'" "', b'"\\t"', b"01", b"1.", b".5", b"+1", b"0x10", b"'a'", b"[1,]", b'{"a":1,}',
    b"", b"[", b"{", b'"', b"\x00", b"tru", b"nul", b"\xef\xbb\xbf{}",
)  # fmt: skip


def _deep(depth: int, opener: str) -> Raw:
    close = {"[": b"]", '{"a":': b"}"}[opener]
    return Raw(opener.encode() * depth + b"0" + close * depth)


deep_fragments = st.builds(
    _deep,
    st.integers(1, 1100)
    | st.sampled_from((DEPTH_MAX - 2, DEPTH_MAX - 1, DEPTH_MAX, DEPTH_MAX + 1, 1000, 1023, 1024)),
    st.sampled_from(("[", '{"a":')),
)
big_number_fragments = (
    st.integers(min_value=-(10**400), max_value=10**400)
    | st.sampled_from(EDGE_INTS)
    | st.integers(1, 6000).map(lambda n: int("9" * min(n, 4000)))
).map(lambda n: Raw(str(n).encode())) | st.integers(4000, 6000).map(lambda n: Raw(b"9" * n))
long_strings = st.builds(
    lambda n, ch: Raw(b'"' + ch.encode() * n + b'"'),
    st.integers(0, 70000) | st.sampled_from((ID_MAX, ID_MAX + 1, 1024, 1025, 64, 65)),
    st.sampled_from(("x", "é", "\U0001f600", "\\n", "\\u0001")),
)
hostile_fragments = st.one_of(
    st.sampled_from(_LITERALS).map(Raw),
    big_number_fragments,
    deep_fragments,
    long_strings,
    json_values.map(lambda v: Raw(orjson.dumps(v))),
    st.text(max_size=200).map(lambda t: Raw(orjson.dumps(t))),
    st.binary(max_size=16).map(lambda b: Raw(b'"' + b + b'"')),
)
# Python values as the parameter parsers can get them, and some orjson never produces.
parameter_values = st.one_of(
    json_values,
    st.integers(),
    st.floats(),
    names,
    st.sampled_from(commands.BUILTIN_COMMANDS),
    st.sampled_from(EDGE_INTS),
    st.sampled_from((True, False, None, 1000, 1001, 1.0, "1", "", [], {}, [1], {"a": 1})),
)
parameters = st.dictionaries(
    st.sampled_from(("since_seq", "limit", "command", "timeout_ms")) | json_text,
    parameter_values,
    max_size=4,
)


@st.composite
def builtin_parameters(draw: st.DrawFn) -> dict[str, Any]:
    """Parameters a built-in command accepts (valid), to reach the success paths."""
    out: dict[str, Any] = {}
    if draw(st.booleans()):
        out["since_seq"] = draw(st.integers(0, 2**64 - 1) | st.none())
    if draw(st.booleans()):
        out["limit"] = draw(st.integers(1, commands.HISTORY_MAX_LIMIT))
    if draw(st.booleans()):
        out["command"] = draw(service_names)
    return out


def _envelope(kind: str, request_id: str, room: str, channel: str, payload: Any) -> dict[str, Any]:
    return {
        "version": PROTOCOL_VERSION,
        "id": request_id,
        "type": kind,
        "room": room,
        "channel": channel,
        "payload": payload,
    }


@st.composite
def valid_messages(draw: st.DrawFn) -> dict[str, Any]:
    """A valid client envelope (as a dict) of any of the client types."""
    kind = draw(st.sampled_from(envelope.CLIENT_TYPES))
    head = (draw(ids), draw(names), draw(names))
    payload: dict[str, Any]
    if kind == "event":
        payload = draw(json_objects)
    elif kind == "events":
        count = draw(st.integers(1, 4))
        batch_ids = draw(st.lists(ids, min_size=count, max_size=count, unique=True))
        payload = {"events": [{"id": i, "payload": draw(json_objects)} for i in batch_ids]}
    elif kind == "command":
        name = draw(st.sampled_from(commands.BUILTIN_COMMANDS) | service_names)
        payload = {"command": name, "parameters": draw(builtin_parameters() | json_objects)}
        if draw(st.booleans()):
            payload["timeout_ms"] = draw(st.integers(1, TIMEOUT_MAX_MS))
    elif draw(st.booleans()):
        payload = {"request_id": draw(ids), "status": "success", "result": draw(json_objects)}
    else:
        error: dict[str, Any] = {"code": draw(names), "message": draw(json_text)}
        if draw(st.booleans()):
            error["retryable"] = draw(st.booleans())
        payload = {"request_id": draw(ids), "status": "error", "error": error}
    message = _envelope(kind, *head, payload)
    if draw(st.booleans()):
        del message["version"]  # optional
    if draw(st.booleans()):
        message["from"], message["timestamp"] = draw(json_values), draw(json_values)  # ignored
    return message


# Where a mutation can land, per client type: top-level fields and the fields of payload.
_TOP = ("version", "id", "type", "room", "channel", "payload", "from", "timestamp", "extra")
_PATHS: dict[str, tuple[tuple[str, ...], ...]] = {
    "event": (("payload", "extra"),),
    "events": (("payload", "events"), ("payload", "extra")),
    "command": (
        ("payload", "command"),
        ("payload", "parameters"),
        ("payload", "timeout_ms"),
        ("payload", "parameters", "since_seq"),
        ("payload", "parameters", "limit"),
        ("payload", "parameters", "command"),
    ),
    "command_response": (
        ("payload", "request_id"),
        ("payload", "status"),
        ("payload", "result"),
        ("payload", "error"),
        ("payload", "error", "code"),
        ("payload", "error", "message"),
        ("payload", "error", "retryable"),
    ),
}


def _mutate(node: Any, path: tuple[str, ...], action: str, value: Any) -> Any:
    """A copy of ``node`` with ``action`` applied at ``path``; missing objects are created."""
    items = dict(node) if isinstance(node, dict) else {}
    key, rest = path[0], path[1:]
    if rest:
        items[key] = _mutate(items.get(key), rest, action, value)
        return items
    if action == "delete":
        items.pop(key, None)
        return items
    if action == "set" or key not in items:
        items[key] = value
        return items
    pairs = list(items.items())
    at = [k for k, _ in pairs].index(key)
    twice = [(key, value), pairs[at]] if action == "dup_first" else [pairs[at], (key, value)]
    return Pairs((*pairs[:at], *twice, *pairs[at + 1 :]))


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    """A valid envelope with one or two fields replaced, removed or duplicated."""
    message = draw(valid_messages())
    for _ in range(draw(st.integers(1, 2))):
        kind = message.get("type") if isinstance(message, dict) else None
        paths = tuple((k,) for k in _TOP) + _PATHS.get(kind if isinstance(kind, str) else "", ())
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(("set", "set", "delete", "dup_first", "dup_last")))
        value = draw(hostile_fragments | parameter_values.map(lambda v: Raw(_dump_lenient(v))))
        message = _mutate(message, path, action, value)
        if isinstance(message, Pairs):
            break
    return dump(message)


def _dump_lenient(value: Any) -> bytes:
    """orjson text, or the value's own JSON-ish text when orjson refuses it (NaN, 2**64)."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value).encode()  # writes NaN, Infinity and any int


@st.composite
def deep_frames(draw: st.DrawFn) -> bytes:
    """A valid envelope with nested arrays or objects, around the limits, at any field."""
    message = draw(valid_messages())
    paths = tuple((k,) for k in _TOP) + _PATHS[message["type"]]
    return dump(_mutate(message, draw(st.sampled_from(paths)), "set", draw(deep_fragments)))


_INSERTS = (b"{", b"}", b"[", b"]", b'"', b",", b":", b"\\", b"\x00", b"\xff", b"\xed\xa0\x80")


@st.composite
def byte_mutated_frames(draw: st.DrawFn) -> bytes:
    """A valid frame with a few bytes flipped, inserted, removed, or cut off."""
    data = bytearray(dump(draw(valid_messages())))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(("flip", "insert", "delete", "truncate")))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[at:at] = draw(st.sampled_from(_INSERTS) | st.binary(min_size=1, max_size=3))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        else:
            del data[at:]
    return bytes(data)


raw_frames = st.binary(max_size=256) | byte_mutated_frames() | mutated_frames()
# Text frames, including lone surrogates (not encodable as UTF-8).
any_text = st.text(
    st.characters(codec=None) | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
    max_size=64,
)


@st.composite
def text_frames(draw: st.DrawFn) -> str:
    base = dump(draw(valid_messages())).decode("utf-8", "surrogateescape")
    at = draw(st.integers(0, len(base)))
    return draw(st.sampled_from(("", base[:at]))) + draw(any_text) + base[at:]


@st.composite
def command_cases(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A built-in command and parameters: valid, hostile, or valid with one field swapped."""
    name = draw(st.sampled_from(commands.BUILTIN_COMMANDS))
    params = draw(builtin_parameters() | parameters)
    if draw(st.booleans()):
        key = draw(st.sampled_from(("since_seq", "limit", "command")))
        params = params | {key: draw(parameter_values)}
    return name, params


service_cases = st.tuples(
    st.text(max_size=80) | names | st.sampled_from(commands.BUILTIN_COMMANDS), parameter_values
)
response_errors = st.one_of(
    parameter_values,
    st.fixed_dictionaries(
        {},
        optional={
            "code": names | parameter_values,
            "message": json_text | st.text(max_size=1100) | parameter_values,
            "retryable": st.booleans() | parameter_values,
        },
    ),
    st.builds(
        lambda n, c: {"code": "x", "message": c * n, "retryable": False},
        st.sampled_from((1023, 1024, 1025)),
        st.sampled_from(("a", "\U0001f600")),
    ),
)


# -- the properties -----------------------------------------------------------------


def check_error(exc: BaseException, allowed: Iterable[ErrorCode]) -> ArqonError:
    """A rejection: ArqonError with an allowed catalogue code and a message that helps."""
    if not isinstance(exc, ArqonError):
        raise exc
    assert exc.code in CATALOGUE and exc.error is CATALOGUE[exc.code], exc.code
    assert exc.error in set(allowed), f"code {exc.code!r} is not one this input may get"
    message = exc.message
    assert message and message.endswith(exc.error.message), message
    assert len(message) <= ERROR_MESSAGE_MAX, f"message is {len(message)} characters"
    body = orjson.loads(envelope.encode_error(exc))
    assert body["payload"]["code"] == exc.code and body["payload"]["message"] == message
    return exc


def _readable_id(data: bytes | str) -> str | None:
    """The envelope id a frame carries, if the frame is an object with a valid id."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    value = obj.get("id") if isinstance(obj, dict) else None
    if isinstance(value, str) and 1 <= len(value) <= ID_MAX and value.isprintable():
        return value
    return None


def check_frame(data: bytes | str) -> None:
    """What the gateway session does with one inbound frame, up to NATS."""
    try:
        message = envelope.parse_client_frame(data, MAX_BYTES)
    except Exception as exc:
        error = check_error(exc, FRAME_CODES)
        if error.error in (INVALID_JSON, MESSAGE_TOO_LARGE):
            assert error.request_id is None
        else:
            size = len(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
            readable = _readable_id(data) if size <= MAX_BYTES else None
            assert error.request_id == readable, (error.request_id, readable)
        return
    assert isinstance(message, ClientEvent | ClientEventBatch | ClientCommand | ClientResponse)
    _check_id(message.id)
    assert is_valid_name(message.room) and is_valid_name(message.channel)
    if isinstance(message, ClientEvent):
        check_event(message)
    elif isinstance(message, ClientEventBatch):
        assert 1 <= len(message.events) <= envelope.BATCH_EVENTS_MAX
        assert len({event.id for event in message.events}) == len(message.events)
        for event in message.events:
            _check_id(event.id)
            assert (event.room, event.channel) == (message.room, message.channel)
            check_event(event)
    elif isinstance(message, ClientCommand):
        check_command(message)
    else:
        check_response(message)


def _check_id(value: object) -> None:
    assert isinstance(value, str) and 1 <= len(value) <= ID_MAX and value.isprintable()


def check_event(event: ClientEvent) -> None:
    """Stored, delivered and re-parsed: the same event."""
    assert isinstance(event.payload, dict)
    ref = ChannelRef.of("tenant", event.room, event.channel)
    SubjectScheme().dedupe_key(ref, "alice", event.id)
    stored = envelope.encode_stored_event(event, "alice", "2026-01-01T00:00:00.000Z")
    obj = envelope.decode_stored(stored)
    assert (obj["id"], obj["room"], obj["channel"]) == (event.id, event.room, event.channel)
    assert obj["payload"] == event.payload and obj["from"] == "alice"
    assert envelope.parse_client_frame(stored, len(stored)) == event
    assert orjson.loads(envelope.with_seq(stored, 7)) == obj | {"seq": 7}


def check_command(command: ClientCommand) -> None:
    assert isinstance(command.command, str) and command.command
    assert isinstance(command.parameters, dict)
    if commands.is_builtin(command.command):
        check_parameters(command.command, command.parameters)
    else:
        check_service_call(command)
    failed = ArqonError(INVALID_PARAMETERS, "x")
    answer = envelope.encode_command_response(command, "resp_1", "arqonbus", "t", error=failed)
    parsed = envelope.parse_client_frame(answer, len(answer))
    assert isinstance(parsed, ClientResponse) and parsed.request_id == command.id
    assert parsed.error is not None and parsed.error.code == failed.code


def check_service_call(command: ClientCommand) -> None:
    """Name and timeout as the caller's gateway checks them, then NATS and delivery."""
    try:
        name = commands.require_service_name(command.command)
        timeout_ms = commands.service_timeout_ms(
            command.timeout_ms, TIMEOUT_DEFAULT_MS, TIMEOUT_MAX_MS
        )
    except Exception as exc:
        check_error(exc, SERVICE_NAME_CODES | PARAMETER_CODES)
        return
    assert is_valid_name(name) and not commands.is_builtin(name)
    assert isinstance(timeout_ms, int) and 1 <= timeout_ms <= TIMEOUT_MAX_MS
    SubjectScheme().command(ChannelRef.of("tenant", command.room, command.channel), name)
    call = ServiceCall(name, command.parameters, "alice", command.id, "t", timeout_ms)
    assert ServiceCall.decode(call.encode()) == call
    delivery = envelope.encode_delivery(
        "dlv_1", command.room, command.channel, "alice", "t", call.delivery_payload()
    )
    delivered = envelope.parse_client_frame(delivery, len(delivery))
    assert delivered == ClientCommand(
        "dlv_1", command.room, command.channel, name, command.parameters, timeout_ms
    )


def check_response(response: ClientResponse) -> None:
    """A handler's answer: to the caller's gateway over NATS, then to the caller."""
    _check_id(response.request_id)
    assert (response.result is None) != (response.error is None)
    if response.error is not None:
        _check_response_error(response.error)
    reply = ServiceReply(response.id, "svc", "t", response.result, response.error)
    back = ServiceReply.decode(reply.encode())
    assert back == reply
    caller = ClientCommand("call-1", response.room, response.channel, "status", {})
    frame = envelope.encode_response(
        caller, back.id, back.sender, back.timestamp, back.result, back.error
    )
    parsed = envelope.parse_client_frame(frame, len(frame))
    assert parsed == ClientResponse(
        back.id, response.room, response.channel, "call-1", back.result, back.error
    )


def check_parameters(name: str, params: dict[str, Any]) -> None:
    """The parameters of a built-in command, parsed as the session does."""
    try:
        if name == commands.JOIN_CHANNEL:
            since = commands.join_params(params).since_seq
            assert since is None or (type(since) is int and since >= 0)
        elif name == commands.HISTORY:
            history = commands.history_params(params)
            assert type(history.since_seq) is int and history.since_seq >= 0
            assert type(history.limit) is int
            assert 1 <= history.limit <= commands.HISTORY_MAX_LIMIT
        elif name in (commands.REGISTER_HANDLER, commands.UNREGISTER_HANDLER):
            handled = commands.handler_params(params)
            assert is_valid_name(handled) and not commands.gateway_answers(handled, "r")
        elif (
            name in (*commands.ROOM_ADMIN_COMMANDS, commands.CREATE_ROOM, commands.KICK)
            or name == commands.CONFIGURE_ROOM
        ):
            check_admin_parameters(name, params)
        elif name in (*commands.PRESENCE_COMMANDS, *commands.GATEWAY_ADMIN_COMMANDS):
            # as the connection core does before any I/O (shared/core/commands.py)
            checked_parameters(ClientCommand("c-1", "r", "c", name, params))
        elif name == commands.REFRESH_TOKEN:
            assert commands.refresh_token_params(params)
        elif name == commands.REGISTER_AGENT:
            try:  # as the session does, short of storing it
                public_key, agent_name, role = auth_agent.registration_parameters(params)
                auth_agent.new_record("t", agent_name, public_key, role)
            except auth_agent.RegistrationError as exc:
                raise ArqonError(INVALID_PARAMETERS, str(exc)) from None
        else:
            # take no parameters: nothing is parsed
            assert name in (commands.LEAVE_CHANNEL, commands.LIMITS)
    except Exception as exc:
        check_error(exc, PARAMETER_CODES)


def check_command_case(case: tuple[str, dict[str, Any]]) -> None:
    check_parameters(*case)
    # The same parameters as a client sends them: through a frame, if the frame parses.
    frame = _envelope("command", "c-1", "r", "c", {"command": case[0], "parameters": case[1]})
    with contextlib.suppress(TypeError):  # orjson cannot write NaN or ints over 64 bits
        check_frame(orjson.dumps(frame))


def check_service_case(case: tuple[str, object]) -> None:
    name, timeout = case
    try:
        assert commands.require_service_name(name) == name and is_valid_name(name)
    except Exception as exc:
        check_error(exc, SERVICE_NAME_CODES)
    try:
        value = commands.service_timeout_ms(timeout, TIMEOUT_DEFAULT_MS, TIMEOUT_MAX_MS)
        assert type(value) is int and 1 <= value <= TIMEOUT_MAX_MS
    except Exception as exc:
        check_error(exc, PARAMETER_CODES)


def _check_response_error(error: ResponseError) -> None:
    assert is_valid_name(error.code) and isinstance(error.retryable, bool)
    assert isinstance(error.message, str) and len(error.message) <= ERROR_MESSAGE_MAX
    assert envelope.parse_response_error(error.as_dict()) == error


def check_response_error(value: object) -> None:
    try:
        error = envelope.parse_response_error(value)
    except Exception as exc:
        check_error(exc, RESPONSE_ERROR_CODES)
        return
    _check_response_error(error)


def check_roundtrip(message: dict[str, Any]) -> None:
    """A valid envelope parses to what it says, and goes on through the gateway."""
    data = dump(message)
    parsed = envelope.parse_client_frame(data, max(MAX_BYTES, len(data)))
    payload = message["payload"]
    head = (message["id"], message["room"], message["channel"])
    if message["type"] == "event":
        assert parsed == ClientEvent(*head, payload)
    elif message["type"] == "events":
        events = tuple(ClientEvent(e["id"], *head[1:], e["payload"]) for e in payload["events"])
        assert parsed == ClientEventBatch(*head, events)
    elif message["type"] == "command":
        assert parsed == ClientCommand(
            *head, payload["command"], payload["parameters"], payload.get("timeout_ms")
        )
    elif payload["status"] == "success":
        assert parsed == ClientResponse(*head, payload["request_id"], payload["result"], None)
    else:
        error = payload["error"]
        expected = ResponseError(error["code"], error["message"], error.get("retryable", False))
        assert parsed == ClientResponse(*head, payload["request_id"], None, expected)
    check_frame(data)


# -- targets and the hypothesis runner ------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    what: str
    strategy: st.SearchStrategy[Any]
    check: Callable[[Any], None]


TARGETS: tuple[Target, ...] = (
    Target("frame_bytes", "parse_client_frame: raw and mutated bytes", raw_frames, check_frame),
    Target(
        "frame_fields",
        "parse_client_frame: valid envelopes with fields replaced, removed or duplicated",
        mutated_frames(),
        check_frame,
    ),
    Target(
        "frame_nesting",
        "parse_client_frame: arrays and objects nested 1-1100 deep at any field",
        deep_frames(),
        check_frame,
    ),
    Target(
        "frame_text", "parse_client_frame: str frames, lone surrogates", text_frames(), check_frame
    ),
    Target(
        "frame_roundtrip",
        "valid envelopes: parse, store, deliver, answer, parse again",
        valid_messages(),
        check_roundtrip,
    ),
    Target(
        "command_parameters",
        "join_params, history_params, handler_params (direct and in a frame)",
        command_cases(),
        check_command_case,
    ),
    Target(
        "service_command",
        "require_service_name, service_timeout_ms",
        service_cases,
        check_service_case,
    ),
    Target(
        "response_error",
        "parse_response_error and ResponseError round trip",
        response_errors,
        check_response_error,
    ),
)


@dataclass
class Outcome:
    name: str
    engine: str
    examples: int = 0
    seconds: float = 0.0
    failures: list[dict[str, str]] = field(default_factory=list)
    note: str = ""


def _shown(value: object, limit: int = 600) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def hypothesis_test(target: Target, max_examples: int, outcome: Outcome | None = None) -> Any:
    """The target as a hypothesis test function; it records examples and the last failure."""

    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=False,
        report_multiple_bugs=False,
        phases=(Phase.explicit, Phase.generate, Phase.target, Phase.shrink),
        suppress_health_check=list(HealthCheck),
    )
    @given(target.strategy)
    def run(value: Any) -> None:
        if outcome is not None:
            outcome.examples += 1
        try:
            target.check(value)
        except Exception as exc:
            if outcome is not None:
                # Hypothesis runs the shrunk example last: the last record is the minimal one.
                failure = {"input": _shown(value), "error": f"{type(exc).__name__}: {exc}"[:600]}
                outcome.failures[:] = [failure]
            raise

    return run


def run_hypothesis(target: Target, seconds: float, chunk: int = 100) -> Outcome:
    """Run ``target`` in chunks until ``seconds`` pass or it fails."""
    outcome = Outcome(target.name, "hypothesis")
    start = time.monotonic()
    while True:
        try:
            hypothesis_test(target, chunk, outcome)()
        except Exception as exc:
            if not outcome.failures:
                outcome.failures.append({"input": "?", "error": f"{type(exc).__name__}: {exc}"})
            break
        if time.monotonic() - start >= seconds:
            break
    outcome.seconds = round(time.monotonic() - start, 1)
    return outcome


# -- atheris: coverage-guided raw bytes, in a child process ----------------------------


def _atheris_input(data: bytes) -> None:
    check_frame(data)
    check_frame(data.decode("utf-8", "surrogateescape"))  # the str path, lone surrogates too


def _libfuzzer_dict(path: Path) -> None:
    words = [
        *(f'"{w}"' for w in (*_TOP, *envelope.CLIENT_TYPES, *commands.BUILTIN_COMMANDS)),
        *(f'"{w}"' for w in ("parameters", "since_seq", "limit", "command", "timeout_ms")),
        *(f'"{w}"' for w in ("request_id", "status", "success", "error", "result", "code")),
        *('"message"', '"retryable"', f'"{PROTOCOL_VERSION}"', "true", "false", "null"),
        *("[[[[[[[[", '{"a":{"a":', "18446744073709551616", "1e400", '"\\ud800"', ":", ","),
    ]
    lines = []
    for i, word in enumerate(words):
        escaped = word.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'w{i}="{escaped}"')
    path.write_text("\n".join(lines) + "\n")


def _seed_corpus(corpus: Path) -> None:
    corpus.mkdir(parents=True, exist_ok=True)
    samples: list[Any] = [
        _envelope("event", "e1", "r", "c", {"text": "hi", "n": [1, 2.5, None, True]}),
        _envelope("command", "c1", "r", "c", {"command": "join_channel", "parameters": {}}),
        _envelope("command", "c2", "r", "c", {"command": "history", "parameters": {"limit": 5}}),
        _envelope("command", "c3", "r", "c", {"command": "svc", "timeout_ms": 100}),
        _envelope(
            "command",
            "c4",
            "r",
            "c",
            {"command": "register_handler", "parameters": {"command": "s"}},
        ),
        _envelope(
            "command_response",
            "a1",
            "r",
            "c",
            {"request_id": "d", "status": "success", "result": {}},
        ),
        _envelope(
            "command_response",
            "a2",
            "r",
            "c",
            {"request_id": "d", "status": "error", "error": {"code": "x", "message": "m"}},
        ),
    ]
    for i, sample in enumerate(samples):
        (corpus / f"seed{i}").write_bytes(dump(sample))


def run_atheris(seconds: float) -> Outcome:
    """libFuzzer on raw frames for ``seconds``, in a child process (it owns its process)."""
    outcome = Outcome("frame_bytes_coverage", "atheris")
    if importlib.util.find_spec("atheris") is None:
        outcome.note = "atheris is not installed (pip install atheris); hypothesis only"
        return outcome
    SCRATCH.mkdir(parents=True, exist_ok=True)
    corpus, artifacts = SCRATCH / "corpus", SCRATCH / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    for old in artifacts.glob("crash-*"):
        old.unlink()
    _seed_corpus(corpus)
    _libfuzzer_dict(SCRATCH / "frames.dict")
    budget = max(1, int(seconds))
    argv = [
        sys.executable,
        "-m",
        "chaos.fuzz",
        "--atheris-child",
        f"-max_total_time={budget}",
        "-print_final_stats=1",
        "-timeout=20",
        "-max_len=8192",
        f"-dict={SCRATCH / 'frames.dict'}",
        f"-artifact_prefix={artifacts}/",
        str(corpus),
    ]
    start = time.monotonic()
    try:
        proc = subprocess.run(
            argv, cwd=ROOT, capture_output=True, text=True, timeout=budget + 120, check=False
        )
    except subprocess.TimeoutExpired:
        outcome.failures.append({"input": "?", "error": f"atheris ran past {budget + 120} s"})
        return outcome
    outcome.seconds = round(time.monotonic() - start, 1)
    log = proc.stdout + proc.stderr
    (SCRATCH / "atheris.log").write_text(log)
    runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", log)
    outcome.examples = int(runs[-1]) if runs else 0
    crashes = sorted(artifacts.glob("crash-*"))
    if proc.returncode != 0 or crashes:
        error = re.findall(r"^(\w+(?:Error|Exception)\b.*)$", log, re.MULTILINE)
        data = crashes[0].read_bytes() if crashes else b""
        outcome.failures.append(
            {
                "input": _shown(data),
                "error": (error[-1] if error else f"exit code {proc.returncode}")[:600],
                "log": str(SCRATCH / "atheris.log"),
            }
        )
    return outcome


def _atheris_child(args: list[str]) -> None:
    import atheris

    # Only the code under test: instrumenting every loaded module takes minutes.
    for module in (envelope, commands, subjects, service):
        for value in vars(module).values():
            if getattr(value, "__module__", None) != module.__name__:
                continue
            members = vars(value).values() if inspect.isclass(value) else (value,)
            for member in members:
                function = getattr(member, "__func__", member)
                if inspect.isfunction(function):
                    atheris.instrument_func(function)
    atheris.Setup([sys.argv[0], *args], _atheris_input)
    atheris.Fuzz()


# -- report ---------------------------------------------------------------------------


def summary_markdown(outcomes: list[Outcome], passed: bool, seconds: float) -> str:
    lines = [
        "### Fuzz: envelope decoder and command parameters",
        "",
        f"**{'PASS' if passed else 'FAIL'}** in {seconds:.0f} s. Property: every input returns a "
        "valid value or raises ArqonError with a fitting catalogue code and a message that says "
        "what to do; accepted envelopes re-encode and round-trip.",
        "",
        "| Target | Engine | Examples | Seconds | Failures |",
        "|---|---|---:|---:|---:|",
    ]
    for o in outcomes:
        note = f" ({o.note})" if o.note else ""
        lines.append(
            f"| {o.name} | {o.engine}{note} | {o.examples} | {o.seconds} | {len(o.failures)} |"
        )
    for o in outcomes:
        for failure in o.failures:
            lines += ["", f"- **{o.name}**: `{failure['error']}`; input `{failure['input'][:300]}`"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in and args_in[0] == "--atheris-child":
        _atheris_child(args_in[1:])
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m chaos.fuzz", description="Fuzz the envelope decoder and command parameters."
    )
    parser.add_argument("--json", required=True, type=Path, help="where to write the result")
    parser.add_argument("--long", action="store_true", help="the full run (about 3 minutes)")
    parser.add_argument("--seconds", type=float, help="total time budget (default 15, 180 --long)")
    args = parser.parse_args(args_in)
    total = args.seconds if args.seconds is not None else (180.0 if args.long else 15.0)
    coverage_share = 0.25 if importlib.util.find_spec("atheris") is not None else 0.0
    per_target = total * (1 - coverage_share) / len(TARGETS)
    start = time.monotonic()
    outcomes = [run_hypothesis(t, per_target) for t in TARGETS]
    outcomes.append(run_atheris(total * coverage_share))
    seconds = time.monotonic() - start
    passed = not any(o.failures for o in outcomes)
    result = {
        "name": "fuzz",
        "passed": passed,
        "summary_md": summary_markdown(outcomes, passed, seconds),
        "details": {
            "seconds": round(seconds, 1),
            "budget_seconds": total,
            "targets": [
                {
                    "name": o.name,
                    "engine": o.engine,
                    "what": next((t.what for t in TARGETS if t.name == o.name), "raw frame bytes"),
                    "examples": o.examples,
                    "seconds": o.seconds,
                    "failures": o.failures,
                    "note": o.note,
                }
                for o in outcomes
            ],
        },
    }
    return finish(args.json, result)


if __name__ == "__main__":
    sys.exit(main())
