"""The simulated guest behind ``serialmux demo``: a tiny Linux box on a PTY.

:class:`SimulatedGuest` holds the master side of a PTY pair, as QEMU does for
``-serial pty``; the daemon opens :attr:`SimulatedGuest.slave_path` as the VM
port. The guest boots (kernel-ish lines), offers ``demo login:``, accepts any
name and password, and runs a toy shell (``help`` lists its commands).

It is its own line discipline: the slave is raw, so the guest echoes what is
typed, handles backspace, Ctrl-C, Ctrl-D and CR/LF, and writes CRLF. Output is
buffered up to a bound; when nobody reads the slave the oldest output is
dropped, like a UART with no one listening, rather than growing memory.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import time
import tty
from collections.abc import Iterable

__all__ = ["SimulatedGuest"]

_MAX_OUTPUT = 64 * 1024  # bytes buffered beyond what the PTY accepts
_MAX_INPUT = 4096  # typed-ahead bytes kept, like the kernel's N_TTY buffer
_MAX_LINE = 1024
_MAX_LINES = 100_000  # bound on seq / spam output
_BATCH = 256  # lines written between checks for Ctrl-C and drain
_DRAIN_TIMEOUT = 0.2  # how long bulk output waits for a reader before dropping

_BOOT = [
    (0.000000, "Linux version 6.1.0-serialmux (demo@serialmux) (gcc 12.2.0) #1 SMP"),
    (0.000000, "Command line: BOOT_IMAGE=/vmlinuz root=/dev/vda1 ro console=ttyS0,115200n8"),
    (0.000000, "BIOS-provided physical RAM map:"),
    (0.000000, "DMI: QEMU Standard PC (Q35 + ICH9, 2009), BIOS 1.16.2-debian-1.16.2-1 04/01/2014"),
    (0.004127, "Hypervisor detected: KVM"),
    (0.012410, "Memory: 1994132K/2096600K available (14336K kernel code)"),
    (0.061234, "smp: Bringing up secondary CPUs ..."),
    (0.089012, "smp: Brought up 1 node, 2 CPUs"),
    (0.301876, "Serial: 8250/16550 driver, 4 ports, IRQ sharing enabled"),
    (0.302417, "00:04: ttyS0 at I/O 0x3f8 (irq = 4, base_baud = 115200) is a 16550A"),
    (0.412098, "virtio_blk virtio1: [vda] 41943040 512-byte logical blocks (21.5 GB/20.0 GiB)"),
    (0.413350, " vda: vda1 vda14 vda15"),
    (0.520331, "virtio_net virtio0 enp1s0: renamed from eth0"),
    (0.771202, "EXT4-fs (vda1): mounted filesystem with ordered data mode. Quota mode: none."),
    (0.904551, "Run /sbin/init as init process"),
    (1.210938, "systemd[1]: systemd 252.38-1~deb12u1 running in system mode"),
    (1.305125, "systemd[1]: Hostname set to <{host}>."),
    (1.988342, "systemd[1]: Started serial-getty@ttyS0.service - Serial Getty on ttyS0."),
]

_CPUINFO = """processor\t: {n}
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 85
model name\t: Intel Xeon Processor (Cascadelake)
cpu MHz\t\t: 2593.906
cache size\t: 16384 KB
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov lm hypervisor
bogomips\t: 5187.81
"""

_HELP = """Commands: echo TEXT, help, uname [-a|-r|-n|-m|-s], date, uptime, whoami,
hostname, seq [FIRST] LAST, cat /proc/cpuinfo, dmesg, spam N (N lines, for
throughput), exit / logout. Ctrl-C interrupts, Ctrl-D on an empty line logs out.
"""


class _Interrupted(Exception):
    """Ctrl-C was typed while reading a line."""


def _crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


class SimulatedGuest:
    """A fake VM console on a PTY: boot messages, a login prompt and a toy shell."""

    def __init__(self, *, hostname: str = "demo", boot_delay: float = 0.05) -> None:
        self._hostname = hostname
        self._boot_delay = boot_delay
        master, slave = os.openpty()
        # Keep the slave open for our lifetime: without any slave fd, writes to
        # the master fail with EIO while the daemon reopens the port.
        self._master: int | None = master
        self._slave: int | None = slave
        self._slave_path = os.ttyname(slave)
        tty.setraw(slave)
        os.set_blocking(master, False)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._input = bytearray()
        self._input_ready = asyncio.Event()
        self._output = bytearray()
        self._writing = False  # a writer callback is registered
        self._drained = asyncio.Event()
        self._stalled = False  # a bulk write timed out waiting for a reader
        self._skip_lf = False  # the last Enter was CR: an LF right after it is part of it
        self._booted_at = time.monotonic()

    @property
    def slave_path(self) -> str:
        """The slave PTY ("/dev/pts/N") that the daemon opens as this VM's port."""
        return self._slave_path

    async def run(self) -> None:
        """Boot, then serve logins and shells until cancelled."""
        if self._master is None:
            raise RuntimeError("SimulatedGuest is closed")
        loop = asyncio.get_running_loop()
        self._loop = loop
        loop.add_reader(self._master, self._on_readable)
        try:
            await self._boot()
            while True:
                user = await self._login()
                await self._shell(user)
        finally:
            self._detach()

    def close(self) -> None:
        """Close both PTY fds; the slave path stops existing. Idempotent."""
        self._detach()
        for fd in (self._master, self._slave):
            if fd is not None:
                os.close(fd)
        self._master = self._slave = None

    # --- I/O ----------------------------------------------------------------

    def _detach(self) -> None:
        if self._loop is not None and self._master is not None:
            self._loop.remove_reader(self._master)
            if self._writing:
                self._loop.remove_writer(self._master)
        self._writing = False
        self._loop = None

    def _on_readable(self) -> None:
        """Runs when the master has typed bytes; keeps up to _MAX_INPUT of them."""
        assert self._master is not None
        try:
            data = os.read(self._master, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            # EIO cannot happen while we hold the slave; anything else, stop reading.
            if self._loop is not None:
                self._loop.remove_reader(self._master)
            return
        room = _MAX_INPUT - len(self._input)
        if room > 0:
            self._input += data[:room]
            self._input_ready.set()

    def _write(self, data: bytes) -> None:
        self._output += data
        excess = len(self._output) - _MAX_OUTPUT
        if excess > 0:
            del self._output[:excess]  # nobody is reading: keep the newest
        self._flush()

    def _flush(self) -> None:
        """Push buffered output into the master; runs inline and as the writer callback."""
        master = self._master
        while self._output and master is not None:
            try:
                n = os.write(master, self._output)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._output.clear()
                break
            del self._output[:n]
        if self._loop is None or master is None:
            return
        if self._output and not self._writing:
            self._loop.add_writer(master, self._flush)
            self._writing = True
        elif not self._output:
            if self._writing:
                self._loop.remove_writer(master)
                self._writing = False
            self._stalled = False
            self._drained.set()

    async def _wait_drained(self) -> None:
        """Let a reader catch up with bulk output; stop waiting if there is none."""
        if self._output and not self._stalled:
            self._drained.clear()
            try:
                async with asyncio.timeout(_DRAIN_TIMEOUT):
                    await self._drained.wait()
            except TimeoutError:
                self._stalled = True
        await asyncio.sleep(0)  # let typed input (Ctrl-C) in

    async def _getc(self) -> int:
        while not self._input:
            self._input_ready.clear()
            await self._input_ready.wait()
        key = self._input[0]
        del self._input[0]
        return key

    def _take_interrupt(self) -> bool:
        """Consume typed input up to a pending Ctrl-C; True if there was one."""
        i = self._input.find(3)
        if i < 0:
            return False
        del self._input[: i + 1]
        self._write(b"^C\r\n")
        return True

    async def _readline(self, *, echo: bool = True) -> str | None:
        """Read one edited line; None for Ctrl-D on an empty line.

        Raises _Interrupted (after echoing ^C) on Ctrl-C.
        """
        line = bytearray()
        while True:
            key = await self._getc()
            if key == 0x0A and self._skip_lf:
                self._skip_lf = False
                continue
            self._skip_lf = False
            if key in (0x0D, 0x0A):
                self._skip_lf = key == 0x0D
                self._write(b"\r\n")
                return line.decode("utf-8", "replace")
            if key == 0x03:
                self._write(b"^C\r\n")
                raise _Interrupted
            if key == 0x04:
                if not line:
                    return None
                continue
            if key in (0x7F, 0x08):
                if line:
                    while line and 0x80 <= line[-1] < 0xC0:  # UTF-8 continuation bytes
                        line.pop()
                    if line:
                        line.pop()
                    if echo:
                        self._write(b"\b \b")
                continue
            if key == 0x15:  # Ctrl-U: kill the line
                if echo:
                    self._write(b"\b \b" * len(line.decode("utf-8", "replace")))
                line.clear()
                continue
            if key == 0x1B:
                await self._skip_escape_sequence()
                continue
            if key < 0x20:
                continue
            if len(line) >= _MAX_LINE:
                self._write(b"\a")
                continue
            line.append(key)
            if echo:
                self._write(bytes((key,)))

    async def _skip_escape_sequence(self) -> None:
        """Drop an arrow-key style sequence (ESC [ ... final) so it does not land in the line."""
        if await self._getc() not in (ord("["), ord("O")):
            return
        while not 0x40 <= await self._getc() <= 0x7E:
            pass

    async def _lines(self, lines: Iterable[str]) -> None:
        """Write many lines in batches, draining and honouring Ctrl-C between batches."""
        batch: list[str] = []
        for line in lines:
            batch.append(line)
            if len(batch) >= _BATCH:
                self._write(_crlf("\n".join(batch) + "\n"))
                batch.clear()
                await self._wait_drained()
                if self._take_interrupt():
                    return
        if batch:
            self._write(_crlf("\n".join(batch) + "\n"))

    # --- The guest ------------------------------------------------------------

    def _boot_lines(self) -> list[str]:
        return [f"[{ts:12.6f}] {text.format(host=self._hostname)}" for ts, text in _BOOT]

    async def _boot(self) -> None:
        self._booted_at = time.monotonic()
        for line in self._boot_lines():
            self._write(_crlf(line + "\n"))
            if self._boot_delay > 0:
                await asyncio.sleep(self._boot_delay)

    async def _login(self) -> str:
        """Prompt until someone logs in (any name, any password); return the name."""
        while True:
            self._write(
                _crlf(
                    f"\nserialmux demo guest {self._hostname} ttyS0"
                    "\n(log in with any name and password; type help after login)"
                    f"\n\n{self._hostname} login: "
                )
            )
            try:
                name = await self._readline()
                if not name or not name.strip():
                    continue
                self._write(b"Password: ")
                await self._readline(echo=False)
            except _Interrupted:
                continue
            self._write(b"\r\n")
            user = name.strip().split()[0]
            self._write(_crlf(f"Welcome to the serialmux demo, {user}! Type 'help'.\n"))
            return user

    async def _shell(self, user: str) -> None:
        """Run commands until exit, logout or Ctrl-D."""
        while True:
            self._write(f"{user}@{self._hostname}:~$ ".encode())
            try:
                line = await self._readline()
            except _Interrupted:
                continue
            if line is None:
                self._write(b"logout\r\n")
                return
            words = line.split()
            if not words:
                continue
            if words[0] in ("exit", "logout"):
                self._write(b"logout\r\n")
                return
            await self._command(user, words[0], words[1:])

    async def _command(self, user: str, cmd: str, args: list[str]) -> None:
        out = self._say
        if cmd == "echo":
            out(" ".join(args))
        elif cmd == "help":
            out(_HELP.rstrip("\n"))
        elif cmd == "uname":
            self._uname(args)
        elif cmd == "date":
            out(datetime.datetime.now(datetime.UTC).strftime("%a %b %d %H:%M:%S UTC %Y"))
        elif cmd == "uptime":
            minutes = int(time.monotonic() - self._booted_at) // 60
            now = time.strftime("%H:%M:%S")
            out(f" {now} up {minutes} min,  1 user,  load average: 0.00, 0.00, 0.00")
        elif cmd == "whoami":
            out(user)
        elif cmd == "hostname":
            out(self._hostname)
        elif cmd == "seq":
            await self._seq(args)
        elif cmd == "cat":
            for path in args:
                if path == "/proc/cpuinfo":
                    out("\n".join(_CPUINFO.format(n=n) for n in range(2)).rstrip("\n"))
                else:
                    out(f"cat: {path}: No such file or directory")
        elif cmd == "dmesg":
            await self._lines(self._boot_lines())
        elif cmd == "spam":
            count = self._count(cmd, args[0] if len(args) == 1 else "")
            if count is not None:
                text = "the quick brown fox jumps over the lazy dog 0123456789"
                await self._lines(f"{i:06d} {text}" for i in range(1, count + 1))
        else:
            out(f"sh: {cmd}: command not found")

    def _say(self, text: str) -> None:
        self._write(_crlf(text + "\n"))

    def _uname(self, args: list[str]) -> None:
        fields = {
            "-s": "Linux",
            "-n": self._hostname,
            "-r": "6.1.0-serialmux",
            "-v": "#1 SMP PREEMPT_DYNAMIC Debian 6.1.0",
            "-m": "x86_64",
            "-o": "GNU/Linux",
        }
        if not args:
            args = ["-s"]
        if args == ["-a"]:
            self._say(" ".join(fields.values()))
        elif all(a in fields for a in args):
            self._say(" ".join(fields[a] for a in args))
        else:
            bad = next(a for a in args if a not in fields)
            self._say(f"uname: invalid option -- '{bad.lstrip('-')}'")

    def _count(self, cmd: str, text: str) -> int | None:
        try:
            value = int(text)
        except ValueError:
            self._say(f"{cmd}: usage: {cmd} N  (1 <= N <= {_MAX_LINES})")
            return None
        return max(0, min(value, _MAX_LINES))

    async def _seq(self, args: list[str]) -> None:
        if len(args) == 1:
            first, last = "1", args[0]
        elif len(args) == 2:
            first, last = args
        else:
            self._say("seq: usage: seq [FIRST] LAST")
            return
        start = self._count("seq", first)
        end = self._count("seq", last)
        if start is None or end is None:
            return
        await self._lines(str(i) for i in range(start, end + 1))
