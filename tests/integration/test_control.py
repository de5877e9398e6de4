"""The local control socket through the real ``serialmux`` CLI: commands, permissions, attach."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import re
import resource
import shutil
import socket
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest
from structlog.testing import capture_logs

from serialmux.control import admin_gid, socket_path
from tests.support import (
    SERIALMUX_BIN,
    WAIT,
    Gateway,
    PtyVM,
    User,
    close_child,
    gateway,
    run_cli,
)

NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
needs_setpriv = pytest.mark.skipif(
    shutil.which("setpriv") is None or os.geteuid() != 0, reason="needs root and setpriv")


def cfg(gw: Gateway) -> tuple[str, str]:
    """The --config option pointing at the gateway's file."""
    return ("--config", str(gw.config_path))


async def test_socket_is_0660_in_runtime_dir(gw: Gateway) -> None:
    """The control socket is created in runtime_dir with mode 0660."""
    assert gw.daemon is not None
    path = socket_path(gw.daemon.config.server.runtime_dir)
    st = path.stat()
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660


async def test_status_text_and_json(gw: Gateway, users: dict[str, User], vm: PtyVM) -> None:
    """status shows port state, writer and since-when, bytes read, ring use, listeners."""
    c = await gw.attach(users["alice"], "web-01")
    await c.wait_out(b"(writer)")
    vm.write(b"hello status\r\n")
    await c.wait_out(b"hello status")
    result = await run_cli("status", *cfg(gw))
    assert result.status == 0, result.err
    assert f"127.0.0.1:{gw.port}" in result.out
    assert "web-01: up since" in result.out
    assert "writer  alice" in result.out
    # Counted since the daemon started, and said so: the ring may hold earlier runs' output.
    assert re.search(r"since the daemon started: read \d+ bytes; ring of \d+ bytes, \d+ written",
                     result.out), result.out
    report = json.loads((await run_cli("status", "--json", *cfg(gw))).out)
    (web,) = report["vms"]
    assert web["up"] is True
    assert web["bytes_read"] >= len(b"hello status\r\n")
    assert web["writer"]["user"] == "alice"
    assert web["writer"]["since"].endswith("Z")
    assert web["ring"]["size"] > 0
    assert report["listeners"] == [f"127.0.0.1:{gw.port}"]
    await c.close()


async def test_who_lists_writer_and_watchers(gw: Gateway, users: dict[str, User]) -> None:
    """who VM names the writer and the watchers."""
    w = await gw.attach(users["alice"], "web-01")
    await w.wait_out(b"(writer)")
    r = await gw.attach(users["carol"], "web-01")
    await r.wait_out(b"(read-only)")
    result = await run_cli("who", "web-01", *cfg(gw))
    assert result.status == 0, result.err
    lines = result.out.splitlines()
    assert lines[0].startswith("writer  alice")
    assert lines[1].startswith("watcher carol")
    await w.close()
    await r.close()


async def test_kick_writer_and_user(gw: Gateway, users: dict[str, User]) -> None:
    """kick VM disconnects the writer; kick --user disconnects that user's sessions."""
    w = await gw.attach(users["alice"], "web-01")
    await w.wait_out(b"(writer)")
    r = await gw.attach(users["carol"], "web-01")
    await r.wait_out(b"(read-only)")
    result = await run_cli("kick", "web-01", *cfg(gw))
    assert result.out.strip() == "disconnected 1 session(s)"
    await w.wait_out(b"disconnected by root")
    assert await w.wait_closed() == 1
    assert not r.closed
    result = await run_cli("kick", "web-01", "--user", "carol", *cfg(gw))
    assert result.out.strip() == "disconnected 1 session(s)"
    assert await r.wait_closed() == 1
    await gw.wait_audit("kick", vm="web-01", user="root", target="carol")


async def test_break_and_unavailable_actions(gw: Gateway) -> None:
    """break works on a PTY; sysrq, nmi and reset without QMP fail with exit 1 and a reason."""
    result = await run_cli("break", "web-01", *cfg(gw))
    assert (result.status, result.out.strip()) == (0, "BREAK sent to web-01")
    await gw.wait_audit("command", action="break", result="ok", user="root")
    for args in (("sysrq", "web-01", "h"), ("nmi", "web-01"), ("reset", "web-01")):
        result = await run_cli(*args, *cfg(gw))
        assert result.status == 1
        assert "qmp" in result.err
    result = await run_cli("sysrq", "web-01", "!!", *cfg(gw))
    assert result.status == 1
    await gw.wait_audit("control", cmd="nmi", result="failed", user="root")


async def test_disable_enable_one_and_all(gw: Gateway, users: dict[str, User]) -> None:
    """disable closes sessions and refuses attaches (per VM and for all); enable undoes it."""
    c = await gw.attach(users["alice"], "web-01")
    await c.wait_out(b"(writer)")
    result = await run_cli("disable", "web-01", "--reason", "maintenance", *cfg(gw))
    assert result.status == 0, result.err
    await c.wait_out(b"console disabled by root: maintenance")
    assert await c.wait_closed() == 1
    refused = await gw.attach(users["alice"], "web-01")
    assert await refused.wait_closed() == 1
    assert b"disabled: maintenance" in refused.err
    assert (await run_cli("enable", "web-01", *cfg(gw))).status == 0
    ok = await gw.attach(users["alice"], "web-01")
    await ok.wait_out(b"(writer)")
    assert (await run_cli("disable", *cfg(gw))).status == 0
    await ok.wait_closed()
    status = json.loads((await run_cli("status", "--json", *cfg(gw))).out)
    assert status["disabled"].startswith("disabled by an operator")
    assert (await run_cli("enable", *cfg(gw))).status == 0
    again = await gw.attach(users["alice"], "web-01")
    await again.wait_out(b"(writer)")
    await again.close()


async def test_enable_vm_fails_while_all_vms_are_disabled_at_run_time(
        gw: Gateway, users: dict[str, User]) -> None:
    """enable VM under a runtime disable of all VMs clears the VM's own entry, then fails
    (exit 1, audited refused) saying how to lift it; enable with no VM does."""
    assert (await run_cli("disable", "web-01", "--reason", "own", *cfg(gw))).status == 0
    assert (await run_cli("disable", "--reason", "all down", *cfg(gw))).status == 0
    result = await run_cli("enable", "web-01", *cfg(gw))
    assert result.status == 1
    assert "web-01 stays disabled: a runtime disable of all VMs is in force (all down" in result.err
    assert "'serialmux enable' with no VM" in result.err
    await gw.wait_audit("enable", vm="web-01", result="refused",
                        reason="a runtime disable of all VMs is in force")
    state = json.loads((gw.tmp / "state" / "disabled.json").read_text())
    assert state["vms"] == {}  # its own entry was cleared first
    assert state["all"].startswith("all down")
    refused = await gw.attach(users["alice"], "web-01")
    assert await refused.wait_closed() == 1
    assert b"disabled for all VMs: all down" in refused.err
    assert (await run_cli("enable", *cfg(gw))).status == 0
    ok = await gw.attach(users["alice"], "web-01")
    await ok.wait_out(b"(writer)")
    await ok.close()


async def test_disable_and_enable_that_cannot_be_saved_stay_in_force_and_say_so(
        gw: Gateway, users: dict[str, User]) -> None:
    """When disabled.json cannot be written, disable still closes the sessions and is audited,
    enable still reopens; each reply says it was not saved, and the error is logged naming
    the file."""
    state = gw.tmp / "state"
    (state / "disabled.tmp").mkdir()  # the temporary file cannot be written: a directory
    c = await gw.attach(users["alice"], "web-01")
    await c.wait_out(b"(writer)")
    with capture_logs() as logs:
        result = await run_cli("disable", "web-01", "--reason", "disk full", *cfg(gw))
        assert result.status == 0, result.err
        assert result.out.startswith("disabled web-01: disk full; NOT saved to "
                                     f"{state / 'disabled.json'} (")
        assert result.out.rstrip().endswith("it will not survive a restart")
        await c.wait_out(b"console disabled by root: disk full")
        assert await c.wait_closed() == 1
        await gw.wait_audit("disable", vm="web-01", result="ok", saved=False)
        refused = await gw.attach(users["alice"], "web-01")
        assert await refused.wait_closed() == 1
        assert b"console web-01 is disabled: disk full" in refused.err
        again = await run_cli("enable", "web-01", *cfg(gw))
        assert again.status == 0, again.err
        assert again.out.startswith("enabled web-01; NOT saved to ")
        await gw.wait_audit("enable", vm="web-01", result="ok", saved=False)
    unsaved = [e for e in logs if e["event"] == "disabled_state_unsaved"]
    assert [e["path"] for e in unsaved] == [str(state / "disabled.json")] * 2
    assert not (state / "disabled.json").exists()
    ok = await gw.attach(users["alice"], "web-01")
    await ok.wait_out(b"(writer)")
    await ok.close()


async def test_enable_clears_the_entry_of_a_vm_with_no_console(gw: Gateway) -> None:
    """serialmux enable clears the disabled entry of a VM a reload removed; a name that is
    neither a console nor an entry is refused saying so, a malformed one before any use."""
    assert gw.daemon is not None
    assert (await run_cli("disable", "web-01", "--reason", "retired", *cfg(gw))).status == 0
    gw.vms = {}
    gw.config_path.write_text(gw.toml())
    assert await gw.daemon.reload("test")
    assert "web-01" not in gw.daemon.consoles
    result = await run_cli("enable", "web-01", *cfg(gw))
    assert result.status == 0, result.err
    assert result.out == "enabled web-01\n"
    state = json.loads((gw.tmp / "state" / "disabled.json").read_text())
    assert state["vms"] == {}
    again = await run_cli("enable", "web-01", *cfg(gw))
    assert again.status == 1
    assert "no VM named 'web-01', and" in again.err
    assert "disabled.json has no entry for it to clear" in again.err
    gw.daemon.disabling.vms["../x"] = "planted"  # even a name in the table is checked first
    # The CLI checks names itself: send the request raw, from another process.
    send = ("import json, sys; from pathlib import Path; from serialmux import controlclient; "
            "controlclient.request(Path(sys.argv[1]), json.loads(sys.argv[2]))")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", send, str(gw.daemon.config.server.runtime_dir),
        json.dumps({"cmd": "enable", "vm": "../x"}), stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(WAIT):
        _, err = await proc.communicate()
    assert proc.returncode == 1
    assert b"ControlError: a VM name is required" in err
    assert gw.daemon.disabling.vms == {"../x": "planted"}


async def test_unknown_vm_and_no_daemon(gw: Gateway, tmp_path: Path) -> None:
    """An unknown VM and a stopped daemon give exit 1 and a sentence saying what to do."""
    result = await run_cli("who", "nope-1", *cfg(gw))
    assert result.status == 1
    assert "no VM named 'nope-1'" in result.err
    lonely = tmp_path / "other.toml"
    lonely.write_text(f'[server]\nruntime_dir = "{tmp_path}/nothing"\n')
    result = await run_cli("status", "--config", str(lonely))
    assert result.status == 1
    assert "is serialmux running?" in result.err


async def test_every_action_is_audited_with_local_user(gw: Gateway) -> None:
    """Requests through the socket are audited with the local user name, uid and pid."""
    await run_cli("enable", "web-01", *cfg(gw))
    rec = await gw.wait_audit("control", cmd="enable", result="ok")
    assert rec["user"] == "root"
    assert rec["uid"] == 0
    assert rec["pid"] > 0


async def test_daemons_own_pid_is_refused(gw: Gateway) -> None:
    """A connection from the daemon's own process is refused at once, before any request."""
    assert gw.daemon is not None
    path = socket_path(gw.daemon.config.server.runtime_dir)
    reader, writer = await asyncio.open_unix_connection(str(path))  # this process is the daemon
    try:
        async with asyncio.timeout(WAIT):
            reply = json.loads(await reader.readline())
            assert await reader.read() == b""
    finally:
        writer.close()
        await writer.wait_closed()
    assert reply["ok"] is False
    assert "does not serve its own process" in reply["error"]
    await gw.wait_audit("control", pid=os.getpid(), result="refused")
    assert (await run_cli("status", *cfg(gw))).status == 0  # another process still may


async def test_accept_out_of_fds_pauses_then_serves(gw: Gateway) -> None:
    """An accept failing with EMFILE is logged once and accepting resumes after a pause: the
    caller left waiting is answered, the daemon keeps running and status works."""
    assert gw.daemon is not None
    path = str(socket_path(gw.daemon.config.server.runtime_dir))
    failed = asyncio.Event()

    def heard(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
        if event["event"] == "control_accept_failed":
            failed.set()
        return event

    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with capture_logs(processors=[heard]) as logs:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            lowest_free = os.dup(client.fileno())
            os.close(lowest_free)
            # No new fd anywhere in this process until the limit is back: the daemon's
            # accept of the connection below fails with a real EMFILE.
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
            try:
                client.connect(path)  # a UNIX connect needs no fd of ours: it queues at once
                async with asyncio.timeout(WAIT):
                    await failed.wait()
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            client.setblocking(False)
            reader, writer = await asyncio.open_unix_connection(sock=client)
            async with asyncio.timeout(WAIT):  # accepted after ACCEPT_RETRY_DELAY
                reply = json.loads(await reader.readline())
            writer.close()
            await writer.wait_closed()
    finally:
        client.close()
    assert "does not serve its own process" in reply["error"]  # served: this is the daemon
    events = [(e["event"], e.get("error")) for e in logs if e["event"].startswith("control_acc")]
    assert events == [("control_accept_failed", "EMFILE: Too many open files"),
                      ("control_accept_resumed", None)]
    assert gw._task is not None
    assert not gw._task.done()
    result = await run_cli("status", *cfg(gw))
    assert result.status == 0, result.err
    assert "web-01: up since" in result.out


async def test_port_pointed_at_control_socket_gets_nothing(
        tmp_path: Path, users: dict[str, User], vm: PtyVM) -> None:
    """A console whose port is control.sock: typing a control request there is never served."""
    vm.start()
    control = tmp_path / "run" / "control.sock"
    async with gateway(tmp_path, vms={"web-01": vm.port, "web-loop": f"unix:{control}"},
                       users={"bob": users["bob"]}, grants=[(["bob"], ["web-*"], "contributor")]
                       ) as g:
        await g.wait_audit("control", pid=os.getpid(), result="refused")
        c = await g.attach(users["bob"], "web-loop", term=False, subsystem="console")
        try:
            c.send(b'{"cmd":"attach","vm":"web-01","replay":0,"interactive":false}\n')
            await c.wait_out(b"does not serve its own process")  # the refusal, via the ring
        finally:
            await c.close()
        assert not any(r["event"] == "control" and r["result"] == "ok" for r in g.audit_events)
        assert b"cmd" not in vm.received


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory other users may traverse (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="smx-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@needs_setpriv
async def test_other_uid_is_refused(public_dir: Path, users: dict[str, User], vm: PtyVM
                                    ) -> None:
    """nobody is refused by the file modes, and by SO_PEERCRED when the modes let it in."""
    vm.start()
    async with gateway(public_dir, vms={"web-01": vm.port}, users={"alice": users["alice"]},
                       grants=[(["alice"], ["*"], "owner")]) as g:
        g.config_path.chmod(0o644)
        real = public_dir / "run" / "control.sock"
        result = await run_cli("status", "--config", str(g.config_path), prefix=NOBODY)
        assert result.status == 1
        assert "permission denied on" in result.err
        real.parent.chmod(0o751)  # traversable, and the socket open to all:
        real.chmod(0o666)  # only the daemon's own SO_PEERCRED check stands in the way
        result = await run_cli("status", "--config", str(g.config_path), prefix=NOBODY)
        assert result.status == 1
        assert "permission denied: the control socket is for root" in result.err
        await g.wait_audit("control", user="nobody", result="refused")
        assert (await run_cli("status", "--config", str(g.config_path))).status == 0


@needs_setpriv
async def test_a_process_holding_the_group_only_in_its_credentials_is_served(
        public_dir: Path, users: dict[str, User], vm: PtyVM) -> None:
    """nobody, not a member in the user database but running with the admin group among its
    own groups (SupplementaryGroups=), is served: SO_PEERGROUPS, as the socket's mode let it in."""
    vm.start()
    async with gateway(public_dir, vms={"web-01": vm.port}, users={"alice": users["alice"]},
                       grants=[(["alice"], ["*"], "owner")]) as g:
        g.config_path.chmod(0o644)
        real = public_dir / "run" / "control.sock"
        real.parent.chmod(0o751)  # traversable; the socket stays 0660 root:<admin group>
        gid = admin_gid()
        assert real.stat().st_gid == gid
        assert gid not in os.getgrouplist("nobody", pwd.getpwnam("nobody").pw_gid)
        holding = ("setpriv", "--reuid=nobody", "--regid=nogroup", f"--groups={gid}")
        result = await run_cli("status", "--config", str(g.config_path), prefix=holding)
        assert result.status == 0, result.err
        assert "web-01" in result.out
        result = await run_cli("status", "--config", str(g.config_path), prefix=NOBODY)
        assert result.status == 1
        assert "permission denied on" in result.err  # no group: the file mode stops it


RAW_REQUEST = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\\n")
print(s.makefile().readline(), end="")
"""


async def control_request(gw: Gateway, request: dict[str, Any]) -> dict[str, Any]:
    """Send one raw request line to the control socket from another process; its reply."""
    assert gw.daemon is not None
    path = socket_path(gw.daemon.config.server.runtime_dir)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", RAW_REQUEST, str(path), json.dumps(request),
        stdout=asyncio.subprocess.PIPE)
    async with asyncio.timeout(WAIT):
        out, _ = await proc.communicate()
    reply: dict[str, Any] = json.loads(out)
    return reply


async def test_kick_with_a_user_that_is_not_a_name_is_refused(
        gw: Gateway, users: dict[str, User]) -> None:
    """kick with a non-string (or empty) user is refused with a clear error, kicking nobody."""
    w = await gw.attach(users["alice"], "web-01")
    await w.wait_out(b"(writer)")
    for user in ({"a": 1}, ["alice"], 5, ""):
        reply = await control_request(gw, {"cmd": "kick", "vm": "web-01", "user": user})
        assert reply["ok"] is False
        assert "'user' must be a user name" in reply["error"]
    assert (await control_request(gw, {"cmd": "who", "vm": "web-01"}))["ok"] is True
    assert not w.closed
    assert gw.console("web-01").writer is not None
    assert not [e for e in gw.audit_events if e["event"] == "kick"]
    await w.close()


def spawn_attach(gw: Gateway, *args: str) -> pexpect.spawn:
    """The real CLI's attach on a pseudo-terminal."""
    return pexpect.spawn(str(Path(sys.executable).with_name("serialmux")),
                         ["attach", *args, "--config", str(gw.config_path)], timeout=WAIT)


async def test_attach_on_a_terminal_types_and_reads(gw: Gateway, vm: PtyVM) -> None:
    """attach shows output, sends typing, honours Ctrl-] . and restores the terminal."""
    child = spawn_attach(gw, "web-01", "--replay", "0")
    try:
        await child.expect("connected to web-01 \\(writer\\)", async_=True)
        await gw.wait_audit("attach", user="root")
        vm.write(b"guest says hi\r\n")
        await child.expect("guest says hi", async_=True)
        child.send(b"ls -l\r")
        await vm.wait_received(b"ls -l\r")
        child.send(b"\x1d.")
        await child.expect(pexpect.EOF, async_=True)
        assert b"\x1d" not in vm.received
    finally:
        close_child(child)
    assert child.exitstatus == 0


async def test_local_attach_that_stops_reading_is_bounded_then_ended(
        gw: Gateway, vm: PtyVM) -> None:
    """``serialmux attach`` whose stdout nobody reads (a stuck ForceCommand client): the
    daemon holds at most a little for it while the guest prints megabytes, and ends the
    session as stalled after stall_timeout instead of buffering the guest's output."""
    unread, stdout = os.pipe()  # the client's stdout: a pipe nobody reads
    proc = await asyncio.create_subprocess_exec(
        SERIALMUX_BIN, "attach", "web-01", "--replay", "0", *cfg(gw),
        stdin=asyncio.subprocess.PIPE, stdout=stdout, stderr=asyncio.subprocess.DEVNULL)
    os.close(stdout)
    try:
        await gw.wait_audit("attach", user="root")
        assert gw.daemon is not None
        session = next(iter(gw.daemon.sessions))
        most = 0
        for _ in range(16):  # up to 16 MiB from the guest
            await vm.send(b"".join(b"%079d\n" % i for i in range(13_107)), timeout=WAIT * 3)
            most = max(most, session.process.get_write_buffer_size())
            if session not in gw.daemon.sessions:
                break
        assert most < 1 << 20
        rec = await gw.wait_audit("detach", user="root")
        assert "stalled" in rec["reason"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        os.close(unread)


async def test_local_attach_follows_takeover_rules(gw: Gateway, users: dict[str, User],
                                                   vm: PtyVM) -> None:
    """A local attach takes over from an SSH writer; --safe refuses; --ro only watches."""
    ssh = await gw.attach(users["alice"], "web-01")
    await ssh.wait_out(b"(writer)")
    safe = spawn_attach(gw, "web-01", "--safe")
    try:
        await safe.expect("held by alice", async_=True)
        await safe.expect(pexpect.EOF, async_=True)
    finally:
        close_child(safe)
    assert safe.exitstatus == 1
    watcher = spawn_attach(gw, "web-01", "--ro")
    local = spawn_attach(gw, "web-01")
    try:
        await watcher.expect("\\(read-only\\)", async_=True)
        await local.expect("\\(writer, took over from alice@127.0.0.1\\)", async_=True)
        await ssh.wait_out(b"console taken over by root from local")
        assert await ssh.wait_closed() == 1
        local.send(b"from local\r")
        await vm.wait_received(b"from local\r")
        vm.write(b"seen by both\r\n")
        await watcher.expect("seen by both", async_=True)
        await local.expect("seen by both", async_=True)
    finally:
        close_child(local)
        close_child(watcher)


async def test_nmi_reset_sysrq_through_qmp(tmp_path: Path, users: dict[str, User],
                                           vm: PtyVM) -> None:
    """nmi, reset and sysrq through the CLI reach QMP, each audited with the local user."""
    from tests.unit.test_qmp_misbehaving import FakeQMP, serving

    vm.start()
    async with (serving(FakeQMP(tmp_path / "qmp.sock", "good")) as fake,
                gateway(tmp_path, vms={"web-01": vm.port}, users={"alice": users["alice"]},
                        grants=[(["alice"], ["*"], "owner")],
                        vm_extra={"web-01": f'qmp = "unix:{fake.path}"'}) as g):
        hv = g.console("web-01").hypervisor
        assert hv is not None
        assert await hv.wait_connected(WAIT)
        for args, expect in ((("nmi", "web-01"), "NMI sent to web-01"),
                             (("reset", "web-01"), "web-01 reset"),
                             (("sysrq", "web-01", "h"), "SysRq h sent to web-01")):
            result = await run_cli(*args, "--config", str(g.config_path))
            assert (result.status, result.err) == (0, "")
            assert expect in result.out
            await g.wait_audit("command", action=args[0], result="ok", user="root")
        sent = [name for name, _ in fake.commands]
        assert {"inject-nmi", "system_reset", "send-key"} <= set(sent)


async def test_a_config_with_errors_is_reported_never_guessed(gw: Gateway, tmp_path: Path
                                                              ) -> None:
    """reload/status with a --config that does not load exit 1 naming file, line and key, and
    reach no daemon: not the default /run/serialmux, nor a runtime_dir read from a bad file."""
    assert gw.daemon is not None
    syntax = tmp_path / "syntax.toml"
    syntax.write_text('[server]\nlisten = ["127.0.0.1:2222"\n')
    result = await run_cli("reload", "--config", str(syntax))
    assert result.status == 1
    assert re.search(rf"{re.escape(str(syntax))}:\d+: TOML syntax", result.err), result.err
    assert "/run/serialmux" not in result.err
    assert "configuration reloaded" not in result.out
    # Valid TOML naming this daemon's runtime_dir, with an error elsewhere: still not used.
    semantic = tmp_path / "semantic.toml"
    semantic.write_text(f'[server]\nruntime_dir = "{gw.daemon.config.server.runtime_dir}"\n'
                        '[vms.web-01]\nport = "ptty:/dev/pts/1"\n')
    for command in ("reload", "status"):
        result = await run_cli(command, "--config", str(semantic))
        assert result.status == 1, result.out
        assert f"{semantic}:4: vms.web-01.port: unknown port type 'ptty'" in result.err
    assert not [e for e in gw.audit_events if e["event"] in ("reload", "control")]


@pytest.mark.skipif(Path("/etc/serialmux/serialmux.toml").exists(),
                    reason="this host has a default configuration file")
async def test_status_without_config_reads_the_default_file_like_logs() -> None:
    """status without --config reads /etc/serialmux/serialmux.toml as logs does: missing, it
    says so and exits 1 instead of quietly asking /run/serialmux."""
    for args in (("status",), ("logs", "web-01")):
        result = await run_cli(*args)
        assert result.status == 1
        assert "/etc/serialmux/serialmux.toml: cannot read: No such file or directory" \
            in result.err, result.err
        assert "/run/serialmux" not in result.err


async def test_enable_leaves_a_marker_where_disable_did(gw: Gateway) -> None:
    """enable VM, and enable (all) on each VM it lets in again, write 'enabled by USER' to the
    ring as disable writes 'disabled by USER: ...'; a VM still disabled on its own, or one
    that was never disabled, gets none."""
    import pwd

    me = pwd.getpwuid(os.geteuid()).pw_name
    steps = [("disable", "web-01", "--reason", "a"), ("enable", "web-01"),
             ("enable", "web-01"),  # not disabled: nothing to mark
             ("disable", "--reason", "all down"), ("disable", "web-01", "--reason", "own"),
             ("enable",),  # web-01 stays disabled on its own: no marker
             ("enable", "web-01")]
    for step in steps:
        result = await run_cli(*step, *cfg(gw))
        assert result.status == 0, (step, result.err)
    logs = await run_cli("logs", "web-01", *cfg(gw))
    assert logs.status == 0, logs.err
    marked = re.findall(r"-- serialmux: \S+ ((?:en|dis)abled by [^-]*) --", logs.out)
    assert marked == [f"disabled by {me}: a", f"enabled by {me}", f"disabled by {me}: all down",
                      f"disabled by {me}: own", f"enabled by {me}"]


async def test_kick_with_nobody_to_kick_says_so(gw: Gateway) -> None:
    """kick on a console nobody types on says there was nothing to disconnect (it said
    "disconnected 0 session(s)"); naming a user who is not attached says that."""
    result = await run_cli("kick", "web-01", *cfg(gw))
    assert (result.status, result.out.strip()) == (
        0, "nobody is typing on web-01: nothing to disconnect")
    result = await run_cli("kick", "web-01", "--user", "bob", *cfg(gw))
    assert result.out.strip() == "bob is not attached to web-01: nothing to disconnect"


async def test_local_logs_refuses_a_negative_line_count(gw: Gateway) -> None:
    """serialmux logs -n -5 is a usage error (exit 2), as it is over SSH; it printed nothing."""
    result = await run_cli("logs", "web-01", "-n", "-5", *cfg(gw))
    assert result.status == 2
    assert "-5 is not in the range x>=0" in result.err
