"""The presence model of the state machine (chaos/presence_model.py), without a mesh.

The machine itself runs against a real mesh in tests/integration/test_state_machine.py
(and longer in ``make chaos``); here: the expected member list, and that a ghost, a missing
member, a principal listed twice or an occupancy that disagrees is each reported.
"""

from __future__ import annotations

from typing import Any

from arqonbus import Member, Occupancy
from chaos.presence_model import (
    ExpectedMember,
    PresenceSession,
    expected_members,
    gateway_of,
    has_ghost,
    listing_mismatch,
)


def _session(name: str, principal: str, channels: list[str], state: str = "online") -> Any:
    session = PresenceSession(name, principal, client=None)  # type: ignore[arg-type]
    session.subs = dict.fromkeys(channels)  # type: ignore[assignment]  # only the keys count
    session.state = state
    return session


def _member(principal: str, state: str, *conns: tuple[str, str]) -> Member:
    return Member.from_wire(
        {
            "principal": principal,
            "state": state,
            "metadata": {},
            "connections": [
                {"session": f"s{i}", "gateway": gw, "state": st, "joined_at": 1.0}
                for i, (gw, st) in enumerate(conns)
            ],
        }
    )


def _occupancy(members: int, connections: int, online: int, idle: int) -> Occupancy:
    return Occupancy.from_wire(
        {"members": members, "connections": connections, "online": online, "idle": idle}
    )


SESSIONS = [
    _session("alice#1", "alice", ["p0"], "idle"),
    _session("alice#2", "alice", ["p0", "p1"]),
    _session("bob#3", "bob", ["p1"], "idle"),
]
WHERE = {"alice#1": "gw-1", "alice#2": "gw-2", "bob#3": "gw-1"}


def test_a_principal_on_two_gateways_is_one_member_online_if_any_session_is() -> None:
    assert expected_members(SESSIONS, "p0", WHERE) == {
        "alice": ExpectedMember("online", (("gw-1", "idle"), ("gw-2", "online")))
    }
    assert expected_members(SESSIONS, "p1", WHERE) == {
        "alice": ExpectedMember("online", (("gw-2", "online"),)),
        "bob": ExpectedMember("idle", (("gw-1", "idle"),)),
    }


def test_a_listing_that_matches_the_model_passes() -> None:
    expected = expected_members(SESSIONS, "p0", WHERE)
    members = [_member("alice", "online", ("gw-2", "online"), ("gw-1", "idle"))]
    assert listing_mismatch(expected, members, _occupancy(1, 2, 1, 0)) is None
    assert not has_ghost(expected, members)


def test_a_ghost_connection_of_a_killed_gateway_is_reported() -> None:
    expected = expected_members(SESSIONS, "p1", WHERE)
    members = [
        _member("alice", "online", ("gw-2", "online"), ("gw-9", "online")),
        _member("bob", "idle", ("gw-1", "idle")),
    ]
    mismatch = listing_mismatch(expected, members, _occupancy(2, 3, 1, 1))
    assert mismatch is not None and "alice" in mismatch and "bob" not in mismatch
    assert has_ghost(expected, members)


def test_a_ghost_member_and_a_missing_member_are_reported() -> None:
    expected = expected_members(SESSIONS, "p1", WHERE)
    members = [_member("alice", "online", ("gw-2", "online")), _member("carol", "online")]
    mismatch = listing_mismatch(expected, members, _occupancy(2, 1, 2, 0))
    assert mismatch is not None and "bob" in mismatch and "carol" in mismatch
    assert has_ghost(expected, [_member("carol", "online", ("gw-1", "online"))])


def test_a_principal_listed_twice_is_reported() -> None:
    expected = expected_members(SESSIONS, "p1", WHERE)
    alice = _member("alice", "online", ("gw-2", "online"))
    mismatch = listing_mismatch(expected, [alice, alice], _occupancy(2, 2, 2, 0))
    assert mismatch is not None and "listed twice" in mismatch


def test_an_occupancy_that_disagrees_with_the_listing_is_reported() -> None:
    expected = expected_members(SESSIONS, "p0", WHERE)
    members = [_member("alice", "online", ("gw-2", "online"), ("gw-1", "idle"))]
    mismatch = listing_mismatch(expected, members, _occupancy(1, 3, 1, 0))
    assert mismatch is not None and "occupancy" in mismatch


def test_the_gateway_of_a_url_is_the_mesh_node_id() -> None:
    assert gateway_of("ws://127.0.0.1:41234/ws") == "gw-41234"
    assert gateway_of(None) == "?"
