"""python-socketio comparison peer for the ArqonBus benchmarks.

App protocol on namespace "/", websocket transport only:

* ``join(channel)``: the socket joins room ``channel`` and gets ``joined(channel)`` back.
* ``publish(channel, payload)``: ``event(payload)`` goes to every socket in room ``channel``.

Fastest async setup python-socketio offers: ``AsyncServer(async_mode="aiohttp")`` on an
aiohttp app, on uvloop when importable, handlers run inline (no task per event).

Usage: ``python bench/peers/socketio_server.py --host 127.0.0.1 --port P``; prints
``READY <port>`` once listening and exits cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any

import socketio
from aiohttp import web

# Frames of a few hundred bytes are the norm; 1 MB matches the Node peer's maxHttpBufferSize.
MAX_MESSAGE_BYTES = 1_000_000
PING_INTERVAL_S = 25  # python-socketio's and socket.io's default
PING_TIMEOUT_S = 60  # generous: a server busy fanning out must not drop clients that answered


def build_server() -> tuple[socketio.AsyncServer, web.Application]:
    sio = socketio.AsyncServer(
        async_mode="aiohttp",
        transports=["websocket"],
        logger=False,
        engineio_logger=False,
        async_handlers=False,
        max_http_buffer_size=MAX_MESSAGE_BYTES,
        http_compression=False,
        ping_interval=PING_INTERVAL_S,
        ping_timeout=PING_TIMEOUT_S,
        cors_allowed_origins="*",
    )

    async def join(sid: str, channel: Any) -> None:
        if not isinstance(channel, str):
            return
        await sio.enter_room(sid, channel)
        await sio.emit("joined", channel, to=sid)

    async def publish(sid: str, channel: Any, payload: Any = None) -> None:
        if not isinstance(channel, str):
            return
        await sio.emit("event", payload, to=channel)

    sio.on("join", join)
    sio.on("publish", publish)

    app = web.Application(client_max_size=MAX_MESSAGE_BYTES)
    sio.attach(app)
    return sio, app


async def serve(host: str, port: int) -> int:
    sio, app = build_server()
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096, reuse_address=True)
    await site.start()
    server = site._server  # the asyncio Server: the only way to learn a port-0 binding
    bound = server.sockets[0].getsockname()[1] if server is not None else port

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    print(f"READY {bound}", flush=True)
    await stop.wait()
    try:
        async with asyncio.timeout(5):
            await sio.shutdown()
    except TimeoutError:
        pass
    await runner.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="python-socketio benchmark peer")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)

    logging.disable(logging.CRITICAL)  # no per-connection/access log noise
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(args.host, args.port))
    return uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    sys.exit(main())
