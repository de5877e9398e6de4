"""Configuration types: the frozen dataclasses a config is made of, and the name and port checks.

Nothing here reads a file. :func:`serialmux.config.load_config` builds these
from TOML and is the one place that validates; callers import them from
:mod:`serialmux.config`, which re-exports the names they use.
"""

from __future__ import annotations

import enum
import fnmatch
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .keys import AuthorizedKey
from .redact import RedactRule
from .ring import DEFAULT_RING_SIZE

DEFAULT_PORT = 2222
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
DEFAULT_BAUD = 115200

# Names that come from users (the SSH login name) and from the config must pass
# this before they are used for anything, paths included.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def check_name(name: str) -> bool:
    """Return whether *name* is a safe VM or user name (no ``/``, ``..``, NUL, controls)."""
    return bool(_NAME_RE.fullmatch(name)) and ".." not in name


class Role(enum.IntEnum):
    """What a grant allows; each role includes the ones below it."""

    READER = 1  # watch, logs
    CONTRIBUTOR = 2  # type, break, SysRq, NMI, reset
    OWNER = 3  # enable/disable, disconnect others


@dataclass(frozen=True, slots=True)
class Listen:
    """One address the SSH server listens on."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class PortKind(enum.Enum):
    """How serialmux reaches a VM's serial port."""

    PTY = "pty"  # a pseudo-terminal slave, e.g. QEMU -serial pty
    TTY = "tty"  # a real or emulated serial device
    UNIX = "unix"  # connect to a UNIX socket (QEMU chardev socket server)
    TCP = "tcp"  # connect to a TCP socket
    LISTEN_UNIX = "listen:unix"  # listen; QEMU connects (chardev socket server=off)
    QMP = "qmp"  # ask QEMU over QMP for the PTY of a chardev


@dataclass(frozen=True, slots=True)
class PortSpec:
    """A parsed ``port = "..."`` value."""

    kind: PortKind
    path: str = ""  # pty/tty/unix/listen:unix path, or chardev label for qmp
    host: str = ""
    port: int = 0
    telnet: bool = False  # QEMU chardev telnet=on framing (IAC escapes, IAC BRK)

    def __str__(self) -> str:
        kind = self.kind.value
        if self.telnet:
            kind = kind.replace("unix", "unix+telnet").replace("tcp", "tcp+telnet")
        if self.kind is PortKind.TCP:
            return f"{kind}:{self.host}:{self.port}"
        return f"{kind}:{self.path}"


def parse_port(text: str) -> PortSpec:
    """Parse a port string such as ``pty:/dev/pts/7`` or ``unix+telnet:/run/x.sock``.

    Raises :class:`ValueError` with a message naming what is wrong.
    """
    kind, sep, rest = text.partition(":")
    if not sep or not rest:
        raise ValueError(
            f"port {text!r} must be TYPE:WHERE, e.g. 'pty:/dev/pts/7', 'unix:/run/vm.sock', "
            "'tcp:127.0.0.1:4555', 'listen:unix:/run/vm.sock' or 'qmp:serial0'"
        )
    telnet = kind.endswith("+telnet")
    base = kind.removesuffix("+telnet")
    if base == "listen":
        sub, sep, path = rest.partition(":")
        if sub not in ("unix", "unix+telnet") or not path.startswith("/"):
            raise ValueError(f"port {text!r}: listen ports are 'listen:unix:/absolute/path'")
        return PortSpec(PortKind.LISTEN_UNIX, path=path, telnet=sub == "unix+telnet")
    if base in ("pty", "tty", "unix"):
        if telnet and base != "unix":
            raise ValueError(f"port {text!r}: telnet framing applies to socket ports only")
        if not rest.startswith("/"):
            raise ValueError(f"port {text!r}: the path must be absolute")
        if "\0" in rest:
            raise ValueError(f"port {text!r}: the path contains NUL")
        return PortSpec(PortKind(base), path=rest, telnet=telnet)
    if base == "tcp":
        host, port = _split_host_port(rest, what="port")
        return PortSpec(PortKind.TCP, host=host, port=port, telnet=telnet)
    if base == "qmp" and not telnet:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", rest):
            raise ValueError(f"port {text!r}: 'qmp:' takes a chardev label such as 'serial0'")
        return PortSpec(PortKind.QMP, path=rest)
    raise ValueError(
        f"unknown port type {kind!r} in {text!r}; use pty, tty, unix, unix+telnet, tcp, "
        "tcp+telnet, listen:unix or qmp"
    )


def _split_host_port(text: str, *, what: str) -> tuple[str, int]:
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", text)
    if not m:
        raise ValueError(f"{what} {text!r} must be HOST:PORT or [IPV6]:PORT")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise ValueError(f"{what} {text!r}: port {port} is out of range")
    return host, port


def parse_bytes_literal(text: str) -> bytes:
    r"""Turn a TOML string like ``"\u0004"`` or ``"exit\r"`` into the bytes sent to the guest."""
    return text.encode("latin-1", errors="strict")


@dataclass(frozen=True, slots=True)
class VMConfig:
    """One VM's console."""

    name: str
    port: PortSpec
    baud: int = DEFAULT_BAUD
    qmp: str | None = None
    ring_size: int = DEFAULT_RING_SIZE
    on_detach: bytes | None = None
    idle_timeout: float | None = None
    enabled: bool = True  # False: attaches refused (Disabling.reason); still read, kept
    redact: tuple[RedactRule, ...] = ()  # [server] redact first, then this VM's


@dataclass(frozen=True, slots=True)
class UserConfig:
    """One person: the keys that prove who they are."""

    name: str
    keys: tuple[AuthorizedKey, ...]
    groups: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Grant:
    """Users (and groups) get a role on the VMs whose names match one of the globs."""

    users: tuple[str, ...]
    groups: tuple[str, ...]
    vms: tuple[str, ...]
    role: Role
    mfa: str | None = None

    def matches(self, user: UserConfig, vm: str) -> bool:
        """Return whether this grant applies to *user* on *vm*."""
        if user.name not in self.users and not set(user.groups) & set(self.groups):
            return False
        return any(fnmatch.fnmatchcase(vm, pattern) for pattern in self.vms)


@dataclass(frozen=True, slots=True)
class SSHSettings:
    """Limits of the SSH front; the defaults are OpenSSH sshd's."""

    login_timeout: float = 30.0
    max_auth_tries: int = 6
    max_startups: tuple[int, int, int] = (10, 30, 100)
    penalty_authfail: float = 5.0
    penalty_noauth: float = 1.0  # a connection that closed without a failed login
    penalty_max: float = 600.0
    # sshd PerSourcePenaltyExemptList: sources never penalised (default none)
    penalty_exempt: tuple[IPNetwork, ...] = ()
    keepalive_interval: float = 15.0
    keepalive_count_max: int = 3
    user_ca_keys: tuple[str, ...] = ()
    revoked_keys: str | None = None
    per_source_max_startups: int | None = None  # sshd PerSourceMaxStartups (default none)
    max_sessions: int = 10  # sshd MaxSessions: session channels open per connection


RING_SYNC_MODES = ("fdatasync", "syncfs")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The ``[server]`` table."""

    listen: tuple[Listen, ...] = (Listen("0.0.0.0", DEFAULT_PORT),)
    host_keys: tuple[Path, ...] = (Path("/var/lib/serialmux/ssh_host_ed25519_key"),)
    state_dir: Path = Path("/var/lib/serialmux")
    runtime_dir: Path = Path("/run/serialmux")
    enabled: bool = True
    stall_timeout: float = 60.0
    audit_file: Path | None = None
    redact: tuple[RedactRule, ...] = ()  # applied to every VM
    # How changed rings are made durable every second: "fdatasync" each ring
    # (touches nothing else), or "syncfs" once per filesystem from 64 busy rings
    # on, far cheaper with thousands of consoles but it also flushes every other
    # dirty file there: only for a state_dir on a filesystem of its own.
    ring_sync: str = "fdatasync"


#: The discovery directory's names: ``NAME.serial`` (the console) and ``NAME.qmp`` (its QMP).
SERIAL_SUFFIX = ".serial"
QMP_SUFFIX = ".qmp"


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    """The ``[discovery]`` table: VMs found as ``NAME.serial`` (+ ``NAME.qmp``) in a directory."""

    dir: Path
    ring_size: int = DEFAULT_RING_SIZE
    baud: int = DEFAULT_BAUD


@dataclass(frozen=True, slots=True)
class Config:
    """A whole, validated configuration."""

    server: ServerConfig = field(default_factory=ServerConfig)
    ssh: SSHSettings = field(default_factory=SSHSettings)
    vms: Mapping[str, VMConfig] = field(default_factory=dict)
    users: Mapping[str, UserConfig] = field(default_factory=dict)
    grants: tuple[Grant, ...] = ()
    path: Path | None = None
    discovery: DiscoveryConfig | None = None

    def role_for(self, user: str, vm: str) -> Role | None:
        """Return the highest role *user* holds on *vm*, or None."""
        account = self.users.get(user)
        if account is None:
            return None
        roles = [g.role for g in self.grants if g.matches(account, vm)]
        return max(roles) if roles else None

    def mfa_for(self, user: str, vm: str) -> str | None:
        """Return the second factor the best matching grant asks for, if any."""
        account = self.users.get(user)
        if account is None:
            return None
        best = [g for g in self.grants if g.matches(account, vm)]
        if not best:
            return None
        top = max(g.role for g in best)
        # The grant that gives the role decides: a weaker grant without MFA
        # must not waive a stronger grant's second factor, and vice versa.
        needs = [g.mfa for g in best if g.role == top]
        return next((m for m in needs if m), None)

    def user_for_key(self, public_data: bytes) -> UserConfig | None:
        """Return the user a public key (its wire encoding) belongs to."""
        for user in self.users.values():
            for key in user.keys:
                if key.public_data == public_data:
                    return user
        return None


# ----------------------------------------------------------------------------
# Loading
