"""VM discovery: consoles for the VMs found in a directory, kept in step with inotify.

``[discovery] dir = "/run/serialmux/vms"`` holds, per VM, ``NAME.serial``
(a UNIX socket of QEMU's ``-chardev socket,server=on``, or a symlink to the
VM's PTY or tty) and optionally ``NAME.qmp`` (QEMU's QMP socket). Whoever
starts VMs (a libvirt hook, a wrapper script) creates and removes them.

:class:`Discovery` owns the inotify descriptor and the set of consoles it
added. Events only mark names dirty; :meth:`Discovery.run` then looks at the
files of each dirty name and adds, reopens or removes that one console, under
``daemon.changes`` so it never interleaves with a reload. A discovered VM gets
the ``[server] redact`` rules, as a static one does. Names are checked
with :func:`~serialmux.config.check_name` before they touch a path or a log
line. A static ``[vms.NAME]`` entry always wins over a discovered one: a
reload that adds it takes the console over (:meth:`Discovery.static_added`),
and a reload that removes it hands the console back to the VM's files if they
are there (:meth:`Discovery.static_removed`). ``Discovery.vms`` holds exactly
the consoles discovery runs, which is what ``serialmux status`` calls
``discovery``.

Trust: a discovered console is reachable by everyone granted its name, so
only root and the daemon's user may say what it connects to. The directory
must be owned by root or the daemon's uid and not writable by others (writable
by its group only when that group is root's, the daemon's or the admin group,
whose members own every VM anyway). Each entry is examined with ``lstat``: the
socket, device node or symlink itself must be owned by root or the daemon's
uid (a symlink's target, e.g. ``/dev/pts/N``, may belong to anyone). A
symlink's resolved target must not lie in the daemon's ``runtime_dir`` or
``state_dir``, and no entry may be the control socket itself (by inode, which
also catches hard links and ``/proc`` paths). Entries that fail are refused,
logged and audited (``vm_refused``) with the reason, and are not consoles.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import pwd
import stat
import struct
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from .config import DiscoveryConfig, PortKind, PortSpec, VMConfig, check_name
from .configtypes import QMP_SUFFIX, SERIAL_SUFFIX
from .control import admin_gid, socket_path
from .errors import SerialmuxError
from .log import get_logger

if TYPE_CHECKING:
    from .daemon import Daemon

log = get_logger(__name__)


# <sys/inotify.h>
IN_ATTRIB = 0x00000004
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name
_WATCH_MASK = (IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_ATTRIB
               | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)
_READ_SIZE = 64 * 1024


class Inotify:
    """A tiny ctypes binding of inotify(7): one non-blocking descriptor, raw events out."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd: int = fd

    def watch(self, path: Path, mask: int) -> int:
        """Add a watch on *path*; return its descriptor."""
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), ctypes.c_uint32(mask))
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch: {os.strerror(err)}", str(path))
        return int(wd)

    def read(self) -> list[tuple[int, str]]:
        """Return the pending ``(mask, name)`` events (empty when there are none)."""
        events: list[tuple[int, str]] = []
        while True:
            try:
                data = os.read(self.fd, _READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return events
            if not data:
                return events
            pos = 0
            while pos + _EVENT.size <= len(data):
                _wd, mask, _cookie, length = _EVENT.unpack_from(data, pos)
                raw = data[pos + _EVENT.size: pos + _EVENT.size + length]
                pos += _EVENT.size + length
                events.append((mask, os.fsdecode(raw.split(b"\0", 1)[0])))

    def close(self) -> None:
        """Close the descriptor (removing every watch)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Discovery:
    """The consoles of one discovery directory."""

    def __init__(self, daemon: Daemon, config: DiscoveryConfig) -> None:
        self.daemon = daemon
        self.config = config
        self.dir = config.dir
        self.vms: dict[str, VMConfig] = {}  # the consoles this directory runs (none static)
        self._inotify: Inotify | None = None
        self._dirty: set[str] = set()
        self._rescan = False
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Create the directory if needed, watch it, and add the consoles already there.

        Raises :class:`SerialmuxError` when the directory cannot be watched.
        """
        try:
            self.dir.mkdir(mode=0o755, parents=True, exist_ok=True)
            self._inotify = Inotify()
            self._inotify.watch(self.dir, _WATCH_MASK)
        except OSError as exc:
            self.close()
            raise SerialmuxError(
                f"discovery: cannot watch {self.dir}: {exc.strerror}; create it, or fix "
                "[discovery] dir") from exc
        problem = self.dir_problem()
        if problem is not None:
            log.warning("discovery_dir_untrusted", dir=str(self.dir), reason=problem,
                        hint="chown root or the daemon's user, chmod o-w; no VM is "
                        "discovered until then")
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._inotify.fd, self._readable)
        for name in sorted(self._names_present()):
            want = self.wanted(name)
            if want is not None and name not in self.daemon.consoles:
                self.vms[name] = want
                self.daemon.add_console_at_start(want)
                self._audit_added(want)
        log.info("discovery_started", dir=str(self.dir), vms=len(self.vms))

    def close(self) -> None:
        """Stop watching (the consoles themselves are the daemon's to close)."""
        if self._inotify is not None:
            if self._loop is not None and self._inotify.fd >= 0:
                self._loop.remove_reader(self._inotify.fd)
            self._inotify.close()
            self._inotify = None

    async def run(self) -> None:
        """Apply changes as inotify reports them, until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            names, self._dirty = self._dirty, set()
            if self._rescan:
                self._rescan = False
                names |= self._names_present() | set(self.vms)
            async with self.daemon.changes:
                for name in sorted(names):
                    try:
                        await self._sync(name)
                    except Exception:  # one odd VM must not stop discovery or the daemon
                        log.exception("discovery_failed", vm=name)

    # -- events ---------------------------------------------------------------------

    def _readable(self) -> None:
        assert self._inotify is not None
        for mask, filename in self._inotify.read():
            if mask & (IN_Q_OVERFLOW | IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED):
                if mask & (IN_DELETE_SELF | IN_MOVE_SELF):
                    log.warning("discovery_dir_gone", dir=str(self.dir))
                self._rescan = True
            elif mask & IN_ATTRIB and not filename:  # the directory's owner or mode changed
                self._rescan = True
            name = _vm_name(filename)
            if name is not None:
                self._dirty.add(name)
        if self._dirty or self._rescan:
            self._wake.set()

    def _names_present(self) -> set[str]:
        try:
            entries = os.listdir(self.dir)
        except OSError:
            return set()
        return {n for n in map(_vm_name, entries) if n is not None}

    # -- one VM -----------------------------------------------------------------------

    def wanted(self, name: str) -> VMConfig | None:
        """The console *name*'s files ask for now, or None (no ``.serial``, or not usable)."""
        serial = self.dir / f"{name}{SERIAL_SUFFIX}"
        try:
            lst = os.lstat(serial)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("discovery_unusable", vm=name, path=str(serial), error=exc.strerror)
            return None
        problem = self.dir_problem() or self._entry_problem(serial, lst)
        if problem is not None:
            self._refuse(name, serial, problem)
            return None
        try:
            st = os.stat(serial)
        except FileNotFoundError:
            if not stat.S_ISLNK(lst.st_mode):
                return None  # removed between the two looks; its own event follows
            kind = PortKind.PTY  # a dangling link: the VM's PTY is gone; keep the console down
        except OSError as exc:
            log.warning("discovery_unusable", vm=name, path=str(serial), error=exc.strerror)
            return None
        else:
            if self._is_control_socket(st):
                self._refuse(name, serial, "it is the daemon's own control socket")
                return None
            if stat.S_ISSOCK(st.st_mode):
                kind = PortKind.UNIX
            elif stat.S_ISCHR(st.st_mode):
                target = os.path.realpath(serial)
                kind = PortKind.PTY if target.startswith("/dev/pts/") else PortKind.TTY
            else:
                log.warning("discovery_unusable", vm=name, path=str(serial),
                            error="not a socket, PTY or tty")
                return None
        qmp_path = self.dir / f"{name}{QMP_SUFFIX}"
        qmp = f"unix:{qmp_path}" if self._qmp_usable(name, qmp_path) else None
        return VMConfig(name=name, port=PortSpec(kind, path=str(serial)), baud=self.config.baud,
                        qmp=qmp, ring_size=self.config.ring_size,
                        redact=self.daemon.config.server.redact)  # as config.py gives [vms.*]

    # -- static entries (reload, under daemon.changes) ----------------------------------

    def server_redact_changed(self) -> list[VMConfig]:
        """A reload changed ``[server] redact``: swap it into each discovered console's config.

        Returns the configs changed; the caller gives their consoles a new redactor. The
        port stays open: only :meth:`_sync` comparing configs would otherwise notice, and
        reopen it.
        """
        rules = self.daemon.config.server.redact
        changed = []
        for name, vm in list(self.vms.items()):
            console = self.daemon.consoles.get(name)
            if console is None or vm.redact == rules:
                continue
            vm = self.vms[name] = replace(vm, redact=rules)
            console.use_config(vm)
            changed.append(vm)
        return changed

    def static_added(self, name: str) -> None:
        """A reload gave *name* a ``[vms.NAME]`` entry: its console is no longer discovery's."""
        self.vms.pop(name, None)

    async def static_removed(self, name: str) -> VMConfig | None:
        """A reload removed ``[vms.NAME]``: if NAME's files ask for a console, take it over.

        Runs after ``daemon.config`` no longer has NAME. Returns the discovered
        config the console was reopened with (its sessions stay attached), or
        None when the files do not want one and the reload removes the console.
        """
        self.vms.pop(name, None)
        want = self.wanted(name)
        if want is None or name not in self.daemon.consoles:
            return None
        self.vms[name] = want
        await self.daemon.reopen_console(want)
        self.daemon.audit.event("vm_discovered", vm=name, source="discovery",
                                port=str(want.port), qmp=want.qmp, result="ok",
                                reason="its static entry was removed")
        return want

    # -- trust ------------------------------------------------------------------------

    def dir_problem(self) -> str | None:
        """Why the directory itself may not be trusted, or None if it may."""
        try:
            st = os.stat(self.dir)
        except OSError as exc:
            return f"the discovery directory {self.dir} cannot be examined: {exc.strerror}"
        if not stat.S_ISDIR(st.st_mode):
            return f"{self.dir} is not a directory"
        if st.st_uid not in _trusted_uids():
            return (f"the discovery directory {self.dir} is owned by {_user(st.st_uid)}, "
                    "not root or the daemon's user")
        if st.st_mode & stat.S_IWOTH:
            return f"the discovery directory {self.dir} is writable by others"
        if st.st_mode & stat.S_IWGRP and st.st_gid not in (0, os.getegid(), admin_gid()):
            return (f"the discovery directory {self.dir} is writable by group {st.st_gid}, "
                    "which is not root's, the daemon's or the admin group")
        return None

    def _entry_problem(self, path: Path, lst: os.stat_result) -> str | None:
        """Why the entry *path* (its ``lstat`` is *lst*) may not be trusted, or None."""
        if lst.st_uid not in _trusted_uids():
            what = "symlink" if stat.S_ISLNK(lst.st_mode) else "entry"
            return f"the {what} is owned by {_user(lst.st_uid)}, not root or the daemon's user"
        if stat.S_ISLNK(lst.st_mode):
            target = Path(os.path.realpath(path))
            server = self.daemon.config.server
            for label, where in (("runtime_dir", server.runtime_dir),
                                 ("state_dir", server.state_dir)):
                if target.is_relative_to(os.path.realpath(where)):
                    return f"it links to {target}, inside the daemon's {label}"
        return None

    def _is_control_socket(self, st: os.stat_result) -> bool:
        """Whether *st* (an entry, links followed) is the daemon's control socket."""
        with contextlib.suppress(OSError):
            ctl = os.stat(socket_path(self.daemon.config.server.runtime_dir))
            return (st.st_dev, st.st_ino) == (ctl.st_dev, ctl.st_ino)
        return False

    def _qmp_usable(self, name: str, path: Path) -> bool:
        """Whether NAME.qmp is a trusted socket (refused, logged and audited if present but not)."""
        try:
            lst = os.lstat(path)
        except OSError:
            return False
        problem = self._entry_problem(path, lst)
        if problem is None:
            try:
                st = os.stat(path)
            except OSError:
                return False  # a dangling link: no QMP for now
            if not stat.S_ISSOCK(st.st_mode):
                return False
            if self._is_control_socket(st):
                problem = "it is the daemon's own control socket"
        if problem is not None:
            self._refuse(name, path, problem)
            return False
        return True

    def _refuse(self, name: str, path: Path, reason: str) -> None:
        log.warning("discovery_refused", vm=name, path=str(path), reason=reason)
        self.daemon.audit.event("vm_refused", vm=name, source="discovery", path=str(path),
                                reason=reason, result="refused")

    async def _sync(self, name: str) -> None:
        daemon = self.daemon
        if name in daemon.config.vms:  # static wins
            self.vms.pop(name, None)
            return
        want = self.wanted(name)
        have = self.vms.get(name)
        if have is not None and name not in daemon.consoles:
            del self.vms[name]  # a stale entry (its console went another way): start afresh
            have = None
        if have is not None and want is None:
            del self.vms[name]
            if name in daemon.consoles:
                await daemon.remove_console(name, f"VM {name} went away")
            daemon.audit.event("vm_gone", vm=name, source="discovery", result="ok")
        elif want is not None and have is None:
            if name not in daemon.consoles:
                self.vms[name] = want
                await daemon.add_console(want)
                self._audit_added(want)
        elif want is not None and have is not None:
            if want != have:
                self.vms[name] = want
                await daemon.reopen_console(want)
            else:
                daemon.consoles[name].port.retry_now()  # e.g. the symlink was re-pointed

    def _audit_added(self, vm: VMConfig) -> None:
        self.daemon.audit.event("vm_discovered", vm=vm.name, source="discovery",
                                port=str(vm.port), qmp=vm.qmp, result="ok")


def _vm_name(filename: str) -> str | None:
    for suffix in (SERIAL_SUFFIX, QMP_SUFFIX):
        if filename.endswith(suffix):
            name = filename[: -len(suffix)]
            return name if check_name(name) else None
    return None


def _trusted_uids() -> tuple[int, int]:
    return (0, os.geteuid())


def _user(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"
