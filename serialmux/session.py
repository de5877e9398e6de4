"""One SSH session: routed to a console (shell, ``console`` subsystem) or a command (exec).

:func:`handle` is asyncssh's ``process_factory``: it runs once per session
channel, after authentication. It checks the grant, then either runs one of
the gateway's own commands (:mod:`serialmux.commands`) or attaches to the
VM's console with two pumps owned by a TaskGroup:

* out: console backlog → client. The pump holds a cursor into the backlog,
  copies what is there, writes and drains with a bounded wait. A client that
  falls behind skips ahead with ``[serialmux: N bytes skipped; see logs]``;
  one that stalls longer than ``stall_timeout`` is disconnected.
* in: client → escape parser → console. An SSH ``break`` request (OpenSSH
  ``~B``) arrives as ``BreakReceived`` and becomes a serial BREAK.

Interactive sessions (a PTY was requested) get notices inline on stdout and
the ``Ctrl-]`` escape; the ``console`` subsystem is byte-transparent both ways
and gets notices on stderr.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import asyncssh

from . import actions, commands, mfa
from .access import Action, Identity, LoginRequest, allowed, parse_login
from .console import Attachment, Console, ConsoleBusy
from .errors import SerialmuxError
from .escape import CONFIRMED, HELP_TEXT, Cancelled, Command, Confirm, EscapeParser, Unknown
from .escape import Action as Key
from .log import get_logger
from .sshd import server_of

if TYPE_CHECKING:
    from .daemon import Daemon

log = get_logger(__name__)

CHUNK = 256 * 1024
DENIED = "access denied: no grant for this VM, or no such VM"


class _Over(Exception):
    """Raised inside the session's TaskGroup to end it."""


async def handle(daemon: Daemon, process: asyncssh.SSHServerProcess[bytes]) -> None:
    """Serve one SSH session channel; runs after successful authentication."""
    server = server_of(process)
    identity = server.identity
    if identity is None:  # pragma: no cover - asyncssh only calls us after auth
        process.exit(1)
        return
    request = parse_login(process.get_extra_info("username") or "")
    status = 1
    try:
        status = await _route(daemon, process, identity, request, server.writable)
    except SerialmuxError as exc:
        _error(process, str(exc))
    except (asyncssh.DisconnectError, asyncssh.ConnectionLost, BrokenPipeError,
            ConnectionError):
        return
    except Exception:
        # A bug in one command or session must end that channel only: escaping
        # the process factory, it would close the whole connection with no word,
        # every session multiplexed on it (OpenSSH ControlMaster) too.
        log.exception("session_crashed", session=identity.session_id, user=identity.user)
        _error(process, "internal error; this session ended (see the daemon's log)")
    with contextlib.suppress(OSError, asyncssh.Error):
        process.exit(status)


async def _second_factor(daemon: Daemon, process: asyncssh.SSHServerProcess[bytes],
                         identity: Identity, vm: str, base: dict[str, Any]) -> bool:
    """Ask for the grant's TOTP code on the client's terminal; audit the outcome."""
    if process.get_terminal_type() is None or process.subsystem is not None:
        reason = "a TOTP code is needed: use an interactive session (ssh -t, no subsystem)"
        daemon.audit.event("mfa", vm=vm, result="refused", reason="no terminal", **base)
        _error(process, reason)
        return False

    async def read() -> bytes:
        while True:
            try:
                return await process.stdin.read(256)
            except (asyncssh.BreakReceived, asyncssh.TerminalSizeChanged,
                    asyncssh.SignalReceived):
                continue

    def write(data: bytes) -> None:
        with contextlib.suppress(OSError, asyncssh.Error):
            process.stdout.write(data)

    host = identity.peer.rsplit(":", 1)[0].strip("[]")

    def failed() -> None:
        # A wrong code costs the source like a failed key (PerSourcePenalties).
        daemon.gate.penalise(host, daemon.config.ssh.penalty_authfail)
        daemon.audit.event("mfa_failure", vm=vm, method="totp", result="refused",
                           reason="wrong code", **base)

    ok, reason = await mfa.prompt(daemon.totp, identity.user, vm, read, write, source=host,
                                  on_failure=failed)
    daemon.audit.event("mfa", vm=vm, method="totp", result="ok" if ok else "refused",
                       reason=reason, **base)
    if not ok:
        _error(process, f"second factor refused: {reason}")
    return ok


def _credential_revoked(daemon: Daemon, process: asyncssh.SSHServerProcess[bytes]) -> bool:
    """Re-check the connection's key or certificate now; disconnect it if no longer accepted.

    A multiplexed connection (OpenSSH ControlMaster) opens channels long after its
    login: each must still be allowed under the current users, CAs and revocations.
    """
    server = server_of(process)
    problem = daemon.connections.problem(server)
    if problem is None:
        return False
    daemon.connections.cut(server, problem, trigger="checked on a new channel")
    return True


def _error(process: asyncssh.SSHServerProcess[bytes], text: str) -> None:
    line = f"serialmux: {text}\r\n" if process.get_terminal_type() else f"serialmux: {text}\n"
    with contextlib.suppress(OSError, asyncssh.Error):
        process.stderr.write(line.encode())


async def _route(daemon: Daemon, process: asyncssh.SSHServerProcess[bytes], identity: Identity,
                 request: LoginRequest, writable: asyncio.Event) -> int:
    audit = daemon.audit
    base = {"session": identity.session_id, "user": identity.user, "peer": identity.peer,
            "fingerprint": identity.fingerprint, "key_id": identity.key_id,
            "serial": identity.serial}
    if daemon.stopping:
        audit.event("refused", vm=request.vm, reason="shutting down", **base)
        _error(process, "serialmux is shutting down")
        return 1
    if _credential_revoked(daemon, process):
        return 1
    console = daemon.consoles.get(request.vm) if not request.errors else None
    role = daemon.config.role_for(identity.user, request.vm) if console else None
    if request.errors:
        audit.event("refused", vm=request.vm, reason="; ".join(request.errors), **base)
        _error(process, "; ".join(request.errors))
        return 2
    if console is None or role is None:
        # Same words whether the VM exists or not: no grant reveals nothing.
        audit.event("refused", vm=request.vm, reason="no grant or no such VM", **base)
        _error(process, DENIED)
        return 1
    if daemon.config.mfa_for(identity.user, console.name):
        if not await _second_factor(daemon, process, identity, console.name, base):
            return 1
        # The prompt waited for a person: a reload may have changed the key, grant or VM.
        if _credential_revoked(daemon, process):
            return 1
        role = daemon.config.role_for(identity.user, console.name)
        if role is None or daemon.consoles.get(console.name) is not console:
            audit.event("refused", vm=console.name,
                        reason="grant or VM removed during the second factor", **base)
            _error(process, DENIED)
            return 1
    if process.command is not None:
        async with daemon.connections.running(identity, console.name, process):
            return await commands.run(daemon, process, console, identity, role, process.command)
        return 1  # cut by a reload or shutdown (the client was told why)
    if process.subsystem is not None and process.subsystem != "console":
        audit.event("refused", vm=console.name, reason=f"subsystem {process.subsystem!r}", **base)
        _error(process, f"subsystem {process.subsystem!r} is not offered; use 'console'")
        return 1
    refusal = daemon.disabling.refusal(console)
    if refusal:
        audit.event("refused", vm=console.name, reason=refusal, **base)
        _error(process, refusal)
        return 1
    writer = allowed(role, Action.WRITE) and not request.read_only
    session = Session(daemon, process, console, identity, request, writer=writer,
                      interactive=process.get_terminal_type() is not None, writable=writable)
    return await session.run()


class Session:
    """A client attached to a console."""

    def __init__(self, daemon: Daemon, process: asyncssh.SSHServerProcess[bytes],
                 console: Console, identity: Identity, request: LoginRequest, *, writer: bool,
                 interactive: bool, writable: asyncio.Event) -> None:
        self.daemon = daemon
        self.process = process
        self.console = console
        self.identity = identity
        self.request = request
        self.interactive = interactive
        self._writable = writable
        self.att = Attachment(identity=identity, writer=writer, safe=request.safe,
                              on_notice=self._on_notice, on_displaced=self._on_displaced,
                              on_closed=self._on_closed, on_data=self._on_data)
        self.parser = EscapeParser() if interactive else None
        self.repeats = actions.Repeats(daemon.audit)  # audits repeated refused escapes sparingly
        self.offset = console.backlog.end
        self._notices: collections.deque[tuple[int, str]] = collections.deque(maxlen=64)
        self._pump_idle = False
        self._kick: asyncio.Future[None] | None = None  # set while the pump is idle
        self._in_idle = False  # the input pump waits on an empty stdin buffer
        self._done = asyncio.Event()
        self._end_reason = "client closed"
        self._status = 0
        self._told_ro = self._told_down = False
        self._replay_at: tuple[int, int] | None = None  # (lines, ring seq live output starts at)
        self._tasks: asyncio.TaskGroup | None = None
        # Bytes written but not yet sent to the client: the SSH channel's, or for a
        # local attach the control socket's. Output waits while there are any.
        channel: Any = getattr(process, "channel", None) or process
        self._buffered: Callable[[], int] = channel.get_write_buffer_size

    # -- lifecycle -------------------------------------------------------------

    async def run(self) -> int:
        """Attach, pump both ways until one side ends, detach; return the exit status."""
        console, ident = self.console, self.identity
        try:
            console.attach(self.att)
        except ConsoleBusy as exc:
            self.daemon.audit.event("refused", vm=console.name, user=ident.user,
                                    session=ident.session_id, peer=ident.peer,
                                    reason="console busy (+safe)")
            _error(self.process, str(exc))
            return 1
        self.daemon.session_started(self)
        started = time.monotonic()
        self.daemon.audit.event(
            "attach", vm=console.name, user=ident.user, session=ident.session_id,
            peer=ident.peer, fingerprint=ident.fingerprint, key_id=ident.key_id,
            serial=ident.serial, mode="write" if self.att.writer else "watch", result="ok")
        try:
            self._banner()
            try:
                async with asyncio.TaskGroup() as tg:
                    self._tasks = tg
                    tg.create_task(self._pump_out())
                    tg.create_task(self._pump_in())
                    if self.att.writer and self.console.vm.idle_timeout:
                        tg.create_task(self._idle_watch(self.console.vm.idle_timeout))
                    await self._done.wait()
                    raise _Over
            except* _Over:
                pass
            except* (BrokenPipeError, ConnectionError, asyncssh.Error):
                # This channel went away under a write or drain. Only this session
                # ends: escaping as an ExceptionGroup, it made asyncssh close the
                # whole connection, every other session multiplexed on it too.
                self.end("client closed")
        finally:
            console.detach(self.att, self._end_reason)
            self.daemon.session_ended(self)
            self.repeats.flush()
            self.daemon.audit.event(
                "detach", vm=console.name, user=ident.user, session=ident.session_id,
                peer=ident.peer, reason=self._end_reason, bytes_in=self.att.bytes_in,
                bytes_out=self.att.bytes_out,
                duration=round(time.monotonic() - started, 3), result="ok")
        return self._status

    async def _idle_watch(self, limit: float) -> None:
        """Disconnect the writer once they have typed nothing for *limit* seconds."""
        while True:
            left = self.att.last_input + limit - time.monotonic()
            if left <= 0:
                break
            await asyncio.sleep(left)  # a deadline, re-checked: input moves it
        if self.att is not self.console.writer:
            return  # displaced or read-only: nothing to free
        self.console.mark("ACTION", f"{self.identity.user} idle for {limit:g} s: disconnected",
                          user=self.identity.user, action="idle_timeout")
        self.daemon.audit.event(
            "idle_timeout", vm=self.console.name, user=self.identity.user,
            session=self.identity.session_id, peer=self.identity.peer,
            reason=f"typed nothing for {limit:g} s", result="disconnected")
        self._say(f"idle for {limit:g} s: disconnected (idle_timeout)")
        self.end("idle timeout", status=1)

    def end(self, reason: str, status: int = 0) -> None:
        """End the session (from any callback in the loop thread)."""
        if not self._done.is_set():
            self._end_reason = reason
            self._status = status
            self._done.set()

    def _banner(self) -> None:
        name = self.console.name
        mode = "read-only" if not self.att.writer else "writer"
        if self.att.took_over_from is not None:
            mode += f", took over from {self.att.took_over_from}"
        if self.interactive:
            self._say(f"connected to {name} ({mode}); escape is ^] — type ^] ? for help")
        if not self.console.up:
            self._say(f"{name} is not running ({self.console.down_reason}); output will appear "
                      "when it starts")
        replay = self.request.replay
        if replay and self.console.ring is not None:
            # The live cursor and the replay's end, taken together: they meet exactly.
            self.offset = self.console.backlog.end
            self._replay_at = (replay, self.console.ring.next_seq)
        else:
            self._replay_at = None

    # -- console → client ----------------------------------------------------------

    async def _pump_out(self) -> None:
        stdout = self.process.stdout
        if self._replay_at is not None:
            # Off the loop: finding the start can read a big ring for a while.
            window = await asyncio.to_thread(self.daemon.replay_start, self.console,
                                             *self._replay_at)
            if window is not None:
                await self.daemon.replay(self.console, window, self._write_drained)
        backlog = self.console.backlog
        while True:
            if self._notices and self._notices[0][0] <= self.offset:
                self._say(self._notices.popleft()[1])
                continue
            if backlog.end <= self.offset:
                # Idle at the live end: _on_data writes new output straight away,
                # or wakes this pump when it cannot (something is queued before it).
                self._kick = asyncio.get_running_loop().create_future()
                self._pump_idle = True
                try:
                    await self._kick
                finally:
                    self._pump_idle = False
                    self._kick = None
                continue
            limit = CHUNK
            if self._notices:
                limit = min(limit, self._notices[0][0] - self.offset)
            skipped, data, self.offset = backlog.read(self.offset, limit)
            self.console.consumed(self.att, self.offset)
            if skipped:
                self._say(f"{skipped} bytes skipped; see logs")
            if data:
                self.att.bytes_out += len(data)
                stdout.write(data)
                await self._drain()

    def _on_data(self, offset: int, data: bytes) -> None:
        """Output at backlog *offset*: write it now if the pump is idle at exactly there.

        Only when nothing is queued before it (notices, unsent channel data, a
        paused transport); otherwise wake the pump, which sends it in order.
        Called for every chunk the console appends (loop thread).
        """
        if not self._pump_idle or offset != self.offset or self._notices \
                or not self._writable.is_set() or self._buffered():
            kick = self._kick
            if kick is not None and not kick.done():
                kick.set_result(None)
            return
        self.offset = offset + len(data)
        self.att.bytes_out += len(data)
        with contextlib.suppress(OSError, asyncssh.Error):
            self.process.stdout.write(data)
        self.console.consumed(self.att, self.offset)

    async def _write_drained(self, data: bytes) -> None:
        self.process.stdout.write(data)
        await self._drain()

    async def _drain(self) -> None:
        try:
            await commands.wait_drained(self.process, self._writable, self._buffered,
                                        self.daemon.config.server.stall_timeout)
        except commands.ClientStalled as exc:
            self.end(str(exc), status=1)
            raise _Over from None

    def _on_notice(self, offset: int, text: str) -> None:
        if self._pump_idle and offset <= self.offset:
            self._say(text)
        else:
            self._notices.append((offset, text))

    def _on_displaced(self, text: str) -> None:
        self._say(text)
        self.end("displaced", status=1)

    def _on_closed(self, text: str) -> None:
        self._say(text)
        self.end(text, status=1)

    def _say(self, text: str) -> None:
        """A one-line notice: inline for a terminal, on stderr for programs."""
        with contextlib.suppress(OSError, asyncssh.Error):
            if self.interactive:
                self.process.stdout.write(f"\r\n[serialmux: {text}]\r\n".encode())
            else:
                self.process.stderr.write(f"serialmux: {text}\n".encode())

    # -- client → console ----------------------------------------------------------

    def _hook_input(self) -> None:
        """Send plain typing to the port as it arrives, not a loop turn later from the pump.

        asyncssh hands each packet of channel data to ``process.data_received``,
        which buffers it for ``stdin.read()``. While the pump waits on an empty
        buffer, typing that needs nothing but the port (no escape, port up and
        not full, this session the writer) is written at once; anything else,
        and everything after it until the pump is waiting again, takes the
        pump's path, in order.
        """
        buffered = self.process.data_received

        def data_received(data: bytes, datatype: asyncssh.DataType) -> None:
            if datatype is None and self._in_idle and isinstance(data, bytes) \
                    and (self.parser is None or self.parser.passes(data)) \
                    and self.console.write_now(self.att, data):
                return
            self._in_idle = False
            buffered(data, datatype)

        self.process.data_received = data_received  # type: ignore[method-assign]

    async def _next_input(self, stdin: asyncssh.SSHReader[bytes]) -> bytes:
        # Idle only while suspended in read() (it returns at once when data is
        # buffered), and no longer once it returns or raises (a BREAK is handled
        # next, and typing after it must wait for it).
        self._in_idle = True
        try:
            return await stdin.read(CHUNK)
        finally:
            self._in_idle = False

    async def _pump_in(self) -> None:
        stdin = self.process.stdin
        if self.att.writer and isinstance(self.process, asyncssh.SSHServerProcess):
            self._hook_input()  # not for a local attach (serialmux attach over the socket)
        while True:
            try:
                data = await self._next_input(stdin)
            except asyncssh.BreakReceived:
                await self._start_action(Key.BREAK, None)
                continue
            except (asyncssh.TerminalSizeChanged, asyncssh.SignalReceived):
                continue
            if not data:
                self.end("client closed")
                return
            if self.parser is None:
                await self._type(data)
                continue
            # NMI and reset ask y/N only where the VM has something to send them with.
            self.parser.confirm = CONFIRMED if self.console.hypervisor is not None \
                else frozenset()
            for event in self.parser.feed(data):
                if isinstance(event, bytes):
                    await self._type(event)
                else:
                    await self._escape(event)
                if self._done.is_set():
                    return

    async def _type(self, data: bytes) -> None:
        if not self.att.writer:
            if not self._told_ro:
                self._told_ro = True
                self._say("read-only: your input is not sent to the console")
            return
        if self.att is not self.console.writer:
            return
        if await self.console.write(self.att, data):
            self._told_down = False
        elif not self._told_down:
            self._told_down = True
            self._say("the console is down; input discarded")

    async def _escape(self, event: Command | Confirm | Cancelled | Unknown) -> None:
        name = self.console.name
        if isinstance(event, Unknown):
            self._say("unknown escape; type ^] ? for help")
        elif isinstance(event, Confirm):
            what = {Key.NMI: "send NMI to", Key.RESET: "reset"}.get(event.action, "do that to")
            with contextlib.suppress(OSError, asyncssh.Error):
                self.process.stdout.write(f"\r\n{what} {name}? [y/N] ".encode())
        elif isinstance(event, Cancelled):
            self._say(f"cancelled: {actions.SYSRQ_USAGE}" if event.action is Key.SYSRQ
                      else "cancelled")
        elif event.action is Key.DISCONNECT:
            self._say("disconnected")
            self.end("escape: disconnect")
        elif event.action is Key.HELP:
            with contextlib.suppress(OSError, asyncssh.Error):
                self.process.stdout.write(b"\r\n" + HELP_TEXT.encode())
        else:
            await self._start_action(event.action, event.arg, confirmed=event.confirmed)

    async def _start_action(self, key: Key, arg: str | None, *, confirmed: bool = True
                            ) -> None:
        """Run an action in order with typing, or beside it when it goes to the hypervisor.

        BREAK (and SysRq over a telnet port) are bytes/line states on the serial
        line and must keep their place among typed bytes (``^] b`` then ``h`` is
        a SysRq). NMI, reset and QMP SysRq wait for QEMU's reply, which can take
        seconds: typing must not wait for it.
        """
        if self.request.read_only:
            # +ro is a promise not to touch the VM: no BREAK, SysRq, NMI or reset either.
            ident = self.identity
            self.repeats.event("command", vm=self.console.name, user=ident.user,
                               session=ident.session_id, peer=ident.peer,
                               action=key.name.lower(), arg=arg, result="refused",
                               reason="read-only session (+ro)")
            self._say(f"read-only session (+ro): {key.name.lower()} not sent; "
                      "log in without +ro to send it")
            return
        if key is Key.BREAK or self._tasks is None:
            await self._action(key, arg, confirmed)
        else:
            self._tasks.create_task(self._action(key, arg, confirmed))

    async def _action(self, key: Key, arg: str | None, confirmed: bool = True) -> None:
        try:
            text = await actions.perform(self.daemon, self.console, self.identity,
                                         actions.from_escape(key), arg, repeats=self.repeats,
                                         confirmed=confirmed, told=self.att)
        except SerialmuxError as exc:
            self._say(f"failed: {exc}")
        else:
            self._say(text)
