"""``/demo/chat``: a chat page built on the JavaScript SDK, served when ``demo_pages`` is on.

The page is static (``static/``: its HTML, script and style, and the SDK's bundle built from
``clients/js``): it holds no data and no credential. It signs in over the WebSocket like any
client (the token goes in the subprotocol or a first ``auth`` frame, never in a URL), and it
may connect to the other gateways the operator lists in its ``gateways`` query parameter, so
it can resume on one of them when its own gateway dies. ``arqonbus dev`` turns it on; a
production gateway serves it only when ``ARQONBUS_DEMO_PAGES`` is set.
"""

from __future__ import annotations

import functools
import importlib.resources
from http import HTTPStatus

from arqonbus_server.gateway.ws.transport import HttpReply

DEMO_PATH = "/demo"
CHAT_PATH = "/demo/chat"
SDK_BUNDLE = "arqonbus.min.js"

_JS = "text/javascript; charset=utf-8"
# path -> (file in static/, content type)
_FILES = {
    CHAT_PATH: ("chat.html", "text/html; charset=utf-8"),
    "/demo/chat.js": ("chat.js", _JS),
    "/demo/chat.css": ("chat.css", "text/css; charset=utf-8"),
    f"/demo/{SDK_BUNDLE}": (SDK_BUNDLE, _JS),
}
# Its own files only; WebSockets to any gateway (the failover list); no framing.
_PAGE_HEADERS = (
    ("Cache-Control", "no-store"),
    (
        "Content-Security-Policy",
        "default-src 'self'; connect-src 'self' ws: wss:; frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
)


@functools.cache
def _read_static(name: str) -> bytes:
    return importlib.resources.files(__package__).joinpath("static", name).read_bytes()


def is_demo_path(path: str) -> bool:
    return path == DEMO_PATH or path.startswith(DEMO_PATH + "/")


def static_reply(path: str) -> HttpReply:
    """The page's files, or 404 naming the page."""
    found = _FILES.get(path)
    if found is None:
        return HttpReply(HTTPStatus.NOT_FOUND, {"error": f"not found: the demo is {CHAT_PATH}"})
    name, content_type = found
    return HttpReply(HTTPStatus.OK, _read_static(name), _PAGE_HEADERS, content_type)


__all__ = ["CHAT_PATH", "DEMO_PATH", "SDK_BUNDLE", "is_demo_path", "static_reply"]
