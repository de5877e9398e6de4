"""``serialmux libvirt-hook``: a libvirt domain's COM1 in the discovery directory, kept in step.

libvirt runs each executable in ``/etc/libvirt/hooks/qemu.d/`` (and
``/etc/libvirt/hooks/qemu``) as root, with ``DOMAIN OPERATION SUBOP EXTRA`` as
arguments and the domain's XML on stdin, and waits for it. Installed there
(``config/libvirt-hook``), this links the domain's COM1 into ``[discovery] dir``
when the domain has started, and removes the link when it has stopped; the
daemon's discovery (inotify) then adds or removes the console. No call goes
back to libvirt, which waits for its hooks and would deadlock.

COM1 is the ``<serial>`` whose target port is 0 (else the first ``<serial>``):
a PTY (``type='pty'``, the live XML names ``/dev/pts/N``) or a UNIX socket QEMU
listens on (``type='unix'``, ``mode='bind'``). libvirt keeps QEMU's QMP monitor
to itself, and a QMP socket takes one client; a second one given in
``<qemu:commandline>`` (``-qmp unix:PATH,server=on,wait=off``) is linked as
``NAME.qmp``, for NMI, reset and BREAK.

A hook that fails can stop a domain from starting, and a console gateway must
never do that: whatever goes wrong (a name serialmux refuses, a console it
cannot serve, a directory that is missing) is reported on stderr and to
syslog, and the exit status is 0 (``cli.libvirt_hook``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import stat
import syslog
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from .configtypes import QMP_SUFFIX, SERIAL_SUFFIX, check_name

#: Operations after which the domain's QEMU runs (with its live XML on stdin).
LINK = frozenset({"started", "reconnect", "attach"})
#: Operations after which it does not.
UNLINK = frozenset({"stopped", "release"})
#: The most of stdin read: a domain's XML is some KiB, a huge one is not libvirt's.
MAX_XML = 4 * 1024 * 1024
_QEMU_NS = "{http://libvirt.org/schemas/domain/qemu/1.0}"
_PTY = re.compile(r"/dev/pts/[0-9]+")
#: Linux's PTY slave majors (UNIX98_PTY_SLAVE_MAJOR and the 7 after it).
_PTY_MAJORS = range(136, 144)
_QMP_UNIX = re.compile(r"unix:([^,]+)(?:,.*)?")


class HookProblem(Exception):
    """Why a domain's console was not linked (said, never raised to libvirt)."""


@dataclass(frozen=True, slots=True)
class Links:
    """What a domain's console is: the COM1 target, and its extra QMP socket if any."""

    serial: str
    qmp: str | None = None


def links_of(xml: bytes) -> Links:
    """Find COM1 (and an extra ``-qmp unix:``) in a domain's XML; raise HookProblem."""
    if b"<!DOCTYPE" in xml or b"<!ENTITY" in xml:  # libvirt never writes one
        raise HookProblem("the domain XML on stdin has a DOCTYPE or ENTITY; not read")
    try:
        # libvirtd (root) wrote it, with no DTD (refused above): ElementTree fetches no
        # external entities, so nothing here reads a file or expands an entity.
        root = ET.fromstring(xml)  # noqa: S314
    except ET.ParseError as exc:
        raise HookProblem(f"the domain XML on stdin does not parse: {exc}") from exc
    serials = root.findall("./devices/serial")
    if not serials:
        raise HookProblem("the domain has no <serial> device (COM1)")
    com1 = next((s for s in serials if _target_port(s) == "0"), serials[0])
    kind = com1.get("type")
    source = com1.find("source")
    path = source.get("path") if source is not None else None
    if kind == "pty":
        path = path or com1.get("tty")
        if not path or not _PTY.fullmatch(path):
            raise HookProblem(f"COM1 is a PTY without a /dev/pts/N path in the XML ({path!r}); "
                              "was the hook given the live XML?")
    elif kind == "unix":
        mode = source.get("mode") if source is not None else None
        if mode != "bind" or not path or not path.startswith("/"):
            raise HookProblem("COM1 is a UNIX socket QEMU does not listen on "
                              f"(mode={mode!r}); use <source mode='bind' path='/...'>")
    else:
        raise HookProblem(f"COM1 is <serial type={kind!r}>; serialmux discovery takes "
                          "type='pty' or type='unix' with mode='bind'")
    return Links(serial=path, qmp=_extra_qmp(root))


def _target_port(serial: ET.Element) -> str | None:
    target = serial.find("target")
    return None if target is None else target.get("port")


def _extra_qmp(root: ET.Element) -> str | None:
    """The path of a ``-qmp unix:PATH,...`` given in ``<qemu:commandline>``, if any."""
    args = [a.get("value", "") for a in root.findall(f"./{_QEMU_NS}commandline/{_QEMU_NS}arg")]
    for flag, value in itertools.pairwise(args):
        if flag in ("-qmp", "--qmp") and (m := _QMP_UNIX.fullmatch(value)) \
                and m.group(1).startswith("/"):
            return m.group(1)
    return None


def run(directory: Path, domain: str, operation: str, xml: bytes) -> str | None:
    """Do what *operation* on *domain* means for its links in *directory*.

    Returns what was done (None: nothing to do or say); raises HookProblem when it
    could not be done. Everything in *directory* is done through one descriptor of
    it, opened without following a symlink: a directory swapped for a link after the
    check cannot make this (root) process link or unlink elsewhere.
    """
    if operation not in LINK | UNLINK:
        return None
    if not check_name(domain):
        raise HookProblem(f"domain name {domain!r} is not a name serialmux serves "
                          "(letters, digits, '.', '_', '-'); not linked")
    serial, qmp = f"{domain}{SERIAL_SUFFIX}", f"{domain}{QMP_SUFFIX}"
    links = links_of(xml) if operation in LINK else None
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise HookProblem(f"the discovery directory {directory} does not exist "
                          "(is serialmux installed with its tmpfiles.d entry?)") from None
    except OSError as exc:
        raise HookProblem(f"cannot use the discovery directory {directory}: {exc.strerror} "
                          "(it must be a directory, not a symlink)") from exc
    try:
        if links is None:
            gone = [str(directory / name) for name in (serial, qmp) if _unlink(fd, name)]
            return f"removed {', '.join(gone)}" if gone else None
        done = []
        if links.qmp is not None:  # first: the console then comes up with its QMP
            _link(fd, qmp, links.qmp)
            done.append(f"{directory / qmp} -> {links.qmp}")
        # The PTY's access first: a console linked before it would try, be refused, and
        # wait out its retry backoff. A grant that fails still links (the console then
        # says why it cannot open), and is said after.
        try:
            granted, refused = _grant(links.serial, os.fstat(fd).st_gid), None
        except HookProblem as exc:
            granted, refused = "", exc
        _link(fd, serial, links.serial)
        if refused is not None:
            raise HookProblem(f"linked {directory / serial} -> {links.serial}, but {refused}")
        done.insert(0, f"{directory / serial} -> {links.serial}{granted}")
        return "linked " + ", ".join(done)
    finally:
        os.close(fd)


def _grant(path: str, gid: int) -> str:
    """Let group *gid* (the discovery directory's, so the daemon's) read and write the PTY
    at *path*; return a note on what was done ("" if nothing).

    A PTY is made ``OWNER:tty 0620`` (or ``0600``, as ``/dev/pts`` is mounted): its
    group may not read it, so a daemon that is not root cannot open the console of a
    QEMU run as root or as ``libvirt-qemu``. Only a PTY slave device is changed (checked
    on the descriptor that is changed: never a link, never a file a domain's XML could
    name), and not when *gid* is root's.
    """
    if gid == 0 or not _PTY.fullmatch(path):
        return ""
    try:
        # Through a descriptor of the device itself: what is checked is what is changed.
        pty = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_NOFOLLOW
                      | os.O_CLOEXEC)
        try:
            st = os.fstat(pty)
            if not (stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) in _PTY_MAJORS):
                return ""
            os.fchown(pty, -1, gid)
            os.fchmod(pty, (st.st_mode & 0o7777) | 0o060)
        finally:
            os.close(pty)
    except OSError as exc:
        raise HookProblem(f"cannot give the daemon's group access to {path}: "
                          f"{exc.strerror}") from exc
    return f" (group {gid} may read and write it)"


def _link(fd: int, name: str, target: str) -> None:
    """Point symlink *name* (in directory *fd*) at *target* in one step: the console
    never sees it missing."""
    temp = f".{name}.{os.getpid()}"  # not NAME.serial: discovery ignores it
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=fd)
        os.symlink(target, temp, dir_fd=fd)
        os.replace(temp, name, src_dir_fd=fd, dst_dir_fd=fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=fd)
        raise HookProblem(f"cannot link {name} -> {target}: {exc.strerror}") from exc


def _unlink(fd: int, name: str) -> bool:
    """Remove *name* (in directory *fd*) if it is a symlink (only ours are); return
    whether it was removed."""
    try:
        if not stat.S_ISLNK(os.lstat(name, dir_fd=fd).st_mode):
            return False
        os.unlink(name, dir_fd=fd)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise HookProblem(f"cannot remove {name}: {exc.strerror}") from exc
    return True


def to_syslog(message: str, *, problem: bool) -> None:
    """Log *message* to syslog (the journal): libvirt does not show a hook's output."""
    syslog.openlog("serialmux-libvirt-hook", 0, syslog.LOG_DAEMON)
    syslog.syslog(syslog.LOG_WARNING if problem else syslog.LOG_INFO, message)
