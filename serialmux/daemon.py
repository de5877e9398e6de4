"""The daemon: owns every task, the consoles, the listeners, signals and shutdown.

``Daemon(config).serve()`` is a coroutine that tests await directly, as the
CLI does through :func:`run`. Start-up: state directory and its lock → rings → consoles
(each port tried once) → SSH listeners bound → ``READY=1``. Shutdown order
(uvicorn's): stop accepting → tell clients → bounded wait for sessions →
cancel with a reason → close ports → mark and sync the rings. What is disabled,
and why, is kept by :class:`~serialmux.disabling.Disabling` (``Daemon.disabling``);
the rings are opened, synced and closed by :class:`~serialmux.rings.Rings`
(``Daemon.rings``).
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import signal
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from . import session as session_mod
from .access import Identity
from .auth import Gate, Revocations, load_cas
from .config import Config, Listen, VMConfig
from .connections import Connections
from .console import Console
from .disabling import Disabling
from .errors import AlreadyRunning, SerialmuxError
from .heap import Heap
from .instancelock import InstanceLock
from .log import Audit, get_logger
from .mfa import TotpStore
from .port import VMPort
from .ring import RecordKind, RingReader, RingWriter, Skipped
from .rings import REMOVED, Rings
from .sdnotify import Notifier
from .sshd import Listeners

if TYPE_CHECKING:
    from .control import ControlServer
    from .discovery import Discovery
    from .reload import ReloadResult

if TYPE_CHECKING:
    from .session import Session

log = get_logger(__name__)

SHUTDOWN_GRACE = 5.0
PORT_TRY_TIMEOUT = 5.0
REPLAY_BATCH = 64 * 1024
VM_EVENT_BURST = 2.0  # seconds within which the same QMP event again is the same one


class _Stop(Exception):
    """Raised inside the daemon's TaskGroup to begin the ordered shutdown."""


class Daemon:
    """A running serialmux: consoles, listeners and sessions under one TaskGroup."""

    def __init__(self, config: Config, *, audit: Audit | None = None,
                 notifier: Notifier | None = None, freeze_heap: bool = False) -> None:
        self.config = config
        self.config_at_start = config  # what settings that need a restart are compared with
        self._owns_audit = audit is None
        self.audit = audit or Audit(config.server.audit_file)
        self.notifier = notifier or Notifier()
        self.consoles: dict[str, Console] = {}
        self.sessions: set[Session] = set()
        self._no_sessions = asyncio.Event()
        self._no_sessions.set()
        self.listeners = Listeners(self, lambda process: session_mod.handle(self, process))
        self.started = time.time()
        # What is disabled and why (serialmux.disabling): disabled.json and the config's switches.
        self.disabling = Disabling(self)
        # Authentication policy (serialmux.auth, serialmux.mfa): owned here, used by sshd/session.
        self.gate = Gate(config.ssh)
        self.user_cas = load_cas(config.ssh.user_ca_keys)
        self.revoked = self.watch_revocations(Revocations(config.ssh.revoked_keys))
        # Every SSH connection and exec command, re-checked on reload (serialmux.connections).
        self.connections = Connections(self)
        # state_dir as started: a reload that changes it waits for a restart (rings,
        # disabled.json and TOTP state all stay where they are until then).
        self.state_dir = config.server.state_dir
        self.totp = TotpStore(self.state_dir)
        # Each console's ring opened, synced and closed (serialmux.rings), under state_dir.
        self.rings = Rings(self)
        self._ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._tasks: asyncio.TaskGroup | None = None
        self._console_tasks: dict[str, asyncio.Task[None]] = {}
        self._hv_tasks: dict[str, asyncio.Task[None]] = {}
        self.control: ControlServer | None = None
        self.discovery: Discovery | None = None
        self.changes = asyncio.Lock()  # one reload or discovery change at a time
        self._last_status = ""
        self._last_vm_event: dict[str, tuple[str, float]] = {}  # VM → (text, when)
        # gc.freeze() once ready, so full collections skip the consoles (serialmux.heap).
        self.heap = Heap(enabled=freeze_heap)
        # One daemon per state_dir and runtime_dir, held while serve() runs.
        self._lock = InstanceLock()

    # -- public ------------------------------------------------------------------

    async def wait_ready(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Return once every listener is bound and every port tried."""
        async with asyncio.timeout(timeout):
            await self._ready.wait()

    def stop(self) -> None:
        """Begin the ordered shutdown (signal handlers and tests call this)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """Whether shutdown has begun: new sessions and commands are refused."""
        return self._stop.is_set()

    def watch_revocations(self, revoked: Revocations) -> Revocations:
        """Re-check every connection whenever *revoked*'s file is re-read with new contents."""
        def changed() -> None:
            # Called from inside a check (an auth callback): re-check after it, not within it.
            asyncio.get_running_loop().call_soon(
                self.connections.recheck, "revocation list changed")

        revoked.on_change = changed
        return revoked

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Every bound SSH (host, port), in ``listen`` order."""
        return self.listeners.addresses

    @property
    def ssh_port(self) -> int:
        """The first bound SSH port (useful with port 0)."""
        return self.addresses[0][1]

    # -- serve -------------------------------------------------------------------

    async def serve(self) -> None:
        """Run until :meth:`stop` (or SIGTERM/SIGINT); start-up errors raise."""
        server = self.config.server
        for d in (self.state_dir, server.runtime_dir):
            d.mkdir(mode=0o750, parents=True, exist_ok=True)
        self._take_lock()  # before any ring, port or socket: another daemon may own them
        try:  # from here on, whatever fails lets go of the lock and closes what it opened
            _raise_fd_limit(len(self.config.vms))
            self.rings.dir.mkdir(mode=0o750, parents=True, exist_ok=True)
            self.disabling.load()
            self._install_signals()
            self.notifier.status("starting")
            async with asyncio.TaskGroup() as tg:
                self._tasks = tg
                for vm in self.config.vms.values():
                    self.add_console_at_start(vm)
                if self.config.discovery is not None:
                    from .discovery import Discovery
                    self.discovery = Discovery(self, self.config.discovery)
                    self.discovery.start()  # the first scan adds its consoles now
                    tg.create_task(self.discovery.run())
                await self._wait_ports_tried()
                await self.listeners.start(self.config)
                from .control import ControlServer
                self.control = ControlServer(self)
                self.control.bind()
                tg.create_task(self.control.serve())
                tg.create_task(self.rings.sync_loop())
                tg.create_task(self.rings.resize_changed())
                tg.create_task(self.connections.watch_revocations())
                tg.create_task(self.notifier.watchdog_loop())
                self._ready.set()
                summary = self._last_status = self.summary()
                self.notifier.ready(summary)
                log.info("ready", listen=[str(Listen(h, p)) for h, p in self.addresses],
                         consoles=len(self.consoles), status=summary)
                self.audit.event("daemon_start", result="ok",
                                 listen=",".join(str(Listen(h, p)) for h, p in self.addresses))
                self.heap.freeze()
                await self._stop.wait()
                await self._shutdown()
                raise _Stop
        except* _Stop:
            pass
        finally:
            self._tasks = None
            self.heap.close()
            if self.control is not None:
                self.control.close()
            if self.discovery is not None:
                self.discovery.close()
            self._remove_signals()
            self.rings.close_all()
            if self._ready.is_set():
                self.audit.event("daemon_stop", result="ok")
            else:  # it never served: say so, not "stopped ok"
                self.audit.event("daemon_start", result="failed")
            if self._owns_audit:
                self.audit.close()
            self._lock.release()

    def _take_lock(self) -> None:
        """Lock state_dir and runtime_dir for this daemon (serialmux.instancelock); a second
        daemon on either stops here, having touched nothing of the first one's."""
        try:
            self._lock.acquire({"server.state_dir": self.state_dir,
                                "server.runtime_dir": self.config.server.runtime_dir})
        except SerialmuxError as exc:
            if not isinstance(exc, AlreadyRunning):  # its audit file is the other daemon's
                self.audit.event("daemon_start", result="failed", reason=str(exc))
            if self._owns_audit:
                self.audit.close()
            raise

    def summary(self) -> str:
        """A one-line status for systemd and ``serialmux status``."""
        up = sum(1 for c in self.consoles.values() if c.up)
        return (f"{up}/{len(self.consoles)} consoles up, {len(self.sessions)} sessions"
                + (", disabled" if self.disabling.all_vms else ""))

    async def _wait_ports_tried(self) -> None:
        waits = [c.port.tried.wait() for c in self.consoles.values()]
        if waits:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PORT_TRY_TIMEOUT):
                    await asyncio.gather(*waits)

    def status_changed(self) -> None:
        """Send systemd the one-line summary if it changed (attach, detach, port, reload)."""
        if not self._ready.is_set() or self._stop.is_set():
            return  # summary() is O(consoles): once per port opened at start was O(N^2)
        text = self.summary()
        if text != self._last_status:
            self._last_status = text
            self.notifier.status(text)

    async def _shutdown(self) -> None:
        self.notifier.stopping()
        log.info("stopping", sessions=len(self.sessions))
        if self.control is not None:
            self.control.close()
        for acceptor in self.listeners.acceptors:
            acceptor.close()
        for console in self.consoles.values():
            console.close_all("serialmux is shutting down")
        self.connections.end_commands("serialmux is shutting down")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SHUTDOWN_GRACE):
                await self._no_sessions.wait()
        # SSHAcceptor.close() only stops listening: end the connections themselves, or an
        # idle one could open sessions while the daemon stops (and after it has).
        self.connections.close_all("serialmux is shutting down")
        if not await self.connections.wait_none_left(SHUTDOWN_GRACE):
            log.warning("connections_left_open", count=len(self.connections.servers))
        for acceptor in self.listeners.acceptors:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SHUTDOWN_GRACE):
                    await acceptor.wait_closed()

    def session_started(self, session: Session) -> None:
        """Track an attached session (for shutdown and status)."""
        self.sessions.add(session)
        self._no_sessions.clear()
        self.status_changed()

    def session_ended(self, session: Session) -> None:
        """Forget a session; wakes the shutdown when it was the last."""
        self.sessions.discard(session)
        if not self.sessions:
            self._no_sessions.set()
        self.status_changed()

    # -- consoles ------------------------------------------------------------------

    def _add_console(self, vm: VMConfig, ring: RingWriter | None) -> Console:
        assert self._tasks is not None
        console = Console(vm, audit=self.audit, ring=ring)
        console.disabled = self.disabling.reason(vm.name)
        if vm.qmp:
            self._add_hypervisor(console, vm.qmp)
        console.on_state_change = self.status_changed
        self.consoles[vm.name] = console
        self._console_tasks[vm.name] = self._tasks.create_task(console.run())
        return console

    def add_console_at_start(self, vm: VMConfig) -> Console:
        """Add and start a console before serving (the configuration's, discovery's first scan)."""
        return self._add_console(vm, self.rings.open_at_start(vm))

    async def add_console(self, vm: VMConfig,
                          why: str = "console added by discovery") -> Console:
        """Add and start a console while serving (reload, discovery); its port opens later.
        *why* starts its ring's marker (the daemon did not just start)."""
        console = self._add_console(vm, await self.rings.open(vm, why))
        self.status_changed()
        return console

    async def stop_console(self, name: str) -> None:
        """Cancel *name*'s port and hypervisor tasks; wait (bounded) until they have ended."""
        tasks = [t for t in (self._console_tasks.pop(name, None), self._hv_tasks.pop(name, None))
                 if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SHUTDOWN_GRACE):
                    await asyncio.wait(tasks)

    async def remove_console(self, name: str, reason: str) -> None:
        """Tell and close *name*'s sessions, stop its port, close its ring with a marker."""
        console = self.consoles.pop(name)
        self._last_vm_event.pop(name, None)
        console.close_all(reason)
        await self.stop_console(name)
        console.flush_redacted()  # output held back by redaction goes in before the marker
        ring, console.ring = console.ring, None
        if ring is not None:
            await self.rings.close(name, ring, RecordKind.NOTE, f"{REMOVED}: {reason}")
        self.heap.released()
        self.status_changed()

    async def reopen_console(self, vm: VMConfig) -> None:
        """Give a console a new port (or QMP, or ring size); its sessions stay attached."""
        console = self.consoles[vm.name]
        was = console.vm
        if (was.port, was.baud, was.qmp) == (vm.port, vm.baud, vm.qmp):  # only ring_size
            console.use_config(vm)
            await self.rings.resize(console)  # the port carries on, its sessions see nothing
            return
        await self.stop_console(vm.name)
        if console.up:
            console.port_down("reopened by a configuration reload")
        if console.ring is not None and console.ring.size != vm.ring_size:
            console.vm = vm  # the size a ring opened late must have
            await self.rings.renew(console)  # the port is stopped: nothing to log meanwhile
        console.vm = vm
        old_port, console.port = console.port, VMPort(vm, console)
        console.port.carry_over(old_port)
        console.hypervisor = None
        self.heap.released()  # the old port and hypervisor
        if vm.qmp:
            self._add_hypervisor(console, vm.qmp)
        assert self._tasks is not None
        self._console_tasks[vm.name] = self._tasks.create_task(console.run())

    def _add_hypervisor(self, console: Console, address: str) -> None:
        from .errors import HypervisorError
        from .qmp import Hypervisor

        assert self._tasks is not None

        def on_event(name: str, data: dict[str, Any]) -> None:
            self._vm_event(console, name, data)

        # A new QMP session means QEMU (re)started: open its serial port now, not after backoff
        # (a PTY or server socket drops what the guest prints while nobody holds it).
        hv = Hypervisor(console.name, address, on_event=on_event,
                        on_connect=console.port.retry_now)
        console.hypervisor = hv
        label = console.vm.port.path

        async def resolve() -> str | None:
            if not await hv.wait_connected(2.0):
                return None
            try:
                return await hv.chardev_pty(label)
            except HypervisorError as exc:  # QEMU went away mid-query: the port retries
                log.info("pty_lookup_failed", vm=console.name, chardev=label, error=str(exc))
                return None

        console.port.set_pty_resolver(resolve)
        self._hv_tasks[console.name] = self._tasks.create_task(hv.run())

    def _vm_event(self, console: Console, name: str, data: dict[str, Any]) -> None:
        text = {"RESET": "VM reset", "SHUTDOWN": "VM shut down", "STOP": "VM paused",
                "RESUME": "VM resumed", "POWERDOWN": "VM asked to power down",
                "GUEST_PANICKED": "guest panicked"}.get(name, f"VM event {name}")
        reason = data.get("reason") if isinstance(data, dict) else None
        text += f" ({reason})" if reason else ""
        if name in ("RESET", "RESUME"):
            console.port.retry_now()
        # QEMU fires several RESET events for one reset (1 to 14 with the default
        # firmware): one marker and one notice for a burst of the same event.
        now = time.monotonic()
        last = self._last_vm_event.get(console.name)
        self._last_vm_event[console.name] = (text, now)
        if last is not None and last[0] == text and now - last[1] < VM_EVENT_BURST:
            return
        console.mark("VM_EVENT", text, event=name)
        console.notice(text)

    # -- replay --------------------------------------------------------------------

    def replay_start(self, console: Console, lines: int,
                     until: int | None = None) -> tuple[int, int, int] | None:
        """The replay window ending at *until*: (first seq, byte offset in it, end seq).

        The session takes *until* (the ring's ``next_seq``) in the same loop
        step as its live cursor, so replay and live output meet exactly:
        nothing lost, nothing twice. Finding the start reads the ring backwards
        (long on a big ring without newlines), so this runs in a worker thread.
        """
        ring = console.ring
        if ring is None:
            return None
        until = ring.next_seq if until is None else until
        try:
            with RingReader(ring.path) as reader:
                seq, offset = reader.tail_position(lines, until_seq=until)
        except (SerialmuxError, OSError) as exc:
            log.warning("replay_unavailable", vm=console.name, error=str(exc))
            return None
        return seq, offset, until

    async def replay(self, console: Console, window: tuple[int, int, int],
                     write: Callable[[bytes], Awaitable[None]]) -> None:
        """Stream the window's guest output from the ring, in batches with backpressure.

        The ring is read a record at a time, never loaded whole: a 1 GiB ring
        replays in REPLAY_BATCH pieces, each written and drained before the next.
        """
        if console.ring is None:
            return
        first, skip, until = window
        batch = bytearray()
        with RingReader(console.ring.path) as reader:
            for record in reader.records(first, until_seq=until):
                if isinstance(record, Skipped) or record.kind is not RecordKind.OUTPUT:
                    continue
                payload = record.payload
                if record.seq == first and skip:
                    payload = payload[skip:]
                batch += payload
                if len(batch) >= REPLAY_BATCH:
                    await write(bytes(batch))
                    batch.clear()
        if batch:
            await write(bytes(batch))

    # -- kick ----------------------------------------------------------------------

    def kick(self, console: Console, user: str | None, who: Identity) -> str:
        """Disconnect the writer of *console*, or every session of *user* on it."""
        victims = [a for a in console.attachments
                   if (a.identity.user == user if user else a is console.writer)]
        for att in victims:
            att.on_closed(f"disconnected by {who.user}")
        self.audit.event("kick", vm=console.name, user=who.user, session=who.session_id,
                         peer=who.peer, target=user or "writer", count=len(victims), result="ok")
        if not victims:
            return (f"nobody is typing on {console.name}: nothing to disconnect" if not user
                    else f"{user} is not attached to {console.name}: nothing to disconnect")
        return f"disconnected {len(victims)} session(s)"

    def reopen_port(self, console: Console, who: Identity) -> str:
        """Open *console*'s port again now, taking the PTY at its path even if the number
        was reused (the host's operator says it is this VM's again: ``serialmux reopen``)."""
        accepted = console.port.accept_reused_pty()
        console.port.retry_now()
        self.audit.event("reopen", vm=console.name, user=who.user, session=who.session_id,
                         peer=who.peer, reused_pty=accepted, result="ok")
        if accepted:
            console.mark("NOTE", f"{who.user} attached the PTY now at {console.port.spec.path}")
            return f"{console.name}: attaching the PTY now at {console.port.spec.path}"
        return (f"{console.name}: port {'is up' if console.up else 'retried now'} "
                f"({console.port.description})")

    # -- signals -------------------------------------------------------------------

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        self._signals: list[int] = []
        for sig, handler in ((signal.SIGTERM, self.stop), (signal.SIGINT, self.stop),
                             (signal.SIGUSR1, self.audit.reopen),
                             (signal.SIGHUP, self.request_reload)):
            try:
                loop.add_signal_handler(sig, handler)
            except (ValueError, RuntimeError, NotImplementedError):
                continue  # not the main thread (tests run several daemons)
            self._signals.append(sig)

    def request_reload(self) -> None:
        """Re-read the configuration soon (SIGHUP, ``systemctl reload``); reloads never overlap."""
        if self._tasks is not None and self._ready.is_set() and not self._stop.is_set():
            self._tasks.create_task(self._reload_logged())

    async def _reload_logged(self) -> None:
        try:
            await self.reload()
        except Exception:  # a reload bug must not take the running consoles down
            log.exception("reload_crashed")

    async def reload(self, who: str = "SIGHUP") -> ReloadResult:
        """Re-read and apply the configuration file; false (old config kept) if it has errors,
        else what was not applied (listeners kept, settings that need a restart)."""
        from .reload import reload_daemon

        async with self.changes:
            return await reload_daemon(self, who)

    def _remove_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in getattr(self, "_signals", []):
            loop.remove_signal_handler(sig)


FDS_PER_CONSOLE = 2  # the port and the ring
FDS_SPARE = 1024  # listeners, sessions, control socket, libraries


def _raise_fd_limit(consoles: int) -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit; warn when the consoles cannot fit.

    systemd and most shells start services with a soft limit of 1024, which
    would stop a host at ~500 consoles; the hard limit is the real budget.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    need = consoles * FDS_PER_CONSOLE + FDS_SPARE
    if soft != resource.RLIM_INFINITY and soft < need:
        log.warning("fd_limit_low", limit=soft, needed=need, consoles=consoles,
                    hint="raise LimitNOFILE= in the unit (or ulimit -n)")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The loop factory: uvloop when installed, else asyncio's default."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(coro_factory: Callable[[], Awaitable[None]]) -> None:
    """Run a coroutine on uvloop (falling back to asyncio), as the CLI does."""
    async def main() -> None:
        await coro_factory()

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(main())
