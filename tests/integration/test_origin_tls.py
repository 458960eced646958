"""Listener security against a real in-process gateway: the Origin allowlist (403 before the
upgrade), TLS on the listener (wss://), and the idle timeout (close 4003).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import ssl
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
import websockets
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.exceptions import InvalidStatus

from arqonbus_server.gateway.admin.cli import main as cli_main
from arqonbus_server.gateway.app import Gateway, listen_options
from arqonbus_server.gateway.config import load_settings
from arqonbus_server.shared.errors import CloseCode
from arqonbus_server.shared.settings import ConfigError
from tests.conftest import GatewayFactory, gateway_url
from tests.support import WsClient
from tests.timeouts import SEC

pytestmark = pytest.mark.integration

APP = "https://app.example.com"


async def refused_status(url: str, **kwargs: object) -> tuple[int, dict[str, object]]:
    with pytest.raises(InvalidStatus) as refused:
        ws = await websockets.connect(url, **kwargs)  # type: ignore[arg-type]
        await ws.close()
    response = refused.value.response
    return response.status_code, orjson.loads(response.body or b"{}")


# -- Origin allowlist -------------------------------------------------------------------


async def test_wrong_origin_gets_403_and_allowed_ones_upgrade(
    start_gateway: GatewayFactory, tenant: str
) -> None:
    gateway = await start_gateway(allowed_origins=f"{APP}, *.trusted.test")
    url = gateway_url(gateway)
    token = f"?token=dev:{tenant}:alice"

    for bad in ("https://evil.test", "http://app.example.com", "null", f"{APP}.evil.test"):
        status, body = await refused_status(url + token, origin=bad)
        assert status == 403, bad
        assert body["error"] == "forbidden_origin"
        assert "ARQONBUS_ALLOWED_ORIGINS" in str(body["message"])
        assert bad in str(body["message"])

    for good in (APP, "https://ui.trusted.test"):
        client = await WsClient.connect(url, tenant, "alice", origin=good)
        try:
            assert client.welcome is not None
        finally:
            await client.close()
    # A non-browser client sends no Origin: allowed unless require_origin.
    client = await WsClient.connect(url, tenant, "bob")
    await client.close()
    # The check is for /ws only: health probes carry no Origin and are never refused.
    async with asyncio.timeout(5 * SEC):
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.address[1])
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nOrigin: https://evil.test\r\n\r\n")
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        writer.close()


async def test_require_origin_refuses_handshakes_without_one(
    start_gateway: GatewayFactory, tenant: str
) -> None:
    gateway = await start_gateway(allowed_origins=APP, require_origin=True)
    url = f"{gateway_url(gateway)}?token=dev:{tenant}:alice"
    status, body = await refused_status(url)
    assert status == 403
    assert body["error"] == "forbidden_origin"
    assert "no Origin header" in str(body["message"])
    client = await WsClient.connect(gateway_url(gateway), tenant, "alice", origin=APP)
    await client.close()


def test_malformed_allowlist_stops_the_gateway_at_start() -> None:
    settings = load_settings(auth="dev", allowed_origins="app.example.com")
    with pytest.raises(ConfigError, match=r"ARQONBUS_ALLOWED_ORIGINS.*'app\.example\.com'"):
        Gateway(settings)
    with pytest.raises(ConfigError, match="ARQONBUS_REQUIRE_ORIGIN needs"):
        load_settings(auth="dev", require_origin=True)


# -- TLS --------------------------------------------------------------------------------


def make_cert(directory: Path, name: str = "gw") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / f"{name}.crt", directory / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def trusting(cert_file: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert_file))


async def test_wss_clients_publish_and_receive(
    start_gateway: GatewayFactory, tenant: str, tmp_path: Path
) -> None:
    cert, key = make_cert(tmp_path)
    gateway = await start_gateway(tls_cert=str(cert), tls_key=str(key))
    assert gateway.listener.scheme == "wss"
    url = f"wss://127.0.0.1:{gateway.address[1]}/ws"
    alice = await WsClient.connect(url, tenant, "alice", ssl=trusting(cert))
    bob = await WsClient.connect(url, tenant, "bob", ssl=trusting(cert))
    try:
        assert alice.ws.transport.get_extra_info("ssl_object") is not None
        await alice.join("chat", "general")
        await bob.join("chat", "general")
        # Frames are pre-built and written straight to the (TLS) transport, coalesced per
        # loop turn: many events at once, some larger than one TLS record (16 KiB).
        big = "x" * 40_000
        acks = await asyncio.gather(
            *(bob.publish("chat", "general", {"n": i, "pad": big if i % 10 == 0 else ""})
              for i in range(50))
        )  # fmt: skip
        assert all(a["type"] == "ack" for a in acks), acks[:3]
        events = await alice.wait_events(50, "chat", "general")
        assert sorted(e["payload"]["n"] for e in events) == list(range(50))
        assert all(
            len(e["payload"]["pad"]) == 40_000 for e in events if e["payload"]["n"] % 10 == 0
        )
        assert len(await bob.wait_events(50, "chat", "general")) == 50
    finally:
        await alice.close()
        await bob.close()


async def test_plain_ws_client_to_tls_listener_fails_cleanly(
    start_gateway: GatewayFactory, tenant: str, tmp_path: Path
) -> None:
    cert, key = make_cert(tmp_path)
    gateway = await start_gateway(tls_cert=str(cert), tls_key=str(key))
    port = gateway.address[1]
    # Far below the 10 s open timeout: the TLS layer rejects the plain HTTP bytes at once.
    async with asyncio.timeout(5 * SEC):
        with pytest.raises((websockets.exceptions.InvalidMessage, OSError, EOFError)):
            await websockets.connect(f"ws://127.0.0.1:{port}/ws?token=dev:{tenant}:alice")
        # A client that does not trust the certificate is refused by its own TLS check.
        with pytest.raises(ssl.SSLCertVerificationError):
            await websockets.connect(
                f"wss://127.0.0.1:{port}/ws?token=dev:{tenant}:alice",
                ssl=ssl.create_default_context(),
            )
    # The listener is unharmed.
    client = await WsClient.connect(
        f"wss://127.0.0.1:{port}/ws", tenant, "alice", ssl=trusting(cert)
    )
    assert client.welcome is not None
    await client.close()


def test_tls_settings_errors_name_the_setting_or_file(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    other_cert, other_key = make_cert(tmp_path, "other")
    with pytest.raises(ConfigError, match="ARQONBUS_TLS_KEY"):
        load_settings(tls_cert=str(cert))
    with pytest.raises(ConfigError, match="ARQONBUS_TLS_CERT"):
        load_settings(tls_key=str(key))

    def options(cert_file: Path, key_file: Path) -> object:
        settings = load_settings(tls_cert=str(cert_file), tls_key=str(key_file))
        return listen_options(settings, "127.0.0.1", 0)

    missing = tmp_path / "missing.crt"
    with pytest.raises(
        ConfigError, match=re.escape(f"certificate file '{missing}'") + ".*--tls-cert"
    ):
        options(missing, key)
    with pytest.raises(
        ConfigError, match=re.escape(f"key file '{tmp_path / 'nope.key'}'") + ".*--tls-key"
    ):
        options(cert, tmp_path / "nope.key")
    with pytest.raises(ConfigError, match="must belong to the certificate"):
        options(cert, other_key)
    with pytest.raises(ConfigError, match="must be PEM"):
        options(key, key)  # a key where the certificate should be
    encrypted = tmp_path / "encrypted.key"
    private = serialization.load_pem_private_key(other_key.read_bytes(), None)
    encrypted.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(ConfigError, match="is encrypted"):
        options(other_cert, encrypted)
    assert options(cert, key) is not None


def test_cli_refuses_a_certificate_without_its_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cert, _ = make_cert(tmp_path)
    assert cli_main(["gateway", "--auth", "dev", "--tls-cert", str(cert)]) == 2
    assert "ARQONBUS_TLS_KEY (--tls-key)" in capsys.readouterr().err


# -- idle timeout -----------------------------------------------------------------------


async def test_idle_connection_is_closed_4003_and_a_busy_one_is_not(
    start_gateway: GatewayFactory, tenant: str
) -> None:
    # Pings every 0.1 s are answered by the client's library: they do not keep it open.
    gateway = await start_gateway(idle_timeout_s=0.6, ping_interval_s=0.1)
    url = gateway_url(gateway)
    idle = await WsClient.connect(url, tenant, "idle")
    busy = await WsClient.connect(url, tenant, "busy")
    opened = time.monotonic()
    sent = 0
    # The busy client sends a frame (an invalid envelope, answered without NATS) and waits
    # for its answer, again and again, until the idle one is closed.
    async with asyncio.timeout(10 * SEC):
        while not idle.closed.is_set():
            start = len(busy.received)
            await busy.send("{}")
            await busy.wait_for(lambda m: m["type"] == "error", start=start)
            sent += 1
    elapsed = time.monotonic() - opened
    assert idle.close_code == CloseCode.IDLE_TIMEOUT == 4003
    assert idle.ws.close_reason is not None and "idle timeout" in idle.ws.close_reason
    assert elapsed >= 0.5, elapsed  # not before the timeout (minus the connect of busy)
    assert sent > 0 and not busy.closed.is_set()
    await busy.close()
    await idle.close()
