"""``arqonbus mesh render`` of the documented example file: every NATS config it writes is
accepted by the real nats-server (``nats-server -t``, which also loads the TLS files), and
the per-region Helm values are keys of helm/arqonbus (its schema runs in make deploy-check:
tests/deploy/test_regions_values.py)."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from arqonbus_server.mesh.local import find_nats_server
from tests.integration.test_origin_tls import make_cert
from tests.timeouts import SEC

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "regions.example.yaml"


async def run(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60 * SEC)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_every_rendered_nats_config_is_accepted_by_nats_server(tmp_path: Path) -> None:
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    cert, _ = make_cert(tls_dir, "tls")
    shutil.copy(cert, tls_dir / "ca.crt")  # self-signed: its own CA
    data = yaml.safe_load(EXAMPLE.read_text())
    data["store_root"] = str(tmp_path / "data")
    data["security"]["tls_dir"] = str(tls_dir)
    nodes = [n for r in data["regions"] for n in r["nats"]] + [data["witness"]["node"]]
    for i, node in enumerate(nodes):  # every node on this host: ports of their own (-t binds none)
        node.update(host="127.0.0.1", client_port=14200 + i, cluster_port=16200 + i)
        node.update(gateway_port=17200 + i, http_port=18200 + i)
    mesh_file = tmp_path / "mesh.yaml"
    mesh_file.write_text(yaml.safe_dump(data))
    out_dir = tmp_path / "out"

    code, out = await run(
        sys.executable, "-m", "arqonbus_server.gateway", "mesh", "render", str(mesh_file),
        "--out", str(out_dir),
    )  # fmt: skip
    assert code == 0, out
    configs = sorted(out_dir.glob("nats/*/*.conf"))
    assert len(configs) == len(nodes), configs
    binary = find_nats_server()
    for config in configs:
        text = config.read_text()
        assert "sync_interval: always" in text and text.count("tls {") == 3, config
        code, out = await run(binary, "-t", "-c", str(config))
        assert code == 0, f"{config}: {out}"
    assert len(list(out_dir.glob("helm/values-*.yaml"))) == len(data["regions"])


async def test_render_names_every_problem_of_a_bad_file(tmp_path: Path) -> None:
    data = yaml.safe_load(EXAMPLE.read_text())
    data["tenants"][0]["home"] = "mars"
    data["regions"][1]["nats"][0]["name"] = data["regions"][0]["nats"][0]["name"]
    data["regions"][0]["colour"] = "blue"
    mesh_file = tmp_path / "bad.yaml"
    mesh_file.write_text(yaml.safe_dump(data))
    code, out = await run(
        sys.executable, "-m", "arqonbus_server.gateway", "mesh", "render", str(mesh_file),
        "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert code == 2, out
    assert "regions[0].colour: unknown key" in out, out
    assert not (tmp_path / "out").exists()
