"""``arqonbus mesh``: regions from one operator file (docs/regions.md), and tenant streams.

``render FILE --out DIR`` writes every NATS server config and each region's Helm values;
``plan FILE`` shows what ``provision FILE`` would change; ``provision FILE`` applies it
(idempotent; ``--force`` accepts changes that can drop stored events); ``failover TENANT --to
REGION`` promotes a tenant's mirror after its primary's region is lost; ``failback TENANT``
moves it home again. ``provision --tenant T`` creates one tenant's stream on a single cluster.

Exit codes: 0 done (``plan``: nothing to do), 1 NATS unreachable, 2 a bad file or argument,
3 ``plan``: changes pending, 4 refused (the message says why and what to do).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from arqonbus_server.gateway.admin.common import CliPorts, with_mesh
from arqonbus_server.mesh.regions import RegionOps, RegionsRefused
from arqonbus_server.shared.regions import (
    MeshFile,
    MeshFileError,
    load_mesh_file,
    mesh_warnings,
    render_helm_values,
    render_nats_configs,
)
from arqonbus_server.shared.settings import ConfigError, Settings
from arqonbus_server.shared.subjects import SubjectScheme, is_valid_name

EXIT_PENDING = 3
EXIT_REFUSED = 4
_NATS_HELP = "NATS URL(s) of any region, comma-separated [ARQONBUS_NATS]"


def add_parser(sub: Any) -> None:
    mesh = sub.add_parser("mesh", help="regions, tenant streams, failover (docs/regions.md)")
    mesh_sub = mesh.add_subparsers(dest="mesh_command", required=True)
    render = mesh_sub.add_parser("render", help="write NATS configs and Helm values of a file")
    render.add_argument("file", type=Path, help="the mesh file (deploy/regions.example.yaml)")
    render.add_argument("--out", type=Path, required=True, help="directory to write into")
    plan = mesh_sub.add_parser("plan", help="what provision would change (exit 3: pending)")
    plan.add_argument("file", type=Path)
    prov = mesh_sub.add_parser(
        "provision", help="create/update the file's streams (idempotent), or --tenant's stream"
    )
    prov.add_argument("file", type=Path, nargs="?", help="the mesh file")
    prov.add_argument("--tenant", action="append", help="one cluster: this tenant's stream")
    prov.add_argument("--force", action="store_true", help="apply changes that can drop events")
    over = mesh_sub.add_parser("failover", help="promote a tenant's mirror after a region loss")
    over.add_argument("tenant")
    over.add_argument("--to", required=True, help="the region whose mirror becomes the primary")
    over.add_argument("--force", action="store_true", help="even if the primary answers")
    back = mesh_sub.add_parser("failback", help="move a failed-over tenant to its home region")
    back.add_argument("tenant")
    back.add_argument(
        "--force", action="store_true", help="promote home even if it lacks events (lossy)"
    )
    for command in (plan, prov, over, back):
        command.add_argument("--nats", help=_NATS_HELP)


def read_mesh_file(path: Path) -> MeshFile:
    """Parse and validate the operator file; MeshFileError names every problem."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read the mesh file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise MeshFileError([f"(file): not valid YAML: {exc}"]) from None
    return load_mesh_file(data)


def _warn(mesh: MeshFile) -> None:
    for warning in mesh_warnings(mesh):
        print(f"warning: {warning}", file=sys.stderr)


async def run(args: argparse.Namespace, settings: Settings) -> int:
    command = args.mesh_command
    if command == "render":
        return render(read_mesh_file(args.file), args.out)
    if command == "provision" and args.file is None:
        if not args.tenant:
            print("arqonbus: give the mesh file, or --tenant NAME", file=sys.stderr)
            return 2
        return await provision_tenants(settings, args.tenant)
    if command in ("failover", "failback"):
        return await _failover(settings, args)
    mesh = read_mesh_file(args.file)
    _warn(mesh)
    if mesh.subject_prefix != settings.subject_prefix:
        print(
            f"arqonbus: the file's subject_prefix {mesh.subject_prefix!r} differs from "
            f"ARQONBUS_SUBJECT_PREFIX {settings.subject_prefix!r}",
            file=sys.stderr,
        )
        return 2

    async def body(ports: CliPorts) -> int:
        ops = RegionOps.of(ports.broker)
        try:
            if command == "plan":
                return _print_plan(await ops.plan(mesh))
            changes = await ops.provision(mesh, force=args.force)
        except RegionsRefused as exc:
            print(f"arqonbus mesh {command}: refused: {exc}", file=sys.stderr)
            return EXIT_REFUSED
        if all(change.action == "nothing" for change in changes):
            print(f"nothing to do: the {len(changes)} stream(s) of the file are as it says")
        return 0

    return await with_mesh(settings, f"arqonbus-mesh-{command}", body)


def render(mesh: MeshFile, out: Path) -> int:
    _warn(mesh)
    files = dict(render_nats_configs(mesh))
    for region, values in render_helm_values(mesh).items():
        files[f"helm/values-{region}.yaml"] = yaml.safe_dump(values, sort_keys=False)
    for name, text in files.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    print(
        f"next: start each nats-server with its config (`nats-server -c {out}/nats/<region>/"
        "<node>.conf`), then `arqonbus mesh provision FILE --nats <any node>`"
    )
    return 0


def _print_plan(changes: list[Any]) -> int:
    for change in changes:
        print(change.line())
    actions = {change.action for change in changes}
    if "refuse" in actions:
        print("provision would refuse: fix the file, or provision --force to accept the loss")
        return EXIT_REFUSED
    if actions - {"nothing"}:
        print("run `arqonbus mesh provision FILE` to apply")
        return EXIT_PENDING
    print("nothing to do")
    return 0


async def _failover(settings: Settings, args: argparse.Namespace) -> int:
    if not is_valid_name(args.tenant):
        print(f"arqonbus: tenant {args.tenant!r} is not a valid name", file=sys.stderr)
        return 2

    async def body(ports: CliPorts) -> int:
        ops = RegionOps.of(ports.broker)
        try:
            if args.mesh_command == "failover":
                placement = await ops.failover(args.tenant, args.to, force=args.force)
            else:
                placement = await ops.failback(args.tenant, force=args.force)
        except RegionsRefused as exc:
            print(f"arqonbus mesh {args.mesh_command}: refused: {exc}", file=sys.stderr)
            return EXIT_REFUSED
        print(
            f"done: tenant {args.tenant} is served by {placement.primary.stream} in "
            f"{placement.primary.region} (epoch {placement.epoch})"
        )
        return 0

    return await with_mesh(settings, f"arqonbus-mesh-{args.mesh_command}", body)


async def provision_tenants(settings: Settings, tenants: list[str]) -> int:
    """``mesh provision --tenant T``: each tenant's stream on a single cluster (no file)."""
    scheme = SubjectScheme(settings.subject_prefix)
    for tenant in tenants:
        if not is_valid_name(tenant):
            print(
                f"arqonbus: tenant {tenant!r} is not a valid name: use 1-64 characters of "
                "A-Z, a-z, 0-9, '_' or '-'",
                file=sys.stderr,
            )
            return 2

    async def provision(ports: CliPorts) -> int:
        for tenant in tenants:
            replicas = await ports.broker.ensure_stream(tenant)
            print(
                f"stream {scheme.stream_name(tenant)} for tenant {tenant}: ready ({replicas} replicas)"
            )
        return 0

    return await with_mesh(settings, "arqonbus-provision", provision)
