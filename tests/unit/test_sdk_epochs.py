"""The SDK's sans-I/O core and epochs (clients/python/arqonbus/_protocol.py): a subscription's
epoch never goes back, and an event not taken (the queue was full) does not move it."""

from __future__ import annotations

import itertools
from typing import Any

import orjson

from arqonbus._protocol import ClientProtocol, SubscriptionState
from arqonbus.models import Welcome

ROOM, CHANNEL = "science", "general"


def core_with_subscription(maxsize: int = 100) -> tuple[ClientProtocol, SubscriptionState]:
    counter = itertools.count(1)
    core = ClientProtocol(new_id=lambda prefix: f"{prefix or 'id'}_{next(counter)}")
    core.connection_made(Welcome.from_wire({"type": "welcome", "payload": {"limits": {}}}))
    state = SubscriptionState(ROOM, CHANNEL, 0, maxsize=maxsize)
    core.subscribe(state)
    answer(core, {"last_seq": 0, "epoch": 2})
    return core, state


def answer(core: ClientProtocol, result: dict[str, Any]) -> dict[str, Any]:
    """Answer the join just sent with ``result``; returns the join's parameters."""
    (join,) = [orjson.loads(frame) for frame in core.data_to_send()]
    payload = {"request_id": join["id"], "status": "success", "result": result}
    core.receive({"type": "command_response", "room": ROOM, "channel": CHANNEL, "payload": payload})
    parameters: dict[str, Any] = join["payload"]["parameters"]
    return parameters


def event(seq: int, epoch: int) -> dict[str, Any]:
    return {
        "type": "event",
        "id": f"e{seq}.{epoch}",
        "room": ROOM,
        "channel": CHANNEL,
        "payload": {},
        "seq": seq,
        "epoch": epoch,
    }


def test_a_join_answered_in_an_older_epoch_does_not_move_the_subscription_back() -> None:
    core, state = core_with_subscription()
    core.receive(event(1, 2))
    assert core.take(state) is not None
    core.connection_lost()
    core.connection_made(Welcome.from_wire({"type": "welcome", "payload": {"limits": {}}}))
    asked = answer(core, {"last_seq": 1, "epoch": 1})  # a gateway that would be behind
    assert (asked["since_seq"], asked["since_epoch"]) == (1, 2)
    assert state.accepted_epoch == 2
    assert core.receive(event(2, 1)) == []  # nothing of the older epoch is taken


def test_an_event_not_taken_because_the_queue_is_full_does_not_move_the_epoch() -> None:
    core, state = core_with_subscription(maxsize=1)
    core.receive(event(1, 2))
    core.receive(event(2, 3))  # the queue is full: paused, not taken
    assert (state.accepted_seq, state.accepted_epoch) == (1, 2)
