"""``arqonbus audit``: read a tenant's audit stream (gateway/state/audit.py).

    arqonbus audit --tenant T [--since 1h|30m|2d|ISO8601] [--type TYPE ...]
                   [--limit N] [--json] [--nats URLS]

Prints one line per event, oldest first (``--json``: one JSON object per line). Only the
named tenant's stream is read. Exit codes: 0 done (an unknown tenant has no events),
1 NATS unreachable, 2 bad input (the message says what to fix).
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from typing import TYPE_CHECKING, Any, TextIO

import orjson

from arqonbus_server.gateway.admin.common import CliPorts, with_mesh
from arqonbus_server.gateway.state.audit import EVENT_TYPES, parse_since, read_events
from arqonbus_server.shared.subjects import is_valid_name

if TYPE_CHECKING:
    from arqonbus_server.shared.settings import Settings

EXIT_OK, EXIT_BAD_INPUT = 0, 2  # 1: NATS unreachable (admin/common.py)
DEFAULT_LIMIT = 1000
MAX_LIMIT = 100_000


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = subparsers.add_parser(
        "audit", help="show a tenant's security events (auth failures, denials, key changes)"
    )
    audit.add_argument("--tenant", required=True, help="the tenant whose events to show")
    audit.add_argument(
        "--since",
        help="from when: a duration back from now (30m, 1h, 2d, 1w) or an ISO 8601 time "
        "(2025-01-31T12:00:00Z); default: every event kept",
    )
    audit.add_argument(
        "--type",
        action="append",
        default=[],
        dest="types",
        metavar="TYPE",
        help=f"only events of this type (repeatable): {', '.join(EVENT_TYPES)}",
    )
    audit.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_LIMIT,
        help=f"at most this many events, oldest first (default {DEFAULT_LIMIT})",
    )
    audit.add_argument("--json", action="store_true", help="one JSON object per line")
    audit.add_argument("--nats", help="NATS URL(s), comma-separated [ARQONBUS_NATS]")


def _bad(message: str) -> int:
    print(f"arqonbus audit: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def format_event(event: dict[str, Any]) -> str:
    """One readable line: time, type, principal, node, then the details as key=value."""
    details = event.get("details") or {}
    shown = " ".join(
        f"{key}={value if isinstance(value, str) else orjson.dumps(value).decode()}"
        for key, value in (details.items() if isinstance(details, dict) else ())
    )
    head = (
        f"{event.get('ts', '?')} {event.get('type', '?'):<16} "
        f"principal={event.get('principal') or '-'} node={event.get('node') or '-'}"
    )
    return f"{head} {shown}".rstrip()


async def run(args: argparse.Namespace, settings: Settings, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    if not is_valid_name(args.tenant):
        return _bad(
            f"tenant {args.tenant[:64]!r} is not a valid name: use 1-64 characters of "
            "A-Z, a-z, 0-9, '_' or '-'"
        )
    since: datetime | None = None
    if args.since is not None:
        try:
            since = parse_since(args.since)
        except ValueError as exc:
            return _bad(str(exc))
    bad_types = [t for t in args.types if not is_valid_name(t)]
    if bad_types:
        return _bad(
            f"--type {bad_types[0][:64]!r} is not an event type: use {', '.join(EVENT_TYPES)}"
        )
    if not 1 <= args.limit <= MAX_LIMIT:
        return _bad(f"--limit must be between 1 and {MAX_LIMIT}")

    async def body(ports: CliPorts) -> int:
        events, more = await read_events(ports.audit, args.tenant, since, args.types, args.limit)
        for event in events:
            out.write((orjson.dumps(event).decode() if args.json else format_event(event)) + "\n")
        out.flush()
        if not events:
            print(
                f"arqonbus audit: no events for tenant {args.tenant} in this range",
                file=sys.stderr,
            )
        elif more:
            print(
                f"arqonbus audit: stopped at --limit {args.limit}; narrow with --since or "
                "--type, or raise --limit",
                file=sys.stderr,
            )
        return EXIT_OK

    return await with_mesh(settings, "arqonbus audit", body)
