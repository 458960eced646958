"""Short versions of chaos scenarios 1, 2, 3 and 8 (the full ones run in `make chaos`).

Each starts its own 3-node JetStream cluster and two gateway processes, puts steady SDK
load on several channels of two tenants, injects the fault and checks the ledger: every
acked event delivered to every subscriber exactly once, in order, and stored once.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from chaos.scenarios import Plan, by_number

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("number", [1, 2, 3, 8], ids=lambda n: by_number(n).name.replace(" ", "-"))
async def test_short_scenario(number: int, tmp_path: Path) -> None:
    outcome = await by_number(number).run(Plan(long=False), tmp_path)
    report = outcome.as_dict()
    # The checks that failed, one per line: the whole report is too long for pytest's message.
    failed = [f"{c['what']}: {c['observed']}" for c in report["checks"] if not c["ok"]]
    assert outcome.passed, "\n".join(failed)
    assert outcome.totals.acked > 0, report
    # Two subscribers per channel each saw every acked event.
    assert outcome.totals.delivered >= 2 * outcome.totals.acked, report
