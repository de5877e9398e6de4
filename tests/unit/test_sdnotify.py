"""Tests for serialmux.sdnotify: the systemd notify protocol against a real datagram socket.

These bind AF_UNIX datagram sockets (a filesystem one in tmp_path and an
abstract one): that is the seam systemd itself listens on, with no network.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from serialmux.sdnotify import Notifier


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Start every test with no systemd variables set."""
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A bound datagram socket standing in for systemd's notify socket."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()


def fill(path: str) -> int:
    """Send datagrams to ``path`` until its queue is full (nobody reads it); return how many."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as filler:
        for sent in range(100_000):
            try:
                filler.sendto(b"filler", socket.MSG_DONTWAIT, path)
            except BlockingIOError:
                return sent
    pytest.fail("the receive queue never filled")


def test_disabled_when_unset(clean_env: pytest.MonkeyPatch) -> None:
    """Without $NOTIFY_SOCKET the notifier is disabled and every call is a no-op."""
    n = Notifier()
    assert not n.enabled
    n.ready("up")
    n.stopping()
    assert n.watchdog_interval() is None


async def test_watchdog_loop_returns_when_disabled(clean_env: pytest.MonkeyPatch) -> None:
    """watchdog_loop returns at once when not enabled, even with WATCHDOG_USEC set."""
    clean_env.setenv("WATCHDOG_USEC", "200000")
    await asyncio.wait_for(Notifier().watchdog_loop(), timeout=5)


def test_messages_in_order(
    clean_env: pytest.MonkeyPatch, listener: tuple[str, socket.socket]
) -> None:
    """Messages arrive in order, formatted as newline-joined KEY=value lines."""
    path, sock = listener
    clean_env.setenv("NOTIFY_SOCKET", path)
    n = Notifier()
    assert n.enabled
    n.notify(READY=1, STATUS="3 consoles up")
    n.status("2 consoles up")
    n.stopping()
    assert sock.recv(4096) == b"READY=1\nSTATUS=3 consoles up"
    assert sock.recv(4096) == b"STATUS=2 consoles up"
    assert sock.recv(4096) == b"STOPPING=1"
    n.close()


def test_abstract_socket(clean_env: pytest.MonkeyPatch) -> None:
    """A NOTIFY_SOCKET starting with @ reaches the abstract namespace."""
    name = f"serialmux-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(5)
    with sock:
        sock.bind("\0" + name)
        clean_env.setenv("NOTIFY_SOCKET", "@" + name)
        n = Notifier()
        n.ready("ok")
        assert sock.recv(4096) == b"READY=1\nSTATUS=ok"
        n.close()


def test_explicit_path_and_reloading(listener: tuple[str, socket.socket]) -> None:
    """An explicit path wins over the environment; reloading sends RELOADING and a timestamp."""
    path, sock = listener
    n = Notifier(path)
    n.reloading()
    fields = dict(line.split("=", 1) for line in sock.recv(4096).decode().split("\n"))
    assert fields["RELOADING"] == "1"
    assert int(fields["MONOTONIC_USEC"]) > 0
    n.close()


def test_newline_in_value_rejected(listener: tuple[str, socket.socket]) -> None:
    """A newline in a value raises ValueError and sends nothing."""
    path, sock = listener
    n = Notifier(path)
    with pytest.raises(ValueError, match="newline"):
        n.notify(STATUS="a\nREADY=1")
    n.notify(STATUS="next")
    assert sock.recv(4096) == b"STATUS=next"
    n.close()


def test_missing_socket_never_raises(tmp_path: Path) -> None:
    """Sending to a socket nobody listens on is silently ignored."""
    n = Notifier(str(tmp_path / "nobody"))
    assert n.enabled
    n.ready("up")
    n.close()


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("200000", None, 0.2),
        ("200000", "self", 0.2),
        ("200000", "other", None),
        ("0", None, None),
        ("junk", None, None),
        (None, None, None),
    ],
)
def test_watchdog_interval(
    clean_env: pytest.MonkeyPatch,
    listener: tuple[str, socket.socket],
    usec: str | None,
    pid: str | None,
    expected: float | None,
) -> None:
    """watchdog_interval reads WATCHDOG_USEC and honours WATCHDOG_PID only when it is ours."""
    clean_env.setenv("NOTIFY_SOCKET", listener[0])
    if usec is not None:
        clean_env.setenv("WATCHDOG_USEC", usec)
    if pid == "self":
        clean_env.setenv("WATCHDOG_PID", str(os.getpid()))
    elif pid == "other":
        clean_env.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert Notifier().watchdog_interval() == expected


async def test_watchdog_cadence(
    clean_env: pytest.MonkeyPatch, listener: tuple[str, socket.socket]
) -> None:
    """With WATCHDOG_USEC=200000 the loop pings WATCHDOG=1 repeatedly (≥3 in a bounded wait)."""
    path, sock = listener
    sock.setblocking(False)
    clean_env.setenv("NOTIFY_SOCKET", path)
    clean_env.setenv("WATCHDOG_USEC", "200000")
    n = Notifier()
    loop = asyncio.get_running_loop()
    async with asyncio.TaskGroup() as tg:
        pinger = tg.create_task(n.watchdog_loop())
        async with asyncio.timeout(5):
            for _ in range(3):
                assert await loop.sock_recv(sock, 4096) == b"WATCHDOG=1"
        pinger.cancel()
    n.close()


async def test_full_queue_never_blocks_and_catches_up(listener: tuple[str, socket.socket]) -> None:
    """With the manager's queue full, notify returns at once; READY and the newest STATUS follow."""
    path, sock = listener
    sock.setblocking(False)
    filled = fill(path)
    n = Notifier(path)
    started = time.monotonic()
    n.status("starting")
    n.ready("1/2 consoles up, 0 sessions")
    n.status("2/2 consoles up, 1 sessions")
    n.status("2/2 consoles up, 0 sessions")
    assert time.monotonic() - started < 0.5  # was 1 s per message
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(5):
        for _ in range(filled):  # the manager reads again
            assert await loop.sock_recv(sock, 4096) == b"filler"
        # Sent by the retry timer, with nobody calling notify().
        assert await loop.sock_recv(sock, 4096) == b"READY=1"
        assert await loop.sock_recv(sock, 4096) == b"STATUS=2/2 consoles up, 0 sessions"
        n.stopping()  # next in line: no stale STATUS was left waiting
        assert await loop.sock_recv(sock, 4096) == b"STOPPING=1"
    n.close()


def test_waiting_messages_keep_order_without_a_loop(listener: tuple[str, socket.socket]) -> None:
    """Outside a loop, waiting messages go out in order on the next notify; WATCHDOG coalesces."""
    path, sock = listener
    filled = fill(path)
    n = Notifier(path)
    n.reloading()
    n.notify(WATCHDOG=1)
    n.ready("up")
    n.notify(WATCHDOG=1)
    n.status("x")
    for _ in range(filled):
        assert sock.recv(4096) == b"filler"
    n.stopping()
    assert sock.recv(4096).startswith(b"RELOADING=1\nMONOTONIC_USEC=")
    assert sock.recv(4096) == b"READY=1"
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert sock.recv(4096) == b"STATUS=x"
    assert sock.recv(4096) == b"STOPPING=1"
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):  # and nothing else
        sock.recv(4096)
    n.close()


def test_wait_is_logged_once(listener: tuple[str, socket.socket]) -> None:
    """A stall is logged once when a message first waits and once when all have gone out."""
    path, sock = listener
    filled = fill(path)
    n = Notifier(path)
    with capture_logs() as logs:
        for i in range(20):
            n.status(f"{i} consoles up")
        for _ in range(filled):
            sock.recv(4096)
        n.status("done")
    assert [e["event"] for e in logs] == ["sd_notify_deferred", "sd_notify_caught_up"]
    assert sock.recv(4096) == b"STATUS=done"
    n.close()


def test_close_reports_what_it_could_not_send(listener: tuple[str, socket.socket]) -> None:
    """Closing while the manager's queue is still full logs the READY it drops, not silently."""
    path, _ = listener
    fill(path)
    n = Notifier(path)
    n.ready("up")
    with capture_logs() as logs:
        n.close()
    assert [(e["event"], e["fields"]) for e in logs] == [("sd_notify_dropped", "READY,STATUS")]
