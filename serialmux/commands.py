"""The gateway's own commands, run as SSH exec requests: ``ssh web-01@hv7 nmi``.

Nothing else is executed: there is no shell. Each command checks the role it
needs, prints a result for people, and exits 0 on success, 1 on failure and 2
on a usage error, so scripts can rely on the status.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import shlex
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn

import asyncssh

from . import actions
from .access import Action, Identity, allowed
from .config import Role
from .console import Console
from .errors import AccessDenied, HypervisorError, SerialmuxError
from .logs import LOGS_CHUNK, POLL_INTERVAL, logs_chunks, parse_since
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
# (reload, BREAK and ring syncs run there). A thread only ever does one step of
# file work (logs.py: reading until it has LOGS_CHUNK bytes of output, or one
# look at the ring for a follow); waiting for the client to read, and a follow's
# poll interval, happen in the event loop, so no client holds a thread. The
# caps bound what each command does hold meanwhile: an open ring file, up to
# LOGS_CHUNK bytes of output, and for a follow a step every POLL_INTERVAL.
LOGS_WORKERS = 16
MAX_FOLLOWS = 12
MAX_FOLLOWS_PER_USER = 4
MAX_ONESHOTS_PER_USER = 4
STDIN_CHUNK = 4096
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
    """Send the ring's output chunk by chunk, each read in a worker thread and each
    waiting in the loop until the client can take more (at most stall_timeout)."""
    assert console.ring is not None
    chunks = _Steps(logs_chunks(
        console.ring.path, lines=None if (ns.since or ns.boot) else ns.lines, since=since,
        boot=ns.boot, timestamps=ns.timestamps, as_json=ns.json, raw=ns.raw,
        follow=ns.follow, chunk=LOGS_CHUNK))
    writable = server_of(process).writable
    # EOF on stdin ends a follow, after the tail: `ssh -n VM@host logs -f` and
    # `</dev/null` get EOF at once, and still get the tail. A one-shot runs to its end.
    closed: asyncio.Future[Any] | None = None
    if ns.follow:
        closed = asyncio.ensure_future(_wait_eof(process))
        closed.add_done_callback(_retrieve)
    try:
        while (chunk := await chunks.next()) is not None:
            if not chunk:  # a follow caught up: look again after a poll interval
                assert closed is not None
                if closed.done():
                    return 0
                await asyncio.wait({closed}, timeout=POLL_INTERVAL)
                continue
            try:
                process.stdout.write(chunk)
                await wait_drained(process, writable, process.channel.get_write_buffer_size,
                                   daemon.config.server.stall_timeout)  # read per chunk: reload
            except (OSError, asyncssh.Error):
                return 0  # the client went away: nobody to tell
    except ClientStalled as stalled:
        daemon.audit.event("logs_stalled", vm=console.name, user=identity.user,
                           session=identity.session_id, peer=identity.peer, command="logs",
                           reason=str(stalled), result="ended")
        raise SerialmuxError(f"logs: {stalled}; output ended (server.stall_timeout). "
                             "Read the output as it comes, or use --lines/--since for less"
                             ) from stalled
    finally:
        chunks.close()
        if closed is not None:
            closed.cancel()
    return 0


class _Steps:
    """A generator of output chunks advanced in ``_logs_executor``, one step at a time.

    The loop awaits each step before asking for the next, so no two threads
    ever run the generator at once. :meth:`close` closes it (its ring file
    with it) at once, or, if a step is still running in its thread (the
    command was cancelled meanwhile), as soon as that step ends.
    """

    def __init__(self, chunks: Generator[bytes, None, object]) -> None:
        self._chunks = chunks
        self._step: concurrent.futures.Future[bytes | None] | None = None
        self._closed = False

    async def next(self) -> bytes | None:
        """The next chunk (b"": a follow caught up), None at the end; raises what the
        step raised (RingError)."""
        if self._closed or (self._step is not None and not self._step.done()):
            raise RuntimeError("logs: a step asked for while another runs, or after close")
        self._step = _logs_executor.submit(next, self._chunks, None)
        return await asyncio.wrap_future(self._step)

    def close(self) -> None:
        """Close the generator now or after the running step (any thread; runs once)."""
        if self._closed:
            return
        self._closed = True
        if self._step is None:
            self._chunks.close()
        else:
            # Called at once if the step is over (or was cancelled before it began),
            # else by the worker thread right after it, with the generator at rest.
            self._step.add_done_callback(lambda _: self._chunks.close())


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
