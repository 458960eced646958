"""The :class:`mesh.ports.ClusterView` on NATS: gateway heartbeats and the NATS servers.

Heartbeats are published (with JetStream's ack) on ``P.sys.gateway.<node>``. The stream
``P-sys_gateways`` (file storage, replicated like the tenants' streams: a memory stream's
restarted replica did not become current again within 60 s under ``make chaos``'s node kills)
captures those subjects and keeps one message per subject for ``max_age`` = the heartbeat TTL, so one
read answers "which gateways are alive" at once, and a gateway killed without a word drops
out when its last heartbeat expires. Names come from :mod:`shared.subjects`.

NATS servers: without a system account ``$SYS.REQ.SERVER.PING`` is not available, so the
servers are the ones the connection knows (configured, and every client URL the cluster
gossips in its INFO ``connect_urls``), each asked who it is by reading the ``INFO`` line it
sends to any new TCP connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import nats.errors
import orjson
from nats.js.api import DiscardPolicy, StorageType, StreamConfig
from nats.js.errors import NoStreamResponseError, NotFoundError

from arqonbus_server.mesh.ports import BrokerUnavailable, NatsNode
from arqonbus_server.mesh.streams import choose_replicas

if TYPE_CHECKING:
    from nats.js.manager import JetStreamManager

    from arqonbus_server.mesh.jetstream import JetStreamBroker

log = logging.getLogger("arqonbus.mesh.cluster")

_FAILURES = (nats.errors.Error, TimeoutError, OSError)  # nats-py's APIError included
_PUBLISH_ATTEMPTS = 6  # a new stream takes a moment to take its subjects on every server
_INFO_MAX_BYTES = 64 * 1024


class JetStreamClusterView:
    """Heartbeats in the stream ``P-sys_gateways``, on the connection of a broker."""

    def __init__(self, broker: JetStreamBroker, timeout_s: float = 2.0) -> None:
        self._broker = broker
        self._scheme = broker.scheme
        self._timeout = timeout_s
        self._ttl_s: float | None = None  # the max_age the stream is known to have

    async def announce(self, node: str, heartbeat: bytes, ttl_s: float) -> None:
        subject = self._scheme.gateway_heartbeat(node)
        stream = self._scheme.heartbeat_stream()
        try:
            _, js, jsm, _ = self._broker._require()
            await self._ensure_stream(jsm, ttl_s)
            for attempt in range(_PUBLISH_ATTEMPTS):
                try:
                    await js.publish(subject, heartbeat, timeout=self._timeout, stream=stream)
                    return
                except NoStreamResponseError:
                    if attempt == _PUBLISH_ATTEMPTS - 1:
                        raise
                    await asyncio.sleep(0.02 * 2**attempt)
        except _FAILURES as exc:
            self._ttl_s = None  # deleted meanwhile? look again next time
            raise BrokerUnavailable(f"heartbeat not stored: {type(exc).__name__} {exc}") from exc

    async def _ensure_stream(self, jsm: JetStreamManager, ttl_s: float) -> None:
        if self._ttl_s == ttl_s:
            return
        name = self._scheme.heartbeat_stream()
        try:
            info = await jsm.stream_info(name)
        except NotFoundError:
            await jsm.add_stream(self._config(ttl_s))  # identical concurrent adds: one stream
        else:
            config = info.config
            if config.max_age is None or abs(config.max_age - ttl_s) > 1e-3:
                log.warning(
                    "heartbeat TTL of the mesh changes from %ss to %ss: give every gateway the "
                    "same ARQONBUS_HEARTBEAT_INTERVAL_S",
                    config.max_age,
                    ttl_s,
                )
                config.max_age = config.duplicate_window = ttl_s
                await jsm.update_stream(config)
        self._ttl_s = ttl_s

    def _config(self, ttl_s: float) -> StreamConfig:
        return StreamConfig(
            name=self._scheme.heartbeat_stream(),
            description="ArqonBus gateway heartbeats: the last one of each live gateway",
            subjects=[self._scheme.gateway_heartbeat_filter()],
            storage=StorageType.FILE,
            num_replicas=choose_replicas(self._broker.policy, self._broker.cluster_size()),
            max_age=ttl_s,
            duplicate_window=ttl_s,  # never longer than max_age; heartbeats have no ids
            max_msgs_per_subject=1,
            discard=DiscardPolicy.OLD,
        )

    async def withdraw(self, node: str) -> None:
        try:
            _, _, jsm, _ = self._broker._require()
            stream = self._scheme.heartbeat_stream()
            await jsm.purge_stream(stream, subject=self._scheme.gateway_heartbeat(node))
        except NotFoundError:
            return
        except _FAILURES as exc:
            raise BrokerUnavailable(f"heartbeat not withdrawn: {type(exc).__name__}") from exc

    async def gateways(self) -> list[bytes]:
        stream = self._scheme.heartbeat_stream()
        try:
            _, _, jsm, _ = self._broker._require()
            info = await jsm.stream_info(
                stream, subjects_filter=self._scheme.gateway_heartbeat_filter()
            )
            found = []
            for subject in sorted(info.state.subjects or {}):
                with contextlib.suppress(NotFoundError):  # expired since the stream info
                    message = await jsm.get_last_msg(stream, subject)  # the leader: current
                    found.append(message.data or b"")
            return found
        except NotFoundError:
            return []  # no gateway has ever announced itself
        except _FAILURES as exc:
            raise BrokerUnavailable(f"heartbeats not read: {type(exc).__name__}") from exc

    def connected_server(self) -> tuple[str, str]:
        nc = self._broker._nc
        if nc is None or not nc.is_connected or nc.connected_url is None:
            return "", ""
        url = nc.connected_url
        return str(nc._server_info.get("server_name") or ""), f"{url.hostname}:{url.port}"

    async def nats_servers(self, timeout: float = 1.0) -> list[NatsNode]:
        nc = self._broker._nc
        if nc is None:
            return []
        current = nc.connected_url
        here = f"{current.hostname}:{current.port}" if current is not None else ""
        known = {f"{url.hostname}:{url.port}" for url in nc.servers if url.hostname}
        known.update(str(url) for url in nc._server_info.get("connect_urls") or [])
        if here:
            known.add(here)
        probes = [_probe(address, address == here, timeout) for address in sorted(known)]
        return list(await asyncio.gather(*probes))


async def _probe(address: str, connected: bool, timeout: float) -> NatsNode:
    """Ask the server at ``address`` who it is: the INFO line it sends on connect."""
    host, _, port = address.rpartition(":")
    info: dict[str, Any] = {}
    with contextlib.suppress(OSError, TimeoutError, ValueError, orjson.JSONDecodeError):
        info = await asyncio.wait_for(_read_info(host.strip("[]"), int(port)), timeout)
    return NatsNode(
        url=address,
        name=str(info.get("server_name") or info.get("server_id") or ""),
        version=str(info.get("version") or ""),
        cluster=str(info.get("cluster") or ""),
        jetstream=bool(info.get("jetstream")),
        connected=connected,
        reachable=bool(info),
    )


async def _read_info(host: str, port: int) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection(host, port, limit=_INFO_MAX_BYTES)
    try:
        line = await reader.readline()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    if not line.startswith(b"INFO "):
        raise ValueError("not a NATS server")
    info = orjson.loads(line[5:])
    return info if isinstance(info, dict) else {}
