"""Keeping the garbage collector's full passes off the daemon's long-lived objects.

A daemon serving 5000 consoles holds about 260 000 Python objects from start
to stop: consoles, ports, rings, config. CPython's cyclic collector walks all of
them in every full (generation 2) pass, and under load one came about every 35 s
and took 110–250 ms, in which no console was read and no keystroke echoed.
:meth:`Heap.freeze` runs once the daemon is ready: one collection, then
``gc.freeze()``, so later passes walk only what came after (sessions, new
consoles).

A frozen object is never collected. A console removed later (reload, discovery)
sits in reference cycles (console ↔ port, its ended task's traceback), so
:meth:`Heap.released` is called whenever objects from before the freeze may
have become garbage: :data:`REFREEZE_AFTER` seconds later (one pass however many
removals came meanwhile) the heap is thawed, collected and frozen again.
"""

from __future__ import annotations

import asyncio
import gc

from .log import get_logger

log = get_logger(__name__)

#: Seconds from a removal to the one full collection that reclaims what it left.
REFREEZE_AFTER = 60.0


class Heap:
    """The daemon's use of ``gc.freeze``: off unless *enabled* (the CLI's ``serve``).

    Tests and other embedders run the daemon inside a process whose heap is not
    the daemon's to freeze; they pass ``enabled=False`` (the default).
    """

    def __init__(self, *, enabled: bool = False, refreeze_after: float = REFREEZE_AFTER) -> None:
        self.enabled = enabled
        self.refreeze_after = refreeze_after
        self.frozen = False
        self.refreezes = 0  # full collections run for removals since the first freeze
        self._timer: asyncio.TimerHandle | None = None

    def freeze(self) -> None:
        """Collect once, then freeze everything alive now (the daemon is ready)."""
        if not self.enabled:
            return
        gc.collect()
        gc.freeze()
        self.frozen = True
        log.info("heap_frozen", objects=gc.get_freeze_count())

    def released(self) -> None:
        """Objects from before the freeze may now be garbage: reclaim them later (loop thread)."""
        if not self.frozen or self._timer is not None:
            return
        self._timer = asyncio.get_running_loop().call_later(self.refreeze_after, self._refreeze)

    def _refreeze(self) -> None:
        self._timer = None
        gc.unfreeze()
        collected = gc.collect()
        gc.freeze()
        self.refreezes += 1
        log.info("heap_refrozen", collected=collected, objects=gc.get_freeze_count())

    def close(self) -> None:
        """Cancel a pending pass and thaw the heap (the daemon has stopped)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.frozen:
            gc.unfreeze()
            self.frozen = False
