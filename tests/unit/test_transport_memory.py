"""The WebSocket shell's memory savings keep websockets' behaviour (gateway/ws/transport.py)."""

from __future__ import annotations

import collections
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from arqonbus_server.gateway.ws.transport import _LazyDeque

_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers()),
        st.tuples(st.just("popleft"), st.none()),
        st.tuples(st.just("extendleft"), st.lists(st.integers(), max_size=5)),
    ),
    max_size=60,
)


def _apply(queue: Any, op: str, arg: Any) -> Any:
    if op == "append":
        return queue.append(arg)
    if op == "extendleft":
        return queue.extendleft(reversed(arg))  # as websockets' SimpleQueue.put_back does
    try:
        return queue.popleft()
    except IndexError:
        return IndexError


@given(_OPS)
def test_the_lazy_frame_queue_behaves_as_a_deque(ops: list[tuple[str, Any]]) -> None:
    lazy, real = _LazyDeque(), collections.deque[Any]()
    for op, arg in ops:
        assert _apply(lazy, op, arg) == _apply(real, op, arg)
        assert len(lazy) == len(real)
        assert bool(lazy) == bool(real)
        # Empty means no deque held: the point of the class.
        assert (lazy._items is None) == (not real)
