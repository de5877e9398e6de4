"""``serialmux serve`` as systemd runs it: sd_notify on a NOTIFY_SOCKET, watchdog, HUP, TERM."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh
import pytest

from serialmux.config import load_config
from serialmux.control import socket_path
from serialmux.daemon import Daemon
from serialmux.ring import RecordKind, RingReader, Skipped
from tests.support import WAIT, PtyVM, User, gateway_toml, make_user, run_cli

WATCHDOG_USEC = 1_000_000  # pings every 0.5 s


@dataclass
class Manager:
    """The service manager's end of NOTIFY_SOCKET: every datagram, with when it came."""

    sock: socket.socket
    messages: list[tuple[float, dict[str, str]]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self.sock, 4096)
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append((time.monotonic(), fields))
            self.changed.set()

    async def wait_for(self, key: str, value: str | None = None, *, after: int = 0,
                       timeout: float = WAIT) -> int:
        """Index of the first message at or after *after* with KEY (=VALUE)."""
        async with asyncio.timeout(timeout):
            while True:
                for i, (_, fields) in enumerate(self.messages[after:], after):
                    if key in fields and (value is None or value in fields[key]):
                        return i
                self.changed.clear()
                await self.changed.wait()

    def kinds(self) -> list[str]:
        """Messages other than watchdog pings, as 'KEY,KEY' strings, in order."""
        return [",".join(sorted(f)) for _, f in self.messages if "WATCHDOG" not in f]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short path (sockaddr_un holds 107 bytes; pytest's tmp_path can be longer)."""
    path = Path(tempfile.mkdtemp(prefix="smx-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def manager(short_dir: Path) -> AsyncIterator[Manager]:
    """A bound datagram socket playing systemd's notify socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(short_dir / "notify"))
    sock.setblocking(False)
    m = Manager(sock)
    task = asyncio.create_task(m.collect())
    yield m
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    sock.close()


@pytest.fixture
async def service(tmp_path: Path, short_dir: Path, manager: Manager
                  ) -> AsyncIterator[tuple[asyncio.subprocess.Process, Path, PtyVM, User]]:
    """The real CLI serving one PTY VM, started as systemd would (NOTIFY_SOCKET, WATCHDOG_USEC)."""
    vm = PtyVM()
    vm.start()
    keys = tmp_path / "keys"
    keys.mkdir()
    alice = make_user("alice", keys)
    conf = tmp_path / "serialmux.toml"
    conf.write_text(gateway_toml(tmp_path, {"web-01": vm.port}, [alice]))
    env = {**os.environ, "NOTIFY_SOCKET": str(short_dir / "notify"),
           "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    env.pop("WATCHDOG_PID", None)
    with (tmp_path / "daemon.log").open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).with_name("serialmux")), "serve", "--config", str(conf),
            env=env, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        yield proc, conf, vm, alice
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        vm.close()


async def ssh_port(conf: Path) -> int:
    """The daemon's bound SSH port, asked over the control socket."""
    result = await run_cli("status", "--json", "--config", str(conf))
    assert result.status == 0, result.err
    return int(json.loads(result.out)["listeners"][0].rsplit(":", 1)[1])


async def test_notify_sequence_watchdog_reload_and_stop(
        service: tuple[asyncio.subprocess.Process, Path, PtyVM, User], manager: Manager,
        tmp_path: Path) -> None:
    """STATUS, READY (listeners bound), STATUS on attach, RELOADING→READY, STOPPING; exit 0;
    the heap frozen once ready (serialmux.heap)."""
    proc, conf, _vm, alice = service
    ready = await manager.wait_for("READY", "1", timeout=30)
    # READY=1 only once the control socket and the SSH listener are there.
    assert socket_path(tmp_path / "run").is_socket()
    assert manager.kinds()[0] == "STATUS"
    assert manager.messages[0][1]["STATUS"] == "starting"
    assert "1/1 consoles up" in manager.messages[ready][1]["STATUS"]

    port = await ssh_port(conf)
    conn = await asyncssh.connect("127.0.0.1", port, username="web-01", client_keys=[alice.key],
                                  known_hosts=None, agent_path=None)
    try:
        process = await conn.create_process(term_type="xterm", encoding=None)
        await manager.wait_for("STATUS", "1 sessions", after=ready)

        proc.send_signal(signal.SIGHUP)
        reloading = await manager.wait_for("RELOADING", "1", after=ready)
        assert "MONOTONIC_USEC" in manager.messages[reloading][1]
        await manager.wait_for("READY", "1", after=reloading + 1)

        proc.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        await manager.wait_for("STOPPING", "1", after=reloading)
        told = b""
        async with asyncio.timeout(WAIT):
            while b"shutting down" not in told:
                chunk = await process.stdout.read(4096)
                if not chunk:
                    break
                told += chunk
        assert b"serialmux is shutting down" in told
        async with asyncio.timeout(20):  # TimeoutStopSec
            assert await proc.wait() == 0
        assert time.monotonic() - stopped_at < 10
    finally:
        conn.close()
        await conn.wait_closed()
    order = [k for k in manager.kinds() if k != "STATUS"]
    assert order == ["READY,STATUS", "MONOTONIC_USEC,RELOADING", "READY,STATUS", "STOPPING"]
    with RingReader(tmp_path / "state" / "rings" / "web-01.ring") as reader:
        kinds = [r.kind for r in reader.records() if not isinstance(r, Skipped)]
    assert kinds[-1] is RecordKind.DAEMON_STOP
    assert "heap_frozen" in (tmp_path / "daemon.log").read_text()


async def test_watchdog_pings_at_half_the_interval(
        service: tuple[asyncio.subprocess.Process, Path, PtyVM, User], manager: Manager) -> None:
    """WATCHDOG=1 arrives every WATCHDOG_USEC/2 from the event loop, never late."""
    proc, *_ = service
    first = await manager.wait_for("WATCHDOG", "1", timeout=30)
    await manager.wait_for("WATCHDOG", "1", after=first + 1)
    last = first
    for _ in range(4):
        last = await manager.wait_for("WATCHDOG", "1", after=last + 1)
    pings = [t for t, f in manager.messages if "WATCHDOG" in f]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert all(0.25 < g < WATCHDOG_USEC / 1e6 for g in gaps), gaps
    proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(20):
        assert await proc.wait() == 0


def ring_records(tmp_path: Path) -> list[tuple[RecordKind, bytes]]:
    """web-01's ring as (kind, payload) pairs."""
    with RingReader(tmp_path / "state" / "rings" / "web-01.ring") as reader:
        return [(r.kind, r.payload) for r in reader.records() if not isinstance(r, Skipped)]


async def test_second_serve_on_the_same_dirs_exits_at_once_touching_nothing(
        service: tuple[asyncio.subprocess.Process, Path, PtyVM, User], manager: Manager,
        tmp_path: Path) -> None:
    """A second serve on the same state_dir (or only the same runtime_dir) exits 1 with one line
    naming the lock file and the first one's PID; the first one's ring gets no marker and its
    session, port and control socket carry on."""
    proc, conf, vm, alice = service
    await manager.wait_for("READY", "1", timeout=30)
    port = await ssh_port(conf)
    conn = await asyncssh.connect("127.0.0.1", port, username="web-01", client_keys=[alice.key],
                                  known_hosts=None, agent_path=None)
    try:
        process = await conn.create_process(term_type="xterm", encoding=None)
        await manager.wait_for("STATUS", "1 sessions")
        before = ring_records(tmp_path)

        second = await run_cli("serve", "--config", str(conf))
        lock = tmp_path / "state" / "serialmux.lock"
        assert second.status == 1, second.err
        assert second.err.strip().splitlines() == [
            f"serialmux: another serialmux (pid {proc.pid}) is running on this "
            f"server.state_dir: {lock} is locked; stop it first (systemctl stop serialmux), "
            "or give this one its own server.state_dir"]
        assert '"vm"' not in second.out  # no ring, no port, no QMP was opened
        # Nor an audit event: with audit_file set, that is the running daemon's file.
        assert "daemon_start" not in second.out + second.err
        # Only the runtime_dir shared: the control socket is not taken over either.
        other = tmp_path / "other.toml"
        other.write_text(conf.read_text().replace(f'state_dir = "{tmp_path}/state"',
                                                  f'state_dir = "{tmp_path}/state2"'))
        third = await run_cli("serve", "--config", str(other))
        assert third.status == 1, third.err
        assert f"server.runtime_dir: {tmp_path / 'run' / 'serialmux.lock'} is locked" in third.err
        assert not (tmp_path / "state2" / "rings").exists()

        assert ring_records(tmp_path) == before
        vm.write(b"still-here\r\n")
        got = b""
        async with asyncio.timeout(WAIT):
            while b"still-here" not in got:
                got += await process.stdout.read(4096)
        process.stdin.write(b"typed-after\r")
        await vm.wait_received(b"typed-after")
        assert await ssh_port(conf) == port  # the control socket is still the first one's
        assert proc.returncode is None
    finally:
        conn.close()
        await conn.wait_closed()
    proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(20):
        assert await proc.wait() == 0
    assert ring_records(tmp_path)[-1][0] is RecordKind.DAEMON_STOP


async def wait_in_ring(tmp_path: Path, text: bytes) -> None:
    """Wait until web-01's ring holds *text* in its output (another process writes it)."""
    async with asyncio.timeout(WAIT):
        while not any(k is RecordKind.OUTPUT and text in p for k, p in ring_records(tmp_path)):
            await asyncio.sleep(0.02)


async def test_kill_9_leaves_an_unclean_stop_marker_on_the_next_start(
        tmp_path: Path, short_dir: Path, manager: Manager, users: dict[str, User],
        vm: PtyVM) -> None:
    """After kill -9, the next start marker says the previous run did not stop cleanly, when
    the ring's last record was written, and that output may be missing (serialmux logs shows
    it between the old output and the new); the lock does not outlive the killed daemon; after
    a clean stop the next start marker is plain."""
    vm.start()
    conf = tmp_path / "serialmux.toml"
    conf.write_text(gateway_toml(tmp_path, {"web-01": vm.port}, [users["alice"]]))
    env = {**os.environ, "NOTIFY_SOCKET": str(short_dir / "notify")}
    ready = -1

    async def serve() -> asyncio.subprocess.Process:
        nonlocal ready
        with (tmp_path / "daemon.log").open("ab") as log:
            proc = await asyncio.create_subprocess_exec(
                str(Path(sys.executable).with_name("serialmux")), "serve", "--config", str(conf),
                env=env, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)
        ready = await manager.wait_for("READY", "1", after=ready + 1, timeout=30)
        return proc

    proc = await serve()
    try:
        vm.write(b"tick-10\r\n")
        await wait_in_ring(tmp_path, b"tick-10")
        last_before = ring_records(tmp_path)[-1]
        proc.kill()
        await proc.wait()
        proc = await serve()
        vm.write(b"tick-28\r\n")
        await wait_in_ring(tmp_path, b"tick-28")
        logs = await run_cli("logs", "web-01", "--config", str(conf))
        assert logs.status == 0, logs.err
        with RingReader(tmp_path / "state" / "rings" / "web-01.ring") as reader:
            last_time = [r for r in reader.records() if not isinstance(r, Skipped)
                         and r.payload == last_before[1]][-1].time_ns
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(last_time // 10**9))
        marker = re.search(r"-- serialmux: \S+ serialmux started; the previous run did not stop "
                           rf"cleanly \(its last record here is from {stamp}\.\d{{3}}Z\): output "
                           r"printed while serialmux was not running may be missing --", logs.out)
        assert marker is not None, logs.out
        assert logs.out.index("tick-10") < marker.start() < logs.out.index("tick-28")
        proc.send_signal(signal.SIGTERM)
        assert await proc.wait() == 0
        proc = await serve()
        starts = [p for k, p in ring_records(tmp_path) if k is RecordKind.DAEMON_START]
        assert json.loads(starts[-1]) == {"text": "serialmux started"}
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_start_that_fails_after_the_lock_lets_go_of_it(
        tmp_path: Path, users: dict[str, User]) -> None:
    """A start-up failure after the single-instance lock (state_dir/rings is a file) releases
    the lock: the same process can serve once the problem is fixed (it was refused as
    'another serialmux', its own pid)."""
    (tmp_path / "serialmux.toml").write_text(
        gateway_toml(tmp_path, {}, [users["alice"]]))
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "rings").write_text("not a directory")
    with pytest.raises(FileExistsError):
        await Daemon(load_config(tmp_path / "serialmux.toml")).serve()
    (tmp_path / "state" / "rings").unlink()
    daemon = Daemon(load_config(tmp_path / "serialmux.toml"))
    serving = asyncio.create_task(daemon.serve())
    await daemon.wait_ready(WAIT)
    daemon.stop()
    async with asyncio.timeout(WAIT):
        await serving
