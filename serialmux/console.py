"""One VM's console: port → ring and backlog → the one writer and the watchers.

Data flows one way. :class:`Console` is the :class:`~serialmux.port.PortSink`
of its port: each chunk the guest prints is appended to the on-disk ring (the
scrollback, always, whoever is attached) and to a :class:`Backlog`, a bounded
in-memory window addressed by absolute byte offset. Attached sessions do not
get a queue each: they hold a cursor (an offset) into the backlog and copy
from it at their own pace. A session that falls further behind than the
backlog holds skips ahead and is told how much it missed, so a stalled client
costs no memory and never slows the VM, the ring or anyone else.

Takeover policy (a physical console): exactly one :class:`Attachment` may
write. A new writer displaces the old one, who is told who took over, from
where and when; ``safe`` attachments refuse instead. Watchers are unlimited.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .access import Identity
from .config import VMConfig
from .errors import AccessDenied, RingError
from .log import Audit, get_logger, utc_now
from .port import VMPort
from .redact import FLUSH_AFTER, Redactor

if TYPE_CHECKING:
    from .qmp import Hypervisor
    from .ring import RingWriter

log = get_logger(__name__)

BACKLOG_SIZE = 256 * 1024
#: Flow control: the port stops being read while the writer is this far behind...
FLOW_PAUSE_AT = BACKLOG_SIZE // 4
#: ...until it is back within this much...
FLOW_RESUME_AT = BACKLOG_SIZE // 8
#: ...or for at most this long (s): a writer that takes nothing is skipped, not waited for.
FLOW_PAUSE_MAX = 2.0


class Backlog:
    """The most recent output of a console, addressed by absolute byte offset."""

    def __init__(self, capacity: int = BACKLOG_SIZE, *, hold: bool = True) -> None:
        # An anonymous mapping, not a bytearray: it goes back to the OS when the
        # console does, where freed 256 KiB heap blocks would raise glibc's mmap
        # threshold and fragment the heap as discovered VMs come and go.
        self._buf: mmap.mmap | None = None
        self._cap = capacity
        self.end = 0  # offset just past the newest byte
        self._held_from = 0  # bytes before this offset were only counted, not kept
        self._waiters: list[asyncio.Future[None]] = []
        self.hold(hold)

    def hold(self, on: bool) -> None:
        """Keep bytes (someone is attached) or only count them (nobody can read them).

        Sessions start reading at ``end`` when they attach, so the bytes of a
        console nobody watches are never read from here (replay comes from the
        ring). Not keeping them keeps 5000 quiet consoles from holding
        5000 x 256 KiB of touched pages.
        """
        if on and self._buf is None:
            self._buf = mmap.mmap(-1, self._cap)
            self._held_from = self.end
        elif not on and self._buf is not None:
            self._buf.close()
            self._buf = None

    @property
    def start(self) -> int:
        """The oldest offset still held."""
        return max(self._held_from, self.end - self._cap)

    def append(self, data: bytes) -> None:
        """Copy *data* into place and wake readers waiting for it."""
        n = len(data)
        if self._buf is None:  # nobody attached: count, keep nothing
            self.end += n
            self._held_from = self.end
            if self._waiters:
                self._wake()
            return
        if n > self._cap:  # only the newest capacity bytes can be kept
            self.end += n - self._cap
            data, n = data[-self._cap:], self._cap
        pos = self.end % self._cap
        first = min(n, self._cap - pos)
        self._buf[pos:pos + first] = data[:first]
        if first < n:
            self._buf[: n - first] = data[first:]
        self.end += n
        self._wake()

    def _wake(self) -> None:
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def read(self, offset: int, limit: int) -> tuple[int, bytes, int]:
        """Return ``(skipped, data, new_offset)`` for a reader at *offset*."""
        skipped = 0
        start = self.start
        if offset < start:
            skipped, offset = start - offset, start
        n = min(limit, self.end - offset)
        if n <= 0 or self._buf is None:
            return skipped, b"", offset
        pos = offset % self._cap
        first = min(n, self._cap - pos)
        data = self._buf[pos:pos + first]  # slicing an mmap copies once, into bytes
        if first < n:
            data += self._buf[: n - first]
        return skipped, data, offset + n

    async def wait_beyond(self, offset: int) -> None:
        """Return once there is data past *offset* (a future per waiting reader).

        Each reader awaits its own future, not a shared one through
        ``asyncio.shield``: shield adds two loop turns to every wakeup, which is
        every keystroke's echo.
        """
        while self.end <= offset:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if not waiter.done():  # cancelled: do not leave it for append to find
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(waiter)


@dataclass(eq=False)
class Attachment:
    """One session attached to a console, writing or watching."""

    identity: Identity
    writer: bool
    safe: bool = False
    since: float = field(default_factory=time.time)
    since_text: str = field(default_factory=utc_now)
    # Called by the console in the loop thread: a one-line notice, in order with
    # output at the given backlog offset.
    on_notice: Callable[[int, str], None] = lambda offset, text: None
    # Called when a new writer displaces this one; the session closes.
    on_displaced: Callable[[str], None] = lambda text: None
    on_closed: Callable[[str], None] = lambda text: None
    # Called by the console (loop thread) with each chunk of output and the backlog
    # offset it starts at, before any waiting reader wakes: a session that is
    # caught up writes it to its client at once (one loop turn less per echo).
    on_data: Callable[[int, bytes], None] = lambda offset, data: None
    bytes_in: int = 0
    bytes_out: int = 0
    last_input: float = field(default_factory=time.monotonic)
    # The backlog offset this session has read up to (reported by Console.consumed).
    cursor: int = 0
    # Whether the port waits for this writer (it kept up with live output; see Console).
    flow: bool = False
    # Who this writer displaced ("bob@10.0.0.5"), for its session's banner.
    took_over_from: str | None = None


class ConsoleBusy(AccessDenied):
    """A ``safe`` attach found someone else typing."""


class Console:
    """One VM's console: owns its port, ring, backlog and attachments."""

    def __init__(self, vm: VMConfig, *, audit: Audit, ring: RingWriter | None = None) -> None:
        self.vm = vm
        self.name = vm.name
        self.audit = audit
        self.ring = ring
        self.backlog = Backlog(hold=False)  # held while someone is attached
        self.port = VMPort(vm, self)
        self.up = False
        self.state_since = utc_now()
        self.writer: Attachment | None = None
        self.watchers: set[Attachment] = set()
        self.bytes_read = 0
        self.down_reason: str | None = "not opened yet"
        self.hypervisor: Hypervisor | None = None
        self.disabled: str | None = None  # reason, when disabled
        self.ring_error: str | None = None  # the last ring write failure, if any
        # Called (loop thread) after the port goes up or down; the daemon updates STATUS=.
        self.on_state_change: Callable[[], None] = lambda: None
        self._tasks: asyncio.TaskGroup | None = None
        self._on_detach_waiting = False  # an on_detach waits for the guest to take it
        self.redactor = Redactor(vm.redact) if vm.redact else None
        self._redact_timer: asyncio.TimerHandle | None = None
        self._flow_timer: asyncio.TimerHandle | None = None  # set while the port waits

    # -- PortSink ---------------------------------------------------------------

    def use_config(self, vm: VMConfig) -> None:
        """Take *vm*, whose port is this console's, in place: the console and its port read
        their settings from it from now on (nothing is reopened)."""
        self.vm = vm
        self.port.vm = vm

    def port_data(self, data: bytes) -> None:
        """Guest output: to the live backlog (and the sessions caught up with it), then
        to the ring (the record, redacted); both before the next loop step."""
        self.bytes_read += len(data)
        start = self.backlog.end
        self.backlog.append(data)
        writer = self.writer
        if writer is not None:
            # A keystroke's echo goes out before the ring write, not after it.
            writer.on_data(start, data)
        if self.watchers:
            for watcher in self.watchers:
                watcher.on_data(start, data)
        if self.ring is not None:
            try:
                if self.redactor is None:
                    self.ring.append(data)
                    if self.ring_error:
                        log.info("ring_write_recovered", vm=self.name)
                        self.ring_error = None
                else:
                    ready = self.redactor.feed(data)
                    if ready:
                        self.ring.append(ready)
                    self._arm_redact_flush()
            except (RingError, OSError) as exc:
                self._ring_failed(exc)
        if writer is not None and writer.flow and self._flow_timer is None \
                and self.backlog.end - writer.cursor >= FLOW_PAUSE_AT:
            self._flow_pause()

    # -- flow control -------------------------------------------------------------
    #
    # A serial line with flow control: while the writer's client keeps up, the
    # port is read only as fast as it takes the output, so a guest printing
    # faster than the client reads (a flood, far above any baud rate) waits in
    # its PTY instead of the client skipping output. The ring gets every byte
    # either way. Only the writer counts (watchers never slow the VM), only
    # once it has caught up with live output, and only for FLOW_PAUSE_MAX at a
    # time: a client that stops reading is skipped ahead as before, and is
    # waited for again only once it has caught up.

    @property
    def flow_paused(self) -> bool:
        """Whether the port is waiting for the writer now (flow control)."""
        return self._flow_timer is not None

    def consumed(self, att: Attachment, offset: int) -> None:
        """A session read the backlog up to *offset* (loop thread)."""
        att.cursor = offset
        if offset >= self.backlog.end:
            att.flow = True
        if self._flow_timer is not None and att is self.writer \
                and self.backlog.end - offset <= FLOW_RESUME_AT:
            self._flow_resume()

    def _flow_pause(self) -> None:
        self._flow_timer = asyncio.get_running_loop().call_later(FLOW_PAUSE_MAX,
                                                                 self._flow_give_up)
        self.port.pause_reading(True)

    def _flow_give_up(self) -> None:
        if self.writer is not None:
            self.writer.flow = False  # until it catches up again
        self._flow_resume()

    def _flow_resume(self) -> None:
        if self._flow_timer is not None:
            self._flow_timer.cancel()
            self._flow_timer = None
            self.port.pause_reading(False)

    def _ring_failed(self, exc: Exception) -> None:
        # A full or failing disk must not take the live console down with it:
        # say so once per failure streak and keep serving the attached clients.
        if not self.ring_error:
            log.error("ring_write_failed", vm=self.name, error=str(exc))
            self.audit.event("ring_write_failed", vm=self.name, reason=str(exc), result="failed")
        self.ring_error = str(exc)

    def _arm_redact_flush(self) -> None:
        # Held-back output reaches the ring within FLUSH_AFTER s even without a newline.
        if self.redactor is None or not self.redactor.pending or self._redact_timer is not None:
            return
        self._redact_timer = asyncio.get_running_loop().call_later(
            FLUSH_AFTER, self.flush_redacted)

    def flush_redacted(self) -> None:
        """Write output held back by redaction to the ring (timer, markers, shutdown)."""
        if self._redact_timer is not None:
            self._redact_timer.cancel()
            self._redact_timer = None
        if self.redactor is not None and self.ring is not None:
            data = self.redactor.flush()
            if data:
                try:
                    self.ring.append(data)
                except (RingError, OSError) as exc:
                    self._ring_failed(exc)

    def port_up(self, description: str) -> None:
        """The port opened: mark it and tell everyone attached."""
        self._flow_resume()  # a new port starts reading
        self.up = True
        self.down_reason = None
        self.state_since = utc_now()
        self._marker("VM_UP", f"console up ({description})")
        self.notice(f"{self.name} console is up")
        self.on_state_change()

    def port_down(self, reason: str) -> None:
        """The port was lost: mark it and tell everyone attached."""
        self.up = False
        self.down_reason = reason
        self.state_since = utc_now()
        self._marker("VM_DOWN", f"console down: {reason}")
        self.notice(f"{self.name} console is down ({reason}); waiting for it to come back")
        self.on_state_change()

    def port_failed(self, reason: str) -> None:
        """The port could not be opened: say why to whoever waits for it."""
        self.down_reason = reason
        self.notice(f"{self.name} console cannot be opened: {reason}")

    def port_waiting(self, reason: str) -> None:
        """The port is ready for the VM, which is not there yet: say so (the reason an
        open failed before is no longer true)."""
        self.down_reason = reason
        self.notice(f"{self.name} console is not up: {reason}")

    # -- attachments ------------------------------------------------------------

    @property
    def attachments(self) -> list[Attachment]:
        """The writer (if any) first, then the watchers."""
        return ([self.writer] if self.writer else []) + sorted(
            self.watchers, key=lambda a: a.since)

    def attach(self, att: Attachment) -> None:
        """Attach *att*; a writer displaces the current one unless *att* is ``safe``.

        Raises :class:`ConsoleBusy` for a ``safe`` writer when the console is held.
        """
        if not att.writer:
            self.watchers.add(att)
            self.backlog.hold(True)
            self._marker("ATTACH", f"{att.identity.user} attached read-only",
                         user=att.identity.user)
            return
        old = self.writer
        if old is not None and att.safe:
            raise ConsoleBusy(
                f"console {self.name} is held by {old.identity.user} from "
                f"{old.identity.peer_host} since {old.since_text}; not taking over (+safe)",
                user=att.identity.user, vm=self.name)
        self.writer = att
        att.cursor = self.backlog.end
        self._flow_resume()  # the port waited for the old writer, if for anyone
        self.backlog.hold(True)
        if old is None:
            self._marker("ATTACH", f"{att.identity.user} attached", user=att.identity.user)
            return
        text = (f"console taken over by {att.identity.user} from {att.identity.peer_host} "
                f"at {utc_now()}")
        self._marker("TAKEOVER", f"{att.identity.user} took over from {old.identity.user}",
                     user=att.identity.user, previous=old.identity.user)
        self.audit.event("takeover", vm=self.name, user=att.identity.user,
                         session=att.identity.session_id, peer=att.identity.peer,
                         previous_user=old.identity.user,
                         previous_session=old.identity.session_id, result="ok")
        att.took_over_from = f"{old.identity.user}@{old.identity.peer_host}"
        self._writer_left(old, "displaced")
        old.on_displaced(text)

    def detach(self, att: Attachment, reason: str = "detached") -> None:
        """Remove *att*; sends ``on_detach`` to the guest if it was the writer."""
        if att is self.writer:
            self.writer = None
            self._flow_resume()
            self._marker("DETACH", f"{att.identity.user} detached ({reason})",
                         user=att.identity.user)
            self._writer_left(att, reason)
        elif att in self.watchers:
            self.watchers.discard(att)
            self._marker("DETACH", f"{att.identity.user} detached ({reason})",
                         user=att.identity.user)
        if self.writer is None and not self.watchers:
            self.backlog.hold(False)

    def _writer_left(self, att: Attachment, reason: str) -> None:
        data = self.vm.on_detach
        if not data:
            return
        if self._tasks is None:  # between a reload's stop and restart of the port
            self._on_detach_done(att, reason, "the console is restarting")
            return
        if self._on_detach_waiting:
            # A guest that does not read its input (hung, paused) still has the last
            # one: queuing more would pile tasks and stale copies onto its port.
            self._on_detach_done(att, reason, "the previous on_detach still waits for the "
                                 "guest to read it")
            return
        self._on_detach_waiting = True
        self._tasks.create_task(self._send_on_detach(att, reason, data))

    async def _send_on_detach(self, att: Attachment, reason: str, data: bytes) -> None:
        try:
            sent = await self.port.write(data)
        except BaseException:
            self._on_detach_done(att, reason, "the console was stopped")
            raise
        finally:
            self._on_detach_waiting = False
        self._on_detach_done(att, reason, None if sent else
                             f"the console is down ({self.down_reason or 'not open'})")

    def _on_detach_done(self, att: Attachment, reason: str, failure: str | None) -> None:
        """Mark and audit on_detach as sent ("ok") only once the port took the bytes."""
        user = att.identity.user
        if failure is None:
            self._marker("ACTION", f"on_detach sent after {user} left ({reason})",
                         user=user, action="on_detach")
            self.audit.event("on_detach", vm=self.name, user=user,
                             session=att.identity.session_id, reason=reason, result="ok")
            return
        self._marker("ACTION", f"on_detach NOT sent after {user} left ({reason}): {failure}",
                     user=user, action="on_detach")
        self.audit.event("on_detach", vm=self.name, user=user, session=att.identity.session_id,
                         reason=f"{reason}; not sent: {failure}", result="failed")

    def notice(self, text: str, *, skip: Attachment | None = None) -> None:
        """Tell every attached session a one-line notice, in order with output (but *skip*:
        the one that caused it, and was told already)."""
        offset = self.backlog.end
        for att in self.attachments:
            if att is not skip:
                att.on_notice(offset, text)

    def close_all(self, text: str) -> None:
        """Tell every attached session *text* and close it (shutdown, disable)."""
        for att in self.attachments:
            att.on_closed(text)

    def write_now(self, att: Attachment, data: bytes) -> bool:
        """Write *data* typed by *att* if it is the writer and the port takes it now, else False."""
        if att is not self.writer or not self.port.write_now(data):
            return False
        att.bytes_in += len(data)
        att.last_input = time.monotonic()
        return True

    async def write(self, att: Attachment, data: bytes) -> bool:
        """Write *data* typed by *att* to the guest; False if *att* may not or the port is down."""
        if att is not self.writer:
            return False
        att.bytes_in += len(data)
        att.last_input = time.monotonic()
        return await self.port.write(data)

    def _marker(self, kind: str, text: str, **fields: Any) -> None:
        if self.ring is None:
            return
        from .ring import RecordKind

        if self.redactor is not None:
            self.flush_redacted()  # output before the marker stays before it

        try:
            self.ring.marker(RecordKind[kind], text, **fields)
        except (RingError, OSError) as exc:
            self._ring_failed(exc)

    def mark(self, kind: str, text: str, **fields: Any) -> None:
        """Leave a marker in the ring (actions, hypervisor events)."""
        self._marker(kind, text, **fields)

    async def run(self) -> None:
        """Keep the port open until cancelled; owns the console's small tasks."""
        async with asyncio.TaskGroup() as tasks:
            self._tasks = tasks
            try:
                await self.port.run()
            finally:
                self._tasks = None
