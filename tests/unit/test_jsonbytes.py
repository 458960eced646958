"""shared/jsonbytes.py: kept JSON bytes are right-sized copies of orjson's output."""

from __future__ import annotations

import tracemalloc

import orjson
from hypothesis import given
from hypothesis import strategies as st

from arqonbus_server.shared.jsonbytes import dumps_kept, trimmed

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(JSON)
def test_the_same_bytes_as_orjson(value: object) -> None:
    assert dumps_kept(value) == orjson.dumps(value)


def test_a_copy_even_of_exact_bytes() -> None:
    data = b'{"a":1}'
    copy = trimmed(data)
    assert copy == data and copy is not data


def allocated_per_object(make: object, n: int = 200) -> float:
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        kept = [make(i) for i in range(n)]  # type: ignore[operator]
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    assert len(kept) == n
    return sum(s.size_diff for s in after.compare_to(before, "filename")) / n


def test_kept_bytes_occupy_about_their_length() -> None:
    def document(i: int) -> dict[str, object]:
        return {"role": "triage", "i": i}

    kept = allocated_per_object(lambda i: dumps_kept(document(i)))
    assert kept < 200, kept  # a 25-byte document and the object's header, not a whole buffer
