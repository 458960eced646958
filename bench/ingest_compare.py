"""Ingest variants side by side, interleaved round by round, on one 3-node cluster and one
gateway: single ``event`` frames and ``events`` frames, over 50 connections and over one,
against nats-py publishing straight into the same kind of R3 stream. For each run: acked
events/s and the CPU each process spent per acked event (gateway, the NATS nodes, the load
generator), from /proc over the whole run.

    .venv/bin/python -m bench.ingest_compare --rounds 3

``make bench`` reports the same workloads as medians of 3; this is the quicker tool for
trying one lever against another (docs/performance.md, "Events frames").
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from arqonbus_server.mesh.local import LocalCluster
from bench.natspeer import ingest_direct
from bench.run import Loadgen, cpu_seconds, start_gateway, stop_process

log = logging.getLogger("bench.ingest_compare")

# name -> (connections, unacked events per connection, events per frame: 0 = single events)
VARIANTS: dict[str, tuple[int, int, int]] = {
    "50 connections, single events": (50, 100, 0),
    "50 connections, events frames of 50": (50, 100, 50),
    "1 connection, single events": (1, 4000, 0),
    "1 connection, events frames of 100": (1, 4000, 100),
}


async def one_run(
    url: str, gateway_pid: int, nodes: list[int], variant: tuple[int, int, int], duration: float
) -> dict[str, float]:
    conns, window, frame_events = variant
    before = (cpu_seconds([gateway_pid]), cpu_seconds(nodes))
    gen = await Loadgen.start(
        "ingest", "--urls", url, "--conns", str(conns), "--window", str(window),
        "--batch", str(frame_events), "--duration", str(duration),
        tenant="i" + uuid.uuid4().hex[:10],
    )  # fmt: skip
    try:
        result = await gen.read(duration + 120)
        generator = cpu_seconds([gen.proc.pid])
    finally:
        await gen.close()
    acked = result["acked"] or 1
    return {
        "acked_s": result["acked"] / result["elapsed_s"],
        "gateway_us": (cpu_seconds([gateway_pid]) - before[0]) / acked * 1e6,
        "nats_us": (cpu_seconds(nodes) - before[1]) / acked * 1e6,
        "loadgen_us": generator / acked * 1e6,
        "errors": result["error_count"],
    }


async def main(rounds: int, duration: float) -> dict[str, list[dict[str, float]]]:
    work = Path(tempfile.mkdtemp(prefix="arqonbus-ingest-"))
    cluster = LocalCluster(work / "nats", nodes=3)
    await cluster.start(timeout=60)
    gateway = await start_gateway(cluster.url_csv, 0, work)
    nodes = [pid for pid in cluster.pids if pid is not None]
    runs: dict[str, list[dict[str, float]]] = {}
    try:
        for number in range(1, rounds + 1):
            for name, variant in VARIANTS.items():
                run = await one_run(gateway.url, gateway.pid, nodes, variant, duration)
                runs.setdefault(name, []).append(run)
                log.info(
                    "round %d, %s: %.0f acked/s; CPU µs per event: gateway %.1f, NATS %.1f, "
                    "load generator %.1f; %d errors", number, name, run["acked_s"],
                    run["gateway_us"], run["nats_us"], run["loadgen_us"], run["errors"],
                )  # fmt: skip
            nats_before = cpu_seconds(nodes)
            started = time.monotonic()
            direct = await ingest_direct(cluster.url_csv, duration)
            runs.setdefault("nats-py direct, 1 connection", []).append(
                {
                    "acked_s": direct["acked_s"],
                    "nats_us": (cpu_seconds(nodes) - nats_before)
                    / max(1.0, direct["acked_s"] * (time.monotonic() - started))
                    * 1e6,
                }
            )
            log.info("round %d, nats-py direct: %.0f acked/s", number, direct["acked_s"])
    finally:
        await stop_process(gateway.proc)
        await cluster.stop()
    return runs


def summarize(runs: dict[str, list[dict[str, Any]]]) -> None:
    direct = statistics.median(r["acked_s"] for r in runs["nats-py direct, 1 connection"])
    print(f"{'variant':<40} {'acked/s (median)':>16} {'/ nats-py':>9}  rounds")
    for name, results in runs.items():
        rates = [r["acked_s"] for r in results]
        median = statistics.median(rates)
        each = ", ".join(f"{rate:,.0f}" for rate in rates)
        print(f"{name:<40} {median:>16,.0f} {median / direct:>8.2f}x  {each}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="bench.ingest_compare")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("arqonbus", "nats"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    summarize(asyncio.run(main(args.rounds, args.duration)))
