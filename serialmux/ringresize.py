"""Resizing a ring: copying its newest records that fit into a ring of another size.

:meth:`serialmux.ring.RingWriter._resize` owns the files (the new ring written
beside the old one, renamed over it once on disk); this module owns the copy.
It streams: memory stays at a few MiB whatever the ring's size (rings go up to
1 GiB, and the daemon resizing one serves every VM on the host), where holding
the kept records took twice their bytes and more.

* A ring whose new room holds the old ring's whole data area (one that grows
  by a few hundred bytes or more) keeps everything: one walk over the old
  ring, each record written as it is read (:func:`copy`).
* Otherwise :func:`measure` walks the old ring once, keeping only totals and a
  sample of the walk's position every MiB of records; the kept part is the
  newest records whose spans fit the room, so it starts at the first record
  whose running total reaches ``total - room``. :func:`copy` then walks again
  from the sample just before that point, skips up to it and writes the rest.

Both walks are :meth:`RingReader.records <serialmux.ringreader.RingReader.records>`
up to the old ring's head as the plan found it; the copy starts at a sampled
sequence number (the reader seeks to it), so the two see the same records.

Nothing appends to the old ring meanwhile in the daemon (see ``_resize``), but
the copy does not rely on it: :class:`Plan` holds the old ring's head before
the walks, and the copy never writes more records or bytes than the plan
measured; the caller compares the head after the copy and starts over if it
moved.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from serialmux.ringfile import (
    HEADER_SIZE,
    Record,
    RecordKind,
    _Head,
    _max_payload,
    _span,
)

if TYPE_CHECKING:
    from serialmux.ring import RingWriter
    from serialmux.ringreader import RingReader

#: Bytes the copy writes at once, and the distance between the walk's samples.
BATCH: Final = 1 << 20

#: Where a walk can start again: (records before, their total span, the seq there;
#: None: the oldest record).
_Sample = tuple[int, int, int | None]


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
    plan = Plan(reader._layout().head, _max_payload(size), room)
    plan.samples.append((0, 0, None))
    return plan


def keeps_all(reader: RingReader, plan: Plan) -> bool:
    """True if every record of the old ring fits the new one: no first walk is needed."""
    return reader.size - HEADER_SIZE <= plan.room and plan.limit >= reader._max_payload


def _records(reader: RingReader, plan: Plan, from_seq: int | None) -> Iterator[Record]:
    """The old ring's records from *from_seq* (None: the oldest) up to the plan's head."""
    for rec in reader.records(from_seq, until_seq=plan.head.next_seq):
        if isinstance(rec, Record):  # a damaged stretch's Skipped: nothing to copy
            yield rec


def measure(reader: RingReader, plan: Plan) -> None:
    """The first walk: count the records and their spans, sample the position every MiB."""
    limit, samples = plan.limit, plan.samples
    held = count = total = 0
    next_sample = BATCH
    for rec in _records(reader, plan, None):
        held += 1
        plan.last = rec
        length = len(rec.payload)
        if length > limit:
            if rec.kind is not RecordKind.OUTPUT:
                continue  # a marker too long for the new ring is dropped
            length = limit
        if total >= next_sample:
            samples.append((count, total, rec.seq))
            next_sample = total + BATCH
        count += 1
        total += _span(length)
    plan.held, plan.count, plan.total = held, count, total


def copy(reader: RingReader, new: RingWriter, plan: Plan, *, measured: bool = True) -> int:
    """Write the kept records into *new* (empty), a MiB per ``pwrite``; return how many.

    Without a first walk (*measured* False) every record is kept, and the plan's
    counts are filled in here. Never more than the plan's records, nor more
    bytes than its room: what was appended to the old ring meanwhile is not
    copied (the caller sees the head moved).
    """
    skip, room, limit = plan.skip, plan.room, plan.limit
    count = plan.count if measured else -1
    n, acc, from_seq = max((s for s in plan.samples if s[1] <= skip), key=lambda s: s[1],
                           default=plan.samples[0])
    kept = written = 0
    batch = bytearray()
    begin = new._off
    for rec in _records(reader, plan, from_seq):
        if n == count:
            break
        if not measured:
            plan.held, plan.last = plan.held + 1, rec
        payload = rec.payload
        length = len(payload)
        if length > limit:
            if rec.kind is not RecordKind.OUTPUT:
                continue
            payload, length = payload[-limit:], limit
        n += 1
        span = _span(length)
        if acc < skip:
            acc += span
            continue
        if written + span > room:
            break  # only if the old ring changed: the caller starts over
        if not kept:
            new._seq = rec.seq  # seqs run on from the oldest record kept
        new._write(int(rec.kind), payload, rec.time_ns, batch)
        kept += 1
        written += span
        if len(batch) >= BATCH:
            os.pwrite(new._fd, batch, begin)
            begin, batch = new._off, bytearray()
    if batch:
        os.pwrite(new._fd, batch, begin)
    if not measured:
        plan.count, plan.total = kept, written
    return kept
