"""A console the daemon's user may not open: the reason says what to change.

The service runs as its own user (systemd/serialmux.service), not root. A PTY that QEMU
opens is ``OWNER:tty`` mode 0620: the tty group may write to it but not read it, so the
daemon cannot open the console of a QEMU that runs as root or as ``libvirt-qemu``. The port
is run here as ``nobody`` (setpriv), against a real PTY owned by root.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import textwrap

import pytest

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(os.geteuid() != 0, reason="runs a port as another user: needs root"),
]

PORT_AS_NOBODY = textwrap.dedent("""
    import asyncio, sys
    from serialmux.configtypes import PortKind, PortSpec, VMConfig
    from serialmux.port import VMPort

    class Sink:
        def port_data(self, data): pass
        def port_up(self, description): print("sink: up", flush=True)
        def port_down(self, reason): pass
        def port_failed(self, reason): print("sink: failed:", reason, flush=True)
        def port_waiting(self, reason): pass

    async def main():
        spec = PortSpec(PortKind.PTY, path=sys.argv[1])
        port = VMPort(VMConfig(name="web-01", port=spec), Sink())
        task = asyncio.create_task(port.run())
        await asyncio.wait_for(port.tried.wait(), 10)
        task.cancel()

    asyncio.run(main())
""")


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    nobody = pwd.getpwnam("nobody")
    return subprocess.run(
        ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
         *argv], capture_output=True, text=True, timeout=30, check=False)


def heard(result: subprocess.CompletedProcess[str]) -> list[str]:
    """What the port told its sink (the log lines on stdout left out)."""
    return [line.removeprefix("sink: ") for line in result.stdout.splitlines()
            if line.startswith("sink: ")]


def test_a_pty_the_daemon_cannot_read_names_the_fix() -> None:
    """A root-owned PTY (0620, as QEMU's) refuses the port run as another user: the
    reason is EACCES and says the daemon needs read and write, and where to read how."""
    if as_nobody(sys.executable, "-c", "import serialmux.port").returncode != 0:
        pytest.skip("the checkout or its venv is not readable by nobody")
    master, slave = os.openpty()
    path = os.ttyname(slave)
    try:
        os.chmod(path, 0o620)
        result = as_nobody(sys.executable, "-c", PORT_AS_NOBODY, path)
        assert result.returncode == 0, result.stderr
        [reason] = heard(result)
        assert reason.startswith("failed: EACCES"), reason
        assert "must be able to read and write it" in reason
        assert reason.endswith('see docs/operations.md, "Permissions"')
        os.chown(path, -1, pwd.getpwnam("nobody").pw_gid)  # what the libvirt hook grants
        os.chmod(path, 0o660)
        assert heard(as_nobody(sys.executable, "-c", PORT_AS_NOBODY, path)) == ["up"]
    finally:
        os.close(master)
        os.close(slave)
