"""The regions of a mesh: the operator file, what it renders, and the tenants' placement.

An operator describes every region of a mesh in one file (``deploy/regions.example.yaml``):
its NATS nodes, its gateways, an optional witness, and the tenants with their home region and
the regions that hold mirrors. This module is pure: it validates that file's data
(:func:`load_mesh_file`, every problem named by its key at once), renders the NATS server
configs of the supercluster and the Helm values of each region, and describes the streams the
file asks for (:func:`desired_streams`) and how to get there from what exists
(:func:`plan_changes`). ``arqonbus mesh`` (gateway/admin/mesh.py) reads the file and talks to
NATS through mesh/regions.py.

A tenant's :class:`Placement` (one KV record per tenant, watched by every gateway) says which
stream is its primary now, where its mirrors are, and its epochs: each failover or failback
starts a new epoch at the promoted stream's last sequence + 1, so a client's position from an
older epoch is never taken for one in the new stream (docs/regions.md#resume-across-a-failover).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from arqonbus_server.shared.errors import InvalidInput
from arqonbus_server.shared.settings import ConfigError
from arqonbus_server.shared.subjects import SubjectScheme, is_valid_name

# Region names become NATS cluster and gateway names, server tags and part of stream names
# (``P-mirror-<region>_<tenant>``): no underscore, so a mirror's name parses back unambiguously.
REGION_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
DEFAULT_DEDUPE_WINDOW_S = 120.0
MAX_REPLICAS = 5


class MeshFileError(ConfigError):
    """The operator file is invalid; ``problems`` names each bad key and what to do."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        listed = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"the mesh file has {len(self.problems)} problem(s):\n{listed}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NatsNode(_Strict):
    """One nats-server of a region (or the witness)."""

    name: str = Field(description="server_name; unique across the mesh")
    host: str = Field(description="the address other servers and gateways reach it on")
    client_port: int = Field(4222, ge=1, le=65535)
    cluster_port: int = Field(6222, ge=1, le=65535, description="routes within the region")
    gateway_port: int = Field(7222, ge=1, le=65535, description="links between regions")
    http_port: int | None = Field(None, ge=1, le=65535, description="monitoring; none: off")
    listen_host: str | None = Field(None, description="bind address; default: host")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NODE_NAME.match(value):
            raise ValueError("letters, digits, '-' and '_', at most 64, e.g. east-1")
        return value

    @property
    def client_url(self) -> str:
        return f"nats://{self.host}:{self.client_port}"

    @property
    def route_url(self) -> str:
        return f"nats-route://{self.host}:{self.cluster_port}"

    @property
    def gateway_url(self) -> str:
        return f"nats://{self.host}:{self.gateway_port}"

    def ports(self) -> dict[str, int]:
        found = {
            "client_port": self.client_port,
            "cluster_port": self.cluster_port,
            "gateway_port": self.gateway_port,
        }
        if self.http_port is not None:
            found["http_port"] = self.http_port
        return found


class GatewayPool(_Strict):
    replicas: int = Field(2, ge=1, le=1000, description="gateways to run in the region")
    public_urls: list[str] = Field(
        default_factory=list, description="wss:// URLs clients use to reach the region"
    )

    @field_validator("public_urls")
    @classmethod
    def _urls(cls, value: list[str]) -> list[str]:
        for url in value:
            if not url.startswith(("ws://", "wss://")):
                raise ValueError(f"{url!r}: a gateway URL starts with wss:// (or ws://)")
        return value


class Region(_Strict):
    name: str
    nats: list[NatsNode] = Field(min_length=1)
    gateways: GatewayPool = Field(default_factory=lambda: GatewayPool.model_validate({}))

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _region_name(value)


class Witness(_Strict):
    """A 1-node JetStream cluster that holds no streams: it keeps the meta group's quorum
    when one of two regions is lost."""

    name: str = "witness"
    node: NatsNode

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _region_name(value)


class Tenant(_Strict):
    name: str
    home: str = Field(description="the region of its primary stream")
    mirrors: list[str] = Field(default_factory=list, description="regions that hold a mirror")
    replicas: int = Field(3, ge=1, le=MAX_REPLICAS, description="per region, primary and mirrors")
    max_age_s: float = Field(86400.0, gt=0, description="retention")
    max_bytes: int = Field(-1, ge=-1, description="stored bytes; -1 unlimited")
    dedupe_window_s: float = Field(DEFAULT_DEDUPE_WINDOW_S, ge=DEFAULT_DEDUPE_WINDOW_S)
    acks: Literal["mirrored", "home"] = Field(
        "mirrored",
        description="mirrored: a publish is acked once a mirror region holds it too (survives "
        "the loss of the home region); home: once the home region's replicas hold it",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not is_valid_name(value):
            raise ValueError("letters, digits, '-' and '_' only")
        return value


class SecretRef(_Strict):
    """A reference to a secret that lives elsewhere (a Kubernetes Secret, a file): never the
    secret itself."""

    secret: str = Field(description="the Secret's (or file's) name")
    key: str | None = Field(None, description="the key within it")


class Security(_Strict):
    tls: SecretRef | None = Field(
        None, description="the servers' certificate: clients, routes and gateway links use TLS"
    )
    ca: SecretRef | None = Field(None, description="the CA that signed it")
    nats_credentials: SecretRef | None = Field(None, description="the gateways' NATS creds")
    tls_dir: str = Field(
        "/etc/nats/tls",
        description="where each server finds tls.crt, tls.key and ca.crt (the secrets mounted)",
    )

    def tls_block(self, indent: str) -> list[str]:
        """A nats-server ``tls`` block for one listener, or none without ``tls``."""
        if self.tls is None:
            return []
        d = self.tls_dir.rstrip("/")
        lines = [f"{indent}tls {{", f'{indent}  cert_file: "{d}/tls.crt"']
        lines.append(f'{indent}  key_file: "{d}/tls.key"')
        if self.ca is not None:
            lines.append(f'{indent}  ca_file: "{d}/ca.crt"')
        return [*lines, f"{indent}}}"]


class MeshFile(_Strict):
    version: Literal[1] = 1
    subject_prefix: str = "arq"
    store_root: str = Field("/data/nats", description="each node stores under <root>/<node>")
    regions: list[Region] = Field(min_length=1)
    witness: Witness | None = None
    tenants: list[Tenant] = Field(default_factory=list)
    security: Security = Field(default_factory=lambda: Security.model_validate({}))

    @property
    def scheme(self) -> SubjectScheme:
        return SubjectScheme(self.subject_prefix)

    def region(self, name: str) -> Region:
        for region in self.regions:
            if region.name == name:
                return region
        raise KeyError(name)

    def tenant(self, name: str) -> Tenant:
        for tenant in self.tenants:
            if tenant.name == name:
                return tenant
        raise KeyError(name)

    @property
    def clusters(self) -> list[tuple[str, list[NatsNode]]]:
        """Every NATS cluster of the supercluster: the regions, then the witness."""
        found = [(region.name, region.nats) for region in self.regions]
        if self.witness is not None:
            found.append((self.witness.name, [self.witness.node]))
        return found


def _region_name(value: str) -> str:
    if not REGION_NAME.match(value):
        raise ValueError("lower-case letters, digits and '-', starting with a letter, e.g. eu-west")
    return value


def _key(loc: Iterable[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(file)"


def load_mesh_file(data: object) -> MeshFile:
    """Validate the operator file's data (parsed YAML); raise MeshFileError naming every problem."""
    if not isinstance(data, Mapping):
        raise MeshFileError(["(file): expected a mapping with 'regions' and 'tenants'"])
    try:
        mesh = MeshFile.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = "unknown key (see deploy/regions.example.yaml for the keys)"
            problems.append(f"{_key(error['loc'])}: {message}")
        raise MeshFileError(problems) from None
    problems = check_mesh(mesh)
    if problems:
        raise MeshFileError(problems)
    return mesh


def check_mesh(mesh: MeshFile) -> list[str]:
    """The problems no single field shows: names, ports and references across the file."""
    problems: list[str] = []
    cluster_names = [name for name, _ in mesh.clusters]
    for name in sorted({n for n in cluster_names if cluster_names.count(n) > 1}):
        problems.append(f"regions: the name {name!r} is used twice (regions and witness)")
    seen_nodes: dict[str, str] = {}
    seen_ports: dict[tuple[str, int], str] = {}
    for ci, (_, nodes) in enumerate(mesh.clusters):
        for ni, node in enumerate(nodes):
            where = "witness.node" if ci == len(mesh.regions) else f"regions[{ci}].nats[{ni}]"
            if node.name in seen_nodes:
                problems.append(
                    f"{where}.name: {node.name!r} is already the name of {seen_nodes[node.name]}"
                )
            seen_nodes.setdefault(node.name, where)
            bind = node.listen_host or node.host
            for port_key, port in node.ports().items():
                if (bind, port) in seen_ports:
                    problems.append(
                        f"{where}.{port_key}: {bind}:{port} is already used by "
                        f"{seen_ports[(bind, port)]}"
                    )
                seen_ports.setdefault((bind, port), f"{where}.{port_key}")
    regions = [region.name for region in mesh.regions]
    known = ", ".join(regions)
    seen_tenants: set[str] = set()
    for ti, tenant in enumerate(mesh.tenants):
        where = f"tenants[{ti}]"
        if tenant.name in seen_tenants:
            problems.append(f"{where}.name: tenant {tenant.name!r} is listed twice")
        seen_tenants.add(tenant.name)
        if tenant.home not in regions:
            problems.append(f"{where}.home: unknown region {tenant.home!r} (regions: {known})")
        for mi, mirror in enumerate(tenant.mirrors):
            if mirror not in regions:
                problems.append(
                    f"{where}.mirrors[{mi}]: unknown region {mirror!r} (regions: {known})"
                )
            elif mirror == tenant.home:
                problems.append(f"{where}.mirrors[{mi}]: {mirror!r} is the tenant's home")
        if len(set(tenant.mirrors)) != len(tenant.mirrors):
            problems.append(f"{where}.mirrors: a region is listed twice")
        for region in [tenant.home, *tenant.mirrors]:
            if region in regions and tenant.replicas > len(mesh.region(region).nats):
                problems.append(
                    f"{where}.replicas: {tenant.replicas} replicas, but region {region!r} has "
                    f"{len(mesh.region(region).nats)} NATS node(s)"
                )
    return problems


def mesh_warnings(mesh: MeshFile) -> list[str]:
    """What is allowed but risky: said by ``mesh render``, ``plan`` and ``provision``."""
    warnings = []
    clusters = len(mesh.clusters)
    if len(mesh.regions) == 2 and mesh.witness is None:
        warnings.append(
            "2 regions and no witness: losing either region loses JetStream's meta quorum, and "
            "then no stream can be created, updated or failed over (503) until it returns. "
            "Add a witness (a 1-node cluster in a third place)."
        )
    peers = sum(len(nodes) for _, nodes in mesh.clusters)
    biggest = max(len(region.nats) for region in mesh.regions)
    if clusters > 1 and peers - biggest < peers // 2 + 1:
        warnings.append(
            f"the meta group has {peers} servers; losing the largest region ({biggest}) leaves "
            f"{peers - biggest}, below its quorum of {peers // 2 + 1}: failover would be "
            "impossible. Balance the regions or add a witness."
        )
    for tenant in mesh.tenants:
        if not tenant.mirrors:
            warnings.append(
                f"tenant {tenant.name!r} has no mirror: if region {tenant.home!r} is lost, its "
                "events are unavailable until the region returns"
            )
    return warnings


# -- NATS configs -------------------------------------------------------------------------


def _q(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a nats config string


def render_nats_config(mesh: MeshFile, cluster: str, node: NatsNode, log_file: str = "") -> str:
    """The nats-server config of one node of the supercluster."""
    nodes = dict(mesh.clusters)[cluster]
    witness = mesh.witness is not None and cluster == mesh.witness.name
    # "!jetstream": a meta-group peer on which JetStream never places a stream or consumer.
    tags = [f"region:{cluster}", *(["!jetstream"] if witness else [])]
    bind = node.listen_host or node.host
    store_dir = f"{mesh.store_root.rstrip('/')}/{node.name}"
    lines = [
        f"server_name: {_q(node.name)}",
        f"listen: {_q(f'{bind}:{node.client_port}')}",
        f"server_tags: [{', '.join(_q(tag) for tag in tags)}]",
    ]
    if log_file:
        lines.append(f"log_file: {_q(log_file)}")
    lines += mesh.security.tls_block("")
    if node.http_port is not None:
        lines.append(f"http: {_q(f'{bind}:{node.http_port}')}")
    lines += [
        "jetstream {",
        f"  store_dir: {_q(store_dir)}",
        # The default fsyncs every 2 minutes: an acked message could be lost on power loss.
        "  sync_interval: always",
        "}",
        "cluster {",
        f"  name: {_q(cluster)}",
        f"  listen: {_q(f'{bind}:{node.cluster_port}')}",
        # Every member, itself included: JetStream clustering needs at least one route, so a
        # one-node cluster (the witness) routes to itself, which nats-server ignores.
        "  routes: [",
        *(f"    {_q(peer.route_url)}" for peer in nodes),
        "  ]",
        *mesh.security.tls_block("  "),
        "}",
    ]
    if len(mesh.clusters) > 1:
        lines += [
            "gateway {",
            f"  name: {_q(cluster)}",
            f"  listen: {_q(f'{bind}:{node.gateway_port}')}",
            "  gateways: [",
        ]
        for name, members in mesh.clusters:
            urls = ", ".join(_q(member.gateway_url) for member in members)
            lines.append(f"    {{name: {_q(name)}, urls: [{urls}]}}")
        lines += ["  ]", *mesh.security.tls_block("  "), "}"]
    return "\n".join(lines) + "\n"


def render_nats_configs(mesh: MeshFile) -> dict[str, str]:
    """Every server's config, keyed ``nats/<cluster>/<node>.conf``."""
    return {
        f"nats/{cluster}/{node.name}.conf": render_nats_config(mesh, cluster, node)
        for cluster, nodes in mesh.clusters
        for node in nodes
    }


def render_helm_values(mesh: MeshFile) -> dict[str, dict[str, Any]]:
    """Per region, values for helm/arqonbus: its gateways on the region's NATS servers.

    They are layered over the operator's own values (auth, TLS for clients, resources):
    ``helm install -f production.yaml -f values-<region>.yaml``.
    """
    out: dict[str, dict[str, Any]] = {}
    for region in mesh.regions:
        gateway: dict[str, Any] = {"replicaCount": region.gateways.replicas, "region": region.name}
        if mesh.subject_prefix != "arq":
            gateway["config"] = {"ARQONBUS_SUBJECT_PREFIX": mesh.subject_prefix}
        nats: dict[str, Any] = {
            "enabled": False,
            "external": {"urls": [node.client_url for node in region.nats]},
        }
        creds = mesh.security.nats_credentials
        if creds is not None:
            nats["auth"] = {"type": "creds", "existingSecret": creds.secret}
            if creds.key:
                nats["auth"]["fileKey"] = creds.key
        if mesh.security.ca is not None:  # the servers serve TLS: verify them with this CA
            nats["tls"] = {"enabled": True, "existingSecret": mesh.security.ca.secret}
        out[region.name] = {"gateway": gateway, "nats": nats}
    return out


# -- streams: what the file asks for, and the plan to get there -------------------------------


def mirror_stream_name(scheme: SubjectScheme, region: str, tenant: str) -> str:
    """``P-mirror-<region>_<tenant>``: never equal to an event or audit stream's name."""
    return f"{scheme.prefix}-mirror-{_region_name(region)}_{tenant}"


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """One stream as the file asks for it (or as it exists: the same fields)."""

    name: str
    tenant: str
    region: str
    replicas: int
    max_age_s: float
    max_bytes: int
    mirror_of: str | None = None  # None: a primary, which captures the tenant's subjects
    dedupe_window_s: float = DEFAULT_DEDUPE_WINDOW_S

    @property
    def role(self) -> str:
        return "primary" if self.mirror_of is None else "mirror"


def desired_streams(mesh: MeshFile) -> list[StreamSpec]:
    """For each tenant: its primary in its home region, a mirror in each mirror region."""
    scheme = mesh.scheme
    out = []
    for tenant in mesh.tenants:
        primary = StreamSpec(
            name=scheme.stream_name(tenant.name),
            tenant=tenant.name,
            region=tenant.home,
            replicas=tenant.replicas,
            max_age_s=tenant.max_age_s,
            max_bytes=tenant.max_bytes,
            dedupe_window_s=tenant.dedupe_window_s,
        )
        out.append(primary)
        for region in tenant.mirrors:
            name = mirror_stream_name(scheme, region, tenant.name)
            out.append(replace(primary, name=name, region=region, mirror_of=primary.name))
    return out


Action = Literal["create", "update", "nothing", "refuse"]


@dataclass(frozen=True, slots=True)
class Change:
    action: Action
    stream: StreamSpec
    why: str = ""
    fields: tuple[str, ...] = ()  # what an update changes

    def line(self) -> str:
        s = self.stream
        what = f"{s.role} {s.name} (tenant {s.tenant}, region {s.region})"
        return f"{self.action:8} {what}" + (f": {self.why}" if self.why else "")


def plan_changes(
    desired: Sequence[StreamSpec],
    actual: Mapping[str, StreamSpec],
    placements: Mapping[str, Placement] | None = None,
) -> list[Change]:
    """What provisioning would do to get from ``actual`` (by name) to ``desired``.

    Changes that could lose stored events are ``refuse`` with the reason (``--force`` turns
    them into updates): fewer replicas, a shorter retention or a smaller byte limit, and a
    primary turned mirror or a mirror of another stream. A tenant whose placement has moved
    (a failover) keeps its current primary: the file's home region applies again at failback.
    """
    changes = []
    for want in desired:
        placement = (placements or {}).get(want.tenant)
        if (
            placement is not None
            and placement.epoch > 1
            and placement.primary.region != placement.home
        ):
            if want.name in actual:
                changes.append(Change("nothing", want, "tenant failed over: kept as it is"))
            else:
                changes.append(
                    Change("refuse", want, "tenant failed over: run mesh failback first")
                )
            continue
        have = actual.get(want.name)
        if have is None:
            changes.append(Change("create", want))
            continue
        risky, fields = [], []
        if have.mirror_of != want.mirror_of:
            risky.append(
                f"it is a {have.role}"
                + (f" of {have.mirror_of}" if have.mirror_of else "")
                + f"; the file wants a {want.role}"
                + (f" of {want.mirror_of}" if want.mirror_of else "")
                + " (recreating it drops its events)"
            )
        if have.region != want.region:
            risky.append(f"it is placed in region {have.region!r}, the file says {want.region!r}")
        for name, lossy in (
            ("replicas", want.replicas < have.replicas),
            ("max_age_s", want.max_age_s < have.max_age_s),
            ("max_bytes", _smaller_limit(want.max_bytes, have.max_bytes)),
            ("dedupe_window_s", False),
        ):
            if name == "dedupe_window_s" and want.mirror_of is not None:
                continue  # a mirror copies stored events: it has no duplicate window
            if getattr(want, name) != getattr(have, name):
                fields.append(name)
                if lossy:
                    risky.append(
                        f"{name} {getattr(have, name)} -> {getattr(want, name)} can drop stored "
                        "events or copies"
                    )
        if risky:
            changes.append(Change("refuse", want, "; ".join(risky), tuple(fields)))
        elif fields:
            what = ", ".join(f"{f} {getattr(have, f)} -> {getattr(want, f)}" for f in fields)
            changes.append(Change("update", want, what, tuple(fields)))
        else:
            changes.append(Change("nothing", want))
    return changes


def _smaller_limit(want: int, have: int) -> bool:
    if want == have:
        return False
    return want != -1 and (have == -1 or want < have)


# -- placement: where a tenant's primary is now, and its epochs --------------------------------


class PlacementRecordError(InvalidInput):
    """A placement record (the placement bucket's value) that does not parse; says why."""


@dataclass(frozen=True, slots=True)
class StreamAt:
    region: str
    stream: str


@dataclass(frozen=True, slots=True)
class Epoch:
    """Epoch ``number`` holds the primary's events from ``start_seq`` on."""

    number: int
    start_seq: int
    primary: StreamAt


@dataclass(frozen=True, slots=True)
class Placement:
    """One tenant's record in the placement bucket (key: the tenant)."""

    tenant: str
    home: str
    primary: StreamAt
    mirrors: tuple[StreamAt, ...] = ()
    epochs: tuple[Epoch, ...] = field(default=())
    acks: str = "mirrored"  # Tenant.acks; "mirrored" only matters while it has a mirror

    @property
    def epoch(self) -> int:
        return self.epochs[-1].number if self.epochs else 1

    def stream_in(self, region: str) -> str | None:
        """The tenant's stream (primary or mirror) in ``region``, if any."""
        for at in (self.primary, *self.mirrors):
            if at.region == region:
                return at.stream
        return None

    def resume_from(self, since_epoch: int, since_seq: int) -> tuple[int, int | None]:
        """Where a client at (``since_epoch``, ``since_seq``) resumes in the current epoch.

        Returns (seq to resume after, first seq of the old epoch the client may have seen that
        the new primary never had, or None). A position in an older epoch is valid up to the
        seq before the next epoch's start: later seqs of the old epoch were not carried over
        (they were acknowledged by a primary that was lost before its mirror had them).
        """
        if since_epoch >= self.epoch or since_seq <= 0:
            return since_seq, None
        for epoch in self.epochs:
            if epoch.number > since_epoch:
                fork = epoch.start_seq - 1
                if since_seq > fork:
                    return fork, fork + 1
                return since_seq, None
        return since_seq, None

    def epoch_of(self, seq: int, stream: str) -> int | None:
        """The epoch of the event ``seq`` that ``stream`` stored (and published live).

        That is the last epoch starting at or before ``seq``, if ``stream`` is that epoch's
        primary. None when this record cannot tell: the event comes from a primary of an
        epoch the record does not show yet (the failover is newer than the record), or from
        a former primary that lives on after it was replaced (a region cut off).
        """
        if not self.epochs:
            return 1 if stream == self.primary.stream else None
        for epoch in reversed(self.epochs):
            if epoch.start_seq <= seq:
                return epoch.number if epoch.primary.stream == stream else None
        return None

    def to_json(self) -> bytes:
        def at(s: StreamAt) -> dict[str, str]:
            return {"region": s.region, "stream": s.stream}

        return json.dumps(
            {
                "tenant": self.tenant,
                "home": self.home,
                "acks": self.acks,
                "primary": at(self.primary),
                "mirrors": [at(m) for m in self.mirrors],
                "epochs": [
                    {"epoch": e.number, "start_seq": e.start_seq, "primary": at(e.primary)}
                    for e in self.epochs
                ],
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Placement:
        """The record ``raw``; raises PlacementRecordError if it is not one."""
        try:
            return cls._from_data(json.loads(raw))
        except PlacementRecordError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            what = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
            raise PlacementRecordError(f"not a placement record: {what}") from exc

    @classmethod
    def _from_data(cls, data: Any) -> Placement:
        if not isinstance(data, dict):
            raise PlacementRecordError("not a placement record: not a JSON object")

        def at(d: Mapping[str, str]) -> StreamAt:
            return StreamAt(str(d["region"]), str(d["stream"]))

        return cls(
            tenant=str(data["tenant"]),
            home=str(data["home"]),
            primary=at(data["primary"]),
            mirrors=tuple(at(m) for m in data.get("mirrors", [])),
            epochs=tuple(
                Epoch(_count(e["epoch"]), _count(e["start_seq"]), at(e["primary"]))
                for e in data.get("epochs", [])
            ),
            acks=str(data.get("acks", "mirrored")),
        )


def _count(value: object) -> int:
    """An epoch number or start seq: an integer >= 1 (JSON booleans are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PlacementRecordError(f"not a placement record: {value!r} is not an integer >= 1")
    return value


def placement_kind(region: str) -> str:
    """The KV bucket kind of region ``region``'s copy of the placement records (placed in
    that region, watched by its gateways): ``<prefix>_placement-<region>``."""
    return f"placement-{_region_name(region)}"


def initial_placement(mesh: MeshFile, tenant: Tenant) -> Placement:
    scheme = mesh.scheme
    primary = StreamAt(tenant.home, scheme.stream_name(tenant.name))
    return Placement(
        tenant=tenant.name,
        home=tenant.home,
        primary=primary,
        mirrors=tuple(
            StreamAt(region, mirror_stream_name(scheme, region, tenant.name))
            for region in tenant.mirrors
        ),
        epochs=(Epoch(1, 1, primary),),
        acks=tenant.acks,
    )


def promoted(placement: Placement, to_region: str, last_seq: int) -> Placement:
    """The placement after the mirror in ``to_region`` (holding up to ``last_seq``) becomes
    the primary: a new epoch from ``last_seq + 1``; the old primary is gone from the record."""
    new_primary = next((m for m in placement.mirrors if m.region == to_region), None)
    if new_primary is None:
        raise ValueError(f"tenant {placement.tenant} has no mirror in region {to_region!r}")
    mirrors = tuple(m for m in placement.mirrors if m.region != to_region)
    epoch = Epoch(placement.epoch + 1, last_seq + 1, new_primary)
    return Placement(
        placement.tenant,
        placement.home,
        new_primary,
        mirrors,
        (*placement.epochs, epoch),
        placement.acks,
    )


def returned_home(placement: Placement, home_stream: str, last_seq: int) -> Placement:
    """The placement after failback: ``home_stream`` (the tenant's original stream, recreated
    in its home region and holding up to ``last_seq``) is the primary again, in a new epoch
    from ``last_seq + 1``; the former primary is a mirror again (it keeps its mirror name)."""
    if placement.primary.region == placement.home:
        raise ValueError(f"tenant {placement.tenant} is already in its home region")
    home = StreamAt(placement.home, home_stream)
    epoch = Epoch(placement.epoch + 1, last_seq + 1, home)
    return Placement(
        placement.tenant,
        placement.home,
        home,
        (placement.primary, *placement.mirrors),
        (*placement.epochs, epoch),
        placement.acks,
    )


def newest(placements: Iterable[Placement]) -> Placement | None:
    """The placement with the highest epoch (copies kept on several streams may differ)."""
    return max(placements, key=lambda p: p.epoch, default=None)
