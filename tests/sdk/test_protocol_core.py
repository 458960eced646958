"""The SDK's sans-I/O core: frames in, frames and events out, no sockets and no clocks."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest

from arqonbus import (
    Ack,
    Banned,
    Event,
    Gap,
    InvalidEnvelope,
    InvalidName,
    MessageTooLarge,
    RateLimited,
    Unavailable,
)
from arqonbus._protocol import (
    Acked,
    BatchAcked,
    ClientProtocol,
    CommandResult,
    Delivered,
    ErrorReceived,
    GapDetected,
    Joined,
    JoinRetry,
    Paused,
    PublishFailed,
    RemovedFromRoom,
    ServiceRequest,
    SubscriptionFailed,
    SubscriptionState,
)
from arqonbus.models import Welcome

ROOM, CHANNEL = "science", "general"


def make_core() -> ClientProtocol:
    counter = itertools.count(1)
    return ClientProtocol(new_id=lambda prefix: f"{prefix or 'id'}_{next(counter)}")


def welcome(**limits: int) -> Welcome:
    return Welcome.from_wire({"type": "welcome", "payload": {"node": "gw1", "limits": limits}})


def sent(core: ClientProtocol) -> list[dict[str, Any]]:
    return [orjson.loads(frame) for frame in core.data_to_send()]


def event(seq: int, room: str = ROOM, channel: str = CHANNEL) -> dict[str, Any]:
    return {
        "version": "1.0",
        "id": f"e{seq}",
        "type": "event",
        "room": room,
        "channel": channel,
        "from": "alice",
        "timestamp": "2026-01-01T00:00:00.000Z",
        "payload": {"n": seq},
        "seq": seq,
    }


def response(request_id: str, result: dict[str, Any] | None = None, **error: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {"request_id": request_id}
    if error:
        payload.update(status="error", error=error)
    else:
        payload.update(status="success", result=result or {})
    return {"type": "command_response", "room": ROOM, "channel": CHANNEL, "payload": payload}


def error_frame(request_id: str | None, code: str, **extra: Any) -> dict[str, Any]:
    payload = {"request_id": request_id, "code": code, "message": "m", "retryable": False}
    return {"version": "1.0", "type": "error", "payload": {**payload, **extra}}


def joined(
    core: ClientProtocol, since_seq: int | None = None, maxsize: int = 100
) -> SubscriptionState:
    """A connected core with one subscription whose join succeeded (last_seq 0 without since)."""
    state = SubscriptionState(ROOM, CHANNEL, since_seq, maxsize=maxsize)
    core.subscribe(state)
    (join,) = sent(core)
    core.receive(response(join["id"], {"last_seq": 0}))
    return state


def take_all(core: ClientProtocol, state: SubscriptionState) -> list[Event | Gap]:
    items = []
    while (item := core.take(state)) is not None:
        items.append(item)
    return items


# -- publishing ------------------------------------------------------------------------------


def test_publish_while_connected_sends_the_event_and_the_ack_settles_it() -> None:
    core = make_core()
    core.connection_made(welcome())
    request_id = core.publish(ROOM, CHANNEL, {"n": 1}, id="e1")

    assert request_id == "e1"
    assert sent(core) == [
        {
            "version": "1.0",
            "id": "e1",
            "type": "event",
            "room": ROOM,
            "channel": CHANNEL,
            "payload": {"n": 1},
        }
    ]
    ack = {"type": "ack", "payload": {"request_id": "e1", "seq": 7}}
    assert core.receive(ack) == [Acked("e1", 7, False)]
    assert core.receive(ack) == []  # settled: a second ack answers nothing
    assert core.in_flight == 0


def test_unacked_events_are_resent_with_the_same_id_and_bytes_on_each_connection() -> None:
    core = make_core()
    core.publish(ROOM, CHANNEL, {"n": 1}, id="e1")
    assert core.data_to_send() == []  # not connected: kept, not sent

    core.connection_made(welcome())
    first = core.data_to_send()
    core.connection_lost()
    core.connection_made(welcome())
    second = core.data_to_send()

    assert first == second and [orjson.loads(f)["id"] for f in first] == ["e1"]
    core.receive({"type": "ack", "payload": {"request_id": "e1", "seq": 3, "duplicate": True}})
    core.connection_lost()
    core.connection_made(welcome())
    assert core.data_to_send() == []


def test_a_duplicate_ack_carries_the_original_seq() -> None:
    core = make_core()
    core.connection_made(welcome())
    core.publish(ROOM, CHANNEL, {}, id="again")
    events = core.receive(
        {"type": "ack", "payload": {"request_id": "again", "seq": 4, "duplicate": True}}
    )
    assert events == [Acked("again", 4, True)]
    assert events[0].ack().duplicate  # type: ignore[union-attr]


def test_bad_events_are_refused_before_anything_is_sent() -> None:
    core = make_core()
    core.connection_made(welcome(max_envelope_bytes=200))
    with pytest.raises(InvalidEnvelope):
        core.publish(ROOM, CHANNEL, {}, id="bad\nid")
    with pytest.raises(MessageTooLarge) as too_large:
        core.publish(ROOM, CHANNEL, {"blob": "x" * 300}, id="big")
    with pytest.raises(TypeError):
        core.publish(ROOM, CHANNEL, [1, 2])  # type: ignore[arg-type]
    core.publish(ROOM, CHANNEL, {}, id="once")
    with pytest.raises(ValueError, match="already waiting"):
        core.publish(ROOM, CHANNEL, {}, id="once")

    assert too_large.value.request_id == "big"
    assert [orjson.loads(f)["id"] for f in core.data_to_send()] == ["once"]


def test_an_events_frame_is_kept_until_its_batch_ack_and_resent_whole() -> None:
    core = make_core()
    batch_id, ids, frame = core.encode_events(ROOM, CHANNEL, [{"n": 1}, {"n": 2}], ["a", "b"])
    assert (batch_id, ids) == ("batch_1", ["a", "b"])
    assert orjson.loads(frame) == {
        "version": "1.0",
        "id": "batch_1",
        "type": "events",
        "room": ROOM,
        "channel": CHANNEL,
        "payload": {"events": [{"id": "a", "payload": {"n": 1}}, {"id": "b", "payload": {"n": 2}}]},
    }
    core.send_event(batch_id, frame)
    core.connection_made(welcome())
    core.connection_lost()
    core.connection_made(welcome())
    assert core.data_to_send() == [frame]  # resent whole, same bytes
    ack = {"type": "ack", "payload": {"request_id": "batch_1", "seqs": [8, 3], "duplicates": [1]}}
    (acked,) = core.receive(ack)
    assert acked == BatchAcked("batch_1", (8, 3), frozenset({1}))
    assert acked.acks(ids) == [Ack("a", 8, False), Ack("b", 3, True)]
    assert core.in_flight == 0 and core.receive(ack) == []
    # Refused by one event: the typed error names it.
    batch_id, _, frame = core.encode_events(ROOM, CHANNEL, [{}, {}])
    core.send_event(batch_id, frame)
    (failed,) = core.receive(error_frame(batch_id, "message_too_large", index=1, event_id="x"))
    assert isinstance(failed, PublishFailed) and isinstance(failed.error, MessageTooLarge)
    assert (failed.error.event_index, failed.error.event_id) == (1, "x")


def test_bad_events_frames_are_refused_before_anything_is_sent() -> None:
    core = make_core()
    core.connection_made(welcome(max_envelope_bytes=300))
    with pytest.raises(ValueError, match="1-500"):
        core.encode_events(ROOM, CHANNEL, [])
    with pytest.raises(ValueError, match="2 ids for 1"):
        core.encode_events(ROOM, CHANNEL, [{}], ["a", "b"])
    with pytest.raises(ValueError, match="its own id"):
        core.encode_events(ROOM, CHANNEL, [{}, {}], ["a", "a"])
    with pytest.raises(InvalidEnvelope):
        core.encode_events(ROOM, CHANNEL, [{}], ["bad\nid"])
    with pytest.raises(TypeError):
        core.encode_events(ROOM, CHANNEL, [[1]])  # type: ignore[list-item]
    with pytest.raises(MessageTooLarge):
        core.encode_events(ROOM, CHANNEL, [{"blob": "x" * 100}] * 3)
    assert core.data_to_send() == []


def test_an_error_for_an_event_maps_to_its_typed_error_with_fields() -> None:
    core = make_core()
    core.connection_made(welcome())
    core.publish(ROOM, CHANNEL, {}, id="e1")
    core.publish(ROOM, CHANNEL, {}, id="e2")

    (limited,) = core.receive(error_frame("e1", "rate_limited", retryable=True, retry_after_ms=250))
    (banned,) = core.receive(error_frame("e2", "banned", room=ROOM, retry_after_ms=60_000))

    assert isinstance(limited, PublishFailed) and isinstance(limited.error, RateLimited)
    assert (limited.error.retryable, limited.error.retry_after_ms) == (True, 250)
    assert isinstance(banned, PublishFailed) and isinstance(banned.error, Banned)
    assert (banned.error.room, banned.error.retry_after_ms, banned.error.request_id) == (
        ROOM,
        60_000,
        "e2",
    )
    assert core.in_flight == 0


# -- subscriptions ---------------------------------------------------------------------------


def test_a_join_without_since_seq_starts_at_the_channels_last_seq() -> None:
    core = make_core()
    core.connection_made(welcome())
    state = SubscriptionState(ROOM, CHANNEL)
    core.subscribe(state)
    (join,) = sent(core)

    assert join["payload"] == {"command": "join_channel", "parameters": {"batch": True}}
    assert core.receive(event(3)) == []  # before the join's reply: refused
    assert core.receive(response(join["id"], {"last_seq": 5})) == [Joined(ROOM, CHANNEL, 5)]
    assert state.last_seq == 5
    assert core.receive(event(5)) == []  # not after the join position
    (delivered,) = core.receive(event(6))
    assert isinstance(delivered, Delivered) and delivered.event.seq == 6


def test_resume_rejoins_from_the_last_event_handed_to_the_application() -> None:
    core = make_core()
    core.connection_made(welcome())
    state = joined(core)
    for seq in (2, 4, 9):
        core.receive(event(seq))
    assert core.take(state) == Event.from_wire(event(2))
    assert core.take(state) == Event.from_wire(event(4))  # 9 is queued, not handed

    core.connection_lost()
    core.connection_made(welcome())
    (join,) = sent(core)

    assert join["payload"]["parameters"] == {"batch": True, "since_seq": 4}
    assert core.take(state) is None  # the untaken 9 was dropped: it comes again
    core.receive(response(join["id"], {"last_seq": 9}))
    assert [type(e) for e in core.receive(event(9))] == [Delivered]
    assert take_all(core, state) == [Event.from_wire(event(9))]


def test_replayed_events_are_not_delivered_twice() -> None:
    core = make_core()
    core.connection_made(welcome())
    state = joined(core)
    delivered = [core.receive(event(seq)) for seq in (1, 2, 2, 1, 3)]

    assert [len(d) for d in delivered] == [1, 1, 0, 0, 1]
    assert [i.seq for i in take_all(core, state) if isinstance(i, Event)] == [1, 2, 3]


def test_events_of_unknown_subscriptions_and_unknown_replies_are_ignored() -> None:
    core = make_core()
    core.connection_made(welcome())
    joined(core)

    assert core.receive(event(1, channel="other")) == []
    assert (
        core.receive(
            {
                "type": "gap",
                "room": ROOM,
                "channel": "other",
                "payload": {"after_seq": 1, "first_available_seq": 5},
            }
        )
        == []
    )
    assert core.receive(response("nobody-asked")) == []
    assert core.receive({"type": "ack", "payload": {"request_id": "nobody"}}) == []
    assert core.receive({"type": "surprise"}) == []
    assert core.receive({"type": "event", "room": ROOM, "channel": CHANNEL, "seq": True}) == []
    assert core.data_to_send() == []


def test_gaps_from_the_join_result_and_from_gap_frames_are_queued_in_order() -> None:
    core = make_core()
    core.connection_made(welcome())
    state = SubscriptionState(ROOM, CHANNEL, 10)
    core.subscribe(state)
    (join,) = sent(core)

    events = core.receive(
        response(join["id"], {"last_seq": 40, "gap": True, "first_available_seq": 30})
    )
    core.receive(event(31))
    (gap_frame,) = core.receive(
        {
            "type": "gap",
            "room": ROOM,
            "channel": CHANNEL,
            "payload": {"after_seq": 31, "first_available_seq": 35},
        }
    )

    assert events == [Joined(ROOM, CHANNEL, 40), GapDetected(Gap(ROOM, CHANNEL, 10, 30))]
    assert gap_frame == GapDetected(Gap(ROOM, CHANNEL, 31, 35))
    assert take_all(core, state) == [
        Gap(ROOM, CHANNEL, 10, 30),
        Event.from_wire(event(31)),
        Gap(ROOM, CHANNEL, 31, 35),
    ]


def test_a_retryable_join_failure_asks_for_a_rejoin_and_a_final_one_ends_the_subscription() -> None:
    core = make_core()
    core.connection_made(welcome())
    state = SubscriptionState(ROOM, CHANNEL, 3)
    core.subscribe(state)
    (join,) = sent(core)

    (retry,) = core.receive(response(join["id"], code="unavailable", message="m", retryable=True))
    core.rejoin(state)
    (again,) = sent(core)
    (failed,) = core.receive(error_frame(again["id"], "invalid_name"))

    assert (
        isinstance(retry, JoinRetry) and retry.attempt == 0 and isinstance(retry.error, Unavailable)
    )
    assert (
        again["payload"]["parameters"] == {"batch": True, "since_seq": 3}
        and again["id"] != join["id"]
    )
    assert isinstance(failed, SubscriptionFailed) and isinstance(failed.error, InvalidName)
    assert core.subscription(ROOM, CHANNEL) is None and state.error is failed.error


def test_a_ban_pushed_by_the_gateway_ends_the_subscriptions_it_names() -> None:
    core = make_core()
    core.connection_made(welcome())
    state = joined(core)

    events = core.receive(error_frame(None, "banned", room=ROOM, channels=[CHANNEL, "other"]))

    assert [type(e) for e in events] == [SubscriptionFailed, RemovedFromRoom]
    assert isinstance(events[1], RemovedFromRoom) and events[1].channels == (CHANNEL, "other")
    assert isinstance(state.error, Banned) and state.error.channels == (CHANNEL, "other")
    assert core.receive(event(1)) == []


def test_a_full_queue_pauses_and_resumes_from_the_last_accepted_seq() -> None:
    core = make_core()
    core.connection_made(welcome())
    state = joined(core, maxsize=2)
    core.receive(event(1))
    core.receive(event(2))

    assert core.receive(event(3)) == [Paused(ROOM, CHANNEL, 2)]
    (leave,) = sent(core)
    assert leave["payload"]["command"] == "leave_channel"
    assert core.receive(response(leave["id"])) == []  # nobody awaits it
    core.take(state)  # one left: at most half the queue, so it rejoins
    (rejoin,) = sent(core)

    assert rejoin["payload"]["parameters"] == {"batch": True, "since_seq": 2}
    assert state.pause_count == 1 and [
        i.seq for i in take_all(core, state) if isinstance(i, Event)
    ] == [2]


# -- commands --------------------------------------------------------------------------------


def test_command_replies_are_matched_to_their_request() -> None:
    core = make_core()
    core.connection_made(welcome())
    first = core.command(ROOM, CHANNEL, "status", {"check": "pool"}, {"timeout_ms": 500})
    second = core.command(ROOM, CHANNEL, "status", {})
    frames = sent(core)

    assert [f["id"] for f in frames] == [first, second] and first != second
    assert frames[0]["payload"] == {
        "command": "status",
        "parameters": {"check": "pool"},
        "timeout_ms": 500,
    }
    (err,) = core.receive(response(second, code="pool_exhausted", message="busy", retryable=True))
    (ok,) = core.receive(response(first, {"active": 3}))
    assert ok == CommandResult(first, {"active": 3}, None)
    assert isinstance(err, CommandResult) and err.error is not None
    assert (err.error.code, err.error.retryable, err.error.request_id) == (
        "pool_exhausted",
        True,
        second,
    )
    assert core.receive(response(first, {"late": True})) == []  # answered already


def test_a_lost_connection_forgets_pending_commands_and_never_resends_them() -> None:
    core = make_core()
    core.connection_made(welcome())
    request_id = core.command(ROOM, CHANNEL, "status", {})
    core.connection_lost()
    core.connection_made(welcome())

    assert sent(core) == []
    assert core.receive(response(request_id, {"late": True})) == []


def test_unmatched_error_frames_are_reported() -> None:
    core = make_core()
    core.connection_made(welcome())
    (report,) = core.receive(error_frame(None, "message_too_large"))
    assert isinstance(report, ErrorReceived) and isinstance(report.error, MessageTooLarge)


def test_service_requests_are_surfaced_and_oversized_answers_become_errors() -> None:
    core = make_core()
    core.connection_made(welcome(max_envelope_bytes=400))
    delivery = {
        "type": "command",
        "id": "dlv_1",
        "room": ROOM,
        "channel": CHANNEL,
        "from": "api",
        "payload": {"command": "status", "parameters": {}, "request_id": "c1", "timeout_ms": 100},
    }
    (request,) = core.receive(delivery)
    assert isinstance(request, ServiceRequest) and request.request.delivery_id == "dlv_1"

    big = {"request_id": "dlv_1", "status": "success", "result": {"blob": "x" * 500}}
    answer = orjson.loads(core.encode_answer(request.request, big))
    assert answer["type"] == "command_response" and answer["payload"]["request_id"] == "dlv_1"
    assert answer["payload"]["error"]["code"] == "message_too_large"
    assert core.receive({**delivery, "id": ""}) == []
