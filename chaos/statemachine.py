"""``make chaos``: the delivery-promise state machine (chaos/model.py), longer.

    python -m chaos.statemachine --json OUT [--long]

Runs :class:`chaos.model.BusMachine` against one real mesh (a 3-node R3 JetStream cluster
and 3 gateway processes) in rounds of examples until the time budget is spent, and writes
OUT: examples, steps, kills, events checked, presence checks, and the counterexample if one
was found (the failing steps, the model's state and the gateways' logs). Exit 0 when the
properties held. The gateways run with ARQONBUS_PRESENCE_LEASE_S=0.5 (chaos/presence_model.py).
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, settings
from hypothesis.reporting import with_reporter
from hypothesis.stateful import run_state_machine_as_test

from chaos.model import BusMachine, Mesh
from chaos.presence_model import EXPIRY_BOUND_S
from chaos.suite import finish, parse_suite_args

NAME = "statemachine"
SCRATCH = Path(".chaos")


def _settings(examples: int, steps: int) -> settings:
    return settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        # Every step drives real processes: report the failing steps as found instead of
        # replaying hundreds of shrinking runs against the mesh.
        phases=(Phase.generate,),
        suppress_health_check=list(HealthCheck),
        database=None,
    )


def run(long: bool) -> dict[str, Any]:
    budget = 300.0 if long else 45.0
    examples_per_round, steps = (10, 30) if long else (4, 15)
    if long:
        BusMachine.max_gateway_kills = 4
        BusMachine.max_node_kills = 2
    SCRATCH.mkdir(exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="statemachine-", dir=SCRATCH))
    mesh = Mesh(base, gateways=3)
    started = time.monotonic()
    mesh.start()
    BusMachine.mesh = mesh
    rounds = 0
    report: list[str] = []
    error: str | None = None
    try:
        round_time = 0.0
        while rounds == 0 or time.monotonic() - started + round_time < budget:
            round_start = time.monotonic()
            try:
                with with_reporter(lambda value: report.append(str(value))):
                    run_state_machine_as_test(
                        BusMachine, settings=_settings(examples_per_round, steps)
                    )
            except BaseException as exc:  # the property failed: stop and report
                error = "".join(traceback.format_exception_only(exc)).strip()
                break
            rounds += 1
            round_time = time.monotonic() - round_start
    finally:
        BusMachine.mesh = None
        mesh.stop()
    elapsed = time.monotonic() - started
    stats = mesh.stats.as_dict()
    passed = error is None and stats["examples"] > 0
    return {
        "name": NAME,
        "passed": passed,
        "summary_md": _summary(stats, elapsed, passed, error, report),
        "details": {
            "mode": "long" if long else "short",
            "seconds": round(elapsed, 1),
            "rounds": rounds,
            "steps_per_example": steps,
            **stats,
            "error": error,
            "counterexample": report if error else [],
            "failures": mesh.failures,
            "data_dir": str(base),
        },
    }


def _summary(
    stats: dict[str, Any], elapsed: float, passed: bool, error: str | None, report: list[str]
) -> str:
    lines = [
        "### State machine: delivered is always a prefix of acked; presence has no ghosts",
        "",
        "Subscribers, publishers (acks awaited, connections cut mid-publish), explicit resumes, "
        "gateway kill -9 and NATS node kill -9 on a 3-node R3 mesh with 3 gateways; after "
        "every step each subscriber's delivered sequence must be a prefix of its channel's "
        "acked sequence, and all of it once the mesh settles.",
        "",
        "| result | examples | steps | gateway kills | node kills | disconnects | publishes "
        "| unknown outcomes | duplicate acks | events checked | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {'pass' if passed else '**FAIL**'} | {stats['examples']} | {stats['steps']} "
        f"| {stats['gateway_kills']} | {stats['node_kills']} | {stats['disconnects']} "
        f"| {stats['publishes']} | {stats['unknown_outcomes']} | {stats['duplicate_acks']} "
        f"| {stats['events_checked']} | {elapsed:.0f} |",
        "",
        "Presence on the same mesh (ARQONBUS_PRESENCE_LEASE_S=0.5, expiry bound "
        f"{EXPIRY_BOUND_S:g} s): connections of 3 principals enter and leave 2 channels, set "
        "their state, drop and close; after the bound every live gateway's `presence` (all "
        "pages) must list exactly the live members (no ghost of a killed gateway, none "
        "missing, a principal on two gateways once) and `occupancy` must agree.",
        "",
        "| sessions | checks passed | members checked | on 2+ gateways | checks that saw a ghost "
        "| slowest settle after a kill (s) |",
        "|---|---|---|---|---|---|",
        f"| {stats['presence_sessions']} | {stats['presence_checks']} "
        f"| {stats['presence_members_checked']} | {stats['presence_multi_gateway_members']} "
        f"| {stats['presence_ghosts_seen']} | {stats['presence_settled_after_kill_max_s']} |",
    ]
    if error:
        lines += ["", f"Error: `{error.splitlines()[-1][:300]}`", "", "```", *report[-60:], "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_suite_args(
        "python -m chaos.statemachine", __doc__, "the full run (about 5 minutes)", argv
    )
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(name)s %(message)s")
    return finish(args.json, run(args.long))


if __name__ == "__main__":
    sys.exit(main())
