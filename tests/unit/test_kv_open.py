"""Opening a KV bucket that other gateways create at the same moment.

JetStream can leave one of two identical, concurrent stream creates unanswered (nats-server
#3677); the real race cannot be forced, so these tests script the JetStream answers.
"""

from __future__ import annotations

from typing import Any

import pytest
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import BucketNotFoundError

from arqonbus_server.mesh import kv as kvmod


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
