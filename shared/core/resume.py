"""Resuming a placed tenant's channel across a failover: where, and what the client is told.

A tenant's placement (shared/regions.py) numbers its primaries in epochs; each failover starts
a new epoch at the promoted mirror's last seq + 1. A position (``since_epoch``, ``since_seq``)
from an older epoch is valid up to the seq before the next epoch started ("the fork"): later
seqs of the old epoch were acknowledged by a primary that was lost before a mirror had them,
and the new epoch gives those numbers to other events. So a client past the fork resumes from
the fork, and is told which of its old-epoch seqs were not carried over (a gap with
``reason: "epoch"``, docs/protocol.md#resume-across-a-failover). Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from arqonbus_server.shared.regions import Placement


@dataclass(frozen=True, slots=True)
class EpochLoss:
    """Seqs ``from_seq``..``to_seq`` of ``epoch`` that the current epoch does not hold."""

    epoch: int
    from_seq: int
    to_seq: int

    def gap_fields(self) -> dict[str, Any]:
        """The extra fields of the gap (join result or gap frame) that reports it."""
        return {
            "reason": "epoch",
            "lost": {"epoch": self.epoch, "from_seq": self.from_seq, "to_seq": self.to_seq},
        }


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """Where a join resumes: after ``since_seq`` of ``epoch`` (None: not placed)."""

    since_seq: int | None
    epoch: int | None = None
    loss: EpochLoss | None = None


def resume_point(
    placement: Placement | None, since_epoch: int | None, since_seq: int | None
) -> ResumePoint:
    """The resume point of a join with ``since_seq`` (and ``since_epoch``, if the client
    knows one) for a tenant placed as ``placement`` (None: not placed, nothing changes).

    Without ``since_epoch`` the position is taken as one of the current epoch (a client
    that never saw an epoch, or a tenant that never failed over).
    """
    if placement is None:
        return ResumePoint(since_seq)
    if since_seq is None or since_epoch is None:
        return ResumePoint(since_seq, placement.epoch)
    resume, first_lost = placement.resume_from(since_epoch, since_seq)
    if first_lost is None:
        return ResumePoint(resume, placement.epoch)
    return ResumePoint(resume, placement.epoch, EpochLoss(since_epoch, first_lost, since_seq))
