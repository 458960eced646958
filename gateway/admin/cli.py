"""``arqonbus``: dev, gateway, mesh (regions, provision, failover), status, admin."""

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
from typing import Any

from arqonbus_server.gateway.admin import agents as admin_agents
from arqonbus_server.gateway.admin import audit as admin_audit
from arqonbus_server.gateway.admin import keys as admin_keys
from arqonbus_server.gateway.admin import mesh as admin_mesh
from arqonbus_server.gateway.admin import policy as admin_policy
from arqonbus_server.gateway.admin import rooms as admin_rooms
from arqonbus_server.gateway.admin import status as admin_status
from arqonbus_server.gateway.admin import tenants as admin_tenants
from arqonbus_server.gateway.config import load_settings
from arqonbus_server.shared.settings import ConfigError, Settings, unknown_variables

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
    dev.add_argument(
        "--nats-backend",
        choices=("local", "container"),
        help="where NATS nodes run: local (nats-server from the wheel, the default) or container "
        "(testcontainers: Docker, or podman's API socket via DOCKER_HOST) [ARQONBUS_NATS_BACKEND]",
    )

    gw = sub.add_parser("gateway", help="run one gateway against an existing NATS")
    gw.add_argument("--nats", help="NATS URL(s), comma-separated [ARQONBUS_NATS]")
    gw.add_argument("--listen", help="HOST:PORT [ARQONBUS_LISTEN]")
    gw.add_argument(
        "--auth",
        help="authentication methods, comma-separated: jwt, apikey, agent, dev "
        "(dev needs --insecure-dev-auth) [ARQONBUS_AUTH]",
    )
    gw.add_argument("--node-id", help="node name [ARQONBUS_NODE_ID]")
    gw.add_argument(
        "--workers",
        type=int,
        help="gateway processes sharing --listen (SO_REUSEPORT), one per free core; "
        "default 1 [ARQONBUS_WORKERS]",
    )
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

    for command in (
        admin_mesh,
        admin_keys,
        admin_policy,
        admin_agents,
        admin_audit,
        admin_tenants,
        admin_status,
        admin_rooms,
    ):
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "dev":
            from arqonbus_server.gateway.admin.dev import run_dev

            _setup_logging("INFO")
            return asyncio.run(run_dev(args))
        settings = _settings_from(args)
        _setup_logging(settings.log_level)
        for name in unknown_variables(os.environ):
            log.warning("ignoring unknown variable %s: see docs/operations.md#settings", name)
        if args.command == "gateway":
            return _run_gateway(settings, {**os.environ, **_environ_of(args)})
        commands: dict[str, Any] = {
            "mesh": admin_mesh,
            "keys": admin_keys,
            "agents": admin_agents,
            "audit": admin_audit,
            "policy": admin_policy,
            "tenants": admin_tenants,
            "status": admin_status,
            "admin": admin_rooms,
        }
        if args.command in commands:
            code: int = asyncio.run(commands[args.command].run(args, settings))
            return code
        raise AssertionError(f"unhandled command {args.command}")
    except ConfigError as exc:
        print(f"arqonbus: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


_SETTINGS_ARGS = (
    "nats", "listen", "auth", "node_id", "log_level", "tls_cert", "tls_key", "insecure_dev_auth",
    "workers",
)  # fmt: skip


def _settings_from(args: argparse.Namespace) -> Settings:
    return load_settings(**{k: getattr(args, k, None) for k in _SETTINGS_ARGS})


def _environ_of(args: argparse.Namespace) -> dict[str, str]:
    """The settings given as options, as the variables a worker process reads."""
    out = {}
    for key in _SETTINGS_ARGS:
        value = getattr(args, key, None)
        if value is not None:
            out[f"ARQONBUS_{key.upper()}"] = str(value).lower() if value is True else str(value)
    return out


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


def _run_gateway(settings: Settings, environ: dict[str, str]) -> int:
    from arqonbus_server.gateway.admin.workers import run_workers
    from arqonbus_server.gateway.app import run_gateway
    from arqonbus_server.shared.errors import PortInUse

    _refuse_dev_auth(settings)
    _raise_open_file_limit()
    try:
        if settings.workers > 1:
            return asyncio.run(run_workers(settings, environ))
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
