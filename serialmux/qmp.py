"""The control side of one VM: a QMP connection to QEMU that survives QEMU restarts.

:class:`Hypervisor` owns one QMP session at a time. :meth:`Hypervisor.run` connects, waits for the
greeting and ``qmp_capabilities`` (bounded by ``connect_timeout``), delivers events to
``on_event`` and reconnects with a capped backoff when QEMU goes away. :meth:`Hypervisor.execute`
sends one command at a time per VM and turns every failure into a
:class:`~serialmux.errors.HypervisorError` within ``command_timeout``.

Why QEMU's own ``qemu.qmp`` and not a hand-written client: it already does the protocol right
(greeting and negotiation, ids matched to replies, ``ExecuteError`` carrying the QMP error class,
an unrouteable or malformed message ending the session, and ``disconnect()`` reporting the root
cause), and we measured what it lacks against a misbehaving fake server
(tests/unit/test_qmp_misbehaving.py) and covered each gap here:

* no timeouts of its own: its ``connect()`` and ``execute()`` are cancellation-safe (its
  ``_session_guard`` rolls back to IDLE on ``CancelledError``), so ``asyncio.timeout`` around
  them bounds a missing greeting and a reply that never comes;
* a giant line: its ``readbuflen`` (10 MiB by default) becomes our :data:`MAX_MESSAGE`, so a
  1 MiB line fails the session at once instead of being buffered;
* the reader task's failure reaches only ``disconnect()``; a waiting ``execute()`` just sees
  ``ExecInterruptedError``, so the session records the cause and ``execute()`` reports it;
* it checks a reply's envelope (``return`` or a well-formed ``error``) but not what ``return``
  holds, and a bad envelope raises its ``BadReplyError``; whoever answers on the QMP socket is
  untrusted, so ``execute()`` turns that into a HypervisorError and every reply we read a field
  from is checked for shape first (:meth:`Hypervisor.status`, :meth:`Hypervisor.chardev_pty`):
  a wrong shape is a HypervisorError naming the VM, the socket and the command, never a
  TypeError that would end the console's TaskGroup (the greeting is checked by qemu.qmp itself,
  which fails ``connect()`` with ``GreetingError``, and we read nothing from it);
* its event listeners keep every event in a history list for the session's lifetime (unbounded
  in a daemon), so the default listener is muted and ours hands events straight to
  ``on_event`` without a queue;
* it logs expected failures (QEMU off) at ERROR through stdlib logging, every retry; its records
  go to the ``serialmux.qmp.wire`` logger (CRITICAL only by default) and our own facts
  (``qmp_connected``, ``qmp_disconnected``, ``qmp_connect_failed``) are logged through structlog.

Its reader and writer are tasks the library creates and always joins in ``disconnect()``, which
:meth:`Hypervisor.run` calls on every path out of a session, so none outlives ``run()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qemu.qmp import EventListener, ExecInterruptedError, ExecuteError, QMPClient, StateError
from qemu.qmp.message import DeserializationError
from qemu.qmp.protocol import ConnectError, Runstate
from qemu.qmp.qmp_client import BadReplyError, GreetingError, NegotiationError

from serialmux.errors import HypervisorError, HypervisorTimeout, HypervisorUnavailable
from serialmux.keys import normalise_address
from serialmux.log import get_logger

#: Longest QMP message accepted; QEMU's replies to our commands are a few KiB at most.
MAX_MESSAGE = 256 * 1024
#: How much of a malformed reply an error message quotes.
QUOTE_REPLY = 120
#: Reconnect backoff: first retry after this many seconds, doubling up to ``max_backoff``.
BACKOFF_START = 0.1
#: SysRq keys the kernel knows: its table is 0-9 and a-z. Each is also a QEMU qcode.
SYSRQ_KEYS = frozenset(string.digits + string.ascii_lowercase)
#: Events a console user cares about (all events are delivered; these are documented).
LIFECYCLE_EVENTS = frozenset({"RESET", "SHUTDOWN", "STOP", "RESUME", "POWERDOWN", "GUEST_PANICKED"})

EventCallback = Callable[[str, dict[str, Any]], None]
ConnectCallback = Callable[[], None]

log = get_logger(__name__)
# The only PTY paths taken from QEMU: anything else (a path QEMU, or whoever
# answers on the QMP socket, could choose) would be opened as the console.
PTY_PATH = re.compile(r"/dev/pts/[0-9]+")
#: qemu.qmp's own records. It reports each expected failure (QEMU off, a refused greeting) at
#: ERROR, which we already log as a structured fact, so only its CRITICAL (a library bug) shows.
WIRE_LOGGER = "serialmux.qmp.wire"
logging.getLogger(WIRE_LOGGER).setLevel(logging.CRITICAL)


def parse_address(address: str) -> str | tuple[str, int]:
    """Turn ``unix:/path`` or ``tcp:host:port`` into what asyncio connects to; ValueError if not."""
    kind, _, rest = address.partition(":")
    if kind == "unix" and rest:
        return rest
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        if host and port.isdigit() and 0 < int(port) < 65536:
            return host.strip("[]"), int(port)
    raise ValueError(f"QMP address {address!r} is neither unix:PATH nor tcp:HOST:PORT")


@dataclass
class _Session:
    """One connected QMP session; ``cause`` says why it ended once ``closed`` is set."""

    client: QMPClient
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    cause: BaseException | None = None


class _Deliver(EventListener):
    """Hands each event to the callback as the reader reads it; keeps no queue or history."""

    def __init__(self, hypervisor: Hypervisor) -> None:
        super().__init__()
        self._hypervisor = hypervisor

    async def put(self, event: Any) -> None:
        self._hypervisor._deliver(event)


class Hypervisor:
    """Control side of one VM over QMP.

    ``on_event(name, data)`` runs on the event loop for every QMP event as soon as it is read
    (``RESET``, ``SHUTDOWN``, ``STOP``, ``RESUME``, ``POWERDOWN``, ``GUEST_PANICKED``, ...). It
    must not block; its return value is ignored, and an exception from it is logged and does not
    end the session.

    ``on_connect()`` runs on the event loop each time a session is negotiated (QEMU started or
    restarted); the daemon uses it to reopen the VM's serial port at once instead of waiting out
    its backoff. Same rules as ``on_event``.
    """

    def __init__(
        self,
        vm: str,
        address: str,
        *,
        on_event: EventCallback | None = None,
        on_connect: ConnectCallback | None = None,
        command_timeout: float = 5.0,
        connect_timeout: float = 3.0,
        max_backoff: float = 2.0,
    ) -> None:
        self.vm = vm
        self.address = address
        try:
            self._target = parse_address(address)
        except ValueError as err:
            raise HypervisorError(str(err), vm=vm) from err
        self._on_event = on_event
        self._on_connect = on_connect
        self._command_timeout = command_timeout
        self._connect_timeout = connect_timeout
        self._max_backoff = max_backoff
        self._session: _Session | None = None
        self._connected = asyncio.Event()
        self._lock = asyncio.Lock()  # one command at a time per VM
        self._last_error = "not connected yet"
        self._log = log.bind(vm=vm, address=address)

    # ------------------------------------------------------------------ connection

    @property
    def connected(self) -> bool:
        """True while a negotiated QMP session is up."""
        return self._session is not None

    async def wait_connected(self, timeout: float) -> bool:  # noqa: ASYNC109 - the API
        """Wait up to ``timeout`` seconds for a session; return whether there is one."""
        try:
            async with asyncio.timeout(timeout):
                await self._connected.wait()
        except TimeoutError:
            return False
        return True

    async def run(self) -> None:
        """Connect, serve the session, reconnect when it ends; forever, until cancelled."""
        loop = asyncio.get_running_loop()
        delay = BACKOFF_START
        while True:
            client = self._new_client()
            try:
                async with asyncio.timeout(self._connect_timeout):
                    await client.connect(self._target)
            except TimeoutError:
                self._last_error = (
                    f"no QMP greeting or capabilities reply within {self._connect_timeout} s"
                )
                self._log.info("qmp_connect_failed", error=self._last_error)
            except (ConnectError, OSError) as err:
                self._last_error = _connect_failure(err)
                self._log.debug("qmp_connect_failed", error=self._last_error)
            else:
                began = loop.time()
                await self._serve(client)
                if loop.time() - began > self._max_backoff:
                    delay = BACKOFF_START  # a session that lasted: QEMU restarted, retry soon
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._max_backoff)

    def _new_client(self) -> QMPClient:
        client = QMPClient(self.vm, readbuflen=MAX_MESSAGE)
        client.logger = logging.getLogger(WIRE_LOGGER)
        client.events.event_filter = lambda _event: False  # keep no event history
        client.register_listener(_Deliver(self))
        return client

    async def _serve(self, client: QMPClient) -> None:
        """Publish the session until it ends, then record why it ended."""
        session = _Session(client)
        self._session = session
        self._connected.set()
        self._log.info("qmp_connected")
        if self._on_connect is not None:
            try:
                self._on_connect()
            except Exception:  # a broken callback must not end the session
                self._log.exception("qmp_connect_callback_failed")
        try:
            while client.runstate == Runstate.RUNNING:
                await client.runstate_changed()
        finally:
            self._session = None
            self._connected.clear()
            try:
                async with asyncio.timeout(self._connect_timeout):
                    await client.disconnect()  # joins the library's tasks; raises the cause
            except Exception as err:  # the cause is a fact to report, not a bug
                session.cause = err
            finally:
                session.closed.set()
            self._last_error = _lost(session.cause)
            self._log.info("qmp_disconnected", error=self._last_error)

    def _deliver(self, event: Any) -> None:
        name = str(event.get("event", ""))
        data = event.get("data", {})
        if self._on_event is None:
            return
        try:
            self._on_event(name, dict(data) if isinstance(data, dict) else {})
        except Exception:  # a broken callback must not end the session
            self._log.exception("qmp_event_callback_failed", qmp_event=name)

    # ------------------------------------------------------------------ commands

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one QMP command and return its ``return`` value.

        Raises HypervisorUnavailable when there is no session (or it is lost mid-command),
        HypervisorTimeout after ``command_timeout`` (waiting for the previous command counts),
        and HypervisorError with ``error_class`` set when QEMU answers with an error.
        """
        interrupted: _Session | None = None
        try:
            async with asyncio.timeout(self._command_timeout):
                async with self._lock:
                    session = self._session
                    if session is None:
                        raise self._unavailable(command)
                    try:
                        return await session.client.execute(command, arguments)
                    except ExecInterruptedError:
                        interrupted = session
        except TimeoutError as err:
            raise HypervisorTimeout(
                f"QMP {command} got no reply within {self._command_timeout} s; "
                "QEMU may be hung (check its process) or very busy",
                vm=self.vm,
            ) from err
        except ExecuteError as err:
            raise HypervisorError(
                f"QEMU refused {command}: {err}", vm=self.vm, error_class=err.error_class
            ) from err
        except StateError as err:  # the session started closing as we sent
            raise self._unavailable(command) from err
        except BadReplyError as err:  # neither "return" nor a well-formed "error"
            raise HypervisorError(
                f"QMP {command} at {self.address} got a malformed reply "
                f"{_quote(dict(err.msg))}; is QEMU what answers on that socket?",
                vm=self.vm,
            ) from err
        # The connection broke under the command: wait (briefly) for run() to learn why.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await interrupted.closed.wait()
        raise _session_error(interrupted.cause, command, self.vm, self.address)

    def _malformed(self, command: str, reply: object, expected: str) -> HypervisorError:
        """The error for a reply of the wrong shape: a broken or impostor QMP server."""
        return HypervisorError(
            f"QMP {command} at {self.address} returned {_quote(reply)}, not {expected}; "
            "is QEMU what answers on that socket?",
            vm=self.vm,
        )

    def _unavailable(self, command: str) -> HypervisorUnavailable:
        return HypervisorUnavailable(
            f"cannot run {command}: no QMP session at {self.address} ({self._last_error}); "
            "check that the VM runs with -qmp "
            f"{self.address},server=on,wait=off (serialmux keeps reconnecting)",
            vm=self.vm,
        )

    async def nmi(self) -> None:
        """Inject a non-maskable interrupt (the guest kernel logs or panics on it)."""
        await self.execute("inject-nmi")

    async def reset(self) -> None:
        """Reset the VM, like pressing its reset button."""
        await self.execute("system_reset")

    async def sysrq(self, key: str) -> None:
        """Press Alt+SysRq+``key`` on the VM's keyboard (``key`` is one of 0-9, a-z)."""
        if len(key) != 1 or key not in SYSRQ_KEYS:
            raise HypervisorError(
                f"{key!r} is not a SysRq key; use one of 0-9 or a-z (h prints the list)",
                vm=self.vm,
            )
        keys = [{"type": "qcode", "data": qcode} for qcode in ("alt", "sysrq", key)]
        await self.execute("send-key", {"keys": keys})

    async def status(self) -> str:
        """The VM's run state as QEMU names it: running, paused, shutdown, ..."""
        reply = await self.execute("query-status")
        status = reply.get("status") if isinstance(reply, dict) else None
        if not isinstance(status, str):
            raise self._malformed("query-status", reply, 'an object with a "status" string')
        return status

    async def send_break(self, chardev: str) -> None:
        """A serial BREAK on chardev *chardev* (``chardev-send-break``): the guest's UART
        sees a break condition, as from a real line; a key typed next is a Magic SysRq."""
        await self.execute("chardev-send-break", {"id": chardev})

    async def chardev_pty(self, label: str) -> str | None:
        """The ``/dev/pts/N`` behind chardev ``label`` (e.g. ``serial0``); None if not a PTY.

        Raises HypervisorError (as :meth:`execute` does) when the reply is not a list of
        objects each with a ``label`` and a ``filename`` string.
        """
        for chardev, filename in await self._chardevs():
            if chardev == label:
                if not filename.startswith("pty:"):
                    return None
                path = filename[4:]
                if not PTY_PATH.fullmatch(path):
                    log.warning("qmp_pty_path_refused", label=label, path=path[:200],
                                reason="not /dev/pts/N")
                    return None
                return path
        return None

    async def chardev_of_pty(self, path: str) -> str | None:
        """The label of the chardev whose PTY is *path* (``/dev/pts/N``), or None."""
        return await self._one_chardev(lambda filename: filename == f"pty:{path}")

    async def chardev_of_unix(self, path: str) -> str | None:
        """The label of the socket chardev on UNIX socket *path*, listening or dialing it.

        QEMU names a listening chardev ``unix:PATH,server=on`` and a disconnected one
        ``disconnected:unix:PATH...``, so those are matched by name; a connected client
        is named only ``unix:`` (its own end has no path), so its configured address is
        read instead (``qom-get`` of its ``addr``). QEMU's paths are compared as written,
        normalised but not looked up (no filesystem call on the loop for a path QEMU
        gives), against *path* as given and resolved. The whole lookup takes at most
        ``command_timeout``: a slow QEMU with many chardevs cannot hold an action longer.
        """
        wants = {os.path.normpath(path), os.path.realpath(path)}
        try:
            async with asyncio.timeout(self._command_timeout):
                return await self._unix_chardev(wants)
        except TimeoutError as err:
            raise HypervisorTimeout(
                f"QMP did not name the chardev on {path} within {self._command_timeout} s; "
                "QEMU may be hung or very busy", vm=self.vm) from err

    async def _unix_chardev(self, wants: set[str]) -> str | None:
        clients = []
        for label, filename in await self._chardevs():
            name = filename.removeprefix("disconnected:")
            if name == "unix:":
                clients.append(label)
            elif name.startswith("unix:") and _same_path(
                    name[5:].removesuffix(",server=on"), wants):
                return label
        for label in clients:
            try:
                addr = await self.execute(
                    "qom-get", {"path": f"/chardevs/{label}", "property": "addr"})
            except HypervisorError as exc:
                if exc.error_class is None:
                    raise  # QMP is unreachable, hung or broken, not just this chardev
                continue  # QEMU has no addr for it (an older QEMU): it cannot be matched
            if (isinstance(addr, dict) and addr.get("type") == "unix"
                    and isinstance(addr.get("path"), str) and not addr.get("abstract")
                    and _same_path(addr["path"], wants)):
                return label
        return None

    async def chardev_of_peer(self, host: str, port: int) -> str | None:
        """The label of the TCP chardev connected to our end *host*:*port*: QEMU names a
        connected one ``tcp:LOCAL,server=on <-> PEER``, PEER being our end (as an
        IPv4-mapped address when QEMU listens on ``::``)."""
        want = (normalise_address(host), port)

        def matches(filename: str) -> bool:
            _, sep, peer = filename.rpartition(" <-> ")
            peer_host, _, peer_port = peer.rpartition(":")
            return (filename.startswith("tcp:") and bool(sep) and peer_port.isdigit()
                    and (normalise_address(peer_host), int(peer_port)) == want)

        return await self._one_chardev(matches)

    async def _one_chardev(self, matches: Callable[[str], bool]) -> str | None:
        """The label of the only chardev whose filename *matches*; None for none or several."""
        labels = [label for label, filename in await self._chardevs() if matches(filename)]
        return labels[0] if len(labels) == 1 else None

    async def _chardevs(self) -> list[tuple[str, str]]:
        """``query-chardev`` as (label, filename) pairs, its shape checked."""
        reply = await self.execute("query-chardev")
        expected = 'a list of objects with "label" and "filename" strings'
        if not isinstance(reply, list):
            raise self._malformed("query-chardev", reply, expected)
        for chardev in reply:
            if not (isinstance(chardev, dict) and isinstance(chardev.get("label"), str)
                    and isinstance(chardev.get("filename"), str)):
                raise self._malformed("query-chardev", chardev, expected)
        return [(chardev["label"], chardev["filename"]) for chardev in reply]


def _same_path(path: str, wants: set[str]) -> bool:
    """Whether QEMU's *path* is one of *wants* (absolute, no NUL, normalised as written)."""
    return path.startswith("/") and "\0" not in path and os.path.normpath(path) in wants


def _quote(reply: object) -> str:
    """A reply's repr, cut to :data:`QUOTE_REPLY` characters (it can be 256 KiB)."""
    text = repr(reply)
    return text if len(text) <= QUOTE_REPLY else text[: QUOTE_REPLY - 3] + "..."


def _connect_failure(err: BaseException) -> str:
    cause = err.exc if isinstance(err, ConnectError) else err
    if isinstance(cause, GreetingError | NegotiationError):
        # Its text can quote the whole (peer-chosen, up to MAX_MESSAGE) message: keep a line.
        why = (str(cause.exc).splitlines() or [type(cause.exc).__name__])[0][:QUOTE_REPLY]
        if isinstance(cause, GreetingError):
            return f"the QMP greeting was not understood ({why}); is QEMU on that socket?"
        return f"qmp_capabilities was not accepted ({why}); is QEMU on that socket?"
    if isinstance(cause, FileNotFoundError):
        return "socket does not exist (QEMU not running?)"
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused (QEMU gone, stale socket?)"
    if isinstance(cause, EOFError):
        return "QEMU closed the connection during the greeting (another client holds it?)"
    if isinstance(cause, ValueError):
        return f"a QMP message longer than {MAX_MESSAGE} bytes during the greeting"
    return f"{type(cause).__name__}: {cause}"


def _lost(cause: BaseException | None) -> str:
    if cause is None:
        return "session closed"
    if isinstance(cause, EOFError | ConnectionError):
        return "QEMU closed the QMP connection"
    if isinstance(cause, ValueError):  # StreamReader.readline past its limit
        return f"QEMU sent a QMP message longer than {MAX_MESSAGE} bytes"
    if isinstance(cause, DeserializationError):
        if not cause.raw.endswith(b"\n"):
            return "QMP connection closed in the middle of a message"
        return f"QEMU sent malformed QMP: {cause.raw[:80]!r}"
    return f"{type(cause).__name__}: {cause}"


def _session_error(
    cause: BaseException | None, command: str, vm: str, address: str
) -> HypervisorError:
    message = f"QMP session at {address} broke during {command}: {_lost(cause)}; reconnecting"
    truncated = isinstance(cause, DeserializationError) and not cause.raw.endswith(b"\n")
    if cause is None or truncated or isinstance(cause, EOFError | OSError):
        return HypervisorUnavailable(message, vm=vm)
    return HypervisorError(message, vm=vm)
