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
import selectors
import stat
import sys
from collections.abc import AsyncGenerator

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


def _pollable(fd: int) -> bool:
    """Whether the event loop can wait for ``fd`` to be readable: a pipe, socket or terminal.

    A regular file or /dev/null cannot be watched (epoll refuses them with EPERM, and the loop
    would never see their end) but never blocks either: those are read directly.
    """
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode)):
        return False
    with selectors.DefaultSelector() as selector:
        try:
            selector.register(fd, selectors.EVENT_READ)
        except OSError:  # e.g. /dev/null: a character device that cannot be polled
            return False
    return True


async def stdin_lines() -> AsyncGenerator[str, None]:
    """The non-blank lines of stdin, without blocking the event loop; ends at end of input.

    Works with stdin from a terminal, a pipe, a file or /dev/null (no stdin: no lines).
    """
    try:
        fd = sys.stdin.fileno()
        watch = _pollable(fd)
    except (AttributeError, OSError, ValueError):  # no stdin at all (None or closed)
        return
    if not watch:
        for raw in sys.stdin.buffer:
            line = raw.decode(errors="replace").rstrip("\r\n")
            if line.strip():
                yield line
        return
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    was_blocking = os.get_blocking(fd)
    # A copy of the descriptor: closing the transport must not close sys.stdin.
    pipe = os.fdopen(os.dup(fd), "rb", buffering=0)
    try:
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
    except BaseException:
        pipe.close()
        raise
    try:
        while raw := await reader.readline():
            line = raw.decode(errors="replace").rstrip("\r\n")
            if line.strip():
                yield line
    finally:
        transport.close()
        # The loop made the descriptor non-blocking; a terminal shares that flag with the
        # shell, which would then fail its reads (EAGAIN): give it back as it was.
        with contextlib.suppress(OSError):
            os.set_blocking(fd, was_blocking)


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
        try:
            async with contextlib.aclosing(stdin_lines()) as lines:
                async for line in lines:
                    await client.publish(args.room, args.channel, {"message": line})
            if args.exit_after:
                await heard.wait()
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
            await subscription.close()
        print(f"* {args.name} left", flush=True)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
