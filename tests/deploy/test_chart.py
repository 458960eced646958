"""helm/arqonbus with real Helm: lint, render, validate for Kubernetes 1.29 and 1.33, properties."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from tests.deploy.conftest import (
    BAD,
    CHART,
    GOOD,
    ROOT,
    find,
    kinds,
    render,
    render_text,
    run_helm,
)

K8S_VERSIONS = ["1.29.0", "1.33.0"]
# Kinds with no schema in kubernetes-validate (CRDs): checked structurally below instead.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
ids = [p.stem for p in GOOD]
bad_ids = [p.stem for p in BAD]


def gateway(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return find(docs, "Deployment")


def container(deploy: dict[str, Any]) -> dict[str, Any]:
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    return cast(dict[str, Any], c)


def config(docs: list[dict[str, Any]]) -> dict[str, str]:
    cms = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "bus-arqonbus"]
    assert len(cms) == 1
    return cast(dict[str, str], cms[0]["data"])


def test_every_scenario_is_there() -> None:
    names = {p.name for p in GOOD}
    for scenario in (
        "single-region",
        "existing-nats",
        "tls",
        "multi-region-east",
        "multi-region-west",
    ):
        assert f"{scenario}-values.yaml" in names
    assert len(BAD) >= 5


@pytest.mark.parametrize("values", GOOD, ids=ids)
def test_lint_strict(helm: Path, values: Path) -> None:
    out = run_helm("lint", "--strict", str(CHART), "-f", str(values))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 chart(s) failed" in out.stdout


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("values", GOOD, ids=ids)
def test_manifests_validate(helm: Path, values: Path, version: str, tmp_path: Path) -> None:
    text = render_text(values)
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(text)
    validator = str(Path(sys.executable).parent / "kubernetes-validate")
    out = subprocess.run(
        [validator, "--strict", "-k", version, str(manifest)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = (out.stdout + out.stderr).splitlines()
    docs = [d for d in yaml.safe_load_all(text) if d]
    crds = {(d["apiVersion"], d["kind"]) for d in docs} & CRD_KINDS
    passed = [ln for ln in lines if ln.startswith("INFO") and " passed for resource " in ln]
    problems = []
    for ln in lines:
        if ln.startswith("INFO"):
            continue
        if any(f"kind {k} with api version {a} " in ln for a, k in crds):
            continue  # no schema for a CRD: checked in test_service_monitor
        problems.append(ln)
    assert not problems, "\n".join(problems)
    assert len(passed) == len(docs) - sum(
        1 for d in docs if (d["apiVersion"], d["kind"]) in CRD_KINDS
    )


@pytest.mark.parametrize("values", GOOD, ids=ids)
def test_probes_ports_and_drain(helm: Path, values: Path) -> None:
    docs = render(values)
    deploy = gateway(docs)
    spec = deploy["spec"]["template"]["spec"]
    c = container(deploy)
    cfg = config(docs)
    assert c["args"] == ["gateway"]
    assert c["ports"] == [{"name": "ws", "containerPort": 8765, "protocol": "TCP"}]
    assert cfg["ARQONBUS_LISTEN"] == "0.0.0.0:8765"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] == "ws"
    svc = find(docs, "Service", "bus-arqonbus")
    assert svc["spec"]["ports"][0]["targetPort"] == "ws"
    assert svc["spec"]["selector"] == deploy["spec"]["selector"]["matchLabels"]
    # drain: the grace period covers preStop, the drain and 5 s of audit flush
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = int(cfg["ARQONBUS_DRAIN_TIMEOUT_S"])
    assert spec["terminationGracePeriodSeconds"] > drain + int(pre_stop[1]) + 5
    assert deploy["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


@pytest.mark.parametrize("values", GOOD, ids=ids)
def test_security_contexts(helm: Path, values: Path) -> None:
    docs = render(values)
    pods = []
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "Job"):
            pods.append(d["spec"]["template"]["spec"])
        elif d["kind"] == "Pod":
            pods.append(d["spec"])
    assert pods
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        for c in pod.get("initContainers", []) + pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
            assert "resources" in c and c["resources"]["limits"]["memory"]


SECRETISH = re.compile(r"PASSWORD|TOKEN|SECRET$|_KEY$|CREDS")


@pytest.mark.parametrize("values", GOOD, ids=ids)
def test_no_secret_value_in_plain_text(helm: Path, values: Path) -> None:
    docs = render(values)
    assert "Secret" not in kinds(docs)
    dev = "dev" in config(docs)["ARQONBUS_AUTH"].split(",")
    for d in docs:
        for key in d.get("data", {}) if d["kind"] == "ConfigMap" else {}:
            assert not re.search(r"PASSWORD|TOKEN$|JWT_SECRET$", key), key
        for c in _containers(d):
            for env in c.get("env", []):
                if SECRETISH.search(env["name"]) and "value" in env:
                    # files are paths; only a dev token may be a literal
                    assert env["value"].startswith("/etc/") or (
                        dev and env["value"].startswith("dev:")
                    ), env


def _containers(d: dict[str, Any]) -> list[dict[str, Any]]:
    if d["kind"] in ("Deployment", "StatefulSet", "Job"):
        spec = d["spec"]["template"]["spec"]
    elif d["kind"] == "Pod":
        spec = d["spec"]
    else:
        return []
    return cast(list[dict[str, Any]], spec.get("initContainers", []) + spec["containers"])


def test_secrets_are_referenced(helm: Path) -> None:
    docs = render(CHART / "ci" / "single-region-values.yaml")
    env = {e["name"]: e for e in container(gateway(docs))["env"]}
    ref = env["ARQONBUS_NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "arqonbus-nats-auth", "key": "password"}
    docs = render(CHART / "ci" / "existing-nats-values.yaml")
    cfg = config(docs)
    assert cfg["ARQONBUS_JWT_PUBLIC_KEY_FILE"] == "/etc/arqonbus/jwt/issuer.pem"
    vols = {v["name"]: v for v in gateway(docs)["spec"]["template"]["spec"]["volumes"]}
    assert vols["jwt"]["secret"]["secretName"] == "arqonbus-jwt"
    assert vols["nats-auth"]["secret"]["secretName"] == "arqonbus-nats-creds"
    env = {e["name"]: e for e in container(gateway(docs))["env"]}
    assert env["ARQONBUS_NATS_CREDS_FILE"]["value"] == "/etc/arqonbus/nats-auth/arqonbus.creds"
    assert env["ARQONBUS_NATS_TLS_CA"]["value"] == "/etc/arqonbus/nats-tls/ca.crt"


def test_checksum_rolls_pods_on_config_change(helm: Path) -> None:
    values = CHART / "ci" / "single-region-values.yaml"

    def checksum(*sets: str) -> str:
        ann = gateway(render(values, *sets))["spec"]["template"]["metadata"]["annotations"]
        return str(ann["checksum/config"])

    base = checksum()
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    assert checksum("gateway.logLevel=DEBUG") != base
    assert checksum("gateway.config.ARQONBUS_IDLE_TIMEOUT_S=300") != base
    assert checksum("gateway.podLabels.team=bus") == base  # not config: no roll


def test_pdb_and_hpa_toggles(helm: Path) -> None:
    values = CHART / "ci" / "single-region-values.yaml"
    docs = render(values)
    hpa = find(docs, "HorizontalPodAutoscaler")
    assert "replicas" not in gateway(docs)["spec"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Pods"]["pods"]["metric"]["name"] == "arqonbus_connections"
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    assert {p["metadata"]["name"] for p in pdbs} == {"bus-arqonbus", "bus-arqonbus-nats"}
    assert all(p["spec"]["maxUnavailable"] == 1 for p in pdbs)

    docs = render(
        values, "autoscaling.enabled=false", "pdb.enabled=false", "nats.pdb.enabled=false"
    )
    assert "HorizontalPodAutoscaler" not in kinds(docs)
    assert "PodDisruptionBudget" not in kinds(docs)
    assert gateway(docs)["spec"]["replicas"] == 3
    docs = render(values, "autoscaling.connections.enabled=false")
    assert [m["type"] for m in find(docs, "HorizontalPodAutoscaler")["spec"]["metrics"]] == [
        "Resource"
    ]


def test_topology_spread(helm: Path) -> None:
    docs = render(CHART / "ci" / "multi-region-east-values.yaml")
    tsc = gateway(docs)["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert [t["topologyKey"] for t in tsc] == [
        "topology.kubernetes.io/zone",
        "kubernetes.io/hostname",
    ]
    assert {t["whenUnsatisfiable"] for t in tsc} == {"DoNotSchedule"}
    assert config(docs)["ARQONBUS_REGION"] == "us-east-1"
    west = config(render(CHART / "ci" / "multi-region-west-values.yaml"))
    assert west["ARQONBUS_REGION"] == "eu-west-1"
    assert "nats-west-0" in west["ARQONBUS_NATS"]


def test_nats_statefulset(helm: Path) -> None:
    docs = render(CHART / "ci" / "single-region-values.yaml")
    sts = find(docs, "StatefulSet", "-nats")
    assert sts["spec"]["replicas"] == 3
    assert sts["spec"]["serviceName"] == "bus-arqonbus-nats-headless"
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    anti = sts["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert anti["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"] == (
        "kubernetes.io/hostname"
    )
    headless = find(docs, "Service", "-nats-headless")
    assert headless["spec"]["clusterIP"] == "None"
    conf = find(docs, "ConfigMap", "-nats")["data"]["nats.conf"]
    assert re.search(r"^\s*sync_interval: always$", conf, re.M)
    routes = re.findall(
        r"nats://bus-arqonbus-nats-(\d)\.bus-arqonbus-nats-headless\.arqonbus\.svc:6222", conf
    )
    assert routes == ["0", "1", "2"]
    assert "password: $NATS_PASSWORD" in conf
    urls = config(docs)["ARQONBUS_NATS"].split(",")
    assert urls == [
        f"nats://bus-arqonbus-nats-{i}.bus-arqonbus-nats-headless.arqonbus.svc:4222"
        for i in range(3)
    ]


def test_existing_nats_renders_no_nats(helm: Path) -> None:
    docs = render(CHART / "ci" / "existing-nats-values.yaml")
    assert "StatefulSet" not in kinds(docs)
    assert not [d for d in docs if d["metadata"]["name"].endswith("-nats")]
    assert config(docs)["ARQONBUS_NATS"].startswith("tls://nats-0.nats-headless.nats.svc:4222,")


def test_tls(helm: Path) -> None:
    docs = render(CHART / "ci" / "tls-values.yaml")
    c = container(gateway(docs))
    assert c["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    cfg = config(docs)
    assert cfg["ARQONBUS_TLS_CERT"] == "/etc/arqonbus/tls/tls.crt"
    assert cfg["ARQONBUS_JWT_ALGORITHMS"] == "HS256"
    assert cfg["ARQONBUS_NATS_TLS_HANDSHAKE_FIRST"] == "true"
    conf = find(docs, "ConfigMap", "-nats")["data"]["nats.conf"]
    assert "handshake_first: true" in conf and "token: $NATS_TOKEN" in conf
    pod = find(docs, "Pod", "-test")
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    assert env["ARQONBUS_URL"]["value"] == "wss://bus-arqonbus.arqonbus.svc:8765/ws"
    assert env["SSL_CERT_FILE"]["value"] == "/etc/arqonbus/tls/ca.crt"
    ing = find(docs, "Ingress")
    assert ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "HTTPS"


def test_ingress_is_websocket_friendly(helm: Path) -> None:
    docs = render(CHART / "ci" / "single-region-values.yaml", "ingress.annotations.extra=yes")
    ann = find(docs, "Ingress")["metadata"]["annotations"]
    assert ann["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "3600"
    assert ann["nginx.ingress.kubernetes.io/proxy-send-timeout"] == "3600"
    assert ann["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert ann["nginx.ingress.kubernetes.io/proxy-request-buffering"] == "off"
    assert ann["traefik.ingress.kubernetes.io/router.entrypoints"] == "websecure"
    assert ann["extra"] == "yes"


def test_service_monitor_and_network_policy(helm: Path) -> None:
    docs = render(CHART / "ci" / "single-region-values.yaml")
    sm = find(docs, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["endpoints"] == [
        {"port": "ws", "path": "/metrics", "interval": "30s", "scheme": "http"}
    ]
    assert sm["spec"]["selector"]["matchLabels"] == gateway(docs)["spec"]["selector"]["matchLabels"]
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "NetworkPolicy"} == {
        "bus-arqonbus",
        "bus-arqonbus-nats",
    }
    plain = render(CHART / "ci" / "multi-region-east-values.yaml")
    assert not kinds(plain) & {"ServiceMonitor", "NetworkPolicy", "Ingress", "Job"}


def test_provision_job_is_a_hook(helm: Path) -> None:
    docs = render(CHART / "ci" / "single-region-values.yaml")
    job = find(docs, "Job", "-provision")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,pre-upgrade"
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["args"] == ["mesh", "provision", "--tenant", "acme", "--tenant", "globex"]


def test_helm_test_pod(helm: Path) -> None:
    docs = render(CHART / "ci" / "single-region-values.yaml")
    pod = find(docs, "Pod", "-test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    (pub,) = pod["spec"]["initContainers"]
    (sub,) = pod["spec"]["containers"]
    assert pub["command"] == [
        "arq", "pub", "--connect-timeout", "30", "--timeout", "30",
        "--id", "helm-test-1-bus", "helm-test", "helm-test-1", '{"helm_test":true}',
    ]  # fmt: skip
    assert sub["command"] == [
        "arq", "sub", "--connect-timeout", "30", "--since", "0", "--count", "1",
        "helm-test", "helm-test-1",
    ]  # fmt: skip
    env = {e["name"]: e for e in sub["env"]}
    assert env["ARQONBUS_URL"]["value"] == "ws://bus-arqonbus.arqonbus.svc:8765/ws"
    assert env["ARQONBUS_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "arqonbus-test-token",
        "key": "token",
    }


def test_arq_cli_takes_the_test_pods_arguments() -> None:
    """The commands in the helm-test Pod parse with the SDK's real `arq` CLI."""
    arq = Path(sys.executable).parent / "arq"
    assert arq.exists(), f"{arq} is missing: make install puts the SDK's arq there"
    for sub in (["pub", "--connect-timeout", "30", "--timeout", "30", "--id", "x"], ["sub"]):
        out = subprocess.run(
            [str(arq), *sub, "--help"], capture_output=True, text=True, timeout=30, check=False
        )
        assert out.returncode == 0, out.stderr
    sub_help = subprocess.run(
        [str(arq), "sub", "--help"], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    for flag in ("--since", "--count", "--connect-timeout"):
        assert flag in sub_help


def test_dev_auth_needs_the_insecure_value_and_warns(helm: Path) -> None:
    dev = CHART / "ci" / "dev-values.yaml"
    cfg = config(render(dev))
    assert cfg["ARQONBUS_AUTH"] == "dev" and cfg["ARQONBUS_INSECURE_DEV_AUTH"] == "true"
    out = run_helm(
        "install", "bus", str(CHART), "-f", str(dev), "--dry-run=client", "-n", "arqonbus"
    )
    assert out.returncode == 0, out.stderr
    assert "WARNING: INSECURE DEV AUTH IS ON" in out.stdout
    assert "ws://bus-arqonbus.arqonbus.svc:8765/ws?token=<token>" in out.stdout
    out = run_helm(
        "template", "bus", str(CHART), "-f", str(dev),
        "--set", "gateway.auth.insecureDevAuthAnyClientMayClaimAnyTenant=false",
    )  # fmt: skip
    assert out.returncode != 0
    assert "gateway.auth.methods has dev" in out.stderr
    prod = run_helm(
        "install", "bus", str(CHART), "-f", str(CHART / "ci" / "single-region-values.yaml"),
        "--dry-run=client", "-n", "arqonbus",
    )  # fmt: skip
    assert prod.returncode == 0, prod.stderr
    assert "INSECURE" not in prod.stdout
    assert "wss://bus.example.com/ws?token=<token>" in prod.stdout


def _expected(path: Path) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"^# expect: (.+)$", path.read_text(), re.M)]


@pytest.mark.parametrize("values", BAD, ids=bad_ids)
def test_bad_values_fail_with_helms_message(helm: Path, values: Path) -> None:
    expected = _expected(values)
    assert expected, f"{values} has no # expect: line"
    # Helm's lint mode makes the template function `fail` non-fatal (it only logs the message),
    # so the validation helper's errors stop `helm template`/`install` but not `helm lint`;
    # schema errors stop both.
    helper = any(m.startswith("VALUES ERRORS") for m in expected)
    for cmd in (["template", "bus"], ["install", "bus", "--dry-run=client"], ["lint", "--strict"]):
        out = run_helm(*cmd, str(CHART), "-f", str(values))
        text = out.stdout + out.stderr
        if not (helper and cmd[0] == "lint"):
            assert out.returncode != 0, f"helm {cmd[0]} accepted {values.name}"
        for message in expected:
            assert message in text, (cmd[0], message, text)


def test_chart_readme_is_generated() -> None:
    tool = ROOT / "deploy" / "tools" / "chart_readme.py"
    out = subprocess.run(
        [sys.executable, str(tool), "--check"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr


def test_defaults_are_safe_and_ask_for_a_key_source(helm: Path) -> None:
    """No insecure default: the bare chart wants a JWT key source and says so, once."""
    out = run_helm("template", "bus", str(CHART))
    assert out.returncode != 0
    assert "VALUES ERRORS (1):" in out.stderr
    assert "gateway.auth.jwt: jwt auth needs a key source" in out.stderr
    docs = render(None, "gateway.auth.jwt.jwksUrl=https://idp.example.com/jwks")
    cfg = config(docs)
    assert cfg["ARQONBUS_AUTH"] == "jwt"
    assert "ARQONBUS_INSECURE_DEV_AUTH" not in cfg
    assert find(docs, "StatefulSet", "-nats")["spec"]["replicas"] == 3
    assert gateway(docs)["spec"]["replicas"] == 3
    assert "Pod" not in kinds(docs)  # no token for helm test: the Pod is left out
