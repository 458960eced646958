"""Room settings: the record, room-key hashing, timed bans and mutes, parameters, checks."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest

from arqonbus_server.gateway.http.admission import RateLimiter
from arqonbus_server.gateway.state import rooms
from arqonbus_server.gateway.state.rooms import (
    MAX_ENTRIES,
    Ban,
    Mute,
    RoomDirectory,
    RoomRecordError,
    RoomSettings,
    check_admin_parameters,
    configure_params,
    duration_param,
    hash_room_key,
    principal_param,
    reason_param,
    verify_room_key,
)
from arqonbus_server.shared import authz, commands
from arqonbus_server.shared.errors import CATALOGUE, ArqonError


class FakeBucket:
    """The WatchedBucket surface RoomDirectory uses (plain data; no NATS involved)."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}
        self.handlers: list[Any] = []
        self.kv = None

    def items(self) -> list[tuple[str, bytes]]:
        return list(self.values.items())

    def on_change(self, handler: Any) -> None:
        self.handlers.append(handler)

    def put(self, key: str, value: bytes | None) -> None:
        if value is None:
            self.values.pop(key, None)
        else:
            self.values[key] = value
        for handler in self.handlers:
            handler(key, value)


def directory() -> tuple[RoomDirectory, FakeBucket]:
    bucket = FakeBucket()
    return RoomDirectory(bucket, lambda: None), bucket  # type: ignore[arg-type]


# -- hashing ------------------------------------------------------------------------------


def test_room_key_hash_is_salted_scrypt_and_verifies() -> None:
    first, second = hash_room_key("correct horse"), hash_room_key("correct horse")
    assert first.startswith("scrypt$16384$8$1$")
    assert first != second  # a random salt each time
    assert "correct horse" not in first
    assert verify_room_key("correct horse", first)
    assert verify_room_key("correct horse", second)
    assert not verify_room_key("correct horsE", first)
    assert not verify_room_key("", first)


@pytest.mark.parametrize(
    "stored",
    ["", "garbage", "md5$1$2$3$aa$bb", "scrypt$x$8$1$AA==$AA==", "scrypt$16384$8$1$!!$AA==",
     "scrypt$1048577$8$1$AA==$AA==", "scrypt$16384$8$1$AA==$"],
)  # fmt: skip
def test_a_malformed_stored_hash_never_verifies(stored: str) -> None:
    assert not verify_room_key("anything", stored)


async def test_verifications_are_cached_and_follow_the_key() -> None:
    d, _ = directory()
    settings = RoomSettings(private=True, key_hash=hash_room_key("secret-one"))
    calls = 0
    real = rooms.verify_room_key

    def counting(key: str, stored: str) -> bool:
        nonlocal calls
        calls += 1
        return real(key, stored)

    rooms.verify_room_key = counting
    try:
        for _ in range(5):
            assert await d.key_matches("t", "r", settings, "secret-one")
        assert calls == 1  # one scrypt for the storm
        for _ in range(2):
            assert not await d.key_matches("t", "r", settings, "wrong-key")
        assert calls == 2  # a wrong key is hashed once too, and never taken for a right one
        assert await d.key_matches("t", "other", settings, "secret-one")
        assert calls == 3  # per room
        settings.key_hash = hash_room_key("secret-two")  # the key changed
        assert not await d.key_matches("t", "r", settings, "secret-one")
        assert await d.key_matches("t", "r", settings, "secret-two")
    finally:
        rooms.verify_room_key = real


# -- the record ----------------------------------------------------------------------------


def test_record_round_trips() -> None:
    s = RoomSettings(
        private=True,
        key_hash="scrypt$16384$8$1$AA==$AA==",
        invite_only=True,
        invited={"bob", "carol"},
        banned={"mallory": Ban(None, "spam"), "eve": Ban(123.5, "")},
        muted={"trent": Mute(99.0)},
        created_by="alice",
        updated_at=5.0,
    )
    back = RoomSettings.decode(s.encode())
    assert back == s
    obj = orjson.loads(s.encode())
    assert obj["invited"] == ["bob", "carol"]
    assert obj["banned"]["mallory"] == {"until": None, "reason": "spam"}


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[]", b'{"private": "yes"}', b'{"invited": ["bad name"]}',
     b'{"invited": "alice"}', b'{"banned": {"a": 1}}', b'{"banned": {"a": {"until": "x"}}}',
     b'{"muted": {"a b": {}}}', b'{"private": 1}'],
)  # fmt: skip
def test_a_malformed_record_is_refused(body: bytes) -> None:
    with pytest.raises(RoomRecordError):
        RoomSettings.decode(body)


def test_a_malformed_record_makes_the_room_admins_only() -> None:
    d, bucket = directory()
    bucket.put("t1.lobby", b"{broken")
    settings = d.get("t1", "lobby")
    assert settings is not None and settings.broken and settings.restricted


def test_info_never_shows_the_key_hash() -> None:
    s = RoomSettings(private=True, key_hash=hash_room_key("a-secret-key"))
    info = s.info("lobby", time.time())
    assert info["has_key"] is True and "key_hash" not in info
    assert "scrypt" not in orjson.dumps(info).decode()


def test_bounds_refuse_too_many_entries_and_too_large_records() -> None:
    s = RoomSettings(invited={f"p{i}" for i in range(MAX_ENTRIES)})
    s.check_bounds()
    s.invited.add("one-more")
    with pytest.raises(ArqonError) as exc:
        s.check_bounds()
    assert exc.value.code == "limit_exceeded"
    big = RoomSettings(banned={f"p{i}": Ban(None, "x" * 200) for i in range(5000)})
    with pytest.raises(ArqonError) as exc:
        big.encode()
    assert exc.value.code == "limit_exceeded"


# -- timed bans and mutes --------------------------------------------------------------------


def test_timed_bans_and_mutes_expire_and_are_pruned() -> None:
    now = time.time()
    s = RoomSettings(
        banned={"a": Ban(now + 60), "b": Ban(now - 1), "c": Ban(None)},
        muted={"d": Mute(now + 60), "e": Mute(now - 1)},
    )
    assert s.ban_of("a", now) is not None
    assert s.ban_of("a", now + 61) is None
    assert s.ban_of("b", now) is None
    assert s.ban_of("c", now + 10**9) is not None
    assert s.mute_of("d", now) is not None and s.mute_of("e", now) is None
    s.prune(now)
    assert set(s.banned) == {"a", "c"} and set(s.muted) == {"d"}


def test_publish_refusal_says_when_a_timed_mute_ends() -> None:
    d, _ = directory()
    now = time.time()
    s = RoomSettings(muted={"m": Mute(now + 5)}, banned={"b": Ban(now + 10, "spam")})
    refusal = d.publish_refusal(s, "m", "lobby", is_admin=False, member=True)
    assert refusal is not None
    error, extra = refusal
    assert error.code == "muted" and 4000 < extra["retry_after_ms"] <= 5001
    refusal = d.publish_refusal(s, "b", "lobby", is_admin=True, member=True)
    assert refusal is not None and refusal[0].code == "banned" and "spam" in refusal[0].message
    assert d.publish_refusal(s, "ok", "lobby", is_admin=False, member=False) is None
    private = RoomSettings(private=True)
    refusal = d.publish_refusal(private, "x", "lobby", is_admin=False, member=False)
    assert refusal is not None and refusal[0].code == "forbidden"
    assert d.publish_refusal(private, "x", "lobby", is_admin=False, member=True) is None


# -- the entry check -------------------------------------------------------------------------


async def _enter(d: RoomDirectory, principal: str, **kw: Any) -> str | None:
    args: dict[str, Any] = {"is_admin": False, "member": False, "key": None, "action": "join"}
    args.update(kw)
    try:
        await d.check_enter("t1", principal, "lobby", **args)
    except ArqonError as exc:
        return exc.code
    return None


async def test_check_enter_rules() -> None:
    d, bucket = directory()
    assert await _enter(d, "anyone") is None  # no settings: open
    key_hash = await asyncio.to_thread(hash_room_key, "the-room-key")
    s = RoomSettings(private=True, key_hash=key_hash, invited={"bob"}, banned={"eve": Ban(None)})
    bucket.put("t1.lobby", s.encode())
    assert await _enter(d, "alice") == "room_key_required"
    assert await _enter(d, "alice", key="wrong-key") == "room_key_required"
    assert await _enter(d, "alice", key="the-room-key") is None
    assert await _enter(d, "bob") is None  # invited
    assert await _enter(d, "carol", is_admin=True) is None
    assert await _enter(d, "eve", key="the-room-key", is_admin=True) == "banned"
    # Another tenant's room of the same name is untouched.
    await d.check_enter("t2", "eve", "lobby", is_admin=False, member=False, key=None, action="j")
    s.invite_only = True
    bucket.put("t1.lobby", s.encode())
    assert await _enter(d, "alice", key="the-room-key") == "forbidden"
    assert await _enter(d, "bob") is None
    bucket.put("t1.lobby", None)
    assert d.get("t1", "lobby") is None
    assert await _enter(d, "eve") is None


def test_directory_notifies_listeners_after_updating() -> None:
    d, bucket = directory()
    seen: list[tuple[str, str, bool]] = []
    d.on_update(lambda t, r, s: seen.append((t, r, d.get(t, r) is s)))
    bucket.put("t1.lobby", RoomSettings().encode())
    bucket.put("not-a-room-key", b"{}")
    assert seen == [("t1", "lobby", True)]


# -- parameters ------------------------------------------------------------------------------


def test_parameters_are_validated_with_clear_errors() -> None:
    assert principal_param({"principal": "alice"}) == "alice"
    for bad in ({}, {"principal": ""}, {"principal": "a b"}, {"principal": 5}):
        with pytest.raises(ArqonError, match="principal") as exc:
            principal_param(bad)
        assert exc.value.code == "invalid_parameters"
    assert duration_param({}) is None and duration_param({"duration_s": 1.5}) == 1.5
    for bad_duration in (0, -1, True, "5", 10**9):
        with pytest.raises(ArqonError, match="duration_s"):
            duration_param({"duration_s": bad_duration})
    with pytest.raises(ArqonError, match="reason"):
        reason_param({"reason": "x" * 201})
    params = configure_params({"private": True, "key": "long-enough"})
    assert params.private is True and params.set_key and params.key == "long-enough"
    assert configure_params({"key": None}).set_key
    for bad_config in ({}, {"private": "yes"}, {"key": "short"}, {"key": 5}, {"color": "red"}):
        with pytest.raises(ArqonError) as exc:
            configure_params(bad_config)
        assert exc.value.code == "invalid_parameters"


def test_check_admin_parameters_matches_the_commands() -> None:
    check_admin_parameters("room_info", {"anything": 1})
    check_admin_parameters("room_ban", {"principal": "a", "duration_s": 5, "reason": "r"})
    for name, bad in (
        ("room_ban", {"principal": "a", "reason": 5}),
        ("room_mute", {"principal": "a", "duration_s": 0}),
        ("room_unban", {}),
        ("room_configure", {"key": ""}),
    ):
        with pytest.raises(ArqonError) as exc:
            check_admin_parameters(name, bad)
        assert exc.value.code == "invalid_parameters"


def test_admin_commands_are_built_in_and_need_admin() -> None:
    for name in commands.ROOM_ADMIN_COMMANDS:
        assert commands.is_builtin(name)
        assert authz.permission_for_command(name) is authz.Permission.ADMIN
        assert not authz.decide("member", (), name, "lobby", "ctl").allowed
        assert authz.decide("admin", (), name, "lobby", "ctl").allowed
    for code in ("room_key_required", "banned", "muted"):
        assert code in CATALOGUE


async def test_key_guessing_is_limited_per_principal() -> None:
    d, _ = directory()
    d._guesses = RateLimiter(1.0, 5, clock=lambda: 0.0)  # time stands still: no refill
    settings = RoomSettings(private=True, key_hash=hash_room_key("secret-one"))
    for n in range(5):  # 5 guesses at once
        assert not await d.key_matches("t", "r", settings, f"guess-{n}", "mallory")
    with pytest.raises(ArqonError) as refused:
        await d.key_matches("t", "r", settings, "guess-5", "mallory")
    assert refused.value.code == "rate_limited"
    # Another principal is not held back, and a key already checked costs no guess.
    assert await d.key_matches("t", "r", settings, "secret-one", "alice")
    assert not await d.key_matches("t", "r", settings, "guess-0", "mallory")


class ContendedOnce:
    """A KV bucket whose first create is refused as contended (the store's create kept
    losing to other writers); its writes reach the directory's watched copy at once."""

    def __init__(self, kv: Any, watched: FakeBucket) -> None:
        self._kv = kv
        self._watched = watched
        self.creates = 0

    async def get(self, key: str) -> Any:
        return await self._kv.get(key)

    async def create(self, key: str, value: bytes) -> int:
        from arqonbus_server.mesh.ports import KeyContended

        self.creates += 1
        if self.creates == 1:
            raise KeyContended(f"key {key!r} kept changing")
        revision = int(await self._kv.create(key, value))
        self._watched.put(key, value)
        return revision

    async def update(self, key: str, value: bytes, revision: int) -> int:
        new = int(await self._kv.update(key, value, revision))
        self._watched.put(key, value)
        return new


async def test_a_contended_create_is_read_again_and_retried_like_a_concurrent_write() -> None:
    from arqonbus_server.mesh.memory import MemoryStateStore

    watched = FakeBucket()
    kv = ContendedOnce(await MemoryStateStore().bucket("rooms"), watched)

    async def open_kv() -> Any:
        return kv

    directory = RoomDirectory(watched, open_kv)  # type: ignore[arg-type]
    settings = await directory.update("acme", "lobby", "root", lambda s: s.invited.add("bob"))
    assert settings.invited == {"bob"} and kv.creates == 2
    stored = await kv.get(rooms.room_key("acme", "lobby"))
    assert stored is not None and "bob" in orjson.loads(stored.value)["invited"]
