"""Scrollback over real SSH and the CLI: replay on attach, logs, follow, slow clients."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from serialmux import commands
from serialmux.ring import Record, RecordKind, RingReader, RingWriter, Skipped
from tests.support import (
    WAIT,
    Client,
    Gateway,
    PtyVM,
    RawSession,
    User,
    open_files,
    openssh_args,
)

SERIALMUX = [sys.executable, "-m", "serialmux"]


async def print_lines(gw: Gateway, vm: PtyVM, count: int, tag: str = "line") -> None:
    """The guest prints *count* numbered lines; wait until the ring has them all."""
    await vm.send(b"".join(f"{tag} {i:05d}\r\n".encode() for i in range(count)))
    console = gw.console("web-01")
    want = len(b"".join(f"{tag} {i:05d}\r\n".encode() for i in range(count)))
    async with asyncio.timeout(WAIT):
        while console.bytes_read < want:
            await console.backlog.wait_beyond(console.backlog.end)


async def test_replay_shows_last_20_lines_by_default(gw: Gateway, users: dict[str, User],
                                                     vm: PtyVM) -> None:
    """Attaching replays the last 20 lines of scrollback, then live output follows."""
    await print_lines(gw, vm, 50)
    c = await gw.attach(users["alice"], "web-01", subsystem="console")
    await c.wait_out(b"line 00049\r\n")
    assert bytes(c.out) == b"".join(f"line {i:05d}\r\n".encode() for i in range(30, 50))
    vm.write(b"live!\r\n")
    await c.wait_out(b"live!\r\n")
    await c.close()


async def test_replay_option_sets_line_count(gw: Gateway, users: dict[str, User],
                                             vm: PtyVM) -> None:
    """+replay=100 replays exactly the last 100 lines."""
    await print_lines(gw, vm, 150)
    c = await gw.attach(users["carol"], "web-01+replay=100", subsystem="console")
    await c.wait_out(b"line 00149\r\n")
    assert bytes(c.out) == b"".join(f"line {i:05d}\r\n".encode() for i in range(50, 150))
    await c.close()


async def test_replay_zero_shows_no_history(gw: Gateway, users: dict[str, User],
                                            vm: PtyVM) -> None:
    """+replay=0 starts with live output only."""
    await print_lines(gw, vm, 10)
    c = await gw.attach(users["alice"], "web-01+replay=0", subsystem="console")
    await gw.wait_audit("attach", user="alice")
    vm.write(b"only this\r\n")
    await c.wait_out(b"only this\r\n")
    assert bytes(c.out) == b"only this\r\n"
    await c.close()


async def test_logs_command_over_ssh(gw: Gateway, users: dict[str, User], vm: PtyVM) -> None:
    """ssh VM@host logs --lines N prints the last N lines; a reader may use it."""
    await print_lines(gw, vm, 600)
    conn = await gw.connect(users["carol"], "web-01")
    result = await conn.run("logs --lines 500", encoding=None)
    assert result.exit_status == 0
    assert result.stdout.endswith(b"line 00599\r\n")
    assert b"line 00100\r\n" in result.stdout
    assert b"line 00099\r\n" not in result.stdout
    result = await conn.run("logs --json --lines 3", encoding=None)
    objects = [json.loads(x) for x in result.stdout.splitlines()]
    assert objects
    assert all("seq" in o and "kind" in o for o in objects)
    conn.close()


@pytest.mark.skipif(shutil.which("ssh") is None, reason="OpenSSH client not installed")
async def test_logs_over_openssh_with_stdin_closed_prints_it_all(
        gw: Gateway, users: dict[str, User], vm: PtyVM) -> None:
    """ssh -n VM@host logs (stdin at EOF at once, as in scripts and cron jobs) prints the
    whole tail: EOF ends only logs -f."""
    await print_lines(gw, vm, 20_000)
    args = [*openssh_args(gw, users["carol"], "web-01", "-n"), "logs", "--lines", "20000"]
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(WAIT * 3):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert len(re.findall(rb"^line \d{5}\r$", out, re.MULTILINE)) == 20_000
    assert out.endswith(b"line 19999\r\n")


@pytest.mark.skipif(shutil.which("ssh") is None, reason="OpenSSH client not installed")
async def test_logs_follow_with_stdin_closed_prints_the_tail_then_ends(
        gw: Gateway, users: dict[str, User], vm: PtyVM) -> None:
    """ssh -n VM@host logs -f -n 5 (stdin at EOF at once): the tail is printed, every time;
    then EOF ends the follow with status 0."""
    await print_lines(gw, vm, 30)
    for _ in range(5):  # it was a race: most runs printed nothing
        args = [*openssh_args(gw, users["carol"], "web-01", "-n"), "logs", "-f", "-n", "5"]
        proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
        async with asyncio.timeout(WAIT * 2):
            out, err = await proc.communicate()
        assert proc.returncode == 0, err
        assert out == b"".join(f"line {i:05d}\r\n".encode() for i in range(25, 30)), out


async def test_cli_logs_reads_ring_while_daemon_runs_and_follows(
        gw: Gateway, users: dict[str, User], vm: PtyVM) -> None:
    """serialmux logs VM prints the tail; -f then shows output printed afterwards."""
    await print_lines(gw, vm, 30, tag="boot")
    proc = await asyncio.create_subprocess_exec(
        *SERIALMUX, "logs", "web-01", "--config", str(gw.config_path), "-n", "5", "-f",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    try:
        seen = b""
        async with asyncio.timeout(WAIT * 2):
            while b"boot 00029" not in seen:
                seen += await proc.stdout.read(4096)
            assert b"boot 00024" not in seen
            assert b"boot 00025" in seen
            vm.write(b"printed later\r\n")
            while b"printed later" not in seen:
                chunk = await proc.stdout.read(4096)
                assert chunk, "logs -f ended"
                seen += chunk
    finally:
        proc.terminate()
        await proc.wait()


async def test_cli_logs_works_after_daemon_stopped(gw: Gateway, users: dict[str, User],
                                                  vm: PtyVM) -> None:
    """The ring stays readable by serialmux logs once the daemon has stopped."""
    await print_lines(gw, vm, 5, tag="kept")
    await gw.stop()
    proc = await asyncio.create_subprocess_exec(
        *SERIALMUX, "logs", "web-01", "--config", str(gw.config_path), "--raw",
        stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), WAIT * 2)
    assert proc.returncode == 0
    assert out.endswith(b"kept 00004\r\n")
    gw.daemon = None  # already stopped


async def test_stalled_client_does_not_stall_others_or_the_ring(
        gw: Gateway, users: dict[str, User], vm: PtyVM) -> None:
    """A client that stops reading falls behind; another gets every byte in order; the ring
    gets everything."""
    stalled_conn = await gw.connect(users["carol"], "web-01+replay=0")
    stalled_chan, _ = await stalled_conn.create_session(
        asyncssh.SSHClientSession, subsystem="console", encoding=None)
    stalled_chan.pause_reading()  # never reads: its window closes, the server cannot send
    healthy = await gw.attach(users["alice"], "web-01+replay=0", subsystem="console")
    async with asyncio.timeout(WAIT):
        while len(gw.console("web-01").attachments) < 2:
            await gw.wait_audit("attach", user="alice")
    payload = b"".join(f"{i:07d} {'x' * 71}\n".encode() for i in range(40_000))  # 3.2 MB
    console = gw.console("web-01")
    seq_before = console.ring.next_seq
    await vm.send(payload, timeout=60)
    await healthy.wait_out(payload[-80:], timeout=60)
    assert bytes(healthy.out) == payload
    # The stalled client was dropped (stall_timeout) or skipped ahead; it held no memory.
    rec = await gw.wait_audit("detach", user="carol")
    assert rec["reason"].startswith("stalled")
    with RingReader(console.ring.path) as reader:
        records = list(reader.records(seq_before))
    got = b"".join(r.payload for r in records
                   if isinstance(r, Record) and r.kind is RecordKind.OUTPUT)
    # The 1 MiB ring holds the newest part of the 3.2 MB, exactly, and says what it lost.
    assert len(got) > 900_000
    assert got == payload[-len(got):]
    assert isinstance(records[0], Skipped)
    await healthy.close()
    stalled_chan.close()


async def test_markers_record_attach_and_takeover(gw: Gateway, users: dict[str, User]) -> None:
    """Attach and takeover leave markers in the ring naming who."""
    a = await gw.attach(users["alice"], "web-01")
    await a.wait_out(b"(writer)")
    b = await gw.attach(users["bob"], "web-01")
    await a.wait_closed()
    await b.wait_out(b"(writer, took over from alice@127.0.0.1)")
    with RingReader(gw.console("web-01").ring.path) as reader:
        texts = [r.text() for r in reader.records() if isinstance(r, Record)]
    assert "alice attached" in texts
    assert any(re.fullmatch(r"bob took over from alice", t) for t in texts)
    await b.close()


async def test_slow_client_is_told_how_much_it_skipped(gw: Gateway, users: dict[str, User],
                                                       vm: PtyVM) -> None:
    """A client that pauses while more than the backlog passes resumes with a skip notice."""
    conn = await gw.connect(users["carol"], "web-01+replay=0")
    chan, session = await conn.create_session(RawSession, subsystem="console", encoding=None,
                                              window=64 * 1024)
    await gw.wait_audit("attach", user="carol")
    chan.pause_reading()
    console = gw.console("web-01")
    payload = b"".join(f"{i:07d} {'y' * 71}\n".encode() for i in range(12_000))  # ~1 MB
    await vm.send(payload)
    async with asyncio.timeout(WAIT):
        while console.bytes_read < len(payload):
            await console.backlog.wait_beyond(console.backlog.end)
    chan.resume_reading()
    async with asyncio.timeout(WAIT):
        while not re.search(rb"serialmux: \d+ bytes skipped; see logs", session.err):
            session.changed.clear()
            await session.changed.wait()
        while not session.out.endswith(payload[-80:]):
            session.changed.clear()
            await session.changed.wait()
    skipped = int(re.search(rb"(\d+) bytes skipped", session.err).group(1))
    assert len(session.out) + skipped == len(payload)
    chan.close()


async def test_logs_to_a_client_that_stops_reading_is_bounded_and_ended(
        tmp_path: Path, users: dict[str, User], vm: PtyVM) -> None:
    """logs to a client with a huge SSH window that stops reading TCP: the daemon holds under
    1 MiB for it, serves others meanwhile, and ends the command after stall_timeout."""
    from tests.support import gateway

    mib = 1 << 20
    vm.start()
    async with gateway(tmp_path, vms={"web-01": vm.port},
                       users={"alice": users["alice"], "carol": users["carol"]},
                       grants=[(["alice"], ["*"], "owner"), (["carol"], ["*"], "reader")],
                       vm_extra={"web-01": 'ring_size = "32MiB"'}) as g:
        assert g.daemon is not None
        line = b"z" * 79 + b"\n"
        for _ in range(24):  # 24 MiB of scrollback, far more than any bound below
            g.console("web-01").ring.append(line * (mib // len(line)))
        conn = await g.connect(users["carol"], "web-01")
        # asyncssh takes any WINDOW_ADJUST: drain() alone would let all 24 MiB be queued.
        chan, session = await conn.create_session(
            RawSession, "logs --raw --lines 10000000", encoding=None, window=2**31)
        async with asyncio.timeout(WAIT):
            await session.changed.wait()  # the daemon is sending
        conn._transport.pause_reading()  # the client reads no more TCP; its window stays open
        server = next(s for s in g.daemon.connections.servers
                      if s.identity is not None and s.identity.user == "carol")
        transport = server._conn._transport
        running = next(e for e in g.daemon.connections.execs if e.identity.user == "carol")

        def held() -> int:
            """Bytes the daemon holds for carol: its transport's buffer and the channel's."""
            return int(transport.get_write_buffer_size()
                       + running.process.channel.get_write_buffer_size())

        # Others are served while carol's logs is held (a worker thread and her connection).
        other = await g.attach(users["alice"], "web-01+replay=0", subsystem="console")
        await g.wait_audit("attach", user="alice")
        vm.write(b"alice still served\r\n")
        await other.wait_out(b"alice still served\r\n")
        result = await (await g.connect(users["alice"], "web-01")).run(
            "logs --raw --lines 1", encoding=None)
        assert result.exit_status == 0
        assert result.stdout == b"alice still served\r\n"
        assert running in g.daemon.connections.execs
        assert not any(e["event"] == "logs_stalled" for e in g.audit_events)
        assert held() < mib
        # stall_timeout (5 s in tests) later the command is ended. While carol reads nothing
        # the held bytes only grow, so their size now is their peak.
        try:
            rec = await g.wait_audit("logs_stalled", user="carol")
        except TimeoutError:
            raise AssertionError(f"logs never ended; {held()} bytes held for carol") from None
        assert rec["reason"] == "stalled: client read nothing for 5 s"
        assert held() < mib, f"{held()} bytes held for a client that reads nothing"
        assert not server.writable.is_set()  # the transport's mark held it, not the window
        conn._transport.resume_reading()
        await asyncio.wait_for(chan.wait_closed(), WAIT)
        assert chan.get_exit_status() == 1
        assert b"serialmux: logs: stalled: client read nothing for 5 s" in session.err
        assert 0 < len(session.out) < 24 * mib
        assert session.out.startswith(line)
        await other.close()


async def test_unreadable_ring_is_moved_aside_and_daemon_serves(
        tmp_path: Path, users: dict[str, User], vm: PtyVM) -> None:
    """A ring with bad magic is moved aside, audited, and a fresh ring records output."""
    from tests.support import gateway

    rings = tmp_path / "state" / "rings"
    rings.mkdir(parents=True)
    (rings / "web-01.ring").write_bytes(b"not a ring at all" * 5000)
    vm.start()
    async with gateway(tmp_path, vms={"web-01": vm.port}, users={"alice": users["alice"]},
                       grants=[(["alice"], ["*"], "owner")]) as g:
        rec = await g.wait_audit("ring_recovered", vm="web-01")
        assert "bad magic" in rec["reason"]
        assert list(rings.glob("web-01.ring.bad-*"))
        c = await g.attach(users["alice"], "web-01", subsystem="console")
        vm.write(b"fresh\r\n")
        await c.wait_out(b"fresh\r\n")
        with RingReader(rings / "web-01.ring") as reader:
            assert b"fresh\r\n" in b"".join(
                r.payload for r in reader.records() if isinstance(r, Record))
        await c.close()


async def test_full_disk_under_the_ring_does_not_stop_the_console(
        gw: Gateway, users: dict[str, User], vm: PtyVM) -> None:
    """When ring writes fail (disk full), the live console keeps working and it is audited."""

    c = await gw.attach(users["alice"], "web-01+replay=0", subsystem="console")
    await gw.wait_audit("attach", user="alice")
    ring = gw.console("web-01").ring
    full = os.open("/dev/full", os.O_WRONLY)  # every write fails with ENOSPC, as a full disk
    saved = os.dup(ring._fd)
    try:
        os.dup2(full, ring._fd)
        vm.write(b"while the disk is full\r\n")
        await c.wait_out(b"while the disk is full\r\n")
        await gw.wait_audit("ring_write_failed", vm="web-01")
        c.send(b"typing still works")
        await vm.wait_received(b"typing still works")
    finally:
        os.dup2(saved, ring._fd)
        os.close(saved)
        os.close(full)
    vm.write(b"disk is back\r\n")
    await c.wait_out(b"disk is back\r\n")
    assert gw.console("web-01").ring_error is None
    await c.close()


class _HeldLogs(asyncssh.SSHClientSession[bytes]):
    """A `logs` client that stops reading at its first output (its window stays shut)."""

    def __init__(self, changed: asyncio.Event) -> None:
        self.changed = changed
        self.chan: asyncssh.SSHClientChannel[bytes] | None = None
        self.got_output = False
        self.err = bytearray()
        self.closed = False

    def connection_made(self, chan: Any) -> None:
        self.chan = chan

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if datatype == asyncssh.EXTENDED_DATA_STDERR:
            self.err += data
        elif not self.got_output:
            self.got_output = True
            assert self.chan is not None
            self.chan.pause_reading()
        self.changed.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.changed.set()


async def test_one_reader_cannot_starve_everybodys_logs(
        gw: Gateway, users: dict[str, User], vm: PtyVM) -> None:
    """A reader's 2 x 10 one-shot logs that never read: past a per-user cap they are refused,
    saying so, and another user's logs answers while hers are still held."""
    line = b"y" * 99 + b"\n"
    gw.console("web-01").ring.append(line * 2000)  # 200 KB: more than a window and a chunk
    held: list[_HeldLogs] = []
    changed = asyncio.Event()
    for _ in range(2):
        conn = await gw.connect(users["carol"], "web-01")
        for _ in range(10):
            _, session = await conn.create_session(
                lambda: _HeldLogs(changed), "logs --lines 100000", encoding=None, window=1024)
            held.append(session)
    async with asyncio.timeout(WAIT):  # each is sending, or was refused
        while not all(s.got_output or s.closed for s in held):
            changed.clear()
            await changed.wait()
    refused = [s for s in held if s.closed]
    assert refused, "no per-user cap on one-shot logs"
    assert all(b"too many logs running for carol (at most 4" in s.err for s in refused)
    result = await asyncio.wait_for(
        (await gw.connect(users["alice"], "web-01")).run("logs -n 3", encoding=None), WAIT)
    assert result.exit_status == 0
    assert result.stdout == line * 3
    # Answered while carol's were still held, not after stall_timeout freed their threads.
    assert not any(e["event"] == "logs_stalled" for e in gw.audit_events)
    assert all(not s.closed for s in held if s.got_output)
    await gw.wait_audit("command", action="logs", user="carol", result="refused")


@pytest.fixture
def logs_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[int], None]]:
    """Run `logs` on a pool of N threads instead of LOGS_WORKERS (shut down at teardown)."""
    pools: list[ThreadPoolExecutor] = []

    def use(n: int) -> None:
        pools.append(ThreadPoolExecutor(max_workers=n, thread_name_prefix="test-logs"))
        monkeypatch.setattr(commands, "_logs_executor", pools[-1])

    yield use
    for pool in pools:
        pool.shutdown(wait=False, cancel_futures=True)


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Wait (at most WAIT) until *predicate()* holds, looking again on each loop turn."""
    async with asyncio.timeout(WAIT):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_logs_clients_that_do_not_read_hold_no_thread(
        gw: Gateway, users: dict[str, User], logs_threads: Callable[[int], None]) -> None:
    """One-shot logs whose clients never read hold no worker thread: on 2 threads, two users'
    8 are all sending at once and another user's logs answers at once; each one's ring file
    is closed when it ends (its client gone, or stalled)."""
    logs_threads(2)
    ring = gw.console("web-01").ring
    line = b"y" * 99 + b"\n"
    ring.append(line * 2000)  # 200 KB: more than a window and a chunk
    writer_files = open_files(ring.path)
    changed = asyncio.Event()
    held: dict[str, list[tuple[Any, _HeldLogs]]] = {"bob": [], "carol": []}
    for name, pairs in held.items():
        conn = await gw.connect(users[name], "web-01")
        for _ in range(commands.MAX_ONESHOTS_PER_USER):
            pairs.append(await conn.create_session(
                lambda: _HeldLogs(changed), "logs --lines 100000", encoding=None, window=1024))
    sessions = [s for pairs in held.values() for _, s in pairs]
    try:
        async with asyncio.timeout(WAIT):
            while not all(s.got_output for s in sessions):
                changed.clear()
                await changed.wait()
    except TimeoutError:
        raise AssertionError(f"{sum(s.got_output for s in sessions)} of 8 logs sending, "
                             f"{sum(s.closed for s in sessions)} ended") from None
    result = await asyncio.wait_for(
        (await gw.connect(users["alice"], "web-01")).run("logs -n 3", encoding=None), WAIT)
    assert result.exit_status == 0
    assert result.stdout == line * 3
    assert not any(e["event"] == "logs_stalled" for e in gw.audit_events)
    assert not any(s.closed for s in sessions)
    assert open_files(ring.path) == writer_files + 8  # each held at its first chunk
    for chan, _ in held["bob"]:  # bob goes away: his end, closing their ring files
        chan.close()
    await wait_until(lambda: open_files(ring.path) == writer_files + 4)
    # carol's end after stall_timeout (5 s in tests), closing theirs too.
    await wait_until(lambda: sum(e["event"] == "logs_stalled" for e in gw.audit_events) == 4)
    await wait_until(lambda: open_files(ring.path) == writer_files)
    assert not commands._oneshots
    assert all(e["user"] == "carol" for e in gw.audit_events if e["event"] == "logs_stalled")


async def test_idle_follows_hold_no_thread(gw: Gateway, users: dict[str, User], vm: PtyVM,
                                           logs_threads: Callable[[int], None]) -> None:
    """logs -f holds no worker thread while it waits for output: on 1 thread, 6 follows all
    print their tail and then new output, a one-shot answers meanwhile, and a follow ended
    by EOF or cut (as a reload removing a grant does) closes its ring file."""
    assert gw.daemon is not None
    logs_threads(1)
    await print_lines(gw, vm, 5)
    path = gw.console("web-01").ring.path
    writer_files = open_files(path)
    follows: dict[str, list[Client]] = {}
    for name in ("bob", "carol"):
        conn = await gw.connect(users[name], "web-01")
        follows[name] = [Client(conn, await conn.create_process("logs -f -n 1", encoding=None))
                         for _ in range(3)]
    every = [c for cs in follows.values() for c in cs]
    for c in every:
        await c.wait_out(b"line 00004\r\n")
    result = await asyncio.wait_for(
        (await gw.connect(users["alice"], "web-01")).run("logs -n 1", encoding=None), WAIT)
    assert result.exit_status == 0
    assert result.stdout == b"line 00004\r\n"
    vm.write(b"new output\r\n")
    for c in every:
        assert await c.wait_out(b"new output\r\n") == b"line 00004\r\nnew output\r\n"
    for c in follows["bob"]:
        c.process.stdin.write_eof()
    for c in follows["bob"]:
        assert await c.wait_closed() == 0
    for entry in [e for e in gw.daemon.connections.execs if e.identity.user == "carol"]:
        entry.cut("test: cut")
    for c in follows["carol"]:
        assert await c.wait_closed() == 1
    await wait_until(lambda: open_files(path) == writer_files)
    assert not commands._follows


async def test_logs_lines_counts_guest_lines_in_text_and_json(gw: Gateway,
                                                             users: dict[str, User]) -> None:
    """--lines N is N lines of guest output with and without --json (JSON cuts the first
    record at its line start); a negative N is a usage error."""
    ring = gw.console("web-01").ring
    ring.append(b"one\r\ntwo\r\nthree\r\nfour\r\n")  # one record, four lines
    ring.append(b"five\r\n")
    conn = await gw.connect(users["carol"], "web-01")
    text = await conn.run("logs --lines 3", encoding=None)
    assert text.stdout == b"three\r\nfour\r\nfive\r\n"
    as_json = await conn.run("logs --json --lines 3", encoding=None)
    records = [json.loads(x) for x in as_json.stdout.splitlines()]
    assert [r["kind"] for r in records] == ["output", "output"]
    assert "".join(r["data"] for r in records).encode() == text.stdout
    for bad in ("-5", "abc"):
        result = await conn.run(f"logs --lines {bad}", encoding=None)
        assert result.exit_status == 2
        assert b"serialmux: logs: argument -n/--lines: takes a number of lines, 0 or more" \
            in result.stderr
        assert result.stdout == b""


async def test_a_ring_size_changed_while_stopped_is_resized_after_the_start(
        tmp_path: Path, users: dict[str, User], vm: PtyVM) -> None:
    """ring_size changed while the daemon was stopped: the start opens the ring as it is (a
    resize of thousands there would hold the start past systemd's timeout), then resizes it
    while serving, keeping what it held; output printed meanwhile is in it too."""
    from tests.support import gateway

    rings = tmp_path / "state" / "rings"
    old = RingWriter.open(rings / "web-01.ring", 64 << 10)
    old.append(b"printed in an earlier run\r\n")
    old.marker(RecordKind.DAEMON_STOP, "serialmux stopped")  # that run stopped cleanly
    old.close()
    vm.start()
    async with gateway(tmp_path, vms={"web-01": vm.port}, users={"alice": users["alice"]},
                       grants=[(["alice"], ["*"], "owner")],
                       vm_extra={"web-01": 'ring_size = "128KiB"'}) as g:
        c = await g.attach(users["alice"], "web-01+replay=0", subsystem="console")
        async with asyncio.timeout(WAIT):
            while (ring := g.console("web-01").ring) is None or ring.size != 128 << 10:
                await asyncio.sleep(0.01)
        vm.write(b"printed after the resize\r\n")
        await c.wait_out(b"printed after the resize\r\n")
        await c.close()
    with RingReader(rings / "web-01.ring") as reader:
        records = [r for r in reader.records() if isinstance(r, Record)]
    output = b"".join(r.payload for r in records if r.kind is RecordKind.OUTPUT)
    assert output.index(b"earlier run") < output.index(b"after the resize")
    texts = [r.text() for r in records if r.kind is not RecordKind.OUTPUT]
    assert "ring resized from 65536 to 131072 bytes" in texts
    # Resized while serving (the start opened it as it was), not during the start:
    assert texts.index("serialmux started") < texts.index(
        "console reopened with a new ring of 131072 bytes (ring_size changed)")
    assert not any("did not stop cleanly" in t for t in texts)
