"""HTTP refusals of the WebSocket handshake: the SDK and ``arq`` give the gateway's own reason.

A gateway answers 503 while it starts (security state not loaded, e.g. no NATS yet), while it
drains and while it is cut off from NATS. Each body says which; "draining" is only one of them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import orjson
import pytest
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus
from websockets.http11 import Response

from arqonbus import Client, ConnectionFailed
from arqonbus.client import _describe, _refusal
from arqonbus.errors import HandshakeRefusal
from arqonbus_server.gateway.app import Gateway
from arqonbus_server.gateway.config import load_settings
from arqonbus_server.mesh.local import free_port
from tests.conftest import gateway_url
from tests.sdk.test_cli import arq
from tests.timeouts import SEC

STARTING = (
    "starting: the security state is not loaded yet; retry shortly or connect to another gateway"
)

CUT_OFF = "this gateway cannot reach the message store; connect to another gateway"


def refused(status: int, body: bytes) -> InvalidStatus:
    return InvalidStatus(Response(status, "Refused", Headers(), body))


def as_json(body: dict[str, object]) -> bytes:
    return orjson.dumps(body)


@pytest.mark.parametrize(
    ("body", "code", "message", "described"),
    [
        # The gateway's four 503 bodies (docs/protocol.md, "A /ws handshake is checked ...").
        (
            as_json({"error": "draining: connect to another gateway"}),
            "draining",
            "connect to another gateway",
            "HTTP 503 (draining): connect to another gateway",
        ),
        (
            as_json({"error": f"unavailable: {CUT_OFF}"}),
            "unavailable",
            CUT_OFF,
            f"HTTP 503 (unavailable): {CUT_OFF}",
        ),
        (
            as_json({"error": "unavailable", "message": STARTING}),
            "unavailable",
            STARTING,
            f"HTTP 503 (unavailable): {STARTING}",
        ),
        (
            as_json({"error": "unavailable", "message": "the API keys have not loaded yet"}),
            "unavailable",
            "the API keys have not loaded yet",
            "HTTP 503 (unavailable): the API keys have not loaded yet",
        ),
        # Nothing to go by: a generic reason, never a guess.
        (b"", "", "", "HTTP 503: the gateway cannot take connections now (it gave no reason)"),
        (
            b"[1, 2]",
            "",
            "",
            "HTTP 503: the gateway cannot take connections now (it gave no reason)",
        ),
        (as_json({"error": "unavailable"}), "unavailable", "", "HTTP 503 (unavailable)"),
        # A proxy's text, and a free-text error that is not a code.
        (
            b"Service Unavailable\r\n",
            "",
            "Service Unavailable",
            "HTTP 503: Service Unavailable",
        ),
        (
            as_json({"error": "back end down", "message": "try later"}),
            "",
            "back end down: try later",
            "HTTP 503: back end down: try later",
        ),
        # Server text stays on one line.
        (
            as_json({"error": "unavailable", "message": "line one\nline two\x1b[31m"}),
            "unavailable",
            "line one line two [31m",
            "HTTP 503 (unavailable): line one line two [31m",
        ),
    ],
)
def test_a_503_body_gives_the_gateways_code_and_message(
    body: bytes, code: str, message: str, described: str
) -> None:
    exc = refused(503, body)
    assert _refusal(exc) == HandshakeRefusal(503, code, message)
    assert _describe(exc) == described
    assert "draining" not in described or code == "draining"


def test_a_long_reason_is_cut() -> None:
    refusal = _refusal(refused(503, as_json({"error": "unavailable", "message": "x" * 5000})))
    assert refusal.code == "unavailable"
    assert 100 < len(refusal.message) <= 300 and refusal.message.endswith("...")


@asynccontextmanager
async def gateway_without_nats() -> AsyncIterator[Gateway]:
    """A gateway whose NATS does not answer: it listens, but refuses handshakes (starting)."""
    gateway = Gateway(
        load_settings(nats=f"nats://127.0.0.1:{free_port()}", listen="127.0.0.1:0", auth="dev")
    )
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.close()


@pytest.mark.integration
async def test_the_sdk_error_gives_the_503_reason_of_a_gateway_without_nats() -> None:
    async with gateway_without_nats() as gateway:
        url = gateway_url(gateway)
        client = Client(url, "dev:t:a", connect_timeout=5 * SEC, max_backoff=0.2)
        with pytest.raises(ConnectionFailed) as failed:
            await client.connect()
        await client.close()

    error = failed.value
    assert f"{url}: HTTP 503 (unavailable): {STARTING}" in str(error), str(error)
    assert "draining" not in str(error)
    assert error.retryable  # as before: 503 means retry, here or elsewhere
    assert error.refusals == {url: HandshakeRefusal(503, "unavailable", STARTING)}


@pytest.mark.integration
async def test_a_draining_gateway_is_still_reported_as_draining(start_gateway) -> None:
    gateway = await start_gateway()
    url = gateway_url(gateway)
    # What drain() does first; drain() itself would also close the listener.
    gateway.draining = True
    client = Client(url, "dev:t:a", connect_timeout=5 * SEC, max_backoff=0.2)
    with pytest.raises(ConnectionFailed) as failed:
        await client.connect()
    await client.close()

    assert f"{url}: HTTP 503 (draining): connect to another gateway" in str(failed.value)
    assert failed.value.refusals[url].code == "draining"


@pytest.mark.integration
async def test_arq_prints_the_503_reason_of_a_gateway_without_nats() -> None:
    async with gateway_without_nats() as gateway:
        url = gateway_url(gateway)
        run = await arq(
            "cmd", "r", "c", "status", "--connect-timeout", "0.5", url=url, token="dev:t:a"
        )

    assert run.code == 3 and run.out == []
    assert run.err == (
        f"arq: cannot reach any gateway ({url}: HTTP 503 (unavailable): {STARTING}). "
        "Retry shortly, or pass --url with another gateway.\n"
    )
    assert "draining" not in run.err and "Is the mesh running" not in run.err
