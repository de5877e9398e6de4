"""serialmux.qmp.Hypervisor against a real QEMU guest: what each command does to the VM.

One guest is booted for the whole module (booting costs seconds of both cores); the reset test
runs last because it reboots the guest.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio

from serialmux.qmp import Hypervisor
from tests.e2e.guest import PROMPT, READY_LINE, Guest, SerialConsole, ensure_guest

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(180),
    pytest.mark.asyncio(loop_scope="module"),
]


@dataclass
class EventLog:
    """Records QMP events; wait_for() waits until one of a name has arrived."""

    seen: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def record(self, name: str, data: dict[str, Any]) -> None:
        self.seen.append((name, data))
        self._changed.set()

    async def wait_for(self, name: str, timeout: float) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                for seen, data in self.seen:
                    if seen == name:
                        return data
                self._changed.clear()
                await self._changed.wait()

    def clear(self) -> None:
        self.seen.clear()


@dataclass
class Booted:
    guest: Guest
    console: SerialConsole
    hypervisor: Hypervisor
    events: EventLog


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def booted(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Booted]:
    """A guest at its shell prompt on a PTY, with a connected Hypervisor on its QMP socket."""
    guest = Guest(ensure_guest(), tmp_path_factory.mktemp("qmp-guest"), serial="pty")
    await guest.start()
    events = EventLog()
    hypervisor = Hypervisor("guest", guest.qmp_address, on_event=events.record)
    # The fixture spans several tests, so no TaskGroup can hold it: the task is cancelled and
    # awaited below.
    runner = asyncio.ensure_future(hypervisor.run())
    console: SerialConsole | None = None
    try:
        console = await guest.open_console()
        await guest.cont()
        await console.expect(READY_LINE, 60)
        await console.expect(PROMPT, 30)
        assert await hypervisor.wait_connected(10)
        yield Booted(guest, console, hypervisor, events)
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        if console is not None:
            console.close()
        await guest.stop()


async def test_chardev_pty_names_the_serial_port(booted: Booted) -> None:
    """chardev_pty("serial0") returns the /dev/pts path QEMU gave COM1."""
    assert booted.guest.pty_path is not None
    assert await booted.hypervisor.chardev_pty("serial0") == booted.guest.pty_path


async def test_status_follows_stop_and_cont(booted: Booted) -> None:
    """status() is running, paused after QMP stop (STOP event), running after cont (RESUME)."""
    hv = booted.hypervisor
    assert await hv.status() == "running"
    booted.events.clear()
    await hv.execute("stop")
    await booted.events.wait_for("STOP", 10)
    assert await hv.status() == "paused"
    await hv.execute("cont")
    await booted.events.wait_for("RESUME", 10)
    assert await hv.status() == "running"


async def test_nmi_reaches_the_guest_kernel(booted: Booted) -> None:
    """nmi() makes the guest kernel print "NMI received" on its serial port."""
    booted.console.skip()
    await booted.hypervisor.nmi()
    await booted.console.expect(b"NMI received", 20)


async def test_sysrq_h_prints_sysrq_help(booted: Booted) -> None:
    """sysrq("h") presses Alt+SysRq+H: the kernel prints its SysRq help on the serial port."""
    booted.console.skip()
    await booted.hypervisor.sysrq("h")
    await booted.console.expect(b"sysrq: HELP", 20)


async def test_reset_reboots_the_guest(booted: Booted) -> None:
    """reset() reboots the guest (ready line and prompt again) and a RESET event arrives."""
    booted.console.skip()
    booted.events.clear()
    await booted.hypervisor.reset()
    await booted.events.wait_for("RESET", 10)
    await booted.console.expect(READY_LINE, 60)
    await booted.console.expect(PROMPT, 30)
    assert await booted.console.run("echo back") == b"back"
    assert await booted.hypervisor.status() == "running"
