"""API keys: the key format, the secret's hash, and the stored record (shared/apikeys.py)."""

from __future__ import annotations

import hashlib

import orjson
import pytest

from arqonbus_server.shared import apikeys
from arqonbus_server.shared.apikeys import KeyFormatError, RecordError


def test_a_new_key_has_the_documented_form_and_parses_back() -> None:
    key, record = apikeys.new_record("acme", "ingest", "member", ["science:*:publish"], "cli")
    assert key.startswith("arqk_")
    parsed = apikeys.parse_key(key)
    assert parsed.key_id == record.key_id
    assert len(parsed.key_id) == 12 and apikeys.is_valid_key_id(parsed.key_id)
    assert len(parsed.secret) == 43  # 32 random bytes, URL-safe base64
    assert key == f"arqk_{parsed.key_id}_{parsed.secret}"
    assert record.tenant == "acme" and record.name == "ingest" and record.role == "member"
    assert record.grants == ("science:*:publish",)
    assert record.created_by == "cli" and record.revoked_at is None


def test_keys_are_random() -> None:
    keys = {apikeys.new_record("acme", "k", "member")[0] for _ in range(50)}
    assert len(keys) == 50
    assert len({apikeys.parse_key(k).key_id for k in keys}) == 50


def test_the_record_stores_only_the_secrets_sha256() -> None:
    key, record = apikeys.new_record("acme", "ingest", "member")
    secret = apikeys.parse_key(key).secret
    stored = record.encode()
    assert secret.encode() not in stored and key.encode() not in stored
    assert record.secret_sha256 == hashlib.sha256(secret.encode()).hexdigest()
    assert orjson.loads(stored)["secret_sha256"] == record.secret_sha256
    assert record.matches(secret)
    assert not record.matches(secret[:-1] + ("A" if secret[-1] != "A" else "B"))
    assert not record.matches("")


def test_a_parsed_key_never_shows_its_secret() -> None:
    key, _ = apikeys.new_record("acme", "ingest", "member")
    parsed = apikeys.parse_key(key)
    assert parsed.secret not in repr(parsed) and parsed.secret not in str(parsed)


@pytest.mark.parametrize(
    ("token", "problem"),
    [
        ("", "expected arqk_"),
        ("dev:acme:alice", "expected arqk_"),
        ("arqk_", "key id"),
        ("arqk_abc_" + "a" * 43, "key id"),  # id too short
        ("arqk_ABCDEFGHIJKL_" + "a" * 43, "key id"),  # upper case is not base32 here
        ("arqk_abcdefghijk1_" + "a" * 43, "key id"),  # 1 is not in the alphabet
        ("arqk_abcdefghijkl" + "a" * 43, "key id"),  # no separator
        ("arqk_abcdefghijkl_" + "a" * 42, "secret"),
        ("arqk_abcdefghijkl_" + "a" * 44, "secret"),
        ("arqk_abcdefghijkl_" + "a" * 42 + "!", "secret"),
    ],
)
def test_a_malformed_key_is_refused_without_echoing_it(token: str, problem: str) -> None:
    with pytest.raises(KeyFormatError) as info:
        apikeys.parse_key(token)
    message = str(info.value)
    assert problem in message
    secret_part = token[len("arqk_abcdefghijkl_") :]
    if secret_part:
        assert secret_part not in message


def test_kv_keys_round_trip_and_reject_other_keys() -> None:
    assert apikeys.kv_key("acme", "abcdefghijkl") == "acme.abcdefghijkl"
    assert apikeys.split_kv_key("acme.abcdefghijkl") == ("acme", "abcdefghijkl")
    for other in ("acme", "acme.", "acme.short", "bad tenant.abcdefghijkl", ".abcdefghijkl"):
        assert apikeys.split_kv_key(other) is None


@pytest.mark.parametrize(
    ("tenant", "name", "role", "grants", "problem"),
    [
        ("bad.tenant", "ingest", "member", (), "tenant"),
        ("acme", "has space", "member", (), "name"),
        ("acme", "ingest", "superuser", (), "unknown role"),
        ("acme", "ingest", "member", ("science:publish",), "expected 3 parts"),
        ("acme", "ingest", "member", ("science:*:fly",), "unknown permission"),
    ],
)
def test_a_bad_record_is_refused_with_what_to_fix(
    tenant: str, name: str, role: str, grants: tuple[str, ...], problem: str
) -> None:
    with pytest.raises(RecordError) as info:
        apikeys.new_record(tenant, name, role, grants)
    assert problem in str(info.value)


def test_a_stored_record_round_trips_and_revoke_sets_the_time() -> None:
    _, record = apikeys.new_record("acme", "ingest", "read-only", ["*:alerts:publish"])
    decoded = apikeys.decode_record(record.encode())
    assert decoded == record
    revoked = decoded.revoke("2026-11-29T12:00:00+00:00")
    assert revoked.revoked and revoked.revoked_at == "2026-11-29T12:00:00+00:00"
    assert apikeys.decode_record(revoked.encode()).revoked
    assert not record.revoked  # records are immutable


def test_the_principal_id_is_the_name_or_the_key_id() -> None:
    _, record = apikeys.new_record("acme", "ingest", "member")
    assert record.principal_id == "ingest"
    unnamed = record.model_copy(update={"name": ""})
    assert unnamed.principal_id == f"key-{record.key_id}"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(secret_sha256="x" * 64),
        lambda d: d.update(role="root"),
        lambda d: d.update(grants=["nope"]),
        lambda d: d.pop("secret_sha256"),
        lambda d: d.update(key_id="short"),
    ],
)
def test_a_stored_record_that_does_not_validate_is_an_error(mutate) -> None:  # type: ignore[no-untyped-def]
    _, record = apikeys.new_record("acme", "ingest", "member")
    data = orjson.loads(record.encode())
    mutate(data)
    with pytest.raises(RecordError):
        apikeys.decode_record(orjson.dumps(data))
    with pytest.raises(RecordError):
        apikeys.decode_record(b"not json")
