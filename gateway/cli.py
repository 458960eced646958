"""``arqonbus``: dev, gateway, mesh provision."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from arqonbus_server.gateway.config import load_settings
from arqonbus_server.shared.settings import ConfigError, Settings, unknown_variables

if TYPE_CHECKING:
    from arqonbus_server.mesh.jetstream import JetStreamBroker
    from arqonbus_server.mesh.ports import AuditSink, StateStore

log = logging.getLogger("arqonbus")


class _OncePerInterval(logging.Filter):
    """Lets one "out of file descriptors" accept error through per interval.

    At the open-file limit asyncio logs a traceback for every refused accept, tens of
    thousands a minute; one line per interval, with the count, says the same.
    """

    def __init__(self, interval_s: float = 10.0) -> None:
        super().__init__()
        self._interval = interval_s
        self._last = 0.0
        self._suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if "out of system resource" not in record.getMessage():
            return True
        now = time.monotonic()
        if now - self._last < self._interval:
            self._suppressed += 1
            return False
        record.msg = (
            f"cannot accept connections: the process is out of file descriptors "
            f"({self._suppressed} more since the last report); raise the open-file limit"
        )
        record.args = ()
        record.exc_info = None
        self._last, self._suppressed = now, 0
        return True


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("asyncio").addFilter(_OncePerInterval())


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {low} or more, got {value}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arqonbus", description="ArqonBus message bus")
    sub = parser.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("dev", help="run a local NATS cluster and gateways (development)")
    dev.add_argument("--nats-nodes", type=_at_least(1), default=3, help="NATS nodes (default 3)")
    dev.add_argument(
        "--gateways",
        type=_at_least(0),
        default=2,
        help="gateway processes (default 2; 0 runs only NATS, for gateways of your own)",
    )
    dev.add_argument("--port", type=int, default=8765, help="first gateway port (default 8765)")
    dev.add_argument(
        "--nats-port", type=int, default=4222, help="first NATS client port (default 4222)"
    )
    dev.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    dev.add_argument("--data-dir", type=Path, default=Path(".arqonbus"), help="default ./.arqonbus")

    gw = sub.add_parser("gateway", help="run one gateway against an existing NATS")
    gw.add_argument("--nats", help="NATS URL(s), comma-separated [ARQONBUS_NATS]")
    gw.add_argument("--listen", help="HOST:PORT [ARQONBUS_LISTEN]")
    gw.add_argument(
        "--auth",
        help="authentication methods, comma-separated: jwt, apikey, agent, dev "
        "(dev needs --insecure-dev-auth) [ARQONBUS_AUTH]",
    )
    gw.add_argument("--node-id", help="node name [ARQONBUS_NODE_ID]")
    gw.add_argument("--log-level", help="DEBUG, INFO, WARNING [ARQONBUS_LOG_LEVEL]")
    gw.add_argument(
        "--tls-cert", help="PEM certificate (chain) file; serves wss:// [ARQONBUS_TLS_CERT]"
    )
    gw.add_argument("--tls-key", help="PEM private key of --tls-cert [ARQONBUS_TLS_KEY]")
    gw.add_argument(
        "--insecure-dev-auth",
        action="store_const",
        const=True,
        help="allow --auth dev (anyone may claim any identity): development only "
        "[ARQONBUS_INSECURE_DEV_AUTH]",
    )

    mesh = sub.add_parser("mesh", help="mesh administration")
    mesh_sub = mesh.add_subparsers(dest="mesh_command", required=True)
    prov = mesh_sub.add_parser("provision", help="create a tenant's stream (idempotent)")
    prov.add_argument("--tenant", action="append", required=True, help="tenant name (repeatable)")
    prov.add_argument("--nats", help="NATS URL(s), comma-separated [ARQONBUS_NATS]")
    from arqonbus_server.gateway import cli_keys  # arqonbus keys create|list|revoke

    cli_keys.add_parser(sub)
    from arqonbus_server.gateway import cli_policy

    cli_policy.add_parser(sub)
    from arqonbus_server.gateway import cli_agents  # arqonbus agents keygen|register|list|revoke

    cli_agents.add_parser(sub)
    from arqonbus_server.gateway import (
        cli_audit,  # arqonbus audit --tenant T [--since] [--type] [--json]
    )

    cli_audit.add_parser(sub)
    from arqonbus_server.gateway import cli_tenants  # arqonbus tenants set|show|reset

    cli_tenants.add_parser(sub)
    return parser


def cli_broker(settings: Settings, name: str) -> JetStreamBroker:
    """A broker for a one-shot CLI command (not connected yet), with the NATS credentials
    and TLS of ``settings`` (mesh/nats_auth.py)."""
    from arqonbus_server.mesh.nats_auth import broker_from_settings

    return broker_from_settings(settings, name)


class CliPorts:
    """What a one-shot admin command uses: the broker (connect and close it), the state
    store and the audit sink on it."""

    def __init__(self, broker: JetStreamBroker, state: StateStore, audit: AuditSink) -> None:
        self.broker = broker
        self.state = state
        self.audit = audit


def cli_ports(settings: Settings, name: str) -> CliPorts:
    """The ports of a one-shot CLI command (not connected yet; see :func:`cli_broker`).

    The audit sink has the gateways' stream limits (``ARQONBUS_AUDIT_*``): a CLI that writes
    an audit event must not reset an existing audit stream to the defaults."""
    from arqonbus_server.mesh.audit import JetStreamAuditSink
    from arqonbus_server.mesh.kv import JetStreamStateStore

    broker = cli_broker(settings, name)
    return CliPorts(
        broker, JetStreamStateStore(broker), JetStreamAuditSink.from_settings(broker, settings)
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "dev":
            from arqonbus_server.gateway.dev import run_dev

            _setup_logging("INFO")
            return asyncio.run(run_dev(args))
        settings = _settings_from(args)
        _setup_logging(settings.log_level)
        for name in unknown_variables(os.environ):
            log.warning("ignoring unknown variable %s: see docs/operations.md#settings", name)
        if args.command == "gateway":
            return _run_gateway(settings)
        if args.command == "keys":
            from arqonbus_server.gateway import cli_keys

            return asyncio.run(cli_keys.run(args, settings))
        if args.command == "agents":
            from arqonbus_server.gateway import cli_agents

            return asyncio.run(cli_agents.run(args, settings))
        if args.command == "audit":
            from arqonbus_server.gateway import cli_audit

            return asyncio.run(cli_audit.run(args, settings))
        if args.command == "policy":
            from arqonbus_server.gateway import cli_policy

            return asyncio.run(cli_policy.run(args, settings))
        if args.command == "tenants":
            from arqonbus_server.gateway import cli_tenants

            return asyncio.run(cli_tenants.run(args, settings))
        return asyncio.run(_provision(settings, args.tenant))
    except ConfigError as exc:
        print(f"arqonbus: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _settings_from(args: argparse.Namespace) -> Settings:
    keys: tuple[str, ...] = ("nats", "listen", "auth", "node_id", "log_level", "tls_cert")
    keys += ("tls_key", "insecure_dev_auth")
    return load_settings(**{k: getattr(args, k, None) for k in keys})


def _raise_open_file_limit() -> None:
    """Each connection is a file descriptor: use all the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d: %s", soft, exc)
            return
        log.info("open-file limit raised from %d to %d", soft, target)


def _run_gateway(settings: Settings) -> int:
    from arqonbus_server.gateway.server import PortInUse, run_gateway

    _refuse_dev_auth(settings)
    _raise_open_file_limit()
    try:
        return asyncio.run(run_gateway(settings))
    except PortInUse as exc:
        log.error("%s", exc)
        return 2
    except ValueError as exc:  # no auth mode
        log.error("%s", exc)
        return 2


def _refuse_dev_auth(settings: Settings) -> None:
    """A production start never runs dev auth by accident: it needs an explicit opt-in."""
    if "dev" not in settings.auth.split(","):
        return
    if not settings.insecure_dev_auth:
        raise ConfigError(
            "refusing to start with --auth dev (ARQONBUS_AUTH includes 'dev'): any client "
            "could claim any tenant and identity with a dev: token. In production use jwt, "
            "apikey or agent; for development run `arqonbus dev`, or pass --insecure-dev-auth "
            "(ARQONBUS_INSECURE_DEV_AUTH=true)"
        )
    log.warning(
        "INSECURE: dev authentication is on (--insecure-dev-auth): any client can claim any "
        "identity; never expose this gateway"
    )


async def _provision(settings: Settings, tenants: list[str]) -> int:
    from arqonbus_server.mesh.broker import BrokerUnavailable
    from arqonbus_server.shared.subjects import SubjectScheme, is_valid_name

    scheme = SubjectScheme(settings.subject_prefix)
    broker = cli_broker(settings, "arqonbus-provision")
    for tenant in tenants:
        if not is_valid_name(tenant):
            print(
                f"arqonbus: tenant {tenant!r} is not a valid name: use 1-64 characters of "
                "A-Z, a-z, 0-9, '_' or '-'",
                file=sys.stderr,
            )
            return 2
    try:
        await broker.connect()
        for tenant in tenants:
            replicas = await broker.ensure_stream(tenant)
            print(
                f"stream {scheme.stream_name(tenant)} for tenant {tenant}: ready ({replicas} replicas)"
            )
    except BrokerUnavailable as exc:
        print(f"arqonbus: {exc}. Check --nats / ARQONBUS_NATS.", file=sys.stderr)
        return 1
    finally:
        await broker.close()
    return 0
