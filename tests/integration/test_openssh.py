"""The stock OpenSSH client against the gateway: interactive console, escapes, ~B, takeover."""

from __future__ import annotations

import asyncio
import shutil

import pexpect
import pytest

from tests.support import Gateway, PtyVM, User, close_child, openssh_args

pytestmark = pytest.mark.skipif(shutil.which("ssh") is None, reason="OpenSSH client not installed")


def spawn(gw: Gateway, user: User, login: str, *extra: str) -> pexpect.spawn:
    args = openssh_args(gw, user, login, "-tt", *extra)
    return pexpect.spawn(args[0], args[1:], timeout=10)


async def expect(child: pexpect.spawn, pattern: str | bytes | type) -> int:
    """pexpect's async expect, bounded by the child's timeout."""
    return int(await child.expect(pattern, async_=True))


async def test_openssh_interactive_console_both_ways(gw: Gateway, users: dict[str, User],
                                                     vm: PtyVM) -> None:
    """ssh -tt VM@host: the guest's output shows, keystrokes reach the guest raw."""
    child = spawn(gw, users["alice"], "web-01")
    try:
        await expect(child, "connected to web-01 \\(writer\\)")
        vm.write(b"login: ")
        await expect(child, "login: ")
        child.send("root\r")
        await vm.wait_received(b"root\r")
        child.send("\x03")  # Ctrl-C goes to the guest, not to ssh or serialmux
        await vm.wait_received(b"\x03")
        child.send("\x1d.")
        await expect(child, "disconnected")
        await expect(child, pexpect.EOF)
    finally:
        close_child(child)
    assert child.exitstatus == 0


async def test_openssh_tilde_b_sends_break(gw: Gateway, users: dict[str, User]) -> None:
    """OpenSSH's ~B escape arrives as an SSH break request and is sent as a serial BREAK."""
    child = spawn(gw, users["bob"], "web-01", "-o", "EscapeChar=~")
    try:
        await expect(child, "connected to web-01")
        child.send("\r~B")
        await expect(child, "BREAK sent to web-01")
        await gw.wait_audit("command", action="break", user="bob", result="ok")
    finally:
        close_child(child)


async def test_openssh_user_sees_takeover_notice(gw: Gateway, users: dict[str, User]) -> None:
    """A displaced OpenSSH user reads who took over and the connection ends."""
    child = spawn(gw, users["alice"], "web-01")
    try:
        await expect(child, "connected to web-01")
        second = await gw.attach(users["bob"], "web-01")
        await expect(child, "console taken over by bob from 127.0.0.1 at ")
        await expect(child, pexpect.EOF)
        await second.close()
    finally:
        close_child(child)
    assert child.exitstatus == 1


async def test_openssh_subsystem_console(gw: Gateway, users: dict[str, User], vm: PtyVM) -> None:
    """ssh -s VM@host console carries raw bytes for programs."""
    args = [*openssh_args(gw, users["alice"], "web-01+replay=0", "-T", "-s"), "console"]
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    assert proc.stdin is not None
    assert proc.stdout is not None
    await gw.wait_audit("attach", user="alice")
    proc.stdin.write(b"\x00\x1d\xff raw\n")
    await proc.stdin.drain()
    await vm.wait_received(b"\x00\x1d\xff raw\n")
    vm.write(b"\x1b[0m\xffout\n")
    async with asyncio.timeout(10):
        assert await proc.stdout.readexactly(8) == b"\x1b[0m\xffout"
    proc.stdin.close()
    async with asyncio.timeout(10):
        await proc.wait()
