"""The benchmark runner: serialmux against its peers, interleaved in rounds, same run.

usage: python bench/run.py [--quick] [--only throughput,latency,scale,ready,ring]
                           [--n 1000,5000] [--rounds 3] [--peers a,b]
                           [--ssh-client openssh,asyncssh]

Every peer serves consoles from one shared VM simulator (bench/vmsim.py). Peers
run one after another inside each round (the order rotates between rounds) so
that the noise of a shared machine falls on all of them alike; the tables give
medians over rounds and ratios to OpenSSH sshd + forced socat. The Markdown
result is printed and written to bench/results/latest.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import checks
import clients
import peers
import procstat
import report
import vmsim
from peers import AES, CHACHA, Console, Keys, Peer

HERE = Path(__file__).resolve().parent
LIVE: set[Peer] = set()  # peers running now: killed by the last finally, whatever happened
SIM: list[vmsim.VMSim] = []
#: Seconds between keystrokes typed on one console while the N others print (scale test).
TYPE_EVERY = 0.01


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- peers -----------------------------------------------------------------------------------


def factories(keys: Keys) -> dict[str, Callable[[Path], Peer]]:
    return {
        "floor": lambda w: peers.Floor(w, keys),
        "socat": lambda w: peers.Socat(w, keys),
        "sshd+socat": lambda w: peers.Sshd(w, keys),
        "conserver": lambda w: peers.Conserver(w, keys),
        "ser2net": lambda w: peers.Ser2net(w, keys),
        "ser2net64k": lambda w: peers.Ser2net(w, keys, big=True),
        "asyncssh-aes128-gcm": lambda w: peers.BareAsyncssh(w, keys, AES),
        "asyncssh-chacha20": lambda w: peers.BareAsyncssh(w, keys, CHACHA),
        "serialmux": lambda w: peers.Serialmux(w, keys),
    }


class Run:
    """One benchmark run: its work dir, keys, simulator and collected figures."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="serialmux-bench-"))
        self.keys = peers.make_keys(self.work / "keys")
        self.make = factories(self.keys)
        self.sim = vmsim.VMSim()
        SIM.append(self.sim)
        self.seq = 0
        self.notes: list[str] = []
        self.tput: dict[tuple[str, str], list[dict[str, Any]]] = {}  # (peer, ssh client)
        self.lat: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.scale: list[dict[str, Any]] = []
        self.ring_out = ""
        self.carried: set[str] = set()  # sections taken over from an earlier run (--merge)
        self.header: list[str] = []

    def peer(self, name: str) -> Peer:
        self.seq += 1
        p = self.make[name](self.work / f"{self.seq:03d}-{name}")
        LIVE.add(p)
        return p

    async def stop(self, p: Peer) -> None:
        try:
            await p.stop()
        finally:
            LIVE.discard(p)

    @contextlib.asynccontextmanager
    async def _one_console(self, peer: Peer, mode: str, ssh_client: str,
                           *sim_args: Any) -> AsyncIterator[tuple[Console, Any]]:
        """One simulated console served by *peer* with a connected, drained client.

        The peer is stopped and the console closed on the way out, whatever happened.
        """
        [c] = await self.sim.create(1, mode, *sim_args)
        con = Console(c["id"], c["path"], "vm0001")
        try:
            await peer.start([con])
            await peer.wait_ready(30)
            client = await clients.connect(peer.endpoint(con), self.keys, ssh_client)
            try:
                await client.drain_quiet()
                yield con, client
            finally:
                await client.close()
        finally:
            await self.stop(peer)
            await self.sim.call("close", ids=[con.id])

    # -- 1. throughput -----------------------------------------------------------------------
    async def throughput(self, name: str, ssh_client: str) -> dict[str, Any]:
        nbytes = self.args.bytes
        p = self.peer(name)
        try:
            async with self._one_console(p, "flood", ssh_client, nbytes) as (con, client):
                pids = p.pids()
                cpu0 = {pid: procstat.cpu_seconds([pid]) for pid in pids}
                check = checks.Checker(nbytes)
                t0 = time.perf_counter()
                last = t0
                await self.sim.call("go", ids=[con.id])
                deadline = t0 + self.args.transfer_timeout
                while check.good < nbytes:
                    if time.perf_counter() > deadline:
                        raise TimeoutError(f"{check.good} of {nbytes} bytes in time")
                    try:
                        data = await asyncio.wait_for(client.read(), 1.0)
                    except TimeoutError:
                        # All sent and nothing more coming: the peer lost bytes on the way.
                        st = (await self.sim.stats([con.id]))[str(con.id)]
                        if st["done"] and time.perf_counter() - last > 2:
                            break
                        continue
                    if not data:
                        raise ConnectionError(f"closed after {check.got} bytes") from None
                    check.feed(data)
                    last = time.perf_counter()
                t1 = last
                pids = p.pids()
                cpu = sum(procstat.cpu_seconds([pid]) - cpu0.get(pid, 0.0) for pid in pids)
                return {
                    "ok": check.bad_at is None and check.good == nbytes,
                    "mbps": check.good / (t1 - t0) / 1e6,
                    "lost": nbytes - check.good,
                    "resyncs": check.resyncs,
                    "foreign": check.foreign,
                    "cpu": 100 * cpu / (t1 - t0),
                    "rss": procstat.rss_bytes(pids),
                    "bad_at": check.bad_at,
                }
        except (Exception, TimeoutError) as e:
            return {"ok": False, "error": f"{type(e).__name__}: {e}", "stderr": p.tail(300)}

    # -- 2. keystroke round trip -------------------------------------------------------------
    async def latency(self, name: str, ssh_client: str) -> dict[str, Any]:
        n, warm = self.args.samples, 100
        p = self.peer(name)
        try:
            async with self._one_console(p, "echo", ssh_client) as (_, client):
                us: list[float] = []
                wrong = keys = 0
                deadline = time.perf_counter() + 120
                pids = p.pids()
                cpu0 = {pid: procstat.cpu_seconds([pid]) for pid in pids}
                for i in range(warm + n):
                    keys += 1
                    key = bytes([97 + i % 26])
                    t0 = time.perf_counter_ns()
                    client.write(key)
                    got = await asyncio.wait_for(client.read(), 2.0)
                    t1 = time.perf_counter_ns()
                    if not got:
                        raise ConnectionError(f"closed after {i} keystrokes")
                    if got != key:
                        wrong += 1
                    if i >= warm:
                        us.append((t1 - t0) / 1000)
                    if time.perf_counter() > deadline:
                        break
                # The daemon's CPU per round trip (every process of its tree): less
                # at the mercy of the scheduler than the round trip itself.
                cpu = sum(procstat.cpu_seconds([pid]) - cpu0.get(pid, 0.0) for pid in p.pids())
                us.sort()
                return {
                    "ok": wrong == 0,
                    "n": len(us),
                    "wrong": wrong,
                    "cpu_us": 1e6 * cpu / keys,
                    "p50": checks.pct(us, 50),
                    "p99": checks.pct(us, 99),
                }
        except (Exception, TimeoutError) as e:
            return {"ok": False, "error": f"{type(e).__name__}: {e}", "stderr": p.tail(300)}

    # -- 3 + 4. scale and time to ready ------------------------------------------------------
    async def scale_ready(self, name: str, n: int, load: bool) -> dict[str, Any]:
        made = await self.sim.create(n, "paced")
        cons = [Console(c["id"], c["path"], f"vm{i + 1:04d}") for i, c in enumerate(made)]
        ids = [c.id for c in cons]
        # One more console, an echoing one: someone typing while the N print (3.b).
        [e] = await self.sim.create(1, "echo")
        typed = Console(e["id"], e["path"], f"vm{n + 1:04d}")
        p = self.peer(name)
        res: dict[str, Any] = {"peer": name, "n": n, "load": load}
        try:
            await p.start([*cons, typed])
            res.update(await p.wait_ready(self.args.ready_timeout, want_open=True))
            log(f"  {name} N={n} ready: {fmt_ready(res)}")
            if not load:
                return res
            await asyncio.sleep(2)
            pids = p.pids()
            cpu0, t0 = procstat.cpu_seconds(pids), time.perf_counter()
            await asyncio.sleep(self.args.idle_s)
            pids = p.pids()
            res["idle_cpu"] = 100 * (procstat.cpu_seconds(pids) - cpu0) / (time.perf_counter() - t0)
            res["idle_rss"] = procstat.rss_bytes(pids)
            res["procs"] = len(pids)
            res["fds"] = procstat.fd_count(pids)
            sim_pid = self.sim.proc.pid if self.sim.proc else 0
            sim0 = procstat.cpu_seconds([sim_pid])
            cpu0 = {pid: procstat.cpu_seconds([pid]) for pid in pids}
            client = await clients.connect(p.endpoint(typed), self.keys, self.args.ssh_client[0])
            await client.drain_quiet()
            await self.sim.call("go", ids=ids)
            t0 = time.perf_counter()
            typing = asyncio.create_task(self._type_paced(client, t0 + self.args.load_s))
            rss_peak = 0
            try:
                while time.perf_counter() - t0 < self.args.load_s:
                    await asyncio.sleep(min(2.0, self.args.load_s - (time.perf_counter() - t0)))
                    rss_peak = max(rss_peak, procstat.rss_bytes(p.pids()))
                res.update(await typing)
            finally:
                typing.cancel()
                await client.close()
            await self.sim.call("stop", ids=ids)
            t1 = time.perf_counter()
            pids = p.pids()
            res["load_cpu"] = (
                100
                * sum(procstat.cpu_seconds([pid]) - cpu0.get(pid, 0.0) for pid in pids)
                / (t1 - t0)
            )
            res["sim_cpu"] = 100 * (procstat.cpu_seconds([sim_pid]) - sim0) / (t1 - t0)
            res["load_rss"] = rss_peak
            # The pending tail is still written after "stop": wait until the VM side is flushed.
            stats: dict[str, dict[str, Any]] = {}
            for _ in range(60):
                stats = await self.sim.stats(ids)
                if all(s["pending"] == 0 for s in stats.values()):
                    break
                await asyncio.sleep(0.5)
            res["produced"] = sum(s["produced"] for s in stats.values())
            res["target"] = n * vmsim.BAUD_BYTES_PER_S * (t1 - t0)
            res["vm_backlog_max"] = max(s["max_pending"] for s in stats.values())
            # Let the daemon read and write the last bytes: until the count stops moving.
            logged: int | str = await self.count_logged(p, cons)
            t_end = time.perf_counter() + 30
            while logged != res["produced"] and time.perf_counter() < t_end:
                await asyncio.sleep(2)
                again = await self.count_logged(p, cons)
                if again == logged:
                    break
                logged = again
            res["logged"] = logged
            return res
        except (Exception, TimeoutError) as e:
            res.update(ok=False, error=f"{type(e).__name__}: {e}", stderr=p.tail(300))
            return res
        finally:
            await self.stop(p)
            checks.errors_logged(p, res)
            await self.sim.call("close", ids=[*ids, typed.id], timeout=120)

    async def _type_paced(self, client: Any, until: float) -> dict[str, Any]:
        """Keystrokes every TYPE_EVERY s until *until* on an echoing console: round trips."""
        us: list[float] = []
        wrong = 0
        i = 0
        while time.perf_counter() < until and i < 100_000:
            key = bytes([97 + i % 26])
            i += 1
            t0 = time.perf_counter_ns()
            client.write(key)
            got = await asyncio.wait_for(client.read(), 5.0)
            us.append((time.perf_counter_ns() - t0) / 1000)
            if not got:
                raise ConnectionError(f"typing: closed after {i} keystrokes")
            wrong += got != key
            await asyncio.sleep(TYPE_EVERY)
        us.sort()
        return {"typed_n": len(us), "typed_wrong": wrong, "typed_p50": checks.pct(us, 50),
                "typed_p99": checks.pct(us, 99), "typed_max": us[-1] if us else None}

    async def count_logged(self, p: Peer, cons: list[Console]) -> int | str:
        """Bytes of paced lines the peer logged, or why that cannot be counted yet."""
        if isinstance(p, peers.Conserver):
            return await asyncio.to_thread(checks.count_conserver_logs, p, cons)
        if isinstance(p, peers.Serialmux):
            return await asyncio.to_thread(checks.count_serialmux_rings, p, cons)
        return "n/a"

    # -- 5. ring -----------------------------------------------------------------------------
    def ring(self) -> None:
        script = HERE / "ring_bench.py"
        if not script.exists():
            self.ring_out = "bench/ring_bench.py is not there yet: pending."
            return
        args = [sys.executable, str(script)] + (["--seconds", "0.5"] if self.args.quick else [])
        try:
            out = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=HERE.parent)
            self.ring_out = (
                out.stdout.strip() or f"(no output; rc={out.returncode})\n{out.stderr[-800:]}"
            )
            if out.returncode:
                self.ring_out += f"\n\n(ring_bench.py exited {out.returncode}: {out.stderr[-500:]})"
        except subprocess.TimeoutExpired:
            self.ring_out = "ring_bench.py timed out after 600 s"


def fmt_ready(r: dict[str, Any]) -> str:
    return ", ".join(
        f"{k} {v:.2f}s" for k, v in r.items() if k in ("listen", "open", "notify") and v
    )


# -- the report ------------------------------------------------------------------------------


# -- main ------------------------------------------------------------------------------------


async def probe_serialmux(run: Run) -> str | None:
    """Start serialmux on one echo console and type one key; None if it works, else why."""
    [c] = await run.sim.create(1, "echo")
    con = Console(c["id"], c["path"], "vm0001")
    p = run.peer("serialmux")
    try:
        await p.start([con])
        await p.wait_ready(20)
        client = await clients.connect(p.endpoint(con), run.keys, run.args.ssh_client[0])
        try:
            await client.drain_quiet()
            client.write(b"x")
            got = await asyncio.wait_for(client.read(), 5)
            return None if got == b"x" else f"typed b'x', got {got[:200]!r}"
        finally:
            await client.close()
    except (Exception, TimeoutError) as e:
        tail = p.tail(400).strip()
        return f"{type(e).__name__}: {e}" + ("" if tail in str(e) else f" -- stderr: {tail}")
    finally:
        await run.stop(p)
        await run.sim.call("close", ids=[con.id])


async def amain(args: argparse.Namespace) -> int:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    run = Run(args)
    if args.render:
        report.render_only(run, HERE / "results")
        return 0
    header = run.header = report.machine()
    strays = stray_daemons()
    if strays:
        # A stray daemon reopening a /dev/pts/N path by name steals bytes from a reused PTY.
        run.notes.append(f"stray daemons were running during this run: {'; '.join(strays)}")
        log(f"warning: stray daemons running: {strays}")
    await run.sim.start()
    try:
        names = [n for n in args.peers.split(",") if n]
        if "serialmux" in names:
            why = await probe_serialmux(run)
            if why:
                names.remove("serialmux")
                run.notes.append(f"serialmux left out: `serialmux serve` did not work: {why}")
                log(f"serialmux left out: {why}")
        if not peers.FLOOR.exists() and "floor" in names:
            names.remove("floor")
            run.notes.append("floor left out: run bench/setup.sh to build bench/build/floor")
        variants = [
            (n, c)
            for n in names
            for c in (args.ssh_client if run.make[n](Path("/nonexistent")).ssh else ["-"])
        ]
        for r in range(args.rounds):
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            for test, store, fn in (
                ("throughput", run.tput, run.throughput),
                ("latency", run.lat, run.latency),
            ):
                if test not in args.only:
                    continue
                for name, client in order:
                    res = await fn(name, client)
                    store.setdefault((name, client), []).append(res)
                    log(
                        f"round {r + 1} {test} {name} [{client}]: "
                        + ", ".join(
                            f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in res.items()
                            if k != "stderr"
                        )
                    )
                    if not res.get("ok") and res.get("stderr"):
                        log(f"    stderr: {res['stderr']!r}")
        if {"scale", "ready"} & set(args.only):
            load = "scale" in args.only
            for n in args.n:
                for name in [x for x in ("serialmux", "conserver") if x in names]:
                    res = await run.scale_ready(name, n, load)
                    run.scale.append(res)
                    if res.get("errors_logged"):
                        run.notes.append(
                            f"{name} N={n}: {res['errors_logged']} error lines on stderr; "
                            f"first: {res['first_error']}"
                        )
                    log(
                        f"scale {name} N={n}: "
                        + ", ".join(
                            f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in res.items()
                            if k != "stderr"
                        )
                    )
        if "ring" in args.only:
            await asyncio.to_thread(run.ring)
    finally:
        for p in list(LIVE):
            with contextlib.suppress(Exception):
                await p.stop()
        await run.sim.close()
        results = HERE / "results"
        results.mkdir(exist_ok=True)
        stem = "quick" if args.quick else "latest"  # a --quick check never clobbers a full run
        if args.merge:
            report.merge(run, results / f"{stem}.json")
        text = report.report(run, header)
        print(text)
        (results / f"{stem}.md").write_text(text + "\n")
        (results / f"{stem}.json").write_text(json.dumps(report.dump(run), indent=1) + "\n")
        if not args.keep:
            shutil.rmtree(run.work, ignore_errors=True)
    return 0


def stray_daemons() -> list[str]:
    """Peer daemons already running (not ours): they can open our PTYs by path."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        daemons = ("serialmux serve", "conserver -C", "ser2net -n", "bare_asyncssh")
        if any(k in cmd for k in daemons):
            found.append(f"{pid}: {cmd[:80]}")
    return found


def prepare(n_max: int) -> None:
    """Raise the fd limit and the kernel's PTY limit for N consoles (as root)."""
    # As root, lift the hard fd limit too: daemons inherit it (5000 ttys + rings + sockets).
    with contextlib.suppress(ValueError, OSError):
        want = max(65536, 8 * n_max)
        if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
    vmsim.raise_nofile()
    need = 2 * n_max + 200
    with contextlib.suppress(OSError):
        cur = int(Path("/proc/sys/kernel/pty/max").read_text())
        if cur < need + 1100:
            Path("/proc/sys/kernel/pty/max").write_text(str(need + 1100))


def kill_sim() -> None:
    proc = SIM[0].proc if SIM else None
    if proc is not None and proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 round, 20 MB, 500 keystrokes, N=100")
    ap.add_argument("--only", default="throughput,latency,scale,ready,ring")
    ap.add_argument("--n")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--bytes", type=int)
    ap.add_argument("--samples", type=int)
    ap.add_argument("--peers", default=",".join(factories(None)))  # type: ignore[arg-type]
    ap.add_argument(
        "--ssh-client",
        default="openssh,asyncssh",
        help="client(s) SSH peers are measured with: openssh (the ssh binary), asyncssh",
    )
    ap.add_argument("--idle-s", type=float)
    ap.add_argument("--load-s", type=float)
    ap.add_argument("--ready-timeout", type=float, default=600)
    ap.add_argument("--transfer-timeout", type=float, default=120)
    ap.add_argument(
        "--merge",
        action="store_true",
        help="keep the figures of bench/results/latest.json that this run does not measure",
    )
    ap.add_argument(
        "--render",
        action="store_true",
        help="measure nothing: re-render results/latest.md from results/latest.json",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temp work dir (configs, logs)")
    args = ap.parse_args()
    # --quick changes the defaults; an option given explicitly wins.
    quick = {"rounds": 1, "bytes": 20_000_000, "samples": 500, "n": "100", "idle_s": 3, "load_s": 5}
    full = {
        "rounds": 3,
        "bytes": 100_000_000,
        "samples": 3000,
        "n": "1000,5000",
        "idle_s": 10,
        "load_s": 20,
    }
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.only = set(args.only.split(","))
    args.ssh_client = [c for c in args.ssh_client.split(",") if c in ("openssh", "asyncssh")]
    args.n = [int(x) for x in str(args.n).split(",") if x]
    prepare(max(args.n))
    # A background job starts with SIGINT ignored; Ctrl-C must always clean up.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = asyncio.new_event_loop
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(amain(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("interrupted: peers stopped")
        return 130
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        for p in list(LIVE):  # whatever a second Ctrl-C cut short
            p.kill_now()
        kill_sim()


if __name__ == "__main__":
    sys.exit(main())
