"""The systemd notify protocol (sd_notify(3)), spoken directly over a datagram socket.

Owns the conversation with the service manager: READY, STATUS, RELOADING,
STOPPING and the watchdog pings. Without ``$NOTIFY_SOCKET`` (not started by
systemd with ``Type=notify``) every call is a no-op, so the daemon can call
it unconditionally.

Sending never raises on I/O: the service manager being gone must not take the
daemon down. Only a malformed field (a newline in a value) raises ValueError,
because that is a bug in the caller.

Sending never blocks either: it runs on the event loop, and a busy PID 1 whose
notify queue is full would otherwise stall every console for each message. A
message that finds the queue full waits in a short, bounded queue and is sent,
in order, on the next :meth:`Notifier.notify` or from a retry timer on the
running loop. ``STATUS`` and ``WATCHDOG`` are latest-wins, so a waiting message
loses those fields to a newer one; ``READY``, ``RELOADING`` and ``STOPPING``
are kept. The wait is logged once (``sd_notify_deferred``) and so is its end.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time

from serialmux.log import get_logger

__all__ = ["Notifier"]

log = get_logger(__name__)

#: Errors meaning "the manager's queue (or our send buffer) is full now": try again later.
_TRANSIENT = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS})
#: Fields where only the newest value matters; an older waiting message drops them.
_LATEST_WINS = frozenset({"STATUS", "WATCHDOG"})
#: Messages kept while the manager is not reading. With STATUS and WATCHDOG coalesced only
#: READY/RELOADING/STOPPING accumulate (one per reload), so reaching this is a stall of minutes.
_MAX_PENDING = 32
#: Retry timer: first after this many seconds, doubling up to _RETRY_MAX while the queue stays full.
_RETRY_FIRST = 0.01
_RETRY_MAX = 0.5


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
        self._pending: list[dict[str, str]] = []  # oldest first; each one datagram
        self._retry: asyncio.TimerHandle | None = None
        self._retry_delay = _RETRY_FIRST
        self._waiting_since: float | None = None  # monotonic time the first message waited

    @property
    def enabled(self) -> bool:
        """True when there is a service manager to notify."""
        return self._address is not None

    def notify(self, **fields: str | int) -> None:
        """Send one message of ``KEY=value`` lines, e.g. ``notify(READY=1, STATUS="up")``.

        Returns at once. Raises ValueError if a key or value contains a newline
        (or a key is empty or has ``=``). If the manager's queue is full the
        message waits (see the module docstring); other I/O failures (no
        manager listening) drop it silently.
        """
        message: dict[str, str] = {}
        for key, value in fields.items():
            text = str(value)
            if not key or "=" in key or "\n" in key:
                raise ValueError(f"invalid sd_notify field name {key!r}")
            if "\n" in text:
                raise ValueError(f"sd_notify field {key} must not contain a newline")
            message[key] = text
        if self._address is None or not message:
            return
        self._enqueue(message)
        self._flush()

    def _enqueue(self, message: dict[str, str]) -> None:
        """Queue ``message`` behind any waiting ones, dropping fields it supersedes."""
        newer = _LATEST_WINS & message.keys()
        if newer and self._pending:
            for waiting in self._pending:
                for key in newer:
                    waiting.pop(key, None)
            self._pending = [waiting for waiting in self._pending if waiting]
        self._pending.append(message)
        if len(self._pending) > _MAX_PENDING:
            dropped = self._pending.pop(0)
            log.warning("sd_notify_dropped", fields=",".join(dropped), pending=_MAX_PENDING,
                        reason="the service manager has not read its notify socket for long")

    def _flush(self) -> None:
        """Send waiting messages in order until done or the manager's queue is full."""
        address = self._address
        if address is None:  # never: nothing is queued while disabled
            self._pending.clear()
            return
        while self._pending:
            data = "\n".join(f"{k}={v}" for k, v in self._pending[0].items()).encode()
            try:
                if self._sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    sock.setblocking(False)
                    self._sock = sock
                self._sock.sendto(data, socket.MSG_DONTWAIT, address)
            except OSError as err:
                if err.errno in _TRANSIENT:
                    self._defer()
                    return
                # No manager listening (ENOENT, ECONNREFUSED): not the daemon's failure.
            self._pending.pop(0)
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._retry_delay = _RETRY_FIRST
        if self._waiting_since is not None:
            waited = time.monotonic() - self._waiting_since
            self._waiting_since = None
            log.info("sd_notify_caught_up", waited=round(waited, 3))

    def _defer(self) -> None:
        """The head message must wait: log that once; retry from a timer if a loop runs."""
        if self._waiting_since is None:
            self._waiting_since = time.monotonic()
            log.warning("sd_notify_deferred", fields=",".join(self._pending[0]),
                        reason="the service manager's notify queue is full (PID 1 busy?)")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (start-up or a test): the next notify() or close() retries
        if self._retry is not None:
            self._retry.cancel()
        self._retry = loop.call_later(self._retry_delay, self._retry_now)
        self._retry_delay = min(self._retry_delay * 2, _RETRY_MAX)

    def _retry_now(self) -> None:
        self._retry = None
        self._flush()

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
        """Try once more to send waiting messages, then close the socket; later calls reopen it.

        Messages the manager still has no room for are dropped, and that is logged.
        """
        self._flush()
        if self._pending:
            log.warning("sd_notify_dropped", fields=",".join(k for m in self._pending for k in m),
                        pending=len(self._pending), reason="closed while the manager was busy")
            self._pending.clear()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._retry_delay = _RETRY_FIRST
        self._waiting_since = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
