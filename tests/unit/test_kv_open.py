"""Opening a KV bucket that other gateways create at the same moment, and creating a key
that other gateways create at the same moment.

JetStream can leave one of two identical, concurrent stream creates unanswered (nats-server
#3677); the real races cannot be forced, so these tests script the JetStream answers.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from arqonbus_server.mesh import kv as kvmod
from arqonbus_server.mesh.ports import KeyContended, KeyExists


class ScriptedJetStream:
    """Answers key_value / create_key_value from a script: an exception or a value each."""

    def __init__(self, lookups: list[Any], creates: list[Any]) -> None:
        self.lookups, self.creates = lookups, creates
        self.calls: list[str] = []

    async def key_value(self, name: str) -> Any:
        self.calls.append(f"lookup {name}")
        return _answer(self.lookups.pop(0))

    async def create_key_value(self, config: Any) -> Any:
        self.calls.append(f"create {config.bucket}")
        return _answer(self.creates.pop(0))


class FakeKV:
    _name, _stream, _pre, _js, _direct = "b", "KV_b", "$KV.b.", None, False


def _answer(item: Any) -> Any:
    if isinstance(item, BaseException):
        raise item
    return item


async def test_an_unanswered_create_is_followed_by_a_lookup_that_finds_the_bucket() -> None:
    js = ScriptedJetStream(lookups=[BucketNotFoundError(), FakeKV()], creates=[NatsTimeoutError()])
    bucket = await kvmod.open_bucket(js, "arq_rooms", replicas=3)  # type: ignore[arg-type]
    assert kvmod.JetStreamBucket(bucket).name == "b"  # the bucket the lookup found
    assert js.calls == ["lookup arq_rooms", "create arq_rooms", "lookup arq_rooms"]


async def test_a_store_that_never_answers_still_fails_after_a_bounded_number_of_tries() -> None:
    attempts = kvmod._OPEN_ATTEMPTS
    js = ScriptedJetStream(lookups=[NatsTimeoutError()] * attempts, creates=[])
    with pytest.raises(NatsTimeoutError):
        await kvmod.open_bucket(js, "arq_rooms", replicas=3)  # type: ignore[arg-type]
    assert len(js.calls) == attempts


class ScriptedKeys:
    """A key's conditional writes and leader reads, answered from a script."""

    _name = "b"

    def __init__(self, updates: list[Any], reads: list[Any]) -> None:
        self.updates, self.reads = updates, reads
        self.lasts: list[int] = []

    async def update(self, key: str, value: bytes, last: int) -> Any:
        self.lasts.append(last)
        return _answer(self.updates.pop(0))

    async def get(self, key: str) -> Any:
        return _answer(self.reads.pop(0))


def scripted_bucket(keys: ScriptedKeys) -> kvmod.JetStreamBucket:
    bucket = kvmod.JetStreamBucket(FakeKV())  # type: ignore[arg-type]
    bucket._kv = bucket._leader = keys  # type: ignore[assignment]
    return bucket


async def test_a_create_refused_while_the_winner_is_in_flight_names_the_winner() -> None:
    """The leader refuses a conditional write while another write to the key is in flight,
    and the key reads as absent until that write is applied: several rounds of that end in
    KeyExists once it lands, not in a failure."""
    refused = KeyWrongLastSequenceError()
    landed = KeyValue.Entry("b", "k", b"won", 7, None, None, None)
    keys = ScriptedKeys(updates=[refused] * 9, reads=[KeyNotFoundError()] * 8 + [landed])
    with pytest.raises(KeyExists) as exists:
        await scripted_bucket(keys).create("k", b"mine")
    assert (exists.value.value, exists.value.revision) == (b"won", 7)
    assert keys.lasts == [0] * 9


async def test_a_delete_marker_is_written_over_at_its_revision() -> None:
    marker = KeyValue.Entry("b", "k", None, 4, None, None, "DEL")
    keys = ScriptedKeys(
        updates=[KeyWrongLastSequenceError(), 5], reads=[KeyNotFoundError(entry=marker)]
    )
    assert await scripted_bucket(keys).create("k", b"again") == 5
    assert keys.lasts == [0, 4]


async def test_a_key_that_stays_in_flight_fails_retryably_within_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(kvmod, "_CREATE_WINDOW_S", 0.05)
    endless = kvmod._CREATE_ATTEMPTS + 1
    keys = ScriptedKeys(
        updates=[KeyWrongLastSequenceError()] * endless, reads=[KeyNotFoundError()] * endless
    )
    with pytest.raises(KeyContended, match=r"kept changing.*try again"):
        await scripted_bucket(keys).create("k", b"mine")
    assert 1 < len(keys.lasts) < kvmod._CREATE_ATTEMPTS


# -- the watch's marker ----------------------------------------------------------------------
# nats-py's watch can give its "initial values are in" marker before the values, when its
# consumer-info check runs after the server pushed them and before any was read. The race
# cannot be forced on a real server; these tests script nats-py's watcher.


class ScriptedWatcher:
    """What nats-py's KeyWatcher yields (entries and None), and its consumer's info."""

    def __init__(self, items: list[Any], delivered: int, pending: int = 0) -> None:
        self.items = items
        info = SimpleNamespace(
            delivered=SimpleNamespace(consumer_seq=delivered), num_pending=pending
        )
        self._sub = SimpleNamespace(consumer_info=self._info)
        self._answer = info
        self.info_calls = 0

    async def _info(self) -> Any:
        self.info_calls += 1
        return self._answer

    async def __aiter__(self) -> Any:
        for item in self.items:
            yield item


def entry(key: str, value: bytes | None, revision: int, pending: int) -> Any:
    operation = None if value is not None else "DEL"
    return SimpleNamespace(
        key=key, value=value, revision=revision, delta=pending, operation=operation
    )


async def changes(watcher: ScriptedWatcher) -> list[Any]:
    seen = []
    async for change in kvmod._JetStreamWatch(watcher):
        seen.append(None if change is None else (change.key, change.value, change.revision))
    return seen


async def test_an_early_marker_is_held_until_the_last_initial_value() -> None:
    watcher = ScriptedWatcher(
        [None, entry("a", b"1", 1, 2), entry("gone", None, 3, 1), entry("b", b"2", 4, 0),
         entry("a", b"3", 5, 0)],
        delivered=3,
    )  # fmt: skip
    assert await changes(watcher) == [
        ("a", b"1", 1), ("gone", None, 3), ("b", b"2", 4), None, ("a", b"3", 5),
    ]  # fmt: skip
    assert watcher.info_calls == 1


async def test_values_still_pending_on_the_server_also_hold_the_marker() -> None:
    watcher = ScriptedWatcher([None, entry("a", b"1", 7, 0)], delivered=0, pending=1)
    assert await changes(watcher) == [("a", b"1", 7), None]


async def test_an_empty_bucket_and_a_marker_after_values_pass_at_once() -> None:
    empty = ScriptedWatcher([None, entry("k", b"v", 1, 0)], delivered=0)
    assert await changes(empty) == [None, ("k", b"v", 1)]
    ordinary = ScriptedWatcher([entry("k", b"v", 1, 0), None, entry("k", None, 2, 0)], 1)
    assert await changes(ordinary) == [("k", b"v", 1), None, ("k", None, 2)]
    assert ordinary.info_calls == 0  # a marker after a value is nats-py's usual one
