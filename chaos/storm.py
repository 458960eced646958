"""Scenario 9's client side: thousands of SDK clients in one process, for a reconnect storm.

    python -m chaos.storm --urls A,B --tenant T --clients 2500 --channels 10

Each client connects to the first URL (the gateway the scenario will kill), subscribes to one
of the channels and prints ``{"ready": N}`` once all are subscribed. When the parent writes
``kill <unix time>`` on stdin, each client waits for its first event published after that
moment (the parent publishes ticks); the process then prints ``{"resume_s": [...],
"missing": M}``, stays connected until it reads ``exit``, and exits. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import resource
import sys
import time

import orjson

from arqonbus import ArqonBusError, Client, Event

ROOM = "storm"


def _raise_open_files() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def emit(doc: dict[str, object]) -> None:
    sys.stdout.write(orjson.dumps(doc).decode() + "\n")
    sys.stdout.flush()


async def run(urls: list[str], tenant: str, count: int, channels: int, wait_s: float) -> None:
    kill_at: list[float] = []
    resumed: dict[int, float] = {}
    changed = asyncio.Condition()
    clients: list[Client] = []
    ready = 0
    slots = asyncio.Semaphore(100)  # connect in waves, like real clients spread over time

    async def one(i: int) -> None:
        nonlocal ready
        async with slots:
            client = Client(
                urls,
                f"dev:{tenant}:c{os.getpid()}-{i}",
                connect_timeout=120,
                max_backoff=1.0,
                proxy=None,  # 127.0.0.1 only: no proxy lookup at each of 5,000 reconnects
            )
            clients.append(client)
            await client.connect()
            subscription = await client.subscribe(ROOM, f"ch{i % channels}").start(timeout=120)
        async with changed:
            ready += 1
            changed.notify_all()
        with contextlib.suppress(ArqonBusError):
            async for item in subscription:
                sent = item.payload.get("t") if isinstance(item, Event) else None
                if kill_at and isinstance(sent, float) and sent >= kill_at[0]:
                    async with changed:
                        resumed[i] = time.time() - kill_at[0]
                        changed.notify_all()
                    return

    tasks = [asyncio.create_task(one(i)) for i in range(count)]
    async with asyncio.timeout(300), changed:
        await changed.wait_for(lambda: ready == count)
    # Thousands of clients share this process where real ones each have their own: every
    # full collection would walk all of them. Freeze what the set-up built, so the storm's
    # collections walk only what the reconnects allocate (a client process's own heap).
    gc.collect()
    gc.freeze()
    emit({"ready": ready})
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    word, _, value = line.partition(" ")
    if word != "kill":
        raise SystemExit(f"expected 'kill <time>' on stdin, got {line!r}")
    async with changed:
        kill_at.append(float(value))
        changed.notify_all()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait_s), changed:
            await changed.wait_for(lambda: len(resumed) == count)
    emit({"resume_s": sorted(resumed.values()), "missing": count - len(resumed)})
    # Stay connected until the parent has counted the sessions (it writes "exit").
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(120):
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos.storm")
    parser.add_argument("--urls", required=True)
    parser.add_argument("--tenant", required=True)
    parser.add_argument("--clients", type=int, default=2500)
    parser.add_argument("--channels", type=int, default=10)
    parser.add_argument("--wait", type=float, default=60.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.CRITICAL)
    _raise_open_files()
    asyncio.run(run(args.urls.split(","), args.tenant, args.clients, args.channels, args.wait))
    return 0


if __name__ == "__main__":
    sys.exit(main())
