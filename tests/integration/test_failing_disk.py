"""A failing disk under one VM's ring, or under the audit file, costs that file, not the daemon."""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import PtyVM, User, gateway

OWNER = [(["alice"], ["*"], "owner")]


@pytest.fixture
async def vms() -> AsyncIterator[tuple[PtyVM, PtyVM]]:
    """Two PTY guests, web-01 and web-02."""
    pair = PtyVM(), PtyVM()
    for vm in pair:
        vm.start()
    yield pair
    for vm in pair:
        vm.close()


async def test_a_failing_ring_disk_stops_nothing_but_that_rings_logging(
        tmp_path: Path, users: dict[str, User], vms: tuple[PtyVM, PtyVM],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """web-01's ring can neither be written (ENOSPC) nor synced (EIO): that is audited once
    each, web-01's output still reaches its client live, its guest stopping (a marker write)
    stops nothing, web-02 is served throughout, and the daemon stops cleanly."""
    web1, web2 = vms
    async with gateway(tmp_path, vms={"web-01": web1.port, "web-02": web2.port},
                       users={"alice": users["alice"]}, grants=OWNER) as gw:
        one = await gw.attach(users["alice"], "web-01+replay=0")
        two = await gw.attach(users["alice"], "web-02+replay=0")
        bad = gw.console("web-01").ring._fd
        pwritev, fdatasync = os.pwritev, os.fdatasync

        def full(fd: int, *args: Any) -> int:
            if fd == bad:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return pwritev(fd, *args)

        def broken(fd: int) -> None:
            if fd == bad:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            fdatasync(fd)

        monkeypatch.setattr(os, "pwritev", full)
        monkeypatch.setattr(os, "fdatasync", broken)
        web1.write(b"web-01 prints onto a full disk\r\n")
        await one.wait_out(b"onto a full disk")
        await gw.wait_audit("ring_write_failed", vm="web-01")
        await gw.wait_audit("ring_sync_failed", vm="web-01")
        web1.close()  # the guest stops: the console's VM_DOWN marker fails too
        await one.wait_out(b"down")
        web2.write(b"web-02 still served\r\n")
        await two.wait_out(b"web-02 still served")
        assert gw._task is not None
        assert not gw._task.done()
        assert [e["event"] for e in gw.audit_events].count("ring_sync_failed") == 1
        assert gw.console("web-02").ring_error is None
    assert gw._task is not None
    assert gw._task.exception() is None  # a clean stop, the bad ring's markers included


async def test_an_audit_file_on_a_full_disk_costs_the_file_only(
        tmp_path: Path, users: dict[str, User], vms: tuple[PtyVM, PtyVM]) -> None:
    """With audit_file on a device that is always full (/dev/full), logins, attaches and
    output work; the events still reach the log and the listeners."""
    web1, _ = vms
    async with gateway(tmp_path, vms={"web-01": web1.port}, users={"alice": users["alice"]},
                       grants=OWNER, extra='audit_file = "/dev/full"') as gw:
        client = await gw.attach(users["alice"], "web-01+replay=0")
        await gw.wait_audit("attach", user="alice")
        web1.write(b"printed while the audit disk is full\r\n")
        await client.wait_out(b"audit disk is full")
        assert gw.daemon.audit.file_error is not None
        assert "No space left" in gw.daemon.audit.file_error
