"""Process-tree CPU, memory and open-file facts read from /proc, for the benchmark.

A peer that forks (sshd's per-connection children, conserver's group children,
socat under sshd) is measured as its whole tree: CPU is utime+stime summed over
the live descendants, memory is VmRSS summed the same way.
"""

from __future__ import annotations

import os

CLK_TCK = os.sysconf("SC_CLK_TCK")


def children_map() -> dict[int, list[int]]:
    """Return {ppid: [pid, ...]} for every process visible now."""
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(name))
    return kids


def tree(root: int) -> list[int]:
    """Return root and all its live descendants."""
    kids = children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """Sum utime+stime (seconds) over pids; vanished ones count as zero."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def rss_bytes(pids: list[int]) -> int:
    """Sum VmRSS over pids (shared pages are counted once per process, as ps does)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


def open_paths(pids: list[int], wanted: set[str]) -> int:
    """Count how many of the paths in ``wanted`` some process in pids has open."""
    seen: set[str] = set()
    for pid in pids:
        d = f"/proc/{pid}/fd"
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for fd in names:
            try:
                target = os.readlink(f"{d}/{fd}")
            except OSError:
                continue
            if target in wanted:
                seen.add(target)
    return len(seen)


def listening_ports(host_hex: str = "0100007F") -> set[int]:
    """Return the TCP ports in LISTEN state on 127.0.0.1 (from /proc/net/tcp)."""
    ports = set()
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            addr, state = parts[1], parts[3]
            ip, port = addr.split(":")
            if state == "0A" and ip == host_hex:
                ports.add(int(port, 16))
    return ports


def fd_count(pids: list[int]) -> int:
    """Sum the open file descriptors over pids."""
    total = 0
    for pid in pids:
        try:
            total += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
    return total
