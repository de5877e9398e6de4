"""``serialmux demo``: the daemon on 127.0.0.1 with a simulated guest, no VM or config needed.

Creates a throwaway directory with a host key, a user key and known_hosts,
starts :class:`~serialmux.demo_guest.SimulatedGuest` on a PTY (held on the
master side as QEMU does), serves it as VM ``demo``, and prints the exact
``ssh`` command to type.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import asyncssh

from .config import (
    Config,
    Grant,
    Listen,
    PortKind,
    PortSpec,
    Role,
    ServerConfig,
    UserConfig,
    VMConfig,
)
from .daemon import Daemon
from .demo_guest import SimulatedGuest
from .keys import parse_authorized_keys


def _free_port(host: str, preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind((host, preferred))
        except OSError:
            s.bind((host, 0))
        return int(s.getsockname()[1])


def demo_config(workdir: Path, slave_path: str, port: int) -> tuple[Config, Path]:
    """Build the demo's config in *workdir*; return it and the user key's path."""
    user_key = asyncssh.generate_private_key("ssh-ed25519", comment="serialmux-demo")
    key_path = workdir / "id_ed25519"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(user_key.export_private_key())
    public = user_key.export_public_key().decode()
    user = UserConfig(name="you", keys=tuple(parse_authorized_keys(public, source="demo")))
    vm = VMConfig(name="demo", port=PortSpec(PortKind.PTY, path=slave_path), ring_size=1 << 20)
    server = ServerConfig(listen=(Listen("127.0.0.1", port),),
                          host_keys=(workdir / "ssh_host_ed25519_key",),
                          state_dir=workdir / "state", runtime_dir=workdir / "run")
    grant = Grant(users=("you",), groups=(), vms=("*",), role=Role.OWNER)
    return Config(server=server, vms={"demo": vm}, users={"you": user}, grants=(grant,)), key_path


async def run_demo(port: int = 2222, *, announce: Callable[[str], None] = print,
                   workdir: Path | None = None) -> None:
    """Run the demo until cancelled or stopped by a signal."""
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="serialmux-")))
        guest = SimulatedGuest()
        stack.callback(guest.close)
        config, key_path = demo_config(workdir, guest.slave_path, _free_port("127.0.0.1", port))
        daemon = Daemon(config)
        try:
            await _serve(daemon, guest, workdir, key_path, announce)
        except* _Stopped:
            pass  # Ctrl-C or SIGTERM: the daemon shut down in order; end quietly


class _Stopped(Exception):
    """The daemon stopped (a signal): ends the demo's TaskGroup, the guest with it."""


async def _serve(daemon: Daemon, guest: SimulatedGuest, workdir: Path, key_path: Path,
                 announce: Callable[[str], None]) -> None:
    """Serve until the daemon stops; the simulated guest runs beside it."""
    async with asyncio.TaskGroup() as tg:
        tg.create_task(guest.run())
        serving = tg.create_task(daemon.serve())
        await daemon.wait_ready()
        bound = daemon.ssh_port
        host_pub = (workdir / "ssh_host_ed25519_key.pub").read_text().split()
        known = workdir / "known_hosts"
        known.write_text(f"[127.0.0.1]:{bound} {host_pub[0]} {host_pub[1]}\n")
        command = (f"ssh -p {bound} -i {shlex.quote(str(key_path))} "
                   f"-o UserKnownHostsFile={shlex.quote(str(known))} "
                   "-o IdentitiesOnly=yes demo@127.0.0.1")
        announce(
            "\nserialmux demo is running: a simulated VM named 'demo' on a PTY.\n"
            "Connect with this, then log in to the guest as anyone, with any password:\n\n"
            f"    {command}\n\n"
            "Escape: Ctrl-] then ? for help, Ctrl-] . to disconnect. Watch read-only with\n"
            "demo+ro@..., try 'ssh ... demo@127.0.0.1 who' or 'logs'. Ctrl-C stops the demo.\n")
        await serving
        raise _Stopped
