"""``make chaos``: every fault scenario and every bad-input suite, then the report.

Writes ``chaos/results/<date>.md`` and ``.json`` and refreshes the results section of
``docs/reliability.md``. Exits 1 when anything failed (the report says what and why).

    python -m chaos.run                 # the full run (make chaos)
    python -m chaos.run --short         # short versions
    python -m chaos.run --only 1,3 --no-bad-input
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from chaos.scenarios import SCENARIOS, Plan

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- chaos:begin -->", "<!-- chaos:end -->"

# The bad-input suites: each is `python -m chaos.<name> --json OUT [--long]`.
BAD_INPUT = ["autobahn", "frames", "floods", "fuzz", "statemachine"]
BAD_INPUT_TIMEOUT_S = 20 * 60


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m chaos.run", description=__doc__)
    parser.add_argument("--short", action="store_true", help="short versions (minutes, not tens)")
    parser.add_argument("--only", default="", help="scenario numbers, comma-separated")
    parser.add_argument("--no-bad-input", action="store_true", help="fault scenarios only")
    parser.add_argument("--bad-input", default=",".join(BAD_INPUT), help="which bad-input suites")
    parser.add_argument("--out", type=Path, default=ROOT / "chaos" / "results")
    parser.add_argument("--no-docs", action="store_true", help="leave docs/reliability.md alone")
    parser.add_argument("--seed", type=int, default=int(time.time()))
    return parser.parse_args(argv)


async def run_scenarios(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    only = {int(n) for n in args.only.split(",") if n.strip()}
    plan = Plan(long=not args.short, seed=args.seed)
    results = []
    for scenario in SCENARIOS:
        if only and scenario.number not in only:
            continue
        print(f"==> scenario {scenario.number}: {scenario.name}", flush=True)
        outcome = await scenario.run(plan, workdir / f"s{scenario.number}")
        row = outcome.as_dict()
        verdict = "PASS" if outcome.passed else "FAIL"
        print(
            f"    {verdict}: acked {row['acked']}, lost {row['lost']}, duplicated "
            f"{row['duplicated']}, out of order {row['out_of_order']}, {row['duration_s']} s"
            + (f"; {outcome.error}" if outcome.error else ""),
            flush=True,
        )
        results.append(row)
    return results


def run_bad_input(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    results = []
    names = [n for n in args.bad_input.split(",") if n.strip()]
    for name in names:
        out = workdir / f"{name}.json"
        cmd = [sys.executable, "-m", f"chaos.{name}", "--json", str(out)]
        if not args.short:
            cmd.append("--long")
        print(f"==> {' '.join(cmd[1:])}", flush=True)
        started = time.monotonic()
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, stdin=subprocess.DEVNULL, timeout=BAD_INPUT_TIMEOUT_S, check=False
            )
            code: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
        took = round(time.monotonic() - started, 1)
        if out.exists():
            result = json.loads(out.read_text())
        else:
            result = {
                "name": name,
                "passed": False,
                "summary_md": f"`chaos.{name}` wrote no result (exit {code}).",
                "details": {},
            }
        result["exit_code"] = code
        result["duration_s"] = took
        result["passed"] = bool(result.get("passed")) and code == 0
        print(f"    {'PASS' if result['passed'] else 'FAIL'} in {took} s", flush=True)
        results.append(result)
    return results


def _fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def render(scenarios: list[dict[str, Any]], bad: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"Run {meta['started']} ({'short' if meta['short'] else 'full'}), `{meta['command']}`, "
        f"seed {meta['seed']}, {meta['machine']}, nats-server {meta['nats_server']}.",
        "",
        "| # | fault | sent | acked | delivered | lost | dup | out of order | resume p50 / max (s)"
        " | pass criterion | verdict |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in scenarios:
        lines.append(
            f"| {r['number']} | {r['name']} | {r['sent']} | {r['acked']} | {r['delivered']} | "
            f"{r['lost']} | {r['duplicated']} | {r['out_of_order']} | "
            f"{_fmt_s(r['resume_p50_s'])} / {_fmt_s(r['resume_max_s'])} | {r['criterion']} | "
            f"{'**pass**' if r['passed'] else '**FAIL**'} |"
        )
    lines += [
        "",
        "_delivered_ counts distinct events the subscribers' applications saw (each channel has"
        " two subscribers); _lost_ = acked but never delivered to a subscriber or missing from"
        " the store; _dup_ and _out of order_ are what the application saw through the SDK.",
        "",
    ]
    for r in scenarios:
        lines.append(f"### {r['number']}. {r['name']}: {'pass' if r['passed'] else 'FAIL'}")
        lines.append("")
        lines.append(f"Fault: {r['fault']}. Took {r['duration_s']} s.")
        lines.append("")
        if r["error"]:
            lines.append(f"- error: `{r['error']}`")
        for c in r["checks"]:
            lines.append(f"- {'✔' if c['ok'] else '✘'} {c['what']}: {c['observed']}")
        extra = {
            "publishes failed (outcome unknown)": r["failed"],
            "acked after more than 1 s": r["acked_late"],
            "delivered although the publish failed": r["unacked_delivered"],
        }
        lines.append("- " + "; ".join(f"{k}: {v}" for k, v in extra.items()))
        if r["measures"]:
            lines.append(f"- measures: `{json.dumps(r['measures'], default=str)}`")
        for example in r["examples"]:
            lines.append(f"- violation: {example}")
        lines.append("")
    for b in bad:
        lines.append(f"### Bad input: {b['name']}: {'pass' if b['passed'] else 'FAIL'}")
        lines.append("")
        lines.append(b.get("summary_md", "").strip())
        lines.append("")
        lines.append(f"(exit code {b.get('exit_code')}, {b.get('duration_s')} s)")
        lines.append("")
    return "\n".join(lines)


def update_doc(body: str) -> None:
    text = DOC.read_text() if DOC.exists() else f"# Reliability\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    DOC.write_text(f"{head}{BEGIN}\n{body}\n{END}{tail}")


def nats_version() -> str:
    from arqonbus_server.mesh.local import find_nats_server

    out = subprocess.run(
        [find_nats_server(), "--version"], capture_output=True, text=True, check=False
    )
    return out.stdout.strip().removeprefix("nats-server: ")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(name)s %(message)s")
    started = datetime.now(UTC)
    stamp = started.strftime("%Y-%m-%dT%H%M%SZ")
    workdir = ROOT / ".chaos" / f"run-{stamp}"
    workdir.mkdir(parents=True, exist_ok=True)
    meta = {
        "started": started.isoformat(timespec="seconds"),
        "short": args.short,
        "seed": args.seed,
        "command": "make chaos" if not args.short else "python -m chaos.run --short",
        "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}",
        "nats_server": nats_version(),
    }
    scenarios = asyncio.run(run_scenarios(args, workdir))
    bad = [] if args.no_bad_input else run_bad_input(args, workdir)
    body = render(scenarios, bad, meta)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stamp}.md").write_text(f"# Chaos run {stamp}\n\n{body}\n")
    (args.out / f"{stamp}.json").write_text(
        json.dumps({"meta": meta, "scenarios": scenarios, "bad_input": bad}, indent=1, default=str)
    )
    if not args.no_docs:
        update_doc(body)
    passed = all(r["passed"] for r in scenarios) and all(b["passed"] for b in bad)
    print(f"==> {'all passed' if passed else 'FAILURES'}; report: {args.out / (stamp + '.md')}")
    if passed:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
