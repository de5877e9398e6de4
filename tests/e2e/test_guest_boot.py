"""Smoke tests of the e2e test guest itself: it boots, its serial port speaks, its login works."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.e2e.guest import (
    LOGIN_PROMPT,
    PROMPT,
    READY_LINE,
    Guest,
    GuestImage,
    SerialConsole,
    ensure_guest,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(180),
]


@pytest.fixture(scope="module")
def image() -> GuestImage:
    """The guest image, built once (and cached across runs)."""
    return ensure_guest()


async def test_shell_on_pty_runs_commands(image: GuestImage, tmp_path: Path) -> None:
    """The guest boots to the ready line and a shell prompt on a PTY, and runs `echo hi`."""
    async with Guest(image, tmp_path, serial="pty") as guest:
        assert guest.pty_path is not None
        assert guest.pty_path.startswith("/dev/pts/")
        console = await guest.open_console()
        try:
            await guest.cont()
            await console.expect(READY_LINE, 60)
            await console.expect(PROMPT, 30)
            booted = time.monotonic() - guest.started_at
            print(f"pty guest at the prompt {booted:.2f} s after cont")
            assert await console.run("echo hi") == b"hi"
        finally:
            console.close()


async def test_login_prompt_on_socket_accepts_test_user(image: GuestImage, tmp_path: Path) -> None:
    """The login variant, served on a UNIX socket, lets test/test log in to a user shell."""
    async with Guest(image, tmp_path, serial="socket", login=True) as guest:
        console = await guest.open_console()
        try:
            await guest.cont()
            await console.expect(READY_LINE, 60)
            await console.expect(LOGIN_PROMPT, 30)
            console.write(b"test\r")
            await console.expect(re.compile(rb"[Pp]assword: ?"), 15)
            console.write(b"test\r")
            await console.expect(re.compile(rb"\$ (?:\x1b\[6n)?"), 15)
            assert await console.run("id -un") == b"test"
        finally:
            console.close()


async def test_client_mode_dials_our_listener(image: GuestImage, tmp_path: Path) -> None:
    """In client mode QEMU connects to a socket we listen on, and the shell works through it."""
    console = await SerialConsole.listen_unix(tmp_path / "listen.sock")
    try:
        guest = Guest(image, tmp_path, serial="client", serial_path=tmp_path / "listen.sock")
        async with guest:
            await console.wait_connected(10)
            await guest.cont()
            await console.expect(READY_LINE, 60)
            await console.expect(PROMPT, 30)
            assert await console.run("echo hi") == b"hi"
    finally:
        console.close()
