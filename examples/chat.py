"""Example 1: chat without a browser.

Each participant runs this script. Lines typed on stdin are published to a room/channel;
everyone else's messages are printed as they arrive, in the same order for everyone.

    make run                                            # terminal 1: the dev mesh
    .venv/bin/python examples/chat.py --name alice      # terminal 2 (gateway :8765)
    .venv/bin/python examples/chat.py --name bob --url ws://127.0.0.1:8766/ws   # terminal 3

Ctrl-D (end of input) leaves. ``--replay`` also shows what was said before you joined.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys

from arqonbus import Client, Event, Gap

DEFAULT_URLS = "ws://127.0.0.1:8765/ws,ws://127.0.0.1:8766/ws"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="your name (the dev token's principal)")
    parser.add_argument("--room", default="science")
    parser.add_argument("--channel", default="general")
    parser.add_argument("--url", default=os.environ.get("ARQONBUS_URL", DEFAULT_URLS))
    parser.add_argument("--tenant", default=os.environ.get("ARQONBUS_TENANT", "demo"))
    parser.add_argument("--replay", action="store_true", help="show the channel's stored history")
    parser.add_argument(
        "--exit-after", type=int, default=0, help="leave after this many messages from others"
    )
    return parser.parse_args()


async def read_lines(queue: asyncio.Queue[str | None]) -> None:
    """stdin, line by line, without blocking the event loop; None at end of input."""
    loop = asyncio.get_running_loop()
    stream = asyncio.StreamReader()
    try:
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(stream), sys.stdin
        )
    except ValueError:  # stdin is a regular file: read it whole
        for line in sys.stdin.read().splitlines():
            if line.strip():
                await queue.put(line)
        await queue.put(None)
        return
    try:
        while line_bytes := await stream.readline():
            line = line_bytes.decode(errors="replace").rstrip("\n")
            if line.strip():
                await queue.put(line)
        await queue.put(None)
    finally:
        transport.close()


async def main() -> None:
    args = parse_args()
    urls = args.url.split(",")
    async with Client(urls, token=f"dev:{args.tenant}:{args.name}") as client:
        subscription = client.subscribe(
            args.room, args.channel, since_seq=0 if args.replay else None
        )
        await subscription.start()
        print(f"* {args.name} joined {args.room}/{args.channel}", flush=True)
        heard = asyncio.Event()
        counter = {"others": 0}

        async def listen() -> None:
            async for item in subscription:
                if isinstance(item, Gap):
                    print(
                        f"* messages after #{item.after_seq} expired before you read them",
                        flush=True,
                    )
                    continue
                show(item)
                if item.from_ != args.name:
                    counter["others"] += 1
                    if args.exit_after and counter["others"] >= args.exit_after:
                        heard.set()

        def show(event: Event) -> None:
            print(f"[{event.from_}] {event.payload.get('message', '')}  (#{event.seq})", flush=True)

        listener = asyncio.create_task(listen())
        lines: asyncio.Queue[str | None] = asyncio.Queue()
        reader = asyncio.create_task(read_lines(lines))
        try:
            while (line := await lines.get()) is not None:
                await client.publish(args.room, args.channel, {"message": line})
            if args.exit_after:
                await heard.wait()
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
            await subscription.close()
            reader.cancel()
        print(f"* {args.name} left", flush=True)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
