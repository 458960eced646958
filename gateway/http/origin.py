"""The Origin allowlist: refuse browser handshakes from pages of other sites (CSWSH).

A browser sends the page's origin in the ``Origin`` header of every WebSocket handshake and
lets any page open a WebSocket to any host, with the user's cookies. The allowlist
(``ARQONBUS_ALLOWED_ORIGINS``) names the sites whose pages may connect. Non-browser clients
usually send no Origin; they are allowed unless ``ARQONBUS_REQUIRE_ORIGIN`` is true.

Entries, comma-separated:

- ``scheme://host[:port]``: exactly that origin (``http`` or ``https``; a default port,
  80 for http or 443 for https, may be written or left out).
- ``*.example.com``: any subdomain of example.com, at any depth, over https on the default
  port (``https://app.example.com``, ``https://a.b.example.com``; not ``example.com`` itself).

Comparison ignores case. Everything here is pure: no I/O, no settings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}
# One DNS label; a host is labels joined by dots (or an IPv6 literal in brackets).
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST = re.compile(rf"^(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9a-f:.]+\])$")
_WILDCARD = re.compile(rf"^\*\.({_LABEL}(?:\.{_LABEL})+)$")


def normalize_origin(value: str) -> str | None:
    """``scheme://host[:port]`` in lower case without a default port, or None if malformed."""
    value = value.strip().lower()
    if not value.isascii():  # browsers send international names in punycode
        return None
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        return None
    host = parts.hostname or ""
    if (
        parts.scheme not in _DEFAULT_PORTS
        or value != f"{parts.scheme}://{parts.netloc}"  # no path, query, fragment or userinfo
        or "@" in parts.netloc
        or not _HOST.match(host if ":" not in host else f"[{host}]")
    ):
        return None
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != _DEFAULT_PORTS[parts.scheme]:
        netloc = f"{netloc}:{port}"
    return f"{parts.scheme}://{netloc}"


@dataclass(frozen=True, slots=True)
class OriginPolicy:
    """Which handshakes ``allows``; an empty policy (the default) allows every handshake."""

    exact: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()  # ".example.com" for an entry "*.example.com"
    require_origin: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.exact or self.suffixes)

    @classmethod
    def parse(cls, allowed_origins: str, require_origin: bool = False) -> OriginPolicy:
        """The policy for the setting's value; ValueError names a malformed entry."""
        exact: set[str] = set()
        suffixes: list[str] = []
        for raw in allowed_origins.split(","):
            entry = raw.strip()
            if not entry:
                continue
            wildcard = _WILDCARD.match(entry.lower())
            if wildcard:
                suffixes.append("." + wildcard.group(1))
                continue
            origin = normalize_origin(entry.rstrip("/"))
            if origin is None:
                raise ValueError(
                    f"{entry!r} is not an origin: write scheme://host[:port] (e.g. "
                    "https://app.example.com) or *.example.com for https subdomains"
                )
            exact.add(origin)
        if require_origin and not (exact or suffixes):
            raise ValueError("require_origin needs a non-empty allowed_origins")
        return cls(frozenset(exact), tuple(suffixes), require_origin)

    def allows(self, origin: str | None) -> bool:
        """Whether a handshake with this ``Origin`` header value (None: no header) may upgrade."""
        if not self.enabled:
            return True
        if origin is None:
            return not self.require_origin
        normalized = normalize_origin(origin)  # "null" (sandboxed pages, files) is never allowed
        if normalized is None:
            return False
        if normalized in self.exact:
            return True
        if normalized.startswith("https://") and ":" not in normalized[8:]:
            host = normalized[8:]
            return any(host.endswith(suffix) for suffix in self.suffixes)
        return False


def origin_allowed(origin: str | None, allowed_origins: str, require_origin: bool = False) -> bool:
    """One-shot form of :meth:`OriginPolicy.allows` (parses the setting each call)."""
    return OriginPolicy.parse(allowed_origins, require_origin).allows(origin)
