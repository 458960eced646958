"""Example 2: a telemetry dashboard in the terminal.

Several services publish metrics to ``integriguard/telemetry-stream``; one dashboard
subscribes and shows the latest value of every metric of every service.

    make run                                                    # terminal 1
    .venv/bin/python examples/telemetry.py service --name api    # terminal 2
    .venv/bin/python examples/telemetry.py service --name worker # terminal 3
    .venv/bin/python examples/telemetry.py dashboard             # terminal 4

Or everything at once: ``.venv/bin/python examples/telemetry.py demo``.
A dashboard started late (or restarted) catches up from the store with ``--since 0``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sys
import time

from arqonbus import Client, Event, Gap

DEFAULT_URLS = "ws://127.0.0.1:8765/ws,ws://127.0.0.1:8766/ws"
ROOM, CHANNEL = "integriguard", "telemetry-stream"
METRICS = ("active_clients", "cpu_percent", "queue_depth")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=("service", "dashboard", "demo"))
    parser.add_argument("--name", default="svc", help="service name (service role)")
    parser.add_argument("--count", type=int, default=0, help="samples to publish; 0 = forever")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("--samples", type=int, default=0, help="dashboard: exit after N; 0 = never")
    parser.add_argument("--since", type=int, default=None, help="dashboard: replay after this seq")
    parser.add_argument("--region", default="eu-west-1")
    parser.add_argument("--url", default=os.environ.get("ARQONBUS_URL", DEFAULT_URLS))
    parser.add_argument("--tenant", default=os.environ.get("ARQONBUS_TENANT", "demo"))
    return parser.parse_args()


async def run_service(args: argparse.Namespace, name: str, url: list[str]) -> None:
    """Publish one sample of each metric per interval, as in the seed's telemetry event."""
    rng = random.Random(name)
    async with Client(url, token=f"dev:{args.tenant}:{name}") as client:
        sent = 0
        while not args.count or sent < args.count:
            for metric in METRICS:
                value = (
                    round(rng.uniform(0, 100), 1)
                    if metric == "cpu_percent"
                    else rng.randint(0, 500)
                )
                await client.publish(
                    ROOM,
                    CHANNEL,
                    {
                        "metric": metric,
                        "value": value,
                        "labels": {"service": name, "tenant": args.tenant, "region": args.region},
                    },
                )
            sent += 1
            if not args.count or sent < args.count:
                await asyncio.sleep(args.interval)  # the sampling period, not synchronisation


class Board:
    """The latest value per (service, metric), drawn as a table."""

    def __init__(self) -> None:
        self.latest: dict[str, dict[str, object]] = {}
        self.samples = 0
        self.last_seq = 0
        self.started = time.monotonic()

    def update(self, event: Event) -> None:
        labels = event.payload.get("labels") or {}
        service = str(labels.get("service", event.from_))
        self.latest.setdefault(service, {})[str(event.payload.get("metric"))] = event.payload.get(
            "value"
        )
        self.samples += 1
        self.last_seq = event.seq

    def render(self) -> str:
        width = 14
        lines = [
            f"ArqonBus telemetry  {ROOM}/{CHANNEL}  samples={self.samples}  last seq={self.last_seq}",
            "service".ljust(width) + "".join(m.rjust(width) for m in METRICS),
        ]
        for service in sorted(self.latest):
            row = self.latest[service]
            lines.append(
                service.ljust(width) + "".join(str(row.get(m, "-")).rjust(width) for m in METRICS)
            )
        return "\n".join(lines)


async def run_dashboard(
    args: argparse.Namespace, url: list[str], ready: asyncio.Event | None = None
) -> None:
    board = Board()
    live = sys.stdout.isatty()
    async with (
        Client(url, token=f"dev:{args.tenant}:dashboard") as client,
        client.subscribe(ROOM, CHANNEL, since_seq=args.since) as subscription,
    ):
        print("dashboard: waiting for metrics", flush=True)
        if ready is not None:
            ready.set()
        async for item in subscription:
            if isinstance(item, Gap):
                print(f"dashboard: samples after seq {item.after_seq} expired", flush=True)
                continue
            board.update(item)
            if live:
                print("\x1b[H\x1b[2J" + board.render(), flush=True)
            if args.samples and board.samples >= args.samples:
                break
    if not live:
        print(board.render(), flush=True)


async def main() -> None:
    args = parse_args()
    urls = args.url.split(",")
    if args.role == "service":
        await run_service(args, args.name, urls)
    elif args.role == "dashboard":
        await run_dashboard(args, urls)
    else:
        # Two services on different gateways, one dashboard; it stops after all their samples.
        args.count = args.count or 5
        args.interval = min(args.interval, 0.2)
        args.samples = 2 * args.count * len(METRICS)
        ready = asyncio.Event()
        dashboard = asyncio.create_task(run_dashboard(args, urls, ready))
        await ready.wait()
        rotated = [urls[i % len(urls) :] + urls[: i % len(urls)] for i in range(2)]
        await asyncio.gather(
            *(run_service(args, n, u) for n, u in zip(("api", "worker"), rotated, strict=True))
        )
        await dashboard


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
