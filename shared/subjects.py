"""Names -> NATS subjects and back. The only place a subject string is formatted.

Layout, with the configurable prefix ``P`` (default ``arq``)::

    P.ev.<tenant>.<room>.<channel>     ingest: what the stream stores
    P.live.<tenant>.<room>.<channel>   delivery: the stream republishes here, with seq headers
    P.cmd.<tenant>.<room>.<channel>.<command>
                                       service commands: NATS request/reply, one queue group

    P.audit.<tenant>.<type>            security events (gateway/state/audit.py)
    P.sys.gateway.<node>               gateway heartbeats (gateway/state/heartbeat.py); the
                                       stream ``P-sys_gateways`` keeps each node's last one

One JetStream stream per tenant captures ``P.ev.<tenant>.>``; its audit stream
``P-audit_<tenant>`` captures ``P.audit.<tenant>.>`` (the ``-`` keeps audit streams out of
the ``P_<tenant>`` namespace whatever a tenant is called). KV buckets are ``P_<kind>``
(the kinds below). Every token is a validated name, so no subject ever contains a
wildcard, whitespace or an extra token, and no input can produce a subject of another
tenant.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from arqonbus_server.shared.errors import INVALID_NAME, ArqonError
from arqonbus_server.shared.records import record

NAME_MAX = 64

# KV bucket kinds (the bucket is ``<prefix>_<kind>``, see :func:`kv_bucket_name`).
KV_KEYS = "keys"  # API keys: ``<tenant>.<key id>`` -> record with the secret's hash
KV_AGENTS = "agents"  # Ed25519 agents: ``<agent id>`` -> record with tenant and public key
KV_NONCES = "nonces"  # agent sign-in nonces: ``<nonce>`` -> issued/used (they expire)
KV_ROOMS = "rooms"  # private rooms: ``<tenant>.<room>`` -> key hash, invites, bans, mutes
KV_POLICIES = "policies"  # content policies: ``<tenant>`` -> policy JSON
KV_TENANTS = "tenants"  # per-tenant limit overrides: ``<tenant>`` -> JSON
KV_CONNS = "conns"  # connection counts: ``<node key>`` -> {"tenant": count, ...}
KV_KINDS = (KV_KEYS, KV_AGENTS, KV_NONCES, KV_ROOMS, KV_POLICIES, KV_TENANTS, KV_CONNS)
# Presence (mesh/presence.py), not state buckets, so not in KV_KINDS:
KV_PRESENCE = "presence"  # ``<tenant>.<room>.<channel>.<principal>.<gateway>.<session>`` -> entry
KV_PRESENCE_LEASES = "presence-leases"  # ``<gateway node token>`` -> its last renewal
_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def is_valid_name(value: object) -> bool:
    return isinstance(value, str) and _NAME_RE.fullmatch(value) is not None


def validate_name(value: object, field: str) -> str:
    """Return ``value`` if it is a valid tenant/room/channel name, else raise invalid_name."""
    if is_valid_name(value):
        assert isinstance(value, str)
        return value
    shown = repr(value)[:80]
    raise ArqonError(INVALID_NAME, f"{field} {shown} is not a valid name")


def node_token(node_id: str) -> str:
    """A node id as one subject token: ``[A-Za-z0-9_-]``, anything else ``_``, at most 64."""
    token = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "_" for c in node_id)
    return token[:NAME_MAX] or "_"


def kv_bucket_name(prefix: str, kind: str) -> str:
    """The KV bucket of ``kind`` under subject prefix ``prefix`` (``<prefix>_<kind>``)."""
    return f"{validate_name(prefix, 'subject prefix')}_{validate_name(kind, 'bucket kind')}"


@record
class ChannelRef:
    """A validated (tenant, room, channel) triple."""

    tenant: str
    room: str
    channel: str

    @classmethod
    def of(cls, tenant: object, room: object, channel: object) -> ChannelRef:
        return cls(
            validate_name(tenant, "tenant"),
            validate_name(room, "room"),
            validate_name(channel, "channel"),
        )


@dataclass(frozen=True, slots=True)
class SubjectScheme:
    """Builds every subject and stream name from one validated prefix."""

    prefix: str = "arq"

    def __post_init__(self) -> None:
        validate_name(self.prefix, "subject prefix")

    def ingest(self, ref: ChannelRef) -> str:
        return f"{self.prefix}.ev.{ref.tenant}.{ref.room}.{ref.channel}"

    def live(self, ref: ChannelRef) -> str:
        return f"{self.prefix}.live.{ref.tenant}.{ref.room}.{ref.channel}"

    def template(self, kind: str) -> str:
        """The low-cardinality form of the ``ev`` or ``live`` subjects, for span attributes."""
        return f"{self.prefix}.{kind}.{{tenant}}.{{room}}.{{channel}}"

    def command(self, ref: ChannelRef, command: str) -> str:
        """The request subject of a service command; handlers subscribe in one queue group."""
        return f"{self.prefix}.cmd.{ref.tenant}.{ref.room}.{ref.channel}.{validate_name(command, 'command')}"

    def tenant_ingest_filter(self, tenant: str) -> str:
        return f"{self.prefix}.ev.{validate_name(tenant, 'tenant')}.>"

    def tenant_live_filter(self, tenant: str) -> str:
        return f"{self.prefix}.live.{validate_name(tenant, 'tenant')}.>"

    def probe(self, tenant: str) -> str:
        """A 4-token subject the tenant's stream captures but no channel uses (those have 5)."""
        return f"{self.prefix}.ev.{validate_name(tenant, 'tenant')}._probe"

    def stream_name(self, tenant: str) -> str:
        return f"{self.prefix}_{validate_name(tenant, 'tenant')}"

    def kv_bucket(self, kind: str) -> str:
        return kv_bucket_name(self.prefix, kind)

    def audit_stream(self, tenant: str) -> str:
        """``P-audit_<tenant>``: never equal to a tenant's event stream ``P_<tenant>``."""
        return f"{self.prefix}-audit_{validate_name(tenant, 'tenant')}"

    def audit(self, tenant: str, type_: str) -> str:
        """The subject of one audit event of ``tenant``, e.g. ``arq.audit.acme.forbidden``."""
        return f"{self.prefix}.audit.{validate_name(tenant, 'tenant')}.{validate_name(type_, 'audit event type')}"

    def audit_filter(self, tenant: str) -> str:
        return f"{self.prefix}.audit.{validate_name(tenant, 'tenant')}.>"

    def gateway_heartbeat(self, node_id: str) -> str:
        """The system subject a gateway's heartbeats go to, e.g. ``arq.sys.gateway.gw1``."""
        return f"{self.prefix}.sys.gateway.{node_token(node_id)}"

    def gateway_heartbeat_filter(self) -> str:
        return f"{self.prefix}.sys.gateway.*"

    def heartbeat_stream(self) -> str:
        """``P-sys_gateways``: the last heartbeat of each gateway (``-``: no tenant's name)."""
        return f"{self.prefix}-sys_gateways"

    def parse_live(self, subject: str) -> ChannelRef | None:
        """Map a delivery subject back to its channel, or None if it is not one of ours."""
        parts = subject.split(".")
        if len(parts) != 5 or parts[0] != self.prefix or parts[1] != "live":
            return None
        if not all(is_valid_name(p) for p in parts[2:]):
            return None
        return ChannelRef(parts[2], parts[3], parts[4])

    def dedupe_key(self, ref: ChannelRef, principal: str, envelope_id: str) -> str:
        """The Nats-Msg-Id: an envelope id is an idempotency key per sender and channel.

        A hash of the unambiguous tuple: NATS trims header values, so the raw id (which
        may end in whitespace) must not be used as is.
        """
        raw = "\x1f".join((ref.room, ref.channel, principal, envelope_id)).encode()
        return hashlib.sha256(raw).hexdigest()
