"""Per-tenant limit overrides, stored in NATS KV (``<prefix>_tenants``, key = tenant name).

A record is a JSON object with any of the :data:`FIELDS`; a field that is absent takes the
gateway's setting (``max_connections`` <- ``max_connections_per_tenant``,
``max_stored_bytes`` <- ``tenant_max_bytes``, the rates <- the settings of the same name).
0 means what it means for the setting: that limit off (for a burst: two seconds' worth of
the rate). Every gateway watches the bucket (gateway/state/security.py), so a plan changed with
``arqonbus tenants set`` applies without a restart:

* the tenant connection cap: at the next handshake;
* the rates: new connections, and live ones too (their buckets are retuned on the change);
* the stored-bytes quota: every gateway updates the tenant's stream on the change (the
  update is idempotent: it is sent only when the stream's max_bytes differs).

:class:`TenantLimits` is the pure, validated model; :class:`TenantLimitsTable` answers the
effective values of a tenant from the watched copy.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import orjson

from arqonbus_server.shared.errors import InvalidInput

if TYPE_CHECKING:
    from arqonbus_server.shared.settings import Settings

log = logging.getLogger("arqonbus.gateway.tenant_limits")

# Field -> (kind, the gateway setting it overrides). Integers: counts, bytes and bursts.
FIELDS: dict[str, tuple[type, str]] = {
    "max_connections": (int, "max_connections_per_tenant"),
    "max_stored_bytes": (int, "tenant_max_bytes"),
    "msg_rate_per_conn": (float, "msg_rate_per_conn"),
    "msg_burst_per_conn": (int, "msg_burst_per_conn"),
    "bytes_rate_per_conn": (float, "bytes_rate_per_conn"),
    "bytes_burst_per_conn": (int, "bytes_burst_per_conn"),
    "msg_rate_per_principal": (float, "msg_rate_per_principal"),
    "msg_burst_per_principal": (int, "msg_burst_per_principal"),
    "bytes_rate_per_principal": (float, "bytes_rate_per_principal"),
    "bytes_burst_per_principal": (int, "bytes_burst_per_principal"),
}
MAX_INT = 2**53  # exact in JSON everywhere
MAX_RATE = 1e12


def _number(value: float) -> float | int:
    return int(value) if value == int(value) else value


@dataclass(frozen=True, slots=True)
class RateSpec:
    """Rates of one scope; 0 = that limit off. A burst of 0 means two seconds' worth."""

    msgs_per_s: float = 0.0
    msgs_burst: float = 0.0
    bytes_per_s: float = 0.0
    bytes_burst: float = 0.0

    def __post_init__(self) -> None:
        for name in ("msgs_per_s", "msgs_burst", "bytes_per_s", "bytes_burst"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = off)")

    @property
    def enabled(self) -> bool:
        return self.msgs_per_s > 0 or self.bytes_per_s > 0

    @property
    def msg_burst(self) -> float:
        return max(1.0, self.msgs_burst or 2 * self.msgs_per_s)

    @property
    def byte_burst(self) -> float:
        return max(1.0, self.bytes_burst or 2 * self.bytes_per_s)

    def describe(self) -> dict[str, float | int]:
        """The configured rates, as the ``limits`` command and the welcome show them."""
        return {
            "msgs_per_s": _number(self.msgs_per_s),
            "msgs_burst": _number(self.msg_burst) if self.msgs_per_s else 0,
            "bytes_per_s": _number(self.bytes_per_s),
            "bytes_burst": _number(self.byte_burst) if self.bytes_per_s else 0,
        }


class TenantLimitsError(InvalidInput):
    """A record or an update that is not a valid set of tenant limits (says what to fix)."""


def check_value(name: str, value: object) -> int | float:
    """One field's value, checked: a number >= 0 (an integer for counts, bytes, bursts)."""
    if name not in FIELDS:
        raise TenantLimitsError(
            f"unknown tenant limit {name!r}: expected one of {', '.join(FIELDS)}"
        )
    kind = FIELDS[name][0]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TenantLimitsError(f"{name} must be a number >= 0 (0 = off), not {value!r}")
    if kind is int:
        if isinstance(value, float):
            if not value.is_integer():
                raise TenantLimitsError(f"{name} must be a whole number, not {value!r}")
            value = int(value)
        if not 0 <= value <= MAX_INT:
            raise TenantLimitsError(f"{name} must be between 0 (off) and {MAX_INT}, not {value}")
        return value
    if not math.isfinite(value) or not 0 <= value <= MAX_RATE:
        raise TenantLimitsError(f"{name} must be between 0 (off) and {MAX_RATE:g}, not {value}")
    return int(value) if float(value).is_integer() else float(value)


@dataclass(frozen=True, slots=True)
class TenantLimits:
    """A tenant's stored overrides; None = the gateway's setting applies."""

    max_connections: int | None = None
    max_stored_bytes: int | None = None
    msg_rate_per_conn: float | None = None
    msg_burst_per_conn: int | None = None
    bytes_rate_per_conn: float | None = None
    bytes_burst_per_conn: int | None = None
    msg_rate_per_principal: float | None = None
    msg_burst_per_principal: int | None = None
    bytes_rate_per_principal: float | None = None
    bytes_burst_per_principal: int | None = None

    def __post_init__(self) -> None:
        for name, value in self.as_dict().items():
            object.__setattr__(self, name, check_value(name, value))

    @classmethod
    def parse(cls, doc: object) -> TenantLimits:
        """From a decoded JSON object; TenantLimitsError names what is wrong."""
        if not isinstance(doc, Mapping):
            raise TenantLimitsError(
                "tenant limits must be a JSON object, e.g. "
                '{"max_connections": 100, "msg_rate_per_conn": 50}'
            )
        values: dict[str, int | float] = {}
        for name, value in doc.items():
            values[str(name)] = check_value(str(name), value)
        return cls(**values)  # type: ignore[arg-type]

    @classmethod
    def from_json(cls, raw: bytes) -> TenantLimits:
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise TenantLimitsError(f"tenant limits are not valid JSON: {exc}") from None
        return cls.parse(doc)

    def as_dict(self) -> dict[str, int | float]:
        """The fields that are set (the stored record)."""
        result: dict[str, int | float] = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None:
                result[field.name] = value
        return result

    def to_json(self) -> bytes:
        return orjson.dumps(self.as_dict())

    def merged(self, updates: TenantLimits) -> TenantLimits:
        """This record with the fields that ``updates`` sets replaced."""
        return TenantLimits.parse({**self.as_dict(), **updates.as_dict()})

    def effective(self, settings: Settings) -> dict[str, int | float]:
        """Every field: the override, else the gateway's setting."""
        stored = self.as_dict()
        return {
            name: stored[name] if name in stored else getattr(settings, setting)
            for name, (_, setting) in FIELDS.items()
        }

    def rate_specs(self, settings: Settings) -> tuple[RateSpec, RateSpec]:
        """The per-connection and per-principal rates this tenant gets."""
        values = self.effective(settings)
        return tuple(  # type: ignore[return-value]
            RateSpec(
                float(values[f"msg_rate_per_{scope}"]),
                float(values[f"msg_burst_per_{scope}"]),
                float(values[f"bytes_rate_per_{scope}"]),
                float(values[f"bytes_burst_per_{scope}"]),
            )
            for scope in ("conn", "principal")
        )


NO_OVERRIDES = TenantLimits()


class TenantLimitsTable:
    """The effective limits of each tenant: the watched record over the gateway settings.

    ``get(tenant)`` reads the raw record (the watched bucket's ``get``). Parsed records are
    cached by their bytes. A record that does not validate (written by hand, or by another
    version) is logged once and ignored: the tenant gets the gateway's settings.
    """

    def __init__(self, settings: Settings, get: Callable[[str], bytes | None]) -> None:
        self.settings = settings
        self._get = get
        self._cache: dict[str, tuple[bytes, TenantLimits]] = {}

    def overrides(self, tenant: str) -> TenantLimits:
        raw = self._get(tenant)
        if not raw:
            self._cache.pop(tenant, None)
            return NO_OVERRIDES
        cached = self._cache.get(tenant)
        if cached is not None and cached[0] == raw:
            return cached[1]
        try:
            limits = TenantLimits.from_json(raw)
        except TenantLimitsError as exc:
            log.warning("ignoring the stored limits of tenant %s: %s", tenant, exc)
            limits = NO_OVERRIDES
        self._cache[tenant] = (raw, limits)
        return limits

    def rate_specs(self, tenant: str) -> tuple[RateSpec, RateSpec]:
        return self.overrides(tenant).rate_specs(self.settings)

    def max_connections(self, tenant: str) -> int:
        """The tenant's connection cap over all gateways; 0 = off."""
        value = self.overrides(tenant).max_connections
        return self.settings.max_connections_per_tenant if value is None else value

    def max_stored_bytes(self, tenant: str) -> int:
        """The tenant stream's max_bytes; 0 = unlimited."""
        value = self.overrides(tenant).max_stored_bytes
        return self.settings.tenant_max_bytes if value is None else value

    def effective(self, tenant: str) -> dict[str, int | float]:
        return self.overrides(tenant).effective(self.settings)
