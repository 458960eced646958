"""Region loss (scenario 10, and ``tests/regions``): a whole region dies under load.

:class:`RegionMesh` is a real supercluster on loopback (``LocalSupercluster`` from a mesh file
on free ports: 3 regions of 3 NATS nodes and a witness), provisioned with the real
``arqonbus mesh provision``, and one gateway process per region with ``ARQONBUS_REGION`` set.
:func:`region_loss` is the fault: ``kill -9`` every NATS node and the gateway of the tenants'
home region, ``arqonbus mesh failover`` at once, load on, restart the region, ``arqonbus mesh
failback``, load on. The load and the ledger are the usual ones (chaos/workload.py).
"""

from __future__ import annotations

import asyncio
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats
import orjson
import yaml

from arqonbus_server.mesh.regions import RegionOps
from arqonbus_server.mesh.supercluster import LocalSupercluster, free_port_mesh
from arqonbus_server.shared.regions import Placement
from arqonbus_server.shared.subjects import SubjectScheme
from chaos.mesh import GATEWAY_ENV
from chaos.workload import Workload, percentile
from tests.support import GatewayProcess

if TYPE_CHECKING:
    from chaos.scenarios import Outcome, Plan

REGIONS = {"east": 3, "west": 3, "south": 3}
CLI_TIMEOUT_S = 120.0
# "... Fail over to <region>, or pass --force": the tool names the mirror that holds more.
_BETTER_MIRROR = re.compile(r"Fail over to ([a-z][a-z0-9-]*)")


async def arqonbus(*args: str) -> tuple[int, str]:
    """The real CLI as a child process: its exit code and its output (stdout + stderr), each
    line prefixed with the seconds since the start at which it was read (``[  1.23] ...``)."""
    began = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "arqonbus_server.gateway", *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    lines = []
    try:
        async with asyncio.timeout(CLI_TIMEOUT_S):
            while line := await proc.stdout.readline():
                lines.append(f"[{time.monotonic() - began:6.2f}] {line.decode().rstrip()}")
            await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(
            f"arqonbus {' '.join(args)}: no exit within {CLI_TIMEOUT_S:g} s"
        ) from None
    assert proc.returncode is not None
    return proc.returncode, "\n".join(lines)


class RegionMesh:
    """A supercluster (its own, or one given) and one gateway process per region.

    It has what ``chaos.scenarios.run_scenario`` needs of a mesh: ``gateways``, ``urls``,
    ``cluster`` (``.urls``), ``scheme``, ``start`` and ``stop``.
    """

    def __init__(
        self,
        workdir: Path,
        tenants: Sequence[Mapping[str, Any]] = (),
        *,
        supercluster: LocalSupercluster | None = None,
        gateway_env: Mapping[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self._own = supercluster is None
        if supercluster is None:
            mesh = free_port_mesh(REGIONS, tenants, witness=True, store_root=str(workdir))
            supercluster = LocalSupercluster(mesh, workdir / "nats")
        self.cluster = supercluster
        self.scheme: SubjectScheme = supercluster.mesh.scheme
        self.regions = supercluster.regions
        self.gateway_env = {**GATEWAY_ENV, **(gateway_env or {})}
        self.gateways: list[GatewayProcess] = []
        self.mesh_file = workdir / "mesh.yaml"

    # -- lifecycle

    async def start(self) -> None:
        """Start the supercluster (if it is ours), provision it, start the gateways."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._own:
            await self.cluster.start(timeout=90)
            self.mesh_file.write_text(yaml.safe_dump(self.cluster.mesh.model_dump(mode="json")))
            nats_urls = self.nats(self.regions[1])
            code, out = await arqonbus(
                "mesh", "provision", str(self.mesh_file), "--nats", nats_urls
            )
            if code != 0:
                raise RuntimeError(f"arqonbus mesh provision exited {code}:\n{out}")
        self.gateways = [self._gateway(region) for region in self.regions]
        await asyncio.gather(*(g.start(timeout=60) for g in self.gateways))

    def _gateway(self, region: str, port: int | None = None) -> GatewayProcess:
        env = {**self.gateway_env, "ARQONBUS_REGION": region}
        return GatewayProcess(self.nats(region), port=port, env=env)

    async def stop(self) -> None:
        for gateway in self.gateways:
            await gateway.stop()
        if self._own:
            await self.cluster.stop()

    # -- views

    def nats(self, region: str) -> str:
        return ",".join(self.cluster.region_urls(region))

    @property
    def urls(self) -> list[str]:
        return [g.url for g in self.gateways]

    def url(self, region: str) -> str:
        return self.gateways[self.regions.index(region)].url

    async def placement(self, tenant: str, region: str) -> Placement:
        nc = await nats.connect(self.cluster.region_urls(region), connect_timeout=5)
        try:
            found = await RegionOps(nc, self.scheme, say=lambda _: None).placement(tenant)
        finally:
            await nc.close()
        if found is None:
            raise RuntimeError(f"tenant {tenant} has no placement record")
        return found

    # -- faults

    async def kill_region(self, region: str) -> None:
        """kill -9 the region's gateway and every one of its NATS nodes, all at once."""
        gateway = self.gateways[self.regions.index(region)]
        gateway.signal(signal.SIGKILL)
        await asyncio.gather(gateway.wait_exit(10), self.cluster.kill_region(region))

    async def start_region(self, region: str) -> None:
        """Restart the region's NATS nodes, then a gateway on its old port."""
        await self.cluster.start_region(region, timeout=90)
        i = self.regions.index(region)
        old = self.gateways[i]
        await old.stop()
        self.gateways[i] = self._gateway(region, port=old.port)
        await self.gateways[i].start(timeout=60)

    async def failover(self, tenant: str, to: str, via: str) -> tuple[str, str]:
        """``arqonbus mesh failover TENANT --to REGION``; (the region promoted, the output).

        With ``acks: mirrored`` an event is acked once any mirror holds it, so the tool refuses
        a mirror that holds less than another and names the better one: an operator runs it
        again with that region, and so does this.
        """
        code, out = await arqonbus("mesh", "failover", tenant, "--to", to, "--nats", self.nats(via))
        better = _BETTER_MIRROR.search(out)
        if code == 4 and better:
            to = better.group(1)
            code, more = await arqonbus(
                "mesh", "failover", tenant, "--to", to, "--nats", self.nats(to)
            )
            out += more
        if code != 0:
            raise RuntimeError(f"arqonbus mesh failover exited {code}:\n{out}")
        return to, out

    async def failback(self, tenant: str, via: str) -> str:
        code, out = await arqonbus("mesh", "failback", tenant, "--nats", self.nats(via))
        if code != 0:
            raise RuntimeError(f"arqonbus mesh failback exited {code}:\n{out}")
        return out


def region_tenants(names: Sequence[str], home: str = "east") -> list[dict[str, Any]]:
    """Tenants homed in ``home`` with a mirror in each other region, ``acks: mirrored``."""
    mirrors = [r for r in REGIONS if r != home]
    return [
        {"name": n, "home": home, "mirrors": mirrors, "max_age_s": 3600, "acks": "mirrored"}
        for n in names
    ]


# -- the fault ------------------------------------------------------------------------------


def first_ack_after(wl: Workload, t: float) -> float | None:
    """The first ack of an event sent at or after ``t`` (its publisher's clock)."""
    acks = [
        p.ack_times[i]
        for p in wl.publishers
        for i, sent in p.sent_times.items()
        if sent >= t and i in p.ack_times
    ]
    return min(acks, default=None)


async def _flowing(wl: Workload, after: float, timeout: float, what: str) -> float:
    """Wait until every subscriber got an event sent after ``after``; the seconds it took."""
    if not await wl.wait_until(wl.delivered_after(after), timeout):
        raise RuntimeError(f"{what}: events did not reach every subscriber within {timeout:g} s")
    return time.time() - after


async def region_loss(
    mesh: RegionMesh,
    wl: Workload,
    plan: Plan,
    outcome: Outcome,
    *,
    home: str = "east",
    to: str = "west",
    steady_s: float | None = None,
) -> None:
    """Kill ``home`` under load, fail its tenants over to ``to``, restart it, fail back.

    The publish->deliver latencies of the ``steady_s`` before the kill are the steady-state
    figure (default: 1 s short, 3 s long)."""
    tenants = sorted({p.ref.tenant for p in wl.publishers if p.ref.tenant in _homed(mesh, home)})
    survivor = to
    steady_from = time.time()
    steady = plan.scale(1, 3) if steady_s is None else steady_s
    await _flowing(wl, steady_from + steady, steady + 30, "steady load before the fault")

    fault_at = time.time()
    await mesh.kill_region(home)
    killed_s = time.time() - fault_at
    promoted: dict[str, str] = {}
    tool_s: dict[str, float] = {}
    for tenant in tenants:
        began = time.time()
        promoted[tenant], out = await mesh.failover(tenant, to, via=survivor)
        tool_s[tenant] = round(time.time() - began, 2)
        outcome.measures.setdefault("failover_steps", {})[tenant] = _steps(out)
    failed_over_at = time.time()
    flowing_s = await _flowing(wl, failed_over_at, 60, "after the failover")
    first_ack = first_ack_after(wl, fault_at)
    rto = None if first_ack is None else round(first_ack - fault_at, 2)
    outcome.resume += wl.resume_times(fault_at)

    for tenant in tenants:
        placement = await mesh.placement(tenant, survivor)
        outcome.check(
            f"{tenant}: epoch 2, primary in {promoted[tenant]} after the failover",
            placement.epoch == 2 and placement.primary.region == promoted[tenant],
            f"epoch {placement.epoch}, primary {placement.primary.stream} ({placement.primary.region})",
        )
    # Load on the failed-over mesh for a while, then the home region comes back.
    await _flowing(wl, time.time() + plan.scale(2, 6), 60, "load on the failed-over mesh")
    for tenant in tenants:
        await _acked_once_in(mesh, wl, tenant, survivor, outcome)
    restart_at = time.time()
    await mesh.start_region(home)
    restarted_s = round(time.time() - restart_at, 2)
    failback_s: dict[str, float] = {}
    for tenant in tenants:
        began = time.time()
        out = await mesh.failback(tenant, via=survivor)
        outcome.measures.setdefault("failback_steps", {})[tenant] = _steps(out)
        failback_s[tenant] = round(time.time() - began, 2)
    failed_back_at = time.time()
    back_s = await _flowing(wl, failed_back_at, 60, "after the failback")
    for tenant in tenants:
        placement = await mesh.placement(tenant, home)
        outcome.check(
            f"{tenant}: epoch 3, primary home in {home} after the failback",
            placement.epoch == 3 and placement.primary.region == home,
            f"epoch {placement.epoch}, primary {placement.primary.stream} ({placement.primary.region})",
        )
    await _flowing(wl, time.time() + plan.scale(1, 3), 60, "load after the failback")

    latencies = wl.latencies_between(steady_from, fault_at)
    outcome.measures.update(
        killed_region=home,
        promoted=promoted,
        kill_s=round(killed_s, 2),
        rto_s=rto,
        failover_tool_s=tool_s,
        flowing_after_failover_s=round(flowing_s, 2),
        region_restart_s=restarted_s,
        failback_tool_s=failback_s,
        flowing_after_failback_s=round(back_s, 2),
        publish_to_deliver_ms_before_fault={
            "n": len(latencies),
            "p50": round(percentile(latencies, 0.5), 2),
            "p99": round(percentile(latencies, 0.99), 2),
        },
    )
    outcome.check("RTO measured (a publish acked after the failover)", rto is not None, f"{rto} s")
    window = (fault_at, failed_over_at)
    outcome.after_settle.append(lambda: _outage_publishes(wl, window, outcome))
    outcome.after_settle.append(lambda: _epochs_in_order(wl, outcome))


async def stored_ids(urls: Sequence[str], stream: str) -> Counter[tuple[str, str]]:
    """How many times each (channel, envelope id) is stored in ``stream`` (read in full)."""
    counts: Counter[tuple[str, str]] = Counter()
    nc = await nats.connect(list(urls), connect_timeout=5)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        if not info.state.messages or not info.config.subjects:
            return counts
        sub = await js.subscribe(info.config.subjects[0], stream=stream, ordered_consumer=True)
        try:
            for _ in range(info.state.messages):
                msg = await sub.next_msg(timeout=10)
                envelope = orjson.loads(msg.data)
                counts[(str(envelope.get("channel")), str(envelope.get("id")))] += 1
                if msg.metadata.sequence.stream >= info.state.last_seq:
                    break
        finally:
            await sub.unsubscribe()
    finally:
        await nc.close()
    return counts


async def _acked_once_in(
    mesh: RegionMesh, wl: Workload, tenant: str, region: str, outcome: Outcome
) -> None:
    """Every id acked so far is stored exactly once in the tenant's promoted primary."""
    stream = (await mesh.placement(tenant, region)).primary.stream
    acked = [
        (p.ref.channel, i) for p in wl.publishers if p.ref.tenant == tenant for i in list(p.acked)
    ]
    counts = await stored_ids(mesh.cluster.region_urls(region), stream)
    missing = [key for key in acked if counts[key] == 0]
    twice = [key for key in acked if counts[key] > 1]
    outcome.check(
        f"{tenant}: every id acked so far is in the promoted {stream} exactly once",
        not missing and not twice,
        f"{len(acked)} acked: {len(missing)} missing {missing[:3]}, {len(twice)} stored more than "
        f"once {twice[:3]} ({sum(counts.values())} stored)",
    )


def _steps(out: str) -> list[str]:
    """The tool's timed steps and result lines, without its log lines."""
    return [line for line in out.splitlines() if " INFO " not in line and " WARNING " not in line]


def _homed(mesh: RegionMesh, home: str) -> set[str]:
    return {t.name for t in mesh.cluster.mesh.tenants if t.home == home}


def _outage_publishes(wl: Workload, window: tuple[float, float], outcome: Outcome) -> None:
    """Publishes sent between the kill and the failover: acked (late) or failed with a code."""
    during = [
        (p, i) for p in wl.publishers for i, t in p.sent_times.items() if window[0] <= t < window[1]
    ]
    codes = Counter(p.failed[i] for p, i in during if i in p.failed)
    unresolved = sum(1 for p, i in during if i not in p.acked and i not in p.failed)
    acked = sum(1 for p, i in during if i in p.acked)
    outcome.check(
        "every publish sent during the outage was acked (late) or failed with a code",
        unresolved == 0,
        f"{len(during)} sent: {acked} acked, {sum(codes.values())} failed {dict(codes)}, "
        f"{unresolved} unresolved",
    )
    outcome.measures.update(
        sent_during_outage=len(during),
        acked_during_outage=acked,
        failed_during_outage=dict(codes),
        failed_total={
            code: n
            for code, n in Counter(c for p in wl.publishers for c in p.failed.values()).items()
        },
    )


def _epochs_in_order(wl: Workload, outcome: Outcome) -> None:
    """Each subscriber of a placed tenant saw epochs 1, 2, 3, never going back."""
    seen = []
    for sub in wl.subscribers:
        epochs = [e for e in sub.epochs if e is not None]
        if not epochs:
            continue
        seen.append((sub.name, epochs == sorted(epochs), sorted(set(epochs))))
    ok = bool(seen) and all(in_order for _, in_order, _ in seen)
    outcome.check(
        "subscribers saw the epochs in order",
        ok,
        "; ".join(f"{name}: {distinct}" for name, _, distinct in seen[:6]) or "no epochs seen",
    )
