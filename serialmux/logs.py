"""The engine of ``serialmux logs VM``: choose where to start in a ring and print it.

The work is resumable: :func:`logs_chunks` is a generator that reads the ring
and hands out the rendered output (the scrollback, then with a follow what is
appended) in pieces of at most ``chunk`` bytes, each step reading only until it
has a piece (or, the first, until it has found where to start: with ``--boot``
or ``--since`` a search of the ring), so the SSH ``logs`` command (commands.py) advances it one
step at a time in a worker thread and waits for its client in the event loop,
never in the thread. cli.py writes it to stdout with :func:`print_logs`, which
also writes :func:`follow_chunks` (a follow from a cursor alone). Records are read
through :class:`serialmux.ring.RingReader` and rendered in one of four formats:

* default: guest output bytes as they came, each marker on a line of its own
  as ``-- serialmux: <UTC time> <text> --``;
* ``timestamps``: the same, each line prefixed ``[YYYY-MM-DDTHH:MM:SS.mmmZ] ``
  with the time of the record that started the line;
* ``as_json``: one JSON object per record (and per skipped range);
* ``raw``: byte-exact guest output only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from collections.abc import Generator, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

from serialmux.errors import RingError
from serialmux.ring import Record, RecordKind, RingReader, Skipped

__all__ = [
    "LOGS_CHUNK",
    "POLL_INTERVAL",
    "follow_chunks",
    "logs_chunks",
    "parse_since",
    "print_logs",
]

#: Most bytes of output one step of the generators hands out.
LOGS_CHUNK = 64 * 1024
#: Seconds between looks at the ring when following it.
POLL_INTERVAL = 0.2

_AGO_RE = re.compile(
    r"^\s*(\d+(?:\.\d+)?)\s*(s|secs?|seconds?|m|mins?|minutes?|h|hrs?|hours?|d|days?|w|weeks?)"
    r"\s+ago\s*$",
    re.IGNORECASE,
)
_CLOCK_RE = re.compile(r"^\s*(\d{1,2}):(\d{2})(?::(\d{2}))?\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: datetime) -> datetime:
    """Parse a ``--since`` value relative to ``now``.

    Accepts "N unit ago" (s, sec, min, m, h, hour, d, day, w, week; plurals),
    "now", "today", "yesterday", an ISO 8601 date or time ("2024-05-01",
    "2024-05-01T12:00:00Z") and "HH:MM[:SS]" (today, or yesterday if that is
    still to come). Naive results take ``now``'s time zone.
    """
    word = text.strip().lower()
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if word == "now":
        return now
    if word == "today":
        return midnight
    if word == "yesterday":
        return midnight - timedelta(days=1)
    match = _AGO_RE.match(text)
    if match:
        unit = match.group(2).lower()
        unit = "m" if unit.startswith("m") else unit[0]
        try:
            return now - timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[unit])
        except OverflowError:  # also for an infinite float: "1e999 days ago" in digits
            raise ValueError(f"--since {text!r}: too far back (before the year 1)") from None
    match = _CLOCK_RE.match(text)
    if match:
        hour, minute, second = int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)
        if hour > 23 or minute > 59 or second > 59:
            raise ValueError(f"--since {text!r}: not a time of day (HH:MM or HH:MM:SS)")
        when = midnight.replace(hour=hour, minute=minute, second=second)
        return when - timedelta(days=1) if when > now else when
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"--since {text!r} is not understood: use e.g. '10 min ago', '2h ago', "
            "'yesterday', '14:30' or '2024-05-01T14:30:00Z'"
        ) from None
    if when.tzinfo is None and now.tzinfo is not None:
        when = when.replace(tzinfo=now.tzinfo)
    return when


def _to_ns(when: datetime) -> int:
    return int(when.timestamp() * 1_000_000_000)


def _iso(time_ns: int, millis: bool = True) -> str:
    when = datetime.fromtimestamp(time_ns / 1e9, tz=UTC)
    if millis:
        return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


class _Buffer:
    """Rendered bytes waiting to be handed out, in pieces of at most ``size`` bytes."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"chunk size must be at least 1 byte, not {size}")
        self.size = size
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    def full(self) -> Iterator[bytes]:
        """The pieces of exactly ``size`` bytes there are; the rest stays."""
        while len(self.data) >= self.size:
            piece = bytes(self.data[: self.size])
            del self.data[: self.size]
            yield piece

    def rest(self) -> Iterator[bytes]:
        """Everything there is, the last piece possibly short."""
        yield from self.full()
        if self.data:
            piece = bytes(self.data)
            self.data.clear()
            yield piece


class _Renderer:
    """Turns records into bytes for ``out``; keeps line state across calls (for follow)."""

    def __init__(self, out: _Buffer, *, timestamps: bool, as_json: bool, raw: bool) -> None:
        self.out = out
        self.timestamps = timestamps
        self.as_json = as_json
        self.raw = raw
        self.at_line_start = True

    def record(self, rec: Record, skip: int = 0) -> None:
        payload = rec.payload[skip:] if skip else rec.payload
        if self.raw:
            if rec.kind is RecordKind.OUTPUT:
                self.out.write(payload)
            return
        if self.as_json:
            obj: dict[str, Any] = {
                "seq": rec.seq,
                "time": _iso(rec.time_ns),
                "kind": rec.kind.name.lower(),
            }
            if rec.kind is RecordKind.OUTPUT:
                obj["data"] = payload.decode("utf-8", errors="backslashreplace")
            else:
                fields = rec.marker() or {}
                obj["text"] = rec.text()
                extra = {k: v for k, v in fields.items() if k != "text"}
                if extra:
                    obj["fields"] = extra
            self._json(obj)
            return
        if rec.kind is RecordKind.OUTPUT:
            self._output(payload, rec.time_ns)
        else:
            self._marker(f"{_iso(rec.time_ns, millis=False)} {rec.text()}", rec.time_ns)

    def skipped(self, item: Skipped, time_ns: int) -> None:
        if self.raw:
            return
        if self.as_json:
            self._json(
                {
                    "kind": "skipped",
                    "from_seq": item.from_seq,
                    "to_seq": item.to_seq,
                    "count": item.count,
                    "reason": item.reason,
                }
            )
            return
        what = "overwritten while reading" if item.reason == "overwritten" else "unreadable"
        self._marker(f"{item.count} records {what}", time_ns)

    def note(self, text: str, time_ns: int) -> None:
        """A line of our own (ring replaced...), in the current format."""
        if self.raw:
            return
        if self.as_json:
            self._json({"kind": "note", "time": _iso(time_ns), "text": text})
        else:
            self._marker(text, time_ns)

    def _json(self, obj: dict[str, Any]) -> None:
        self.out.write(json.dumps(obj, ensure_ascii=False).encode() + b"\n")

    def _marker(self, text: str, time_ns: int) -> None:
        lead = b"" if self.at_line_start else b"\r\n"
        stamp = f"[{_iso(time_ns)}] ".encode() if self.timestamps else b""
        self.out.write(lead + stamp + f"-- serialmux: {text} --\r\n".encode())
        self.at_line_start = True

    def _output(self, data: bytes, time_ns: int) -> None:
        if not data:
            return
        if not self.timestamps:
            self.out.write(data)
            self.at_line_start = data.endswith(b"\n")
            return
        stamp = f"[{_iso(time_ns)}] ".encode()
        parts = []
        for line in data.splitlines(keepends=True):
            if self.at_line_start:
                parts.append(stamp)
            parts.append(line)
            self.at_line_start = line.endswith(b"\n")
        self.out.write(b"".join(parts))


def _start(
    reader: RingReader, lines: int | None, since: datetime | None, boot: bool, until: int
) -> tuple[int, int]:
    """(seq, bytes to skip in it): the latest of the starts the options ask for."""
    starts = [(reader.first_seq(), 0)]
    if since is not None:
        starts.append((reader.seq_at_time(_to_ns(since)), 0))
    if boot:
        seq = reader.boot_seq()
        if seq is not None:
            starts.append((seq, 0))
    if lines is not None:
        starts.append(reader.tail_position(lines, until_seq=until) if lines > 0 else (until, 0))
    return max(starts)


def _emit(
    render: _Renderer, items: Iterable[Record | Skipped], skip_seq: int, skip: int
) -> Generator[bytes, None, int | None]:
    """Render records, handing out each full piece as it fills; return the seq after the
    last one seen, None if none."""
    after: int | None = None
    last_time = 0
    for item in items:
        if isinstance(item, Skipped):
            render.skipped(item, last_time)
            after = item.to_seq + 1
        else:
            render.record(item, skip if item.seq == skip_seq else 0)
            last_time = item.time_ns
            after = item.seq + 1
        yield from render.out.full()
    return after


def _tail(render: _Renderer, path: Path, lines: int | None, since: datetime | None,
          boot: bool) -> Generator[bytes, None, int]:
    with RingReader(path) as reader:
        until = reader.next_seq()
        seq, skip = _start(reader, lines, since, boot, until)
        if seq < until:
            yield from _emit(render, reader.records(seq, until_seq=until), seq, skip)
    yield from render.out.rest()
    return until


def follow_chunks(
    ring_path: Path,
    from_seq: int,
    *,
    timestamps: bool = False,
    as_json: bool = False,
    raw: bool = False,
    chunk: int = LOGS_CHUNK,
) -> Generator[bytes, None, None]:
    """Records from ``from_seq`` on as the writer appends them, in pieces of at most
    ``chunk`` bytes, without end.

    Each look at the ring hands out what is new, then an empty piece: the
    caller waits (a poll interval) before asking for more. A lapped reader
    gets a "records overwritten" line; a ring replaced by a fresh file (moved
    aside after damage) is followed from its start, and a missing file waited
    for. The ring's file is closed when the generator is closed.
    """
    render = _Renderer(_Buffer(chunk), timestamps=timestamps, as_json=as_json, raw=raw)
    yield from _follow(render, Path(ring_path), from_seq)


def _follow(render: _Renderer, path: Path, from_seq: int) -> Generator[bytes, None, None]:
    follower = _Follower(path, from_seq, render)
    try:
        while True:
            yield from follower.step()
            yield from render.out.rest()
            yield b""
    finally:
        follower.close()


def logs_chunks(
    ring_path: Path,
    *,
    lines: int | None = 200,
    since: datetime | None = None,
    boot: bool = False,
    timestamps: bool = False,
    as_json: bool = False,
    raw: bool = False,
    follow: bool = False,
    chunk: int = LOGS_CHUNK,
) -> Generator[bytes, None, int]:
    """A ring's scrollback in pieces of at most ``chunk`` bytes, then with ``follow``
    the records appended after it (:func:`follow_chunks`), without end.

    ``lines`` keeps the last N lines of output (None: everything), ``since``
    starts at a time, ``boot`` at the last boot marker; together, the latest
    start wins. Without ``follow`` it returns the next seq (the cursor a follow
    would start at). Only a follow hands out empty pieces (caught up: wait
    before the next step). The follow goes on with the tail's renderer: a line
    the tail left open (a ``login:`` prompt) is carried on, not stamped again,
    and a marker after it starts a line of its own. Raises RingError if the
    ring cannot be opened or read; the ring's file is open from the first step
    until the generator ends or is closed.
    """
    render = _Renderer(_Buffer(chunk), timestamps=timestamps, as_json=as_json, raw=raw)
    path = Path(ring_path)
    cursor = yield from _tail(render, path, lines, since, boot)
    if follow:
        yield from _follow(render, path, cursor)
    return cursor


def print_logs(pieces: Generator[bytes, None, Any], out: BinaryIO, *,
               stop: threading.Event | None = None,
               poll_interval: float = POLL_INTERVAL) -> Any:
    """Write *pieces* (:func:`logs_chunks` or :func:`follow_chunks`) to ``out``, then
    close them (the local ``serialmux logs``); return what they returned (the cursor
    of a scrollback without follow; None once ``stop`` ended a follow).

    A follow's output is flushed each time it has caught up, and looked at again
    every ``poll_interval`` seconds until ``stop`` is set (or for ever).
    """
    stop = stop or threading.Event()
    with contextlib.closing(pieces):
        while True:
            try:
                piece = next(pieces)
            except StopIteration as end:
                out.flush()
                return end.value
            if piece:
                out.write(piece)
                continue
            out.flush()
            if stop.wait(poll_interval):
                return None


class _Follower:
    """The state of a follow between looks at the ring: its reader and cursor."""

    def __init__(self, path: Path, cursor: int, render: _Renderer) -> None:
        self.path = path
        self.cursor: int | None = cursor
        self.render = render
        self.reader: RingReader | None = None

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None

    def step(self) -> Generator[bytes, None, None]:
        """One look: (re)open the ring if needed, render what is new, handing out full pieces."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return  # moved aside, the new one not created yet
        now = _now_ns()
        render = self.render
        replaced = self.reader is not None and self.reader.inode != (st.st_dev, st.st_ino)
        if replaced:
            self.close()
        if self.reader is None:
            try:
                self.reader = RingReader(self.path)
            except RingError:
                return  # being created: try again next poll
        reader = self.reader
        if replaced:
            if self.cursor is not None and reader.first_seq() <= self.cursor <= reader.next_seq():
                render.note("ring file replaced (resized); following on", now)  # seqs carried on
            else:
                render.note("ring file replaced; following the new one from its start", now)
                self.cursor = None
        if self.cursor is not None and reader.next_seq() < self.cursor:
            render.note("ring went back after a crash; continuing from its end", now)
            self.cursor = reader.next_seq()
        after = yield from _emit(render, reader.records(self.cursor), -1, 0)
        if after is not None:
            self.cursor = after
        elif self.cursor is None:
            self.cursor = reader.next_seq()


def _now_ns() -> int:
    return int(datetime.now(UTC).timestamp() * 1_000_000_000)
