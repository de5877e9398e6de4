"""A tiny real Linux guest for end-to-end tests: build it from Debian packages, boot it under QEMU.

Build (``python tests/e2e/guest.py build`` or :func:`ensure_guest`):
``apt-get download`` the current cloud kernel and ``busybox-static`` into a cache folder
(``$SERIALMUX_GUEST_CACHE`` or ``~/.cache/serialmux-guest``), ``dpkg-deb -x`` them (nothing is
installed into the system), take the decompressed ``vmlinux`` out of the bzImage when we can (it
boots and resets much faster under TCG, see shared/notes/real-guest.md) or else ``vmlinuz``, and
write a gzip'd ``newc`` cpio initramfs in pure Python (an archive entry for ``/dev/console`` is
just a header: no root, no mknod). The cache is keyed by the package versions and a hash of this
file; a lock file makes concurrent builds safe and the finished folder appears atomically.

The guest's ``/init`` mounts proc/sys/devtmpfs, enables Magic SysRq, prints :data:`READY_LINE`
and runs a root shell on ttyS0 -- or, booted with ``login=True``, a ``getty`` asking for the
test user ``test``/``test``.

Boot (:class:`Guest`): one folder per guest holds the QMP socket the code under test connects to
(``qmp.sock``), the serial socket if any, and QEMU's log. QEMU starts paused (``-S``) so nothing
the guest prints is lost before a reader holds the serial port; the harness drives it over a
second QMP monitor that *QEMU* connects to (we listen first, so no polling for sockets), which
also leaves ``qmp.sock`` free for the code under test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import time
import tty
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from qemu.qmp import QMPClient

READY_LINE = b"SERIALMUX-GUEST-READY"
#: busybox's shell prompt: ``# `` or ``$ `` followed by a cursor-position query (ESC[6n).
PROMPT = re.compile(rb"[#$] (?:\x1b\[6n)?$")
#: the line holding the next prompt, after a command's output.
NEXT_PROMPT = re.compile(rb"\r?\n[^\r\n]*[#$] (?:\x1b\[6n)?")
LOGIN_PROMPT = re.compile(rb"login: $")
TEST_USER = ("test", "test")

QEMU = "qemu-system-x86_64"
KERNEL_META = "linux-image-cloud-amd64"
BUSYBOX = "busybox-static"
LOCK_TIMEOUT = 600.0

SerialMode = Literal["pty", "socket", "telnet", "client"]


# --------------------------------------------------------------------------- build


@dataclass(frozen=True)
class GuestImage:
    """A built guest: the kernel to pass to ``-kernel`` and the initramfs for ``-initrd``."""

    kernel: Path
    initrd: Path
    kernel_kind: str  # "vmlinux" (decompressed, fast) or "vmlinuz" (fallback)
    versions: dict[str, str]


def cache_root() -> Path:
    """The folder holding downloads and builds (``$SERIALMUX_GUEST_CACHE`` wins)."""
    env = os.environ.get("SERIALMUX_GUEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "serialmux-guest"


def _run(argv: Sequence[str], cwd: Path | None = None, timeout: float = 300.0) -> str:
    done = subprocess.run(
        list(argv), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr}")
    return done.stdout


def _kernel_package() -> str:
    out = _run(["apt-cache", "depends", KERNEL_META])
    found = re.findall(r"Depends:\s*(linux-image-\S+-cloud-amd64)", out)
    if not found:
        raise RuntimeError(f"apt-cache depends {KERNEL_META} names no kernel:\n{out}")
    return str(found[0])


def _candidates(*packages: str) -> dict[str, str]:
    out = _run(["apt-cache", "policy", *packages])
    found = dict(re.findall(r"^(\S+):\n\s+Installed:.*\n\s+Candidate:\s*(\S+)", out, re.M))
    for package in packages:
        if found.get(package, "(none)") == "(none)":
            raise RuntimeError(f"{package} has no installable version; run apt-get update")
    return {package: found[package] for package in packages}


def _build_key(versions: dict[str, str]) -> str:
    digest = hashlib.sha256(Path(__file__).read_bytes())
    for package, version in sorted(versions.items()):
        digest.update(f"\n{package}={version}".encode())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Hold an exclusive flock on ``path``; a second builder waits (bounded) for the first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path} held for over {timeout:.0f} s") from err
                time.sleep(0.2)  # flock has no timed wait; a build takes seconds
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load(folder: Path) -> GuestImage | None:
    try:
        meta = json.loads((folder / "image.json").read_text())
    except (OSError, ValueError):
        return None
    return GuestImage(
        kernel=folder / meta["kernel"],
        initrd=folder / meta["initrd"],
        kernel_kind=meta["kernel_kind"],
        versions=meta["versions"],
    )


_built: dict[Path, GuestImage] = {}  # per process: asking apt for versions costs ~1.5 s


def ensure_guest(cache: Path | None = None) -> GuestImage:
    """Return the guest image, building it first if the cache holds none for today's packages."""
    root = cache or cache_root()
    if root not in _built or not _built[root].kernel.exists():
        _built[root] = _ensure_guest(root)
    return _built[root]


def _ensure_guest(root: Path) -> GuestImage:
    try:
        kernel_pkg = _kernel_package()
        versions = _candidates(kernel_pkg, BUSYBOX)
    except (OSError, RuntimeError, subprocess.TimeoutExpired):
        # No apt metadata (offline, foreign distro): any finished build is better than none.
        built = sorted(root.glob("*/image.json"), key=lambda p: p.stat().st_mtime)
        image = _load(built[-1].parent) if built else None
        if image is None:
            raise
        return image
    folder = root / _build_key(versions)
    image = _load(folder)
    if image is not None:
        return image
    with _locked(root / ".lock"):
        image = _load(folder)  # another process may have built it while we waited
        if image is not None:
            return image
        return _build(root, folder, versions)


def _build(root: Path, folder: Path, versions: dict[str, str]) -> GuestImage:
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        debs = work / "debs"
        debs.mkdir()
        debs.chmod(0o777)  # lets apt's sandbox user write the download
        _run(["apt-get", "download", *(f"{p}={v}" for p, v in versions.items())], cwd=debs)
        tree = work / "tree"
        for deb in sorted(debs.glob("*.deb")):
            _run(["dpkg-deb", "-x", str(deb), str(tree)])
        out = work / "image"
        out.mkdir()
        vmlinuz = next(iter(sorted(tree.glob("boot/vmlinuz-*"))))
        kernel_kind = "vmlinux"
        try:
            (out / "vmlinux").write_bytes(extract_vmlinux(vmlinuz.read_bytes()))
        except (ValueError, OSError, RuntimeError, subprocess.TimeoutExpired) as err:
            print(f"guest: booting vmlinuz, cannot extract vmlinux: {err}", file=sys.stderr)
            shutil.copyfile(vmlinuz, out / "vmlinuz")
            kernel_kind = "vmlinuz"
        modules = list(tree.glob("lib/modules/*/kernel/drivers/misc/pvpanic/pvpanic-mmio.ko"))
        (out / "initrd.img").write_bytes(
            build_initramfs((tree / "bin" / "busybox").read_bytes(), modules)
        )
        meta = {
            "kernel": kernel_kind,
            "initrd": "initrd.img",
            "kernel_kind": kernel_kind,
            "versions": versions,
        }
        (out / "image.json").write_text(json.dumps(meta, indent=2) + "\n")
        if folder.exists():  # a half-finished folder from an older layout: replace it
            shutil.rmtree(folder)
        out.rename(folder)
        for old in root.glob("*/image.json"):  # older builds: a running QEMU keeps its open files
            if old.parent != folder:
                shutil.rmtree(old.parent, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    image = _load(folder)
    assert image is not None
    return image


def extract_vmlinux(bzimage: bytes) -> bytes:
    """Return the ELF kernel inside a bzImage (boot protocol >= 2.08), or raise ValueError."""
    if bzimage[0x202:0x206] != b"HdrS" or struct.unpack_from("<H", bzimage, 0x206)[0] < 0x208:
        raise ValueError("not a bzImage with a payload header")
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = bzimage[start : start + length]
    if payload.startswith(b"\x02\x21\x4c\x18"):  # lz4 legacy frame; the last 4 bytes are a size
        if shutil.which("lz4") is None:
            raise ValueError("payload is lz4 and the lz4 tool is not installed")
        elf = subprocess.run(
            ["lz4", "-dc"], input=payload[:-4], capture_output=True, check=True, timeout=120
        ).stdout
    elif payload.startswith(b"\x1f\x8b"):
        elf = gzip.decompress(payload[:-4])
    elif payload.startswith(b"\xfd7zXZ\x00"):
        elf = lzma.LZMADecompressor().decompress(payload)
    else:
        raise ValueError(f"unknown payload compression {payload[:6].hex()}")
    if not elf.startswith(b"\x7fELF"):
        raise ValueError("decompressed payload is not an ELF file")
    return elf


INIT = r"""#!/bin/sh
export PATH=/bin:/sbin HOME=/root TERM=vt100
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo 1 > /proc/sys/kernel/sysrq
for m in /lib/modules/*.ko; do [ -e "$m" ] && insmod "$m" 2>/dev/null; done
hostname guest
if grep -q 'serialmux.login=1' /proc/cmdline; then
    echo "test:$(mkpasswd -m sha512 test):19000:0:99999:7:::" >> /etc/shadow
    echo SERIALMUX-GUEST-READY
    while true; do setsid getty -L 115200 ttyS0 vt100; done
fi
echo SERIALMUX-GUEST-READY
while true; do setsid cttyhack sh; done
"""

ETC = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\ntest:x:1000:1000:test:/home/test:/bin/sh\n",
    "etc/group": "root:x:0:\ntest:x:1000:\n",
    "etc/shadow": "root:*:19000:0:99999:7:::\n",
    "etc/hostname": "guest\n",
}


class _Cpio:
    """Writer of a ``newc`` cpio archive (the initramfs format), entirely in memory."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.ino = 0

    def _entry(
        self, name: str, mode: int, body: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        self.ino += 1
        encoded = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(body), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        self.data += b"070701" + b"".join(b"%08X" % f for f in fields) + encoded
        self.data += b"\0" * (-len(self.data) % 4) + body
        self.data += b"\0" * (-len(self.data) % 4)

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, 0o040000 | mode)

    def file(self, name: str, body: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, body)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, 0o020000 | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return bytes(self.data)


def build_initramfs(busybox: bytes, modules: Sequence[Path] = ()) -> bytes:
    """Return a gzip'd newc initramfs holding busybox, its applet links, /etc and /init."""
    with tempfile.TemporaryDirectory() as scratch:
        binary = Path(scratch) / "busybox"
        binary.write_bytes(busybox)
        binary.chmod(0o755)
        applets = _run([str(binary), "--list-full"]).split()
    archive = _Cpio()
    folders = "bin sbin usr usr/bin usr/sbin etc proc sys dev root home tmp var var/run lib"
    for name in [*folders.split(), "lib/modules"]:
        archive.directory(name, 0o1777 if name == "tmp" else 0o755)
    archive.directory("home/test", 0o755)
    archive.chardev("dev/console", 5, 1)
    archive.file("bin/busybox", busybox, 0o755)
    for applet in applets:
        if applet != "bin/busybox":
            archive.symlink(applet, "/bin/busybox")
    for path, text in ETC.items():
        archive.file(path, text.encode(), 0o600 if path.endswith("shadow") else 0o644)
    for module in modules:
        archive.file(f"lib/modules/{module.name}", module.read_bytes())
    archive.file("init", INIT.encode(), 0o755)
    return gzip.compress(archive.finish(), compresslevel=6, mtime=0)


# --------------------------------------------------------------------------- serial


class _Collector(asyncio.Protocol):
    def __init__(self, console: SerialConsole) -> None:
        self.console = console

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.console._attach(transport)

    def data_received(self, data: bytes) -> None:
        self.console._feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.console._feed(b"", eof=True)


class SerialConsole:
    """Everything a guest printed on one serial port, with :meth:`expect` to wait for text."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.mark = 0  # expect() searches from here and moves it past each match
        self.eof = False
        self._changed = asyncio.Event()
        self._transport: asyncio.BaseTransport | None = None
        self._server: asyncio.AbstractServer | None = None
        self._fd: int | None = None

    @classmethod
    async def open_pty(cls, path: str) -> SerialConsole:
        """Hold the PTY slave ``path`` in raw mode (no echo back into the guest)."""
        console = cls()
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(fd, termios.TCSANOW)
        console._fd = fd
        loop = asyncio.get_running_loop()
        pipe = os.fdopen(os.dup(fd), "rb", buffering=0)
        console._transport, _ = await loop.connect_read_pipe(lambda: _Collector(console), pipe)
        return console

    @classmethod
    async def open_unix(cls, path: str | Path) -> SerialConsole:
        """Connect to a serial port QEMU serves on a UNIX socket."""
        console = cls()
        loop = asyncio.get_running_loop()
        console._transport, _ = await loop.create_unix_connection(
            lambda: _Collector(console), str(path)
        )
        return console

    @classmethod
    async def listen_unix(cls, path: str | Path) -> SerialConsole:
        """Listen on ``path`` for QEMU to dial (``client`` mode); each connection feeds us."""
        console = cls()
        loop = asyncio.get_running_loop()
        console._server = await loop.create_unix_server(lambda: _Collector(console), str(path))
        return console

    async def wait_connected(self, timeout: float) -> None:
        """Wait until a peer is attached (QEMU dialled a listen_unix() console)."""
        async with asyncio.timeout(timeout):
            while self._transport is None:
                self._changed.clear()
                await self._changed.wait()

    def _feed(self, data: bytes, eof: bool = False) -> None:
        self.buffer += data
        self.eof = self.eof or eof
        self._changed.set()

    def _attach(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self.eof = False
        self._changed.set()

    def write(self, data: bytes) -> None:
        if self._fd is not None:
            os.write(self._fd, data)  # small writes to a PTY do not block
        elif isinstance(self._transport, asyncio.WriteTransport):
            self._transport.write(data)
        else:
            raise RuntimeError("serial console is not writable")

    def skip(self) -> None:
        """Forget everything printed so far: the next expect() sees only new output."""
        self.mark = len(self.buffer)

    async def expect(self, pattern: bytes | re.Pattern[bytes], timeout: float) -> re.Match[bytes]:
        """Wait until ``pattern`` appears after the mark; move the mark past it."""
        regex = re.compile(re.escape(pattern)) if isinstance(pattern, bytes) else pattern
        try:
            async with asyncio.timeout(timeout):
                while True:
                    match = regex.search(self.buffer, self.mark)
                    if match:
                        self.mark = match.end()
                        return match
                    if self.eof:
                        raise EOFError(f"serial port closed before {regex.pattern!r}")
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            tail = bytes(self.buffer[max(self.mark, len(self.buffer) - 400) :])
            raise TimeoutError(
                f"no {regex.pattern!r} on the serial port within {timeout} s; tail: {tail!r}"
            ) from None

    async def run(self, command: str, timeout: float = 10.0) -> bytes:
        """Type ``command`` at a shell prompt; return what it printed before the next prompt."""
        self.write(command.encode() + b"\r")
        await self.expect(command.encode(), timeout)  # the echo of what we typed
        start = self.mark
        end = (await self.expect(NEXT_PROMPT, timeout)).start()
        return bytes(self.buffer[start:end]).strip()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._transport is not None:
            self._transport.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# --------------------------------------------------------------------------- qemu


class Guest:
    """One QEMU process booting the test guest, in its own folder.

    ``serial`` selects COM1's back-end: ``pty``; ``socket`` / ``telnet`` (QEMU serves
    ``folder/serial.sock``); ``client`` (QEMU dials ``serial_path``, which the caller listens on,
    and redials every second). ``qmp_address`` is the ``unix:`` address for the code under test.
    """

    def __init__(
        self,
        image: GuestImage,
        folder: Path,
        *,
        serial: SerialMode = "pty",
        serial_path: Path | None = None,
        login: bool = False,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.image = image
        self.folder = folder
        self.serial = serial
        self.serial_path = serial_path or folder / "serial.sock"
        self.login = login
        self.extra_args = list(extra_args)
        self.qmp_path = folder / "qmp.sock"
        self.log_path = folder / "qemu.log"
        self.pty_path: str | None = None
        self.process: asyncio.subprocess.Process | None = None
        self.started_at = 0.0
        self._harness_path = folder / "harness.sock"
        self._control: QMPClient | None = None  # the harness's own monitor

    @property
    def qmp_address(self) -> str:
        return f"unix:{self.qmp_path}"

    def argv(self) -> list[str]:
        append = "console=ttyS0,115200 quiet panic=-1"
        if self.login:
            append += " serialmux.login=1"
        argv = [
            QEMU, "-machine", "pc", "-m", "256M", "-display", "none",
            "-no-user-config", "-nodefaults", "-device", "pvpanic",
            "-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd),
            "-append", append, "-S",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-chardev", f"socket,id=harness,path={self._harness_path},server=off",
            "-mon", "chardev=harness,mode=control",
        ]  # fmt: skip
        if self.serial == "pty":
            argv += ["-serial", "pty"]
        else:
            options = {
                "socket": "server=on,wait=off",
                "telnet": "server=on,wait=off,telnet=on",
                "client": "server=off,reconnect=1",
            }[self.serial]
            argv += ["-chardev", f"socket,id=serial0,path={self.serial_path},{options}"]
            argv += ["-serial", "chardev:serial0"]
        return argv + self.extra_args

    async def start(self, timeout: float = 15.0) -> None:
        """Launch QEMU paused; return once its monitors and serial port exist."""
        self.folder.mkdir(parents=True, exist_ok=True)
        control = QMPClient(f"harness-{self.folder.name}")
        await control.start_server(str(self._harness_path))
        self._control = control  # from here on, kill() and stop() also close it
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
            )  # fmt: skip
        self.started_at = time.monotonic()
        accept = asyncio.ensure_future(control.accept())
        exited = asyncio.ensure_future(self.process.wait())
        try:
            done, _ = await asyncio.wait(
                {accept, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for fut in (accept, exited):
                fut.cancel()
            await asyncio.gather(accept, exited, return_exceptions=True)
        if accept not in done or accept.exception() is not None:
            await self.kill()
            raise RuntimeError(f"QEMU did not start; log:\n{self.log_text()}")
        if self.serial == "pty":
            self.pty_path = await self.query_pty("serial0")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    async def qmp(self, command: str, arguments: dict[str, Any] | None = None,
                  timeout: float = 10.0) -> Any:  # fmt: skip
        """Run a QMP command on the harness's own monitor."""
        if self._control is None:
            raise RuntimeError("guest is not started")
        async with asyncio.timeout(timeout):
            return await self._control.execute(command, arguments)

    async def query_pty(self, label: str) -> str | None:
        for chardev in await self.qmp("query-chardev"):
            if chardev["label"] == label and chardev["filename"].startswith("pty:"):
                return str(chardev["filename"][4:])
        return None

    async def open_console(self) -> SerialConsole:
        """Attach to the serial port (``pty``, ``socket`` and ``telnet`` modes)."""
        if self.serial == "pty":
            assert self.pty_path is not None
            return await SerialConsole.open_pty(self.pty_path)
        if self.serial in ("socket", "telnet"):
            return await SerialConsole.open_unix(self.serial_path)
        raise RuntimeError("in client mode QEMU dials you: use SerialConsole.listen_unix()")

    async def cont(self) -> None:
        """Let the paused guest run (it boots now)."""
        self.started_at = time.monotonic()
        await self.qmp("cont")

    async def wait_exit(self, timeout: float) -> int:
        """Wait for QEMU to exit; return its exit status."""
        assert self.process is not None
        async with asyncio.timeout(timeout):
            return await self.process.wait()

    async def kill(self) -> None:
        """SIGKILL QEMU (sockets stay behind, as after a crash)."""
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGKILL)
            await self.wait_exit(10.0)
        await self._drop_control()

    async def stop(self, timeout: float = 10.0) -> None:
        """Quit QEMU cleanly (QMP ``quit``), escalating to SIGTERM and SIGKILL."""
        if self.process is None:
            return
        if self.process.returncode is None and self._control is not None:
            with contextlib.suppress(Exception):
                await self.qmp("quit", timeout=timeout / 2)
            with contextlib.suppress(TimeoutError):
                await self.wait_exit(timeout / 2)
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
            with contextlib.suppress(TimeoutError):
                await self.wait_exit(timeout / 2)
        await self.kill()

    async def _drop_control(self) -> None:
        control, self._control = self._control, None
        if control is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5.0):
                    await control.disconnect()

    async def __aenter__(self) -> Guest:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


# --------------------------------------------------------------------------- cli


async def _boot_once(image: GuestImage, login: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="serialmux-guest-") as folder:
        async with Guest(image, Path(folder), login=login) as guest:
            console = await guest.open_console()
            try:
                await guest.cont()
                await console.expect(READY_LINE, 60)
                ready = time.monotonic() - guest.started_at
                await console.expect(LOGIN_PROMPT if login else PROMPT, 60)
                prompt = time.monotonic() - guest.started_at
                print(f"ready line after {ready:.2f} s, prompt after {prompt:.2f} s")
            finally:
                console.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="download and build the guest image (cached)")
    boot = sub.add_parser("boot", help="build, then boot once and report the boot time")
    boot.add_argument("--login", action="store_true", help="boot to a getty login prompt")
    args = parser.parse_args(argv)
    image = ensure_guest()
    print(f"kernel ({image.kernel_kind}): {image.kernel}\ninitrd: {image.initrd}")
    if args.command == "boot":
        asyncio.run(_boot_once(image, args.login))
    return 0


if __name__ == "__main__":
    sys.exit(main())
