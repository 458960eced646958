"""Turn a bench run into bench/results/<date>.{md,json}, PNG plots and docs/performance.md."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from bench.phases import PHASES
from bench.presence import problems as presence_problems
from bench.presence import table as presence_table

REPO = Path(__file__).resolve().parents[1]
PERFORMANCE_MD = REPO / "docs" / "performance.md"
PEERS = ("python-socketio", "node-socketio", "nats-ws")
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def _fmt(value: float, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def _ratio(a: float, b: float) -> str:
    if not a or not b or math.isnan(a) or math.isnan(b):
        return "n/a"
    return f"{a / b:.2f}×"


def sanity_problems(results: dict[str, Any]) -> list[str]:
    """What makes a run unusable: zero figures, lost deliveries, errors."""
    problems = []
    for name, fan in results["fanout"].items():
        for point in [*fan["sweep"], fan["saturated"], fan["latency"]]:
            if point["deliveries"] <= 0 or point["deliveries_s"] <= 0:
                problems.append(f"fanout {name} at {point['offered_msgs_s']}: no deliveries")
            if name.startswith("arqonbus") and point["missing"]:
                problems.append(f"fanout {name}: {point['missing']} acked events not delivered")
    sampled = results["fanout"]["arqonbus"]["saturated"].get("phases", {})
    missing = [p for p in PHASES if not sampled.get(p, {}).get("count")]
    if missing:  # the gateway's sampled phase timings (bench/phases.py)
        problems.append(f"fanout arqonbus: no sampled phase timings for {', '.join(missing)}")
    for n, point in results["scaleout"].items():
        if point["deliveries_s"] <= 0:
            problems.append(f"scale-out {n} gateways: no deliveries")
    for name, point in results["ingest"].items():
        if point["acked_s"] <= 0:
            problems.append(f"ingest {name}: nothing acked")
    if results["replay"]["arqonbus_s"] <= 0:
        problems.append("replay: no time measured")
    for name, point in results["idle"].items():
        if not point.get("n_open"):
            problems.append(f"idle {name}: no connection opened")
    problems += observability_problems(results.get("observability"))
    if "presence" in results:
        problems += presence_problems(results["presence"])
    return problems


def observability_problems(obs: dict[str, Any] | None) -> list[str]:
    """The observability-cost section: each configuration measured, and really configured."""
    if obs is None:
        return ["observability cost: section missing"]
    problems = []
    for name, conf in obs["configs"].items():
        fan, ing = conf["fanout"], conf["ingest"]
        if fan["deliveries"] <= 0 or fan["deliveries_s"] <= 0:
            problems.append(f"observability {name}: no deliveries")
        if fan["missing"]:
            problems.append(f"observability {name}: {fan['missing']} acked events not delivered")
        if ing["acked_s"] <= 0:
            problems.append(f"observability {name}: ingest acked nothing")
        wanted = 404 if name == "metrics-off" else 200
        if conf["metrics_http_status"] != wanted:
            problems.append(
                f"observability {name}: GET /metrics answered {conf['metrics_http_status']}, "
                f"expected {wanted}"
            )
    if obs["spans_received"] <= 0:
        problems.append("observability metrics-tracing: the OTLP sink received no span")
    if obs["bad_export_requests"]:
        problems.append(
            f"observability: {obs['bad_export_requests']} OTLP export bodies did not decode"
        )
    return problems


OBS_LABELS = {
    "metrics-off": "metrics off",
    "metrics-on": "metrics on (default)",
    "metrics-tracing": "metrics on + tracing, sampling 1.0, OTLP/HTTP",
}


def observability_table(obs: dict[str, Any]) -> str:
    """Fan-out and ingest with metrics off / on / on + tracing, and the ratios to off."""
    base = obs["configs"]["metrics-off"]
    lines = [
        "Observability cost: one gateway per configuration, saturated fan-out and ingest, "
        "the configurations interleaved run by run:",
        "",
        "| configuration | fan-out deliveries/s | CPU µs per delivery | ingest acked/s | "
        "deliveries/s ÷ off | CPU/delivery ÷ off | acked/s ÷ off |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, conf in obs["configs"].items():
        fan, ing = conf["fanout"], conf["ingest"]
        lines.append(
            f"| {OBS_LABELS.get(name, name)} | {_fmt(fan['deliveries_s'])} | "
            f"{_fmt(fan['cpu_us_per_delivery'], 2)} | {_fmt(ing['acked_s'])} | "
            f"{_ratio(fan['deliveries_s'], base['fanout']['deliveries_s'])} | "
            f"{_ratio(fan['cpu_us_per_delivery'], base['fanout']['cpu_us_per_delivery'])} | "
            f"{_ratio(ing['acked_s'], base['ingest']['acked_s'])} |"
        )
    lines.append("")
    lines.append(
        f"Spans received by the local OTLP sink from the traced gateway: "
        f"{obs['spans_received']:,} in {obs['export_requests']:,} export requests, "
        f"{_fmt(obs['spans_per_event'], 2)} per traced event "
        f"({obs['traced_events']:,} events published or ingested)."
    )
    return "\n".join(lines)


def table(results: dict[str, Any]) -> str:
    fan = results["fanout"]
    arq = fan["arqonbus"]["saturated"]
    cross = fan["arqonbus-2gw"]["saturated"]
    lines = [
        "| workload | ArqonBus | " + " | ".join(PEERS) + " | ArqonBus ÷ peer |",
        "|---|---|" + "---|" * len(PEERS) + "---|",
    ]

    def row(label: str, key: str, digits: int = 0) -> None:
        ours = fan["arqonbus"]["saturated"][key]
        peers = [fan[p]["saturated"][key] for p in PEERS]
        ratios = ", ".join(f"{p}: {_ratio(ours, v)}" for p, v in zip(PEERS, peers, strict=True))
        lines.append(
            f"| {label} | {_fmt(ours, digits)} | "
            + " | ".join(_fmt(v, digits) for v in peers)
            + f" | {ratios} |"
        )

    row("fan-out deliveries/s (saturated)", "deliveries_s")
    row("server CPU µs per delivery", "cpu_us_per_delivery", 2)
    row(
        "server CPU µs per delivery with the store (ArqonBus: + NATS nodes)",
        "cpu_with_store_us_per_delivery",
        2,
    )
    lines.append(
        f"| fan-out across 2 gateways, deliveries/s | {_fmt(cross['deliveries_s'])} | | | | |"
    )
    lines.append("")
    lines.append("Latency, publish → deliver, at each offered rate (ms, p50 / p99 / p99.9):")
    lines.append("")
    names = ["arqonbus", "arqonbus-2gw", *PEERS]
    lines.append("| offered msgs/s | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for i, point in enumerate(fan["arqonbus"]["sweep"]):
        cells = []
        for name in names:
            p = fan[name]["sweep"][i]
            cells.append(f"{p['p50_ms']:.2f} / {p['p99_ms']:.2f} / {p['p999_ms']:.2f}")
        lines.append(f"| {point['offered_msgs_s']:,.0f} | " + " | ".join(cells) + " |")
    rate = fan["arqonbus"]["latency"]["offered_msgs_s"]
    cells = []
    for name in names:
        p = fan[name]["latency"]
        cells.append(f"{p['p50_ms']:.2f} / {p['p99_ms']:.2f} / {p['p999_ms']:.2f}")
    lines.append(f"| {rate:,.0f}, 1 subscriber per channel | " + " | ".join(cells) + " |")
    lines.append("")
    if "phases" in fan["arqonbus"]["saturated"]:
        lines.append(phases_table(fan["arqonbus"]))
        lines.append("")
    ingest = results["ingest"]
    lines.append("| store workload | ArqonBus | nats-py direct (no gateway) | ratio |")
    lines.append("|---|---|---|---|")
    lines.append(
        f"| acked publishes/s into R3 | {_fmt(ingest['arqonbus']['acked_s'])} | "
        f"{_fmt(ingest['nats-py-direct']['acked_s'])} | "
        f"{_ratio(ingest['arqonbus']['acked_s'], ingest['nats-py-direct']['acked_s'])} |"
    )
    if "arqonbus-2-workers" in ingest:
        two = ingest["arqonbus-2-workers"]["acked_s"]
        lines.append(
            f"| acked publishes/s into R3, one gateway with `--workers 2` | {_fmt(two)} | "
            f"{_fmt(ingest['nats-py-direct']['acked_s'])} | "
            f"{_ratio(two, ingest['nats-py-direct']['acked_s'])} |"
        )
    direct = ingest["nats-py-direct"]["acked_s"]
    for key, what in (
        ("arqonbus-events-frames", "acked publishes/s into R3, `events` frames (same connections and window)"),
        ("arqonbus-1-conn", "acked publishes/s into R3, one connection (nats-py: one connection too)"),
        ("arqonbus-1-conn-events-frames", "acked publishes/s into R3, one connection, `events` frames"),
    ):  # fmt: skip
        if key in ingest:
            acked = ingest[key]["acked_s"]
            lines.append(f"| {what} | {_fmt(acked)} | {_fmt(direct)} | {_ratio(acked, direct)} |")
    rp = results["replay"]
    lines.append(
        f"| replay of {rp['events']:,} stored events to one client, s | {rp['arqonbus_s']:.2f} | "
        f"{rp['nats_direct_s']:.2f} | {_ratio(rp['arqonbus_s'], rp['nats_direct_s'])} |"
    )
    lines.append("")
    if "mean_batch" in ingest["arqonbus"]:
        lines.append(
            f"In the ingest runs the gateway's publish lanes stored events in batches of "
            f"{ingest['arqonbus']['mean_batch']:,.1f} on average (its "
            "`arqonbus_publish_batched_events_total / arqonbus_publish_batches_total`)."
        )
        lines.append("")
    scale = results["scaleout"]
    base = scale["1"]["deliveries_s"]
    lines.append("| gateways | deliveries/s | vs 1 gateway |")
    lines.append("|---|---|---|")
    for n, point in scale.items():
        lines.append(
            f"| {n} | {_fmt(point['deliveries_s'])} | {_ratio(point['deliveries_s'], base)} |"
        )
    lines.append("")
    lines.append("| idle connections | opened | RSS per connection, KB | upgrades/s |")
    lines.append("|---|---|---|---|")
    for name, point in results["idle"].items():
        lines.append(
            f"| {name} | {_fmt(point.get('n_open', 0))} | {_fmt(point.get('rss_per_conn_kb', float('nan')), 1)} | "
            f"{_fmt(point.get('upgrades_per_s', float('nan')))} |"
        )
    lines.append("")
    if "observability" in results:
        lines.append(observability_table(results["observability"]))
        lines.append("")
    if "presence" in results:
        lines.append(presence_table(results["presence"]))
        lines.append("")
    lines.append(goals(results, arq))
    return "\n".join(lines)


def phases_table(arq: dict[str, Any]) -> str:
    """Where the time goes inside the gateway (publisher and members on one gateway)."""
    lines = [
        "Inside the gateway (publisher and subscribers on one gateway), sampled messages by "
        "phase, ms p50 / p99 over the 3 runs (`arqonbus_event_phase_seconds`: read = socket "
        "→ session, handle → store request, store ack, store request → live copy back, "
        "live copy → frames written to the kernel):",
        "",
        "| offered msgs/s | samples | " + " | ".join(PHASES) + " |",
        "|---|---|" + "---|" * len(PHASES),
    ]
    points = [(f"{p['offered_msgs_s']:,.0f}", p) for p in arq["sweep"]]
    points.append((f"saturated ({arq['saturated']['published']:,.0f} messages)", arq["saturated"]))
    points.append((f"{arq['latency']['offered_msgs_s']:,.0f}, 1 subscriber", arq["latency"]))
    for label, point in points:
        phases = point.get("phases")
        if not phases:
            continue
        cells = [f"{phases[k]['p50_ms']:.2f} / {phases[k]['p99_ms']:.2f}" for k in PHASES]
        lines.append(f"| {label} | {phases['total']['count']:,.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goals(results: dict[str, Any], arq: dict[str, Any]) -> str:
    fan = results["fanout"]
    lat_same = fan["arqonbus"]["latency"]
    lat_cross = fan["arqonbus-2gw"]["latency"]
    idle = results["idle"]["arqonbus"]
    scale = results["scaleout"]
    rows = [
        ("fan-out deliveries/s", "≥ 500k (floor 150k)", _fmt(arq["deliveries_s"])),
        ("server CPU per delivery", "≤ 1 µs (floor 3 µs)", f"{arq['cpu_us_per_delivery']:.2f} µs"),
        (
            f"latency same gateway at {lat_same['offered_msgs_s']:,.0f} msgs/s",
            "p50 ≤ 1.5 ms, p99 ≤ 5 ms (floor p99 10 ms)",
            f"p50 {lat_same['p50_ms']:.2f} ms, p99 {lat_same['p99_ms']:.2f} ms",
        ),
        (
            f"latency across gateways at {lat_cross['offered_msgs_s']:,.0f} msgs/s",
            "p99 ≤ 10 ms (floor 15 ms)",
            f"p99 {lat_cross['p99_ms']:.2f} ms",
        ),
        (
            "idle connections",
            "≥ 50k, ≤ 16 KB each (floor 20 KB)",
            f"{idle.get('n_open', 0):,} open, {idle.get('rss_per_conn_kb', float('nan')):.1f} KB each",
        ),
        (
            "acked publishes/s into R3",
            "≥ 20k (floor 10k)",
            _fmt(results["ingest"]["arqonbus"]["acked_s"]),
        ),
        (
            "replay of the stored events",
            "≤ 1.0 s for 100k (floor 2 s)",
            f"{results['replay']['arqonbus_s']:.2f} s for {results['replay']['events']:,}",
        ),
        (
            "fan-out vs python-socketio / Node socket.io",
            "≥ 5× / ≥ 1.5×",
            f"{_ratio(arq['deliveries_s'], fan['python-socketio']['saturated']['deliveries_s'])} / "
            f"{_ratio(arq['deliveries_s'], fan['node-socketio']['saturated']['deliveries_s'])}",
        ),
        (
            "scale-out 1 → 2 gateways",
            "≥ 1.8×",
            _ratio(scale["2"]["deliveries_s"], scale["1"]["deliveries_s"]),
        ),
    ]
    out = ["| goal | target | this run |", "|---|---|---|"]
    out += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(out)


def plots(results: dict[str, Any], out: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, fan in results["fanout"].items():
        xs = [p["offered_msgs_s"] * results["config"]["subs_per_channel"] for p in fan["sweep"]]
        ax.plot(xs, [p["p99_ms"] for p in fan["sweep"]], marker="o", label=f"{name} p99")
    ax.set_xlabel("offered deliveries/s")
    ax.set_ylabel("publish → deliver latency, ms")
    ax.set_yscale("log")
    ax.set_title("Latency against offered load (p99)")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    path = out / f"{stem}-latency.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    made.append(path)

    fig, ax = plt.subplots(figsize=(6, 4))
    scale = results["scaleout"]
    ax.bar(list(scale), [p["deliveries_s"] for p in scale.values()], color="#3a7")
    ax.set_xlabel("gateways")
    ax.set_ylabel("deliveries/s")
    ax.set_title("Fan-out deliveries/s against the number of gateways")
    path = out / f"{stem}-scaleout.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    made.append(path)
    return made


def write_reports(results: dict[str, Any], out: Path, smoke: bool) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    stem = results["date"].replace(":", "").replace("+0000", "Z") + ("-smoke" if smoke else "")
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str))
    made = plots(results, out, stem)
    m = results["machine"]
    header = (
        f"Run {results['date']} with `{results['command']}` ({results['wall_s']} s). "
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, Linux {m['kernel']}. "
        f"Each figure is the median of {results['config']['repeats']} runs; "
        f"fan-out is {results['config']['channels']} channels × {results['config']['subs_per_channel']} "
        "subscribers, one publisher, 200 B client envelopes."
    )
    body = table(results)
    pictures = "\n".join(f"![{p.stem}]({p.name})" for p in made)
    (out / f"{stem}.md").write_text(
        f"# Bench {results['date']}\n\n{header}\n\n{body}\n\n{pictures}\n"
    )
    problems = sanity_problems(results)
    if not smoke:
        update_performance_md(header, body, [out / p.name for p in made])
    return problems


def update_performance_md(header: str, body: str, pictures: list[Path]) -> None:
    text = (
        PERFORMANCE_MD.read_text()
        if PERFORMANCE_MD.exists()
        else f"# Performance\n\n{BEGIN}\n{END}\n"
    )
    rel = "\n".join(f"![{p.stem}](../{p.relative_to(REPO)})" for p in pictures)
    block = f"{BEGIN}\n{header}\n\n{body}\n\n{rel}\n{END}"
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < 0:
        text = text.rstrip() + "\n\n" + block + "\n"
    else:
        text = text[:start] + block + text[end + len(END) :]
    PERFORMANCE_MD.write_text(text)
