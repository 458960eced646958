"""The web dashboard's routes: its files, its sign-in cookie, and its live feed.

Who may look: an admin of a tenant (role owner or admin, or a ``*:*:admin`` grant), with the
same credentials the WebSocket accepts (a JWT, an API key, a dev token); the dashboard shows
that tenant only. The page itself (``static/``) is plain HTML, JavaScript and CSS with nothing
of the mesh in it; every byte of data comes over two WebSockets that check the credential:

* ``/dashboard/feed``: a snapshot every heartbeat interval (gateways and NATS servers from the
  cluster view, this gateway's connections and busiest channels of the tenant, the tenant's
  stream);
* ``/dashboard/tail``: an ordinary ArqonBus session (the page sends ``join_channel``), so the
  live tail is a subscriber and obeys exactly a subscriber's authorization.

Signing in: the page sends the token once, in an ``Authorization`` header, to
``/dashboard/login``, which answers with an HttpOnly, SameSite=Strict cookie scoped to
``/dashboard``. The token never appears in a URL (so never in a proxy's log) and page scripts
cannot read it back. A cookie-authenticated WebSocket must come from the gateway's own origin
(cross-site WebSocket hijacking). Every connection checks the credential again, so an expired
JWT or a revoked key stops working at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.resources
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import orjson

from arqonbus_server.gateway.auth.base import Credentials, Principal
from arqonbus_server.gateway.ws.hub import Hub
from arqonbus_server.gateway.ws.transport import HttpReply, Socket
from arqonbus_server.mesh.ports import Broker, ClusterView, MeshError
from arqonbus_server.shared import authz
from arqonbus_server.shared.cluster import BadHeartbeat, decode_heartbeat
from arqonbus_server.shared.errors import CloseCode

log = logging.getLogger("arqonbus.gateway.dashboard")

DASHBOARD_PATH = "/dashboard"
LOGIN_PATH = "/dashboard/login"
LOGOUT_PATH = "/dashboard/logout"
FEED_PATH = "/dashboard/feed"
TAIL_PATH = "/dashboard/tail"
COOKIE_NAME = "arqonbus_dashboard"
BUSIEST_CHANNELS = 10
NATS_PROBE_EVERY_S = 5.0

# path -> (file in static/, content type)
_FILES = {
    "/dashboard": ("dashboard.html", "text/html; charset=utf-8"),
    "/dashboard/": ("dashboard.html", "text/html; charset=utf-8"),
    "/dashboard/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
# The page loads only its own files and talks only to its own gateway; no framing.
_PAGE_HEADERS = (
    ("Cache-Control", "no-store"),
    ("Content-Security-Policy", "default-src 'self'; connect-src 'self'; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
)


@dataclass(frozen=True, slots=True)
class DashboardViewer:
    """An upgrade to the feed: whose tenant it shows."""

    principal: Principal


@functools.cache
def _read_static(name: str) -> bytes:
    return importlib.resources.files(__package__).joinpath("static", name).read_bytes()


def static_reply(path: str) -> HttpReply | None:
    """The page's files (public: they hold no data), or None for another path."""
    found = _FILES.get(path)
    if found is None:
        return None
    name, content_type = found
    return HttpReply(HTTPStatus.OK, _read_static(name), _PAGE_HEADERS, content_type)


def credentials(headers: Mapping[str, str]) -> Credentials:
    """The token from ``Authorization: Bearer`` (scripts, and the sign-in request), else from
    the dashboard's cookie. Never from the query string."""
    by_header = Credentials.from_request("", headers)
    if by_header.token is not None:
        return by_header
    return Credentials(cookie_token(headers))


def cookie_token(headers: Mapping[str, str]) -> str | None:
    try:
        values = headers.get_all("Cookie") if hasattr(headers, "get_all") else []
    except LookupError:
        values = []
    for value in values:
        jar: SimpleCookie = SimpleCookie()
        with contextlib.suppress(CookieError):
            jar.load(value)
        if COOKIE_NAME in jar and jar[COOKIE_NAME].value:
            return unquote(jar[COOKIE_NAME].value)
    return None


def uses_cookie(headers: Mapping[str, str]) -> bool:
    return Credentials.from_request("", headers).token is None


def same_origin(headers: Mapping[str, str]) -> bool:
    """A browser's request from the gateway's own origin (or a non-browser, with no Origin)."""
    try:
        origin, host = headers.get("Origin"), headers.get("Host")
    except LookupError:  # a header given twice: never a browser's
        return False
    if origin is None:
        return True
    return host is not None and urlsplit(origin).netloc.lower() == host.lower()


def refusal(principal: Principal, target: str) -> HttpReply | None:
    """403 unless the principal administers its whole tenant and asks for no other tenant."""
    if not authz.decide(principal.role, principal.grants, authz.Permission.ADMIN, "*", "*"):
        return forbidden(
            f"the dashboard needs an admin of tenant {principal.tenant!r} (role owner or "
            "admin, or a '*:*:admin' grant)"
        )
    asked = parse_qs(urlsplit(target).query).get("tenant", [principal.tenant])[0]
    if asked != principal.tenant:
        return forbidden(
            f"this credential is for tenant {principal.tenant!r}: it cannot see tenant "
            f"{asked[:64]!r}; sign in with a credential of that tenant"
        )
    return None


def forbidden(message: str) -> HttpReply:
    return HttpReply(HTTPStatus.FORBIDDEN, {"error": "forbidden", "message": message})


def unauthorized(message: str) -> HttpReply:
    return HttpReply(HTTPStatus.UNAUTHORIZED, {"error": "unauthorized", "message": message})


def login_reply(principal: Principal, token: str, secure: bool) -> HttpReply:
    """200 with the sign-in cookie: HttpOnly (no script reads it), SameSite=Strict, only for
    /dashboard, a session cookie (gone with the browser), Secure over TLS."""
    cookie = (
        f"{COOKIE_NAME}={quote(token, safe='')}; Path={DASHBOARD_PATH}; HttpOnly; SameSite=Strict"
    )
    if secure:
        cookie += "; Secure"
    body: dict[str, object] = {
        "tenant": principal.tenant,
        "principal": principal.id,
        "role": principal.role,
    }
    return HttpReply(HTTPStatus.OK, body, (("Set-Cookie", cookie), ("Cache-Control", "no-store")))


def logout_reply() -> HttpReply:
    cookie = f"{COOKIE_NAME}=; Path={DASHBOARD_PATH}; HttpOnly; SameSite=Strict; Max-Age=0"
    return HttpReply(HTTPStatus.OK, {"signed_out": True}, (("Set-Cookie", cookie),))


class DashboardFeed:
    """The feed's snapshots: one per ``interval_s`` to each viewer, until it goes."""

    def __init__(
        self,
        cluster: ClusterView,
        broker: Broker,
        hub: Hub,
        node: str,
        interval_s: float,
        connections_of: Callable[[str], tuple[int, int]],
        trace_viewer_url: str = "",
    ) -> None:
        self._cluster = cluster
        self._broker = broker
        self._hub = hub
        self._node = node
        self._interval_s = interval_s
        self._connections_of = connections_of  # tenant -> (its connections here, all here)
        self._trace_viewer_url = trace_viewer_url
        self._nats_seen: list[dict[str, Any]] = []
        self._nats_at: float | None = None

    async def run(self, viewer: Principal, socket: Socket, revoked: Callable[[], bool]) -> None:
        """Send a snapshot now and every interval until the viewer closes the socket, or its
        credential expires (4004) or is revoked (``revoked()``, 4500), as a session would."""
        closed = asyncio.create_task(_until_closed(socket))
        try:
            while not closed.done():
                if revoked():
                    await socket.close(CloseCode.CREDENTIAL_REVOKED, "the credential was revoked")
                    return
                if viewer.expires_at is not None and time.time() >= viewer.expires_at:
                    await socket.close(CloseCode.TOKEN_EXPIRED, "the credential expired: sign in")
                    return
                if not socket.send(orjson.dumps(await self.snapshot(viewer.tenant))):
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(closed), self._interval_s)
        finally:
            closed.cancel()
            await asyncio.gather(closed, return_exceptions=True)

    async def snapshot(self, tenant: str) -> dict[str, Any]:
        errors: list[str] = []
        gateways, nats, stream = await asyncio.gather(
            self._gateways(errors), self._nats(errors), self._stream(tenant, errors)
        )
        here, total = self._connections_of(tenant)
        return {
            "type": "snapshot",
            "time": time.time(),
            "node": self._node,
            "tenant": tenant,
            "interval_s": self._interval_s,
            "trace_viewer_url": self._trace_viewer_url,
            "gateways": gateways,
            "nats": nats,
            "connections": {"tenant": here, "gateway": total},
            "channels": [
                {"room": ref.room, "channel": ref.channel, "members": members}
                for ref, members in self._hub.busiest_channels(tenant, BUSIEST_CHANNELS)
            ],
            "stream": stream,
            "errors": errors,
        }

    async def _gateways(self, errors: list[str]) -> list[dict[str, Any]]:
        try:
            raw = await self._cluster.gateways()
        except MeshError as exc:
            errors.append(f"gateways: {exc}")
            return []
        found = []
        for data in raw:
            with contextlib.suppress(BadHeartbeat):
                found.append(asdict(decode_heartbeat(data)))
        return sorted(found, key=lambda g: str(g["node"]))

    async def _nats(self, errors: list[str]) -> list[dict[str, Any]]:
        # Each server is asked for its INFO over a connection of its own: at most once per
        # NATS_PROBE_EVERY_S for all viewers, not per snapshot per viewer.
        now = time.monotonic()
        if self._nats_at is None or now - self._nats_at >= NATS_PROBE_EVERY_S:
            try:
                nodes = sorted(await self._cluster.nats_servers(), key=lambda n: (n.name, n.url))
                self._nats_seen = [asdict(node) for node in nodes]
            except MeshError as exc:
                errors.append(f"NATS servers: {exc}")
                return []
            self._nats_at = now
        return self._nats_seen

    async def _stream(self, tenant: str, errors: list[str]) -> dict[str, int] | None:
        try:
            return asdict(await self._broker.stream_stats(tenant))
        except MeshError as exc:
            errors.append(f"stream: {exc}")
            return None


async def _until_closed(socket: Socket) -> None:
    """Read (and ignore) what the viewer sends until the socket closes."""
    while await socket.recv() is not None:
        pass
