"""``apikey`` authentication: service-account keys checked against the KEYS KV bucket.

The check answers from the gateway's watched copy of the bucket (no NATS round trip): the
key id indexes the record, the secret's SHA-256 must match its hash and the record must
not be revoked. A revoke (``revoked_at`` set, or the record deleted) reaches every
gateway through the watch; :func:`revoked_key_id` tells the gateway which key's sessions
to close (gateway/app.py).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from arqonbus_server.gateway.auth.base import AuthError, AuthUnavailable, Credentials, Principal
from arqonbus_server.shared import apikeys
from arqonbus_server.shared.apikeys import ApiKeyRecord, KeyFormatError, RecordError

if TYPE_CHECKING:
    from arqonbus_server.gateway.state.security import SecurityState
    from arqonbus_server.shared.settings import Settings

log = logging.getLogger("arqonbus.gateway.auth_keys")

METHOD = "apikey"


class _Entry:
    """One KV entry of the index: its tenant, and the record (None: it does not validate)."""

    __slots__ = ("record", "tenant")

    def __init__(self, tenant: str, record: ApiKeyRecord | None) -> None:
        self.tenant = tenant
        self.record = record


def _decode(kv_key: str, tenant: str, key_id: str, value: bytes) -> ApiKeyRecord | None:
    try:
        record = apikeys.decode_record(value)
    except RecordError as exc:
        log.warning("API key record %s is invalid, so the key is refused: %s", kv_key, exc)
        return None
    if record.tenant != tenant or record.key_id != key_id:
        log.warning(
            "API key record %s names tenant %r, key %r: it must match its KV key; refused",
            kv_key,
            record.tenant,
            record.key_id,
        )
        return None
    return record


def revoked_key_id(kv_key: str, value: bytes | None) -> str | None:
    """The key id whose sessions must close after this KEYS change, else None.

    A deleted record, a record with ``revoked_at`` and a record that no longer validates
    (fail closed) all end the key's sessions.
    """
    parts = apikeys.split_kv_key(kv_key)
    if parts is None:
        return None
    tenant, key_id = parts
    if value is None:
        return key_id
    record = _decode(kv_key, tenant, key_id, value)
    return key_id if record is None or record.revoked else None


class ApiKeyAuthenticator:
    """``arqk_<key id>_<secret>`` tokens against the gateway's copy of the KEYS bucket."""

    name = METHOD

    def __init__(self, security: SecurityState, settings: Settings | None = None) -> None:
        self._security = security
        self._bucket = security.keys
        # key id -> its entry, kept by the watch (parsed once per change, not per handshake).
        self._index: dict[str, _Entry] = {}
        for kv_key, value in self._bucket.items():
            self._on_change(kv_key, value)
        self._bucket.on_change(self._on_change)

    def _on_change(self, kv_key: str, value: bytes | None) -> None:
        parts = apikeys.split_kv_key(kv_key)
        if parts is None:
            return
        tenant, key_id = parts
        if value is None:
            entry = self._index.get(key_id)
            if entry is not None and entry.tenant == tenant:
                del self._index[key_id]
            return
        self._index[key_id] = _Entry(tenant, _decode(kv_key, tenant, key_id, value))

    def authenticate(self, credentials: Credentials) -> Principal | Awaitable[Principal]:
        token = credentials.token
        if not token:
            raise AuthError(
                f"missing API key: send 'Authorization: Bearer {apikeys.KEY_FORMAT}' (or the "
                "arqonbus.bearer.<key> subprotocol, or ?token=)"
            )
        try:
            parsed = apikeys.parse_key(token)
        except KeyFormatError as exc:
            raise AuthError(str(exc)) from None
        if not self._bucket.ready.is_set() or parsed.key_id not in self._index:
            return self._when_current(parsed)
        return self._check(parsed)

    async def _when_current(self, parsed: apikeys.ParsedKey) -> Principal:
        if not await self._security.wait_ready(self._bucket):
            raise AuthUnavailable(
                "API keys cannot be checked yet (the key store has not loaded): retry shortly "
                "or connect to another gateway"
            )
        if parsed.key_id not in self._index:
            # Created a moment ago through another node: the copy may not have it yet.
            await self._bucket.caught_up()
        return self._check(parsed)

    def _check(self, parsed: apikeys.ParsedKey) -> Principal:
        key_id = parsed.key_id
        entry = self._index.get(key_id)
        if entry is None:
            raise AuthError(
                f"unknown API key {key_id}: it does not exist or was deleted; create one with "
                "'arqonbus keys create'"
            )
        record = entry.record
        if record is None:
            raise AuthError(
                f"API key {key_id} has an invalid record on the server: ask an operator to "
                "revoke it and create a new key",
                entry.tenant,
                key_id,
            )
        if record.revoked:
            raise AuthError(
                f"API key {key_id} was revoked at {record.revoked_at}: use a new key",
                record.tenant,
                key_id,
            )
        if not record.matches(parsed.secret):
            raise AuthError(
                f"wrong secret for API key {key_id}: check that the whole key was copied",
                record.tenant,
                key_id,
            )
        return Principal(
            record.tenant,
            record.principal_id,
            role=record.role,
            grants=record.grants,
            method=METHOD,
            credential_id=key_id,
        )
