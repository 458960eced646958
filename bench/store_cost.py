"""The store's own cost per event, feature by feature: atomic batches straight from one
client (the gateway's batch publisher, mesh/batch.py) into a 3-node R3 cluster, into a
tenant stream as the gateway makes it (mesh/streams.py) and into the same stream without
one feature at a time, in batches as a busy lane of the gateway sends them (1,000 events, 4
in flight: mesh/ingest.py). For each run: events stored per second and the CPU the 3 NATS
nodes (and this client) spent per event, from /proc over the run. The variants are
interleaved round by round.

    .venv/bin/python -m bench.store_cost --rounds 3

What each feature costs is what the gateway cannot take off the store's share of the
machine: the dedupe by ``Nats-Msg-Id`` and the RePublish to the live subject are
guarantees (docs/performance.md, "The store's cost per event, by feature").
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import os
import shutil
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import orjson

from arqonbus_server.mesh.batch import BatchPublisher
from arqonbus_server.mesh.local import LocalCluster
from arqonbus_server.mesh.nats_client import FastHeaderClient, header_line
from arqonbus_server.mesh.streams import StreamPolicy, tenant_stream_config
from arqonbus_server.shared.subjects import ChannelRef, SubjectScheme
from bench.run import cpu_seconds

log = logging.getLogger("bench.store_cost")

SCHEME = SubjectScheme("arq")
# A stored envelope of the size the ingest workloads store (about 230 bytes).
BODY = orjson.dumps(
    {
        "version": 1,
        "id": "p1234567",
        "type": "event",
        "room": "bench",
        "channel": "i1",
        "from": "user:bench",
        "timestamp": "2026-12-07T22:00:00.000Z",
        "payload": {"t": 1_765_000_000_000_000_000, "pad": "x" * 64},
    }
)


@dataclass(frozen=True)
class Variant:
    republish: bool = True  # RePublish to the live subject (the gateways' live path)
    dedupe_ids: bool = True  # a Nats-Msg-Id per event (idempotent resends)
    msg_ttl: bool = True  # allow_msg_ttl (rooms' own retention)


VARIANTS = {
    "as the gateway makes it": Variant(),
    "without RePublish": Variant(republish=False),
    "without Nats-Msg-Id": Variant(dedupe_ids=False),
    "without allow_msg_ttl": Variant(msg_ttl=False),
    "without all three": Variant(False, False, False),
}


async def one_run(
    nc: FastHeaderClient,
    nodes: list[int],
    variant: Variant,
    duration: float,
    batch: int,
    in_flight: int,
) -> dict[str, float]:
    tenant = "s" + uuid.uuid4().hex[:10]
    config = tenant_stream_config(SCHEME, tenant, StreamPolicy(), 3)
    if not variant.republish:
        config.republish = None
    if not variant.msg_ttl:
        config.allow_msg_ttl = None
    js = nc.jetstream()
    await js.add_stream(config)
    publisher = BatchPublisher(nc, 10.0)
    subject = SCHEME.ingest(ChannelRef(tenant, "bench", "i1"))
    numbers = iter(range(1, 1 << 62))

    def messages() -> list[tuple[str, bytes, bytes]]:
        out = []
        for _ in range(batch):
            key = hashlib.sha256(b"%d" % next(numbers)).hexdigest()
            lines = header_line("Nats-Msg-Id", key) if variant.dedupe_ids else b""
            out.append((subject, BODY, lines))
        return out

    stored = 0

    async def lane(deadline: float) -> None:
        nonlocal stored
        while time.monotonic() < deadline:
            results = await publisher.publish_batch(messages())
            stored += len(results)  # after the await: the lanes add to it in turn

    try:
        await publisher.start()
        await publisher.publish_batch(messages())  # the stream's leader is elected
        nats_before, own_before = cpu_seconds(nodes), cpu_seconds([os.getpid()])
        started = time.monotonic()
        deadline = started + duration
        async with asyncio.TaskGroup() as lanes:  # one failing lane stops the others
            for _ in range(in_flight):
                lanes.create_task(lane(deadline))
        elapsed = time.monotonic() - started
        if not stored:
            raise RuntimeError(f"nothing was stored in {elapsed:.1f} s")
        return {
            "stored_s": stored / elapsed,
            "nats_us": (cpu_seconds(nodes) - nats_before) / stored * 1e6,
            "client_us": (cpu_seconds([os.getpid()]) - own_before) / stored * 1e6,
        }
    finally:
        await publisher.close()
        await js.delete_stream(SCHEME.stream_name(tenant))


async def main(
    rounds: int, duration: float, batch: int, in_flight: int
) -> dict[str, list[dict[str, float]]]:
    work = Path(tempfile.mkdtemp(prefix="arqonbus-store-"))
    cluster = LocalCluster(work / "nats", nodes=3)
    nc = FastHeaderClient()
    runs: dict[str, list[dict[str, float]]] = {}
    try:
        await cluster.start(timeout=60)
        nodes = [pid for pid in cluster.pids if pid is not None]
        await nc.connect(cluster.url_csv.split(","))
        for number in range(1, rounds + 1):
            for name, variant in VARIANTS.items():
                run = await one_run(nc, nodes, variant, duration, batch, in_flight)
                runs.setdefault(name, []).append(run)
                log.info(
                    "round %d, %s: %.0f stored/s; CPU µs per event: NATS %.1f, client %.1f",
                    number, name, run["stored_s"], run["nats_us"], run["client_us"],
                )  # fmt: skip
    finally:
        await nc.close()
        await cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    return runs


def summarize(runs: dict[str, list[dict[str, float]]]) -> None:
    base = statistics.median(r["nats_us"] for r in runs["as the gateway makes it"])
    print(f"{'stream':<26} {'stored/s':>9} {'NATS µs/event':>14} {'saved':>6}  NATS µs, rounds")
    for name, results in runs.items():
        nats = statistics.median(r["nats_us"] for r in results)
        rate = statistics.median(r["stored_s"] for r in results)
        each = ", ".join(f"{r['nats_us']:.1f}" for r in results)
        print(f"{name:<26} {rate:>9,.0f} {nats:>14.1f} {base - nats:>6.1f}  {each}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="bench.store_cost")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--batch", type=int, default=1000, help="events per atomic batch")
    parser.add_argument("--in-flight", type=int, default=4, help="batches in flight")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("arqonbus", "nats"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    summarize(asyncio.run(main(args.rounds, args.duration, args.batch, args.in_flight)))
