"""The gateway's own commands, run as SSH exec requests: ``ssh web-01@hv7 nmi``.

Nothing else is executed: there is no shell. Each command checks the role it
needs, prints a result for people, and exits 0 on success, 1 on failure and 2
on a usage error, so scripts can rely on the status.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import shlex
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn

import asyncssh

from . import actions
from .access import Action, Identity, allowed
from .config import Role
from .console import Console
from .errors import AccessDenied, HypervisorError, SerialmuxError
from .logs import follow_logs, parse_since, write_logs
from .sshd import server_of

if TYPE_CHECKING:
    from .daemon import Daemon

HELP = """\
commands (ssh -p PORT VM@HOST COMMAND):
  help                      this list
  who                       who is attached: the writer and the watchers
  status                    console state and, with QMP, the VM's run state
  logs [--lines N] [--boot] [--since WHEN] [--timestamps] [--json] [--raw] [-f]
                            scrollback from the ring (reader); --lines counts lines
                            of guest output, with --json too (default 200)
  break                     send a serial BREAK (contributor)
  sysrq KEY                 Magic SysRq KEY, e.g. 'sysrq h' (contributor)
  nmi                       inject an NMI (contributor)
  reset                     hard-reset the VM (contributor)
  disable [--reason TEXT...] refuse new attaches, close current ones (owner);
                            the reason is the rest of the words
  enable                    allow attaching again (owner)
  kick [--user USER]        disconnect the writer, or USER's sessions (owner)
"""


# A disable reason is shown to every user refused an attach and written to the
# ring: printable text only, and short.
MAX_REASON = 200

# ``logs`` reads rings in threads of its own, never the loop's default executor
# (reload, BREAK and ring syncs run there). ``logs -f`` holds a thread for as
# long as it follows, so follows are capped per user and in all, leaving
# threads for one-shot ``logs``; a one-shot waits for a free thread. A one-shot
# also holds its thread while its client does not read (up to stall_timeout),
# so one-shots are capped per user too: one user holds at most
# MAX_FOLLOWS_PER_USER + MAX_ONESHOTS_PER_USER threads, half of them.
LOGS_WORKERS = 16
MAX_FOLLOWS = 12
MAX_FOLLOWS_PER_USER = 4
MAX_ONESHOTS_PER_USER = 4
STDIN_CHUNK = 4096
# ``logs`` output goes out LOGS_CHUNK bytes at a time, each write waiting until
# the client can take more (wait_drained), so a client that opens a huge SSH
# window and stops reading holds at most about this much beyond the
# transport's high-water mark, and is ended after stall_timeout.
LOGS_CHUNK = 64 * 1024
LOOP_MARGIN = 10.0  # seconds a worker allows the loop beyond stall_timeout
_logs_executor = ThreadPoolExecutor(max_workers=LOGS_WORKERS, thread_name_prefix="serialmux-logs")
_follows: collections.Counter[str] = collections.Counter()
_oneshots: collections.Counter[str] = collections.Counter()


def clean_text(text: str, limit: int = MAX_REASON) -> str:
    """*text* made safe to show on someone else's terminal: control characters escaped, cut."""
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return out if len(out) <= limit else out[:limit - 1] + "…"


class UsageError(SerialmuxError):
    """A command line could not be parsed."""


class Refused(SerialmuxError):
    """The command is not run now: a limit (audited as ``refused``, exit status 1)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise UsageError(message or f"{self.prog}: see 'help'")


def _parser(name: str) -> _Parser:
    # exit_on_error stays True: argparse then hands every ArgumentError (a bad
    # value, a missing one) to error() above. With False it raises them instead.
    return _Parser(prog=name, add_help=False)


def _count(text: str) -> int:
    """A ``--lines`` value: a whole number, 0 or more."""
    if not (text.isascii() and text.isdigit()) or len(text) > 12:
        raise argparse.ArgumentTypeError(
            f"takes a number of lines, 0 or more (e.g. --lines 500), not {text[:20]!r}")
    return int(text)


def logs_parser() -> _Parser:
    """The options of ``logs``, shared with the local CLI's wording."""
    p = _parser("logs")
    # Lines of guest output, also with --json: the records holding the last N
    # lines, the first cut to where its line starts (markers among them kept).
    p.add_argument("-n", "--lines", type=_count, default=200)
    p.add_argument("--boot", action="store_true")
    p.add_argument("--since")
    p.add_argument("--timestamps", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--raw", action="store_true")
    p.add_argument("-f", "--follow", action="store_true")
    return p


class _Out:
    def __init__(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        self.process = process
        self.audited = False  # actions.perform wrote the command's audit event

    def line(self, text: str) -> None:
        self.process.stdout.write((text + "\n").encode())

    def err(self, text: str) -> None:
        self.process.stderr.write(f"serialmux: {text}\n".encode())


async def run(daemon: Daemon, process: asyncssh.SSHServerProcess[bytes], console: Console,
              identity: Identity, role: Role, command_line: str) -> int:
    """Run *command_line* for *identity* on *console*; return the exit status."""
    out = _Out(process)
    try:
        argv = shlex.split(command_line)
    except ValueError as exc:
        out.err(f"cannot parse command: {exc}")
        return 2
    name, args = (argv[0], argv[1:]) if argv else ("help", [])
    handler = _COMMANDS.get(name)
    base = {"vm": console.name, "user": identity.user, "session": identity.session_id,
            "peer": identity.peer}
    if handler is None:
        daemon.audit.event("refused", reason="unknown command", command=name, **base)
        out.err(f"unknown command {name!r}: there is no shell here; try 'help'")
        return 2
    # One `command` event per command, as actions.perform writes for break, sysrq,
    # nmi and reset (which then write it themselves): who ran what on which VM.
    result = "failed"
    reason: str | None = "ended before it finished (disconnected)"
    try:
        status: int = await handler(daemon, process, out, console, identity, role, args)
        result, reason = "ok", None
        return status
    except UsageError as exc:
        result, reason = "refused", str(exc)
        out.err(str(exc))
        return 2
    except argparse.ArgumentError as exc:  # in case a parser raises one past error()
        result, reason = "refused", f"{name}: {exc}"
        out.err(reason)
        return 2
    except (AccessDenied, Refused) as exc:
        result, reason = "refused", str(exc)
        out.err(str(exc))
        return 1
    except SerialmuxError as exc:
        reason = str(exc)
        out.err(str(exc))
        return 1
    finally:
        if not out.audited:
            daemon.audit.event("command", action=name, arg=" ".join(args) or None,
                               result=result, reason=reason, **base)


Handler = Callable[..., Any]
_COMMANDS: dict[str, Handler] = {}


def _command(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        _COMMANDS[name] = fn
        return fn
    return register


@_command("help")
async def _help(daemon: Daemon, process: Any, out: _Out, console: Console, identity: Identity,
                role: Role, args: list[str]) -> int:
    out.process.stdout.write(HELP.encode())
    return 0


@_command("who")
async def _who(daemon: Daemon, process: Any, out: _Out, console: Console, identity: Identity,
               role: Role, args: list[str]) -> int:
    _parser("who").parse_args(args)
    for line in who_lines(console):
        out.line(line)
    return 0


def who_lines(console: Console) -> list[str]:
    """Lines describing who is attached to *console*, writer first."""
    lines = []
    for att in console.attachments:
        mode = "writer " if att is console.writer else "watcher"
        lines.append(f"{mode} {att.identity.user:<16} from {att.identity.peer_host:<15} "
                     f"since {att.since_text}")
    return lines or ["nobody is attached"]


@_command("status")
async def _status(daemon: Daemon, process: Any, out: _Out, console: Console,
                  identity: Identity, role: Role, args: list[str]) -> int:
    _parser("status").parse_args(args)
    state = "up" if console.up else f"down ({console.down_reason})"
    out.line(f"console: {state} since {console.state_since}")
    if console.disabled:
        out.line(f"disabled: {clean_text(console.disabled, 2 * MAX_REASON)}")
    if console.hypervisor is None:
        out.line("vm: unknown (no qmp configured: NMI and reset are not available)")
        return 0
    try:
        vm = await console.hypervisor.status()
    except HypervisorError as exc:  # a state to report, as "no qmp configured" is
        vm = f"unknown ({exc})"
    out.line(f"vm: {vm}")
    return 0


async def _action(action: Action, daemon: Daemon, out: _Out, console: Console,
                  identity: Identity, arg: str | None) -> int:
    out.audited = True  # perform audits every outcome
    out.line(await actions.perform(daemon, console, identity, action, arg))
    return 0


def _plain_action(name: str, action: Action) -> None:
    """Register a command that takes no arguments and performs *action*."""

    async def handler(daemon: Daemon, process: Any, out: _Out, console: Console,
                      identity: Identity, role: Role, args: list[str]) -> int:
        _parser(name).parse_args(args)
        return await _action(action, daemon, out, console, identity, None)

    _COMMANDS[name] = handler


for _name, _act in (("break", Action.BREAK), ("nmi", Action.NMI), ("reset", Action.RESET)):
    _plain_action(_name, _act)


@_command("sysrq")
async def _sysrq(daemon: Daemon, process: Any, out: _Out, console: Console, identity: Identity,
                 role: Role, args: list[str]) -> int:
    p = _parser("sysrq")
    p.add_argument("key")
    ns = p.parse_args(args)
    if not actions.SYSRQ_KEYS.fullmatch(ns.key):  # a usage error (exit 2), as argparse's are
        raise UsageError(f"sysrq: {actions.SYSRQ_USAGE}")
    return await _action(Action.SYSRQ, daemon, out, console, identity, ns.key)


@_command("disable")
async def _disable(daemon: Daemon, process: Any, out: _Out, console: Console,
                   identity: Identity, role: Role, args: list[str]) -> int:
    p = _parser("disable")
    # The rest of the words: OpenSSH sends `disable --reason kernel upgrade` for
    # `ssh VM@host disable --reason "kernel upgrade"` (it joins its arguments with spaces).
    p.add_argument("--reason", nargs="+", default=[])
    p.add_argument("--all", action="store_true", help="every VM, not just this one")
    ns = p.parse_args(args)
    if not allowed(role, Action.DISABLE):
        raise AccessDenied("disable needs the owner role", user=identity.user, vm=console.name)
    reason = " ".join(ns.reason)
    if len(reason) > MAX_REASON or not reason.isprintable():
        raise UsageError(f"disable: --reason must be printable text of at most {MAX_REASON} "
                         "characters (no control characters or newlines)")
    if ns.all:
        _check_owner_of_all(daemon, identity, "disable")
    out.line(daemon.disabling.disable(None if ns.all else console.name,
                                      reason or "no reason given", identity))
    return 0


def _check_owner_of_all(daemon: Daemon, identity: Identity, command: str) -> None:
    """Refuse ``--all`` unless *identity* is owner of every VM the gateway knows."""
    names = set(daemon.config.vms) | set(daemon.consoles)
    if any(daemon.config.role_for(identity.user, n) is not Role.OWNER for n in names):
        daemon.audit.event("refused", user=identity.user, session=identity.session_id,
                           peer=identity.peer, command=command, vm="*",
                           reason="--all needs the owner role on every VM")
        raise AccessDenied(
            # No count: it would tell how many VMs exist that this user has no grant on.
            f"{command} --all needs the owner role on every VM, and you are not owner of "
            f"all of them; {command} each VM you own instead, or ask an "
            "administrator (serialmux CLI on the host)")


@_command("enable")
async def _enable(daemon: Daemon, process: Any, out: _Out, console: Console, identity: Identity,
                  role: Role, args: list[str]) -> int:
    p = _parser("enable")
    p.add_argument("--all", action="store_true")
    ns = p.parse_args(args)
    if not allowed(role, Action.DISABLE):
        raise AccessDenied("enable needs the owner role", user=identity.user, vm=console.name)
    if ns.all:
        _check_owner_of_all(daemon, identity, "enable")
    out.line(daemon.disabling.enable(None if ns.all else console.name, identity))
    return 0


@_command("kick")
async def _kick(daemon: Daemon, process: Any, out: _Out, console: Console, identity: Identity,
                role: Role, args: list[str]) -> int:
    p = _parser("kick")
    p.add_argument("--user")
    ns = p.parse_args(args)
    if not allowed(role, Action.KICK):
        raise AccessDenied("kick needs the owner role", user=identity.user, vm=console.name)
    out.line(daemon.kick(console, ns.user, identity))
    return 0


@_command("logs")
async def _logs(daemon: Daemon, process: Any, out: _Out, console: Console, identity: Identity,
                role: Role, args: list[str]) -> int:
    ns = logs_parser().parse_args(args)
    if console.ring is None:
        raise SerialmuxError(f"{console.name} has no scrollback ring")
    since = None
    if ns.since:
        try:
            since = parse_since(ns.since, datetime.now(UTC))
        except ValueError as exc:
            raise UsageError(f"logs: --since: {exc}") from None
    user = identity.user
    running = _follows if ns.follow else _oneshots
    if ns.follow and (_follows[user] >= MAX_FOLLOWS_PER_USER
                      or sum(_follows.values()) >= MAX_FOLLOWS):
        raise Refused(
            f"logs -f: too many follows open (at most {MAX_FOLLOWS_PER_USER} per user, "
            f"{MAX_FOLLOWS} in all); close one, or use logs without -f")
    if not ns.follow and _oneshots[user] >= MAX_ONESHOTS_PER_USER:
        raise Refused(
            f"logs: too many logs running for {user} (at most {MAX_ONESHOTS_PER_USER} at once "
            "per user, besides logs -f); wait for one to end, and read each one's output")
    running[user] += 1
    if ns.follow:  # it may last for days: say who reads the VM now, not only when it ends
        daemon.audit.event("command", action="logs", arg=" ".join(args), result="started",
                           vm=console.name, user=user, session=identity.session_id,
                           peer=identity.peer)
    try:
        return await _run_logs(daemon, process, console, identity, ns, since)
    finally:
        running[user] -= 1
        if running[user] <= 0:
            del running[user]


async def _run_logs(daemon: Daemon, process: Any, console: Console, identity: Identity,
                    ns: argparse.Namespace, since: datetime | None) -> int:
    assert console.ring is not None
    loop = asyncio.get_running_loop()
    stop = threading.Event()
    channel = _ChannelFile(process, loop, server_of(process).writable,
                           lambda: daemon.config.server.stall_timeout)
    sink = io.BufferedWriter(channel, buffer_size=LOGS_CHUNK)
    path = console.ring.path

    def work() -> None:
        cursor = write_logs(path, sink, lines=None if (ns.since or ns.boot) else ns.lines,
                                 since=since, boot=ns.boot, timestamps=ns.timestamps,
                                 as_json=ns.json, raw=ns.raw)
        if ns.follow:
            follow_logs(path, sink, cursor, timestamps=ns.timestamps, as_json=ns.json,
                             raw=ns.raw, stop=stop)

    reader = loop.run_in_executor(_logs_executor, work)
    reader.add_done_callback(_retrieve)  # read below, or not at all if we are cancelled
    # EOF on stdin ends a follow, after the tail: `ssh -n VM@host logs -f` and
    # `</dev/null` get EOF at once, and still get the tail. A one-shot runs to its end.
    closed: asyncio.Future[Any] = (asyncio.ensure_future(_wait_eof(process)) if ns.follow
                                   else loop.create_future())  # never set: runs to its end
    closed.add_done_callback(_retrieve)
    try:
        await asyncio.wait({reader, closed}, return_when=asyncio.FIRST_COMPLETED)
        if not reader.done():
            stop.set()  # the worker writes the tail, then follows one more poll and returns
            await asyncio.wait({reader})
    finally:
        stop.set()
        channel.close_now()  # a write waiting for the client fails now, not at its timeout
        closed.cancel()
        # The worker ends at its next write or poll; bounded all the same.
        await asyncio.wait({reader}, timeout=daemon.config.server.stall_timeout)
    if channel.stalled is not None:
        daemon.audit.event("logs_stalled", vm=console.name, user=identity.user,
                           session=identity.session_id, peer=identity.peer, command="logs",
                           reason=str(channel.stalled), result="ended")
        raise SerialmuxError(f"logs: {channel.stalled}; output ended (server.stall_timeout). "
                             "Read the output as it comes, or use --lines/--since for less"
                             ) from channel.stalled
    failed = reader.exception() if reader.done() and not reader.cancelled() else None
    if failed is not None and not isinstance(failed, BrokenPipeError):
        raise failed  # RingError: the ring could not be read
    return 0


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def _wait_eof(process: Any) -> None:
    """Return at EOF on *process*'s stdin, discarding what is sent (bounded reads)."""
    while True:
        try:
            if not await process.stdin.read(STDIN_CHUNK):
                return
        except (asyncssh.BreakReceived, asyncssh.TerminalSizeChanged, asyncssh.SignalReceived):
            continue


class ClientStalled(SerialmuxError):
    """The client took nothing of what was sent for ``stall_timeout`` seconds."""


async def wait_drained(process: Any, writable: asyncio.Event, buffered: Callable[[], int],
                       stall_timeout: float) -> None:
    """Wait until the client can take more: its channel window and the connection's TCP.

    asyncssh's ``drain()`` follows only the SSH window, which a client may open
    as wide as it likes (asyncssh caps no WINDOW_ADJUST); *writable* is the
    connection's transport below its high-water mark (:class:`GatewayServer`
    ``writable``), so between them what the server holds for one client stays
    bounded. *buffered* counts bytes written and not yet sent. Raises
    :class:`ClientStalled` after *stall_timeout* seconds. Every writer to a
    client waits here: console sessions and ``logs``.
    """
    if writable.is_set() and not buffered():
        # Everything written went out: drain cannot block (it still raises if
        # the connection was lost), so no timeout to arm and cancel per chunk.
        await process.stdout.drain()
        return
    try:
        async with asyncio.timeout(stall_timeout):
            await process.stdout.drain()
            await writable.wait()
    except TimeoutError:
        raise ClientStalled(f"stalled: client read nothing for {stall_timeout:g} s") from None


class _ChannelFile(io.RawIOBase):
    """A blocking file for worker threads that writes to an SSH channel with backpressure.

    Each write sends at most :data:`LOGS_CHUNK` bytes, then waits in the loop
    (:func:`wait_drained`) until the client can take more, at most
    ``stall_timeout``; a client that takes nothing for that long ends the
    command (``stalled`` is then set). Writes fail with BrokenPipeError once
    the client is gone, stalled, or :meth:`close_now` was called.
    """

    def __init__(self, process: asyncssh.SSHServerProcess[bytes],
                 loop: asyncio.AbstractEventLoop, writable: asyncio.Event,
                 stall_timeout: Callable[[], float]) -> None:
        super().__init__()
        self._process = process
        self._loop = loop
        self._writable = writable
        self._stall_timeout = stall_timeout  # read per write: a reload may change it
        self._sending: asyncio.Task[Any] | None = None  # the loop side of a write
        self.closed_flag = False
        self.stalled: ClientStalled | None = None

    def writable(self) -> bool:
        return True

    def close_now(self) -> None:
        """Fail the write in progress and every later one (loop thread)."""
        self.closed_flag = True
        if self._sending is not None:
            self._sending.cancel()

    async def _send(self, chunk: bytes, stall_timeout: float) -> None:
        # In the loop thread, as close_now: a write either sees the flag or is cancelled.
        if self.closed_flag:
            raise BrokenPipeError("logs output closed")
        self._sending = asyncio.current_task()
        try:
            self._process.stdout.write(chunk)
            await wait_drained(self._process, self._writable,
                               self._process.channel.get_write_buffer_size, stall_timeout)
        finally:
            self._sending = None

    def write(self, data: Any) -> int:
        if self.closed_flag:
            raise BrokenPipeError("client went away")
        with memoryview(data) as view:
            chunk = bytes(view[:LOGS_CHUNK])  # a short write: BufferedWriter sends the rest
        stall_timeout = self._stall_timeout()
        sent = asyncio.run_coroutine_threadsafe(self._send(chunk, stall_timeout), self._loop)
        try:
            # _send is bounded by stall_timeout; the margin covers a busy loop.
            sent.result(stall_timeout + LOOP_MARGIN)
        except ClientStalled as exc:
            self.closed_flag = True
            self.stalled = exc
            raise BrokenPipeError("client stalled") from exc
        except Exception as exc:  # gone, closed, cancelled by close_now, or the loop is stuck
            sent.cancel()
            self.closed_flag = True
            raise BrokenPipeError("client went away") from exc
        return len(chunk)
