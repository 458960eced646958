"""Runs every conformance fixture of clients/conformance/ against the SDK's sans-I/O core.

The format is described in clients/conformance/README.md; the JavaScript SDK runs the same files
(clients/js/test/conformance.test.js).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import orjson
import pytest

from arqonbus import ArqonBusError, Event, Gap
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
    ProtocolEvent,
    PublishFailed,
    RemovedFromRoom,
    ServiceRequest,
    SubscriptionFailed,
    SubscriptionState,
)
from arqonbus.models import Welcome

FIXTURES = sorted((Path(__file__).parents[2] / "clients" / "conformance").glob("*.json"))


def error_json(error: ArqonBusError | None) -> dict[str, Any] | None:
    if error is None:
        return None
    return {
        "class": type(error).__name__,
        "code": error.code,
        "message": error.message,
        "retryable": error.retryable,
        "retry_after_ms": error.retry_after_ms,
        "request_id": error.request_id,
        "room": error.room,
        "channels": list(error.channels),
        "event_index": error.event_index,
        "event_id": error.event_id,
    }


def item_json(item: Event | Gap | None) -> dict[str, Any] | None:
    if isinstance(item, Event):
        return {
            "type": "event",
            "room": item.room,
            "channel": item.channel,
            "id": item.id,
            "seq": item.seq,
            "payload": item.payload,
        }
    if isinstance(item, Gap):
        return {
            "type": "gap",
            "room": item.room,
            "channel": item.channel,
            "after_seq": item.after_seq,
            "first_available_seq": item.first_available_seq,
        }
    return None


def event_json(event: ProtocolEvent) -> dict[str, Any]:
    match event:
        case Acked(request_id=rid, seq=seq, duplicate=dup):
            return {"event": "acked", "request_id": rid, "seq": seq, "duplicate": dup}
        case BatchAcked(request_id=rid, seqs=seqs, duplicates=duplicates):
            return {
                "event": "batch_acked",
                "request_id": rid,
                "seqs": list(seqs),
                "duplicates": sorted(duplicates),
            }
        case PublishFailed(request_id=rid, error=error):
            return {"event": "publish_failed", "request_id": rid, "error": error_json(error)}
        case CommandResult(request_id=rid, result=result, error=error):
            return {
                "event": "command_result",
                "request_id": rid,
                "result": result,
                "error": error_json(error),
            }
        case Delivered(event=item):
            return {"event": "delivered", "item": item_json(item)}
        case GapDetected(gap=gap):
            return {"event": "gap", "item": item_json(gap)}
        case Joined(room=room, channel=channel, last_seq=last_seq):
            return {"event": "joined", "room": room, "channel": channel, "last_seq": last_seq}
        case JoinRetry(room=room, channel=channel, attempt=attempt, error=error):
            return {
                "event": "join_retry",
                "room": room,
                "channel": channel,
                "attempt": attempt,
                "error": error_json(error),
            }
        case SubscriptionFailed(room=room, channel=channel, error=error):
            return {
                "event": "subscription_failed",
                "room": room,
                "channel": channel,
                "error": error_json(error),
            }
        case Paused(room=room, channel=channel):
            return {"event": "paused", "room": room, "channel": channel}
        case ServiceRequest(request=request):
            return {
                "event": "service_request",
                "delivery_id": request.delivery_id,
                "command": request.command,
                "parameters": request.parameters,
            }
        case RemovedFromRoom(room=room, channels=channels, error=error):
            return {
                "event": "removed_from_room",
                "room": room,
                "channels": list(channels),
                "error": error_json(error),
            }
        case ErrorReceived(request_id=rid, error=error):
            return {"event": "error_received", "request_id": rid, "error": error_json(error)}
    raise AssertionError(f"no JSON form for {event!r}")


def matches(expected: Any, actual: Any) -> bool:
    """Objects match when every expected key matches (extra actual keys are allowed);
    lists match item by item and must have the same length; anything else must be equal."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(
            k in actual and matches(v, actual[k]) for k, v in expected.items()
        )
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(expected) == len(actual)
            and all(matches(e, a) for e, a in zip(expected, actual, strict=True))
        )
    return bool(expected == actual) and type(expected) is type(actual)


class Runner:
    def __init__(self) -> None:
        counter = itertools.count(1)
        self.core = ClientProtocol(new_id=lambda prefix: f"{prefix or 'id'}_{next(counter)}")
        self.subs: dict[tuple[str, str], SubscriptionState] = {}

    def run(self, step: dict[str, Any]) -> tuple[list[ProtocolEvent], Any]:
        """Do one step: the events it emitted, and what it returned (for ``expect_return``)."""
        if "receive" in step:
            return self.core.receive(step["receive"]), None
        action, core = step["action"], self.core
        if action == "connection_made":
            core.connection_made(Welcome.from_wire(step["welcome"]))
        elif action == "connection_lost":
            core.connection_lost()
        elif action == "publish":
            return [], core.publish(step["room"], step["channel"], step["payload"], step.get("id"))
        elif action == "publish_many":
            batch_id, _, frame = core.encode_events(
                step["room"], step["channel"], step["payloads"], step.get("ids")
            )
            core.send_event(batch_id, frame)
            return [], batch_id
        elif action == "command":
            extra = {"timeout_ms": step["timeout_ms"]} if "timeout_ms" in step else None
            return [], core.command(
                step["room"], step["channel"], step["command"], step.get("parameters", {}), extra
            )
        elif action == "subscribe":
            state = SubscriptionState(
                step["room"],
                step["channel"],
                step.get("since_seq"),
                step.get("room_key"),
                step.get("queue_size", 10_000),
            )
            self.subs[state.key] = state
            core.subscribe(state)
        elif action == "take":
            return [], item_json(core.take(self.subs[(step["room"], step["channel"])]))
        elif action == "rejoin":
            core.rejoin(self.subs[(step["room"], step["channel"])])
        else:
            raise AssertionError(f"unknown action {action!r}")
        return [], None


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_fixture(path: Path) -> None:
    fixture = orjson.loads(path.read_bytes())
    runner = Runner()
    for number, step in enumerate(fixture["steps"], 1):
        events, returned = runner.run(step)
        frames = [orjson.loads(f) for f in runner.core.data_to_send()]
        where = f"{path.name} step {number} ({step.get('note', step.get('action', 'receive'))})"
        got_events = [event_json(e) for e in events]
        assert matches(step.get("expect_frames", []), frames), f"{where}: frames {frames}"
        assert matches(step.get("expect_events", []), got_events), f"{where}: events {got_events}"
        if "expect_return" in step:
            assert matches(step["expect_return"], returned), f"{where}: returned {returned}"


def test_there_are_fixtures_for_every_rule() -> None:
    assert len(FIXTURES) >= 8
