"""The web dashboard in real headless Chromium, on two gateways over the 3-node cluster.

Debian's ``chromium`` driven by Playwright for Python: never a downloaded browser (``.ci/run``
installs the package when it is missing). The page signs in with a tenant admin's dev token,
sees both gateways, tails a channel while the SDK publishes on the *other* gateway, and
sees the message (with its seq) and the rate move. Without a credential, with a member's,
for another tenant, or from another origin, the dashboard's endpoints refuse.

``ARQONBUS_UPDATE_SCREENSHOTS=1`` also writes docs/images/dashboard.png.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import websockets
from playwright.async_api import Browser, Page, async_playwright, expect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from arqonbus import Client
from arqonbus_server.gateway.app import Gateway
from arqonbus_server.mesh.local import LocalCluster
from arqonbus_server.shared import apikeys
from arqonbus_server.shared.errors import CloseCode
from tests.conftest import GatewayFactory, gateway_url
from tests.integration.test_api_keys import cli, create_key
from tests.timeouts import SEC, eventually

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HEARTBEAT_S = 0.5
WAIT_MS = 15_000 * SEC
DOC_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "images" / "dashboard.png"


def base_url(gateway: Gateway) -> str:
    return f"http://127.0.0.1:{gateway.address[1]}"


async def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """Status and headers of a plain GET (the gateway's HTTP side answers and closes)."""
    host, _, rest = url.removeprefix("http://").partition("/")
    name, _, port = host.partition(":")
    reader, writer = await asyncio.open_connection(name, int(port))
    lines = [f"GET /{rest} HTTP/1.1", f"Host: {host}", "Connection: close"]
    lines += [f"{key}: {value}" for key, value in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    try:
        async with asyncio.timeout(10 * SEC):
            data = await reader.read()
    finally:
        writer.close()
    head = data.decode(errors="replace")
    return int(head.split(" ", 2)[1]), head


async def upgrade_status(url: str, headers: dict[str, str]) -> int:
    """The HTTP status a WebSocket upgrade is refused with (101 if it is accepted)."""
    try:
        async with websockets.connect(url, additional_headers=headers, open_timeout=10 * SEC):
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


def chromium_path() -> str:
    assert Path(CHROMIUM).exists(), "install Debian's chromium: apt-get install -y chromium"
    return CHROMIUM


def keep_screenshot(shot: Path) -> None:
    """Check the artifact; with ARQONBUS_UPDATE_SCREENSHOTS, make it the docs' copy."""
    assert shot.stat().st_size > 10_000
    if os.environ.get("ARQONBUS_UPDATE_SCREENSHOTS"):
        DOC_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, DOC_SCREENSHOT)


@pytest.fixture
async def chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def two_gateways(start_gateway: GatewayFactory) -> tuple[Gateway, Gateway]:
    # A subject prefix of their own: the cluster view lists exactly these two gateways.
    prefix = "db" + uuid.uuid4().hex[:10]
    options = {"subject_prefix": prefix, "heartbeat_interval_s": HEARTBEAT_S}
    return await start_gateway(**options), await start_gateway(**options)


async def test_the_dashboard_refuses_without_an_admin_credential_of_the_tenant(
    two_gateways: tuple[Gateway, Gateway], tenant: str
) -> None:
    gw, _ = two_gateways
    base, ws = base_url(gw), f"ws://127.0.0.1:{gw.address[1]}"
    admin = {"Authorization": f"Bearer dev:{tenant}:ops:admin"}
    # The page is public (it holds no data); the data endpoints are not.
    assert (await http_get(base + "/dashboard"))[0] == 200
    assert (await http_get(base + "/dashboard/login"))[0] == 401
    assert (await http_get(base + "/dashboard/login", {"Authorization": "Bearer nope"}))[0] == 401
    member = {"Authorization": f"Bearer dev:{tenant}:bob:member"}
    assert (await http_get(base + "/dashboard/login", member))[0] == 403
    other_tenant = "x" + uuid.uuid4().hex[:10]
    status, _ = await http_get(base + f"/dashboard/login?tenant={other_tenant}", admin)
    assert status == 403
    status, head = await http_get(base + "/dashboard/login", admin)
    assert status == 200 and "HttpOnly" in head and "SameSite=Strict" in head
    # The WebSockets: no credential, a member, another tenant, another site's page.
    assert await upgrade_status(ws + "/dashboard/feed", {}) == 401
    assert await upgrade_status(ws + "/dashboard/tail", {}) == 401
    assert await upgrade_status(ws + "/dashboard/feed", member) == 403
    assert await upgrade_status(ws + "/dashboard/tail", member) == 403
    assert await upgrade_status(ws + f"/dashboard/feed?tenant={other_tenant}", admin) == 403
    cookie = {"Cookie": f"arqonbus_dashboard=dev:{tenant}:ops", "Origin": "http://evil.example"}
    assert await upgrade_status(ws + "/dashboard/feed", cookie) == 403
    assert await upgrade_status(ws + "/dashboard/feed", admin) == 101


# The msgs/s in shown (all gateways): 0.0 when quiet; 5 or more (one decimal below 100).
QUIET = re.compile(r"^0\.0$")
MOVING = re.compile(r"^(?:[5-9]\.\d|[1-9]\d\.\d|\d{3,})$")


async def wait_for_rate(page: Page, shown: re.Pattern[str]) -> None:
    # A locator assertion, not wait_for_function: the page's CSP forbids evaluating strings.
    await expect(page.locator("#rate-in")).to_have_text(shown, timeout=WAIT_MS)


@contextlib.asynccontextmanager
async def publishing(client: Client) -> AsyncIterator[None]:
    """Publish steadily (acked one by one) until the block ends."""

    async def loop() -> None:
        n = 0
        while True:
            n += 1
            await client.publish("load", "ticks", {"n": n})

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_the_dashboard_shows_the_mesh_and_tails_a_channel_live_in_chromium(
    two_gateways: tuple[Gateway, Gateway], tenant: str, chromium: Browser, tmp_path: Path
) -> None:
    gw1, gw2 = two_gateways
    page = await chromium.new_page(viewport={"width": 1280, "height": 1100})
    await page.goto(base_url(gw1) + "/dashboard")
    await expect(page.locator("#login")).to_be_visible(timeout=WAIT_MS)  # no cookie yet

    await page.fill("#token", f"dev:{tenant}:ops")
    await page.click("#login-form button")
    await expect(page.locator("#whoami")).to_contain_text(f"ops @ {tenant}", timeout=WAIT_MS)
    # The token is in an HttpOnly cookie for /dashboard: scripts cannot read it back.
    [cookie] = await page.context.cookies()
    assert cookie["httpOnly"] and cookie["path"] == "/dashboard"
    assert await page.evaluate("document.cookie") == ""

    gateways = page.locator("#gateways tbody tr")
    await expect(gateways).to_have_count(2, timeout=WAIT_MS)
    for gateway in (gw1, gw2):
        await expect(page.locator("#gateways")).to_contain_text(gateway.node_id)
    await expect(page.locator("#nats tbody tr")).to_have_count(3, timeout=WAIT_MS)

    # The live tail is a subscriber on gw1; the SDK publishes on gw2.
    await page.fill("#tail-room", "science")
    await page.fill("#tail-channel", "general")
    await page.click("#tail-form button")
    await expect(page.locator("#tail-status")).to_contain_text("tailing", timeout=WAIT_MS)
    await expect(page.locator("#channels")).to_contain_text("general", timeout=WAIT_MS)
    await wait_for_rate(page, QUIET)  # quiet: nothing in for a whole interval

    async with Client(gateway_url(gw2), f"dev:{tenant}:alice") as alice:
        ack = await alice.publish("science", "general", {"message": "hello dashboard"})
        other = await alice.publish("science", "general", {"message": "something else"})
        row = page.locator("#tail tbody tr", has_text="hello dashboard")
        await expect(row).to_contain_text(str(ack.seq), timeout=WAIT_MS)
        await expect(row).to_contain_text("alice")
        # The filter hides the rows without the text, and shows them again.
        await page.fill("#tail-filter", "hello")
        await expect(page.locator("#tail tbody tr", has_text="something else")).to_be_hidden()
        await expect(row).to_be_visible()
        await page.fill("#tail-filter", "")
        await expect(page.locator("#tail tbody tr", has_text="something else")).to_be_visible()
        async with publishing(alice):
            await wait_for_rate(page, MOVING)  # the rate moves
        stream = page.locator("#stream")
        await expect(stream).to_contain_text("last seq", timeout=WAIT_MS)
        cell = stream.locator("tr", has_text="last seq").locator("td").nth(1)

        async def refreshed() -> int | None:
            # The stream panel refreshes on its own schedule: wait for one after the publishes.
            seq = int(await cell.inner_text())
            return seq if seq > other.seq else None

        last_seq = await eventually(
            refreshed, WAIT_MS / 1000, "the stream panel past the publishes"
        )
        assert last_seq > other.seq

    # With tracing on, an event carries the W3C context in ``trace``: the tail shows its id.
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent = f"00-{trace_id}-00f067aa0ba902b7-01"
    assert await page.evaluate(f"traceId({{traceparent: '{parent}'}})") == trace_id
    assert await page.evaluate("traceId(undefined)") == ""

    shot = tmp_path / "dashboard.png"
    await page.screenshot(path=str(shot), full_page=True)
    keep_screenshot(shot)

    # Signed out: the cookie is gone and the feed refuses (the login form returns).
    await page.click("#signout")
    await expect(page.locator("#login")).to_be_visible(timeout=WAIT_MS)
    assert await page.context.cookies() == []


async def test_a_revoked_key_closes_its_open_feed_and_cannot_sign_in_again(
    start_gateway: GatewayFactory, nats_cluster: LocalCluster, tenant: str, capsys: Any
) -> None:
    gw = await start_gateway(auth="apikey", heartbeat_interval_s=HEARTBEAT_S)
    key = await create_key(capsys, nats_cluster, tenant, "ops", "admin")
    feed_url = f"ws://127.0.0.1:{gw.address[1]}/dashboard/feed"
    auth = {"Authorization": f"Bearer {key}"}
    async with websockets.connect(feed_url, additional_headers=auth) as feed:
        snapshot = orjson.loads(await asyncio.wait_for(feed.recv(), 10 * SEC))
        assert snapshot["type"] == "snapshot" and snapshot["tenant"] == tenant
        assert snapshot["stream"] == {"messages": 0, "bytes": 0, "first_seq": 0, "last_seq": 0}
        key_id = apikeys.parse_key(key).key_id
        code, _, err = await cli(
            capsys, "keys", "revoke", "--tenant", tenant, key_id, "--nats", nats_cluster.url_csv
        )
        assert code == 0, err
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(10 * SEC):
                while True:
                    await feed.recv()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == CloseCode.CREDENTIAL_REVOKED
    assert await upgrade_status(feed_url, auth) == 401
