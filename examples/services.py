"""Example 4: command/response between services.

A database service registers a handler for ``status`` on ``services/database``. An API
service, connected to another gateway, sends ``status`` commands and gets the answers. Start
several database services and the commands are spread across them; stop them all and the
API gets ``no_responders`` at once.

    make run                                                   # terminal 1
    .venv/bin/python examples/services.py db --name db_1        # terminal 2 (gateway :8766)
    .venv/bin/python examples/services.py api --calls 5         # terminal 3 (gateway :8765)

Or both at once: ``.venv/bin/python examples/services.py demo``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import time

from arqonbus import Client, CommandFailed, CommandRequest, NoResponders

DEFAULT_URLS = "ws://127.0.0.1:8765/ws,ws://127.0.0.1:8766/ws"
ROOM, CHANNEL = "services", "database"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=("db", "api", "demo"))
    parser.add_argument("--name", default="db_service", help="db: the service's principal")
    parser.add_argument("--calls", type=int, default=3, help="api: status commands to send")
    parser.add_argument("--url", default=os.environ.get("ARQONBUS_URL", DEFAULT_URLS))
    parser.add_argument("--tenant", default=os.environ.get("ARQONBUS_TENANT", "demo"))
    return parser.parse_args()


class Database:
    """A stand-in for a real database's connection pool."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.max_connections = 100
        self.rng = random.Random(name)

    def status(self, check: str) -> dict[str, object]:
        if check not in ("connection_pool", "replication"):
            raise CommandFailed(
                "unknown_check", f"unknown check {check!r}: use connection_pool or replication"
            )
        if check == "replication":
            return {"service": self.name, "replica_lag_ms": self.rng.randint(0, 40)}
        return {
            "service": self.name,
            "active_connections": self.rng.randint(5, 40),
            "max_connections": self.max_connections,
            "avg_response_time_ms": round(self.rng.uniform(1, 5), 1),
        }


async def run_db(client: Client, name: str, ready: asyncio.Event, stop: asyncio.Event) -> None:
    database = Database(name)

    async def status(request: CommandRequest) -> dict[str, object]:
        check = str(request.parameters.get("check", "connection_pool"))
        print(f"{name}: status({check}) from {request.from_}", flush=True)
        return database.status(check)

    await client.register_handler(ROOM, CHANNEL, "status", status)
    print(f"{name}: serving status on {ROOM}/{CHANNEL}", flush=True)
    ready.set()
    await stop.wait()


async def run_api(client: Client, calls: int) -> None:
    for n in range(calls):
        check = "replication" if n % 3 == 2 else "connection_pool"
        started = time.perf_counter()
        try:
            result = await client.command(ROOM, CHANNEL, "status", {"check": check}, timeout=5)
        except NoResponders:
            print(
                "api: no database service is running; start one with: examples/services.py db",
                flush=True,
            )
            return
        took = (time.perf_counter() - started) * 1000
        print(
            f"api: status({check}) -> {json.dumps(result, sort_keys=True)}  [{took:.1f} ms]",
            flush=True,
        )
    try:
        await client.command(ROOM, CHANNEL, "status", {"check": "disk"}, timeout=5)
    except CommandFailed as exc:
        print(f"api: status(disk) -> error {exc.code}: {exc.message}", flush=True)


async def main() -> None:
    args = parse_args()
    urls = args.url.split(",")
    other = urls[1:] + urls[:1]
    if args.role == "api":
        async with Client(urls, token=f"dev:{args.tenant}:api_service") as client:
            await run_api(client, args.calls)
        return
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    ready = asyncio.Event()
    if args.role == "db":
        async with Client(other, token=f"dev:{args.tenant}:{args.name}") as client:
            await run_db(client, args.name, ready, stop)
        return
    async with (
        Client(other, token=f"dev:{args.tenant}:db_service") as db,
        Client(urls, token=f"dev:{args.tenant}:api_service") as api,
    ):
        server = asyncio.create_task(run_db(db, "db_service", ready, stop))
        await ready.wait()
        await run_api(api, args.calls)
        stop.set()
        await server


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
