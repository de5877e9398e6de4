"""A VM's serial port: opened at start, read continuously, reopened with capped backoff.

:class:`VMPort` owns the connection to one VM's COM1, whatever carries it:

* ``pty:`` / ``tty:`` through pyserial-asyncio-fast, raw 8N1 at the configured baud;
* ``unix:`` / ``tcp:`` as an asyncio client connection (QEMU ``-chardev socket,server=on``);
* ``listen:unix:`` as a server QEMU connects to (``server=off,reconnect=1``): the
  daemon owns the listener, so no output is lost to a race with other clients; a
  listener that cannot be bound (its directory not there yet) is retried like an open;
* ``+telnet`` framing for QEMU chardevs with ``telnet=on`` (0xFF escaped both
  ways, ``IAC BRK`` for a serial BREAK, which QEMU turns into a real one);
* ``qmp:LABEL``: the PTY path is asked of QEMU each time the port is opened.

Bytes flow one way out of here: every chunk read is handed to the
:class:`PortSink` (the console) in the event loop thread, as large as the OS
gave it. When the VM goes away (EOF, EIO, refused, path gone) the sink hears
``port_down`` once, and the port is retried with capped exponential backoff;
``port_up`` follows when it is back. A port that is stopped (reload, discovery,
shutdown) or lost is aborted, never closed gracefully: what the guest has not
read yet is dropped, since a hung guest would otherwise hold the fd for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import termios
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import serial
import serial_asyncio_fast

from .config import PortKind, PortSpec, VMConfig
from .errors import describe
from .floodread import FULL_READ, FloodReader
from .log import get_logger

log = get_logger(__name__)

READ_SIZE = 64 * 1024  # as much as the port has (pyserial-asyncio-fast would read 1 KiB)
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0
STABLE_AFTER = 2.0  # an open that lasted this long resets the backoff
LOST_TIMEOUT = 2.0  # the longest a stopped port waits for its transport to close its fd
BREAK_SECONDS = 0.25

IAC, BRK = 0xFF, 0xF3
WILL, WONT, DO, DONT = 0xFB, 0xFC, 0xFD, 0xFE


class PortSink(Protocol):
    """Who hears what the port reads (the console). Called in the event loop thread."""

    def port_data(self, data: bytes) -> None:
        """Bytes the guest printed, in order; never empty."""

    def port_up(self, description: str) -> None:
        """The port was opened (again)."""

    def port_down(self, reason: str) -> None:
        """The port was lost; it will be retried."""

    def port_failed(self, reason: str) -> None:
        """An open attempt failed for a reason different from the last one."""

    def port_waiting(self, reason: str) -> None:
        """The port is ready but its VM is not there yet (a listener waiting for QEMU)."""


class TelnetDecoder:
    """Strip the telnet negotiation QEMU sends as a client connects; pass the rest as is.

    QEMU's ``telnet=on`` chardev parses telnet commands in what it receives
    (``IAC IAC`` is one 0xFF, ``IAC BRK`` a serial BREAK) but sends the guest's
    output unescaped (``tcp_chr_write``): after its opening ``IAC WILL``/``DO``
    triples, every byte is the guest's, 0xFF included. Reading later 0xFF bytes as
    telnet commands lost guest output (``\\377\\376x`` vanished, ``\\377\\377``
    became one byte). One decoder per connection: QEMU negotiates on each.
    """

    def __init__(self) -> None:
        self._state = 0  # 0 before a command, 1 after IAC, 2 after WILL/WONT/DO/DONT; -1 data

    def feed(self, data: bytes) -> bytes:
        """Return the guest's bytes in *data*, the opening negotiation removed."""
        if self._state < 0:
            return data
        for i, byte in enumerate(data):
            if self._state == 0:
                if byte != IAC:
                    self._state = -1
                    return data[i:]
                self._state = 1
            elif self._state == 1:
                if byte not in (WILL, WONT, DO, DONT):  # not negotiation: the guest's 0xFF
                    self._state = -1
                    return bytes([IAC]) + data[i:]
                self._state = 2
            else:
                self._state = 0
        return b""


def telnet_encode(data: bytes) -> bytes:
    """Escape 0xFF as ``IAC IAC`` for a telnet-framed port."""
    return data.replace(b"\xff", b"\xff\xff") if IAC in data else data


class _DirectSerial(serial.Serial):  # type: ignore[misc]  # pyserial is untyped
    """pyserial's POSIX port (it sets up the line: raw 8N1 at the baud), written with one
    ``os.write`` per call; :class:`_SerialTransport` reads its fd itself.

    pyserial's ``read()`` select()s around every read: three syscalls a chunk,
    and ``select`` cannot take fds >= 1024, so past ~1000 consoles the ports
    stop being read at all. Its ``open()`` also makes two pipe pairs for
    ``cancel_read``/``cancel_write``, which serialmux never uses: four fds per
    console; they are closed.

    Its ``write()`` retries ``EAGAIN`` in a loop when the write timeout is 0, as
    pyserial-asyncio sets it: once a guest stopped reading and its PTY was
    exactly full, the next keystroke spun the event loop for ever, and every
    console on the host with it. One ``os.write`` instead; ``EAGAIN`` reaches
    the transport as BlockingIOError, and it keeps the bytes until the port is
    writable.
    """

    fd: Any  # pyserial's (untyped): the port's fd while open, else None

    _ABORT_PIPES = ("pipe_abort_read_r", "pipe_abort_read_w", "pipe_abort_write_r",
                    "pipe_abort_write_w")

    def open(self) -> None:
        super().open()
        for name in self._ABORT_PIPES:
            fd = getattr(self, name, None)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self.fd is None:
            raise serial.PortNotOpenError()
        try:
            return os.write(self.fd, data)
        except (BlockingIOError, InterruptedError):
            raise  # the transport keeps the bytes and waits for the port
        except OSError as exc:
            raise serial.SerialException(f"write failed: {describe(exc)}") from exc

    def close(self) -> None:
        # pyserial's close() os.close()s the abort pipes open() closed: a TypeError
        # after the fd is gone, and is_open left True.
        fd, self.fd = self.fd, None
        self.is_open = False
        if fd is not None:
            os.close(fd)


class _SerialTransport(serial_asyncio_fast.SerialTransport):
    """pyserial-asyncio-fast's transport, read with one ``os.read`` per readiness, and
    closed at once rather than after the guest reads.

    Reading is the hot path at scale (5000 consoles, 20 000 chunks a second):
    the event loop already knows the fd is readable, so :meth:`_read_ready`
    reads once, as much as the port has, and hands a chunk straight to the
    console; only a read that filled the line discipline (a flood) and errors
    go through the protocol.

    Its ``close()`` (and its own close on a read error) keeps the port open until
    the write buffer is empty, then runs ``tcdrain`` in an executor thread: a hung
    guest that never reads kept the fd, the write watcher and the buffered typing
    for ever, and a thread too. Here every close is an abort: what the guest has
    not taken is dropped, the port is closed and ``connection_lost`` called, once
    (the library's abort after its close would close the fd a second time).
    """

    _lost_scheduled = False

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: _PortProtocol,
                 port: _DirectSerial) -> None:
        super().__init__(loop, protocol, port)
        self._fd: int = port.fd
        self._chunk = protocol.deliver

    def _read_ready(self) -> None:
        try:
            data = os.read(self._fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._close(serial.SerialException(f"read failed: {describe(exc)}"))
            return
        if len(data) < FULL_READ:
            if data:
                self._chunk(data)
            else:
                self._close(serial.SerialException(
                    "end of file: the other side closed the port"))
            return
        # A full line-discipline buffer (a flood): the kernel has more queued.
        # Take it now, so the ring and the SSH client get one large chunk, not
        # one 4 KiB record and one SSH packet per read; the protocol may hand
        # the port to a flood thread.
        chunks = [data]
        total = len(data)
        while total < READ_SIZE and len(data) >= FULL_READ:
            try:
                data = os.read(self._fd, READ_SIZE - total)
            except OSError:
                break  # EAGAIN, or an error the next readiness reports
            if not data:
                break  # EOF: reported by the next read
            chunks.append(data)
            total += len(data)
        self._protocol.data_received(b"".join(chunks))

    def _close(self, exc: Exception | None = None) -> None:
        self._abort(exc)

    def _abort(self, exc: BaseException | None) -> None:
        if self._lost_scheduled:
            return
        self._lost_scheduled = True
        super()._abort(exc)


def _pty_identity(path: str) -> tuple[int, int] | None:
    """Identify the PTY now at *path* (a plain /dev/pts/N, not a symlink), else None.

    devpts gives a new inode, with a new ctime, to every PTY it allocates, and
    reuses the numbers: (rdev, ctime) tells "the same PTY" from "another VM's
    PTY that got the same number".
    """
    if os.path.islink(path):
        return None  # a symlink is kept up to date by the VM's tooling: follow it
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_rdev, st.st_ctime_ns


class _PortProtocol(asyncio.Protocol):
    """asyncio protocol between a transport and the :class:`VMPort`."""

    def __init__(self, port: VMPort) -> None:
        self._port = port
        self._decoder = TelnetDecoder()  # used by telnet ports only
        # Where a chunk read from the port goes: straight to the console, unless
        # telnet framing has to come off first.
        self.deliver: Callable[[bytes], None] = (
            self._decode if port.spec.telnet else port.sink.port_data)
        self.closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._can_write = asyncio.Event()
        self._can_write.set()
        self.transport: asyncio.BaseTransport | None = None
        self._flood: FloodReader | None = None
        self._paused = False
        self._aborted = False
        self._lost = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if self._aborted:  # stopped before the transport told us about itself
            self.abort()

    def abort(self) -> None:
        """Drop the connection now (serialmux stops or replaces the port).

        Bytes the guest has not taken are discarded rather than waited for, the
        fd is closed and :meth:`connection_lost` follows (see :meth:`wait_lost`).
        Called again, or before ``connection_made``, it does no harm.
        """
        self._aborted = True
        if self.transport is None or self._lost.is_set():
            return
        # Every port transport has abort(); uvloop's are not asyncio.WriteTransports.
        transport: Any = self.transport
        transport.abort()

    async def wait_lost(self) -> None:
        """Return once :meth:`connection_lost` has run (the fd is closed), or after
        :data:`LOST_TIMEOUT` with a warning."""
        try:
            async with asyncio.timeout(LOST_TIMEOUT):
                await self._lost.wait()
        except TimeoutError:
            log.warning("port_close_slow", vm=self._port.vm.name, port=self._port.description,
                        waited=LOST_TIMEOUT)

    def data_received(self, data: bytes) -> None:
        self.deliver(data)
        if len(data) < FULL_READ or self._flood is not None or self._paused \
                or not FloodReader.available():
            return
        transport = self.transport
        if isinstance(transport, serial_asyncio_fast.SerialTransport) \
                and transport.serial is not None and not self.closed.done():
            self._start_flood(transport, transport.serial.fileno())

    def _start_flood(self, transport: serial_asyncio_fast.SerialTransport, fd: int) -> None:
        """The guest prints faster than a loop turn drains the tty: read it in a thread
        until it goes quiet (see :mod:`serialmux.floodread`)."""
        try:
            flood = FloodReader(asyncio.get_running_loop(), fd, self.deliver,
                                self._flood_ended, name=self._port.vm.name)
            transport.pause_reading()
            try:
                flood.start()
            except BaseException:
                transport.resume_reading()
                raise
        except (OSError, RuntimeError) as exc:  # out of fds or threads: the loop reads on
            log.warning("flood_thread_failed", vm=self._port.vm.name, error=str(exc))
            return
        self._flood = flood

    def _decode(self, data: bytes) -> None:
        data = self._decoder.feed(data)
        if data:
            self._port.sink.port_data(data)

    def _flood_ended(self) -> None:
        self._flood = None
        transport = self.transport
        if isinstance(transport, serial_asyncio_fast.SerialTransport) and not self.closed.done() \
                and not self._paused:
            transport.resume_reading()

    def pause(self, paused: bool) -> None:
        """Stop or restart reading the port (flow control); bytes wait in the VM's port."""
        if paused == self._paused or self.closed.done():
            return
        self._paused = paused
        if self._flood is not None:
            self._flood.pause(paused)
        elif self.transport is not None:
            # Every port transport reads; uvloop's are not asyncio.ReadTransports.
            transport: Any = self.transport
            if paused:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def stop_flood(self) -> FloodReader | None:
        """Stop a flood thread reading this port, if any; return it (to wait for it)."""
        flood, self._flood = self._flood, None
        if flood is not None:
            flood.stop()
        return flood

    def eof_received(self) -> bool | None:
        self._finish("end of file")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost.set()
        self.stop_flood()
        self._finish(describe(exc) if exc else "closed")
        self._can_write.set()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    @property
    def writable(self) -> bool:
        """Whether the transport takes more now (its buffer is below the high-water mark)."""
        return self._can_write.is_set()

    async def wait_writable(self) -> None:
        await self._can_write.wait()

    def _finish(self, reason: str) -> None:
        if not self.closed.done():
            self.closed.set_result(reason)


class VMPort:
    """One VM's serial port, kept open for the life of the console."""

    def __init__(
        self,
        vm: VMConfig,
        sink: PortSink,
        *,
        resolve_pty: Callable[[], Awaitable[str | None]] | None = None,
    ) -> None:
        self.vm = vm
        self.spec: PortSpec = vm.port
        self.sink = sink
        self._resolve_pty = resolve_pty
        self._protocol: _PortProtocol | None = None
        self._retry_now = asyncio.Event()
        self.tried = asyncio.Event()  # set after the first open attempt, success or not
        self.description = str(self.spec)
        self.last_error: str | None = None
        self._pty_seen: tuple[int, int] | None = None  # the PTY a pty: path first named
        self._refusing_reused = False  # the path names another PTY now; reopen accepts it
        self._held: set[str] = set()  # why reading is paused (pause_reading)

    def set_pty_resolver(self, resolve: Callable[[], Awaitable[str | None]]) -> None:
        """Give a ``qmp:`` port the function that asks QEMU for its PTY path."""
        self._resolve_pty = resolve

    @property
    def up(self) -> bool:
        """Whether the port is open now."""
        return self._protocol is not None and not self._protocol.closed.done()

    def local_address(self) -> tuple[str, int] | None:
        """Our end of an open TCP port as (host, port); None when the port is not one."""
        protocol = self._protocol
        if protocol is None or protocol.transport is None or protocol.closed.done():
            return None
        sockname = protocol.transport.get_extra_info("sockname")
        if not (isinstance(sockname, tuple) and len(sockname) >= 2):
            return None  # a UNIX socket (a path), a PTY or a tty
        return str(sockname[0]), int(sockname[1])

    def pause_reading(self, paused: bool, why: str = "flow") -> None:
        """Stop (True) or restart (False) reading the port for *why*: the console's flow
        control (``flow``), a ring being resized (``resize``). It reads when nothing holds it.

        The VM's bytes wait in its PTY or socket meanwhile, as on a serial line
        with flow control. A port opened again starts reading, unless held for
        anything but flow control.
        """
        if paused:
            self._held.add(why)
        else:
            self._held.discard(why)
        if self._protocol is not None:
            self._protocol.pause(bool(self._held))

    @property
    def held(self) -> frozenset[str]:
        """Why reading is paused now (``flow``, ``resize``); empty when it reads."""
        return frozenset(self._held)

    def _opened(self, protocol: _PortProtocol) -> None:
        """*protocol* is the port's connection now: it reads unless held (see above)."""
        self._protocol = protocol
        self._held.discard("flow")
        if self._held:
            protocol.pause(True)

    def retry_now(self) -> None:
        """Skip the current backoff wait (e.g. the hypervisor says the VM started)."""
        self._retry_now.set()

    def carry_over(self, old: VMPort) -> None:
        """Replace *old* (a reload changed baud or qmp): a ``pty:`` path they share keeps the
        PTY *old* knew, so its number reused by another PTY is still refused."""
        if old.spec.kind is self.spec.kind is PortKind.PTY and old.spec.path == self.spec.path:
            self._pty_seen, self._refusing_reused = old._pty_seen, old._refusing_reused

    def accept_reused_pty(self) -> bool:
        """The host's operator confirmed it (``serialmux reopen``): the next open attaches
        the PTY at the path, although its number was reused since the port last had it
        (the VM restarted and got its old number back); the caller retries now. True when
        the port was refusing one."""
        if not self._refusing_reused:
            return False
        self._refusing_reused = False
        self._pty_seen = None
        log.info("port_reused_pty_accepted", vm=self.vm.name, port=self.description)
        return True

    async def run(self) -> None:
        """Open, read until lost, back off, repeat; until cancelled."""
        backoff = BACKOFF_FIRST
        loop = asyncio.get_running_loop()
        if self.spec.kind is PortKind.LISTEN_UNIX:
            await self._serve_listen()
            return
        while True:
            started = loop.time()
            try:
                protocol = await self._open()
            except (OSError, termios.error, serial.SerialException, _NotReady) as exc:
                # termios.error is not an OSError: pyserial's tcsetattr raises it
                # when the PTY closes while the port is being opened.
                self._open_failed(self._open_failure(exc))
            else:
                self.tried.set()
                if self.last_error is not None:  # it said it could not: say it can now
                    log.info("port_recovered", vm=self.vm.name, port=self.description,
                             was=self.last_error)
                self.last_error = None
                self._opened(protocol)
                self.sink.port_up(self.description)
                try:
                    reason = await protocol.closed
                finally:
                    self._protocol = None
                    await _stop(protocol)
                self.sink.port_down(reason)
                log.info("port_lost", vm=self.vm.name, port=self.description, reason=reason)
                if loop.time() - started >= STABLE_AFTER:
                    backoff = BACKOFF_FIRST
            backoff = await self._backoff(backoff)

    async def _backoff(self, delay: float) -> float:
        """Wait *delay* seconds before the next attempt (less if :meth:`retry_now`);
        return the delay after that one, doubled up to :data:`BACKOFF_MAX`."""
        self._retry_now.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._retry_now.wait(), delay)
        return min(delay * 2, BACKOFF_MAX)

    def _open_failure(self, exc: BaseException) -> str:
        """Why an open failed, naming what was opened: an OS error alone does not say."""
        reason = describe(exc) + self._denied_hint(exc)
        if "exclusively lock" in str(exc):
            reason += ("; another process holds it (a second serialmux? "
                       "'fuser -v' on the path says who)")
        if isinstance(exc, OSError) and not isinstance(exc, serial.SerialException):
            return f"{exc.filename or self.description}: {reason}"  # pyserial's names it
        return reason

    def _denied_hint(self, exc: BaseException) -> str:
        """What to do when a PTY or tty refused the daemon (EACCES), else ""."""
        if getattr(exc, "errno", None) != errno.EACCES or self.spec.kind not in (
                PortKind.PTY, PortKind.TTY, PortKind.QMP):
            return ""
        return ("; the daemon's user or group must be able to read and write it (a PTY "
                "QEMU opens is OWNER:tty 0620 or 0600, which no group can read): see "
                "docs/operations.md, \"Permissions\"")

    def _open_failed(self, reason: str) -> None:
        """An open attempt failed: log and tell the sink, unless it is the same as last time."""
        if reason != self.last_error:
            log.info("port_open_failed", vm=self.vm.name, port=self.description, reason=reason)
            self.last_error = reason
            self.sink.port_failed(reason)
        self.tried.set()

    async def _open(self) -> _PortProtocol:
        loop = asyncio.get_running_loop()
        spec = self.spec
        protocol = _PortProtocol(self)
        if spec.kind in (PortKind.PTY, PortKind.TTY, PortKind.QMP):
            path = spec.path
            if spec.kind is PortKind.QMP:
                if self._resolve_pty is None:
                    raise _NotReady("no QMP connection to ask for the chardev")
                resolved = await self._resolve_pty()
                if resolved is None:
                    raise _NotReady(f"QEMU has no PTY for chardev {spec.path!r} (not running?)")
                path = resolved
                self.description = f"qmp:{spec.path} ({path})"
            if not os.path.exists(path):
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
            identity = _pty_identity(path) if spec.kind is PortKind.PTY else None
            if self._pty_seen is not None and identity is not None \
                    and identity != self._pty_seen:
                self._refusing_reused = True
                raise _NotReady(
                    f"{path} is a different PTY now (its number was reused): not attaching, "
                    f"it may be another VM's; if it is {self.vm.name}'s again, "
                    f"`serialmux reopen {self.vm.name}` on the host attaches it")
            # Opening a PTY or tty with O_NONBLOCK does not block: no thread hop,
            # which keeps start-up fast with thousands of consoles. exclusive: an
            # flock on the tty, so a second serialmux (a copied config) cannot
            # share it and split the guest's output.
            port = _DirectSerial(path, baudrate=self.vm.baud, bytesize=8, parity="N",
                                 stopbits=1, xonxoff=False, rtscts=False, dsrdtr=False,
                                 exclusive=True)
            _SerialTransport(loop, protocol, port)
            if identity is not None:
                self._pty_seen = identity
        elif spec.kind is PortKind.UNIX:
            await loop.create_unix_connection(lambda: protocol, spec.path)
        elif spec.kind is PortKind.TCP:
            await loop.create_connection(lambda: protocol, spec.host, spec.port)
        else:  # pragma: no cover - LISTEN_UNIX is served by _serve_listen
            raise AssertionError(spec.kind)
        return protocol

    async def _serve_listen(self) -> None:
        """Own a listening socket; each QEMU connection replaces the previous one."""
        path = self.spec.path
        arrivals: asyncio.Queue[_PortProtocol] = asyncio.Queue()

        def factory() -> _PortProtocol:
            # The newest connection wins: QEMU reconnected, so older ones are stale.
            if self._protocol is not None:
                self._protocol.abort()
            while not arrivals.empty():
                arrivals.get_nowait().abort()
            protocol = _PortProtocol(self)
            arrivals.put_nowait(protocol)
            return protocol

        server = await self._listen(factory)
        try:
            while True:
                protocol = await arrivals.get()
                self._opened(protocol)
                self.sink.port_up(f"{self.description} (QEMU connected)")
                try:
                    reason = await protocol.closed
                finally:
                    # Stopped (reload, shutdown) or lost: QEMU's connection is closed
                    # either way, so it reconnects to whichever listener is there next.
                    self._protocol = None
                    await _stop(protocol)
                self.sink.port_down(f"{reason}; listening on {path} for QEMU to connect again")
        finally:
            server.close()  # closes the listener only, not the connections it accepted
            leftovers = []
            while not arrivals.empty():
                leftovers.append(arrivals.get_nowait())
            with contextlib.suppress(OSError):
                os.unlink(path)
            await asyncio.gather(*(_stop(leftover) for leftover in leftovers))

    async def _listen(self, factory: Callable[[], _PortProtocol]) -> asyncio.AbstractServer:
        """Bind the listening socket, retrying with capped backoff until it can be.

        A socket that cannot be made yet (its directory is created later by the
        VM's tooling, no permission, a path too long for a UNIX socket) is an
        open failure like any other: the console says why, and the daemon goes on.
        """
        loop = asyncio.get_running_loop()
        path = self.spec.path
        backoff = BACKOFF_FIRST
        while True:
            try:
                if os.path.lexists(path) and not os.path.isdir(path):
                    os.unlink(path)  # a previous listener's, or a stale file in our place
                server = await loop.create_unix_server(factory, path)
                # Group read-write (connecting needs write): the umask left it 0750.
                # Its group is the daemon's, or in a setgid directory the directory's,
                # which is how QEMU's user gets in and nobody else.
                os.chmod(path, 0o660)
            except OSError as exc:
                hint = " (does its directory exist?)" if exc.errno == errno.ENOENT else ""
                self._open_failed(f"cannot listen on {path}: {describe(exc)}{hint}")
            else:
                if self.last_error is not None:  # said it could not: say it can now
                    log.info("port_listening", vm=self.vm.name, port=self.description)
                self.sink.port_waiting(f"listening on {path}; QEMU has not connected yet")
                self.tried.set()
                self.last_error = None
                return server
            backoff = await self._backoff(backoff)

    def write_now(self, data: bytes) -> bool:
        """Send *data* to the guest if the port is up and takes it now; else False, nothing sent."""
        protocol = self._protocol
        if protocol is None or protocol.transport is None or protocol.closed.done() \
                or not protocol.writable:
            return False
        transport: Any = protocol.transport
        transport.write(telnet_encode(data) if self.spec.telnet else data)
        return True

    async def write(self, data: bytes) -> bool:
        """Send *data* to the guest; wait while the port's buffer is full. False if down."""
        return await self.write_raw(telnet_encode(data) if self.spec.telnet else data)

    async def write_raw(self, data: bytes) -> bool:
        """Send *data* as is (telnet commands included); False if the port is down."""
        protocol = self._protocol
        if protocol is None or protocol.transport is None or protocol.closed.done():
            return False
        transport: Any = protocol.transport
        transport.write(data)
        await protocol.wait_writable()
        return True

    async def send_break(self) -> str | None:
        """Send a serial BREAK; return None on success or a reason it was not possible."""
        serial_line = self.spec.kind in (PortKind.PTY, PortKind.TTY, PortKind.QMP)
        if not (self.spec.telnet or serial_line):  # whether the VM runs or not
            return ("a plain socket port cannot carry a BREAK; give the VM a qmp socket "
                    "(QEMU then puts the BREAK on its UART) or use a unix+telnet: port "
                    "(QEMU telnet=on)")
        protocol = self._protocol
        if protocol is None or protocol.transport is None:
            return "the console is down"
        transport: Any = protocol.transport
        if self.spec.telnet:
            transport.write(bytes((IAC, BRK)))
            return None
        # A PTY or tty. The thread gets its own dup of the fd, and closes it: the port
        # may close meanwhile and its number be reused by another VM's PTY, which must
        # not get the BREAK.
        try:
            fd = os.dup(transport.serial.fd)
        except (OSError, TypeError):  # closed (fd None) or closing
            return "the console is down"
        try:
            await asyncio.to_thread(_send_break, fd)
        except termios.error as exc:
            return f"tcsendbreak failed: {exc}"
        return None


def _send_break(fd: int) -> None:
    """tcsendbreak on *fd* (a dup of the port's, for a worker thread), then close it."""
    try:
        termios.tcsendbreak(fd, 0)
    finally:
        os.close(fd)


async def _stop(protocol: _PortProtocol) -> None:
    """Close a port's connection at once and wait (bounded) until its fds are closed."""
    protocol.abort()
    flood = protocol.stop_flood()
    if flood is not None:
        await flood.wait_stopped()
    await protocol.wait_lost()


class _NotReady(Exception):
    """The port cannot be opened yet (e.g. QEMU has no PTY for the chardev)."""
