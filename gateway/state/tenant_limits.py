"""The effective limits of each tenant: the watched overrides (shared/tenant_limits.py's
model, in NATS KV) over the gateway settings."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from arqonbus_server.shared.tenant_limits import NO_OVERRIDES, TenantLimits, TenantLimitsError

if TYPE_CHECKING:
    from arqonbus_server.shared.core.rates import RateSpec
    from arqonbus_server.shared.settings import Settings

log = logging.getLogger("arqonbus.gateway.tenant_limits")


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
