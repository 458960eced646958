"""The pure presence rules: parameters, the member view of a channel, coalescing."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arqonbus_server.shared import presence
from arqonbus_server.shared.errors import ArqonError
from arqonbus_server.shared.presence import (
    IDLE,
    ONLINE,
    ChannelView,
    Coalescer,
    MemberChange,
    Presence,
    PresenceQuery,
)


def entry(principal: str, gateway: str = "gw-a", session: str = "s1", **kw: Any) -> Presence:
    values: dict[str, Any] = {
        "joined_at": 100.0,
        "state": ONLINE,
        "metadata": b"{}",
        "updated_at": 100.0,
    }
    values.update(kw)
    return Presence(principal, session, gateway, **values)


class Feed:
    """A view fed with store-like positions."""

    def __init__(self) -> None:
        self.view = ChannelView()
        self.position = 0

    def put(self, e: Presence) -> MemberChange | None:
        self.position += 1
        return self.view.apply(self.position, e.principal, e.gateway, e.session, e)

    def remove(self, principal: str, gateway: str = "gw-a", session: str = "s1") -> Any:
        self.position += 1
        return self.view.apply(self.position, principal, gateway, session, None)


# --- parameters ---------------------------------------------------------------------------


def refused(call: Any, *args: Any) -> str:
    with pytest.raises(ArqonError) as caught:
        call(*args)
    assert caught.value.code == "invalid_parameters"
    return caught.value.message


def test_metadata_is_encoded_with_orjson() -> None:
    assert presence.metadata_param({"role": "triage", "n": 1}) == b'{"role":"triage","n":1}'


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ([1], "must be a JSON object"),
        ("x", "must be a JSON object"),
        ({f"k{i}": 1 for i in range(33)}, "at most 32 keys"),
        ({"": 1}, "keys must be 1-64 characters"),
        ({"k" * 65: 1}, "keys must be 1-64 characters"),
        ({"blob": "x" * 1020}, "at most 1024 bytes"),
        ({"big": 2**70}, "only JSON values"),
    ],
)
def test_bad_metadata_names_the_limit(value: object, says: str) -> None:
    assert says in refused(presence.metadata_param, value)


def test_metadata_at_the_limits_is_accepted() -> None:
    assert len(presence.metadata_param({f"k{i}": 1 for i in range(32)})) <= 1024
    exact = {"b": "x" * (1024 - len(b'{"b":""}'))}
    assert len(presence.metadata_param(exact)) == 1024
    assert presence.metadata_param({"k" * 64: None})


def test_set_presence_params() -> None:
    assert presence.set_presence_params({"state": "idle"}) == presence.SetPresence("idle", None)
    both = presence.set_presence_params({"state": "online", "metadata": {}})
    assert both == presence.SetPresence("online", b"{}")
    assert "'online' or 'idle'" in refused(presence.set_presence_params, {"state": "away"})
    assert "needs parameter 'state'" in refused(presence.set_presence_params, {})


def test_query_params_defaults_and_limits() -> None:
    assert presence.query_params({}) == PresenceQuery(100, None, None)
    cursor = presence.encode_cursor("alice")
    query = presence.query_params({"limit": 1000, "cursor": cursor, "state": "idle"})
    assert query == PresenceQuery(1000, "alice", "idle")
    for limit in (0, 1001, "5", True, 1.5):
        assert "between 1 and 1000" in refused(presence.query_params, {"limit": limit})
    assert "'online' or 'idle'" in refused(presence.query_params, {"state": "gone"})


def test_cursor_round_trip_is_base64url_without_padding() -> None:
    for name in ("a", "ab", "abc", "alice", "_-x9" * 16):
        text = presence.encode_cursor(name)
        assert "=" not in text
        assert presence.decode_cursor(text) == name
    assert presence.encode_cursor("alice") == "YWxpY2U"


@pytest.mark.parametrize(
    "bad",
    ["", "!!!", "YWxpY2U=", "w4k", presence.encode_cursor("a") + "x", 5, None, "QQ" * 100],
)
def test_a_bad_cursor_says_where_cursors_come_from(bad: object) -> None:
    message = refused(presence.decode_cursor, bad)
    assert "parameter 'cursor' is not a cursor from a previous presence page" in message


def test_a_cursor_of_an_invalid_principal_name_is_refused() -> None:
    refused(presence.decode_cursor, presence.encode_cursor("a b"))


# --- the member view ----------------------------------------------------------------------


def test_join_update_leave_of_one_session() -> None:
    feed = Feed()
    join = feed.put(entry("alice", metadata=b'{"r":1}'))
    assert join == MemberChange("join", "alice", 1, ONLINE, b'{"r":1}', 1)
    assert feed.put(entry("alice", metadata=b'{"r":1}')) is None  # the same again: nothing
    update = feed.put(entry("alice", state=IDLE, metadata=b'{"r":1}'))
    assert update == MemberChange("update", "alice", 3, IDLE, b'{"r":1}', 1)
    assert feed.remove("alice") == MemberChange("leave", "alice", 4)
    assert feed.remove("alice") is None
    assert feed.view.occupancy() == {"members": 0, "connections": 0, "online": 0, "idle": 0}


def test_two_sessions_on_two_gateways_are_one_member() -> None:
    feed = Feed()
    feed.put(entry("alice", "gw-a", "s1", state=IDLE, joined_at=5.0))
    second = feed.put(entry("alice", "gw-b", "s9", joined_at=7.0, updated_at=200.0))
    assert second is not None and second.action == "update"
    assert (second.state, second.connections) == (ONLINE, 2)  # online if any session is
    assert feed.view.occupancy() == {"members": 1, "connections": 2, "online": 1, "idle": 0}
    member = feed.view.member("alice")
    assert member is not None
    assert member["joined_at"] == 5.0 and member["state"] == ONLINE
    assert [c["gateway"] for c in member["connections"]] == ["gw-a", "gw-b"]
    left = feed.remove("alice", "gw-b", "s9")
    assert left == MemberChange("update", "alice", 3, IDLE, b"{}", 1)
    assert feed.remove("alice", "gw-a", "s1") == MemberChange("leave", "alice", 4)


def test_member_metadata_is_the_latest_updated_sessions() -> None:
    feed = Feed()
    feed.put(entry("bob", "gw-a", metadata=b'{"v":"old"}', updated_at=1.0))
    feed.put(entry("bob", "gw-b", metadata=b'{"v":"new"}', updated_at=2.0))
    assert feed.view.member("bob")["metadata"] == {"v": "new"}  # type: ignore[index]


def test_dead_gateways_are_hidden_with_leaves_and_their_removal_repeats_them() -> None:
    feed = Feed()
    feed.put(entry("alice", "gw-a"))
    feed.put(entry("alice", "gw-b"))
    feed.put(entry("bob", "gw-b"))
    changes = {c.principal: c for c in feed.view.set_dead(["gw-b"])}
    assert changes["bob"] == MemberChange("leave", "bob", 3)
    assert changes["alice"] == MemberChange("update", "alice", 3, ONLINE, b"{}", 1)
    assert feed.view.occupancy() == {"members": 1, "connections": 1, "online": 1, "idle": 0}
    assert feed.view.gateways() == {"gw-a", "gw-b"}  # hidden entries still count here
    assert feed.put(entry("carol", "gw-b")) is None  # a dead gateway's change stays hidden
    assert feed.remove("bob", "gw-b") == MemberChange("leave", "bob", 5)  # at a real position
    assert feed.remove("alice", "gw-b").action == "update"
    assert feed.remove("carol", "gw-b") == MemberChange("leave", "carol", 7)
    assert feed.view.gateways() == {"gw-a"}
    assert feed.view.set_dead([]) == []


def test_a_gateway_declared_alive_again_shows_its_entries() -> None:
    feed = Feed()
    feed.put(entry("bob", "gw-b"))
    feed.view.set_dead({"gw-b"})
    assert len(feed.view) == 0
    assert [c.action for c in feed.view.set_dead(set())] == ["join"]
    assert feed.view.occupancy()["members"] == 1


def test_paging_10k_members_with_cursor_and_state_filter() -> None:
    feed = Feed()
    names = [f"p{i:05d}" for i in range(10_000)]
    for i, name in enumerate(random.Random(7).sample(names, len(names))):
        feed.put(entry(name, state=IDLE if i % 10 == 0 else ONLINE))
    seen: list[str] = []
    after = None
    for _ in range(20):
        members, cursor = feed.view.page(1000, after)
        seen += [m["principal"] for m in members]
        if cursor is None:
            break
        after = presence.decode_cursor(cursor)
    assert seen == names
    idle: list[str] = []
    after = None
    for _ in range(20):
        members, cursor = feed.view.page(300, after, IDLE)
        assert all(m["state"] == IDLE for m in members)
        idle += [m["principal"] for m in members]
        if cursor is None:
            break
        after = presence.decode_cursor(cursor)
    assert len(idle) == 1000 and idle == sorted(idle)
    assert feed.view.occupancy() == {
        "members": 10_000,
        "connections": 10_000,
        "online": 9000,
        "idle": 1000,
    }


def test_the_last_page_has_no_cursor() -> None:
    feed = Feed()
    for name in ("a", "b", "c"):
        feed.put(entry(name))
    assert feed.view.page(3)[1] is None
    members, cursor = feed.view.page(2)
    assert [m["principal"] for m in members] == ["a", "b"] and cursor == presence.encode_cursor("b")
    assert feed.view.page(2, "b") == (feed.view.page(5)[0][2:], None)
    assert feed.view.page(2, "zzz") == ([], None)


OPS = st.lists(
    st.tuples(
        st.sampled_from(["put", "remove", "dead"]),
        st.sampled_from(["a", "b", "c", "d"]),  # principal
        st.sampled_from(["gw1", "gw2", "gw3"]),
        st.sampled_from(["s1", "s2"]),
        st.sampled_from([ONLINE, IDLE]),
    ),
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(OPS)
def test_occupancy_and_pages_match_a_recount(ops: list[tuple[str, str, str, str, str]]) -> None:
    feed = Feed()
    stored: dict[tuple[str, str, str], str] = {}
    dead: set[str] = set()
    members: dict[str, Any] = {}  # what a client would hold after applying every change
    for op, principal, gateway, session, state in ops:
        if op == "put":
            stored[(principal, gateway, session)] = state
            changes = [feed.put(entry(principal, gateway, session, state=state))]
        elif op == "remove":
            stored.pop((principal, gateway, session), None)
            changes = [feed.remove(principal, gateway, session)]
        else:
            dead ^= {gateway}
            changes = list(feed.view.set_dead(dead))
        for change in changes:
            if change is None:
                continue
            if change.action == "leave":
                members.pop(change.principal, None)
            else:
                members[change.principal] = (change.state, change.connections)
        recount: dict[str, list[str]] = defaultdict(list)
        for (p, g, _), s in stored.items():
            if g not in dead:
                recount[p].append(s)
        expected = {p: (ONLINE if ONLINE in s else IDLE, len(s)) for p, s in recount.items()}
        assert members == expected
        online = sum(1 for s, _ in expected.values() if s == ONLINE)
        assert feed.view.occupancy() == {
            "members": len(expected),
            "connections": sum(n for _, n in expected.values()),
            "online": online,
            "idle": len(expected) - online,
        }
        listed = feed.view.page(1000)[0]
        assert [m["principal"] for m in listed] == sorted(expected)
        assert [m["principal"] for m in feed.view.page(1000, None, IDLE)[0]] == sorted(
            p for p, (s, _) in expected.items() if s == IDLE
        )


# --- coalescing ---------------------------------------------------------------------------


def test_the_last_change_of_each_principal_wins() -> None:
    window = Coalescer(max_changes=100)
    assert window.payload() is None
    window.add(MemberChange("join", "bob", 1238, ONLINE, b"{}", 1))
    window.add(MemberChange("join", "alice", 1239, ONLINE, b"{}", 1))
    window.add(MemberChange("update", "alice", 1240, IDLE, b'{"x":1}', 2))
    window.add(MemberChange("leave", "carol", 1241))
    frame = window.payload()
    assert frame == {
        "position": 1241,
        "changes": [
            {
                "action": "join",
                "principal": "bob",
                "state": ONLINE,
                "metadata": {},
                "connections": 1,
                "position": 1238,
            },
            {
                "action": "join",  # joined in this window: still news
                "principal": "alice",
                "state": IDLE,
                "metadata": {"x": 1},
                "connections": 2,
                "position": 1240,
            },
            {"action": "leave", "principal": "carol", "position": 1241},
        ],
    }
    assert orjson.loads(orjson.dumps(frame)) == frame
    assert window.payload() is None  # a new window


def test_a_window_of_more_than_max_changes_principals_overflows() -> None:
    window = Coalescer(max_changes=3)
    for i in range(4):
        window.add(MemberChange("join", f"p{i}", 10 + i, ONLINE, b"{}", 1))
    occupancy = {"members": 4, "connections": 4, "online": 4, "idle": 0}
    frame = window.payload(occupancy)
    assert frame == {
        "position": 13,
        "changes": [],
        "overflow": True,
        "occupancy": occupancy,
    }
    for i in range(3):  # exactly max_changes: no overflow; repeats count once
        window.add(MemberChange("join", f"p{i}", 20 + i, ONLINE, b"{}", 1))
        window.add(MemberChange("update", f"p{i}", 30 + i, IDLE, b"{}", 1))
    frame = window.payload(occupancy)
    assert frame is not None and "overflow" not in frame and len(frame["changes"]) == 3


# --- liveness -----------------------------------------------------------------------------


def test_a_gateway_that_stops_renewing_is_dead_after_the_timeout() -> None:
    live = presence.Liveness("me", timeout_s=8, gap_s=4)
    assert live.observe({"me": 1, "gw-b": 2}, [], now=0) == frozenset()
    assert live.observe({"me": 3, "gw-b": 4}, [], now=2) == frozenset()  # gw-b renewed
    for now in (4, 6, 8):
        assert live.observe({"me": 5 + now, "gw-b": 4}, [], now=now) == frozenset()
    assert live.observe({"me": 7, "gw-b": 4}, [], now=9.9) == frozenset()  # 7.9 s
    assert live.observe({"me": 9, "gw-b": 4}, [], now=10) == {"gw-b"}
    assert live.observe({"me": 9, "gw-b": 11}, [], now=11) == frozenset()  # renewing again


def test_this_gateway_is_never_dead() -> None:
    live = presence.Liveness("me", timeout_s=1, gap_s=4)
    for now in range(4):
        assert live.observe({"me": 1}, ["me"], now=now) == frozenset()


def test_a_gateway_seen_only_in_entries_is_dead_after_the_timeout() -> None:
    live = presence.Liveness("me", timeout_s=8, gap_s=4)
    assert live.observe({"me": 1}, ["ghost"], now=0) == frozenset()
    assert live.observe({"me": 2}, ["ghost"], now=4) == frozenset()
    assert live.observe({"me": 3}, ["ghost"], now=8) == {"ghost"}
    assert live.observe({"me": 4}, [], now=10) == frozenset()  # removed: forgotten


def test_a_reaped_gateway_stays_dead_while_its_entries_linger() -> None:
    live = presence.Liveness("me", timeout_s=2, gap_s=4)
    live.observe({"me": 1, "gw-b": 1}, [], now=0)
    assert live.observe({"me": 2, "gw-b": 1}, ["gw-b"], now=2) == {"gw-b"}
    assert live.observe({"me": 3}, ["gw-b"], now=3) == {"gw-b"}  # lease gone, entries not yet


def test_after_a_gap_in_readings_the_living_are_counted_afresh() -> None:
    fresh = presence.Liveness("me", timeout_s=8, gap_s=4)
    fresh.observe({"me": 1, "gw-b": 1}, [], now=0)
    fresh.observe({"me": 1, "gw-b": 1}, [], now=2)
    # This gateway could not read for 30 s (an outage of the store): nobody is dead yet.
    assert fresh.observe({"me": 1, "gw-b": 1}, [], now=32) == frozenset()
    assert fresh.observe({"me": 2, "gw-b": 1}, [], now=36) == frozenset()
    assert fresh.observe({"me": 3, "gw-b": 1}, [], now=40) == {"gw-b"}


def test_a_join_then_an_update_in_one_window_is_still_a_join() -> None:
    window = Coalescer(max_changes=100)
    window.add(MemberChange("join", "carol", 5, ONLINE, b"{}", 1))
    window.add(MemberChange("update", "carol", 6, IDLE, b"{}", 2))
    payload = window.payload()
    assert payload is not None
    (change,) = payload["changes"]
    assert (change["action"], change["state"], change["connections"], change["position"]) == (
        "join",
        IDLE,
        2,
        6,
    )
