"""Start and stop each peer of the benchmark against slave paths from the VM simulator.

Each peer is a process tree started in its own session; :meth:`Peer.stop` kills the
whole tree (TERM, a bounded wait, then KILL), so a failed or interrupted run leaves
nothing behind. :meth:`Peer.endpoint` says how a client reaches a console.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import procstat

HERE = Path(__file__).resolve().parent
FLOOR = HERE / "build" / "floor"
VENV_BIN = Path(sys.executable).parent
AES = "aes128-gcm@openssh.com"
CHACHA = "chacha20-poly1305@openssh.com"


@dataclass(frozen=True)
class Console:
    """A simulated VM console: simulator id, slave path, and the VM name peers use."""

    id: int
    path: str
    name: str


@dataclass(frozen=True)
class Endpoint:
    """How a client reaches one console of a peer."""

    kind: str  # "tcp" | "ssh" | "console"
    port: int
    user: str = ""
    cipher: str = AES
    pty: bool = False  # ssh: request a pty (never for a forced socat: it would cook the bytes)
    config: str = ""  # console: client config file (TLS CA)


@dataclass
class Keys:
    """Key material shared by every SSH peer of one run."""

    dir: Path
    user_key: Path
    user_pub: str
    host_key: Path


def make_keys(d: Path) -> Keys:
    d.mkdir(parents=True, exist_ok=True)
    for name in ("user", "host"):
        if not (d / name).exists():
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench", "-f", str(d / name)],
                check=True,
                timeout=30,
            )
    (d / "authorized_keys").write_text((d / "user.pub").read_text())
    return Keys(d, d / "user", (d / "user.pub").read_text().strip(), d / "host")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def port_accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            return False
        return True


def version(cmd: list[str], want: str = "") -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "missing"
    text = [t for t in (out.stdout + out.stderr).strip().splitlines() if want in t]
    return text[0].strip() if text else "?"


class Peer:
    """One daemon under test. Subclasses fill in :meth:`command` and :meth:`endpoint`."""

    name = "peer"
    label = "peer"
    logs = False  # keeps every console's output (a ring or a log file)
    multi = False  # serves many consoles from one process tree
    ssh = False  # reached over SSH: measured with each SSH client

    def __init__(self, work: Path, keys: Keys) -> None:
        self.work = work
        self.keys = keys
        self.proc: subprocess.Popen[bytes] | None = None
        self.consoles: list[Console] = []
        self.port = 0
        self.started_at = 0.0
        self.stderr_path = work / "stderr.log"
        self.notify: socket.socket | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def endpoint(self, console: Console) -> Endpoint:
        raise NotImplementedError

    async def start(self, consoles: list[Console]) -> None:
        """Start the peer; returns once it runs (not once ready: see :meth:`wait_ready`)."""
        self.consoles = consoles
        self.work.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        cmd = self.command()
        with open(self.stderr_path, "ab") as err:
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                env=self.env(),
                start_new_session=True,
                cwd=self.work,
            )

    def pids(self) -> list[int]:
        return procstat.tree(self.proc.pid) if self.proc else []

    def listening(self) -> bool:
        return port_accepts(self.port)

    async def wait_ready(self, timeout: float, want_open: bool = False) -> dict[str, float | None]:
        """Wait until the peer accepts on its port (and, with want_open, every tty is open).

        Returns seconds from process start to: ``listen``, ``notify`` (READY=1, if the
        peer speaks sd_notify) and ``open`` (every console tty open by the tree).
        Raises TimeoutError past ``timeout``; the peer dying raises RuntimeError.
        """
        assert self.proc
        res: dict[str, float | None] = {"listen": None, "notify": None, "open": None}
        wanted = {c.path for c in self.consoles}
        deadline = self.started_at + timeout
        last_scan = 0.0
        while True:
            now = time.monotonic()
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}: {self.tail()}")
            if res["listen"] is None and self.listening():
                res["listen"] = time.monotonic() - self.started_at
            if self.notify is not None and res["notify"] is None:
                with contextlib.suppress(BlockingIOError):
                    while True:
                        msg = self.notify.recv(4096)
                        if b"READY=1" in msg.split(b"\n"):
                            res["notify"] = time.monotonic() - self.started_at
                            break
            if want_open and res["open"] is None and now - last_scan > 0.25:
                last_scan = now
                if procstat.open_paths(self.pids(), wanted) >= len(wanted):
                    res["open"] = time.monotonic() - self.started_at
            done = res["listen"] is not None and (not want_open or res["open"] is not None)
            if done and self.notify is not None and res["notify"] is None:
                # A peer that never sends READY=1 is ready once listening and open (5 s grace).
                t = max(v for v in res.values() if v is not None)
                done = time.monotonic() - self.started_at > t + 5
            if done:
                return res
            if now > deadline:
                raise TimeoutError(f"{self.name} not ready in {timeout:.0f}s: {res}")
            await asyncio.sleep(0.01)

    def tail(self, n: int = 600) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def kill_now(self) -> None:
        """Last resort, synchronous: KILL the whole tree (a second Ctrl-C, a crash)."""
        if self.proc is None:
            return
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)

    async def stop(self) -> None:
        """Kill the peer's whole tree: TERM, up to 3 s, then KILL."""
        if self.proc is None:
            return
        pids = self.pids()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            for _ in range(30):
                if self.proc.poll() is not None:
                    break
                await asyncio.sleep(0.1)
            if self.proc.poll() is not None:
                break
        self.proc.wait(timeout=5)
        for pid in pids:  # descendants that were re-parented (sshd sessions, conserver groups)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if self.notify is not None:
            self.notify.close()
            self.notify = None
        self.proc = None


class Floor(Peer):
    name, label = "floor", "C poll() forwarder (floor)"

    def command(self) -> list[str]:
        return [str(FLOOR), self.consoles[0].path, str(self.port)]

    def endpoint(self, console: Console) -> Endpoint:
        return Endpoint("tcp", self.port)


class Socat(Peer):
    name, label = "socat", "socat PTY↔TCP"

    def command(self) -> list[str]:
        return [
            "socat",
            f"TCP-LISTEN:{self.port},bind=127.0.0.1,reuseaddr,nodelay",
            f"FILE:{self.consoles[0].path},raw,echo=0",
        ]

    def listening(self) -> bool:
        # socat serves one connection then exits: look, do not touch.
        return self.port in procstat.listening_ports()

    def endpoint(self, console: Console) -> Endpoint:
        return Endpoint("tcp", self.port)


class Ser2net(Peer):
    """ser2net 4.x, one raw TCP connection per console; ``big`` = 64 KiB buffers, no chardelay."""

    multi = True

    def __init__(self, work: Path, keys: Keys, big: bool = False) -> None:
        super().__init__(work, keys)
        self.big = big
        self.name = "ser2net64k" if big else "ser2net"
        self.label = "ser2net 4 (64 KiB, chardelay off)" if big else "ser2net 4 (default)"
        self.base = 0

    def command(self) -> list[str]:
        self.base = self.port if len(self.consoles) == 1 else 30000
        lines = []
        for i, c in enumerate(self.consoles):
            lines += [
                f"connection: &c{i}",
                f"  accepter: tcp,127.0.0.1,{self.base + i}",
                f"  connector: serialdev,{c.path},115200n81,local",
                "  enable: on",
                "  options:",
                "    kickolduser: true",
            ]
            if self.big:
                lines += [
                    "    chardelay: false",
                    "    dev-to-net-bufsize: 65536",
                    "    net-to-dev-bufsize: 65536",
                ]
        cfg = self.work / "ser2net.yaml"
        cfg.write_text("\n".join(lines) + "\n")
        return ["ser2net", "-n", "-c", str(cfg), "-P", str(self.work / "ser2net.pid")]

    def listening(self) -> bool:
        ports = procstat.listening_ports()
        return all(self.base + i in ports for i in range(len(self.consoles)))

    def endpoint(self, console: Console) -> Endpoint:
        return Endpoint("tcp", self.base + self.consoles.index(console))


class Conserver(Peer):
    """conserver with TLS (a self-signed cert the client trusts) and per-console logs."""

    name, label = "conserver", "conserver (TLS, logging)"
    logs = multi = True

    def command(self) -> list[str]:
        w = self.work
        cred = w / "cred.pem"
        if not cred.exists():
            subprocess.run(
                [
                    "openssl",
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-days",
                    "30",
                    "-subj",
                    "/CN=localhost",
                    "-keyout",
                    str(w / "key.pem"),
                    "-out",
                    str(w / "cert.pem"),
                ],
                check=True,
                capture_output=True,
                timeout=60,
            )
            cred.write_bytes((w / "cert.pem").read_bytes() + (w / "key.pem").read_bytes())
        (w / "logs").mkdir(exist_ok=True)
        lines = [
            f'default * {{ logfile {w}/logs/&.log; timestamp ""; rw *; type device;'
            " baud 115200; parity none; master 127.0.0.1; }",
            "access * { trusted 127.0.0.1; }",
        ]
        lines += [f"console {c.name} {{ device {c.path}; }}" for c in self.consoles]
        (w / "conserver.cf").write_text("\n".join(lines) + "\n")
        (w / "conserver.passwd").write_text("root:\nbench:\n")
        (w / "console.cf").write_text(f"config * {{ sslcacertificatefile {w}/cert.pem; }}\n")
        return [
            "conserver",
            "-C",
            str(w / "conserver.cf"),
            "-P",
            str(w / "conserver.passwd"),
            "-p",
            str(self.port),
            "-M",
            "127.0.0.1",
            "-c",
            str(cred),
        ]

    def endpoint(self, console: Console) -> Endpoint:
        return Endpoint(
            "console", self.port, user=console.name, config=str(self.work / "console.cf")
        )

    def log_path(self, console: Console) -> Path:
        return self.work / "logs" / f"{console.name}.log"


class Sshd(Peer):
    """OpenSSH sshd with ``ForceCommand socat - FILE:TTY,raw,echo=0``: what people do today."""

    name, label = "sshd+socat", "OpenSSH sshd + forced socat (aes128-gcm)"
    ssh = True

    def command(self) -> list[str]:
        Path("/run/sshd").mkdir(exist_ok=True)
        cfg = self.work / "sshd_config"
        cfg.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {self.keys.host_key}",
                    f"AuthorizedKeysFile {self.keys.dir}/authorized_keys",
                    f"PidFile {self.work}/sshd.pid",
                    "UsePAM no",
                    "StrictModes no",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PermitRootLogin prohibit-password",
                    f"Ciphers {AES}",
                    f"ForceCommand socat - FILE:{self.consoles[0].path},raw,echo=0",
                    "LogLevel ERROR",
                    "",
                ]
            )
        )
        return ["/usr/sbin/sshd", "-D", "-e", "-f", str(cfg)]

    def endpoint(self, console: Console) -> Endpoint:
        return Endpoint("ssh", self.port, user="root", cipher=AES)


class BareAsyncssh(Peer):
    """A bare asyncssh server piping the PTY (bench/bare_asyncssh.py), one cipher."""

    ssh = True

    def __init__(self, work: Path, keys: Keys, cipher: str) -> None:
        super().__init__(work, keys)
        self.cipher = cipher
        short = "aes128-gcm" if cipher == AES else "chacha20"
        self.name = f"asyncssh-{short}"
        self.label = f"bare asyncssh server ({short})"

    def command(self) -> list[str]:
        return [
            sys.executable,
            str(HERE / "bare_asyncssh.py"),
            "--port",
            str(self.port),
            "--host-key",
            str(self.keys.host_key),
            "--authorized-keys",
            str(self.keys.dir / "authorized_keys"),
            "--tty",
            self.consoles[0].path,
            "--cipher",
            self.cipher,
        ]

    def endpoint(self, console: Console) -> Endpoint:
        return Endpoint("ssh", self.port, user="bench", cipher=self.cipher)


class Serialmux(Peer):
    """serialmux itself, ``serialmux serve --config``, with NOTIFY_SOCKET bound by us."""

    name, label = "serialmux", "serialmux"
    ssh = True
    logs = multi = True

    def __init__(self, work: Path, keys: Keys, cipher: str = AES, pty: bool = False) -> None:
        super().__init__(work, keys)
        self.cipher = cipher
        self.pty = pty

    def command(self) -> list[str]:
        w = self.work
        lines = [
            "[server]",
            f'listen = ["127.0.0.1:{self.port}"]',
            f'host_keys = ["{w}/host_key"]',
            f'state_dir = "{w}/state"',
            # The bench's state dir holds no VM images: the cheaper sync applies.
            'ring_sync = "syncfs"',
            "",
        ]
        for c in self.consoles:
            lines += [f"[vms.{c.name}]", f'port = "pty:{c.path}"', ""]
        lines += [
            "[users.bench]",
            f'keys = ["{self.keys.user_pub}"]',
            "",
            "[[grants]]",
            'users = ["bench"]',
            'vms = ["*"]',
            'role = "owner"',
            "",
        ]
        (w / "serialmux.toml").write_text("\n".join(lines))
        sock_path = w / "notify.sock"
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(sock_path))
        self.notify.setblocking(False)
        return [str(VENV_BIN / "serialmux"), "serve", "--config", str(w / "serialmux.toml")]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["NOTIFY_SOCKET"] = str(self.work / "notify.sock")
        return env

    def endpoint(self, console: Console) -> Endpoint:
        return Endpoint("ssh", self.port, user=console.name, cipher=self.cipher, pty=self.pty)

    def state_dir(self) -> Path:
        return self.work / "state"


def versions() -> dict[str, str]:
    """Versions of every peer, for the results header."""
    return {
        "socat": version(["socat", "-V"], "version").split(" on ")[0],
        "ser2net": version(["ser2net", "-v"]),
        "conserver": version(["conserver", "-V"], "version").split(": ", 1)[-1],
        "openssh": version(["ssh", "-V"]),
        "asyncssh": version([sys.executable, "-c", "import asyncssh; print(asyncssh.__version__)"]),
        "serialmux": version(
            [sys.executable, "-c", "import serialmux; print(serialmux.__version__)"]
        ),
    }
