"""One daemon per state directory and per runtime directory: the single-instance lock.

A second ``serialmux serve`` on the same ``state_dir`` would write its start and
stop markers into the running daemon's rings and open its ports (two readers of
a PTY split the guest's output) before failing on the SSH address; on the same
``runtime_dir`` it would take over the control socket. So
:meth:`Daemon.serve() <serialmux.daemon.Daemon.serve>` takes this lock before
anything else touches state: an exclusive, non-blocking ``flock`` on
``serialmux.lock`` in each directory (created 0640, never through a symlink),
holding the PID of the daemon that has it. The kernel releases it when the
process ends, however it ends, so ``kill -9`` leaves no stale lock to clean up;
the file itself stays. Readers (``serialmux logs``) never take it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path

from .errors import AlreadyRunning, SerialmuxError

LOCK_NAME = "serialmux.lock"


class InstanceLock:
    """The held locks of one daemon; :meth:`release` (or the process's end) lets go."""

    def __init__(self) -> None:
        self._fds: list[int] = []

    def acquire(self, directories: dict[str, Path]) -> None:
        """Lock ``serialmux.lock`` in each directory (key: its setting's name, for messages).

        Raises :class:`AlreadyRunning` naming the lock file and the PID written in
        it when another process holds one, or :class:`SerialmuxError` when a lock
        file cannot be made; nothing is held then.
        """
        seen: set[str] = set()
        try:
            for setting, directory in directories.items():
                real = os.path.realpath(directory)
                if real in seen:
                    continue  # state_dir == runtime_dir: one lock (a second flock would fail)
                seen.add(real)
                self._fds.append(_lock(directory / LOCK_NAME, setting))
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Let go of every lock (the files stay: removing one would race a new daemon)."""
        fds, self._fds = self._fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _lock(path: Path, setting: str) -> int:
    """Open and lock *path*, write our PID in it; return its fd."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    except OSError as exc:
        hint = (" (it is a symlink: remove it)" if exc.errno == errno.ELOOP
                else f"; check {setting}")
        raise SerialmuxError(f"cannot open the lock file {path}: "
                             f"{exc.strerror or exc}{hint}") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SerialmuxError(f"the lock file {path} is not a regular file: remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            who = f"pid {pid}" if pid.isdigit() else "pid unknown"
            raise AlreadyRunning(
                f"another serialmux ({who}) is running on this {setting}: {path} is locked; "
                "stop it first (systemctl stop serialmux), or give this one its own "
                f"{setting}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as exc:
        os.close(fd)
        raise SerialmuxError(f"cannot lock {path}: {exc.strerror or exc}; "
                             f"check {setting}") from exc
    except BaseException:
        os.close(fd)
        raise
    return fd
