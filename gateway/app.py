"""The gateway process: WebSocket endpoint, health endpoints, start and drain."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import inspect
import logging
import os
import signal
import socket as socketlib
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import urlsplit

from arqonbus_server.gateway.auth.agent import issue_nonce, revoked_agent_id
from arqonbus_server.gateway.auth.base import (
    Authenticator,
    AuthError,
    AuthUnavailable,
    Credentials,
    Principal,
    check_credentials,
    token_method,
)
from arqonbus_server.gateway.auth.chain import make_authenticator
from arqonbus_server.gateway.auth.keys import revoked_key_id
from arqonbus_server.gateway.dashboard import routes as dashboard
from arqonbus_server.gateway.demo import routes as demo
from arqonbus_server.gateway.gc_policy import FreezingCollector
from arqonbus_server.gateway.http.admission import (
    PendingHandshakes,
    RateLimiter,
    retry_after_header,
    retry_after_ms,
)
from arqonbus_server.gateway.http.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from arqonbus_server.gateway.http.metrics import BatchCounts, metrics_from
from arqonbus_server.gateway.http.origin import OriginPolicy
from arqonbus_server.gateway.state.admin import GatewayCommands, GatewayInfo
from arqonbus_server.gateway.state.audit import AUTH_FAILED, AuditLog, AuditThrottle
from arqonbus_server.gateway.state.heartbeat import HeartbeatPublisher, NodeIdentity, server_version
from arqonbus_server.gateway.state.limits import (
    ConnectionReporter,
    RateLimits,
    TenantConnections,
    rate_specs,
)
from arqonbus_server.gateway.state.placement import PlacementTable
from arqonbus_server.gateway.state.presence import PresenceService, PresenceSettings
from arqonbus_server.gateway.state.room_bytes import RoomTrimmer
from arqonbus_server.gateway.state.rooms import (
    EVERYONE,
    KICK_MEMORY_S,
    Kick,
    RoomDirectory,
    RoomSettings,
    banned_error,
    kick_error,
)
from arqonbus_server.gateway.state.security import NONCE_TTL_S, SecurityState
from arqonbus_server.gateway.state.tenant_limits import TenantLimitsTable
from arqonbus_server.gateway.tracing import tracing_from
from arqonbus_server.gateway.ws.hub import Hub
from arqonbus_server.gateway.ws.session import Session
from arqonbus_server.gateway.ws.transport import (
    FrameCounts,
    HttpReply,
    ListenOptions,
    Server,
    Socket,
    server_tls_context,
    start_server,
)
from arqonbus_server.mesh.audit import JetStreamAuditSink
from arqonbus_server.mesh.broker import BrokerUnavailable
from arqonbus_server.mesh.cluster import JetStreamClusterView
from arqonbus_server.mesh.jetstream import broker_from_settings
from arqonbus_server.mesh.kv import JetStreamStateStore
from arqonbus_server.mesh.presence import JetStreamPresenceStore
from arqonbus_server.shared.envelope import encode_auth_required, parse_auth_frame
from arqonbus_server.shared.errors import (
    FORBIDDEN_ORIGIN,
    RATE_LIMITED,
    TENANT_CONNECTIONS,
    ArqonError,
    CloseCode,
    PortInUse,
)
from arqonbus_server.shared.settings import ConfigError, Settings, parse_host_port
from arqonbus_server.shared.subjects import node_token

log = logging.getLogger("arqonbus.gateway")

WS_PATH = "/ws"
METRICS_PATH = "/metrics"  # Prometheus text format (gateway/http/metrics.py)
# Consecutive failed checks (one per health_interval_s) before the gateway acts:
# JetStream silent: drop the NATS server for another, again every 2 checks (the next one
# may be cut off too).
RECONNECT_AFTER_FAILED_CHECKS = 2
SHED_AFTER_LINK_FAILURES = 3  # NATS link down: close clients with 4002, refuse new ones (503)
# After the gateway drops its own NATS link to reconnect elsewhere, the link checks of the
# next 2 intervals may fail because of that reconnect: they do not count towards shedding.
# (Without this, a JetStream election that outlasts 4 checks made the gateway shed its
# clients with 4002 although the server it was on stayed alive.)
RECONNECT_GRACE_CHECKS = 2
# A check waits at most this share of the interval for its answer. A stall that begins just
# after a check went through shows in the next one: within 1 + this share of intervals, which
# leaves the rest of the second interval for /readyz to say so (and for its pollers to see it).
CHECK_TIMEOUT_SHARE = 0.8


def listen_options(settings: Settings, host: str, port: int) -> ListenOptions:
    """The WebSocket listener's options for ``settings`` (also used by the Autobahn echo).

    With ``tls_cert``/``tls_key`` set this loads them: ConfigError names a missing or bad file.
    """
    return ListenOptions(
        host=host,
        port=port,
        max_frame_bytes=2 * settings.max_envelope_bytes,
        send_buffer_bytes=settings.send_buffer_bytes,
        open_timeout_s=settings.open_timeout_s,
        ping_interval_s=settings.ping_interval_s,
        ssl=server_tls_context(settings.tls_cert, settings.tls_key)
        if settings.tls_enabled
        else None,
        idle_timeout_s=settings.idle_timeout_s,
        reuse_port=settings.reuse_port,
    )


def origin_policy(settings: Settings) -> OriginPolicy:
    """The Origin allowlist; ConfigError names a malformed entry."""
    try:
        return OriginPolicy.parse(settings.allowed_origins, settings.require_origin)
    except ValueError as exc:
        raise ConfigError(f"invalid setting ARQONBUS_ALLOWED_ORIGINS: {exc}") from None


def default_node_id() -> str:
    return f"{socketlib.gethostname()}-{os.getpid()}"


class Gateway:
    """One stateless gateway node. ``start`` -> serve -> ``drain``."""

    def __init__(self, settings: Settings, authenticator: Authenticator | None = None) -> None:
        self.settings = settings
        self.node_id = settings.node_id or default_node_id()
        # Its URLs, stream policy (with the tenants' stored-bytes quota), credentials, TLS.
        self.broker = broker_from_settings(settings, f"arqonbus-gateway {self.node_id}")
        # Tracing (gateway/tracing.py): None unless ARQONBUS_TRACING or the OTEL_* env asks.
        self.tracing = tracing_from(settings, os.environ, self.node_id)
        # Prometheus metrics (gateway/http/metrics.py): this gateway's own registry, or no-ops.
        self.metrics = metrics_from(settings)
        self.hub = Hub(
            self.broker,
            settings.replay_buffer_msgs,
            4 * settings.send_buffer_bytes,
            self.tracing,
            metrics=self.metrics,
        )
        # Security state shared by every gateway (NATS KV), and the audit stream.
        self.state = JetStreamStateStore(self.broker)
        self.security = SecurityState(
            self.broker,
            self.state,
            settings.subject_prefix,
            settings.policy_file,
            region=settings.region,
        )
        # Placed tenants (multi-region, gateway/state/placement.py): only with a region.
        if self.security.placement is not None:
            self.placements = PlacementTable(self.security.placement.get)
            self.broker.placement_for = self.placements.get
            self.hub.placement_for = self.placements.get
            self.security.placement.on_change(self._on_placement)
        self.audit_sink = JetStreamAuditSink.from_settings(self.broker, settings)
        self.audit = AuditLog.from_settings(self.audit_sink, settings, self.node_id)
        self._auth_failures = AuditThrottle(per_window=200, max_keys=4096)
        try:
            self.authenticator = authenticator or make_authenticator(
                settings.auth, settings, self.security
            )
        except ValueError as exc:
            raise ConfigError(f"invalid setting ARQONBUS_AUTH: {exc}") from None
        self.sessions: set[Session] = set()
        # The cluster view (arqonbus status): a heartbeat every heartbeat_interval_s with the
        # sessions and the messages the listener counts in and out (gateway/state/heartbeat.py).
        self.frames = FrameCounts()
        self.heartbeats = HeartbeatPublisher(
            JetStreamClusterView(self.broker),
            NodeIdentity(self.node_id, settings.region, server_version()),
            settings.heartbeat_interval_s,
            lambda: len(self.sessions),
            lambda: (self.frames.received, self.frames.sent),
        )
        # The web dashboard's live feed (gateway/dashboard/): the cluster view, the tenant's
        # stream and this gateway's channels, every heartbeat interval.
        self.dashboard = dashboard.DashboardFeed(
            JetStreamClusterView(self.broker),
            self.broker,
            self.hub,
            self.node_id,
            settings.heartbeat_interval_s,
            self._connections_of,
            settings.trace_viewer_url,
        )
        # Agents: a revoke made anywhere closes this gateway's sessions of that agent.
        self.security.agents.on_change(self._on_agent_change)
        self._auth_methods = [m.strip() for m in settings.auth.split(",") if m.strip()]
        # API keys: a revoke made anywhere closes this gateway's sessions that used the key.
        self._revoked_keys: set[str] = set()
        self.security.keys.on_change(self._on_key_change)
        # Private rooms: a ban made on any gateway removes the member from the room here.
        self.rooms = RoomDirectory.of(self.security)
        self._kicks_applied: dict[tuple[str, str, str], float] = {}
        for (tenant, room), room_settings in self.rooms.items():  # kicks made before we started
            self._new_kicks(tenant, room, room_settings, time.time())
        self.rooms.on_update(self._on_room_update)
        # Presence (gateway/state/presence.py) and the built-in admin commands.
        self.presence = PresenceService(
            JetStreamPresenceStore(self.broker),
            node_token(self.node_id),
            presence_settings(settings),
        )
        self.trimmer = RoomTrimmer(self.broker, self.rooms)
        self.commands = GatewayCommands(
            self.broker,
            GatewayInfo(
                self.node_id,
                settings.region,
                server_version(),
                time.monotonic(),
                settings.stream_max_age_s,
            ),
            self.presence,
            self.rooms,
            self._status_connections,
            self._live_gateways,
            self.trimmer,
        )
        # Per client address: upgrades per second (429 beyond) and unfinished handshakes.
        self.conn_rate = RateLimiter(settings.conn_rate_per_ip, settings.conn_burst_per_ip)
        # Rate limits and connection quotas (gateway/state/limits.py).
        self.rate_limits = RateLimits(*rate_specs(settings))
        self.tenant_conns = TenantConnections(
            settings.max_connections_per_tenant, reserve_s=settings.open_timeout_s + 5.0
        )
        self.conn_reports = ConnectionReporter(self.state, settings, self.node_id)
        self.rate_limits.tenant_connections = self._tenant_connections
        # Per-tenant overrides of the limits above, from NATS KV (gateway/state/tenant_limits.py).
        self.tenant_limits = TenantLimitsTable(settings, self.security.tenants.get)
        self.rate_limits.tenant_limits = self.tenant_limits
        self.broker.max_bytes_for = self.tenant_limits.max_stored_bytes
        self.security.tenants.on_change(self._on_tenant_limits)
        self._quota_updates: set[asyncio.Task[None]] = set()
        # A connection dropped at accept sees no HTTP answer (its client only sees the TCP
        # connection end): the metric is how an operator tells these drops from a crash.
        self.pending_handshakes = PendingHandshakes(
            settings.max_pending_handshakes_per_ip,
            lambda: self.metrics.rate_limited("pending_handshake"),
        )
        self.unauthenticated = PendingHandshakes(
            settings.max_pending_handshakes_per_ip,
            lambda: self.metrics.rate_limited("pending_auth"),
        )
        # Checked here, so a bad allowlist or TLS file stops the gateway before it listens.
        self.origins = origin_policy(settings)
        self.listener = listen_options(settings, settings.host, settings.port)
        self.draining = False
        self.healthy = False
        self.failed_checks = 0  # consecutive health checks JetStream did not answer
        self.link_failures = 0  # consecutive checks the NATS link did not answer
        self._reconnect_grace = 0  # link checks excused after this gateway dropped its link
        self._server: Server | None = None
        # A second listener of this process alone (admin_listen): a worker's own port.
        self._admin_server: Server | None = None
        self._stop = asyncio.Event()
        self._became_ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._wire_metrics()

    def _wire_metrics(self) -> None:
        """What /metrics reads at each scrape, and the mesh's events it counts."""
        self.metrics.observe(
            lambda: len(self.sessions),
            lambda: self.hub.channel_count,
            self.hub.member_count,
            lambda: (self.frames.received, self.frames.sent),
        )
        stats = self.broker.batch_stats
        self.metrics.observe_batches(
            lambda: BatchCounts(stats.batches, stats.events, stats.alone, stats.refusals)
        )
        if self.metrics.enabled:
            self.broker.on_link_event = self.metrics.nats_event
            self.broker.on_replay_consumer = self.metrics.replay_consumer
            for bucket in self.security.watched:
                bucket.on_reload = self.metrics.kv_reloaded

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Listen at once; connect to NATS in the background (readyz stays 503 until then)."""
        self._server = await self._listen(
            self.listener,
            "the gateway's listener",
            "Stop the other process or choose another port with --listen HOST:PORT.",
        )
        if self.settings.admin_listen:
            host, port = parse_host_port(self.settings.admin_listen)
            self._admin_server = await self._listen(
                # This process's own port: never shared (a second binder must fail).
                dataclasses.replace(listen_options(self.settings, host, port), reuse_port=False),
                "the gateway's admin listener",
                "Choose another port with ARQONBUS_ADMIN_LISTEN (or ARQONBUS_WORKER_ADMIN_PORT).",
            )
        self._tasks.append(asyncio.create_task(self._connect_and_watch()))
        log.info(
            "gateway %s listening on %s://%s:%d%s",
            self.node_id,
            self.listener.scheme,
            *self.address,
            WS_PATH,
        )

    async def _listen(self, options: ListenOptions, what: str, hint: str) -> Server:
        try:
            return await start_server(
                options,
                self._on_request,
                self._on_socket,
                self.pending_handshakes if self.pending_handshakes.enabled else None,
                Credentials.select_subprotocol,
                counts=self.frames,
                read_sampler=self.metrics.phases,
            )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(options.host, options.port, what, hint) from None
            raise

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        sock = next(iter(self._server.sockets))
        host, port = sock.getsockname()[:2]
        return str(host), int(port)

    async def _connect_and_watch(self) -> None:
        if not await self.broker.connect_with_retry(self._stop):
            return
        self.security.start()
        if self.tenant_conns.enabled:  # other gateways' connection counts (gateway/state/limits.py)
            self.conn_reports.start(self.tenant_conns.live)
        # (else started by the first tenant override with a connection cap: _on_tenant_limits)
        self.audit.start()
        self.heartbeats.start()
        await self.presence.start()
        self.trimmer.start()
        self._tasks.append(asyncio.create_task(self._ready_once_loaded()))
        loop = asyncio.get_running_loop()
        interval = self.settings.health_interval_s
        while not self._stop.is_set():
            started = loop.time()
            # Both bounded within the interval, so a stalled link shows within two intervals.
            timeout = interval * CHECK_TIMEOUT_SHARE
            healthy, link_ok = await asyncio.gather(
                self.broker.check_health(timeout=timeout),
                self.broker.check_link(timeout=timeout),
            )
            await self.apply_health_check(healthy, link_ok)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    self._stop.wait(), max(0.0, interval - (loop.time() - started))
                )

    async def _ready_once_loaded(self) -> None:
        """Ready as soon as the security state loads (not at the next health check)."""
        await asyncio.gather(*(bucket.ready.wait() for bucket in self.security.watched))
        if self.ready:
            self._became_ready.set()

    async def apply_health_check(self, healthy: bool, link_ok: bool) -> None:
        """Take in one health check's outcome and act on it, as the health loop does each
        ``health_interval_s`` (JetStream answered: ``healthy``; the NATS link: ``link_ok``)."""
        self.healthy = healthy
        if not healthy:
            self.metrics.jetstream_error("health")
        if self.ready:
            self._became_ready.set()
        await self._after_check(link_ok)

    async def _after_check(self, link_ok: bool) -> None:
        """Act on consecutive failed checks: another NATS server, then other gateways."""
        if self.healthy and self.failed_checks:
            # JetStream answers again after an outage: watches may have stalled meanwhile
            # (a revoke or ban made then would never arrive). Reload them all.
            self.security.restart()
        self.failed_checks = 0 if self.healthy else self.failed_checks + 1
        if link_ok:
            self.link_failures = self._reconnect_grace = 0
        elif self._reconnect_grace:  # the link is down because this gateway dropped it
            self._reconnect_grace -= 1
        else:
            self.link_failures += 1
        # JetStream does not answer through this server: the link may be stalled, or the
        # node cut off from its cluster. Try another server of the pool. (During a NATS
        # election this reconnect is needless; the grace keeps it harmless.)
        reconnect = self.failed_checks and self.failed_checks % RECONNECT_AFTER_FAILED_CHECKS == 0
        if reconnect and await self.broker.reconnect_elsewhere():
            self._reconnect_grace = RECONNECT_GRACE_CHECKS
        if self.link_failures == SHED_AFTER_LINK_FAILURES and not self.draining:
            log.warning(
                "no NATS server has answered for %d checks: sending %d client(s) to other "
                "gateways (4002)",
                self.link_failures,
                len(self.sessions),
            )
            for session in list(self.sessions):
                session.socket.close_soon(
                    CloseCode.BACKEND_UNAVAILABLE,
                    "this gateway lost the message store: reconnect elsewhere and resume",
                )

    @property
    def cut_off(self) -> bool:
        """Its NATS link is down: new clients are refused (503) until a check passes again."""
        return self.link_failures >= SHED_AFTER_LINK_FAILURES

    async def wait_ready(self, timeout: float) -> None:
        """Wait until /readyz would answer 200 (used by tests and the dev supervisor)."""
        async with asyncio.timeout(timeout):
            await self._became_ready.wait()

    @property
    def ready(self) -> bool:
        return self.healthy and self.broker.connected and self.security.loaded and not self.draining

    async def drain(self) -> None:
        """readyz fails, no new sessions, clients closed with 1012, in-flight publishes finish."""
        if self.draining:
            return
        self.draining = True
        total = self.settings.drain_timeout_s
        # Sessions get most of the budget; closing the listener and NATS get the rest.
        budget = total * 0.7
        log.info("draining %d session(s), timeout %.1fs", len(self.sessions), total)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(budget):
                await asyncio.gather(*(s.drain(budget) for s in list(self.sessions)))
        await self.close(max(0.5, total - budget))

    async def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        servers = [s for s in (self._server, self._admin_server) if s is not None]
        for server in servers:
            server.close(close_connections=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout / 2):
                for server in servers:
                    await server.wait_closed()
        await self.heartbeats.close()  # leave the cluster view now, not in 3 intervals
        await self.presence.close()  # this gateway's members leave now, not at lease expiry
        await self.trimmer.close()
        await self.hub.close()
        await self.security.close()
        await self.conn_reports.close()
        for update in list(self._quota_updates):
            update.cancel()
        await asyncio.gather(*self._quota_updates, return_exceptions=True)
        await self.audit.close()
        await self.broker.close(timeout / 2)
        if self.tracing is not None:  # export the spans still buffered, then stop
            await asyncio.to_thread(self.tracing.flush, timeout / 2)
        close_authenticator = getattr(self.authenticator, "close", None)
        if close_authenticator is not None:  # e.g. the JWT key-set refresher
            close_authenticator()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- API-key revocation ----------------------------------------------------------

    def _on_room_update(self, tenant: str, room: str, settings: RoomSettings | None) -> None:
        """ROOMS changed: sessions of a banned principal leave the room's channels, and so
        do kicked ones (each kick once: ``_kicks_applied``; ``*``: delete_room, everyone)."""
        if settings is None:
            return
        now = time.time()
        kicks = self._new_kicks(tenant, room, settings, now)
        if not settings.banned and not kicks:
            return
        for session in list(self.sessions):
            principal = session.principal
            if principal.tenant != tenant:
                continue
            ban = settings.ban_of(principal.id, now)
            if ban is not None:
                session.leave_room(room, banned_error(room, ban, now))
                continue
            for who in (principal.id, EVERYONE):
                if who in kicks:
                    session.leave_room(room, kick_error(room, who, kicks[who]))
                    break

    def _new_kicks(
        self, tenant: str, room: str, settings: RoomSettings, now: float
    ) -> dict[str, Kick]:
        """The record's kicks this gateway has not applied yet (then remembered as applied)."""
        if len(self._kicks_applied) > 10_000:  # bounded: forget kicks the record dropped
            self._kicks_applied = {
                k: at for k, at in self._kicks_applied.items() if now - at < KICK_MEMORY_S
            }
        fresh: dict[str, Kick] = {}
        for who, kick in settings.kicks.items():
            key = (tenant, room, who)
            if self._kicks_applied.get(key, float("-inf")) < kick.at:
                self._kicks_applied[key] = kick.at
                fresh[who] = kick
        return fresh

    def _on_placement(self, tenant: str, value: bytes | None) -> None:
        """A tenant failed over or back: its members here move to the new epoch."""
        self.hub.placement_changed(tenant)

    def _on_tenant_limits(self, tenant: str, value: bytes | None) -> None:
        """A tenant's limits changed (any gateway sees it): apply them here, now.

        Live sessions of the tenant get the new rates; the connection cap applies from the
        next handshake; the stream's max_bytes is updated (every gateway sends the same
        idempotent update, sent only when the stream differs)."""
        per_connection, per_principal = self.tenant_limits.rate_specs(tenant)
        for session in list(self.sessions):
            if session.principal.tenant == tenant:
                session.retune_rates(per_connection, per_principal)
        if self.tenant_limits.max_connections(tenant) > 0:
            self.conn_reports.start(self.tenant_conns.live)  # no-op once started
        task = asyncio.create_task(self._apply_quota(tenant), name=f"quota {tenant}")
        self._quota_updates.add(task)
        task.add_done_callback(self._quota_updates.discard)

    async def _apply_quota(self, tenant: str) -> None:
        try:
            await self.broker.apply_quota(tenant)
        except BrokerUnavailable as exc:  # the next provisioning applies it
            log.warning("stored-bytes quota of tenant %s not applied yet: %s", tenant, exc)

    def _on_key_change(self, kv_key: str, value: bytes | None) -> None:
        """A KEYS change: collect revoked key ids, then close their sessions in one scan."""
        key_id = revoked_key_id(kv_key, value)
        if key_id is None:
            return
        if not self._revoked_keys:  # revokes are rare: one scan per batch of changes
            asyncio.get_running_loop().call_soon(self._close_revoked_sessions)
        self._revoked_keys.add(key_id)

    def _close_revoked_sessions(self) -> None:
        revoked, self._revoked_keys = self._revoked_keys, set()
        for session in list(self.sessions):
            principal = session.principal
            if principal.method == "apikey" and principal.credential_id in revoked:
                session.socket.close_soon(
                    CloseCode.CREDENTIAL_REVOKED,
                    "the API key was revoked: do not reconnect with it; use a new key",
                )

    # -- HTTP ------------------------------------------------------------------------

    def _on_request(
        self, target: str, headers: Mapping[str, str], peer_ip: str
    ) -> (
        HttpReply
        | Principal
        | PendingAuth
        | dashboard.DashboardViewer
        | Awaitable[HttpReply | Principal | dashboard.DashboardViewer]
    ):
        path = urlsplit(target).path
        if path == "/healthz":
            return HttpReply(HTTPStatus.OK, {"status": "alive", "node": self.node_id})
        if path == "/readyz":
            return self._readyz()
        if path == METRICS_PATH and self.metrics.enabled:
            return HttpReply(HTTPStatus.OK, self.metrics.render(), (), METRICS_CONTENT_TYPE)
        if path == NONCE_PATH:
            return self._nonce_request(peer_ip)
        if path == dashboard.DASHBOARD_PATH or path.startswith(dashboard.DASHBOARD_PATH + "/"):
            return self._dashboard_request(path, target, headers, peer_ip)
        if self.settings.demo_pages and demo.is_demo_path(path):
            return demo.static_reply(path)
        if path != WS_PATH:
            return HttpReply(
                HTTPStatus.NOT_FOUND, {"error": "not found: the WebSocket endpoint is /ws"}
            )
        if self.origins.enabled:
            refusal = self._check_origin(headers)
            if refusal is not None:
                return refusal
        if self.draining:
            return HttpReply(
                HTTPStatus.SERVICE_UNAVAILABLE, {"error": "draining: connect to another gateway"}
            )
        if self.cut_off:
            return HttpReply(
                HTTPStatus.SERVICE_UNAVAILABLE,
                {"error": "unavailable: this gateway cannot reach the message store; "
                 "connect to another gateway"},
            )  # fmt: skip
        if not self.security.loaded:
            # Bans, revocations and private rooms are not known yet: checks would fail open.
            return HttpReply(
                HTTPStatus.SERVICE_UNAVAILABLE,
                {"error": "unavailable", "message": "starting: the security state is not "
                 "loaded yet; retry shortly or connect to another gateway"},
            )  # fmt: skip
        wait_s = self.conn_rate.take(peer_ip)
        if wait_s:
            self.metrics.rate_limited("upgrade")
            return _rate_limited(wait_s)
        credentials = Credentials.from_request(target, headers)
        if credentials.token is None and self.settings.auth_message_timeout_s > 0:
            return PendingAuth(peer_ip)  # first-message auth: see _auth_phase
        try:
            outcome = self.authenticator.authenticate(credentials)
        except (AuthError, AuthUnavailable) as exc:
            return self._refuse_auth(exc, peer_ip, _method(credentials.token))
        if inspect.isawaitable(outcome):  # the method needs NATS (an agent's nonce)
            return self._finish_auth(outcome, peer_ip, _method(credentials.token))
        return self._reserve_tenant_slot(outcome)

    def _tenant_connections(self, tenant: str) -> int:
        """The tenant's connections: this gateway's live ones plus other gateways' reports."""
        return self.tenant_conns.count(tenant) + self.conn_reports.others(tenant)

    def _reserve_tenant_slot(self, outcome: HttpReply | Principal) -> HttpReply | Principal:
        """429 ``limit_exceeded`` when the tenant is at max_connections_per_tenant."""
        if isinstance(outcome, HttpReply):
            return outcome
        tenant = outcome.tenant
        limit = self.tenant_limits.max_connections(tenant)  # its override, else the setting
        if limit <= 0 or self.tenant_conns.try_reserve(
            tenant, self.conn_reports.others(tenant), limit
        ):
            return outcome
        return _tenant_full(tenant, limit, self.settings.health_interval_s)

    async def _finish_auth(
        self, outcome: Awaitable[Principal], peer_ip: str, method: str = "unknown"
    ) -> HttpReply | Principal:
        try:
            return self._reserve_tenant_slot(await outcome)
        except (AuthError, AuthUnavailable) as exc:
            return self._refuse_auth(exc, peer_ip, method)

    def _refuse_auth(
        self, exc: AuthError | AuthUnavailable, peer_ip: str, method: str = "unknown"
    ) -> HttpReply:
        """401 for a bad credential (audited when it names a tenant); 503 to retry."""
        if isinstance(exc, AuthError):
            self.metrics.auth_failed(method)
        if isinstance(exc, AuthUnavailable):
            return HttpReply(
                HTTPStatus.SERVICE_UNAVAILABLE, {"error": "unavailable", "message": str(exc)}
            )
        # Key and agent ids are not secret: anyone can fail with them. At most one record
        # per (tenant, credential, address) per window, and a bounded number per window in
        # all, so refused handshakes cannot wash a tenant's real history out of its stream.
        if exc.tenant:
            repeats = self._auth_failures.check((exc.tenant, exc.credential_id, peer_ip))
            if repeats is not None:
                details: dict[str, object] = {
                    "credential_id": exc.credential_id,
                    "reason": str(exc),
                    "peer_ip": peer_ip,
                }
                if repeats:
                    details["repeats"] = repeats
                self.audit.record(exc.tenant, AUTH_FAILED, "", **details)
        return HttpReply(HTTPStatus.UNAUTHORIZED, {"error": "unauthorized", "message": str(exc)})

    def _check_origin(self, headers: Mapping[str, str]) -> HttpReply | None:
        """403 ``forbidden_origin`` for a handshake the Origin allowlist refuses (CSWSH)."""
        try:
            origin = headers.get("Origin")
        except LookupError:  # more than one Origin header: never from a browser
            origin = ""
        if self.origins.allows(origin):
            return None
        if origin is None:
            detail = "the handshake has no Origin header and this gateway requires one"
        else:
            detail = f"origin {origin[:200]!r} is not allowed"
        return HttpReply(
            FORBIDDEN_ORIGIN.status,
            {"error": FORBIDDEN_ORIGIN.code, "message": f"{detail}. {FORBIDDEN_ORIGIN.message}"},
        )

    def _readyz(self) -> HttpReply:
        body: dict[str, object] = {
            "ready": self.ready,
            "nats_connected": self.broker.connected,
            "jetstream": self.healthy,
            "security_state": self.security.loaded,
            "failed_checks": self.failed_checks,
            "link_failures": self.link_failures,
            "draining": self.draining,
            "node": self.node_id,
            "sessions": len(self.sessions),
        }
        return HttpReply(HTTPStatus.OK if self.ready else HTTPStatus.SERVICE_UNAVAILABLE, body)

    # -- web dashboard (gateway/dashboard/) ----------------------------------------------

    def _status_connections(self, tenant: str) -> tuple[int, int]:
        """``status``: this gateway's connections, and the tenant's among them."""
        mine, everyone = self._connections_of(tenant)
        return everyone, mine

    async def _live_gateways(self) -> int:
        return len(await JetStreamClusterView(self.broker).gateways())

    def _connections_of(self, tenant: str) -> tuple[int, int]:
        """The tenant's sessions on this gateway, and all of them."""
        mine = sum(1 for session in self.sessions if session.principal.tenant == tenant)
        return mine, len(self.sessions)

    def _dashboard_request(
        self, path: str, target: str, headers: Mapping[str, str], peer_ip: str
    ) -> (
        HttpReply
        | Principal
        | dashboard.DashboardViewer
        | Awaitable[HttpReply | Principal | dashboard.DashboardViewer]
    ):
        """The page's files; sign-in and sign-out; the feed and the tail (WebSockets) for a
        tenant admin only (see gateway/dashboard/routes.py)."""
        page = dashboard.static_reply(path)
        if page is not None:
            return page
        if path == dashboard.LOGOUT_PATH:
            return dashboard.logout_reply()
        if path not in (dashboard.LOGIN_PATH, dashboard.FEED_PATH, dashboard.TAIL_PATH):
            return HttpReply(
                HTTPStatus.NOT_FOUND, {"error": "not found: the dashboard is /dashboard"}
            )
        if dashboard.uses_cookie(headers) and not dashboard.same_origin(headers):
            return dashboard.forbidden("the dashboard's cookie is accepted from its own page only")
        if self.draining or self.cut_off or not self.security.loaded:
            return HttpReply(
                HTTPStatus.SERVICE_UNAVAILABLE,
                {"error": "unavailable", "message": "this gateway cannot serve the dashboard "
                 "now (starting, draining or cut off from NATS): try another gateway"},
            )  # fmt: skip
        wait_s = self.conn_rate.take(peer_ip)
        if wait_s:
            return _rate_limited(wait_s)
        credentials = dashboard.credentials(headers)
        if credentials.token is None:
            return dashboard.unauthorized(
                "sign in at /dashboard with an admin credential of your tenant"
            )
        try:
            outcome = self.authenticator.authenticate(credentials)
        except (AuthError, AuthUnavailable) as exc:
            return self._refuse_auth(exc, peer_ip)
        if inspect.isawaitable(outcome):
            return self._finish_dashboard_auth(outcome, path, target, credentials.token, peer_ip)
        return self._admit_viewer(outcome, path, target, credentials.token)

    async def _finish_dashboard_auth(
        self, outcome: Awaitable[Principal], path: str, target: str, token: str, peer_ip: str
    ) -> HttpReply | Principal | dashboard.DashboardViewer:
        try:
            principal = await outcome
        except (AuthError, AuthUnavailable) as exc:
            return self._refuse_auth(exc, peer_ip)
        return self._admit_viewer(principal, path, target, token)

    def _admit_viewer(
        self, principal: Principal, path: str, target: str, token: str
    ) -> HttpReply | Principal | dashboard.DashboardViewer:
        refusal = dashboard.refusal(principal, target)
        if refusal is not None:
            return refusal
        if path == dashboard.LOGIN_PATH:
            return dashboard.login_reply(principal, token, self.settings.tls_enabled)
        if path == dashboard.FEED_PATH:
            return dashboard.DashboardViewer(principal)
        return self._reserve_tenant_slot(principal)  # the tail: a session like any other

    # -- WebSocket -------------------------------------------------------------------

    async def _on_socket(
        self, context: Principal | PendingAuth | dashboard.DashboardViewer, socket: Socket
    ) -> None:
        """A connection's life after its upgrade, counted: connections open, opened, and
        closed by close code. (One coroutine, not a counting wrapper around another: every
        idle connection holds this chain of frames for its whole life.)"""
        self.metrics.connection_opened()
        try:
            if isinstance(context, dashboard.DashboardViewer):
                viewer = context.principal
                await self.dashboard.run(viewer, socket, lambda: self._revoked_since_check(viewer))
                return
            if isinstance(context, PendingAuth):
                authenticated = await self._auth_phase(context, socket)
                if authenticated is None:
                    return
                principal = authenticated
                # Authenticated after the upgrade: the tenant's connection cap is checked here.
                if not self.tenant_conns.try_reserve(
                    principal.tenant,
                    self.conn_reports.others(principal.tenant),
                    self.tenant_limits.max_connections(principal.tenant),
                ):
                    await socket.close(
                        CloseCode.TOO_MANY_CONNECTIONS,
                        "the tenant is at its connection limit: reconnect later",
                    )
                    return
            else:
                principal = context
            if self.draining:  # the handshake finished just as the drain began
                await socket.close(
                    CloseCode.SERVICE_RESTART, "server draining: reconnect elsewhere"
                )
                return
            session = Session(
                socket,
                principal,
                self.hub,
                self.broker,
                self.settings,
                self.node_id,
                security=self.security,
                audit=self.audit,
                authenticator=self.authenticator,
                rate_limits=self.rate_limits,
                tracing=self.tracing,
                metrics=self.metrics,
                commands=self.commands,
            )
            self.tenant_conns.claim(principal.tenant)
            self.sessions.add(session)
            if self._revoked_since_check(principal):
                # Revoked between the credential check and now: the revocation scan that ran
                # meanwhile could not see this session.
                session.socket.close_soon(
                    CloseCode.CREDENTIAL_REVOKED,
                    "the credential was revoked: do not reconnect with it",
                )
            try:
                await session.run()
            except Exception:
                log.exception("session %s crashed", session.id)
            finally:
                self.sessions.discard(session)
                self.tenant_conns.release(principal.tenant)
        finally:
            self.metrics.connection_closed(socket.close_code)

    def _revoked_since_check(self, principal: Principal) -> bool:
        """The principal's API key or agent is revoked (or gone) in the watched state now."""
        if principal.method == "apikey":
            kv_key = f"{principal.tenant}.{principal.credential_id}"
            return revoked_key_id(kv_key, self.security.keys.get(kv_key)) is not None
        if principal.method == "agent":
            agent_id = principal.credential_id
            return revoked_agent_id(agent_id, self.security.agents.get(agent_id)) is not None
        return False

    # -- agent identity: revocation, nonces, first-message auth (issue 6) ------------

    def _on_agent_change(self, agent_id: str, value: bytes | None) -> None:
        if revoked_agent_id(agent_id, value) is None:
            return
        for session in list(self.sessions):
            principal = session.principal
            if principal.method == "agent" and principal.credential_id == agent_id:
                session.socket.close_soon(
                    CloseCode.CREDENTIAL_REVOKED,
                    "the agent was revoked: do not reconnect with it; register a new key",
                )

    def _nonce_request(self, peer_ip: str) -> HttpReply | Awaitable[HttpReply]:
        """``GET /auth/nonce``: a single-use nonce for an agent token (any gateway accepts it)."""
        wait_s = self.conn_rate.take(peer_ip)
        if wait_s:
            return _rate_limited(wait_s)
        if not self.broker.connected or self.cut_off:
            return HttpReply(
                HTTPStatus.SERVICE_UNAVAILABLE,
                {"error": "unavailable", "message": "cannot issue a nonce now: retry or use "
                 "another gateway"},
            )  # fmt: skip
        return self._issue_nonce_reply()

    async def _issue_nonce_reply(self) -> HttpReply:
        try:
            nonce = await issue_nonce(self.security)
        except AuthUnavailable as exc:
            return HttpReply(
                HTTPStatus.SERVICE_UNAVAILABLE, {"error": "unavailable", "message": str(exc)}
            )
        return HttpReply(HTTPStatus.OK, {"nonce": nonce, "expires_in_s": int(NONCE_TTL_S)})

    async def _auth_phase(self, pending: PendingAuth, socket: Socket) -> Principal | None:
        """First-message auth: send auth_required (with a fresh nonce), await one auth frame.

        Refused: close 4501 (fatal); no frame within auth_message_timeout_s: 4502 (fatal);
        the credential cannot be checked now: 4002 (reconnect elsewhere).
        """
        timeout_s = self.settings.auth_message_timeout_s
        # Sockets waiting for their auth frame hold no credential yet: one address may hold
        # as many as it may hold unfinished handshakes, no more.
        if not self.unauthenticated.acquire(pending.peer_ip):
            await socket.close(
                CloseCode.TRY_AGAIN_LATER,
                "too many connections from your address are waiting to authenticate",
            )
            return None
        try:
            return await self._authenticate_first_frame(socket, timeout_s, pending.peer_ip)
        finally:
            self.unauthenticated.release(pending.peer_ip)

    async def _authenticate_first_frame(
        self, socket: Socket, timeout_s: float, peer_ip: str
    ) -> Principal | None:
        nonce: str | None = None
        if "agent" in self._auth_methods:  # a KV write: only when agents can use it
            # If it fails, agents cannot sign in now; the other methods still can.
            with contextlib.suppress(AuthUnavailable):
                nonce = await issue_nonce(self.security)
        timeout_ms = int(timeout_s * 1000)
        required = encode_auth_required(nonce, self._auth_methods, timeout_ms, int(NONCE_TTL_S))
        socket.send(required)
        self.metrics.frame_sent(required)
        try:
            async with asyncio.timeout(timeout_s):
                data = await socket.recv()
        except TimeoutError:
            await socket.close(
                CloseCode.AUTH_TIMEOUT,
                f"no auth frame within {timeout_s:g} s: send it right after auth_required",
            )
            return None
        if data is None:
            return None
        self.metrics.frame_received("auth")
        try:
            token = parse_auth_frame(data, self.settings.max_envelope_bytes)
            principal = await check_credentials(self.authenticator, Credentials(token))
        except ArqonError as exc:
            await socket.close(CloseCode.AUTH_FAILED, _close_reason(f"{exc.code}: {exc.detail}"))
            return None
        except AuthUnavailable as exc:
            await socket.close(CloseCode.BACKEND_UNAVAILABLE, _close_reason(str(exc)))
            return None
        except AuthError as exc:
            self._refuse_auth(exc, peer_ip, _method(token))  # audited like a refused handshake
            await socket.close(CloseCode.AUTH_FAILED, _close_reason(f"unauthorized: {exc}"))
            return None
        return principal


# -- agent identity: nonces, revocation; first-message auth (issue 6) ------------------

NONCE_PATH = "/auth/nonce"


def _method(token: str | None) -> str:
    """The auth-failure label of a credential: its method by form, ``none`` without one."""
    return token_method(token) if token else "none"


_CLOSE_REASON_MAX = 123  # bytes of UTF-8 a close frame's reason may hold (RFC 6455 5.5)


@dataclass(frozen=True, slots=True)
class PendingAuth:
    """An upgrade without a credential: the first frame must be ``auth`` (see _auth_phase)."""

    peer_ip: str


def _close_reason(text: str) -> str:
    data = text.encode()
    if len(data) <= _CLOSE_REASON_MAX:
        return text
    return data[: _CLOSE_REASON_MAX - 3].decode(errors="ignore") + "..."


def _tenant_full(tenant: str, limit: int, retry_s: float) -> HttpReply:
    """429 ``limit_exceeded``: the tenant has ``limit`` connections over all gateways."""
    return HttpReply(
        TENANT_CONNECTIONS.status,
        {
            "error": TENANT_CONNECTIONS.code,
            "message": f"tenant {tenant!r} has {limit} connections (max_connections_per_tenant"
            f", or the tenant's max_connections). {TENANT_CONNECTIONS.message}",
            "retry_after_ms": retry_after_ms(retry_s),
        },
        (("Retry-After", retry_after_header(retry_s)),),
    )


def _rate_limited(wait_s: float) -> HttpReply:
    """429 before the upgrade: cheap (no auth, no session), with when to come back."""
    return HttpReply(
        RATE_LIMITED.status,
        {
            "error": RATE_LIMITED.code,
            "message": RATE_LIMITED.message,
            "retry_after_ms": retry_after_ms(wait_s),
        },
        (("Retry-After", retry_after_header(wait_s)),),
    )


def presence_settings(settings: Settings) -> PresenceSettings:
    """The presence service's timings from the gateway's settings (docs/presence.md)."""
    return PresenceSettings(
        batch_ms=settings.presence_batch_ms,
        max_changes=settings.presence_max_changes,
        idle_s=settings.presence_idle_s,
        lease_interval_s=settings.presence_lease_s,
        lease_timeout_s=4 * settings.presence_lease_s,
    )


async def run_gateway(settings: Settings) -> int:
    """Run one gateway until SIGTERM/SIGINT, then drain. Returns the exit code."""
    gateway = Gateway(settings)
    await gateway.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    collector = FreezingCollector(
        settings.gc_sweep_interval_s, young_threshold=settings.gc_young_threshold
    )
    sweeper: asyncio.Task[None] | None = None
    if settings.gc_freeze:  # process-wide: only here, never in a gateway inside a program
        collector.install()
        sweeper = asyncio.create_task(collector.run(), name="gc sweeps")
    await stop.wait()
    log.info("signal received: draining")
    if sweeper is not None:
        sweeper.cancel()
    await gateway.drain()
    log.info("gateway %s stopped", gateway.node_id)
    return 0
