"""Tests for serialmux.demo_guest: the simulated VM, driven through its slave PTY."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

from serialmux.demo_guest import SimulatedGuest

TIMEOUT = 10.0


class Terminal:
    """The user's side: the guest's slave PTY opened as the daemon would, read continuously."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        self.buf = bytearray()
        self.total = 0
        self.changed = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        self.buf += data
        self.total += len(data)
        self.changed.set()

    def send(self, data: bytes) -> None:
        """Type data at the guest."""
        os.write(self.fd, data)

    async def expect(self, pattern: bytes) -> bytes:
        """Wait until pattern arrives; return and consume everything up to and including it."""
        async with asyncio.timeout(TIMEOUT):
            while (i := self.buf.find(pattern)) < 0:
                self.changed.clear()
                await self.changed.wait()
        end = i + len(pattern)
        out = bytes(self.buf[:end])
        del self.buf[:end]
        return out

    def close(self) -> None:
        self.loop.remove_reader(self.fd)
        os.close(self.fd)


@contextlib.asynccontextmanager
async def guest_terminal(hostname: str = "demo") -> AsyncIterator[Terminal]:
    """A running guest (no boot pacing) and a terminal on its slave; cancelled on exit."""
    guest = SimulatedGuest(hostname=hostname, boot_delay=0)
    term = Terminal(guest.slave_path)
    try:
        async with asyncio.TaskGroup() as tg:
            runner = tg.create_task(guest.run())
            yield term
            runner.cancel()
    finally:
        term.close()
        guest.close()


async def login(term: Terminal, user: str = "alice", *, at_prompt: bool = False) -> None:
    """Log in with any password and wait for the shell prompt (at_prompt: already seen)."""
    if not at_prompt:
        await term.expect(b"demo login: ")
    term.send(user.encode() + b"\r")
    await term.expect(b"Password: ")
    term.send(b"hunter2\r")
    await term.expect(f"{user}@demo:~$ ".encode())


async def test_boot_then_login_prompt() -> None:
    """The guest prints timestamped kernel lines, then the login prompt, in CRLF."""
    async with guest_terminal(hostname="web-01") as term:
        boot = await term.expect(b"web-01 login: ")
        assert boot.startswith(b"[    0.000000] Linux version")
        assert b"Hostname set to <web-01>" in boot
        assert boot.count(b"\r\n[") >= 11
        assert b"\n" not in boot.replace(b"\r\n", b"")


async def test_login_then_echo() -> None:
    """Any name and password log in, the password is not echoed, and echo prints its words."""
    async with guest_terminal() as term:
        await term.expect(b"demo login: ")
        term.send(b"alice\r")
        await term.expect(b"Password: ")
        term.send(b"hunter2\r")
        after_password = await term.expect(b"alice@demo:~$ ")
        assert b"hunter2" not in after_password
        term.send(b"echo hello\r")
        assert await term.expect(b"alice@demo:~$ ") == b"echo hello\r\nhello\r\nalice@demo:~$ "


async def test_backspace_edits_line() -> None:
    """DEL and BS erase the last character, echoed as backspace-space-backspace."""
    async with guest_terminal() as term:
        await login(term)
        term.send(b"echo helpx\x7f\x08lo\r")
        out = await term.expect(b"alice@demo:~$ ")
        assert out == b"echo helpx\b \b\b \blo\r\nhello\r\nalice@demo:~$ "


async def test_crlf_enter_is_one_line() -> None:
    """CR LF typed together is one Enter, not an extra empty command."""
    async with guest_terminal() as term:
        await login(term)
        term.send(b"whoami\r\nhostname\n")
        assert await term.expect(b"alice@demo:~$ ") == b"whoami\r\nalice\r\nalice@demo:~$ "
        assert await term.expect(b"alice@demo:~$ ") == b"hostname\r\ndemo\r\nalice@demo:~$ "


async def test_unknown_command() -> None:
    """An unknown command prints the shell's not-found message."""
    async with guest_terminal() as term:
        await login(term)
        term.send(b"frobnicate --now\r")
        out = await term.expect(b"alice@demo:~$ ")
        assert b"\r\nsh: frobnicate: command not found\r\n" in out


async def test_ctrl_c_gives_new_prompt() -> None:
    """Ctrl-C abandons the line, prints ^C and a fresh prompt."""
    async with guest_terminal() as term:
        await login(term)
        term.send(b"echo never\x03")
        assert await term.expect(b"alice@demo:~$ ") == b"echo never^C\r\nalice@demo:~$ "


async def test_exit_returns_to_login() -> None:
    """exit logs out back to the login prompt, and Ctrl-D on an empty line does too."""
    async with guest_terminal() as term:
        await login(term)
        term.send(b"exit\r")
        assert b"logout" in await term.expect(b"demo login: ")
        await login(term, user="bob", at_prompt=True)
        term.send(b"\x04")
        assert b"logout" in await term.expect(b"demo login: ")


async def test_spam_is_bounded_and_complete_with_reader() -> None:
    """spam N prints N numbered lines when someone reads, then the prompt."""
    async with guest_terminal() as term:
        await login(term)
        term.send(b"spam 3000\r")
        out = await term.expect(b"alice@demo:~$ ")
        lines = [line for line in out.split(b"\r\n") if line[:6].isdigit()]
        assert len(lines) == 3000
        assert lines[-1].startswith(b"003000 ")


async def test_uname_and_seq() -> None:
    """uname -a names the host and seq counts inclusively."""
    async with guest_terminal() as term:
        await login(term)
        term.send(b"uname -a\r")
        assert b"Linux demo 6.1.0-serialmux" in await term.expect(b"alice@demo:~$ ")
        term.send(b"seq 3\r")
        assert await term.expect(b"alice@demo:~$ ") == b"seq 3\r\n1\r\n2\r\n3\r\nalice@demo:~$ "
