"""Two versions of the gateway side by side on one 3-node cluster, interleaved run by run,
the order swapped each round: for a change whose gain is smaller than the spread between
``make bench`` runs on a shared machine. Each version is a source tree (a checkout of the
repository, e.g. a ``git worktree`` of the commit before the change), started as its own
gateway process with that tree first on its import path.

    .venv/bin/python -m bench.ingest_ab --rounds 5 BEFORE_TREE AFTER_TREE

For each workload and version: the median of the acked events/s and of the CPU per event
of the gateway and of the NATS nodes (from /proc over each run), and in how many rounds
the second version stored more events per second than the first.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
from pathlib import Path

from arqonbus_server.mesh.local import LocalCluster
from bench.ingest_compare import VARIANTS, one_run
from bench.run import start_gateway, stop_process

log = logging.getLogger("bench.ingest_ab")

WORKLOADS = (
    "50 connections, single events",
    "50 connections, events frames of 50",
    "1 connection, events frames of 100",
)


def import_root(tree: Path, work: Path, name: str) -> str:
    """A directory whose ``arqonbus_server`` is ``tree`` (the package is the repository's
    root, as the editable install maps it), for the gateway's PYTHONPATH."""
    if not (tree / "gateway" / "__main__.py").is_file():
        raise SystemExit(f"{tree} is not a checkout of this repository (no gateway/__main__.py)")
    root = work / f"path-{name}"
    root.mkdir()
    (root / "arqonbus_server").symlink_to(tree.resolve(), target_is_directory=True)
    return str(root)


async def main(
    trees: list[Path], rounds: int, duration: float
) -> dict[str, dict[str, list[dict[str, float]]]]:
    work = Path(tempfile.mkdtemp(prefix="arqonbus-ingest-ab-"))
    names = ["before", "after"]
    roots = [import_root(tree, work, name) for tree, name in zip(trees, names, strict=True)]
    cluster = LocalCluster(work / "nats", nodes=3)
    await cluster.start(timeout=60)
    gateways = []
    runs: dict[str, dict[str, list[dict[str, float]]]] = {}
    try:
        for index, root in enumerate(roots):
            gateway = await start_gateway(
                cluster.url_csv, index, work, extra_env={"PYTHONPATH": root}
            )
            gateways.append(gateway)
        nodes = [pid for pid in cluster.pids if pid is not None]
        for number in range(rounds):
            for workload in WORKLOADS:
                order = [0, 1] if number % 2 == 0 else [1, 0]
                for which in order:
                    gateway = gateways[which]
                    run = await one_run(
                        gateway.url, gateway.pid, nodes, VARIANTS[workload], duration
                    )
                    runs.setdefault(workload, {}).setdefault(names[which], []).append(run)
                    log.info(
                        "round %d, %s, %s: %.0f acked/s; CPU µs per event: gateway %.1f, "
                        "NATS %.1f; %d errors", number + 1, workload, names[which],
                        run["acked_s"], run["gateway_us"], run["nats_us"], run["errors"],
                    )  # fmt: skip
    finally:
        for gateway in gateways:
            await stop_process(gateway.proc)
        await cluster.stop()
    return runs


def summarize(runs: dict[str, dict[str, list[dict[str, float]]]]) -> None:
    print(f"{'workload':<38} {'version':<7} {'acked/s':>8} {'gateway µs':>11} {'NATS µs':>8}")
    for workload, versions in runs.items():
        for name, results in versions.items():
            print(
                f"{workload:<38} {name:<7} "
                f"{statistics.median(r['acked_s'] for r in results):>8,.0f} "
                f"{statistics.median(r['gateway_us'] for r in results):>11.1f} "
                f"{statistics.median(r['nats_us'] for r in results):>8.1f}"
            )
        pairs = list(zip(versions["before"], versions["after"], strict=True))
        ahead = sum(after["acked_s"] > before["acked_s"] for before, after in pairs)
        print(f"{workload:<38} after ahead in {ahead} of {len(pairs)} rounds")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="bench.ingest_ab")
    parser.add_argument("before", type=Path, help="source tree of the first version")
    parser.add_argument("after", type=Path, help="source tree of the second version")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("arqonbus", "nats"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    summarize(asyncio.run(main([args.before, args.after], args.rounds, args.duration)))
