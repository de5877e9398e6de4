"""VM discovery: consoles for the VMs found in a directory, kept in step with inotify.

``[discovery] dir = "/run/serialmux/vms"`` holds, per VM, ``NAME.serial``
(a UNIX socket of QEMU's ``-chardev socket,server=on``, or a symlink to the
VM's PTY or tty) and optionally ``NAME.qmp`` (QEMU's QMP socket). Whoever
starts VMs (a libvirt hook, a wrapper script) creates and removes them.

:class:`Discovery` owns the inotify descriptor and the set of consoles it
added. Events only mark names dirty; :meth:`Discovery.run` then looks at the
files of each dirty name and adds, reopens or removes that one console, under
``daemon.changes`` so it never interleaves with a reload. Names are checked
with :func:`~serialmux.config.check_name` before they touch a path or a log
line. A static ``[vms.NAME]`` entry always wins over a discovered one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import stat
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from .config import DiscoveryConfig, PortKind, PortSpec, VMConfig, check_name
from .errors import SerialmuxError
from .log import get_logger

if TYPE_CHECKING:
    from .daemon import Daemon

log = get_logger(__name__)

SERIAL_SUFFIX = ".serial"
QMP_SUFFIX = ".qmp"

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
        self.vms: dict[str, VMConfig] = {}  # what this directory added and still runs
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
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._inotify.fd, self._readable)
        for name in sorted(self._names_present()):
            want = self.wanted(name)
            if want is not None and name not in self.daemon.consoles:
                self._added(want)
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
            st = os.stat(serial)
        except FileNotFoundError:
            if not os.path.islink(serial):
                return None
            kind = PortKind.PTY  # a dangling link: the VM's PTY is gone; keep the console down
        except OSError as exc:
            log.warning("discovery_unusable", vm=name, path=str(serial), error=exc.strerror)
            return None
        else:
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
        qmp = f"unix:{qmp_path}" if _is_socket(qmp_path) else None
        return VMConfig(name=name, port=PortSpec(kind, path=str(serial)), baud=self.config.baud,
                        qmp=qmp, ring_size=self.config.ring_size)

    async def _sync(self, name: str) -> None:
        daemon = self.daemon
        if name in daemon.config.vms:  # static wins
            self.vms.pop(name, None)
            return
        want = self.wanted(name)
        have = self.vms.get(name)
        if have is not None and want is None:
            del self.vms[name]
            if name in daemon.consoles:
                await daemon.remove_console(name, f"VM {name} went away")
            daemon.audit.event("vm_gone", vm=name, source="discovery", result="ok")
        elif want is not None and have is None:
            if name not in daemon.consoles:
                self._added(want)
        elif want is not None and have is not None:
            if want != have:
                self.vms[name] = want
                await daemon.reopen_console(want)
            elif name in daemon.consoles:
                daemon.consoles[name].port.retry_now()  # e.g. the symlink was re-pointed

    def _added(self, vm: VMConfig) -> None:
        self.vms[vm.name] = vm
        self.daemon.add_console(vm)
        self.daemon.audit.event("vm_discovered", vm=vm.name, source="discovery",
                                port=str(vm.port), qmp=vm.qmp, result="ok")


def _vm_name(filename: str) -> str | None:
    for suffix in (SERIAL_SUFFIX, QMP_SUFFIX):
        if filename.endswith(suffix):
            name = filename[: -len(suffix)]
            return name if check_name(name) else None
    return None


def _is_socket(path: Path) -> bool:
    with contextlib.suppress(OSError):
        return stat.S_ISSOCK(os.stat(path).st_mode)
    return False
