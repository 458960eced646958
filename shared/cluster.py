"""The cluster view's data: a gateway's heartbeat, its encoding, and message rates.

Every gateway announces a :class:`Heartbeat` every ``heartbeat_interval_s``
(gateway/state/heartbeat.py, through the ``ClusterView`` port of mesh/ports.py);
``arqonbus status`` decodes them. Pure: the clock and the counters are passed in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import orjson

from arqonbus_server.shared.errors import InvalidInput

HEARTBEAT_TTL_INTERVALS = 3  # a gateway not heard for this many intervals leaves the view


class BadHeartbeat(InvalidInput):
    """A heartbeat that is not a JSON object with the fields of :class:`Heartbeat`."""


@dataclass(frozen=True, slots=True)
class NatsServerRef:
    """The NATS server a gateway is connected to, as it introduced itself."""

    name: str
    url: str


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """What one gateway says about itself every interval."""

    node: str
    region: str
    version: str
    uptime_s: float
    connections: int
    msgs_in_per_s: float
    msgs_out_per_s: float
    nats: NatsServerRef
    interval_s: float

    @property
    def ttl_s(self) -> float:
        """How long the view keeps this heartbeat when no newer one arrives."""
        return HEARTBEAT_TTL_INTERVALS * self.interval_s


def encode_heartbeat(heartbeat: Heartbeat) -> bytes:
    return orjson.dumps(asdict(heartbeat))


def decode_heartbeat(data: bytes) -> Heartbeat:
    """The heartbeat in ``data``; BadHeartbeat names what is wrong. Unknown fields are
    ignored, so newer gateways can add some."""
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadHeartbeat(f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise BadHeartbeat("not a JSON object")
    nats = raw.get("nats")
    if not isinstance(nats, dict):
        raise BadHeartbeat("field 'nats' must be an object")
    return Heartbeat(
        node=_field(raw, "node", str),
        region=_field(raw, "region", str),
        version=_field(raw, "version", str),
        uptime_s=float(_field(raw, "uptime_s", (int, float))),
        connections=_field(raw, "connections", int),
        msgs_in_per_s=float(_field(raw, "msgs_in_per_s", (int, float))),
        msgs_out_per_s=float(_field(raw, "msgs_out_per_s", (int, float))),
        nats=NatsServerRef(_field(nats, "name", str), _field(nats, "url", str)),
        interval_s=float(_field(raw, "interval_s", (int, float))),
    )


def _field(raw: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = raw.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadHeartbeat(f"field {name!r} is missing or of the wrong type")
    return value


@dataclass(slots=True)
class RateMeter:
    """Messages per second between two readings of an ever-growing counter."""

    last_count: int = 0
    last_at: float | None = None

    def rate(self, count: int, now: float) -> float:
        """The rate since the previous reading (0.0 at the first one)."""
        previous, since = self.last_count, self.last_at
        self.last_count, self.last_at = count, now
        if since is None or now <= since:
            return 0.0
        return max(0, count - previous) / (now - since)
