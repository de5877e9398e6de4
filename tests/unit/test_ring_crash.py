"""Crash safety of serialmux.ring: kill -9, truncation, zeroed pages, bit flips."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from serialmux.errors import RingCorrupt
from serialmux.ring import (
    Record,
    RecordKind,
    RingReader,
    RingWriter,
    Skipped,
)
from serialmux.ringfile import HEADER_SIZE, REC_HEADER

SIZE = 64 << 10


def payload(seq: int) -> bytes:
    """Deterministic output for a seq, so any record read back can be checked alone."""
    return (b"<%d>" % seq) * (1 + (seq * 7919) % 40)


def span(length: int) -> int:
    return REC_HEADER + ((length + 7) & ~7)


def check_items(got: list[Record | Skipped], expect: dict[int, set[bytes]]) -> None:
    """Seqs strictly increase and every record's payload is one written with that seq."""
    last = 0
    for item in got:
        lo = item.seq if isinstance(item, Record) else item.from_seq
        hi = item.seq if isinstance(item, Record) else item.to_seq
        assert last < lo <= hi, f"out of order: {item} after {last}"
        last = hi
        if isinstance(item, Record):
            assert item.payload in expect.get(item.seq, set()), f"corrupt payload at {item.seq}"


class RingMachine(RuleBasedStateMachine):
    """The ring against a model: appends, wraps, reopens, crashes, reads from any cursor."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="ringsm-"))
        self.path = self.dir / "vm.ring"
        self.writer = RingWriter.open(self.path, SIZE)
        self.written: dict[int, set[bytes]] = {}
        # exact model, valid until the first crash: (seq, offset, span, payload)
        self.exact = True
        self.model: list[tuple[int, int, int, bytes]] = []
        self.off = HEADER_SIZE
        self.since_crash: list[tuple[int, bytes]] = []

    @initialize()
    def start(self) -> None:
        self.writer.marker(RecordKind.DAEMON_START, "daemon started")
        self._note(1, self._marker_payload(1))

    def _marker_payload(self, seq: int) -> bytes:
        with RingReader(self.path) as r:
            item = next(iter(r.records(seq, until_seq=seq + 1)))
        assert isinstance(item, Record)
        return item.payload

    def _note(self, seq: int, data: bytes) -> None:
        self.written.setdefault(seq, set()).add(data)
        self.since_crash.append((seq, data))
        size = span(len(data))
        if self.off + size > SIZE:  # wrap: the tail is zeroed, the start reused
            self.model = [m for m in self.model if m[1] + m[2] <= self.off]
            self.off = HEADER_SIZE
        lo, hi = self.off, self.off + size
        self.model = [m for m in self.model if m[1] + m[2] <= lo or m[1] >= hi]
        self.model.append((seq, lo, size, data))
        self.off = hi

    @rule(data=st.binary(min_size=1, max_size=3000))
    def append(self, data: bytes) -> None:
        first = self.writer.next_seq
        last = self.writer.append(data)
        step = self.writer.max_payload
        for i, seq in enumerate(range(first, last + 1)):
            self._note(seq, data[i * step : (i + 1) * step])

    @rule(n=st.integers(1, 40))
    def append_lines(self, n: int) -> None:
        for _ in range(n):
            seq = self.writer.next_seq
            self.writer.append(payload(seq))
            self._note(seq, payload(seq))

    @rule()
    def append_big(self) -> None:
        self.append(bytes(range(256)) * 80)  # 20480 bytes: two records

    @rule(text=st.text(max_size=30))
    def marker(self, text: str) -> None:
        seq = self.writer.marker(RecordKind.NOTE, text, n=1)
        self._note(seq, self._marker_payload(seq))

    @rule()
    def sync(self) -> None:
        self.writer.sync()

    @rule()
    def clean_reopen(self) -> None:
        nxt = self.writer.next_seq
        self.writer.close()
        self.writer = RingWriter.open(self.path, SIZE)
        assert self.writer.next_seq == nxt
        assert self.writer.recovered_from is None

    @rule(where=st.floats(0, 1), how=st.sampled_from(["truncate", "zero_page", "kill"]))
    def crash(self, where: float, how: str) -> None:
        os.close(self.writer._fd)  # kill -9: no checkpoint, no fdatasync
        model_next = self.writer.next_seq
        if how == "truncate":
            os.truncate(self.path, int(where * SIZE))
        elif how == "zero_page":
            page = int(where * (SIZE // 4096 - 1)) * 4096
            with open(self.path, "r+b") as f:
                f.seek(page)
                f.write(bytes(4096))
        self.writer = RingWriter.open(self.path, SIZE)
        if how == "kill":
            assert self.writer.next_seq == model_next  # the page cache keeps everything
            return
        # Not asserted: next_seq <= model_next. When damage also hits the checkpointed
        # record, the full scan may resume after a valid record of the abandoned tail
        # (known limitation, see docs/ring-format.md); reads stay clean and ordered.
        self.exact = False
        self.since_crash = []

    @rule(cursor=st.integers(0, 400))
    def read_from(self, cursor: int) -> None:
        with RingReader(self.path) as r:
            got = list(r.records(cursor))
        check_items(got, self.written)
        if self.exact and self.model:
            first = min(m[0] for m in self.model)
            want = [m[0] for m in sorted(self.model) if m[0] >= cursor]
            assert [i.seq for i in got if isinstance(i, Record)] == want
            if max(cursor, 1) < first:
                assert got[0] == Skipped(max(cursor, 1), first - 1)

    @invariant()
    def reader_matches_model(self) -> None:
        with RingReader(self.path) as r:
            got = list(r.records())
            assert r.next_seq() == self.writer.next_seq
        check_items(got, self.written)
        records = [i for i in got if isinstance(i, Record)]
        if self.exact:
            assert [(i.seq, i.payload) for i in records] == [(m[0], m[3]) for m in self.model]
            return
        # after a crash: the newest records that surely fit are there, exactly, at the end
        budget = SIZE - HEADER_SIZE - span(self.writer.max_payload)
        tail: list[tuple[int, bytes]] = []
        for seq, data in reversed(self.since_crash):
            budget -= span(len(data))
            if budget < 0:
                break
            tail.append((seq, data))
        tail.reverse()
        if tail:
            assert [(i.seq, i.payload) for i in records[-len(tail) :]] == tail

    def teardown(self) -> None:
        self.writer.close()
        shutil.rmtree(self.dir, ignore_errors=True)


RingMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRingMachine = RingMachine.TestCase


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from serialmux.ring import RecordKind, RingWriter
    sys.path.insert(0, sys.argv[2])
    from test_ring_crash import payload
    w = RingWriter.open(Path(sys.argv[1]), 64 << 10)
    print(w.next_seq, flush=True)
    while True:
        seq = w.next_seq
        if seq % 97 == 0:
            w.marker(RecordKind.NOTE, f"note {seq}")
        elif seq % 251 == 0:
            w.append(b"B" * 20000)  # two records: seq, seq + 1
        else:
            w.append(payload(seq))
        if seq % 300 == 0:
            w.sync()
        if seq % 64 == 0:
            print(seq, flush=True)
    """
)


def check_record(item: Record) -> None:
    """The deterministic content the subprocess writer gives each seq."""
    if item.kind is RecordKind.NOTE:
        assert item.text() == f"note {item.seq}"
    elif item.payload.startswith(b"B"):
        assert item.payload == b"B" * len(item.payload)
    else:
        assert item.payload == payload(item.seq), f"bad payload at {item.seq}"


def test_sigkill_writer_leaves_exact_prefix(tmp_path: Path) -> None:
    """A writer killed with SIGKILL at random points always leaves an exact prefix by seq."""
    ring = tmp_path / "vm.ring"
    rng = random.Random(1234)
    reported = 0
    for _ in range(30):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(ring), str(Path(__file__).parent)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        start = int(proc.stdout.readline())
        assert start > reported  # everything reported before the last kill survived
        for _ in range(rng.randrange(1, 40)):
            reported = int(proc.stdout.readline())
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        with RingReader(ring) as r:
            got = list(r.records())
            nxt = r.next_seq()
        assert nxt > reported
        assert not [i for i in got if isinstance(i, Skipped)]
        seqs = [i.seq for i in got if isinstance(i, Record)]
        assert seqs == list(range(seqs[0], nxt))
        for item in got:
            assert isinstance(item, Record)
            check_record(item)


def _written_ring(path: Path, n: int) -> dict[int, set[bytes]]:
    w = RingWriter.open(path, SIZE)
    for seq in range(1, n + 1):
        w.append(payload(seq))
    w.close()
    return {seq: {payload(seq)} for seq in range(1, n + 1)}


def test_truncation_at_any_byte_returns_clean_records(tmp_path: Path) -> None:
    """A ring truncated anywhere reads back without a corrupt payload, before and after reopen."""
    ring = tmp_path / "vm.ring"
    expect = _written_ring(ring, 3000)
    original = ring.read_bytes()
    rng = random.Random(7)
    for cut in [0, 10, 63, 64, 4095, 4096, 4100, SIZE - 1, *rng.sample(range(SIZE), 60)]:
        ring.write_bytes(original[:cut])
        try:
            with RingReader(ring) as r:
                check_items(list(r.records()), expect)
        except RingCorrupt:
            assert cut < 64
        w = RingWriter.open(ring, SIZE)
        assert (w.recovered_from is not None) == (0 < cut < 64)  # empty: just created
        w.close()
        with RingReader(ring) as r:
            got = list(r.records())
        check_items(got, expect)
        records = [i for i in got if isinstance(i, Record)]
        if cut >= SIZE - 1:
            assert records
            assert records[-1].seq == 3000
        for stale in tmp_path.glob("vm.ring.bad-*"):
            stale.unlink()


def test_bit_flips_never_return_corrupt_payload(tmp_path: Path) -> None:
    """Random bit flips in the data area never produce a record with a wrong payload."""
    ring = tmp_path / "vm.ring"
    expect = _written_ring(ring, 3000)
    original = ring.read_bytes()
    rng = random.Random(99)
    for _ in range(60):
        data = bytearray(original)
        for _ in range(rng.randrange(1, 20)):
            pos = rng.randrange(HEADER_SIZE, SIZE)
            data[pos] ^= 1 << rng.randrange(8)
        ring.write_bytes(bytes(data))
        with RingReader(ring) as r:
            check_items(list(r.records()), expect)
        w = RingWriter.open(ring, SIZE)
        w.append(b"after")
        w.close()
        with RingReader(ring) as r:
            got = list(r.records())
        expect.setdefault(got[-1].seq if isinstance(got[-1], Record) else 0, set()).add(b"after")
        check_items(got, expect)
        assert isinstance(got[-1], Record)
        assert got[-1].payload == b"after"


def test_zeroed_pages_report_unreadable_gap(tmp_path: Path) -> None:
    """A page of zeros inside the kept records becomes a Skipped 'unreadable', not garbage."""
    ring = tmp_path / "vm.ring"
    expect = _written_ring(ring, 3000)
    with open(ring, "r+b") as f:
        f.seek(8 * 4096)
        f.write(bytes(4096))
    with RingReader(ring) as r:
        got = list(r.records())
    check_items(got, expect)
    gaps = [i for i in got if isinstance(i, Skipped)]
    assert len(gaps) == 1
    assert gaps[0].reason == "unreadable"
    assert isinstance(got[-1], Record)
    assert got[-1].seq == 3000
