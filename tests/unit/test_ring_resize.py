"""Tests of a ring's resize (serialmux.ringresize): memory bounded whatever the ring's size,
and a copy that never outgrows what it measured when the old ring changes meanwhile."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest

from serialmux import ringresize
from serialmux.ring import Record, RecordKind, RingReader, RingWriter
from serialmux.ringfile import HEADER_SIZE

MiB = 1 << 20
#: Far under the rings below: the old resize held every kept record (24 MiB and more).
MEMORY_BOUND = 8 * MiB


def line(n: int) -> bytes:
    """A console line of 1000 bytes, numbered so the copy can be checked."""
    return (b"[%10d] " % n).ljust(998, b"=") + b"\r\n"


def fill(path: Path, size: int, count: int) -> None:
    """A ring of *size* at *path* with *count* numbered lines (it wraps if they do not fit)."""
    w = RingWriter.open(path, size, sync_create=False)
    for n in range(count):
        w.append(line(n), time_ns=n)
    w.close()


@pytest.mark.parametrize("new_size", [32 * MiB, 16 * MiB], ids=["grow", "shrink"])
def test_a_resize_holds_a_few_mib_whatever_the_ring_size(tmp_path: Path, new_size: int) -> None:
    """Resizing a 24 MiB ring of lines, up or down, never holds more than MEMORY_BOUND
    (traced allocations), and keeps the newest lines that fit, in order."""
    ring = tmp_path / "vm.ring"
    fill(ring, 24 * MiB, 24 * MiB // 1036 * 5 // 4)  # wrapped: the oldest quarter lapped
    with RingReader(ring) as r:
        last = r.next_seq() - 1
    tracemalloc.start()
    try:
        w = RingWriter.open(ring, new_size)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert w.resized_after is not None
    assert w.resized_after.seq == last
    w.close()
    assert peak < MEMORY_BOUND, f"peak {peak / MiB:.1f} MiB"
    with RingReader(ring) as r:
        got = [x for x in r.records() if isinstance(x, Record)]
    kept, note = got[:-1], got[-1]
    assert note.kind is RecordKind.NOTE
    assert note.text().startswith("ring resized from")
    assert kept[-1].seq == last
    assert [x.seq for x in kept] == list(range(kept[0].seq, last + 1))
    assert [x.payload for x in kept[::97]] == [line(x.time_ns) for x in kept[::97]]
    assert sum(len(x.payload) + 40 for x in kept) > min(new_size, 24 * MiB) * 0.9


def test_records_appended_between_the_walks_are_not_copied_and_are_seen(tmp_path: Path) -> None:
    """Records appended to the old ring after the measuring walk (lapping its oldest) do not
    make the copy outgrow what was measured, and the moved head is seen (the resize starts
    over); the next resize keeps them."""
    ring = tmp_path / "vm.ring"
    fill(ring, 1 * MiB, 12_000)  # wrapped
    size = 256 << 10
    room = size - HEADER_SIZE - 512
    with RingReader(ring) as reader:
        plan = ringresize.start(reader, size, room)
        ringresize.measure(reader, plan)
        measured = plan.count
        writer = RingWriter.open(ring, 1 * MiB)  # another writer, while the resize reads
        for n in range(12_000, 16_000):
            writer.append(line(n), time_ns=n)
        writer.close()
        new = RingWriter.open(tmp_path / "new.ring", size)
        try:
            kept = ringresize.copy(reader, new, plan)
            assert kept <= measured
            assert new._off - HEADER_SIZE <= room
            assert reader._locate_head() != plan.head
        finally:
            new.close()
    w = RingWriter.open(ring, size)  # the start over: a fresh measure sees the new records
    w.close()
    with RingReader(ring) as r:
        got = [x for x in r.records() if isinstance(x, Record)]
    assert got[-2].payload == line(15_999)
