"""The error tree of serialmux.

Every error raised on purpose by serialmux derives from :class:`SerialmuxError`
and carries the facts a person needs (file, line, key, VM, user) as attributes::

    SerialmuxError
     ├── ConfigError          a config file or value is wrong (path, line, key)
     ├── PortError            a VM serial port cannot be opened or used (vm)
     ├── RingError            a scrollback ring file is unusable (path)
     │    └── RingCorrupt     the file is not a ring we can recover (moved aside)
     ├── AccessDenied         an identity may not do this to this VM (user, vm)
     ├── HypervisorError      the control side (QMP) failed (vm)
     │    ├── HypervisorUnavailable   no control interface configured / reachable
     │    └── HypervisorTimeout       a command got no reply in time
     ├── ControlError         the local control socket failed or refused
     └── AlreadyRunning       another daemon holds this state_dir or runtime_dir

Messages say what went wrong and what to do next. :func:`describe` says an
OS error the same way everywhere (``ENOENT: No such file or directory``).
"""

from __future__ import annotations

import errno


def describe(exc: BaseException) -> str:
    """One line for *exc*: ``ENAME: strerror`` for an OS error, else its first line."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror}"
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


class SerialmuxError(Exception):
    """Root of every error serialmux raises on purpose."""


class ConfigError(SerialmuxError):
    """A configuration file or value is invalid.

    ``str(err)`` reads ``FILE:LINE: KEY: message`` with whatever of the
    three is known, so an operator can go straight to the mistake.
    """

    def __init__(
        self, message: str, *, path: str | None = None, line: int | None = None,
        key: str | None = None,
    ) -> None:
        self.message = message
        self.path = path
        self.line = line
        self.key = key
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = ""
        if self.path:
            where = self.path + (f":{self.line}" if self.line else "") + ": "
        key = f"{self.key}: " if self.key else ""
        return f"{where}{key}{self.message}"


class PortError(SerialmuxError):
    """A VM's serial port could not be opened, read or written."""

    def __init__(self, message: str, *, vm: str) -> None:
        self.vm = vm
        super().__init__(f"{vm}: {message}")


class RingError(SerialmuxError):
    """A scrollback ring file could not be used."""

    def __init__(self, message: str, *, path: str) -> None:
        self.path = path
        super().__init__(f"{path}: {message}")


class RingCorrupt(RingError):
    """A ring file is not one we can read (bad magic, future version, bad header)."""


class AccessDenied(SerialmuxError):
    """The authenticated identity may not do this to this VM."""

    def __init__(self, message: str, *, user: str | None = None, vm: str | None = None) -> None:
        self.user = user
        self.vm = vm
        super().__init__(message)


class HypervisorError(SerialmuxError):
    """The hypervisor's control interface failed to do what was asked."""

    def __init__(self, message: str, *, vm: str, error_class: str | None = None) -> None:
        self.vm = vm
        self.error_class = error_class
        super().__init__(f"{vm}: {message}")


class HypervisorUnavailable(HypervisorError):
    """No control interface is configured for the VM, or it cannot be reached."""


class HypervisorTimeout(HypervisorError):
    """The control interface did not answer in time."""


class ControlError(SerialmuxError):
    """The local control socket could not be reached or refused the request."""


class AlreadyRunning(SerialmuxError):
    """Another serialmux holds the single-instance lock on a state or runtime directory
    (:mod:`serialmux.instancelock`)."""
