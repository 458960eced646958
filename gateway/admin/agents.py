"""``arqonbus agents``: register, list and revoke Ed25519 agent identities (NATS KV).

    arqonbus agents keygen --out agent.pem           # prints the public key to register
    arqonbus agents register --tenant T --name N --public-key FILE_OR_BASE64 [--role R] [--grant G]
    arqonbus agents list --tenant T
    arqonbus agents revoke --tenant T AGENT_ID

Every gateway watches the agents bucket: a registration works at once everywhere, and a
revoke closes the agent's live sessions on every gateway (close code 4500).
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from arqonbus_server.gateway.admin.common import CliPorts, with_mesh
from arqonbus_server.gateway.auth.agent import (
    RegistrationError,
    new_record,
    records,
    revoke,
    store_new,
)
from arqonbus_server.gateway.config import load_settings
from arqonbus_server.gateway.state.audit import AGENT_REGISTERED, AGENT_REVOKED, record_once
from arqonbus_server.mesh.ports import KVBucket
from arqonbus_server.shared import subjects
from arqonbus_server.shared.agent_identity import (
    AgentIdentityError,
    generate_private_key,
    is_agent_id,
    private_key_pem,
    public_key_b64,
)
from arqonbus_server.shared.settings import Settings
from arqonbus_server.shared.subjects import is_valid_name


def add_parser(sub: Any) -> None:
    agents = sub.add_parser("agents", help="Ed25519 agent identities (NATS KV)")
    agents_sub = agents.add_subparsers(dest="agents_command", required=True)
    keygen = agents_sub.add_parser("keygen", help="write a new private key, print its public key")
    keygen.add_argument("--out", type=Path, required=True, help="private key file (PEM, mode 600)")
    register = agents_sub.add_parser("register", help="register an agent; prints its id")
    register.add_argument("--tenant", required=True)
    register.add_argument("--name", required=True, help="a label for people")
    register.add_argument(
        "--public-key",
        required=True,
        help="the agent's Ed25519 public key: a PEM file, or 32 raw bytes as base64url",
    )
    register.add_argument(
        "--role", default="member", help="owner, admin, member, read-only, viewer"
    )
    register.add_argument(
        "--grant", action="append", default=[], help="ROOM:CHANNEL:PERMS (repeatable)"
    )
    listing = agents_sub.add_parser("list", help="a tenant's agents")
    listing.add_argument("--tenant", required=True)
    revoke_cmd = agents_sub.add_parser("revoke", help="revoke an agent; its sessions close (4500)")
    revoke_cmd.add_argument("--tenant", required=True)
    revoke_cmd.add_argument("agent_id")
    for command in (register, listing, revoke_cmd):
        command.add_argument("--nats", help="NATS URL(s), comma-separated [ARQONBUS_NATS]")


def _error(message: str) -> int:
    print(f"arqonbus: {message}", file=sys.stderr)
    return 2


def _public_key_text(value: str) -> str | bytes:
    """The --public-key value: the content of a file when it names one, else the text."""
    path = Path(value)
    if len(value) < 4096 and path.is_file():
        return path.read_bytes()
    return value


def _keygen(out: Path) -> int:
    key = generate_private_key()
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _error(f"{out} exists: choose another file (keys are never overwritten)")
    except OSError as exc:
        return _error(f"cannot write {out}: {exc.strerror}")
    with os.fdopen(fd, "wb") as file:
        file.write(private_key_pem(key))
    print(public_key_b64(key))
    return 0


async def run(args: argparse.Namespace, settings: Settings | None = None) -> int:
    if args.agents_command == "keygen":
        return _keygen(args.out)
    settings = settings or load_settings(nats=args.nats)
    if not is_valid_name(args.tenant):
        return _error(f"tenant {args.tenant!r} is not a valid name")
    public_key: str | bytes = ""
    if args.agents_command == "register":
        try:
            public_key = _public_key_text(args.public_key)
        except OSError as exc:
            return _error(f"cannot read {args.public_key}: {exc.strerror}")
    if args.agents_command == "revoke" and not is_agent_id(args.agent_id):
        return _error("AGENT_ID must be the UUID that `arqonbus agents register` printed")

    async def body(ports: CliPorts) -> int:
        try:
            kv = await ports.state.bucket(subjects.KV_AGENTS)
            if args.agents_command == "register":
                existing = records(await _items(kv))
                record = new_record(
                    args.tenant, args.name, public_key, args.role, args.grant, existing
                )
                await store_new(kv, record)
                print(record.agent_id)
                await record_once(
                    ports.audit,
                    args.tenant,
                    AGENT_REGISTERED,
                    agent_id=record.agent_id,
                    name=record.name,
                    role=record.role,
                )
            elif args.agents_command == "list":
                for record in sorted(records(await _items(kv)), key=lambda r: r.created_at):
                    if record.tenant != args.tenant:
                        continue
                    state = (
                        "active"
                        if record.revoked_at is None
                        else f"revoked {_when(record.revoked_at)}"
                    )
                    grants = ",".join(record.grants) or "-"
                    print(
                        f"{record.agent_id}  {record.name}  role={record.role}  grants={grants}  "
                        f"created {_when(record.created_at)}  {state}"
                    )
            else:
                await revoke(kv, args.tenant, args.agent_id)
                print(f"revoked {args.agent_id}")
                await record_once(ports.audit, args.tenant, AGENT_REVOKED, agent_id=args.agent_id)
        except (RegistrationError, AgentIdentityError) as exc:
            return _error(str(exc))
        return 0

    return await with_mesh(settings, "arqonbus agents", body)


async def _items(kv: KVBucket) -> list[tuple[str, bytes]]:
    return [(key, value) for key, value in await kv.items() if value]


def _when(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
