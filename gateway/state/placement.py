"""The tenants' placements (shared/regions.py), read from a watched copy of their KV bucket.

Only a gateway with a region (``ARQONBUS_REGION``) watches a bucket: its own region's copy
(``<prefix>_placement-<region>``, placed in the region), so the loss of another region loses
none of its records. The ops tools (``arqonbus mesh provision``, ``failover``, ``failback``)
write every region's copy. A tenant without a record
behaves as in one region. Records are parsed once per value; one that does not parse is
logged once and ignored (the tenant is taken as not placed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from arqonbus_server.shared.regions import Placement, PlacementRecordError, placement_kind

log = logging.getLogger("arqonbus.gateway.placement")

__all__ = ["PlacementTable", "placement_kind"]  # placement_kind(region): its copy's bucket


class PlacementTable:
    """Each tenant's placement, from the watched bucket's ``get`` (raw bytes or None)."""

    def __init__(self, get: Callable[[str], bytes | None]) -> None:
        self._get = get
        self._cache: dict[str, tuple[bytes, Placement | None]] = {}

    def get(self, tenant: str) -> Placement | None:
        raw = self._get(tenant)
        if not raw:
            self._cache.pop(tenant, None)
            return None
        cached = self._cache.get(tenant)
        if cached is not None and cached[0] == raw:
            return cached[1]
        try:
            placement: Placement | None = Placement.from_json(raw)
        except PlacementRecordError as exc:
            log.warning("ignoring the placement record of tenant %s: %s", tenant, exc)
            placement = None
        self._cache[tenant] = (raw, placement)
        return placement

    def epoch(self, tenant: str) -> int | None:
        """The tenant's current epoch; None when it is not placed."""
        placement = self.get(tenant)
        return None if placement is None else placement.epoch
