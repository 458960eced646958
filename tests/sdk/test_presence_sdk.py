"""Presence in the SDK: frames into the sans-I/O core, the member list's snapshot + diff rule,
and (marked integration) the asyncio client against real gateways."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import orjson
import pytest

from arqonbus import (
    InvalidParameters,
    Kicked,
    Member,
    Occupancy,
    PresenceEvent,
    PresencePage,
    RoomDeleted,
    Subscription,
)
from arqonbus._protocol import (
    PRESENCE_QUEUE_MAX,
    ClientProtocol,
    Joined,
    MembersStale,
    PresenceReceived,
    RemovedFromRoom,
    SubscriptionFailed,
    SubscriptionState,
)
from arqonbus.models import Welcome
from arqonbus.presence import MAX_BUFFERED_CHANGES, MemberView, PresenceChange, cursor_after
from tests.conftest import gateway_url
from tests.timeouts import SEC, eventually

ROOM, CHANNEL = "ops", "agents"


def make_core() -> ClientProtocol:
    counter = itertools.count(1)
    core = ClientProtocol(new_id=lambda prefix: f"{prefix or 'id'}_{next(counter)}")
    core.connection_made(Welcome.from_wire({"type": "welcome", "payload": {"node": "gw1"}}))
    return core


def sent(core: ClientProtocol) -> list[dict[str, Any]]:
    return [orjson.loads(frame) for frame in core.data_to_send()]


def join_reply(request_id: str, **result: Any) -> dict[str, Any]:
    payload = {"request_id": request_id, "status": "success", "result": {"last_seq": 0, **result}}
    return {"type": "command_response", "room": ROOM, "channel": CHANNEL, "payload": payload}


def change(action: str, principal: str, position: int, **fields: Any) -> dict[str, Any]:
    if action == "leave":
        return {"action": "leave", "principal": principal, "position": position}
    base = {"state": "online", "metadata": {}, "connections": 1}
    return {"action": action, "principal": principal, "position": position, **base, **fields}


def frame(*changes: dict[str, Any], **extra: Any) -> dict[str, Any]:
    position = max((c["position"] for c in changes), default=extra.pop("position", 0))
    body = {"type": "presence", "room": ROOM, "channel": CHANNEL, "position": position}
    return {**body, "changes": list(changes), **extra}


def page(position: int, *principals: str, cursor: str | None = None) -> PresencePage:
    members = [
        {"principal": p, "state": "online", "metadata": {}, "joined_at": 1.0, "connections": []}
        for p in principals
    ]
    return PresencePage.from_wire(
        {"members": members, "next_cursor": cursor, "position": position, "occupancy": {}}
    )


def watching(core: ClientProtocol, track: bool = True) -> SubscriptionState:
    """A subscription joined with presence events (and the member list when ``track``)."""
    state = SubscriptionState(ROOM, CHANNEL, presence=True, presence_events=True)
    state.members = MemberView() if track else None
    core.subscribe(state)
    (join,) = sent(core)
    assert join["payload"]["parameters"] == {
        "batch": True,
        "presence": True,
        "presence_events": True,
    }
    events = core.receive(join_reply(join["id"], presence=True, presence_events=True))
    assert events[0] == Joined(ROOM, CHANNEL, 0)
    assert state.in_presence and state.watching_presence
    return state


# -- joins -----------------------------------------------------------------------------------


def test_the_join_carries_presence_parameters_only_when_given() -> None:
    core = make_core()
    core.subscribe(SubscriptionState(ROOM, "plain"))
    core.subscribe(SubscriptionState(ROOM, "quiet", presence=True, presence_events=False))
    plain, quiet = sent(core)
    assert plain["payload"]["parameters"] == {"batch": True}
    assert quiet["payload"]["parameters"] == {
        "batch": True,
        "presence": True,
        "presence_events": False,
    }


def test_a_join_of_a_tracked_subscription_asks_for_a_snapshot_every_time() -> None:
    core = make_core()
    state = SubscriptionState(ROOM, CHANNEL, presence_events=True, members=MemberView())
    core.subscribe(state)
    (join,) = sent(core)
    events = core.receive(join_reply(join["id"], presence=False, presence_events=True))
    assert events == [Joined(ROOM, CHANNEL, 0), MembersStale(ROOM, CHANNEL, 1)]

    core.connection_lost()
    core.connection_made(Welcome.from_wire({"type": "welcome", "payload": {}}))
    (rejoin,) = sent(core)
    events = core.receive(join_reply(rejoin["id"], presence=False, presence_events=True))
    assert events[1] == MembersStale(ROOM, CHANNEL, 2)  # a resume reads a fresh snapshot


def test_a_join_without_presence_events_asks_for_no_snapshot() -> None:
    core = make_core()
    state = SubscriptionState(ROOM, CHANNEL, members=MemberView())
    core.subscribe(state)
    (join,) = sent(core)
    assert core.receive(join_reply(join["id"])) == [Joined(ROOM, CHANNEL, 0)]
    assert not state.watching_presence


# -- presence frames -------------------------------------------------------------------------


def test_a_presence_frame_becomes_a_typed_queued_event() -> None:
    core = make_core()
    state = watching(core, track=False)
    raw = frame(
        change("join", "bob", 1238),
        change("update", "alice", 1239, state="idle", metadata={"role": "triage"}, connections=2),
        change("leave", "carol", 1240),
    )
    (received,) = core.receive(raw)

    assert isinstance(received, PresenceReceived)
    event = received.event
    assert (event.room, event.channel, event.position, event.overflow) == (
        ROOM,
        CHANNEL,
        1240,
        False,
    )
    assert [(c.action, c.principal, c.position) for c in event.changes] == [
        ("join", "bob", 1238),
        ("update", "alice", 1239),
        ("leave", "carol", 1240),
    ]
    assert event.changes[1] == PresenceChange(
        "update", "alice", 1239, "idle", {"role": "triage"}, 2
    )
    assert event.changes[2].state is None
    assert core.take_presence(state) == event
    assert core.take_presence(state) is None


def test_presence_frames_are_ignored_without_presence_events_or_subscription() -> None:
    core = make_core()
    state = SubscriptionState(ROOM, CHANNEL)
    core.subscribe(state)
    (join,) = sent(core)
    core.receive(join_reply(join["id"], presence=True, presence_events=False))
    assert core.receive(frame(change("join", "bob", 1))) == []
    other = {**frame(change("join", "bob", 2)), "channel": "elsewhere"}
    assert core.receive(other) == []
    assert core.take_presence(state) is None


def test_malformed_changes_are_dropped_and_fields_under_payload_are_read() -> None:
    core = make_core()
    watching(core, track=False)
    message = {
        "type": "presence",
        "room": ROOM,
        "channel": CHANNEL,
        "payload": {
            "position": 9,
            "changes": [change("join", "bob", 9), {"action": "explode", "principal": "x"}, 7],
        },
    }
    (received,) = core.receive(message)
    assert isinstance(received, PresenceReceived)
    assert received.event.position == 9
    assert [c.principal for c in received.event.changes] == ["bob"]


def test_a_full_presence_queue_is_replaced_by_one_overflow_event() -> None:
    core = make_core()
    state = watching(core, track=False)
    for position in range(1, PRESENCE_QUEUE_MAX + 2):
        core.receive(frame(change("join", f"p{position}", position)))

    first = core.take_presence(state)
    assert first is not None and first.overflow and first.changes == ()
    last = core.take_presence(state)
    assert last is not None and last.changes[0].principal == f"p{PRESENCE_QUEUE_MAX + 1}"
    assert core.take_presence(state) is None


def test_an_overflow_frame_makes_a_tracked_list_stale() -> None:
    core = make_core()
    state = watching(core)
    assert state.members is not None
    generation = state.members.begin()
    state.members.add_page(generation, page(10, "alice"))
    state.members.finish(generation)

    overflow = frame(overflow=True, position=50, occupancy={"members": 120, "online": 120})
    received, stale = core.receive(overflow)
    assert isinstance(received, PresenceReceived)
    assert received.event.overflow and received.event.changes == ()
    assert received.event.occupancy == Occupancy(members=120, online=120)
    assert stale == MembersStale(ROOM, CHANNEL, generation + 1)


# -- kicked, room_deleted --------------------------------------------------------------------


def pushed(code: str, **fields: Any) -> dict[str, Any]:
    payload = {"request_id": None, "code": code, "message": "m", "retryable": False, **fields}
    return {"type": "error", "payload": payload}


def test_a_kick_ends_the_rooms_subscriptions_like_a_ban_and_carries_the_reason() -> None:
    core = make_core()
    state = watching(core)
    events = core.receive(pushed("kicked", room=ROOM, channels=[CHANNEL], reason="spam"))

    failed, removed = events
    assert isinstance(failed, SubscriptionFailed) and isinstance(failed.error, Kicked)
    assert failed.error.reason == "spam" and failed.error.room == ROOM
    assert isinstance(removed, RemovedFromRoom) and removed.channels == (CHANNEL,)
    assert state.error is failed.error and core.subscription(ROOM, CHANNEL) is None
    assert state.members is not None and state.members.members == {}


def test_a_room_deletion_without_channels_ends_every_subscription_of_the_room() -> None:
    core = make_core()
    for channel in ("a", "b"):
        core.subscribe(SubscriptionState(ROOM, channel))
    core.subscribe(SubscriptionState("other", "a"))
    for join in sent(core):
        reply = join_reply(join["id"])
        core.receive({**reply, "room": join["room"], "channel": join["channel"]})

    events = core.receive(pushed("room_deleted", room=ROOM))

    failed = [e for e in events if isinstance(e, SubscriptionFailed)]
    assert [(e.room, e.channel) for e in failed] == [(ROOM, "a"), (ROOM, "b")]
    assert all(isinstance(e.error, RoomDeleted) for e in failed)
    assert core.subscription("other", "a") is not None
    core.connection_lost()
    core.connection_made(Welcome.from_wire({"type": "welcome", "payload": {}}))
    assert [f["room"] for f in sent(core)] == ["other"]  # the deleted room is not rejoined


# -- set_presence across connections ---------------------------------------------------------


def test_the_presence_state_is_set_again_before_the_joins_of_a_new_connection() -> None:
    core = make_core()
    core.subscribe(SubscriptionState(ROOM, CHANNEL, presence=True))
    sent(core)
    core.remember_presence({"state": "idle"})
    core.remember_presence({"metadata": {"role": "triage"}})

    core.connection_lost()
    core.connection_made(Welcome.from_wire({"type": "welcome", "payload": {}}))
    first, join = sent(core)

    assert first["payload"] == {
        "command": "set_presence",
        "parameters": {"state": "idle", "metadata": {"role": "triage"}},
    }
    assert join["payload"]["command"] == "join_channel"
    reply = {
        "type": "command_response",
        "payload": {"request_id": first["id"], "status": "success"},
    }
    assert core.receive(reply) == []  # nobody awaits it


# -- the member list: snapshot + diff --------------------------------------------------------


def changes(*items: dict[str, Any]) -> PresenceEvent:
    return PresenceEvent.from_wire(frame(*items))


def synced(*pages: PresencePage) -> MemberView:
    view = MemberView()
    generation = view.begin()
    for p in pages:
        view.add_page(generation, p)
    view.finish(generation)
    return view


def test_changes_at_or_below_the_snapshot_position_are_already_in_it() -> None:
    view = synced(page(100, "alice", "bob"))
    view.apply(changes(change("leave", "alice", 100), change("join", "carol", 99)))
    assert sorted(view.members) == ["alice", "bob"]

    view.apply(changes(change("leave", "alice", 101), change("join", "carol", 102)))
    assert sorted(view.members) == ["bob", "carol"]
    assert view.position == 102


def test_frames_during_a_snapshot_are_buffered_and_applied_by_position() -> None:
    view = MemberView()
    generation = view.begin()
    view.apply(changes(change("join", "dave", 5), change("join", "erin", 12)))
    view.add_page(generation, page(10, "alice", "dave", cursor=cursor_after("dave")))
    view.apply(changes(change("leave", "alice", 15)))
    view.add_page(generation, page(20, "erin", "zed"))
    assert view.members == {}  # nothing shown until the snapshot is complete
    view.finish(generation)

    # dave@5 <= page 1 (10): in it. erin@12 <= page 2 (20): in it. alice left @15 > 10: gone.
    assert sorted(view.members) == ["dave", "erin", "zed"]
    assert view.synced


def test_an_absent_principal_is_judged_by_the_page_that_covers_it() -> None:
    view = synced(
        page(10, "alice", "carol", cursor=cursor_after("carol")),
        page(30, "dave", "frank"),
    )
    assert view.known_position("bob") == 10  # between alice and carol: page 1
    assert view.known_position("eve") == 30  # after carol: page 2 (the last, open page)
    view.apply(changes(change("join", "bob", 20), change("join", "eve", 25)))
    # bob joined at 20, after page 1 was read: new. eve at 25 is reflected by page 2 (30).
    assert sorted(view.members) == ["alice", "bob", "carol", "dave", "frank"]


def test_an_update_keeps_the_members_session_list_and_counts_its_connections() -> None:
    raw = {
        "principal": "alice",
        "state": "online",
        "metadata": {"a": 1},
        "joined_at": 5.5,
        "connections": [{"session": "s1", "gateway": "gw-a", "state": "online", "joined_at": 5.5}],
    }
    snapshot = PresencePage.from_wire({"members": [raw], "next_cursor": None, "position": 3})
    view = synced(snapshot)
    view.apply(
        changes(change("update", "alice", 4, state="idle", metadata={"b": 2}, connections=2))
    )

    member = view.members["alice"]
    assert member == Member(
        "alice", "idle", {"b": 2}, 5.5, snapshot.members[0].connections, connection_count=2
    )
    assert member.connections[0].gateway == "gw-a"


def test_the_members_mapping_handed_out_stays_live_across_snapshots() -> None:
    view = MemberView()
    members = view.members
    synced_view = view.begin()
    view.add_page(synced_view, page(1, "alice"))
    view.finish(synced_view)
    assert list(members) == ["alice"]
    view.apply(changes(change("join", "bob", 2)))
    view.clear()
    assert list(members) == []


def test_a_newer_snapshot_makes_an_older_one_stale() -> None:
    view = MemberView()
    old = view.begin()
    new = view.begin()
    assert not view.add_page(old, page(1, "alice"))
    assert not view.finish(old)
    assert view.add_page(new, page(2, "bob")) and view.finish(new)
    assert list(view.members) == ["bob"]


def test_an_overflow_or_a_flooded_buffer_asks_for_a_new_snapshot() -> None:
    view = synced(page(1, "alice"))
    assert view.apply(PresenceEvent(ROOM, CHANNEL, 5, (), overflow=True))
    assert list(view.members) == ["alice"]  # the last known list stays until it is re-read

    view.begin()
    flood = tuple(PresenceChange("join", f"p{i}", i + 10) for i in range(MAX_BUFFERED_CHANGES + 1))
    assert view.apply(PresenceEvent(ROOM, CHANNEL, 0, flood))


def test_cursor_after_is_base64url_without_padding() -> None:
    assert cursor_after("alice") == "YWxpY2U"
    assert cursor_after("a") == "YQ"


def test_an_occupancy_result_is_typed() -> None:
    wire = {"members": 10, "connections": 12, "online": 9, "idle": 1, "position": 1234}
    assert Occupancy.from_wire(wire) == Occupancy(10, 12, 9, 1, 1234)
    assert Occupancy.from_wire({"members": True}) == Occupancy()


@pytest.mark.parametrize(
    ("text", "expected"),
    [("online", "online"), ("idle", "idle"), ("offline", "online"), (None, "online")],
)
def test_a_members_state_is_online_or_idle(text: str | None, expected: str) -> None:
    assert Member.from_wire({"principal": "x", "state": text}).state == expected


# -- against real gateways -------------------------------------------------------------------


async def next_presence(sub: Subscription, principal: str, action: str) -> PresenceChange:
    """The next change of ``principal`` with ``action`` the subscription receives."""
    async with asyncio.timeout(10 * SEC):
        async for event in sub.presence():
            for item in event.changes:
                if (item.principal, item.action) == (principal, action):
                    return item
    raise AssertionError("the subscription ended")


@pytest.mark.integration
async def test_presence_changes_cross_gateways_and_the_member_list_follows(
    start_gateway, sdk_client, tenant
):
    gw0, gw1 = await start_gateway(), await start_gateway()
    alice = await sdk_client(gateway_url(gw0), tenant, "alice")
    watcher = await sdk_client(gateway_url(gw1), tenant, "watcher")
    await alice.subscribe(ROOM, CHANNEL, presence=True).start()
    sub = watcher.subscribe(ROOM, CHANNEL, presence=False, track_members=True)
    await sub.start()

    members = await sub.wait_members(timeout=10 * SEC)
    assert sub.presence_events and not sub.in_presence

    async def alice_listed() -> bool:  # gw1's view may learn of alice after the snapshot
        return list(members) == ["alice"]

    await eventually(alice_listed, 10 * SEC, "alice in the watcher's member list")

    carol = await sdk_client(gateway_url(gw0), tenant, "carol")
    await carol.subscribe(ROOM, CHANNEL, presence=True).start()
    joined = await next_presence(sub, "carol", "join")
    assert (joined.state, joined.connections) == ("online", 1)

    result = await carol.set_presence("idle", {"role": "triage"})
    assert result["channels"] == 1 and result["state"] == "idle"
    updated = await next_presence(sub, "carol", "update")
    assert (updated.state, updated.metadata) == ("idle", {"role": "triage"})
    assert sub.members["carol"].state == "idle"

    await carol.close()
    await next_presence(sub, "carol", "leave")
    assert sorted(sub.members) == ["alice"]


@pytest.mark.integration
async def test_two_sessions_of_a_principal_are_one_member_and_occupancy_counts_both(
    start_gateway, sdk_client, tenant
):
    gw0, gw1 = await start_gateway(), await start_gateway()
    first = await sdk_client(gateway_url(gw0), tenant, "alice")
    second = await sdk_client(gateway_url(gw1), tenant, "alice")
    bob = await sdk_client(gateway_url(gw1), tenant, "bob")
    for client in (first, second, bob):
        await client.subscribe(ROOM, CHANNEL, presence=True).start()
    await bob.set_presence("idle")

    async def listed() -> list[Member] | None:
        members = await bob.presence(ROOM, CHANNEL)
        counts = {m.principal: (m.connection_count, m.state) for m in members}
        done = counts == {"alice": (2, "online"), "bob": (1, "idle")}
        return members if done else None

    members = await eventually(listed, 10 * SEC, "alice's two sessions listed as one member")
    alice = members[0]
    assert [m.principal for m in members] == ["alice", "bob"]
    assert sorted(c.gateway for c in alice.connections) == ["gw0", "gw1"]
    assert [m.principal for m in await bob.presence(ROOM, CHANNEL, state="idle")] == ["bob"]
    occupancy = await bob.occupancy(ROOM, CHANNEL)
    assert (occupancy.members, occupancy.connections) == (2, 3)
    assert (occupancy.online, occupancy.idle) == (1, 1)


@pytest.mark.integration
async def test_pages_follow_the_cursor_and_bad_input_is_refused(start_gateway, sdk_client, tenant):
    gw = await start_gateway()
    clients = [await sdk_client(gateway_url(gw), tenant, f"p{i:02d}") for i in range(5)]
    for client in clients:
        await client.subscribe(ROOM, CHANNEL, presence=True).start()
    reader = clients[0]

    async def five_present() -> list[PresencePage] | None:
        pages = [p async for p in reader.presence_pages(ROOM, CHANNEL, page_size=2)]
        return pages if sum(len(p.members) for p in pages) == 5 else None

    pages = await eventually(five_present, 10 * SEC, "five members present")
    assert [len(p.members) for p in pages] == [2, 2, 1]
    assert [m.principal for p in pages for m in p.members] == [f"p{i:02d}" for i in range(5)]
    assert pages[-1].next_cursor is None

    with pytest.raises(InvalidParameters, match="cursor"):
        await reader._request(ROOM, CHANNEL, "presence", {"cursor": "!!"}, 5 * SEC)
    with pytest.raises(InvalidParameters, match="metadata"):
        await reader.set_presence(metadata={"blob": "x" * 2000})
    assert (await reader.occupancy(ROOM, CHANNEL)).members == 5  # the connection lives on


@pytest.mark.integration
async def test_other_tenants_see_no_members(start_gateway, sdk_client, tenant):
    gw = await start_gateway()
    alice = await sdk_client(gateway_url(gw), tenant, "alice")
    await alice.subscribe(ROOM, CHANNEL, presence=True).start()
    eve = await sdk_client(gateway_url(gw), "o" + tenant[1:], "eve")
    quiet = await eve.subscribe(ROOM, CHANNEL, presence=False, presence_events=False).start()

    async def alice_listed() -> bool:
        return [m.principal for m in await alice.presence(ROOM, CHANNEL)] == ["alice"]

    await eventually(alice_listed, 10 * SEC, "alice present in her own tenant")
    assert await eve.presence(ROOM, CHANNEL) == []
    assert (await eve.occupancy(ROOM, CHANNEL)).members == 0
    assert not quiet.presence_events and not quiet.in_presence
