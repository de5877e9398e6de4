"""The on-disk scrollback ring: one fixed-size file per VM, a writer and a reader.

This is the ring's public face: callers import everything from here. It owns
the writer and the ring sizes; the file format (documented byte for byte in
``docs/ring-format.md``) and the parsing and scans the writer and reader
share are :mod:`serialmux.ringfile`, the reader is :mod:`serialmux.ringreader`.
None of them has asyncio inside.

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

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import re
import stat
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Final

from serialmux import ringresize
from serialmux.errors import RingError
from serialmux.ringfile import (
    _CKPT,
    _CKPT_OFF,
    _REC,
    _STATIC,
    _U32,
    _ZEROS,
    ALIGN,
    FILE_MAGIC,
    FLAG_START,
    HEADER_SIZE,
    MAX_RING_SIZE,
    MIN_RING_SIZE,
    REC_HEADER,
    REC_MAGIC,
    VERSION,
    Record,
    RecordKind,
    _max_payload,
    _open_flags,
    _os_error,
    _Rec,
    _RingFile,
    _span,
)
from serialmux.ringreader import RingReader, Skipped

#: Room kept in a resized ring for its note saying so.
_RESIZE_NOTE_ROOM = 256
#: The name a resized ring is written under before it replaces the old one.
_RESIZING = ".resize"
#: Tries at a resize before giving up on a ring that keeps being appended to.
_RESIZE_TRIES = 3

__all__ = [
    "DEFAULT_RING_SIZE",
    "SYNC_INTERVAL",
    "Record",
    "RecordKind",
    "RingReader",
    "RingWriter",
    "Skipped",
    "fdatasync_all",
    "parse_size",
]

DEFAULT_RING_SIZE: Final = 1 << 20
_OUTPUT: Final = int(RecordKind.OUTPUT)
#: Seconds between the daemon's ``sync()`` calls: the most a power cut can lose.
SYNC_INTERVAL: Final = 1.0
#: From this many dirty rings on, :func:`fdatasync_all` makes one ``syncfs``
#: per filesystem instead of one ``fdatasync`` per ring.
SYNCFS_FROM: Final = 64


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



class RingWriter(_RingFile):
    """Appends records to one VM's ring. Single-threaded except :meth:`fdatasync`.

    ``append``, ``marker`` and ``checkpoint`` must be called from one thread (the
    event loop's); ``fdatasync`` may run concurrently in a worker thread, and
    ``close`` (from any one thread once the loop no longer appends) waits for
    it: neither touches the other's fd, or a number reused after it.
    """

    def __init__(self, path: Path, fd: int) -> None:
        super().__init__(path, fd)
        self.recovered_from: Path | None = None
        self.recovered_reason: str | None = None
        self.resized_from: int | None = None  # the ring's size before open() resized it
        self.resized_after: Record | None = None  # and its newest record then (how it ended)
        self.bytes_written = 0
        self._off = HEADER_SIZE
        self._seq = 1
        self._prev = 0
        self._last_off = 0
        self._durable = (HEADER_SIZE, 1, 0, 0)  # position as of the last fdatasync
        self._wrap_seq = 0  # next_seq when the last wrap wrote its own checkpoint
        self._sync_create = True  # fsync a newly created ring (and its directory) at once
        self._may_resize = True  # open(): rewrite a ring of another size now
        self.dev = -1  # st_dev of the file, set by open()
        self._fd_lock = threading.Lock()  # fdatasync/syncfs against close

    @classmethod
    def open(cls, path: Path, size: int = DEFAULT_RING_SIZE, *,
             sync_create: bool = True, resize: bool = True) -> RingWriter:
        """Create or recover the ring at ``path``.

        A file that is not a usable ring (bad magic, future version, damaged
        header) is renamed to ``<name>.bad-<time>`` and a fresh ring created;
        ``recovered_from`` then holds the new name of the old file and
        ``recovered_reason`` why. A ring of another size (``ring_size`` changed)
        is rewritten at *size* with its newest records that fit
        (:meth:`_resize`; ``resized_from`` holds the old size). Raises RingError
        only for OS errors.
        A new ring is fsynced with its directory before this returns, unless
        ``sync_create`` is False: the caller then makes it durable soon
        (the daemon's first :func:`fdatasync_all` ``syncfs`` round, for
        thousands of rings at once instead of two fsyncs each). With ``resize``
        False a ring of another size is opened at the size it has (the daemon's
        start: it resizes such rings once it serves, one at a time).
        """
        size = parse_size(size)
        path = Path(path)
        try:
            fd, created = _open_or_create(path)
        except OSError as exc:
            raise _os_error(path, exc) from exc
        writer = cls(path, fd)
        writer._sync_create = sync_create
        writer._may_resize = resize
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
        self.dev = st.st_dev  # the filesystem: fdatasync_all groups rings by it
        if created or st.st_size == 0:
            self._initialise(size)
            return
        why = self._check_static(os.pread(self._fd, 64, 0))
        if why is None and self.size != size and not self._may_resize:
            size = self.size  # resized later, off the start-up path
        elif why is None and self.size != size:
            self._resize(size)
            self._start(size, False)  # the resized ring, recovered as any other
            return
        if why is not None:
            self._move_aside(why)
            self._initialise(size)
            return
        if st.st_size != self.size:  # truncated (power cut) or grown: back to the right size
            os.ftruncate(self._fd, self.size)
        with contextlib.suppress(FileNotFoundError):  # a resize a crash cut short
            os.unlink(self.path.with_name(f"{self.path.name}{_RESIZING}"))
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
        if self._sync_create:
            os.fsync(self._fd)
            _fsync_dir(self.path.parent)

    def _resize(self, size: int) -> None:
        """Rewrite this ring at *size*, keeping its newest records that fit, then reopen it.

        The copy streams (:mod:`serialmux.ringresize`: a walk to measure, a walk
        to copy, a MiB written at a time; a few MiB of memory whatever the size).
        An OUTPUT record longer than the new ring's largest keeps its newest bytes.
        Sequence numbers run on from the oldest record kept (they are the old ones
        unless the old ring had a damaged stretch). The new ring is written beside
        the old one and renamed over it once it is on disk: a crash in between
        leaves the old ring whole (and a stale ``<name>.resize``, removed at the
        next open).

        Nothing appends to the old ring meanwhile: this writer is not handed out
        until open() returns, the daemon closed the ring's previous writer first
        (``Rings.renew``; a marker it writes late is caught below) and another
        daemon is kept out by the instance lock. Should the old ring's head move
        all the same, the copy is started over (it never copies more than it
        measured, so the kept part cannot overflow the new ring); a ring that
        keeps moving is a RingError.
        """
        old_size = self.size
        tmp = self.path.with_name(f"{self.path.name}{_RESIZING}")
        room = size - HEADER_SIZE - _span(_RESIZE_NOTE_ROOM)
        for _ in range(_RESIZE_TRIES):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            with RingReader(self.path) as reader:
                plan = ringresize.start(reader, size, room)
                measured = not ringresize.keeps_all(reader, plan)
                if measured:
                    ringresize.measure(reader, plan)
                new = RingWriter.open(tmp, size, sync_create=False)
                try:
                    kept = ringresize.copy(reader, new, plan, measured=measured)
                    settled = reader._locate_head() == plan.head
                    dropped = plan.held - kept
                    if settled:
                        new.marker(RecordKind.NOTE, f"ring resized from {old_size} to {size} "
                                   "bytes" + (f"; {dropped} of its records did not fit"
                                              if dropped else ""),
                                   old_size=old_size, size=size, dropped=dropped)
                finally:
                    new.close()  # a checkpoint and an fdatasync
            if settled:
                break
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise RingError(f"records were appended to it during each of {_RESIZE_TRIES} tries "
                            "to resize it; is another process writing it?", path=str(self.path))
        os.rename(tmp, self.path)
        _fsync_dir(self.path.parent)
        old, self._fd = self._fd, -1
        os.close(old)
        self._fd, _ = _open_or_create(self.path)
        self.resized_from, self.resized_after = old_size, plan.last

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

    def last_record(self) -> Record | None:
        """The newest record (None in an empty ring): e.g. how the previous writer stopped."""
        off = self._last_off
        if not off:
            return None
        try:  # two small reads, not a read-ahead: cheap for thousands of rings at start
            head = os.pread(self._fd, REC_HEADER, off)
            length = _REC.unpack_from(head)[3] if len(head) == REC_HEADER else 0
            rec = self._parse(head + os.pread(self._fd, _span(length) - REC_HEADER,
                                              off + REC_HEADER), 0, off)
        except OSError as exc:
            raise _os_error(self.path, exc) from exc
        return rec.public() if isinstance(rec, _Rec) else None

    @property
    def max_payload(self) -> int:
        """Largest payload of one record; longer appends are split."""
        return self._max_payload

    def append(self, data: bytes | bytearray | memoryview, *, time_ns: int | None = None) -> int:
        """Append guest output as OUTPUT record(s); return the last seq (next_seq-1 if empty)."""
        t = time.time_ns() if time_ns is None else time_ns
        step = self._max_payload
        if isinstance(data, bytes) and 0 < len(data) <= step:  # the usual chunk: one record
            self._write(_OUTPUT, data, t)
            self.bytes_written += len(data)
            return self._seq - 1
        view = memoryview(data).cast("B")
        for start in range(0, len(view), step):
            self._write(_OUTPUT, view[start : start + step], t)
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

    def _write(self, kind: int, payload: bytes | memoryview, time_ns: int,
               batch: bytearray | None = None) -> None:
        """Write one record at the head, wrapping first if it does not fit before the end.

        With *batch* the record is added to it instead, for the caller to write
        (a resize: records that fit, a MiB per ``pwrite``); the head moves on as
        if it were written.
        """
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
            if batch is None:
                os.pwritev(self._fd, [head, _U32.pack(crc), payload, _ZEROS[:pad]], off)
            else:
                batch += head
                batch += _U32.pack(crc)
                batch += payload
                batch += _ZEROS[:pad]
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
        """Flush appended records to disk (nothing once closed). Thread-safe with respect
        to append() and close()."""
        with self._fd_lock:
            if self._fd < 0:
                return
            pos = self._position()  # one tuple read: consistent under the GIL
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                raise _os_error(self.path, exc) from exc
            self._durable = pos

    def _syncfs(self) -> bool:
        """``syncfs`` the filesystem holding this ring; False if that is not possible."""
        syncfs = getattr(_LIBC, "syncfs", None)
        with self._fd_lock:
            return syncfs is not None and self._fd >= 0 and syncfs(self._fd) == 0

    def sync(self) -> None:
        """fdatasync then checkpoint, in the caller's thread (the simple, blocking form)."""
        self.fdatasync()
        self.checkpoint()

    def close(self) -> None:
        """Checkpoint the current position, fdatasync and close; idempotent."""
        with self._fd_lock:
            if self._fd < 0:
                return
            try:
                self._write_checkpoint(self._position())
                os.fdatasync(self._fd)
            except OSError as exc:
                raise _os_error(self.path, exc) from exc
            finally:
                super().close()



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



_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def fdatasync_all(rings: list[RingWriter], *, syncfs: bool = False) -> dict[str, RingError]:
    """Make *rings* durable, as each ring's ``fdatasync()`` would (for a worker thread).

    Thousands of rings that each changed a little cost thousands of
    ``fdatasync`` calls a second, each a journal check and a disk cache flush;
    with *syncfs* (``[server] ring_sync = "syncfs"``), past :data:`SYNCFS_FROM`
    rings one ``syncfs`` per filesystem does the same work once. That also
    flushes every other dirty file on the filesystem (a hypervisor's VM images
    often live there), so it is opt-in. Returns the rings that failed, by
    path: each keeps its older durable position and the next round tries again.
    """
    failed: dict[str, RingError] = {}
    if not syncfs or len(rings) < SYNCFS_FROM:
        for ring in rings:
            _fdatasync_into(ring, failed)
        return failed
    by_dev: dict[int, list[tuple[RingWriter, tuple[int, int, int, int]]]] = {}
    for ring in rings:
        if ring._fd >= 0:  # not closed meanwhile
            by_dev.setdefault(ring.dev, []).append((ring, ring._position()))
    for group in by_dev.values():
        if group[0][0]._syncfs():
            for ring, pos in group:
                ring._durable = pos  # written before the syncfs began: durable now
        else:
            for ring, _ in group:
                _fdatasync_into(ring, failed)
    return failed


def _fdatasync_into(ring: RingWriter, failed: dict[str, RingError]) -> None:
    if ring._fd < 0:
        return  # closed meanwhile (its console was removed): nothing left to sync
    try:
        ring.fdatasync()
    except RingError as exc:
        failed[str(ring.path)] = exc
