"""``arqonbus gateway --workers N``: N gateway processes on one port (SO_REUSEPORT).

A gateway is one Python process, so one core. The gateway keeps no state of its own (every
room and channel lives in NATS), so a host with free cores runs several: this supervisor
starts N worker processes that each bind the same HOST:PORT with SO_REUSEPORT, and the
kernel spreads new connections over them. Each worker is a whole gateway with its own node
id (``<node_id>-w<i>``), NATS connection, metrics and presence lease; clients of different
workers see one bus, as they would across hosts.

The supervisor:

* starts the workers and waits until each answers ``/readyz`` on its own admin listener
  (``ARQONBUS_ADMIN_LISTEN``, port ``worker_admin_port + i``; with ``worker_admin_port``
  0 it picks free ports on the listener's host): that is also where Prometheus scrapes
  each worker, since a scrape of the shared port reaches whichever worker the kernel picks;
* restarts a worker that exits without being asked to, after a backoff, and gives up
  (stopping the others, exit code 1) after :data:`MAX_RESTARTS` within
  :data:`RESTART_WINDOW_S`;
* on SIGTERM or SIGINT sends SIGTERM to every worker, which drains as a lone gateway does
  (1012 to its clients, in-flight publishes finished), and waits for all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Final

from arqonbus_server.gateway.admin.dev import http_status
from arqonbus_server.mesh.local import free_port
from arqonbus_server.shared.settings import Settings

log = logging.getLogger("arqonbus.workers")

MAX_RESTARTS: Final = 5
RESTART_WINDOW_S: Final = 60.0
RESTART_BACKOFF_S: Final = (0.5, 1.0, 2.0, 4.0, 8.0)
READY_TIMEOUT_S: Final = 60.0
STOP_GRACE_S: Final = 15.0  # beyond drain_timeout_s, before a worker is killed


@dataclass
class Worker:
    index: int
    node_id: str
    admin_port: int
    proc: asyncio.subprocess.Process | None = None
    restarts: deque[float] = field(default_factory=deque)


def worker_environ(settings: Settings, worker: Worker, base: dict[str, str]) -> dict[str, str]:
    """The environment of one worker: the supervisor's, with its own node and listeners."""
    env = dict(base)
    env.update(
        {
            "ARQONBUS_WORKERS": "1",
            "ARQONBUS_REUSE_PORT": "true",
            "ARQONBUS_LISTEN": settings.listen,
            "ARQONBUS_NODE_ID": worker.node_id,
            "ARQONBUS_ADMIN_LISTEN": f"{settings.host}:{worker.admin_port}",
        }
    )
    return env


class Supervisor:
    """Runs ``settings.workers`` gateway processes until told to stop (module docstring)."""

    def __init__(self, settings: Settings, environ: dict[str, str]) -> None:
        self.settings = settings
        self._environ = environ
        node = settings.node_id or f"{os.uname().nodename}-{os.getpid()}"
        self.workers = [
            Worker(
                i,
                f"{node}-w{i}",
                settings.worker_admin_port + i if settings.worker_admin_port else free_port(),
            )
            for i in range(settings.workers)
        ]
        self._stopping = asyncio.Event()
        self._failed: str | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        try:
            for worker in self.workers:
                await self._spawn(worker)
            await self._all_ready()
            log.info(
                "%d workers serving %s (admin ports %s)",
                len(self.workers),
                self.settings.listen,
                ", ".join(str(w.admin_port) for w in self.workers),
            )
            watchers = [asyncio.create_task(self._watch(w)) for w in self.workers]
            await self._stopping.wait()
            for task in watchers:
                task.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
        except (OSError, RuntimeError, TimeoutError) as exc:
            self._failed = str(exc) or type(exc).__name__
        finally:
            await self._stop_all()
        if self._failed is not None:
            log.error("workers stopped: %s", self._failed)
            return 1
        return 0

    async def _spawn(self, worker: Worker) -> None:
        worker.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "arqonbus_server.gateway",
            "gateway",
            env=worker_environ(self.settings, worker, self._environ),
            stdin=asyncio.subprocess.DEVNULL,
        )
        log.info("worker %s started (pid %d)", worker.node_id, worker.proc.pid)

    async def _ready(self, worker: Worker, timeout: float) -> None:
        proc = worker.proc
        assert proc is not None
        try:
            async with asyncio.timeout(timeout):
                while await http_status(self.settings.host, worker.admin_port, "/readyz") != 200:
                    if proc.returncode is not None:
                        raise RuntimeError(
                            f"worker {worker.node_id} exited with {proc.returncode} while starting"
                        )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(proc.wait(), 0.2)
        except TimeoutError:
            raise RuntimeError(
                f"worker {worker.node_id} not ready within {timeout:g} s "
                f"(GET /readyz on port {worker.admin_port})"
            ) from None

    async def _all_ready(self) -> None:
        await asyncio.gather(*(self._ready(w, READY_TIMEOUT_S) for w in self.workers))

    async def _watch(self, worker: Worker) -> None:
        """Restart ``worker`` whenever it exits on its own, within the restart budget."""
        while True:
            assert worker.proc is not None
            code = await worker.proc.wait()
            if self._stopping.is_set():
                return
            now = time.monotonic()
            while worker.restarts and now - worker.restarts[0] > RESTART_WINDOW_S:
                worker.restarts.popleft()
            if len(worker.restarts) >= MAX_RESTARTS:
                self._failed = (
                    f"worker {worker.node_id} exited {MAX_RESTARTS + 1} times within "
                    f"{RESTART_WINDOW_S:g} s (last exit code {code})"
                )
                self._stopping.set()
                return
            delay = RESTART_BACKOFF_S[min(len(worker.restarts), len(RESTART_BACKOFF_S) - 1)]
            worker.restarts.append(now)
            log.warning(
                "worker %s exited with %s: restarting in %.1f s", worker.node_id, code, delay
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if self._stopping.is_set():
                return
            try:
                await self._spawn(worker)
            except OSError as exc:  # e.g. no more processes: nothing left to supervise
                self._failed = f"could not restart worker {worker.node_id}: {exc}"
                self._stopping.set()
                return
            try:
                await self._ready(worker, READY_TIMEOUT_S)
            except RuntimeError as exc:
                log.warning("%s", exc)  # its next exit counts against the budget

    async def _stop_all(self) -> None:
        running = [w.proc for w in self.workers if w.proc is not None and w.proc.returncode is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = self.settings.drain_timeout_s + STOP_GRACE_S
        for proc in running:
            try:
                await asyncio.wait_for(proc.wait(), deadline)
            except TimeoutError:
                log.warning("worker pid %d did not stop in %.0f s: killing it", proc.pid, deadline)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


async def run_workers(settings: Settings, environ: dict[str, str]) -> int:
    """``arqonbus gateway`` with ``workers`` above 1: supervise them until a signal.

    ``environ``: the workers' environment (the options given on the command line included).
    """
    return await Supervisor(settings, environ).run()
