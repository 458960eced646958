"""Ed25519 agent identity: keys, the signed sign-in message, agent tokens and records.

Pure (no I/O): used by the gateway (gateway/auth/agent.py), the CLI, the SDK and tests.

An agent is registered with its public key (raw 32 bytes, base64url) and signs in with a
token built from a single-use nonce the gateway issued (``GET /auth/nonce`` or the
``auth_required`` frame)::

    ed25519:<agent_id>:<nonce>:<timestamp>:<signature, base64url>

The signature covers :func:`signed_message`::

    b"arqonbus-agent-auth-v1\\n" + agent_id + "\\n" + nonce + "\\n" + timestamp

where ``timestamp`` is the integer Unix time in seconds, as decimal digits.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from arqonbus_server.shared import authz
from arqonbus_server.shared.errors import InvalidInput
from arqonbus_server.shared.subjects import is_valid_name

# Same value as gateway.auth.AGENT_TOKEN_PREFIX (tests check they agree).
TOKEN_PREFIX = "ed25519:"
CONTEXT = b"arqonbus-agent-auth-v1\n"
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
NONCE_MIN, NONCE_MAX = 16, 128
_NONCE_RE = re.compile(r"[A-Za-z0-9_-]+")
_TIMESTAMP_RE = re.compile(r"[0-9]{1,12}")
DEFAULT_ROLE = "member"


class AgentIdentityError(InvalidInput):
    """A key, token or record is malformed; the message says what to fix (never a secret)."""


# -- base64url ---------------------------------------------------------------------


def b64url(data: bytes) -> str:
    """Unpadded base64url."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str, what: str) -> bytes:
    """Decode base64url or standard base64, padded or not."""
    cleaned = text.strip().replace("+", "-").replace("/", "_").rstrip("=")
    if not cleaned or not re.fullmatch(r"[A-Za-z0-9_-]+", cleaned):
        raise AgentIdentityError(f"{what} is not base64url text")
    try:
        return base64.urlsafe_b64decode(cleaned + "=" * (-len(cleaned) % 4))
    except (binascii.Error, ValueError):
        raise AgentIdentityError(f"{what} is not base64url text") from None


# -- keys ----------------------------------------------------------------------------


def generate_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_key_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_b64(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The public key as registered: raw 32 bytes, unpadded base64url."""
    return b64url(public_key_bytes(key))


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted (store it readable only by the agent)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key(data: bytes | str) -> Ed25519PrivateKey:
    """A private key from PKCS#8 PEM, or its raw 32-byte seed as base64url."""
    raw = data.encode() if isinstance(data, str) else data
    if raw.lstrip().startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(raw, password=None)
        except (ValueError, TypeError):
            raise AgentIdentityError(
                "the private key PEM does not load (unencrypted PKCS#8 expected)"
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise AgentIdentityError("the private key is not an Ed25519 key")
        return key
    seed = b64url_decode(raw.decode(errors="replace"), "the private key")
    if len(seed) != PUBLIC_KEY_BYTES:
        raise AgentIdentityError("a raw Ed25519 private key is 32 bytes (base64url)")
    return Ed25519PrivateKey.from_private_bytes(seed)


def parse_public_key(data: bytes | str) -> bytes:
    """The raw 32-byte public key from base64url/base64 text or a PEM (SubjectPublicKeyInfo)."""
    raw = data.encode() if isinstance(data, str) else data
    if raw.lstrip().startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(raw)
        except (ValueError, TypeError):
            raise AgentIdentityError("the public key PEM does not load") from None
        if not isinstance(key, Ed25519PublicKey):
            raise AgentIdentityError("the public key is not an Ed25519 key")
        return public_key_bytes(key)
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise AgentIdentityError(
            "the public key must be base64url text (32 raw bytes) or a PEM file"
        ) from None
    key_bytes = b64url_decode(text, "the public key")
    if len(key_bytes) != PUBLIC_KEY_BYTES:
        raise AgentIdentityError(
            f"an Ed25519 public key is {PUBLIC_KEY_BYTES} raw bytes; this one has {len(key_bytes)}"
        )
    Ed25519PublicKey.from_public_bytes(key_bytes)
    return key_bytes


# -- ids and nonces --------------------------------------------------------------------


def new_agent_id() -> str:
    return str(uuid.uuid4())


def is_agent_id(value: object) -> bool:
    """A canonical (lowercase, hyphenated) UUID4."""
    if not isinstance(value, str) or len(value) != 36:
        return False
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        return False
    return str(parsed) == value and parsed.version == 4


def new_nonce() -> str:
    """32 random bytes, base64url (43 characters): also a valid NATS KV key."""
    return secrets.token_urlsafe(32)


def is_nonce(value: object) -> bool:
    return (
        isinstance(value, str)
        and NONCE_MIN <= len(value) <= NONCE_MAX
        and _NONCE_RE.fullmatch(value) is not None
    )


# -- tokens ----------------------------------------------------------------------------


def signed_message(agent_id: str, nonce: str, timestamp: int | str) -> bytes:
    """The exact bytes an agent signs."""
    return CONTEXT + f"{agent_id}\n{nonce}\n{timestamp}".encode()


def sign_token(
    private_key: Ed25519PrivateKey,
    agent_id: str,
    nonce: str,
    timestamp: int | str | None = None,
) -> str:
    """``ed25519:<agent_id>:<nonce>:<timestamp>:<signature>``; timestamp defaults to now."""
    stamp = str(int(time.time()) if timestamp is None else int(timestamp))
    if not is_agent_id(agent_id):
        raise AgentIdentityError("agent_id must be the UUID the registration printed")
    if not is_nonce(nonce):
        raise AgentIdentityError("nonce must be the value GET /auth/nonce or auth_required gave")
    signature = private_key.sign(signed_message(agent_id, nonce, stamp))
    return f"{TOKEN_PREFIX}{agent_id}:{nonce}:{stamp}:{b64url(signature)}"


@dataclass(frozen=True, slots=True)
class AgentToken:
    agent_id: str
    nonce: str
    timestamp: int
    signature: bytes = field(repr=False)

    @property
    def message(self) -> bytes:
        return signed_message(self.agent_id, self.nonce, self.timestamp)


_TOKEN_FORM = "ed25519:<agent_id>:<nonce>:<unix seconds>:<signature base64url>"


def parse_token(token: str) -> AgentToken:
    """Split and check an agent token's form; AgentIdentityError says which part is wrong."""
    if not token.startswith(TOKEN_PREFIX):
        raise AgentIdentityError(f"an agent token starts with {TOKEN_PREFIX!r}")
    parts = token[len(TOKEN_PREFIX) :].split(":")
    if len(parts) != 4:
        raise AgentIdentityError(f"malformed agent token: expected {_TOKEN_FORM}")
    agent_id, nonce, stamp, signature = parts
    if not is_agent_id(agent_id):
        raise AgentIdentityError("malformed agent token: the agent id is not a UUID")
    if not is_nonce(nonce):
        raise AgentIdentityError(
            f"malformed agent token: the nonce must be {NONCE_MIN}-{NONCE_MAX} base64url characters"
        )
    if not _TIMESTAMP_RE.fullmatch(stamp):
        raise AgentIdentityError(
            "malformed agent token: the timestamp must be integer Unix seconds"
        )
    sig = b64url_decode(signature, "the token's signature")
    if len(sig) != SIGNATURE_BYTES:
        raise AgentIdentityError(
            f"malformed agent token: an Ed25519 signature is {SIGNATURE_BYTES} bytes"
        )
    return AgentToken(agent_id, nonce, int(stamp), sig)


def verify(public_key: bytes, token: AgentToken) -> bool:
    """True when ``token``'s signature is ``public_key``'s over its canonical message."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(token.signature, token.message)
    except (InvalidSignature, ValueError):
        return False
    return True


# -- records -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AgentRecord:
    """One registered agent, as stored in the agents KV bucket under its id."""

    agent_id: str
    tenant: str
    name: str
    public_key: str  # raw 32 bytes, unpadded base64url
    role: str = DEFAULT_ROLE
    grants: tuple[str, ...] = ()
    created_at: float = 0.0
    revoked_at: float | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def public_key_bytes(self) -> bytes:
        return b64url_decode(self.public_key, "the stored public key")

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "agent_id": self.agent_id,
                "tenant": self.tenant,
                "name": self.name,
                "public_key": self.public_key,
                "role": self.role,
                "grants": list(self.grants),
                "created_at": self.created_at,
                "revoked_at": self.revoked_at,
            }
        )

    @classmethod
    def from_json(cls, data: bytes) -> AgentRecord:
        try:
            obj: Any = orjson.loads(data)
            record = cls(
                agent_id=str(obj["agent_id"]),
                tenant=str(obj["tenant"]),
                name=str(obj.get("name", "")),
                public_key=str(obj["public_key"]),
                role=str(obj.get("role") or DEFAULT_ROLE),
                grants=tuple(str(g) for g in obj.get("grants") or ()),
                created_at=float(obj.get("created_at") or 0.0),
                revoked_at=None if obj.get("revoked_at") is None else float(obj["revoked_at"]),
            )
            # Everything a principal is built from must be valid (fail closed otherwise).
            valid = (
                is_agent_id(record.agent_id)
                and is_valid_name(record.tenant)
                and authz.is_known_role(record.role)
            )
            authz.parse_grants(record.grants)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise AgentIdentityError("the stored agent record is malformed") from None
        if not valid:
            raise AgentIdentityError("the stored agent record has an invalid id, tenant or role")
        return record
