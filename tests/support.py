"""Test support: real PTY "VMs", the real daemon on port 0, real SSH clients.

Nothing here fakes serialmux: :class:`Gateway` writes a TOML config, loads
it with :func:`serialmux.config.load_config` and runs ``Daemon.serve()`` in
the test's event loop. :class:`PtyVM` holds the master side of a real PTY as
QEMU does. Every wait is bounded and waits on a condition, never a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import sys
import tty
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

from serialmux.config import load_config
from serialmux.daemon import Daemon

WAIT = 10.0  # seconds any single condition may take before a test fails


class PtyVM:
    """A VM's serial port: the master side of a real PTY; the daemon opens the slave."""

    def __init__(self) -> None:
        self.master, slave = os.openpty()
        tty.setraw(slave)
        self.slave_path = os.ttyname(slave)
        # Keep a slave fd open so writes to the master never fail while the
        # daemon reopens the port (QEMU behaves the same way).
        self._slave = slave
        os.set_blocking(self.master, False)
        self.received = bytearray()
        self._changed: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def port(self) -> str:
        return f"pty:{self.slave_path}"

    def start(self) -> None:
        """Start collecting what the daemon writes to the guest."""
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._loop.add_reader(self.master, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.master, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            self.received += data
            assert self._changed is not None
            self._changed.set()

    async def wait_received(self, pattern: bytes | re.Pattern[bytes], timeout: float = WAIT
                            ) -> bytes:
        """Wait until the guest has received *pattern*; return everything so far."""
        assert self._changed is not None
        return await wait_found(self.received, self._changed, pattern, timeout)

    def write(self, data: bytes) -> None:
        """The guest prints *data* (blocking until the PTY takes all of it)."""
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.master, view)
            except BlockingIOError:
                import select
                select.select([], [self.master], [], 1.0)
                continue
            view = view[n:]

    async def send(self, data: bytes, timeout: float = WAIT * 3) -> None:
        """The guest prints a lot: write without blocking the loop the daemon runs on."""
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        async with asyncio.timeout(timeout):
            while view:
                try:
                    view = view[os.write(self.master, view):]
                    continue
                except BlockingIOError:
                    pass
                writable = loop.create_future()
                loop.add_writer(self.master, writable.set_result, None)
                try:
                    await writable
                finally:
                    loop.remove_writer(self.master)

    def close(self) -> None:
        """The VM goes away: EOF/EIO on the daemon's side."""
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self.master)
        for fd in (self.master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)


def _found(pattern: bytes | re.Pattern[bytes], data: bytes | bytearray) -> bool:
    if isinstance(pattern, bytes):
        return pattern in data
    return pattern.search(data) is not None


async def wait_found(buf: bytearray, changed: asyncio.Event,
                     pattern: bytes | re.Pattern[bytes], timeout: float) -> bytes:
    """Wait until *buf* (grown by someone who sets *changed*) holds *pattern*."""
    async with asyncio.timeout(timeout):
        while not _found(pattern, buf):
            changed.clear()
            await changed.wait()
    return bytes(buf)


@dataclass
class User:
    """A person with a key pair."""

    name: str
    key: asyncssh.SSHKey
    key_path: Path

    @property
    def public(self) -> str:
        return self.key.export_public_key().decode().strip()


def make_user(name: str, directory: Path) -> User:
    """Create *name*'s ed25519 key pair under *directory* (0600)."""
    key = asyncssh.generate_private_key("ssh-ed25519", comment=f"{name}@test")
    path = directory / f"id_{name}"
    path.write_bytes(key.export_private_key())
    path.chmod(0o600)
    return User(name, key, path)


def gateway_toml(tmp: Path, vms: dict[str, str], users: list[User],
                 grants: list[tuple[list[str], list[str], str]] | None = None, *,
                 extra: str = "", vm_extra: dict[str, str] | None = None) -> str:
    """A config for the daemon on 127.0.0.1 port 0 with state under *tmp*."""
    if grants is None:
        grants = [([u.name for u in users], ["*"], "owner")]
    lines = [
        "[server]",
        'listen = ["127.0.0.1:0"]',
        f'host_keys = ["{tmp}/host_key"]',
        f'state_dir = "{tmp}/state"',
        f'runtime_dir = "{tmp}/run"',
        "stall_timeout = 5",
        extra,
    ]
    for name, port in vms.items():
        lines += [f'[vms."{name}"]', f'port = "{port}"', (vm_extra or {}).get(name, "")]
    for user in users:
        lines += [f"[users.{user.name}]", f'keys = ["{user.public}"]']
    for names, globs, role in grants:
        lines += ["[[grants]]", f"users = {names!r}".replace("'", '"'),
                  f"vms = {globs!r}".replace("'", '"'), f'role = "{role}"']
    return "\n".join(lines) + "\n"


@dataclass
class Gateway:
    """The real daemon, configured by a TOML file written for the test, on port 0."""

    tmp: Path
    vms: dict[str, str]
    users: dict[str, User]
    grants: list[tuple[list[str], list[str], str]]  # (users, vm globs, role)
    extra: str = ""
    vm_extra: dict[str, str] = field(default_factory=dict)
    freeze_heap: bool = False  # as `serialmux serve` runs it (serialmux.heap)
    daemon: Daemon | None = None
    _task: asyncio.Task[None] | None = None
    audit_events: list[dict[str, Any]] = field(default_factory=list)
    conns: list[asyncssh.SSHClientConnection] = field(default_factory=list)

    def toml(self) -> str:
        return gateway_toml(self.tmp, self.vms, list(self.users.values()), self.grants,
                            extra=self.extra, vm_extra=self.vm_extra)

    @property
    def config_path(self) -> Path:
        return self.tmp / "serialmux.toml"

    async def start(self) -> Gateway:
        self.config_path.write_text(self.toml())
        self.daemon = Daemon(load_config(self.config_path), freeze_heap=self.freeze_heap)
        self._audit_changed = asyncio.Event()

        def listen(record: dict[str, Any]) -> None:
            self.audit_events.append(record)
            self._audit_changed.set()

        self.daemon.audit.listeners.append(listen)
        self._task = asyncio.create_task(self.daemon.serve())
        ready = asyncio.create_task(self.daemon.wait_ready(WAIT))
        done, _ = await asyncio.wait({self._task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if self._task in done:
            ready.cancel()
            self._task.result()  # raise the start-up error
        await ready
        return self

    async def stop(self) -> None:
        for conn in self.conns:
            conn.close()
        for conn in self.conns:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(WAIT):
                    await conn.wait_closed()
        if self.daemon is not None and self._task is not None:
            self.daemon.stop()
            async with asyncio.timeout(WAIT * 2):
                await self._task

    @property
    def port(self) -> int:
        assert self.daemon is not None
        return self.daemon.ssh_port

    async def connect(self, user: User, login: str, **kw: Any) -> asyncssh.SSHClientConnection:
        """An asyncssh client connection as *user* with login name *login*."""
        conn = await asyncssh.connect(
            "127.0.0.1", self.port, username=login, client_keys=[user.key],
            known_hosts=None, agent_path=None, **kw)
        self.conns.append(conn)
        return conn

    async def attach(self, user: User, login: str, *, term: bool = True,
                     subsystem: str | None = None) -> Client:
        """Connect and open a console session (interactive PTY, or a subsystem)."""
        conn = await self.connect(user, login)
        process = await conn.create_process(
            term_type="xterm" if term and subsystem is None else None,
            subsystem=subsystem, encoding=None)
        return Client(conn, process)

    async def wait_audit(self, event: str, **match: Any) -> dict[str, Any]:
        """Wait for an audit event with the given fields."""
        async with asyncio.timeout(WAIT):
            while True:
                for rec in self.audit_events:
                    if rec["event"] == event and all(rec.get(k) == v for k, v in match.items()):
                        return rec
                self._audit_changed.clear()
                await self._audit_changed.wait()

    def console(self, name: str) -> Any:
        assert self.daemon is not None
        return self.daemon.consoles[name]


class RawSession(asyncssh.SSHClientSession[bytes]):
    """A raw asyncssh client session that records stdout and stderr (for window tricks)."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self.changed = asyncio.Event()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        (self.err if datatype == asyncssh.EXTENDED_DATA_STDERR else self.out).extend(data)
        self.changed.set()

    async def wait_out_end(self, tail: bytes, timeout: float = WAIT * 3) -> None:
        """Wait until stdout ends with *tail*."""
        async with asyncio.timeout(timeout):
            while not self.out.endswith(tail):
                self.changed.clear()
                await self.changed.wait()


class Client:
    """An SSH session to a console, collecting what it receives."""

    def __init__(self, conn: asyncssh.SSHClientConnection,
                 process: asyncssh.SSHClientProcess[bytes]) -> None:
        self.conn = conn
        self.process = process
        self.out = bytearray()
        self.err = bytearray()
        self._changed = asyncio.Event()
        self._tasks = [asyncio.create_task(self._collect(process.stdout, self.out)),
                       asyncio.create_task(self._collect(process.stderr, self.err))]

    async def _collect(self, stream: asyncssh.SSHReader[bytes], into: bytearray) -> None:
        with contextlib.suppress(asyncssh.Error, OSError):
            while True:
                data = await stream.read(65536)
                if not data:
                    break
                into += data
                self._changed.set()
        self._changed.set()

    @property
    def closed(self) -> bool:
        return all(t.done() for t in self._tasks)

    async def wait_out(self, pattern: bytes | re.Pattern[bytes], timeout: float = WAIT,
                       *, stream: str = "out") -> bytes:
        buf = self.out if stream == "out" else self.err
        async with asyncio.timeout(timeout):
            while not _found(pattern, buf):
                if self.closed:
                    raise AssertionError(f"session closed without {pattern!r}; got {bytes(buf)!r}")
                self._changed.clear()
                await self._changed.wait()
        return bytes(buf)

    async def wait_closed(self, timeout: float = WAIT) -> int | None:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*self._tasks)
            await self.process.wait_closed()
        return self.process.exit_status

    def send(self, data: bytes) -> None:
        self.process.stdin.write(data)

    async def close(self) -> None:
        self.conn.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(WAIT):
                await self.conn.wait_closed()
        for t in self._tasks:
            t.cancel()


@contextlib.asynccontextmanager
async def gateway(tmp: Path, **kw: Any) -> AsyncIterator[Gateway]:
    """Run a :class:`Gateway` for the body of an ``async with``."""
    gw = Gateway(tmp, **kw)
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop()


def ssh_binary() -> str | None:
    """The OpenSSH client, if installed."""
    return shutil.which("ssh")


def openssh_args(gw: Gateway, user: User, login: str, *extra: str) -> list[str]:
    """Arguments for the OpenSSH client to reach *gw* as *user*."""
    return ["ssh", "-p", str(gw.port), "-i", str(user.key_path), "-F", "/dev/null",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR",
            "-o", "IdentityAgent=none", *extra, f"{login}@127.0.0.1"]



class SocketVM:
    """A VM whose serial port is a UNIX socket server (QEMU ``-chardev socket,server=on``)."""

    def __init__(self, path: Path, *, telnet: bool = False) -> None:
        self.path = path
        self.telnet = telnet
        self.received = bytearray()
        self._changed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.connected = asyncio.Event()

    @property
    def port(self) -> str:
        return f"unix{'+telnet' if self.telnet else ''}:{self.path}"

    async def start(self) -> None:
        """Listen (again) at the path."""
        self.connected.clear()
        self._server = await asyncio.start_unix_server(self._client, str(self.path))

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self.connected.set()
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                self.received += data
                self._changed.set()
        self._changed.set()

    async def wait_connected(self, timeout: float = WAIT) -> None:
        async with asyncio.timeout(timeout):
            await self.connected.wait()

    async def wait_received(self, pattern: bytes | re.Pattern[bytes], timeout: float = WAIT
                            ) -> bytes:
        """Wait until the guest has received *pattern*; return everything so far."""
        return await wait_found(self.received, self._changed, pattern, timeout)

    def write(self, data: bytes) -> None:
        assert self._writer is not None
        self._writer.write(data)

    async def stop(self) -> None:
        """The VM goes away: drop the client and remove the socket (path gone)."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def close_child(child: Any) -> None:
    """Close a pexpect child, including the pipe transport its async expect opened."""
    pair = getattr(child, "async_pw_transport", None)
    if pair:
        pair[1].close()
    child.close(force=True)


async def wait_out_after(client: Client, offset: int, pattern: bytes | re.Pattern[bytes],
                         timeout: float = WAIT) -> int:
    """Wait until *client*'s stdout holds *pattern* at or after *offset*; return the match end.

    For text a session sees more than once (a guest's boot line after a reset), where
    :meth:`Client.wait_out` would find the first one.
    """
    regex = re.compile(re.escape(pattern)) if isinstance(pattern, bytes) else pattern
    async with asyncio.timeout(timeout):
        while (match := regex.search(client.out, offset)) is None:
            if client.closed:
                raise AssertionError(f"session closed without {regex.pattern!r} after {offset}; "
                                     f"got {bytes(client.out[offset:])[-400:]!r}")
            client._changed.clear()
            await client._changed.wait()
    return match.end()


SERIALMUX_BIN = str(Path(sys.executable).with_name("serialmux"))


@dataclass
class CliResult:
    """What one run of the real ``serialmux`` command printed and returned."""

    status: int
    out: str
    err: str


async def run_cli(*args: str, prefix: tuple[str, ...] = (), timeout: float = WAIT * 3
                  ) -> CliResult:
    """Run ``serialmux ARGS`` as a subprocess (the loop keeps serving the daemon meanwhile)."""
    proc = await asyncio.create_subprocess_exec(
        *prefix, SERIALMUX_BIN, *args, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return CliResult(proc.returncode, out.decode(), err.decode())


def open_files(path: Path) -> int:
    """How many of this process's open files are *path* (the daemon's ring writer is one)."""
    links = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own fd, closed by now
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
    return links.count(os.path.realpath(path))
