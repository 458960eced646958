"""``arqonbus status``: every gateway and every NATS server of the mesh.

Gateways come from their heartbeats: the ``ClusterView`` keeps the last one of each gateway
for 3 heartbeat intervals (mesh/cluster.py), so one read answers at once and a gateway that
died without a word leaves the list within 3 intervals. NATS servers are the ones the
connection knows (configured and gossiped by the cluster), each asked who it is.
``--watch`` reads again every ``heartbeat_interval_s`` until Ctrl-C; ``--json`` prints one
JSON document per reading.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from dataclasses import asdict
from typing import Any

import orjson

from arqonbus_server.gateway.admin.common import CliPorts, with_mesh
from arqonbus_server.mesh.ports import NatsNode
from arqonbus_server.shared.cluster import BadHeartbeat, Heartbeat, decode_heartbeat
from arqonbus_server.shared.settings import Settings

_CLEAR = "\x1b[H\x1b[2J"


def add_parser(sub: Any) -> None:
    status = sub.add_parser("status", help="list the gateways and NATS servers of the mesh")
    status.add_argument("--nats", help="NATS URL(s), comma-separated [ARQONBUS_NATS]")
    status.add_argument("--json", action="store_true", help="print JSON (one line per reading)")
    status.add_argument(
        "--watch",
        action="store_true",
        help="read again every heartbeat interval until Ctrl-C [ARQONBUS_HEARTBEAT_INTERVAL_S]",
    )


async def run(args: argparse.Namespace, settings: Settings) -> int:
    async def body(ports: CliPorts) -> int:
        while True:
            gateways, servers = await read_mesh(ports)
            if args.json:
                print(orjson.dumps(as_json(gateways, servers)).decode(), flush=True)
            else:
                clear = _CLEAR if args.watch and sys.stdout.isatty() else ""
                print(clear + render(gateways, servers), flush=True)
            if not args.watch:
                return 0
            await asyncio.sleep(settings.heartbeat_interval_s)

    return await with_mesh(settings, "arqonbus status", body)


async def read_mesh(ports: CliPorts) -> tuple[list[Heartbeat], list[NatsNode]]:
    raw, servers = await asyncio.gather(ports.cluster.gateways(), ports.cluster.nats_servers())
    gateways = []
    for data in raw:
        try:
            gateways.append(decode_heartbeat(data))
        except BadHeartbeat as exc:
            print(f"arqonbus status: skipping an unreadable heartbeat ({exc})", file=sys.stderr)
    return gateways, servers


def as_json(gateways: list[Heartbeat], servers: list[NatsNode]) -> dict[str, Any]:
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "gateways": [asdict(g) for g in gateways],
        "nats": [asdict(s) for s in servers],
    }


def render(gateways: list[Heartbeat], servers: list[NatsNode]) -> str:
    """The two tables, and what to do when one is empty."""
    lines = [f"Gateways: {len(gateways)}"]
    if gateways:
        rows: list[tuple[str, ...]] = [
            ("NODE", "REGION", "VERSION", "UPTIME", "CONNS", "IN/S", "OUT/S", "NATS")
        ]
        rows += [_gateway_row(g) for g in gateways]
        lines += _table(rows)
    else:
        lines.append("  none announced itself in the last 3 heartbeat intervals: start one with")
        lines.append("  `arqonbus gateway --nats URL`, or check that it uses these NATS servers")
    per_server = Counter(g.nats.url for g in gateways)
    lines += ["", f"NATS servers: {len(servers)}"]
    header = ("NAME", "URL", "VERSION", "CLUSTER", "JETSTREAM", "GATEWAYS", "")
    lines += _table([header, *(_server_row(s, per_server[s.url]) for s in servers)])
    if any(not s.reachable for s in servers):
        lines.append("  (unreachable: the server did not answer; it may be down)")
    return "\n".join(lines)


def _gateway_row(g: Heartbeat) -> tuple[str, ...]:
    nats = f"{g.nats.name} ({g.nats.url})" if g.nats.url else "(not connected)"
    return (
        g.node,
        g.region or "-",
        g.version,
        _duration(g.uptime_s),
        str(g.connections),
        f"{g.msgs_in_per_s:g}",
        f"{g.msgs_out_per_s:g}",
        nats,
    )


def _server_row(s: NatsNode, gateways: int) -> tuple[str, ...]:
    if not s.reachable:
        return ("?", s.url, "-", "-", "-", str(gateways), "unreachable")
    note = "this connection" if s.connected else ""
    js = "yes" if s.jetstream else "no"
    return (s.name, s.url, s.version, s.cluster or "-", js, str(gateways), note)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _duration(seconds: float) -> str:
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
