"""The consoles' rings over their life: opened, marked, synced and closed.

:mod:`serialmux.ring` is the file format; this module is the daemon's use of
it. :class:`Rings` (``Daemon.rings``) opens each console's ring under
``state_dir/rings`` and marks the start in it (saying so when the ring's last
record is not a clean-stop marker: the daemon was killed, and output printed
meanwhile may be missing), runs the sync loop, and closes the rings with a last
marker.

At start-up every ring is opened on the loop thread (:meth:`Rings.open_at_start`):
nothing is served yet, and thousands of rings open fastest without a thread
hop each. While serving, a console added, resized or removed by a reload or a
discovery change has its ring opened or closed in a worker thread
(:meth:`Rings.open`, :meth:`Rings.close`), waiting at most :data:`RING_WAIT`:
a slow disk never stalls the other consoles, and a ring that opens later is
adopted by its console then. :meth:`Rings.sync_loop` is the power-cut
promise: every ring that changed is fdatasynced each ``SYNC_INTERVAL``, so a
power cut loses at most that much output. :meth:`Rings.close_all` leaves
``serialmux stopped`` in each ring at shutdown and closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from .config import VMConfig
from .errors import RingError, SerialmuxError
from .log import get_logger
from .ring import SYNC_INTERVAL, SYNCFS_FROM, Record, RecordKind, RingWriter, fdatasync_all

if TYPE_CHECKING:
    from .console import Console
    from .daemon import Daemon

log = get_logger(__name__)

#: The markers of a ring's writer starting and stopping: the daemon's start and stop, a
#: console removed while serving (NOTE). A ring that ends in neither stop marker was not
#: closed: the next start marker says so (:func:`_unclean_stop`).
STARTED = "serialmux started"
STOPPED = "serialmux stopped"
REMOVED = "console removed"

CHECKPOINT_ROUNDS = 10  # a changing ring writes its checkpoint every 10th sync round
RING_WAIT = 5.0  # the longest a reload or discovery change waits on one ring's disk
# The longest a resize (its port paused: the guest's output waits in the PTY or socket)
# waits for the new ring: about 6 s per 64 MiB of the shortest records (8 bytes), so
# only a ring of hundreds of MiB of those takes longer (its console then reads on
# without a ring until it is done, and adopts it then).
RESIZE_WAIT = 60.0


class Rings:
    """The daemon's rings: where they live, opening, closing, and the sync loop."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    @property
    def dir(self) -> Path:
        """Where the rings live."""
        return self.daemon.state_dir / "rings"

    def path(self, vm: str) -> Path:
        """The ring file of *vm* (a name already checked by the config)."""
        return self.dir / f"{vm}.ring"

    def open_at_start(self, vm: VMConfig) -> RingWriter | None:
        """*vm*'s ring, opened and marked on the loop thread (before serving); None if unusable.

        A ring whose ``ring_size`` changed is opened at the size it has: rewriting
        thousands of them here would hold the start past systemd's timeout.
        :meth:`resize_changed` resizes them once the daemon serves.
        """
        return self._opened(vm, self._open(vm, resize=False), STARTED)

    def _open(self, vm: VMConfig, *, resize: bool = True) -> RingWriter | None:
        """Create or recover *vm*'s ring; None (logged) if it cannot be used. Thread-safe."""
        path = self.path(vm.name)
        try:
            # Thousands of new rings at start: the first sync round's syncfs makes
            # them durable within SYNC_INTERVAL, instead of 2 fsyncs each now.
            return RingWriter.open(path, vm.ring_size, resize=resize,
                                   sync_create=len(self.daemon.config.vms) < SYNCFS_FROM)
        except (SerialmuxError, OSError) as exc:
            log.error("ring_unusable", vm=vm.name, path=str(path), error=str(exc))
            return None

    def _opened(self, vm: VMConfig, ring: RingWriter | None, text: str) -> RingWriter | None:
        """Audit a ring moved aside and mark the start in *ring* with *text* (loop thread);
        return it. The marker says too when the ring's previous writer did not close it."""
        if ring is None:
            return None
        path = ring.path
        if ring.recovered_from is not None:
            log.warning("ring_moved_aside", vm=vm.name, path=str(path),
                        moved_to=str(ring.recovered_from), reason=ring.recovered_reason)
            self.daemon.audit.event("ring_recovered", vm=vm.name, path=str(ring.recovered_from),
                                    reason=f"old ring moved aside: {ring.recovered_reason}")
        if ring.resized_from is not None:
            log.info("ring_resized", vm=vm.name, path=str(path), old_size=ring.resized_from,
                     size=ring.size)
        try:
            # A resized ring ends in the note saying so: how it ended is the record before.
            last = ring.resized_after if ring.resized_from is not None else ring.last_record()
            ring.marker(RecordKind.DAEMON_START, text + _unclean_stop(last))
        except (RingError, OSError) as exc:  # the console reports it on its next write
            log.error("ring_write_failed", vm=vm.name, error=str(exc))
        return ring

    # Rings of consoles added, resized or removed while serving are opened and closed
    # in a worker thread: creating one preallocates and syncs it, recovering one reads
    # it, closing one syncs it. A slow or failing disk must not stall every other
    # console, nor hold a reload or discovery change for long: each waits at most
    # RING_WAIT, and the work finishes in the background.

    async def open(self, vm: VMConfig, text: str, *, wait: float = RING_WAIT
                   ) -> RingWriter | None:
        """*vm*'s ring, opened in a worker thread and marked with *text* (why it opens now:
        the daemon did not just start); None if that takes over *wait* seconds.

        A ring that opens later is adopted by its console then (the output read
        meanwhile is not in it), or closed if the console is gone, has a ring of
        its own by then, or the daemon is stopping.
        """
        opening = asyncio.get_running_loop().run_in_executor(None, self._open, vm)
        late = functools.partial(self._opened_late, vm, text)
        try:
            await asyncio.wait({opening}, timeout=wait)
        except asyncio.CancelledError:  # shutdown: the ring, when it opens, is closed
            opening.add_done_callback(late)
            raise
        if not opening.done():
            log.error("ring_open_slow", vm=vm.name, waited=wait,
                      hint="the console runs without its ring until the disk answers")
            opening.add_done_callback(late)
            return None
        return self._opened(vm, opening.result(), text)

    def _opened_late(self, vm: VMConfig, text: str,
                     opening: asyncio.Future[RingWriter | None]) -> None:
        ring = None if opening.cancelled() or opening.exception() else opening.result()
        if ring is None:
            return
        console = self.daemon.consoles.get(vm.name)
        if console is not None and console.ring is None and console.vm.ring_size == ring.size \
                and not self.daemon.stopping:
            log.info("ring_open_late", vm=vm.name)
            console.ring = self._opened(vm, ring, text)
        else:
            try:
                asyncio.get_running_loop().run_in_executor(None, _close_ring, vm.name, ring)
            except RuntimeError:  # the executor is shut down: the daemon is exiting
                _close_ring(vm.name, ring)

    async def resize_changed(self) -> None:
        """Resize, one at a time, the rings opened at start with another ``ring_size``.

        The console stops reading its port meanwhile (the guest's output waits in
        the PTY or socket), its ring is closed and opened again at the new size in
        a worker thread (:meth:`RingWriter._resize
        <serialmux.ring.RingWriter._resize>`), and it reads on.
        """
        for name in [n for n, c in self.daemon.consoles.items()
                     if c.ring is not None and c.ring.size != c.vm.ring_size]:
            async with self.daemon.changes:  # not while a reload or discovery change runs
                console = self.daemon.consoles.get(name)
                if console is not None and console.ring is not None \
                        and console.ring.size != console.vm.ring_size:  # not gone or changed
                    await self.resize(console)

    async def resize(self, console: Console) -> None:
        """Give *console* a ring of its VM's ``ring_size`` (:meth:`renew`) while its port
        waits: the guest's output stays in the PTY or socket meanwhile, none is lost."""
        console.port.pause_reading(True, "resize")
        try:
            await self.renew(console)
        finally:
            console.port.pause_reading(False, "resize")

    async def renew(self, console: Console) -> None:
        """Close *console*'s ring and open it again at its VM's ``ring_size``, which resizes
        it; the caller keeps the port from being read meanwhile."""
        console.flush_redacted()
        ring, console.ring = console.ring, None
        if ring is not None:
            await self.close(console.name, ring, RecordKind.DAEMON_STOP,
                             "console closed to change its ring_size")
        size = console.vm.ring_size
        console.ring = await self.open(  # the port waits meanwhile: wait longer than RING_WAIT
            console.vm, f"console reopened with a new ring of {size} bytes (ring_size changed)",
            wait=RESIZE_WAIT)

    async def close(self, name: str, ring: RingWriter,
                    kind: RecordKind | None = None, text: str = "") -> None:
        """Close *ring* (a last marker, its final sync) in a worker thread; wait at most
        :data:`RING_WAIT` for it (it closes in the background after that)."""
        closing = asyncio.get_running_loop().run_in_executor(
            None, _close_ring, name, ring, kind, text)
        await asyncio.wait({closing}, timeout=RING_WAIT)
        if not closing.done():
            log.error("ring_close_slow", vm=name, waited=RING_WAIT,
                      hint="it is closed when the disk answers")

    def close_all(self) -> None:
        """Mark ``serialmux stopped`` in every console's ring and close it (at shutdown)."""
        for console in self.daemon.consoles.values():
            console.flush_redacted()
            if console.ring is not None:
                _close_ring(console.name, console.ring, RecordKind.DAEMON_STOP, STOPPED)
                console.ring = None

    async def sync_loop(self) -> None:
        """Fdatasync the rings that changed, every SYNC_INTERVAL; checkpoint them now and then.

        The sync is the power-cut promise (at most SYNC_INTERVAL lost). A
        checkpoint is only a hint that keeps recovery's scan short: each ring
        writes one every CHECKPOINT_ROUNDS rounds at most, its turn spread by
        its place in the list (5000 header writes a second were 3 % of a core).
        """
        daemon = self.daemon
        last: dict[str, int] = {}
        failing: set[str] = set()  # VMs whose last sync failed: told once per streak
        rounds = 0
        while True:
            await asyncio.sleep(SYNC_INTERVAL)
            rounds += 1
            dirty: dict[str, str] = {}  # ring path -> VM
            rings = []
            for i, (name, console) in enumerate(daemon.consoles.items()):
                ring = console.ring
                if ring is not None and (last.get(name) != ring.next_seq or name in failing):
                    last[name] = ring.next_seq
                    if (i + rounds) % CHECKPOINT_ROUNDS == 0:
                        with contextlib.suppress(RingError):  # a hint; the sync reports
                            ring.checkpoint()
                    dirty[str(ring.path)] = name
                    rings.append(ring)
            if not rings:
                continue
            failed = await asyncio.to_thread(
                fdatasync_all, rings, syncfs=daemon.config.server.ring_sync == "syncfs")
            for name in [n for n in last if n not in daemon.consoles]:  # removed meanwhile
                del last[name]
                failing.discard(name)
            for path, name in dirty.items():
                owner = daemon.consoles.get(name)
                if owner is None or owner.ring is None or str(owner.ring.path) != path:
                    continue  # its ring was closed during the sync: nothing to report
                exc = failed.get(path)
                if exc is not None and name not in failing:
                    failing.add(name)
                    log.error("ring_sync_failed", vm=name, error=str(exc))
                    daemon.audit.event("ring_sync_failed", vm=name, reason=str(exc),
                                       result="failed")
                elif exc is None and name in failing:
                    failing.discard(name)
                    log.info("ring_sync_recovered", vm=name)


def _close_ring(vm: str, ring: RingWriter, kind: RecordKind | None = None,
                text: str = "") -> None:
    """Leave a last marker (if *kind*) and close *ring*; a failing disk is logged, not raised.

    Every step is tried: a marker that cannot be written still lets the ring close,
    and one console's bad disk never stops the loop that closes the others.
    """
    try:
        if kind is not None:
            ring.marker(kind, text)
    except (RingError, OSError) as exc:
        log.error("ring_write_failed", vm=vm, error=str(exc))
    try:
        ring.close()
    except (RingError, OSError) as exc:
        log.error("ring_close_failed", vm=vm, error=str(exc))


def _unclean_stop(last: Record | None) -> str:
    """What to add to a start marker when the ring's previous writer did not close it.

    A ring closed cleanly ends in ``serialmux stopped`` (DAEMON_STOP) or, for a
    console removed while serving, ``console removed: ...`` (NOTE); anything else
    last (output, a start marker) means the daemon was killed or crashed, and the
    guest's output between then and now was read by nobody.
    """
    if last is None or last.kind is RecordKind.DAEMON_STOP or (
            last.kind is RecordKind.NOTE and last.text().startswith(REMOVED)):
        return ""
    when = datetime.fromtimestamp(last.time_ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")
    return (f"; the previous run did not stop cleanly (its last record here is from "
            f"{when[:-3]}Z): output printed while serialmux was not running may be missing")
