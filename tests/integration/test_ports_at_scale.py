"""Ports under the conditions of a busy host: reused PTY numbers, high fds, fd budget."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from serialmux.ring import Record, RecordKind, RingReader
from tests.support import (
    WAIT,
    Client,
    Gateway,
    PtyVM,
    User,
    gateway,
    run_cli,
    wait_out_after,
)


def _take_number(path: str, others: list[PtyVM]) -> PtyVM:
    """Open PTYs until one gets *path*'s number (the kernel hands out the lowest free one)."""
    for _ in range(64):
        other = PtyVM()
        others.append(other)
        if other.slave_path == path:
            return other
    pytest.skip(f"the kernel did not reuse {path} within 64 PTYs")


@contextlib.asynccontextmanager
async def number_reused(gw: Gateway, users: dict[str, User], vm: PtyVM
                        ) -> AsyncIterator[tuple[Client, PtyVM]]:
    """alice attached as writer; the VM's PTY closes and another PTY takes its number."""
    c = await gw.attach(users["alice"], "web-01+replay=0")
    await c.wait_out(b"(writer)")
    path = vm.slave_path
    vm.close()
    await c.wait_out(b"web-01 console is down")  # the daemon's fd closed: the number is free
    others: list[PtyVM] = []
    try:
        yield c, _take_number(path, others)
    finally:
        for other in others:
            other.close()
        await c.close()


async def test_reused_pty_number_is_not_attached(gw: Gateway, users: dict[str, User],
                                                 vm: PtyVM) -> None:
    """When a VM's PTY closes and another PTY gets its number, it is not taken as the VM."""
    async with number_reused(gw, users, vm) as (c, other):
        other.write(b"another VM's secret\r\n")
        await c.wait_out(b"is a different PTY now")
        assert b"another VM's secret" not in c.out
        assert not gw.console("web-01").up
        with RingReader(gw.console("web-01").ring.path) as reader:
            assert not any(b"secret" in r.payload for r in reader.records()
                           if isinstance(r, Record) and r.kind is RecordKind.OUTPUT)


async def test_reopen_attaches_the_reused_pty_number_and_a_reload_does_not(
        gw: Gateway, users: dict[str, User], vm: PtyVM) -> None:
    """The VM restarted and got its PTY number back: a reload (made for anything else) does
    not attach it; `serialmux reopen VM`, the host operator's word, does, in the same session."""
    path = vm.slave_path
    async with number_reused(gw, users, vm) as (c, again):
        again.write(b"not for alice\r\n")
        await c.wait_out(b"`serialmux reopen web-01` on the host attaches it")
        assert gw.daemon is not None
        assert await gw.daemon.reload("test")
        assert not gw.console("web-01").up
        result = await run_cli("reopen", "web-01", "--config", str(gw.config_path))
        assert result.status == 0, result.err
        assert result.out == f"web-01: attaching the PTY now at {path}\n"
        await c.wait_out(b"web-01 console is up")
        await gw.wait_audit("reopen", vm="web-01", reused_pty=True)
        again.write(b"booted again\r\n")
        await c.wait_out(b"booted again")


@pytest.fixture
def fds_past_1024() -> Iterator[None]:
    """Fill the fd table so that every fd opened next is above 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low")
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))
    filler = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
    try:
        yield
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_ports_with_fds_above_1024_are_read(tmp_path: Path, users: dict[str, User],
                                                  fds_past_1024: None) -> None:
    """A console whose tty fd is above 1024 (select's limit) reads and writes normally."""
    vm = PtyVM()
    vm.start()
    try:
        async with gateway(tmp_path, vms={"web-01": vm.port}, users={"alice": users["alice"]},
                           grants=[(["alice"], ["*"], "owner")]) as g:
            port_fd = g.console("web-01").port._protocol.transport.serial.fd
            assert port_fd > 1024
            c = await g.attach(users["alice"], "web-01+replay=0", subsystem="console")
            vm.write(b"from a high fd\r\n")
            await c.wait_out(b"from a high fd\r\n")
            c.send(b"and back")
            await vm.wait_received(b"and back")
            await c.close()
    finally:
        vm.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_each_console_costs_two_fds(tmp_path: Path, users: dict[str, User]) -> None:
    """A console holds its port and its ring open, nothing more (5000 consoles must fit)."""
    vms = [PtyVM() for _ in range(40)]
    (tmp_path / "one").mkdir()
    (tmp_path / "many").mkdir()
    try:
        async with gateway(tmp_path / "one", vms={"vm0": vms[0].port},
                           users={"alice": users["alice"]},
                           grants=[(["alice"], ["*"], "owner")]):
            one = _open_fds()
        async with gateway(tmp_path / "many", vms={f"vm{i}": v.port for i, v in enumerate(vms)},
                           users={"alice": users["alice"]},
                           grants=[(["alice"], ["*"], "owner")]):
            many = _open_fds()
        assert many - one <= 2 * (len(vms) - 1)
    finally:
        for v in vms:
            v.close()


async def test_a_pty_another_serialmux_holds_is_not_shared(
        gw: Gateway, users: dict[str, User], vm: PtyVM) -> None:
    """The daemon holds an exclusive lock on each tty it reads: a second daemon (a copied
    config with other directories) cannot open it and split the guest's output; once the
    first lets go, the second gets it."""
    from serialmux.config import VMConfig
    from serialmux.port import VMPort

    assert gw.console("web-01").up
    reasons: list[str] = []

    class Sink:
        def port_data(self, data: bytes) -> None:
            raise AssertionError(f"read by a second reader: {data!r}")

        def port_up(self, description: str) -> None:
            reasons.append("up")

        def port_down(self, reason: str) -> None:
            pass

        def port_failed(self, reason: str) -> None:
            reasons.append(reason)

        def port_waiting(self, reason: str) -> None:
            pass

    second = VMPort(VMConfig(name="web-01", port=gw.console("web-01").vm.port), Sink())
    task = asyncio.create_task(second.run())
    try:
        async with asyncio.timeout(WAIT):
            await second.tried.wait()
        assert reasons
        assert "another process holds it" in reasons[0]
        vm.write(b"only the first reads this\r\n")
        c = await gw.attach(users["alice"], "web-01+replay=0", subsystem="console")
        vm.write(b"still only the first\r\n")
        await c.wait_out(b"still only the first\r\n")
        await c.close()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_reload_that_reopens_the_port_still_refuses_a_reused_number(
        gw: Gateway, users: dict[str, User], vm: PtyVM) -> None:
    """A reload that changes the VM's baud builds a new port: it still knows the PTY the path
    named, so the reused number stays refused (the new port had forgotten and attached it)."""
    async with number_reused(gw, users, vm) as (c, _):
        await c.wait_out(b"is a different PTY now")
        offset = len(c.out)
        gw.vm_extra = {"web-01": "baud = 9600"}
        gw.config_path.write_text(gw.toml())
        assert gw.daemon is not None
        assert await gw.daemon.reload("test")
        await wait_out_after(c, offset, b"is a different PTY now")
        assert not gw.console("web-01").up
