"""Reload (SIGHUP, ``serialmux reload``): VMs, users, grants change in place; others unharmed."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from serialmux.config import parse_config
from serialmux.reload import plan_reload
from tests.support import Gateway, PtyVM, User, run_cli


@pytest.fixture
async def spare() -> AsyncIterator[list[PtyVM]]:
    """Three more PTY VMs, closed at teardown (ask for it before gw: closed after the daemon)."""
    vms = [PtyVM() for _ in range(3)]
    for v in vms:
        v.start()
    yield vms
    for v in vms:
        v.close()


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


async def test_bad_reload_keeps_the_running_config(gw: Gateway, users: dict[str, User]) -> None:
    """A config with errors is rejected (exit 1 from the CLI) and the old one stays in force."""
    assert gw.daemon is not None
    before = gw.daemon.config
    gw.config_path.write_text(gw.toml() + '[vms.bad]\nport = "ptty:/dev/nope"\n'
                              '[vms."no/slash"]\nport = "pty:/dev/pts/1"\n')
    result = await run_cli("reload", "--config", str(gw.config_path))
    assert result.status == 1
    assert "configuration has errors" in result.err
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
    assert await carol.wait_closed() == 1
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
