"""Placed tenants in the sans-I/O core: since_epoch, the resume point across a failover, and
the epoch in acks (shared/core/resume.py, shared/commands.py, shared/core/connection.py)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from arqonbus_server.shared.commands import JoinParams, join_params
from arqonbus_server.shared.core.effects import Join, Publish, Send
from arqonbus_server.shared.core.resume import EpochLoss, ResumePoint, resume_point
from arqonbus_server.shared.envelope import encode_gap, with_seq_epoch
from arqonbus_server.shared.errors import ArqonError
from arqonbus_server.shared.regions import Epoch, Placement, StreamAt, promoted
from arqonbus_server.shared.subjects import ChannelRef
from tests.unit.test_core_connection import T0, command, core, envelope, error_of, frames

EAST = StreamAt("east", "arq_acme")
WEST = StreamAt("west", "arq-mirror-west_acme")
FIRST = Placement("acme", "east", EAST, (WEST,), (Epoch(1, 1, EAST),))
# West's mirror held up to seq 7 when east was lost: epoch 2 starts at 8 (the fork is 7).
SECOND = promoted(FIRST, "west", 7)


def test_a_tenant_that_is_not_placed_resumes_where_it_asks() -> None:
    assert resume_point(None, None, 10) == ResumePoint(10)
    assert resume_point(None, 3, 10) == ResumePoint(10)


def test_a_position_in_the_current_epoch_is_kept_and_tagged_with_it() -> None:
    assert resume_point(SECOND, 2, 12) == ResumePoint(12, 2)
    assert resume_point(SECOND, None, 12) == ResumePoint(12, 2)  # a client without epochs
    assert resume_point(FIRST, 1, 5) == ResumePoint(5, 1)
    assert resume_point(SECOND, 2, None) == ResumePoint(None, 2)


def test_an_old_epoch_position_up_to_the_fork_is_kept() -> None:
    assert resume_point(SECOND, 1, 7) == ResumePoint(7, 2)
    assert resume_point(SECOND, 1, 3) == ResumePoint(3, 2)


def test_an_old_epoch_position_past_the_fork_resumes_at_the_fork_and_names_the_loss() -> None:
    point = resume_point(SECOND, 1, 10)
    assert point == ResumePoint(7, 2, EpochLoss(1, 8, 10))
    assert point.loss is not None
    assert point.loss.gap_fields() == {
        "reason": "epoch",
        "lost": {"epoch": 1, "from_seq": 8, "to_seq": 10},
    }


def test_two_failovers_take_the_first_fork_after_the_clients_epoch() -> None:
    third = promoted(Placement("acme", "east", SECOND.primary, (EAST,), SECOND.epochs), "east", 20)
    assert resume_point(third, 1, 10) == ResumePoint(7, 3, EpochLoss(1, 8, 10))
    assert resume_point(third, 2, 25) == ResumePoint(20, 3, EpochLoss(2, 21, 25))


def test_join_params_take_since_epoch_with_since_seq() -> None:
    assert join_params({"since_seq": 4, "since_epoch": 2}) == JoinParams(4, 2)
    assert join_params({"since_seq": 4}) == JoinParams(4, None)


@pytest.mark.parametrize(
    "parameters",
    [
        {"since_seq": 4, "since_epoch": 0},
        {"since_seq": 4, "since_epoch": -1},
        {"since_seq": 4, "since_epoch": "2"},
        {"since_seq": 4, "since_epoch": True},
        {"since_seq": 4, "since_epoch": 1.5},
        {"since_epoch": 2},  # an epoch without a seq says nothing
    ],
)
def test_join_params_refuse_a_bad_since_epoch(parameters: dict[str, Any]) -> None:
    with pytest.raises(ArqonError) as info:
        join_params(parameters)
    assert info.value.code == "invalid_parameters"
    assert "since_epoch" in info.value.message


def test_the_core_passes_since_epoch_to_the_join() -> None:
    connection = core()
    (join,) = connection.receive(command("join_channel", since_seq=4, since_epoch=2), T0)
    assert join == Join(join.op, ChannelRef("acme", "r", "c"), 4, 2)


def test_a_bad_since_epoch_is_an_error_reply_and_the_connection_lives_on() -> None:
    connection = core()
    (reply,) = frames(connection.receive(command("join_channel", since_epoch="x"), T0))
    assert error_of(reply) == ("invalid_parameters", "c1")
    (join,) = connection.receive(command("join_channel", id="c2", since_seq=1), T0)
    assert isinstance(join, Join)


def test_an_ack_of_a_placed_tenant_carries_its_epoch() -> None:
    connection = core()
    (publish,) = connection.receive(envelope(), T0)
    assert isinstance(publish, Publish)
    (ack,) = connection.publish_acked(publish.op, 12, False, epoch=2)
    assert isinstance(ack, Send)
    assert orjson.loads(ack.frame)["payload"]["epoch"] == 2
    (publish,) = connection.receive(envelope(id="e2"), T0)
    (ack,) = connection.publish_acked(publish.op, 13, False)
    assert "epoch" not in orjson.loads(ack.frame)["payload"]  # not placed: as before


def test_delivered_and_gap_frames_of_an_epoch() -> None:
    assert orjson.loads(with_seq_epoch(b'{"id":"a"}', 8, 2)) == {"id": "a", "seq": 8, "epoch": 2}
    gap = orjson.loads(encode_gap("r", "c", 7, 8, EpochLoss(1, 8, 10).gap_fields()))
    assert gap["payload"] == {
        "after_seq": 7,
        "first_available_seq": 8,
        "reason": "epoch",
        "lost": {"epoch": 1, "from_seq": 8, "to_seq": 10},
    }


# -- which epoch an event belongs to (Placement.epoch_of) ----------------------------------------

# Failback: east again from seq 12 (the fork of epoch 2 is 11).
THIRD = Placement("acme", "east", EAST, (WEST,), (*SECOND.epochs, Epoch(3, 12, EAST)), SECOND.acks)


@pytest.mark.parametrize(
    ("placement", "seq", "stream", "epoch"),
    [
        (FIRST, 3, EAST.stream, 1),
        (SECOND, 8, WEST.stream, 2),  # the new primary's own events
        (SECOND, 7, EAST.stream, 1),  # up to the fork: epoch 1's (shared with epoch 2)
        (SECOND, 9, EAST.stream, None),  # the former primary living on (a region cut off)
        (FIRST, 8, WEST.stream, None),  # a primary of an epoch not known yet
        (SECOND, 12, EAST.stream, None),  # failback not known yet: east's seq 12 is epoch 3
        (THIRD, 12, EAST.stream, 3),
        (THIRD, 9, WEST.stream, 2),
        (Placement("acme", "east", EAST), 5, EAST.stream, 1),  # a record without epochs
    ],
)
def test_an_events_epoch_is_the_last_known_one_it_falls_in_if_that_epochs_primary_stored_it(
    placement: Placement, seq: int, stream: str, epoch: int | None
) -> None:
    assert placement.epoch_of(seq, stream) == epoch


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"\xff\xfe",
        b"[]",
        b"{}",
        b'{"tenant": "a", "home": "east", "primary": "arq_a"}',
        b'{"tenant": "a", "home": "east", "primary": {"region": "east"}}',
        b'{"tenant": "a", "home": "east", "primary": {"region": "e", "stream": "s"},'
        b' "epochs": [{"epoch": "two", "start_seq": 1, "primary": {"region": "e", "stream": "s"}}]}',
        b'{"tenant": "a", "home": "east", "primary": {"region": "e", "stream": "s"},'
        b' "epochs": [{"epoch": true, "start_seq": 1, "primary": {"region": "e", "stream": "s"}}]}',
        b'{"tenant": "a", "home": "east", "primary": {"region": "e", "stream": "s"}, "mirrors": 3}',
    ],
)
def test_a_record_that_is_not_a_placement_raises_one_typed_error(raw: bytes) -> None:
    from arqonbus_server.shared.errors import InvalidInput
    from arqonbus_server.shared.regions import PlacementRecordError

    with pytest.raises(PlacementRecordError, match="not a placement record") as caught:
        Placement.from_json(raw)
    assert isinstance(caught.value, InvalidInput)
    assert caught.value.catalogue.code == "invalid_parameters"
