"""Reading a ring: :class:`RingReader`, and the :class:`Skipped` it reports.

:class:`RingReader` is for tooling (``serialmux logs``) and replay. It may run
in another process while the writer appends; it never returns a torn or mixed
record, and says :class:`Skipped` when the writer lapped it. Both are imported
from :mod:`serialmux.ring`; the format it reads is :mod:`serialmux.ringfile`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from serialmux.errors import RingCorrupt
from serialmux.ringfile import (
    _CHUNK,
    ALIGN,
    HEADER_SIZE,
    Record,
    RecordKind,
    _Head,
    _Layout,
    _open_flags,
    _os_error,
    _Rec,
    _RingFile,
)


@dataclass(frozen=True, slots=True)
class Skipped:
    """Records ``from_seq..to_seq`` (inclusive) a reader could not return.

    ``reason`` is "overwritten" when the writer lapped the reader, "unreadable"
    when the records were damaged on disk (torn by a crash, a lost page).
    """

    from_seq: int
    to_seq: int
    reason: str = "overwritten"

    @property
    def count(self) -> int:
        """How many records were lost."""
        return self.to_seq - self.from_seq + 1


class RingReader(_RingFile):
    """Reads a ring, possibly while a writer in another process appends to it.

    Readers never write. Every method looks at the file as it is now; records()
    follows the writer up to the head it finds while streaming.
    """

    def __init__(self, path: Path) -> None:
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDONLY | _open_flags())
        except OSError as exc:
            raise _os_error(path, exc) from exc
        super().__init__(path, fd)
        try:
            st = os.fstat(fd)
            self.inode: tuple[int, int] = (st.st_dev, st.st_ino)
            why = "not a regular file" if not stat.S_ISREG(st.st_mode) else None
            why = why or self._check_static(os.pread(fd, 64, 0))
        except OSError as exc:
            self.close()
            raise _os_error(path, exc) from exc
        if why is not None:
            self.close()
            raise RingCorrupt(why, path=str(path))

    def first_seq(self) -> int:
        """Seq of the oldest record on disk (== next_seq() when the ring is empty)."""
        return self._layout().first_seq

    def next_seq(self) -> int:
        """Seq the writer will give its next record, as currently on disk."""
        return self._locate_head().next_seq

    def records(
        self, from_seq: int | None = None, *, until_seq: int | None = None
    ) -> Iterator[Record | Skipped]:
        """Stream records oldest first, from ``from_seq`` up to (excluding) ``until_seq``.

        Without ``until_seq`` it ends when it reaches the writer's head. If
        ``from_seq`` was already overwritten it starts with a Skipped; if the
        writer laps the reader mid-way, a Skipped and the oldest surviving record.
        """
        if from_seq is not None:
            from_seq = max(from_seq, 1)  # seqs start at 1
        lay = self._layout()
        head = lay.head
        start: tuple[int, int, int | None]
        if from_seq is None or from_seq <= lay.first_seq:
            if from_seq is not None and from_seq < lay.first_seq:
                yield Skipped(from_seq, lay.first_seq - 1)
            start = (lay.oldest_off, lay.first_seq, None)
            from_seq = lay.first_seq
        elif from_seq >= head.next_seq:
            start = (head.off, head.next_seq, head.last_crc if head.has_prev else 0)
        else:
            target = from_seq
            off, seq = self._seek(lay, lambda r: r.seq <= target)
            start = (off, seq, None)
        yield from self._walk(start[0], start[1], start[2], from_seq, until_seq)

    def _walk(
        self, off: int, seq: int, prev: int | None, from_seq: int, until_seq: int | None
    ) -> Iterator[Record | Skipped]:
        while until_seq is None or seq < until_seq:
            rec = self._next_in_chain(off, seq, prev)
            if rec is None:
                head = self._locate_head()  # also drops the read-ahead buffer
                if head.next_seq <= seq:
                    return  # caught up (or the ring went back after a crash)
                rec = self._next_in_chain(off, seq, prev)
            if rec is None:
                lay = self._layout(head)
                if seq < lay.first_seq:
                    to = lay.first_seq - 1
                    reason, off, prev = "overwritten", lay.oldest_off, None
                else:
                    found = self._resync(off, seq, head)
                    if found is None:
                        to, off, prev = head.next_seq - 1, head.off, head.last_crc
                    else:
                        to, off, prev = found.seq - 1, found.off, None
                    reason = "unreadable"
                if until_seq is not None:
                    to = min(to, until_seq - 1)
                if to >= max(seq, from_seq):
                    yield Skipped(max(seq, from_seq), to, reason)
                seq = max(seq, to + 1)
                continue
            if seq >= from_seq:
                yield rec.public()
            off, seq, prev = rec.off + rec.span, seq + 1, rec.crc

    def _resync(self, off: int, seq: int, head: _Head) -> _Rec | None:
        """The next valid record after damage at ``off``: seq in (seq, head)."""
        ranges = [(off, head.off)]
        if off >= head.off:
            ranges = [(off, self.size), (HEADER_SIZE, head.off)]
        for lo, hi in ranges:
            for rec in self._scan(lo, hi):
                if seq < rec.seq < head.next_seq:
                    return rec
        return None

    def _seek(self, lay: _Layout, before: Callable[[_Rec], bool]) -> tuple[int, int]:
        """(off, seq) of a record r with before(r) true, as late as a bisection finds.

        ``before`` must be monotone along the ring's order (true, ..., false).
        """
        segments = [(lay.oldest_off, self.size if lay.wrapped else lay.head.off, lay.first_seq)]
        if lay.wrapped:
            b_first = self._first_in(HEADER_SIZE, lay.head.off, lay.head.next_seq)
            if b_first is not None and before(b_first):
                segments = [(b_first.off, lay.head.off, b_first.seq)]
        lo, hi, lo_seq = segments[0]
        while hi - lo > 2 * _CHUNK:
            mid = ((lo + hi) // 2) & ~(ALIGN - 1)
            probe = next(
                (r for r in self._scan(mid, hi) if lo_seq < r.seq < lay.head.next_seq), None
            )
            if probe is None or not before(probe):
                hi = mid
            else:
                lo, lo_seq = probe.off, probe.seq
        return lo, lo_seq

    def _backwards(self, until_seq: int | None = None) -> Iterator[_Rec]:
        """Records newest first (seq < until_seq), read window by window from the head."""
        lay = self._layout()
        stop = lay.head.next_seq if until_seq is None else min(until_seq, lay.head.next_seq)
        if lay.wrapped:
            segments = [
                (HEADER_SIZE, lay.head.off, lay.b_seq, stop),
                (lay.oldest_off, self.size, lay.first_seq, lay.b_seq),
            ]
        else:
            segments = [(lay.oldest_off, lay.head.off, lay.first_seq, stop)]
        for lo, hi, lo_seq, hi_seq in segments:
            bound, bound_seq = hi, min(hi_seq, stop)
            while bound > lo:
                start = max(lo, bound - _CHUNK)
                found = [r for r in self._scan(start, bound) if lo_seq <= r.seq < bound_seq]
                if found:
                    yield from reversed(found)
                    bound, bound_seq = found[0].off, found[0].seq
                    if start == lo:
                        break
                else:
                    bound = start

    def tail_position(self, lines: int, *, until_seq: int | None = None) -> tuple[int, int]:
        """(seq, byte offset into its payload) where the last ``lines`` lines of output start.

        A final line without a newline counts as a line; markers after the
        start are included. Reads backwards from the head, a window at a time.
        """
        need = lines
        seen_output = False
        earliest: int | None = None
        for rec in self._backwards(until_seq):
            if rec.kind != RecordKind.OUTPUT:
                earliest = rec.seq
                continue
            data = rec.payload
            if not seen_output:
                seen_output = True
                if data.endswith(b"\n"):
                    need += 1  # the newline ending the last line opens no new line
            count = data.count(b"\n")
            if count >= need:
                pos = len(data)
                for _ in range(need):
                    pos = data.rindex(b"\n", 0, pos)
                if pos + 1 == len(data):
                    return (rec.seq + 1, 0)  # the line starts with the next record
                return (rec.seq, pos + 1)
            need -= count
            earliest = rec.seq
        if earliest is None:
            return (self.next_seq() if until_seq is None else until_seq, 0)
        return (earliest, 0)

    def tail_from_lines(self, lines: int, *, until_seq: int | None = None) -> int:
        """The seq to start from so the last ``lines`` lines of OUTPUT are included."""
        if lines <= 0:
            return self.next_seq() if until_seq is None else until_seq
        return self.tail_position(lines, until_seq=until_seq)[0]

    def boot_seq(self) -> int | None:
        """Seq of the last boot marker (VM up, daemon start, VM reset), None if none is kept."""
        return next((r.seq for r in self._backwards() if r.public().is_boot()), None)

    def seq_at_time(self, time_ns: int) -> int:
        """Seq of the first record written at or after ``time_ns`` (next_seq() if none)."""
        lay = self._layout()
        if lay.first_seq == lay.head.next_seq:
            return lay.head.next_seq
        off, seq = self._seek(lay, lambda r: r.time_ns < time_ns)
        for item in self._walk(off, seq, None, seq, None):
            if isinstance(item, Record) and item.time_ns >= time_ns:
                return item.seq
        return self.next_seq()

    def __enter__(self) -> RingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

