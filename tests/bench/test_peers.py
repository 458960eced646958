"""The benchmark's comparison peers work end to end with a real WebSocket client.

Socket.IO is spoken by hand (Engine.IO v4 / Socket.IO v5 text frames), so these tests also
pin the wire format the load generator relies on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from bench.peers import PeerProcess, ensure_node_deps, start_peer

NPM_CI_TIMEOUT_S = 180.0


class EioClient:
    """A minimal Socket.IO v5 client over a raw WebSocket (websocket transport only)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.pings_answered = 0

    @classmethod
    async def connect(cls, url: str, timeout: float = 5.0) -> EioClient:
        ws = await websockets.connect(url, compression=None, open_timeout=timeout)
        client = cls(ws)
        try:
            async with asyncio.timeout(timeout):
                opened = await client.recv_packet()
                assert opened.startswith("0{"), opened
                handshake = json.loads(opened[1:])
                assert handshake["upgrades"] == [], handshake  # websocket only: nothing to upgrade
                assert handshake["pingInterval"] == 25000, handshake
                await ws.send("40")
                connected = await client.recv_packet()
                assert connected.startswith("40{"), connected
                assert "sid" in json.loads(connected[2:])
        except BaseException:
            await ws.close()
            raise
        return client

    async def recv_packet(self) -> str:
        """The next Engine.IO packet that is not a ping (pings are answered here)."""
        while True:
            raw = await self.ws.recv()
            assert isinstance(raw, str), raw
            if raw == "2":
                await self.ws.send("3")
                self.pings_answered += 1
                continue
            return raw

    async def emit(self, *args: Any) -> None:
        await self.ws.send("42" + json.dumps(list(args), separators=(",", ":")))

    async def wait_event(self, name: str, timeout: float = 5.0) -> tuple[list[Any], str]:
        """The next ``name`` event's arguments and its raw frame."""
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.recv_packet()
                if raw.startswith("42"):
                    data = json.loads(raw[2:])
                    if data[0] == name:
                        return data[1:], raw

    async def close(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed, OSError):
            await self.ws.close()


@pytest.fixture
async def peers() -> AsyncIterator[list[PeerProcess]]:
    started: list[PeerProcess] = []
    try:
        yield started
    finally:
        for peer in started:
            await peer.stop()


async def _check_socketio(peer: PeerProcess) -> None:
    alice = await EioClient.connect(peer.url)
    bob = await EioClient.connect(peer.url)
    outsider = await EioClient.connect(peer.url)
    try:
        for client in (alice, bob):
            await client.emit("join", "c3")
            args, raw = await client.wait_event("joined")
            assert args == ["c3"]
            assert raw == '42["joined","c3"]'
        await outsider.emit("join", "c4")
        assert (await outsider.wait_event("joined"))[0] == ["c4"]

        payload = {"ts": 123, "pad": "x" * 160}
        await alice.emit("publish", "c3", payload)
        for client in (alice, bob):  # the sender joined too, so it gets its own event
            args, raw = await client.wait_event("event")
            assert args == [payload]
            assert json.loads(raw[2:]) == ["event", payload]

        # The outsider is in another room: its next event is the one published there.
        await bob.emit("publish", "c4", {"ts": 2})
        assert (await outsider.wait_event("event"))[0] == [{"ts": 2}]
    finally:
        for client in (alice, bob, outsider):
            await client.close()


async def test_socketio_python_peer(peers: list[PeerProcess]) -> None:
    peer = await start_peer("socketio-py", 0)
    peers.append(peer)
    assert peer.url.endswith("/socket.io/?EIO=4&transport=websocket")
    await _check_socketio(peer)


@pytest.mark.timeout(NPM_CI_TIMEOUT_S + 60)
async def test_socketio_node_peer(peers: list[PeerProcess]) -> None:
    # No skip when Node is missing: the benchmark needs this peer, so say so loudly.
    assert shutil.which("node") is not None, "Node.js is required for the socketio-node peer"
    # The first run installs socket.io from the lock file (npm ci); later runs return at once.
    async with asyncio.timeout(NPM_CI_TIMEOUT_S + 10):
        await asyncio.to_thread(ensure_node_deps, NPM_CI_TIMEOUT_S)
    peer = await start_peer("socketio-node", 0)
    peers.append(peer)
    await _check_socketio(peer)


class NatsWsClient:
    """NATS protocol over a WebSocket: enough for CONNECT/PING/SUB/PUB/MSG."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.buffer = b""

    @classmethod
    async def connect(cls, url: str, timeout: float = 5.0) -> NatsWsClient:
        ws = await websockets.connect(url, compression=None, open_timeout=timeout)
        client = cls(ws)
        try:
            info = await client.read_line(timeout)
            assert info.startswith(b"INFO "), info
            assert json.loads(info[5:])["max_payload"] >= 1024 * 1024
            await client.send(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
            assert await client.read_line(timeout) == b"PONG"
        except BaseException:
            await ws.close()
            raise
        return client

    async def send(self, data: bytes) -> None:
        await self.ws.send(data)

    async def read_line(self, timeout: float = 5.0) -> bytes:
        """The next protocol line (without CRLF), answering server PINGs on the way."""
        async with asyncio.timeout(timeout):
            while True:
                while b"\r\n" in self.buffer:
                    line, self.buffer = self.buffer.split(b"\r\n", 1)
                    if line == b"PING":
                        await self.send(b"PONG\r\n")
                        continue
                    return line
                frame = await self.ws.recv()
                self.buffer += frame if isinstance(frame, bytes) else frame.encode()

    async def read_bytes(self, n: int, timeout: float = 5.0) -> bytes:
        async with asyncio.timeout(timeout):
            while len(self.buffer) < n:
                frame = await self.ws.recv()
                self.buffer += frame if isinstance(frame, bytes) else frame.encode()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    async def close(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed, OSError):
            await self.ws.close()


async def test_nats_ws_peer(peers: list[PeerProcess]) -> None:
    peer = await start_peer("nats-ws", 0)
    peers.append(peer)
    assert peer.url == f"ws://127.0.0.1:{peer.port}"
    sub = await NatsWsClient.connect(peer.url)
    pub = await NatsWsClient.connect(peer.url)
    try:
        await sub.send(b"SUB bench.c3 1\r\nPING\r\n")
        assert await sub.read_line() == b"PONG"  # the server has the subscription
        payload = b'{"ts":123,"pad":"xx"}'
        await pub.send(b"PUB bench.c3 %d\r\n%s\r\n" % (len(payload), payload))
        assert await sub.read_line() == b"MSG bench.c3 1 %d" % len(payload)
        assert await sub.read_bytes(len(payload) + 2) == payload + b"\r\n"
    finally:
        await sub.close()
        await pub.close()
