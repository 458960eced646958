"""Typed settings, read once at start-up from ``ARQONBUS_*`` variables and flags.

Every field below is a documented setting (see the README's configuration table).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.subjects import is_valid_name

ENV_PREFIX = "ARQONBUS_"


class ConfigError(Exception):
    """A setting is invalid; the message names the key and the fix."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    nats: str = Field("nats://127.0.0.1:4222", description="NATS URLs, comma-separated")
    listen: str = Field("127.0.0.1:8765", description="HOST:PORT of the WebSocket/HTTP listener")
    node_id: str = Field("", description="Node name shown in welcome; default host-pid")
    auth: str = Field("", description="Authentication mode; only 'dev' exists for now")
    subject_prefix: str = Field("arq", description="First token of every NATS subject")
    max_envelope_bytes: int = Field(65536, ge=1024, le=1024 * 1024)
    send_buffer_bytes: int = Field(1024 * 1024, ge=64 * 1024)
    max_in_flight: int = Field(1000, ge=1, le=100_000)
    max_channels_per_connection: int = Field(1000, ge=1, le=100_000)
    stream_max_age_s: float = Field(86400.0, gt=0)
    stream_replicas: int = Field(0, ge=0, le=5, description="0 = min(3, cluster size)")
    dedupe_window_s: float = Field(120.0, ge=120.0)
    publish_timeout_s: float = Field(5.0, gt=0)
    drain_timeout_s: float = Field(10.0, gt=0)
    open_timeout_s: float = Field(10.0, gt=0)
    conn_rate_per_ip: float = Field(
        200.0, ge=0, description="New WebSocket upgrades per second per client address; 0 = off"
    )
    conn_burst_per_ip: int = Field(
        1000, ge=1, description="Upgrades one client address may make at once (bucket size)"
    )
    max_pending_handshakes_per_ip: int = Field(
        64, ge=0, description="Unfinished handshakes one client address may hold; 0 = off"
    )
    ping_interval_s: float = Field(20.0, gt=0)
    health_interval_s: float = Field(2.0, gt=0)
    max_handlers_per_connection: int = Field(100, ge=1, le=10_000)
    command_timeout_s: float = Field(5.0, gt=0, le=600)
    command_timeout_max_s: float = Field(60.0, gt=0, le=600)
    replay_buffer_msgs: int = Field(10_000, ge=100)
    log_level: str = Field("INFO")

    @field_validator("subject_prefix")
    @classmethod
    def _prefix_is_name(cls, value: str) -> str:
        if not is_valid_name(value):
            raise ValueError("must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'")
        return value

    @field_validator("listen")
    @classmethod
    def _listen_is_host_port(cls, value: str) -> str:
        parse_host_port(value)
        return value

    @field_validator("auth")
    @classmethod
    def _auth_is_known(cls, value: str) -> str:
        if value not in ("", "dev"):
            raise ValueError("must be 'dev' (the only mode in this version)")
        return value

    @model_validator(mode="after")
    def _max_age_covers_dedupe_window(self) -> Settings:
        if self.stream_max_age_s < self.dedupe_window_s:
            raise ValueError(
                "ARQONBUS_STREAM_MAX_AGE_S must be >= ARQONBUS_DEDUPE_WINDOW_S "
                f"({self.stream_max_age_s} < {self.dedupe_window_s}): JetStream refuses such a stream"
            )
        return self

    @model_validator(mode="after")
    def _command_timeout_within_max(self) -> Settings:
        if self.command_timeout_s > self.command_timeout_max_s:
            raise ValueError(
                "ARQONBUS_COMMAND_TIMEOUT_S must be <= ARQONBUS_COMMAND_TIMEOUT_MAX_S "
                f"({self.command_timeout_s} > {self.command_timeout_max_s})"
            )
        return self

    @property
    def nats_urls(self) -> list[str]:
        return [u.strip() for u in self.nats.split(",") if u.strip()]

    @property
    def host(self) -> str:
        return parse_host_port(self.listen)[0]

    @property
    def port(self) -> int:
        return parse_host_port(self.listen)[1]


def parse_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


# Variables read elsewhere (not gateway settings), so not reported as unknown.
_OTHER_VARIABLES = {"ARQONBUS_NATS_SERVER", "ARQONBUS_URL", "ARQONBUS_TOKEN"}


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """ARQONBUS_* variables that match no setting: usually a typo worth reporting."""
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields} | _OTHER_VARIABLES
    return sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in known)


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment, with explicit overrides (from flags) on top."""
    clean = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**clean)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        if err["loc"]:
            key = ENV_PREFIX + "_".join(str(p) for p in err["loc"]).upper()
            lines.append(f"invalid setting {key}: {err['msg']}")
        else:
            lines.append(f"invalid settings: {err['msg']}")
    return "; ".join(lines)
