"""Agent registration's create-if-absent (mesh.kv.JetStreamBucket.create, and
gateway.auth_agent.store_new on it): a lagging replica is never mistaken for a store
failure, nor a deleted key for a live one.

The fake below is a KV stream with a leader and one lagging replica: conditional writes
(``Nats-Expected-Last-Subject-Sequence``) and non-direct reads go to the leader, direct
gets to the replica, which has applied only the first ``replica_applied`` messages.
"""

from __future__ import annotations

from typing import Any

import pytest
from nats.js.api import RawStreamMsg
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from arqonbus_server.gateway.auth.agent import (
    RegistrationError,
    new_record,
    public_key_index,
    register_from_session,
    store_new,
)
from arqonbus_server.mesh import kv as kv_module
from arqonbus_server.mesh.kv import JetStreamBucket
from arqonbus_server.mesh.ports import BrokerUnavailable, KeyContended, KeyExists
from arqonbus_server.shared import agent_identity as ai

STREAM, PRE = "KV_t", "$KV.t."
_EXPECTED_LAST = "Nats-Expected-Last-Subject-Sequence"


class _Ack:
    def __init__(self, seq: int) -> None:
        self.seq = seq


class FakeStream:
    def __init__(self) -> None:
        self.log: list[tuple[str, bytes, dict[str, str] | None]] = []
        self.replica_applied: int | None = None  # None: the replica is up to date
        self.fail_publish: Exception | None = None
        self.before_publish: list[Any] = []  # callables run before a publish is applied

    def _last(self, subject: str, upto: int) -> tuple[int, bytes, dict[str, str] | None] | None:
        for seq in range(upto, 0, -1):
            msg_subject, data, headers = self.log[seq - 1]
            if msg_subject == subject:
                return seq, data, headers
        return None

    async def publish(
        self, subject: str, payload: bytes = b"", headers: dict[str, str] | None = None, **_: Any
    ) -> _Ack:
        if self.before_publish:
            self.before_publish.pop(0)()
        if self.fail_publish is not None:
            raise self.fail_publish
        if headers and _EXPECTED_LAST in headers:
            last = self._last(subject, len(self.log))
            if (last[0] if last else 0) != int(headers[_EXPECTED_LAST]):
                raise APIError(code=400, err_code=10071, description="wrong last sequence")
        self.log.append((subject, payload, headers))
        return _Ack(len(self.log))

    async def get_msg(
        self, stream: str, seq: int | None = None, subject: str | None = None, direct: bool = False
    ) -> RawStreamMsg:
        assert stream == STREAM and subject is not None and seq is None
        upto = len(self.log)
        if direct and self.replica_applied is not None:
            upto = min(upto, self.replica_applied)
        found = self._last(subject, upto)
        if found is None:
            raise NotFoundError
        msg_seq, data, headers = found
        return RawStreamMsg(subject=subject, seq=msg_seq, data=data, headers=headers)


def bucket(stream: FakeStream) -> KeyValue:
    return KeyValue("t", STREAM, PRE, stream, True)  # type: ignore[arg-type]


async def create_key(kv: KeyValue, key: str, value: bytes) -> int:
    return await JetStreamBucket(kv).create(key, value)


async def test_creates_an_absent_key() -> None:
    stream = FakeStream()
    assert await create_key(bucket(stream), "k", b"v") == 1
    assert stream.log[0][:2] == (f"{PRE}k", b"v")


async def test_a_key_created_by_another_caller_is_key_exists_even_if_a_replica_lags() -> None:
    stream = FakeStream()
    kv = bucket(stream)
    await kv.create("k", b"winner")
    stream.replica_applied = 0  # the replica has not seen the winner's write yet
    # What the register_agent race hit: KeyValue.create's read-back misses the winner.
    with pytest.raises(KeyNotFoundError):
        await kv.create("k", b"loser")
    with pytest.raises(KeyExists) as info:
        await create_key(kv, "k", b"loser")
    assert (info.value.value, info.value.revision) == (b"winner", 1)
    assert len(stream.log) == 1


async def test_a_deleted_key_is_created_over_its_delete_marker() -> None:
    stream = FakeStream()
    kv = bucket(stream)
    await kv.create("k", b"old")
    await kv.delete("k")
    stream.replica_applied = 1  # the replica still shows the old value
    with pytest.raises(KeyWrongLastSequenceError):  # KeyValue.create: "exists", wrongly
        await kv.create("k", b"new")
    assert await create_key(kv, "k", b"new") == 3
    stream.replica_applied = None
    assert (await kv.get("k")).value == b"new"


async def test_a_key_that_keeps_changing_is_contended_not_exists() -> None:
    stream = FakeStream()
    kv = bucket(stream)
    await kv.create("k", b"old")
    await kv.delete("k")

    def delete_again() -> None:
        stream.log.append((f"{PRE}k", b"", {"KV-Operation": "DEL"}))

    # A new marker before each of our writes, for longer than create tries.
    stream.before_publish = [delete_again] * (kv_module._CREATE_ATTEMPTS + 1)
    with pytest.raises(KeyContended):
        await create_key(kv, "k", b"new")


async def test_a_store_failure_is_broker_unavailable() -> None:
    stream = FakeStream()
    stream.fail_publish = TimeoutError()
    with pytest.raises(BrokerUnavailable):
        await create_key(bucket(stream), "k", b"v")


# -- store_new: the register_agent race -------------------------------


async def test_a_losing_registration_is_already_registered_even_if_a_replica_lags() -> None:
    stream = FakeStream()
    kv = bucket(stream)
    key = ai.public_key_b64(ai.generate_private_key())
    winner, loser = new_record("t1", "a", key), new_record("t1", "b", key)
    await store_new(JetStreamBucket(kv), winner)
    stream.replica_applied = 0
    with pytest.raises(RegistrationError) as info:
        await store_new(JetStreamBucket(kv), loser)
    assert str(info.value) == (
        f"this public key is already registered in tenant t1 (agent {winner.agent_id}): "
        "generate a new key pair for a new agent"
    )
    assert [subject for subject, _, _ in stream.log] == [
        PRE + public_key_index("t1", winner.public_key),
        PRE + winner.agent_id,
    ]


async def test_a_store_failure_while_registering_is_not_a_registration_error() -> None:
    stream = FakeStream()
    stream.fail_publish = TimeoutError()
    record = new_record("t1", "a", ai.public_key_b64(ai.generate_private_key()))
    with pytest.raises(BrokerUnavailable):  # not a RegistrationError
        await store_new(JetStreamBucket(bucket(stream)), record)


class _Agents:
    def items(self) -> list[tuple[str, bytes]]:
        return []


class _State:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def bucket(self, kind: str) -> JetStreamBucket:
        assert kind == "agents"
        return JetStreamBucket(self.kv)


class _Security:
    """What register_from_session uses of gateway.security.SecurityState."""

    def __init__(self, kv: KeyValue) -> None:
        self.agents = _Agents()
        self.state = _State(kv)
        self.prefix = "arq"

    async def wait_ready(self, bucket: object) -> bool:
        return True


async def test_register_agent_loser_is_invalid_parameters_and_an_outage_unavailable() -> None:
    stream = FakeStream()
    security: Any = _Security(bucket(stream))
    params = {"public_key": ai.public_key_b64(ai.generate_private_key()), "name": "a"}
    won = await register_from_session(security, "t1", "admin", params)
    stream.replica_applied = 0  # the loser's gateway has not seen the winner's write
    with pytest.raises(RegistrationError, match=f"already registered .*agent {won.agent_id}"):
        await register_from_session(security, "t1", "admin", params)
    stream.replica_applied = None
    stream.fail_publish = TimeoutError()  # the store does not answer
    other = {**params, "public_key": ai.public_key_b64(ai.generate_private_key())}
    with pytest.raises(BrokerUnavailable, match="could not store agent"):  # -> unavailable
        await register_from_session(security, "t1", "admin", other)
