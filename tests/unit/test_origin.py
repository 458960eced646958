"""The Origin allowlist (gateway/http/origin.py): a table of settings, headers and verdicts."""

from __future__ import annotations

import pytest

from arqonbus_server.gateway.http.origin import OriginPolicy, normalize_origin, origin_allowed

EXACT = "https://app.example.com, http://localhost:3000"
WILD = "*.example.com"

CASES = [
    # (allowed_origins, require_origin, Origin header or None, allowed?)
    ("", False, None, True),  # no allowlist: no check (the default)
    ("", False, "https://evil.test", True),
    (EXACT, False, "https://app.example.com", True),
    (EXACT, False, "HTTPS://App.Example.COM", True),  # case-insensitive
    (EXACT, False, "https://app.example.com:443", True),  # default port written out
    (EXACT, False, "http://localhost:3000", True),
    (EXACT, False, "http://localhost:3001", False),  # other port
    (EXACT, False, "http://localhost", False),
    (EXACT, False, "http://app.example.com", False),  # other scheme
    (EXACT, False, "https://evil.test", False),
    (EXACT, False, "https://app.example.com.evil.test", False),  # suffix trick
    (EXACT, False, "https://evilapp.example.com", False),
    (EXACT, False, "https://app.example.com/path", False),  # not an origin
    (EXACT, False, "https://user@app.example.com", False),
    (EXACT, False, "null", False),  # sandboxed iframe, file://
    (EXACT, False, "", False),
    (EXACT, False, None, True),  # non-browser client
    (EXACT, True, None, False),  # ... unless an Origin is required
    (EXACT, True, "https://app.example.com", True),
    (WILD, False, "https://app.example.com", True),
    (WILD, False, "https://a.b.example.com", True),  # any depth
    (WILD, False, "https://example.com", False),  # not the apex
    (WILD, False, "http://app.example.com", False),  # https only
    (WILD, False, "https://app.example.com:8443", False),  # default port only
    (WILD, False, "https://app.example.com:443", True),
    (WILD, False, "https://appexample.com", False),
    (WILD, False, "https://app.example.com.evil.test", False),
    (WILD, False, "https://evil-example.com", False),
    (f"{WILD},http://localhost:8080", False, "http://localhost:8080", True),
    ("http://[::1]:8080", False, "http://[::1]:8080", True),
    ("http://[::1]:8080", False, "http://[::2]:8080", False),
]


@pytest.mark.parametrize(("allowed", "require", "origin", "expected"), CASES)
def test_origin_table(allowed: str, require: bool, origin: str | None, expected: bool) -> None:
    assert origin_allowed(origin, allowed, require) is expected


@pytest.mark.parametrize(
    "entry",
    [
        "app.example.com",  # no scheme
        "ftp://app.example.com",
        "https://app.example.com/path",
        "https://*.example.com",  # the wildcard form is *.example.com
        "*.com",  # a wildcard needs at least two labels
        "*",
        "null",
        "https://bad_host.example.com",
        "https://app.example.com:99999",
    ],
)
def test_malformed_entries_are_refused(entry: str) -> None:
    with pytest.raises(ValueError, match="is not an origin"):
        OriginPolicy.parse(entry)


def test_trailing_slash_and_blanks_in_the_setting_are_tolerated() -> None:
    policy = OriginPolicy.parse(" https://app.example.com/ ,, ")
    assert policy.exact == frozenset({"https://app.example.com"})


def test_require_origin_needs_an_allowlist() -> None:
    with pytest.raises(ValueError, match="require_origin needs"):
        OriginPolicy.parse("", require_origin=True)


def test_empty_policy_is_disabled() -> None:
    assert not OriginPolicy.parse("").enabled
    assert OriginPolicy.parse(WILD).enabled


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("https://A.example.com:443", "https://a.example.com"),
        ("http://a.example.com:80", "http://a.example.com"),
        ("http://a.example.com:8080", "http://a.example.com:8080"),
        ("https://a.example.com/", None),
        ("https://ä.example.com", None),
        ("ws://a.example.com", None),
    ],
)
def test_normalize_origin(value: str, expected: str | None) -> None:
    assert normalize_origin(value) == expected
