"""The console backlog: a bounded window of output addressed by absolute offset."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from serialmux.console import Backlog


@given(chunks=st.lists(st.binary(max_size=300), max_size=40),
       capacity=st.integers(min_value=1, max_value=512),
       reader=st.integers(min_value=0, max_value=6000), limit=st.integers(1, 1000))
def test_read_returns_exactly_what_a_model_holds(chunks: list[bytes], capacity: int,
                                                 reader: int, limit: int) -> None:
    """Any reader offset gets the model's bytes, or is told how many it skipped."""
    backlog = Backlog(capacity)
    everything = b""
    for chunk in chunks:
        backlog.append(chunk)
        everything += chunk
    assert backlog.end == len(everything)
    offset = min(reader, len(everything))
    skipped, data, new = backlog.read(offset, limit)
    start = max(offset, len(everything) - capacity)
    assert skipped == start - offset
    assert data == everything[start:start + limit]
    assert new == start + len(data)


@given(chunks=st.lists(st.binary(min_size=1, max_size=200), min_size=1, max_size=30),
       capacity=st.integers(16, 256))
def test_reader_keeping_up_sees_every_byte_in_order(chunks: list[bytes], capacity: int) -> None:
    """A reader that reads after each append never skips and sees the stream unchanged."""
    backlog = Backlog(capacity)
    offset, seen = 0, b""
    for chunk in chunks:
        backlog.append(chunk)
        while offset < backlog.end:
            skipped, data, offset = backlog.read(offset, capacity)
            if len(chunk) <= capacity:
                assert skipped == 0
            seen += data
    assert seen.endswith(b"".join(chunks)[-capacity:])
    if all(len(c) <= capacity for c in chunks):
        assert seen == b"".join(chunks)


def test_oversized_append_keeps_newest_bytes() -> None:
    """An append larger than the capacity keeps its newest bytes and advances the end."""
    backlog = Backlog(8)
    backlog.append(b"0123456789abcdef")
    assert backlog.end == 16
    assert backlog.read(0, 100) == (8, b"89abcdef", 16)
