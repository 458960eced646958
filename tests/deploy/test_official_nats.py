"""deploy/official-nats/: values for the official NATS chart and this chart pointed at it.

The official chart (nats-io/k8s, helm/charts/nats) is not available here, so its rendering was
checked by hand (docs/deploy.md says with which version and how). These tests keep the saved files
and the doc's snippets in step: the same values in both, one gateway URL per official-chart server
(pod names from that chart's naming: release "nats" in namespace "nats"), this chart linting and
rendering with them, and the settings the official chart has no key for in the right place.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from arqonbus_server.shared.settings import settings_from, unknown_variables
from tests.deploy.conftest import CHART, ROOT, kinds, render, run_helm
from tests.deploy.test_chart_runs import gateway_env

DIR = ROOT / "deploy" / "official-nats"
NATS_VALUES = DIR / "nats-values.yaml"
ARQONBUS_VALUES = DIR / "arqonbus-values.yaml"
DOC = ROOT / "docs" / "deploy.md"
RELEASE = NAMESPACE = "nats"  # the official chart's full name is the release's when it has "nats"


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), path
    return data


def doc_snippets() -> list[Any]:
    """The YAML blocks of docs/deploy.md's section on the official chart, in order."""
    text = DOC.read_text()
    start = text.index("## NATS: in the release, or the official NATS chart")
    end = text.index("\n## ", start + 1)
    blocks = re.findall(r"^```yaml\n(.*?)^```$", text[start:end], re.M | re.S)
    return [yaml.safe_load(b) for b in blocks]


def gibibytes(size: str) -> float:
    m = re.fullmatch(r"(\d+)(Mi|Gi|Ti)", size)
    assert m, f"unexpected size {size!r}"
    return int(m.group(1)) * {"Mi": 1 / 1024, "Gi": 1, "Ti": 1024}[m.group(2)]


def test_doc_shows_the_saved_files() -> None:
    assert doc_snippets() == [load(NATS_VALUES), load(ARQONBUS_VALUES)]


def test_official_values_keep_the_guarantees() -> None:
    cfg = load(NATS_VALUES)["config"]
    assert cfg["cluster"]["enabled"] is True
    assert cfg["cluster"]["replicas"] >= 3 and cfg["cluster"]["replicas"] % 2 == 1
    js = cfg["jetstream"]
    assert js["enabled"] is True
    # No key of its own in the official chart: only the jetstream block's merge puts it in
    # nats.conf's jetstream block (config.merge would put it at the top, which nats-server refuses).
    assert js["merge"]["sync_interval"] == "always"
    assert "sync_interval" not in cfg.get("merge", {})
    store = js["fileStore"]
    assert store.get("enabled", True) and store["pvc"].get("enabled", True)
    assert gibibytes(store["maxSize"]) < gibibytes(store["pvc"]["size"])


def test_this_chart_points_at_every_official_server(helm: Path) -> None:
    replicas = load(NATS_VALUES)["config"]["cluster"]["replicas"]
    out = run_helm("lint", "--strict", str(CHART), "-f", str(ARQONBUS_VALUES))
    assert out.returncode == 0, out.stdout + out.stderr
    docs = render(ARQONBUS_VALUES)
    assert "StatefulSet" not in kinds(docs)
    env = gateway_env(docs)
    assert env["ARQONBUS_NATS"].split(",") == [
        f"nats://{RELEASE}-{i}.{RELEASE}-headless.{NAMESPACE}.svc:4222" for i in range(replicas)
    ]
    assert unknown_variables(env) == []
    assert settings_from(env).listen == "0.0.0.0:8765"
