"""A bare asyncssh server piping one PTY: the "just use asyncssh" peer of the benchmark.

usage: bare_asyncssh.py --port P --host-key FILE --authorized-keys FILE --tty /dev/pts/N
                        [--cipher aes128-gcm@openssh.com] [--loop uvloop|asyncio]

Any login name is accepted with a key from the authorized-keys file. Each session
opens the tty raw and pipes bytes both ways; no ring, no escape parsing, no grants:
the cost of asyncssh itself, to set serialmux's figures against.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import termios
import tty
from typing import Any

import asyncssh


class PipeSession(asyncssh.SSHServerSession):  # type: ignore[type-arg]
    """One SSH session bound to the tty; reading pauses while the channel is full."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1
        self.chan: Any = None
        self.loop = asyncio.get_running_loop()
        self.out = bytearray()

    def connection_made(self, chan: Any) -> None:
        self.chan = chan
        self.fd = os.open(self.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self.fd, termios.TCSANOW)
        self.loop.add_reader(self.fd, self._readable)

    def shell_requested(self) -> bool:
        return True

    def exec_requested(self, command: str) -> bool:
        return True

    def pty_requested(self, *args: Any) -> bool:
        return True

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.chan.write(data)
        else:
            self.loop.remove_reader(self.fd)

    def pause_writing(self) -> None:
        self.loop.remove_reader(self.fd)

    def resume_writing(self) -> None:
        self.loop.add_reader(self.fd, self._readable)

    def data_received(self, data: bytes, datatype: Any) -> None:
        self.out += data
        self._flush()

    def _flush(self) -> None:
        try:
            n = os.write(self.fd, self.out)
        except BlockingIOError:
            n = 0
        del self.out[:n]
        if self.out:
            self.loop.call_later(0.001, self._flush)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.fd >= 0:
            self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1


class Server(asyncssh.SSHServer):
    def __init__(self, path: str) -> None:
        self.path = path

    def begin_auth(self, username: str) -> bool:
        return True

    def session_requested(self) -> PipeSession:
        return PipeSession(self.path)


async def serve(args: argparse.Namespace) -> None:
    server = await asyncssh.create_server(
        lambda: Server(args.tty),
        "127.0.0.1",
        args.port,
        server_host_keys=[args.host_key],
        authorized_client_keys=args.authorized_keys,
        encryption_algs=[args.cipher],
        encoding=None,
        line_editor=False,
        allow_scp=False,
    )
    async with server:
        await server.wait_closed()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host-key", required=True)
    p.add_argument("--authorized-keys", required=True)
    p.add_argument("--tty", required=True)
    p.add_argument("--cipher", default="aes128-gcm@openssh.com")
    p.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = p.parse_args()
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(serve(args))
    else:
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
