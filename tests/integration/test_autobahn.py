"""The gateway's WebSocket layer passes the Autobahn|Testsuite fuzzing client (short subset).

Cases 1.x-7.x against an echo server built on gateway.transport with the Gateway's
listen options. The first run installs the test suite (Python 2.7, pip) into
.chaos/autobahn/; without Python 2.7 or the install this test fails.
"""

from __future__ import annotations

from pathlib import Path

from chaos.autobahn import SHORT_CASES, run


async def test_autobahn_short_subset_has_no_unexpected_failures(tmp_path: Path) -> None:
    report = await run(long=False, workdir=tmp_path / "autobahn")

    counts = report.counts()
    assert set(counts) == {c.split(".")[0] for c in SHORT_CASES}, report.summary_md()
    assert len(report.cases) >= 240, report.summary_md()  # 1.x-7.x hold 246 cases in 0.8.2
    assert [c.case for c in report.unexpected] == [], report.summary_md()
    # Nothing below 9.x comes near the 128 KiB limit: no case may fail at all.
    assert [c.case for c in report.cases if c.status == "FAILED"] == [], report.summary_md()
    # Regressions fixed in gateway/ws/transport.py:
    by_case = {c.case: c for c in report.cases}
    # a Close between the fragments of a message is answered, not failed with 1002
    assert by_case["7.1.5"].status == "OK", report.summary_md()
    # invalid UTF-8 in a text message fails the connection (1007), never echoed
    invalid_utf8 = [c for c in report.cases if c.case.startswith(("6.3.", "6.4."))]
    assert invalid_utf8 and all(c.status in ("OK", "NON-STRICT") for c in invalid_utf8)
    assert report.passed, report.summary_md()
