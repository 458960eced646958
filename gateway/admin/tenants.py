"""``arqonbus tenants``: per-tenant limit overrides in NATS KV (every gateway, no restart).

``set`` merges the given fields into the tenant's stored record (validated first), ``show``
prints the stored record (fields not in it take each gateway's settings), ``reset`` deletes
it. Changes are audited (``admin_action``) in the tenant's audit stream.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson

from arqonbus_server.gateway.admin.common import CliPorts, with_mesh
from arqonbus_server.gateway.state.audit import ADMIN_ACTION, record_once
from arqonbus_server.shared import subjects
from arqonbus_server.shared.settings import Settings
from arqonbus_server.shared.subjects import is_valid_name
from arqonbus_server.shared.tenant_limits import FIELDS, TenantLimits, TenantLimitsError


def add_parser(sub: Any) -> None:
    tenants = sub.add_parser("tenants", help="per-tenant limit overrides (NATS KV)")
    tenants_sub = tenants.add_subparsers(dest="tenants_command", required=True)
    put = tenants_sub.add_parser(
        "set", help="store limit overrides for a tenant (merged into its record; 0 = off)"
    )
    for name, (kind, setting) in FIELDS.items():
        put.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=kind,
            metavar="N" if kind is int else "R",
            help=f"overrides {setting}",
        )
    show = tenants_sub.add_parser("show", help="print a tenant's stored overrides")
    reset = tenants_sub.add_parser(
        "reset", help="delete a tenant's overrides (the gateway settings apply)"
    )
    for command in (put, show, reset):
        command.add_argument("--tenant", required=True)
        command.add_argument("--nats", help="NATS URL(s), comma-separated [ARQONBUS_NATS]")


async def run(args: argparse.Namespace, settings: Settings) -> int:
    tenant = args.tenant
    if not is_valid_name(tenant):
        print(f"arqonbus: tenant {tenant!r} is not a valid name", file=sys.stderr)
        return 2
    updates = TenantLimits()
    if args.tenants_command == "set":
        given = {name: getattr(args, name) for name in FIELDS if getattr(args, name) is not None}
        if not given:
            options = ", ".join("--" + name.replace("_", "-") for name in FIELDS)
            print(f"arqonbus: give at least one limit: {options}", file=sys.stderr)
            return 2
        try:
            updates = TenantLimits.parse(given)
        except TenantLimitsError as exc:
            print(f"arqonbus: {exc}", file=sys.stderr)
            return 2
    return await _apply(settings, args.tenants_command, tenant, updates)


async def _apply(settings: Settings, command: str, tenant: str, updates: TenantLimits) -> int:
    async def body(ports: CliPorts) -> int:
        kv = await ports.state.bucket(subjects.KV_TENANTS)
        stored = await kv.get(tenant)
        raw = stored.value if stored is not None and stored.value else None
        if command == "show":
            if raw is None:
                print(f"tenant {tenant} has no overrides (the gateway settings apply)")
            else:
                print(orjson.dumps(orjson.loads(raw), option=orjson.OPT_INDENT_2).decode())
            return 0
        if command == "set":
            current = TenantLimits()
            if raw is not None:
                try:
                    current = TenantLimits.from_json(raw)
                except TenantLimitsError as exc:  # replaced by the new fields only
                    print(f"arqonbus: the stored record was invalid ({exc}); replacing it")
            record = current.merged(updates)
            await kv.put(tenant, record.to_json())
            print(orjson.dumps(record.as_dict(), option=orjson.OPT_INDENT_2).decode())
            details: dict[str, object] = {"limits": updates.as_dict()}
        else:
            if raw is None:
                print(f"tenant {tenant} has no overrides")
                return 0
            await kv.delete(tenant)
            print(f"deleted the overrides of tenant {tenant} (the gateway settings apply)")
            details = {}
        await record_once(
            ports.audit,
            tenant,
            ADMIN_ACTION,
            action=f"tenants_{command}",
            **details,
        )
        return 0

    return await with_mesh(settings, "arqonbus tenants", body)
