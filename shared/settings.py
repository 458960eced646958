"""Typed settings: the model and its pure rules.

Every field below is a documented setting (see docs/operations.md's configuration table).
Nothing here reads the environment or a file: ``settings_from(environ, **overrides)`` builds
settings from a mapping it is given; the composition root (``arqonbus_server.gateway.config``)
passes ``os.environ`` and then checks the files the settings name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from arqonbus_server.shared.errors import ServerError
from arqonbus_server.shared.subjects import is_valid_name

ENV_PREFIX = "ARQONBUS_"
AUTH_METHODS = ("dev", "jwt", "apikey", "agent")  # gateway/auth/base.py


class ConfigError(ServerError):
    """A setting is invalid; the message names the key and the fix."""


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    nats: str = Field("nats://127.0.0.1:4222", description="NATS URLs, comma-separated")
    listen: str = Field("127.0.0.1:8765", description="HOST:PORT of the WebSocket/HTTP listener")
    # -- several processes on one host (gateway/admin/workers.py) --
    workers: int = Field(
        1, ge=1, le=64, description="Gateway processes sharing the listener (SO_REUSEPORT)"
    )
    worker_admin_port: int = Field(
        0, ge=0, le=65535, description="With workers: worker i's own listener is this + i; 0: any"
    )
    reuse_port: bool = Field(
        False, description="Bind the listener with SO_REUSEPORT (each worker of --workers does)"
    )
    admin_listen: str = Field(
        "", description="HOST:PORT of a second listener of this process alone; empty: none"
    )
    node_id: str = Field("", description="Node name shown in welcome; default host-pid")
    auth: str = Field(
        "", description="Authentication methods, comma-separated: jwt, apikey, agent, dev"
    )
    subject_prefix: str = Field("arq", description="First token of every NATS subject")
    max_envelope_bytes: int = Field(65536, ge=1024, le=1024 * 1024)
    send_buffer_bytes: int = Field(1024 * 1024, ge=64 * 1024)
    max_in_flight: int = Field(1000, ge=1, le=100_000)
    max_channels_per_connection: int = Field(1000, ge=1, le=100_000)
    stream_max_age_s: float = Field(86400.0, gt=0)
    stream_replicas: int = Field(0, ge=0, le=5, description="0 = min(3, cluster size)")
    dedupe_window_s: float = Field(120.0, ge=120.0)
    publish_batching: bool = Field(
        True,
        description="Coalesce concurrent publishes to a stream into atomic batches (NATS 2.12+)",
    )
    replay_consumer_min_span: int = Field(
        5000,
        ge=0,
        description="Replays spanning at least this many stream seqs read through a pull "
        "consumer instead of direct gets; 0 = never",
    )
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
    # -- listener security (issue 6): Origin allowlist, TLS, idle timeout --
    allowed_origins: str = Field(
        "", description="Origins allowed to open /ws, comma-separated; empty = no check"
    )
    require_origin: bool = Field(False, description="Refuse /ws handshakes without an Origin")
    tls_cert: str = Field("", description="PEM certificate chain file; with tls_key: wss://")
    tls_key: str = Field("", description="PEM private key file of tls_cert")
    idle_timeout_s: float = Field(
        0.0, ge=0, description="Close a connection that sends no message for this long; 0 = off"
    )
    health_interval_s: float = Field(2.0, gt=0)
    # -- cluster view (issue 13; gateway/state/heartbeat.py, `arqonbus status`) --
    region: str = Field(
        "",
        description="This gateway's region (a NATS cluster of the supercluster): heartbeats, "
        "stream placement, placed tenants' replay; empty: one region",
    )
    heartbeat_interval_s: float = Field(
        5.0, ge=0.1, le=300, description="Heartbeat period; a gateway silent 3 periods is gone"
    )
    # -- presence and rooms (issue 16; gateway/state/presence.py, docs/presence.md) --
    presence_idle_s: float = Field(
        300.0, ge=0, description="A session silent this long shows as idle; 0 = never"
    )
    presence_batch_ms: int = Field(
        100,
        ge=0,
        le=10_000,
        description="Presence changes of a channel sent as one frame per window",
    )
    presence_max_changes: int = Field(
        100, ge=1, le=10_000, description="More changes in a window: one overflow frame instead"
    )
    presence_lease_s: float = Field(
        2.0,
        gt=0,
        le=60,
        description="Lease renewal period; a gateway silent 4 periods has its members removed",
    )
    room_min_retention_s: int = Field(
        3600, ge=1, description="The shortest retention_s a room may be configured with"
    )
    # -- the process (gateway/gc_policy.py) --
    gc_freeze: bool = Field(
        True,
        description="Freeze survivors after each full GC: pauses follow what is new, not the heap",
    )
    gc_sweep_interval_s: float = Field(
        300.0, ge=1, description="Shortest time between whole-heap sweeps (gc_freeze on)"
    )
    gc_young_threshold: int = Field(
        50_000,
        ge=700,
        le=10_000_000,
        description="Tracked objects allocated (net) before a young collection (gc_freeze on)",
    )
    # -- the browser chat demo (issue 18; gateway/demo/) --
    demo_pages: bool = Field(
        False, description="Serve /demo/chat, a chat page on the JavaScript SDK (arqonbus dev: on)"
    )
    # -- web dashboard (issue 13; gateway/http/dashboard.py) --
    trace_viewer_url: str = Field(
        "", description="The dashboard's trace link, {trace_id} replaced; empty: no link"
    )
    # -- tracing (issue 13; gateway/tracing.py); exporters come from the OTEL_* environment --
    tracing: bool = Field(
        False, description="Trace publishes and deliveries (also on when OTEL_* configures it)"
    )
    trust_client_trace: bool = Field(
        False, description="Continue the client's trace; off: start a new trace linked to it"
    )
    nats_msg_trace_subject: str = Field(
        "", description="With tracing on: NATS subject for nats-server's per-hop message traces"
    )
    max_handlers_per_connection: int = Field(100, ge=1, le=10_000)
    command_timeout_s: float = Field(5.0, gt=0, le=600)
    command_timeout_max_s: float = Field(60.0, gt=0, le=600)
    replay_buffer_msgs: int = Field(10_000, ge=100)
    log_level: str = Field("INFO")
    # -- Prometheus metrics (issue 13; gateway/http/metrics.py, GET /metrics) --
    metrics: bool = Field(True, description="Serve GET /metrics (Prometheus text format)")
    metrics_tenant_labels: bool = Field(
        False, description="Add a tenant label to per-tenant metrics (bounded by max_tenants)"
    )
    metrics_max_tenants: int = Field(
        100, ge=1, le=10_000, description="Tenants with their own label value; the rest: other"
    )
    metrics_phase_sample_ms: float = Field(
        10.0,
        ge=0,
        le=60_000,
        description="Follow one client message per this many ms through the gateway's phases; 0: off",
    )

    # -- rate limits and quotas (issue 6, gateway/state/limits.py); 0 = off --
    msg_rate_per_conn: float = Field(
        1000.0, ge=0, description="Event and command frames per second per connection"
    )
    msg_burst_per_conn: int = Field(
        2000, ge=0, description="Frames one connection may send at once; 0 = 2 x the rate"
    )
    bytes_rate_per_conn: float = Field(
        4 * 1024 * 1024, ge=0, description="Bytes per second of frames per connection"
    )
    bytes_burst_per_conn: int = Field(0, ge=0, description="Byte bucket size; 0 = 2 x the rate")
    msg_rate_per_principal: float = Field(
        0.0, ge=0, description="Frames per second of one principal on one gateway (all its conns)"
    )
    msg_burst_per_principal: int = Field(0, ge=0, description="0 = 2 x the rate")
    bytes_rate_per_principal: float = Field(
        0.0, ge=0, description="Bytes per second of one principal on one gateway (all its conns)"
    )
    bytes_burst_per_principal: int = Field(0, ge=0, description="0 = 2 x the rate")
    max_connections_per_tenant: int = Field(
        0, ge=0, description="Connections of one tenant over all gateways; 0 = off"
    )
    tenant_max_bytes: int = Field(
        0, ge=0, description="Stored bytes per tenant stream (new events refused when full)"
    )

    # -- content policies (issue 6, shared/inspect.py); the file is read and validated at
    # start-up by gateway/config.py --
    policy_file: str = Field("", description="JSON content policy file; empty = no policy")

    # -- audit stream (issue 6, gateway/state/audit.py): one JetStream stream per tenant --
    audit_max_age_s: float = Field(
        90 * 86400.0, ge=3600, description="How long audit events are kept (default 90 days)"
    )
    audit_max_bytes: int = Field(
        1 << 30, ge=1 << 20, description="Audit stream size per tenant; the oldest go beyond"
    )
    audit_queue_max: int = Field(
        10_000, ge=100, le=1_000_000, description="Audit events awaiting write; beyond: dropped"
    )

    # -- JWT bearer tokens (ARQONBUS_AUTH=jwt; gateway/auth/jwt.py). Exactly one key source:
    # jwt_secret_file / jwt_secret (HS*), jwt_public_key_file, jwt_jwks_file or jwt_jwks_url.
    jwt_algorithms: str = Field(
        "RS256,ES256,EdDSA",
        description="Accepted JWT algorithms (never 'none'); HS* only with a secret",
    )
    jwt_secret_file: str = Field("", description="File holding the HS* shared secret (>= 32 bytes)")
    jwt_secret: SecretStr = Field(SecretStr(""), description="The HS* shared secret itself")
    jwt_public_key_file: str = Field("", description="PEM public key file (RSA, EC or Ed25519)")
    jwt_jwks_file: str = Field("", description="JWKS file; tokens must carry a known kid")
    jwt_jwks_url: str = Field("", description="JWKS URL, fetched at start and in the background")
    jwt_jwks_refresh_s: float = Field(300.0, ge=1, description="JWKS URL refresh interval")
    jwt_audience: str = Field("", description="Required 'aud' when set")
    jwt_issuer: str = Field("", description="Required 'iss' when set")
    jwt_leeway_s: float = Field(
        30.0, ge=0, le=600, description="Clock skew allowed for exp/nbf/iat"
    )
    jwt_tenant_claim: str = Field("tenant", min_length=1, description="Claim naming the tenant")
    # -- agent identity and first-message auth (issue 6; gateway/auth/agent.py, server.py) --
    agent_clock_skew_s: float = Field(
        30.0, ge=1, le=300, description="How far an agent token's timestamp may be off, seconds"
    )
    auth_message_timeout_s: float = Field(
        10.0,
        ge=0,
        le=300,
        description="A handshake without a credential waits this long for an auth frame; 0 = off",
    )

    @field_validator("jwt_algorithms")
    @classmethod
    def _jwt_algorithms_safe(cls, value: str) -> str:
        # Names are checked in full by gateway/auth/jwt.py; 'none' is refused here too.
        algorithms = [a.strip() for a in value.split(",") if a.strip()]
        if not algorithms or any(a.lower() == "none" for a in algorithms):
            raise ValueError(
                "list JWT algorithms, e.g. RS256,ES256,EdDSA ('none' is never allowed)"
            )
        return ",".join(algorithms)

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

    @field_validator("admin_listen")
    @classmethod
    def _admin_listen_is_host_port(cls, value: str) -> str:
        if value:
            parse_host_port(value)
        return value

    @field_validator("auth")
    @classmethod
    def _auth_is_known(cls, value: str) -> str:
        methods = [m.strip() for m in value.split(",") if m.strip()]
        unknown = [m for m in methods if m not in AUTH_METHODS]
        if unknown:
            raise ValueError(
                f"unknown method(s) {', '.join(unknown)}: use a comma-separated list of "
                f"{', '.join(AUTH_METHODS)}"
            )
        return ",".join(dict.fromkeys(methods))

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

    @model_validator(mode="after")
    def _tls_cert_and_key_together(self) -> Settings:
        if bool(self.tls_cert) != bool(self.tls_key):
            missing = "ARQONBUS_TLS_KEY (--tls-key)"
            if not self.tls_cert:
                missing = "ARQONBUS_TLS_CERT (--tls-cert)"
            raise ValueError(
                f"TLS needs both a certificate and its key: set {missing} too, or neither"
            )
        return self

    @model_validator(mode="after")
    def _require_origin_needs_allowlist(self) -> Settings:
        if self.require_origin and not self.allowed_origins.strip():
            raise ValueError(
                "ARQONBUS_REQUIRE_ORIGIN needs ARQONBUS_ALLOWED_ORIGINS: list the origins "
                "allowed to connect"
            )
        return self

    # -- gateway -> NATS credentials and TLS (issue 6; mesh/nats_auth.py builds the options).
    # At most one of: nats_user (+ nats_password), nats_token, nats_nkey_seed_file, nats_creds_file.
    nats_user: str = Field("", description="NATS user name; needs nats_password")
    nats_password: SecretStr = Field(SecretStr(""), description="Password of nats_user")
    nats_token: SecretStr = Field(SecretStr(""), description="NATS authorization token")
    nats_nkey_seed_file: str = Field("", description="File holding the NATS user nkey seed (SU...)")
    nats_creds_file: str = Field("", description="NATS .creds file (user JWT + nkey seed)")
    nats_tls_ca: str = Field("", description="PEM CA file that signed the NATS servers' certs")
    nats_tls_cert: str = Field("", description="PEM client certificate for mutual TLS to NATS")
    nats_tls_key: str = Field("", description="PEM private key of nats_tls_cert")
    nats_tls_handshake_first: bool = Field(
        False, description="TLS before any NATS byte (server: tls { handshake_first: true })"
    )
    # -- production refusal of dev auth (issue 6; gateway/admin/cli.py)
    insecure_dev_auth: bool = Field(
        False, description="Allow ARQONBUS_AUTH=dev in `arqonbus gateway` (development only)"
    )

    @model_validator(mode="after")
    def _nats_credentials_consistent(self) -> Settings:
        """At most one credential, complete pairs, none in a URL (files: gateway/config.py)."""
        for url in self.nats_urls:
            if "@" in urlsplit(url).netloc:
                raise ValueError(
                    f"ARQONBUS_NATS has credentials in a URL ({redact_url(url)}): URLs are "
                    "logged; put them in ARQONBUS_NATS_USER + ARQONBUS_NATS_PASSWORD or "
                    "ARQONBUS_NATS_TOKEN"
                )
        chosen = [env for field, env in NATS_CREDENTIALS if _secret(getattr(self, field))]
        if len(chosen) > 1:
            raise ValueError(
                f"set at most one NATS credential, not {' and '.join(chosen)}: a user (with "
                "ARQONBUS_NATS_PASSWORD), a token, an nkey seed file or a creds file"
            )
        has_password = bool(self.nats_password.get_secret_value())
        if self.nats_user and not has_password:
            raise ValueError("ARQONBUS_NATS_USER needs ARQONBUS_NATS_PASSWORD too")
        if has_password and not self.nats_user:
            raise ValueError("ARQONBUS_NATS_PASSWORD needs ARQONBUS_NATS_USER too")
        if bool(self.nats_tls_cert) != bool(self.nats_tls_key):
            missing = "ARQONBUS_NATS_TLS_KEY" if self.nats_tls_cert else "ARQONBUS_NATS_TLS_CERT"
            raise ValueError(
                f"a NATS client certificate needs its key: set {missing} too, or neither"
            )
        return self

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert)

    @property
    def nats_urls(self) -> list[str]:
        return [u.strip() for u in self.nats.split(",") if u.strip()]

    @property
    def host(self) -> str:
        return parse_host_port(self.listen)[0]

    @property
    def port(self) -> int:
        return parse_host_port(self.listen)[1]


# The NATS credentials (at most one) and the files NATS settings name, with their variables.
NATS_CREDENTIALS = (
    ("nats_user", "ARQONBUS_NATS_USER"),
    ("nats_token", "ARQONBUS_NATS_TOKEN"),
    ("nats_nkey_seed_file", "ARQONBUS_NATS_NKEY_SEED_FILE"),
    ("nats_creds_file", "ARQONBUS_NATS_CREDS_FILE"),
)
NATS_FILES = (
    ("nats_nkey_seed_file", "ARQONBUS_NATS_NKEY_SEED_FILE"),
    ("nats_creds_file", "ARQONBUS_NATS_CREDS_FILE"),
    ("nats_tls_ca", "ARQONBUS_NATS_TLS_CA"),
    ("nats_tls_cert", "ARQONBUS_NATS_TLS_CERT"),
    ("nats_tls_key", "ARQONBUS_NATS_TLS_KEY"),
)


def _secret(value: Any) -> str:
    return value.get_secret_value() if hasattr(value, "get_secret_value") else str(value or "")


def redact_url(url: str) -> str:
    """``url`` without any ``user:password@`` part, safe to log."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable NATS URL>"
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()


def parse_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


# Variables read elsewhere (not gateway settings), so not reported as unknown.
_OTHER_VARIABLES = {
    "ARQONBUS_NATS_SERVER",
    "ARQONBUS_NATS_BACKEND",  # arqonbus dev and the tests: local or container NATS nodes
    "ARQONBUS_URL",
    "ARQONBUS_TOKEN",
    # Test switches (make image-test, make test-regions): read by the tests' conftest, and
    # set while those tests run the CLI, which must not call them unknown.
    "ARQONBUS_IMAGE_TEST",
    "ARQONBUS_IMAGE",
    "ARQONBUS_REGIONS_TEST",
}


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """ARQONBUS_* variables that match no setting: usually a typo worth reporting."""
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields} | _OTHER_VARIABLES
    return sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in known)


def settings_from(environ: Mapping[str, str], **overrides: Any) -> Settings:
    """Settings from ``ARQONBUS_<FIELD>`` entries of ``environ`` (any case), with explicit
    overrides (from flags; None = not given) on top. Raises ConfigError naming the variable.
    """
    by_upper = {key.upper(): value for key, value in environ.items()}
    values: dict[str, Any] = {
        name: by_upper[ENV_PREFIX + name.upper()]
        for name in Settings.model_fields
        if ENV_PREFIX + name.upper() in by_upper
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Settings(**values)
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
