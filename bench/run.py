"""``make bench`` / ``make bench-smoke``: ArqonBus against its peers, in one run.

Starts a real 3-node JetStream cluster (``sync_interval: always``), ArqonBus gateway
processes and the peers (python-socketio, Node socket.io, nats-server's WebSocket
listener), drives them with load generator processes (bench/loadgen.py, picows), and writes
``bench/results/<date>.md`` and ``.json``, PNG plots, and the table in docs/performance.md.

Every figure is the median of ``--repeats`` runs; ratios compare ArqonBus with each peer
measured in the same run, because absolute numbers on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from arqonbus_server.gateway.admin.dev import http_get, http_status
from arqonbus_server.mesh.local import LocalCluster, free_port, free_port_run
from bench.loadgen import percentile_us
from bench.phases import Hist, add, delta, scrape_batches, scrape_phases, summary

log = logging.getLogger("bench")
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- processes ------------------------------------------------------------------------


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / CLK_TCK


def raise_nofile() -> None:
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class Gateway:
    port: int
    proc: asyncio.subprocess.Process

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def pid(self) -> int:
        return self.proc.pid


def _default_environ() -> dict[str, str]:
    """This process's environment without anything that switches tracing or metrics.

    The bench measures the gateway's defaults (metrics on, tracing off) unless a
    configuration says otherwise, whatever OTEL_* the shell running it has set.
    """
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("OTEL_") and k not in ("ARQONBUS_TRACING", "ARQONBUS_METRICS")
    }


async def start_gateway(
    nats_urls: str,
    index: int,
    log_dir: Path,
    extra_env: dict[str, str] | None = None,
    workers: int = 1,
) -> Gateway:
    """One gateway process; with ``workers`` above 1, ``--workers`` (ready once each is)."""
    port = free_port()
    admin = free_port_run(workers)
    env = {
        **_default_environ(),
        "ARQONBUS_LOG_LEVEL": "WARNING",
        "ARQONBUS_SEND_BUFFER_BYTES": str(8 << 20),
        # A benchmark measures the bus, not the limits: one connection sends 100k msgs/s.
        "ARQONBUS_MSG_RATE_PER_CONN": "0",
        "ARQONBUS_BYTES_RATE_PER_CONN": "0",
        "ARQONBUS_INSECURE_DEV_AUTH": "true",  # dev tokens on 127.0.0.1
        "ARQONBUS_WORKERS": str(workers),
        "ARQONBUS_WORKER_ADMIN_PORT": str(admin),
        **(extra_env or {}),
    }
    with (log_dir / f"gw{index}.log").open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "arqonbus_server.gateway", "gateway", "--nats", nats_urls,
            "--listen", f"127.0.0.1:{port}", "--auth", "dev", "--node-id", f"gw{index}",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=err,
            env=env, cwd=REPO, start_new_session=True, preexec_fn=raise_nofile,
        )  # fmt: skip
    ready_ports = [admin + i for i in range(workers)] if workers > 1 else [port]
    async with asyncio.timeout(60):
        while any([await http_status("127.0.0.1", p, "/readyz") != 200 for p in ready_ports]):
            if proc.returncode is not None:
                raise RuntimeError(f"gateway {index} exited: see {log_dir}/gw{index}.log")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 0.1)
    return Gateway(port, proc)


async def stop_process(proc: asyncio.subprocess.Process, timeout: float = 20) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


class Loadgen:
    """One bench/loadgen.py process, talking JSON lines over its stdin and stdout."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, *args: str, tenant: str) -> Loadgen:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.loadgen", *args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, cwd=REPO, start_new_session=True,
            env={**os.environ, "BENCH_TENANT": tenant}, preexec_fn=raise_nofile,
        )  # fmt: skip
        return cls(proc)

    async def read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            err = b""
            if self.proc.stderr is not None:
                err = await self.proc.stderr.read()
            raise RuntimeError(f"load generator exited: {err.decode(errors='replace')[-2000:]}")
        result: dict[str, Any] = orjson.loads(line)
        return result

    def send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(orjson.dumps(obj) + b"\n")

    async def close(self) -> None:
        await stop_process(self.proc, 10)


# -- workloads ----------------------------------------------------------------------------


@dataclass
class Target:
    """A server under test: how to reach it and which processes to measure."""

    name: str
    proto: str
    pub_url: str
    sub_urls: list[str]
    pids: list[int]
    # The store behind it (ArqonBus: the NATS nodes), measured apart: server CPU per
    # delivery is reported for the target's own processes and with its store.
    store_pids: list[int] = field(default_factory=list)
    # A gateway whose sampled phase timings to read (bench/phases.py); 0: none.
    phase_port: int = 0


@dataclass
class Config:
    channels: int = 10
    subs_per_channel: int = 100
    sub_procs: int = 2
    duration: float = 5.0
    sweep: list[float] = field(default_factory=lambda: [100, 300, 1000, 3000])
    saturate_rate: float = 100_000
    saturate_count: int = 4000
    latency_rate: float = 20_000
    repeats: int = 3
    idle_n: int = 50_000
    ingest_conns: int = 50
    ingest_window: int = 100
    ingest_batch: int = 50  # events per events frame in the batched ingest runs
    one_conn_window: int = 4000  # one publishing connection: as nats-py's publish_async
    one_conn_batch: int = 100
    replay_events: int = 100_000
    smoke: bool = False


# What each gateway counted of its connections: tells a welcome never sent from one lost.
_COUNTS = (
    "arqonbus_connections ",
    "arqonbus_sessions ",
    "arqonbus_connections_opened_total",
    'arqonbus_frames_sent_total{type="welcome"}',
    'arqonbus_rate_limited_total{scope="pending_handshake"}',
)


async def gateway_counts(urls: list[str]) -> str:
    """The connection, session and welcome counters of the gateways behind ``urls``."""
    found = []
    for url in urls:
        port = int(url.split(":")[2].split("/")[0])
        try:
            _, body = await http_get("127.0.0.1", port, "/metrics")
        except OSError as exc:
            found.append(f"{url}: /metrics not read: {exc}")
            continue
        lines = [line for line in body.decode().splitlines() if line.startswith(_COUNTS)]
        found.append(f"{url}: " + "; ".join(lines))
    return "\n".join(found)


async def fanout_once(
    target: Target, cfg: Config, rate: float, tenant: str, count: int = 0, subs: int = 0
) -> dict[str, Any]:
    """One publisher, ``subs`` subscribers per channel (default: the config's)."""
    channels = ",".join(f"c{i}" for i in range(cfg.channels))
    total = cfg.channels * (subs or cfg.subs_per_channel)
    per_proc = [
        total // cfg.sub_procs + (1 if i < total % cfg.sub_procs else 0)
        for i in range(cfg.sub_procs)
    ]
    procs: list[Loadgen] = []
    try:
        for i, conns in enumerate(per_proc):
            # Each process takes whole channels' worth of subscribers, spread over the URLs.
            src = ",".join(f"127.0.0.{2 + i * 4 + k}" for k in range(4))
            procs.append(
                await Loadgen.start(
                    "sub",
                    "--proto",
                    target.proto,
                    "--urls",
                    ",".join(target.sub_urls),
                    "--channels",
                    channels,
                    "--conns",
                    str(conns),
                    "--src-ips",
                    src,
                    "--index",
                    str(i),
                    tenant=tenant,
                )
            )
        retried = 0  # upgrades the subscribers retried (the server closed them unanswered)
        for sub in procs:
            try:
                retried += (await sub.read(120)).get("retried", 0)
            except RuntimeError as exc:
                if target.proto != "arq":
                    raise
                raise RuntimeError(f"{exc}\n{await gateway_counts(target.sub_urls)}") from None
        phases_before = await scrape_phases(target.phase_port) if target.phase_port else None
        cpu_before = cpu_seconds(target.pids)
        store_before = cpu_seconds(target.store_pids)
        pub = await Loadgen.start(
            "pub", "--proto", target.proto, "--urls", target.pub_url, "--channels", channels,
            "--rate", str(rate), "--duration", str(cfg.duration), "--count", str(count),
            tenant=tenant,
        )  # fmt: skip
        try:
            pub_stats = await pub.read(cfg.duration + 120)
        finally:
            await pub.close()
        expect = {c: n for c, n in pub_stats["per_channel"].items()}
        for sub in procs:
            sub.send({"expect": expect, "timeout": 60})
        results = [await sub.read(90) for sub in procs]
        cpu = cpu_seconds(target.pids) - cpu_before
        store_cpu = cpu_seconds(target.store_pids) - store_before
        phase_hist: Hist | None = None
        if phases_before is not None:
            phase_hist = delta(await scrape_phases(target.phase_port), phases_before)
    finally:
        for sub in procs:
            await sub.close()
    hist: Counter[int] = Counter()
    for r in results:
        hist.update({int(k): v for k, v in r["hist"].items()})
    deliveries = sum(r["deliveries"] for r in results)
    last_ns = max((r["last_ns"] for r in results if r["last_ns"]), default=0)
    span = max(1e-9, (last_ns - pub_stats["start_ns"]) / 1e9) if last_ns else float("nan")
    return {
        "offered_msgs_s": rate,
        "published": pub_stats["sent"],
        "acked": pub_stats["acked"],
        "deliveries": deliveries,
        "missing": sum(r["missing"] for r in results),
        "deliveries_s": deliveries / span if deliveries else 0.0,
        "cpu_us_per_delivery": cpu * 1e6 / deliveries if deliveries else float("nan"),
        # With the store's CPU (the NATS nodes, for ArqonBus; the same for store-less peers).
        "cpu_with_store_us_per_delivery": (
            (cpu + store_cpu) * 1e6 / deliveries if deliveries else float("nan")
        ),
        "p50_ms": percentile_us(hist, 0.50) / 1000,
        "p99_ms": percentile_us(hist, 0.99) / 1000,
        "p999_ms": percentile_us(hist, 0.999) / 1000,
        "errors": [e for r in results for e in r["errors"]][:3] + pub_stats["errors"][:3],
        "connect_retries": retried,
        "phase_hist": phase_hist,
    }


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = statistics.median(r[key] for r in runs)
    out["runs"] = len(runs)
    return out


async def fanout(
    target: Target, cfg: Config, rate: float, count: int = 0, subs: int = 0
) -> dict[str, Any]:
    runs = []
    for _ in range(cfg.repeats):
        tenant = "b" + uuid.uuid4().hex[:10]
        runs.append(await fanout_once(target, cfg, rate, tenant, count, subs))
    hist: Hist = {}
    for one in runs:
        hist = add(hist, one.pop("phase_hist") or {})
    result = median_of(runs)
    result["connect_retries"] = sum(one["connect_retries"] for one in runs)  # all, not a median
    if hist:  # the gateway's sampled phases over all the runs together
        result["phases"] = summary(hist)
    log.info(
        "%-22s subs %4d rate %7.0f: %9.0f deliveries/s, cpu %.2f us, p50 %.2f ms, p99 %.2f ms, missing %d",
        target.name, subs or cfg.subs_per_channel, rate, result["deliveries_s"], result["cpu_us_per_delivery"],
        result["p50_ms"], result["p99_ms"], result["missing"],
    )  # fmt: skip
    if result["connect_retries"]:
        log.info("%-22s %d subscriber upgrades retried (closed unanswered by the server)",
                 target.name, result["connect_retries"])  # fmt: skip
    return result


async def ingest(
    gateways: list[Gateway],
    cfg: Config,
    label: str = "arqonbus",
    batches: bool = True,
    conns: int = 0,
    window: int = 0,
    frame_events: int = 0,
) -> dict[str, Any]:
    """Acked publishes/s through ``gateways[0]`` over ``conns`` connections (default
    ``cfg.ingest_conns``), each with ``window`` unacked events; ``frame_events`` > 0 sends
    ``events`` frames of that many. With ``batches``, also the mean size of the store
    batches its publish lanes made (read from its /metrics: a gateway of one process)."""
    runs = []
    lanes = [0.0, 0.0]  # batches, events: over all the runs
    for _ in range(cfg.repeats):
        before = await scrape_batches(gateways[0].port) if batches else (0.0, 0.0)
        tenant = "i" + uuid.uuid4().hex[:10]
        gen = await Loadgen.start(
            "ingest", "--urls", gateways[0].url, "--conns", str(conns or cfg.ingest_conns),
            "--window", str(window or cfg.ingest_window), "--batch", str(frame_events),
            "--duration", str(cfg.duration), tenant=tenant,
        )  # fmt: skip
        try:
            r = await gen.read(cfg.duration + 120)
        finally:
            await gen.close()
        if batches:
            after = await scrape_batches(gateways[0].port)
            lanes = [lanes[0] + after[0] - before[0], lanes[1] + after[1] - before[1]]
        runs.append(
            {"acked_s": r["acked"] / r["elapsed_s"], "acked": r["acked"], "errors": r["errors"]}
        )
    result = median_of(runs)
    if lanes[0]:
        result["mean_batch"] = lanes[1] / lanes[0]
    batched = f", mean store batch {result['mean_batch']:.1f} events" if lanes[0] else ""
    log.info("ingest %s: %.0f acked/s%s", label, result["acked_s"], batched)
    return result


async def ingest_nats_direct(cluster: LocalCluster, cfg: Config) -> dict[str, Any]:
    """The floor: nats-py publish_async straight into the same kind of R3 stream."""
    from bench.natspeer import ingest_direct

    runs = [await ingest_direct(cluster.url_csv, cfg.duration) for _ in range(cfg.repeats)]
    result = median_of(runs)
    log.info("ingest nats-py direct: %.0f acked/s", result["acked_s"])
    return result


async def replay(gateways: list[Gateway], cluster: LocalCluster, cfg: Config) -> dict[str, Any]:
    from bench.natspeer import preload, replay_direct, replay_via_gateway

    runs = []
    for _ in range(cfg.repeats):
        tenant = "r" + uuid.uuid4().hex[:10]
        last_seq = await preload(cluster.url_csv, tenant, cfg.replay_events)
        gw_s = await replay_via_gateway(gateways[0].url, tenant, last_seq)
        direct_s = await replay_direct(cluster.url_csv, tenant, last_seq)
        runs.append({"events": cfg.replay_events, "arqonbus_s": gw_s, "nats_direct_s": direct_s})
    result = median_of(runs)
    log.info(
        "replay %d: arqonbus %.2f s, nats-py direct %.2f s",
        cfg.replay_events,
        result["arqonbus_s"],
        result["nats_direct_s"],
    )
    return result


# -- the cost of observability ------------------------------------------------------------

OBS_BASE = "metrics-off"


def observability_envs(sink_endpoint: str) -> dict[str, dict[str, str]]:
    """The three gateway configurations, by name: what each adds to the gateway's env."""
    return {
        "metrics-off": {"ARQONBUS_METRICS": "false"},
        "metrics-on": {},  # the default
        "metrics-tracing": {
            "ARQONBUS_TRACING": "true",
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": sink_endpoint,
            "OTEL_TRACES_SAMPLER": "always_on",  # sampling 1.0: every event traced
        },
    }


def _ratios(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    def ratio(x: float, y: float) -> float:
        return x / y if x and y else float("nan")

    return {
        "deliveries_s": ratio(a["fanout"]["deliveries_s"], b["fanout"]["deliveries_s"]),
        "cpu_us_per_delivery": ratio(
            a["fanout"]["cpu_us_per_delivery"], b["fanout"]["cpu_us_per_delivery"]
        ),
        "acked_s": ratio(a["ingest"]["acked_s"], b["ingest"]["acked_s"]),
    }


async def observability_cost(cluster: LocalCluster, cfg: Config, work: Path) -> dict[str, Any]:
    """Saturated fan-out and ingest on one gateway with metrics off, on, and on + tracing.

    Each configuration is a gateway process of its own. The rounds interleave the three
    configurations (one run each per round, ``cfg.repeats`` rounds, medians), so a change
    in the machine's load over the section hits all three alike. The traced gateway exports
    every span over OTLP/HTTP to a sink in this process (bench/otlpsink.py), which counts them.
    """
    from bench.otlpsink import OtlpSink

    sink = OtlpSink()
    envs = observability_envs(sink.endpoint)
    gws: dict[str, Gateway] = {}
    try:
        for i, (name, env) in enumerate(envs.items()):
            gws[name] = await start_gateway(cluster.url_csv, 10 + i, work, env)
        metrics_status = {
            name: await http_status("127.0.0.1", gw.port, "/metrics") for name, gw in gws.items()
        }
        once = replace(cfg, repeats=1)
        fan_runs: dict[str, list[dict[str, Any]]] = {name: [] for name in gws}
        ingest_runs: dict[str, list[dict[str, Any]]] = {name: [] for name in gws}
        for _ in range(cfg.repeats):
            for name, gw in gws.items():
                target = Target(f"arqonbus-{name}", "arq", gw.url, [gw.url], [gw.pid])
                fan_runs[name].append(
                    await fanout(target, once, cfg.saturate_rate, cfg.saturate_count)
                )
                ingest_runs[name].append(
                    await ingest([gw], once, f"arqonbus-{name}", batches=False)
                )
        # A stopped gateway drains: the traced one exports what its batch still holds.
        for gw in gws.values():
            await stop_process(gw.proc)
        received = sink.counts()
    finally:
        for gw in gws.values():
            await stop_process(gw.proc)
        sink.close()
    configs = {
        name: {
            "env": {k: v for k, v in envs[name].items() if "ENDPOINT" not in k},
            "metrics_http_status": metrics_status[name],
            "fanout": median_of(fan_runs[name]),
            "ingest": median_of(ingest_runs[name]),
        }
        for name in gws
    }
    traced = "metrics-tracing"
    events = sum(r["published"] for r in fan_runs[traced]) + sum(
        r["acked"] for r in ingest_runs[traced]
    )
    result = {
        "configs": configs,
        "ratios": {
            "metrics-on/metrics-off": _ratios(configs["metrics-on"], configs[OBS_BASE]),
            "metrics-tracing/metrics-off": _ratios(configs[traced], configs[OBS_BASE]),
            "metrics-tracing/metrics-on": _ratios(configs[traced], configs["metrics-on"]),
        },
        "spans_received": received["spans"],
        "export_requests": received["requests"],
        "bad_export_requests": received["bad"],
        "traced_events": events,
        "spans_per_event": received["spans"] / events if events else float("nan"),
    }
    log.info(
        "observability: spans received %d in %d requests, %.2f per traced event",
        received["spans"], received["requests"], result["spans_per_event"],
    )  # fmt: skip
    return result


# -- the run --------------------------------------------------------------------------------


async def run(cfg: Config, out_dir: Path) -> dict[str, Any]:
    from bench.idle import run_idle
    from bench.peers.launch import ensure_node_deps, start_peer
    from bench.presence import SMOKE as PRESENCE_SMOKE
    from bench.presence import PresenceConfig, presence_section

    work = Path(tempfile.mkdtemp(prefix="arqonbus-bench-"))
    cluster = LocalCluster(work / "nats", nodes=3)
    await cluster.start(timeout=60)
    gateways: list[Gateway] = []
    peers: list[Any] = []
    results: dict[str, Any] = {"config": cfg.__dict__}
    try:
        for i in range(3):
            gateways.append(await start_gateway(cluster.url_csv, i, work))
        ensure_node_deps()
        for kind in ("socketio-py", "socketio-node", "nats-ws"):
            peers.append(await start_peer(kind, free_port()))
        sio_py, sio_node, nats_ws = peers
        nodes = [pid for pid in cluster.pids if pid is not None]
        targets = {
            "arqonbus": Target(
                "arqonbus",
                "arq",
                gateways[0].url,
                [gateways[0].url],
                [gateways[0].pid],
                nodes,
                phase_port=gateways[0].port,
            ),
            "arqonbus-2gw": Target(
                "arqonbus-2gw",
                "arq",
                gateways[0].url,
                [gateways[1].url],
                [gateways[0].pid, gateways[1].pid],
                nodes,
            ),
            "python-socketio": Target(
                "python-socketio", "sio", sio_py.url, [sio_py.url], [sio_py.pid]
            ),
            "node-socketio": Target(
                "node-socketio", "sio", sio_node.url, [sio_node.url], [sio_node.pid]
            ),
            "nats-ws": Target("nats-ws", "natsws", nats_ws.url, [nats_ws.url], [nats_ws.pid]),
        }
        fan: dict[str, Any] = {}
        for name, target in targets.items():
            fan[name] = {
                "sweep": [await fanout(target, cfg, rate) for rate in cfg.sweep],
                "saturated": await fanout(target, cfg, cfg.saturate_rate, cfg.saturate_count),
                # The latency goal's rate, with one subscriber per channel.
                "latency": await fanout(target, cfg, cfg.latency_rate, subs=1),
            }
        results["fanout"] = fan
        scale: dict[str, Any] = {}
        for n in (1, 2, 3):
            urls = [g.url for g in gateways[:n]]
            target = Target(
                f"arqonbus-{n}gw", "arq", gateways[0].url, urls, [g.pid for g in gateways[:n]]
            )
            scale[str(n)] = await fanout(target, cfg, cfg.saturate_rate, cfg.saturate_count)
        results["scaleout"] = scale
        # The same ingest into one host's gateway with 2 worker processes (--workers 2).
        two_workers = await start_gateway(cluster.url_csv, 3, work, workers=2)
        try:
            results["ingest"] = {
                "arqonbus": await ingest(gateways, cfg),
                "arqonbus-2-workers": await ingest(
                    [two_workers], cfg, "arqonbus --workers 2", batches=False
                ),
                # The same connections and window, sending events frames.
                "arqonbus-events-frames": await ingest(
                    gateways,
                    cfg,
                    f"arqonbus, events frames of {cfg.ingest_batch}",
                    frame_events=cfg.ingest_batch,
                ),
                # One publishing connection, with nats-py's window: single events, then
                # events frames.
                "arqonbus-1-conn": await ingest(
                    gateways,
                    cfg,
                    "arqonbus, one connection",
                    conns=1,
                    window=cfg.one_conn_window,
                ),
                "arqonbus-1-conn-events-frames": await ingest(
                    gateways,
                    cfg,
                    f"arqonbus, one connection, events frames of {cfg.one_conn_batch}",
                    conns=1,
                    window=cfg.one_conn_window,
                    frame_events=cfg.one_conn_batch,
                ),
                "nats-py-direct": await ingest_nats_direct(cluster, cfg),
            }
        finally:
            await stop_process(two_workers.proc)
        results["replay"] = await replay(gateways, cluster, cfg)
        results["observability"] = await observability_cost(cluster, cfg, work)
        idle: dict[str, Any] = {}
        per_gw = -(-cfg.idle_n // 3)
        idle["arqonbus"] = await run_idle(
            "arqonbus", [(g.pid, g.url) for g in gateways], min(cfg.idle_n, per_gw * 3)
        )
        idle["python-socketio"] = await run_idle(
            "socketio-py", [(sio_py.pid, sio_py.url)], min(cfg.idle_n, 15_000)
        )
        idle["node-socketio"] = await run_idle(
            "socketio-node", [(sio_node.pid, sio_node.url)], min(cfg.idle_n, 15_000)
        )
        idle["nats-ws"] = await run_idle(
            "nats-ws", [(nats_ws.pid, nats_ws.url)], min(cfg.idle_n, 15_000)
        )
        results["idle"] = idle
        results["presence"] = await presence_section(
            cluster.url_csv, PRESENCE_SMOKE if cfg.smoke else PresenceConfig(), work
        )
    finally:
        for peer in peers:
            await peer.stop()
        for gw in gateways:
            await stop_process(gw.proc)
        await cluster.stop()
    # A failed run keeps its NATS data and gateway logs for a look; a good one leaves nothing.
    shutil.rmtree(work, ignore_errors=True)
    return results


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="a short run (< 60 s) that checks the harness"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args()


def main() -> int:
    from bench.report import write_reports

    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("arqonbus", "nats", "websockets", "picows"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cfg = Config(repeats=args.repeats)
    if args.smoke:
        cfg = Config(
            channels=2, subs_per_channel=10, sub_procs=1, duration=1.0, sweep=[200],
            saturate_rate=5000, saturate_count=500, latency_rate=1000, repeats=1, idle_n=300, ingest_conns=5, ingest_window=20,
            ingest_batch=10, one_conn_window=200, one_conn_batch=50, replay_events=2000, smoke=True,
        )  # fmt: skip
    started = time.monotonic()
    results = asyncio.run(run(cfg, args.out))
    results["machine"] = machine()
    results["command"] = "make bench-smoke" if args.smoke else "make bench"
    results["date"] = datetime.now(UTC).isoformat(timespec="seconds")
    results["wall_s"] = round(time.monotonic() - started, 1)
    problems = write_reports(results, args.out, smoke=args.smoke)
    print(json.dumps({"wall_s": results["wall_s"], "problems": problems}))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
