"""`arqonbus gateway` refuses dev authentication unless told it is on purpose.

Dev auth lets anyone claim any tenant and identity, so a production start with ``--auth dev``
(or ``ARQONBUS_AUTH`` including ``dev``) exits 2 naming the flag; ``--insecure-dev-auth`` or
``ARQONBUS_INSECURE_DEV_AUTH=true`` allows it (``arqonbus dev`` passes the flag itself), and
``jwt`` needs neither. ``arqonbus dev`` refuses a listener TLS environment it cannot probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sys
import tempfile
from collections.abc import AsyncIterator

import pytest

from arqonbus_server.gateway.admin.cli import main as cli_main
from arqonbus_server.gateway.admin.dev import dev_auth, gateway_command, http_status, stop_process
from arqonbus_server.mesh.local import LocalCluster, free_port
from tests.timeouts import SEC

pytestmark = pytest.mark.integration

FLAG = "--insecure-dev-auth"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("ARQONBUS_") and name != "ARQONBUS_NATS_SERVER":
            monkeypatch.delenv(name)


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["--auth", "dev"], {}),
        ([], {"ARQONBUS_AUTH": "dev"}),
        (["--auth", "jwt,dev"], {"ARQONBUS_JWT_ALGORITHMS": "HS256"}),
        (["--auth", "dev"], {"ARQONBUS_INSECURE_DEV_AUTH": "false"}),
    ],
)
def test_dev_auth_is_refused_without_the_flag(
    argv: list[str],
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if "jwt,dev" in argv:
        monkeypatch.setenv("ARQONBUS_JWT_SECRET", secrets.token_urlsafe(48))
    # Nothing listens there: a gateway that started would not fail this way.
    base = ["gateway", "--listen", f"127.0.0.1:{free_port()}"]
    assert cli_main([*base, *argv]) == 2
    err = capsys.readouterr().err
    assert "refusing to start with --auth dev" in err
    assert FLAG in err and "ARQONBUS_INSECURE_DEV_AUTH=true" in err


@contextlib.asynccontextmanager
async def gateway_process(
    argv: list[str], env: dict[str, str]
) -> AsyncIterator[tuple[asyncio.subprocess.Process, int, tempfile._TemporaryFileWrapper[bytes]]]:
    port = free_port()
    log = tempfile.NamedTemporaryFile()  # noqa: SIM115  # closed below
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "arqonbus_server.gateway", "gateway", "--listen", f"127.0.0.1:{port}", *argv,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=log,
        env={**os.environ, **env}, start_new_session=True,
    )  # fmt: skip
    try:
        yield proc, port, log
    finally:
        await stop_process(proc, 20)
        log.close()


def read_log(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


async def wait_ready(proc: asyncio.subprocess.Process, port: int, log_path: str) -> None:
    async with asyncio.timeout(30 * SEC):
        while await http_status("127.0.0.1", port, "/readyz") != 200:
            if proc.returncode is not None:
                tail = read_log(log_path)[-3000:]
                raise AssertionError(f"gateway exited {proc.returncode}: {tail}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 0.05 * SEC)


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["--auth", "dev", FLAG], {}),
        (["--auth", "dev"], {"ARQONBUS_INSECURE_DEV_AUTH": "true"}),
    ],
    ids=["flag", "env"],
)
async def test_dev_auth_runs_with_the_flag_and_says_so(
    nats_cluster: LocalCluster, argv: list[str], env: dict[str, str]
) -> None:
    async with gateway_process(["--nats", nats_cluster.url_csv, *argv], env) as (proc, port, log):
        await wait_ready(proc, port, log.name)
        assert "INSECURE: dev authentication is on" in read_log(log.name)


async def test_jwt_needs_no_flag(nats_cluster: LocalCluster) -> None:
    env = {"ARQONBUS_JWT_ALGORITHMS": "HS256", "ARQONBUS_JWT_SECRET": secrets.token_urlsafe(48)}
    argv = ["--nats", nats_cluster.url_csv, "--auth", "jwt"]
    async with gateway_process(argv, env) as (proc, port, log):
        await wait_ready(proc, port, log.name)
        assert "INSECURE" not in read_log(log.name)


def test_dev_mesh_passes_the_flag_to_its_gateways() -> None:
    command = gateway_command("nats://127.0.0.1:4222", "127.0.0.1", 8765, "gw0", "dev")
    assert command[command.index("--auth") + 1] == "dev"
    assert FLAG in command


def test_dev_mesh_leaves_auth_to_the_environment_when_it_is_set() -> None:
    assert dev_auth({}) == ("dev", "dev")
    assert dev_auth({"ARQONBUS_AUTH": "apikey,dev"}) == (None, "apikey,dev")
    command = gateway_command("nats://127.0.0.1:4222", "127.0.0.1", 8765, "gw0", None)
    assert "--auth" not in command  # the gateway reads ARQONBUS_AUTH itself
    assert FLAG in command  # dev tokens work when the environment's list includes dev


def test_dev_refuses_listener_tls_it_cannot_probe(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: object
) -> None:
    monkeypatch.setenv("ARQONBUS_TLS_CERT", "/etc/ssl/gw.crt")
    monkeypatch.setenv("ARQONBUS_TLS_KEY", "/etc/ssl/gw.key")
    # Ports that are free: the refusal comes before anything starts.
    argv = ["dev", "--port", str(free_port()), "--nats-port", str(free_port())]
    assert cli_main([*argv, "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unset ARQONBUS_TLS_CERT and ARQONBUS_TLS_KEY" in err
