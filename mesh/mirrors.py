"""Acks that wait for a mirror: one :class:`MirrorConfirmer` per tenant per gateway.

A placed tenant with ``acks: mirrored`` (shared/regions.py) is acknowledged to the client
only once one of its mirrors holds the event: mirrors copy asynchronously, so an ack given on
the primary's word alone could be lost with the primary's region. Rather than a request per
publish, one confirmer per tenant asks the mirrors for their last seq (a stream info each)
while acks are pending, at most once per ``interval_s``, and resolves every pending seq at
or below the highest answer. Pending acks are bounded; each waits at most its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence

from arqonbus_server.mesh.ports import BrokerUnavailable
from arqonbus_server.shared.regions import Placement

log = logging.getLogger("arqonbus.mesh.mirrors")

LastSeq = Callable[[str], Awaitable[int]]

MIRROR_POLL_S = 0.02  # a round of stream infos at most this often, while acks wait
MAX_PENDING_ACKS = 10_000  # per tenant; more: refused at once (retryable)


def mirrors_to_confirm(placement: Placement | None) -> list[str]:
    """The mirror streams an ack of the tenant waits for (none: ack on the primary's word)."""
    if placement is None or placement.acks != "mirrored":
        return []
    return [at.stream for at in placement.mirrors]


class MirrorConfirmer:
    """Resolves waits for ``seq`` once a mirror's last seq reaches it (see the module)."""

    def __init__(
        self,
        last_seq: LastSeq,
        interval_s: float = MIRROR_POLL_S,
        max_pending: int = MAX_PENDING_ACKS,
    ) -> None:
        self._last_seq = last_seq
        self._interval_s = interval_s
        self._max_pending = max_pending
        self._pending: list[tuple[int, asyncio.Future[None]]] = []
        self._streams: tuple[str, ...] = ()
        self._confirmed = 0  # the highest seq a mirror was seen to hold
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def wait(self, streams: Sequence[str], seq: int, timeout: float) -> None:
        """Return once one of ``streams`` holds ``seq``; BrokerUnavailable after ``timeout``."""
        if seq <= self._confirmed and tuple(streams) == self._streams:
            return
        if len(self._pending) >= self._max_pending:
            raise BrokerUnavailable(f"{len(self._pending)} acks already wait for a mirror")
        if tuple(streams) != self._streams:  # the placement changed: other mirrors now
            self._streams = tuple(streams)
            self._confirmed = 0
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (seq, future)
        self._pending.append(entry)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="mirror confirmer")
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(future)
        except TimeoutError:
            raise BrokerUnavailable(
                f"no mirror ({', '.join(self._streams)}) held seq {seq} within {timeout:g} s"
            ) from None
        finally:
            with contextlib.suppress(ValueError):
                self._pending.remove(entry)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while self._pending:
            streams = self._streams
            highest = await self._highest(streams)
            if streams != self._streams:
                continue  # an answer about mirrors that are no longer the ones to wait for
            self._confirmed = max(self._confirmed, highest)
            for seq, future in self._pending:
                if seq <= highest and not future.done():
                    future.set_result(None)
            self._pending = [(s, f) for s, f in self._pending if not f.done()]
            if self._pending:
                await asyncio.sleep(self._interval_s)  # the poll period: bounded rate

    async def _highest(self, streams: tuple[str, ...]) -> int:
        answers = await asyncio.gather(
            *(self._last_seq(stream) for stream in streams), return_exceptions=True
        )
        seqs = [answer for answer in answers if isinstance(answer, int)]
        failed = [answer for answer in answers if isinstance(answer, BaseException)]
        if failed and not seqs:
            log.debug("no mirror answered: %s", failed[0])
        return max(seqs, default=0)


class TenantConfirmers:
    """One :class:`MirrorConfirmer` per tenant, made on first use (a broker's)."""

    def __init__(self, last_seq: LastSeq) -> None:
        self._last_seq = last_seq
        self._by_tenant: dict[str, MirrorConfirmer] = {}

    async def wait(self, tenant: str, mirrors: Sequence[str], seq: int, timeout: float) -> None:
        confirmer = self._by_tenant.get(tenant)
        if confirmer is None:
            confirmer = self._by_tenant[tenant] = MirrorConfirmer(self._last_seq)
        await confirmer.wait(mirrors, seq, timeout)

    def pending(self, tenant: str) -> int:
        confirmer = self._by_tenant.get(tenant)
        return 0 if confirmer is None else confirmer.pending

    async def close(self) -> None:
        for confirmer in self._by_tenant.values():
            await confirmer.close()
