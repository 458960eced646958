"""``arqonbus keys``: create, list and revoke API keys (records in the KEYS KV bucket).

Exit codes: 0 done, 1 NATS unreachable, 2 bad input (the message says what to fix).
The key is printed once, by ``create``; nothing else ever prints it or its hash.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from arqonbus_server.gateway.admin.common import CliPorts, with_mesh
from arqonbus_server.gateway.state.audit import KEY_CREATED, KEY_REVOKED, record_once
from arqonbus_server.mesh.ports import KeyExists, RevisionMismatch
from arqonbus_server.shared import apikeys, subjects
from arqonbus_server.shared.apikeys import RecordError
from arqonbus_server.shared.subjects import is_valid_name

if TYPE_CHECKING:
    from arqonbus_server.mesh.ports import KVBucket
    from arqonbus_server.shared.settings import Settings

CLI_PRINCIPAL = "cli"
EXIT_OK, EXIT_BAD_INPUT = 0, 2  # 1: NATS unreachable (admin/common.py)


class _BadInput(Exception):
    pass


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = subparsers.add_parser("keys", help="API keys for service accounts")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)

    create = keys_sub.add_parser("create", help="create a key (printed once)")
    create.add_argument("--tenant", required=True, help="the key's tenant")
    create.add_argument(
        "--name",
        required=True,
        help="the principal id the key signs in as (1-64 of A-Z a-z 0-9 _ -)",
    )
    create.add_argument(
        "--role",
        default="member",
        help="owner, admin, member, read-only or viewer (default member)",
    )
    create.add_argument(
        "--grant",
        action="append",
        default=[],
        metavar="ROOM:CHANNEL:PERMS",
        help="an extra capability, e.g. science:*:publish (repeatable)",
    )
    create.add_argument("--nats", help="NATS URL(s), comma-separated [ARQONBUS_NATS]")

    lst = keys_sub.add_parser("list", help="list a tenant's keys (never the secrets)")
    lst.add_argument("--tenant", required=True)
    lst.add_argument("--nats", help="NATS URL(s), comma-separated [ARQONBUS_NATS]")

    revoke = keys_sub.add_parser(
        "revoke", help="revoke a key: every gateway refuses it and closes its sessions"
    )
    revoke.add_argument("--tenant", required=True)
    revoke.add_argument("key_id", help="the key id (the 12 characters after 'arqk_')")
    revoke.add_argument("--nats", help="NATS URL(s), comma-separated [ARQONBUS_NATS]")


def _fail(message: str, code: int) -> int:
    print(f"arqonbus keys: {message}", file=sys.stderr)
    return code


async def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run ``arqonbus keys <command>``; returns the exit code."""

    if not is_valid_name(args.tenant):
        return _fail(
            f"tenant {args.tenant[:64]!r} is not a valid name: use 1-64 characters of "
            "A-Z, a-z, 0-9, '_' or '-'",
            EXIT_BAD_INPUT,
        )
    try:  # check the input before connecting: a typo is exit code 2 even without NATS
        _check_input(args)
    except _BadInput as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)

    async def body(ports: CliPorts) -> int:
        try:
            kv = await ports.state.bucket(subjects.KV_KEYS)
            if args.keys_command == "create":
                return await _create(args, ports, kv)
            if args.keys_command == "list":
                return await _list(args, kv)
            return await _revoke(args, ports, kv)
        except _BadInput as exc:
            return _fail(str(exc), EXIT_BAD_INPUT)

    return await with_mesh(settings, "arqonbus keys", body)


def _new_key(args: argparse.Namespace) -> tuple[str, apikeys.ApiKeyRecord]:
    try:
        return apikeys.new_record(
            args.tenant, args.name, args.role, tuple(args.grant), created_by=CLI_PRINCIPAL
        )
    except RecordError as exc:
        raise _BadInput(f"cannot create the key: {exc}") from None


def _check_input(args: argparse.Namespace) -> None:
    """_BadInput (what to fix) for arguments that cannot work, before any NATS call."""
    if args.keys_command == "create":
        _new_key(args)  # validates tenant, name, role and grants; the key is discarded
    elif args.keys_command == "revoke":
        key_id = args.key_id
        if key_id.startswith(apikeys.KEY_PREFIX):  # a whole key was pasted: never echo it
            raise _BadInput(
                "pass the key id (the 12 characters after 'arqk_'), not the key: the key is secret"
            )
        if not apikeys.is_valid_key_id(key_id):
            raise _BadInput(
                f"{key_id[:64]!r} is not a key id: expected {apikeys.KEY_ID_LENGTH} characters "
                f"of a-z and 2-7 (see 'arqonbus keys list --tenant {args.tenant}')"
            )


async def _create(args: argparse.Namespace, ports: CliPorts, kv: KVBucket) -> int:
    key, record = _new_key(args)
    try:
        await kv.create(apikeys.kv_key(record.tenant, record.key_id), record.encode())
    except KeyExists:  # a 60-bit id collision: practically never
        raise _BadInput("a key with the same id exists: run the command again") from None
    await record_once(
        ports.audit,
        record.tenant,
        KEY_CREATED,
        key_id=record.key_id,
        name=record.name,
        role=record.role,
    )
    print(key)
    print(
        f"created API key {record.key_id} for tenant {record.tenant} (name {record.name}, role "
        f"{record.role}, grants {', '.join(record.grants) or 'none'}). The key above is shown "
        "only this once: store it now (the server keeps only its hash).",
        file=sys.stderr,
    )
    return EXIT_OK


async def _records(kv: KVBucket, tenant: str) -> list[tuple[str, apikeys.ApiKeyRecord | None]]:
    """The tenant's records, by key id (None: a record that does not validate)."""
    found: dict[str, apikeys.ApiKeyRecord | None] = {}
    for name, value in await kv.items(f"{tenant}."):
        parts = apikeys.split_kv_key(name)
        if parts is None or parts[0] != tenant or not value:
            continue
        try:
            found[parts[1]] = apikeys.decode_record(value)
        except RecordError:
            found[parts[1]] = None
    return sorted(found.items(), key=lambda item: item[0])


async def _list(args: argparse.Namespace, kv: KVBucket) -> int:
    records = await _records(kv, args.tenant)
    if not records:
        print(f"no API keys for tenant {args.tenant}")
        return EXIT_OK
    rows = [("ID", "NAME", "ROLE", "GRANTS", "CREATED", "REVOKED")]
    for key_id, record in records:
        if record is None:
            rows.append((key_id, "?", "?", "(invalid record: refused)", "?", "?"))
            continue
        rows.append(
            (
                key_id,
                record.name,
                record.role,
                ",".join(record.grants) or "-",
                record.created_at,
                record.revoked_at or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return EXIT_OK


async def _revoke(args: argparse.Namespace, ports: CliPorts, kv: KVBucket) -> int:
    key_id = args.key_id
    name = apikeys.kv_key(args.tenant, key_id)
    for _ in range(5):  # compare-and-set: a concurrent change makes us read again
        entry = await kv.get(name)
        if entry is None:
            raise _BadInput(
                f"no API key {key_id} in tenant {args.tenant} (see 'arqonbus keys list "
                f"--tenant {args.tenant}')"
            )
        try:
            record = apikeys.decode_record(entry.value)
        except RecordError:
            await kv.delete(name)  # an invalid record is refused anyway: remove it
            break
        if record.revoked:
            print(
                f"API key {key_id} of tenant {args.tenant} was already revoked at {record.revoked_at}"
            )
            return EXIT_OK
        try:
            await kv.update(name, record.revoke().encode(), entry.revision)
        except RevisionMismatch:
            continue
        break
    else:
        raise _BadInput(f"API key {key_id} kept changing while revoking it: run the command again")
    await record_once(ports.audit, args.tenant, KEY_REVOKED, key_id=key_id)
    print(
        f"revoked API key {key_id} of tenant {args.tenant}: every gateway refuses it and closes "
        "its sessions (close code 4500)"
    )
    return EXIT_OK
