"""Security events to a per-tenant audit stream in JetStream.

Sessions, the handshake, the CLIs and the admin commands call :meth:`AuditLog.record`;
it never blocks and never raises: events go into a bounded queue and one background
task appends them to an :class:`mesh.ports.AuditSink` (JetStream: mesh/audit.py), each
append acknowledged, retried with bounded backoff.

Layout, with the subject prefix ``P`` (default ``arq``)::

    stream   P-audit_<tenant>           one per tenant, created on the tenant's first event
    subject  P.audit.<tenant>.<type>    e.g. arq.audit.acme.forbidden

The names come from shared/subjects.py. Tenant event streams are named ``P_<tenant>``:
the ``-`` after the prefix keeps audit streams out of that namespace whatever a tenant is
called (a tenant ``audit_x`` cannot collide with the audit stream of tenant ``x``). Audit
streams use file storage, the tenant streams' replica count, a maximum age
(``ARQONBUS_AUDIT_MAX_AGE_S``, 90 days) and a maximum size (``ARQONBUS_AUDIT_MAX_BYTES``,
1 GiB) beyond which the oldest events go (mesh/audit.py).

Each event is a JSON object: ``id``, ``ts`` (UTC ISO 8601, ms), ``type``, ``tenant``,
``principal``, ``node`` and ``details``.

No secret is ever recorded. Callers pass identifiers (principal, key id, agent id),
never tokens, keys or signatures; on top of that :func:`redact` (applied by ``record``)

* drops every detail whose key contains ``token``, ``secret``, ``password``/``passwd``,
  ``key_hash``, ``signature``, ``private``, ``authorization`` or ``cookie``
  (case-insensitive, at any depth),
* replaces text that looks like a credential inside values (a JWT, an ``arqk_`` API key,
  an ``ed25519:`` agent proof, ``Bearer ...``) with a ``[redacted]`` marker,
* truncates strings to 200 characters, and bounds nesting, list length and key count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Callable, Hashable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson

from arqonbus_server.mesh.ports import BrokerUnavailable
from arqonbus_server.shared.core.state import AuditThrottle as ThrottleRule
from arqonbus_server.shared.jsonbytes import dumps_kept
from arqonbus_server.shared.subjects import SubjectScheme, is_valid_name

if TYPE_CHECKING:
    from arqonbus_server.mesh.ports import AuditSink
    from arqonbus_server.shared.settings import Settings

log = logging.getLogger("arqonbus.gateway.audit")

# Event types (``--type`` of ``arqonbus audit``).
AUTH_FAILED = "auth_failed"
FORBIDDEN = "forbidden"
KEY_CREATED = "key_created"
KEY_REVOKED = "key_revoked"
AGENT_REGISTERED = "agent_registered"
AGENT_REVOKED = "agent_revoked"
ADMIN_ACTION = "admin_action"
POLICY_BLOCKED = "policy_blocked"
RATE_LIMITED = "rate_limited"
EVENT_TYPES = (
    AUTH_FAILED,
    FORBIDDEN,
    KEY_CREATED,
    KEY_REVOKED,
    AGENT_REGISTERED,
    AGENT_REVOKED,
    ADMIN_ACTION,
    POLICY_BLOCKED,
    RATE_LIMITED,
)

DEFAULT_QUEUE_MAX = 10_000

# -- redaction ----------------------------------------------------------------------

SECRET_KEY_PARTS = (
    "token",
    "secret",
    "password",
    "passwd",
    "key_hash",
    "signature",
    "private",
    "authorization",
    "cookie",
)
MAX_STRING = 200
MAX_DETAILS = 32
MAX_DEPTH = 3
MAX_ITEMS = 20
_TRUNCATED = "...[truncated]"
_CREDENTIAL_PATTERNS = (
    # A JWT: base64url JSON header ({"... is eyJ), payload, signature.
    (re.compile(r"eyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*"), "[jwt redacted]"),
    (re.compile(r"arqk_[A-Za-z0-9_.-]+"), "arqk_[redacted]"),
    (re.compile(r"ed25519:\S+"), "ed25519:[redacted]"),
    (re.compile(r"(?i)\bbearer\s+\S+"), "Bearer [redacted]"),
)


def is_secret_key(name: str) -> bool:
    """True if a detail named ``name`` may hold a secret (it is then never recorded)."""
    lowered = name.lower()
    return any(part in lowered for part in SECRET_KEY_PARTS)


def scrub_text(text: str) -> str:
    """``text`` with credential-looking parts replaced, cut to MAX_STRING characters."""
    # Cut first (bounded work), with room for a credential that straddles the cut.
    text = text[: 4 * MAX_STRING]
    for pattern, marker in _CREDENTIAL_PATTERNS:
        text = pattern.sub(marker, text)
    if len(text) > MAX_STRING:
        text = text[: MAX_STRING - len(_TRUNCATED)] + _TRUNCATED
    return text


def _clean(value: Any, depth: int) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, Mapping):
        if depth >= MAX_DEPTH:
            return "[nested too deep]"
        return redact(value, depth + 1)
    if isinstance(value, list | tuple | set | frozenset):
        if depth >= MAX_DEPTH:
            return "[nested too deep]"
        return [_clean(item, depth + 1) for item in list(value)[:MAX_ITEMS]]
    return scrub_text(str(value))  # enums, datetimes, exceptions...


def redact(details: Mapping[Any, Any], depth: int = 0) -> dict[str, Any]:
    """A JSON-safe copy of ``details`` without secrets (see the module docstring)."""
    clean: dict[str, Any] = {}
    for key, value in details.items():
        name = scrub_text(str(key))
        if is_secret_key(name):
            continue
        if len(clean) >= MAX_DETAILS:
            clean["_more"] = "[further details dropped]"
            break
        clean[name] = _clean(value, depth)
    return clean


def utc_now_iso(now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def make_event(
    tenant: str,
    type_: str,
    principal: str,
    node: str,
    details: Mapping[str, Any],
    now: datetime | None = None,
) -> dict[str, Any]:
    """The stored JSON object of one audit event (details redacted)."""
    return {
        "id": uuid.uuid4().hex,
        "ts": utc_now_iso(now),
        "type": type_,
        "tenant": tenant,
        "principal": scrub_text(principal),
        "node": node,
        "details": redact(details),
    }


# -- names (shared/subjects.py formats them) ---------------------------------------------


def stream_name(prefix: str, tenant: str) -> str:
    """The audit stream of ``tenant`` (``P-audit_<tenant>``; tenant streams are ``P_<tenant>``)."""
    return SubjectScheme(prefix).audit_stream(tenant)


def subject(prefix: str, tenant: str, type_: str) -> str:
    return SubjectScheme(prefix).audit(tenant, type_)


def tenant_filter(prefix: str, tenant: str) -> str:
    return SubjectScheme(prefix).audit_filter(tenant)


# -- --since ------------------------------------------------------------------------

_DURATION = re.compile(r"(\d{1,9})\s*([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``30m``, ``1h``, ``2d`` (before now) or an ISO 8601 time (UTC unless it says)."""
    value = text.strip()
    match = _DURATION.fullmatch(value.lower())
    if match:
        seconds = int(match.group(1)) * _UNIT_S[match.group(2)]
        return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"--since {text[:64]!r} is neither a duration (30s, 30m, 1h, 2d, 1w) nor an ISO 8601 "
            "time (2025-01-31T12:00:00Z)"
        ) from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


# -- per-session throttle -------------------------------------------------------------


class AuditThrottle:
    """Bounds what one source can put in the audit stream by repeating a refused action.

    The rule is the connection core's (``shared/core/state.py``: at most one record per key
    per ``window_s``, ``per_window`` records per window in all, the rest counted in
    ``overflow``), read on ``clock``: for checks outside a session, such as refused
    handshakes. ``check(key)`` answers the ``repeats`` to record, or None to skip this one.
    """

    def __init__(
        self,
        window_s: float = 10.0,
        per_window: int = 20,
        max_keys: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rule = ThrottleRule(window_s, per_window, max_keys)
        self._clock = clock

    @property
    def overflow(self) -> int:
        return self._rule.overflow

    def check(self, key: Hashable) -> int | None:
        return self._rule.check(key, self._clock())

    def take_overflow(self) -> int:
        return self._rule.take_overflow()


# -- the writer ----------------------------------------------------------------------

# While NATS answers but refuses an event, it is retried this many times, then dropped;
# while NATS is unreachable, events wait in the queue (bounded) however long it takes.
MAX_ATTEMPTS = 8
_BACKOFF_MAX_S = 5.0
_WARN_EVERY_S = 10.0
_Item = tuple[str, str, str, bytes]  # tenant, event type, event id, body


class AuditLog:
    """Writes audit events of every tenant to that tenant's audit stream (``sink``)."""

    def __init__(
        self, sink: AuditSink | None, node_id: str = "", *, queue_max: int = DEFAULT_QUEUE_MAX
    ) -> None:
        self._sink = sink
        self._node_id = node_id
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=queue_max)
        self._task: asyncio.Task[None] | None = None
        self._last_warning = float("-inf")
        self._unwarned_drops = 0
        # Counters (for metrics): events stored, and events lost (queue full, refused,
        # not flushed at close, or invalid tenant/type).
        self.written = 0
        self.dropped = 0

    @classmethod
    def from_settings(
        cls, sink: AuditSink | None, settings: Settings, node_id: str = ""
    ) -> AuditLog:
        """An audit log with the queue bound of ``settings`` (the sink has the stream limits)."""
        return cls(sink, node_id, queue_max=settings.audit_queue_max)

    def stats(self) -> dict[str, int]:
        return {"written": self.written, "dropped": self.dropped, "queued": self._queue.qsize()}

    # -- recording ------------------------------------------------------------------

    def record(self, tenant: str, type_: str, principal: str = "", **details: Any) -> None:
        """Queue one event; never blocks, never raises. Secret-looking details are dropped."""
        try:
            self._record(tenant, type_, principal, details)
        except Exception:
            self.dropped += 1
            log.exception("audit event %r could not be queued", type_)

    def _record(self, tenant: str, type_: str, principal: str, details: dict[str, Any]) -> None:
        if not is_valid_name(tenant) or not is_valid_name(type_):
            self._drop(f"invalid tenant or event type {tenant!r:.70}/{type_!r:.70}")
            return
        event = make_event(tenant, type_, principal, self._node_id, details)
        if self._sink is None:  # no NATS (unit tests): the log is all there is
            log.info("audit %s", orjson.dumps(event).decode())
            return
        item = (tenant, type_, event["id"], dumps_kept(event))  # may wait in the queue
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self._drop(f"the audit queue is full ({self._queue.maxsize} events)")

    def _drop(self, why: str) -> None:
        self.dropped += 1
        self._unwarned_drops += 1
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY_S:
            log.warning(
                "audit: %d event(s) dropped since the last warning (%s); %d dropped in all",
                self._unwarned_drops,
                why,
                self.dropped,
            )
            self._last_warning, self._unwarned_drops = now, 0

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Start writing (call once NATS is connected or connecting); idempotent."""
        if self._sink is not None and self._task is None:
            self._task = asyncio.create_task(self._run(), name="audit-writer")

    async def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued event is written or dropped; False after ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                await self._queue.join()
        except TimeoutError:
            return False
        return True

    async def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, for at most ``timeout`` seconds; the rest counts as dropped."""
        task, self._task = self._task, None
        if task is None:
            return
        if not task.done():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._queue.join()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        lost = self._queue.qsize()
        while not self._queue.empty():
            self._queue.get_nowait()
            self._queue.task_done()
        if lost:
            self.dropped += lost
        if self.dropped:
            log.warning(
                "audit: %d event(s) dropped in all (none is retried after close)", self.dropped
            )

    async def _run(self) -> None:
        while True:
            item = await self._queue.get()
            try:
                if await self._write(item):
                    self.written += 1
                else:
                    self._drop("JetStream refused them")
            except asyncio.CancelledError:
                self.dropped += 1  # closed while this one was being written
                raise
            except Exception:
                self.dropped += 1
                log.exception("audit: writing an event failed")
            finally:
                self._queue.task_done()

    async def _write(self, item: _Item) -> bool:
        """Append one event; True once stored, False after MAX_ATTEMPTS refusals."""
        assert self._sink is not None
        tenant, type_, event_id, body = item
        delay, attempt = 0.1, 0
        while True:
            try:
                # The event id dedupes: a retry after a lost ack is stored once.
                await self._sink.append(tenant, type_, event_id, body)
                return True
            except (BrokerUnavailable, TimeoutError, OSError) as exc:
                if self._sink.connected:
                    attempt += 1
                if attempt >= MAX_ATTEMPTS:
                    log.warning("audit: event for %s dropped: %s", tenant, exc)
                    return False
                log.debug("audit: write for %s failed (%s); retrying", tenant, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX_S)


# -- reading ------------------------------------------------------------------------


async def read_events(
    sink: AuditSink,
    tenant: str,
    since: datetime | None = None,
    types: Iterable[str] = (),
    limit: int = 1000,
) -> tuple[list[dict[str, Any]], bool]:
    """Events of ``tenant`` from ``since`` (all kept when None), oldest first.

    Returns (events, more): ``more`` is True when ``limit`` cut the result. An unknown
    tenant (no audit stream) has no events. Only this tenant's stream is read.
    """
    return await sink.read(tenant, since, types, limit)


# -- helpers for the session hooks ----------------------------------------------------

# The content-policy refusals recorded as ``policy_blocked`` (shared/inspect.py).
POLICY_CODES = frozenset({"policy_violation", "invalid_payload"})
_RULE_NAME = re.compile(r"""rule (?:'([^']*)'|"([^"]*)")""")


def rule_name(detail: str) -> str:
    """The content-policy rule a refusal's message names (shared/inspect.py quotes it), or ""."""
    match = _RULE_NAME.search(detail)
    return (match.group(1) or match.group(2) or "") if match else ""


async def record_once(sink: AuditSink, tenant: str, type_: str, **details: Any) -> None:
    """One event from a one-shot command (``arqonbus keys``, ...), written before it returns."""
    audit = AuditLog(sink, "cli")
    audit.start()
    audit.record(tenant, type_, principal="cli", **details)
    await audit.close()
