"""Gateway -> NATS credentials and TLS against real nats-server processes that require them.

Each test starts its own single nats-server (LocalCluster with an ``authorization`` or ``tls``
block) and in-process gateways configured through ``ARQONBUS_NATS_*`` settings. A gateway
with the right credentials becomes ready and carries messages; with wrong ones it never
becomes ready and logs why, without the secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import nkeys
import pytest
from nats.aio.client import Client as NatsClient

from arqonbus_server.gateway.admin.dev import http_status
from arqonbus_server.gateway.app import Gateway
from arqonbus_server.gateway.config import load_settings
from arqonbus_server.mesh.local import LocalCluster
from arqonbus_server.mesh.nats_auth import connect_options
from arqonbus_server.shared.settings import ConfigError
from tests.integration.test_origin_tls import make_cert
from tests.support import WsClient
from tests.timeouts import SEC

pytestmark = pytest.mark.integration

JETSTREAM_LOG = "arqonbus.mesh.jetstream"


class LogWatch(logging.Handler):
    """Keeps every record of a logger (DEBUG up) and wakes waiters when one matches."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.since = 0  # wait_for looks at lines from here on
        self._changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        self.lines.append(text)
        self._changed.set()

    async def wait_for(self, needle: str, timeout: float = 20.0) -> str:
        async with asyncio.timeout(timeout):
            while True:
                for line in self.lines[self.since :]:
                    if needle.lower() in line.lower():
                        return line
                self._changed.clear()
                await self._changed.wait()

    def mark(self) -> None:
        """Later waits see only what is logged from now on."""
        self.since = len(self.lines)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def broker_log() -> Any:
    logger = logging.getLogger(JETSTREAM_LOG)
    watch, level = LogWatch(), logger.level
    logger.addHandler(watch)
    logger.setLevel(logging.DEBUG)
    _WATCHES.append(watch)
    try:
        yield watch
    finally:
        _WATCHES.remove(watch)
        logger.removeHandler(watch)
        logger.setLevel(level)


@contextlib.asynccontextmanager
async def nats_server(
    base: Path, extra_config: str, options: dict[str, Any]
) -> AsyncIterator[LocalCluster]:
    """One nats-server with ``extra_config``; its readiness probe connects with ``options``."""
    cluster = LocalCluster(base, nodes=1, extra_config=extra_config, connect_options=options)
    await cluster.start(timeout=30 * SEC)
    try:
        yield cluster
    finally:
        await cluster.stop()


_WATCHES: list[LogWatch] = []


@contextlib.asynccontextmanager
async def gateway(url: str, **nats_settings: Any) -> AsyncIterator[Gateway]:
    """An in-process gateway (dev client auth) dialing ``url`` with ``nats_settings``."""
    for watch in _WATCHES:
        watch.mark()
    settings = load_settings(
        nats=url, listen="127.0.0.1:0", auth="dev", health_interval_s=0.5, **nats_settings
    )
    gw = Gateway(settings)
    await gw.start()
    try:
        yield gw
    finally:
        await gw.close()


async def readyz(gw: Gateway) -> int | None:
    return await http_status("127.0.0.1", gw.address[1], "/readyz")


async def assert_carries_messages(gw: Gateway) -> None:
    await gw.wait_ready(30)
    assert await readyz(gw) == 200
    tenant = "t" + secrets.token_hex(6)
    url = f"ws://127.0.0.1:{gw.address[1]}/ws"
    alice = await WsClient.connect(url, tenant, "alice")
    bob = await WsClient.connect(url, tenant, "bob")
    try:
        await bob.join("r", "c")
        await alice.publish("r", "c", {"n": 1})
        [event] = await bob.wait_events(1)
        assert event["payload"] == {"n": 1}
    finally:
        await alice.close()
        await bob.close()


async def assert_refused(gw: Gateway, log: LogWatch, needle: str) -> str:
    """The gateway logs ``needle`` (why it cannot connect) and is not ready."""
    line = await log.wait_for(needle)  # logged since this gateway started (see gateway())
    assert not gw.ready
    assert await readyz(gw) == 503
    return line


async def assert_nats_refuses_anonymous(url: str) -> None:
    """The server really requires credentials: a client without them is turned away."""
    nc = NatsClient()
    try:
        with pytest.raises(nats.errors.Error, match=r"(?i)authorization"):
            await nc.connect(url, allow_reconnect=False, connect_timeout=2)
    finally:
        async with asyncio.timeout(5 * SEC):
            await nc.close()  # nats-py leaves the refused socket open otherwise


# -- user / password --------------------------------------------------------------------


async def test_user_password(tmp_path: Path, broker_log: LogWatch) -> None:
    password, wrong = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    config = f'authorization {{ users = [{{user: "gw", password: "{password}"}}] }}'
    async with nats_server(tmp_path, config, {"user": "gw", "password": password}) as server:
        url = server.urls[0]
        await assert_nats_refuses_anonymous(url)

        async with gateway(url, nats_user="gw", nats_password=password) as gw:
            await assert_carries_messages(gw)

        async with gateway(url, nats_user="gw", nats_password=wrong) as gw:
            line = await assert_refused(gw, broker_log, "refused the credentials")
            assert "ARQONBUS_NATS_PASSWORD" in line  # says what to check

        async with gateway(url) as gw:  # no credentials at all
            await assert_refused(gw, broker_log, "refused the credentials")

    assert password not in broker_log.text
    assert wrong not in broker_log.text


async def test_token(tmp_path: Path, broker_log: LogWatch) -> None:
    token = secrets.token_urlsafe(24)
    async with nats_server(
        tmp_path, f'authorization {{ token: "{token}" }}', {"token": token}
    ) as server:
        async with gateway(server.urls[0], nats_token=token) as gw:
            await assert_carries_messages(gw)
        async with gateway(server.urls[0], nats_token=token + "x") as gw:
            await assert_refused(gw, broker_log, "refused the credentials")
    assert token not in broker_log.text


# -- nkey -------------------------------------------------------------------------------


def user_nkey(directory: Path, name: str) -> tuple[Path, str]:
    """A new user nkey: (seed file, public key U...)."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    keypair = nkeys.from_seed(bytearray(seed))
    public = keypair.public_key.decode()
    seed_file = directory / f"{name}.nk"
    seed_file.write_bytes(seed + b"\n")
    seed_file.chmod(0o600)
    return seed_file, public


async def test_nkey(tmp_path: Path, broker_log: LogWatch) -> None:
    seed_file, public = user_nkey(tmp_path, "gw")
    other_seed, _ = user_nkey(tmp_path, "stranger")
    config = f'authorization {{ users = [{{nkey: "{public}"}}] }}'
    async with nats_server(tmp_path / "nats", config, {"nkeys_seed": str(seed_file)}) as server:
        url = server.urls[0]
        await assert_nats_refuses_anonymous(url)
        async with gateway(url, nats_nkey_seed_file=str(seed_file)) as gw:
            await assert_carries_messages(gw)
        async with gateway(url, nats_nkey_seed_file=str(other_seed)) as gw:
            await assert_refused(gw, broker_log, "refused the credentials")
    for path in (seed_file, other_seed):
        assert path.read_text().strip() not in broker_log.text


# -- TLS (server verified by our CA; mutual TLS with a client certificate) -------------------


def client_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(cert), str(key))
    return context


async def test_tls_and_mutual_tls(tmp_path: Path, broker_log: LogWatch) -> None:
    server_cert, server_key = make_cert(tmp_path, "nats-server")
    client_cert, client_key = make_cert(tmp_path, "gateway-client")  # self-signed: its own CA
    config = (
        "tls {\n"
        f'  cert_file: "{server_cert}"\n  key_file: "{server_key}"\n'
        f'  ca_file: "{client_cert}"\n  verify: true\n'
        "}"
    )
    probe = {"tls": client_context(server_cert, client_cert, client_key)}
    async with nats_server(tmp_path / "nats", config, probe) as server:
        url = server.urls[0]
        client = {"nats_tls_cert": str(client_cert), "nats_tls_key": str(client_key)}

        async with gateway(url, nats_tls_ca=str(server_cert), **client) as gw:
            await assert_carries_messages(gw)

        # Without our CA the server's certificate is not trusted.
        async with gateway(url, **client) as gw:
            line = await assert_refused(gw, broker_log, "TLS to NATS failed")
            assert "ARQONBUS_NATS_TLS_CA" in line

        # With the CA but no client certificate the server refuses (mutual TLS).
        async with gateway(url, nats_tls_ca=str(server_cert)) as gw:
            await assert_refused(gw, broker_log, "TLS to NATS failed")
            assert not gw.broker.connected


# -- settings ---------------------------------------------------------------------------


def test_settings_errors_name_the_variable_never_the_secret(tmp_path: Path) -> None:
    secret = secrets.token_urlsafe(16)
    cases = {
        "ARQONBUS_NATS_USER needs ARQONBUS_NATS_PASSWORD": {"nats_user": "gw"},
        "ARQONBUS_NATS_PASSWORD needs ARQONBUS_NATS_USER": {"nats_password": secret},
        "at most one NATS credential": {
            "nats_user": "gw",
            "nats_password": secret,
            "nats_token": secret,
        },
        "ARQONBUS_NATS_NKEY_SEED_FILE=/nonexistent/seed is not a readable file": {
            "nats_nkey_seed_file": "/nonexistent/seed"
        },
        "ARQONBUS_NATS_TLS_KEY too": {"nats_tls_cert": str(make_cert(tmp_path, "c")[0])},
        "credentials in a URL": {"nats": f"nats://gw:{secret}@127.0.0.1:4222"},
    }
    for expected, overrides in cases.items():
        with pytest.raises(ConfigError) as refused:
            load_settings(auth="dev", **overrides)
        assert expected in str(refused.value), (expected, str(refused.value))
        assert secret not in str(refused.value)

    bad_seed = tmp_path / "bad.nk"
    bad_seed.write_text("SUnotaseed\n")
    with pytest.raises(ConfigError, match="invalid nkey seed"):
        load_settings(auth="dev", nats_nkey_seed_file=str(bad_seed))
    not_creds = tmp_path / "user.creds"
    not_creds.write_text("hello\n")
    with pytest.raises(ConfigError, match=r"not a NATS \.creds file"):
        load_settings(auth="dev", nats_creds_file=str(not_creds))
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="ARQONBUS_NATS_TLS_CA"):
        connect_options(load_settings(auth="dev", nats_tls_ca=str(not_pem)))


def test_creds_file_is_passed_to_nats_py(tmp_path: Path) -> None:
    """Decentralized (operator/account JWT) auth is not run here; the path is handed on."""
    creds = tmp_path / "gw.creds"
    creds.write_text(
        "-----BEGIN NATS USER JWT-----\neyJ0eXAi.e30.sig\n------END NATS USER JWT------\n\n"
        "-----BEGIN USER NKEY SEED-----\nSUAFAKE\n------END USER NKEY SEED------\n"
    )
    options = connect_options(load_settings(auth="dev", nats_creds_file=str(creds)))
    assert options == {"user_credentials": str(creds)}


async def test_a_server_that_does_not_switch_to_tls_is_refused(
    nats_cluster: LocalCluster, tmp_path: Path
) -> None:
    # nats-py upgrades to TLS only when the server's INFO asks: a plaintext server (or a man
    # in the middle that strips the flag) must not get a TLS-configured gateway's traffic.
    from arqonbus_server.mesh.broker import BrokerUnavailable
    from arqonbus_server.mesh.jetstream import broker_from_settings

    ca, _ = make_cert(tmp_path, "nats-ca")
    settings = load_settings(
        nats=nats_cluster.url_csv, listen="127.0.0.1:0", auth="dev", nats_tls_ca=str(ca)
    )
    broker = broker_from_settings(settings, "downgrade-test")  # TLS, as configured
    with pytest.raises(BrokerUnavailable, match="did not switch to TLS"):
        await broker.connect()
    await broker.close()
