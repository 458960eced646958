"""``make bench-regions``: a 3-region supercluster on loopback, measured.

Starts real processes on 127.0.0.1: a supercluster of 3 regions (east = A, west = B,
south = C; ``--nodes`` NATS nodes each) and a 1-node witness (mesh/supercluster.py), provisions
it with ``RegionOps`` (as ``arqonbus mesh provision`` does), and runs one ArqonBus gateway per
region with ``ARQONBUS_REGION`` set. Every tenant is homed in A with mirrors in B and C.
Clients are the Python SDK (clients/python) in this process. It measures:

1. publish -> deliver latency at a modest offered rate: A -> A, A -> B, and B -> C (the
   primary in A);
2. what ``acks: mirrored`` costs against ``acks: home``: publish -> ack latency (one publish at a
   time) and acked publishes/s (one connection, a window of publishes), interleaved;
3. failover: kill -9 of A's NATS nodes and gateway under load from B's gateway, then
   ``arqonbus mesh failover`` (the CLI) at once; RTO = the kill -> the first ack after it on B's
   gateway; RPO = acknowledged events missing from the promoted stream, per ack mode. The
   first run uses the supercluster of 1 and 2; each further run a fresh one.

Writes ``bench/results/<date>-regions.json`` and prints a summary table. Loopback has no WAN
delay: every latency here is a lower bound for real regions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import orjson

from arqonbus import Client, Event
from arqonbus_server.mesh.regions import RegionOps
from arqonbus_server.mesh.supercluster import LocalSupercluster, free_port_mesh
from arqonbus_server.shared.regions import mirror_stream_name, placement_kind
from bench.run import REPO, RESULTS, Gateway, cpu_seconds, machine, start_gateway, stop_process

log = logging.getLogger("bench.regions")
A, B, C = "east", "west", "south"
ROOM = "bench"
FAILOVER_TENANTS = {"mirrored": "fomirrored", "home": "fohome"}
ACK_TENANTS = {"mirrored": "ackmirrored", "home": "ackhome"}
LATENCY_TENANT = "latency"
RECOVERY_S = 180.0  # a failover with no ack on B's gateway within this has not recovered


@dataclass
class Config:
    nodes: int = 3  # NATS nodes per region
    rate: float = 200.0  # offered msgs/s: latency runs and the failover load
    latency_s: float = 15.0  # per latency pair
    ack_events: int = 400  # one at a time, per mode and repeat
    ack_window: int = 100  # publishes in flight for acked/s
    ack_s: float = 5.0  # per mode and repeat
    repeats: int = 3  # ack cost repeats (interleaved)
    # Failovers provisioned through B's servers, then through A's (the region that is lost).
    # Every region holds its own copy of the placement records, so both should recover alike.
    failovers: int = 2
    failovers_bucket_in_home: int = 1
    smoke: bool = False
    sdk: dict[str, float] = field(default_factory=lambda: {"max_backoff": 0.25})


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary_ms(values_s: list[float]) -> dict[str, float]:
    return {
        "n": len(values_s),
        **{k: round(pct(values_s, q) * 1000, 2) for k, q in (("p50", 0.5), ("p99", 0.99))},
        "p99.9": round(pct(values_s, 0.999) * 1000, 2),
    }


def tenants(cfg: Config) -> list[dict[str, Any]]:
    names = {LATENCY_TENANT: "mirrored"}
    names.update({t: mode for mode, t in ACK_TENANTS.items()})
    names.update({t: mode for mode, t in FAILOVER_TENANTS.items()})
    replicas = min(3, cfg.nodes)
    return [
        {"name": n, "home": A, "mirrors": [B, C], "acks": mode, "replicas": replicas}
        for n, mode in names.items()
    ]


# -- the mesh -----------------------------------------------------------------------------


@dataclass
class Mesh:
    cluster: LocalSupercluster
    gateways: dict[str, Gateway]
    work: Path

    @property
    def server_pids(self) -> list[int]:
        """Every running NATS node and gateway: the processes whose CPU a run costs."""
        nodes = [pid for pid in self.cluster.pids if pid is not None]
        return nodes + [g.pid for g in self.gateways.values() if g.proc.returncode is None]

    def urls(self, region: str) -> str:
        return ",".join(self.cluster.region_urls(region))

    def client(self, region: str, tenant: str, who: str, cfg: Config) -> Client:
        token = f"dev:{tenant}:{who}"
        return Client(self.gateways[region].url, token, request_timeout=60, **cfg.sdk)


async def start_mesh(cfg: Config, work: Path, provision_from: str = B) -> Mesh:
    regions = {A: cfg.nodes, B: cfg.nodes, C: cfg.nodes}
    mesh_file = free_port_mesh(regions, tenants(cfg), witness=True, store_root=str(work))
    cluster = LocalSupercluster(mesh_file, work / "nats")
    await cluster.start(timeout=120)
    nc = await nats.connect(cluster.region_urls(provision_from))
    try:
        await RegionOps(nc, mesh_file.scheme, say=log.info).provision(cluster.mesh)
    finally:
        await nc.close()
    gateways: dict[str, Gateway] = {}
    for i, region in enumerate((A, B, C)):
        urls = ",".join(cluster.region_urls(region))
        gateways[region] = await start_gateway(urls, i, work, {"ARQONBUS_REGION": region})
    return Mesh(cluster, gateways, work)


async def stop_mesh(mesh: Mesh) -> None:
    for gateway in mesh.gateways.values():
        await stop_process(gateway.proc)
    await mesh.cluster.stop()


# -- 1. publish -> deliver ------------------------------------------------------------------


async def paced(rate: float, count: int, send: Any) -> list[asyncio.Task[Any]]:
    """Start ``send(i)`` at ``rate`` per second on an absolute schedule (no drift)."""
    loop = asyncio.get_running_loop()
    start, tasks = loop.time(), []
    for i in range(count):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing of the offered load, not synchronisation
        tasks.append(asyncio.create_task(send(i)))
    return tasks


async def deliver_latency(mesh: Mesh, cfg: Config, pub: str, sub: str) -> dict[str, Any]:
    channel = f"{pub}-{sub}"
    latencies: list[float] = []
    count, warm = int(cfg.rate * cfg.latency_s), 20
    done = asyncio.Event()

    def on_event(item: object) -> None:
        if isinstance(item, Event) and item.payload.get("i", -1) >= warm:
            latencies.append((time.monotonic_ns() - item.payload["ts"]) / 1e9)
            if len(latencies) >= count:
                done.set()

    async with (
        mesh.client(sub, LATENCY_TENANT, "reader", cfg) as reader,
        mesh.client(pub, LATENCY_TENANT, "writer", cfg) as writer,
    ):
        await reader.on(ROOM, channel, on_event)

        async def send(i: int) -> None:
            await writer.publish(ROOM, channel, {"i": i, "ts": time.monotonic_ns()})

        for i in range(warm):  # the first publishes open the tenant's paths
            await send(i)
        tasks = await paced(cfg.rate, count, lambda i: send(i + warm))
        await asyncio.gather(*tasks)
        await asyncio.wait_for(done.wait(), 60)
    return {"publisher": pub, "subscriber": sub, "rate": cfg.rate, **summary_ms(latencies)}


# -- 2. acks: mirrored against acks: home ------------------------------------------------------


async def ack_latency(client: Client, n: int, tag: str) -> list[float]:
    out = []
    for i in range(n):
        began = time.perf_counter()
        await client.publish(ROOM, "acks", {"i": i, "tag": tag})
        out.append(time.perf_counter() - began)
    return out


async def ack_rate(client: Client, window: int, seconds: float) -> tuple[float, int]:
    """Acked publishes/s with ``window`` publishes in flight on one connection; and how many."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    acked = 0

    async def worker() -> None:
        nonlocal acked
        while loop.time() < deadline:
            await client.publish(ROOM, "rate", {"pad": "x" * 120})
            acked += 1

    began = loop.time()
    await asyncio.gather(*(worker() for _ in range(window)))
    return acked / (loop.time() - began), acked


async def ack_cost(mesh: Mesh, cfg: Config) -> dict[str, Any]:
    lat: dict[str, list[float]] = {m: [] for m in ACK_TENANTS}
    rates: dict[str, list[float]] = {m: [] for m in ACK_TENANTS}
    cpu_us: dict[str, list[float]] = {m: [] for m in ACK_TENANTS}
    clients = {m: mesh.client(A, t, "acker", cfg) for m, t in ACK_TENANTS.items()}
    for client in clients.values():
        await client.connect()
    try:
        for client in clients.values():  # warm each tenant's path, unmeasured
            await ack_latency(client, 20, "warm")
        for r in range(cfg.repeats):
            for m, client in clients.items():
                lat[m] += await ack_latency(client, cfg.ack_events, f"r{r}")
                before = cpu_seconds(mesh.server_pids)
                rate, acked = await ack_rate(client, cfg.ack_window, cfg.ack_s)
                rates[m].append(rate)
                cpu_us[m].append((cpu_seconds(mesh.server_pids) - before) / max(acked, 1) * 1e6)
    finally:
        for client in clients.values():
            await client.close()
    out: dict[str, Any] = {"gateway": A, "window": cfg.ack_window}
    for m in ACK_TENANTS:
        out[m] = {
            **summary_ms(lat[m]),
            "acked_per_s": round(statistics.median(rates[m])),
            "acked_per_s_runs": [round(x) for x in rates[m]],
            # every NATS node (3 regions + witness) and every gateway, over the windowed run
            "server_cpu_us_per_ack": round(statistics.median(cpu_us[m]), 1),
        }
    out["stored_bytes_per_event"] = await stored_size(mesh, ACK_TENANTS["home"])
    home, mirrored = out["home"], out["mirrored"]
    out["ratio_mirrored_to_home"] = {
        key: round(mirrored[key] / home[key], 2)
        for key in ("p50", "p99", "acked_per_s", "server_cpu_us_per_ack")
    }
    return out


async def stored_size(mesh: Mesh, tenant: str) -> float:
    """The primary's stored bytes per event (what a mirror copies across regions per event)."""
    nc = await nats.connect(mesh.cluster.region_urls(A))
    try:
        state = (
            await nc.jsm(timeout=10).stream_info(mesh.cluster.mesh.scheme.stream_name(tenant))
        ).state
        return round(state.bytes / max(state.messages, 1), 1)
    finally:
        await nc.close()


# -- 3. failover ------------------------------------------------------------------------------


@dataclass
class Ledger:
    """Every publish of one tenant from B's gateway: acked ids, and when each ack came."""

    tenant: str
    acked: dict[str, int] = field(default_factory=dict)  # id -> seq
    ack_times: list[float] = field(default_factory=list)
    sent_acked: list[tuple[float, float]] = field(default_factory=list)  # (first send, ack)
    failed: int = 0
    after_kill: asyncio.Event = field(default_factory=asyncio.Event)
    killed_at: float = 0.0
    warm: int = 0  # ``warmed`` is set once this many are acked
    warmed: asyncio.Event = field(default_factory=asyncio.Event)

    async def publish(self, client: Client, i: int) -> None:
        msg_id = f"{self.tenant}-{i}"
        sent = time.monotonic()
        while True:  # a publisher that retries with the same id until it is acked
            try:
                ack = await client.publish(ROOM, "ledger", {"i": i}, id=msg_id, timeout=30)
                break
            except Exception:  # any failure: resend; the id dedupes it
                self.failed += 1
        now = time.monotonic()
        self.acked[msg_id] = ack.seq
        self.ack_times.append(now)
        self.sent_acked.append((sent, now))
        if len(self.acked) >= self.warm:
            self.warmed.set()
        if self.killed_at and sent > self.killed_at:
            self.after_kill.set()

    def first_ack_sent_after(self, at: float) -> float:
        """When the first publish sent after ``at`` was acked (the end of the outage)."""
        return min(acked for sent, acked in self.sent_acked if sent > at)


async def arqonbus_cli(*args: str) -> tuple[int, str, float]:
    """The real CLI: exit code, its output with each line's time since start, duration."""
    began = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "arqonbus_server.gateway", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    lines = []
    async with asyncio.timeout(300):
        while line := await proc.stdout.readline():
            lines.append(f"[{time.monotonic() - began:6.2f}s] {line.decode().rstrip()}")
        await proc.wait()
    return proc.returncode or 0, "\n".join(lines), time.monotonic() - began


async def stored_ids(urls: list[str], stream: str) -> set[str]:
    """The envelope ids stored in ``stream`` (read by its own name, seq by seq)."""
    nc = await nats.connect(urls)
    try:
        jsm = nc.jsm(timeout=10)
        info = await jsm.stream_info(stream)
        first, last = info.state.first_seq or 1, info.state.last_seq or 0
        ids: set[str] = set()
        for chunk in range(first, last + 1, 200):
            seqs = range(chunk, min(chunk + 200, last + 1))
            msgs = await asyncio.gather(*(jsm.get_msg(stream, s, direct=True) for s in seqs))
            ids.update(str(orjson.loads(m.data or b"{}").get("id")) for m in msgs)
        return ids
    finally:
        await nc.close()


async def failover_once(mesh: Mesh, cfg: Config) -> dict[str, Any]:
    ledgers = {m: Ledger(t, warm=int(cfg.rate * 3)) for m, t in FAILOVER_TENANTS.items()}
    clients = {m: mesh.client(B, t, "ledger", cfg) for m, t in FAILOVER_TENANTS.items()}
    for client in clients.values():
        await client.connect()
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []

    async def load(mode: str) -> None:
        loop, i = asyncio.get_running_loop(), 0
        start = loop.time()
        while not stop.is_set():
            tasks.append(asyncio.create_task(ledgers[mode].publish(clients[mode], i)))
            i += 1
            with contextlib.suppress(TimeoutError):  # pacing: wake on stop, or the next slot
                await asyncio.wait_for(stop.wait(), max(0, start + i / cfg.rate - loop.time()))

    pumps = [asyncio.create_task(load(m)) for m in ledgers]
    try:
        warmed = (ledger.warmed.wait() for ledger in ledgers.values())
        await asyncio.wait_for(asyncio.gather(*warmed), 60)  # 3 s of steady acks first
        killed = time.monotonic()
        for ledger in ledgers.values():
            ledger.killed_at = killed
        await asyncio.gather(mesh.cluster.kill_region(A), _kill(mesh.gateways[A].proc))
        tools: dict[str, Any] = {}
        for mode, tenant in FAILOVER_TENANTS.items():  # one at a time: see docs/regions.md
            tool_start = time.monotonic()
            code, out, took = await arqonbus_cli(
                "mesh", "failover", tenant, "--to", B, "--nats", mesh.urls(B)
            )
            tools[mode] = {"exit": code, "tool_s": round(took, 2), "output": out,
                           "started": tool_start}  # fmt: skip
            if code != 0:
                raise RuntimeError(f"mesh failover {tenant} failed:\n{out}")
        recovered = {
            m: await _within(ledger.after_kill, RECOVERY_S) for m, ledger in ledgers.items()
        }
        stop.set()
        await asyncio.gather(*pumps)
        if all(recovered.values()):
            await asyncio.wait_for(asyncio.gather(*tasks), RECOVERY_S)
    finally:
        stop.set()
        for task in (*pumps, *tasks):
            task.cancel()
        for client in clients.values():
            await client.close()
    out: dict[str, Any] = {"placement_bucket": await bucket_region(mesh)}
    for mode, ledger in ledgers.items():
        stream = mirror_stream_name(mesh.cluster.mesh.scheme, B, ledger.tenant)
        have = await stored_ids(mesh.cluster.region_urls(B), stream)
        first_after = ledger.first_ack_sent_after(killed) if recovered[mode] else None
        out[mode] = {
            "recovered": recovered[mode],
            "rto_s": round(first_after - killed, 2) if first_after else None,
            "rto_from_own_command_s": (
                round(first_after - tools[mode]["started"], 2) if first_after else None
            ),
            "failover_tool_s": tools[mode]["tool_s"],
            "acked": len(ledger.acked),
            "acked_before_kill": sum(1 for t in ledger.ack_times if t <= killed),
            "acked_missing": sorted(set(ledger.acked) - have, key=lambda s: int(s.split("-")[1])),
            "publish_failures_retried": ledger.failed,
            "tool_output": tools[mode]["output"],
        }
        out[mode]["lost"] = len(out[mode]["acked_missing"])
    return out


async def _within(event: asyncio.Event, timeout: float) -> bool:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        return False
    return True


async def bucket_region(mesh: Mesh) -> dict[str, Any]:
    """Where each region's copy of the placement records is after the failover (B's view)."""
    nc = await nats.connect(mesh.cluster.region_urls(B))
    try:
        copies: dict[str, Any] = {}
        for region in (A, B, C):
            name = "KV_" + mesh.cluster.mesh.scheme.kv_bucket(placement_kind(region))
            try:
                info = await nc.jsm(timeout=5).stream_info(name)
            except Exception as exc:  # the lost region's copy may not answer
                copies[region] = {"stream": name, "error": type(exc).__name__}
                continue
            where = info.cluster
            copies[region] = {"stream": name, "cluster": where.name if where else None,
                              "leader": where.leader if where else None}  # fmt: skip
        return copies
    finally:
        await nc.close()


async def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await proc.wait()


# -- the run ----------------------------------------------------------------------------------


async def run(cfg: Config) -> dict[str, Any]:
    results: dict[str, Any] = {"config": {k: v for k, v in cfg.__dict__.items()}}
    plan = [B] * cfg.failovers + [A] * cfg.failovers_bucket_in_home
    groups: dict[str, list[dict[str, Any]]] = {"provisioned_via_b": [], "provisioned_via_a": []}
    for n, provision_from in enumerate(plan):
        work = Path(tempfile.mkdtemp(prefix="arqonbus-bench-regions-"))
        mesh = await start_mesh(cfg, work, provision_from)
        try:
            if n == 0:
                pairs = ((A, A), (A, B), (B, C))
                log.info("publish -> deliver at %g msgs/s", cfg.rate)
                results["latency"] = [await deliver_latency(mesh, cfg, p, s) for p, s in pairs]
                log.info("acks: mirrored against acks: home")
                results["acks"] = await ack_cost(mesh, cfg)
            log.info(
                "failover %d of %d (provisioned through %s's servers)",
                n + 1,
                len(plan),
                provision_from,
            )
            run = await failover_once(mesh, cfg)
        finally:
            await stop_mesh(mesh)
        run["provisioned_from"] = provision_from
        groups["provisioned_via_a" if provision_from == A else "provisioned_via_b"].append(run)
        if all(run[m]["recovered"] for m in FAILOVER_TENANTS):
            shutil.rmtree(work, ignore_errors=True)
        else:
            run["kept_for_a_look"] = str(work)  # the gateways' logs and NATS data
    results["failover"] = {
        name: {"runs": runs, **failover_medians(runs)} for name, runs in groups.items() if runs
    }
    return results


def failover_medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in FAILOVER_TENANTS:
        picked = [r[mode] for r in runs if r[mode]["recovered"]]
        if not picked:
            out[mode] = {"recovered_runs": 0, "runs": len(runs)}
            continue
        out[mode] = {
            "recovered_runs": len(picked),
            "rto_s_median": round(statistics.median(r["rto_s"] for r in picked), 2),
            "rto_from_own_command_s_median": round(
                statistics.median(r["rto_from_own_command_s"] for r in picked), 2
            ),
            "failover_tool_s_median": round(
                statistics.median(r["failover_tool_s"] for r in picked), 2
            ),
            "lost_median": statistics.median(r["lost"] for r in picked),
            "lost_runs": [r["lost"] for r in picked],
            "acked_runs": [r["acked"] for r in picked],
        }
    return out


def table(results: dict[str, Any]) -> str:
    lines = ["publish -> deliver (ms, loopback lower bound)", "  pub -> sub   p50 / p99 / p99.9"]
    for row in results["latency"]:
        lines.append(
            f"  {row['publisher']:>5} -> {row['subscriber']:<5} "
            f"{row['p50']} / {row['p99']} / {row['p99.9']}  (n={row['n']}, {row['rate']:g}/s)"
        )
    acks = results["acks"]
    lines.append("publish -> ack on A's gateway (ms p50 / p99) and acked/s (one connection)")
    for mode in ("home", "mirrored"):
        row = acks[mode]
        lines.append(
            f"  acks: {mode:<9} {row['p50']} / {row['p99']}   {row['acked_per_s']}/s   "
            f"{row['server_cpu_us_per_ack']} us server CPU per ack"
        )
    lines.append(f"  mirrored / home: {acks['ratio_mirrored_to_home']}")
    for group, rows in results["failover"].items():
        lines.append(f"failover of region A, placement {group.replace('_', ' ')} (medians)")
        for mode in FAILOVER_TENANTS:
            row = rows[mode]
            if "rto_s_median" not in row:
                lines.append(f"  acks: {mode:<9} no ack on B's gateway within {RECOVERY_S:g} s")
                continue
            lines.append(
                f"  acks: {mode:<9} RTO {row['rto_s_median']} s from the kill, "
                f"{row['rto_from_own_command_s_median']} s from its failover command (tool "
                f"{row['failover_tool_s_median']} s); acked lost per run {row['lost_runs']} "
                f"of {row['acked_runs']} acked; recovered {row['recovered_runs']}/{len(rows['runs'])}"
            )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a short run that checks the harness")
    parser.add_argument("--nodes", type=int, default=3, help="NATS nodes per region")
    parser.add_argument("--failovers", type=int, default=2)
    parser.add_argument(
        "--failovers-bucket-in-home", type=int, default=1,
        help="more failover runs provisioned through the failed region's servers",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=None, help="default: bench/results/, .bench-smoke/ with --smoke"
    )
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("arqonbus", "nats", "websockets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cfg = Config(
        nodes=args.nodes, failovers=args.failovers,
        failovers_bucket_in_home=args.failovers_bucket_in_home,
    )  # fmt: skip
    if args.smoke:
        cfg = Config(nodes=args.nodes, latency_s=2, ack_events=50, ack_s=1, repeats=1,
                     failovers=1, failovers_bucket_in_home=0, smoke=True)  # fmt: skip
    started, load_before = time.monotonic(), os.getloadavg()
    results = asyncio.run(run(cfg))
    # The machine may be shared: its load says how much else ran beside the bench.
    results["machine"] = {
        **machine(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }
    results["command"] = "make bench-regions" + (" ARGS=--smoke" if args.smoke else "")
    results["date"] = datetime.now(UTC).isoformat(timespec="seconds")
    results["wall_s"] = round(time.monotonic() - started, 1)
    out = args.out or (REPO / ".bench-smoke" if args.smoke else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%SZ")
    path = out / f"{stamp}-regions.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"wrote {path} ({results['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
