"""A 3-node NATS JetStream cluster with one Linux network namespace per node, for partitions.

Layout (``<tag>`` is 4 random hex digits, unique per run)::

    root namespace (gateways, tests)                 namespace arqn<tag>-<i>  (node i)
      bridge arqb<tag>c  10.X.Y.1/24  ── veth arqv<tag>c<i> ──  "client"  10.X.Y.(11+i)
      bridge arqb<tag>r  (no address) ── veth arqv<tag>r<i> ──  "route"   10.X.(Y+1).(11+i)

Each node has two links: a *client* link (client port 4222 and HTTP monitoring 8222 listen on
it; the root namespace reaches it through the client bridge) and a *route* link (cluster port
6222; routes between nodes only go over it). The client and route networks are separate /24s.

How faults are made, and why the design is this one:

* ``partition(i)`` sets node i's host-side *route* veth down: node i loses every route to its
  peers, but clients in the root namespace (gateways, tests) still reach it on its client
  address. So "the minority acks nothing" is observable from the scenario as it is in a real
  partition where a gateway still talks to the cut-off server: a JetStream publish through node i
  gets no PubAck (it times out, or fails with no responders once node i has given up its
  leaderships), while publishes through the other nodes are acked once they have a leader.
  ``partition(i, clients=True)`` also sets the client veth down: node i is unreachable from
  everywhere (clients connected to it see their connection go silent).
* ``heal(i)`` sets both of node i's veths up again. No iptables or nftables is needed.
* ``node_stream_state(i, stream)`` reads node i's *own* replica of a stream from its HTTP
  monitoring endpoint (``/jsz``), including its view of the leader; that is how a scenario sees
  the cut node converge after ``heal``. ``stream_leader`` asks the JetStream API through the
  nodes that are not partitioned.

Processes and cleanup: nodes run as ``setpriv --pdeathsig KILL ip netns exec NS nats-server -c
CONF``; both setpriv and ``ip netns exec`` exec in place, so the PID we keep is nats-server's,
each in its own session, and the kernel kills it if the process that started it dies.
``stop()`` stops every node (by PID) and deletes the namespaces, veths and bridges it created,
also after errors; an ``atexit`` hook does the same for a cluster not stopped at interpreter exit.
A run holds an exclusive ``flock`` on ``/run/arqonbus-netns/<tag>.lock`` while its resources
exist; ``cleanup_stale()`` (also run by ``start()``) removes namespaces, links and node processes
of runs whose lock is not held (their process died, e.g. by SIGKILL), and never touches a live run.

Raft timings that bound what a scenario can expect (nats-server constants): a follower that stops
hearing its leader campaigns after 4-9 s; a leader that cannot reach a quorum steps down after
about 10-20 s; after ``heal`` the cut node catches up once its routes carry traffic again
(TCP retransmission backoff may add a few seconds).

Needs root (CAP_NET_ADMIN), iproute2 and util-linux's setpriv. Exceptions: ``NetnsError`` when a
namespace, link or address cannot be set up; the ``mesh.local`` errors for nodes.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import errno
import fcntl
import ipaddress
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from arqonbus_server.mesh.local import LocalCluster, NodeSpec

log = logging.getLogger("arqonbus.chaos.netns")

PREFIX = "arq"
NS_PREFIX = f"{PREFIX}n"  # namespaces: arqn<tag>-<i>
BRIDGE_PREFIX = f"{PREFIX}b"  # bridges: arqb<tag>c, arqb<tag>r
VETH_PREFIX = f"{PREFIX}v"  # host-side veths: arqv<tag>c<i>, arqv<tag>r<i>
LOCK_DIR = Path("/run/arqonbus-netns")
CLIENT_PORT = 4222
CLUSTER_PORT = 6222
HTTP_PORT = 8222
NODE_HOST_OFFSET = 11  # node i is .11+i on both networks; the root namespace is .1
IP_TIMEOUT_SECONDS = 10.0
# Linux >= 6.15: caps TCP's retransmission backoff (default 120 s). In the nodes' namespaces only,
# so a route stalled by a partition resumes within about a second of heal(), not after the
# next exponentially backed-off retransmission (several seconds after a 10 s partition).
RTO_MAX_SYSCTL = Path("/proc/sys/net/ipv4/tcp_rto_max_ms")
HTTP_TIMEOUT_SECONDS = 2.0
_POLL_SECONDS = 0.1

_NS_RE = re.compile(rf"^{NS_PREFIX}([0-9a-f]{{4}})-\d+$")
_LINK_RE = re.compile(rf"^(?:{BRIDGE_PREFIX}|{VETH_PREFIX})([0-9a-f]{{4}})[cr]\d*$")
_TAG_ATTEMPTS = 50


class NetnsError(RuntimeError):
    """A namespace, link or address could not be created, changed or inspected."""


@dataclass(frozen=True, slots=True)
class ReplicaState:
    """One node's own replica of a stream, as its monitoring endpoint reports it."""

    node: int
    leader: str | None  # this node's view of the stream leader's server name
    messages: int
    first_seq: int
    last_seq: int


# -- running ip ---------------------------------------------------------------------------------


async def _run(*argv: str, stdin: str | None = None, check: bool = True) -> str:
    """Run a command (``ip`` mostly); return stdout, raise NetnsError on failure."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(IP_TIMEOUT_SECONDS):
            out, err = await process.communicate(stdin.encode() if stdin is not None else None)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise NetnsError(
            f"{' '.join(argv)} did not finish within {IP_TIMEOUT_SECONDS:g}s"
        ) from None
    if check and process.returncode != 0:
        raise NetnsError(
            f"{' '.join(argv)} failed with code {process.returncode}: {err.decode().strip()}"
        )
    return out.decode()


def _run_sync(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=IP_TIMEOUT_SECONDS, check=False
    )


def _ip_json(*args: str) -> list[dict[str, Any]]:
    out = _run_sync("ip", "-j", *args)
    if out.returncode != 0:
        raise NetnsError(f"ip -j {' '.join(args)} failed: {out.stderr.strip()}")
    text = out.stdout.strip()
    return list(json.loads(text)) if text else []


def _rto_max_supported() -> bool:
    return RTO_MAX_SYSCTL.exists()


def _require_tools() -> None:
    missing = [tool for tool in ("ip", "setpriv") if shutil.which(tool) is None]
    if missing:
        raise NetnsError(
            f"missing {', '.join(missing)}: install iproute2 and util-linux (apt-get install -y "
            "iproute2 util-linux)"
        )
    if os.geteuid() != 0:
        raise NetnsError("network namespaces need root (CAP_NET_ADMIN)")


# -- naming, locks and stale runs ----------------------------------------------------------------


def _ns_name(tag: str, i: int) -> str:
    return f"{NS_PREFIX}{tag}-{i}"


def _bridge(tag: str, net: str) -> str:
    return f"{BRIDGE_PREFIX}{tag}{net}"


def _veth(tag: str, net: str, i: int) -> str:
    return f"{VETH_PREFIX}{tag}{net}{i}"


def _lock_path(tag: str) -> Path:
    return LOCK_DIR / f"{tag}.lock"


def _try_lock(path: Path) -> int | None:
    """Open and exclusively flock ``path`` (created if missing); None if another process holds it.

    Retries when the file was unlinked between open and flock, so a lock we hold is always the
    file at ``path``.
    """
    for _ in range(_TAG_ATTEMPTS):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
    raise NetnsError(f"could not lock {path}")


def _used_networks() -> list[ipaddress.IPv4Network]:
    nets = [
        ipaddress.IPv4Interface(f"{a['local']}/{a['prefixlen']}").network
        for link in _ip_json("-4", "addr", "show")
        for a in link.get("addr_info", [])
        if a.get("family") == "inet"
    ]
    for route in _ip_json("-4", "route", "show", "table", "all"):
        dst = route.get("dst", "")
        if dst and dst != "default":
            with contextlib.suppress(ValueError):
                nets.append(ipaddress.IPv4Network(dst, strict=False))
    # Runs that are starting hold their lock before they add their addresses.
    if LOCK_DIR.is_dir():
        for lock in LOCK_DIR.glob("*.lock"):
            with contextlib.suppress(OSError, ValueError):
                for net in json.loads(lock.read_text() or "{}").get("networks", []):
                    nets.append(ipaddress.IPv4Network(net))
    return nets


def _pick_networks() -> tuple[ipaddress.IPv4Network, ipaddress.IPv4Network]:
    """Two adjacent random private /24s (10.X.Y.0, 10.X.Y+1.0) that overlap nothing in use."""
    used = _used_networks()
    rng = random.SystemRandom()
    for _ in range(_TAG_ATTEMPTS):
        x, y = rng.randrange(64, 255), rng.randrange(0, 254, 2)
        pair = (
            ipaddress.IPv4Network(f"10.{x}.{y}.0/24"),
            ipaddress.IPv4Network(f"10.{x}.{y + 1}.0/24"),
        )
        if not any(net.overlaps(other) for net in pair for other in used):
            return pair
    raise NetnsError("no free 10.x.y.0/24 pair found")


def existing_names() -> tuple[list[str], list[str]]:
    """The names of all network namespaces and of all links in the root namespace."""
    namespaces = [ns["name"] for ns in _ip_json("netns", "list")]
    links = [link["ifname"] for link in _ip_json("link", "show")]
    return namespaces, links


def cleanup_stale() -> list[str]:
    """Remove namespaces, links, node processes and locks of dead runs; return what was removed.

    Only names this module makes (``arqn<tag>-<i>``, ``arqb<tag>?``, ``arqv<tag>??``) are
    considered, and only for tags whose lock file is not held by a live process.
    """
    _require_tools()
    namespaces, links = existing_names()
    by_tag: dict[str, tuple[list[str], list[str]]] = {}
    for ns in namespaces:
        if m := _NS_RE.match(ns):
            by_tag.setdefault(m[1], ([], []))[0].append(ns)
    for link in links:
        if m := _LINK_RE.match(link):
            by_tag.setdefault(m[1], ([], []))[1].append(link)
    if LOCK_DIR.is_dir():
        for lock in LOCK_DIR.glob("*.lock"):
            if re.fullmatch(r"[0-9a-f]{4}", lock.stem):
                by_tag.setdefault(lock.stem, ([], []))
    removed: list[str] = []
    for tag, (tag_namespaces, tag_links) in sorted(by_tag.items()):
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        fd = _try_lock(_lock_path(tag))
        if fd is None:
            continue  # a live run owns it
        try:
            removed += _teardown_sync(tag_namespaces, tag_links)
            _lock_path(tag).unlink(missing_ok=True)
        finally:
            os.close(fd)
    if removed:
        log.info("removed leftovers of earlier runs: %s", ", ".join(removed))
    return removed


def _teardown_sync(namespaces: Sequence[str], links: Sequence[str]) -> list[str]:
    """Kill processes inside ``namespaces`` (all started by this module), delete them and links."""
    removed: list[str] = []
    for ns in namespaces:
        pids = _run_sync("ip", "netns", "pids", ns).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
                removed.append(f"pid {pid} in {ns}")
        if _run_sync("ip", "netns", "del", ns).returncode == 0:
            removed.append(ns)
    # A namespace's veth ends go with it, and their host-side peers with them.
    _, present = existing_names()
    for link in links:
        if link in present and _run_sync("ip", "link", "del", link).returncode == 0:
            removed.append(link)
    return removed


# Clusters not stopped at interpreter exit are torn down by the atexit hook.
_active: set[NetnsCluster] = set()


@atexit.register
def _stop_active_at_exit() -> None:
    for cluster in list(_active):
        cluster._teardown_at_exit()


# -- the cluster --------------------------------------------------------------------------------


class NetnsCluster(LocalCluster):
    """``nodes`` nats-server processes, node i in namespace ``arqn<tag>-<i>`` (see module doc).

    Use as ``async with NetnsCluster(base_dir) as c:``; ``c.urls`` are the nodes' client URLs
    (``nats://10.X.Y.(11+i):4222``), reachable from the root namespace unless the node is
    partitioned with ``clients=True``. ``kill_node``, ``start_node``, ``pause_node``,
    ``resume_node``, ``stop_node``, ``wait_ready_node`` and ``wait_placement`` are LocalCluster's.
    """

    def __init__(
        self,
        base_dir: Path,
        nodes: int = 3,
        name: str = "arqonbus-netns",
        binary: str | None = None,
        tcp_rto_max_ms: int | None = 1000,
    ) -> None:
        _require_tools()
        self.tcp_rto_max_ms = tcp_rto_max_ms
        if not 1 <= nodes <= 200:
            raise ValueError(f"nodes must be in 1..200, got {nodes}")
        self.tag = self._pick_tag()
        self.client_net, self.route_net = _pick_networks()
        self._lock_fd: int | None = None
        self._created_namespaces: list[str] = []
        self._created_links: list[str] = []
        self._partitioned: dict[int, bool] = {}  # node -> clients cut too
        super().__init__(
            base_dir, nodes=nodes, host=str(self.client_net[1]), name=name, binary=binary
        )

    @staticmethod
    def _pick_tag() -> str:
        namespaces, links = existing_names()
        taken = {m[1] for n in namespaces if (m := _NS_RE.match(n))}
        taken |= {m[1] for n in links if (m := _LINK_RE.match(n))}
        if LOCK_DIR.is_dir():
            taken |= {lock.stem for lock in LOCK_DIR.glob("*.lock")}
        rng = random.SystemRandom()
        for _ in range(_TAG_ATTEMPTS):
            tag = f"{rng.randrange(16**4):04x}"
            if tag not in taken:
                return tag
        raise NetnsError("no free namespace tag")

    # -- LocalCluster hooks

    def _plan(self, count: int, host: str, client_port: int | None) -> list[NodeSpec]:
        return [
            NodeSpec(
                name=f"n{i}",
                host=str(self.client_net[NODE_HOST_OFFSET + i]),
                client_port=CLIENT_PORT,
                cluster_port=CLUSTER_PORT,
                store_dir=self.base_dir / f"n{i}" / "data",
                config_path=self.base_dir / f"n{i}" / "nats.conf",
                log_path=self.base_dir / f"n{i}" / "nats.log",
                cluster_host=str(self.route_net[NODE_HOST_OFFSET + i]),
                http_port=HTTP_PORT,
            )
            for i in range(count)
        ]

    def _check_ports(self, spec: NodeSpec) -> None:
        """Nothing else runs in a node's fresh namespace, so its ports are free."""

    def _command(self, spec: NodeSpec) -> list[str]:
        ns = self.namespace(self.specs.index(spec))
        return [
            "setpriv",
            "--pdeathsig",
            "KILL",
            "ip",
            "netns",
            "exec",
            ns,
            *super()._command(spec),
        ]

    # -- views

    def namespace(self, i: int) -> str:
        return _ns_name(self.tag, i)

    def route_veth(self, i: int) -> str:
        """The host-side end of node i's route link (down while node i is partitioned)."""
        return _veth(self.tag, "r", i)

    def client_veth(self, i: int) -> str:
        return _veth(self.tag, "c", i)

    @property
    def client_bridge(self) -> str:
        return _bridge(self.tag, "c")

    @property
    def route_bridge(self) -> str:
        return _bridge(self.tag, "r")

    @property
    def partitioned(self) -> list[int]:
        return sorted(self._partitioned)

    def connected_nodes(self) -> list[int]:
        """Nodes that are running and not partitioned."""
        return [
            i for i in range(len(self.specs)) if self.is_running(i) and i not in self._partitioned
        ]

    def node_index(self, server_name: str | None) -> int | None:
        """The index of the node whose server_name is ``server_name`` (``n<i>``), else None."""
        names = [spec.name for spec in self.specs]
        return names.index(server_name) if server_name in names else None

    # -- lifecycle

    async def start(self, timeout: float = 30.0) -> None:
        """Create the networks, start every node, wait until replicated streams can be placed.

        Leftovers of dead earlier runs are removed first. On any failure everything created so
        far is removed before the error propagates.
        """
        await asyncio.to_thread(cleanup_stale)
        try:
            await self._setup_network()
            await super().start(timeout)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop every node, then delete the namespaces, veths and bridges. Idempotent."""
        try:
            await super().stop()
        finally:
            await asyncio.to_thread(self._teardown_network)

    def _acquire_lock(self) -> None:
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        fd = _try_lock(_lock_path(self.tag))
        if fd is None:
            raise NetnsError(f"namespace tag {self.tag} is in use by another run")
        self._lock_fd = fd
        info = {"pid": os.getpid(), "networks": [str(self.client_net), str(self.route_net)]}
        os.write(fd, json.dumps(info).encode())
        _active.add(self)

    async def _setup_network(self) -> None:
        self._acquire_lock()
        cap_rto = self.tcp_rto_max_ms is not None and _rto_max_supported()
        count = len(self.specs)
        prefix = self.client_net.prefixlen
        # Recorded before creation, so a failure half-way still tears down what exists.
        self._created_namespaces = [self.namespace(i) for i in range(count)]
        self._created_links = [
            self.client_bridge,
            self.route_bridge,
            *(self.client_veth(i) for i in range(count)),
            *(self.route_veth(i) for i in range(count)),
        ]
        root = [f"netns add {ns}" for ns in self._created_namespaces]
        for bridge in (self.client_bridge, self.route_bridge):
            # Bridged frames skip iptables/ip6tables/arptables, whatever the host's rules are.
            root += [
                f"link add name {bridge} type bridge nf_call_iptables 0 nf_call_ip6tables 0 "
                "nf_call_arptables 0",
                f"link set dev {bridge} up",
            ]
        root.append(f"addr add {self.client_net[1]}/{prefix} dev {self.client_bridge}")
        for i, ns in enumerate(self._created_namespaces):
            for net, bridge, inner in (
                ("c", self.client_bridge, "client"),
                ("r", self.route_bridge, "route"),
            ):
                veth = _veth(self.tag, net, i)
                root += [
                    f"link add name {veth} type veth peer name {inner} netns {ns}",
                    f"link set dev {veth} master {bridge}",
                    f"link set dev {veth} up",
                ]
        await _run("ip", "-batch", "-", stdin="\n".join(root) + "\n")
        for i, ns in enumerate(self._created_namespaces):
            inside = [
                "link set dev lo up",
                f"addr add {self.client_net[NODE_HOST_OFFSET + i]}/{prefix} dev client",
                f"addr add {self.route_net[NODE_HOST_OFFSET + i]}/{prefix} dev route",
                "link set dev client up",
                "link set dev route up",
            ]
            await _run("ip", "-n", ns, "-batch", "-", stdin="\n".join(inside) + "\n")
            if cap_rto:
                key = ".".join(RTO_MAX_SYSCTL.parts[3:])
                await _run(
                    "ip", "netns", "exec", ns, "sysctl", "-qw", f"{key}={self.tcp_rto_max_ms}"
                )
        log.info(
            "netns cluster %s: client net %s (root %s), route net %s",
            self.tag,
            self.client_net,
            self.client_net[1],
            self.route_net,
        )

    def _teardown_network(self) -> None:
        """Delete what this run created (processes are already stopped); release the lock."""
        try:
            if self._created_namespaces or self._created_links:
                _teardown_sync(self._created_namespaces, self._created_links)
                namespaces, links = existing_names()
                left = [n for n in self._created_namespaces if n in namespaces]
                left += [n for n in self._created_links if n in links]
                if left:
                    raise NetnsError(f"could not delete {', '.join(left)}")
                self._created_namespaces, self._created_links = [], []
                self._partitioned.clear()
        finally:
            if self._lock_fd is not None and not self._created_namespaces:
                _lock_path(self.tag).unlink(missing_ok=True)
                os.close(self._lock_fd)
                self._lock_fd = None
            _active.discard(self)

    def _teardown_at_exit(self) -> None:
        for pid in self.pids:
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            self._teardown_network()

    # -- faults

    async def partition(self, i: int, *, clients: bool = False) -> None:
        """Cut node i off from every other node (its route link goes down).

        Clients in the root namespace still reach node i unless ``clients`` is true, in which case
        its client link goes down too.
        """
        self._index(i)
        await _run("ip", "link", "set", "dev", self.route_veth(i), "down")
        if clients:
            await _run("ip", "link", "set", "dev", self.client_veth(i), "down")
        self._partitioned[i] = clients or self._partitioned.get(i, False)
        log.info("node %s partitioned (clients cut: %s)", self.specs[i].name, clients)

    async def heal(self, i: int) -> None:
        """Bring node i's route and client links up again."""
        self._index(i)
        await _run("ip", "link", "set", "dev", self.client_veth(i), "up")
        await _run("ip", "link", "set", "dev", self.route_veth(i), "up")
        self._partitioned.pop(i, None)
        log.info("node %s healed", self.specs[i].name)

    async def heal_all(self) -> None:
        for i in list(self._partitioned):
            await self.heal(i)

    def _index(self, i: int) -> None:
        if not 0 <= i < len(self.specs):
            raise IndexError(f"no node {i} (cluster has {len(self.specs)})")

    # -- observing

    @contextlib.asynccontextmanager
    async def connect(
        self, nodes: int | Sequence[int] | None = None, timeout: float = 5.0
    ) -> AsyncIterator[Client]:
        """A nats-py connection to ``nodes`` only (default: the connected nodes), no reconnects.

        With a single node, everything the connection does goes through that node: a publish
        through a partitioned node shows what its side of the partition acks.
        """
        if nodes is None:
            nodes = self.connected_nodes()
        indexes = [nodes] if isinstance(nodes, int) else list(nodes)
        if not indexes:
            raise ValueError("no node to connect to")
        nc = await nats.connect(
            servers=[self.specs[i].url for i in indexes],
            connect_timeout=max(1, round(timeout)),
            allow_reconnect=False,
            max_reconnect_attempts=1,
            reconnect_time_wait=0,
            error_cb=_quiet_error,
        )
        try:
            yield nc
        finally:
            await nc.close()

    async def stream_leader(
        self, stream: str, via: int | Sequence[int] | None = None, timeout: float = 2.0
    ) -> int | None:
        """The stream leader's node index as the JetStream API reports it, or None (no leader,
        no answer within ``timeout``). Asked through ``via`` (default: the connected nodes), so
        the answer is the majority's view, not a partitioned old leader's."""
        try:
            async with asyncio.timeout(timeout), self.connect(via, timeout) as nc:
                info = await nc.jetstream(timeout=timeout).stream_info(stream)
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            log.debug("stream_leader(%s): %r", stream, exc)
            return None
        return self.node_index(info.cluster.leader if info.cluster else None)

    async def wait_stream_leader(
        self, stream: str, exclude: Sequence[int] = (), timeout: float = 30.0
    ) -> int:
        """Wait until the connected nodes report a leader for ``stream`` not in ``exclude``.

        Wakes on the stream's leader-elected advisory, and re-asks the API at least every
        second (an advisory can be missed while the subscription's interest propagates).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: int | None = None
        elected = asyncio.Event()

        async def on_advisory(_msg: Msg) -> None:
            elected.set()

        async with self.connect() as nc:
            await nc.subscribe(f"$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.{stream}", cb=on_advisory)
            await nc.flush()
            while (remaining := deadline - loop.time()) > 0:
                elected.clear()
                # Without a leader the API does not answer at all: keep the probe short.
                last = await self.stream_leader(stream, timeout=min(0.5, remaining))
                if last is not None and last not in exclude:
                    return last
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(1.0, max(0.0, deadline - loop.time()))):
                        await elected.wait()
        raise TimeoutError(
            f"no leader for stream {stream} outside {list(exclude)} within {timeout:g}s "
            f"(last seen: {last})"
        )

    async def jsz(self, i: int, timeout: float = HTTP_TIMEOUT_SECONDS) -> dict[str, Any]:
        """Node i's ``/jsz?accounts=true&streams=true`` monitoring document."""
        spec = self.specs[i]
        assert spec.http_port is not None
        return await _http_get_json(
            spec.host, spec.http_port, "/jsz?accounts=true&streams=true", timeout
        )

    async def node_stream_state(
        self, i: int, stream: str, timeout: float = HTTP_TIMEOUT_SECONDS
    ) -> ReplicaState | None:
        """Node i's own replica of ``stream`` (None if node i holds none)."""
        doc = await self.jsz(i, timeout)
        for account in doc.get("account_details") or []:
            for detail in account.get("stream_detail") or []:
                if detail.get("name") != stream:
                    continue
                state = detail.get("state") or {}
                cluster = detail.get("cluster") or {}
                return ReplicaState(
                    node=i,
                    leader=cluster.get("leader") or None,
                    messages=int(state.get("messages", 0)),
                    first_seq=int(state.get("first_seq", 0)),
                    last_seq=int(state.get("last_seq", 0)),
                )
        return None

    async def wait_replica_last_seq(
        self, i: int, stream: str, last_seq: int, timeout: float = 30.0
    ) -> ReplicaState:
        """Wait until node i's own replica of ``stream`` has ``last_seq`` (e.g. after heal)."""
        deadline = asyncio.get_running_loop().time() + timeout
        last: ReplicaState | str | None = "no answer yet"
        while (remaining := deadline - asyncio.get_running_loop().time()) > 0:
            try:
                state = await self.node_stream_state(
                    i, stream, min(HTTP_TIMEOUT_SECONDS, remaining)
                )
            except (OSError, TimeoutError, ValueError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                last = state
                if state is not None and state.last_seq == last_seq:
                    return state
            await asyncio.sleep(min(_POLL_SECONDS, max(0.0, remaining)))
        raise TimeoutError(
            f"node {i}'s replica of {stream} did not reach last_seq {last_seq} within "
            f"{timeout:g}s (last: {last})"
        )


async def _quiet_error(exc: Exception) -> None:
    log.debug("nats client: %r", exc)


async def _http_get_json(host: str, port: int, path: str, timeout: float) -> dict[str, Any]:
    """GET ``path`` (HTTP/1.0, so the server closes after the body) and parse the JSON body."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode())
            await writer.drain()
            data = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].decode(errors="replace")
    if " 200 " not in f"{status} ":
        raise ValueError(f"GET http://{host}:{port}{path}: {status!r}")
    doc = json.loads(body)
    if not isinstance(doc, dict):
        raise ValueError(f"GET http://{host}:{port}{path}: not a JSON object")
    return doc
