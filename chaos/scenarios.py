"""The fault scenarios of ``make chaos`` (see docs/reliability.md for the table).

Each scenario starts its own mesh (a real 3-node JetStream cluster, R3, ``sync_interval:
always``, and two or more gateway processes), puts steady SDK load on several channels of
several tenants, injects its fault on processes it started, then stops the load, waits for
every subscriber to catch up, reads the store back and checks the ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import socket as socketlib
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import orjson
from nats.aio.msg import Msg
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from arqonbus import Client
from arqonbus_server.mesh.local import LocalCluster
from chaos.mesh import Mesh, http_json
from chaos.netns import NetnsCluster
from chaos.procfs import rss_bytes
from chaos.proxy import FaultProxy
from chaos.regions import RegionMesh, region_loss, region_tenants
from chaos.workload import ChannelRef, Totals, Workload, percentile, read_store
from tests.support import GatewayProcess


@dataclass(frozen=True)
class Plan:
    """How long and how hard: ``short`` for ``make test``, ``long`` for ``make chaos``."""

    long: bool = False
    seed: int = 0
    tenants: int = 2
    channels_per_tenant: int = 2
    rate: float = 40.0  # publishes/s per channel

    def scale(self, short: float, long: float) -> float:
        return long if self.long else short


@dataclass
class Check:
    what: str
    ok: bool
    observed: str


@dataclass
class Outcome:
    number: int
    name: str
    fault: str
    criterion: str
    totals: Totals = field(default_factory=Totals)
    resume: list[float] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    measures: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0
    error: str | None = None
    # Checks that need the final outcome of every publish: run after the load stopped.
    after_settle: list[Callable[[], None]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.error is None and self.totals.ok and all(c.ok for c in self.checks)

    def check(self, what: str, ok: bool, observed: str) -> None:
        self.checks.append(Check(what, ok, observed))

    def as_dict(self) -> dict[str, Any]:
        t = self.totals
        return {
            "number": self.number,
            "name": self.name,
            "fault": self.fault,
            "criterion": self.criterion,
            "passed": self.passed,
            "error": self.error,
            "sent": t.sent,
            "acked": t.acked,
            "failed": t.failed,
            "acked_late": t.acked_late,
            "delivered": t.delivered,
            "lost": t.lost,
            "duplicated": t.duplicated,
            "out_of_order": t.out_of_order,
            "unacked_delivered": t.unacked_delivered,
            "phantom": t.phantom,
            "gaps": t.gaps,
            "stored_duplicates": t.stored_duplicates,
            "subscriber_errors": t.subscriber_errors,
            "examples": t.examples,
            "resume_p50_s": percentile(self.resume, 0.5) if self.resume else None,
            "resume_max_s": max(self.resume) if self.resume else None,
            "resume_n": len(self.resume),
            "checks": [c.__dict__ for c in self.checks],
            "measures": self.measures,
            "duration_s": round(self.duration_s, 1),
        }


def channels_for(plan: Plan) -> list[ChannelRef]:
    run = uuid.uuid4().hex[:6]
    return [
        ChannelRef(f"t{run}{t}", "plant", f"line{c}")
        for t in range(plan.tenants)
        for c in range(plan.channels_per_tenant)
    ]


FaultFn = Callable[[Any, Workload, Plan, Outcome], Awaitable[None]]


async def run_scenario(
    outcome: Outcome,
    plan: Plan,
    workdir: Path,
    fault: FaultFn,
    *,
    gateways: int = 2,
    mesh: Mesh | RegionMesh | None = None,
    gateway_env: dict[str, str] | None = None,
    warmup_events: int = 20,
    channels: list[ChannelRef] | None = None,
    workload_factory: Callable[[list[str], list[ChannelRef]], Workload] | None = None,
) -> Outcome:
    """Mesh up, load on, fault, load off, catch up, check. Never raises: errors are recorded."""
    started = time.monotonic()
    mesh = mesh or Mesh(workdir, gateways=gateways, gateway_env=gateway_env)
    channels = channels or channels_for(plan)
    make_workload = workload_factory or (lambda urls, refs: Workload(urls, refs, rate=plan.rate))
    workload: Workload | None = None
    try:
        if not mesh.gateways:
            await mesh.start()
        workload = make_workload(mesh.urls, channels)
        await workload.start()
        wl = workload
        if not await wl.wait_until(
            lambda: all(len(s.ids) >= warmup_events for s in wl.subscribers), 60
        ):
            raise RuntimeError("the load did not start flowing within 60 s")
        await fault(mesh, wl, plan, outcome)
        await wl.stop_publishing()
        await wl.settle(timeout=90)
        for check in outcome.after_settle:
            check()
        stored = await read_store(mesh.urls, channels)
        outcome.totals = wl.check(stored)
        await check_stream_counts(mesh, channels, stored, outcome)
    except Exception as exc:  # a scenario that cannot finish is a failed scenario, with why
        outcome.error = f"{type(exc).__name__}: {exc}"
        if workload is not None:
            outcome.totals = workload.check()
    finally:
        if workload is not None:
            await workload.close()
        await mesh.stop()
        outcome.duration_s = time.monotonic() - started
    return outcome


async def check_stream_counts(
    mesh: Mesh | RegionMesh,
    channels: list[ChannelRef],
    stored: dict[ChannelRef, list[tuple[int, str]]],
    outcome: Outcome,
) -> None:
    """Each tenant stream holds exactly the events read back: count = unique ids."""
    nc = await nats.connect(servers=mesh.cluster.urls, connect_timeout=5, max_reconnect_attempts=2)
    try:
        js = nc.jetstream()
        for tenant in sorted({ref.tenant for ref in channels}):
            info = await js.stream_info(mesh.scheme.stream_name(tenant))
            ids = {i for ref in channels if ref.tenant == tenant for _, i in stored[ref]}
            outcome.check(
                f"stream of {tenant}: stored count = unique ids",
                info.state.messages == len(ids),
                f"{info.state.messages} stored, {len(ids)} unique ids",
            )
    finally:
        await nc.close()


# -- 1. gateway crash -----------------------------------------------------------------------


async def gateway_crash(mesh: Mesh, wl: Workload, plan: Plan, outcome: Outcome) -> None:
    rounds = int(plan.scale(1, 5))
    for _ in range(rounds):
        urls = wl.client_urls()
        victim = max(
            range(len(mesh.gateways)), key=lambda i: sum(u == mesh.urls[i] for u in urls.values())
        )
        victim_url = mesh.urls[victim]
        affected = {name for name, url in urls.items() if url == victim_url}
        fault_at = time.time()
        await mesh.kill_gateway(victim)
        resumed = await wl.wait_until(wl.progressed_after(fault_at, affected), 30)
        moved = [n for n in affected if wl.clients[n].url != victim_url]
        outcome.check(
            "clients of the killed gateway moved to another one",
            resumed and len(moved) == len(affected),
            f"{len(moved)} of {len(affected)} moved",
        )
        outcome.resume += wl.resume_times(fault_at, affected)
        await mesh.restart_gateway(victim)
        # Some steady load with the whole mesh back before the next round.
        back = time.time() + plan.scale(0, 3)
        await wl.wait_until(wl.delivered_after(back), 30)
    worst = max(outcome.resume, default=float("inf"))
    outcome.check(
        "resume ≤ 5 s", worst <= 5.0, f"max {worst:.2f} s over {len(outcome.resume)} clients"
    )
    outcome.measures["rounds"] = rounds


# -- 2. rolling restart ---------------------------------------------------------------------


async def rolling_restart(mesh: Mesh, wl: Workload, plan: Plan, outcome: Outcome) -> None:
    codes = []
    for i in range(len(mesh.gateways)):
        urls = wl.client_urls()
        affected = {name for name, url in urls.items() if url == mesh.urls[i]}
        fault_at = time.time()
        codes.append(await mesh.drain_gateway(i))
        await wl.wait_until(wl.progressed_after(fault_at, affected), 30)
        outcome.resume += wl.resume_times(fault_at, affected)
        await mesh.restart_gateway(i)
        back = time.time() + plan.scale(0, 3)
        await wl.wait_until(wl.delivered_after(back), 30)
    outcome.check(
        "every gateway drained and exited 0", codes == [0] * len(codes), f"exit codes {codes}"
    )
    outcome.measures["gateways_restarted"] = len(codes)


# -- 3. NATS node bounce --------------------------------------------------------------------


async def nats_bounce(mesh: Mesh, wl: Workload, plan: Plan, outcome: Outcome) -> None:
    rng = random.Random(plan.seed)
    duration = plan.scale(12, 60)
    deadline = time.monotonic() + duration
    bounces = 0
    recoveries = []
    nodes = len(mesh.cluster.urls)
    while time.monotonic() < deadline and bounces < 100:
        victim = rng.randrange(nodes)
        fault_at = time.time()
        await mesh.cluster.kill_node(victim, signal.SIGKILL)
        # The load must go on with one node down: wait until fresh events reach everyone.
        flowing = await wl.wait_until(wl.delivered_after(fault_at), 30)
        recoveries.append(time.time() - fault_at if flowing else float("inf"))
        await mesh.cluster.start_node(victim, timeout=60)
        bounces += 1
        # A few seconds of steady load between bounces.
        settle_at = time.time() + plan.scale(1.5, 3)
        await wl.wait_until(wl.delivered_after(settle_at), 30)
    outcome.measures["bounces"] = bounces
    outcome.measures["flowing_again_p50_s"] = percentile(recoveries, 0.5)
    outcome.measures["flowing_again_max_s"] = max(recoveries, default=None)
    outcome.resume += recoveries
    outcome.check(
        "load kept flowing after every kill", all(r < 30 for r in recoveries), f"{bounces} bounces"
    )


# -- 4. whole-cluster restart ---------------------------------------------------------------


async def cluster_restart(mesh: Mesh, wl: Workload, plan: Plan, outcome: Outcome) -> None:
    cluster = mesh.cluster
    nodes = len(cluster.urls)
    fault_at = time.time()
    await asyncio.gather(*(cluster.kill_node(i, signal.SIGKILL) for i in range(nodes)))
    # Publishes wait (the SDK retries `unavailable`) while nothing runs; then all come back.
    down_for = plan.scale(2, 5)
    await asyncio.sleep(down_for)  # the outage's length is the fault, not a synchronization
    await asyncio.gather(*(cluster.start_node(i, wait_ready=False) for i in range(nodes)))
    if isinstance(cluster, LocalCluster):
        await cluster.wait_placement(timeout=60)
    restarted_at = time.time()
    flowing = await wl.wait_until(wl.delivered_after(restarted_at), 60)
    outcome.resume += wl.resume_times(fault_at)
    outcome.measures["outage_s"] = down_for
    outcome.measures["flowing_after_restart_s"] = round(time.time() - restarted_at, 2)
    outcome.check(
        "load flowing again after the restart",
        flowing,
        f"within {time.time() - restarted_at:.1f} s",
    )


# -- 5. stream-leader pause -----------------------------------------------------------------

ELECTION_BOUND_S = 10.0


async def leader_pause(mesh: Mesh, wl: Workload, plan: Plan, outcome: Outcome) -> None:
    cluster = mesh.cluster
    assert isinstance(cluster, LocalCluster)
    tenants = sorted({p.ref.tenant for p in wl.publishers})
    leaders = {t: await mesh.stream_leader(t) for t in tenants}
    names = [spec.name for spec in cluster.specs]
    victim_name = leaders[tenants[0]]
    assert victim_name is not None
    victim = names.index(victim_name)
    led = [t for t, leader in leaders.items() if leader == victim_name]
    others = [url for i, url in enumerate(cluster.urls) if i != victim]
    elected: dict[str, float] = {}
    nc = await nats.connect(servers=others, connect_timeout=5, max_reconnect_attempts=-1)
    try:

        async def on_elected(msg: Msg) -> None:
            stream = msg.subject.rsplit(".", 1)[-1]
            elected.setdefault(stream, time.time())

        sub = await nc.subscribe("$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.*", cb=on_elected)
        await nc.flush()
        pause_s = 10.0  # the scenario's pause; NATS elects a new leader after 4-9 s of silence
        fault_at = time.time()
        cluster.pause_node(victim)
        try:
            await asyncio.sleep(pause_s)  # the pause's length is the fault, not a synchronization
        finally:
            cluster.resume_node(victim)
        await sub.unsubscribe()
    finally:
        await nc.close()
    streams = {mesh.scheme.stream_name(t): t for t in led}
    times = {t: elected[s] - fault_at for s, t in streams.items() if s in elected}
    worst = max(times.values(), default=float("inf"))
    # nats-server's followers campaign after a random 4-9 s without the leader's heartbeat
    # (raft.go's minElectionTimeoutDefault..maxElectionTimeoutDefault, not configurable),
    # plus up to 0.8 s of campaign: 10 s is the most an election takes by design.
    outcome.check(
        "a new leader within 10 s (NATS's election timeout) for every stream the paused node led",
        len(times) == len(led) and worst <= ELECTION_BOUND_S,
        f"{len(times)} of {len(led)} re-elected, slowest {worst:.2f} s",
    )
    window = (fault_at, fault_at + pause_s)

    def publishes_during_pause() -> None:
        during = [
            (p, i)
            for p in wl.publishers
            for i, t in p.sent_times.items()
            if window[0] <= t < window[1]
        ]
        late = sum(1 for p, i in during if i in p.acked and p.ack_times[i] - p.sent_times[i] > 1.0)
        failed = sum(1 for p, i in during if i in p.failed)
        unresolved = sum(1 for p, i in during if i not in p.acked and i not in p.failed)
        outcome.check(
            "every publish sent during the pause was acked (late) or failed with a code",
            unresolved == 0,
            f"{len(during)} sent: {len(during) - failed - unresolved} acked ({late} late), "
            f"{failed} failed, {unresolved} unresolved",
        )
        outcome.measures["sent_during_pause"] = len(during)
        outcome.measures["acked_late_during_pause"] = late
        outcome.measures["failed_during_pause"] = failed

    outcome.after_settle.append(publishes_during_pause)
    outcome.measures["paused_node"] = victim_name
    outcome.measures["pause_s"] = pause_s
    outcome.measures["election_s"] = {t: round(v, 2) for t, v in times.items()}
    outcome.resume += wl.resume_times(fault_at)


# -- 6. partition ----------------------------------------------------------------------------


async def partition(mesh: Mesh, wl: Workload, plan: Plan, outcome: Outcome) -> None:
    cluster = mesh.cluster
    assert isinstance(cluster, NetnsCluster)
    stream = mesh.scheme.stream_name(wl.channels[0].tenant)
    leader = await cluster.stream_leader(stream)
    if leader is None:
        raise RuntimeError(f"no leader for {stream} before the partition")
    before = await cluster.node_stream_state(leader, stream)
    cut_at = time.time()
    await cluster.partition(leader)
    # The majority elects a new leader (NATS: after 4-9 s of silence) and goes on acking.
    new_leader = await cluster.wait_stream_leader(stream, exclude=[leader], timeout=40)
    elected_s = time.time() - cut_at
    # The minority acks nothing: a publish through the cut node alone gets no ack.
    probes, acked_by_minority = 3, 0
    async with cluster.connect(leader) as nc:
        js = nc.jetstream(timeout=2)
        ref = wl.channels[0]
        # The probe is a raw NATS publish on the channel's stored subject, not an SDK event.
        subject = f"{mesh.scheme.prefix}.ev.{ref.tenant}.{ref.room}.{ref.channel}"
        for n in range(probes):
            try:
                await js.publish(
                    subject,
                    b"{}",
                    headers={"Nats-Msg-Id": f"minority-probe-{n}"},
                )
                acked_by_minority += 1
            except (TimeoutError, nats.errors.Error):
                pass
    # Keep the cut for a while under load (long: past the old leader's step-down).
    hold_until = cut_at + plan.scale(12, 25)
    await wl.wait_until(wl.delivered_after(hold_until), hold_until - time.time() + 30)
    cut_state = await cluster.node_stream_state(leader, stream)
    healed_at = time.time()
    await cluster.heal(leader)
    majority = await cluster.node_stream_state(new_leader, stream)
    assert majority is not None
    # Converges: the cut node's own copy reaches the majority's (the load goes on meanwhile,
    # so wait for at least the seq the majority had at the heal).
    # Bounded poll of the cut node's own copy (its monitoring endpoint has no event stream).
    converged = False
    for _ in range(600):
        with contextlib.suppress(OSError, TimeoutError, ValueError):
            state = await cluster.node_stream_state(leader, stream)
            if state is not None and state.last_seq >= majority.last_seq:
                converged = True
                break
        await asyncio.sleep(0.1)
    converge_s = time.time() - healed_at
    outcome.check(
        "the minority acked nothing",
        acked_by_minority == 0,
        f"{acked_by_minority} of {probes} publishes through the cut node acked; its copy "
        f"{before.last_seq if before else '?'} -> {cut_state.last_seq if cut_state else '?'} while cut",
    )
    outcome.check(
        "the majority elected a new leader and converged after the heal",
        converged,
        f"new leader after {elected_s:.1f} s; cut node caught up to seq {majority.last_seq} "
        f"{converge_s:.1f} s after the heal",
    )
    outcome.resume += wl.resume_times(cut_at)
    outcome.measures.update(
        cut_node=cluster.specs[leader].name,
        new_leader=cluster.specs[new_leader].name,
        election_s=round(elected_s, 2),
        converge_s=round(converge_s, 2),
    )


async def _run_partition(plan: Plan, workdir: Path) -> Outcome:
    cluster = NetnsCluster(workdir / "nats", nodes=3)
    mesh = Mesh(workdir, gateways=2, cluster=cluster)
    outcome = Outcome(*_DESCRIPTIONS[6])
    try:
        await cluster.start(timeout=60)
        await mesh.start()
    except Exception as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
        await mesh.stop()
        await cluster.stop()
        return outcome
    try:
        return await run_scenario(outcome, plan, workdir, partition, mesh=mesh)
    finally:
        await cluster.stop()


# -- 7. gateway<->NATS link trouble --------------------------------------------------------


class UnadvertisedCluster(LocalCluster):
    """A LocalCluster whose nodes don't advertise peers' client URLs.

    So a gateway given proxy URLs only ever reconnects through the proxies: NATS clients add
    advertised URLs to their server pool, which would let a reconnect go around the faults.
    """

    def _write_configs(self) -> None:
        super()._write_configs()
        for spec in self.specs:
            text = spec.config_path.read_text()
            spec.config_path.write_text(
                text.replace("cluster {\n", "cluster {\n  no_advertise: true\n")
            )


async def _readyz(gateway: GatewayProcess) -> int:
    try:
        status, _ = await http_json("127.0.0.1", gateway.port, "/readyz")
    except (OSError, TimeoutError, ValueError):
        return 0
    return status


async def _wait_readyz(gateway: GatewayProcess, want: int, timeout: float) -> float | None:
    """Seconds until /readyz answers ``want``; None on timeout.

    A bounded poll (every 50 ms): readiness is only visible through the endpoint, which is
    exactly what a load balancer polls.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(int(timeout / 0.05) + 1):
        if await _readyz(gateway) == want:
            return loop.time() - started
        await asyncio.sleep(0.05)
    return None


async def link_trouble(mesh: Mesh, wl: Workload, plan: Plan, outcome: Outcome) -> None:
    proxies: list[FaultProxy] = mesh.extras["proxies"]
    gateway = mesh.gateways[0]
    interval = float(mesh.gateway_env["ARQONBUS_HEALTH_INTERVAL_S"])
    phase_s = plan.scale(3, 8)

    # Delay: slower, but healthy; nothing moves.
    for proxy in proxies:
        proxy.delay(100)
    delay_from = time.time()
    await wl.wait_until(wl.delivered_after(delay_from + phase_s), phase_s + 30)
    for proxy in proxies:
        proxy.passthrough()
    outcome.measures["delay_phase_p99_ms"] = round(
        percentile(wl.latencies_between(delay_from, time.time()), 0.99), 1
    )

    # Reset: every gateway<->NATS connection gets an RST; the NATS client reconnects.
    reset_at = time.time()
    resets = sum([await proxy.reset() for proxy in proxies])
    flowing = await wl.wait_until(wl.delivered_after(reset_at), 30)
    outcome.measures["reset_connections"] = resets
    outcome.check("load flows again after the reset", flowing, f"{resets} connection(s) reset")

    # Stall: a black hole. /readyz must turn 503 within 2 health intervals, clients move away.
    urls = wl.client_urls()
    affected = {name for name, url in urls.items() if url == gateway.url}
    stall_at = time.time()
    for proxy in proxies:
        proxy.stall()
    unready_after = await _wait_readyz(gateway, 503, 30)
    outcome.check(
        f"/readyz 503 within 2 health intervals ({2 * interval:g} s)",
        unready_after is not None and unready_after <= 2 * interval,
        f"after {unready_after:.2f} s" if unready_after is not None else "not within 30 s",
    )
    moved = await wl.wait_until(
        lambda: all(wl.clients[n].url not in (None, gateway.url) for n in affected), 30
    )
    resumed = await wl.wait_until(wl.progressed_after(stall_at, affected), 30)
    outcome.resume += wl.resume_times(stall_at, affected)
    outcome.check(
        "clients of the stalled gateway moved to another and resumed",
        moved and resumed,
        f"{len(affected)} clients; moved {moved}, resumed {resumed}",
    )
    await wl.wait_until(wl.delivered_after(time.time() + phase_s), phase_s + 30)
    for proxy in proxies:
        proxy.passthrough()
    ready_after = await _wait_readyz(gateway, 200, 60)
    outcome.check(
        "/readyz back to 200 after the link heals",
        ready_after is not None,
        f"after {ready_after:.2f} s" if ready_after is not None else "not within 60 s",
    )


async def _run_link_trouble(plan: Plan, workdir: Path) -> Outcome:
    cluster = UnadvertisedCluster(workdir / "nats", nodes=3)
    await cluster.start(timeout=60)
    proxies = []
    for spec in cluster.specs:
        proxies.append(await FaultProxy(spec.host, spec.client_port).start())
    mesh = Mesh(workdir, gateways=2, cluster=cluster)
    mesh.extras["proxies"] = proxies
    try:
        await mesh.start(nats_urls=[",".join(p.url for p in proxies), cluster.url_csv])
    except BaseException:
        await cluster.stop()
        raise
    outcome = Outcome(*_DESCRIPTIONS[7])
    try:
        return await run_scenario(outcome, plan, workdir, link_trouble, mesh=mesh)
    finally:
        for proxy in proxies:
            await proxy.close()
        await cluster.stop()


# -- 8. slow reader -------------------------------------------------------------------------

FIREHOSE_BYTES = 32 * 1024  # payload of each firehose event
FIREHOSE_RATE = 100.0  # events/s: about 3.2 MB/s, so a reader that stops falls behind fast
# Publishes of the firehose awaiting their ack at once: the rate holds when the store is slow
# to ack (one at a time, a 50 ms ack halves it, and a stalled reader might not overflow).
FIREHOSE_IN_FLIGHT = 20


async def _firehose(wl: Workload, ref: ChannelRef, stop: asyncio.Event) -> int:
    """Big events on ``ref`` at FIREHOSE_RATE until ``stop``; returns how many were acked."""
    blob = "f" * FIREHOSE_BYTES
    acked = 0
    in_flight: set[asyncio.Task[None]] = set()
    failures: list[BaseException] = []  # a publish that failed ends the firehose with it

    async def publish(client: Client, n: int) -> None:
        nonlocal acked
        await client.publish(ref.room, ref.channel, {"n": n, "blob": blob}, id=f"fh-{n}")
        acked += 1

    def done(task: asyncio.Task[None]) -> None:
        in_flight.discard(task)
        error = None if task.cancelled() else task.exception()
        if error is not None:
            failures.append(error)

    async with Client(wl.urls, f"dev:{ref.tenant}:firehose", request_timeout=30) as client:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        for n in range(int(FIREHOSE_RATE * 600)):
            if stop.is_set() or failures:
                break
            if len(in_flight) >= FIREHOSE_IN_FLIGHT:
                await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            task = asyncio.create_task(publish(client, n))
            in_flight.add(task)
            task.add_done_callback(done)
            next_at = max(next_at + 1 / FIREHOSE_RATE, loop.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), next_at - loop.time())  # pacing the load
        await asyncio.gather(*in_flight, return_exceptions=True)  # done() keeps failures
    if failures:
        raise failures[0]
    return acked


async def _drain_fast(url: str, ref: ChannelRef, stop: asyncio.Event) -> int:
    """A well-behaved reader of the firehose: present in both phases, so they cost the same."""
    count = 0
    async with Client([url], f"dev:{ref.tenant}:fastreader") as client:
        subscription = await client.subscribe(ref.room, ref.channel).start(timeout=30)
        async with subscription:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await subscription.__anext__()
                        count += 1
    return count


async def _slow_reader(url: str, ref: ChannelRef, stall_s: float) -> dict[str, Any]:
    """Join the firehose, stop reading for ``stall_s``, then read what is left until the close."""
    host, port = url.removeprefix("ws://").split("/")[0].split(":")
    sock = socketlib.socket(socketlib.AF_INET, socketlib.SOCK_STREAM)
    sock.setsockopt(socketlib.SOL_SOCKET, socketlib.SO_RCVBUF, 32 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    headers = {"Authorization": f"Bearer dev:{ref.tenant}:slowpoke"}
    async with ws_connect(
        url, sock=sock, additional_headers=headers, max_queue=1, ping_interval=None, max_size=None
    ) as ws:
        await ws.recv()  # welcome
        join = {
            "version": "1.0", "id": f"j{uuid.uuid4().hex[:8]}", "type": "command", "room": ref.room,
            "channel": ref.channel, "payload": {"command": "join_channel", "parameters": {}},
        }  # fmt: skip
        await ws.send(orjson.dumps(join).decode())
        reply = orjson.loads(await ws.recv())
        if reply.get("payload", {}).get("status") != "success":
            raise RuntimeError(f"the slow reader could not join: {reply}")
        stalled_at = time.time()
        await asyncio.sleep(stall_s)  # the fault: this client reads nothing for stall_s
        frames = 0
        with contextlib.suppress(ConnectionClosed, TimeoutError):
            async with asyncio.timeout(30):
                async for _ in ws:
                    frames += 1
        return {
            "code": ws.close_code,
            "reason": ws.close_reason,
            "frames_after_stall": frames,
            "closed_after_s": round(time.time() - stalled_at, 2),
        }


async def slow_reader(mesh: Mesh, wl: Workload, plan: Plan, outcome: Outcome) -> None:
    readers = int(plan.scale(2, 5))
    phase_s = plan.scale(5, 15)
    ref = ChannelRef(f"{wl.channels[0].tenant}fh", "plant", "firehose")  # a tenant of its own
    target = mesh.gateways[0]
    assert target.proc is not None
    stop = asyncio.Event()
    fast = asyncio.create_task(_drain_fast(target.url, ref, stop))
    hose = asyncio.create_task(_firehose(wl, ref, stop))
    try:
        rss_before = rss_bytes(target.proc.pid)
        baseline_from = time.time()
        await asyncio.sleep(phase_s)  # phase A: the baseline, firehose and fast reader only
        fault_from = time.time()
        peak = rss_before
        slow = [asyncio.create_task(_slow_reader(target.url, ref, 3.0)) for _ in range(readers)]
        while not all(t.done() for t in slow) and time.time() - fault_from < phase_s + 40:
            peak = max(peak, rss_bytes(target.proc.pid))
            await asyncio.wait(slow, timeout=0.2)  # sampling the gateway's memory
        results = await asyncio.gather(*slow)
        fault_to = time.time()
        rss_after = rss_bytes(target.proc.pid)
    finally:
        stop.set()
        firehose_acked = await hose
        fast_count = await fast
    baseline = wl.latencies_between(baseline_from, fault_from)
    during = wl.latencies_between(fault_from, fault_to)
    # The short run (make test) has about 1,000 deliveries a phase on two cores it shares
    # with the rest of the suite: its p99 is the 10th slowest, which one scheduler stall of
    # tens of ms sets. It checks p90 instead (100 deliveries): a gateway held up by its slow
    # readers delays most deliveries for the stall's 3 s, which any tail shows.
    tail = 0.99 if plan.long else 0.9
    name = f"p{tail * 100:g}"
    tail_a, tail_b = percentile(baseline, tail), percentile(during, tail)
    codes = [r["code"] for r in results]
    growth_mb = (peak - rss_before) / 2**20
    budget_mb = readers * 2 * 1 + 32  # send buffers (1 MiB each, doubled for slack) + 32 MiB
    outcome.check(
        "every slow reader closed with the resume code 4001",
        codes == [4001] * readers,
        f"close codes {codes}",
    )
    outcome.check(
        "gateway memory bounded",
        growth_mb <= budget_mb,
        f"RSS {rss_before / 2**20:.0f} MiB -> peak {peak / 2**20:.0f} MiB (+{growth_mb:.0f}, budget {budget_mb})",
    )
    # The short run also allows 25 ms on top: a few ms of scheduler noise would swamp a
    # ratio of small latencies.
    slack_ms = 0.0 if plan.long else 25.0
    outcome.check(
        f"other clients' {name} within 2x of the baseline"
        + ("" if plan.long else f" (+{slack_ms:g} ms for a shared machine)"),
        tail_b <= 2 * tail_a + slack_ms,
        f"{name} {tail_a:.1f} ms -> {tail_b:.1f} ms ({len(baseline)} / {len(during)} deliveries)",
    )
    outcome.measures.update(
        slow_readers=results,
        rss_after_mib=round(rss_after / 2**20, 1),
        firehose_acked=firehose_acked,
        firehose_fast_reader_got=fast_count,
        p50_ms=[round(percentile(baseline, 0.5), 1), round(percentile(during, 0.5), 1)],
    )


# -- 9. reconnect storm --------------------------------------------------------------------

STORM_CHANNELS = 10


async def _sessions(mesh: Mesh) -> list[int]:
    counts = []
    for gateway in mesh.gateways:
        try:
            _, body = await http_json("127.0.0.1", gateway.port, "/readyz")
            counts.append(int(body["sessions"]))
        except (OSError, TimeoutError, ValueError, KeyError, TypeError):
            counts.append(0)
    return counts


async def _js_consumers(mesh: Mesh, tenants: list[str]) -> int:
    nc = await nats.connect(servers=mesh.cluster.urls, connect_timeout=5, max_reconnect_attempts=2)
    try:
        js = nc.jetstream()
        total = 0
        for tenant in tenants:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                total += (
                    await js.stream_info(mesh.scheme.stream_name(tenant))
                ).state.consumer_count
        return total
    finally:
        await nc.close()


async def _ticks(client: Client, stop: asyncio.Event) -> int:
    """One event per storm channel every 0.5 s (the resume signal), until ``stop``."""
    sent = 0
    for _ in range(240):  # at most 2 minutes
        if stop.is_set():
            break
        now = time.time()
        await asyncio.gather(
            *(client.publish("storm", f"ch{c}", {"t": now}) for c in range(STORM_CHANNELS))
        )
        sent += STORM_CHANNELS
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)  # the tick interval (load pacing)
    return sent


async def reconnect_storm(mesh: Mesh, wl: Workload, plan: Plan, outcome: Outcome) -> None:
    total = int(plan.scale(400, 5000))
    processes = 2
    tenant = f"{wl.channels[0].tenant}st"
    urls = [mesh.urls[0], mesh.urls[1]]
    argv = ["-m", "chaos.storm", "--urls", ",".join(urls), "--tenant", tenant]
    argv += ["--clients", str(total // processes), "--channels", str(STORM_CHANNELS)]
    pipe = asyncio.subprocess.PIPE
    # The ticker is connected to the surviving gateway before the fault, so that the ticks
    # (each client's resume signal) do not wait for the ticker's own handshake among the
    # 5,000.
    ticker = Client([urls[1]], f"dev:{tenant}:ticker", request_timeout=30)
    workers = [
        await asyncio.create_subprocess_exec(
            sys.executable, *argv, stdin=pipe, stdout=pipe, start_new_session=True
        )
        for _ in range(processes)
    ]
    try:
        await ticker.connect()
        connect_from = time.time()
        for worker in workers:
            assert worker.stdout is not None
            async with asyncio.timeout(300):
                ready = orjson.loads(await worker.stdout.readline())
            if ready.get("ready") != total // processes:
                raise RuntimeError(f"a storm worker did not get ready: {ready}")
        outcome.measures["connect_all_s"] = round(time.time() - connect_from, 1)
        baseline_sessions = sum(await _sessions(mesh))
        tenants = sorted({ref.tenant for ref in wl.channels} | {tenant})
        baseline_consumers = await _js_consumers(mesh, tenants)
        fault_at = time.time()
        await mesh.kill_gateway(0)
        stop = asyncio.Event()
        ticking = asyncio.create_task(_ticks(ticker, stop))
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write(f"kill {fault_at}\n".encode())
            await worker.stdin.drain()
        reports = []
        for worker in workers:
            assert worker.stdout is not None
            async with asyncio.timeout(120):
                reports.append(orjson.loads(await worker.stdout.readline()))
        stop.set()
        await ticking
        resume = [t for r in reports for t in r["resume_s"]]
        missing = sum(r["missing"] for r in reports)
        outcome.resume += resume
        worst = max(resume, default=float("inf"))
        outcome.check(
            f"all {total} dropped clients resumed within 10 s",
            missing == 0 and worst <= 10.0,
            f"{len(resume)} resumed, {missing} did not; p50 {percentile(resume, 0.5):.2f} s, "
            f"max {worst:.2f} s (ticks every 0.5 s)",
        )
        await mesh.restart_gateway(0)
        # Bounded poll: sessions are only visible through /readyz, which has no event stream.
        after: list[int] = []
        for _ in range(100):
            after = await _sessions(mesh)
            if sum(after) == baseline_sessions:
                break
            await asyncio.sleep(0.2)
        consumers = await _js_consumers(mesh, tenants)
        outcome.check(
            "sessions and JetStream consumers back to the baseline",
            sum(after) == baseline_sessions and consumers == baseline_consumers,
            f"sessions {baseline_sessions} -> {sum(after)} {after}; "
            f"consumers {baseline_consumers} -> {consumers}",
        )
        outcome.measures["storm_clients"] = total
    finally:
        await ticker.close()
        for worker in workers:
            if worker.stdin is not None and worker.returncode is None:
                with contextlib.suppress(OSError):
                    worker.stdin.write(b"exit\n")
                    await worker.stdin.drain()
        for worker in workers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(worker.wait(), 60)
            if worker.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.kill()
            await worker.wait()


# -- 10. region loss -----------------------------------------------------------------------


async def _run_region_loss(plan: Plan, workdir: Path) -> Outcome:
    """A tenant homed in east (mirrors in west and south, acks: mirrored) with two channels,
    and a bystander homed in south; SDK clients spread over the three regions' gateways."""
    run = uuid.uuid4().hex[:6]
    placed, bystander = f"t{run}e", f"t{run}s"
    tenants = region_tenants([placed]) + region_tenants([bystander], home="south")
    refs = [ChannelRef(placed, "plant", f"line{c}") for c in range(2)]
    refs.append(ChannelRef(bystander, "plant", "line0"))
    mesh = RegionMesh(workdir, tenants)
    outcome = Outcome(*_DESCRIPTIONS[10])

    async def fault(m: Any, wl: Workload, p: Plan, o: Outcome) -> None:
        await region_loss(m, wl, p, o, home="east", to="west")

    return await run_scenario(outcome, plan, workdir, fault, mesh=mesh, channels=refs)


# -- registry -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    number: int
    name: str
    fault: str
    criterion: str
    run: Callable[[Plan, Path], Awaitable[Outcome]]


_DESCRIPTIONS: dict[int, tuple[int, str, str, str]] = {
    1: (1, "gateway crash", "kill -9 the busiest gateway under load, restart it, repeat",
        "0 acked lost; clients resume ≤ 5 s on another gateway"),
    2: (2, "rolling restart", "drain every gateway in turn (SIGTERM), restart it",
        "0 lost, 0 duplicates at the application"),
    3: (3, "NATS node bounce", "kill -9 and restart a random NATS node every few seconds",
        "0 acked lost; stream intact; count = unique ids"),
    4: (4, "whole-cluster restart", "kill -9 all NATS nodes at once, restart them",
        "0 acked lost"),
    5: (5, "leader pause", "SIGSTOP the stream leader for 10 s, then SIGCONT",
        "new leader ≤ 10 s; 0 acked lost; publishes during the pause acked late or failed"),
    6: (6, "partition", "cut the stream leader's node off its peers (netns, veth down), heal",
        "minority acks nothing; converges; 0 acked lost"),
    7: (7, "gateway↔NATS link trouble", "fault proxy between a gateway and NATS: delay, reset, stall",
        "/readyz 503 within 2 health intervals; clients move away; 0 acked lost"),
    8: (8, "slow reader", "clients that stop reading a 3 MB/s channel for 3 s",
        "bounded gateway memory; closed with the resume code 4001; others' p99 within 2x"),
    9: (9, "reconnect storm", "kill -9 the gateway holding 5,000 SDK connections",
        "all resume ≤ 10 s; sessions and consumers back to baseline"),
    10: (10, "region loss", "kill -9 a whole region (3 NATS nodes and its gateway) under load, "
         "arqonbus mesh failover, restart it, arqonbus mesh failback",
         "0 acked lost; every acked id once in the promoted stream; no duplicate, in order, "
         "no gap; epochs 1, 2, 3"),
}  # fmt: skip


def _simple(number: int, fn: FaultFn, gateway_env: dict[str, str] | None = None) -> Scenario:
    async def run(plan: Plan, workdir: Path) -> Outcome:
        outcome = Outcome(*_DESCRIPTIONS[number])
        return await run_scenario(outcome, plan, workdir, fn, gateway_env=gateway_env)

    return Scenario(*_DESCRIPTIONS[number], run)


def _custom(number: int, run: Callable[[Plan, Path], Awaitable[Outcome]]) -> Scenario:
    return Scenario(*_DESCRIPTIONS[number], run)


SCENARIOS: list[Scenario] = [
    _simple(1, gateway_crash),
    _simple(2, rolling_restart),
    _simple(3, nats_bounce),
    _simple(4, cluster_restart),
    _simple(5, leader_pause),
    _custom(6, _run_partition),
    _custom(7, _run_link_trouble),
    _simple(8, slow_reader),
    # The storm's 5,000 clients all come from 127.0.0.1, where real ones come from many
    # addresses: the per-IP limits (upgrade rate, pending handshakes) would pace them, so they
    # are off here.
    _simple(
        9,
        reconnect_storm,
        {"ARQONBUS_CONN_RATE_PER_IP": "0", "ARQONBUS_MAX_PENDING_HANDSHAKES_PER_IP": "0"},
    ),
    _custom(10, _run_region_loss),
]


def by_number(number: int) -> Scenario:
    return next(s for s in SCENARIOS if s.number == number)
