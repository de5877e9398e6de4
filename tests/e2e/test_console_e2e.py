"""serialmux end to end: a real QEMU guest, the real daemon, real SSH clients (asyncssh, OpenSSH).

Each class boots one guest for its tests (booting costs seconds of both cores) and tears it down
before the next class boots another, so at most one QEMU runs at a time. Within a class the tests
run in file order; the ones that reboot or kill the guest come last.

* :class:`TestTelnetSocket`: COM1 on a QEMU socket chardev with ``telnet=on``
  (``port = "unix+telnet:..."``): shell, NMI, SysRq as ``IAC BRK`` + key, status, reset, and QEMU
  killed and started again under the same attached client.
* :class:`TestPtyFollowedByQmp`: COM1 on a PTY found through ``port = "qmp:serial0"``, the login
  variant of the guest driven by the OpenSSH client, SysRq via QMP ``send-key``, and a restart that
  gives the guest a new ``/dev/pts/N``.
* :class:`TestListenUnix`: ``port = "listen:unix:..."``; QEMU dials serialmux, so the boot output
  is captured from its first byte, and QEMU dials again after a restart.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pexpect
import pytest
import pytest_asyncio

from serialmux.ring import Record, RecordKind, RingReader
from tests.e2e.guest import LOGIN_PROMPT, PROMPT, READY_LINE, TEST_USER, Guest, ensure_guest
from tests.support import (
    Client,
    Gateway,
    User,
    close_child,
    make_user,
    openssh_args,
    wait_out_after,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(240),
    pytest.mark.asyncio(loop_scope="module"),
]

BOOT = 60.0  # seconds a boot (or a reboot) may take to reach the ready line under TCG
GUEST = 30.0  # seconds the guest may take to answer on its console
ANSWER = re.compile(rb"\r\n42\r\n")  # what `echo $((6*7))` prints
GRANTS = [(["alice"], ["*"], "owner"), (["carol"], ["*"], "reader")]


@dataclass
class Rig:
    """One guest served by one daemon, with the people who use it."""

    guest: Guest
    gw: Gateway
    users: dict[str, User]
    clients: list[Client] = field(default_factory=list)

    async def attach(self, user: str = "alice", login: str = "web-01+replay=0") -> Client:
        """An interactive asyncssh session on web-01, closed at teardown."""
        client = await self.gw.attach(self.users[user], login)
        self.clients.append(client)
        await client.wait_out(b"connected to web-01")
        return client

    async def exec(self, command: str, user: str = "alice") -> tuple[int | None, bytes, bytes]:
        """Run a gateway command over asyncssh; return (exit status, stdout, stderr)."""
        conn = await self.gw.connect(self.users[user], "web-01")
        try:
            result = await asyncio.wait_for(conn.run(command, encoding=None), GUEST)
        finally:
            conn.close()
            await conn.wait_closed()
        return result.exit_status, bytes(result.stdout or b""), bytes(result.stderr or b"")

    async def openssh_exec(self, command: str, user: str = "alice") -> tuple[int, bytes, bytes]:
        """Run a gateway command with the OpenSSH client; return (exit status, stdout, stderr)."""
        process = await asyncio.create_subprocess_exec(
            *openssh_args(self.gw, self.users[user], "web-01"),
            command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), GUEST)
        assert process.returncode is not None
        return process.returncode, out, err

    def ring_records(self) -> list[Record]:
        """Every record of web-01's ring, oldest first."""
        assert self.gw.daemon is not None
        reader = RingReader(self.gw.daemon.rings.path("web-01"))
        try:
            return [r for r in reader.records() if isinstance(r, Record)]
        finally:
            reader.close()

    def markers(self, kind: RecordKind) -> list[str]:
        """The texts of web-01's ring markers of *kind*."""
        return [r.text() for r in self.ring_records() if r.kind is kind]

    async def close(self) -> None:
        """Close the sessions and the daemon; QEMU is stopped whatever fails before."""
        try:
            for client in self.clients:
                await client.close()
            await self.gw.stop()
        finally:
            await self.guest.stop()


def make_users(folder: Path) -> dict[str, User]:
    folder.mkdir()
    return {name: make_user(name, folder) for name in ("alice", "carol")}


@pytest.fixture(scope="module")
def image_ready() -> None:
    """Build (or find cached) the guest image once per module."""
    ensure_guest()


async def run_command(client: Client, command: bytes, answer: re.Pattern[bytes]) -> None:
    """Type *command* at the guest's shell through *client* and wait for *answer* after it."""
    mark = len(client.out)
    client.send(command + b"\r")
    await wait_out_after(client, mark, answer, GUEST)


async def break_then_sysrq_help(rig: Rig) -> Client:
    """Type ^] b then h in a new session: the BREAK goes through QMP chardev-send-break on
    serial0, the kernel takes h as SysRq and prints its help; the action is audited."""
    client = await rig.attach()
    mark = len(client.out)
    client.send(b"\x1dbh")
    await wait_out_after(client, mark, b"BREAK sent to web-01 (QMP chardev-send-break serial0)",
                         GUEST)
    await wait_out_after(client, mark, b"sysrq: HELP", GUEST)
    await rig.gw.wait_audit("command", action="break", result="ok", user="alice")
    return client


# --------------------------------------------------------------------------- telnet socket


@pytest_asyncio.fixture(scope="class", loop_scope="module")
async def telnet_rig(
    tmp_path_factory: pytest.TempPathFactory, image_ready: None
) -> AsyncIterator[Rig]:
    """A shell guest on a telnet socket chardev, with QMP, served as web-01; at its prompt."""
    tmp = tmp_path_factory.mktemp("telnet")
    guest = Guest(ensure_guest(), tmp / "vm", serial="telnet")
    gw = Gateway(
        tmp,
        vms={"web-01": f"unix+telnet:{guest.serial_path}"},
        users=make_users(tmp / "keys"),
        grants=GRANTS,
        vm_extra={"web-01": f'qmp = "{guest.qmp_address}"'},
    )
    rig = Rig(guest, gw, gw.users)
    try:
        await guest.start()  # paused: nothing is printed before serialmux holds the port
        await gw.start()
        client = await rig.attach()
        if b"console is up" not in client.out and not gw.console("web-01").up:
            await client.wait_out(b"web-01 console is up", BOOT)
        await guest.cont()
        await client.wait_out(READY_LINE, BOOT)
        await client.wait_out(PROMPT, GUEST)
        hv = gw.console("web-01").hypervisor
        assert hv is not None
        assert await hv.wait_connected(10)
        yield rig
    finally:
        await rig.close()


@pytest.mark.usefixtures("image_ready")
class TestTelnetSocket:
    """COM1 on ``-chardev socket,telnet=on``, port ``unix+telnet:``, QMP configured."""

    async def test_shell_command_runs_through_serialmux(self, telnet_rig: Rig) -> None:
        """An interactive SSH session types `echo $((6*7))` into the guest's shell and sees 42."""
        client = await telnet_rig.attach()
        await run_command(client, b"echo $((6*7))", ANSWER)

    async def test_guest_output_is_8_bit_clean(self, telnet_rig: Rig) -> None:
        """The guest prints 0xFF bytes, alone, doubled and before telnet command codes: the
        client gets exactly those bytes (QEMU sends the guest's output unescaped)."""
        client = await telnet_rig.attach()
        mark = len(client.out)
        client.send(b"printf 'A\\377\\376xB\\377\\377C\\377\\373\\001D\\n'\r")
        await wait_out_after(client, mark, b"A\xff\xfexB\xff\xffC\xff\xfb\x01D\r\n", GUEST)

    async def test_nmi_exec_with_openssh_reaches_guest_and_marks_ring(
        self, telnet_rig: Rig
    ) -> None:
        """`ssh web-01@host nmi` exits 0; a watcher sees NMI received; the ring says who sent it."""
        watcher = await telnet_rig.attach("carol")
        mark = len(watcher.out)
        status, out, err = await telnet_rig.openssh_exec("nmi")
        assert (status, out) == (0, b"NMI sent to web-01\n"), err
        await wait_out_after(watcher, mark, b"NMI received", GUEST)
        assert "NMI sent by alice" in telnet_rig.markers(RecordKind.ACTION)
        rec = await telnet_rig.gw.wait_audit("command", action="nmi", result="ok")
        assert rec["user"] == "alice"

    async def test_sysrq_exec_goes_as_telnet_break_and_prints_help(self, telnet_rig: Rig) -> None:
        """`sysrq h` on a unix+telnet port goes as IAC BRK + h; the kernel prints its SysRq help."""
        watcher = await telnet_rig.attach("carol")
        mark = len(watcher.out)
        status, out, err = await telnet_rig.exec("sysrq h")
        assert status == 0, err
        assert b"BREAK + key on the serial line" in out
        await wait_out_after(watcher, mark, b"sysrq: HELP", GUEST)
        assert "SysRq h sent by alice" in telnet_rig.markers(RecordKind.ACTION)

    async def test_sysrq_escape_prints_help(self, telnet_rig: Rig) -> None:
        """^] s h in an interactive session: the kernel prints the SysRq help to that session."""
        client = await telnet_rig.attach()
        mark = len(client.out)
        client.send(b"\x1dsh")
        await wait_out_after(client, mark, b"SysRq h sent to web-01", GUEST)
        await wait_out_after(client, mark, b"sysrq: HELP", GUEST)
        await run_command(client, b"echo $((6*7))", ANSWER)  # the shell did not get the 'h'

    async def test_break_escape_is_a_real_serial_break(self, telnet_rig: Rig) -> None:
        """^] b then h: QEMU turns IAC BRK into a serial BREAK, so the guest takes h as SysRq."""
        client = await telnet_rig.attach()
        mark = len(client.out)
        client.send(b"\x1dbh")
        await wait_out_after(client, mark, b"BREAK sent to web-01]", GUEST)
        await wait_out_after(client, mark, b"sysrq: HELP", GUEST)
        await telnet_rig.gw.wait_audit("command", action="break", result="ok", user="alice")
        assert "BREAK sent by alice" in telnet_rig.markers(RecordKind.ACTION)

    async def test_status_follows_the_hypervisor(self, telnet_rig: Rig) -> None:
        """`status` prints vm: running, then paused after a QMP stop, then running after cont."""
        status, out, _ = await telnet_rig.exec("status")
        assert status == 0
        assert b"console: up" in out
        assert b"vm: running" in out
        watcher = await telnet_rig.attach("carol")
        await telnet_rig.guest.qmp("stop")
        try:
            await watcher.wait_out(b"VM paused", GUEST)
            status, out, _ = await telnet_rig.exec("status")
            assert status == 0
            assert b"vm: paused" in out
        finally:
            await telnet_rig.guest.qmp("cont")
        await watcher.wait_out(b"VM resumed", GUEST)
        assert (await telnet_rig.exec("status"))[1].endswith(b"vm: running\n")
        assert "VM paused" in telnet_rig.markers(RecordKind.VM_EVENT)

    async def test_reader_may_not_nmi_on_a_real_guest(self, telnet_rig: Rig) -> None:
        """A reader's `nmi` exits 1 with the role it needs, is audited, and leaves no marker."""
        before = telnet_rig.markers(RecordKind.ACTION).count("NMI sent by carol")
        status, _, err = await telnet_rig.exec("nmi", user="carol")
        assert status == 1
        assert b"needs the contributor or owner role" in err
        await telnet_rig.gw.wait_audit("command", action="nmi", result="refused", user="carol")
        assert telnet_rig.markers(RecordKind.ACTION).count("NMI sent by carol") == before

    async def test_reset_exec_reboots_and_marks_ring(self, telnet_rig: Rig) -> None:
        """`reset` exits 0; the boot messages appear again; VM_EVENT RESET and the ACTION marker."""
        watcher = await telnet_rig.attach("carol")
        mark = len(watcher.out)
        status, out, err = await telnet_rig.exec("reset")
        assert (status, out) == (0, b"web-01 reset\n"), err
        mark = await wait_out_after(watcher, mark, READY_LINE, BOOT)
        await wait_out_after(watcher, mark, PROMPT, GUEST)
        assert "RESET sent by alice" in telnet_rig.markers(RecordKind.ACTION)
        resets = [
            r
            for r in telnet_rig.ring_records()
            if r.kind is RecordKind.VM_EVENT and (r.marker() or {}).get("event") == "RESET"
        ]
        assert resets, "no VM_EVENT RESET marker in the ring"
        assert resets[-1].is_boot()

    async def test_reset_escape_after_confirmation(self, telnet_rig: Rig) -> None:
        """^] r asks to confirm; y resets: the same session sees the guest boot again."""
        client = await telnet_rig.attach()
        mark = len(client.out)
        client.send(b"\x1dr")
        await wait_out_after(client, mark, b"reset web-01? [y/N]", GUEST)
        client.send(b"y")
        mark = await wait_out_after(client, mark, b"web-01 reset]", GUEST)
        mark = await wait_out_after(client, mark, READY_LINE, BOOT)
        await wait_out_after(client, mark, PROMPT, GUEST)
        await run_command(client, b"echo $((6*7))", ANSWER)
        assert telnet_rig.markers(RecordKind.ACTION).count("RESET sent by alice") >= 2

    async def test_killed_qemu_returns_to_the_same_client(self, telnet_rig: Rig) -> None:
        """kill -9 of QEMU: down notice; QEMU started again: the same session sees it boot."""
        client = await telnet_rig.attach()
        mark = len(client.out)
        await telnet_rig.guest.kill()
        mark = await wait_out_after(client, mark, b"web-01 console is down", GUEST)
        await telnet_rig.guest.start()
        mark = await wait_out_after(client, mark, b"web-01 console is up", GUEST)
        await telnet_rig.guest.cont()
        mark = await wait_out_after(client, mark, READY_LINE, BOOT)
        await wait_out_after(client, mark, PROMPT, GUEST)
        await run_command(client, b"echo $((6*7))", ANSWER)
        assert not client.closed
        hv = telnet_rig.gw.console("web-01").hypervisor
        assert hv is not None
        assert await hv.wait_connected(10)
        status, _, err = await telnet_rig.exec("nmi")
        assert status == 0, err  # QMP reconnected to the new QEMU too


# --------------------------------------------------------------------------- PTY via qmp:


@pytest_asyncio.fixture(scope="class", loop_scope="module")
async def pty_rig(
    tmp_path_factory: pytest.TempPathFactory, image_ready: None
) -> AsyncIterator[Rig]:
    """The login guest on a PTY, served as web-01 through port = "qmp:serial0"; at login: ."""
    tmp = tmp_path_factory.mktemp("pty")
    guest = Guest(ensure_guest(), tmp / "vm", serial="pty", login=True)
    gw = Gateway(
        tmp,
        vms={"web-01": "qmp:serial0"},
        users=make_users(tmp / "keys"),
        grants=GRANTS,
        vm_extra={"web-01": f'qmp = "{guest.qmp_address}"'},
    )
    rig = Rig(guest, gw, gw.users)
    try:
        await guest.start()
        await gw.start()
        client = await rig.attach("carol")
        if not gw.console("web-01").up:
            await client.wait_out(b"web-01 console is up", BOOT)
        assert guest.pty_path is not None
        assert guest.pty_path in gw.console("web-01").port.description
        await guest.cont()
        await client.wait_out(READY_LINE, BOOT)
        await client.wait_out(LOGIN_PROMPT, GUEST)
        yield rig
    finally:
        await rig.close()


@pytest.mark.usefixtures("image_ready")
class TestPtyFollowedByQmp:
    """COM1 on ``-serial pty``, port ``qmp:serial0``, the guest asking for a login."""

    async def test_openssh_client_logs_in_and_runs_a_command(self, pty_rig: Rig) -> None:
        """OpenSSH: log in as test/test at the guest's getty, `echo $((6*7))` prints 42."""
        argv = openssh_args(pty_rig.gw, pty_rig.users["alice"], "web-01+replay=0")
        child = pexpect.spawn(argv[0], argv[1:], timeout=GUEST)
        try:
            await child.expect(b"connected to web-01", async_=True)
            child.send(b"\r")
            await child.expect(LOGIN_PROMPT.pattern.rstrip(b"$"), async_=True)
            child.send(TEST_USER[0].encode() + b"\r")
            await child.expect(b"Password: ", async_=True)
            child.send(TEST_USER[1].encode() + b"\r")
            await child.expect(rb"\$ ", async_=True)
            child.send(b"echo $((6*7))\r")
            await child.expect(ANSWER, async_=True)
            child.send(b"exit\r")
            await child.expect(b"login: ", async_=True)
            child.send(b"\x1d.")
            await child.expect(b"disconnected", async_=True)
            await child.expect(pexpect.EOF, async_=True)
        finally:
            close_child(child)

    async def test_break_on_a_pty_is_a_real_serial_break_through_qmp(self, pty_rig: Rig) -> None:
        """^] b then h on a QEMU PTY (which cannot carry a BREAK): QMP chardev-send-break puts
        one on the guest's UART, so the kernel takes h as SysRq; `break` over SSH says how."""
        client = await break_then_sysrq_help(pty_rig)
        status, out, err = await pty_rig.exec("break")
        assert status == 0, err
        assert b"(QMP chardev-send-break serial0)" in out
        mark = len(client.out)
        client.send(b"h")  # the exec's BREAK was real too: h is SysRq again, not input
        await wait_out_after(client, mark, b"sysrq: HELP", GUEST)

    async def test_sysrq_escape_on_a_pty_goes_through_qmp(self, pty_rig: Rig) -> None:
        """^] s h on a PTY port (a BREAK would be lost) is QMP send-key: the kernel prints help."""
        client = await pty_rig.attach()
        mark = len(client.out)
        client.send(b"\x1dsh")
        await wait_out_after(client, mark, b"SysRq h sent to web-01 (QMP send-key)", GUEST)
        await wait_out_after(client, mark, b"sysrq: HELP", GUEST)

    async def test_nmi_escape_after_confirmation(self, pty_rig: Rig) -> None:
        """^] n asks to confirm; y injects the NMI: the session sees the kernel's NMI message."""
        client = await pty_rig.attach()
        mark = len(client.out)
        client.send(b"\x1dn")
        await wait_out_after(client, mark, b"send NMI to web-01? [y/N]", GUEST)
        client.send(b"y")
        await wait_out_after(client, mark, b"NMI sent to web-01", GUEST)
        await wait_out_after(client, mark, b"NMI received", GUEST)
        await pty_rig.gw.wait_audit("command", action="nmi", result="ok", user="alice")

    async def test_restart_with_a_new_pty_path_is_followed(self, pty_rig: Rig) -> None:
        """QEMU restarts on another /dev/pts/N: qmp:serial0 finds it; the same client sees boot."""
        guest = pty_rig.guest
        old = guest.pty_path
        assert old is not None
        client = await pty_rig.attach("carol")
        mark = len(client.out)
        await guest.kill()
        mark = await wait_out_after(client, mark, b"web-01 console is down", GUEST)
        held = _hold_pty_path(old)  # so the next QEMU cannot be given the same path
        try:
            await guest.start()
            assert guest.pty_path is not None
            assert guest.pty_path != old
            mark = await wait_out_after(client, mark, b"web-01 console is up", GUEST)
            assert guest.pty_path in pty_rig.gw.console("web-01").port.description
            await guest.cont()
            mark = await wait_out_after(client, mark, READY_LINE, BOOT)
            await wait_out_after(client, mark, LOGIN_PROMPT, GUEST)
        finally:
            for fd in held:
                os.close(fd)
        ups = pty_rig.markers(RecordKind.VM_UP)
        assert any(guest.pty_path in text for text in ups)
        assert any(old in text for text in ups)


def _hold_pty_path(path: str, limit: int = 256) -> list[int]:
    """Open PTYs until one is *path* (freed by the dead QEMU); return the fds to close later.

    PTY numbers are handed out lowest free first, so at most N+1 opens reach /dev/pts/N.
    """
    fds: list[int] = []
    for _ in range(limit):
        master, slave = os.openpty()
        fds += [master, slave]
        if os.ttyname(slave) == path:
            return fds
    for fd in fds:
        os.close(fd)
    pytest.fail(f"could not take {path} to force a new PTY path")


# --------------------------------------------------------------------------- listen:unix


@pytest_asyncio.fixture(scope="class", loop_scope="module")
async def listen_rig(
    tmp_path_factory: pytest.TempPathFactory, image_ready: None
) -> AsyncIterator[Rig]:
    """serialmux listening for web-01's COM1 (listen:unix:); QEMU not started yet."""
    tmp = tmp_path_factory.mktemp("listen")
    folder = tmp / "vm"
    folder.mkdir()
    path = folder / "com1.sock"
    guest = Guest(ensure_guest(), folder, serial="client", serial_path=path)
    gw = Gateway(
        tmp,
        vms={"web-01": f"listen:unix:{path}"},
        users=make_users(tmp / "keys"),
        grants=GRANTS,
        vm_extra={"web-01": f'qmp = "{guest.qmp_address}"'},
    )
    rig = Rig(guest, gw, gw.users)
    try:
        await gw.start()
        yield rig
    finally:
        await rig.close()


async def guest_booted(rig: Rig) -> None:
    """Start and boot the listen rig's guest unless an earlier test of the class did
    (so that each test also runs alone, e.g. with -k)."""
    if rig.gw.console("web-01").up:
        return
    client = await rig.attach()
    await rig.guest.start()
    await client.wait_out(b"web-01 console is up", GUEST)
    await rig.guest.cont()
    await client.wait_out(PROMPT, BOOT)
    await client.close()


@pytest.mark.usefixtures("image_ready")
class TestListenUnix:
    """COM1 on ``-chardev socket,server=off,reconnect=1``: QEMU dials serialmux."""

    async def test_boot_output_is_captured_from_the_start(self, listen_rig: Rig) -> None:
        """QEMU, started paused, dials serialmux; after cont the whole boot is seen and kept."""
        client = await listen_rig.attach()
        await client.wait_out(b"web-01 is not running")
        await listen_rig.guest.start()
        await client.wait_out(b"web-01 console is up", GUEST)
        assert "QEMU connected" in listen_rig.markers(RecordKind.VM_UP)[-1]
        await listen_rig.guest.cont()
        await client.wait_out(READY_LINE, BOOT)
        await client.wait_out(PROMPT, GUEST)
        records = listen_rig.ring_records()
        up = max(i for i, r in enumerate(records) if r.kind is RecordKind.VM_UP)
        output = b"".join(r.payload for r in records[up:] if r.kind is RecordKind.OUTPUT)
        assert READY_LINE in output
        # Nothing was printed before serialmux held the port: the guest was paused until then.
        assert not any(r.kind is RecordKind.OUTPUT for r in records[:up])
        await run_command(client, b"echo $((6*7))", ANSWER)

    async def test_qemu_restart_dials_back_to_the_same_client(self, listen_rig: Rig) -> None:
        """kill -9 of QEMU: down notice; a new QEMU dials the same listener; the client sees it."""
        await guest_booted(listen_rig)
        client = await listen_rig.attach()
        mark = len(client.out)
        await listen_rig.guest.kill()
        mark = await wait_out_after(client, mark, b"web-01 console is down", GUEST)
        await listen_rig.guest.start()
        mark = await wait_out_after(client, mark, b"web-01 console is up", GUEST)
        await listen_rig.guest.cont()
        mark = await wait_out_after(client, mark, READY_LINE, BOOT)
        await wait_out_after(client, mark, PROMPT, GUEST)
        await run_command(client, b"echo $((6*7))", ANSWER)
        status, out, err = await listen_rig.exec("sysrq h")
        assert status == 0, err
        assert b"QMP send-key" in out  # a plain (non-telnet) socket: SysRq goes through QMP
        await client.wait_out(b"sysrq: HELP", GUEST)

    async def test_break_on_a_plain_socket_is_a_real_serial_break_through_qmp(
            self, listen_rig: Rig) -> None:
        """^] b then h on a plain socket (which cannot carry a BREAK): QMP names the chardev
        dialing serialmux's path (among QEMU's other dialing sockets) and chardev-send-break
        puts a BREAK on the guest's UART, so the kernel takes h as SysRq."""
        await guest_booted(listen_rig)
        await break_then_sysrq_help(listen_rig)
