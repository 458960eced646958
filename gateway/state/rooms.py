"""Private rooms, invites, bans and mutes: room settings in NATS KV, enforced on every gateway.

A room's settings live in the ROOMS bucket (a :class:`mesh.ports.KVBucket`) under ``<tenant>.<room>``; the
tenant is always the session's, never the envelope's, so tenant A's settings never touch a
room of tenant B. Every gateway keeps a decoded copy (:class:`RoomDirectory`, fed by the
bucket's watch): a room without settings costs one dict lookup on the publish path.

The record (JSON)::

    {"private": bool, "key_hash": "scrypt$16384$8$1$<salt>$<hash>" | "",
     "invite_only": bool, "invited": [principal, ...],
     "banned": {principal: {"until": unix_s | null, "reason": str}},
     "muted": {principal: {"until": unix_s | null}},
     "presence": bool, "retention_s": int | null, "max_message_bytes": int | null,
     "max_bytes": int | null,
     "configured": bool,
     "kicks": {principal or "*": {"at": unix_s, "reason": str}},
     "created_by": principal, "updated_at": unix_s}

``configured`` is false for a record that only carries kicks (a kick in a room never
configured, or the record delete_room leaves behind); ``kicks`` live for
:data:`KICK_MEMORY_S` and each one is applied once by every gateway (gateway/app.py): the
kicked principal's sessions (``*``: everyone's, after delete_room) leave the room's channels.

Rules (checked by :class:`gateway.session.Session`):

* banned (ban not expired): join, publish, history, service calls and register_handler are
  refused with ``banned``; a ban applied while the member is joined removes it from the
  room's channels on every gateway and pushes an ``error`` frame with code ``banned``.
* invite-only: only invited principals and principals with ``admin`` on the room may join.
* private: a join needs parameter ``room_key`` matching the room's key, unless the principal
  is invited or has ``admin`` on the room. Publishing, history, service calls and handlers in
  a private or invite-only room need the same membership: invited, admin, or a channel of
  the room joined on this connection (history and register_handler also take ``room_key``).
* muted: publishing is refused with ``muted`` (``retry_after_ms`` when the mute is timed);
  reading (join, history) is allowed.
* retention_s: every event published in the room afterwards carries that TTL (NATS
  per-message TTL): the store drops it then, whatever the tenant's stream keeps.
* max_message_bytes: a larger stored event is refused with ``message_too_large``.
* max_bytes: the room keeps its newest events up to that many bytes (all channels together);
  older ones are removed a few seconds after the room goes over (gateway/state/room_bytes.py).
* presence: join_channel's default for ``presence`` (docs/presence.md).

Room keys are stored only as a salted scrypt hash. A successful verification is remembered
in memory (per tenant, room and an HMAC of the candidate under a per-process secret), so a
join storm with the right key costs one scrypt, not one per join.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import random
import secrets
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from arqonbus_server.gateway.http.admission import RateLimiter
from arqonbus_server.mesh.ports import KeyContended, KeyExists, RevisionMismatch
from arqonbus_server.shared import commands, subjects
from arqonbus_server.shared.core.commands import room_key_param as room_key_param
from arqonbus_server.shared.core.rooms import CALL_ACTION as CALL_ACTION
from arqonbus_server.shared.core.rooms import (
    NeedsKey,
    Standing,
    enter_decision,
    publish_refusal,
    wrong_key,
)
from arqonbus_server.shared.core.rooms import banned_error as banned_error
from arqonbus_server.shared.errors import (
    INVALID_PARAMETERS,
    KICKED,
    LIMIT_EXCEEDED,
    MESSAGE_RATE_LIMITED,
    ROOM_DELETED,
    ROOM_EXISTS,
    UNAVAILABLE,
    ArqonError,
    InvalidInput,
)
from arqonbus_server.shared.subjects import is_valid_name

if TYPE_CHECKING:
    from arqonbus_server.gateway.state.security import SecurityState
    from arqonbus_server.mesh.ports import KVBucket
    from arqonbus_server.mesh.watched import WatchedBucket

log = logging.getLogger("arqonbus.gateway.rooms")

# -- bounds ------------------------------------------------------------------------------
MAX_ENTRIES = 10_000  # invites, bans and mutes, each, per room
MAX_RECORD_BYTES = 512 * 1024  # well under the KV max value (NATS max_payload, 1 MiB default)
MAX_REASON_CHARS = 200
ROOM_KEY_MIN_CHARS = 8
ROOM_KEY_MAX_CHARS = 256
MAX_DURATION_S = 366 * 86400
CAS_ATTEMPTS = 12
INFO_LIST_MAX = 1000  # room_info lists at most this many entries of each kind
APPLY_WAIT_S = 2.0  # an admin change waits this long at most to show on its own gateway
KICK_MEMORY_S = 300.0  # a kick stays in the record this long: every gateway applies it once
EVERYONE = "*"  # the kick delete_room records: every session in the room leaves

# -- room key hashing (scrypt: ~50 ms, 16 MiB per hash) --------------------------------------
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_DKLEN = 32
SCRYPT_MAXMEM = 64 * 1024 * 1024
_MAX_STORED_N = 2**20
_VERIFIED_MAX = 4096
# Verifications run in threads, at most this many at once (the rest wait their turn).
_HASH_CONCURRENCY = 2


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def hash_room_key(key: str) -> str:
    """``scrypt$N$r$p$<salt b64>$<hash b64>`` of ``key`` with a random 16-byte salt."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(
        key.encode(),
        salt=salt,
        n=SCRYPT_N,
        r=SCRYPT_R,
        p=SCRYPT_P,
        dklen=SCRYPT_DKLEN,
        maxmem=SCRYPT_MAXMEM,
    )
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_room_key(key: str, stored: str) -> bool:
    """Does ``key`` match the stored hash? Constant-time compare; a malformed hash: False."""
    try:
        scheme, n_s, r_s, p_s, salt_s, digest_s = stored.split("$")
        n, r, p = int(n_s), int(r_s), int(p_s)
        salt, expected = (
            base64.b64decode(salt_s, validate=True),
            base64.b64decode(digest_s, validate=True),
        )
    except ValueError:
        return False
    if scheme != "scrypt" or not (2 <= n <= _MAX_STORED_N and 1 <= r <= 32 and 1 <= p <= 4):
        return False
    if not expected or len(expected) > 64:
        return False
    try:
        digest = hashlib.scrypt(
            key.encode(), salt=salt, n=n, r=r, p=p, dklen=len(expected), maxmem=SCRYPT_MAXMEM
        )
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(digest, expected)


# -- the record ------------------------------------------------------------------------------


class RoomRecordError(InvalidInput):
    """A stored room record does not parse (the room then fails closed: admins only)."""


@dataclass(slots=True)
class Ban:
    until: float | None  # Unix seconds; None: until unbanned
    reason: str = ""

    def active(self, now: float) -> bool:
        return self.until is None or now < self.until


@dataclass(slots=True)
class Mute:
    until: float | None

    def active(self, now: float) -> bool:
        return self.until is None or now < self.until


@dataclass(slots=True)
class Kick:
    at: float  # Unix seconds
    reason: str = ""


@dataclass(slots=True)
class RoomSettings:
    private: bool = False
    key_hash: str = ""
    invite_only: bool = False
    invited: set[str] = field(default_factory=set)
    banned: dict[str, Ban] = field(default_factory=dict)
    muted: dict[str, Mute] = field(default_factory=dict)
    created_by: str = ""
    updated_at: float = 0.0
    presence: bool = False
    retention_s: int | None = None
    max_message_bytes: int | None = None
    max_bytes: int | None = None
    configured: bool = True
    kicks: dict[str, Kick] = field(default_factory=dict)
    # A record that did not parse: only admins may enter (fail closed).
    broken: bool = False

    @property
    def restricted(self) -> bool:
        """Entering needs membership (key, invite or admin)."""
        return self.private or self.invite_only or self.broken

    def ban_of(self, principal: str, now: float) -> Ban | None:
        ban = self.banned.get(principal)
        return ban if ban is not None and ban.active(now) else None

    def mute_of(self, principal: str, now: float) -> Mute | None:
        mute = self.muted.get(principal)
        return mute if mute is not None and mute.active(now) else None

    def prune(self, now: float) -> None:
        """Drop bans and mutes that have ended."""
        self.banned = {p: b for p, b in self.banned.items() if b.active(now)}
        self.muted = {p: m for p, m in self.muted.items() if m.active(now)}
        self.kicks = {p: k for p, k in self.kicks.items() if now - k.at < KICK_MEMORY_S}

    def check_bounds(self) -> None:
        for label, size in (
            ("invites", len(self.invited)),
            ("bans", len(self.banned)),
            ("mutes", len(self.muted)),
        ):
            if size > MAX_ENTRIES:
                raise ArqonError(
                    LIMIT_EXCEEDED,
                    f"a room holds at most {MAX_ENTRIES} {label}: remove some (room_uninvite, "
                    "room_unban, room_unmute) first",
                )

    def encode(self) -> bytes:
        body = orjson.dumps(
            {
                "private": self.private,
                "key_hash": self.key_hash,
                "invite_only": self.invite_only,
                "invited": sorted(self.invited),
                "banned": {
                    p: {"until": b.until, "reason": b.reason} for p, b in self.banned.items()
                },
                "muted": {p: {"until": m.until} for p, m in self.muted.items()},
                "presence": self.presence,
                "retention_s": self.retention_s,
                "max_message_bytes": self.max_message_bytes,
                "max_bytes": self.max_bytes,
                "configured": self.configured,
                "kicks": {p: {"at": k.at, "reason": k.reason} for p, k in self.kicks.items()},
                "created_by": self.created_by,
                "updated_at": self.updated_at,
            }
        )
        if len(body) > MAX_RECORD_BYTES:
            raise ArqonError(
                LIMIT_EXCEEDED,
                f"the room's settings would exceed {MAX_RECORD_BYTES} bytes: remove invites, "
                "bans or mutes, or use shorter reasons",
            )
        return body

    @classmethod
    def decode(cls, data: bytes) -> RoomSettings:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise RoomRecordError(f"not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise RoomRecordError("not a JSON object")
        settings = cls(
            private=_field(obj, "private", bool, False),
            key_hash=_field(obj, "key_hash", str, ""),
            invite_only=_field(obj, "invite_only", bool, False),
            created_by=_field(obj, "created_by", str, ""),
            updated_at=float(_field(obj, "updated_at", (int, float), 0.0)),
            presence=_field(obj, "presence", bool, False),
            retention_s=_positive(obj, "retention_s"),
            max_message_bytes=_positive(obj, "max_message_bytes"),
            max_bytes=_positive(obj, "max_bytes"),
            configured=_field(obj, "configured", bool, True),
        )
        for principal, entry in _field(obj, "kicks", dict, {}).items():
            if not (principal == EVERYONE or is_valid_name(principal)) or not isinstance(
                entry, dict
            ):
                raise RoomRecordError("'kicks' holds an invalid entry")
            at = entry.get("at")
            if isinstance(at, bool) or not isinstance(at, int | float):
                raise RoomRecordError("a kick's 'at' must be a number")
            settings.kicks[principal] = Kick(float(at), _field(entry, "reason", str, ""))
        invited = _field(obj, "invited", list, [])
        if not all(is_valid_name(p) for p in invited):
            raise RoomRecordError("'invited' holds an invalid principal")
        settings.invited = set(invited)
        for principal, entry in _field(obj, "banned", dict, {}).items():
            if not is_valid_name(principal) or not isinstance(entry, dict):
                raise RoomRecordError("'banned' holds an invalid entry")
            settings.banned[principal] = Ban(_until(entry), _field(entry, "reason", str, ""))
        for principal, entry in _field(obj, "muted", dict, {}).items():
            if not is_valid_name(principal) or not isinstance(entry, dict):
                raise RoomRecordError("'muted' holds an invalid entry")
            settings.muted[principal] = Mute(_until(entry))
        return settings

    def info(self, room: str, now: float) -> dict[str, Any]:
        """What ``room_info`` shows: everything but the key hash; lists capped."""
        bans = {p: b for p, b in self.banned.items() if b.active(now)}
        mutes = {p: m for p, m in self.muted.items() if m.active(now)}
        return {
            "room": room,
            "configured": self.configured,
            "private": self.private,
            "has_key": bool(self.key_hash),
            "invite_only": self.invite_only,
            "invited": sorted(self.invited)[:INFO_LIST_MAX],
            "invited_count": len(self.invited),
            "banned": {
                p: {"until": b.until, "reason": b.reason}
                for p, b in sorted(bans.items())[:INFO_LIST_MAX]
            },
            "banned_count": len(bans),
            "muted": {p: {"until": m.until} for p, m in sorted(mutes.items())[:INFO_LIST_MAX]},
            "muted_count": len(mutes),
            "presence": self.presence,
            "retention_s": self.retention_s,
            "max_message_bytes": self.max_message_bytes,
            "max_bytes": self.max_bytes,
            "created_by": self.created_by,
            "updated_at": self.updated_at,
        }


def _positive(obj: dict[str, Any], name: str) -> int | None:
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RoomRecordError(f"field {name!r} must be a positive integer or null")
    return value


def _field(obj: dict[str, Any], name: str, kind: Any, default: Any) -> Any:
    value = obj.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and kind is not bool and bool not in _as_tuple(kind):
        raise RoomRecordError(f"field {name!r} has the wrong type")
    if not isinstance(value, kind):
        raise RoomRecordError(f"field {name!r} has the wrong type")
    return value


def _as_tuple(kind: Any) -> tuple[Any, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _until(entry: dict[str, Any]) -> float | None:
    value = entry.get("until")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RoomRecordError("'until' must be a number or null")
    return float(value)


def empty_info(room: str) -> dict[str, Any]:
    return {
        "room": room,
        "configured": False,
        "private": False,
        "has_key": False,
        "invite_only": False,
        "invited": [],
        "invited_count": 0,
        "banned": {},
        "banned_count": 0,
        "muted": {},
        "muted_count": 0,
        "presence": False,
        "retention_s": None,
        "max_message_bytes": None,
        "max_bytes": None,
        "created_by": "",
        "updated_at": 0.0,
    }


# -- admin command parameters --------------------------------------------------------------


def _invalid(detail: str) -> ArqonError:
    return ArqonError(INVALID_PARAMETERS, detail)


def principal_param(parameters: dict[str, Any]) -> str:
    value = parameters.get("principal")
    if not is_valid_name(value):
        raise _invalid(
            "parameter 'principal' must be a principal id of 1-64 characters of A-Z, a-z, 0-9, "
            "'_' or '-'"
        )
    assert isinstance(value, str)
    return value


def duration_param(parameters: dict[str, Any]) -> float | None:
    value = parameters.get("duration_s")
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 < value <= MAX_DURATION_S
    ):
        raise _invalid(
            f"parameter 'duration_s' must be a number of seconds between 0 and {MAX_DURATION_S} "
            "(omit it for a ban or mute without end)"
        )
    return float(value)


def reason_param(parameters: dict[str, Any]) -> str:
    value = parameters.get("reason")
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > MAX_REASON_CHARS:
        raise _invalid(
            f"parameter 'reason' must be a string of at most {MAX_REASON_CHARS} characters"
        )
    return value


UNSET: Any = object()  # a configure parameter that was not sent: left as it is


@dataclass(frozen=True, slots=True)
class RoomLimits:
    """The bounds of the room settings a gateway accepts (from its Settings)."""

    min_retention_s: int = 3600
    max_retention_s: int = 0  # the tenant stream's retention; 0: unlimited
    max_message_bytes: int = 65536  # the gateway's max envelope size
    min_room_bytes: int = 1024
    max_room_bytes: int = 0  # the tenant's stored-bytes quota; 0: unlimited


@dataclass(frozen=True, slots=True)
class ConfigureParams:
    private: bool | None
    invite_only: bool | None
    set_key: bool  # False: leave the key as it is
    key: str | None  # with set_key: the new key, or None to remove it
    presence: bool | None = None
    # Present in the command (UNSET: leave as it is); None removes the room's own value.
    retention_s: Any = UNSET  # int, None (removed) or UNSET
    max_message_bytes: Any = UNSET
    max_bytes: Any = UNSET

    def apply(self, settings: RoomSettings, new_hash: str) -> None:
        if self.private is not None:
            settings.private = self.private
        if self.invite_only is not None:
            settings.invite_only = self.invite_only
        if self.presence is not None:
            settings.presence = self.presence
        if self.set_key:
            settings.key_hash = new_hash
        if self.retention_s is not UNSET:
            settings.retention_s = self.retention_s
        if self.max_message_bytes is not UNSET:
            settings.max_message_bytes = self.max_message_bytes
        if self.max_bytes is not UNSET:
            settings.max_bytes = self.max_bytes


_CONFIGURE_PARAMETERS = (
    "private",
    "key",
    "invite_only",
    "presence",
    "retention_s",
    "max_message_bytes",
    "max_bytes",
)


def _bounded(parameters: dict[str, Any], name: str, low: int, high: int, unit: str) -> object:
    """An integer parameter in [low, high] (high 0: no upper bound); null: None; absent: UNSET."""
    if name not in parameters:
        return UNSET
    value = parameters[name]
    if value is None:
        return None
    upper = f"{high}" if high else "no upper bound"
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high and value > high)
    ):
        raise _invalid(
            f"parameter {name!r} must be an integer number of {unit} from {low} to {upper} "
            "(null removes the room's own value)"
        )
    return value


def configure_params(
    parameters: dict[str, Any], limits: RoomLimits = RoomLimits(), command: str = "configure_room"
) -> ConfigureParams:
    unknown = sorted(set(parameters) - set(_CONFIGURE_PARAMETERS))
    if unknown:
        raise _invalid(
            f"unknown parameter {unknown[0][:64]!r}: {command} takes "
            + ", ".join(_CONFIGURE_PARAMETERS)
        )
    if not parameters and command != commands.CREATE_ROOM:
        raise _invalid(f"{command} needs at least one of: " + ", ".join(_CONFIGURE_PARAMETERS))
    flags: dict[str, bool | None] = {}
    for name in ("private", "invite_only", "presence"):
        value = parameters.get(name)
        if value is not None and not isinstance(value, bool):
            raise _invalid(f"parameter {name!r} must be true or false")
        flags[name] = value
    key: str | None = None
    set_key = "key" in parameters
    if set_key:
        raw = parameters["key"]
        if raw is not None and (
            not isinstance(raw, str) or not ROOM_KEY_MIN_CHARS <= len(raw) <= ROOM_KEY_MAX_CHARS
        ):
            raise _invalid(
                f"parameter 'key' must be a string of {ROOM_KEY_MIN_CHARS}-{ROOM_KEY_MAX_CHARS} "
                "characters (null removes the key)"
            )
        key = raw
    retention = _bounded(
        parameters, "retention_s", limits.min_retention_s, limits.max_retention_s, "seconds"
    )
    max_message = _bounded(parameters, "max_message_bytes", 1, limits.max_message_bytes, "bytes")
    room_bytes = _bounded(
        parameters, "max_bytes", limits.min_room_bytes, limits.max_room_bytes, "bytes"
    )
    return ConfigureParams(
        flags["private"],
        flags["invite_only"],
        set_key,
        key,
        flags["presence"],
        retention,
        max_message,
        room_bytes,
    )


# -- the directory ---------------------------------------------------------------------------

RoomListener = Callable[[str, str, "RoomSettings | None"], None]

_DIRECTORIES: weakref.WeakKeyDictionary[SecurityState, RoomDirectory] = weakref.WeakKeyDictionary()


def room_key(tenant: str, room: str) -> str:
    return f"{tenant}.{room}"


class RoomDirectory:
    """Every room's settings, decoded, kept current by the ROOMS bucket's watch.

    One per :class:`SecurityState` (``RoomDirectory.of(security)``). ``on_update(handler)``
    is called with ``(tenant, room, settings_or_None)`` after the copy changed.
    """

    def __init__(self, bucket: WatchedBucket, open_kv: Callable[[], Awaitable[KVBucket]]) -> None:
        self._bucket = bucket
        self._open_kv = open_kv
        self._rooms: dict[tuple[str, str], RoomSettings] = {}
        self._listeners: list[RoomListener] = []
        # Writes of this gateway waiting to show in its copy: key -> record -> seen.
        self._seen: dict[str, dict[bytes, asyncio.Future[None]]] = {}
        self._secret = secrets.token_bytes(32)
        # When timed bans and mutes end is read from this clock (tests move it forward).
        self.clock: Callable[[], float] = time.time
        # (tenant, room, hmac of the candidate) -> (the key hash checked, whether it matched).
        self._verified: dict[tuple[str, str, bytes], tuple[str, bool]] = {}
        # Key checks that needed a hash, per (tenant, principal): 5 at once, then 1 a second.
        self._guesses = RateLimiter(1.0, 5)
        self._hashing = asyncio.Semaphore(_HASH_CONCURRENCY)
        self._write_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        for key, value in bucket.items():
            self._on_change(key, value)
        bucket.on_change(self._on_change)

    @classmethod
    def of(cls, security: SecurityState) -> RoomDirectory:
        directory = _DIRECTORIES.get(security)
        if directory is None:
            directory = cls(security.rooms, lambda: security.state.bucket(subjects.KV_ROOMS))
            _DIRECTORIES[security] = directory
        return directory

    def on_update(self, listener: RoomListener) -> None:
        self._listeners.append(listener)

    def get(self, tenant: str, room: str) -> RoomSettings | None:
        """The room's settings; None (most rooms): no restriction. One dict lookup."""
        return self._rooms.get((tenant, room))

    def items(self) -> list[tuple[tuple[str, str], RoomSettings]]:
        """Every room's settings on this gateway's copy: ((tenant, room), settings)."""
        return list(self._rooms.items())

    def configured_rooms(self, tenant: str) -> list[str]:
        """The tenant's configured rooms (a scan of this gateway's copy: for list_rooms)."""
        return [room for (t, room), s in self._rooms.items() if t == tenant and s.configured]

    def _on_change(self, key: str, value: bytes | None) -> None:
        waiting = self._seen.get(key)
        if waiting is not None and value is not None:
            arrived = waiting.get(value)
            if arrived is not None and not arrived.done():
                arrived.set_result(None)
        tenant, dot, room = key.partition(".")
        if not dot or not is_valid_name(tenant) or not is_valid_name(room):
            return
        settings: RoomSettings | None = None
        if value is None:
            self._rooms.pop((tenant, room), None)
        else:
            try:
                settings = RoomSettings.decode(value)
            except RoomRecordError as exc:
                log.error("room settings %s do not parse (%s): admins only until fixed", key, exc)
                settings = RoomSettings(broken=True)
            self._rooms[(tenant, room)] = settings
        for listener in self._listeners:
            try:
                listener(tenant, room, settings)
            except Exception:
                log.exception("room listener failed for %s", key)

    # -- checks ------------------------------------------------------------------------

    async def key_matches(
        self, tenant: str, room: str, settings: RoomSettings, key: str, principal: str = ""
    ) -> bool:
        stored = settings.key_hash
        if not stored:
            return False
        tag = hmac.new(self._secret, key.encode(), hashlib.sha256).digest()
        memo = (tenant, room, tag)
        known = self._verified.get(memo)
        if known is not None and known[0] == stored:
            # A key checked before against this hash costs nothing: right or wrong.
            return known[1]
        # Each scrypt costs ~50 ms of CPU: a principal may try a few keys, then one a second
        # (online guessing, and a flood of wrong keys stalling everyone's joins).
        wait_s = self._guesses.take(f"{tenant}/{principal}")
        if wait_s:
            raise ArqonError(
                MESSAGE_RATE_LIMITED,
                f"too many room_key attempts: retry after {int(wait_s * 1000) + 1} ms",
            )
        async with self._hashing:
            ok = await asyncio.to_thread(verify_room_key, key, stored)
        if len(self._verified) >= _VERIFIED_MAX:
            self._verified.clear()
        self._verified[memo] = (stored, ok)
        return ok

    async def check_enter(
        self,
        tenant: str,
        principal: str,
        room: str,
        *,
        is_admin: bool,
        member: bool,
        key: str | None,
        action: str,
    ) -> None:
        """Raise unless ``principal`` may ``action`` (join, history, ...) in ``room``.

        ``member``: the connection already entered the room (joined one of its channels).
        The rules are the connection core's (shared/core/rooms.py); this adds the key check.
        """
        settings = self._rooms.get((tenant, room))
        who = Standing(principal, is_admin, member)
        decision = enter_decision(settings, room, who, key, action, self.clock())
        if isinstance(decision, ArqonError):
            raise decision
        if isinstance(decision, NeedsKey):
            assert settings is not None
            if not await self.key_matches(tenant, room, settings, decision.key, principal):
                raise wrong_key(room)

    def publish_refusal(
        self, settings: RoomSettings, principal: str, room: str, *, is_admin: bool, member: bool
    ) -> tuple[ArqonError, dict[str, Any]] | None:
        """Why a publish is refused (error and extra payload fields), or None."""
        who = Standing(principal, is_admin, member)
        return publish_refusal(settings, room, who, self.clock())

    # -- writes (admin commands) -------------------------------------------------------

    async def hash_key(self, key: str) -> str:
        async with self._hashing:
            return await asyncio.to_thread(hash_room_key, key)

    async def _kv(self) -> KVBucket:
        kv = self._bucket.kv
        if kv is None:
            kv = await self._open_kv()
        return kv

    async def update(
        self,
        tenant: str,
        room: str,
        actor: str,
        change: Callable[[RoomSettings], None],
    ) -> RoomSettings:
        """Read, change, write back with compare-and-set; retried on a concurrent write."""
        key = room_key(tenant, room)
        lock = self._write_locks.get(key)
        if lock is None:
            lock = self._write_locks[key] = asyncio.Lock()
        async with lock:  # this gateway's writers take turns; others are caught by the CAS
            return await self._update(key, room, actor, change)

    async def _update(
        self, key: str, room: str, actor: str, change: Callable[[RoomSettings], None]
    ) -> RoomSettings:
        kv = await self._kv()
        for attempt in range(CAS_ATTEMPTS):
            if attempt:
                # Another gateway wrote meanwhile (or our read came from a replica that is
                # behind): back off a little, with jitter, and read again.
                await asyncio.sleep(random.uniform(0.005, 0.02) * attempt)
            revision: int | None
            entry = await kv.get(key)
            try:
                if entry is None:  # absent or deleted
                    revision = None
                    settings = RoomSettings(created_by=actor, configured=False)
                else:
                    revision = entry.revision
                    settings = RoomSettings.decode(entry.value or b"{}")
            except RoomRecordError as exc:
                # Its bans, invites and key are unknown: start again locked down (private
                # and invite-only, so admins only) rather than open; admins reopen it.
                log.error("room settings %s do not parse (%s): rewriting them locked", key, exc)
                settings = RoomSettings(created_by=actor, private=True, invite_only=True)
            now = time.time()
            change(settings)
            settings.prune(now)
            settings.check_bounds()
            settings.updated_at = now
            body = settings.encode()
            # Expected before the write: the watch may deliver it before the write returns.
            arrived = self._expect(key, body)
            try:
                if revision is None:
                    await kv.create(key, body)
                else:
                    await kv.update(key, body, revision)
            except (RevisionMismatch, KeyExists, KeyContended):
                # Another admin wrote meanwhile (or kept writing while the store's create
                # retried): read theirs and apply the change to it.
                self._unexpect(key, body)
                continue
            except BaseException:
                self._unexpect(key, body)
                raise
            await self._seen_here(key, body, arrived)
            return settings
        raise ArqonError(UNAVAILABLE, f"room {room!r} is being changed by others right now; retry")

    def _expect(self, key: str, body: bytes) -> asyncio.Future[None]:
        seen = self._seen.setdefault(key, {})
        return seen.setdefault(body, asyncio.get_running_loop().create_future())

    def _unexpect(self, key: str, body: bytes) -> None:
        seen = self._seen.get(key, {})
        seen.pop(body, None)
        if not seen:
            self._seen.pop(key, None)

    async def _seen_here(self, key: str, body: bytes, arrived: asyncio.Future[None]) -> None:
        """Wait (bounded) until this gateway's copy holds what was just written, so the
        admin's next frame on this gateway already obeys it (other gateways follow through
        their own watch, usually within milliseconds)."""
        try:
            async with asyncio.timeout(APPLY_WAIT_S):
                await asyncio.shield(arrived)
        except TimeoutError:
            log.warning("room settings %s written but not seen by this gateway's watch yet", key)
        finally:
            self._unexpect(key, body)

    async def read(self, tenant: str, room: str) -> RoomSettings | None:
        kv = await self._kv()
        entry = await kv.get(room_key(tenant, room))
        if entry is None:
            return None
        try:
            return RoomSettings.decode(entry.value or b"{}")
        except RoomRecordError:
            return RoomSettings(broken=True)


def kick_error(room: str, who: str, kick: Kick) -> ArqonError:
    """The error frame a kicked session gets: ``kicked``, or ``room_deleted`` for ``*``."""
    if who == EVERYONE:
        return ArqonError(ROOM_DELETED, f"room {room!r} was deleted by a room admin")
    reason = f": {kick.reason}" if kick.reason else ""
    return ArqonError(
        KICKED, f"a room admin removed you from room {room!r}{reason}", reason=kick.reason or None
    )


def until_of(duration_s: float | None) -> float | None:
    return None if duration_s is None else time.time() + duration_s


# -- admin commands --------------------------------------------------------------------------

ADMIN_COMMANDS = commands.ROOM_ADMIN_COMMANDS


def check_admin_parameters(
    name: str, parameters: dict[str, Any], limits: RoomLimits = RoomLimits()
) -> None:
    """Validate an admin command's parameters as :func:`run_admin_command` does (no I/O).

    Raises ``invalid_parameters``; for fuzzing and for clients' own checks.
    """
    if name == commands.ROOM_INFO:
        return
    if name in _CONFIGURE_COMMANDS:
        configure_params(parameters, limits, name)
        return
    if name == commands.KICK:
        commands.kick_params(parameters)
        return
    principal_param(parameters)
    if name in (commands.ROOM_BAN, commands.ROOM_MUTE):
        duration_param(parameters)
    if name == commands.ROOM_BAN:
        reason_param(parameters)


_CONFIGURE_COMMANDS = (commands.ROOM_CONFIGURE, commands.CONFIGURE_ROOM, commands.CREATE_ROOM)


@dataclass(frozen=True, slots=True)
class AdminOutcome:
    result: dict[str, Any]
    target: str  # the principal acted on ("" for room_configure / room_info)


async def _configure(
    directory: RoomDirectory,
    name: str,
    parameters: dict[str, Any],
    tenant: str,
    actor: str,
    room: str,
    limits: RoomLimits,
) -> AdminOutcome:
    """create_room, configure_room (room_configure): the room's settings, then its info."""
    params = configure_params(parameters, limits, name)
    new_hash = ""
    if params.set_key and params.key is not None:
        new_hash = await directory.hash_key(params.key)

    def configure(settings: RoomSettings) -> None:
        if name == commands.CREATE_ROOM and settings.configured:
            raise ArqonError(
                ROOM_EXISTS,
                f"room {room!r} is configured already: change it with configure_room",
                room=room,
            )
        if not settings.configured:  # never configured, or deleted: start afresh
            kicks = settings.kicks
            _reset(settings, actor)
            settings.kicks = kicks
        settings.configured = True
        params.apply(settings, new_hash)

    settings = await directory.update(tenant, room, actor, configure)
    return AdminOutcome(settings.info(room, time.time()), "")


def _reset(settings: RoomSettings, actor: str) -> RoomSettings:
    """Every setting back to its default, in place (the record of an unconfigured room)."""
    fresh = RoomSettings(created_by=actor)
    for name in RoomSettings.__slots__:
        setattr(settings, name, getattr(fresh, name))
    return settings


async def forget_room(directory: RoomDirectory, tenant: str, room: str, actor: str) -> None:
    """delete_room: every setting gone, and every session in the room leaves it (a kick of
    everyone, applied by every gateway: gateway/app.py)."""

    def forget(settings: RoomSettings) -> None:
        _reset(settings, actor)
        settings.configured = False
        settings.kicks = {EVERYONE: Kick(time.time(), "room_deleted")}

    await directory.update(tenant, room, actor, forget)


async def run_admin_command(
    directory: RoomDirectory,
    name: str,
    parameters: dict[str, Any],
    tenant: str,
    actor: str,
    room: str,
    limits: RoomLimits = RoomLimits(),
) -> AdminOutcome:
    """One admin command on ``tenant``'s ``room`` (the caller checked ``admin``)."""
    if name == commands.ROOM_INFO:
        settings = await directory.read(tenant, room)
        now = time.time()
        if settings is None or not settings.configured:
            return AdminOutcome(empty_info(room), "")
        return AdminOutcome(settings.info(room, now), "")
    if name in _CONFIGURE_COMMANDS:
        return await _configure(directory, name, parameters, tenant, actor, room, limits)
    if name == commands.KICK:
        kick = commands.kick_params(parameters)

        def record_kick(settings: RoomSettings) -> None:
            settings.kicks[kick.principal] = Kick(time.time(), kick.reason)

        await directory.update(tenant, room, actor, record_kick)
        kicked = {"room": room, "principal": kick.principal, "kicked": True}
        return AdminOutcome(kicked, kick.principal)
    target = principal_param(parameters)
    change: Callable[[RoomSettings], None]
    if name == commands.ROOM_INVITE:

        def change(settings: RoomSettings) -> None:
            settings.invited.add(target)

    elif name == commands.ROOM_UNINVITE:

        def change(settings: RoomSettings) -> None:
            settings.invited.discard(target)

    elif name == commands.ROOM_BAN:
        ban = Ban(until_of(duration_param(parameters)), reason_param(parameters))

        def change(settings: RoomSettings) -> None:
            settings.banned[target] = ban

    elif name == commands.ROOM_UNBAN:

        def change(settings: RoomSettings) -> None:
            settings.banned.pop(target, None)

    elif name == commands.ROOM_MUTE:
        mute = Mute(until_of(duration_param(parameters)))

        def change(settings: RoomSettings) -> None:
            settings.muted[target] = mute

    elif name == commands.ROOM_UNMUTE:

        def change(settings: RoomSettings) -> None:
            settings.muted.pop(target, None)

    else:  # pragma: no cover - the caller dispatches only ADMIN_COMMANDS
        raise ValueError(name)
    settings = await directory.update(tenant, room, actor, _configuring(change))
    now = time.time()
    result: dict[str, Any] = {"room": room, "principal": target}
    if name in (commands.ROOM_INVITE, commands.ROOM_UNINVITE):
        result["invited"] = target in settings.invited
    elif name in (commands.ROOM_BAN, commands.ROOM_UNBAN):
        active_ban = settings.ban_of(target, now)
        result["banned"] = active_ban is not None
        result["until"] = None if active_ban is None else active_ban.until
    else:
        active_mute = settings.mute_of(target, now)
        result["muted"] = active_mute is not None
        result["until"] = None if active_mute is None else active_mute.until
    return AdminOutcome(result, target)


def _configuring(change: Callable[[RoomSettings], None]) -> Callable[[RoomSettings], None]:
    """An invite, ban or mute configures the room: an unconfigured record starts afresh."""

    def apply(settings: RoomSettings) -> None:
        if not settings.configured:
            kicks = settings.kicks
            _reset(settings, settings.created_by)
            settings.kicks = kicks
            settings.configured = True
        change(settings)

    return apply
