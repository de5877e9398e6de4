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

import itertools
import os
import re
import syslog
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from .configtypes import check_name

#: Operations after which the domain's QEMU runs (with its live XML on stdin).
LINK = frozenset({"started", "reconnect", "attach"})
#: Operations after which it does not.
UNLINK = frozenset({"stopped", "release"})
#: The most of stdin read: a domain's XML is some KiB, a huge one is not libvirt's.
MAX_XML = 4 * 1024 * 1024
SERIAL_SUFFIX = ".serial"
QMP_SUFFIX = ".qmp"
_QEMU_NS = "{http://libvirt.org/schemas/domain/qemu/1.0}"
_PTY = re.compile(r"/dev/pts/[0-9]+")
_QMP_UNIX = re.compile(r"unix:([^,]+)(?:,.*)?")


class HookProblem(Exception):
    """Why a domain's console was not linked (said, never raised to libvirt)."""


@dataclass(frozen=True, slots=True)
class Links:
    """What a domain's console is: the COM1 target, and its extra QMP socket if any."""

    serial: str
    qmp: str | None = None


def links_of(xml_text: str) -> Links:
    """Find COM1 (and an extra ``-qmp unix:``) in a domain's XML; raise HookProblem."""
    if "<!DOCTYPE" in xml_text or "<!ENTITY" in xml_text:  # libvirt never writes one
        raise HookProblem("the domain XML on stdin has a DOCTYPE or ENTITY; not read")
    try:
        # libvirtd (root) wrote it, with no DTD (refused above): ElementTree fetches no
        # external entities, so nothing here reads a file or expands an entity.
        root = ET.fromstring(xml_text)  # noqa: S314
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


def run(directory: Path, domain: str, operation: str, xml_text: str) -> str | None:
    """Do what *operation* on *domain* means for its links in *directory*.

    Returns what was done (None: nothing, the operation is not one that
    changes whether QEMU runs); raises HookProblem when it could not be done.
    """
    if operation not in LINK | UNLINK:
        return None
    if not check_name(domain):
        raise HookProblem(f"domain name {domain!r} is not a name serialmux serves "
                          "(letters, digits, '.', '_', '-'); not linked")
    serial = directory / f"{domain}{SERIAL_SUFFIX}"
    qmp = directory / f"{domain}{QMP_SUFFIX}"
    if operation in UNLINK:
        gone = [str(p) for p in (serial, qmp) if _unlink(p)]
        return f"removed {', '.join(gone)}" if gone else "nothing to remove"
    links = links_of(xml_text)
    if not directory.is_dir():
        raise HookProblem(f"the discovery directory {directory} does not exist "
                          "(is serialmux installed with its tmpfiles.d entry?)")
    _link(serial, links.serial)
    done = [f"{serial} -> {links.serial}"]
    if links.qmp is not None:
        _link(qmp, links.qmp)
        done.append(f"{qmp} -> {links.qmp}")
    return "linked " + ", ".join(done)


def _link(path: Path, target: str) -> None:
    """Point symlink *path* at *target* in one step (the console never sees it missing)."""
    temp = path.with_name(f".{path.name}.{os.getpid()}")  # discovery ignores dot names
    try:
        temp.unlink(missing_ok=True)
        os.symlink(target, temp)
        os.replace(temp, path)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise HookProblem(f"cannot link {path} -> {target}: {exc.strerror}") from exc


def _unlink(path: Path) -> bool:
    """Remove *path* if it is a symlink (only ours are); return whether it was removed."""
    if not path.is_symlink():
        return False
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise HookProblem(f"cannot remove {path}: {exc.strerror}") from exc
    return True


def to_syslog(message: str, *, problem: bool) -> None:
    """Log *message* to syslog (the journal): libvirt does not show a hook's output."""
    syslog.openlog("serialmux-libvirt-hook", 0, syslog.LOG_DAEMON)
    syslog.syslog(syslog.LOG_WARNING if problem else syslog.LOG_INFO, message)
