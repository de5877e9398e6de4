"""Reading a flooding PTY or tty in a thread, so the kernel's refills overlap the event loop.

A read of a PTY slave returns at most 4095 bytes (N_TTY's read buffer), and a
read that finds that buffer empty waits inside the kernel for a kworker to move
the next 4 KiB in (``n_tty_read`` → ``tty_buffer_flush_work``; the thread sits
in ``D`` state in ``__flush_work``). In the event loop thread each such wait is
time in which no SSH packet is encrypted, no ring record written: strace and
``/proc/PID/task/*/wchan`` under a 100 MB flood showed the loop thread blocked
there about half the time, at 50 % CPU and 60 MB/s.

So a port whose read came back full (the guest prints faster than one loop
turn drains it) is handed to a :class:`FloodReader`: a thread that reads the
tty through its own ``dup`` of the fd while the loop does the rest, and hands
what it read to the loop in batches (``call_soon_threadsafe``, at most one
pending). The loop's own reader is paused meanwhile, so bytes stay in order.
Quiet for :data:`IDLE` seconds, or reading a trickle, the thread hands
the port back to the loop and ends: a few threads exist only while floods
last (:data:`MAX_THREADS` at once), never one per console.

Bounded both ways: the thread stops reading while :data:`HIGH_WATER` bytes
wait for the loop (the VM then waits on its full PTY, as it does when the loop
is busy), and :meth:`FloodReader.stop` ends it within one read or
:data:`IDLE`. The fd it reads is its own, so the port's fd being closed and
its number reused can never make it read another VM's console.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import threading
import time
from collections.abc import Callable
from typing import ClassVar

from .log import get_logger

log = get_logger(__name__)

READ_SIZE = 64 * 1024
#: A read this long means N_TTY's buffer was full: a flood.
FULL_READ = 4095
#: Seconds without a byte after which the thread hands the port back to the loop.
IDLE = 0.1
#: It does too when a window of IDLE seconds had fewer full reads than this:
#: a trickle is cheaper on the loop (4 x 4 KiB in 0.1 s is about 160 KB/s).
FLOOD_READS = 4
#: Bytes read but not yet taken by the loop at which the thread waits. With
#: BATCH, it bounds one delivery (under 164 KiB), which with the console's
#: FLOW_PAUSE_AT (64 KiB) keeps a flow-controlled writer within its 256 KiB backlog.
HIGH_WATER = 96 * 1024
#: The loop is woken when this much was read, or at a short read (the end of a burst).
BATCH = 64 * 1024
#: Flood threads at once, over all consoles (more than the cores buys nothing).
MAX_THREADS = 4
_GONE = select.POLLHUP | select.POLLERR | select.POLLNVAL
#: The longest :meth:`FloodReader.wait_stopped` waits for the thread to end.
STOP_TIMEOUT = 2.0


class FloodReader:
    """One flood: a thread reading *fd* until it goes quiet, delivering in the loop thread.

    The fd is duplicated at once; :meth:`start` starts reading. *deliver* is
    called in the loop thread with each batch, in order, never empty. *done*
    is called in the loop thread once the thread has ended and every byte it
    read was delivered; the caller then resumes its own reading (unless it
    called :meth:`stop`).
    """

    active: ClassVar[int] = 0  # flood threads running now (loop thread only)
    started: ClassVar[int] = 0  # flood threads started since the process began

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int,
                 deliver: Callable[[bytes], None], done: Callable[[], None],
                 *, name: str = "flood") -> None:
        self._loop = loop
        self._fd = os.dup(fd)
        self._deliver = deliver
        self._done = done
        self._buf: list[bytes] = []  # read, not yet taken by the loop
        self._pending = 0  # bytes in _buf
        self._cond = threading.Condition()
        self._scheduled = False
        self._stopping = False
        self._paused = False  # flow control: the console's writer is behind
        self.finished: asyncio.Future[None] = loop.create_future()
        self._thread = threading.Thread(target=self._run, name=f"serialmux-flood-{name}",
                                        daemon=True)

    def start(self) -> None:
        """Start the thread (the caller has stopped its own reading); raises if it cannot."""
        try:
            self._thread.start()
        except BaseException:
            os.close(self._fd)
            raise
        FloodReader.active += 1
        FloodReader.started += 1

    @classmethod
    def available(cls) -> bool:
        """Whether another flood thread may start now."""
        return cls.active < MAX_THREADS

    def pause(self, paused: bool) -> None:
        """Stop or restart reading and delivering (loop thread; flow control).

        While paused nothing more is delivered either, so a writer the console
        waits for never gets more than one batch beyond the point it paused at.
        """
        with self._cond:
            self._paused = paused
            self._cond.notify_all()
            if not paused and self._buf and not self._scheduled:
                self._scheduled = True
                self._loop.call_soon(self._take)

    def stop(self) -> None:
        """Stop reading (loop thread); nothing more is delivered, ``done`` is not called."""
        with self._cond:
            self._stopping = True
            self._buf.clear()
            self._pending = 0
            self._cond.notify_all()

    async def wait_stopped(self) -> None:
        """Return once the thread has ended (bounded by :data:`STOP_TIMEOUT`)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.finished), STOP_TIMEOUT)

    # -- the thread ---------------------------------------------------------------

    def _run(self) -> None:
        # Per read only what must be: N_TTY hands over 4 KiB a read, so the Python
        # around each read is most of this thread's cost. Reads gather locally and
        # go to the loop a batch at a time.
        read, fd, full_read, batch = os.read, self._fd, FULL_READ, BATCH
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        chunks: list[bytes] = []
        size = full = 0
        window_end = time.monotonic() + IDLE
        try:
            while not self._stopping:
                try:
                    data = read(fd, READ_SIZE)
                except (BlockingIOError, InterruptedError):
                    data = b""
                except OSError:
                    break  # EIO (the VM closed its end): the loop's reader reports it
                if data:
                    chunks.append(data)
                    size += len(data)
                    if len(data) >= full_read:
                        full += 1
                        if size < batch:
                            continue
                if chunks:
                    if not self._push(chunks):
                        break
                    chunks, size = [], 0
                    now = time.monotonic()
                    if now >= window_end:
                        if full < FLOOD_READS:
                            break  # no longer a flood: the loop's reader costs less
                        full, window_end = 0, now + IDLE
                if not data:
                    # Nothing queued (pyserial sets VMIN=0, so an empty tty reads as
                    # b"", not EAGAIN). Wait for more, briefly.
                    events = poller.poll(IDLE * 1000)
                    if not events or events[0][1] & _GONE:
                        break  # quiet, or hung up: the loop's reader takes over
                    window_end = time.monotonic() + IDLE
        finally:
            os.close(fd)
            self._call_soon(self._ended)

    def _push(self, chunks: list[bytes]) -> bool:
        """Hand *chunks* to the loop; wait while it is behind or paused. False: stopping."""
        with self._cond:
            while (self._pending >= HIGH_WATER or self._paused) and not self._stopping:
                self._cond.wait(IDLE)
            if self._stopping:
                return False
            self._buf.extend(chunks)
            self._pending += sum(map(len, chunks))
            if not self._scheduled:
                self._scheduled = True
                self._call_soon(self._take)
        return True

    def _call_soon(self, callback: Callable[[], None]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
            self._loop.call_soon_threadsafe(callback)

    # -- the loop thread ------------------------------------------------------------

    def _take(self) -> None:
        with self._cond:
            self._scheduled = False
            if self._paused and not self._stopping:
                return  # kept until pause(False) schedules this again
            data = b"".join(self._buf)
            self._buf.clear()
            self._pending = 0
            stopping = self._stopping
            self._cond.notify_all()
        if data and not stopping:
            self._deliver(data)

    def _ended(self) -> None:
        with self._cond:
            self._paused = False  # the last batch goes now, before the loop reads again
        self._take()
        FloodReader.active -= 1
        if not self.finished.done():
            self.finished.set_result(None)
        if not self._stopping:
            self._done()
