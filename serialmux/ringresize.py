"""Resizing a ring: copying its newest records that fit into a ring of another size.

:meth:`serialmux.ring.RingWriter._resize` owns the files (the new ring written
beside the old one, renamed over it once on disk); this module owns the copy.
It streams: memory stays at a few MiB whatever the ring's size (rings go up to
1 GiB, and the daemon resizing one serves every VM on the host), where holding
the kept records took twice their bytes and more.

* A ring that grows by at least its own data area keeps everything: one walk
  over the old ring, each record written as it is read (:func:`copy`).
* Otherwise :func:`measure` walks the old ring once, keeping only totals and a
  sample of the walk's position every MiB of records; the kept part is the
  newest records whose spans fit the room, so it starts at the first record
  whose running total reaches ``total - room``. :func:`copy` then walks again
  from the sample just before that point, skips up to it and writes the rest.

The walk (:func:`_chain`) reads the old ring a MiB at a time and checks each
record as the reader does (magic, kind, length, CRC, sequence number, the link
to the record before); anything else (damage, the end of the chain) goes to
:meth:`RingReader._walk <serialmux.ringreader.RingReader._walk>`, so both walks
see the records ``RingReader.records()`` returns, in its order.

Nothing appends to the old ring meanwhile in the daemon (see ``_resize``), but
the copy does not rely on it: :class:`Plan` holds the old ring's head before
the walks, and the copy never writes more records or bytes than the plan
measured; the caller compares the head after the copy and starts over if it
moved.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from serialmux.ringfile import (
    _CHUNK,
    _KINDS,
    _REC,
    _U32,
    FLAG_START,
    HEADER_SIZE,
    REC_HEADER,
    REC_MAGIC,
    Record,
    RecordKind,
    _Head,
    _max_payload,
)

if TYPE_CHECKING:
    from serialmux.ring import RingWriter
    from serialmux.ringreader import RingReader

#: Bytes the copy writes at once, and the distance between the walk's samples.
BATCH: Final = 1 << 20
_OUTPUT: Final = int(RecordKind.OUTPUT)
_ALIGN_MASK: Final = ~7

#: One record of a walk: (offset, seq, the CRC it links to, kind, time_ns, payload);
#: offset -1 for a record found past damage (the walk cannot restart there).
_Item = tuple[int, int, int | None, int, int, bytes | memoryview]
#: Where a walk can start again: (records before, their total span, offset, seq, prev CRC).
_Sample = tuple[int, int, int, int, int | None]


@dataclass(slots=True)
class Plan:
    """What the first walk found: the old ring's head then, and where the kept part starts."""

    head: _Head
    limit: int  # the new ring's largest payload: longer OUTPUT keeps its newest bytes
    room: int  # bytes the kept records may span in the new ring
    held: int = 0  # records in the old ring
    count: int = 0  # of them, those the new ring can hold (a too-long marker cannot)
    total: int = 0  # their spans in the new ring
    last: Record | None = None  # the old ring's newest record
    samples: list[_Sample] = field(default_factory=list)

    @property
    def skip(self) -> int:
        """The running span total the first kept record starts at (<= 0: keep all)."""
        return self.total - self.room


def start(reader: RingReader, size: int, room: int) -> Plan:
    """A plan for copying *reader*'s ring into one of *size* with *room* bytes for records,
    before any walk: every record is kept when the old ring's data area fits the room."""
    lay = reader._layout()
    plan = Plan(lay.head, _max_payload(size), room)
    plan.samples.append((0, 0, lay.oldest_off, lay.first_seq, None))
    return plan


def keeps_all(reader: RingReader, plan: Plan) -> bool:
    """True if every record of the old ring fits the new one: no first walk is needed."""
    return reader.size - HEADER_SIZE <= plan.room and plan.limit >= reader._max_payload


def measure(reader: RingReader, plan: Plan) -> None:
    """The first walk: count the records and their spans, sample the position every MiB."""
    limit, samples = plan.limit, plan.samples
    held = count = total = 0
    next_sample = BATCH
    item: _Item | None = None
    _, _, off, seq, prev = samples[0]
    for item in _chain(reader, off, seq, prev):
        held += 1
        length = len(item[5])
        if length > limit:
            if item[3] != _OUTPUT:
                continue  # a marker too long for the new ring is dropped
            length = limit
        if total >= next_sample and item[0] >= 0:
            samples.append((count, total, item[0], item[1], item[2]))
            next_sample = total + BATCH
        count += 1
        total += REC_HEADER + ((length + 7) & _ALIGN_MASK)
    plan.held, plan.count, plan.total = held, count, total
    if item is not None:
        plan.last = Record(item[1], item[4], RecordKind(item[3]), bytes(item[5]))


def copy(reader: RingReader, new: RingWriter, plan: Plan, *, measured: bool = True) -> int:
    """Write the kept records into *new* (empty), a MiB per ``pwrite``; return how many.

    Without a first walk (*measured* False) every record is kept, and the plan's
    counts are filled in here. Never more than the plan's records, nor more
    bytes than its room: what was appended to the old ring meanwhile is not
    copied (the caller sees the head moved).
    """
    skip, room, limit = plan.skip, plan.room, plan.limit
    count = plan.count if measured else -1
    n, acc, off, seq, prev = max((s for s in plan.samples if s[1] <= skip), key=lambda s: s[1],
                                 default=plan.samples[0])
    kept = written = 0
    batch = bytearray()
    begin = new._off
    item: _Item | None = None
    for item in _chain(reader, off, seq, prev):
        if n == count:
            break
        payload = item[5]
        length = len(payload)
        if length > limit:
            if item[3] != _OUTPUT:
                continue
            payload, length = payload[-limit:], limit
        n += 1
        span = REC_HEADER + ((length + 7) & _ALIGN_MASK)
        if acc < skip:
            acc += span
            continue
        if written + span > room:
            break  # only if the old ring changed: the caller starts over
        if not kept:
            new._seq = item[1]  # seqs run on from the oldest record kept
        new._write(item[3], payload, item[4], batch)
        kept += 1
        written += span
        if len(batch) >= BATCH:
            os.pwrite(new._fd, batch, begin)
            begin, batch = new._off, bytearray()
    if batch:
        os.pwrite(new._fd, batch, begin)
    if not measured:
        plan.held = plan.count = kept
        plan.total = written
        if item is not None:
            plan.last = Record(item[1], item[4], RecordKind(item[3]), bytes(item[5]))
    return kept


def _chain(reader: RingReader, off: int, seq: int, prev: int | None) -> Iterator[_Item]:
    """The records along the chain from record *seq* at *off* (linked to *prev*, None: any).

    What ``RingReader._walk`` returns from there, found a MiB at a time without a
    call per record; past anything but a valid next record it is ``_walk`` itself.
    """
    fd, size, maxp = reader._fd, reader.size, reader._max_payload
    unpack, u32, kinds = _REC.unpack_from, _U32.unpack_from, _KINDS
    crc32, pread = zlib.crc32, os.pread
    buf = b""
    view = memoryview(buf)
    base = 0  # the file offset of buf[0]
    at = off  # where the record is looked for: off, then (wrapped) the data area's start
    while True:
        p = at - base
        if p < 0 or p + REC_HEADER > len(buf):
            buf = pread(fd, min(_CHUNK, size - at), at) if at + REC_HEADER <= size else b""
            view, base, p = memoryview(buf), at, 0
        found = False
        if p + REC_HEADER <= len(buf):
            magic, kind, flags, length, rseq, time_ns, rprev = unpack(buf, p)
            span = REC_HEADER + ((length + 7) & _ALIGN_MASK)
            if p and p + span > len(buf) and at + span <= size:  # runs past buf: read again
                buf = pread(fd, min(_CHUNK, size - at), at)
                view, base, p = memoryview(buf), at, 0
                magic, kind, flags, length, rseq, time_ns, rprev = unpack(buf, p)
                span = REC_HEADER + ((length + 7) & _ALIGN_MASK)
            if (magic == REC_MAGIC and rseq == seq and (prev is None or rprev == prev)
                    and 0 < length <= maxp and at + span <= size and p + span <= len(buf)
                    and kind in kinds and not flags & ~FLAG_START):
                end = p + REC_HEADER + length
                crc = crc32(view[p + REC_HEADER : end], crc32(view[p : p + 28]))
                found = crc == u32(buf, p + 28)[0]
        if found:
            yield at, seq, prev, kind, time_ns, view[p + REC_HEADER : end]
            off = at = at + span
            seq += 1
            prev = crc
        elif at == off and at != HEADER_SIZE:
            at = HEADER_SIZE  # not here: the writer wrapped to the start
        else:
            break
    for rec in reader._walk(off, seq, prev, seq, None):  # damage, or the end of the chain
        if isinstance(rec, Record):
            yield -1, rec.seq, None, int(rec.kind), rec.time_ns, rec.payload
