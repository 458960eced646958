"""Records built once per event on the hot path: immutable to the type checker, plain at run time.

A ``@dataclass(frozen=True, slots=True)`` sets each field in its ``__init__`` through
``object.__setattr__``, which costs about three times a plain slot assignment: 950 ns
against 280 ns for an eight-field record here (CPython 3.11). The ingest path builds
several such records per event (the client's event, the core's publish effect, the
store's result and the batch's item result): about 13 % of the gateway's CPU per event of
an ``events`` frame in a py-spy profile (docs/performance.md, "Records on the hot path").

:func:`record` makes a slotted dataclass that mypy treats as frozen (PEP 681's
``frozen_default``), so an assignment to a field is a type error, as with ``frozen=True``;
at run time it is not refused. Equality and the hash are the frozen dataclass's (from the
fields), so a record is still usable as a key. Everything else stays a frozen dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar, dataclass_transform

T = TypeVar("T")


@dataclass_transform(frozen_default=True)
def record(cls: type[T]) -> type[T]:
    """A slotted dataclass with the frozen one's equality and hash, frozen to mypy only."""
    return dataclass(slots=True, unsafe_hash=True)(cls)
