"""Presence at scale (issue 16): one channel, N present members over 2 gateways.

Part of ``make bench`` / ``make bench-smoke`` (bench/run.py calls :func:`presence_section`);
on its own: ``python -m bench.presence [--members 10000] [--smoke]`` starts a 3-node cluster
and writes ``bench/results/<date>-presence.json``.

Two gateway processes of their own on the run's cluster (clean RSS); N members, each its own
principal (``m000000`` ...) and WebSocket session, opened by member processes
(bench/presence_client.py, 127.0.0.10+, under the 20,000 open-files limit) and spread over
both gateways. Watchers (``presence_events``) and queriers run in this process on 127.0.0.1.
Phases, each waiting on replies and frames with timeouts, never on sleeps:

1. **Connect** the N sessions (no channel yet): gateway RSS before and after.
2. **Join**: every member ``join_channel`` with ``presence: true`` (64 in flight per
   process). Join rate = N / the time until ``occupancy`` reports N members, on the first
   gateway to see it (``members_s``) and on each (``present_s``). Occupancy is asked once per
   presence frame a watcher on that gateway gets (one frame per batch window).
3. **Memory**: gateway RSS once all are present; the presence KV stream's (``KV_<prefix>_
   presence``) bytes and messages before and after.
4. **Pages**: from one querier on each gateway, ``presence`` first pages (limit 100 and
   1000) and full listings (every page, limit 1000): p50/p99 per call, total per listing.
5. **Occupancy**: ``occupancy_calls`` calls from ``occupancy_clients`` sessions (both
   gateways), each paced at ``occupancy_rate`` calls/s: p50/p99/max.
6. **Storm**: ``storm`` members ``leave_channel`` + ``join_channel`` as fast as replies come.
   Then one marker member joins; the storm has settled when every watcher got the frame that
   carries the marker's join (its change, or an overflow frame counting N + 1 members). Per
   watcher: frames, bytes, overflow frames and changes received up to that frame, against the
   2 x ``storm`` member changes.

Every number is absolute: no peer of this machine's set has presence.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.idle import rss_kb
from bench.presence_client import (
    MemberProc,
    Session,
    ask_all,
    frame_matching,
    open_session,
    session_url,
    split,
)
from bench.run import RESULTS, Gateway, start_gateway, stop_process

log = logging.getLogger("bench.presence")
BATCH_MS, MAX_CHANGES = 100, 100  # the gateway's defaults, set explicitly for the record
MARKER = "zz-marker"  # joins after a storm: its change ends the storm's frames
OCCUPANCY_GOAL_P99_MS, LISTING_GOAL_MS = 10.0, 200.0


@dataclass
class PresenceConfig:
    members: int = 10_000
    member_procs: int = 4
    concurrency: int = 64  # commands in flight per member process
    page_repeats: int = 20  # first pages per limit per gateway
    listings: int = 5  # full listings per gateway
    occupancy_calls: int = 1000
    occupancy_clients: int = 50
    occupancy_rate: float = 1.0  # calls/s per client
    watchers: int = 10
    storm: int = 1000


SMOKE = PresenceConfig(
    members=200, member_procs=2, page_repeats=5, listings=2, occupancy_calls=100,
    occupancy_clients=20, occupancy_rate=10.0, watchers=4, storm=100,
)  # fmt: skip


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summary_ms(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 0.5), 3),
        "p99_ms": round(percentile(ms, 0.99), 3),
        "max_ms": round(max(ms, default=float("nan")), 3),
    }


async def timed(call: Awaitable[dict[str, Any]]) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    result = await call
    return time.perf_counter() - started, result


# -- waiting on presence frames ------------------------------------------------------------


async def occupancy_when(
    querier: Session,
    watchers: list[Session],
    done: Callable[[dict[str, Any]], bool],
    timeout: float,
) -> dict[str, Any]:
    """The first ``occupancy`` result on ``querier``'s gateway that ``done`` accepts.

    Asked now and again after each presence frame one of ``watchers`` (same gateway) gets.
    """
    async with asyncio.timeout(timeout):
        for _ in range(1_000_000):
            for watcher in watchers:
                watcher.frame_seen.clear()
            result = await querier.command("occupancy")
            if done(result):
                return result
            waits = [asyncio.ensure_future(w.frame_seen.wait()) for w in watchers]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
    raise AssertionError("unreachable: the loop is bounded by its timeout")


def shows_marker(members: int) -> Callable[[dict[str, Any]], bool]:
    """A frame that carries the marker's join: a change of principal ``MARKER``, or an
    overflow frame whose occupancy counts ``members`` + 1 (only the marker goes past N)."""

    def match(body: dict[str, Any]) -> bool:
        if body.get("overflow"):
            return int((body.get("occupancy") or {}).get("members", 0)) > members
        return any(c.get("principal") == MARKER for c in body.get("changes") or ())

    return match


# -- the phases -------------------------------------------------------------------------------


@dataclass
class Mesh:
    gateways: list[Gateway]
    queriers: list[Session]
    watchers: list[list[Session]]  # per gateway
    tenant: str

    def rss(self) -> list[int]:
        return [rss_kb(g.pid) for g in self.gateways]


async def join_phase(mesh: Mesh, procs: list[MemberProc], n: int) -> dict[str, Any]:
    timeout = 60 + n / 50
    started = time.perf_counter()
    replies_task = asyncio.ensure_future(ask_all(procs, [{"op": "join"}] * len(procs), timeout))

    async def present(g: int) -> float:
        await occupancy_when(
            mesh.queriers[g], mesh.watchers[g], lambda r: r["members"] >= n, timeout
        )
        return time.perf_counter() - started

    try:
        present_s = await asyncio.gather(*(present(g) for g in range(len(mesh.gateways))))
        replies = await replies_task
    finally:
        replies_task.cancel()  # a no-op once done; else the members' answers are not awaited
    first = min(present_s)
    return {
        "members": n,
        "joined": sum(r["joined"] for r in replies),
        "errors": sum(r["errors"] for r in replies),
        "error_samples": [s for r in replies for s in r["error_samples"]][:5],
        "replies_s": round(max(r["elapsed_s"] for r in replies), 3),
        "present_s": [round(s, 3) for s in present_s],
        "members_s": round(n / first, 1),
    }


async def listing(querier: Session, limit: int) -> tuple[list[float], int]:
    """Every page of the channel at ``limit``: each page's time, and the members listed."""
    times: list[float] = []
    listed, cursor = 0, None
    for _ in range(100_000 // limit + 2):
        params: dict[str, Any] = {"limit": limit} | ({"cursor": cursor} if cursor else {})
        elapsed, page = await timed(querier.command("presence", params))
        times.append(elapsed)
        listed += len(page["members"])
        cursor = page.get("next_cursor")
        if cursor is None:
            break
    return times, listed


async def pages_phase(mesh: Mesh, cfg: PresenceConfig) -> list[dict[str, Any]]:
    out = []
    for g, querier in enumerate(mesh.queriers):
        first: dict[int, list[float]] = {100: [], 1000: []}
        for limit, times in first.items():
            for _ in range(cfg.page_repeats):
                times.append((await timed(querier.command("presence", {"limit": limit})))[0])
        totals, page_times, listed = [], [], 0
        for _ in range(cfg.listings):
            started = time.perf_counter()
            times, listed = await listing(querier, 1000)
            totals.append(time.perf_counter() - started)
            page_times += times
        out.append(
            {
                "gateway": g,
                "page_100": summary_ms(first[100]),
                "page_1000": summary_ms(first[1000]),
                "listing_page_1000": summary_ms(page_times),
                "listing_total": summary_ms(totals),
                "listed": listed,
            }
        )
    return out


async def occupancy_phase(mesh: Mesh, cfg: PresenceConfig) -> dict[str, Any]:
    urls = [g.url for g in mesh.gateways]
    clients = [
        await open_session(session_url(urls[i % len(urls)], mesh.tenant, f"o{i:04d}"))
        for i in range(cfg.occupancy_clients)
    ]
    per_client = split(cfg.occupancy_calls, len(clients))
    period = 1 / cfg.occupancy_rate
    latencies: list[float] = []
    slow: list[tuple[float, float]] = []  # (sent at, s into the phase; ms) over the goal
    loop = asyncio.get_running_loop()

    async def paced(k: int, session: Session) -> None:
        # Pacing at a rate (as loadgen's publisher does), not waiting for an event.
        start = loop.time() + period * k / len(clients)
        for i in range(per_client[k]):
            await asyncio.sleep(max(0.0, start + i * period - loop.time()))
            sent = time.perf_counter()
            latencies.append((await timed(session.command("occupancy")))[0])
            if latencies[-1] * 1000 > OCCUPANCY_GOAL_P99_MS:
                slow.append((round(sent - started, 3), round(latencies[-1] * 1000, 1)))

    started = time.perf_counter()
    try:
        await asyncio.gather(*(paced(k, s) for k, s in enumerate(clients)))
    finally:
        for session in clients:
            session.close()
    return {
        **summary_ms(latencies),
        "clients": len(clients),
        "rate_per_client": cfg.occupancy_rate,
        "elapsed_s": round(time.perf_counter() - started, 3),
        # When the slow calls were sent: stalls of a gateway show as clusters.
        "over_goal": len(slow),
        "over_goal_sample": sorted(slow)[:50],
    }


def storm_frames(watcher: Session, start: int, end: int) -> dict[str, int]:
    """What ``watcher`` was sent from frame ``start`` up to and including frame ``end``."""
    assert watcher.bodies is not None
    bodies = watcher.bodies[start : end + 1]
    return {
        "frames": len(bodies),
        "bytes": sum(watcher.sizes[start : end + 1]),
        "overflow": sum(1 for b in bodies if b.get("overflow")),
        "changes": sum(len(b.get("changes") or ()) for b in bodies),
    }


async def storm_phase(mesh: Mesh, procs: list[MemberProc], cfg: PresenceConfig) -> dict[str, Any]:
    """``storm`` members leave and join again; then the marker joins (see the module doc)."""
    n = min(cfg.storm, cfg.members)
    watchers = [w for ws in mesh.watchers for w in ws]
    timeout = 60 + n / 20
    marker = await open_session(session_url(mesh.gateways[0].url, mesh.tenant, MARKER))
    try:
        starts = [len(w.bodies or ()) for w in watchers]
        started = time.perf_counter()
        shares = split(n, len(procs))
        replies = await ask_all(procs, [{"op": "storm", "n": k} for k in shares], timeout)
        replies_s = time.perf_counter() - started
        await marker.command("join_channel", {"presence": True, "presence_events": False})
        match = shows_marker(cfg.members)
        ends = await asyncio.gather(
            *(frame_matching(w, match, s, timeout) for w, s in zip(watchers, starts, strict=True))
        )
        settled_s = time.perf_counter() - started
    finally:
        marker.close()
    got = [storm_frames(w, s, e) for w, s, e in zip(watchers, starts, ends, strict=True)]
    frames = [g["frames"] for g in got]

    def mean(key: str) -> float:
        return round(sum(g[key] for g in got) / len(got), 1)

    return {
        "storm_members": n,
        "member_changes": 2 * n,
        "cycles": sum(r["cycles"] for r in replies),
        "errors": sum(r["errors"] for r in replies),
        "error_samples": [s for r in replies for s in r["error_samples"]][:5],
        "replies_s": round(replies_s, 3),
        "settled_s": round(settled_s, 3),
        "watchers": len(got),
        "frames_per_watcher_mean": mean("frames"),
        "frames_per_watcher_max": max(frames),
        "bytes_per_watcher_mean": mean("bytes"),
        "overflow_frames_per_watcher_mean": mean("overflow"),
        "changes_per_watcher_mean": mean("changes"),
        "frames_per_member_change": round(sum(frames) / len(frames) / (2 * n), 4),
        "windows_in_settle": round(settled_s * 1000 / BATCH_MS, 1),
        "marker_frames_included": 1,
    }


async def disconnect_phase(mesh: Mesh, procs: list[MemberProc], n: int) -> dict[str, Any]:
    """Every member process exits (its sockets close): the time until each gateway's
    ``occupancy`` shows no member (each gateway deletes its sessions' entries)."""
    timeout = 60 + n / 20
    started = time.perf_counter()
    await asyncio.gather(*(p.close() for p in procs))

    async def empty(g: int) -> float:
        await occupancy_when(
            mesh.queriers[g], mesh.watchers[g], lambda r: r["members"] == 0, timeout
        )
        return time.perf_counter() - started

    empty_s = await asyncio.gather(*(empty(g) for g in range(len(mesh.gateways))))
    return {"empty_s": [round(s, 3) for s in empty_s], "members_s": round(n / max(empty_s), 1)}


async def kv_state(nats_urls: str, prefix: str = "arq") -> dict[str, int]:
    import nats

    nc = await nats.connect(nats_urls.split(","), connect_timeout=10, max_reconnect_attempts=3)
    try:
        info = await nc.jetstream().stream_info(f"KV_{prefix}_presence")
        return {"bytes": int(info.state.bytes), "messages": int(info.state.messages)}
    finally:
        await nc.close()


def memory(
    cfg: PresenceConfig, rss: dict[str, list[int]], kv: dict[str, dict[str, int]]
) -> dict[str, Any]:
    n = cfg.members
    local = split(n, len(rss["start"]))
    per_gateway = [
        {
            "rss_start_kb": rss["start"][g],
            "rss_connected_kb": rss["connected"][g],
            "rss_present_kb": rss["present"][g],
            "local_sessions": local[g],
            # Each gateway mirrors every member of the channel (watchers on both).
            "presence_kb_per_member": round((rss["present"][g] - rss["connected"][g]) / n, 3),
            "kb_per_local_session": round((rss["present"][g] - rss["start"][g]) / local[g], 3),
        }
        for g in range(len(local))
    ]
    kv_bytes = kv["after"]["bytes"] - kv["before"]["bytes"]
    return {
        "gateways": per_gateway,
        "kv_bytes": kv_bytes,
        "kv_messages": kv["after"]["messages"] - kv["before"]["messages"],
        "kv_bytes_per_member": round(kv_bytes / n, 1),
    }


# -- the section ----------------------------------------------------------------------------------


async def open_observers(gateways: list[Gateway], tenant: str, cfg: PresenceConfig) -> Mesh:
    queriers = [
        await open_session(session_url(g.url, tenant, f"q{i}")) for i, g in enumerate(gateways)
    ]
    watchers: list[list[Session]] = [[] for _ in gateways]
    for i in range(max(cfg.watchers, len(gateways))):
        g = i % len(gateways)
        watcher = await open_session(session_url(gateways[g].url, tenant, f"w{i:03d}"))
        watcher.watch()
        await watcher.command("join_channel", {"presence": False, "presence_events": True})
        watchers[g].append(watcher)
    return Mesh(gateways, queriers, watchers, tenant)


async def measure(nats_urls: str, gateways: list[Gateway], cfg: PresenceConfig) -> dict[str, Any]:
    """Every phase against running ``gateways`` (started with :data:`GATEWAY_ENV`)."""
    tenant = "p" + uuid.uuid4().hex[:10]
    rss = {"start": [rss_kb(g.pid) for g in gateways]}
    mesh = await open_observers(gateways, tenant, cfg)
    procs: list[MemberProc] = []
    try:
        start = 0
        for k, count in enumerate(split(cfg.members, cfg.member_procs)):
            procs.append(await MemberProc.start([g.url for g in gateways], tenant, start, count, k))
            start += count
        opened = [await p.read(60 + cfg.members / 100) for p in procs]
        if sum(o["opened"] for o in opened) != cfg.members:
            raise RuntimeError(f"member processes opened {opened}, not {cfg.members}")
        rss["connected"] = mesh.rss()
        log.info("presence: %d sessions open; joining with presence", cfg.members)
        kv = {"before": await kv_state(nats_urls)}
        result: dict[str, Any] = {"join": await join_phase(mesh, procs, cfg.members)}
        rss["present"] = mesh.rss()
        kv["after"] = await kv_state(nats_urls)
        result["memory"] = memory(cfg, rss, kv)
        log.info(
            "presence: %d present (%.0f/s); pages and listings",
            cfg.members,
            result["join"]["members_s"],
        )
        result["pages"] = await pages_phase(mesh, cfg)
        log.info("presence: %d occupancy calls", cfg.occupancy_calls)
        result["occupancy"] = await occupancy_phase(mesh, cfg)
        log.info("presence: storm of %d leave + join", cfg.storm)
        result["storm"] = await storm_phase(mesh, procs, cfg)
        log.info("presence: %d members disconnect at once", cfg.members)
        result["disconnect"] = await disconnect_phase(mesh, procs, cfg.members)
    finally:
        await asyncio.gather(*(p.close() for p in procs), return_exceptions=True)
        for session in [*mesh.queriers, *(w for ws in mesh.watchers for w in ws)]:
            session.close()
    return result


GATEWAY_ENV = {
    "ARQONBUS_PRESENCE_BATCH_MS": str(BATCH_MS),
    "ARQONBUS_PRESENCE_MAX_CHANGES": str(MAX_CHANGES),
}


def log_warnings(path: Path) -> dict[str, Any]:
    """Warnings and errors a gateway logged (beyond the dev-auth notice at start): a gateway
    that falls behind says so there (e.g. presence renewals late: it re-puts its entries).
    ``samples``: the first line of each distinct message, with its time."""
    lines: list[str] = []
    with contextlib.suppress(OSError):
        lines = [
            line
            for line in path.read_text(errors="replace").splitlines()
            if (" WARNING " in line or " ERROR " in line) and "dev auth" not in line.lower()
        ]
    first: dict[str, str] = {}
    for line in lines:
        first.setdefault(line.split(" ", 3)[-1], line)
    return {"count": len(lines), "samples": list(first.values())[:5]}


async def presence_section(nats_urls: str, cfg: PresenceConfig, work: Path) -> dict[str, Any]:
    """Two gateways of its own on the cluster at ``nats_urls``, every phase, the report."""
    gateways: list[Gateway] = []
    started = time.perf_counter()
    try:
        for i in range(2):
            gateways.append(await start_gateway(nats_urls, 20 + i, work, GATEWAY_ENV))
        measured_at = time.perf_counter()
        result = await measure(nats_urls, gateways, cfg)
        measured_s = time.perf_counter() - measured_at
    finally:
        stopping = time.perf_counter()
        await asyncio.gather(*(stop_process(gw.proc) for gw in gateways))
    result["timing_s"] = {
        "measure": round(measured_s, 2),
        "gateways_stop": round(time.perf_counter() - stopping, 2),
    }
    result["gateway_warnings"] = [log_warnings(work / f"gw{20 + i}.log") for i in range(2)]
    result["config"] = asdict(cfg) | {
        "gateways": 2,
        "batch_ms": BATCH_MS,
        "max_changes": MAX_CHANGES,
    }
    result["wall_s"] = round(time.perf_counter() - started, 1)
    log_summary(result)
    return result


# -- the report -----------------------------------------------------------------------------------


def log_summary(r: dict[str, Any]) -> None:
    join, occ, storm = r["join"], r["occupancy"], r["storm"]
    log.info(
        "presence %d members: join %.0f/s, occupancy p99 %.2f ms, listing p99 %s ms, "
        "storm %d: %.1f frames/watcher in %.2f s",
        join["members"], join["members_s"], occ["p99_ms"],
        [p["listing_total"]["p99_ms"] for p in r["pages"]], storm["storm_members"],
        storm["frames_per_watcher_mean"], storm["settled_s"],
    )  # fmt: skip


def problems(r: dict[str, Any] | None) -> list[str]:
    """What makes the section unusable: members missing, errors, nothing measured."""
    if r is None:
        return ["presence: section missing"]
    out = []
    n = r["config"]["members"]
    if r["join"]["joined"] != n or r["join"]["errors"]:
        out.append(
            f"presence join: {r['join']['joined']} of {n} joined, {r['join']['errors']} errors"
        )
    for page in r["pages"]:
        if page["listed"] != n:
            out.append(f"presence listing on gateway {page['gateway']}: {page['listed']} of {n}")
    if not r["occupancy"]["n"] or not r["occupancy"]["p99_ms"] > 0:
        out.append("presence occupancy: no call measured")
    storm = r["storm"]
    if storm["cycles"] != storm["storm_members"] or storm["errors"]:
        out.append(f"presence storm: {storm['cycles']} of {storm['storm_members']} cycles done")
    if storm["frames_per_watcher_max"] < 1:
        out.append("presence storm: watchers got no frame")
    return out


def table(r: dict[str, Any]) -> str:
    """The section's Markdown tables (absolute numbers: no peer has presence)."""
    cfg, join, mem, occ, storm = r["config"], r["join"], r["memory"], r["occupancy"], r["storm"]
    lines = [
        f"Presence: {cfg['members']:,} members in one channel over 2 gateways "
        f"(batch {cfg['batch_ms']} ms, max {cfg['max_changes']} changes a frame); absolute numbers.",
        "",
        "| presence | value |",
        "|---|---|",
        f"| join rate, members/s (until `occupancy` shows all) | {join['members_s']:,.0f} |",
        f"| all present on gateway 0 / 1, s | {' / '.join(f'{s:.2f}' for s in join['present_s'])} |",
        f"| `occupancy` p50 / p99 / max, ms ({occ['n']} calls, {occ['clients']} clients) | "
        f"{occ['p50_ms']:.2f} / {occ['p99_ms']:.2f} / {occ['max_ms']:.2f} |",
    ]
    for page in r["pages"]:
        g = page["gateway"]
        lines += [
            f"| gateway {g}: `presence` page p50 / p99, ms, limit 100 | "
            f"{page['page_100']['p50_ms']:.2f} / {page['page_100']['p99_ms']:.2f} |",
            f"| gateway {g}: `presence` page p50 / p99, ms, limit 1000 | "
            f"{page['page_1000']['p50_ms']:.2f} / {page['page_1000']['p99_ms']:.2f} |",
            f"| gateway {g}: full listing ({page['listed']:,}, limit 1000) p50 / p99, ms | "
            f"{page['listing_total']['p50_ms']:.1f} / {page['listing_total']['p99_ms']:.1f} |",
        ]
    lines += [
        f"| storm: {storm['storm_members']:,} members leave and join, settled in, s | {storm['settled_s']:.2f} |",
        f"| storm: frames / bytes / overflow frames per watcher (mean of {storm['watchers']}) | "
        f"{storm['frames_per_watcher_mean']} / {storm['bytes_per_watcher_mean']:,.0f} / "
        f"{storm['overflow_frames_per_watcher_mean']} |",
        f"| storm: frames per watcher per member change | {storm['frames_per_member_change']} |",
    ]
    if "disconnect" in r:
        gone = r["disconnect"]
        lines.append(
            f"| all {cfg['members']:,} disconnect: members gone on gateway 0 / 1, s (members/s) | "
            f"{' / '.join(f'{s:.2f}' for s in gone['empty_s'])} ({gone['members_s']:,.0f}) |"
        )
    for g, gw in enumerate(mem["gateways"]):
        lines.append(
            f"| gateway {g}: RSS per present member (all its join adds), KB / per local session incl. connection, KB | "
            f"{gw['presence_kb_per_member']:.2f} / {gw['kb_per_local_session']:.2f} |"
        )
    lines.append(f"| presence KV stream bytes per member | {mem['kv_bytes_per_member']:.0f} |")
    if "gateway_warnings" in r:
        counts = " / ".join(str(w["count"]) for w in r["gateway_warnings"])
        lines.append(f"| gateway 0 / 1: warnings logged (see the JSON's samples) | {counts} |")
    worst_listing = max(p["listing_total"]["p99_ms"] for p in r["pages"])
    lines += [
        "",
        "| goal | target | this run |",
        "|---|---|---|",
        f"| `occupancy` p99 | ≤ {OCCUPANCY_GOAL_P99_MS:.0f} ms | {occ['p99_ms']:.2f} ms |",
        f"| listing of {cfg['members']:,} members | ≤ {LISTING_GOAL_MS:.0f} ms | {worst_listing:.1f} ms (p99) |",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.presence", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--smoke", action="store_true", help="200 members, a few seconds")
    parser.add_argument("--members", type=int, default=None, help="present members (10,000)")
    parser.add_argument("--storm", type=int, default=None, help="members in the storm (1,000)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


async def standalone(cfg: PresenceConfig) -> dict[str, Any]:
    from arqonbus_server.mesh.local import LocalCluster

    with tempfile.TemporaryDirectory(prefix="arqonbus-presence-") as tmp:
        cluster = LocalCluster(Path(tmp) / "nats", nodes=3)
        await cluster.start(timeout=60)
        try:
            return await presence_section(cluster.url_csv, cfg, Path(tmp))
        finally:
            await cluster.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("arqonbus", "nats", "websockets", "picows"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cfg = SMOKE if args.smoke else PresenceConfig()
    if args.members:
        cfg = PresenceConfig(**(asdict(cfg) | {"members": args.members}))
    if args.storm:
        cfg = PresenceConfig(**(asdict(cfg) | {"storm": args.storm}))
    result = asyncio.run(standalone(cfg))
    result["date"] = datetime.now(UTC).isoformat(timespec="seconds")
    result["command"] = "python -m bench.presence " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = result["date"].replace(":", "").replace("+0000", "Z")
    path = args.out / f"{stem}-presence{'-smoke' if args.smoke else ''}.json"
    path.write_text(json.dumps(result, indent=1))
    print(table(result))
    found = problems(result)
    print(json.dumps({"report": str(path), "problems": found}))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
