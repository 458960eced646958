"""Fixtures for the chart tests: the real helm binary and rendered manifests.

They run only from `make deploy-check` (ARQONBUS_DEPLOY_CHECK=1), which fetches helm into
.build/helm/ and installs kubernetes-validate and PyYAML first; `make test` does not collect them.
A missing tool is a failure, never a skip.
"""

from __future__ import annotations

import os
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "arqonbus"
HELM = ROOT / ".build" / "helm" / "helm"
GOOD = sorted((CHART / "ci").glob("*.yaml"))
BAD = sorted((CHART / "ci" / "bad").glob("*.yaml"))
collect_ignore_glob = [] if os.environ.get("ARQONBUS_DEPLOY_CHECK") == "1" else ["test_*.py"]


def _need(ok: bool, what: str) -> None:
    if not ok:
        pytest.fail(f"{what} is missing: run make deploy-check")


@pytest.fixture(scope="session")
def helm() -> Path:
    _need(HELM.exists(), str(HELM))
    return HELM


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HELM), *args], capture_output=True, text=True, timeout=60, cwd=ROOT, check=False
    )


@cache
def _render(values: tuple[str, ...], sets: tuple[str, ...], show_only: str = "") -> str:
    args = ["template", "bus", str(CHART), "--namespace", "arqonbus"]
    for v in values:
        args += ["-f", v]
    for s in sets:
        args += ["--set", s]
    if show_only:
        args += ["--show-only", show_only]
    out = run_helm(*args)
    if out.returncode != 0:
        raise AssertionError(f"helm template {values} {sets} failed:\n{out.stderr}")
    return out.stdout


def render(values: Path | None = None, *sets: str) -> list[dict[str, Any]]:
    """The documents helm renders for a values file and --set overrides (hooks and tests too)."""
    text = _render((str(values),) if values else (), tuple(sets))
    import yaml  # installed by make deploy-check, which alone collects these tests

    return [d for d in yaml.safe_load_all(text) if d]


def render_text(values: Path | None = None, *sets: str) -> str:
    return _render((str(values),) if values else (), tuple(sets))


def find(docs: list[dict[str, Any]], kind: str, suffix: str = "") -> dict[str, Any]:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    assert len(hits) == 1, (
        f"expected one {kind} *{suffix}, got {[h['metadata']['name'] for h in hits]}"
    )
    return hits[0]


def kinds(docs: list[dict[str, Any]]) -> set[str]:
    return {d["kind"] for d in docs}
