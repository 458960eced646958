"""The browser chat (/demo/chat, on the JavaScript SDK) in real headless Chromium.

Two pages on two gateways (child processes over the 3-node cluster) chat in one room. The
test takes the first page's browser offline and SIGKILLs its gateway while the other page
keeps sending: the page shows that it is resuming, and once back online resumes on the
other gateway, replays what it missed and sends the line typed meanwhile. In the end both
pages show every line exactly once, in seq order, the same lines as the store's history.

Debian's ``chromium`` driven by Playwright for Python: never a downloaded browser.
The screenshot is kept as .build/test-artifacts/chat.png; ``ARQONBUS_UPDATE_SCREENSHOTS=1``
also writes docs/images/chat.png (the README's picture).
"""

from __future__ import annotations

import os
import shutil
import signal
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, expect

from arqonbus import Client
from arqonbus_server.gateway.admin.dev import http_status
from arqonbus_server.mesh.local import LocalCluster
from tests.integration.test_api_keys import create_key
from tests.integration.test_dashboard import chromium  # noqa: F401  # the browser fixture
from tests.support import GatewayProcess
from tests.timeouts import SEC

WAIT_MS = 30_000 * SEC
REPO = Path(__file__).resolve().parents[2]
DOC_SCREENSHOT = REPO / "docs" / "images" / "chat.png"
ARTIFACTS = REPO / ".build" / "test-artifacts"
DEMO_ENV = {"ARQONBUS_DEMO_PAGES": "true"}
BEFORE_KILL, AFTER_KILL = 12, 24  # lines page B sends before and after the kill


def page_url(gateway: GatewayProcess, failover: list[GatewayProcess], room: str) -> str:
    urls = ",".join(g.url for g in failover)
    return f"http://127.0.0.1:{gateway.port}/demo/chat?gateways={urls}&room={room}"


async def sign_in(page: Page, url: str, token: str, auth: str) -> None:
    await page.goto(url)
    await page.fill("#token", token)
    await page.select_option("#auth", auth)
    await page.click("#signin button")
    await expect(page.locator("#chat")).to_be_visible(timeout=WAIT_MS)
    await expect(page.locator("#state")).to_have_attribute("data-state", "connected")


async def say(page: Page, text: str) -> None:
    await page.fill("#text", text)
    await page.press("#text", "Enter")


async def shown(page: Page) -> list[dict[str, Any]]:
    """The lines the page shows: seq, id, sender and text."""
    rows: list[dict[str, Any]] = await page.locator("#lines li[data-seq]").evaluate_all(
        """rows => rows.map(li => ({seq: Number(li.dataset.seq), id: li.dataset.id,
            from: li.querySelector('.from').textContent,
            text: li.querySelector('.text').textContent}))"""
    )
    return rows


async def stored(url: str, tenant: str, room: str) -> list[dict[str, Any]]:
    async with Client(url, f"dev:{tenant}:auditor") as client:
        events = [e async for e in client.history(room, "general", limit=None)]
    return [{"seq": e.seq, "id": e.id, "from": e.from_, "text": e.payload["text"]} for e in events]


async def test_two_pages_chat_and_one_resumes_on_the_other_gateway_after_a_sigkill(
    nats_cluster: LocalCluster,
    gateway_processes: Callable[..., Awaitable[GatewayProcess]],
    chromium: Browser,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    tenant, room = "t" + uuid.uuid4().hex[:10], "lobby"
    # Alice signs in with an API key in the subprotocol, Bob with a dev token in a first
    # ``auth`` frame (a dev token's colons are not allowed in a subprotocol).
    alice_key = await create_key(capsys, nats_cluster, tenant, "alice")
    gw0 = await gateway_processes(nats_cluster.url_csv, env=DEMO_ENV, auth="dev,apikey")
    gw1 = await gateway_processes(nats_cluster.url_csv, env=DEMO_ENV, auth="dev,apikey")
    async with Client(gw1.url, f"dev:{tenant}:bot") as bot:  # the room's earlier history
        for n in range(3):
            await bot.publish(room, "general", {"text": f"earlier {n}"})

    alice = await chromium.new_page(viewport={"width": 1100, "height": 760})
    bob = await chromium.new_page(viewport={"width": 1100, "height": 760})
    await sign_in(alice, page_url(gw0, [gw0, gw1], room), alice_key, auth="subprotocol")
    await sign_in(bob, page_url(gw1, [gw1], room), f"dev:{tenant}:bob", auth="first-message")
    await expect(alice.locator("#state")).to_contain_text(gw0.url)
    for page in (alice, bob):  # history first, then each sees the other present
        await expect(page.locator("#lines li[data-seq]")).to_have_count(3, timeout=WAIT_MS)
        await expect(page.locator("#members li[data-principal=alice]")).to_have_count(1)
        await expect(page.locator("#members li[data-principal=bob]")).to_have_count(1)

    await say(alice, "hello from alice before the kill")
    for n in range(BEFORE_KILL):
        await say(bob, f"bob {n}")
    await expect(alice.locator("#lines li[data-seq]")).to_have_count(
        3 + 1 + BEFORE_KILL, timeout=WAIT_MS
    )

    # Alice's browser goes offline and her gateway dies: she cannot come back until bob's
    # next lines are stored, so her page must replay them when it resumes.
    await alice.context.set_offline(True)
    gw0.signal(signal.SIGKILL)
    await gw0.wait_exit(10 * SEC)
    await expect(alice.locator("#state")).to_have_attribute("data-state", "resuming")
    await say(alice, "alice while her gateway is gone")  # sent with its id once resumed
    for n in range(BEFORE_KILL, BEFORE_KILL + AFTER_KILL):
        await say(bob, f"bob {n}")
    total = 3 + 2 + BEFORE_KILL + AFTER_KILL
    await expect(bob.locator("#lines li[data-seq]")).to_have_count(total - 1, timeout=WAIT_MS)
    await expect(alice.locator("#state")).to_have_attribute("data-state", "resuming")
    await expect(alice.locator("#lines li[data-seq]")).to_have_count(3 + 1 + BEFORE_KILL)
    await alice.context.set_offline(False)

    for page in (alice, bob):
        await expect(page.locator("#lines li[data-seq]")).to_have_count(total, timeout=WAIT_MS)
        await expect(page.locator("#pending")).to_have_text("", timeout=WAIT_MS)
    await expect(alice.locator("#state")).to_have_attribute("data-state", "connected")
    await expect(alice.locator("#state")).to_contain_text(gw1.url)
    states = [s["state"] for s in await alice.evaluate("window.arqonbusChat.states")]
    assert "resuming" in states and states[-1] == "connected", states
    assert states.index("resuming") > states.index("connected"), states

    history = await stored(gw1.url, tenant, room)
    assert len(history) == total and len({e["id"] for e in history}) == total
    assert [e["seq"] for e in history] == sorted(e["seq"] for e in history)
    for page in (alice, bob):
        assert await shown(page) == history  # every line once, in order, as stored
    texts = [e["text"] for e in history]
    # Typed while offline: stored only once she was back, after every line of bob's.
    assert texts.count("alice while her gateway is gone") == 1
    assert texts[-1] == "alice while her gateway is gone", texts
    assert [t for t in texts if t.startswith("bob ")] == [
        f"bob {n}" for n in range(BEFORE_KILL + AFTER_KILL)
    ]
    assert await alice.locator(".error").all_text_contents() == ["", ""]

    # The page says what happened, between the lines it showed before and after.
    notices = alice.locator("#lines li.notice")
    await expect(notices).to_have_count(2)
    lost, resumed = await notices.all_text_contents()
    assert lost.startswith(f"connection to {gw0.url} lost after #"), lost
    assert resumed.startswith(f"resumed on {gw1.url} after #"), resumed
    await notices.first.scroll_into_view_if_needed()

    shot = ARTIFACTS / "chat.png"  # the test's artifact, kept after the run
    shot.parent.mkdir(parents=True, exist_ok=True)
    await alice.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("ARQONBUS_UPDATE_SCREENSHOTS"):
        DOC_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, DOC_SCREENSHOT)


async def test_the_page_connects_only_to_gateways_on_its_own_host(
    nats_cluster: LocalCluster,
    gateway_processes: Callable[..., Awaitable[GatewayProcess]],
    chromium: Browser,  # noqa: F811
) -> None:
    gw = await gateway_processes(nats_cluster.url_csv, env=DEMO_ENV)
    page = await chromium.new_page()
    # A link that lists someone else's server: the token typed must never go there.
    await page.goto(
        f"http://127.0.0.1:{gw.port}/demo/chat?gateways=ws://evil.example:80/ws,{gw.url}"
    )
    await expect(page.locator("#gateways")).to_have_text(gw.url)
    await expect(page.locator("#signin-error")).to_contain_text("ws://evil.example:80/ws")


async def test_the_demo_is_served_only_when_turned_on(
    nats_cluster: LocalCluster, gateway_processes: Callable[..., Awaitable[GatewayProcess]]
) -> None:
    on = await gateway_processes(nats_cluster.url_csv, env=DEMO_ENV)
    off = await gateway_processes(nats_cluster.url_csv)
    for path in ("/demo/chat", "/demo/chat.js", "/demo/chat.css", "/demo/arqonbus.min.js"):
        assert await http_status("127.0.0.1", on.port, path) == 200, path
        assert await http_status("127.0.0.1", off.port, path) == 404, path
    assert await http_status("127.0.0.1", on.port, "/demo/nope.js") == 404
