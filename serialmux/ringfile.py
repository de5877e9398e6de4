"""The ring file format, and the parsing and scans the ring's writer and reader share.

This module owns the ring file format (documented byte for byte in
``docs/ring-format.md``): a 4 KiB header holding a checkpoint, then a data
area of variable-length records, each with a sequence number, wall-clock
time, kind, CRC-32 and a link to the CRC of the record before it. Here are
its constants and struct layouts, :class:`RecordKind` and :class:`Record`,
and ``_RingFile``: header checks, record parsing, scans that resynchronise
past damage, and locating the head. It has no asyncio inside.

Callers use :mod:`serialmux.ring` (writer, and the public names of this
module) and :mod:`serialmux.ringreader` (reader); the rest here is theirs only.
"""

from __future__ import annotations

import enum
import errno
import json
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from serialmux.errors import RingError

MIN_RING_SIZE: Final = 64 << 10
MAX_RING_SIZE: Final = 1 << 30

HEADER_SIZE: Final = 4096
VERSION: Final = 1
FILE_MAGIC: Final = b"SMXRING\n"
REC_MAGIC: Final = b"\xe7\x5a"
ALIGN: Final = 8
#: Largest payload of one record; bigger chunks are split (smaller rings use less).
MAX_PAYLOAD: Final = 64 << 10
FLAG_START: Final = 0x01  # first record of a chain: no predecessor in this file

_STATIC = struct.Struct("<8sIIQIIQ20x")  # + u32 crc  -> 64 bytes at 0
_CKPT = struct.Struct("<QQQIIQ20x")  # + u32 crc     -> 64 bytes at 64
_REC = struct.Struct("<2sBBIQQI")  # + u32 crc      -> 32 bytes per record header
_U32 = struct.Struct("<I")
REC_HEADER: Final = _REC.size + 4
_CKPT_OFF: Final = 64
_CHUNK: Final = 1 << 20  # read size of scans and of the backwards window
_READ_AHEAD: Final = 128 << 10  # read-ahead of record-by-record walks (> one record)
_ZEROS: Final = bytes(MAX_PAYLOAD + REC_HEADER + ALIGN)


class RecordKind(enum.IntEnum):
    """What a record holds: guest output bytes, or a marker (JSON) about the console."""

    OUTPUT = 1  # guest output bytes
    DAEMON_START = 2
    DAEMON_STOP = 3
    GAP = 4  # port not read from T1 to T2
    VM_DOWN = 5
    VM_UP = 6
    ATTACH = 7
    DETACH = 8
    TAKEOVER = 9
    ACTION = 10  # NMI / reset / break / sysrq / disable ... by whom
    VM_EVENT = 11  # hypervisor event: RESET, SHUTDOWN, STOP, RESUME, POWERDOWN
    NOTE = 12  # anything else worth a line


_KINDS: Final = {int(k): k for k in RecordKind}


@dataclass(frozen=True, slots=True)
class Record:
    """One record read back from a ring."""

    seq: int
    time_ns: int
    kind: RecordKind
    payload: bytes

    def marker(self) -> dict[str, Any] | None:
        """The decoded JSON object of a marker; None for OUTPUT or an undecodable marker."""
        if self.kind is RecordKind.OUTPUT:
            return None
        try:
            value = json.loads(self.payload)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def text(self) -> str:
        """A marker's one-line ``text``, or the payload decoded with errors="replace"."""
        fields = self.marker()
        if fields is not None and isinstance(fields.get("text"), str):
            return str(fields["text"])
        return self.payload.decode("utf-8", errors="replace")

    def is_boot(self) -> bool:
        """True for the markers ``--boot`` starts from: VM up, daemon start, VM reset."""
        if self.kind in (RecordKind.VM_UP, RecordKind.DAEMON_START):
            return True
        if self.kind is RecordKind.VM_EVENT:
            fields = self.marker()
            return fields is not None and fields.get("event") == "RESET"
        return False


def _max_payload(file_size: int) -> int:
    return min(MAX_PAYLOAD, ((file_size - HEADER_SIZE) // 4 - REC_HEADER) & ~(ALIGN - 1))


def _span(length: int) -> int:
    return REC_HEADER + ((length + ALIGN - 1) & ~(ALIGN - 1))


class _Rec:
    """A validated record as found on disk (internal: carries offset and chain)."""

    __slots__ = ("crc", "flags", "kind", "off", "payload", "prev", "seq", "span", "time_ns")

    def __init__(
        self,
        off: int,
        span: int,
        seq: int,
        time_ns: int,
        kind: int,
        flags: int,
        prev: int,
        crc: int,
        payload: bytes,
    ) -> None:
        self.off = off
        self.span = span
        self.seq = seq
        self.time_ns = time_ns
        self.kind = kind
        self.flags = flags
        self.prev = prev
        self.crc = crc
        self.payload = payload

    def public(self) -> Record:
        return Record(self.seq, self.time_ns, _KINDS[self.kind], self.payload)


_INCOMPLETE: Final = object()


@dataclass(slots=True)
class _Head:
    """Where the next record goes: the end of the valid chain."""

    off: int
    next_seq: int
    last_crc: int
    last_off: int  # 0 when the ring holds no record
    has_prev: bool


@dataclass(slots=True)
class _Layout:
    """A snapshot of where the records are: oldest..head, wrapped or not."""

    head: _Head
    first_seq: int
    oldest_off: int
    # When wrapped: [oldest_off, end) holds first_seq..b_seq-1, [data_start, head) b_seq..
    wrapped: bool
    b_seq: int


class _RingFile:
    """What the reader and writer share: header checks, record parsing, scans."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd
        self.size = 0
        self._max_payload = 0
        self._buf = b""
        self._buf_off = 0

    # -- header ----------------------------------------------------------------
    def _check_static(self, head: bytes) -> str | None:
        """Validate the static header; return why it is unusable, or None and set fields."""
        if len(head) < _CKPT_OFF:
            return "file shorter than a ring header"
        if head[:8] != FILE_MAGIC:
            return "bad magic (not a serialmux ring)"
        _magic, version, hsize, fsize, maxp, align, _created = _STATIC.unpack_from(head)
        if version > VERSION:
            return f"ring format version {version} is newer than this serialmux ({VERSION})"
        if zlib.crc32(head[:60]) != _U32.unpack_from(head, 60)[0]:
            return "header checksum mismatch"
        if version != VERSION or hsize != HEADER_SIZE or align != ALIGN:
            return f"unsupported ring layout (version {version}, header {hsize}, align {align})"
        if not MIN_RING_SIZE <= fsize <= MAX_RING_SIZE or fsize % ALIGN:
            return f"ring size {fsize} in header is out of range"
        if maxp != _max_payload(fsize):
            return f"max payload {maxp} in header does not match the ring size"
        self.size = fsize
        self._max_payload = maxp
        return None

    def _read_checkpoint(self) -> tuple[int, int, int, int] | None:
        """(write_off, next_seq, last_off, last_crc) from the header, None if torn/invalid."""
        for _ in range(3):  # a concurrent checkpoint() may tear one read
            raw = os.pread(self._fd, 64, _CKPT_OFF)
            if len(raw) == 64 and zlib.crc32(raw[:60]) == _U32.unpack_from(raw, 60)[0]:
                woff, nseq, loff, lcrc, _flags, _t = _CKPT.unpack_from(raw)
                if HEADER_SIZE <= woff <= self.size and nseq >= 1:
                    return woff, nseq, loff, lcrc
        return None

    # -- records ---------------------------------------------------------------
    def _parse(self, buf: bytes, p: int, off: int) -> _Rec | object | None:
        """The record at buf[p:] (file offset ``off``): _Rec, None if invalid, _INCOMPLETE."""
        if len(buf) - p < REC_HEADER:
            return _INCOMPLETE if off + REC_HEADER <= self.size else None
        magic, kind, flags, length, seq, time_ns, prev = _REC.unpack_from(buf, p)
        if magic != REC_MAGIC or kind not in _KINDS or flags & ~FLAG_START:
            return None
        if length > self._max_payload or length == 0:
            return None
        span = _span(length)
        if off + span > self.size:
            return None
        if p + span > len(buf):
            return _INCOMPLETE
        view = memoryview(buf)
        crc = zlib.crc32(
            view[p + REC_HEADER : p + REC_HEADER + length], zlib.crc32(view[p : p + 28])
        )
        if crc != _U32.unpack_from(buf, p + 28)[0]:
            return None
        payload = buf[p + REC_HEADER : p + REC_HEADER + length]
        return _Rec(off, span, seq, time_ns, kind, flags, prev, crc, payload)

    def _invalidate(self) -> None:
        self._buf = b""

    def _rec_at(self, off: int) -> _Rec | None:
        """The valid record starting at ``off``, through the read-ahead buffer."""
        if off < HEADER_SIZE or off + REC_HEADER > self.size:
            return None
        for attempt in range(2):
            p = off - self._buf_off
            if attempt or not 0 <= p < len(self._buf):
                self._buf = os.pread(self._fd, min(_READ_AHEAD, self.size - off), off)
                self._buf_off = off
                p = 0
            rec = self._parse(self._buf, p, off)
            if rec is not _INCOMPLETE:
                return rec if isinstance(rec, _Rec) else None
        return None

    def _chained_at(self, off: int, seq: int, prev: int | None) -> _Rec | None:
        rec = self._rec_at(off)
        if rec is None or rec.seq != seq or (prev is not None and rec.prev != prev):
            return None
        return rec

    def _next_in_chain(self, off: int, seq: int, prev: int | None) -> _Rec | None:
        """Record ``seq`` following a record ending at ``off``: there, or wrapped to the start."""
        rec = self._chained_at(off, seq, prev)
        if rec is None and off != HEADER_SIZE:
            rec = self._chained_at(HEADER_SIZE, seq, prev)
        return rec

    def _scan(self, lo: int, hi: int, chunk: int = _CHUNK) -> Iterator[_Rec]:
        """Valid records starting in [lo, hi), resynchronising past damage; streamed."""
        pos = max(HEADER_SIZE, (lo + ALIGN - 1) & ~(ALIGN - 1))
        hi = min(hi, self.size)
        while pos < hi and pos + REC_HEADER <= self.size:
            buf = os.pread(self._fd, min(chunk, self.size - pos), pos)
            if len(buf) < REC_HEADER:
                return
            p = 0
            while pos + p < hi:
                rec = self._parse(buf, p, pos + p)
                if rec is _INCOMPLETE:
                    break
                if isinstance(rec, _Rec):
                    yield rec
                    p += rec.span
                    continue
                q = buf.find(REC_MAGIC, p + ALIGN)
                while q != -1 and q % ALIGN:
                    q = buf.find(REC_MAGIC, q + 1)
                if q == -1:  # nothing here: continue where a header could still start
                    p = max(p + ALIGN, len(buf) & ~(ALIGN - 1))
                    break
                p = q
            if p == 0:
                return
            pos += p

    def _first_in(self, lo: int, hi: int, below_seq: int) -> _Rec | None:
        return next((r for r in self._scan(lo, hi, _READ_AHEAD) if r.seq < below_seq), None)

    def _locate_head(self) -> _Head:
        """Find the end of the chain: from the checkpoint forward, else by a full scan."""
        self._invalidate()
        ckpt = self._read_checkpoint()
        head: _Head | None = None
        if ckpt is not None:
            woff, nseq, loff, lcrc = ckpt
            if loff == 0:
                head = _Head(woff, nseq, 0, 0, False)
            else:
                last = self._rec_at(loff)
                if last is not None and last.seq == nseq - 1 and last.crc == lcrc:
                    head = _Head(loff + last.span, nseq, lcrc, loff, True)
        if head is None:
            head = self._full_scan(ckpt[1] if ckpt else 1)
        while True:
            rec = self._next_in_chain(
                head.off, head.next_seq, head.last_crc if head.has_prev else 0
            )
            if rec is None:
                return head
            head = _Head(rec.off + rec.span, rec.seq + 1, rec.crc, rec.off, True)

    def _full_scan(self, empty_seq: int) -> _Head:
        best: _Rec | None = None
        for rec in self._scan(HEADER_SIZE, self.size):
            if best is None or rec.seq > best.seq:
                best = rec
        if best is None:
            return _Head(HEADER_SIZE, empty_seq, 0, 0, False)
        return _Head(best.off + best.span, best.seq + 1, best.crc, best.off, True)

    def _layout(self, head: _Head | None = None) -> _Layout:
        if head is None:
            head = self._locate_head()
        empty = _Layout(head, head.next_seq, head.off, False, head.next_seq)
        if not head.has_prev:
            return empty
        b_first = self._first_in(HEADER_SIZE, head.off, head.next_seq)
        if b_first is not None and b_first.off == HEADER_SIZE and b_first.flags & FLAG_START:
            return _Layout(head, b_first.seq, HEADER_SIZE, False, b_first.seq)
        below = b_first.seq if b_first is not None else head.next_seq
        a_first = self._first_in(head.off, self.size, below)
        if a_first is not None:
            return _Layout(head, a_first.seq, a_first.off, True, below)
        if b_first is not None:
            return _Layout(head, b_first.seq, b_first.off, False, b_first.seq)
        return empty

    def close(self) -> None:
        """Close the file; idempotent."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


def _open_flags() -> int:
    return os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _os_error(path: Path, exc: OSError) -> RingError:
    if exc.errno == errno.ELOOP:
        return RingError("is a symbolic link; ring files must be regular files", path=str(path))
    if isinstance(exc, FileNotFoundError):
        return RingError("no such ring file (has the VM produced output yet?)", path=str(path))
    if isinstance(exc, PermissionError):
        return RingError(
            "permission denied; run as the serialmux user or a member of its group",
            path=str(path),
        )
    return RingError(f"{exc.strerror or exc}; check the disk and the file", path=str(path))
