"""Per-tenant limit overrides: the pure, validated model (stored in NATS KV, ``<prefix>_tenants``).

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

:class:`TenantLimits` is the model; gateway/state/tenant_limits.py's
:class:`TenantLimitsTable` answers the effective values of a tenant from the watched copy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import orjson

from arqonbus_server.shared.core.rates import RateSpec
from arqonbus_server.shared.errors import InvalidInput

if TYPE_CHECKING:
    from arqonbus_server.shared.settings import Settings


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
