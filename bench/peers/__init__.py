"""Comparison peers for the benchmarks: python-socketio, socket.io on Node, raw NATS WebSocket."""

from bench.peers.launch import (
    PEER_KINDS,
    PeerError,
    PeerProcess,
    ensure_node_deps,
    nats_server_binary,
    start_peer,
)

__all__ = [
    "PEER_KINDS",
    "PeerError",
    "PeerProcess",
    "ensure_node_deps",
    "nats_server_binary",
    "start_peer",
]
