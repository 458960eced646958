"""API keys for service accounts: the key format and the stored record. Pure, no I/O.

A key is ``arqk_<key id>_<secret>``: the key id is 12 random base32 characters (a-z, 2-7;
60 bits, it names the key in lists, logs and the audit stream and is not secret) and the
secret is 32 random bytes, URL-safe base64 without padding (43 characters). The key is
shown once, when it is created; only the SHA-256 of the secret is stored. (A slow password
hash is not needed: the secret has 256 bits of entropy, so its hash cannot be brute-forced.)

Records live in the KEYS KV bucket (:mod:`mesh.kv`) under ``<tenant>.<key id>``, as JSON::

    {"tenant": "acme", "key_id": "k3x...", "name": "ingest", "role": "member",
     "grants": ["science:*:publish"], "created_at": "2026-11-29T11:30:00+00:00",
     "created_by": "cli", "revoked_at": null, "secret_sha256": "<64 hex>"}

A revoked key keeps its record (``revoked_at`` set), so ``keys list`` still shows it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from arqonbus_server.shared import authz
from arqonbus_server.shared.errors import InvalidInput
from arqonbus_server.shared.subjects import is_valid_name

KEY_PREFIX = "arqk_"
KEY_ID_LENGTH = 12
SECRET_BYTES = 32
_KEY_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
_KEY_ID_RE = re.compile(rf"[a-z2-7]{{{KEY_ID_LENGTH}}}")
_SECRET_LENGTH = 43  # 32 bytes, URL-safe base64 without padding
_SECRET_RE = re.compile(rf"[A-Za-z0-9_-]{{{_SECRET_LENGTH}}}")
_HASH_RE = re.compile(r"[0-9a-f]{64}")
KEY_FORMAT = f"{KEY_PREFIX}<12-character key id>_<43-character secret>"


class KeyFormatError(InvalidInput):
    """A string is not an API key. The message never contains the string."""


class RecordError(InvalidInput):
    """A stored API-key record is not valid (fail closed: the key is refused)."""


@dataclass(frozen=True, slots=True)
class ParsedKey:
    key_id: str
    secret: str

    def __repr__(self) -> str:  # never print the secret by accident
        return f"ParsedKey(key_id={self.key_id!r}, secret=<hidden>)"


def new_key_id() -> str:
    return "".join(secrets.choice(_KEY_ID_ALPHABET) for _ in range(KEY_ID_LENGTH))


def new_secret() -> str:
    return secrets.token_urlsafe(SECRET_BYTES)


def format_key(key_id: str, secret: str) -> str:
    return f"{KEY_PREFIX}{key_id}_{secret}"


def is_valid_key_id(key_id: str) -> bool:
    return isinstance(key_id, str) and _KEY_ID_RE.fullmatch(key_id) is not None


def parse_key(key: str) -> ParsedKey:
    """``arqk_<key id>_<secret>`` -> :class:`ParsedKey`; :class:`KeyFormatError` otherwise."""
    if not isinstance(key, str) or not key.startswith(KEY_PREFIX):
        raise KeyFormatError(f"malformed API key: expected {KEY_FORMAT}")
    key_id, sep, secret = key[len(KEY_PREFIX) :].partition("_")
    if not sep or not is_valid_key_id(key_id):
        raise KeyFormatError(
            f"malformed API key: the key id must be {KEY_ID_LENGTH} characters of a-z and 2-7 "
            f"(expected {KEY_FORMAT})"
        )
    if _SECRET_RE.fullmatch(secret) is None:
        raise KeyFormatError(
            f"malformed API key {key_id}: the secret must be {_SECRET_LENGTH} characters of "
            "A-Z a-z 0-9 _ - (copy the whole key printed by 'arqonbus keys create')"
        )
    return ParsedKey(key_id, secret)


def hash_secret(secret: str) -> str:
    """The stored form of a secret: SHA-256, hex."""
    return hashlib.sha256(secret.encode()).hexdigest()


def kv_key(tenant: str, key_id: str) -> str:
    """The record's key in the KEYS bucket."""
    return f"{tenant}.{key_id}"


def split_kv_key(key: str) -> tuple[str, str] | None:
    """``<tenant>.<key id>`` -> (tenant, key id); None for any other key."""
    tenant, sep, key_id = key.partition(".")
    if not sep or not is_valid_name(tenant) or not is_valid_key_id(key_id):
        return None
    return tenant, key_id


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class ApiKeyRecord(BaseModel):
    """What the KEYS bucket stores for one key (never the key or the secret)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    tenant: str
    key_id: str
    name: str
    role: str
    grants: tuple[str, ...] = ()
    created_at: str
    created_by: str = ""
    revoked_at: str | None = None
    secret_sha256: str

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, value: str) -> str:
        if not is_valid_name(value):
            raise ValueError("tenant must be 1-64 characters of A-Z a-z 0-9 _ -")
        return value

    @field_validator("key_id")
    @classmethod
    def _key_id(cls, value: str) -> str:
        if not is_valid_key_id(value):
            raise ValueError(f"key id must be {KEY_ID_LENGTH} characters of a-z and 2-7")
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if value and not is_valid_name(value):
            raise ValueError(
                "name must be 1-64 characters of A-Z a-z 0-9 _ - (it is the principal id "
                "the key's messages are sent from)"
            )
        return value

    @field_validator("role")
    @classmethod
    def _role(cls, value: str) -> str:
        if not authz.is_known_role(value):
            raise ValueError(f"unknown role {value[:64]!r}: use one of {authz.ROLE_NAMES}")
        return value

    @field_validator("grants")
    @classmethod
    def _grants(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        try:
            authz.parse_grants(value)
        except authz.GrantError as exc:
            raise ValueError(str(exc)) from None
        return tuple(grant.strip() for grant in value)

    @field_validator("secret_sha256")
    @classmethod
    def _hash(cls, value: str) -> str:
        if _HASH_RE.fullmatch(value) is None:
            raise ValueError("secret_sha256 must be 64 lowercase hex characters")
        return value

    @property
    def principal_id(self) -> str:
        """The principal the key signs in as: its name, else ``key-<key id>``."""
        return self.name or f"key-{self.key_id}"

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def matches(self, secret: str) -> bool:
        """Does ``secret`` hash to the stored hash? (Constant-time comparison.)"""
        return hmac.compare_digest(hash_secret(secret), self.secret_sha256)

    def revoke(self, when: str | None = None) -> ApiKeyRecord:
        return self.model_copy(update={"revoked_at": when or now_iso()})

    def encode(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error.get("loc", ())) or "record"
    return f"{where}: {error['msg'].removeprefix('Value error, ')}"


def new_record(
    tenant: str,
    name: str,
    role: str,
    grants: tuple[str, ...] | list[str] = (),
    created_by: str = "",
) -> tuple[str, ApiKeyRecord]:
    """A fresh key and its record. RecordError (what to fix) for a bad tenant/name/role/grant."""
    key_id, secret = new_key_id(), new_secret()
    try:
        record = ApiKeyRecord(
            tenant=tenant,
            key_id=key_id,
            name=name,
            role=role,
            grants=tuple(grants),
            created_at=now_iso(),
            created_by=created_by,
            secret_sha256=hash_secret(secret),
        )
    except ValidationError as exc:
        raise RecordError(_first_error(exc)) from None
    return format_key(key_id, secret), record


def decode_record(data: bytes) -> ApiKeyRecord:
    """A stored record; RecordError if it is not valid JSON or fails validation."""
    try:
        return ApiKeyRecord.model_validate_json(data)
    except ValidationError as exc:
        raise RecordError(f"invalid API key record: {_first_error(exc)}") from None
