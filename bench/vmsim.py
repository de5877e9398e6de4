"""The shared VM simulator: PTY pairs held on the master side, as QEMU holds them.

Every peer in the benchmark is pointed at a *slave* path (``/dev/pts/N``) that this
simulator gives out; the simulator plays the VM behind the master side. One
process serves thousands of consoles from one ``selectors`` (epoll) loop.

Modes, per console:

``flood``  after ``go``, write ``bytes`` bytes of :func:`pattern` as fast as the
           consumer takes them (the PTY's own back-pressure paces us).
``echo``   write back every byte read (the keystroke round trip).
``paced``  after ``go``, print fixed-length lines at 115200 baud (11520 B/s),
           counting the bytes the PTY accepted; ``stop`` ends pacing and the
           pending tail is still flushed, so ``produced`` is exact.

The simulator also keeps the slave side open (never reading it) so that a peer
closing or not yet opening the slave does not turn the master into an endless
EPOLLHUP/EIO; it sets the line discipline raw once, on that fd.

Control: JSON lines on stdin, one JSON reply line per command on stdout::

    {"op": "create", "n": 3, "mode": "flood", "bytes": 100000000}
        -> {"ok": true, "consoles": [{"id": 0, "path": "/dev/pts/7"}, ...]}
    {"op": "go", "ids": [0]}      {"op": "stop", "ids": [0]}
    {"op": "stats", "ids": [0]}   -> {"ok": true, "stats": {"0": {...}}}
    {"op": "close", "ids": [0]}   {"op": "quit"}

:class:`VMSim` is the asyncio client the runner uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import random
import resource
import selectors
import sys
import termios
import time
import tty
from typing import Any

PATTERN_LEN = 1_000_003  # prime, so chunk boundaries never line up with it
BAUD_BYTES_PER_S = 11_520  # 115200 baud, 8N1 -> 10 bits a byte
LINE_LEN = 96  # bytes per paced line, "\r\n" included
TICK_S = 0.25  # each console writes once a tick; consoles are spread over the tick

_pattern: bytes | None = None


def pattern() -> bytes:
    """Return the deterministic flood pattern: printable ASCII lines, PATTERN_LEN bytes."""
    global _pattern
    if _pattern is None:
        raw = random.Random(20261122).randbytes(PATTERN_LEN)
        table = bytes(32 + (i % 95) for i in range(256))
        buf = bytearray(raw.translate(table))
        buf[79::80] = b"\n" * len(range(79, PATTERN_LEN, 80))
        _pattern = bytes(buf)
    return _pattern


def paced_line(console: int, seq: int) -> bytes:
    """Return paced line ``seq`` of a console: LINE_LEN bytes, recognisable in any log."""
    head = b"vmsim %05d %09d " % (console, seq)
    return head + b"." * (LINE_LEN - len(head) - 2) + b"\r\n"


def count_paced_bytes(data: bytes) -> int:
    """Count the bytes of whole paced lines in ``data`` (a log with other text mixed in)."""
    n = 0
    start = 0
    while True:
        i = data.find(b"vmsim ", start)
        if i < 0:
            return n
        line = data[i : i + LINE_LEN]
        if len(line) == LINE_LEN and line.endswith(b".\r\n"):
            n += LINE_LEN
            start = i + LINE_LEN
        else:
            start = i + 6


class Console:
    """One simulated VM serial port (a PTY pair)."""

    __slots__ = (
        "block",
        "cid",
        "echoed",
        "events",
        "going",
        "master",
        "max_pending",
        "mode",
        "out",
        "path",
        "phase",
        "produced",
        "sent",
        "seq",
        "slave",
        "total",
    )

    def __init__(self, cid: int, mode: str, total: int, phase: float) -> None:
        self.cid = cid
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave, termios.TCSANOW)
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self.slave)
        self.mode = mode
        self.total = total  # flood: bytes to write
        self.sent = 0  # flood: bytes written
        self.going = False
        self.out = bytearray()  # echo/paced: bytes waiting for the PTY to accept them
        self.produced = 0  # paced: bytes the PTY accepted
        self.echoed = 0
        self.seq = 0
        self.phase = phase
        self.events = 0
        self.max_pending = 0
        self.block: bytes | None = None  # paced: the lines of one tick

    def close(self) -> None:
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)

    def stats(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "produced": self.produced,
            "echoed": self.echoed,
            "pending": len(self.out),
            "max_pending": self.max_pending,
            "done": self.mode == "flood" and self.sent >= self.total,
        }


class Simulator:
    """The selectors loop serving every console and the stdin control channel."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.consoles: dict[int, Console] = {}
        self.next_id = 0
        self.pat = pattern()
        self.pat2 = self.pat + self.pat[:65536]  # lets a flood chunk wrap without a copy
        self.paced: list[Console] = []
        self.tick_start = time.monotonic()
        self.cursor = 0  # paced consoles visited so far in the current tick
        self.ctl = b""
        self.running = True

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        os.set_blocking(0, False)
        self.sel.register(0, selectors.EVENT_READ, None)
        while self.running:
            timeout = 0.01 if self.paced else 1.0
            for key, ev in self.sel.select(timeout):
                if key.data is None:
                    self._control()
                else:
                    self._service(key.data, ev)
            if self.paced:
                self._pace()

    def _interest(self, c: Console) -> None:
        ev = 0
        if c.mode == "echo":
            ev |= selectors.EVENT_READ
        if (c.mode == "flood" and c.going and c.sent < c.total) or c.out:
            ev |= selectors.EVENT_WRITE
        try:
            key = self.sel.get_key(c.master)
        except KeyError:
            key = None
        if key is None:
            if ev:
                self.sel.register(c.master, ev, c)
        elif ev == 0:
            self.sel.unregister(c.master)
        elif key.events != ev:
            self.sel.modify(c.master, ev, c)

    def _service(self, c: Console, ev: int) -> None:
        if ev & selectors.EVENT_READ:
            try:
                data = os.read(c.master, 65536)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EIO):
                    raise
                data = b""
            if data:
                c.echoed += len(data)
                c.out += data
        if c.mode == "flood" and c.going and c.sent < c.total:
            self._flood(c)
        if c.out:
            self._flush(c)
        self._interest(c)

    def _flood(self, c: Console) -> None:
        # Keep writing while the PTY takes bytes: one wakeup drains its whole window.
        while c.sent < c.total:
            off = c.sent % PATTERN_LEN
            n = min(65536, c.total - c.sent)
            try:
                w = os.write(c.master, memoryview(self.pat2)[off : off + n])
            except BlockingIOError:
                return
            c.sent += w

    def _flush(self, c: Console) -> None:
        try:
            w = os.write(c.master, c.out)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno != errno.EIO:
                raise
            return
        if c.mode == "paced":
            c.produced += w
        del c.out[:w]

    def _pace(self) -> None:
        # Consoles are spread evenly over each tick, so the load is smooth, not a burst.
        now = time.monotonic()
        n = len(self.paced)
        per_tick = int(BAUD_BYTES_PER_S * TICK_S) // LINE_LEN  # lines a console writes a tick
        while True:
            elapsed = now - self.tick_start
            due = n if elapsed >= TICK_S else int(n * elapsed / TICK_S)
            for c in self.paced[self.cursor : due]:
                if c.going:
                    if c.block is None:  # built once: 5000 consoles must cost the VM little
                        c.block = b"".join(paced_line(c.cid, i) for i in range(per_tick))
                    c.out += c.block
                    c.seq += per_tick
                    self._flush(c)
                    c.max_pending = max(c.max_pending, len(c.out))  # what the PTY refused
                    self._interest(c)
            self.cursor = max(self.cursor, due)
            if elapsed < TICK_S:
                return
            self.tick_start += TICK_S
            self.cursor = 0
            if now - self.tick_start > 5 * TICK_S:  # we fell far behind: do not burst to catch up
                self.tick_start = now

    # -- control -----------------------------------------------------------------------------
    def _control(self) -> None:
        try:
            chunk = os.read(0, 65536)
        except BlockingIOError:
            return
        if not chunk:
            self.running = False
            return
        self.ctl += chunk
        while b"\n" in self.ctl:
            line, self.ctl = self.ctl.split(b"\n", 1)
            if line.strip():
                try:
                    reply = self._command(json.loads(line))
                except Exception as e:  # report, keep serving: the runner decides
                    reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                self._reply(reply)

    def _reply(self, obj: dict[str, Any]) -> None:
        data = (json.dumps(obj) + "\n").encode()
        os.set_blocking(1, True)
        while data:
            data = data[os.write(1, data) :]

    def _command(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd["op"]
        ids = [int(i) for i in cmd.get("ids", [])]
        if op == "create":
            made = []
            n = int(cmd["n"])
            for k in range(n):
                c = Console(self.next_id, cmd["mode"], int(cmd.get("bytes", 0)), k / max(n, 1))
                self.next_id += 1
                self.consoles[c.cid] = c
                if c.mode == "paced":
                    self.paced.append(c)
                self._interest(c)
                made.append({"id": c.cid, "path": c.path})
            return {"ok": True, "consoles": made}
        if op in ("go", "stop"):
            for i in ids:
                self.consoles[i].going = op == "go"
                self._interest(self.consoles[i])
            return {"ok": True}
        if op == "stats":
            which = ids or list(self.consoles)
            return {"ok": True, "stats": {str(i): self.consoles[i].stats() for i in which}}
        if op == "close":
            for i in ids:
                c = self.consoles.pop(i)
                if c in self.paced:
                    self.paced.remove(c)
                with contextlib.suppress(KeyError):
                    self.sel.unregister(c.master)
                c.close()
            return {"ok": True}
        if op == "quit":
            self.running = False
            return {"ok": True}
        return {"ok": False, "error": f"unknown op {op!r}"}


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    raise_nofile()
    sim = Simulator()
    try:
        sim.run()
    finally:
        for c in sim.consoles.values():
            c.close()


class VMSim:
    """Asyncio client of a simulator subprocess; every call is bounded by a timeout."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            os.path.abspath(__file__),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=1 << 24,
            start_new_session=True,
        )

    async def call(self, op: str, timeout: float = 60.0, **kw: Any) -> dict[str, Any]:
        assert self.proc
        assert self.proc.stdin
        assert self.proc.stdout
        self.proc.stdin.write((json.dumps({"op": op, **kw}) + "\n").encode())
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError("vmsim exited")
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"vmsim {op}: {reply.get('error')}")
        return reply

    async def create(self, n: int, mode: str, nbytes: int = 0) -> list[dict[str, Any]]:
        reply = await self.call("create", n=n, mode=mode, bytes=nbytes)
        consoles: list[dict[str, Any]] = reply["consoles"]
        return consoles

    async def stats(self, ids: list[int]) -> dict[str, dict[str, Any]]:
        reply = await self.call("stats", ids=ids)
        stats: dict[str, dict[str, Any]] = reply["stats"]
        return stats

    async def close(self) -> None:
        if self.proc is None:
            return
        try:
            if self.proc.returncode is None:
                await self.call("quit", timeout=5)
                await asyncio.wait_for(self.proc.wait(), 5)
        except (Exception, asyncio.CancelledError):
            pass
        finally:
            if self.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()


if __name__ == "__main__":
    main()
