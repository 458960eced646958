"""The connection core (shared/core/): frames in, effects and frames out, in microseconds."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from arqonbus_server.shared.core import Connection, ConnectionConfig, Failure, Now
from arqonbus_server.shared.core.effects import (
    ArmExpiry,
    ArmTimer,
    Audit,
    AwaitPublishSlot,
    CallService,
    CheckCredential,
    Effect,
    Join,
    Leave,
    Publish,
    PublishBatch,
    RegisterAgent,
    ReportLimits,
    Respond,
    RoomAdmin,
    RunCommand,
    Send,
    Serve,
    VerifyRoomKey,
)
from arqonbus_server.shared.core.rates import ConnectionRates, FrameMeter, RateSpec
from arqonbus_server.shared.errors import (
    BANNED,
    INVALID_PARAMETERS,
    POLICY_VIOLATION,
    ArqonError,
    ErrorCode,
)
from arqonbus_server.shared.inspect import EMPTY_POLICY
from arqonbus_server.shared.service import ServiceCall, ServiceReply
from arqonbus_server.shared.subjects import ChannelRef, SubjectScheme

T0 = Now(monotonic=100.0, wall=1_800_000_000.0)
STAMP = "2027-01-15T08:00:00.000Z"


@dataclass(frozen=True)
class Who:
    tenant: str = "acme"
    id: str = "alice"
    role: str = "member"
    grants: tuple[str, ...] = ()
    expires_at: float | None = None
    method: str = "dev"
    credential_id: str = ""


@dataclass
class Timed:
    until: float | None = None
    reason: str = ""


@dataclass
class Room:
    """A room's settings as the rules read them (gateway/state/rooms.py RoomSettings)."""

    private: bool = False
    key_hash: str = ""
    invite_only: bool = False
    invited: set[str] = field(default_factory=set)
    banned: dict[str, Timed] = field(default_factory=dict)
    muted: dict[str, Timed] = field(default_factory=dict)
    broken: bool = False
    presence: bool = False
    retention_s: int | None = None
    max_message_bytes: int | None = None

    @property
    def restricted(self) -> bool:
        return self.private or self.invite_only or self.broken

    def ban_of(self, principal: str, now: float) -> Timed | None:
        ban = self.banned.get(principal)
        return ban if ban is not None and (ban.until is None or now < ban.until) else None

    def mute_of(self, principal: str, now: float) -> Timed | None:
        mute = self.muted.get(principal)
        return mute if mute is not None and (mute.until is None or now < mute.until) else None


class Rooms(dict[tuple[str, str], Room]):
    def get(self, tenant: str, room: str) -> Room | None:  # type: ignore[override]
        return super().get((tenant, room))


class RefusingPolicy:
    """A content policy that refuses every event with ``error``."""

    def __init__(self, error: ArqonError) -> None:
        self.error = error

    def check_event(self, event: Any, tenant: str, principal: str) -> Any:
        raise self.error.with_request_id(event.id)


def core(
    who: Who | None = None,
    rooms: Rooms | None = None,
    rate: RateSpec | None = None,
    content: Any = EMPTY_POLICY,
    **config: Any,
) -> Connection:
    spec = rate or RateSpec()
    meters = ConnectionRates(FrameMeter(spec, T0.monotonic), FrameMeter(RateSpec(), T0.monotonic))
    counter = itertools.count(1)
    return Connection(
        who or Who(),
        ConnectionConfig(session_id="s1", **config),
        meters,
        content,
        rooms,
        stamp=lambda: STAMP,
        new_id=lambda: f"{next(counter):04d}",
    )


def envelope(
    kind: str = "event", id: str = "m1", room: str = "r", channel: str = "c", **payload: Any
) -> bytes:
    body = {
        "version": "1.0",
        "id": id,
        "type": kind,
        "room": room,
        "channel": channel,
        "payload": payload,
    }
    return orjson.dumps(body)


def command(
    name: str, id: str = "c1", room: str = "r", channel: str = "c", **parameters: Any
) -> bytes:
    return envelope("command", id, room, channel, command=name, parameters=parameters)


def frames(effects: list[Effect]) -> list[dict[str, Any]]:
    """The frames the effects send to the client, decoded."""
    return [orjson.loads(effect.frame) for effect in effects if isinstance(effect, Send)]


def error_of(frame: dict[str, Any]) -> tuple[str, str | None]:
    """(code, request_id) of an error frame or of a command_response with an error."""
    payload = frame["payload"]
    if frame["type"] == "error":
        return payload["code"], payload["request_id"]
    assert payload["status"] == "error", frame
    return payload["error"]["code"], payload["request_id"]


def kinds(effects: list[Effect]) -> list[str]:
    return [type(effect).__name__ for effect in effects]


def code(error: ErrorCode) -> str:
    return error.code


# -- frames that never reach a decision -------------------------------------------------------

INVALID_FRAMES = [
    (b"not json", "invalid_json", None),
    (b"[1, 2]", "invalid_envelope", None),
    (
        orjson.dumps({"type": "event", "room": "r", "channel": "c", "payload": {}}),
        "invalid_envelope",
        None,
    ),
    (envelope("gossip"), "invalid_envelope", "m1"),
    (envelope(room="no spaces"), "invalid_name", "m1"),
    (
        orjson.dumps({"id": "m1", "type": "event", "room": "r", "channel": "c", "payload": 3}),
        "invalid_envelope",
        "m1",
    ),
    (envelope(filler="x" * 70_000), "message_too_large", None),
    (envelope("command", command=""), "invalid_envelope", "m1"),
]


@pytest.mark.parametrize(("frame", "expected", "request_id"), INVALID_FRAMES)
def test_a_frame_that_does_not_parse_gets_an_error_and_nothing_else(
    frame: bytes, expected: str, request_id: str | None
) -> None:
    effects = core().receive(frame, T0)
    assert kinds(effects) == ["Send"]
    assert [error_of(f) for f in frames(effects)] == [(expected, request_id)]


# -- authorization by role and grant ------------------------------------------------------------

AUTHZ = [
    # (role, grants, frame, allowed)
    ("member", (), envelope(), True),
    ("read-only", (), envelope(), False),
    ("read-only", ("r:c:publish",), envelope(), True),
    ("read-only", ("r:other:publish",), envelope(), False),
    ("read-only", (), command("join_channel"), True),
    ("read-only", (), command("register_handler", command="svc"), False),
    ("read-only", (), command("svc"), False),
    ("read-only", ("r:*:command",), command("svc"), True),
    ("member", (), command("room_ban", principal="bob"), False),
    ("admin", (), command("room_info"), True),
    ("member", (), command("limits"), True),
    ("read-only", (), command("ping", room="_system"), True),
    ("read-only", (), command("status", room="_system"), False),
    ("admin", (), command("status", room="_system"), True),
    ("read-only", (), command("status"), False),  # elsewhere: a service call
    ("read-only", ("*:*:admin",), command("list_rooms"), True),
    ("read-only", ("r:*:admin",), command("list_rooms"), False),
    ("read-only", ("r:*:admin",), command("list_channels"), True),
    ("read-only", ("r:c:admin",), command("list_channels"), False),
    ("read-only", ("r:c:admin",), command("channel_info"), True),
    ("read-only", ("r:c:admin",), command("delete_room", confirm="r"), False),
    ("read-only", ("r:*:admin",), command("delete_room", confirm="r"), True),
    ("read-only", ("r:c:admin",), command("kick", principal="bob"), False),
    ("member", (), command("kick", principal="bob"), False),
    ("read-only", (), command("presence"), True),
    ("read-only", (), command("occupancy"), True),
    ("viewer", (), command("occupancy"), False),
    ("viewer", (), command("presence"), False),
    ("viewer", ("r:c:presence",), command("presence"), True),
    ("viewer", (), command("set_presence", state="idle"), True),
    ("unknown-role", (), command("join_channel"), False),
]


@pytest.mark.parametrize(("role", "grants", "frame", "allowed"), AUTHZ)
def test_each_action_needs_its_permission(
    role: str, grants: tuple[str, ...], frame: bytes, allowed: bool
) -> None:
    effects = core(Who(role=role, grants=grants)).receive(frame, T0)
    refused = [f for f in frames(effects) if error_of_or_none(f) == "forbidden"]
    assert bool(refused) is not allowed, effects
    if not allowed:
        audits = [e for e in effects if isinstance(e, Audit)]
        assert [a.type for a in audits] == ["forbidden"]
        assert audits[0].details["session"] == "s1"
        assert "denied" in audits[0].details["reason"]


def error_of_or_none(frame: dict[str, Any]) -> str | None:
    payload = frame["payload"]
    if frame["type"] == "error":
        return str(payload["code"])
    if payload.get("status") == "error":
        return str(payload["error"]["code"])
    return None


def test_a_repeated_refusal_is_audited_once_per_window_with_its_repeats() -> None:
    connection = core(Who(role="read-only"))
    audited = [
        [
            e
            for e in connection.receive(envelope(id=f"m{i}"), Now(T0.monotonic + i, T0.wall))
            if isinstance(e, Audit)
        ]
        for i in range(12)
    ]
    assert [len(a) for a in audited] == [1] + [0] * 9 + [1, 0]
    assert audited[10][0].details["repeats"] == 9


# -- publishing, acks, duplicates, in flight -----------------------------------------------------


def test_an_event_is_published_with_the_server_sender_and_acked_with_its_seq() -> None:
    connection = core()
    effects = connection.receive(envelope(text="hi"), T0)
    assert kinds(effects) == ["Publish"]
    publish = effects[0]
    assert isinstance(publish, Publish)
    assert publish.ref == ChannelRef("acme", "r", "c")
    stored = orjson.loads(publish.body)
    assert (stored["from"], stored["timestamp"], stored["payload"]) == (
        "alice",
        STAMP,
        {"text": "hi"},
    )
    scheme = SubjectScheme("arq")
    assert publish.dedupe_key == scheme.dedupe_key(publish.ref, "alice", "m1")
    assert connection.publishes_in_flight == 1
    (ack,) = frames(connection.publish_acked(publish.op, 7, False))
    assert ack == {
        "version": "1.0",
        "type": "ack",
        "room": "r",
        "channel": "c",
        "payload": {"request_id": "m1", "seq": 7},
    }
    assert connection.publishes_in_flight == 0


def test_a_duplicate_is_acked_with_the_original_seq_and_duplicate_true() -> None:
    connection = core()
    (publish,) = connection.receive(envelope(), T0)
    assert isinstance(publish, Publish)
    (ack,) = frames(connection.publish_acked(publish.op, 3, True))
    assert ack["payload"] == {"request_id": "m1", "seq": 3, "duplicate": True}


PUBLISH_FAILURES = [
    (Failure.UNAVAILABLE, "unavailable", True),
    (Failure.QUOTA, "quota_exceeded", False),
    (Failure.INTERNAL, "internal", False),
]


@pytest.mark.parametrize(("failure", "expected", "retryable"), PUBLISH_FAILURES)
def test_a_failed_publish_gets_the_error_of_its_failure(
    failure: Failure, expected: str, retryable: bool
) -> None:
    connection = core()
    (publish,) = connection.receive(envelope(), T0)
    assert isinstance(publish, Publish)
    (frame,) = frames(connection.publish_failed(publish.op, failure, "tenant store full"))
    assert error_of(frame) == (expected, "m1")
    assert ("tenant store full" in frame["payload"]["message"]) is (failure is Failure.QUOTA)
    assert connection.publishes_in_flight == 0


def test_beyond_max_in_flight_the_shell_waits_for_a_slot_before_publishing() -> None:
    connection = core(max_in_flight=2)
    assert kinds(connection.receive(envelope(id="a"), T0)) == ["Publish"]
    assert kinds(connection.receive(envelope(id="b"), T0)) == ["Publish"]
    effects = connection.receive(envelope(id="c"), T0)
    assert kinds(effects) == ["AwaitPublishSlot", "Publish"]
    assert effects[0] == AwaitPublishSlot(2)


def test_a_stored_envelope_over_the_nats_max_payload_is_refused_before_publishing() -> None:
    effects = core(max_payload=2048).receive(envelope(text="x" * 1600), T0)
    assert [error_of(f) for f in frames(effects)] == [("message_too_large", "m1")]


def test_a_content_policy_refusal_is_sent_and_audited() -> None:
    refusal = ArqonError(POLICY_VIOLATION, "rule 'no-links' refused the payload")
    effects = core(content=RefusingPolicy(refusal)).receive(envelope(), T0)
    assert [error_of(f) for f in frames(effects)] == [("policy_violation", "m1")]
    (audit,) = [e for e in effects if isinstance(e, Audit)]
    assert (audit.type, audit.details["rule"], audit.details["code"]) == (
        "policy_blocked",
        "no-links",
        "policy_violation",
    )


# -- events frames (batches) -------------------------------------------------------------------


def batch(n: int = 3, id: str = "b1", room: str = "r", channel: str = "c", **item: Any) -> bytes:
    events = [{"id": f"e{i}", "payload": {"n": i}, **item} for i in range(n)]
    return envelope("events", id, room, channel, events=events)


def test_an_events_frame_is_one_publish_of_each_event_answered_by_one_ack() -> None:
    connection = core()
    (effect,) = connection.receive(batch(3), T0)
    assert isinstance(effect, PublishBatch)
    assert (effect.batch_id, effect.ref) == ("b1", ChannelRef("acme", "r", "c"))
    scheme = SubjectScheme("arq")
    assert [p.event_id for p in effect.items] == ["e0", "e1", "e2"]
    assert [p.dedupe_key for p in effect.items] == [
        scheme.dedupe_key(effect.ref, "alice", f"e{i}") for i in range(3)
    ]
    stored = [orjson.loads(p.body) for p in effect.items]
    assert [(s["id"], s["from"], s["payload"]) for s in stored] == [
        (f"e{i}", "alice", {"n": i}) for i in range(3)
    ]
    assert connection.publishes_in_flight == 1  # a batch takes one slot
    (ack,) = frames(
        connection.batch_acked(effect.op, [(7, False, None), (3, True, None), (8, False, None)])
    )
    assert ack == {
        "version": "1.0",
        "type": "ack",
        "room": "r",
        "channel": "c",
        "payload": {"request_id": "b1", "seqs": [7, 3, 8], "duplicates": [1]},
    }
    assert connection.publishes_in_flight == 0
    (effect,) = connection.receive(batch(2, id="b2"), T0)
    assert isinstance(effect, PublishBatch)
    (placed,) = frames(connection.batch_acked(effect.op, [(9, False, 2), (10, False, 2)]))
    assert placed["payload"] == {"request_id": "b2", "seqs": [9, 10], "epochs": [2, 2]}
    (effect,) = connection.receive(batch(2, id="b3"), T0)
    assert isinstance(effect, PublishBatch)
    (failed,) = frames(connection.publish_failed(effect.op, Failure.UNAVAILABLE))
    assert error_of(failed) == ("unavailable", "b3") and failed["payload"]["retryable"]


BAD_BATCHES = [
    (envelope("events", "b1", events=[]), "invalid_envelope", "payload.events"),
    (batch(501), "invalid_envelope", "payload.events"),
    (envelope("events", "b1", events={"id": "e"}), "invalid_envelope", "payload.events"),
    (
        envelope("events", "b1", events=[{"id": "e0", "payload": {}}, 3]),
        "invalid_envelope",
        "payload.events[1]",
    ),
    (
        envelope("events", "b1", events=[{"payload": {}}]),
        "invalid_envelope",
        "payload.events[0].id",
    ),
    (
        envelope("events", "b1", events=[{"id": "e0", "payload": []}]),
        "invalid_envelope",
        "payload.events[0].payload",
    ),
    (
        envelope("events", "b1", events=[{"id": "e0", "payload": {}}, {"id": "e0", "payload": {}}]),
        "invalid_envelope",
        "payload.events[1].id",
    ),
    (
        envelope("events", "b1", room="no spaces", events=[{"id": "e0", "payload": {}}]),
        "invalid_name",
        "room",
    ),
]


@pytest.mark.parametrize(("frame", "expected", "named"), BAD_BATCHES)
def test_a_bad_events_frame_is_refused_whole_naming_the_field(
    frame: bytes, expected: str, named: str
) -> None:
    connection = core()
    effects = connection.receive(frame, T0)
    (sent,) = frames(effects)
    assert kinds(effects) == ["Send"] and error_of(sent) == (expected, "b1")
    assert named in sent["payload"]["message"]
    assert connection.publishes_in_flight == 0 and not connection.pending


def test_one_refused_event_refuses_the_frame_with_its_index_and_nothing_is_published() -> None:
    rooms = Rooms({("acme", "r"): Room(retention_s=60, max_message_bytes=400)})
    connection = core(rooms=rooms)
    events = [{"id": f"e{i}", "payload": {"t": "x" * (500 if i == 2 else 1)}} for i in range(4)]
    effects = connection.receive(envelope("events", "b1", events=events), T0)
    (sent,) = frames(effects)
    assert kinds(effects) == ["Send"] and error_of(sent) == ("message_too_large", "b1")
    assert (sent["payload"]["index"], sent["payload"]["event_id"]) == (2, "e2")
    assert not connection.pending
    # Within the room's limits the room's retention applies to each event.
    (effect,) = connection.receive(batch(2, id="b2"), T0)
    assert isinstance(effect, PublishBatch) and effect.ttl_s == 60
    assert all(p.ttl_s == 60 for p in effect.items)
    # A content policy refusing one event: the frame refused, the refusal audited.
    refusal = ArqonError(POLICY_VIOLATION, "rule 'no-links' refused the payload")
    effects = core(content=RefusingPolicy(refusal)).receive(batch(3), T0)
    (sent,) = frames(effects)
    assert error_of(sent) == ("policy_violation", "b1") and sent["payload"]["index"] == 0
    assert [e.type for e in effects if isinstance(e, Audit)] == ["policy_blocked"]


def test_an_events_frame_needs_publish_permission_and_room_standing() -> None:
    effects = core(Who(role="read-only")).receive(batch(2), T0)
    assert [error_of(f) for f in frames(effects)] == [("forbidden", "b1")]
    rooms = Rooms({("acme", "r"): Room(banned={"alice": Timed()})})
    effects = core(rooms=rooms).receive(batch(2), T0)
    assert [error_of(f) for f in frames(effects)] == [("banned", "b1")]


def test_each_event_of_a_batch_counts_against_the_message_rate() -> None:
    connection = core(rate=RateSpec(msgs_per_s=10, msgs_burst=5))
    assert kinds(connection.receive(batch(4), T0)) == ["PublishBatch"]
    (frame,) = frames(connection.receive(batch(2, id="b2"), T0))
    assert error_of(frame) == ("rate_limited", "b2")
    assert frame["payload"]["retry_after_ms"] == 100  # one token left, two needed
    # A batch larger than the burst passes on a full bucket (it is never refused forever).
    later = Now(T0.monotonic + 1.0, T0.wall)
    assert kinds(connection.receive(batch(20, id="b3"), later)) == ["PublishBatch"]
    (frame,) = frames(connection.receive(batch(1, id="b4"), later))
    assert error_of(frame) == ("rate_limited", "b4")


def test_a_traced_event_of_a_batch_keeps_its_trace() -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    (effect,) = core().receive(batch(2, trace={"traceparent": traceparent}), T0)
    assert isinstance(effect, PublishBatch)
    assert [p.trace for p in effect.items] == [{"traceparent": traceparent}] * 2


# -- rate admission --------------------------------------------------------------------------


def test_over_the_message_rate_a_frame_gets_rate_limited_with_retry_after_ms() -> None:
    connection = core(rate=RateSpec(msgs_per_s=10, msgs_burst=1))
    assert kinds(connection.receive(envelope(id="a"), T0)) == ["Publish"]
    effects = connection.receive(envelope(id="b"), T0)
    (frame,) = frames(effects)
    assert error_of(frame) == ("rate_limited", "b")
    assert frame["payload"]["retry_after_ms"] == 100
    (audit,) = [e for e in effects if isinstance(e, Audit)]
    assert audit.details == {"session": "s1", "retry_after_ms": 100}
    # The refusal is audited once per 10 s; the frame after the wait passes.
    assert kinds(connection.receive(envelope(id="c"), Now(T0.monotonic + 0.05, T0.wall))) == [
        "Send"
    ]
    assert kinds(connection.receive(envelope(id="d"), Now(T0.monotonic + 0.11, T0.wall))) == [
        "Publish"
    ]


def test_garbage_counts_against_the_rate_and_a_flood_of_it_is_rate_limited() -> None:
    connection = core(rate=RateSpec(msgs_per_s=1, msgs_burst=1))
    assert error_of(frames(connection.receive(b"nope", T0))[0]) == ("invalid_json", None)
    assert error_of(frames(connection.receive(b"nope", T0))[0]) == ("rate_limited", None)


def test_over_the_byte_rate_a_large_frame_waits_for_the_bytes() -> None:
    connection = core(rate=RateSpec(bytes_per_s=1000, bytes_burst=1000))
    assert kinds(connection.receive(envelope(id="a", text="x" * 600), T0)) == ["Publish"]
    (frame,) = frames(connection.receive(envelope(id="b", text="x" * 600), T0))
    assert error_of(frame) == ("rate_limited", "b")
    assert 300 <= frame["payload"]["retry_after_ms"] <= 700


# -- rooms: private, banned, muted ------------------------------------------------------------

WALL = T0.wall
ROOM_CASES = [
    # (room settings, frame, expected error code or None)
    (Room(private=True, key_hash="h"), command("join_channel"), "room_key_required"),
    (Room(private=True), command("join_channel", room_key="k" * 8), "forbidden"),
    (Room(invite_only=True), command("join_channel"), "forbidden"),
    (Room(invite_only=True, invited={"alice"}), command("join_channel"), None),
    (Room(broken=True), command("history"), "forbidden"),
    (Room(private=True, key_hash="h"), envelope(), "forbidden"),
    (Room(private=True, key_hash="h"), command("svc"), "room_key_required"),
    (Room(banned={"alice": Timed(None, "spam")}), command("join_channel"), "banned"),
    (Room(banned={"alice": Timed(WALL + 60)}), envelope(), "banned"),
    (Room(banned={"alice": Timed(WALL - 1)}), envelope(), None),
    (Room(banned={"bob": Timed(None)}), envelope(), None),
    (Room(muted={"alice": Timed(None)}), envelope(), "muted"),
    (Room(muted={"alice": Timed(None)}), command("join_channel"), None),
    (Room(banned={"alice": Timed(None)}), command("register_handler", command="svc"), "banned"),
]


@pytest.mark.parametrize(("room", "frame", "expected"), ROOM_CASES)
def test_room_rules(room: Room, frame: bytes, expected: str | None) -> None:
    effects = core(rooms=Rooms({("acme", "r"): room})).receive(frame, T0)
    codes = [error_of_or_none(f) for f in frames(effects)]
    assert codes == ([expected] if expected else []), effects


def test_a_timed_mute_says_when_to_retry_and_names_the_room() -> None:
    room = Room(muted={"alice": Timed(WALL + 2.5)})
    (frame,) = frames(core(rooms=Rooms({("acme", "r"): room})).receive(envelope(), T0))
    assert frame["payload"]["room"] == "r"
    assert frame["payload"]["retry_after_ms"] == 2501


def test_a_room_admin_enters_a_private_room_without_its_key() -> None:
    room = Room(private=True, key_hash="h", invite_only=True)
    effects = core(Who(role="admin"), rooms=Rooms({("acme", "r"): room})).receive(
        command("join_channel"), T0
    )
    assert kinds(effects) == ["Join"]


def test_a_private_room_key_is_verified_and_a_wrong_one_refused() -> None:
    connection = core(rooms=Rooms({("acme", "r"): Room(private=True, key_hash="h")}))
    (verify,) = connection.receive(command("join_channel", room_key="secret-key"), T0)
    assert isinstance(verify, VerifyRoomKey)
    assert (verify.room, verify.key, verify.principal) == ("r", "secret-key", "alice")
    (frame,) = frames(connection.room_key_checked(verify.op, False))
    assert error_of(frame) == ("room_key_required", "c1")
    (verify,) = connection.receive(command("join_channel", id="c2", room_key="secret-key"), T0)
    assert isinstance(verify, VerifyRoomKey)
    (join,) = connection.room_key_checked(verify.op, True)
    assert isinstance(join, Join)


def test_after_joining_a_private_room_the_connection_publishes_and_calls_in_it() -> None:
    connection = core(rooms=Rooms({("acme", "r"): Room(private=True, key_hash="h")}))
    (verify,) = connection.receive(command("join_channel", room_key="secret-key"), T0)
    (join,) = connection.room_key_checked(verify.op, True)
    connection.joined_channel(join.op, {"last_seq": 0})
    assert kinds(connection.receive(envelope(channel="other"), T0)) == ["Publish"]
    assert kinds(connection.receive(command("svc", id="c9"), T0)) == ["CallService"]


# -- channels and handlers -----------------------------------------------------------------------


def test_join_then_leave_and_leave_again_is_not_joined() -> None:
    connection = core()
    (join,) = connection.receive(command("join_channel", since_seq=4), T0)
    assert join == Join(join.op, ChannelRef("acme", "r", "c"), 4)
    (reply,) = frames(connection.joined_channel(join.op, {"last_seq": 9}))
    assert reply["payload"] == {"request_id": "c1", "status": "success", "result": {"last_seq": 9}}
    assert (reply["from"], reply["id"]) == ("arqonbus", "resp_0001")
    effects = connection.receive(command("leave_channel", id="c2"), T0)
    assert kinds(effects) == ["Leave", "Send"]
    assert error_of(frames(connection.receive(command("leave_channel", id="c3"), T0))[0]) == (
        "not_joined",
        "c3",
    )


LIMIT_CASES = [
    ("join_channel", {}, {"max_channels": 1}),
    ("register_handler", {"command": "svc"}, {"max_handlers": 1}),
]


@pytest.mark.parametrize(("name", "params", "config"), LIMIT_CASES)
def test_too_many_channels_or_handlers_is_limit_exceeded(
    name: str, params: dict[str, Any], config: dict[str, int]
) -> None:
    connection = core(**config)
    (first,) = connection.receive(command(name, **params), T0)
    if isinstance(first, Join):
        connection.joined_channel(first.op, {"last_seq": 0})
    else:
        assert isinstance(first, Serve)
        connection.handler_served(first.op)
    # The same channel (or handler) again is no new one; another is one too many.
    assert kinds(connection.receive(command(name, id="c2", **params), T0)) in (["Join"], ["Send"])
    effects = connection.receive(command(name, id="c3", channel="other", **params), T0)
    assert [error_of(f) for f in frames(effects)] == [("limit_exceeded", "c3")]


def test_unregistering_an_unknown_handler_is_not_registered_and_a_known_one_unserves() -> None:
    connection = core()
    effects = connection.receive(command("unregister_handler", command="svc"), T0)
    assert error_of(frames(effects)[0]) == ("not_registered", "c1")
    (serve,) = connection.receive(command("register_handler", id="c2", command="svc"), T0)
    connection.handler_served(serve.op)
    effects = connection.receive(command("unregister_handler", id="c3", command="svc"), T0)
    assert kinds(effects) == ["Unserve", "Send"]


def test_a_handler_confirmed_while_draining_is_unserved_and_refused() -> None:
    connection = core()
    (serve,) = connection.receive(command("register_handler", command="svc"), T0)
    connection.begin_drain()
    effects = connection.handler_served(serve.op)
    assert kinds(effects) == ["Unserve", "Send"]
    assert error_of(frames(effects)[0]) == ("unavailable", "c1")


PARAMETER_CASES = [
    command("join_channel", since_seq=-1),
    command("history", limit=0),
    command("history", limit=5000),
    command("register_handler", command="join_channel"),
    command("register_handler"),
    command("join_channel", room_key=""),
    command("refresh_token"),
    command("svc", timeout=1).replace(b'"parameters"', b'"timeout_ms":0,"parameters"'),
]


@pytest.mark.parametrize("frame", PARAMETER_CASES)
def test_bad_parameters_are_invalid_parameters(frame: bytes) -> None:
    (reply,) = frames(core().receive(frame, T0))
    assert error_of(reply) == ("invalid_parameters", "c1")


# -- service commands -------------------------------------------------------------------------


CALL_FAILURES = [
    ("histroy", Failure.NO_RESPONDERS, "unknown_command", "did you mean history?"),
    ("subscribe", Failure.NO_RESPONDERS, "unknown_command", "did you mean join_channel?"),
    ("weather", Failure.NO_RESPONDERS, "no_responders", ""),
    ("weather", Failure.TIMEOUT, "timeout", "no answer within 5000 ms"),
    ("weather", Failure.UNAVAILABLE, "unavailable", ""),
    ("weather", Failure.MALFORMED, "internal", ""),
]


@pytest.mark.parametrize(("name", "failure", "expected", "says"), CALL_FAILURES)
def test_a_failed_service_call_gets_the_error_of_its_failure(
    name: str, failure: Failure, expected: str, says: str
) -> None:
    connection = core(command_timeout_ms=5000)
    (call,) = connection.receive(command(name), T0)
    assert isinstance(call, CallService)
    (reply,) = frames(connection.call_failed(call.op, failure))
    assert error_of(reply) == (expected, "c1")
    assert says in reply["payload"]["error"]["message"]


def test_a_command_name_that_is_no_valid_service_name_suggests_the_builtin() -> None:
    (reply,) = frames(core().receive(command("join channel"), T0))
    assert error_of(reply) == ("unknown_command", "c1")
    assert "did you mean join_channel?" in reply["payload"]["error"]["message"]


def test_a_service_call_carries_the_caller_and_timeout_and_gets_the_handlers_answer() -> None:
    connection = core()
    frame = command("weather", city="Oslo").replace(
        b'"parameters"', b'"timeout_ms":250,"parameters"'
    )
    (call,) = connection.receive(frame, T0)
    assert isinstance(call, CallService)
    assert (call.name, call.timeout_s) == ("weather", 0.25)
    sent = ServiceCall.decode(call.body)
    assert (sent.sender, sent.request_id, sent.parameters) == ("alice", "c1", {"city": "Oslo"})
    answer = ServiceReply("resp_h", "bob", STAMP, {"temp": 3}, None).encode()
    (reply,) = frames(connection.call_answered(call.op, answer))
    assert (reply["from"], reply["payload"]["result"]) == ("bob", {"temp": 3})
    other, op = _open_call()
    assert error_of(frames(other.call_answered(op, b"junk"))[0]) == ("internal", "c1")


def _open_call() -> tuple[Connection, int]:
    connection = core()
    (call,) = connection.receive(command("weather"), T0)
    return connection, call.op


def test_service_calls_beyond_max_in_flight_are_limit_exceeded() -> None:
    connection = core(max_in_flight=1)
    assert kinds(connection.receive(command("svc"), T0)) == ["CallService"]
    (reply,) = frames(connection.receive(command("svc", id="c2"), T0))
    assert error_of(reply) == ("limit_exceeded", "c2")


# -- service commands: the handler's side ----------------------------------------------------------


def _request(timeout_ms: int = 1000) -> bytes:
    return ServiceCall("svc", {"x": 1}, "bob", "c7", STAMP, timeout_ms).encode()


def test_a_delivery_is_answered_once_and_a_second_answer_is_unknown_request() -> None:
    connection = core()
    ref = ChannelRef("acme", "r", "c")
    timer, delivery = connection.service_request(ref, "_INBOX.1", _request(2000))
    assert timer == ArmTimer("dlv_0001", 2.5)
    (command_frame,) = frames([delivery])
    assert (command_frame["id"], command_frame["from"], command_frame["payload"]["command"]) == (
        "dlv_0001",
        "bob",
        "svc",
    )
    answer = envelope(
        "command_response", id="a1", request_id="dlv_0001", status="success", result={"ok": True}
    )
    effects = connection.receive(answer, T0)
    assert kinds(effects) == ["CancelTimer", "Respond"]
    respond = effects[1]
    assert isinstance(respond, Respond)
    assert (respond.reply, respond.request_id) == ("_INBOX.1", "a1")
    assert ServiceReply.decode(respond.body).result == {"ok": True}
    assert error_of(frames(connection.receive(answer, T0))[0]) == ("unknown_request", "a1")


def test_an_expired_delivery_is_unknown_request_and_answers_are_taken_while_draining() -> None:
    connection = core()
    ref = ChannelRef("acme", "r", "c")
    connection.service_request(ref, "_INBOX.1", _request())
    connection.service_request(ref, "_INBOX.2", _request())
    connection.delivery_expired("dlv_0001")
    connection.begin_drain()
    late = envelope("command_response", id="a1", request_id="dlv_0001", status="success")
    assert error_of(frames(connection.receive(late, T0))[0]) == ("unknown_request", "a1")
    ok = envelope("command_response", id="a2", request_id="dlv_0002", status="success")
    assert kinds(connection.receive(ok, T0)) == ["CancelTimer", "Respond"]
    assert connection.receive(envelope(), T0) == []  # events are not acted on while draining


def test_a_handler_that_is_leaving_or_full_answers_unavailable_itself() -> None:
    connection = core(max_in_flight=1)
    ref = ChannelRef("acme", "r", "c")
    assert kinds(connection.service_request(ref, "_INBOX.1", _request())) == ["ArmTimer", "Send"]
    (full,) = connection.service_request(ref, "_INBOX.2", _request())
    assert isinstance(full, Respond) and ServiceReply.decode(full.body).error is not None
    (leaving,) = connection.service_request(ref, "_INBOX.3", _request(), socket_open=False)
    assert isinstance(leaving, Respond)
    assert "handler is leaving" in ServiceReply.decode(leaving.body).error.message  # type: ignore[union-attr]
    effects = connection.close_handlers("the handler's connection closed")
    assert kinds(effects) == ["CancelTimer", "Respond"]
    assert connection.service_request(ref, "_INBOX.4", b"not a call") == []


# -- credentials, agents, room administration, limits ------------------------------------------------


def test_refresh_token_to_another_principal_is_forbidden() -> None:
    connection = core()
    (check,) = connection.receive(command("refresh_token", token="t"), T0)
    assert isinstance(check, CheckCredential) and check.token == "t"
    (reply,) = frames(connection.credential_checked(check.op, Who(id="mallory")))
    assert error_of(reply) == ("forbidden", "c1")


def test_refresh_token_that_narrows_the_rights_drops_what_it_no_longer_allows() -> None:
    connection = core()
    (join,) = connection.receive(command("join_channel"), T0)
    connection.joined_channel(join.op, {"last_seq": 0})
    (serve,) = connection.receive(command("register_handler", id="c2", command="svc"), T0)
    connection.handler_served(serve.op)
    (check,) = connection.receive(command("refresh_token", id="c3", token="t"), T0)
    narrower = Who(role="read-only", grants=("r:c:subscribe",), expires_at=WALL + 600)
    effects = connection.credential_checked(check.op, narrower)
    assert kinds(effects) == ["Unserve", "Send", "ArmExpiry", "Send"]
    dropped, reply = frames(effects)
    assert dropped["payload"]["dropped"] == ["r/c:svc"]
    assert reply["payload"]["result"] == {"expires_at": WALL + 600, "role": "read-only"}
    assert effects[2] == ArmExpiry(WALL + 600)
    assert error_of(frames(connection.receive(envelope(id="m9"), T0))[0])[0] == "forbidden"


def test_refresh_token_refused_by_the_authenticator_is_the_error_given() -> None:
    connection = core()
    (check,) = connection.receive(command("refresh_token", token="t"), T0)
    refused = ArqonError(INVALID_PARAMETERS, "parameter 'token' was refused: expired")
    (reply,) = frames(connection.command_failed(check.op, refused))
    assert error_of(reply) == ("invalid_parameters", "c1")
    (reply,) = frames(core(can_refresh=False).receive(command("refresh_token", token="t"), T0))
    assert error_of(reply) == ("invalid_parameters", "c1")


def test_register_agent_needs_admin_on_the_whole_tenant_and_is_audited() -> None:
    one_room_admin = core(Who(role="member", grants=("r:*:admin",)))
    (reply,) = frames(one_room_admin.receive(command("register_agent"), T0))
    assert error_of(reply) == ("forbidden", "c1")
    connection = core(Who(role="owner"))
    (register,) = connection.receive(command("register_agent", public_key="k"), T0)
    assert isinstance(register, RegisterAgent) and register.role == "owner"
    record = {
        "agent_id": "ag1",
        "tenant": "acme",
        "name": "bot",
        "role": "member",
        "public_key": "k",
    }
    audit, send = connection.agent_registered(register.op, record)
    assert isinstance(audit, Audit) and audit.details == {"agent_id": "ag1", "role": "member"}
    assert frames([send])[0]["payload"]["result"] == {
        "agent_id": "ag1",
        "tenant": "acme",
        "name": "bot",
        "role": "member",
    }


def test_room_admin_commands_are_audited_except_room_info() -> None:
    connection = core(Who(role="admin"))
    (ban,) = connection.receive(command("room_ban", principal="bob"), T0)
    assert isinstance(ban, RoomAdmin) and ban.name == "room_ban"
    effects = connection.room_admin_done(ban.op, {"banned": True}, "bob")
    assert kinds(effects) == ["Audit", "Send"]
    assert effects[0].details == {"action": "room_ban", "room": "r", "target": "bob"}  # type: ignore[union-attr]
    (info,) = connection.receive(command("room_info", id="c2"), T0)
    assert kinds(connection.room_admin_done(info.op, {}, "")) == ["Send"]
    (reply,) = frames(core(Who(role="admin"), has_security=False).receive(command("room_info"), T0))
    assert error_of(reply) == ("unavailable", "c1")


def test_limits_reports_this_connections_usage() -> None:
    connection = core(max_channels=5)
    (join,) = connection.receive(command("join_channel"), T0)
    connection.joined_channel(join.op, {"last_seq": 0})
    connection.receive(envelope(), T0)
    (report,) = connection.receive(command("limits", id="c2"), T0)
    assert isinstance(report, ReportLimits)
    assert report.usage == {
        "channels": 1,
        "max_channels": 5,
        "handlers": 0,
        "max_handlers": 100,
        "in_flight": 1,
        "calls_in_flight": 0,
        "max_in_flight": 1000,
    }
    (reply,) = frames(connection.command_done(report.op, {"usage": report.usage}))
    assert reply["payload"]["result"]["usage"]["channels"] == 1


def test_a_ban_pushed_from_another_gateway_leaves_the_rooms_channels() -> None:
    connection = core()
    for i, channel in enumerate(("a", "b")):
        (join,) = connection.receive(command("join_channel", id=f"j{i}", channel=channel), T0)
        connection.joined_channel(join.op, {"last_seq": 0})
    error = ArqonError(BANNED, "you are banned from room 'r'")
    effects = connection.leave_room("r", error)
    assert kinds(effects) == ["Leave", "Leave", "Send"]
    assert frames(effects)[0]["payload"]["channels"] == ["a", "b"]
    assert connection.leave_room("r", error) == []


def test_connection_lost_leaves_every_channel() -> None:
    connection = core()
    (join,) = connection.receive(command("join_channel"), T0)
    connection.joined_channel(join.op, {"last_seq": 0})
    assert connection.connection_lost() == [Leave(ChannelRef("acme", "r", "c"))]


# -- presence and the gateway's admin commands (issue 16) ------------------------------------


def test_join_enters_presence_by_the_rooms_default_and_asks_for_frames_with_it() -> None:
    rooms = Rooms({("acme", "r"): Room(presence=True)})
    effects = core(rooms=rooms).receive(command("join_channel"), T0)
    (join,) = [e for e in effects if isinstance(e, Join)]
    assert (join.presence, join.presence_events) == (True, True)
    plain = core().receive(command("join_channel", room="other"), T0)
    (join,) = [e for e in plain if isinstance(e, Join)]
    assert (join.presence, join.presence_events) == (False, False)
    watch_only = core().receive(command("join_channel", presence_events=True), T0)
    (join,) = [e for e in watch_only if isinstance(e, Join)]
    assert (join.presence, join.presence_events) == (False, True)


def test_presence_frames_need_the_presence_permission_but_entering_does_not() -> None:
    guest = Who(role="viewer")
    refused = core(guest).receive(command("join_channel", presence=True), T0)
    assert [error_of(f)[0] for f in frames(refused)] == ["forbidden"]
    assert "presence_events" in frames(refused)[0]["payload"]["error"]["message"]
    entered = core(guest).receive(command("join_channel", presence=True, presence_events=False), T0)
    (join,) = [e for e in entered if isinstance(e, Join)]
    assert (join.presence, join.presence_events) == (True, False)


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (command("join_channel", presence="yes"), "'presence' must be true or false"),
        (command("presence", limit=0), "limit"),
        (command("presence", cursor="!!"), "cursor"),
        (command("set_presence", state="away"), "state"),
        (command("set_presence", metadata={"x": "y" * 2000}), "1024"),
        (command("set_presence"), "state"),
        (command("list_rooms", limit=5000, room="r"), "limit"),
        (command("list_channels", cursor="a b"), "cursor"),
        (command("delete_room"), "confirm"),
        (command("delete_room", confirm="other"), "confirm"),
        (command("kick"), "principal"),
        (command("kick", principal="bob", reason="x" * 201), "reason"),
    ],
)
def test_bad_presence_and_admin_parameters_are_refused_without_io(
    frame: bytes, message: str
) -> None:
    effects = core(Who(role="owner")).receive(frame, T0)
    assert kinds(effects) == ["Send"]
    (response,) = frames(effects)
    assert error_of(response)[0] == "invalid_parameters"
    assert message in response["payload"]["error"]["message"]


@pytest.mark.parametrize(
    ("name", "parameters"),
    [
        ("list_rooms", {"limit": 10}),
        ("list_channels", {"cursor": "c1"}),
        ("channel_info", {}),
        ("delete_room", {"confirm": "r"}),
        ("presence", {"state": "idle", "limit": 5}),
        ("occupancy", {}),
        ("set_presence", {"state": "idle", "metadata": {"skill": "triage"}}),
    ],
)
def test_gateway_commands_go_to_the_gateway_with_checked_parameters(
    name: str, parameters: dict[str, Any]
) -> None:
    connection = core(Who(role="owner"))
    effects = connection.receive(command(name, **parameters), T0)
    (run,) = effects
    assert isinstance(run, RunCommand)
    assert (run.name, run.ref, run.principal, run.session) == (
        name,
        ChannelRef("acme", "r", "c"),
        "alice",
        "s1",
    )
    answered = frames(connection.command_done(run.op, {"ok": True}))
    assert answered[-1]["payload"]["result"] == {"ok": True}


def test_delete_room_is_audited_once_done() -> None:
    connection = core(Who(role="owner"))
    (run,) = connection.receive(command("delete_room", confirm="r"), T0)
    assert isinstance(run, RunCommand)
    effects = connection.command_done(run.op, {"room": "r"})
    audits = [e for e in effects if isinstance(e, Audit)]
    assert [(a.type, a.details["action"], a.details["room"]) for a in audits] == [
        ("admin_action", "delete_room", "r")
    ]


@pytest.mark.parametrize("name", ["create_room", "configure_room", "kick"])
def test_room_record_commands_go_to_the_room_directory(name: str) -> None:
    parameters = {"principal": "bob"} if name == "kick" else {"retention_s": 7200}
    (effect,) = core(Who(role="owner")).receive(command(name, **parameters), T0)
    assert isinstance(effect, RoomAdmin)
    assert effect.name == name


def test_a_rooms_retention_and_size_limit_apply_to_its_events() -> None:
    rooms = Rooms({("acme", "r"): Room(retention_s=3600, max_message_bytes=400)})
    connection = core(rooms=rooms)
    (publish,) = connection.receive(envelope(text="hi"), T0)
    assert isinstance(publish, Publish)
    assert publish.ttl_s == 3600
    refused = frames(connection.receive(envelope(id="m2", text="x" * 500), T0))
    assert [error_of(f) for f in refused] == [("message_too_large", "m2")]
    assert refused[0]["payload"]["max_bytes"] == 400
    (other,) = connection.receive(envelope(id="m3", room="r2", text="x" * 500), T0)
    assert isinstance(other, Publish) and other.ttl_s is None


def test_ping_and_status_are_service_calls_outside_the_system_room() -> None:
    connection = core(Who(role="owner"))
    (call,) = connection.receive(command("status"), T0)
    assert isinstance(call, CallService) and call.name == "status"
    refused = frames(connection.call_failed(call.op, Failure.NO_RESPONDERS))
    assert [error_of(f)[0] for f in refused] == ["no_responders"]
    (run,) = connection.receive(command("status", id="c2", room="_system"), T0)
    assert isinstance(run, RunCommand) and run.name == "status"
    (run,) = core(Who(role="read-only")).receive(command("ping", room="_system"), T0)
    assert isinstance(run, RunCommand) and run.name == "ping"


# -- batched delivery (issue 17) ---------------------------------------------------------------


def test_join_asks_for_batched_delivery_only_when_batch_is_true() -> None:
    (join,) = core().receive(command("join_channel", batch=True), T0)
    assert isinstance(join, Join) and join.batch
    (join,) = core().receive(command("join_channel"), T0)
    assert isinstance(join, Join) and not join.batch
    (join,) = core().receive(command("join_channel", batch=False), T0)
    assert isinstance(join, Join) and not join.batch
    refused = frames(core().receive(command("join_channel", batch="yes"), T0))
    assert [error_of(f)[0] for f in refused] == ["invalid_parameters"]
    assert refused[0]["payload"]["error"]["message"].startswith(
        "parameter 'batch' must be true or false"
    )
