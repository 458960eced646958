"""Envelope parsing and encoding: bytes in, typed messages or stable error codes out."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arqonbus_server.shared.envelope import (
    ID_MAX,
    PROTOCOL_VERSION,
    ClientCommand,
    ClientEvent,
    ClientResponse,
    ResponseError,
    decode_stored,
    encode_ack,
    encode_command_response,
    encode_error,
    encode_gap,
    encode_stored_event,
    encode_welcome,
    parse_client_frame,
    with_seq,
)
from arqonbus_server.shared.errors import (
    INVALID_ENVELOPE,
    INVALID_PARAMETERS,
    UNAVAILABLE,
    ArqonError,
)
from chaos.fuzz import json_strategies

MAX = 65536
REQUEST_ID = "req-1"

# -- helpers and strategies -----------------------------------------------------


def event_frame(**changes: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "version": PROTOCOL_VERSION,
        "id": REQUEST_ID,
        "type": "event",
        "room": "science",
        "channel": "general",
        "payload": {"text": "hello"},
    }
    frame.update(changes)
    return frame


def command_frame(**changes: Any) -> dict[str, Any]:
    payload = {"command": "join_channel", "parameters": {"since_seq": 3}}
    return event_frame(type="command", payload=payload) | changes


def response_frame(**payload_changes: Any) -> dict[str, Any]:
    payload = {"request_id": "dlv_1", "status": "success", "result": {"ok": True}}
    return event_frame(type="command_response", payload=payload | payload_changes)


def without(frame: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in frame.items() if k != key}


def rejected(data: bytes | str, max_bytes: int = MAX) -> ArqonError:
    with pytest.raises(ArqonError) as info:
        parse_client_frame(data, max_bytes)
    return info.value


json_text, json_values, json_objects = json_strategies(text_size=20, items=4, leaves=20, keys=6)


# -- valid frames ---------------------------------------------------------------


def test_event_frame_parses_to_client_event() -> None:
    parsed = parse_client_frame(orjson.dumps(event_frame()), MAX)
    assert parsed == ClientEvent(REQUEST_ID, "science", "general", {"text": "hello"})


def test_command_frame_parses_to_client_command() -> None:
    parsed = parse_client_frame(orjson.dumps(command_frame()), MAX)
    assert parsed == ClientCommand(
        REQUEST_ID, "science", "general", "join_channel", {"since_seq": 3}
    )


def test_str_frame_parses_like_bytes_frame() -> None:
    frame = event_frame(payload={"text": "héllo ✓"})
    as_str = parse_client_frame(orjson.dumps(frame).decode(), MAX)
    assert as_str == parse_client_frame(orjson.dumps(frame), MAX)
    assert isinstance(as_str, ClientEvent)
    assert as_str.payload == {"text": "héllo ✓"}


def test_missing_version_defaults_to_current() -> None:
    parsed = parse_client_frame(orjson.dumps(without(event_frame(), "version")), MAX)
    assert isinstance(parsed, ClientEvent)


@pytest.mark.parametrize("parameters", [None, "missing"])
def test_command_parameters_default_to_empty(parameters: Any) -> None:
    payload: dict[str, Any] = {"command": "leave_channel"}
    if parameters != "missing":
        payload["parameters"] = parameters
    parsed = parse_client_frame(orjson.dumps(command_frame(payload=payload)), MAX)
    assert isinstance(parsed, ClientCommand)
    assert parsed.parameters == {}


def test_unknown_command_name_still_parses() -> None:
    # Whether a command exists is decided by shared.commands, not by the envelope.
    payload = {"command": "status", "parameters": {"check": "pool"}}
    parsed = parse_client_frame(orjson.dumps(command_frame(payload=payload)), MAX)
    assert isinstance(parsed, ClientCommand)
    assert parsed.command == "status"


@pytest.mark.parametrize("name", ["a", "A-z_0-9", "x" * 64])
def test_boundary_names_are_accepted(name: str) -> None:
    parsed = parse_client_frame(orjson.dumps(event_frame(room=name, channel=name)), MAX)
    assert (parsed.room, parsed.channel) == (name, name)


@pytest.mark.parametrize("request_id", ["a", "x" * ID_MAX, "id with spaces", "ünïcode-✓"])
def test_boundary_ids_are_accepted(request_id: str) -> None:
    assert parse_client_frame(orjson.dumps(event_frame(id=request_id)), MAX).id == request_id


@settings(max_examples=200)
@given(payload=json_objects)
def test_any_json_object_payload_is_carried_unchanged(payload: dict[str, Any]) -> None:
    parsed = parse_client_frame(orjson.dumps(event_frame(payload=payload)), 10**7)
    assert isinstance(parsed, ClientEvent)
    assert parsed.payload == payload


# -- rejections -----------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        "",
        b"{",
        b"not json",
        b'{"id": "a"} trailing',
        b"NaN",
        b"\xff\xfe",
        b'{"id": "\xff"}',
        b'{"id": "a", "payload": {"x": "\\ud800"}}',
    ],
)
def test_non_json_or_invalid_utf8_is_invalid_json(data: bytes | str) -> None:
    error = rejected(data)
    assert error.code == "invalid_json"
    assert error.request_id is None


def test_str_frame_with_lone_surrogate_is_invalid_json() -> None:
    # A str that cannot be encoded as UTF-8 is bad input, not a crash.
    error = rejected('{"id": "a\ud800", "type": "event"}')
    assert error.code == "invalid_json"


@pytest.mark.parametrize("data", [b"[]", b'["id"]', b'"text"', b"1", b"null", b"true"])
def test_non_object_is_invalid_envelope(data: bytes) -> None:
    error = rejected(data)
    assert error.code == "invalid_envelope"
    assert error.request_id is None


@pytest.mark.parametrize(
    "frame",
    [
        without(event_frame(), "id"),
        event_frame(id=""),
        event_frame(id="x" * (ID_MAX + 1)),
        event_frame(id=123),
        event_frame(id=None),
        event_frame(id=["a"]),
        event_frame(id="a\x00b"),
        event_frame(id="a\nb"),
        event_frame(id="tab\there"),
        event_frame(id="del\x7f"),
    ],
    ids=["missing", "empty", "too-long", "int", "null", "list", "nul", "newline", "tab", "del"],
)
def test_bad_id_is_invalid_envelope_without_request_id(frame: dict[str, Any]) -> None:
    error = rejected(orjson.dumps(frame))
    assert error.code == "invalid_envelope"
    assert error.request_id is None
    assert "'id'" in error.message


@pytest.mark.parametrize(
    ("frame", "field"),
    [
        (event_frame(version="2.0"), "version"),
        (event_frame(version=1.0), "version"),
        (event_frame(version=None), "version"),
        (event_frame(type="message"), "type"),
        (event_frame(type="ack"), "type"),
        (event_frame(type="command_response"), "payload.request_id"),
        (response_frame(request_id=""), "payload.request_id"),
        (response_frame(request_id="a\nb"), "payload.request_id"),
        (response_frame(status="ok"), "payload.status"),
        (response_frame(result=[1]), "payload.result"),
        (response_frame(status="error"), "payload.error"),
        (
            response_frame(status="error", error={"code": "a.b", "message": "m"}),
            "payload.error.code",
        ),
        (
            response_frame(status="error", error={"code": "c", "message": 7}),
            "payload.error.message",
        ),
        (
            response_frame(status="error", error={"code": "c", "message": "x" * 1025}),
            "payload.error.message",
        ),
        (
            response_frame(status="error", error={"code": "c", "message": "m", "retryable": "yes"}),
            "payload.error.retryable",
        ),
        (without(event_frame(), "type"), "type"),
        (event_frame(payload=[1, 2]), "payload"),
        (event_frame(payload="text"), "payload"),
        (event_frame(payload=None), "payload"),
        (without(event_frame(), "payload"), "payload"),
        (command_frame(payload={"parameters": {}}), "payload.command"),
        (command_frame(payload={"command": ""}), "payload.command"),
        (command_frame(payload={"command": 7}), "payload.command"),
        (command_frame(payload={"command": "history", "parameters": [1]}), "payload.parameters"),
        (command_frame(payload={"command": "history", "parameters": "x"}), "payload.parameters"),
    ],
)
def test_bad_field_is_invalid_envelope_with_request_id(frame: dict[str, Any], field: str) -> None:
    error = rejected(orjson.dumps(frame))
    assert error.code == "invalid_envelope"
    assert error.request_id == REQUEST_ID
    assert f"'{field}'" in error.message


def test_a_handler_success_response_parses() -> None:
    parsed = parse_client_frame(orjson.dumps(response_frame(result=None)), 65536)
    assert isinstance(parsed, ClientResponse)
    assert (parsed.id, parsed.request_id, parsed.result, parsed.error) == (
        REQUEST_ID,
        "dlv_1",
        {},
        None,
    )


def test_a_handler_error_response_parses_with_retryable_defaulting_to_false() -> None:
    frame = response_frame(status="error", error={"code": "pool_exhausted", "message": "busy"})
    parsed = parse_client_frame(orjson.dumps(frame), 65536)
    assert isinstance(parsed, ClientResponse)
    assert parsed.result is None
    assert parsed.error == ResponseError("pool_exhausted", "busy", False)


def test_service_command_keeps_timeout_ms_as_sent() -> None:
    frame = command_frame(payload={"command": "status", "timeout_ms": 250})
    parsed = parse_client_frame(orjson.dumps(frame), 65536)
    assert isinstance(parsed, ClientCommand)
    assert parsed.timeout_ms == 250


BAD_NAMES: list[Any] = [
    "a.b",
    "*",
    ">",
    "a*",
    "a>",
    "a b",
    " a",
    "a\t",
    "a\x00",
    "a\n",
    "é",
    "",
    "x" * 65,
    5,
    None,
    ["a"],
    {"a": 1},
    True,
]


@pytest.mark.parametrize("field", ["room", "channel"])
@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_room_or_channel_is_invalid_name(field: str, name: Any) -> None:
    for frame in (event_frame(**{field: name}), command_frame(**{field: name})):
        error = rejected(orjson.dumps(frame))
        assert error.code == "invalid_name"
        assert error.request_id == REQUEST_ID
        assert field in error.message


@pytest.mark.parametrize("field", ["room", "channel"])
def test_missing_room_or_channel_is_invalid_name(field: str) -> None:
    error = rejected(orjson.dumps(without(event_frame(), field)))
    assert error.code == "invalid_name"
    assert error.request_id == REQUEST_ID


# -- size limit -----------------------------------------------------------------


def test_bytes_frame_at_limit_parses_and_one_over_is_too_large() -> None:
    data = orjson.dumps(event_frame())
    assert isinstance(parse_client_frame(data, len(data)), ClientEvent)
    error = rejected(data, len(data) - 1)
    assert error.code == "message_too_large"
    assert error.request_id is None


def test_str_frame_is_measured_in_utf8_bytes() -> None:
    text = orjson.dumps(event_frame(payload={"text": "é" * 100})).decode()
    utf8_size = len(text.encode())
    assert utf8_size == len(text) + 100
    assert isinstance(parse_client_frame(text, utf8_size), ClientEvent)
    assert rejected(text, utf8_size - 1).code == "message_too_large"
    assert rejected(text, len(text)).code == "message_too_large"


def test_size_is_checked_before_parsing() -> None:
    assert rejected(b"x" * 101, 100).code == "message_too_large"
    assert rejected("x" * 101, 100).code == "message_too_large"


def test_too_large_error_names_size_and_limit() -> None:
    error = rejected(b"x" * 2000, 1024)
    assert "2000" in error.message
    assert "1024" in error.message


# -- gateway -> store -------------------------------------------------------------


def test_stored_event_overwrites_from_and_sets_timestamp() -> None:
    frame = event_frame(**{"from": "mallory", "timestamp": "1970-01-01T00:00:00Z"})
    event = parse_client_frame(orjson.dumps(frame), MAX)
    assert isinstance(event, ClientEvent)
    stored = decode_stored(encode_stored_event(event, "alice", "2025-01-01T12:00:00.000Z"))
    assert stored == {
        "version": PROTOCOL_VERSION,
        "id": REQUEST_ID,
        "type": "event",
        "room": "science",
        "channel": "general",
        "from": "alice",
        "timestamp": "2025-01-01T12:00:00.000Z",
        "payload": {"text": "hello"},
    }


@settings(max_examples=200)
@given(payload=json_objects, seq=st.integers(min_value=0, max_value=2**64 - 1))
def test_with_seq_is_stored_envelope_plus_seq(payload: dict[str, Any], seq: int) -> None:
    event = ClientEvent(REQUEST_ID, "room", "channel", payload)
    stored = encode_stored_event(event, "alice", "2025-01-01T12:00:00.000Z")
    delivered = orjson.loads(with_seq(stored, seq))
    assert delivered == {**decode_stored(stored), "seq": seq}
    assert delivered["payload"] == payload


# -- gateway -> client --------------------------------------------------------------


def test_welcome_shape() -> None:
    limits = {"max_envelope_bytes": MAX, "max_in_flight": 1000}
    assert orjson.loads(encode_welcome("s-1", "node-a", limits)) == {
        "version": PROTOCOL_VERSION,
        "type": "welcome",
        "payload": {
            "session_id": "s-1",
            "node": "node-a",
            "protocol": PROTOCOL_VERSION,
            "limits": limits,
        },
    }


@pytest.mark.parametrize("duplicate", [False, True])
def test_ack_shape(duplicate: bool) -> None:
    payload: dict[str, Any] = {"request_id": REQUEST_ID, "seq": 42}
    if duplicate:
        payload["duplicate"] = True
    assert orjson.loads(encode_ack(REQUEST_ID, "science", "general", 42, duplicate)) == {
        "version": PROTOCOL_VERSION,
        "type": "ack",
        "room": "science",
        "channel": "general",
        "payload": payload,
    }


def test_error_shape_carries_code_message_and_retryable() -> None:
    error = ArqonError(UNAVAILABLE, "store did not answer", REQUEST_ID)
    assert orjson.loads(encode_error(error)) == {
        "version": PROTOCOL_VERSION,
        "type": "error",
        "payload": {
            "request_id": REQUEST_ID,
            "code": "unavailable",
            "message": error.message,
            "retryable": True,
        },
    }


def test_error_shape_with_unknown_request_and_extra_fields() -> None:
    error = ArqonError(INVALID_ENVELOPE)
    decoded = orjson.loads(encode_error(error, {"max_envelope_bytes": MAX}))
    assert decoded["payload"] == {
        "request_id": None,
        "code": "invalid_envelope",
        "message": INVALID_ENVELOPE.message,
        "retryable": False,
        "max_envelope_bytes": MAX,
    }


def test_error_for_a_parse_failure_echoes_the_request_id() -> None:
    error = rejected(orjson.dumps(event_frame(room="a.b")))
    decoded = orjson.loads(encode_error(error))
    assert decoded["payload"]["request_id"] == REQUEST_ID
    assert decoded["payload"]["code"] == "invalid_name"


# The seed's Example 4 command response, field for field.
EXAMPLE_4_KEYS = {"version", "id", "type", "room", "channel", "from", "timestamp", "payload"}


def sample_command() -> ClientCommand:
    return ClientCommand("arq_cmd_001", "services", "database", "history", {})


def test_command_response_success_is_example_4_shape() -> None:
    result = {"active_connections": 15, "max_connections": 100, "avg_response_time_ms": 2.3}
    encoded = encode_command_response(
        sample_command(), "arq_resp_001", "db_service", "2025-01-01T12:00:00.025Z", result=result
    )
    assert orjson.loads(encoded) == {
        "version": "1.0",
        "id": "arq_resp_001",
        "type": "command_response",
        "room": "services",
        "channel": "database",
        "from": "db_service",
        "timestamp": "2025-01-01T12:00:00.025Z",
        "payload": {"request_id": "arq_cmd_001", "status": "success", "result": result},
    }


def test_command_response_without_result_has_empty_result() -> None:
    encoded = encode_command_response(sample_command(), "r-1", "gateway", "t")
    payload = orjson.loads(encoded)["payload"]
    assert payload == {"request_id": "arq_cmd_001", "status": "success", "result": {}}


def test_command_response_error_keeps_example_4_envelope() -> None:
    error = ArqonError(INVALID_PARAMETERS, "parameter 'limit' must be between 1 and 1000")
    decoded = orjson.loads(
        encode_command_response(sample_command(), "r-2", "gateway", "t", error=error)
    )
    assert set(decoded) == EXAMPLE_4_KEYS
    assert decoded["type"] == "command_response"
    assert decoded["payload"]["request_id"] == "arq_cmd_001"
    assert decoded["payload"]["status"] == "error"
    assert decoded["payload"]["error"] == {
        "code": "invalid_parameters",
        "message": error.message,
        "retryable": False,
    }


def test_gap_shape() -> None:
    assert orjson.loads(encode_gap("science", "general", 10, 57)) == {
        "version": PROTOCOL_VERSION,
        "type": "gap",
        "room": "science",
        "channel": "general",
        "payload": {"after_seq": 10, "first_available_seq": 57},
    }


# -- regressions found by fuzzing (chaos/fuzz.py) ---------------------------------

from arqonbus_server.shared.envelope import (  # noqa: E402
    DEPTH_MAX,
    ERROR_MESSAGE_MAX,
    encode_delivery,
    encode_response,
)
from arqonbus_server.shared.service import ServiceCall, ServiceReply  # noqa: E402


def nested(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


def frame_with_raw(frame: dict[str, Any], path: tuple[str, ...], raw: bytes) -> bytes:
    """``frame`` as JSON with the value at ``path`` replaced by raw JSON text."""
    node = frame
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = "RAW-VALUE"
    return orjson.dumps(frame).replace(b'"RAW-VALUE"', raw)


@pytest.mark.parametrize(
    ("frame", "path"),
    [
        (event_frame(), ("version",)),
        (event_frame(), ("type",)),
        (event_frame(), ("room",)),
        (event_frame(), ("channel",)),
        (response_frame(), ("payload", "status")),
    ],
)
def test_a_deeply_nested_field_is_invalid_envelope_not_a_recursion_error(
    frame: dict[str, Any], path: tuple[str, ...]
) -> None:
    # orjson reads up to 1024 levels; quoting such a value in the error message recursed
    # past Python's limit and the RecursionError ended the session.
    error = rejected(frame_with_raw(frame, path, nested(1000)))
    assert error.code == "invalid_envelope"
    assert error.request_id == REQUEST_ID
    assert f"more than {DEPTH_MAX} levels" in error.message


def test_an_event_at_the_depth_limit_is_stored_and_one_level_more_is_refused() -> None:
    # The envelope and the payload are two levels. An event one level deeper than orjson
    # can write used to parse and then fail in encode_stored_event (TypeError).
    at_limit = frame_with_raw(event_frame(), ("payload", "x"), nested(DEPTH_MAX - 2))
    event = parse_client_frame(at_limit, MAX)
    assert isinstance(event, ClientEvent)
    stored = encode_stored_event(event, "alice", "2026-01-01T00:00:00.000Z")
    assert parse_client_frame(stored, MAX) == event
    over = frame_with_raw(event_frame(), ("payload", "x"), nested(DEPTH_MAX - 1))
    error = rejected(over)
    assert (error.code, error.request_id) == ("invalid_envelope", REQUEST_ID)


def test_service_parameters_at_the_depth_limit_reach_the_handler() -> None:
    # Deeper parameters used to parse and then fail in ServiceCall.encode: internal.
    payload = {"command": "status", "parameters": {"x": "RAW-VALUE"}}
    raw = orjson.dumps(command_frame(payload=payload))
    command = parse_client_frame(raw.replace(b'"RAW-VALUE"', nested(DEPTH_MAX - 3)), MAX)
    assert isinstance(command, ClientCommand)
    call = ServiceCall(command.command, command.parameters, "alice", command.id, "t", 5000)
    assert ServiceCall.decode(call.encode()) == call
    delivery = encode_delivery("dlv_1", "r", "c", "alice", "t", call.delivery_payload())
    assert parse_client_frame(delivery, MAX) == ClientCommand(
        "dlv_1", "r", "c", "status", command.parameters, 5000
    )
    too_deep = raw.replace(b'"RAW-VALUE"', nested(DEPTH_MAX - 2))
    assert rejected(too_deep).code == "invalid_envelope"


def test_a_handler_answer_at_the_depth_limit_reaches_the_caller() -> None:
    # Deeper results used to parse and then fail in ServiceReply.encode, ending the
    # handler's session.
    raw = orjson.dumps(response_frame(result={"x": "RAW-VALUE"}))
    answer = parse_client_frame(raw.replace(b'"RAW-VALUE"', nested(DEPTH_MAX - 3)), MAX)
    assert isinstance(answer, ClientResponse)
    reply = ServiceReply(answer.id, "svc", "t", answer.result, None)
    assert ServiceReply.decode(reply.encode()) == reply
    frame = encode_response(sample_command(), reply.id, "svc", "t", reply.result)
    assert orjson.loads(frame)["payload"]["result"] == answer.result
    too_deep = raw.replace(b'"RAW-VALUE"', nested(DEPTH_MAX - 2))
    assert rejected(too_deep).code == "invalid_envelope"


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    payload = {"text": "[{" * 5000, "list": [[["a"]]]}
    parsed = parse_client_frame(orjson.dumps(event_frame(payload=payload)), MAX)
    assert isinstance(parsed, ClientEvent)
    assert parsed.payload == payload


@pytest.mark.parametrize(
    ("frame", "field"),
    [
        (event_frame(version="x" * 60000), "version"),
        (event_frame(type="x" * 60000), "type"),
        (response_frame(status="x" * 60000), "payload.status"),
    ],
)
def test_a_rejected_value_is_quoted_cut_short(frame: dict[str, Any], field: str) -> None:
    # The whole value used to be quoted: a 60 KB error message.
    error = rejected(orjson.dumps(frame))
    assert f"'{field}'" in error.message
    assert "'xxxx" in error.message and "..." in error.message
    assert len(error.message) <= ERROR_MESSAGE_MAX


# -- batched delivery (docs/protocol.md#batched-delivery) --------------------------------------

import itertools  # noqa: E402

from arqonbus_server.shared.envelope import (  # noqa: E402
    DELIVERY_BATCH_BYTES,
    delivery_batches,
    encode_run,
)


def delivered_form(seq: int, pad: int = 0) -> bytes:
    event = {"version": "1.0", "id": f"e{seq}", "type": "event", "room": "r", "channel": "c"}
    return with_seq(orjson.dumps({**event, "payload": {"pad": "x" * pad}}), seq)


def test_a_run_of_events_is_an_events_message_holding_each_as_delivered() -> None:
    forms = [delivered_form(seq) for seq in (3, 5, 8)]
    message = orjson.loads(encode_run("r", "c", forms))
    assert {k: v for k, v in message.items() if k != "payload"} == {
        "version": "1.0",
        "type": "events",
        "room": "r",
        "channel": "c",
    }
    assert message["payload"]["events"] == [orjson.loads(f) for f in forms]
    assert encode_run("r", "c", forms[:1]) == forms[0]  # one event: its event message


@given(st.lists(st.integers(min_value=0, max_value=3 * DELIVERY_BATCH_BYTES // 2), max_size=12))
@settings(max_examples=50, deadline=None)
def test_runs_keep_order_and_stay_within_the_bytes_bound(pads: list[int]) -> None:
    forms = [delivered_form(seq, pad) for seq, pad in enumerate(pads, 1)]
    runs = delivery_batches(forms)
    assert [form for run in runs for form in run] == forms
    for run in runs:
        assert run  # never empty
        assert len(run) == 1 or sum(len(form) for form in run) <= DELIVERY_BATCH_BYTES
    for before, after in itertools.pairwise(runs):  # each run is as long as it may be
        assert sum(len(form) for form in before) + len(after[0]) > DELIVERY_BATCH_BYTES
