"""Which QEMU chardev holds a port, asked of a real QEMU: the lookups BREAK goes through.

QMP ``chardev-send-break`` needs the chardev's label, and QEMU names its chardevs in its own
formats (``pty:/dev/pts/N``, ``unix:PATH,server=on``, ``disconnected:...``, a connected client
only ``unix:``, ``tcp:HOST:PORT,server=on <-> PEER``). These tests pin the lookups against
QEMU itself, paused (``-S``) with no guest: nothing boots, so it costs a fraction of a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from serialmux.qmp import Hypervisor
from tests.e2e.guest import QEMU

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

WAIT = 10.0


@contextlib.asynccontextmanager
async def qemu(tmp: Path, *chardevs: str) -> AsyncIterator[Hypervisor]:
    """A paused QEMU with *chardevs* (``-chardev`` values, each a ``-serial``), and a
    connected :class:`Hypervisor` on its QMP socket."""
    qmp = tmp / "qmp.sock"
    argv = [QEMU, "-machine", "pc", "-display", "none", "-nodefaults", "-no-user-config", "-S",
            "-qmp", f"unix:{qmp},server=on,wait=off"]
    for spec in chardevs:
        label = spec.split("id=")[1].split(",")[0]
        argv += ["-chardev", spec, "-serial", f"chardev:{label}"]
    argv += ["-serial", "pty"]  # serial3 or so: a PTY among the sockets
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    hv = Hypervisor("vm1", f"unix:{qmp}", command_timeout=WAIT, connect_timeout=WAIT)
    try:
        async with asyncio.TaskGroup() as group:
            task = group.create_task(hv.run())
            try:
                assert await hv.wait_connected(WAIT), "QEMU's QMP socket never answered"
                yield hv
            finally:
                task.cancel()
    finally:
        process.kill()
        await process.wait()


async def test_unix_sockets_are_matched_by_path_either_way(tmp_path: Path) -> None:
    """A UNIX chardev is found by its path whether QEMU listens on it (named
    ``unix:PATH,server=on``) or dials it (named only ``unix:``, among other dialing ones),
    through a symlink too; a path no chardev uses gives None."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "dialed.sock"))
    listener.listen()
    decoy = socket.socket(socket.AF_UNIX)  # a second dialing chardev: no guessing by count
    decoy.bind(str(tmp_path / "decoy.sock"))
    decoy.listen()
    (tmp_path / "link").symlink_to(tmp_path)
    try:
        async with qemu(
            tmp_path,
            f"socket,id=decoy,path={tmp_path / 'decoy.sock'}",
            f"socket,id=listening,path={tmp_path / 'served.sock'},server=on,wait=off",
            f"socket,id=dialing,path={tmp_path / 'dialed.sock'}",
        ) as hv:
            loop = asyncio.get_running_loop()
            accepted, _ = await asyncio.wait_for(loop.sock_accept(listener), WAIT)
            accepted.close()  # QEMU had dialed: its chardev was "unix:" meanwhile
            assert await hv.chardev_of_unix(str(tmp_path / "served.sock")) == "listening"
            assert await hv.chardev_of_unix(str(tmp_path / "link" / "served.sock")) == "listening"
            assert await hv.chardev_of_unix(str(tmp_path / "dialed.sock")) == "dialing"
            assert await hv.chardev_of_unix(str(tmp_path / "other.sock")) is None
            await hv.send_break("dialing")  # QEMU takes it: the label is a real chardev
    finally:
        listener.close()
        decoy.close()


@pytest.mark.parametrize("listen", ["127.0.0.1", "::"])
async def test_a_tcp_chardev_is_matched_by_our_end_and_a_pty_by_its_path(
        tmp_path: Path, listen: str) -> None:
    """A TCP chardev QEMU serves is found by the address of our end of the connection (on a
    dual-stack listener QEMU writes it IPv4-mapped), not by its port alone; the PTY chardev
    by its /dev/pts path."""
    async with qemu(tmp_path, f"socket,id=net,host={listen},port=0,server=on,wait=off") as hv:
        chardevs = {c["label"]: c["filename"] for c in await hv.execute("query-chardev")}
        port = int(chardevs["net"].split(",")[0].rpartition(":")[2])
        pty = next(f[4:] for f in chardevs.values() if f.startswith("pty:"))
        client = socket.create_connection(("127.0.0.1", port))
        try:
            host, ours = client.getsockname()
            assert await hv.chardev_of_pty(pty) in chardevs
            async with asyncio.timeout(WAIT):  # until QEMU's main loop has accepted
                while await hv.chardev_of_peer(host, ours) != "net":
                    await asyncio.sleep(0.05)
            assert await hv.chardev_of_peer(host, ours + 1) is None
            assert await hv.chardev_of_peer("127.0.0.1", port) is None
            assert await hv.chardev_of_pty("/dev/pts/999999") is None
        finally:
            client.close()
