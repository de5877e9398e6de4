"""The systemd notify protocol (sd_notify(3)), spoken directly over a datagram socket.

Owns the conversation with the service manager: READY, STATUS, RELOADING,
STOPPING and the watchdog pings. Without ``$NOTIFY_SOCKET`` (not started by
systemd with ``Type=notify``) every call is a no-op, so the daemon can call
it unconditionally.

Sending never raises on I/O: the service manager being gone must not take the
daemon down. Only a malformed field (a newline in a value) raises ValueError,
because that is a bug in the caller.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

__all__ = ["Notifier"]

# A datagram to systemd only blocks if its receive queue is full; bound that so
# a stuck manager can delay the event loop briefly, never wedge it.
_SEND_TIMEOUT = 1.0


class Notifier:
    """A client of the service manager's notification socket.

    ``socket_path`` defaults to ``$NOTIFY_SOCKET``; a leading ``@`` means the
    Linux abstract namespace. An unset, empty or unusable path disables it.
    """

    def __init__(self, socket_path: str | None = None) -> None:
        if socket_path is None:
            socket_path = os.environ.get("NOTIFY_SOCKET")
        self._address: str | None = None
        if socket_path and socket_path[0] == "@":
            self._address = "\0" + socket_path[1:]
        elif socket_path and socket_path[0] == "/":
            self._address = socket_path
        # Anything else (a relative path, "vsock:…") is not something we can
        # reach from here; stay disabled rather than guess.
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        """True when there is a service manager to notify."""
        return self._address is not None

    def notify(self, **fields: str | int) -> None:
        """Send one message of ``KEY=value`` lines, e.g. ``notify(READY=1, STATUS="up")``.

        Raises ValueError if a key or value contains a newline (or a key is
        empty or has ``=``); I/O failures are silently ignored.
        """
        lines = []
        for key, value in fields.items():
            text = str(value)
            if not key or "=" in key or "\n" in key:
                raise ValueError(f"invalid sd_notify field name {key!r}")
            if "\n" in text:
                raise ValueError(f"sd_notify field {key} must not contain a newline")
            lines.append(f"{key}={text}")
        if self._address is None or not lines:
            return
        message = "\n".join(lines).encode()
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.settimeout(_SEND_TIMEOUT)
                self._sock = sock
            self._sock.sendto(message, self._address)
        except OSError:
            # Callers log; a missing manager is not the daemon's failure.
            return

    def ready(self, status: str) -> None:
        """Start-up (or a reload) is complete and the daemon serves."""
        self.notify(READY=1, STATUS=status)

    def stopping(self) -> None:
        """Shutdown has begun."""
        self.notify(STOPPING=1)

    def status(self, text: str) -> None:
        """Set the one-line status ``systemctl status`` shows."""
        self.notify(STATUS=text)

    def reloading(self) -> None:
        """A reload has begun; call :meth:`ready` when it is done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify(RELOADING=1, MONOTONIC_USEC=usec)

    def watchdog_interval(self) -> float | None:
        """The watchdog timeout in seconds, or None if no watchdog is asked of this process.

        Read from ``$WATCHDOG_USEC``; ``$WATCHDOG_PID``, when set, must be our
        pid (a child that inherited the environment must not ping for us).
        """
        if not self.enabled:
            return None
        pid = os.environ.get("WATCHDOG_PID")
        if pid is not None:
            try:
                if int(pid) != os.getpid():
                    return None
            except ValueError:
                return None
        try:
            usec = int(os.environ.get("WATCHDOG_USEC", ""))
        except ValueError:
            return None
        if usec <= 0:
            return None
        return usec / 1_000_000

    async def watchdog_loop(self) -> None:
        """Ping ``WATCHDOG=1`` every half interval until cancelled.

        Runs on the event loop on purpose: if the loop wedges, the pings stop
        and systemd restarts us. Returns at once when there is no watchdog.
        """
        interval = self.watchdog_interval()
        if interval is None:
            return
        while True:
            self.notify(WATCHDOG=1)
            await asyncio.sleep(interval / 2)

    def close(self) -> None:
        """Close the socket; later calls reopen it."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
