"""The gateway process's collector policy (gateway/gc_policy.py). Each test runs in a
process of its own: the policy changes the interpreter's collector for the whole process."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import orjson

from tests.timeouts import SEC

PRELUDE = """
import gc, orjson
from arqonbus_server.gateway.gc_policy import FreezingCollector

class Node:
    def __init__(self):
        self.me = self  # a reference cycle: only the cycle collector frees it

clock = [0.0]
policy = FreezingCollector(min_interval_s=60.0, growth=2.0, clock=lambda: clock[0])
"""


def run(body: str) -> dict:
    code = PRELUDE + textwrap.dedent(body)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=60 * SEC, check=False
    )
    assert done.returncode == 0, done.stderr.decode()
    result: dict = orjson.loads(done.stdout.splitlines()[-1])
    return result


def test_survivors_of_a_full_collection_are_frozen_and_later_collections_skip_them() -> None:
    r = run("""
        policy.install()
        start = gc.get_freeze_count()
        kept = [Node() for _ in range(20_000)]
        gc.collect()  # a full collection: the survivors move to the permanent generation
        after = gc.get_freeze_count()
        young = len(gc.get_objects(generation=2))
        print(orjson.dumps({"start": start, "after": after, "young": young,
                            "freezes": policy.freezes}).decode())
    """)
    assert r["start"] > 0 and r["after"] >= r["start"] + 20_000, r
    assert r["young"] < 1_000 and r["freezes"] == 1, r  # nothing left for the next walk


def test_frozen_cycles_are_freed_by_the_sweep_once_grown_and_the_interval_passed() -> None:
    r = run("""
        policy.install()
        nodes = [Node() for _ in range(50_000)]
        gc.collect()
        frozen = gc.get_freeze_count()
        del nodes  # garbage now, but frozen: no ordinary collection frees it
        ordinary = gc.collect()
        due_early = policy.due()  # grown, but the interval has not passed
        clock[0] = 61.0
        due = policy.due()
        freed = policy.sweep()
        print(orjson.dumps({"frozen": frozen, "ordinary": ordinary, "due_early": due_early,
                            "due": due, "freed": freed, "left": gc.get_freeze_count(),
                            "due_after": policy.due()}).decode())
    """)
    assert r["ordinary"] < 1_000, r
    assert (r["due_early"], r["due"], r["due_after"]) == (False, True, False), r
    assert r["freed"] >= 50_000 and r["left"] < r["frozen"] - 40_000, r


def test_no_sweep_while_the_frozen_set_has_not_grown_and_uninstall_restores_the_collector() -> None:
    r = run("""
        policy.install()
        clock[0] = 1_000.0
        steady = policy.due()
        policy.uninstall()
        print(orjson.dumps({"steady": steady, "frozen": gc.get_freeze_count(),
                            "callbacks": len(gc.callbacks)}).decode())
    """)
    assert r == {"steady": False, "frozen": 0, "callbacks": 0}, r


def test_install_raises_the_young_threshold_and_uninstall_puts_cpythons_back() -> None:
    r = run("""
        before = gc.get_threshold()
        policy.install()
        installed = gc.get_threshold()
        # Steady churn (each object freed before the next) never reaches the threshold...
        start = gc.get_stats()[0]["collections"]
        for _ in range(200_000):
            Node().me = None
        steady = gc.get_stats()[0]["collections"] - start
        # ... while growth does: 120,000 kept objects make two young collections.
        kept = [[] for _ in range(120_000)]
        grown = gc.get_stats()[0]["collections"] - start
        policy.uninstall()
        print(orjson.dumps({"before": before, "installed": installed, "steady": steady,
                            "grown": grown, "after": gc.get_threshold()}).decode())
    """)
    assert r["installed"] == [50_000, 2, 2] and r["after"] == r["before"] == [700, 10, 10], r
    assert r["steady"] == 0 and r["grown"] == 2, r
