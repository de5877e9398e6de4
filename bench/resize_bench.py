"""Benchmark of a ring resize (``ring_size`` changed): wall time and peak RSS.

Run: python bench/resize_bench.py [--from 64MiB] [--to 32MiB] [--payload 8] [--dir /tmp]
Fills a ring of --from with records of --payload bytes until it has wrapped, then
opens it at --to (which resizes it) in a fresh subprocess, and prints the subprocess's
wall time for the open and its peak RSS (``ru_maxrss``) before and after.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from serialmux.ring import RingReader, RingWriter, parse_size

_CHILD = """
import resource, sys, time
from pathlib import Path
from serialmux.ring import RingWriter
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
RingWriter.open(Path(sys.argv[1]), int(sys.argv[2])).close()
elapsed = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"{elapsed:.3f} {before} {after}")
"""


def fill(path: Path, size: int, payload: int) -> int:
    """Fill a ring of *size* at *path* with *payload*-byte records until it wrapped."""
    writer = RingWriter.open(path, size, sync_create=False)
    for n in range(size // (payload + 40) * 4 // 3):  # a third of a lap past the first wrap
        writer.append((b"%d\n" % n).rjust(payload, b" ")[-payload:])
    writer.close()
    with RingReader(path) as reader:
        return sum(1 for _ in reader.records())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--from", dest="old", default="64MiB")
    parser.add_argument("--to", dest="new", action="append")
    parser.add_argument("--payload", type=int, default=8)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    old = parse_size(args.old)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        ring = Path(tmp) / "vm.ring"
        master = Path(tmp) / "master.ring"
        held = fill(master, old, args.payload)
        for new in args.new or ["32MiB"]:
            subprocess.run(["cp", "--sparse=never", str(master), str(ring)], check=True)
            out = subprocess.run([sys.executable, "-c", _CHILD, str(ring), str(parse_size(new))],
                                 check=True, capture_output=True, text=True).stdout.split()
            secs, before, after = float(out[0]), int(out[1]) / 1024, int(out[2]) / 1024
            print(f"resize {args.old} ({held} records of {args.payload} bytes) -> {new}: "
                  f"{secs:6.2f} s, peak RSS {after:6.1f} MiB (at start {before:.1f} MiB)")


if __name__ == "__main__":
    main()
