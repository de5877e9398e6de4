"""The console gateway over real SSH: bytes, takeover, roles, refusals, port loss, break."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import re
import select
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from structlog.testing import capture_logs

from tests.support import WAIT, Gateway, PtyVM, RawSession, SocketVM, User, gateway

ALL_BYTES = bytes(range(256))


async def test_subsystem_is_byte_exact_both_ways(gw: Gateway, users: dict[str, User],
                                                 vm: PtyVM) -> None:
    """The console subsystem carries all 256 byte values unchanged in both directions."""
    c = await gw.attach(users["alice"], "web-01+replay=0", subsystem="console")
    await gw.wait_audit("attach", user="alice")
    vm.write(ALL_BYTES * 4)
    await c.wait_out(ALL_BYTES * 4)
    assert bytes(c.out) == ALL_BYTES * 4
    c.send(ALL_BYTES * 4)
    await vm.wait_received(ALL_BYTES * 4)
    assert bytes(vm.received) == ALL_BYTES * 4
    await c.close()


async def test_interactive_session_passes_all_bytes_with_escape_doubled(
        gw: Gateway, users: dict[str, User], vm: PtyVM) -> None:
    """A PTY session sends every byte; ^] ^] reaches the VM as one ^]."""
    c = await gw.attach(users["alice"], "web-01+replay=0")
    await c.wait_out(b"connected to web-01 (writer)")
    c.send(ALL_BYTES.replace(b"\x1d", b"\x1d\x1d"))
    await vm.wait_received(ALL_BYTES)
    assert bytes(vm.received) == ALL_BYTES
    await c.close()


async def test_takeover_notifies_and_closes_previous_writer(
        gw: Gateway, users: dict[str, User], vm: PtyVM) -> None:
    """A second writer takes over; the first is told who, from where, when, and closed; the
    second is told whom it displaced."""
    first = await gw.attach(users["alice"], "web-01")
    await gw.wait_audit("attach", user="alice")
    second = await gw.attach(users["bob"], "web-01")
    await second.wait_out(b"connected to web-01 (writer, took over from alice@127.0.0.1)")
    await first.wait_out(re.compile(
        rb"console taken over by bob from 127\.0\.0\.1 at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d"))
    assert await first.wait_closed() == 1
    await gw.wait_audit("takeover", user="bob", previous_user="alice")
    second.send(b"bob types\r")
    await vm.wait_received(b"bob types\r")
    assert gw.console("web-01").writer.identity.user == "bob"
    await second.close()


async def test_safe_refuses_when_someone_is_typing(gw: Gateway, users: dict[str, User]) -> None:
    """+safe does not take over: it names who holds the console and since when."""
    holder = await gw.attach(users["alice"], "web-01")
    await gw.wait_audit("attach", user="alice")
    refused = await gw.attach(users["bob"], "web-01+safe")
    assert await refused.wait_closed() == 1
    assert re.search(rb"held by alice from 127\.0\.0\.1 since \d{4}-", refused.err)
    assert gw.console("web-01").writer.identity.user == "alice"
    assert not holder.closed
    await holder.close()


async def test_safe_attaches_when_console_is_free(gw: Gateway, users: dict[str, User],
                                                  vm: PtyVM) -> None:
    """+safe on a free console makes you the writer."""
    c = await gw.attach(users["bob"], "web-01+safe")
    await c.wait_out(b"(writer)")
    c.send(b"x")
    await vm.wait_received(b"x")
    await c.close()


async def test_read_only_option_input_has_no_effect(gw: Gateway, users: dict[str, User],
                                                    vm: PtyVM) -> None:
    """+ro watches: output arrives, typing is not sent, the writer is not displaced."""
    writer = await gw.attach(users["alice"], "web-01")
    await gw.wait_audit("attach", user="alice")
    watcher = await gw.attach(users["bob"], "web-01+ro")
    await watcher.wait_out(b"(read-only)")
    watcher.send(b"should-not-arrive")
    await watcher.wait_out(b"input is not sent")
    writer.send(b"marker")
    await vm.wait_received(b"marker")
    assert b"should-not-arrive" not in vm.received
    vm.write(b"both see this\r\n")
    await watcher.wait_out(b"both see this")
    await writer.wait_out(b"both see this")
    assert not writer.closed
    await writer.close()
    await watcher.close()


async def test_reader_role_cannot_write(gw: Gateway, users: dict[str, User], vm: PtyVM) -> None:
    """A reader is attached read-only whatever the login options say."""
    c = await gw.attach(users["carol"], "web-01")
    await c.wait_out(b"(read-only)")
    c.send(b"carol-typed")
    await c.wait_out(b"input is not sent")
    vm.write(b"visible\r\n")
    await c.wait_out(b"visible")
    assert b"carol-typed" not in vm.received
    assert gw.console("web-01").writer is None
    await c.close()


async def test_unknown_key_is_refused(gw: Gateway, users: dict[str, User]) -> None:
    """A key bound to no user fails authentication, audited with its fingerprint."""
    with pytest.raises(asyncssh.PermissionDenied):
        await gw.connect(users["mallory"], "web-01")
    rec = await gw.wait_audit("auth_failure", reason="unknown key")
    assert rec["fingerprint"] == users["mallory"].key.get_fingerprint("sha256")


async def test_no_grant_and_unknown_vm_get_the_same_refusal(
        tmp_path: Path, users: dict[str, User], vm: PtyVM) -> None:
    """Without a grant, an existing VM and a missing one are refused in the same words."""
    vm.start()
    async with gateway(tmp_path, vms={"db-01": vm.port}, users={"bob": users["bob"]},
                       grants=[(["bob"], ["web-*"], "contributor")]) as g:
        existing = await g.attach(users["bob"], "db-01")
        missing = await g.attach(users["bob"], "nope-99")
        assert await existing.wait_closed() == 1
        assert await missing.wait_closed() == 1
        assert existing.err == missing.err
        assert b"access denied" in existing.err
        await g.wait_audit("refused", vm="db-01", user="bob")


async def test_unknown_login_option_is_refused_clearly(gw: Gateway,
                                                       users: dict[str, User]) -> None:
    """An unknown +option is refused with the list of valid options."""
    c = await gw.attach(users["alice"], "web-01+turbo")
    assert await c.wait_closed() == 2
    assert b"unknown option 'turbo'" in c.err
    assert b"ro (watch only)" in c.err


async def test_exec_of_arbitrary_command_is_refused(gw: Gateway,
                                                    users: dict[str, User]) -> None:
    """There is no shell: an exec request that is not a gateway command is refused."""
    conn = await gw.connect(users["alice"], "web-01")
    result = await conn.run("rm -rf /", encoding=None)
    assert result.exit_status == 2
    assert b"there is no shell here" in result.stderr
    conn.close()


async def test_port_forwarding_is_refused(gw: Gateway, users: dict[str, User]) -> None:
    """Local (direct-tcpip) and remote (tcpip-forward) forwarding are both refused."""
    conn = await gw.connect(users["alice"], "web-01")
    with pytest.raises(asyncssh.ChannelOpenError):
        await conn.open_connection("127.0.0.1", gw.port)
    with pytest.raises(asyncssh.ChannelListenError):
        await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", 22)
    with pytest.raises(asyncssh.ChannelOpenError):
        await conn.open_unix_connection("/run/anything.sock")
    conn.close()


async def test_other_subsystems_are_refused(gw: Gateway, users: dict[str, User]) -> None:
    """sftp (or any subsystem but 'console') is refused."""
    conn = await gw.connect(users["alice"], "web-01")
    with pytest.raises((asyncssh.SFTPError, asyncssh.ChannelOpenError, asyncssh.ProcessError,
                        asyncssh.ConnectionLost, OSError)):
        async with conn.start_sftp_client():
            pass
    process = await conn.create_process(subsystem="shell", encoding=None)
    await process.wait_closed()
    assert process.exit_status == 1
    conn.close()


async def test_escape_help_and_disconnect(gw: Gateway, users: dict[str, User],
                                          vm: PtyVM) -> None:
    """^] ? lists the escapes; ^] . disconnects; neither reaches the VM."""
    c = await gw.attach(users["alice"], "web-01")
    await c.wait_out(b"(writer)")
    c.send(b"\x1d?")
    await c.wait_out(b"disconnect")
    c.send(b"abc\x1d.")
    await c.wait_out(b"disconnected")
    assert await c.wait_closed() == 0
    await vm.wait_received(b"abc")
    assert bytes(vm.received) == b"abc"


async def test_vm_port_vanishing_and_returning_keeps_client(
        tmp_path: Path, users: dict[str, User], sockets: Callable[..., SocketVM]) -> None:
    """The socket VM goes away and comes back: the attached client is told and keeps going."""
    sock = sockets("vm.sock")
    await sock.start()
    async with gateway(tmp_path, vms={"web-01": sock.port}, users={"alice": users["alice"]},
                       grants=[(["alice"], ["*"], "owner")]) as g:
        await sock.wait_connected()
        c = await g.attach(users["alice"], "web-01")
        await c.wait_out(b"(writer)")
        sock.write(b"before\r\n")
        await c.wait_out(b"before")
        await sock.stop()
        await c.wait_out(b"web-01 console is down")
        await sock.start()
        await sock.wait_connected(timeout=15)
        await c.wait_out(b"web-01 console is up")
        sock.write(b"after\r\n")
        await c.wait_out(b"after")
        c.send(b"still typing")
        await sock.wait_received(b"still typing")
        await c.close()


async def test_pty_vm_stopping_marks_console_down(gw: Gateway, users: dict[str, User],
                                                  vm: PtyVM) -> None:
    """When the PTY's other side closes (EOF/EIO), clients see a down notice."""
    c = await gw.attach(users["alice"], "web-01")
    await c.wait_out(b"(writer)")
    vm.close()
    await c.wait_out(b"web-01 console is down")
    assert not gw.console("web-01").up
    c.send(b"lost")
    await c.wait_out(b"console is down; input discarded")
    await c.close()


async def test_absent_vm_can_be_attached_and_shows_output_when_it_starts(
        tmp_path: Path, users: dict[str, User], sockets: Callable[..., SocketVM]) -> None:
    """Attaching to a VM that is not running works; its first output then appears."""
    sock = sockets("later.sock")
    async with gateway(tmp_path, vms={"web-01": sock.port}, users={"alice": users["alice"]},
                       grants=[(["alice"], ["*"], "owner")]) as g:
        c = await g.attach(users["alice"], "web-01")
        await c.wait_out(b"web-01 is not running")
        await sock.start()
        await sock.wait_connected(timeout=15)
        sock.write(b"early boot line\r\n")
        await c.wait_out(b"early boot line")
        await c.close()


async def test_ssh_break_request_reaches_telnet_port(
        tmp_path: Path, users: dict[str, User], sockets: Callable[..., SocketVM]) -> None:
    """An SSH break request becomes IAC BRK on a telnet-framed socket port."""
    sock = sockets("tel.sock", telnet=True)
    await sock.start()
    async with gateway(tmp_path, vms={"web-01": sock.port}, users={"alice": users["alice"]},
                       grants=[(["alice"], ["*"], "owner")]) as g:
        await sock.wait_connected()
        c = await g.attach(users["alice"], "web-01")
        await c.wait_out(b"(writer)")
        c.send(b"\xffx")
        await sock.wait_received(b"\xff\xffx")  # 0xFF escaped by the telnet framing
        c.process.channel.send_break(250)
        await sock.wait_received(b"\xff\xf3")
        await c.wait_out(b"BREAK sent to web-01")
        await g.wait_audit("command", action="break", result="ok")
        await c.close()


async def test_telnet_port_output_is_the_guests_bytes_after_qemus_negotiation(
        tmp_path: Path, users: dict[str, User], sockets: Callable[..., SocketVM]) -> None:
    """A telnet-framed port as QEMU serves it: the opening IAC WILL/DO triples are stripped,
    and every later byte is the guest's, 0xFF included (QEMU does not escape its output)."""
    sock = sockets("tel.sock", telnet=True)
    await sock.start()
    async with gateway(tmp_path, vms={"web-01": sock.port}, users={"alice": users["alice"]},
                       grants=[(["alice"], ["*"], "owner")]) as g:
        await sock.wait_connected()
        # QEMU's tcp_chr_telnet_init: WILL ECHO, WILL SGA, WILL BINARY, DO BINARY; split
        # across two writes, as a read may split it.
        sock.write(b"\xff\xfb\x01\xff\xfb\x03\xff")
        c = await g.attach(users["alice"], "web-01+replay=0")
        await c.wait_out(b"(writer)")
        sock.write(b"\xfb\x00\xff\xfd\x00")
        printed = b"A\xff\xfexB\xff\xffC\xff\xfb\x01D\r\n"
        sock.write(printed)
        await c.wait_out(b"D\r\n")
        assert c.out.endswith(printed)
        assert b"\xfb\x01\xff\xfb" not in c.out.replace(printed, b"")  # no negotiation shown
        await c.close()


async def test_ssh_break_request_on_pty_is_sent_and_audited(gw: Gateway,
                                                            users: dict[str, User]) -> None:
    """An SSH break on a PTY port calls tcsendbreak and is audited (a PTY shows no BREAK)."""
    c = await gw.attach(users["alice"], "web-01")
    await c.wait_out(b"(writer)")
    c.process.channel.send_break(250)
    await c.wait_out(b"BREAK sent to web-01")
    await gw.wait_audit("command", action="break", result="ok", user="alice")
    await c.close()


async def test_reader_break_request_is_refused(gw: Gateway, users: dict[str, User]) -> None:
    """A reader's break request is refused and audited."""
    c = await gw.attach(users["carol"], "web-01")
    await c.wait_out(b"(read-only)")
    c.process.channel.send_break(250)
    await c.wait_out(b"needs the contributor or owner role")
    await gw.wait_audit("command", action="break", result="refused", user="carol")
    await c.close()


async def test_audit_events_are_json_with_session_and_peer(gw: Gateway,
                                                           users: dict[str, User]) -> None:
    """connect, auth_success, attach and detach are audited with session id and peer."""
    c = await gw.attach(users["alice"], "web-01")
    await c.wait_out(b"(writer)")
    await c.close()
    detach = await gw.wait_audit("detach", user="alice")
    for name in ("connect", "auth_success", "attach"):
        rec = await gw.wait_audit(name, session=detach["session"])
        assert rec["peer"].startswith("127.0.0.1:")
        json.dumps(rec)
    assert {"bytes_in", "bytes_out", "duration"} <= detach.keys()


async def test_many_watchers_all_see_output(gw: Gateway, users: dict[str, User],
                                            vm: PtyVM) -> None:
    """Any number of watchers see the same output."""
    watchers = [await gw.attach(users["carol"], "web-01") for _ in range(5)]
    for w in watchers:
        await w.wait_out(b"(read-only)")
    vm.write(b"broadcast\r\n")
    for w in watchers:
        await w.wait_out(b"broadcast")
    await asyncio.gather(*(w.close() for w in watchers))


async def test_tcp_port_carries_bytes_both_ways(tmp_path: Path, users: dict[str, User]) -> None:
    """A tcp:HOST:PORT console (ser2net-style or QEMU tcp chardev) works both ways."""
    got = bytearray()
    arrived = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    async def guest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        writer.write(b"tcp guest says hi\r\n")
        while data := await reader.read(1024):
            got.extend(data)
            arrived.set()

    server = await asyncio.start_server(guest, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with gateway(tmp_path, vms={"web-01": f"tcp:127.0.0.1:{port}"},
                           users={"alice": users["alice"]},
                           grants=[(["alice"], ["*"], "owner")]) as g:
            c = await g.attach(users["alice"], "web-01", subsystem="console")
            await c.wait_out(b"tcp guest says hi")
            c.send(b"typed over tcp")
            async with asyncio.timeout(10):
                while b"typed over tcp" not in got:
                    arrived.clear()
                    await arrived.wait()
            await c.close()
    finally:
        for w in writers:
            w.close()
        server.close()
        await server.wait_closed()


async def test_socket_port_waits_for_a_writer_that_keeps_up(tmp_path: Path,
                                                            users: dict[str, User]) -> None:
    """Flow control on a socket port, on both loops (uvloop's transports are no
    asyncio.ReadTransports): while the writer's client is behind, the port is not read and
    the guest waits; the writer misses nothing."""
    vm = SocketVM(tmp_path / "vm.sock")
    await vm.start()
    async with gateway(tmp_path, vms={"web-01": vm.port}, users={"alice": users["alice"]},
                       grants=[(["alice"], ["*"], "owner")]) as g:
        conn = await g.connect(users["alice"], "web-01+replay=0")
        chan, session = await conn.create_session(RawSession, subsystem="console",
                                                  encoding=None, window=64 * 1024)
        await g.wait_audit("attach", user="alice")
        vm.write(b"ready\n")
        await session.wait_out_end(b"ready\n")
        console = g.console("web-01")
        chan.pause_reading()
        payload = b"".join(b"%07d %s\n" % (i, b"s" * 71) for i in range(100_000))  # 8 MB
        vm.write(payload)
        async with asyncio.timeout(WAIT):
            while not console.flow_paused:
                await console.backlog.wait_beyond(console.backlog.end)
        chan.resume_reading()
        await session.wait_out_end(payload[-80:])
        assert bytes(session.out) == b"ready\n" + payload
        assert b"skipped" not in session.err
        chan.close()
    await vm.stop()


def _peer_closed(sock: socket.socket) -> bool:
    """Whether the other end of *sock* has closed, without reading what is queued."""
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP)
    return bool(poller.poll(0))


@pytest.mark.parametrize("kind", ["unix", "listen:unix"])
async def test_hung_socket_guest_is_closed_at_once_when_its_console_stops(
        kind: str, tmp_path: Path, users: dict[str, User]) -> None:
    """A socket guest (QEMU server or client) that stopped reading, typing queued in the
    daemon's transport: a reload reopening its port drops the typing and closes it at once."""
    path = tmp_path / "vm.sock"
    loop = asyncio.get_running_loop()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.setblocking(False)
    guest: socket.socket | None = None
    if kind == "unix":  # QEMU -chardev socket,server=on: the daemon connects
        listener.bind(str(path))
        listener.listen()
    try:
        async with gateway(tmp_path, vms={"web-01": f"{kind}:{path}"},
                           users={"alice": users["alice"]},
                           grants=[(["alice"], ["*"], "owner")]) as g:
            assert g.daemon is not None
            async with asyncio.timeout(10):
                if kind == "unix":
                    guest, _ = await loop.sock_accept(listener)
                else:  # QEMU server=off: it connects to the daemon's socket
                    await g.console("web-01").port.tried.wait()
                    guest = listener
                    await loop.sock_connect(guest, str(path))
            c = await g.attach(users["alice"], "web-01+replay=0", subsystem="console")
            await g.wait_audit("attach", user="alice")
            guest.send(b"ready\n")
            await c.wait_out(b"ready\n")  # the daemon reads this connection
            protocol = g.console("web-01").port._protocol
            assert protocol is not None
            transport: Any = protocol.transport  # uvloop's is no asyncio.WriteTransport
            c.send(b"k" * 4 * 1024 * 1024)  # the guest never reads: beyond both socket buffers
            async with asyncio.timeout(10):  # nothing signals it: re-check every 10 ms
                while not transport.get_write_buffer_size():
                    await asyncio.sleep(0.01)
            assert not _peer_closed(guest)
            if kind == "unix":
                g.vms = {"web-01": f"unix:{tmp_path / 'elsewhere.sock'}"}
            else:  # reopens the port (a ring_size change alone no longer does)
                g.vm_extra = {"web-01": "baud = 9600"}
            g.config_path.write_text(g.toml())
            assert await g.daemon.reload("test")
            assert _peer_closed(guest)  # the reload waited for the close; nothing was drained
            assert transport.get_write_buffer_size() == 0
            await c.close()
    finally:
        if guest is not None and guest is not listener:
            guest.close()
        listener.close()


async def test_listen_socket_in_missing_directory_waits_for_it(
        tmp_path: Path, users: dict[str, User], vm: PtyVM) -> None:
    """A listen:unix: console whose directory does not exist yet does not stop the daemon: it
    says why it is down, listens by itself once the directory appears (no reload), on a
    socket its directory's group may connect to, and then says it waits for QEMU instead of
    the stale reason, and again once QEMU has left."""
    vm.start()
    path = tmp_path / "later" / "vm.sock"
    listening = asyncio.Event()

    def heard(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
        if event["event"] == "port_listening" and event.get("vm") == "web-02":
            listening.set()
        return event

    with capture_logs(processors=[heard]):
        async with gateway(tmp_path, vms={"web-01": vm.port, "web-02": f"listen:unix:{path}"},
                           users={"alice": users["alice"]},
                           grants=[(["alice"], ["*"], "owner")]) as g:
            other = await g.attach(users["alice"], "web-01")
            await other.wait_out(b"(writer)")
            vm.write(b"web-01 still served\r\n")
            await other.wait_out(b"web-01 still served")
            c = await g.attach(users["alice"], "web-02")
            await c.wait_out(f"web-02 is not running (cannot listen on {path}: ENOENT".encode())
            assert "does its directory exist?" in g.console("web-02").down_reason
            assert not listening.is_set()
            path.parent.mkdir()
            qemu_group = pwd.getpwnam("nobody").pw_gid  # stands for QEMU's user's group
            os.chown(path.parent, -1, qemu_group)
            os.chmod(path.parent, 0o2750)  # noqa: S103  # setgid: its group passes to the socket
            async with asyncio.timeout(WAIT):  # the port's own backoff, at most BACKOFF_MAX
                await listening.wait()
            st = os.stat(path)  # QEMU's group may connect (write), others not at all
            assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, qemu_group)
            waiting = f"listening on {path}; QEMU has not connected yet"
            assert g.console("web-02").down_reason == waiting  # not the old ENOENT
            await c.wait_out(waiting.encode())
            reader, writer = await asyncio.open_unix_connection(str(path))  # QEMU connects
            try:
                await c.wait_out(b"web-02 console is up")
                writer.write(b"booted after the directory appeared\r\n")
                await c.wait_out(b"booted after the directory appeared")
                c.send(b"typed")
                async with asyncio.timeout(WAIT):
                    assert await reader.readexactly(5) == b"typed"
            finally:
                writer.close()
            # QEMU goes away: the console says it listens for it again, not just "end of file".
            await c.wait_out(b"web-02 console is down (end of file")
            again = f"listening on {path} for QEMU to connect again"
            assert g.console("web-02").down_reason.endswith(again)
            status = await g.connect(users["alice"], "web-02")
            result = await status.run("status", encoding=None)
            assert again.encode() in result.stdout
            status.close()
            await c.close()
            await other.close()


async def test_missing_host_key_is_created_ed25519_0600(gw: Gateway) -> None:
    """A host key that does not exist is created: ed25519, readable by its owner only."""
    path = gw.tmp / "host_key"
    assert path.stat().st_mode & 0o777 == 0o600
    key = asyncssh.read_private_key(str(path))
    assert key.algorithm == b"ssh-ed25519"
    conn = await gw.connect(gw.users["alice"], "web-01")
    assert conn.get_server_host_key().public_data == key.public_data
    conn.close()


async def test_a_port_that_opens_after_failing_says_so_in_the_log(
        tmp_path: Path, users: dict[str, User], sockets: Callable[..., SocketVM]) -> None:
    """A port whose open failed (its socket not there yet) logs port_recovered, with what it
    said before, once it opens: a log read after an outage shows the console came back."""
    vm = sockets("late.sock")
    heard: list[dict[str, Any]] = []
    recovered = asyncio.Event()

    def listen(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
        if event["event"] == "port_recovered" and event.get("vm") == "web-01":
            heard.append(event)
            recovered.set()
        return event

    with capture_logs(processors=[listen]):
        async with gateway(tmp_path, vms={"web-01": vm.port}, users={"alice": users["alice"]},
                           grants=[(["alice"], ["*"], "owner")]) as g:
            # The reason names what could not be opened: "unix:PATH: ENOENT: ...".
            assert g.console("web-01").down_reason == \
                f"unix:{vm.path}: ENOENT: No such file or directory"
            await vm.start()
            g.console("web-01").port.retry_now()
            async with asyncio.timeout(WAIT):
                await recovered.wait()
            assert "ENOENT" in heard[0]["was"]
            assert g.console("web-01").up


async def test_a_pty_path_that_is_not_there_is_named_in_the_reason(
        tmp_path: Path, users: dict[str, User]) -> None:
    """A pty: path that does not exist: the console's reason names the path and says ENOENT
    as the OS does (it said "no such device" and no path)."""
    path = tmp_path / "vm-com1"
    async with gateway(tmp_path, vms={"web-01": f"pty:{path}"}, users={"alice": users["alice"]},
                       grants=[(["alice"], ["*"], "owner")]) as g:
        assert g.console("web-01").down_reason == f"{path}: ENOENT: No such file or directory"


async def test_repeated_refused_escapes_are_audited_sparingly(gw: Gateway,
                                                              users: dict[str, User]) -> None:
    """A reader typing ^] b 1000 times: a bounded number of `command` refused events whose
    counts (1 each, or suppressed=N) add up to 1000 by detach."""
    c = await gw.attach(users["carol"], "web-01+replay=0")
    await c.wait_out(b"(read-only)")
    c.send(b"\x1db" * 1000 + b"\x1d.")
    await gw.wait_audit("detach", user="carol")
    refused = [e for e in gw.audit_events if e["event"] == "command" and e["user"] == "carol"]
    assert all(e["action"] == "break" and e["result"] == "refused" for e in refused)
    assert len(refused) <= 5, len(refused)
    assert sum(e.get("suppressed", 1) for e in refused) == 1000
    await c.close()


async def test_an_action_is_told_to_everyone_else_attached(
        tmp_path: Path, users: dict[str, User], sockets: Callable[..., SocketVM]) -> None:
    """alice's BREAK (an escape, then an exec command) is a notice to carol watching and, for
    the exec, to alice's own console session; the session that typed it is not told twice."""
    sock = sockets("tel.sock", telnet=True)
    await sock.start()
    async with gateway(tmp_path, vms={"web-01": sock.port},
                       users={n: users[n] for n in ("alice", "carol")},
                       grants=[(["alice"], ["*"], "owner"), (["carol"], ["*"], "reader")]) as g:
        await sock.wait_connected()
        alice = await g.attach(users["alice"], "web-01+replay=0")
        carol = await g.attach(users["carol"], "web-01+ro+replay=0")
        await carol.wait_out(b"(read-only)")
        alice.send(b"\x1db")
        await alice.wait_out(b"BREAK sent to web-01")
        await carol.wait_out(b"[serialmux: BREAK sent by alice]")
        # An exec on the console session's own connection (OpenSSH ControlMaster) too.
        result = await alice.conn.run("break", encoding=None)
        assert result.exit_status == 0, result.stderr
        await carol.wait_out(re.compile(rb"(BREAK sent by alice\].*){2}", re.S))
        await alice.wait_out(b"[serialmux: BREAK sent by alice]")
        assert alice.out.count(b"BREAK sent by alice") == 1  # the exec's, not the escape's
        await alice.close()
        await carol.close()
