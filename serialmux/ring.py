"""The on-disk scrollback ring: one fixed-size file per VM, a writer and a reader.

This module owns the ring file format (documented byte for byte in
``docs/ring-format.md``): a 4 KiB header holding a checkpoint, then a data
area of variable-length records, each with a sequence number, wall-clock
time, kind, CRC-32 and a link to the CRC of the record before it. It has no
asyncio inside.

* :class:`RingWriter` is used by the daemon. ``append()`` and ``marker()`` are
  a single ``os.pwritev`` into the page cache, cheap enough to call from the
  event loop with every chunk read from the VM port. Durability comes from
  ``fdatasync()`` (thread-safe, for a worker thread) and ``checkpoint()``
  (a small header ``pwrite``, on the loop thread); ``sync()`` does both.
  kill -9 of the daemon loses nothing; a power cut loses at most the last
  :data:`SYNC_INTERVAL`.
* :class:`RingReader` is for tooling (``serialmux logs``) and replay. It may
  run in another process while the writer appends; it never returns a torn
  or mixed record, and says :class:`Skipped` when the writer lapped it.

Recovery on open reads the checkpoint and scans forward only over the valid
records written after it, so opening is cheap whatever the ring size. A file
whose header is not ours (bad magic, future version) is renamed aside and a
fresh ring started; ``RingWriter.recovered_from`` tells the caller.
"""

from __future__ import annotations

import enum
import errno
import json
import os
import re
import stat
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from serialmux.errors import RingCorrupt, RingError

__all__ = [
    "DEFAULT_RING_SIZE",
    "MAX_RING_SIZE",
    "MIN_RING_SIZE",
    "SYNC_INTERVAL",
    "Record",
    "RecordKind",
    "RingReader",
    "RingWriter",
    "Skipped",
    "parse_size",
]

DEFAULT_RING_SIZE: Final = 1 << 20
MIN_RING_SIZE: Final = 64 << 10
MAX_RING_SIZE: Final = 1 << 30
#: Seconds between the daemon's ``sync()`` calls: the most a power cut can lose.
SYNC_INTERVAL: Final = 1.0

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


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS: Final = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str | int) -> int:
    """Parse a ring size ("64KiB", "1 MiB", "1GiB", 1048576) into bytes, 64 KiB..1 GiB.

    K, M and G are binary (KiB, MiB, GiB) whether or not the "i" is written.
    """
    if isinstance(text, bool):
        raise ValueError(f"ring size must be a number of bytes or e.g. '1MiB', not {text!r}")
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE_RE.match(text)
        if match is None:
            raise ValueError(
                f"ring size {text!r} is not a size: write e.g. '64KiB', '1 MiB' or '1GiB'"
            )
        unit = (match.group(2) or "").lower()[:1]
        value = int(match.group(1)) * _UNITS[unit]
    if not MIN_RING_SIZE <= value <= MAX_RING_SIZE:
        raise ValueError(f"ring size {text!r} is out of range: it must be from 64KiB to 1GiB")
    if value % ALIGN:
        raise ValueError(f"ring size {text!r} must be a multiple of {ALIGN} bytes")
    return value


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


class RingWriter(_RingFile):
    """Appends records to one VM's ring. Single-threaded except :meth:`fdatasync`.

    ``append``, ``marker``, ``checkpoint`` and ``close`` must be called from one
    thread (the event loop's); ``fdatasync`` may run concurrently in a worker
    thread, but not concurrently with ``close``.
    """

    def __init__(self, path: Path, fd: int) -> None:
        super().__init__(path, fd)
        self.recovered_from: Path | None = None
        self.recovered_reason: str | None = None
        self.bytes_written = 0
        self._off = HEADER_SIZE
        self._seq = 1
        self._prev = 0
        self._last_off = 0
        self._durable = (HEADER_SIZE, 1, 0, 0)  # position as of the last fdatasync
        self._wrap_seq = 0  # next_seq when the last wrap wrote its own checkpoint

    @classmethod
    def open(cls, path: Path, size: int = DEFAULT_RING_SIZE) -> RingWriter:
        """Create or recover the ring at ``path``.

        A file that is not a usable ring (bad magic, future version, damaged
        header, different size) is renamed to ``<name>.bad-<time>`` and a fresh
        ring created; ``recovered_from`` then holds the new name of the old
        file and ``recovered_reason`` why. Raises RingError only for OS errors.
        """
        size = parse_size(size)
        path = Path(path)
        try:
            fd, created = _open_or_create(path)
        except OSError as exc:
            raise _os_error(path, exc) from exc
        writer = cls(path, fd)
        try:
            writer._start(size, created)
        except OSError as exc:
            writer.close()
            raise _os_error(path, exc) from exc
        except BaseException:
            writer.close()
            raise
        return writer

    def _start(self, size: int, created: bool) -> None:
        st = os.fstat(self._fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if created or st.st_size == 0:
            self._initialise(size)
            return
        why = self._check_static(os.pread(self._fd, 64, 0))
        if why is None and self.size != size:
            why = f"ring size changed from {self.size} to {size} bytes"
        if why is not None:
            self._move_aside(why)
            self._initialise(size)
            return
        if st.st_size != self.size:  # truncated (power cut) or grown: back to the right size
            os.ftruncate(self._fd, self.size)
        head = self._locate_head()
        self._off, self._seq, self._prev = head.off, head.next_seq, head.last_crc
        self._last_off = head.last_off if head.has_prev else 0
        self._durable = self._position()  # what is on disk now is what we claim
        self.checkpoint()

    def _initialise(self, size: int) -> None:
        self.size = size
        self._max_payload = _max_payload(size)
        os.ftruncate(self._fd, 0)
        try:
            os.posix_fallocate(self._fd, 0, size)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise
        os.ftruncate(self._fd, size)
        static = _STATIC.pack(
            FILE_MAGIC, VERSION, HEADER_SIZE, size, self._max_payload, ALIGN, time.time_ns()
        )
        os.pwrite(self._fd, static + _U32.pack(zlib.crc32(static)), 0)
        self._off, self._seq, self._prev, self._last_off = HEADER_SIZE, 1, 0, 0
        self._durable = self._position()
        self.checkpoint()
        os.fsync(self._fd)
        _fsync_dir(self.path.parent)

    def _move_aside(self, why: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.bad-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.bad-{stamp}-{n}")
        os.rename(self.path, target)
        old, self._fd = self._fd, -1
        os.close(old)
        self._fd, _ = _open_or_create(self.path)
        self.recovered_from = target
        self.recovered_reason = why

    @property
    def next_seq(self) -> int:
        """The sequence number the next record will get."""
        return self._seq

    @property
    def max_payload(self) -> int:
        """Largest payload of one record; longer appends are split."""
        return self._max_payload

    def append(self, data: bytes | bytearray | memoryview, *, time_ns: int | None = None) -> int:
        """Append guest output as OUTPUT record(s); return the last seq (next_seq-1 if empty)."""
        view = memoryview(data).cast("B")
        t = time.time_ns() if time_ns is None else time_ns
        step = self._max_payload
        for start in range(0, len(view), step):
            self._write(RecordKind.OUTPUT, view[start : start + step], t)
        self.bytes_written += len(view)
        return self._seq - 1

    def marker(
        self, kind: RecordKind, text: str, *, time_ns: int | None = None, **fields: Any
    ) -> int:
        """Append a marker: JSON ``{"text": text, **fields}``; return its seq."""
        if kind is RecordKind.OUTPUT:
            raise ValueError("marker() writes markers; use append() for guest output")
        body = {"text": " ".join(text.split()), **fields}
        payload = json.dumps(body, ensure_ascii=False, separators=(",", ":"), default=str).encode()
        if len(payload) > self._max_payload:
            raise ValueError(f"marker of {len(payload)} bytes exceeds {self._max_payload}")
        self._write(kind, memoryview(payload), time.time_ns() if time_ns is None else time_ns)
        return self._seq - 1

    def _write(self, kind: int, payload: memoryview, time_ns: int) -> None:
        length = len(payload)
        span = _span(length)
        off = self._off
        wrapped = off + span > self.size
        try:
            if wrapped:  # zero the tail so no stale record hides there, then start over
                if off < self.size:
                    os.pwrite(self._fd, memoryview(_ZEROS)[: self.size - off], off)
                off = HEADER_SIZE
            flags = 0 if self._last_off else FLAG_START
            head = _REC.pack(REC_MAGIC, kind, flags, length, self._seq, time_ns, self._prev)
            crc = zlib.crc32(payload, zlib.crc32(head))
            pad = span - REC_HEADER - length
            os.pwritev(self._fd, [head, _U32.pack(crc), payload, _ZEROS[:pad]], off)
        except OSError as exc:
            raise _os_error(self.path, exc) from exc
        self._last_off = off
        self._off = off + span
        self._prev = crc
        self._seq += 1
        if wrapped:  # keep the checkpoint within one lap of the head
            self._wrap_seq = self._seq
            self._write_checkpoint(self._position())

    def _position(self) -> tuple[int, int, int, int]:
        return self._off, self._seq, self._last_off, self._prev

    def _write_checkpoint(self, pos: tuple[int, int, int, int]) -> None:
        woff, nseq, loff, lcrc = pos
        body = _CKPT.pack(woff, nseq, loff, lcrc, 0, time.time_ns())
        os.pwrite(self._fd, body + _U32.pack(zlib.crc32(body)), _CKPT_OFF)

    def checkpoint(self) -> None:
        """Record in the header the position as of the last fdatasync (cheap pwrite).

        Call from the writer's thread. Only durable records are claimed, so
        after a power cut the checkpoint stays usable and open stays cheap.
        """
        if self._durable[1] < self._wrap_seq:
            return  # the wrap's checkpoint is newer and still within one lap
        try:
            self._write_checkpoint(self._durable)
        except OSError as exc:
            raise _os_error(self.path, exc) from exc

    def fdatasync(self) -> None:
        """Flush appended records to disk. Thread-safe with respect to append()."""
        pos = self._position()  # one tuple read: consistent under the GIL
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise _os_error(self.path, exc) from exc
        self._durable = pos

    def sync(self) -> None:
        """fdatasync then checkpoint, in the caller's thread (the simple, blocking form)."""
        self.fdatasync()
        self.checkpoint()

    def close(self) -> None:
        """Checkpoint the current position, fdatasync and close; idempotent."""
        if self._fd < 0:
            return
        try:
            self._write_checkpoint(self._position())
            os.fdatasync(self._fd)
        except OSError as exc:
            raise _os_error(self.path, exc) from exc
        finally:
            super().close()


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


def _open_or_create(path: Path) -> tuple[int, bool]:
    """Open ``path`` read-write without following symlinks; create it 0640 (dir 0750)."""
    parent = path.parent
    if not parent.exists():
        parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        os.chmod(parent, 0o750)  # noqa: S103  # the group reads rings; mkdir's mode obeys umask
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _open_flags(), 0o640)
    except FileExistsError:
        return os.open(path, os.O_RDWR | _open_flags()), False
    os.fchmod(fd, 0o640)
    return fd, True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
