"""A whole supercluster on loopback: every NATS node of a mesh file as a local process.

``LocalSupercluster`` is a :class:`~arqonbus_server.mesh.local.LocalCluster` whose nodes come
from a :class:`~arqonbus_server.shared.regions.MeshFile` (regions and witness) and whose configs
are the ones ``arqonbus mesh render`` writes (plus a log file), so the tests run exactly what an
operator deploys. ``free_port_mesh`` builds such a file on free loopback ports.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nats.js.api import Placement, StorageType, StreamConfig
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from arqonbus_server.mesh.local import (
    MAX_REPLICAS,
    PROBE_STREAM,
    JetStreamCheck,
    LocalCluster,
    NodeSpec,
    _ensure_free,
    _free_ports,
    _until,
)
from arqonbus_server.shared.regions import MeshFile, load_mesh_file, render_nats_config

HOST = "127.0.0.1"


def free_port_mesh(
    regions: Mapping[str, int],
    tenants: Sequence[Mapping[str, Any]] = (),
    witness: bool = True,
    store_root: str = "/tmp/arqonbus-supercluster",
) -> MeshFile:
    """A mesh file of ``regions`` (name: node count) on free 127.0.0.1 ports."""

    # One call for every port: ports picked in separate calls can repeat.
    count = sum(regions.values()) + (1 if witness else 0)
    ports = iter(_free_ports(HOST, 3 * count))

    def node(name: str) -> dict[str, Any]:
        client, cluster, gateway = next(ports), next(ports), next(ports)
        return {
            "name": name,
            "host": HOST,
            "client_port": client,
            "cluster_port": cluster,
            "gateway_port": gateway,
        }

    data: dict[str, Any] = {
        "store_root": store_root,
        "regions": [
            {"name": name, "nats": [node(f"{name}-{i + 1}") for i in range(count)]}
            for name, count in regions.items()
        ],
        "tenants": list(tenants),
    }
    if witness:
        data["witness"] = {"name": "witness", "node": node("witness-1")}
    return load_mesh_file(data)


def _places_in(region: str, replicas: int) -> JetStreamCheck:
    """A check that an R=``replicas`` stream can be placed in ``region`` (then deleted)."""
    config = StreamConfig(
        name=PROBE_STREAM,
        subjects=["_local_cluster.ready"],
        storage=StorageType.MEMORY,
        num_replicas=replicas,
        placement=Placement(cluster=region),
    )

    async def check(js: JetStreamContext) -> None:
        for _ in range(2):  # left by a crashed run, or by an earlier region's probe
            try:
                await js.delete_stream(PROBE_STREAM)
            except NotFoundError:
                break
        await js.add_stream(config)
        await js.delete_stream(PROBE_STREAM)

    return check


class LocalSupercluster(LocalCluster):
    """Every node of ``mesh`` (regions and witness) as a nats-server on this machine.

    The file's ``store_root`` is replaced by ``base_dir``; its hosts must be local addresses.
    """

    def __init__(self, mesh: MeshFile, base_dir: Path, binary: str | None = None) -> None:
        self.mesh = mesh.model_copy(update={"store_root": str(base_dir)})
        self._members = [(cluster, node) for cluster, nodes in mesh.clusters for node in nodes]
        super().__init__(base_dir, nodes=len(self._members), name="supercluster", binary=binary)

    def _plan(self, count: int, host: str, client_port: int | None) -> list[NodeSpec]:
        # The file fixes every port: a restart or a retry after a port race reuses them.
        return [
            NodeSpec(
                name=node.name,
                host=node.listen_host or node.host,
                client_port=node.client_port,
                cluster_port=node.cluster_port,
                store_dir=self.base_dir / node.name,
                config_path=self.base_dir / f"{node.name}.conf",
                log_path=self.base_dir / f"{node.name}.log",
            )
            for _, node in self._members
        ]

    def _write_configs(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        for (cluster, node), spec in zip(self._members, self.specs, strict=True):
            config = render_nats_config(self.mesh, cluster, node, log_file=str(spec.log_path))
            spec.config_path.write_text(config)

    def _check_ports(self, spec: NodeSpec) -> None:
        super()._check_ports(spec)
        node = next(node for _, node in self._members if node.name == spec.name)
        _ensure_free(spec.name, spec.host, node.gateway_port, "gateway")

    # -- views

    @property
    def regions(self) -> list[str]:
        return [region.name for region in self.mesh.regions]

    def _indices(self, region: str) -> list[int]:
        found = [i for i, (cluster, _) in enumerate(self._members) if cluster == region]
        if not found:
            raise KeyError(f"no region {region!r} (regions: {', '.join(self.regions)})")
        return found

    def region_urls(self, region: str) -> list[str]:
        """The client URLs of ``region``'s nodes."""
        return [self.specs[i].url for i in self._indices(region)]

    # -- readiness and faults

    async def wait_placement(self, timeout: float = 30.0) -> None:
        """Return once every region with a running node can place a stream on all of them."""
        deadline = asyncio.get_running_loop().time() + timeout
        for region in self.regions:
            running = [i for i in self._indices(region) if self.is_running(i)]
            if not running:
                continue
            replicas = min(len(running), MAX_REPLICAS)
            check = _places_in(region, replicas)
            condition = f"placing an R{replicas} stream in region {region}"
            await self._wait_until(self._nodes[running[0]], condition, check, _until(deadline))

    async def kill_region(self, region: str) -> None:
        """SIGKILL every node of ``region`` (and reap them)."""
        await asyncio.gather(*(self.kill_node(i) for i in self._indices(region)))

    async def start_region(self, region: str, timeout: float = 60.0) -> None:
        """Restart every node of ``region``; return once they answer and it can place streams."""
        deadline = asyncio.get_running_loop().time() + timeout
        for i in self._indices(region):
            await self.start_node(i, wait_ready=False)
        for i in self._indices(region):
            await self.wait_ready_node(i, _until(deadline))
        await self.wait_placement(_until(deadline))
