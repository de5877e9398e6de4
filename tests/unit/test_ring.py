"""Tests of serialmux.ring: format round trip, wrap, reader API, files and permissions."""

from __future__ import annotations

import os
import stat
import struct
import threading
import zlib
from pathlib import Path

import pytest

from serialmux.errors import RingCorrupt, RingError
from serialmux.ring import (
    DEFAULT_RING_SIZE,
    Record,
    RecordKind,
    RingReader,
    RingWriter,
    Skipped,
    parse_size,
)
from serialmux.ringfile import HEADER_SIZE

SMALL = 64 << 10


def payload(seq: int) -> bytes:
    """Deterministic output for a seq, of varying length, so reads can be checked."""
    return (b"%d:" % seq) * (1 + seq % 23) + b"\r\n"


def items(reader: RingReader, from_seq: int | None = None) -> list[Record | Skipped]:
    return list(reader.records(from_seq))


@pytest.fixture
def ring(tmp_path: Path) -> Path:
    return tmp_path / "rings" / "vm1.ring"


def test_parse_size_accepts_units_and_bounds() -> None:
    """parse_size reads KiB/MiB/GiB and plain ints, and rejects out-of-range sizes."""
    assert parse_size("64KiB") == 64 << 10
    assert parse_size("1 MiB") == DEFAULT_RING_SIZE
    assert parse_size("1GiB") == 1 << 30
    assert parse_size(1048576) == 1 << 20
    for bad in ("1KiB", "2GiB", "lots", "1.5MiB"):
        with pytest.raises(ValueError, match="ring size"):
            parse_size(bad)


def test_round_trip_records_and_markers(ring: Path) -> None:
    """Appended output and markers read back in order with their kinds, times and JSON."""
    w = RingWriter.open(ring, SMALL)
    assert w.marker(RecordKind.ACTION, "NMI sent by alice", user="alice", action="nmi") == 1
    assert w.append(b"hello\r\n", time_ns=123) == 2
    w.close()
    with RingReader(ring) as r:
        got = items(r)
    assert [type(i) for i in got] == [Record, Record]
    first, second = got
    assert isinstance(first, Record)
    assert isinstance(second, Record)
    assert first.kind is RecordKind.ACTION
    assert first.marker() == {"text": "NMI sent by alice", "user": "alice", "action": "nmi"}
    assert first.text() == "NMI sent by alice"
    assert (second.seq, second.time_ns, second.payload, second.marker()) == (
        2,
        123,
        b"hello\r\n",
        None,
    )


def test_large_chunk_is_split_into_records(ring: Path) -> None:
    """A chunk longer than the max payload becomes several records that concatenate back."""
    w = RingWriter.open(ring, 1 << 20)
    data = bytes(range(256)) * 1000  # 256000 bytes > 64 KiB
    last = w.append(data)
    assert last == 4
    assert w.bytes_written == len(data)
    with RingReader(ring) as r:
        got = [i for i in items(r) if isinstance(i, Record)]
    assert b"".join(i.payload for i in got) == data
    assert max(len(i.payload) for i in got) == w.max_payload
    w.close()


def test_wrap_keeps_newest_records_contiguous(ring: Path) -> None:
    """After many laps the reader returns a contiguous run ending at the newest record."""
    w = RingWriter.open(ring, SMALL)
    for seq in range(1, 5001):
        w.append(payload(seq))
    with RingReader(ring) as r:
        got = items(r)
        assert r.next_seq() == 5001 == w.next_seq
        first = r.first_seq()
    seqs = [i.seq for i in got if isinstance(i, Record)]
    assert seqs == list(range(first, 5001))
    assert first > 1
    assert all(i.payload == payload(i.seq) for i in got if isinstance(i, Record))
    w.close()


def test_reopen_continues_sequence(ring: Path) -> None:
    """Closing and reopening the writer continues the chain at the next seq."""
    w = RingWriter.open(ring, SMALL)
    for seq in range(1, 3001):
        w.append(payload(seq))
    w.close()
    w = RingWriter.open(ring, SMALL)
    assert w.next_seq == 3001
    assert w.recovered_from is None
    w.append(payload(3001))
    w.close()
    with RingReader(ring) as r:
        got = [i for i in items(r) if isinstance(i, Record)]
    assert got[-1].seq == 3001
    assert got[-1].payload == payload(3001)
    assert [i.seq for i in got] == list(range(got[0].seq, 3002))


def test_records_from_seq_and_until(ring: Path) -> None:
    """records(from_seq, until_seq) returns exactly that half-open range."""
    w = RingWriter.open(ring, 1 << 20)
    for seq in range(1, 2001):
        w.append(payload(seq))
    with RingReader(ring) as r:
        got = list(r.records(500, until_seq=510))
    assert [i.seq for i in got if isinstance(i, Record)] == list(range(500, 510))
    w.close()


def test_records_from_overwritten_seq_starts_with_skipped(ring: Path) -> None:
    """Asking for a seq already overwritten yields Skipped up to the oldest kept record."""
    w = RingWriter.open(ring, SMALL)
    for seq in range(1, 3001):
        w.append(payload(seq))
    with RingReader(ring) as r:
        first = r.first_seq()
        got = items(r, 1)
    assert got[0] == Skipped(1, first - 1)
    assert isinstance(got[1], Record)
    assert got[1].seq == first
    w.close()


def test_seek_in_large_ring_uses_bisection_correctly(tmp_path: Path) -> None:
    """In a ring bigger than the scan window, from_seq and seq_at_time land exactly."""
    w = RingWriter.open(tmp_path / "big", 8 << 20)
    for seq in range(1, 200_001):
        w.append(payload(seq), time_ns=seq * 1000)
    with RingReader(tmp_path / "big") as r:
        first = r.first_seq()
        for target in (first, first + 1, 12345 if first < 12345 else first + 7, 199_999):
            got = next(iter(r.records(target)))
            assert isinstance(got, Record)
            assert got.seq == target
            assert got.payload == payload(target)
        assert r.seq_at_time(150_000 * 1000) == 150_000
        assert r.seq_at_time(150_000 * 1000 - 1) == 150_000
        assert r.seq_at_time(10**18) == r.next_seq()
    w.close()


def test_tail_from_lines_counts_newlines(ring: Path) -> None:
    """tail_from_lines returns the record where the last N lines start."""
    w = RingWriter.open(ring, SMALL)
    w.append(b"one\r\ntwo\r\nthr")
    w.append(b"ee\r\nfour\r\n")
    w.marker(RecordKind.NOTE, "between")
    w.append(b"five")
    with RingReader(ring) as r:
        assert r.tail_from_lines(1) == 3  # the marker after the newline is kept
        assert r.tail_from_lines(2) == 2
        assert r.tail_position(3) == (1, 10)
        assert r.tail_from_lines(100) == 1
        assert r.tail_from_lines(0) == 5
    w.close()


def test_boot_seq_finds_last_boot_marker(ring: Path) -> None:
    """boot_seq is the seq of the newest VM up / daemon start / RESET marker."""
    w = RingWriter.open(ring, SMALL)
    w.marker(RecordKind.DAEMON_START, "daemon started")
    w.append(b"old boot\n")
    with RingReader(ring) as r:
        assert r.boot_seq() == 1
    w.marker(RecordKind.VM_EVENT, "VM reset", event="RESET")
    w.append(b"new boot\n")
    w.marker(RecordKind.VM_EVENT, "VM stopped", event="STOP")
    with RingReader(ring) as r:
        assert r.boot_seq() == 3
    w.close()


def test_reader_lapped_mid_stream_reports_skipped(ring: Path) -> None:
    """A reader paused while the writer laps it reports Skipped and never a mixed record."""
    w = RingWriter.open(ring, SMALL)
    for seq in range(1, 2001):
        w.append(payload(seq))
    r = RingReader(ring)
    stream = r.records()
    before = [next(stream) for _ in range(5)]
    for seq in range(2001, 8001):  # several laps
        w.append(payload(seq))
    after = list(stream)
    r.close()
    got = before + after
    skipped = [i for i in got if isinstance(i, Skipped)]
    assert skipped
    assert all(s.reason == "overwritten" for s in skipped)
    seqs = [i.seq if isinstance(i, Record) else i.from_seq for i in got]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)
    assert all(i.payload == payload(i.seq) for i in got if isinstance(i, Record))
    last = got[-1]
    assert isinstance(last, Record)
    assert last.seq == 8000
    w.close()


def test_reader_thread_concurrent_with_writer(ring: Path) -> None:
    """A reader thread looping over the ring while the writer laps it sees only exact records."""
    w = RingWriter.open(ring, SMALL)
    w.append(payload(1))
    done = threading.Event()
    errors: list[str] = []
    seen_skipped = []

    def read() -> None:
        with RingReader(ring) as r:
            cursor: int | None = None
            while not done.is_set():
                for item in r.records(cursor):
                    if isinstance(item, Skipped):
                        seen_skipped.append(item)
                        cursor = item.to_seq + 1
                    else:
                        if item.payload != payload(item.seq):
                            errors.append(f"seq {item.seq} payload mismatch")
                        if cursor is not None and item.seq != cursor:
                            errors.append(f"seq {item.seq} after cursor {cursor}")
                        cursor = item.seq + 1

    thread = threading.Thread(target=read)
    thread.start()
    try:
        for seq in range(2, 40_001):
            w.append(payload(seq))
    finally:
        done.set()
        thread.join(timeout=60)
    assert not errors
    w.close()


def test_bad_magic_is_moved_aside(ring: Path) -> None:
    """A file that is not a ring is renamed aside, a fresh ring started, and the caller told."""
    ring.parent.mkdir(parents=True)
    ring.write_bytes(b"this is not a ring" * 1000)
    w = RingWriter.open(ring, SMALL)
    assert w.recovered_from is not None
    assert w.recovered_from.exists()
    assert w.recovered_from.read_bytes().startswith(b"this is not a ring")
    assert "magic" in (w.recovered_reason or "")
    assert w.next_seq == 1
    w.append(b"fresh")
    w.close()
    with RingReader(ring) as r:
        assert [i.seq for i in items(r)] == [1]


def test_future_version_is_moved_aside(ring: Path) -> None:
    """A ring of a newer format version is moved aside, never read or raised about."""
    w = RingWriter.open(ring, SMALL)
    w.append(b"x")
    w.close()
    with open(ring, "r+b") as f:
        head = bytearray(f.read(64))
        struct.pack_into("<I", head, 8, 99)
        struct.pack_into("<I", head, 60, zlib.crc32(bytes(head[:60])))
        f.seek(0)
        f.write(head)
    with pytest.raises(RingCorrupt, match="newer"):
        RingReader(ring)
    w = RingWriter.open(ring, SMALL)
    assert w.recovered_from is not None
    assert "newer" in (w.recovered_reason or "")
    assert w.next_seq == 1
    w.close()


def test_a_larger_size_keeps_every_record_and_continues_the_sequence(ring: Path) -> None:
    """Opening with a larger ring_size rewrites the ring at that size with all its records,
    in order and with their seqs, then a note; nothing is moved aside."""
    w = RingWriter.open(ring, SMALL)
    for seq in range(1, 201):
        w.append(payload(seq))
    w.close()
    w = RingWriter.open(ring, 128 << 10)
    assert (w.recovered_from, w.resized_from) == (None, SMALL)
    assert os.path.getsize(ring) == 128 << 10
    w.append(b"after\r\n")
    w.close()
    with RingReader(ring) as r:
        got = items(r)
    assert [x.payload for x in got[:200] if isinstance(x, Record)] == [
        payload(seq) for seq in range(1, 201)]
    assert [x.seq for x in got if isinstance(x, Record)] == list(range(1, 203))
    note = got[200]
    assert isinstance(note, Record)
    assert note.kind is RecordKind.NOTE
    assert note.text() == f"ring resized from {SMALL} to {128 << 10} bytes"
    assert got[-1].payload == b"after\r\n"
    assert sorted(p.name for p in ring.parent.iterdir()) == [ring.name]


def test_a_smaller_size_keeps_the_newest_records_that_fit(ring: Path) -> None:
    """Shrinking keeps the newest records that fit, oldest dropped, and says how many."""
    w = RingWriter.open(ring, 128 << 10)
    for seq in range(1, 2001):
        w.append(payload(seq))
    w.close()
    with RingReader(ring) as r:
        held = len([x for x in items(r) if isinstance(x, Record)])  # the rest was lapped
    w = RingWriter.open(ring, SMALL)
    w.close()
    with RingReader(ring) as r:
        got = [x for x in items(r) if isinstance(x, Record)]
    kept = got[:-1]
    assert [x.payload for x in kept] == [payload(x.seq) for x in kept]
    assert kept[-1].seq == 2000
    assert [x.seq for x in kept] == list(range(kept[0].seq, 2001))
    assert sum(len(x.payload) for x in kept) > SMALL // 2  # the room was used
    assert got[-1].text() == (f"ring resized from {128 << 10} to {SMALL} bytes; "
                              f"{held - len(kept)} of its records did not fit")


def test_a_wrapped_ring_grows_with_every_record_in_order(ring: Path) -> None:
    """A ring that has wrapped (records at its end, then at its start) grows with all of
    them in order, the seqs unchanged; a stale .resize a crash left is gone after open."""
    w = RingWriter.open(ring, SMALL)
    for seq in range(1, 3001):
        w.append(payload(seq))
    w.close()
    with RingReader(ring) as r:
        before = [x for x in items(r) if isinstance(x, Record)]
    assert before[0].seq > 1  # it wrapped
    ring.with_name(ring.name + ".resize").write_bytes(b"left by a crash")
    RingWriter.open(ring, 256 << 10).close()
    with RingReader(ring) as r:
        after = [x for x in items(r) if isinstance(x, Record)]
    assert [(x.seq, x.payload) for x in after[:-1]] == [(x.seq, x.payload) for x in before]
    assert not ring.with_name(ring.name + ".resize").exists()


def test_a_shrink_keeps_the_newest_bytes_of_a_record_too_long_for_it(ring: Path) -> None:
    """Shrinking below the newest record's length keeps that record's newest bytes (it kept
    nothing at all), and resized_after is the old ring's last record (how it ended)."""
    w = RingWriter.open(ring, 1 << 20)
    w.append(b"old line\r\n")
    big = bytes(range(256)) * 200  # 51200 bytes: more than a 64 KiB ring's largest record
    w.append(big)
    w.close()
    w = RingWriter.open(ring, SMALL)
    assert w.resized_after is not None
    assert w.resized_after.payload == big
    limit = w.max_payload
    w.close()
    with RingReader(ring) as r:
        got = [x for x in items(r) if isinstance(x, Record)]
    assert got[-2].payload == big[-limit:]
    assert got[-2].seq == 2


def test_file_and_directory_permissions(ring: Path) -> None:
    """A new ring is 0640 in a newly created 0750 directory, and exactly ring_size long."""
    old = os.umask(0)
    try:
        RingWriter.open(ring, SMALL).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(ring).st_mode) == 0o640
    assert stat.S_IMODE(os.stat(ring.parent).st_mode) == 0o750
    assert os.path.getsize(ring) == SMALL


def test_symlink_at_ring_path_is_refused(tmp_path: Path) -> None:
    """The writer and reader refuse a symlink at the ring path (O_NOFOLLOW)."""
    target = tmp_path / "elsewhere"
    RingWriter.open(target, SMALL).close()
    link = tmp_path / "vm.ring"
    link.symlink_to(target)
    with pytest.raises(RingError, match="symbolic link"):
        RingWriter.open(link, SMALL)
    with pytest.raises(RingError, match="symbolic link"):
        RingReader(link)
    dangling = tmp_path / "dangling.ring"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(RingError):
        RingWriter.open(dangling, SMALL)
    assert not (tmp_path / "nowhere").exists()


def test_reader_refuses_non_ring(tmp_path: Path) -> None:
    """RingReader raises RingCorrupt for a file that is not a ring, RingError if missing."""
    bad = tmp_path / "bad"
    bad.write_bytes(b"\0" * 100_000)
    with pytest.raises(RingCorrupt):
        RingReader(bad)
    with pytest.raises(RingError, match="no such"):
        RingReader(tmp_path / "missing")


def test_checkpoint_and_fdatasync_split(ring: Path) -> None:
    """checkpoint() records only what the last fdatasync() made durable; reopen finds all."""
    w = RingWriter.open(ring, SMALL)
    for seq in range(1, 101):
        w.append(payload(seq))
    w.fdatasync()
    w.checkpoint()
    with open(ring, "rb") as f:
        f.seek(64)
        _woff, next_seq = struct.unpack("<QQ", f.read(16))
    assert next_seq == 101
    for seq in range(101, 151):
        w.append(payload(seq))
    w.checkpoint()  # nothing new synced: the header still says 101
    with open(ring, "rb") as f:
        f.seek(72)
        assert struct.unpack("<Q", f.read(8))[0] == 101
    with RingReader(ring) as r:
        assert r.next_seq() == 151  # readers scan forward from the checkpoint
    w.sync()
    w.close()
    assert HEADER_SIZE == 4096


def test_a_sync_that_meets_a_closed_ring_does_nothing(ring: Path) -> None:
    """fdatasync (the sync thread's) after close (another thread's) neither raises nor
    touches a reused fd number; close waits for a sync under way."""
    writer = RingWriter.open(ring, 64 * 1024)
    writer.append(b"kept\n")
    closer = threading.Thread(target=writer.close)
    with writer._fd_lock:  # a sync under way
        closer.start()
        closer.join(0.05)
        assert closer.is_alive()  # close waits for it
    closer.join(5)
    assert not closer.is_alive()
    reused = os.open(os.devnull, os.O_RDONLY)  # likely the ring's old number
    try:
        writer.fdatasync()  # nothing to do: no EBADF, no fdatasync of /dev/null
    finally:
        os.close(reused)
