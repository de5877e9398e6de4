"""Reload (SIGHUP, ``serialmux reload``): VMs, users, grants change in place; others unharmed."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import asyncssh
import pyotp
import pytest

from serialmux import rings as rings_mod
from serialmux.config import parse_config
from serialmux.mfa import TotpStore
from serialmux.reload import plan_reload
from serialmux.ring import Record, RecordKind, RingReader, RingWriter
from tests.integration.conftest import GRANTS
from tests.support import (
    WAIT,
    Client,
    Gateway,
    PtyVM,
    User,
    gateway,
    run_cli,
    ssh_binary,
    wait_out_after,
)


@pytest.fixture
async def spare() -> AsyncIterator[list[PtyVM]]:
    """Three more PTY VMs, closed at teardown (ask for it before gw: closed after the daemon)."""
    vms = [PtyVM() for _ in range(3)]
    for v in vms:
        v.start()
    yield vms
    for v in vms:
        v.close()


@dataclasses.dataclass
class SlowDisk:
    """Opening web-20's ring waits, in whichever thread opens it, until released (at most
    WAIT * 2): a slow disk, the one part here a real one cannot play on cue."""

    entered: threading.Event = dataclasses.field(default_factory=threading.Event)
    release: threading.Event = dataclasses.field(default_factory=threading.Event)


@pytest.fixture
def slow_disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[SlowDisk]:
    """A SlowDisk under RingWriter.open (ask for it after gw: released before the daemon stops)."""
    disk = SlowDisk()
    real_open = RingWriter.open

    def slow_open(cls: type[RingWriter], path: Path, *args: object, **kwargs: object
                  ) -> RingWriter:
        if path.name == "web-20.ring":
            disk.entered.set()
            disk.release.wait(WAIT * 2)
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(RingWriter, "open", classmethod(slow_open))
    yield disk
    disk.release.set()


def rewrite(gw: Gateway) -> None:
    """Write the gateway's current vms/users/grants to its config file."""
    gw.config_path.write_text(gw.toml())


def test_plan_reload_sorts_changes() -> None:
    """plan_reload: new VM added, missing VM removed, new port reopened, on_detach updated."""
    head = '[server]\nlisten = ["127.0.0.1:0"]\n'
    old = parse_config(head + '[vms.a]\nport = "pty:/dev/pts/1"\n[vms.b]\nport = "pty:/dev/pts/2"\n'
                       '[vms.c]\nport = "pty:/dev/pts/3"\n', Path("/x.toml"))
    new = parse_config(head + '[vms.a]\nport = "pty:/dev/pts/1"\non_detach = "x"\n'
                       '[vms.c]\nport = "pty:/dev/pts/9"\n[vms.d]\nport = "pty:/dev/pts/4"\n',
                       Path("/x.toml"))
    plan = plan_reload(old, new)
    assert [v.name for v in plan.added] == ["d"]
    assert plan.removed == ["b"]
    assert [v.name for v in plan.reopened] == ["c"]
    assert [v.name for v in plan.updated] == ["a"]
    assert plan.restart_needed == []


async def test_reload_adds_and_removes_vms_while_another_client_types(
        spare: list[PtyVM], gw: Gateway, users: dict[str, User], vm: PtyVM) -> None:
    """Five reloads add and remove VMs while a web-01 client types: every byte, in order."""
    assert gw.daemon is not None
    c = await gw.attach(users["alice"], "web-01+replay=0", subsystem="console")
    await gw.wait_audit("attach", user="alice")
    typed = b"".join(b"in-%05d\n" % i for i in range(3000))
    printed = b"".join(b"out-%05d\n" % i for i in range(3000))

    async def type_and_print() -> None:
        for i in range(0, 3000, 100):
            c.send(typed[i * 9:(i + 100) * 9])
            vm.write(printed[i * 10:(i + 100) * 10])
            await c.process.stdin.drain()
            await asyncio.sleep(0)  # let the reloads interleave with the stream

    typing = asyncio.create_task(type_and_print())
    for round_ in range(5):
        gw.vms = {"web-01": vm.port, f"web-1{round_}": spare[round_ % 3].port}
        rewrite(gw)
        assert await gw.daemon.reload("test")
        assert set(gw.daemon.consoles) == {"web-01", f"web-1{round_}"}
    await typing
    await vm.wait_received(typed)
    await c.wait_out(printed)
    assert bytes(vm.received) == typed
    assert bytes(c.out) == printed
    assert b"down" not in c.err
    assert not c.closed
    assert gw.daemon.consoles["web-01"].writer is not None
    await c.close()


async def test_a_ring_slow_to_open_stalls_no_other_console(
        spare: list[PtyVM], gw: Gateway, users: dict[str, User], vm: PtyVM,
        slow_disk: SlowDisk) -> None:
    """A reload adds a VM whose ring takes long to open (a slow disk): web-01's output still
    reaches its client meanwhile, and the new console comes up once the open returns."""
    assert gw.daemon is not None
    c = await gw.attach(users["alice"], "web-01")
    await c.wait_out(b"(writer)")
    safety = threading.Timer(WAIT, slow_disk.release.set)  # a blocked loop could not release it
    safety.start()
    try:
        gw.vms = {"web-01": vm.port, "web-20": spare[0].port}
        rewrite(gw)
        reload = asyncio.create_task(gw.daemon.reload("test"))
        assert await asyncio.to_thread(slow_disk.entered.wait, WAIT)
        vm.write(b"printed while a ring opens\r\n")
        await c.wait_out(b"printed while a ring opens")
        assert not slow_disk.release.is_set()  # it arrived while the open still waited
        slow_disk.release.set()
        assert await reload
    finally:
        safety.cancel()
    assert gw.daemon.consoles["web-20"].ring is not None
    await c.close()


async def test_a_ring_slower_than_ring_wait_is_adopted_when_it_opens(
        spare: list[PtyVM], gw: Gateway, monkeypatch: pytest.MonkeyPatch,
        slow_disk: SlowDisk) -> None:
    """A ring open that outlasts RING_WAIT does not hold the reload: the new console runs
    without its ring, adopts the ring when the disk answers, and logs output from then on."""
    assert gw.daemon is not None
    monkeypatch.setattr(rings_mod, "RING_WAIT", 0.05)
    gw.vms = {"web-01": gw.vms["web-01"], "web-20": spare[0].port}
    rewrite(gw)
    assert await gw.daemon.reload("test")  # back although the open still waits
    console = gw.daemon.consoles["web-20"]
    assert console.ring is None
    assert not slow_disk.release.is_set()
    slow_disk.release.set()
    async with asyncio.timeout(WAIT):
        while console.ring is None:
            await asyncio.sleep(0.01)
    read = console.bytes_read
    spare[0].write(b"logged after the late open\r\n")
    async with asyncio.timeout(WAIT):
        while console.bytes_read < read + 28:
            await console.backlog.wait_beyond(console.backlog.end)
    with RingReader(console.ring.path) as reader:
        records = [r for r in reader.records() if isinstance(r, Record)]
    assert any(r.kind is RecordKind.OUTPUT and b"logged after the late open" in r.payload
               for r in records)


async def test_a_reload_that_moves_state_dir_leaves_the_state_where_it_was(
        spare: list[PtyVM], gw: Gateway, users: dict[str, User]) -> None:
    """state_dir takes a restart: after a reload that changes it, a new VM's ring and a
    disable still go under the old one, where the running daemon keeps its state."""
    assert gw.daemon is not None
    gw.vms = {**gw.vms, "web-20": spare[0].port}
    old, new = gw.tmp / "state", gw.tmp / "state-moved"
    gw.config_path.write_text(gw.toml().replace(f'state_dir = "{old}"', f'state_dir = "{new}"'))
    assert await gw.daemon.reload("test")
    assert gw.daemon.config.server.state_dir == new
    alice = await gw.connect(users["alice"], "web-20")
    assert (await alice.run('disable --reason "moved"')).exit_status == 0
    assert (old / "rings" / "web-20.ring").exists()
    assert "web-20" in json.loads((old / "disabled.json").read_text())["vms"]
    assert not new.exists()


async def test_a_reload_cuts_lost_access_before_it_waits_on_a_disk(
        spare: list[PtyVM], gw: Gateway, users: dict[str, User], vm: PtyVM,
        slow_disk: SlowDisk) -> None:
    """A reload that removes bob's grant and adds a VM whose ring is slow to open closes
    bob's session at once, not after the disk answers."""
    assert gw.daemon is not None
    bob = await gw.attach(users["bob"], "web-01")
    await bob.wait_out(b"(writer)")
    gw.grants = [g for g in gw.grants if g[0] != ["bob"]]
    gw.vms = {"web-01": vm.port, "web-20": spare[0].port}
    rewrite(gw)
    reload = asyncio.create_task(gw.daemon.reload("test"))
    await bob.wait_out(b"your grant on web-01 was removed (configuration reloaded)")
    assert not reload.done()  # still waiting on web-20's disk (up to RING_WAIT)
    slow_disk.release.set()
    assert await reload
    assert await bob.wait_closed() == 1


async def test_bad_reload_keeps_the_running_config(gw: Gateway, users: dict[str, User]) -> None:
    """A config with errors is rejected (exit 1 from the CLI, the errors named) and the old
    one stays in force: the CLI reads the file first, and the daemon rejects it too when
    asked another way (SIGHUP's path)."""
    assert gw.daemon is not None
    before = gw.daemon.config
    gw.config_path.write_text(gw.toml() + '[vms.bad]\nport = "ptty:/dev/nope"\n'
                              '[vms."no/slash"]\nport = "pty:/dev/pts/1"\n')
    result = await run_cli("reload", "--config", str(gw.config_path))
    assert result.status == 1
    assert f"{gw.config_path}:" in result.err
    assert "vms.bad.port: unknown port type" in result.err
    assert not [e for e in gw.audit_events if e["event"] == "reload"]  # never asked
    done = await gw.daemon.reload("test")
    assert not done
    assert any("vms.bad.port: unknown port type" in error for error in done.errors)
    await gw.wait_audit("reload", result="failed")
    assert gw.daemon.config is before
    assert set(gw.daemon.consoles) == {"web-01"}
    c = await gw.attach(users["carol"], "web-01")
    await c.wait_out(b"(read-only)")
    await c.close()


async def test_removed_grant_disconnects_with_notice(gw: Gateway, users: dict[str, User]
                                                     ) -> None:
    """Reload without bob's grant disconnects bob with a notice; alice's session stays."""
    assert gw.daemon is not None
    alice = await gw.attach(users["alice"], "web-01+ro")
    await alice.wait_out(b"(read-only)")
    bob = await gw.attach(users["bob"], "web-01")
    await bob.wait_out(b"(writer)")
    gw.grants = [g for g in gw.grants if g[0] != ["bob"]]
    rewrite(gw)
    assert (await run_cli("reload", "--config", str(gw.config_path))).status == 0
    await bob.wait_out(b"disconnected: your grant on web-01 was removed (configuration reloaded)")
    assert await bob.wait_closed() == 1
    await gw.wait_audit("reload_disconnect", user="bob", vm="web-01")
    assert not alice.closed
    await alice.close()


async def test_removed_user_and_demoted_writer(gw: Gateway, users: dict[str, User]) -> None:
    """A removed user is disconnected; a writer demoted to reader is too; others stay."""
    assert gw.daemon is not None
    carol = await gw.attach(users["carol"], "web-01")
    await carol.wait_out(b"(read-only)")
    bob = await gw.attach(users["bob"], "web-01")
    await bob.wait_out(b"(writer)")
    gw.users = {k: v for k, v in gw.users.items() if k != "carol"}
    gw.grants = [(["alice"], ["*"], "owner"), (["bob"], ["web-*"], "reader")]
    rewrite(gw)
    assert await gw.daemon.reload("test")
    await carol.wait_out(b"user carol was removed from the configuration")
    await bob.wait_out(b"no longer allows typing")
    await wait_conn_closed(carol.conn)  # a removed user's whole connection goes
    assert await bob.wait_closed() == 1


async def test_removed_vm_sessions_are_told_and_closed(
        spare: list[PtyVM], gw: Gateway, users: dict[str, User], vm: PtyVM) -> None:
    """Removing a VM tells its sessions and closes them; a new VM can be attached at once."""
    assert gw.daemon is not None
    gw.vms = {"web-01": vm.port, "web-02": spare[0].port}
    rewrite(gw)
    os.kill(os.getpid(), signal.SIGHUP)  # the signal path, as systemctl reload uses
    await gw.wait_audit("reload", result="ok")
    c2 = await gw.attach(users["bob"], "web-02")
    await c2.wait_out(b"(writer)")
    c2.send(b"to web-02")
    await spare[0].wait_received(b"to web-02")
    gw.vms = {"web-01": vm.port}
    rewrite(gw)
    assert await gw.daemon.reload("test")
    await c2.wait_out(b"VM web-02 was removed from the configuration")
    assert await c2.wait_closed() == 1
    assert "web-02" not in gw.daemon.consoles


async def test_changed_port_is_reopened_and_session_kept(
        spare: list[PtyVM], gw: Gateway, users: dict[str, User], vm: PtyVM) -> None:
    """A VM whose port changed is reopened on the new port; its session stays attached."""
    assert gw.daemon is not None
    c = await gw.attach(users["alice"], "web-01")
    await c.wait_out(b"(writer)")
    gw.vms = {"web-01": spare[1].port}
    rewrite(gw)
    assert await gw.daemon.reload("test")
    await c.wait_out(b"web-01 console is up")
    c.send(b"new port")
    await spare[1].wait_received(b"new port")
    spare[1].write(b"from the new port\r\n")
    await c.wait_out(b"from the new port")
    assert b"new port" not in vm.received
    await c.close()


async def test_disabled_static_vm_removed_and_added_again_stays_disabled(
        spare: list[PtyVM], gw: Gateway, users: dict[str, User], vm: PtyVM) -> None:
    """web-01 disabled, removed by one reload and added back by another: still disabled."""
    assert gw.daemon is not None
    result = await run_cli("disable", "web-01", "--reason", "maintenance",
                           "--config", str(gw.config_path))
    assert result.status == 0, result.err
    disabled = gw.tmp / "state" / "disabled.json"
    gw.vms = {"web-02": spare[0].port}
    rewrite(gw)
    assert await gw.daemon.reload("test")
    assert "web-01" not in gw.daemon.consoles
    assert "maintenance (by " in json.loads(disabled.read_text())["vms"]["web-01"]
    gw.vms = {"web-01": vm.port, "web-02": spare[0].port}
    rewrite(gw)
    assert await gw.daemon.reload("test")
    assert "maintenance (by " in (gw.console("web-01").disabled or "")
    c = await gw.attach(users["alice"], "web-01")
    assert await c.wait_closed() == 1
    assert b"console web-01 is disabled: maintenance" in c.err
    c2 = await gw.attach(users["alice"], "web-02")  # the others are not
    await c2.wait_out(b"(writer)")
    await c2.close()


async def test_reload_setting_enabled_false_closes_sessions_and_true_lifts_it(
        gw: Gateway, users: dict[str, User], vm: PtyVM) -> None:
    """A reload that sets [vms.web-01] enabled = false tells and closes its sessions, marks the
    ring and refuses attaches, while the port is still read; setting it back to true lifts it,
    audited and marked in the ring as an enable (nothing said so)."""
    assert gw.daemon is not None
    c = await gw.attach(users["alice"], "web-01")
    await c.wait_out(b"(writer)")
    gw.vm_extra = {"web-01": "enabled = false"}
    rewrite(gw)
    assert (await run_cli("reload", "--config", str(gw.config_path))).status == 0
    await c.wait_out(b"console disabled by a configuration reload: [vms.web-01] enabled = false")
    assert await c.wait_closed() == 1
    await gw.wait_audit("disable", vm="web-01", source="configuration")
    refused = await gw.attach(users["alice"], "web-01")
    assert await refused.wait_closed() == 1
    assert b"console web-01 is disabled: disabled in the configuration" in refused.err
    console = gw.console("web-01")
    read = console.bytes_read
    vm.write(b"still read\r\n")
    async with asyncio.timeout(WAIT):
        while console.bytes_read < read + 12:
            await console.backlog.wait_beyond(console.backlog.end)
    with RingReader(console.ring.path) as reader:
        records = [r for r in reader.records() if isinstance(r, Record)]
    assert any(r.kind is RecordKind.ACTION
               and b"disabled by a configuration reload" in r.payload for r in records)
    assert any(r.kind is RecordKind.OUTPUT and b"still read" in r.payload for r in records)
    gw.vm_extra = {}
    rewrite(gw)
    assert await gw.daemon.reload("test")
    await gw.wait_audit("enable", vm="web-01", source="configuration")
    with RingReader(console.ring.path) as reader:
        texts = [r.text() for r in reader.records() if isinstance(r, Record)]
    assert texts[-1] == "enabled by a configuration reload"
    ok = await gw.attach(users["alice"], "web-01")
    await ok.wait_out(b"(writer)")
    await ok.close()


def fds_on(path: str) -> int:
    """How many fds of this process (the daemon's and the test's own) are open on *path*."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own fd, or one closed meanwhile
            count += os.readlink(f"/proc/self/fd/{fd}") == path
    return count


async def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    """Wait until *predicate()* holds, re-checked every 10 ms: for state nothing signals."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("change", ["removed", "port changed"])
async def test_reload_closes_a_hung_guests_pty_with_typing_queued_at_once(
        change: str, spare: list[PtyVM], gw: Gateway, users: dict[str, User],
        vm: PtyVM) -> None:
    """A guest that stopped reading, typing queued in the port: a reload that removes the VM
    or changes its port drops that typing and closes the daemon's fd on the PTY at once."""
    assert gw.daemon is not None
    c = await gw.attach(users["alice"], "web-01+replay=0", subsystem="console")
    await gw.wait_audit("attach", user="alice")
    vm.write(b"ready\n")
    await c.wait_out(b"ready\n")
    assert fds_on(vm.slave_path) == 2  # the guest's own (PtyVM keeps one open) and the daemon's
    asyncio.get_running_loop().remove_reader(vm.master)  # the guest hangs: its PTY fills
    c.send(b"k" * 256 * 1024)
    protocol = gw.console("web-01").port._protocol
    assert protocol is not None
    transport = protocol.transport
    assert isinstance(transport, asyncio.WriteTransport)
    await wait_until(lambda: transport.get_write_buffer_size() > 0)
    gw.vms = {"web-02": spare[0].port} if change == "removed" else {"web-01": spare[0].port}
    rewrite(gw)
    assert await gw.daemon.reload("test")
    await wait_until(lambda: fds_on(vm.slave_path) == 1, timeout=5)  # the guest's own only
    assert transport.is_closing()
    assert transport.get_write_buffer_size() == 0  # the typing was dropped, not kept for later
    await c.close()


async def test_reload_of_a_listen_console_closes_qemus_connection(
        tmp_path: Path, users: dict[str, User]) -> None:
    """A reload reopening a listen:unix console (baud changed) closes QEMU's connection
    (EOF), so QEMU reconnects to the new socket, which carries output and typing again."""
    path = tmp_path / "web01.sock"
    async with gateway(tmp_path, vms={"web-01": f"listen:unix:{path}"},
                       users={"alice": users["alice"]},
                       grants=[(["alice"], ["*"], "owner")]) as gw:
        assert gw.daemon is not None
        # QEMU with -chardev socket,server=off,reconnect=1
        old_reader, old_writer = await asyncio.open_unix_connection(str(path))
        c = await gw.attach(users["alice"], "web-01")
        old_writer.write(b"before the reload\r\n")
        await c.wait_out(b"before the reload")
        gw.vm_extra = {"web-01": "baud = 9600"}
        rewrite(gw)
        offset = len(c.out)
        assert await gw.daemon.reload("test")
        async with asyncio.timeout(WAIT):
            assert await old_reader.read() == b""  # EOF: the daemon closed its end
        old_writer.close()
        async with asyncio.timeout(WAIT):  # the new port is listening
            await gw.console("web-01").port.tried.wait()
        reader, writer = await asyncio.open_unix_connection(str(path))  # QEMU reconnects
        try:
            await wait_out_after(c, offset, b"web-01 console is up")
            writer.write(b"after the reload\r\n")
            await wait_out_after(c, offset, b"after the reload")
            c.send(b"typed after\r")
            async with asyncio.timeout(WAIT):
                assert (await reader.readuntil(b"typed after\r")).endswith(b"typed after\r")
        finally:
            writer.close()
        await c.close()


# ----------------------------------------------------------------------------
# Trust follows the file: CAs, revocations, keys and grants of open connections

CA_EXTRA = '[ssh]\nuser_ca_keys = ["ca.pub"]\nrevoked_keys = "revoked"'


@pytest.fixture
def ca(tmp_path: Path) -> asyncssh.SSHKey:
    """A user CA (tmp/ca.pub) and an empty revocation file (tmp/revoked)."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    (tmp_path / "ca.pub").write_bytes(key.export_public_key())
    (tmp_path / "revoked").write_text("# nothing revoked yet\n")
    return key


@pytest.fixture
async def cagw(tmp_path: Path, users: dict[str, User], vm: PtyVM,
               ca: asyncssh.SSHKey) -> AsyncIterator[Gateway]:
    """The gw fixture's daemon, trusting *ca* and reading tmp/revoked."""
    vm.start()
    configured = {k: v for k, v in users.items() if k != "mallory"}
    async with gateway(tmp_path, vms={"web-01": vm.port}, users=configured, grants=GRANTS,
                       extra=CA_EXTRA) as g:
        yield g


def certify(ca: asyncssh.SSHKey, user: str, serial: int = 0
            ) -> tuple[asyncssh.SSHKey, asyncssh.SSHCertificate]:
    """A fresh key and *ca*'s certificate for it naming *user*."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    return key, ca.generate_user_certificate(key, principals=[user], key_id=f"{user}-cert",
                                             serial=serial)


async def cert_connect(gw: Gateway, key: asyncssh.SSHKey, cert: asyncssh.SSHCertificate,
                       login: str = "web-01") -> asyncssh.SSHClientConnection:
    """Log in with a certificate."""
    conn = await asyncssh.connect("127.0.0.1", gw.port, username=login,
                                  client_keys=[(key, cert)], known_hosts=None, agent_path=None)
    gw.conns.append(conn)
    return conn


async def wait_conn_closed(conn: asyncssh.SSHClientConnection) -> None:
    """Wait (bounded) until the daemon has closed *conn*."""
    async with asyncio.timeout(WAIT):
        await conn.wait_closed()


async def run(conn: asyncssh.SSHClientConnection, command: str) -> asyncssh.SSHCompletedProcess:
    """Run an exec command, bounded."""
    async with asyncio.timeout(WAIT):
        return await conn.run(command, encoding=None)


async def test_reload_removing_a_ca_refuses_and_cuts_its_certificates(
        cagw: Gateway, ca: asyncssh.SSHKey) -> None:
    """H2: a CA dropped from user_ca_keys by reload: its open sessions cut, new logins refused."""
    assert cagw.daemon is not None
    key, cert = certify(ca, "alice")
    conn = await cert_connect(cagw, key, cert)
    c = Client(conn, await conn.create_process(term_type="xterm", encoding=None))
    await c.wait_out(b"(writer)")
    cagw.extra = '[ssh]\nrevoked_keys = "revoked"'
    rewrite(cagw)
    assert await cagw.daemon.reload("test")
    await c.wait_out(b"disconnected: certificate signed by an untrusted CA "
                     b"(configuration reloaded)")
    await wait_conn_closed(conn)
    rec = await cagw.wait_audit("access_revoked", user="alice")
    assert (rec["key_id"], rec["trigger"]) == ("alice-cert", "configuration reloaded")
    with pytest.raises(asyncssh.PermissionDenied):
        await cert_connect(cagw, key, cert)


async def test_reload_to_a_new_revocation_file_cuts_a_revoked_certificate(
        tmp_path: Path, cagw: Gateway, ca: asyncssh.SSHKey) -> None:
    """H2/H3b: revoked_keys moved to a file listing a serial: that cert's idle connection is cut."""
    assert cagw.daemon is not None
    conn = await cert_connect(cagw, *certify(ca, "carol", serial=77))
    other = await cert_connect(cagw, *certify(ca, "carol", serial=78))
    assert (await run(conn, "who")).exit_status == 0
    (tmp_path / "revoked2").write_text("serial:77\n")
    cagw.extra = CA_EXTRA.replace('"revoked"', '"revoked2"')
    rewrite(cagw)
    assert await cagw.daemon.reload("test")
    await wait_conn_closed(conn)
    rec = await cagw.wait_audit("access_revoked", user="carol")
    assert rec["reason"] == "certificate serial 77 is revoked"
    assert (await run(other, "who")).exit_status == 0


async def test_reload_replacing_a_key_cuts_its_idle_connection(
        gw: Gateway, users: dict[str, User]) -> None:
    """H3a: alice's key replaced by reload: her open connection (no session) is disconnected."""
    assert gw.daemon is not None
    conn = await gw.connect(users["alice"], "web-01")
    bob = await gw.connect(users["bob"], "web-01")
    assert (await run(conn, "who")).exit_status == 0
    gw.users = {**gw.users, "alice": dataclasses.replace(users["mallory"], name="alice")}
    rewrite(gw)
    assert await gw.daemon.reload("test")
    await wait_conn_closed(conn)
    await gw.wait_audit("access_revoked", user="alice",
                        reason="the key you logged in with was removed from the configuration")
    assert (await run(bob, "who")).exit_status == 0


async def test_revoked_key_cannot_open_a_new_channel_on_its_connection(
        tmp_path: Path, cagw: Gateway, users: dict[str, User]) -> None:
    """H3: a key added to revoked_keys (no reload): the next channel is refused, connections cut."""
    conn = await cagw.connect(users["bob"], "web-01")
    idle = await cagw.connect(users["bob"], "web-01")
    assert (await run(conn, "who")).exit_status == 0
    (tmp_path / "revoked").write_text(users["bob"].public + "\n")
    try:
        result = await run(conn, "who")
    except (asyncssh.Error, OSError):
        pass  # the connection went before the channel was answered
    else:
        assert result.exit_status != 0
        assert b"bob" not in (result.stdout or b"")
    # The channel's own check or the file watcher (serialmux.connections), whichever ran first.
    await cagw.wait_audit("access_revoked", user="bob")
    await wait_conn_closed(conn)
    # The changed file is noticed once: every other connection of the key goes too.
    await cagw.wait_audit("access_revoked", user="bob", trigger="revocation list changed")
    await wait_conn_closed(idle)


async def test_reload_removing_a_grant_ends_logs_follow(
        gw: Gateway, users: dict[str, User], vm: PtyVM) -> None:
    """H3c: a running `logs -f` ends with a notice when reload removes the grant; it was
    audited as started when it started (a follow may last for days)."""
    assert gw.daemon is not None
    conn = await gw.connect(users["carol"], "web-01")
    c = Client(conn, await conn.create_process("logs -f", encoding=None))
    vm.write(b"before the reload\r\n")
    await c.wait_out(b"before the reload")
    await gw.wait_audit("command", action="logs", arg="-f", result="started", user="carol",
                        vm="web-01")
    gw.grants = [g for g in gw.grants if g[0] != ["carol"]]
    rewrite(gw)
    assert await gw.daemon.reload("test")
    await c.wait_out(b"disconnected: your grant on web-01 was removed (configuration reloaded)",
                     stream="err")
    assert await c.wait_closed() == 1
    rec = await gw.wait_audit("reload_disconnect", user="carol", vm="web-01")
    assert rec["command"] == "logs -f"
    await c.close()


async def test_grant_removed_during_the_second_factor_is_refused(
        tmp_path: Path, users: dict[str, User], vm: PtyVM) -> None:
    """H3d: the role is computed again after the TOTP prompt: a grant removed meanwhile refuses."""
    vm.start()
    uri = TotpStore(tmp_path / "state").enroll("alice")
    mfa_grant = '[[grants]]\nusers = ["alice"]\nvms = ["web-*"]\nrole = "owner"\nmfa = "totp"'
    async with gateway(tmp_path, vms={"web-01": vm.port},
                       users={n: users[n] for n in ("alice", "carol")},
                       grants=[(["carol"], ["web-*"], "reader")], extra=mfa_grant) as gw:
        assert gw.daemon is not None
        c = await gw.attach(users["alice"], "web-01")
        await c.wait_out(b"TOTP code for alice on web-01")
        gw.extra = ""
        rewrite(gw)
        assert await gw.daemon.reload("test")
        c.send(pyotp.parse_uri(uri).now().encode() + b"\r")
        assert await c.wait_closed() == 1
        assert b"access denied" in c.err
        await gw.wait_audit("refused", user="alice",
                            reason="grant or VM removed during the second factor")
        assert not [e for e in gw.audit_events if e["event"] == "attach"]


async def test_reload_changing_redact_rules_applies_to_later_output(
        tmp_path: Path, users: dict[str, User], vm: PtyVM) -> None:
    """M4: new redact rules apply to output after the reload; the old ones no longer do."""
    vm.start()
    async with gateway(tmp_path, vms={"web-01": vm.port}, users={"alice": users["alice"]},
                       grants=[(["alice"], ["*"], "owner")],
                       vm_extra={"web-01": 'redact = ["sekrit-[0-9]+"]'}) as gw:
        assert gw.daemon is not None
        c = await gw.attach(users["alice"], "web-01+replay=0")
        vm.write(b"one sekrit-111 token-111\r\n")
        await c.wait_out(b"token-111")
        gw.vm_extra = {"web-01": 'redact = ["token-[0-9]+"]'}
        rewrite(gw)
        assert await gw.daemon.reload("test")
        vm.write(b"two sekrit-222 token-222\r\n")
        await c.wait_out(b"token-222")
        conn = await gw.connect(users["alice"], "web-01")
        logs = (await run(conn, "logs --raw")).stdout or b""
        assert b"one [redacted:secret] token-111" in logs
        assert b"two sekrit-222 [redacted:secret]" in logs
        await c.close()


async def test_removing_a_vm_keeps_output_redaction_held_back(
        tmp_path: Path, users: dict[str, User], vm: PtyVM) -> None:
    """Output the redactor holds back (no newline yet) when a reload removes the VM goes to
    the ring before the "console removed" marker, not lost with the closed ring."""
    vm.start()
    async with gateway(tmp_path, vms={"web-01": vm.port}, users={"alice": users["alice"]},
                       grants=[(["alice"], ["*"], "owner")],
                       vm_extra={"web-01": 'redact = ["sekrit-[0-9]+"]'}) as gw:
        assert gw.daemon is not None
        console = gw.console("web-01")
        ring = console.ring.path
        vm.write(b"last words sekrit-9 before the end")  # no newline: held back for 1 s
        async with asyncio.timeout(WAIT):
            while console.bytes_read < 34:
                await console.backlog.wait_beyond(console.backlog.end)
        gw.vms = {}
        rewrite(gw)
        assert await gw.daemon.reload("test")
    with RingReader(ring) as reader:
        records = [r for r in reader.records() if isinstance(r, Record)]
    text = b"".join(r.payload for r in records if r.kind is RecordKind.OUTPUT)
    assert text.endswith(b"last words [redacted:secret] before the end")
    assert records[-1].kind is RecordKind.NOTE


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_reload_moves_the_listener_and_rotates_the_host_key_keeping_sessions(
        gw: Gateway, users: dict[str, User], vm: PtyVM) -> None:
    """A reload that changes [server] listen and host_keys listens on the new address only,
    with the new host key, while a session made before it keeps typing and reading; status
    and the audit say so."""
    assert gw.daemon is not None
    old_port = gw.port
    old_key = (await gw.connect(users["alice"], "web-01")).get_server_host_key()
    c = await gw.attach(users["alice"], "web-01+replay=0")
    await c.wait_out(b"(writer)")
    new_port = free_port()
    gw.config_path.write_text(gw.toml().replace(
        'listen = ["127.0.0.1:0"]', f'listen = ["127.0.0.1:{new_port}"]').replace(
        f'host_keys = ["{gw.tmp}/host_key"]', f'host_keys = ["{gw.tmp}/host_key_2"]'))
    assert await gw.daemon.reload("test")
    assert gw.daemon.addresses == [("127.0.0.1", new_port)]
    with pytest.raises(ConnectionRefusedError):
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", old_port), WAIT)
    conn = await asyncssh.connect("127.0.0.1", new_port, username="web-01",
                                  client_keys=[users["alice"].key], known_hosts=None,
                                  agent_path=None)
    try:
        new_key = conn.get_server_host_key()
        assert new_key is not None
        assert old_key is not None
        assert new_key.public_data != old_key.public_data
        assert (gw.tmp / "host_key_2").exists()
        result = await conn.run("who", encoding=None)
        assert b"alice" in result.stdout
    finally:
        conn.close()
    c.send(b"still typing")  # the session from before the reload is untouched
    await vm.wait_received(b"still typing")
    vm.write(b"still reading\r\n")
    await c.wait_out(b"still reading")
    await gw.wait_audit("reload", result="ok")
    status = json.loads((await run_cli("status", "--json", "--config", str(gw.config_path))).out)
    assert status["listeners"] == [f"127.0.0.1:{new_port}"]


@pytest.mark.parametrize("problem", ["address in use", "unreadable host key", "port moved"])
async def test_listeners_that_cannot_take_a_reload_stay_as_they_were(
        gw: Gateway, users: dict[str, User], problem: str) -> None:
    """An added listen address that cannot be bound (in use, or the same port moved to
    another address), or a host key that does not load, keeps the listeners whole as they
    were: the old address and key still serve, the audit says why, and the rest of the
    reload (here: a new VM) is applied all the same."""
    assert gw.daemon is not None
    old_key = (await gw.connect(users["alice"], "web-01")).get_server_host_key()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        text = gw.toml() + '[vms.web-09]\nport = "pty:/dev/pts/999"\n'
        if problem == "address in use":
            text = text.replace('listen = ["127.0.0.1:0"]',
                                f'listen = ["127.0.0.1:0", "127.0.0.1:{busy}"]')
        elif problem == "port moved":
            text = text.replace('listen = ["127.0.0.1:0"]', f'listen = ["0.0.0.0:{gw.port}"]')
        else:
            (gw.tmp / "bad_key").write_text("not a key\n")
            text = text.replace(f'host_keys = ["{gw.tmp}/host_key"]',
                                f'host_keys = ["{gw.tmp}/bad_key"]')
        gw.config_path.write_text(text)
        assert await gw.daemon.reload("test")
    event = await gw.wait_audit("reload", result="ok")
    assert event["listeners"].startswith("kept as they were: "), event
    assert {"address in use": "cannot listen", "port moved": "takes a restart",
            "unreadable host key": "cannot load the host keys"}[problem] in event["listeners"]
    assert "web-09" in gw.daemon.consoles  # the rest of the reload was applied
    assert len(gw.daemon.addresses) == 1
    conn = await gw.connect(users["alice"], "web-01")  # the old listener, as it was
    assert (await conn.run("who", encoding=None)).exit_status == 0
    new_key = conn.get_server_host_key()
    assert new_key is not None
    assert old_key is not None
    assert new_key.public_data == old_key.public_data


async def test_a_host_key_listed_next_is_announced_so_openssh_clients_learn_it(
        gw: Gateway, users: dict[str, User]) -> None:
    """Rotation without a broken known_hosts: a second ed25519 key listed after the one in
    use (by a reload) is announced, not used: an OpenSSH client that trusts only the first
    still connects, and with UpdateHostKeys it adds the second to its known_hosts."""
    if ssh_binary() is None:
        pytest.skip("no OpenSSH client")
    assert gw.daemon is not None
    later = asyncssh.generate_private_key("ssh-ed25519")
    (gw.tmp / "host_key_next").write_bytes(later.export_private_key())
    (gw.tmp / "host_key_next").chmod(0o600)
    gw.config_path.write_text(gw.toml().replace(
        f'host_keys = ["{gw.tmp}/host_key"]',
        f'host_keys = ["{gw.tmp}/host_key", "{gw.tmp}/host_key_next"]'))
    assert await gw.daemon.reload("test")
    known = gw.tmp / "known_hosts"
    current = (gw.tmp / "host_key.pub").read_text().split()[:2]
    known.write_text(f"[127.0.0.1]:{gw.port} {' '.join(current)}\n")
    announced = later.export_public_key().decode().split()[1]
    ssh = await asyncio.create_subprocess_exec(
        "ssh", "-N", "-p", str(gw.port), "-i", str(users["alice"].key_path), "-F", "/dev/null",
        "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
        "-o", "UpdateHostKeys=yes", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
        "-o", "IdentityAgent=none", "web-01@127.0.0.1",
        stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(WAIT):  # the client rewrites known_hosts once it has proof
            while announced not in known.read_text():
                if ssh.returncode is not None:
                    assert ssh.stderr is not None
                    pytest.fail(f"ssh ended: {(await ssh.stderr.read()).decode()}")
                await asyncio.sleep(0.05)
        assert " ".join(current) in known.read_text()  # the key in use stays trusted
    finally:
        if ssh.returncode is None:
            ssh.kill()
        await ssh.wait()


async def test_a_reload_that_changes_ring_size_keeps_the_scrollback(
        gw: Gateway, users: dict[str, User], vm: PtyVM) -> None:
    """ring_size changed by a reload: the ring is rewritten at the new size with what it held
    (it was moved aside as .bad and the scrollback started empty), and says it was resized;
    the port is not reopened: the session sees no down and up, and output carries on."""
    assert gw.daemon is not None
    c = await gw.attach(users["alice"], "web-01+replay=0")
    vm.start()
    vm.write(b"printed before the resize\r\n")
    await c.wait_out(b"before the resize")
    path = gw.console("web-01").ring.path
    gw.vm_extra = {"web-01": 'ring_size = "128KiB"'}
    rewrite(gw)
    offset = len(c.out)
    assert await gw.daemon.reload("test")
    await wait_until(lambda: (ring := gw.console("web-01").ring) is not None
                     and ring.size == 128 * 1024)
    vm.write(b"printed after it\r\n")
    await c.wait_out(b"printed after it")
    assert b"console is down" not in c.out[offset:]
    with RingReader(path) as reader:
        records = [r for r in reader.records() if isinstance(r, Record)]
    output = b"".join(r.payload for r in records if r.kind is RecordKind.OUTPUT)
    assert b"printed before the resize\r\n" in output
    assert output.index(b"before the resize") < output.index(b"printed after it")
    assert any(r.kind is RecordKind.NOTE and "ring resized from 1048576 to 131072 bytes"
               in r.text() for r in records)
    assert not any("did not stop cleanly" in r.text() for r in records)
    assert not list(path.parent.glob("web-01.ring.*"))  # no .bad, no .resize left behind
    await c.close()


async def test_cli_reload_names_what_was_not_applied_and_exits_1(gw: Gateway) -> None:
    """serialmux reload: an added address in use (listeners kept) and a changed state_dir
    (needs a restart) are each named on stderr, exit 1, the rest applied; the file put
    back, the next reload applies everything: exit 0, nothing on stderr."""
    assert gw.daemon is not None
    original = gw.toml()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        gw.config_path.write_text(
            original.replace('listen = ["127.0.0.1:0"]',
                             f'listen = ["127.0.0.1:0", "127.0.0.1:{busy}"]')
            .replace(f'state_dir = "{gw.tmp}/state"', f'state_dir = "{gw.tmp}/state-new"')
            + '[vms.web-09]\nport = "pty:/dev/pts/999"\n')
        result = await run_cli("reload", "--config", str(gw.config_path))
    assert result.status == 1, result
    assert result.out == (f"configuration reloaded from {gw.config_path}, "
                          "2 change(s) not applied\n")
    errors = result.err.splitlines()
    assert len(errors) == 2, errors
    assert errors[0].startswith("serialmux: not applied: the SSH listeners were kept as they "
                                "were: cannot listen: ")
    assert "address already in use" in errors[0]
    assert errors[1] == ("serialmux: not applied: server.state_dir changed: it takes effect "
                         "when serialmux restarts (systemctl restart serialmux)")
    assert "web-09" in gw.daemon.consoles  # the rest was applied
    gw.config_path.write_text(original)
    result = await run_cli("reload", "--config", str(gw.config_path))
    assert (result.status, result.err) == (0, "")
    assert result.out == f"configuration reloaded from {gw.config_path}\n"


async def test_a_console_added_by_reload_is_marked_so_not_as_a_daemon_start(
        spare: list[PtyVM], gw: Gateway) -> None:
    """A VM added by a reload gets 'console added by a configuration reload' in its ring, not
    'serialmux started'; removed and added again, its ring (closed with 'console removed')
    is not reported as left by an unclean stop."""
    assert gw.daemon is not None
    path = gw.daemon.rings.path("web-11")

    def starts() -> list[str]:
        with RingReader(path) as reader:
            return [r.text() for r in reader.records()
                    if isinstance(r, Record) and r.kind is RecordKind.DAEMON_START]

    gw.vms = {**gw.vms, "web-11": spare[0].port}
    rewrite(gw)
    assert await gw.daemon.reload("test")
    assert starts() == ["console added by a configuration reload"]
    gw.vms = {k: v for k, v in gw.vms.items() if k != "web-11"}
    rewrite(gw)
    assert await gw.daemon.reload("test")
    gw.vms = {**gw.vms, "web-11": spare[0].port}
    rewrite(gw)
    assert await gw.daemon.reload("test")
    assert starts() == ["console added by a configuration reload"] * 2


async def test_cli_reload_of_another_file_than_the_daemons_is_refused(
        gw: Gateway, spare: list[PtyVM]) -> None:
    """serialmux reload --config OTHER (same runtime_dir, another file): refused, exit 1,
    naming the file the daemon runs; it said 'reloaded' and re-read the daemon's own file."""
    assert gw.daemon is not None
    other = gw.tmp / "other.toml"
    other.write_text(gw.toml() + f'[vms.web-09]\nport = "{spare[0].port}"\n')
    result = await run_cli("reload", "--config", str(other))
    assert result.status == 1
    assert f"this daemon runs {gw.config_path}, and a reload re-reads that file, not {other}" \
        in result.err
    assert "web-09" not in gw.daemon.consoles


async def test_a_ring_only_reload_leaves_a_port_held_by_flow_control_held(
        gw: Gateway, users: dict[str, User]) -> None:
    """The port waits for two reasons at once, flow control (a writer behind) and a ring
    being resized: the resize's end lets go of its own reason only (it resumed reading
    while the console still waited for its writer)."""
    assert gw.daemon is not None
    port = gw.console("web-01").port
    port.pause_reading(True)  # as the console does for a writer that fell behind
    gw.vm_extra = {"web-01": 'ring_size = "2MiB"'}
    rewrite(gw)
    assert await gw.daemon.reload("test")
    assert gw.console("web-01").ring.size == 2 << 20
    assert port.held == {"flow"}
    port.pause_reading(False)
    assert port.held == frozenset()
