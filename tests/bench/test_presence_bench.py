"""The presence bench at a tiny size: every phase runs against 2 real gateways on the real
cluster and reports measured numbers (not that they meet the goals)."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest

from arqonbus_server.mesh.local import LocalCluster
from bench.presence import PresenceConfig, presence_section, problems, table
from bench.presence_client import presence_body
from tests.timeouts import SEC

TINY = PresenceConfig(
    members=40, member_procs=2, page_repeats=2, listings=1, occupancy_calls=20,
    occupancy_clients=4, occupancy_rate=20.0, watchers=2, storm=20,
)  # fmt: skip


def measured(summary: dict[str, Any], n: int) -> None:
    assert summary["n"] == n, summary
    for key in ("p50_ms", "p99_ms", "max_ms"):
        assert math.isfinite(summary[key]) and summary[key] > 0, summary
    assert summary["p50_ms"] <= summary["p99_ms"] <= summary["max_ms"], summary


@pytest.mark.integration
async def test_presence_bench_measures_every_phase(
    nats_cluster: LocalCluster, tmp_path: Path
) -> None:
    async with asyncio.timeout(120 * SEC):
        report = await presence_section(nats_cluster.url_csv, TINY, tmp_path)

    assert problems(report) == [], report
    join = report["join"]
    assert (join["joined"], join["errors"]) == (40, 0), join
    assert join["members_s"] > 0 and len(join["present_s"]) == 2, join

    assert [p["gateway"] for p in report["pages"]] == [0, 1]
    for page in report["pages"]:
        assert page["listed"] == 40, page
        measured(page["page_100"], 2)
        measured(page["page_1000"], 2)
        measured(page["listing_total"], 1)
        measured(page["listing_page_1000"], 1)  # 40 members: one page each listing

    occupancy = report["occupancy"]
    measured(occupancy, 20)
    assert occupancy["clients"] == 4

    storm = report["storm"]
    assert (storm["cycles"], storm["errors"], storm["member_changes"]) == (20, 0, 40), storm
    assert storm["watchers"] == 2 and storm["frames_per_watcher_max"] >= 1, storm
    assert storm["bytes_per_watcher_mean"] > 0 and storm["settled_s"] > 0, storm

    gone = report["disconnect"]
    assert len(gone["empty_s"]) == 2 and gone["members_s"] > 0, gone

    memory = report["memory"]
    assert [g["local_sessions"] for g in memory["gateways"]] == [20, 20]
    for gateway in memory["gateways"]:
        assert 0 < gateway["rss_start_kb"] <= gateway["rss_present_kb"], gateway
    assert memory["kv_messages"] >= 40 and memory["kv_bytes_per_member"] > 0, memory

    assert report["config"]["gateways"] == 2 and report["config"]["members"] == 40
    rendered = table(report)
    assert "join rate" in rendered and "`occupancy` p99" in rendered


def test_presence_frames_are_read_from_their_payload() -> None:
    body = {"position": 7, "changes": [{"action": "join", "principal": "m1"}]}
    frame = {"version": "1.0", "type": "presence", "room": "r", "channel": "c", "payload": body}
    assert presence_body(frame) == body
    with pytest.raises(ValueError, match="without a payload"):
        presence_body({"type": "presence", "room": "r", "channel": "c", **body})


def test_problems_flag_missing_members() -> None:
    report = {
        "config": {"members": 10},
        "join": {"joined": 9, "errors": 1},
        "pages": [{"gateway": 0, "listed": 9}],
        "occupancy": {"n": 0, "p99_ms": float("nan")},
        "storm": {"cycles": 1, "storm_members": 2, "errors": 0, "frames_per_watcher_max": 0},
    }
    found = problems(report)
    assert len(found) == 5, found
    assert problems(None) == ["presence: section missing"]
