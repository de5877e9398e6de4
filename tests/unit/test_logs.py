"""Tests of serialmux.logs: where `serialmux logs` starts, its formats, and follow."""

from __future__ import annotations

import io
import json
import re
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from serialmux.logs import (
    follow_chunks,
    logs_chunks,
    parse_since,
    print_logs,
)
from serialmux.ring import RecordKind, RingWriter
from tests.support import open_files

SMALL = 64 << 10
NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def ns(when: datetime) -> int:
    return int(when.timestamp() * 1_000_000_000)


@pytest.fixture
def ring(tmp_path: Path) -> Path:
    return tmp_path / "vm1.ring"


def write_logs(ring: Path, out: io.BytesIO, **kwargs: Any) -> int:
    """The scrollback as `serialmux logs` prints it, to *out*; the cursor a follow starts at."""
    cursor: int = print_logs(logs_chunks(ring, **kwargs), out)
    return cursor


def run(ring: Path, **kwargs: object) -> bytes:
    out = io.BytesIO()
    write_logs(ring, out, **kwargs)
    return out.getvalue()


def test_parse_since_forms() -> None:
    """parse_since understands 'N unit ago', yesterday, ISO 8601 and HH:MM."""
    assert parse_since("10 min ago", NOW) == NOW - timedelta(minutes=10)
    assert parse_since("2h ago", NOW) == NOW - timedelta(hours=2)
    assert parse_since("3 days ago", NOW) == NOW - timedelta(days=3)
    assert parse_since("45s ago", NOW) == NOW - timedelta(seconds=45)
    assert parse_since("yesterday", NOW) == datetime(2024, 4, 30, tzinfo=UTC)
    assert parse_since("2024-04-01T10:00:00Z", NOW) == datetime(2024, 4, 1, 10, tzinfo=UTC)
    assert parse_since("2024-04-01", NOW) == datetime(2024, 4, 1, tzinfo=UTC)
    assert parse_since("11:30", NOW) == datetime(2024, 5, 1, 11, 30, tzinfo=UTC)
    assert parse_since("13:00", NOW) == datetime(2024, 4, 30, 13, 0, tzinfo=UTC)


def test_parse_since_rejects_nonsense() -> None:
    """parse_since raises ValueError naming the value and the accepted forms."""
    with pytest.raises(ValueError, match=r"'last tuesday' is not understood.*min ago"):
        parse_since("last tuesday", NOW)
    with pytest.raises(ValueError, match="time of day"):
        parse_since("25:00", NOW)


@pytest.mark.parametrize("text", ["99999999999999999999 days ago", "1000000 weeks ago",
                                  "9" * 400 + " s ago"])
def test_parse_since_out_of_range_is_value_error(text: str) -> None:
    """A --since too far back (or infinite) is a ValueError, not an OverflowError."""
    with pytest.raises(ValueError, match="too far back"):
        parse_since(text, NOW)


def test_last_n_lines(ring: Path) -> None:
    """lines=N prints exactly the last N lines of output, trimming the first record."""
    w = RingWriter.open(ring, SMALL)
    for i in range(100):
        w.append(b"line %d\r\nline %d.5\r\n" % (i, i))
    w.close()
    assert run(ring, lines=3) == b"line 98.5\r\nline 99\r\nline 99.5\r\n"
    assert run(ring, lines=None).startswith(b"line ")


def test_last_lines_with_partial_line_and_marker(ring: Path) -> None:
    """A trailing partial line counts as a line, and a marker prints on its own line."""
    w = RingWriter.open(ring, SMALL)
    w.append(b"a\r\nb\r\nlogin: ", time_ns=ns(NOW))
    w.marker(RecordKind.ACTION, "NMI sent by alice", user="alice", time_ns=ns(NOW))
    w.close()
    assert run(ring, lines=2) == (
        b"b\r\nlogin: \r\n-- serialmux: 2024-05-01T12:00:00Z NMI sent by alice --\r\n"
    )


def test_boot_starts_at_last_boot_marker(ring: Path) -> None:
    """boot=True starts at the last VM up / daemon start / RESET marker."""
    w = RingWriter.open(ring, SMALL)
    w.append(b"first boot\r\n")
    w.marker(RecordKind.VM_EVENT, "VM reset by bob", event="RESET")
    w.append(b"second boot\r\n")
    w.close()
    out = run(ring, lines=None, boot=True)
    assert b"first boot" not in out
    assert out.startswith(b"-- serialmux: ")
    assert out.endswith(b"second boot\r\n")


def test_since_starts_at_time(ring: Path) -> None:
    """since= starts at the first record written at or after that time."""
    w = RingWriter.open(ring, SMALL)
    for minute in range(10):
        w.append(b"minute %d\r\n" % minute, time_ns=ns(NOW + timedelta(minutes=minute)))
    w.close()
    since = parse_since("5 min ago", NOW + timedelta(minutes=10))
    assert run(ring, lines=None, since=since) == b"".join(
        b"minute %d\r\n" % m for m in range(5, 10)
    )
    assert run(ring, lines=2, since=since) == b"minute 8\r\nminute 9\r\n"


def test_json_lines_parse(ring: Path) -> None:
    """as_json writes one parseable JSON object per record with seq, time, kind, text/data."""
    w = RingWriter.open(ring, SMALL)
    w.append(b"ok \xff\r\n", time_ns=ns(NOW))
    w.marker(RecordKind.ATTACH, "alice attached", user="alice")
    w.close()
    lines = run(ring, lines=None, as_json=True).splitlines()
    objs = [json.loads(line) for line in lines]
    assert objs[0] == {
        "seq": 1,
        "time": "2024-05-01T12:00:00.000Z",
        "kind": "output",
        "data": "ok \\xff\r\n",
    }
    assert objs[1]["kind"] == "attach"
    assert objs[1]["text"] == "alice attached"
    assert objs[1]["fields"] == {"user": "alice"}


def test_raw_is_byte_exact(ring: Path) -> None:
    """raw=True writes the output bytes exactly, all 256 values, and no markers."""
    data = bytes(range(256)) * 300
    w = RingWriter.open(ring, 1 << 20)
    w.marker(RecordKind.DAEMON_START, "daemon started")
    w.append(data)
    w.marker(RecordKind.DAEMON_STOP, "daemon stopped")
    w.close()
    assert run(ring, lines=None, raw=True) == data


def test_timestamps_prefix_each_line(ring: Path) -> None:
    """timestamps=True prefixes each line with the time of the record that started it."""
    w = RingWriter.open(ring, SMALL)
    w.append(b"one\r\ntw", time_ns=ns(NOW))
    w.append(b"o\r\nthree\r\n", time_ns=ns(NOW + timedelta(seconds=1.5)))
    w.close()
    assert run(ring, lines=None, timestamps=True) == (
        b"[2024-05-01T12:00:00.000Z] one\r\n"
        b"[2024-05-01T12:00:00.000Z] two\r\n"
        b"[2024-05-01T12:00:01.500Z] three\r\n"
    )


def test_print_logs_returns_cursor(ring: Path) -> None:
    """The scrollback without follow returns the seq after the last record, for a follow to
    continue from."""
    w = RingWriter.open(ring, SMALL)
    w.append(b"x\n")
    w.append(b"y\n")
    assert run(ring) == b"x\ny\n"
    assert write_logs(ring, io.BytesIO()) == 3
    w.close()


class Watched(io.BytesIO):
    """An output that sets an event once it has received an expected byte string."""

    def __init__(self, expect: bytes) -> None:
        super().__init__()
        self.expect = expect
        self.seen = threading.Event()
        self.lock = threading.Lock()

    def write(self, data: bytes) -> int:  # type: ignore[override]
        with self.lock:
            n = super().write(data)
            if self.expect in self.getvalue():
                self.seen.set()
            return n


def follow_in_thread(
    ring: Path, out: Watched, cursor: int
) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(
        target=print_logs,
        args=(follow_chunks(ring, cursor), out),
        kwargs={"stop": stop, "poll_interval": 0.01},
    )
    thread.start()
    return thread, stop


def test_follow_sees_new_output(ring: Path) -> None:
    """follow_logs prints output appended after the cursor and stops when told."""
    w = RingWriter.open(ring, SMALL)
    w.append(b"before\r\n")
    cursor = write_logs(ring, io.BytesIO())
    out = Watched(b"after\r\n")
    thread, stop = follow_in_thread(ring, out, cursor)
    try:
        w.append(b"after\r\n")
        assert out.seen.wait(timeout=30)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert out.getvalue() == b"after\r\n"
    w.close()


def test_follow_reports_lapping(ring: Path) -> None:
    """A follower whose cursor was overwritten prints the skipped count, then newer output."""
    w = RingWriter.open(ring, SMALL)
    w.append(b"start\r\n")
    cursor = write_logs(ring, io.BytesIO())
    for i in range(5000):
        w.append(b"filler %d\r\n" % i)
    out = Watched(b"filler 4999\r\n")
    thread, stop = follow_in_thread(ring, out, cursor)
    try:
        assert out.seen.wait(timeout=30)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert b"records overwritten while reading --\r\n" in out.getvalue()
    w.close()


def test_follow_handles_replaced_ring(ring: Path, tmp_path: Path) -> None:
    """When the ring file is replaced by a fresh one, follow continues with the new file."""
    w = RingWriter.open(ring, SMALL)
    w.append(b"old\r\n")
    cursor = write_logs(ring, io.BytesIO())
    out = Watched(b"old-tail\r\n")
    thread, stop = follow_in_thread(ring, out, cursor)
    try:
        w.append(b"old-tail\r\n")
        assert out.seen.wait(timeout=30)
        w.close()
        out.expect, out.seen = b"new\r\n", threading.Event()
        ring.rename(tmp_path / "aside")
        w = RingWriter.open(ring, SMALL)
        w.append(b"new\r\n")
        assert out.seen.wait(timeout=30)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert b"ring file replaced" in out.getvalue()
    w.close()


def test_follow_carries_on_across_a_resize(ring: Path) -> None:
    """A ring resized under a follower (ring_size changed): it follows on from where it was,
    printing nothing a second time (it printed the whole kept scrollback again)."""
    w = RingWriter.open(ring, SMALL)
    for i in range(5):
        w.append(b"line %d\r\n" % i)
    cursor = write_logs(ring, io.BytesIO())
    out = Watched(b"line 5\r\n")
    thread, stop = follow_in_thread(ring, out, cursor)
    try:
        w.append(b"line 5\r\n")
        assert out.seen.wait(timeout=30)
        w.close()
        out.expect, out.seen = b"after\r\n", threading.Event()
        w = RingWriter.open(ring, SMALL * 2)
        w.append(b"after\r\n")
        assert out.seen.wait(timeout=30)
    finally:
        stop.set()
        thread.join(timeout=30)
    text = out.getvalue()
    assert text.count(b"line 0") == 0  # before the follower's cursor: never printed by it
    assert text.count(b"line 5") == 1
    assert b"ring resized from 65536 to 131072 bytes" in text
    assert b"following on" in text
    w.close()


@pytest.mark.parametrize("fmt", [{}, {"timestamps": True}, {"as_json": True}, {"raw": True}])
def test_chunks_are_bounded_and_add_up_to_write_logs(ring: Path, fmt: dict[str, bool]) -> None:
    """logs_chunks hands out non-empty pieces of at most `chunk` bytes that together are
    exactly what write_logs prints, in every format (a marker among the output too)."""
    w = RingWriter.open(ring, SMALL)
    for i in range(300):
        w.append(b"line %03d with some text\r\n" % i + (b"partial" if i % 7 == 0 else b""))
        if i == 150:
            w.marker(RecordKind.VM_UP, "vm started")
    pieces = list(logs_chunks(ring, lines=None, chunk=1000, **fmt))
    assert len(pieces) > 5
    assert all(0 < len(p) <= 1000 for p in pieces)
    assert all(len(p) == 1000 for p in pieces[:-1])
    assert b"".join(pieces) == run(ring, lines=None, **fmt)
    w.close()


def test_follow_chunks_say_when_caught_up_and_close_the_ring(ring: Path) -> None:
    """follow_chunks hands out what is new then an empty piece (caught up), each time it
    looks; it holds the ring open between looks and closing it closes the ring file."""
    w = RingWriter.open(ring, SMALL)
    w.append(b"before\r\n")
    writer_files = open_files(ring)
    follow = follow_chunks(ring, write_logs(ring, io.BytesIO()), chunk=4)
    assert next(follow) == b""
    w.append(b"after\r\n")
    assert [next(follow) for _ in range(3)] == [b"afte", b"r\r\n", b""]
    assert next(follow) == b""
    assert open_files(ring) == writer_files + 1
    follow.close()
    assert open_files(ring) == writer_files
    w.close()


def test_closing_a_tail_midway_closes_the_ring(ring: Path) -> None:
    """A one-shot's generator closed before its end (client gone, stalled, cancelled) closes
    its ring file; until then it holds it."""
    w = RingWriter.open(ring, SMALL)
    w.append(b"x" * 5000)
    writer_files = open_files(ring)
    tail = logs_chunks(ring, lines=None, chunk=1000)
    assert next(tail) == b"x" * 1000
    assert open_files(ring) == writer_files + 1
    tail.close()
    assert open_files(ring) == writer_files
    w.close()


def follow_after_open_line(ring: Path, then: list[bytes | str], **kwargs: bool) -> bytes:
    """print_logs --follow of a ring ending in an open "login: " line, while *then* is
    appended (bytes: output, str: an ATTACH marker); what it printed once "end" came."""
    w = RingWriter.open(ring, SMALL)
    w.append(b"web-01 login: ")
    out = Watched(b"login: ")
    stop = threading.Event()
    thread = threading.Thread(target=print_logs,
                              args=(logs_chunks(ring, follow=True, **kwargs), out),
                              kwargs={"stop": stop, "poll_interval": 0.01})
    thread.start()
    try:
        assert out.seen.wait(timeout=30)  # the tail is out: what follows is the follow's
        out.expect, out.seen = b"end\r\n", threading.Event()
        for item in [*then, b"end\r\n"]:
            if isinstance(item, str):
                w.marker(RecordKind.ATTACH, item)
            else:
                w.append(item)
        assert out.seen.wait(timeout=30)
    finally:
        stop.set()
        thread.join(timeout=30)
        w.close()
    assert not thread.is_alive()
    return out.getvalue()


def test_a_follow_continues_an_open_line_without_a_second_stamp(ring: Path) -> None:
    """--timestamps: a line the tail left open (a login prompt) and the follow finishes is
    one line with one time stamp."""
    text = follow_after_open_line(ring, [b"root\r\n"], timestamps=True)
    assert re.fullmatch(rb"\[[^]]+\] web-01 login: root\r\n\[[^]]+\] end\r\n", text), text


def test_a_marker_after_an_open_line_starts_a_line_of_its_own(ring: Path) -> None:
    """A marker the follow prints right after a line the tail left open goes on a new line."""
    text = follow_after_open_line(ring, ["alice attached"])
    assert re.fullmatch(rb"web-01 login: \r\n-- serialmux: \S+ alice attached --\r\nend\r\n",
                        text), text
