"""The gateway process: WebSocket endpoint, health endpoints, start and drain."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import logging
import os
import signal
import socket as socketlib
from collections.abc import Awaitable, Mapping
from http import HTTPStatus
from urllib.parse import urlsplit

from gateway.admission import PendingHandshakes, RateLimiter, retry_after_header, retry_after_ms
from gateway.audit import AUTH_FAILED, AuditLog
from gateway.auth import (
    Authenticator,
    AuthError,
    AuthUnavailable,
    Credentials,
    Principal,
    make_authenticator,
)
from gateway.hub import Hub
from gateway.origin import OriginPolicy
from gateway.security import SecurityState
from gateway.session import Session
from gateway.transport import (
    HttpReply,
    ListenOptions,
    Server,
    Socket,
    server_tls_context,
    start_server,
)
from mesh.jetstream import JetStreamBroker
from mesh.streams import StreamPolicy
from shared.errors import FORBIDDEN_ORIGIN, RATE_LIMITED, CloseCode
from shared.settings import ConfigError, Settings
from shared.subjects import SubjectScheme

log = logging.getLogger("arqonbus.gateway")

WS_PATH = "/ws"
# Consecutive failed checks (one per health_interval_s) before the gateway acts:
# JetStream silent: drop the NATS server for another, again every 2 checks (the next one
# may be cut off too).
RECONNECT_AFTER_FAILED_CHECKS = 2
SHED_AFTER_LINK_FAILURES = 3  # NATS link down: close clients with 4002, refuse new ones (503)


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
    )


def origin_policy(settings: Settings) -> OriginPolicy:
    """The Origin allowlist; ConfigError names a malformed entry."""
    try:
        return OriginPolicy.parse(settings.allowed_origins, settings.require_origin)
    except ValueError as exc:
        raise ConfigError(f"invalid setting ARQONBUS_ALLOWED_ORIGINS: {exc}") from None


class PortInUse(Exception):
    pass


def default_node_id() -> str:
    return f"{socketlib.gethostname()}-{os.getpid()}"


class Gateway:
    """One stateless gateway node. ``start`` -> serve -> ``drain``."""

    def __init__(self, settings: Settings, authenticator: Authenticator | None = None) -> None:
        self.settings = settings
        self.node_id = settings.node_id or default_node_id()
        self.broker = JetStreamBroker(
            settings.nats_urls,
            SubjectScheme(settings.subject_prefix),
            StreamPolicy(
                max_age_s=settings.stream_max_age_s,
                dedupe_window_s=settings.dedupe_window_s,
                replicas=settings.stream_replicas,
            ),
            publish_timeout_s=settings.publish_timeout_s,
            name=f"arqonbus-gateway {self.node_id}",
        )
        self.hub = Hub(self.broker, settings.replay_buffer_msgs, 4 * settings.send_buffer_bytes)
        # Security state shared by every gateway (NATS KV), and the audit stream.
        self.security = SecurityState(self.broker, settings.subject_prefix)
        self.audit = AuditLog(self.broker, settings.subject_prefix, self.node_id)
        try:
            self.authenticator = authenticator or make_authenticator(
                settings.auth, settings, self.security
            )
        except ValueError as exc:
            raise ConfigError(f"invalid setting ARQONBUS_AUTH: {exc}") from None
        self.sessions: set[Session] = set()
        # Per client address: upgrades per second (429 beyond) and unfinished handshakes.
        self.conn_rate = RateLimiter(settings.conn_rate_per_ip, settings.conn_burst_per_ip)
        self.pending_handshakes = PendingHandshakes(settings.max_pending_handshakes_per_ip)
        # Checked here, so a bad allowlist or TLS file stops the gateway before it listens.
        self.origins = origin_policy(settings)
        self.listener = listen_options(settings, settings.host, settings.port)
        self.draining = False
        self.healthy = False
        self.failed_checks = 0  # consecutive health checks JetStream did not answer
        self.link_failures = 0  # consecutive checks the NATS link did not answer
        self._server: Server | None = None
        self._stop = asyncio.Event()
        self._became_ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Listen at once; connect to NATS in the background (readyz stays 503 until then)."""
        try:
            self._server = await start_server(
                self.listener,
                self._on_request,
                self._on_socket,
                self.pending_handshakes if self.pending_handshakes.enabled else None,
                Credentials.select_subprotocol,
            )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(
                    f"port {self.settings.port} on {self.settings.host} is already in use: stop the "
                    f"other process or choose another with --listen HOST:PORT"
                ) from None
            raise
        self._tasks.append(asyncio.create_task(self._connect_and_watch()))
        log.info(
            "gateway %s listening on %s://%s:%d%s",
            self.node_id,
            self.listener.scheme,
            *self.address,
            WS_PATH,
        )

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
        self.audit.start()
        loop = asyncio.get_running_loop()
        interval = self.settings.health_interval_s
        while not self._stop.is_set():
            started = loop.time()
            # Both bounded by the interval, so a stalled link shows within two intervals.
            self.healthy, link_ok = await asyncio.gather(
                self.broker.check_health(timeout=interval),
                self.broker.check_link(timeout=interval),
            )
            if self.healthy:
                self._became_ready.set()
            await self._after_check(link_ok)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    self._stop.wait(), max(0.0, interval - (loop.time() - started))
                )

    async def _after_check(self, link_ok: bool) -> None:
        """Act on consecutive failed checks: another NATS server, then other gateways."""
        self.failed_checks = 0 if self.healthy else self.failed_checks + 1
        self.link_failures = 0 if link_ok else self.link_failures + 1
        if self.failed_checks and self.failed_checks % RECONNECT_AFTER_FAILED_CHECKS == 0:
            # JetStream does not answer through this server: the link may be stalled, or
            # the node cut off from its cluster. Try another server of the pool. (During a
            # NATS election this reconnect is needless but harmless.)
            await self.broker.reconnect_elsewhere()
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
        return self.healthy and self.broker.connected and not self.draining

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
        if self._server is not None:
            self._server.close(close_connections=True)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout / 2):
                    await self._server.wait_closed()
        await self.hub.close()
        await self.security.close()
        await self.audit.close()
        await self.broker.close(timeout / 2)
        close_authenticator = getattr(self.authenticator, "close", None)
        if close_authenticator is not None:  # e.g. the JWT key-set refresher
            close_authenticator()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- HTTP ------------------------------------------------------------------------

    def _on_request(
        self, target: str, headers: Mapping[str, str], peer_ip: str
    ) -> HttpReply | Principal | Awaitable[HttpReply | Principal]:
        path = urlsplit(target).path
        if path == "/healthz":
            return HttpReply(HTTPStatus.OK, {"status": "alive", "node": self.node_id})
        if path == "/readyz":
            return self._readyz()
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
        wait_s = self.conn_rate.take(peer_ip)
        if wait_s:
            return _rate_limited(wait_s)
        try:
            outcome = self.authenticator.authenticate(Credentials.from_request(target, headers))
        except (AuthError, AuthUnavailable) as exc:
            return self._refuse_auth(exc, peer_ip)
        if inspect.isawaitable(outcome):  # the method needs NATS (an agent's nonce)
            return self._finish_auth(outcome, peer_ip)
        return outcome

    async def _finish_auth(
        self, outcome: Awaitable[Principal], peer_ip: str
    ) -> HttpReply | Principal:
        try:
            return await outcome
        except (AuthError, AuthUnavailable) as exc:
            return self._refuse_auth(exc, peer_ip)

    def _refuse_auth(self, exc: AuthError | AuthUnavailable, peer_ip: str) -> HttpReply:
        """401 for a bad credential (audited when it names a tenant); 503 to retry."""
        if isinstance(exc, AuthUnavailable):
            return HttpReply(
                HTTPStatus.SERVICE_UNAVAILABLE, {"error": "unavailable", "message": str(exc)}
            )
        if exc.tenant:
            self.audit.record(
                exc.tenant,
                AUTH_FAILED,
                credential_id=exc.credential_id,
                reason=str(exc),
                peer_ip=peer_ip,
            )
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
            "failed_checks": self.failed_checks,
            "link_failures": self.link_failures,
            "draining": self.draining,
            "node": self.node_id,
            "sessions": len(self.sessions),
        }
        return HttpReply(HTTPStatus.OK if self.ready else HTTPStatus.SERVICE_UNAVAILABLE, body)

    # -- WebSocket -------------------------------------------------------------------

    async def _on_socket(self, principal: Principal, socket: Socket) -> None:
        if self.draining:  # the handshake finished just as the drain began
            await socket.close(CloseCode.SERVICE_RESTART, "server draining: reconnect elsewhere")
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
        )
        self.sessions.add(session)
        try:
            await session.run()
        except Exception:
            log.exception("session %s crashed", session.id)
        finally:
            self.sessions.discard(session)


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


async def run_gateway(settings: Settings) -> int:
    """Run one gateway until SIGTERM/SIGINT, then drain. Returns the exit code."""
    gateway = Gateway(settings)
    await gateway.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received: draining")
    await gateway.drain()
    log.info("gateway %s stopped", gateway.node_id)
    return 0
