"""Handshake floods and a slowloris army from one address, while well-behaved clients connect.

A real 3-node JetStream cluster (LocalCluster) and one gateway process run with the
production admission defaults (the upgrade rate per address, its burst, the cap on
unfinished handshakes per address); only the open timeout is shortened in the short run so
that its drops show within the run.

1. **Baseline.** A well-behaved population arrives at a steady rate from 127.0.0.10-17: each
   client connects (TCP, upgrade, ``welcome``), publishes one event and waits for its ack,
   and stays connected until the phase ends.
2. **Flood.** A child process (its own CPU, so the population's own latency figures are not
   inflated by the attacker's event loop) attacks from 127.0.0.9: a paced handshake flood
   (complete upgrade requests, far above the per-address rate) and, from 40% of the phase on,
   a slowloris army as well (half of it sends nothing, half sends the request line and then
   one header byte a second; every dropped socket reconnects at once). The same population
   arrives again, at the same rate.

Pass: the flood is held back (429s, and never more upgrades than the bucket allows; slowloris
sockets dropped at accept beyond the cap and at the open timeout otherwise), every
well-behaved client connects and gets its ack in both phases, their p99 connect latency
under the flood is within a generous factor of the baseline, and the gateway is still ready.

    python -m chaos.floods --json OUT [--long]

Writes OUT as {"name", "passed", "summary_md", "details"}; exits 0 when passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import resource
import shutil
import socket
import struct
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from arqonbus_server.mesh.local import LocalCluster
from arqonbus_server.shared.settings import Settings
from chaos.procfs import rss_bytes
from chaos.suite import finish, parse_suite_args
from chaos.workload import percentile
from tests.support import GatewayProcess, WsClient

NAME = "floods"
REPO = Path(__file__).resolve().parent.parent
FLOOD_IP = "127.0.0.9"
GOOD_IPS = [f"127.0.0.{i}" for i in range(10, 18)]
ROOM, CHANNEL = "lobby", "main"
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
_LINGER_RST = struct.pack("ii", 1, 0)  # close with a reset: no TIME_WAIT on the flood's ports
# Well-behaved p99 under the flood may be this many times the baseline p99 (or the baseline
# plus the floor, whichever is larger): the flood shares the machine's CPUs with everyone.
LATENCY_FACTOR = 10.0
SLOWLORIS_JOINS_AT = 0.4  # fraction of the flood's duration
LATENCY_FLOOR_S = 0.5
_DEFAULTS = Settings.model_fields


@dataclass(frozen=True)
class Plan:
    long: bool
    population_rate: float  # well-behaved arrivals per second
    population_s: float  # how long they keep arriving
    flood_rate: float  # handshake attempts per second from the flood address
    flood_workers: int  # handshakes in flight at most
    slowloris: int  # slowloris sockets kept trying at once
    open_timeout_s: float

    @classmethod
    def make(cls, long: bool) -> Plan:
        if long:
            return cls(True, 50.0, 60.0, 1500.0, 200, 512, float(_default("open_timeout_s")))
        return cls(False, 40.0, 6.0, 800.0, 100, 256, 3.0)


def _default(name: str) -> Any:
    return _DEFAULTS[name].default


def rss_kb(pid: int) -> int:
    return rss_bytes(pid) // 1024


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def runqueue_wait_s(pid: int) -> float:
    """Seconds the process's main thread (the event loop) waited for a CPU so far."""
    try:
        with open(f"/proc/{pid}/schedstat", encoding="ascii") as stat:
            return int(stat.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return float("nan")


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- the well-behaved population ------------------------------------------------------------


@dataclass
class PopulationResult:
    attempted: int = 0
    connected: int = 0
    acked: int = 0
    latencies_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def success_rate(self) -> float:
        return self.acked / self.attempted if self.attempted else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "attempted": self.attempted,
            "connected": self.connected,
            "acked": self.acked,
            "success_rate": round(self.success_rate, 4),
            "connect_p50_ms": round(percentile(self.latencies_s, 0.50) * 1000, 2),
            "connect_p99_ms": round(percentile(self.latencies_s, 0.99) * 1000, 2),
            "connect_max_ms": round(max(self.latencies_s, default=float("nan")) * 1000, 2),
            "errors": self.errors[:5],
            "error_count": len(self.errors),
        }


async def run_population(url: str, tenant: str, tag: str, plan: Plan) -> PopulationResult:
    """Clients arrive at ``plan.population_rate``/s, each connects, publishes and waits its ack."""
    result = PopulationResult()
    held: list[WsClient] = []
    loop = asyncio.get_running_loop()

    async def one(i: int) -> None:
        ip = GOOD_IPS[i % len(GOOD_IPS)]
        started = time.perf_counter()
        try:
            client = await WsClient.connect(
                url, tenant, f"{tag}{i}", local_addr=(ip, 0), open_timeout=30, compression=None
            )
        except Exception as exc:
            result.errors.append(f"connect {ip}: {type(exc).__name__}: {exc}"[:300])
            return
        result.latencies_s.append(time.perf_counter() - started)
        result.connected += 1
        held.append(client)
        try:
            reply = await client.publish(ROOM, CHANNEL, {"n": i, "tag": tag})
        except Exception as exc:
            result.errors.append(f"publish {ip}: {type(exc).__name__}: {exc}"[:300])
            return
        if reply["type"] == "ack":
            result.acked += 1
        else:
            result.errors.append(f"publish {ip}: {reply}"[:300])

    count = int(plan.population_rate * plan.population_s)
    result.attempted = count
    tasks: list[asyncio.Task[None]] = []
    start = loop.time()
    try:
        for i in range(count):
            # Arrival pacing (this is the load's shape, not a synchronization).
            delay = start + i / plan.population_rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        async with asyncio.timeout(120):
            await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for batch in range(0, len(held), 200):
            await asyncio.gather(*(c.close() for c in held[batch : batch + 200]))
    return result


# -- the attacker (a child process) ---------------------------------------------------------


@dataclass
class FloodStats:
    attempts: int = 0
    upgraded: int = 0  # 101: within the address's bucket
    rate_limited: int = 0  # 429
    other_status: dict[str, int] = field(default_factory=dict)
    dropped: int = 0  # closed or reset before any answer (the pending cap)
    connect_failed: int = 0
    timed_out: int = 0
    sample_429: dict[str, Any] | None = None
    slowloris_opened: int = 0
    slowloris_dropped_at_accept: int = 0  # closed well before the open timeout
    slowloris_timed_out: int = 0  # held by the gateway until the open timeout, then closed
    slowloris_connect_failed: int = 0
    slowloris_still_open_at_end: int = 0
    slowloris_max_lifetime_s: float = 0.0
    slowloris_elapsed_s: float = 0.0
    elapsed_s: float = 0.0
    cpu_s: float = 0.0  # this (attacking) process's CPU time


def _connected_socket_factory(ip: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        sock.bind((ip, 0))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def _open(ip: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = _connected_socket_factory(ip)
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


def _reset(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.transport.abort()


def _upgrade_request(port: int, principal: str) -> bytes:
    return (
        f"GET /ws?token=dev:flood:{principal} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def _read_response(reader: asyncio.StreamReader) -> dict[str, Any]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {
        k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)
    }
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return {
        "status_line": lines[0],
        "headers": headers,
        "body": orjson.loads(body) if body else None,
    }


async def run_flood(port: int, ip: str, duration: float, plan: Plan) -> FloodStats:
    stats = FloodStats()
    loop = asyncio.get_running_loop()
    start = loop.time()
    end = start + duration
    request = _upgrade_request(port, "f")
    interval = 1.0 / plan.flood_rate
    next_slot = [start]

    async def handshake_worker() -> None:
        while True:
            # Pace attempts across workers at plan.flood_rate (the attacker's own pacing).
            slot = next_slot[0]
            next_slot[0] = max(slot, loop.time() - 0.1) + interval
            if slot >= end:
                return
            if slot > loop.time():
                await asyncio.sleep(slot - loop.time())
            stats.attempts += 1
            writer = None
            try:
                async with asyncio.timeout(5):
                    reader, writer = await _open(ip, port)
                    writer.write(request)
                    if stats.sample_429 is None:
                        response = await _read_response(reader)
                        status_line = response["status_line"]
                        if " 429 " in status_line + " ":
                            stats.sample_429 = response
                    else:
                        status_line = (await reader.readline()).decode("latin-1")
            except TimeoutError:
                stats.timed_out += 1
                continue
            except (ConnectionResetError, asyncio.IncompleteReadError, BrokenPipeError):
                stats.dropped += 1
                continue
            except OSError:
                stats.connect_failed += 1
                continue
            finally:
                if writer is not None:
                    _reset(writer)
            parts = status_line.split()
            code = parts[1] if len(parts) > 1 else "none"
            if code == "101":
                stats.upgraded += 1
            elif code == "429":
                stats.rate_limited += 1
            elif code == "none":
                stats.dropped += 1
            else:
                stats.other_status[code] = stats.other_status.get(code, 0) + 1

    async def slowloris(index: int) -> None:
        # The army joins once the handshake flood has had the address's bucket to itself.
        await asyncio.sleep(max(0.0, start + duration * SLOWLORIS_JOINS_AT - loop.time()))
        trickle = index % 2 == 1
        pad = (f"X-Pad-{index}: " + "a" * 4000).encode()
        while loop.time() < end:
            began = loop.time()
            try:
                async with asyncio.timeout(5):
                    reader, writer = await _open(ip, port)
            except (OSError, TimeoutError):
                stats.slowloris_connect_failed += 1
                await asyncio.sleep(0.1)  # the attacker's retry pace
                continue
            stats.slowloris_opened += 1
            closed = False
            try:
                if trickle:
                    writer.write(request.split(b"\r\n", 1)[0] + b"\r\n")
                for byte in pad:
                    if loop.time() >= end:
                        break
                    try:
                        chunk = await asyncio.wait_for(reader.read(4096), 1.0)
                    except TimeoutError:
                        if trickle:
                            writer.write(bytes((byte,)))
                        continue
                    except OSError:
                        closed = True
                        break
                    if not chunk:
                        closed = True
                        break
            finally:
                _reset(writer)
            lifetime = loop.time() - began
            if not closed:
                stats.slowloris_still_open_at_end += 1
                break
            # A socket dropped at accept may first wait in the kernel's accept queue while
            # the gateway is busy; one the gateway held lives to the open timeout.
            if lifetime < 0.9 * plan.open_timeout_s:
                stats.slowloris_dropped_at_accept += 1
                await asyncio.sleep(0.05)  # the attacker's retry pace
            else:
                stats.slowloris_timed_out += 1
                stats.slowloris_max_lifetime_s = max(stats.slowloris_max_lifetime_s, lifetime)

    async with asyncio.TaskGroup() as group:
        for i in range(plan.slowloris):
            group.create_task(slowloris(i))
        for _ in range(plan.flood_workers):
            group.create_task(handshake_worker())
    stats.elapsed_s = loop.time() - start
    stats.slowloris_elapsed_s = stats.elapsed_s * (1.0 - SLOWLORIS_JOINS_AT)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    stats.cpu_s = usage.ru_utime + usage.ru_stime
    return stats


def _flood_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos.floods flood")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ip", default=FLOOD_IP)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--plan", required=True, help="the Plan as JSON")
    args = parser.parse_args(argv)
    raise_nofile()
    # The attacker's CPU is not the gateway's: on a shared machine it yields to the gateway.
    os.nice(19)
    plan = Plan(**json.loads(args.plan))

    async def main() -> FloodStats:
        print(json.dumps({"event": "started"}), flush=True)
        return await run_flood(args.port, args.ip, args.duration, plan)

    stats = asyncio.run(main())
    print(json.dumps({"event": "done", "stats": asdict(stats)}), flush=True)
    return 0


class FloodProcess:
    def __init__(self, port: int, duration: float, plan: Plan) -> None:
        self.args = ["--port", str(port), "--duration", str(duration)]
        self.args += ["--plan", json.dumps(asdict(plan))]
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "chaos.floods", "flood", *self.args,
            cwd=REPO, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            start_new_session=True,
        )  # fmt: skip
        event = await self._next_event(30)
        if event.get("event") != "started":
            raise RuntimeError(f"flood process: {event}")

    async def _next_event(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"flood process exited ({await self.proc.wait()})")
        result: dict[str, Any] = json.loads(line)
        return result

    async def result(self, timeout: float) -> dict[str, Any]:
        event = await self._next_event(timeout)
        stats: dict[str, Any] = event["stats"]
        return stats

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self.proc.wait()


# -- the run --------------------------------------------------------------------------------


class RssSampler:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kb = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                self.peak_kb = max(self.peak_kb, rss_kb(self.pid))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.25)

    async def stop(self) -> int:
        self._stop.set()
        if self._task is not None:
            await self._task
        return self.peak_kb


async def _readyz(port: int) -> int | None:
    from arqonbus_server.gateway.admin.dev import http_status

    return await http_status("127.0.0.1", port, "/readyz", timeout=5.0)


async def run(plan: Plan, workdir: Path) -> dict[str, Any]:
    cluster = LocalCluster(workdir / "nats", nodes=3)
    gateway: GatewayProcess | None = None
    flood: FloodProcess | None = None
    tenant = "floods" + uuid.uuid4().hex[:8]
    env = {"ARQONBUS_LOG_LEVEL": "WARNING", "ARQONBUS_OPEN_TIMEOUT_S": str(plan.open_timeout_s)}
    limits = {
        "conn_rate_per_ip": float(_default("conn_rate_per_ip")),
        "conn_burst_per_ip": int(_default("conn_burst_per_ip")),
        "max_pending_handshakes_per_ip": int(_default("max_pending_handshakes_per_ip")),
        "open_timeout_s": plan.open_timeout_s,
    }
    details: dict[str, Any] = {"plan": asdict(plan), "limits": limits}
    try:
        await cluster.start(timeout=60)
        gateway = GatewayProcess(cluster.url_csv, env=env)
        await gateway.start(timeout=60)
        assert gateway.proc is not None
        pid = gateway.proc.pid
        # A first session creates the tenant's stream, outside the measured phases.
        warm = await WsClient.connect(gateway.url, tenant, "warmup", local_addr=(GOOD_IPS[0], 0))
        await warm.publish(ROOM, CHANNEL, {"warm": True})
        await warm.close()

        details["rss_start_kb"] = rss_kb(pid)
        cpu_before, wait_before = cpu_s(pid), runqueue_wait_s(pid)
        baseline = await run_population(gateway.url, tenant, "b", plan)
        details["gateway_cpu_baseline_s"] = round(cpu_s(pid) - cpu_before, 2)
        details["gateway_cpu_wait_baseline_s"] = round(runqueue_wait_s(pid) - wait_before, 2)
        details["baseline"] = baseline.summary()
        details["rss_after_baseline_kb"] = rss_kb(pid)

        flood_s = plan.population_s + 4.0
        flood = FloodProcess(gateway.port, flood_s, plan)
        sampler = RssSampler(pid)
        sampler.start()
        await flood.start()
        cpu_before, wait_before = cpu_s(pid), runqueue_wait_s(pid)
        under_flood = await run_population(gateway.url, tenant, "u", plan)
        details["gateway_cpu_under_flood_s"] = round(cpu_s(pid) - cpu_before, 2)
        details["gateway_cpu_wait_under_flood_s"] = round(runqueue_wait_s(pid) - wait_before, 2)
        details["under_flood"] = under_flood.summary()
        details["flood"] = await flood.result(flood_s + 60)
        details["rss_peak_during_flood_kb"] = await sampler.stop()
        details["readyz_after"] = await _readyz(gateway.port)
        details["rss_end_kb"] = rss_kb(pid)
        details["gateway_alive"] = gateway.proc.returncode is None
    finally:
        if flood is not None:
            await flood.stop()
        if gateway is not None:
            if gateway.proc is not None and gateway.proc.returncode is not None:
                details["gateway_log"] = await gateway.stderr()
            await gateway.stop()
        await cluster.stop()
    details["checks"] = evaluate(details, baseline, under_flood, limits)
    return details


def evaluate(
    details: dict[str, Any],
    baseline: PopulationResult,
    under_flood: PopulationResult,
    limits: dict[str, Any],
) -> list[dict[str, Any]]:
    flood = details["flood"]
    checks: list[dict[str, Any]] = []

    def check(what: str, ok: bool, observed: str) -> None:
        checks.append({"what": what, "ok": bool(ok), "observed": observed})

    allowed = limits["conn_burst_per_ip"] + limits["conn_rate_per_ip"] * flood["elapsed_s"]
    check(
        "flood upgrades refused with 429 beyond the address's bucket",
        flood["rate_limited"] > 0 and flood["upgraded"] <= allowed * 1.02 + 5,
        f"{flood['upgraded']} upgraded (bucket allows {allowed:.0f}), "
        f"{flood['rate_limited']} got 429, {flood['dropped']} dropped of {flood['attempts']}",
    )
    sample = flood.get("sample_429") or {}
    body = sample.get("body") or {}
    headers = sample.get("headers") or {}
    check(
        "429 carries rate_limited, retry_after_ms and Retry-After",
        body.get("error") == "rate_limited"
        and isinstance(body.get("retry_after_ms"), int)
        and str(headers.get("retry-after", "")).isdigit(),
        f"body {body.get('error')!r}, retry_after_ms {body.get('retry_after_ms')!r}, "
        f"Retry-After {headers.get('retry-after')!r}",
    )
    cap = limits["max_pending_handshakes_per_ip"]
    timeout = limits["open_timeout_s"]
    # Each of the cap's slots holds at most one socket per open timeout.
    most_held = cap * (math.ceil(flood["slowloris_elapsed_s"] / timeout) + 1)
    check(
        "slowloris sockets beyond the pending cap dropped at accept",
        flood["slowloris_dropped_at_accept"] > 0 and flood["slowloris_timed_out"] <= most_held,
        f"{flood['slowloris_dropped_at_accept']} dropped at accept; "
        f"{flood['slowloris_timed_out']} held to the open timeout (the cap of {cap} allows "
        f"at most {most_held})",
    )
    check(
        "held slowloris sockets closed at the open timeout",
        flood["slowloris_timed_out"] > 0 and flood["slowloris_max_lifetime_s"] <= timeout + 5.0,
        f"{flood['slowloris_timed_out']} closed by the gateway, longest lived "
        f"{flood['slowloris_max_lifetime_s']:.1f} s (open timeout {timeout:g} s)",
    )
    for label, pop in (("baseline", baseline), ("under flood", under_flood)):
        check(
            f"well-behaved clients all connected and acked ({label})",
            pop.attempted > 0 and pop.acked == pop.attempted,
            f"{pop.acked}/{pop.attempted}"
            + (f"; first error: {pop.errors[0]}" if pop.errors else ""),
        )
    base_p99 = percentile(baseline.latencies_s, 0.99)
    flood_p99 = percentile(under_flood.latencies_s, 0.99)
    bound = max(LATENCY_FACTOR * base_p99, base_p99 + LATENCY_FLOOR_S)
    check(
        "well-behaved p99 connect latency within bounds under the flood",
        flood_p99 <= bound,
        f"p99 {flood_p99 * 1000:.1f} ms vs baseline {base_p99 * 1000:.1f} ms "
        f"(bound {bound * 1000:.0f} ms)",
    )
    check(
        "gateway alive and ready after the flood",
        details.get("gateway_alive") is True and details.get("readyz_after") == 200,
        f"alive {details.get('gateway_alive')}, /readyz {details.get('readyz_after')}",
    )
    return checks


def summary_markdown(details: dict[str, Any], passed: bool) -> str:
    b, u, f = details.get("baseline", {}), details.get("under_flood", {}), details.get("flood", {})
    lim = details.get("limits", {})
    lines = [
        f"### Floods: {'PASS' if passed else 'FAIL'}",
        "",
        f"Gateway limits: {lim.get('conn_rate_per_ip')}/s per address, burst "
        f"{lim.get('conn_burst_per_ip')}, {lim.get('max_pending_handshakes_per_ip')} pending "
        f"handshakes per address, open timeout {lim.get('open_timeout_s')} s.",
        "",
        "| well-behaved | clients | success | connect p50 | connect p99 |",
        "|---|---|---|---|---|",
    ]
    for label, pop in (("baseline", b), ("under flood", u)):
        if pop:
            lines.append(
                f"| {label} | {pop['attempted']} | {pop['success_rate'] * 100:.1f}% | "
                f"{pop['connect_p50_ms']} ms | {pop['connect_p99_ms']} ms |"
            )
    if f:
        lines += [
            "",
            f"Flood from {FLOOD_IP} over {f['elapsed_s']:.0f} s: {f['attempts']} handshakes, "
            f"{f['rate_limited']} got 429, {f['upgraded']} upgraded, {f['dropped']} dropped; "
            f"slowloris: {f['slowloris_opened']} sockets, {f['slowloris_dropped_at_accept']} "
            f"dropped at accept, {f['slowloris_timed_out']} held to the open timeout and closed.",
        ]
    if "gateway_cpu_under_flood_s" in details and f:
        phase = details["plan"]["population_s"]
        lines += [
            "",
            f"Gateway CPU: {details['gateway_cpu_baseline_s']} s in the baseline phase, "
            f"{details['gateway_cpu_under_flood_s']} s under the flood (phases of about "
            f"{phase:g} s); waiting for a CPU: "
            f"{details['gateway_cpu_wait_baseline_s']} s and "
            f"{details['gateway_cpu_wait_under_flood_s']} s. "
            f"The attacking process used {f['cpu_s']:.1f} s.",
        ]
    if "rss_start_kb" in details:
        lines += [
            "",
            f"Gateway RSS: {details['rss_start_kb'] / 1024:.0f} MB at start, "
            f"{details.get('rss_peak_during_flood_kb', 0) / 1024:.0f} MB peak under the flood, "
            f"{details.get('rss_end_kb', 0) / 1024:.0f} MB at the end.",
        ]
    failed = [c for c in details.get("checks", []) if not c["ok"]]
    if failed:
        lines += ["", "Failed checks:"] + [f"- {c['what']}: {c['observed']}" for c in failed]
    if details.get("error"):
        lines += ["", f"Error: {details['error']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["flood"]:
        return _flood_main(argv[1:])
    args = parse_suite_args(
        "python -m chaos.floods", __doc__, "the full run (about 3 minutes)", argv
    )
    raise_nofile()
    plan = Plan.make(args.long)
    workdir = REPO / ".chaos" / f"floods-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        details = asyncio.run(run(plan, workdir))
        passed = all(c["ok"] for c in details["checks"])
    except Exception as exc:
        details = {"plan": asdict(plan), "error": f"{type(exc).__name__}: {exc}"}
        passed = False
    details["duration_s"] = round(time.monotonic() - started, 1)
    if passed:
        shutil.rmtree(workdir, ignore_errors=True)  # NATS data; kept after a failure
    result = {
        "name": NAME,
        "passed": passed,
        "summary_md": summary_markdown(details, passed),
        "details": details,
    }
    return finish(args.json, result)


if __name__ == "__main__":
    sys.exit(main())
