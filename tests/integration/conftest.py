"""Fixtures: users with real keys, PTY VMs, and the daemon on port 0."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from tests.support import Gateway, PtyVM, SocketVM, User, gateway, make_user

GRANTS = [(["alice"], ["*"], "owner"), (["bob"], ["web-*"], "contributor"),
          (["carol"], ["web-*"], "reader")]


@pytest.fixture
def users(tmp_path: Path) -> dict[str, User]:
    """alice (owner), bob (contributor), carol (reader), mallory (not configured)."""
    keydir = tmp_path / "keys"
    keydir.mkdir()
    return {name: make_user(name, keydir) for name in ("alice", "bob", "carol", "mallory")}


@pytest.fixture
def vm() -> Iterator[PtyVM]:
    """A PTY whose master side plays the guest."""
    pty = PtyVM()
    yield pty
    pty.close()


@pytest.fixture
async def gw(tmp_path: Path, users: dict[str, User], vm: PtyVM) -> AsyncIterator[Gateway]:
    """The daemon serving VM web-01 on a PTY, with alice, bob and carol configured."""
    vm.start()
    configured = {k: v for k, v in users.items() if k != "mallory"}
    async with gateway(tmp_path, vms={"web-01": vm.port}, users=configured,
                       grants=GRANTS) as g:
        yield g


@pytest.fixture
async def sockets(tmp_path: Path) -> AsyncIterator[Callable[..., SocketVM]]:
    """Make UNIX-socket VMs that are all stopped at teardown."""
    made: list[SocketVM] = []

    def make(name: str, *, telnet: bool = False) -> SocketVM:
        vm = SocketVM(tmp_path / name, telnet=telnet)
        made.append(vm)
        return vm

    yield make
    for vm in made:
        await vm.stop()
