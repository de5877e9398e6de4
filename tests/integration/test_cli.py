"""The real command line: check-config, serve with SIGTERM, and the demo's ssh line."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sys
from pathlib import Path

import pexpect
import pytest

from tests.support import WAIT, PtyVM, User, close_child, gateway_toml

ROOT = Path(__file__).resolve().parents[2]
SERIALMUX = [sys.executable, "-m", "serialmux"]


def run_cli(*args: str) -> tuple[int, str, str]:
    import subprocess

    done = subprocess.run([*SERIALMUX, *args], capture_output=True, text=True, timeout=60,
                          check=False)
    return done.returncode, done.stdout, done.stderr


def test_example_config_is_accepted() -> None:
    """config/serialmux.toml, the annotated example, passes check-config."""
    code, out, err = run_cli("check-config", str(ROOT / "config" / "serialmux.toml"))
    assert code == 0, err
    assert "OK (2 VMs" in out


def test_config_errors_name_file_line_and_key(tmp_path: Path) -> None:
    """Each config problem is reported as FILE:LINE: KEY: message, all at once."""
    path = tmp_path / "bad.toml"
    path.write_text('[server]\nlisten = ["127.0.0.1:2222"]\n\n[vms.web-01]\n'
                    'port = "ptty:/dev/pts/1"\n\n[vms.db-01]\nport = "pty:/dev/pts/2"\n'
                    'ring_size = "5GiB"\n\n[[grants]]\nusers = ["ghost"]\nvms = ["*"]\n'
                    'role = "admin"\n')
    code, _, err = run_cli("check-config", str(path))
    assert code == 1
    assert f"{path}:5: vms.web-01.port: unknown port type 'ptty'" in err
    assert f"{path}:9: vms.db-01.ring_size: ring size '5GiB' is out of range" in err
    assert f"{path}:12: grants.0.users: 'ghost' is not a configured user" in err
    assert f"{path}:14: grants.0.role: must be one of reader, contributor, owner" in err


def test_toml_syntax_error_names_line(tmp_path: Path) -> None:
    """A TOML syntax error names the file and line."""
    path = tmp_path / "syntax.toml"
    path.write_text('[server]\nlisten = ["127.0.0.1:2222"\n')
    code, _, err = run_cli("check-config", str(path))
    assert code == 1
    assert re.search(rf"{re.escape(str(path))}:\d+: TOML syntax", err)


async def test_serve_sigterm_shuts_down_in_order(tmp_path: Path, users: dict[str, User],
                                                 vm: PtyVM) -> None:
    """serve: SIGTERM tells attached clients, closes, and exits 0."""
    import asyncssh

    vm.start()
    config = tmp_path / "serialmux.toml"
    config.write_text(gateway_toml(tmp_path, {"web-01": vm.port}, [users["alice"]]))
    proc = await asyncio.create_subprocess_exec(
        *SERIALMUX, "serve", "--config", str(config), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    try:
        assert proc.stdout is not None
        port = None
        async with asyncio.timeout(WAIT * 2):
            while port is None:
                line = await proc.stdout.readline()
                assert line, "serve exited before it was ready"
                m = re.search(rb'"listen": \["127\.0\.0\.1:(\d+)"\]', line)
                if m:
                    port = int(m.group(1))
        conn = await asyncssh.connect("127.0.0.1", port, username="web-01",
                                      client_keys=[users["alice"].key], known_hosts=None,
                                      agent_path=None)
        process = await conn.create_process(term_type="xterm", encoding=None)
        async with asyncio.timeout(WAIT):
            assert b"connected to web-01" in await process.stdout.read(200)
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT * 2):
            rest = await process.stdout.read()
            assert b"serialmux is shutting down" in rest
            assert await proc.wait() == 0
        conn.close()
        await conn.wait_closed()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.skipif(shutil.which("ssh") is None, reason="OpenSSH client not installed")
async def test_demo_prints_an_ssh_line_that_reaches_the_guest(tmp_path: Path) -> None:
    """serialmux demo prints an ssh command; typing it reaches the simulated guest's shell;
    Ctrl-C ends it quietly."""
    env = {**os.environ, "HOME": str(tmp_path)}
    demo = pexpect.spawn(sys.executable, ["-m", "serialmux", "demo", "--port", "0"],
                         timeout=20, env=env)
    try:
        await demo.expect(r"(ssh -p \d+ .*demo@127\.0\.0\.1)\r\n", async_=True)
        line = demo.match.group(1).decode()
        assert "-i " in line
        assert "UserKnownHostsFile=" in line
        words = line.split()
        argv = [words[0], "-tt", "-o", "BatchMode=yes", "-F", "/dev/null", *words[1:]]
        client = pexpect.spawn(argv[0], argv[1:], timeout=20, env=env)
        try:
            await client.expect("demo login: ", async_=True)
            client.send("tester\r")
            await client.expect("Password: ", async_=True)
            client.send("secret\r")
            await client.expect(r"tester@demo:~\$ ", async_=True)
            client.send("echo hello\r")
            await client.expect("hello", async_=True)
            client.send("\x1d.")
            await client.expect(pexpect.EOF, async_=True)
        finally:
            close_child(client)
    finally:
        demo.kill(signal.SIGINT)
        demo.expect(pexpect.EOF, timeout=20)
        close_child(demo)
    assert b"Traceback" not in demo.before


async def test_kill_9_of_serve_leaves_a_clean_prefix_in_the_ring(
        tmp_path: Path, users: dict[str, User], vm: PtyVM) -> None:
    """SIGKILL of the daemon while the guest prints leaves an exact prefix of the output."""
    from serialmux.ring import Record, RecordKind, RingReader

    vm.start()
    config = tmp_path / "serialmux.toml"
    config.write_text(gateway_toml(tmp_path, {"web-01": vm.port}, [users["alice"]],
                                   vm_extra={"web-01": 'ring_size = "8MiB"'}))
    proc = await asyncio.create_subprocess_exec(
        *SERIALMUX, "serve", "--config", str(config), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    printed = b""
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(WAIT * 2):
            while b'"event": "ready"' not in await proc.stdout.readline():
                pass
        for i in range(3000):
            line = f"line {i:06d} {'#' * 50}\r\n".encode()
            await vm.send(line)
            printed += line
            if i == 2000:
                proc.kill()  # mid-stream: what was read is on disk, the rest never will be
                break
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    with RingReader(tmp_path / "state" / "rings" / "web-01.ring") as reader:
        got = b"".join(r.payload for r in reader.records()
                       if isinstance(r, Record) and r.kind is RecordKind.OUTPUT)
    assert len(got) > 1000
    assert printed.startswith(got)


@pytest.mark.parametrize("problem", ["unbindable address", "unreadable host key"])
def test_serve_that_cannot_start_says_why_without_a_traceback(
        tmp_path: Path, users: dict[str, User], problem: str) -> None:
    """serve with an address it cannot bind, or a host key that does not load, exits 1 with
    one line naming the problem (start-up errors come wrapped in the daemon's TaskGroup)."""
    text = gateway_toml(tmp_path, {}, [users["alice"]])
    if problem == "unbindable address":
        text = text.replace('listen = ["127.0.0.1:0"]', 'listen = ["192.0.2.1:2222"]')
        says = "serialmux: cannot start: [Errno 99]"
    else:
        (tmp_path / "host_key").write_text("not a key\n")
        says = "server.host_keys: cannot load host key"
    config = tmp_path / "serialmux.toml"
    config.write_text(text)
    status, out, err = run_cli("serve", "--config", str(config))
    assert status == 1, err
    assert says in err
    assert "Traceback" not in err + out
    # It never served: the audit says the start failed, not that the daemon stopped ok.
    assert re.search(r'"result": "failed", "event": "daemon_start"', out), out
    assert '"daemon_stop"' not in out
