"""Deduplication across a promotion (failover or failback).

A publisher that got no ack resends the event with the same id, and JetStream stores it once
because the stream remembers the ids (``Nats-Msg-Id``) it stored within its duplicate window.
A mirror does not build that memory for the events it copies, and a promoted mirror of 3
replicas does not rebuild it either (nats-server rebuilds it only when a stream is recovered
from disk). So a resend of an event that the old primary stored, and the mirror copied, but
that was never acknowledged (its region died first) would be stored a second time, under a
new seq, by the promoted stream.

``CarriedIds`` closes that gap at the gateway. For a placed tenant whose epoch is past 1, it
reads once per epoch the ids the current primary holds from before the epoch began, within
the duplicate window (at most ``MAX_CARRIED_IDS``, the latest), and answers a publish whose
id is among them as a duplicate of the stored event, without publishing it. The memory is
dropped once the duplicate window has passed (from then on the stream's own memory covers
every event it stored itself).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from arqonbus_server.mesh.ports import BrokerUnavailable
from arqonbus_server.shared.regions import Placement

# The most ids kept per tenant (about 100 bytes each): a tenant storing more events than this
# within the duplicate window before a failover keeps the latest ones.
MAX_CARRIED_IDS = 200_000

# (stream, last seq to read, duplicate window in s) -> {id: seq}
Scan = Callable[[str, int, float], Awaitable[dict[str, int]]]


@dataclass(slots=True)
class _Carried:
    epoch: int
    ids: asyncio.Future[dict[str, int]]
    until: float  # monotonic time after which the stream's own memory suffices
    expired: bool = False


class CarriedIds:
    def __init__(self, scan: Scan, window_s: float) -> None:
        self._scan = scan
        self._window_s = window_s
        self._tenants: dict[str, _Carried] = {}

    async def seq_of(self, placement: Placement, msg_id: str, timeout: float) -> int | None:
        """The seq at which the current primary holds ``msg_id`` from before its epoch, or None."""
        if placement.epoch <= 1 or not placement.epochs:
            return None
        now = time.monotonic()
        carried = self._tenants.get(placement.tenant)
        if carried is None or carried.epoch != placement.epoch:
            # Read up to the seq before the epoch began: later events were stored by this
            # stream itself, which remembers their ids.
            end_seq = placement.epochs[-1].start_seq - 1
            task = asyncio.ensure_future(
                self._scan(placement.primary.stream, end_seq, self._window_s)
            )
            carried = _Carried(placement.epoch, task, now + self._window_s)
            self._tenants[placement.tenant] = carried
        if now > carried.until:  # the stream's own memory covers the window now
            if not carried.expired:  # keep the epoch, drop the ids
                carried.expired = True
                carried.ids.cancel()
            return None
        try:
            ids = await asyncio.wait_for(asyncio.shield(carried.ids), timeout)
        except TimeoutError:
            raise BrokerUnavailable("reading the ids stored before the failover") from None
        except BrokerUnavailable:
            self._tenants.pop(placement.tenant, None)  # try again at the next publish
            raise
        return ids.get(msg_id)

    def close(self) -> None:
        for carried in self._tenants.values():
            carried.ids.cancel()
        self._tenants.clear()


def epoch_holding(placement: Placement, seq: int) -> int:
    """The epoch whose primary stored ``seq``: the last epoch starting at or before it."""
    number = 1
    for epoch in placement.epochs:
        if epoch.start_seq <= seq:
            number = epoch.number
    return number
