"""Benchmark of serialmux.ring: append MB/s (80-byte records, 64 KiB chunks) and read MB/s.

Run: python bench/ring_bench.py [--seconds 2] [--size 64MiB] [--dir /tmp]
Each phase runs for about --seconds. Prints one line per phase.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from serialmux.ring import Record, RingReader, RingWriter, parse_size


def bench_append(path: Path, size: int, chunk: bytes, seconds: float) -> tuple[float, float]:
    """(MB/s, appends/s) appending ``chunk`` repeatedly for ``seconds``."""
    writer = RingWriter.open(path, size)
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(256):
            writer.append(chunk)
        count += 256
        if time.perf_counter() >= deadline:
            break
    elapsed = time.perf_counter() - start
    writer.close()
    return count * len(chunk) / elapsed / 1e6, count / elapsed


def bench_read(path: Path, seconds: float) -> tuple[float, float]:
    """(MB/s, records/s) reading the whole ring repeatedly for ``seconds``."""
    nbytes = records = 0
    start = time.perf_counter()
    with RingReader(path) as reader:
        while time.perf_counter() - start < seconds:
            for item in reader.records():
                if isinstance(item, Record):
                    nbytes += len(item.payload)
                    records += 1
    elapsed = time.perf_counter() - start
    return nbytes / elapsed / 1e6, records / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--size", default="64MiB")
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    size = parse_size(args.size)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        small = Path(tmp) / "small.ring"
        large = Path(tmp) / "large.ring"
        line = b"[  12.345678] systemd[1]: Started Journal Service for the console test.  \r\n"
        mbs, ops = bench_append(small, size, line, args.seconds)
        print(f"append {len(line)}-byte records: {mbs:8.1f} MB/s  {ops:10.0f} appends/s")
        mbs, ops = bench_append(large, size, bytes(range(256)) * 256, args.seconds)
        print(f"append 64 KiB chunks:      {mbs:8.1f} MB/s  {ops:10.0f} appends/s")
        mbs, ops = bench_read(small, args.seconds)
        print(f"read 80-byte records:      {mbs:8.1f} MB/s  {ops:10.0f} records/s")
        mbs, ops = bench_read(large, args.seconds)
        print(f"read 64 KiB records:       {mbs:8.1f} MB/s  {ops:10.0f} records/s")
        start = time.perf_counter()
        RingWriter.open(small, size).close()
        print(f"reopen {args.size} ring:         {1000 * (time.perf_counter() - start):8.2f} ms")


if __name__ == "__main__":
    main()
