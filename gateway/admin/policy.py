"""``arqonbus policy``: a tenant's content-policy rules in NATS KV (every gateway, no restart)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson

from arqonbus_server.gateway.admin.common import CliPorts, with_mesh
from arqonbus_server.gateway.policies import load_plugin
from arqonbus_server.gateway.state.audit import ADMIN_ACTION, record_once
from arqonbus_server.shared import subjects
from arqonbus_server.shared.inspect import PolicyError, check_storable, parse_policy
from arqonbus_server.shared.settings import Settings
from arqonbus_server.shared.subjects import is_valid_name

MAX_POLICY_BYTES = 512 * 1024  # under the KV value limit (the NATS max_payload)


def add_parser(sub: Any) -> None:
    policy = sub.add_parser("policy", help="a tenant's content-policy rules (NATS KV)")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    put = policy_sub.add_parser("set", help="validate and store a tenant's rules")
    put.add_argument("--tenant", required=True)
    put.add_argument(
        "file",
        type=Path,
        help='JSON: a list of rules, or a policy file ({"tenants": {...}}) naming the tenant',
    )
    show = policy_sub.add_parser("show", help="print a tenant's stored rules")
    show.add_argument("--tenant", required=True)
    delete = policy_sub.add_parser("delete", help="drop a tenant's stored rules (file rules apply)")
    delete.add_argument("--tenant", required=True)
    for command in (put, show, delete):
        command.add_argument("--nats", help="NATS URL(s), comma-separated [ARQONBUS_NATS]")


def rules_from(doc: Any, tenant: str) -> list[Any]:
    """The tenant's rules from a list, or from a policy file's ``tenants`` entry."""
    if isinstance(doc, dict) and "tenants" in doc:
        tenants = doc["tenants"]
        if not isinstance(tenants, dict) or tenant not in tenants:
            raise PolicyError(f"the policy file has no rules for tenant {tenant!r}")
        doc = tenants[tenant]
    if not isinstance(doc, list):
        raise PolicyError('expected a JSON list of rules, or {"tenants": {TENANT: [...]}}')
    check_storable(doc)
    # validates, building any plugin as every gateway will
    parse_policy({"tenants": {tenant: doc}}, f"rules for tenant {tenant!r}", load_plugin)
    return doc


async def run(args: argparse.Namespace, settings: Settings) -> int:
    tenant = args.tenant
    if not is_valid_name(tenant):
        print(f"arqonbus: tenant {tenant!r} is not a valid name", file=sys.stderr)
        return 2
    body = b""
    if args.policy_command == "set":
        try:
            rules = rules_from(orjson.loads(args.file.read_bytes()), tenant)
        except OSError as exc:
            print(f"arqonbus: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
            return 2
        except (orjson.JSONDecodeError, PolicyError) as exc:
            print(f"arqonbus: {args.file}: {exc}", file=sys.stderr)
            return 2
        body = orjson.dumps(rules)
        if len(body) > MAX_POLICY_BYTES:
            print(f"arqonbus: the rules exceed {MAX_POLICY_BYTES} bytes", file=sys.stderr)
            return 2
    return await _apply(settings, args.policy_command, tenant, body)


async def _apply(settings: Settings, command: str, tenant: str, body: bytes) -> int:
    async def apply(ports: CliPorts) -> int:
        kv = await ports.state.bucket(subjects.KV_POLICIES)
        if command == "show":
            stored = await kv.get(tenant)
            entry = stored.value if stored is not None and stored.value else None
            if entry is None:
                print(f"tenant {tenant} has no stored rules (the policy file applies)")
            else:
                print(orjson.dumps(orjson.loads(entry), option=orjson.OPT_INDENT_2).decode())
            return 0
        if command == "set":
            await kv.put(tenant, body)
            print(f"stored {len(orjson.loads(body))} rule(s) for tenant {tenant}")
        else:
            await kv.delete(tenant)
            print(f"dropped the stored rules of tenant {tenant}")
        await record_once(ports.audit, tenant, ADMIN_ACTION, action=f"policy_{command}")
        return 0

    return await with_mesh(settings, "arqonbus policy", apply)
