"""The dashboard's request rules (gateway/dashboard/routes.py): where the credential comes
from, who may look at what, the cookie, and the page's files."""

from __future__ import annotations

from http import HTTPStatus

import pytest
from websockets.datastructures import Headers

from arqonbus_server.gateway.auth.base import Principal
from arqonbus_server.gateway.dashboard import routes


def test_the_credential_comes_from_the_header_else_the_cookie_never_the_query() -> None:
    both = Headers([("Authorization", "Bearer dev:a:x"), ("Cookie", "arqonbus_dashboard=dev:b:y")])
    assert routes.credentials(both).token == "dev:a:x"
    cookie = Headers([("Cookie", "other=1; arqonbus_dashboard=dev%3Ab%3Ay")])
    assert routes.credentials(cookie).token == "dev:b:y"
    assert routes.uses_cookie(cookie) and not routes.uses_cookie(both)
    assert routes.credentials(Headers()).token is None
    assert routes.credentials(Headers([("Cookie", "arqonbus_dashboard=")])).token is None


def test_a_cookie_authenticated_request_must_come_from_the_gateways_own_origin() -> None:
    host = [("Host", "gw.example:8765")]
    assert routes.same_origin(Headers([*host, ("Origin", "http://gw.example:8765")]))
    assert routes.same_origin(Headers(host))  # not a browser
    assert not routes.same_origin(Headers([*host, ("Origin", "http://evil.example")]))
    assert not routes.same_origin(Headers([*host, ("Origin", "http://gw.example:9999")]))
    two = Headers([*host, ("Origin", "http://gw.example:8765"), ("Origin", "http://x")])
    assert not routes.same_origin(two)


@pytest.mark.parametrize(
    ("role", "grants", "target", "allowed"),
    [
        ("owner", (), "/dashboard/feed", True),
        ("admin", (), "/dashboard/feed?tenant=acme", True),
        ("member", ("*:*:admin",), "/dashboard/feed", True),
        ("member", (), "/dashboard/feed", False),
        ("member", ("science:*:admin",), "/dashboard/feed", False),  # one room is not enough
        ("read-only", (), "/dashboard/feed", False),
        ("owner", (), "/dashboard/feed?tenant=other", False),
    ],
)
def test_only_an_admin_of_the_whole_tenant_sees_it_and_only_that_tenant(
    role: str, grants: tuple[str, ...], target: str, allowed: bool
) -> None:
    refusal = routes.refusal(Principal("acme", "ops", role, grants), target)
    assert (refusal is None) == allowed
    if refusal is not None:
        assert refusal.status == HTTPStatus.FORBIDDEN


def test_the_login_cookie_is_http_only_strict_and_scoped_to_the_dashboard() -> None:
    reply = routes.login_reply(Principal("acme", "ops"), "dev:acme:ops", secure=True)
    cookie = dict(reply.headers)["Set-Cookie"]
    assert cookie.startswith("arqonbus_dashboard=dev%3Aacme%3Aops;")
    for part in ("HttpOnly", "SameSite=Strict", "Path=/dashboard", "Secure"):
        assert part in cookie.split("; ")
    assert "Max-Age=0" in dict(routes.logout_reply().headers)["Set-Cookie"]


def test_the_page_files_are_served_with_their_types_and_a_strict_policy() -> None:
    page = routes.static_reply("/dashboard")
    assert page is not None and isinstance(page.body, bytes)
    assert page.content_type.startswith("text/html") and b"dashboard.js" in page.body
    assert "default-src 'self'" in dict(page.headers)["Content-Security-Policy"]
    script = routes.static_reply("/dashboard/dashboard.js")
    assert script is not None and script.content_type.startswith("text/javascript")
    assert routes.static_reply("/dashboard/../app.py") is None
    assert routes.static_reply("/dashboard/feed") is None
