"""shared/regions.py: the mesh file's checks, what it renders, the plan, the placement."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from arqonbus_server.gateway.admin.mesh import read_mesh_file
from arqonbus_server.shared.regions import (
    Epoch,
    MeshFileError,
    Placement,
    StreamAt,
    StreamSpec,
    desired_streams,
    initial_placement,
    load_mesh_file,
    mesh_warnings,
    plan_changes,
    promoted,
    render_nats_config,
    render_nats_configs,
    returned_home,
)

EXAMPLE = Path(__file__).parents[2] / "deploy" / "regions.example.yaml"


def node(name: str, port: int) -> dict[str, Any]:
    return {"name": name, "host": "127.0.0.1", "client_port": port, "cluster_port": port + 1,
            "gateway_port": port + 2}  # fmt: skip


def mesh_data(witness: bool = True) -> dict[str, Any]:
    data: dict[str, Any] = {
        "regions": [
            {"name": "east", "nats": [node("e1", 4000), node("e2", 4010)]},
            {"name": "west", "nats": [node("w1", 5000), node("w2", 5010)]},
        ],
        "tenants": [{"name": "acme", "home": "east", "mirrors": ["west"], "replicas": 2}],
    }
    if witness:
        data["witness"] = {"node": node("wit", 6000)}
    return data


def problems_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(MeshFileError) as caught:
        load_mesh_file(data)
    return caught.value.problems


def test_the_example_file_is_valid_and_renders():
    mesh = read_mesh_file(EXAMPLE)
    assert [r.name for r in mesh.regions] == ["eu-west", "us-east", "ap-south"]
    assert len(render_nats_configs(mesh)) == 10
    assert mesh_warnings(mesh) == []


def test_unknown_region_is_named():
    data = mesh_data()
    data["tenants"][0]["mirrors"] = ["north"]
    assert problems_of(data) == [
        "tenants[0].mirrors[0]: unknown region 'north' (regions: east, west)"
    ]


def test_tenant_homed_nowhere():
    data = mesh_data()
    data["tenants"][0]["home"] = "mars"
    assert problems_of(data) == ["tenants[0].home: unknown region 'mars' (regions: east, west)"]


def test_duplicate_ports_name_both_places():
    data = mesh_data()
    data["regions"][1]["nats"][0]["client_port"] = 4000
    [problem] = problems_of(data)
    assert problem.startswith("regions[1].nats[0].client_port: 127.0.0.1:4000 is already used")
    assert "regions[0].nats[0].client_port" in problem


def test_unknown_key_is_named():
    data = mesh_data()
    data["tenants"][0]["retention"] = 5
    assert problems_of(data) == [
        "tenants[0].retention: unknown key (see deploy/regions.example.yaml for the keys)"
    ]


def test_bad_yaml_file(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("regions: [\n")
    with pytest.raises(MeshFileError, match="not valid YAML"):
        read_mesh_file(path)


def test_two_regions_without_witness_warn():
    warnings = mesh_warnings(load_mesh_file(mesh_data(witness=False)))
    assert any("2 regions and no witness" in w for w in warnings)
    assert not any("no witness" in w for w in mesh_warnings(load_mesh_file(mesh_data())))


def test_render_routes_gateways_tags_and_sync():
    mesh = load_mesh_file(mesh_data())
    east = render_nats_config(mesh, "east", mesh.regions[0].nats[0])
    assert 'server_tags: ["region:east"]' in east
    assert "sync_interval: always" in east
    assert '"nats-route://127.0.0.1:4001"' in east and '"nats-route://127.0.0.1:4011"' in east
    assert 'gateway {\n  name: "east"' in east
    for gateway in ('{name: "west", urls: ["nats://127.0.0.1:5002", "nats://127.0.0.1:5012"]}',
                    '{name: "witness", urls: ["nats://127.0.0.1:6002"]}'):  # fmt: skip
        assert gateway in east
    assert mesh.witness is not None
    witness = render_nats_config(mesh, "witness", mesh.witness.node)
    assert 'server_tags: ["region:witness", "!jetstream"]' in witness
    assert "sync_interval: always" in witness


def specs() -> dict[str, StreamSpec]:
    return {s.name: s for s in desired_streams(load_mesh_file(mesh_data()))}


def test_plan_creates_what_is_missing_and_leaves_the_rest():
    desired = list(specs().values())
    assert [c.action for c in plan_changes(desired, {})] == ["create", "create"]
    assert [c.action for c in plan_changes(desired, specs())] == ["nothing", "nothing"]


def test_plan_updates_a_longer_retention_and_refuses_a_shorter_one():
    desired = list(specs().values())
    have = {n: s for n, s in specs().items()}
    have["arq_acme"] = StreamSpec(**{**_fields(have["arq_acme"]), "max_age_s": 60.0})
    [primary, _] = plan_changes(desired, have)
    assert primary.action == "update" and primary.fields == ("max_age_s",)
    have["arq_acme"] = StreamSpec(**{**_fields(have["arq_acme"]), "max_age_s": 10**9})
    [primary, _] = plan_changes(desired, have)
    assert primary.action == "refuse" and "max_age_s" in primary.why


def test_plan_refuses_a_primary_that_is_a_mirror():
    desired = list(specs().values())
    have = dict(specs())
    have["arq_acme"] = StreamSpec(**{**_fields(have["arq_acme"]), "mirror_of": "x"})
    assert plan_changes(desired, have)[0].action == "refuse"


def test_plan_keeps_a_failed_over_tenant():
    mesh = load_mesh_file(mesh_data())
    moved = promoted(initial_placement(mesh, mesh.tenants[0]), "west", 10)
    changes = plan_changes(list(specs().values()), {}, {"acme": moved})
    assert {c.action for c in changes} == {"refuse"}
    assert "failback" in changes[0].why


def _fields(spec: StreamSpec) -> dict[str, Any]:
    return {f: getattr(spec, f) for f in spec.__dataclass_fields__}


def test_placement_json_round_trip_and_epochs():
    mesh = load_mesh_file(mesh_data())
    first = initial_placement(mesh, mesh.tenants[0])
    assert first.epoch == 1 and first.primary == StreamAt("east", "arq_acme")
    over = promoted(first, "west", 41)
    assert over.epoch == 2 and over.primary == StreamAt("west", "arq-mirror-west_acme")
    assert over.epochs[-1] == Epoch(2, 42, over.primary) and over.mirrors == ()
    back = returned_home(over, "arq_acme", 50)
    assert back.epoch == 3 and back.primary == StreamAt("east", "arq_acme")
    assert back.mirrors == (StreamAt("west", "arq-mirror-west_acme"),)
    for placement in (first, over, back):
        assert Placement.from_json(placement.to_json()) == placement
    with pytest.raises(ValueError, match="no mirror"):
        promoted(first, "east", 1)


def test_resume_from_never_skips_into_a_new_epoch():
    mesh = load_mesh_file(mesh_data())
    over = promoted(initial_placement(mesh, mesh.tenants[0]), "west", 41)
    assert over.resume_from(2, 45) == (45, None)  # current epoch: as is
    assert over.resume_from(1, 30) == (30, None)  # the mirror had it
    assert over.resume_from(1, 44) == (41, 42)  # acked by the lost primary after seq 41
