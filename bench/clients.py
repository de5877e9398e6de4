"""Clients that attach to one console of a peer and move raw bytes both ways.

``tcp``      a plain socket (floor, socat, ser2net)
``ssh``      asyncssh, or the OpenSSH ``ssh`` binary with ``--ssh-client openssh``
``console``  conserver's own ``console`` client over pipes (TLS to the server)

All of them look the same to the runner: ``read()``, ``write()``, ``close()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from typing import Any

import asyncssh
from peers import Endpoint, Keys

READ = 1 << 18


class Client:
    async def read(self) -> bytes:
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def drain_quiet(self, quiet: float = 0.3, limit: float = 3.0) -> bytes:
        """Read until nothing arrives for ``quiet`` s (banners, replay); bounded by ``limit``."""
        got = bytearray()
        loop = asyncio.get_running_loop()
        end = loop.time() + limit
        while loop.time() < end:
            try:
                data = await asyncio.wait_for(self.read(), quiet)
            except TimeoutError:
                break
            if not data:
                raise ConnectionError(f"closed while settling: {bytes(got[-300:])!r}")
            got += data
        return bytes(got)


class TcpClient(Client):
    def __init__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.r, self.w = r, w

    async def read(self) -> bytes:
        return await self.r.read(READ)

    def write(self, data: bytes) -> None:
        self.w.write(data)

    async def close(self) -> None:
        self.w.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.w.wait_closed(), 3)


class AsyncsshClient(Client):
    def __init__(self, conn: Any, stdin: Any, stdout: Any) -> None:
        self.conn, self.stdin, self.stdout = conn, stdin, stdout

    async def read(self) -> bytes:
        data: bytes = await self.stdout.read(READ)
        return data

    def write(self, data: bytes) -> None:
        self.stdin.write(data)

    async def close(self) -> None:
        self.conn.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.conn.wait_closed(), 3)


class ProcClient(Client):
    """A client program (ssh, console) whose stdin/stdout are our pipes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        assert proc.stdout
        assert proc.stdin
        self.out, self.inp = proc.stdout, proc.stdin

    async def read(self) -> bytes:
        return await self.out.read(READ)

    def write(self, data: bytes) -> None:
        self.inp.write(data)

    async def close(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 3)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


class PtyClient(Client):
    """A client program on a terminal of its own (a PTY whose master we hold), as people run it."""

    def __init__(self, proc: asyncio.subprocess.Process, master: int) -> None:
        self.proc, self.master = proc, master
        self.q: asyncio.Queue[bytes] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(master, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.master, READ)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.loop.remove_reader(self.master)
        self.q.put_nowait(data)

    async def read(self) -> bytes:
        return await self.q.get()

    def write(self, data: bytes) -> None:
        os.set_blocking(self.master, True)  # keystrokes: tiny, never blocks for long
        os.write(self.master, data)
        os.set_blocking(self.master, False)

    async def close(self) -> None:
        self.loop.remove_reader(self.master)
        await ProcClient.close(self)  # type: ignore[arg-type]
        os.close(self.master)


async def connect(
    ep: Endpoint, keys: Keys, ssh_client: str = "asyncssh", timeout: float = 15
) -> Client:
    """Attach to the console behind ``ep``; bounded by ``timeout``."""
    return await asyncio.wait_for(_connect(ep, keys, ssh_client), timeout)


async def _connect(ep: Endpoint, keys: Keys, ssh_client: str) -> Client:
    if ep.kind == "tcp":
        r, w = await asyncio.open_connection("127.0.0.1", ep.port, limit=READ * 4)
        w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return TcpClient(r, w)
    if ep.kind == "ssh" and ssh_client == "asyncssh":
        conn = await asyncssh.connect(
            "127.0.0.1",
            ep.port,
            username=ep.user,
            client_keys=[str(keys.user_key)],
            known_hosts=None,
            encryption_algs=[ep.cipher],
            compression_algs=None,
        )
        stdin, stdout, _ = await conn.open_session(
            encoding=None,
            term_type="xterm" if ep.pty else None,
        )
        return AsyncsshClient(conn, stdin, stdout)
    if ep.kind == "ssh":
        cmd = [
            "ssh",
            "-tt" if ep.pty else "-T",
            "-p",
            str(ep.port),
            "-i",
            str(keys.user_key),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "IdentitiesOnly=yes",
            "-c",
            ep.cipher,
            f"{ep.user}@127.0.0.1",
        ]
    elif ep.kind == "console":
        master, slave = os.openpty()
        os.set_blocking(master, False)
        proc = await asyncio.create_subprocess_exec(
            "console",
            "-n",
            "-C",
            ep.config,
            "-M",
            "127.0.0.1",
            "-p",
            str(ep.port),
            "-l",
            "root",
            ep.user,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
        )
        os.close(slave)
        return PtyClient(proc, master)
    else:
        raise ValueError(ep.kind)
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        limit=READ * 4,
        start_new_session=True,
    )
    return ProcClient(proc)
