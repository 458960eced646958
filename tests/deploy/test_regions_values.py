"""The per-region values ``arqonbus mesh render`` writes for helm/arqonbus: layered over an
operator's production values (the single-region scenario here), each passes ``helm lint
--strict`` (the chart's schema) and gives that region's gateways their region, replicas and
NATS servers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from arqonbus_server.shared.regions import load_mesh_file
from arqonbus_server.shared.settings import settings_from, unknown_variables
from tests.deploy.conftest import CHART, ROOT, _render, run_helm
from tests.deploy.test_chart_runs import gateway_env

EXAMPLE = ROOT / "deploy" / "regions.example.yaml"
BASE = CHART / "ci" / "single-region-values.yaml"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("render")
    done = subprocess.run(
        [sys.executable, "-m", "arqonbus_server.gateway", "mesh", "render", str(EXAMPLE),
         "--out", str(out)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def test_each_regions_values_pass_the_charts_schema(helm: Path, rendered: Path) -> None:
    mesh = load_mesh_file(yaml.safe_load(EXAMPLE.read_text()))
    for region in mesh.regions:
        values = rendered / "helm" / f"values-{region.name}.yaml"
        out = run_helm("lint", "--strict", str(CHART), "-f", str(BASE), "-f", str(values))
        assert out.returncode == 0, f"{values}: {out.stdout}{out.stderr}"
        # The region's replica count applies when no autoscaler sizes the Deployment.
        sets = ("autoscaling.enabled=false",)
        docs = [d for d in yaml.safe_load_all(_render((str(BASE), str(values)), sets)) if d]
        deploy = next(d for d in docs if d["kind"] == "Deployment")
        assert deploy["spec"]["replicas"] == region.gateways.replicas
        env = gateway_env(docs)
        assert unknown_variables(env) == []
        settings = settings_from(env)
        assert settings.region == region.name
        assert settings.nats.split(",") == [node.client_url for node in region.nats]
        assert "StatefulSet" not in {d["kind"] for d in docs}  # NATS is the mesh file's
