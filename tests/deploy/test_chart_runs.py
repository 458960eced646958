"""What the chart configures, run for real without Kubernetes.

- Every scenario's gateway environment (the ConfigMap plus the container's env) is read by the
  gateway's own settings loader: no unknown ARQONBUS_* name, no invalid value.
- The dev scenario's gateway runs as a process with exactly the chart's environment against a real
  3-node JetStream cluster; the helm-test Pod's two commands (`arq pub`, then `arq sub --since 0
  --count 1`) run with the Pod's environment and must publish and receive; SIGTERM then drains
  the gateway within the Pod's grace period minus the preStop sleep.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from arqonbus_server.mesh.local import LocalCluster
from arqonbus_server.shared.settings import settings_from, unknown_variables
from tests.deploy.conftest import CHART, GOOD, find, render
from tests.support import GatewayProcess

ids = [p.stem for p in GOOD]


def gateway_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The gateway container's environment as Kubernetes would build it (secrets as stand-ins)."""
    deploy = find(docs, "Deployment")
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    env: dict[str, str] = {}
    for src in c["envFrom"]:
        cm = find(docs, "ConfigMap", src["configMapRef"]["name"])
        env.update(cm["data"])
    for e in c["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "secretKeyRef" in e["valueFrom"]:
            env[e["name"]] = "from-a-secret"
        elif "fieldRef" in e["valueFrom"]:
            env[e["name"]] = "bus-arqonbus-5d9c-x2x"
        elif "configMapKeyRef" in e["valueFrom"]:
            ref = e["valueFrom"]["configMapKeyRef"]
            env[e["name"]] = find(docs, "ConfigMap", ref["name"])["data"][ref["key"]]
    return env


@pytest.mark.parametrize("values", GOOD, ids=ids)
def test_gateway_accepts_the_charts_settings(helm: Path, values: Path) -> None:
    env = gateway_env(render(values))
    assert unknown_variables(env) == []
    settings = settings_from(env)
    assert settings.drain_timeout_s == float(env["ARQONBUS_DRAIN_TIMEOUT_S"])
    assert settings.listen == "0.0.0.0:8765"


def _pod_command(container: dict[str, Any], url: str) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ}
    for e in container["env"]:
        env[e["name"]] = e["value"]
    env["ARQONBUS_URL"] = url  # the Service's DNS name, here the local gateway
    argv = list(container["command"])
    argv[0] = str(Path(sys.executable).parent / argv[0])
    return argv, env


async def _run(argv: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.integration
async def test_dev_scenario_gateway_and_helm_test_commands(
    helm: Path,
    nats_cluster: LocalCluster,
    gateway_processes: Callable[..., Awaitable[GatewayProcess]],
) -> None:
    docs = render(CHART / "ci" / "dev-values.yaml")
    env = gateway_env(docs)
    # the chart's environment, except where this machine differs from the cluster
    for key in ("ARQONBUS_NATS", "ARQONBUS_LISTEN", "ARQONBUS_NODE_ID"):
        env.pop(key)
    gw = await gateway_processes(nats_cluster.url_csv, env=env)

    pod = find(docs, "Pod", "-test")
    (publish,) = pod["spec"]["initContainers"]
    (receive,) = pod["spec"]["containers"]
    argv, penv = _pod_command(publish, gw.url)
    rc, out, err = await _run(argv, penv)
    assert rc == 0, err
    assert json.loads(out.splitlines()[-1])["seq"] >= 1
    argv, renv = _pod_command(receive, gw.url)
    rc, out, err = await _run(argv, renv)
    assert rc == 0, err
    event = json.loads(out.splitlines()[-1])
    assert event["payload"] == {"helm_test": True}
    assert event["from"] == "helm-test"

    # drain: SIGTERM (after the preStop sleep, in Kubernetes) must end well inside the grace period
    spec = find(docs, "Deployment")["spec"]["template"]["spec"]
    pre_stop = int(spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][1])
    budget = spec["terminationGracePeriodSeconds"] - pre_stop
    started = time.monotonic()
    gw.signal(signal.SIGTERM)
    assert await gw.wait_exit(budget) == 0
    assert time.monotonic() - started < budget
