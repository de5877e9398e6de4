"""VM discovery: NAME.serial (PTY symlink or socket) in a watched directory; churn leaks nothing."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import pwd
import resource
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from serialmux.access import Identity
from serialmux.ring import Record, RecordKind, RingReader
from tests.support import (
    SERIALMUX_BIN,
    WAIT,
    Gateway,
    PtyVM,
    SocketVM,
    User,
    gateway,
    run_cli,
)

CHURN_SECONDS = 20.0
CHURN_RATE = 10  # VMs added (and as many removed) per second


@pytest.fixture
async def disco(tmp_path: Path, users: dict[str, User], vm: PtyVM) -> AsyncIterator[Gateway]:
    """The daemon with web-01 static and discovery on tmp_path/vms (64 KiB rings)."""
    vm.start()
    extra = f'[discovery]\ndir = "{tmp_path}/vms"\nring_size = "64KiB"\n'
    async with gateway(tmp_path, vms={"web-01": vm.port}, users={"alice": users["alice"]},
                       grants=[(["alice"], ["*"], "owner")], extra=extra) as g:
        yield g


async def wait_until(gw: Gateway, predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    """Wait (on audit events) until *predicate* holds."""
    async with asyncio.timeout(timeout):
        while not predicate():
            gw._audit_changed.clear()
            await gw._audit_changed.wait()


def count(gw: Gateway, event: str) -> int:
    """How many audit events of this kind the gateway has seen."""
    return sum(1 for r in gw.audit_events if r["event"] == event)


async def test_pty_symlink_is_discovered_and_removed(
        disco: Gateway, users: dict[str, User], tmp_path: Path) -> None:
    """NAME.serial → a PTY adds a console one can attach to; removing it closes the session."""
    guest = PtyVM()
    guest.start()
    try:
        (tmp_path / "vms" / "db-01.serial").symlink_to(guest.slave_path)
        await disco.wait_audit("vm_discovered", vm="db-01")
        c = await disco.attach(users["alice"], "db-01")
        await c.wait_out(b"(writer)")
        c.send(b"hello db")
        await guest.wait_received(b"hello db")
        guest.write(b"db says hi\r\n")
        await c.wait_out(b"db says hi")
        (tmp_path / "vms" / "db-01.serial").unlink()
        await c.wait_out(b"VM db-01 went away")
        assert await c.wait_closed() == 1
        await disco.wait_audit("vm_gone", vm="db-01")
        assert "db-01" not in disco.daemon.consoles  # type: ignore[union-attr]
    finally:
        guest.close()


async def test_socket_serial_and_existing_files(
        tmp_path: Path, users: dict[str, User], sockets: Callable[..., SocketVM]) -> None:
    """A UNIX socket NAME.serial present before start is a console at READY; bad names are not."""
    vms = tmp_path / "vms"
    vms.mkdir()
    sock = sockets("vms/sock-01.serial")
    await sock.start()
    (vms / "bad..name.serial").symlink_to("/dev/null")
    (vms / "notes.txt").write_text("ignored")
    extra = f'[discovery]\ndir = "{vms}"\nring_size = "64KiB"\n'
    async with gateway(tmp_path, vms={}, users={"alice": users["alice"]},
                       grants=[(["alice"], ["*"], "owner")], extra=extra) as g:
        assert g.daemon is not None
        assert set(g.daemon.consoles) == {"sock-01"}
        await sock.wait_connected()
        c = await g.attach(users["alice"], "sock-01")
        await c.wait_out(b"(writer)")
        sock.write(b"socket guest\r\n")
        await c.wait_out(b"socket guest")
        await c.close()


async def test_qmp_socket_appearing_reopens_with_hypervisor(disco: Gateway, tmp_path: Path
                                                            ) -> None:
    """NAME.qmp appearing after NAME.serial gives the console its QMP address."""
    assert disco.daemon is not None
    guest = PtyVM()
    guest.start()
    qmp = await asyncio.start_unix_server(lambda r, w: w.close(), str(tmp_path / "vms/q-01.qmp"))
    try:
        (tmp_path / "vms" / "q-01.serial").symlink_to(guest.slave_path)
        await disco.wait_audit("vm_discovered", vm="q-01")
        # The QMP socket exists already: the first scan of q-01 saw both files.
        assert disco.daemon.consoles["q-01"].vm.qmp == f"unix:{tmp_path}/vms/q-01.qmp"
        assert disco.daemon.consoles["q-01"].hypervisor is not None
        (tmp_path / "vms" / "q-01.serial").unlink()
        await disco.wait_audit("vm_gone", vm="q-01")  # before the PTY goes
    finally:
        qmp.close()
        await qmp.wait_closed()
        guest.close()


def ring_output(gw: Gateway, vm: str) -> bytes:
    """The guest output *vm*'s ring holds, as written (redacted)."""
    with RingReader(gw.daemon.rings.path(vm)) as reader:  # type: ignore[union-attr]
        return b"".join(r.payload for r in reader.records()
                        if isinstance(r, Record) and r.kind is RecordKind.OUTPUT)


async def guest_prints(gw: Gateway, guest: PtyVM, vm: str, line: bytes) -> None:
    """*guest* prints *line*; return once *vm*'s console has read it (so it is in the ring)."""
    console = gw.console(vm)
    read = console.bytes_read
    guest.write(line)
    async with asyncio.timeout(WAIT):
        while console.bytes_read < read + len(line):
            await console.backlog.wait_beyond(console.backlog.end)


async def test_discovered_vm_gets_the_server_redact_rules(
        tmp_path: Path, users: dict[str, User]) -> None:
    """[server] redact applies to a discovered VM's ring as to a static VM's, and a reload
    that changes it applies to the discovered console's later output (port kept open)."""
    guest = PtyVM()
    guest.start()
    discovery = f'[discovery]\ndir = "{tmp_path}/vms"\nring_size = "64KiB"\n'
    try:
        async with gateway(tmp_path, vms={}, users={"alice": users["alice"]},
                           grants=[(["alice"], ["*"], "owner")],
                           extra='redact = ["hunter[0-9]"]\n' + discovery) as gw:
            assert gw.daemon is not None
            (tmp_path / "vms" / "db-01.serial").symlink_to(guest.slave_path)
            await gw.wait_audit("vm_discovered", vm="db-01")
            await guest_prints(gw, guest, "db-01", b"pw hunter2 token-1\r\n")
            assert b"pw [redacted:secret] token-1" in ring_output(gw, "db-01")
            port = gw.console("db-01").port
            gw.extra = 'redact = ["token-[0-9]"]\n' + discovery
            gw.config_path.write_text(gw.toml())
            assert await gw.daemon.reload("test")
            await guest_prints(gw, guest, "db-01", b"pw hunter3 token-2\r\n")
            assert b"pw hunter3 [redacted:secret]" in ring_output(gw, "db-01")
            assert gw.console("db-01").port is port
    finally:
        guest.close()


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")


async def test_links_to_the_daemons_own_files_never_become_consoles(
        disco: Gateway, tmp_path: Path) -> None:
    """NAME.serial linking to control.sock or into state_dir, or hard-linking it, is refused."""
    assert disco.daemon is not None
    vms, control = tmp_path / "vms", tmp_path / "run" / "control.sock"
    (vms / "lab-1.serial").symlink_to(control)
    rec = await disco.wait_audit("vm_refused", vm="lab-1")
    assert "inside the daemon's runtime_dir" in rec["reason"]
    (vms / "lab-2.serial").symlink_to(tmp_path / "state" / "rings" / "web-01.ring")
    rec = await disco.wait_audit("vm_refused", vm="lab-2")
    assert "inside the daemon's state_dir" in rec["reason"]
    os.link(control, vms / "lab-3.serial")  # same inode, owned by us, not a symlink
    rec = await disco.wait_audit("vm_refused", vm="lab-3")
    assert "control socket" in rec["reason"]
    assert set(disco.daemon.consoles) == {"web-01"}
    assert count(disco, "vm_discovered") == 0
    assert not any(r["event"] == "control" for r in disco.audit_events)


@needs_root
async def test_entry_owned_by_another_uid_is_refused(disco: Gateway, tmp_path: Path) -> None:
    """A NAME.serial symlink owned by nobody is refused; owned by root it is a console again."""
    assert disco.daemon is not None
    nobody = pwd.getpwnam("nobody").pw_uid
    guest = PtyVM()
    guest.start()
    try:
        staged = tmp_path / "db-02.serial"
        staged.symlink_to(guest.slave_path)
        os.chown(staged, nobody, -1, follow_symlinks=False)
        link = tmp_path / "vms" / "db-02.serial"
        staged.rename(link)  # appears already owned by nobody: no window as root's
        rec = await disco.wait_audit("vm_refused", vm="db-02")
        assert f"owned by uid {nobody}" in rec["reason"]
        assert "db-02" not in disco.daemon.consoles
        os.chown(link, 0, -1, follow_symlinks=False)
        await disco.wait_audit("vm_discovered", vm="db-02")
        os.chown(link, nobody, -1, follow_symlinks=False)
        await disco.wait_audit("vm_gone", vm="db-02")
        assert "db-02" not in disco.daemon.consoles
    finally:
        guest.close()


async def test_directory_writable_by_others_is_not_trusted(disco: Gateway, tmp_path: Path
                                                           ) -> None:
    """chmod o+w on the directory removes its consoles; chmod o-w brings them back."""
    assert disco.daemon is not None
    vms = tmp_path / "vms"
    guest = PtyVM()
    guest.start()
    try:
        (vms / "db-03.serial").symlink_to(guest.slave_path)
        await disco.wait_audit("vm_discovered", vm="db-03")
        vms.chmod(0o757)
        await disco.wait_audit("vm_gone", vm="db-03")
        rec = await disco.wait_audit("vm_refused", vm="db-03")
        assert "writable by others" in rec["reason"]
        assert set(disco.daemon.consoles) == {"web-01"}
        vms.chmod(0o755)
        await wait_until(disco, lambda: count(disco, "vm_discovered") == 2)
        assert "db-03" in disco.daemon.consoles
        (vms / "db-03.serial").unlink()
        await wait_until(disco, lambda: count(disco, "vm_gone") == 2)
    finally:
        guest.close()


ROOT = Identity(user="root", fingerprint="uid:0", peer="local", session_id="t", local=True)


def disabled_json(gw: Gateway) -> dict[str, str]:
    """The per-VM entries of the daemon's disabled.json."""
    vms: dict[str, str] = json.loads((gw.tmp / "state" / "disabled.json").read_text())["vms"]
    return vms


async def cycle(gw: Gateway, link: Path, target: str, *, restart: bool = False) -> None:
    """The VM behind *link* goes away (the daemon restarts meanwhile if *restart*), comes back."""
    name = link.name.removesuffix(".serial")
    link.unlink()
    await wait_until(gw, lambda: name not in gw.daemon.consoles)  # type: ignore[union-attr]
    if restart:
        await gw.stop()
        await gw.start()
    link.symlink_to(target)
    await wait_until(gw, lambda: name in gw.daemon.consoles)  # type: ignore[union-attr]


async def test_disabled_discovered_vm_stays_disabled_when_it_comes_back(
        disco: Gateway, users: dict[str, User], tmp_path: Path) -> None:
    """A discovered VM disabled, gone and back (also across a restart), is still disabled."""
    guest = PtyVM()
    guest.start()
    link = tmp_path / "vms" / "web-9.serial"
    try:
        link.symlink_to(guest.slave_path)
        await disco.wait_audit("vm_discovered", vm="web-9")
        result = await run_cli("disable", "web-9", "--reason", "disk repair",
                               "--config", str(disco.config_path))
        assert result.status == 0, result.err
        for restart in (False, True):
            await cycle(disco, link, guest.slave_path, restart=restart)
            assert "disk repair (by " in disabled_json(disco)["web-9"]
            c = await disco.attach(users["alice"], "web-9")
            assert await c.wait_closed() == 1
            assert b"console web-9 is disabled: disk repair" in c.err
    finally:
        guest.close()


async def test_enabled_vm_stays_enabled_and_enable_clears_an_absent_vm(
        tmp_path: Path, users: dict[str, User], vm: PtyVM) -> None:
    """A VM disabled in disabled.json at start, enabled, gone and back is enabled; enable of a
    VM with no console clears its entry."""
    vm.start()
    guest = PtyVM()
    guest.start()
    state = tmp_path / "state"
    state.mkdir()
    (state / "disabled.json").write_text(json.dumps(
        {"all": None, "vms": {"old-vm": "disabled last week", "gone-vm": "retired"}}))
    vms = tmp_path / "vms"
    extra = f'[discovery]\ndir = "{vms}"\nring_size = "64KiB"\n'
    try:
        async with gateway(tmp_path, vms={"web-01": vm.port}, users={"alice": users["alice"]},
                           grants=[(["alice"], ["*"], "owner")], extra=extra) as gw:
            assert gw.daemon is not None
            link = vms / "old-vm.serial"
            link.symlink_to(guest.slave_path)
            await gw.wait_audit("vm_discovered", vm="old-vm")
            assert gw.console("old-vm").disabled == "disabled last week"
            result = await run_cli("enable", "old-vm", "--config", str(gw.config_path))
            assert result.status == 0, result.err
            await cycle(gw, link, guest.slave_path)
            assert gw.console("old-vm").disabled is None
            assert disabled_json(gw) == {"gone-vm": "retired"}
            c = await gw.attach(users["alice"], "old-vm")
            await c.wait_out(b"(writer)")
            await c.close()
            assert gw.daemon.disabling.enable("gone-vm", ROOT) == "enabled gone-vm"
            assert disabled_json(gw) == {}
            assert gw.daemon.disabling.vms == {}
    finally:
        guest.close()


async def test_static_entry_removed_by_reload_gives_the_console_back_to_discovery(
        disco: Gateway, users: dict[str, User], tmp_path: Path) -> None:
    """[vms.web-9] shadowing discovered web-9: status says config; its removal by reload hands
    the console back to the files at once (session kept, status says discovery)."""
    assert disco.daemon is not None
    guest, static = PtyVM(), PtyVM()
    guest.start()
    static.start()
    link = tmp_path / "vms" / "web-9.serial"

    async def source() -> tuple[str, str]:
        result = await run_cli("status", "--json", "--config", str(disco.config_path))
        assert result.status == 0, result.err
        vm = next(v for v in json.loads(result.out)["vms"] if v["name"] == "web-9")
        return vm["source"], vm["port"]

    try:
        link.symlink_to(guest.slave_path)
        await disco.wait_audit("vm_discovered", vm="web-9")
        disco.vms = {**disco.vms, "web-9": static.port}
        disco.config_path.write_text(disco.toml())
        assert await disco.daemon.reload("test")
        assert await source() == ("config", static.port)
        c = await disco.attach(users["alice"], "web-9")
        await c.wait_out(b"(writer)")
        c.send(b"to the static port")
        await static.wait_received(b"to the static port")
        disco.vms = {k: v for k, v in disco.vms.items() if k != "web-9"}
        disco.config_path.write_text(disco.toml())
        assert await disco.daemon.reload("test")
        rec = await disco.wait_audit("vm_discovered", vm="web-9",
                                     reason="its static entry was removed")
        assert rec["port"] == f"pty:{link}"
        assert await source() == ("discovery", f"pty:{link}")
        assert set(disco.daemon.discovery.vms) == {"web-9"}  # type: ignore[union-attr]
        c.send(b"to the discovered port")
        await guest.wait_received(b"to the discovered port")
        assert not c.closed
        link.unlink()  # discovery events for web-9 act again
        await c.wait_out(b"VM web-9 went away")
        await disco.wait_audit("vm_gone", vm="web-9")
        assert "web-9" not in disco.daemon.consoles
    finally:
        guest.close()
        static.close()


def measure() -> dict[str, Any]:
    """Open fds, live tasks and resident memory of this process."""
    gc.collect()
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * resource.getpagesize()
    return {"fds": len(os.listdir("/proc/self/fd")), "tasks": len(asyncio.all_tasks()),
            "rss": rss}


async def churn(gw: Gateway, vms: Path, pool: list[PtyVM], seconds: float) -> int:
    """Add CHURN_RATE VMs a second and remove each a second later; return how many were added."""
    names = [f"churn-{i:02d}" for i in range(2 * CHURN_RATE)]
    ticks = int(seconds * CHURN_RATE)
    loop = asyncio.get_running_loop()
    start = loop.time()
    for tick in range(ticks):
        old = vms / f"{names[(tick - CHURN_RATE) % len(names)]}.serial"
        if tick >= CHURN_RATE:
            old.unlink()
        (vms / f"{names[tick % len(names)]}.serial").symlink_to(
            pool[tick % len(pool)].slave_path)
        # Pacing, not ordering: hold the rate at CHURN_RATE a second.
        await asyncio.sleep(max(0.0, start + (tick + 1) / CHURN_RATE - loop.time()))
    for path in vms.glob("churn-*.serial"):
        path.unlink()
    await wait_until(gw, lambda: set(gw.daemon.consoles) == {"web-01"}, timeout=30)  # type: ignore[union-attr]
    return ticks


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_churn_leaks_no_fds_tasks_or_memory(disco: Gateway, tmp_path: Path) -> None:
    """10 VMs a second come and go for 20 s: fds, tasks and RSS end where they started."""
    vms = tmp_path / "vms"
    pool = [PtyVM() for _ in range(CHURN_RATE)]
    for p in pool:
        p.start()
    try:
        await churn(disco, vms, pool, 2.0)  # warm up: caches, first imports, arenas
        before = measure()
        discovered = count(disco, "vm_discovered")
        added = await churn(disco, vms, pool, CHURN_SECONDS)
        after = measure()
    finally:
        for p in pool:
            p.close()
    assert count(disco, "vm_discovered") - discovered >= added * 0.8
    assert after["fds"] <= before["fds"] + 2, (before, after)
    assert after["tasks"] <= before["tasks"] + 1, (before, after)
    assert after["rss"] - before["rss"] < 16 << 20, (before, after)


async def hook(*args: str, xml: str = "", config: Path,
               serialmux: str = SERIALMUX_BIN) -> tuple[int, str]:
    """Run config/libvirt-hook as libvirt does (arguments, XML on stdin); (status, stderr)."""
    script = Path(__file__).parents[2] / "config" / "libvirt-hook"
    proc = await asyncio.create_subprocess_exec(
        str(script), *args, stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={"SERIALMUX": serialmux, "SERIALMUX_CONFIG": str(config), "PATH": "/usr/bin:/bin"})
    _, err = await asyncio.wait_for(proc.communicate(xml.encode()), WAIT)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def test_libvirt_hook_brings_a_domain_console_and_takes_it_away(
        disco: Gateway, users: dict[str, User], tmp_path: Path) -> None:
    """The shipped libvirt hook, on started with the live XML, links the domain's PTY: the
    console comes up and serves SSH; on stopped it goes. A domain name serialmux refuses
    (or one that looks like an option), or a serialmux that is not installed, exits 0
    (libvirt must not fail the start) saying why, and links nothing."""
    guest = PtyVM()
    guest.start()
    config = disco.tmp / "serialmux.toml"
    xml = ("<domain type='kvm'><name>db-07</name><devices><serial type='pty'>"
           f"<source path='{guest.slave_path}'/><target port='0'/></serial></devices></domain>")
    try:
        status, err = await hook("db-07", "started", "begin", "-", xml=xml, config=config)
        assert status == 0, err
        assert f"linked {tmp_path / 'vms' / 'db-07.serial'} -> {guest.slave_path}" in err
        await disco.wait_audit("vm_discovered", vm="db-07")
        c = await disco.attach(users["alice"], "db-07")
        await c.wait_out(b"(writer)")
        guest.write(b"libvirt guest here\r\n")
        await c.wait_out(b"libvirt guest here")
        status, err = await hook("db-07", "stopped", "end", "-", xml=xml, config=config)
        assert status == 0, err
        await c.wait_out(b"VM db-07 went away")
        await disco.wait_audit("vm_gone", vm="db-07")
        for name in ("bad..name", "-x", "--help"):  # never options, never a failed start
            status, err = await hook(name, "started", "begin", "-", xml=xml, config=config)
            assert status == 0
            assert "not a name serialmux serves" in err, name
        status, err = await hook("db-07", "started", "begin", "-", xml=xml, config=config,
                                 serialmux="/nonexistent/serialmux")
        assert (status, "not executable: console not linked" in err) == (0, True)
        status, err = await hook("db-07", "prepare", "begin", "-", xml=xml, config=config)
        assert (status, err) == (0, "")
        assert sorted(p.name for p in (tmp_path / "vms").iterdir()) == []
    finally:
        guest.close()
