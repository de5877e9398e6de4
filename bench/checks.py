"""How the benchmark knows bytes arrived intact: the flood checker and log counters."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import clients
import peers
import vmsim
from peers import Console, Peer


class Checker:
    """Checks flood bytes against the pattern as they arrive.

    A peer may skip bytes for a slow client (serialmux does, and says so in-band):
    after a mismatch the checker finds its place in the pattern again, counting
    ``foreign`` bytes (such notices) and ``resyncs``; ``good`` counts the bytes that
    continue the pattern, so ``total - good`` were lost on the way.
    """

    WINDOW = 32  # bytes that must match to resync: a false match is ~95**-32

    def __init__(self, total: int) -> None:
        pat = vmsim.pattern()
        self.span = clients.READ * 4
        self.raw = pat + pat[: self.span]
        self.pat = memoryview(self.raw)
        self.total = total
        self.got = 0  # bytes received
        self.good = 0  # bytes that continue the pattern
        self.pos = 0  # offset in the pattern of the next expected byte
        self.synced = True
        self.carry = b""  # unsynced bytes kept to search across reads
        self.bad_at: int | None = None
        self.resyncs = 0
        self.foreign = 0

    def feed(self, data: bytes) -> None:
        self.got += len(data)
        mv = memoryview(data)
        while mv:
            if not self.synced:
                mv = self._resync(mv)
                continue
            k = min(len(mv), self.span)
            exp = self.pat[self.pos : self.pos + k]
            if mv[:k] == exp:
                i = k
            else:
                lo, hi = 0, k  # first differing byte: binary search on equal prefixes
                while lo < hi:
                    mid = (lo + hi) // 2
                    if mv[: mid + 1] == exp[: mid + 1]:
                        lo = mid + 1
                    else:
                        hi = mid
                i = lo
                if self.bad_at is None:
                    self.bad_at = self.good + i
                self.synced = False
            self.good += i
            self.pos = (self.pos + i) % vmsim.PATTERN_LEN
            mv = mv[i:]

    def _resync(self, mv: memoryview) -> memoryview:
        buf = self.carry + bytes(mv)
        w = self.WINDOW
        for j in range(len(buf) - w + 1):
            p = self.raw.find(buf[j : j + w], 0, vmsim.PATTERN_LEN + w - 1)
            if p >= 0:
                self.foreign += j
                self.resyncs += 1
                self.synced = True
                self.pos = p
                self.carry = b""
                return memoryview(buf)[j:]
        keep = max(0, len(buf) - (w - 1))
        self.foreign += keep
        self.carry = buf[keep:]
        return memoryview(b"")


def pct(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    i = min(len(sorted_vals) - 1, max(0, round(q / 100 * len(sorted_vals)) - 1))
    return sorted_vals[i]


def errors_logged(p: Peer, res: dict[str, Any]) -> None:
    """Count error-level lines a peer wrote to stderr (serialmux logs JSON lines)."""
    try:
        with open(p.stderr_path, "rb") as f:
            lines = [
                ln
                for ln in f
                if (b'"level": "error"' in ln or b"ERROR" in ln) and b"GSS-API" not in ln
            ]
    except OSError:
        return
    if lines:
        res["errors_logged"] = len(lines)
        first = lines[0].decode(errors="replace")
        res["first_error"] = first.replace("|", "/").replace("\\n", " ")[:300]


def count_conserver_logs(p: peers.Conserver, cons: list[Console]) -> int:
    total = 0
    for c in cons:
        with contextlib.suppress(FileNotFoundError):
            total += vmsim.count_paced_bytes(p.log_path(c).read_bytes())
    return total


def count_serialmux_rings(p: peers.Serialmux, cons: list[Console]) -> int | str:
    """Count paced bytes in serialmux's rings (RingReader), else via `serialmux logs --raw`."""
    rings = p.state_dir() / "rings"
    try:
        from serialmux.ring import RecordKind, RingReader, Skipped
    except Exception as e:
        reader_err = f"serialmux.ring.RingReader: {type(e).__name__}: {e}"
    else:
        total, lost = 0, 0
        try:
            for c in cons:
                path = rings / f"{c.name}.ring"
                if not path.exists():
                    continue
                chunks = []
                with RingReader(path) as reader:
                    for rec in reader.records():
                        if isinstance(rec, Skipped):
                            lost += rec.count
                        elif rec.kind is RecordKind.OUTPUT:
                            chunks.append(rec.payload)
                total += vmsim.count_paced_bytes(b"".join(chunks))
        except Exception as e:
            reader_err = f"RingReader failed: {type(e).__name__}: {e}"
        else:
            return total if not lost else f"{total} ({lost} records overwritten)"
    cli = Path(sys.executable).parent / "serialmux"
    total = 0
    try:
        for c in cons:
            out = subprocess.run(
                [str(cli), "logs", c.name, "--raw", "--config", str(p.work / "serialmux.toml")],
                capture_output=True,
                timeout=30,
            )
            if out.returncode:
                return f"pending ({reader_err}; `serialmux logs` rc={out.returncode})"
            total += vmsim.count_paced_bytes(out.stdout)
        return total
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"pending ({reader_err}; `serialmux logs`: {e})"
