"""The data path under load: flood reading, flow control, and the shortcuts for typing and echo."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable
from pathlib import Path

import asyncssh
import pytest

from serialmux import console as console_mod
from serialmux.floodread import FloodReader
from serialmux.ring import Record, RecordKind, RingReader
from tests.support import WAIT, Client, Gateway, PtyVM, RawSession, User, gateway


def _payload(lines: int, fill: str = "f") -> bytes:
    return b"".join(f"{i:07d} {fill * 71}\n".encode() for i in range(lines))


async def _writer(gw: Gateway, user: User, *, window: int = 2 * 1024 * 1024
                  ) -> tuple[asyncssh.SSHClientChannel[bytes], RawSession]:
    conn = await gw.connect(user, "web-01+replay=0")
    chan, session = await conn.create_session(RawSession, subsystem="console", encoding=None,
                                              window=window)
    await gw.wait_audit("attach", user=user.name)
    return chan, session


async def _caught_up(gw: Gateway, session: RawSession, vm: PtyVM) -> None:
    """Print one line and wait for it: the writer has kept up with live output once."""
    vm.write(b"ready\n")
    await session.wait_out_end(b"ready\n")
    assert gw.console("web-01").writer.flow


async def test_flood_is_read_in_a_thread_and_arrives_whole(gw: Gateway, users: dict[str, User],
                                                           vm: PtyVM) -> None:
    """A guest flooding its PTY is read by a flood thread; the writer gets every byte in
    order, the ring the newest part exactly, and the thread ends when the flood does."""
    chan, session = await _writer(gw, users["alice"])
    await _caught_up(gw, session, vm)
    started = FloodReader.started
    payload = _payload(100_000)  # 8 MB, far beyond N_TTY's 4 KiB a read
    console = gw.console("web-01")
    seq_before = console.ring.next_seq
    await vm.send(payload, timeout=120)
    await session.wait_out_end(payload[-80:])
    assert bytes(session.out) == b"ready\n" + payload
    assert b"skipped" not in session.err
    assert FloodReader.started > started
    with RingReader(console.ring.path) as reader:
        got = b"".join(r.payload for r in reader.records(seq_before)
                       if isinstance(r, Record) and r.kind is RecordKind.OUTPUT)
    assert len(got) > 900_000
    assert got == payload[-len(got):]
    async with asyncio.timeout(WAIT):  # quiet for floodread.IDLE: the loop reads again
        while FloodReader.active:
            await asyncio.sleep(0.02)
    vm.write(b"after the flood\n")
    await session.wait_out_end(b"after the flood\n")
    chan.close()


async def test_port_waits_for_a_writer_that_keeps_up(gw: Gateway, users: dict[str, User],
                                                     vm: PtyVM) -> None:
    """While the writer's client is briefly behind, the port is not read (the guest waits,
    as on a serial line with flow control) and the writer misses nothing."""
    chan, session = await _writer(gw, users["alice"], window=64 * 1024)
    await _caught_up(gw, session, vm)
    console = gw.console("web-01")
    chan.pause_reading()
    payload = _payload(12_000)  # ~1 MB: four times the backlog
    sending = asyncio.ensure_future(vm.send(payload, timeout=60))
    try:
        async with asyncio.timeout(WAIT):
            while not console.flow_paused:
                await console.backlog.wait_beyond(console.backlog.end)
        assert console.bytes_read < len(payload)
        chan.resume_reading()
        await session.wait_out_end(payload[-80:])
        await sending
    finally:
        sending.cancel()
    assert bytes(session.out) == b"ready\n" + payload
    assert b"skipped" not in session.err
    assert not console.flow_paused
    chan.close()


async def test_a_writer_that_stops_reading_is_skipped_not_waited_for(
        gw: Gateway, users: dict[str, User], vm: PtyVM, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flow control waits for a stalled writer only FLOW_PAUSE_MAX: then the port is read
    on (the ring gets everything) and the writer is told what it skipped."""
    monkeypatch.setattr(console_mod, "FLOW_PAUSE_MAX", 0.3)
    chan, session = await _writer(gw, users["alice"], window=64 * 1024)
    await _caught_up(gw, session, vm)
    console = gw.console("web-01")
    chan.pause_reading()
    payload = _payload(12_000)
    await vm.send(payload, timeout=60)  # completes only because the port stopped waiting
    async with asyncio.timeout(WAIT):
        while console.bytes_read < len(b"ready\n") + len(payload):
            await console.backlog.wait_beyond(console.backlog.end)
    assert not console.writer.flow  # not waited for again until it catches up
    chan.resume_reading()
    async with asyncio.timeout(WAIT):
        while not re.search(rb"serialmux: \d+ bytes skipped; see logs", session.err):
            session.changed.clear()
            await session.changed.wait()
    await session.wait_out_end(payload[-80:])
    skipped = int(re.search(rb"(\d+) bytes skipped", session.err).group(1))
    assert len(session.out) + skipped == len(b"ready\n") + len(payload)
    chan.close()


async def test_watchers_never_hold_the_port(gw: Gateway, users: dict[str, User],
                                            vm: PtyVM) -> None:
    """A read-only watcher that stops reading never pauses the port: it skips ahead."""
    conn = await gw.connect(users["carol"], "web-01+replay=0")
    chan, session = await conn.create_session(RawSession, subsystem="console", encoding=None,
                                              window=64 * 1024)
    await gw.wait_audit("attach", user="carol")
    vm.write(b"ready\n")
    await session.wait_out_end(b"ready\n")
    chan.pause_reading()
    console = gw.console("web-01")
    payload = _payload(12_000)
    await vm.send(payload, timeout=60)
    async with asyncio.timeout(WAIT):
        while console.bytes_read < len(b"ready\n") + len(payload):
            await console.backlog.wait_beyond(console.backlog.end)
    assert not console.flow_paused
    chan.close()


async def test_stopping_mid_flood_ends_the_thread(gw: Gateway, users: dict[str, User],
                                                  vm: PtyVM) -> None:
    """Stopping the daemon while a guest floods ends the flood thread and closes its fd."""
    _chan, session = await _writer(gw, users["alice"])
    await _caught_up(gw, session, vm)
    flooding = asyncio.ensure_future(vm.send(_payload(1_000_000), timeout=120))  # endless
    try:
        async with asyncio.timeout(WAIT):
            while not FloodReader.active:
                await asyncio.sleep(0.01)
        await gw.stop()
    finally:
        flooding.cancel()
    assert FloodReader.active == 0
    assert not [t for t in threading.enumerate() if t.name.startswith("serialmux-flood-")]


async def test_no_cbc_era_ignore_packets(gw: Gateway, users: dict[str, User], vm: PtyVM,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The server sends no empty SSH_MSG_IGNORE before each packet (asyncssh's CBC
    countermeasure; no CBC cipher is offered): one packet per chunk of output."""
    from asyncssh.connection import SSHClientConnection, SSHConnection

    ignores = 0
    original = SSHConnection._packet_handlers[2]  # MSG_IGNORE

    def counting(self: SSHConnection, *args: object) -> None:
        nonlocal ignores
        if isinstance(self, SSHClientConnection):  # received from the server
            ignores += 1
        original(self, *args)

    monkeypatch.setitem(SSHConnection._packet_handlers, 2, counting)
    chan, session = await _writer(gw, users["alice"])
    for i in range(20):
        vm.write(f"line {i}\n".encode())
        await session.wait_out_end(f"line {i}\n".encode())
    assert ignores == 0
    chan.close()


async def test_flood_without_a_thread_is_read_by_the_loop(
        gw: Gateway, users: dict[str, User], vm: PtyVM, monkeypatch: pytest.MonkeyPatch) -> None:
    """When no flood thread can be started (out of threads), the loop reads the flood itself
    and nothing is lost or stalled."""
    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    chan, session = await _writer(gw, users["alice"])
    await _caught_up(gw, session, vm)
    started = FloodReader.started
    payload = _payload(20_000)
    await vm.send(payload, timeout=60)
    await session.wait_out_end(payload[-80:])
    assert bytes(session.out) == b"ready\n" + payload
    assert FloodReader.started == started
    assert FloodReader.active == 0
    chan.close()


async def test_typing_keeps_its_order_when_the_port_is_full(
        gw: Gateway, users: dict[str, User], vm: PtyVM) -> None:
    """Typing goes straight to the port while it takes it, and queues in order behind
    what the port could not take yet: the guest gets every byte once, in order."""
    chan, session = await _writer(gw, users["alice"])
    await _caught_up(gw, session, vm)
    loop = asyncio.get_running_loop()
    loop.remove_reader(vm.master)  # the guest stops reading: the PTY and then the port fill
    typed = b"".join(f"{i:06d}:typed;".encode() for i in range(40_000))  # 520 KB
    for start in range(0, len(typed), 1000):
        chan.write(typed[start:start + 1000])
    async with asyncio.timeout(WAIT):
        while gw.console("web-01").port._protocol.writable:
            await asyncio.sleep(0.01)
    loop.add_reader(vm.master, vm._readable)  # the guest reads again
    await vm.wait_received(typed[-13:], timeout=WAIT * 3)
    assert bytes(vm.received) == typed
    chan.close()


@pytest.mark.timeout(60)
async def test_typing_into_a_full_port_one_key_at_a_time_keeps_the_daemon_running(
        gw: Gateway, users: dict[str, User], vm: PtyVM) -> None:
    """A hung guest stops reading its port while a user types key by key: once the PTY is
    exactly full the next key waits in the daemon (pyserial's own write would spin on
    EAGAIN for ever), output still arrives, and the guest gets every key in order later."""
    chan, session = await _writer(gw, users["alice"])
    await _caught_up(gw, session, vm)
    loop = asyncio.get_running_loop()
    loop.remove_reader(vm.master)  # the hung guest: its input fills the PTY
    keys = b"".join(f"{i:05d}.".encode() for i in range(10_000))  # 60 KB, a packet a key
    transport = gw.console("web-01").port._protocol.transport
    assert isinstance(transport, asyncio.WriteTransport)
    sent = 0
    while not transport.get_write_buffer_size():  # until the port holds keys back
        assert sent < len(keys), "the guest's PTY never filled"
        for key in keys[sent:sent + 200]:
            chan.write(bytes([key]))
        sent += 200
        line = f"guest still printing {sent}\n".encode()
        vm.write(line)
        await session.wait_out_end(line)
    loop.add_reader(vm.master, vm._readable)  # the guest reads again
    chan.write(keys[sent:])
    await vm.wait_received(keys[-6:], timeout=WAIT * 3)
    assert bytes(vm.received) == keys
    chan.close()


async def test_a_hung_guest_gets_one_on_detach_not_one_per_writer(
        tmp_path: Path, users: dict[str, User], vm: PtyVM) -> None:
    """A guest that does not read its input while writers come and go: one on_detach waits
    for it, the others are audited as not sent, and the guest gets a single copy later."""
    vm.start()
    async with gateway(tmp_path, vms={"web-01": vm.port}, users={"alice": users["alice"]},
                       grants=[(["alice"], ["*"], "owner")],
                       vm_extra={"web-01": 'on_detach = "logout\\r"'}) as gw:
        loop = asyncio.get_running_loop()
        loop.remove_reader(vm.master)  # the hung guest
        chan, _ = await _writer(gw, users["alice"])
        transport = gw.console("web-01").port._protocol.transport
        typed = b"y" * 100_000
        chan.write(typed)
        await _until(lambda: transport.get_write_buffer_size() > 0)  # the PTY is full
        chan.close()
        for _ in range(5):
            chan, _ = await _writer(gw, users["alice"])
            chan.close()
            await _until(lambda: gw.console("web-01").writer is None)
        failed = [e for e in gw.audit_events if e["event"] == "on_detach"]
        assert len(failed) == 5
        assert all("still waits" in e["reason"] for e in failed)
        loop.add_reader(vm.master, vm._readable)  # the guest reads again
        await gw.wait_audit("on_detach", result="ok")
        await vm.wait_received(b"logout\r")
        assert bytes(vm.received).count(b"logout\r") == 1
        assert bytes(vm.received) == typed + b"logout\r"


async def _until(predicate: Callable[[], bool]) -> None:
    """Wait until *predicate()* holds, re-checked every 10 ms: for state nothing signals."""
    async with asyncio.timeout(WAIT):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_closing_one_channel_mid_flood_leaves_the_others_on_its_connection(
        gw: Gateway, users: dict[str, User], vm: PtyVM) -> None:
    """Two sessions on one SSH connection (OpenSSH ControlMaster), the guest flooding: the
    client closing the channel of one that is not reading ends that session only; the
    connection and the other session go on. (Whether the session ends by its output or
    its input noticing first is a race, so it is run 25 times.)"""

    async def flood() -> None:
        while True:
            await vm.send(b"x" * 60_000 + b"\n", timeout=60)

    for trial in range(25):
        conn = await gw.connect(users["alice"], "web-01+ro+replay=0")
        first = await conn.create_process(term_type=None, encoding=None)  # never read
        second = Client(conn, await conn.create_process(term_type=None, encoding=None))
        await _until(lambda: len(gw.console("web-01").attachments) == 2)
        flooding = asyncio.ensure_future(flood())
        try:
            # Past the first one's 2 MiB window: its output waits for it to read.
            await _until(lambda out=second.out: len(out) > 3_000_000)
            first.channel.close()
            await _until(lambda: len(gw.console("web-01").attachments) == 1)
        finally:
            flooding.cancel()
        marker = f"trial {trial} after the close\n".encode()
        vm.write(marker)
        await second.wait_out(marker)
        assert not any(e["event"] == "disconnect" for e in gw.audit_events)
        conn.close()
        await gw.wait_audit("disconnect")
        gw.audit_events.clear()


async def test_typing_after_an_escape_waits_for_it(gw: Gateway, users: dict[str, User],
                                                   vm: PtyVM) -> None:
    """Typing that arrives right behind input needing the escape parser's slow path (here
    ^]^], one literal ^]) does not overtake it: the guest gets the bytes in order."""
    conn = await gw.connect(users["alice"], "web-01+replay=0")
    chan, session = await conn.create_session(RawSession, term_type="xterm", encoding=None)
    await gw.wait_audit("attach", user="alice")
    vm.write(b"ready\n")
    await session.wait_out_end(b"ready\n")
    for i in range(50):
        chan.write(f"<{i}:".encode() + b"\x1d\x1d>")  # slow path: the parser runs
        chan.write(f"[{i}]".encode())  # same TCP segment, usually: the fast path's chance
    want = b"".join(f"<{i}:".encode() + b"\x1d>" + f"[{i}]".encode() for i in range(50))
    await vm.wait_received(want[-6:])
    assert bytes(vm.received) == want
    chan.close()
