"""Settings: defaults, ARQONBUS_* environment overrides, and errors that name the key."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from pydantic import ValidationError

from arqonbus_server.gateway.config import load_settings
from arqonbus_server.shared.settings import ConfigError, Settings, parse_host_port


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test sees only the ARQONBUS_* variables it sets itself."""
    for key in list(os.environ):
        if key.upper().startswith("ARQONBUS_"):
            monkeypatch.delenv(key)
    yield


def test_defaults() -> None:
    s = load_settings()
    assert s.nats_urls == ["nats://127.0.0.1:4222"]
    assert (s.host, s.port) == ("127.0.0.1", 8765)
    assert s.subject_prefix == "arq"
    assert s.max_envelope_bytes == 65536
    assert s.send_buffer_bytes == 1024 * 1024
    assert s.max_in_flight == 1000
    assert s.stream_replicas == 0
    assert s.dedupe_window_s == 120.0
    assert s.auth == ""
    assert s.node_id == ""


def test_env_overrides_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARQONBUS_MAX_ENVELOPE_BYTES", "2048")
    monkeypatch.setenv("ARQONBUS_SUBJECT_PREFIX", "bus_2")
    s = load_settings()
    assert s.max_envelope_bytes == 2048
    assert s.subject_prefix == "bus_2"


def test_explicit_override_beats_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARQONBUS_MAX_ENVELOPE_BYTES", "2048")
    assert load_settings(max_envelope_bytes=4096).max_envelope_bytes == 4096


def test_none_override_means_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARQONBUS_MAX_ENVELOPE_BYTES", "2048")
    assert load_settings(max_envelope_bytes=None).max_envelope_bytes == 2048


@pytest.mark.parametrize("value", ["abc", "10", "1023", str(8 * 1024 * 1024 + 1), "1.5"])
def test_invalid_env_value_names_the_key(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("ARQONBUS_MAX_ENVELOPE_BYTES", value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "ARQONBUS_MAX_ENVELOPE_BYTES" in str(info.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("ARQONBUS_SUBJECT_PREFIX", "a.b"),
        ("ARQONBUS_SUBJECT_PREFIX", "*"),
        ("ARQONBUS_LISTEN", "nohost"),
        ("ARQONBUS_AUTH", "oauth"),
        ("ARQONBUS_DEDUPE_WINDOW_S", "60"),
        ("ARQONBUS_MAX_IN_FLIGHT", "0"),
    ],
)
def test_each_invalid_setting_names_its_key(
    monkeypatch: pytest.MonkeyPatch, key: str, value: str
) -> None:
    monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert key in str(info.value)


def test_every_invalid_setting_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARQONBUS_MAX_ENVELOPE_BYTES", "1")
    monkeypatch.setenv("ARQONBUS_LISTEN", "nohost")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "ARQONBUS_MAX_ENVELOPE_BYTES" in str(info.value)
    assert "ARQONBUS_LISTEN" in str(info.value)


def test_unknown_override_is_rejected_by_name() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(max_envelope_byte=2048)
    assert "ARQONBUS_MAX_ENVELOPE_BYTE" in str(info.value)


def test_settings_are_frozen() -> None:
    s = load_settings()
    with pytest.raises(ValidationError, match="frozen"):
        s.max_in_flight = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("value", "urls"),
    [
        ("nats://a:4222", ["nats://a:4222"]),
        ("nats://a:4222,nats://b:4222", ["nats://a:4222", "nats://b:4222"]),
        (" nats://a:1 , nats://b:2 ,, ", ["nats://a:1", "nats://b:2"]),
        (",", []),
    ],
)
def test_nats_urls_splitting(monkeypatch: pytest.MonkeyPatch, value: str, urls: list[str]) -> None:
    monkeypatch.setenv("ARQONBUS_NATS", value)
    assert load_settings().nats_urls == urls


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:8765", ("127.0.0.1", 8765)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("localhost:65535", ("localhost", 65535)),
        ("[::1]:9000", ("::1", 9000)),
        ("[::]:80", ("::", 80)),
    ],
)
def test_listen_parsing(value: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(value) == expected
    s = Settings(listen=value)
    assert (s.host, s.port) == expected


@pytest.mark.parametrize(
    "value", ["8765", ":8765", "host:", "host:65536", "host:-1", "host:abc", "host:80 ", ""]
)
def test_listen_rejects_non_host_port(value: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_host_port(value)
    with pytest.raises(ConfigError) as info:
        load_settings(listen=value)
    assert "ARQONBUS_LISTEN" in str(info.value)


def test_the_test_switches_are_not_reported_as_unknown_variables() -> None:
    from arqonbus_server.shared.settings import unknown_variables

    switches = {"ARQONBUS_REGIONS_TEST": "1", "ARQONBUS_IMAGE_TEST": "1", "ARQONBUS_IMAGE": "x"}
    assert unknown_variables({**switches, "ARQONBUS_REGOIN": "east"}) == ["ARQONBUS_REGOIN"]
