"""Whose terminal a tty is: a ``pty:`` or ``tty:`` path must never be someone's shell.

A ``pty:/dev/pts/N`` in the configuration names a number, and the kernel hands
numbers out again: after a host reboot, or when the VM is gone, the path may
be an operator's ssh session or a ``screen`` window. Attaching that would show
the shell to the VM's readers and let its contributors type into it. (A number
reused while serialmux runs is caught by the PTY's identity, in
:mod:`serialmux.port`; this covers the first open.) A QEMU ``-serial pty`` is
nobody's controlling terminal: QEMU holds the master and no session owns the
slave; an interactive terminal always has a session whose controlling
terminal it is. So :func:`controlling_process` looks the device up in
``/proc/*/stat`` (``tty_nr``) and names the process whose terminal it is.

The scan reads every process's ``stat`` once, then serves every port opened
within :data:`FRESH_FOR` seconds from it: 5000 consoles starting cost one scan.
A terminal it names is checked again against that process (it may have ended
since), so a stale answer never keeps a VM's port closed.
"""

from __future__ import annotations

import os
import time

#: Seconds a scan of /proc answers for.
FRESH_FOR = 1.0

_scan: tuple[float, dict[int, tuple[int, str]]] = (float("-inf"), {})


def controlling_process(path: str) -> str | None:
    """``"bash (pid 4242)"`` when the tty at *path* is a session's controlling terminal;
    None when it is not, or *path* is not a character device."""
    try:
        rdev = os.stat(path).st_rdev
    except OSError:
        return None
    if not rdev:
        return None
    owner = _owners().get(rdev)
    if owner is not None and _terminal_of(owner[0]) != rdev:  # it ended since the scan
        owner = _owners(fresh=True).get(rdev)
    return None if owner is None else f"{owner[1]} (pid {owner[0]})"


def _owners(*, fresh: bool = False) -> dict[int, tuple[int, str]]:
    """Controlling terminal (st_rdev) → (pid, name) of a process that has it."""
    global _scan
    when, owners = _scan
    now = time.monotonic()
    if now - when < FRESH_FOR and not fresh:
        return owners
    owners = {}
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        found = _stat(int(entry.name))
        if found is not None and found[0]:
            owners.setdefault(found[0], (int(entry.name), found[1]))
    _scan = (now, owners)
    return owners


def _terminal_of(pid: int) -> int | None:
    """The controlling terminal (st_rdev, 0 for none) of *pid*, None if it is gone."""
    found = _stat(pid)
    return None if found is None else found[0]


def _stat(pid: int) -> tuple[int, str] | None:
    """(controlling terminal as st_rdev or 0, name) of *pid* from /proc; None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None  # gone meanwhile, or hidden (hidepid)
    name_end = stat.rfind(b")")
    fields = stat[name_end + 2:].split()
    if name_end < 0 or len(fields) < 5:
        return None
    tty_nr = int(fields[4])
    name = stat[stat.find(b"(") + 1:name_end].decode(errors="replace")
    if not tty_nr:
        return 0, name
    major, minor = (tty_nr >> 8) & 0xFFF, (tty_nr & 0xFF) | ((tty_nr >> 12) & 0xFFF00)
    return os.makedev(major, minor), name
