"""Hypervisor actions through the real daemon and real SSH, against a fake QMP server (no QEMU).

The fake QMP server is the one of tests/unit/test_qmp_misbehaving.py (a real UNIX socket that
misbehaves on cue); the VM's serial port is a real PTY. What is pinned here: an action on a
misbehaving hypervisor fails with a clear message within a few seconds while the console keeps
flowing, readers are refused and audited, and a VM without ``qmp`` says so.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from serialmux.ring import Record, RecordKind, RingReader
from tests.integration.conftest import GRANTS
from tests.support import Gateway, PtyVM, SocketVM, User, gateway
from tests.unit.test_qmp_misbehaving import FakeQMP, serving

pytestmark = pytest.mark.timeout(60)

#: The daemon's QMP command timeout is 5 s; the user must hear back within this.
PROMPTLY = 8.0


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[FakeQMP]:
    """A fake QMP server that accepts the greeting and never replies to a command."""
    async with serving(FakeQMP(tmp_path / "qmp.sock", "hang")) as server:
        yield server


@pytest.fixture
async def hv_gw(
    tmp_path: Path, users: dict[str, User], vm: PtyVM, fake: FakeQMP
) -> AsyncIterator[Gateway]:
    """web-01 on a PTY with qmp pointing at the hanging fake; web-02 (a PTY too) has no qmp."""
    vm.start()
    plain = PtyVM()
    configured = {k: v for k, v in users.items() if k != "mallory"}
    try:
        async with gateway(
            tmp_path,
            vms={"web-01": vm.port, "web-02": plain.port},
            users=configured,
            grants=GRANTS,
            vm_extra={"web-01": f'qmp = "unix:{fake.path}"'},
        ) as g:
            hv = g.console("web-01").hypervisor
            assert hv is not None
            assert await hv.wait_connected(10)
            yield g
    finally:
        plain.close()


async def test_hanging_qmp_fails_nmi_promptly_while_console_flows(
    hv_gw: Gateway, users: dict[str, User], vm: PtyVM, fake: FakeQMP
) -> None:
    """`nmi` on a QMP server that never replies exits 1 with a clear error; bytes keep flowing."""
    watcher = await hv_gw.attach(users["carol"], "web-01+replay=0")
    await watcher.wait_out(b"(read-only)")
    conn = await hv_gw.connect(users["bob"], "web-01")
    started = time.monotonic()
    nmi = asyncio.create_task(conn.run("nmi", encoding=None))
    await fake.wait_for("commands", 1)
    assert fake.commands[-1][0] == "inject-nmi"
    vm.write(b"guest still talking\r\n")  # the console must not wait for QMP
    await watcher.wait_out(b"guest still talking")
    assert not nmi.done()
    result = await asyncio.wait_for(nmi, PROMPTLY)
    assert time.monotonic() - started < PROMPTLY
    assert result.exit_status == 1
    assert b"no reply within" in result.stderr
    assert b"QEMU may be hung" in result.stderr
    rec = await hv_gw.wait_audit("command", action="nmi", result="failed", user="bob")
    assert "no reply" in rec["reason"]
    vm.write(b"and after\r\n")
    await watcher.wait_out(b"and after")
    conn.close()
    await watcher.close()


async def test_failed_action_leaves_no_sent_marker(
    hv_gw: Gateway, users: dict[str, User], fake: FakeQMP
) -> None:
    """A reset that QMP never answers is not marked as sent in the ring."""
    conn = await hv_gw.connect(users["alice"], "web-01")
    result = await asyncio.wait_for(conn.run("reset", encoding=None), PROMPTLY)
    assert result.exit_status == 1
    conn.close()
    assert hv_gw.daemon is not None
    reader = RingReader(hv_gw.daemon.rings.path("web-01"))
    try:
        texts = [
            r.text()
            for r in reader.records()
            if isinstance(r, Record) and r.kind is RecordKind.ACTION
        ]
    finally:
        reader.close()
    assert not any("RESET sent" in t for t in texts)


@pytest.mark.parametrize("command", ["nmi", "reset", "sysrq h", "break"])
async def test_reader_may_not_act(
    hv_gw: Gateway, users: dict[str, User], fake: FakeQMP, command: str
) -> None:
    """A reader's nmi/reset/sysrq/break exits non-zero, is audited as refused, never reaches QMP."""
    conn = await hv_gw.connect(users["carol"], "web-01")
    result = await conn.run(command, encoding=None)
    conn.close()
    assert result.exit_status == 1
    assert b"needs the contributor or owner role" in result.stderr
    action = command.split()[0]
    await hv_gw.wait_audit("command", action=action, result="refused", user="carol")
    assert fake.commands == []


@pytest.mark.parametrize("command", ["nmi", "reset"])
async def test_vm_without_qmp_says_nmi_and_reset_are_unavailable(
    hv_gw: Gateway, users: dict[str, User], command: str
) -> None:
    """On a VM without `qmp`, nmi and reset exit 1 saying no qmp is configured for it."""
    conn = await hv_gw.connect(users["alice"], "web-02")
    result = await conn.run(command, encoding=None)
    conn.close()
    assert result.exit_status == 1
    assert b"is not available: no qmp" in result.stderr
    await hv_gw.wait_audit("command", action=command, result="failed", vm="web-02")


async def test_status_without_qmp_says_so(hv_gw: Gateway, users: dict[str, User]) -> None:
    """`status` on a VM without qmp reports the console and that NMI/reset are not available."""
    conn = await hv_gw.connect(users["bob"], "web-02")
    result = await conn.run("status", encoding=None)
    conn.close()
    assert result.exit_status == 0
    assert b"console: up" in result.stdout
    assert b"no qmp configured: NMI and reset are not available" in result.stdout


async def test_escape_nmi_on_hanging_qmp_reports_failure_in_session(
    hv_gw: Gateway, users: dict[str, User], vm: PtyVM, fake: FakeQMP
) -> None:
    """^] n, y on a hung QMP: output flows meanwhile, the session hears why it failed."""
    c = await hv_gw.attach(users["bob"], "web-01+replay=0")
    await c.wait_out(b"(writer)")
    c.send(b"\x1dn")
    await c.wait_out(b"send NMI to web-01? [y/N]")
    c.send(b"y")
    await fake.wait_for("commands", 1)
    vm.write(b"output during nmi\r\n")
    await c.wait_out(b"output during nmi")
    await c.wait_out(b"failed: ", timeout=PROMPTLY)
    await c.wait_out(b"no reply within")
    c.send(b"typed after")
    await vm.wait_received(b"typed after")
    await c.close()


@pytest.mark.parametrize(("key", "action"), [(b"n", "NMI"), (b"r", "RESET")])
async def test_escape_nmi_or_reset_without_qmp_is_refused_at_once(
    hv_gw: Gateway, users: dict[str, User], key: bytes, action: str
) -> None:
    """^] n / ^] r on a VM without qmp: refused at once saying no qmp is configured, no y/N
    asked; the next key is typing again."""
    c = await hv_gw.attach(users["bob"], "web-02+replay=0")
    await c.wait_out(b"(writer)")
    c.send(b"\x1d" + key)
    await c.wait_out(f"failed: web-02: {action} is not available: no qmp".encode())
    assert b"[y/N]" not in c.out
    await hv_gw.wait_audit("command", action=action.lower(), result="failed", vm="web-02")
    await c.close()


async def test_escape_sysrq_with_an_invalid_key_says_which_keys_are_valid(
    hv_gw: Gateway, users: dict[str, User]
) -> None:
    """^] s Z cancels, saying which keys SysRq takes (the exec command's words)."""
    c = await hv_gw.attach(users["bob"], "web-01+replay=0")
    await c.wait_out(b"(writer)")
    c.send(b"\x1dsZ")
    await c.wait_out(b"cancelled: sysrq takes one key: 0-9 or a-z")
    await c.close()


async def test_typing_is_not_held_while_an_escape_action_waits(
    hv_gw: Gateway, users: dict[str, User], vm: PtyVM, fake: FakeQMP
) -> None:
    """Keys typed while ^] n waits on a hung QMP reach the guest at once, not after it fails."""
    c = await hv_gw.attach(users["bob"], "web-01+replay=0")
    await c.wait_out(b"(writer)")
    c.send(b"\x1dny")
    await fake.wait_for("commands", 1)
    c.send(b"typed during nmi")
    await vm.wait_received(b"typed during nmi", timeout=2.0)
    assert b"failed: " not in c.out
    await c.wait_out(b"failed: ", timeout=PROMPTLY)
    await c.close()


async def test_qmp_port_survives_a_chardev_query_that_never_returns(
    tmp_path: Path, users: dict[str, User]
) -> None:
    """port = "qmp:serial0" on a hung QMP stays down and asks again; the daemon keeps serving."""
    async with (
        serving(FakeQMP(tmp_path / "qmp.sock", "hang")) as fake,
        gateway(
            tmp_path,
            vms={"web-01": "qmp:serial0"},
            users={"alice": users["alice"]},
            grants=[(["alice"], ["*"], "owner")],
            vm_extra={"web-01": f'qmp = "unix:{fake.path}"'},
        ) as g,
    ):
        await fake.wait_for("commands", 2, timeout=20)  # a second try: the port loop lived
        assert [c for c, _ in fake.commands] == ["query-chardev", "query-chardev"]
        assert not g.console("web-01").up
        c = await g.attach(users["alice"], "web-01")
        await c.wait_out(b"web-01 is not running")
        await c.close()


async def test_break_on_a_qemu_pty_goes_through_qmp_to_the_chardev_on_it(
        tmp_path: Path, users: dict[str, User], vm: PtyVM) -> None:
    """A pty: port with qmp: `break` asks QMP which chardev holds that PTY and sends it a
    chardev-send-break (a PTY cannot carry a BREAK itself)."""
    vm.start()
    async with serving(FakeQMP(tmp_path / "qmp.sock")) as fake:
        fake.pty = f"pty:{vm.port.removeprefix('pty:')}"
        async with gateway(tmp_path, vms={"web-01": vm.port}, users=users, grants=GRANTS,
                           vm_extra={"web-01": f'qmp = "unix:{fake.path}"'}) as g:
            hv = g.console("web-01").hypervisor
            assert hv is not None
            assert await hv.wait_connected(10)
            bob = await g.connect(users["bob"], "web-01")
            result = await bob.run("break", encoding=None)
            assert result.exit_status == 0, result.stderr
            assert b"BREAK sent to web-01 (QMP chardev-send-break serial0)" in result.stdout
            assert ("chardev-send-break", {"id": "serial0"}) in fake.commands


async def test_break_on_a_tcp_port_goes_to_the_chardev_connected_to_our_end(
        tmp_path: Path, users: dict[str, User]) -> None:
    """A tcp: port with qmp: `break` sends chardev-send-break to the chardev whose peer is
    serialmux's end of the connection (not another on the same port number); with none, it
    fails naming what QMP lacked."""
    ends: list[str] = []
    writers: list[asyncio.StreamWriter] = []
    connected = asyncio.Event()

    def vm_side(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = writer.get_extra_info("peername")[:2]
        ends.append(f"{host}:{port}")
        writers.append(writer)
        connected.set()

    server = await asyncio.start_server(vm_side, "127.0.0.1", 0)
    vm_port = server.sockets[0].getsockname()[1]
    try:
        async with (
            serving(FakeQMP(tmp_path / "qmp.sock")) as fake,
            gateway(tmp_path, vms={"web-01": f"tcp:127.0.0.1:{vm_port}"}, users=users,
                    grants=GRANTS, vm_extra={"web-01": f'qmp = "unix:{fake.path}"'}) as g,
        ):
            await asyncio.wait_for(connected.wait(), 10)
            ours = ends[-1]
            other = f"127.0.0.1:{int(ours.rsplit(':', 1)[1]) + 1}"

            def chardevs(*peers: str) -> dict[str, Any]:
                return {"return": [
                    {"label": f"com{i}", "frontend-open": True,
                     "filename": f"tcp:127.0.0.1:{vm_port},server=on <-> {peer}"}
                    for i, peer in enumerate(peers)]}

            fake.replies["query-chardev"] = chardevs(other, ours)
            bob = await g.connect(users["bob"], "web-01")
            result = await bob.run("break", encoding=None)
            assert result.exit_status == 0, result.stderr
            assert b"BREAK sent to web-01 (QMP chardev-send-break com1)" in result.stdout
            assert fake.commands[-1] == ("chardev-send-break", {"id": "com1"})
            fake.replies["query-chardev"] = chardevs(other)
            result = await bob.run("break", encoding=None)
            assert result.exit_status == 1
            assert (b"BREAK not sent: QEMU names no chardev on this port (no chardev is "
                    b"connected to our end)") in result.stderr
            assert fake.commands[-1][0] == "query-chardev"
            await g.wait_audit("command", action="break", result="failed")
    finally:
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_break_on_a_plain_socket_without_qmp_says_what_would_carry_one(
        tmp_path: Path, users: dict[str, User], sockets: Callable[..., SocketVM]) -> None:
    """A unix: port with no qmp: `break` exits 1 naming the two things that carry a BREAK."""
    socket_vm = sockets("vm.sock")
    await socket_vm.start()
    async with gateway(tmp_path, vms={"web-01": socket_vm.port}, users=users,
                       grants=GRANTS) as g:
        await socket_vm.wait_connected()
        bob = await g.connect(users["bob"], "web-01")
        result = await bob.run("break", encoding=None)
        assert result.exit_status == 1
        assert b"a plain socket port cannot carry a BREAK; give the VM a qmp socket" \
            in result.stderr
        assert b"unix+telnet:" in result.stderr


async def test_a_vm_event_tells_every_session_with_its_reason(
        hv_gw: Gateway, users: dict[str, User], fake: FakeQMP) -> None:
    """A QMP RESET event reaches every attached session as a notice carrying QEMU's reason,
    as the ring marker does (the notice said only "VM reset")."""
    writer = await hv_gw.attach(users["alice"], "web-01")
    watcher = await hv_gw.attach(users["carol"], "web-01+ro")
    await watcher.wait_out(b"(read-only)")
    fake.event("RESET", {"guest": False, "reason": "host-qmp-system-reset"})
    for client in (writer, watcher):
        await client.wait_out(b"[serialmux: VM reset (host-qmp-system-reset)]")
    await writer.close()
    await watcher.close()


async def test_status_with_an_unanswering_qmp_reports_it_as_the_vm_state(
        hv_gw: Gateway, users: dict[str, User]) -> None:
    """`status` when QMP does not answer: the console line, then `vm: unknown (why)`, exit 0,
    as for a VM without qmp (it exited 1 with an error instead of a status)."""
    conn = await hv_gw.connect(users["bob"], "web-01")
    async with asyncio.timeout(PROMPTLY):
        result = await conn.run("status", encoding=None)
    conn.close()
    assert result.exit_status == 0, result.stderr
    assert b"console: up" in result.stdout
    assert b"vm: unknown (web-01: QMP query-status got no reply" in result.stdout


async def test_a_burst_of_the_same_vm_event_is_one_notice_and_one_marker(
        hv_gw: Gateway, users: dict[str, User], fake: FakeQMP) -> None:
    """QEMU fires several RESET events for one reset: a session hears of it once and the ring
    has one marker (each watcher got 3-4 notices per reset); another event still comes."""
    watcher = await hv_gw.attach(users["carol"], "web-01+ro")
    await watcher.wait_out(b"(read-only)")
    for _ in range(4):
        fake.event("RESET", {"guest": True, "reason": "guest-reset"})
    fake.event("STOP", {})
    await watcher.wait_out(b"[serialmux: VM paused]")
    assert watcher.out.count(b"VM reset (guest-reset)") == 1
    with RingReader(hv_gw.console("web-01").ring.path) as reader:
        texts = [r.text() for r in reader.records() if isinstance(r, Record)]
    assert texts.count("VM reset (guest-reset)") == 1
    await watcher.close()
