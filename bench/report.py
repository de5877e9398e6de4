"""The benchmark's results: the machine header, the Markdown tables, latest.json.

Figures are medians over rounds; ratios are taken round by round against the
baseline (OpenSSH sshd + forced socat) and then the median, so that drift of a
shared machine between rounds cancels out.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import peers

Run = Any  # run.Run: the figures of one run (not imported: run.py imports this module)
BASELINE = "sshd+socat"
SETTINGS = ("rounds", "bytes", "samples", "idle_s", "load_s", "ssh_client")  # kept in latest.json


def machine() -> list[str]:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = f"{int(f.readline().split()[1]) / 2**20:.0f} GiB"
    vers = peers.versions()
    return [
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"- machine: {os.cpu_count()} cores ({model}), {mem} RAM, kernel {platform.release()}",
        f"- load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
        f" (a shared machine: other engineers' tests run too)",
        f"- RLIMIT_NOFILE soft/hard given to the daemons: "
        f"{'/'.join(map(str, resource.getrlimit(resource.RLIMIT_NOFILE)))}",
        f"- Python {platform.python_version()}; " + "; ".join(f"{k}: {v}" for k, v in vers.items()),
    ]


def med(vals: list[float]) -> float | None:
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def f1(v: float | None, unit: str = "") -> str:
    return "–" if v is None else f"{v:.1f}{unit}"


def f0(v: float | None) -> str:
    return "–" if v is None else f"{v:.0f}"


def round_ratio(rows: list[dict[str, Any]], base: list[dict[str, Any]], field: str) -> str:
    """Median over rounds of (this peer / the baseline) in the same round: drift cancels."""
    vals = [
        r[field] / b[field]
        for r, b in zip(rows, base, strict=False)
        if r.get(field) and b.get(field) and "error" not in r and "error" not in b
    ]
    return f"{statistics.median(vals):.2f}×" if vals else "–"


def one_line(err: str, n: int = 160) -> str:
    """The last line of an error (a traceback's verdict), fit for a table cell."""
    lines = [x.strip(" |+-") for x in err.splitlines() if x.strip(" |+-")]
    text = lines[0] if len(lines) < 2 else f"{lines[0][:60]} … {lines[-1]}"
    return text.replace("|", "/")[:n]


def report(run: Run, header: list[str]) -> str:
    a = run.args
    out = ["# serialmux benchmark results", "", *header, ""]
    out.append(
        f"- settings: rounds {a.rounds}, flood {a.bytes / 1e6:.0f} MB, {a.samples} keystrokes a "
        f"round, ssh clients: {' and '.join(a.ssh_client)}; "
        f"scale idle {a.idle_s:.0f} s, load {a.load_s:.0f} s"
    )
    out.append("")
    keys = list(dict.fromkeys(list(run.tput) + list(run.lat)))
    if keys:
        base = next((k for k in keys if k == (BASELINE, "openssh")), None)
        base = base or next((k for k in keys if k[0] == BASELINE), None)
        bname = f"{BASELINE} with the {base[1]} client" if base else "(baseline not run)"
        out += [
            f"## One console (medians over rounds; ratios vs {bname})",
            "",
            "| peer | client | MB/s | × base (per round) | lost to client MB (max) | daemon CPU %"
            " | RSS MB | RTT p50 µs | RTT p99 µs | p50 × base (per round)"
            " | daemon CPU µs a keystroke | rounds byte-exact (tput / rtt) |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for key in keys:
            name, cl = key
            t = [r for r in run.tput.get(key, []) if "mbps" in r]  # completed, maybe lossy
            t_ok = [r for r in t if r.get("ok")]
            lt = [r for r in run.lat.get(key, []) if r.get("ok")]
            mbps = med([r["mbps"] for r in t])
            p50 = med([r["p50"] for r in lt])
            r_t = round_ratio(run.tput.get(key, []), run.tput.get(base, []), "mbps")  # type: ignore[arg-type]
            r_l = round_ratio(run.lat.get(key, []), run.lat.get(base, []), "p50")  # type: ignore[arg-type]
            client_s = {"-": "tcp" if name != "conserver" else "console (pty)"}.get(cl, cl)
            out.append(
                f"| {run.make[name](Path('/nonexistent')).label} | {client_s} | {f1(mbps)}"
                f" | {r_t} | {f1(max([r.get('lost', 0) / 1e6 for r in t], default=None))}"
                f" | {f0(med([r['cpu'] for r in t]))} | {f1(med([r['rss'] / 1e6 for r in t]))}"
                f" | {f0(p50)} | {f0(med([r['p99'] for r in lt]))} | {r_l}"
                f" | {f0(med([r['cpu_us'] for r in lt if 'cpu_us' in r]))}"
                f" | {len(t_ok)}/{len(run.tput.get(key, []))}"
                f" / {len(lt)}/{len(run.lat.get(key, []))} |"
            )
        out.append("")
    if run.scale:
        out += [
            "## Scale and time to ready (paced consoles at 115200 baud, logging on)",
            "",
            "| peer | N | listen s | all ttys open s | READY=1 s | procs / fds | idle CPU %"
            " | idle RSS MB"
            " | load CPU % | peak RSS MB | produced MB (of target) | logged MB | logged = produced"
            " | VM-side backlog max B | typing meanwhile p50 / p99 / max µs |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|:-:|--:|--:|",
        ]
        for r in run.scale:
            if "error" in r and "listen" not in r:
                out.append(f"| {r['peer']} | {r['n']} | failed: {one_line(r['error'])} "
                           "||||||||||||")
                continue
            logged = r.get("logged")
            prod = r.get("produced")
            if isinstance(logged, int) and prod is not None:
                eq = "yes" if logged == prod else f"NO (Δ {logged - prod:+d} B)"
                logged_s = f"{logged / 1e6:.1f}"
            else:
                eq, logged_s = "–", str(logged) if logged is not None else "–"
            prod_s = "–" if prod is None else f"{prod / 1e6:.1f} ({100 * prod / r['target']:.0f} %)"
            typed = ("–" if r.get("typed_p50") is None else
                     f"{f0(r['typed_p50'])} / {f0(r['typed_p99'])} / {f0(r['typed_max'])}")
            out.append(
                f"| {r['peer']} | {r['n']} | {f1(r.get('listen'))} | {f1(r.get('open'))}"
                f" | {f1(r.get('notify'))} | {r.get('procs', '–')} / {r.get('fds', '–')}"
                f" | {f1(r.get('idle_cpu'))}"
                f" | {f0(r['idle_rss'] / 1e6 if 'idle_rss' in r else None)}"
                f" | {f1(r.get('load_cpu'))}"
                f" | {f0(r['load_rss'] / 1e6 if 'load_rss' in r else None)}"
                f" | {prod_s} | {logged_s} | {eq} | {r.get('vm_backlog_max', '–')}"
                f" | {typed} |"
            )
            if r.get("error"):
                out.append(f"|  ↳ {r['peer']} N={r['n']}: {one_line(r['error'])} ||||||||||||||")
        sims = [r["sim_cpu"] for r in run.scale if "sim_cpu" in r]
        if sims:
            out += ["", f"VM simulator CPU during load: {', '.join(f'{s:.0f} %' for s in sims)}."]
        out.append("")
    if run.ring_out:
        out += ["## Ring append / read (bench/ring_bench.py)", "", "```", run.ring_out, "```", ""]
    if run.notes:
        out += ["## Notes from this run", "", *[f"- {n}" for n in run.notes], ""]
    if run.carried:
        out += [
            "## Carried over from earlier runs (--merge)",
            "",
            *[f"- {c}" for c in sorted(run.carried)],
            "",
        ]
    return "\n".join(out)


def dump(run: Run) -> dict[str, Any]:
    """The raw figures of a run, so a later ``--merge`` run can carry them over."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "tput": {f"{n}|{c}": v for (n, c), v in run.tput.items()},
        "lat": {f"{n}|{c}": v for (n, c), v in run.lat.items()},
        "header": run.header,
        "notes": run.notes,
        "settings": {k: getattr(run.args, k) for k in SETTINGS},
        "scale": run.scale,
        "ring_out": run.ring_out,
        "carried": sorted(run.carried),
    }


def merge(run: Run, path: Path) -> None:
    """Carry over from the last run what this run did not measure (noted in the report)."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    date = old.get("date", "?")
    for section in ("tput", "lat"):
        mine = getattr(run, section)
        for key, rows in old.get(section, {}).items():
            name, client = key.split("|")
            if (name, client) not in mine:
                mine[(name, client)] = rows
                run.carried.add(f"{section} {name} [{client}] from {date}")
    done = {(r["peer"], r["n"]) for r in run.scale}
    for r in old.get("scale", []):
        if (r["peer"], r["n"]) not in done:
            run.scale.append(r)
            run.carried.add(f"scale {r['peer']} N={r['n']} from {date}")
    if not run.ring_out and old.get("ring_out"):
        run.ring_out = old["ring_out"]
        run.carried.add(f"ring from {date}")
    # A figure carried over again keeps the date it was measured; one measured
    # by this run is no longer "carried" (the old list is not simply added on).
    first: dict[str, str] = {}
    for c in sorted(old.get("carried", [])):  # ISO dates: the earliest sorts first
        first.setdefault(c.split(" from ")[0], c)
    run.carried = {first.get(c.split(" from ")[0], c) for c in run.carried}
    run.scale.sort(key=lambda r: (r["n"], r["peer"]))


def render_only(run: Run, results: Path) -> None:
    """Re-render results/latest.md from results/latest.json (after a change to the tables)."""
    old = json.loads((results / "latest.json").read_text())
    for section in ("tput", "lat"):
        getattr(run, section).update(
            {tuple(k.split("|")): v for k, v in old.get(section, {}).items()}
        )
    run.scale, run.ring_out = old.get("scale", []), old.get("ring_out", "")
    run.notes, run.carried = old.get("notes", []), set(old.get("carried", []))
    run.header = old.get("header") or [f"- date: {old.get('date', '?')}"]
    for k, v in old.get("settings", {}).items():
        setattr(run.args, k, v)
    text = report(run, run.header)
    print(text)
    (results / "latest.md").write_text(text + "\n")
