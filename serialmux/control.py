"""The local control socket ``runtime_dir/control.sock``: its protocol and the daemon's side.

Protocol: newline-delimited JSON, one request object per line
(``{"cmd": "who", "vm": "web-01"}``), one reply per request
(``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``). ``attach`` is
the exception: after its reply the connection becomes the console's raw byte
stream, both ways, until either side closes (the CLI's ``serialmux attach``,
also usable as an OpenSSH ``ForceCommand``).

Who may connect: the socket is mode 0660, group ``serialmux`` when that group
exists (else the daemon's group), in a 0750 runtime directory. The daemon
checks again with ``SO_PEERCRED``: root, the daemon's own uid and processes
that hold that group are served, anyone else is refused. "Hold" means the
connecting process's own groups (``SO_PEERGROUPS``, as the kernel checked the
socket's mode), so a unit's ``SupplementaryGroups=serialmux`` counts; the user
database's membership is asked only where the kernel cannot tell. The daemon's own process is
refused too: it never calls itself, so such a connection can only be a console
port (``unix:`` or a discovered ``NAME.serial``) pointed at this socket, which
would hand whoever may type on that console the owner role on every VM.
Local callers act as owners
(:func:`serialmux.actions.role_of`), and every request is audited with the
local user name, uid and pid.

The CLI's side (connect, request, attach, render status) is
:mod:`serialmux.controlclient`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import json
import os
import pwd
import secrets
import socket
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .access import Action, Identity, LoginRequest
from .config import Listen, check_name
from .errors import ControlError, SerialmuxError, describe
from .log import get_logger

if TYPE_CHECKING:
    from .console import Attachment, Console
    from .daemon import Daemon

log = get_logger(__name__)

SOCKET_NAME = "control.sock"
ADMIN_GROUP = "serialmux"
REQUEST_TIMEOUT = 10.0  # for the first line of a connection
IDLE_TIMEOUT = 300.0  # between later requests on one connection
MAX_LINE = 64 * 1024
#: How long accepting pauses after a failed accept (asyncio's own servers wait as long).
ACCEPT_RETRY_DELAY = 1.0
#: accept() errors that say the process or host is short of fds or memory for a moment.
_ACCEPT_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: Linux SO_PEERGROUPS (4.13+): the peer's supplementary groups as of connect(); the
#: socket module lacks the name. CPython's getsockopt reads at most 1024 bytes (256 groups).
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_PEERGROUPS_BUFLEN = 1024
_ACTIONS = {"break": Action.BREAK, "sysrq": Action.SYSRQ, "nmi": Action.NMI,
            "reset": Action.RESET}


def socket_path(runtime_dir: Path) -> Path:
    """Where the control socket of a daemon with this runtime directory lives."""
    return runtime_dir / SOCKET_NAME


@contextlib.contextmanager
def _short_path(path: Path) -> Any:
    """Yield an address for *path* that fits sockaddr_un (107 bytes), via /proc if needed."""
    if len(os.fsencode(path)) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


# -- who is calling ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Peer:
    """The local process at the other end, from SO_PEERCRED and SO_PEERGROUPS."""

    pid: int
    uid: int
    gid: int
    user: str
    # Its supplementary groups as the kernel knows them; None where SO_PEERGROUPS is
    # unavailable (older kernel, more groups than fit the buffer).
    groups: tuple[int, ...] | None = None


def peer_of(sock: socket.socket) -> Peer:
    """Read the peer's credentials (Linux SO_PEERCRED) and groups (SO_PEERGROUPS)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = f"uid{uid}"
    return Peer(pid=pid, uid=uid, gid=gid, user=user, groups=peer_groups(sock))


def peer_groups(sock: socket.socket) -> tuple[int, ...] | None:
    """The peer's supplementary group ids (SO_PEERGROUPS), or None if the kernel cannot say."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, _PEERGROUPS_BUFLEN)
    except OSError:  # ENOPROTOOPT before Linux 4.13, ERANGE past 256 groups
        return None
    count = len(raw) // 4
    return struct.unpack(f"{count}I", raw[:count * 4])


def admin_gid() -> int:
    """The group the socket belongs to: ``serialmux`` if it exists, else ours."""
    try:
        return grp.getgrnam(ADMIN_GROUP).gr_gid
    except KeyError:
        return os.getgid()


def is_self(peer: Peer) -> bool:
    """Whether the peer is this very process (a console port pointed at the socket)."""
    return peer.pid == os.getpid()


def may_control(peer: Peer, gid: int) -> bool:
    """Root, the daemon's own uid, and processes holding group *gid* may; this one never.

    The peer's own groups decide, as they did for the socket's file mode; the user
    database (``getgrouplist``) only when the kernel did not report them.
    """
    if is_self(peer):
        return False
    if peer.uid in (0, os.geteuid()) or peer.gid == gid:
        return True
    if peer.groups is not None:
        return gid in peer.groups
    try:
        account = pwd.getpwuid(peer.uid)
    except KeyError:
        return False
    return gid in os.getgrouplist(account.pw_name, account.pw_gid)


# -- the daemon's side -----------------------------------------------------------------


class ControlServer:
    """The listening socket and one task per connection, owned by :meth:`serve`."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.path = socket_path(daemon.config.server.runtime_dir)
        self.gid = admin_gid()
        self._sock: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None

    def bind(self) -> None:
        """Create the socket (0660, admin group) and listen; raises ControlError if impossible."""
        if self.path.is_socket():
            self.path.unlink()  # a previous run's; the runtime directory is ours
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        old_umask = os.umask(0o177)
        try:
            with _short_path(self.path) as address:
                sock.bind(address)
            try:
                os.chown(self.path, -1, self.gid)
            except PermissionError:
                log.warning("control_socket_group", path=str(self.path), gid=self.gid,
                            hint="the daemon cannot give the socket its admin group")
            os.chmod(self.path, 0o660)
            sock.listen(64)
        except OSError as exc:
            sock.close()
            raise ControlError(f"cannot create the control socket {self.path}: "
                               f"{exc.strerror}; check server.runtime_dir") from exc
        finally:
            os.umask(old_umask)
        self._sock = sock

    async def serve(self) -> None:
        """Accept until :meth:`close`; then wait for the open connections (attach) to end."""
        async with asyncio.TaskGroup() as tasks:
            self._accept_task = tasks.create_task(self._accept(tasks))

    async def _accept(self, tasks: asyncio.TaskGroup) -> None:
        """Accept connections until cancelled (:meth:`close`).

        A failed accept never ends the daemon: out of fds or memory for a moment
        (EMFILE, ENFILE, ENOBUFS, ENOMEM), or anything else the kernel says, is
        logged once per streak and accepting pauses for :data:`ACCEPT_RETRY_DELAY`,
        as asyncio's own servers do; the caller waiting in the backlog is served then.
        """
        loop = asyncio.get_running_loop()
        sock = self._sock
        assert sock is not None
        failed = 0
        logged: str | None = None
        try:
            while True:
                try:
                    conn, _ = await loop.sock_accept(sock)
                except ConnectionAbortedError:
                    continue  # the caller gave up before it was accepted
                except OSError as exc:
                    failed += 1
                    reason = describe(exc)
                    if reason != logged:
                        self._accept_failed(exc, reason)
                        logged = reason
                    await asyncio.sleep(ACCEPT_RETRY_DELAY)
                    continue
                if failed:
                    log.info("control_accept_resumed", path=str(self.path), failures=failed)
                    failed, logged = 0, None
                tasks.create_task(self._connection(conn))
        finally:
            sock.close()

    def _accept_failed(self, exc: OSError, reason: str) -> None:
        if exc.errno in _ACCEPT_RESOURCE_ERRNOS:
            log.warning("control_accept_failed", path=str(self.path), error=reason,
                        retry_in=ACCEPT_RETRY_DELAY,
                        hint="the daemon is short of file descriptors or memory: raise "
                        "LimitNOFILE, or find what holds them")
        else:
            log.error("control_accept_failed", path=str(self.path), error=reason,
                      retry_in=ACCEPT_RETRY_DELAY, hint="unexpected; accepting goes on")

    def close(self) -> None:
        """Stop accepting and remove the socket; connections already open go on."""
        if self._accept_task is not None and not self._accept_task.done():
            self._accept_task.cancel()
        elif self._sock is not None:
            self._sock.close()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                if self.path.is_socket():
                    self.path.unlink()
            self._sock = None

    async def _connection(self, conn: socket.socket) -> None:
        writer: asyncio.StreamWriter | None = None
        try:
            peer = peer_of(conn)
            reader, writer = await asyncio.open_unix_connection(sock=conn, limit=MAX_LINE)
            if is_self(peer):  # refused at once: the "client" is one of our own ports
                log.warning("control_self_connection", pid=peer.pid,
                            hint="a console port points at the control socket")
                self.daemon.audit.event("control", user=peer.user, uid=peer.uid,
                                        pid=peer.pid, result="refused",
                                        reason="the daemon's own process: a console port "
                                        "points at the control socket")
                _send(writer, {"ok": False, "error": "permission denied: the daemon does not "
                               "serve its own process (a console port points at the "
                               "control socket)"})
                await writer.drain()
                return
            allowed = may_control(peer, self.gid)
            timeout = REQUEST_TIMEOUT
            while True:
                async with asyncio.timeout(timeout):
                    line = await reader.readline()
                if not line:
                    return
                if not allowed:  # answered after the request is read, so the client sees it
                    self.daemon.audit.event("control", user=peer.user, uid=peer.uid,
                                            pid=peer.pid, result="refused",
                                            reason="not root or the admin group")
                    _send(writer, {"ok": False, "error": "permission denied: the control "
                                   "socket is for root and the serialmux group"})
                    await writer.drain()
                    return
                timeout = IDLE_TIMEOUT
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError("not an object")
                except ValueError:
                    _send(writer, {"ok": False, "error": "requests are one JSON object a line"})
                    return
                if request.get("cmd") == "attach":
                    await self._attach(peer, request, reader, writer)
                    return
                _send(writer, await self._request(peer, request))
                await writer.drain()
        except (ConnectionError, TimeoutError, ValueError, OSError):
            return  # the client went away, idled, or sent an overlong line
        except Exception:  # a bug in one request must not take the daemon down
            log.exception("control_connection_failed")
        finally:
            if writer is not None:
                writer.close()
            else:
                conn.close()

    def _identity(self, peer: Peer) -> Identity:
        return Identity(user=peer.user, fingerprint=f"uid:{peer.uid}", peer=f"local:{peer.pid}",
                        session_id=secrets.token_hex(6), local=True)

    async def _request(self, peer: Peer, request: dict[str, Any]) -> dict[str, Any]:
        cmd = str(request.get("cmd"))
        vm = request.get("vm")
        audit = {"user": peer.user, "uid": peer.uid, "pid": peer.pid, "cmd": cmd,
                 "vm": vm if isinstance(vm, str) else None}
        try:
            reply = await self._dispatch(self._identity(peer), cmd, request)
        except SerialmuxError as exc:
            self.daemon.audit.event("control", result="failed", reason=str(exc), **audit)
            return {"ok": False, "error": str(exc)}
        if cmd not in ("status", "who"):  # reads are many and tell nothing; actions are audited
            self.daemon.audit.event("control", result="ok", **audit)
        return {"ok": True, **reply}

    def _console(self, request: dict[str, Any], *, optional: bool = False) -> Console | None:
        vm = request.get("vm")
        if vm is None and optional:
            return None
        if not isinstance(vm, str) or not check_name(vm):
            raise ControlError("a VM name is required (1-63 of A-Z a-z 0-9 . _ -)")
        console = self.daemon.consoles.get(vm)
        if console is None:
            raise ControlError(f"no VM named {vm!r}; 'serialmux status' lists them")
        return console

    def _enable_target(self, request: dict[str, Any]) -> str | None:
        """The VM ``enable`` names (None: all): a console, or a disabled entry with none now.

        A VM disabled and then gone (a discovered VM that stopped, a ``[vms.NAME]`` a
        reload removed) keeps its entry in disabled.json; ``enable`` is how it is cleared.
        """
        vm = request.get("vm")
        if vm is None:
            return None
        if not isinstance(vm, str) or not check_name(vm):
            raise ControlError("a VM name is required (1-63 of A-Z a-z 0-9 . _ -)")
        if vm in self.daemon.consoles or vm in self.daemon.disabling.vms:
            return vm
        raise ControlError(f"no VM named {vm!r}, and {self.daemon.disabling.path} has no "
                           "entry for it to clear; 'serialmux status' lists the VMs")

    async def _dispatch(self, who: Identity, cmd: str, request: dict[str, Any]
                        ) -> dict[str, Any]:
        from . import actions
        from .commands import who_lines

        daemon = self.daemon
        if cmd == "status":
            return {"status": status_report(daemon)}
        if cmd == "who":
            console = self._console(request)
            assert console is not None
            return {"lines": who_lines(console),
                    "attachments": [_attachment(a, console) for a in console.attachments]}
        if cmd == "kick":
            console = self._console(request)
            assert console is not None
            user = request.get("user")
            if user is not None and not (isinstance(user, str) and check_name(user)):
                # A malformed "user" must not fall back to kicking the writer.
                raise ControlError("kick: 'user' must be a user name (a string), or left out "
                                   "to disconnect the writer")
            return {"result": daemon.kick(console, user, who)}
        if cmd in _ACTIONS:
            console = self._console(request)
            assert console is not None
            arg = request.get("arg")
            text = await actions.perform(daemon, console, who, _ACTIONS[cmd],
                                         arg if isinstance(arg, str) else None)
            return {"result": text}
        if cmd == "reopen":
            console = self._console(request)
            assert console is not None
            return {"result": daemon.reopen_port(console, who)}
        if cmd == "enable":
            return {"result": daemon.disabling.enable(self._enable_target(request), who)}
        if cmd == "disable":
            console = self._console(request, optional=True)
            name = console.name if console else None
            reason = request.get("reason")
            reason = reason if isinstance(reason, str) and reason else "disabled by an operator"
            return {"result": daemon.disabling.disable(name, reason, who)}
        if cmd == "reload":
            asked, running = request.get("path"), daemon.config.path
            if isinstance(asked, str) and running is not None \
                    and os.path.realpath(asked) != os.path.realpath(running):
                raise ControlError(f"this daemon runs {running}, and a reload re-reads that "
                                   f"file, not {asked}: edit {running}, or start serialmux "
                                   "with --config pointing at the other one")
            done = await daemon.reload(who=f"control:{who.user}")
            if not done:
                raise ControlError("the configuration has errors; the running one stays:\n"
                                   + "\n".join(done.errors)
                                   + "\n(fix them and reload again; serialmux check-config "
                                   "checks a file)")
            # What was asked but not applied: the CLI says each and exits 1.
            left = int(done.listeners_kept is not None) + len(done.restart_needed)
            return {"result": f"configuration reloaded from {done.path}"
                              + (f", {left} change(s) not applied" if left else ""),
                    "path": done.path, "listeners_kept": done.listeners_kept,
                    "restart_needed": done.restart_needed, "problems": done.problems}
        raise ControlError(f"unknown command {cmd!r}")

    async def _attach(self, peer: Peer, request: dict[str, Any], reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        from .session import Session

        who = self._identity(peer)
        base = {"user": peer.user, "uid": peer.uid, "pid": peer.pid, "cmd": "attach",
                "session": who.session_id}
        try:
            console = self._console(request)
            assert console is not None
            refusal = self.daemon.disabling.refusal(console)
            if refusal:
                raise ControlError(refusal)
            read_only, safe = bool(request.get("ro")), bool(request.get("safe"))
            if safe and not read_only and console.writer is not None:
                held = console.writer
                raise ControlError(f"console {console.name} is held by {held.identity.user} "
                                   f"from {held.identity.peer_host} since {held.since_text}; "
                                   "not taking over (--safe)")
            replay = request.get("replay", 20)
            if not isinstance(replay, int) or not 0 <= replay <= 100_000:
                raise ControlError("replay must be a number of lines, 0 to 100000")
        except SerialmuxError as exc:
            self.daemon.audit.event("control", result="refused", reason=str(exc), **base)
            _send(writer, {"ok": False, "error": str(exc)})
            await writer.drain()
            return
        interactive = bool(request.get("interactive", True))
        writable = asyncio.Event()
        writable.set()
        process = _LocalProcess(reader, writer, interactive)
        login = LoginRequest(vm=console.name, read_only=read_only, safe=safe, replay=replay)
        session = Session(self.daemon, process, console, who, login,  # type: ignore[arg-type]
                          writer=not read_only, interactive=interactive, writable=writable)
        self.daemon.audit.event("control", vm=console.name, result="ok", **base)
        _send(writer, {"ok": True, "vm": console.name,
                       "mode": "read-only" if read_only else "writer"})
        # No await between the checks above and session.run()'s attach: no race.
        await session.run()


def _send(writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
    writer.write(json.dumps(reply, separators=(",", ":")).encode() + b"\n")


class _Output:
    """stdout/stderr of a local attach: the socket, or nowhere (stderr when not a terminal)."""

    def __init__(self, writer: asyncio.StreamWriter, enabled: bool = True) -> None:
        self._writer = writer
        self._enabled = enabled

    def write(self, data: bytes) -> None:
        if self._enabled and not self._writer.is_closing():
            self._writer.write(data)

    def buffered(self) -> int:
        return self._writer.transport.get_write_buffer_size()

    async def drain(self) -> None:
        # A vanished client is noticed by the input side (EOF) and ends the session.
        with contextlib.suppress(ConnectionError):
            await self._writer.drain()


class _Input:
    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader

    async def read(self, n: int) -> bytes:
        try:
            return await self._reader.read(n)
        except ConnectionError:
            return b""


class _LocalProcess:
    """What :class:`~serialmux.session.Session` uses of an SSH process, over the socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 interactive: bool) -> None:
        self.stdin = _Input(reader)
        self.stdout = _Output(writer)
        self.stderr = _Output(writer, enabled=interactive)
        self._interactive = interactive

    def get_terminal_type(self) -> str | None:
        return "local" if self._interactive else None

    def get_write_buffer_size(self) -> int:
        """Bytes written to the client's socket and not yet sent (it reads too slowly)."""
        return self.stdout.buffered()


def _attachment(att: Attachment, console: Console) -> dict[str, Any]:
    return {"user": att.identity.user, "peer": att.identity.peer, "local": att.identity.local,
            "mode": "writer" if att is console.writer else "watcher", "since": att.since_text,
            "bytes_in": att.bytes_in, "bytes_out": att.bytes_out}


def status_report(daemon: Daemon) -> dict[str, Any]:
    """Everything ``serialmux status`` shows, as JSON-ready data."""
    discovered = set(daemon.discovery.vms) if daemon.discovery is not None else set()
    vms = []
    for name in sorted(daemon.consoles):
        c = daemon.consoles[name]
        ring = None
        if c.ring is not None:
            # Written since the daemon started: what the ring holds from earlier runs is
            # what `serialmux logs` shows.
            ring = {"path": str(c.ring.path), "size": c.ring.size,
                    "bytes_written": c.ring.bytes_written}
        vms.append({
            "name": name, "source": "discovery" if name in discovered else "config",
            "up": c.up, "port": c.port.description, "state_since": c.state_since,
            "down_reason": c.down_reason, "disabled": c.disabled, "bytes_read": c.bytes_read,
            "qmp": c.hypervisor is not None, "ring": ring,
            "writer": _attachment(c.writer, c) if c.writer else None,
            "watchers": [_attachment(a, c) for a in c.attachments if a is not c.writer],
        })
    started = datetime.fromtimestamp(daemon.started, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"summary": daemon.summary(), "started": started, "pid": os.getpid(),
            "disabled": daemon.disabling.all_vms, "config": str(daemon.config.path),
            "listeners": [str(Listen(h, p)) for h, p in daemon.addresses],
            "control": str(socket_path(daemon.config.server.runtime_dir)), "vms": vms}
