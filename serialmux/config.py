"""Configuration: frozen dataclasses and :func:`load_config`, the one place that validates.

A config is read from one TOML file. Every problem is reported as a
:class:`~serialmux.errors.ConfigError` naming the file, the line (when the key
can be found in the text) and the dotted key, e.g.
``/etc/serialmux/serialmux.toml:14: vms.web-01.port: unknown port type 'ptty'``.
All problems are collected before raising, so one run of ``check-config``
shows them all (:class:`ConfigErrors`).
"""

from __future__ import annotations

import enum
import fnmatch
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .keys import AuthorizedKey, KeyParseError, parse_authorized_keys
from .redact import RedactRule, parse_rules
from .ring import DEFAULT_RING_SIZE, parse_size

DEFAULT_PORT = 2222
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


class ConfigErrors(ConfigError):
    """Several configuration problems found in one file."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


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
    enabled: bool = True
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
    penalty_max: float = 600.0
    keepalive_interval: float = 15.0
    keepalive_count_max: int = 3
    user_ca_keys: tuple[str, ...] = ()
    revoked_keys: str | None = None
    per_source_max_startups: int | None = None  # sshd PerSourceMaxStartups (default none)


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


class _Locator:
    """Find the line of a dotted key in TOML text, for error messages."""

    def __init__(self, text: str) -> None:
        self._lines = text.splitlines()

    def line_of(self, key: str) -> int | None:
        parts = key.split(".")
        for cut in range(len(parts), 0, -1):
            table, leaf = parts[: cut - 1], parts[cut - 1]
            line = self._find(table, leaf)
            if line:
                return line
        return None

    def _find(self, table: list[str], leaf: str) -> int | None:
        current: list[str] = []
        array_index: dict[str, int] = {}
        for number, raw in enumerate(self._lines, 1):
            line = raw.strip()
            header = re.fullmatch(r"(\[\[?)\s*([^\]]+?)\s*\]\]?(\s*#.*)?", line)
            if header:
                name = [p.strip().strip('"') for p in header.group(2).split(".")]
                if header.group(1) == "[[":
                    idx = array_index.get(".".join(name), -1) + 1
                    array_index[".".join(name)] = idx
                    name = [*name, str(idx)]
                current = name
                if current == [*table, leaf]:
                    return number
                continue
            m = re.match(r'"?([A-Za-z0-9_.-]+)"?\s*=', line)
            if m and current == table and m.group(1) == leaf:
                return number
        return None


class _Loader:
    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.where = _Locator(text)
        self.errors: list[ConfigError] = []

    def error(self, key: str, message: str) -> None:
        self.errors.append(
            ConfigError(message, path=str(self.path), line=self.where.line_of(key), key=key)
        )

    def table(self, data: Mapping[str, Any], key: str, name: str) -> Mapping[str, Any]:
        value = data.get(name, {})
        if not isinstance(value, dict):
            self.error(key, "must be a table")
            return {}
        return value

    def unknown(self, data: Mapping[str, Any], key: str, allowed: Iterable[str]) -> None:
        allowed = set(allowed)
        for name in data:
            if name not in allowed:
                self.error(
                    f"{key}.{name}" if key else name,
                    f"unknown key; expected one of: {', '.join(sorted(allowed))}",
                )

    def typed(self, data: Mapping[str, Any], key: str, name: str, kind: type | tuple[type, ...],
              default: Any) -> Any:
        if name not in data:
            return default
        value = data[name]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float)):
            label = (kind.__name__ if isinstance(kind, type)
                     else " or ".join(k.__name__ for k in kind))
            self.error(f"{key}.{name}", f"must be a {label}, not {type(value).__name__}")
            return default
        return value

    def string_list(self, data: Mapping[str, Any], key: str, name: str) -> tuple[str, ...]:
        value = data.get(name, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.error(f"{key}.{name}", "must be a list of strings")
            return ()
        return tuple(value)


_SERVER_KEYS = {"listen", "host_keys", "state_dir", "runtime_dir", "enabled", "stall_timeout",
                "audit_file", "redact"}
_SSH_KEYS = {"login_timeout", "max_auth_tries", "max_startups", "penalty_authfail", "penalty_max",
             "keepalive_interval", "keepalive_count_max", "user_ca_keys", "revoked_keys",
             "per_source_max_startups"}
_VM_KEYS = {"port", "baud", "qmp", "ring_size", "on_detach", "idle_timeout", "enabled", "redact"}
_DEFAULT_KEYS = {"ring_size", "baud", "on_detach", "idle_timeout"}
_USER_KEYS = {"keys", "authorized_keys", "groups"}
_GRANT_KEYS = {"users", "groups", "vms", "role", "mfa"}
_DISCOVERY_KEYS = {"dir", "ring_size", "baud", "libvirt"}


def load_config(path: str | Path) -> Config:
    """Read and validate the TOML config at *path*.

    Raises :class:`ConfigError` (a :class:`ConfigErrors` when there are
    several) naming the file, line and key of each problem.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", path=str(path)) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError("is not UTF-8 text", path=str(path)) from exc
    return parse_config(text, path)


def parse_config(text: str, path: Path) -> Config:
    """Validate TOML *text* read from *path* (named in errors; relative paths resolve from it)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        line = int(m.group(1)) if m else max(1, len(text.splitlines()))  # "end of document"
        raise ConfigError(f"TOML syntax: {exc}", path=str(path), line=line) from exc
    ld = _Loader(path, text)
    base = path.parent
    ld.unknown(data, "", {"server", "ssh", "defaults", "vms", "users", "groups", "grants",
                          "discovery"})

    server = _load_server(ld, ld.table(data, "server", "server"), base)
    ssh = _load_ssh(ld, ld.table(data, "ssh", "ssh"), base)
    defaults = ld.table(data, "defaults", "defaults")
    ld.unknown(defaults, "defaults", _DEFAULT_KEYS)

    vms: dict[str, VMConfig] = {}
    for name, table in ld.table(data, "vms", "vms").items():
        key = f"vms.{name}"
        if not check_name(name):
            ld.error(key, "VM names are 1-63 of A-Z a-z 0-9 . _ - (no '/', '..', '+', spaces)")
            continue
        if not isinstance(table, dict):
            ld.error(key, "must be a table")
            continue
        vm = _load_vm(ld, key, name, {**defaults, **table})
        if vm is not None:
            vms[name] = vm
            if server.redact:
                vms[name] = replace(vm, redact=server.redact + vm.redact)

    group_table = ld.table(data, "groups", "groups")
    members: dict[str, list[str]] = {}
    for group in group_table:
        if not check_name(group):
            ld.error(f"groups.{group}", "group names follow the rules of user names")
        for user in ld.string_list(group_table, "groups", group):
            members.setdefault(user, []).append(group)

    users: dict[str, UserConfig] = {}
    owner_of: dict[bytes, str] = {}
    for name, table in ld.table(data, "users", "users").items():
        key = f"users.{name}"
        if not check_name(name):
            ld.error(key, "user names are 1-63 of A-Z a-z 0-9 . _ - (no '/', '..', spaces)")
            continue
        if not isinstance(table, dict):
            ld.error(key, "must be a table")
            continue
        account = _load_user(ld, key, name, table, base, tuple(members.get(name, ())))
        for k in account.keys:
            other = owner_of.setdefault(k.public_data, name)
            if other != name:
                ld.error(f"{key}.keys", f"key {k.fingerprint} is also bound to user {other!r}; "
                                        "a key must name one person")
        users[name] = account
    for member in members:
        if member not in users:
            ld.error("groups", f"group member {member!r} is not a configured user")

    grants: list[Grant] = []
    raw_grants = data.get("grants", [])
    if not isinstance(raw_grants, list):
        ld.error("grants", "must be an array of tables: [[grants]]")
        raw_grants = []
    for i, table in enumerate(raw_grants):
        grant = _load_grant(ld, f"grants.{i}", table, users, group_table)
        if grant is not None:
            grants.append(grant)

    discovery = (_load_discovery(ld, ld.table(data, "discovery", "discovery"), base)
                 if "discovery" in data else None)

    if ld.errors:
        raise ld.errors[0] if len(ld.errors) == 1 else ConfigErrors(ld.errors)
    return Config(server=server, ssh=ssh, vms=vms, users=users, grants=tuple(grants),
                  path=path, discovery=discovery)


def _load_discovery(ld: _Loader, t: Mapping[str, Any], base: Path) -> DiscoveryConfig | None:
    ld.unknown(t, "discovery", _DISCOVERY_KEYS)
    if "libvirt" in t:
        ld.error("discovery.libvirt", "libvirt discovery is not implemented in this version; "
                                      "use dir = \"/run/serialmux/vms\" (see docs/operations.md)")
    raw_dir = ld.typed(t, "discovery", "dir", str, None)
    if raw_dir is None:
        ld.error("discovery.dir", "is required, e.g. dir = \"/run/serialmux/vms\"")
        return None
    ring_size = DEFAULT_RING_SIZE
    if "ring_size" in t:
        try:
            ring_size = parse_size(t["ring_size"])
        except ValueError as exc:
            ld.error("discovery.ring_size", str(exc))
    baud = ld.typed(t, "discovery", "baud", int, DEFAULT_BAUD)
    return DiscoveryConfig(dir=_resolve(base, raw_dir), ring_size=ring_size, baud=baud)


def _resolve(base: Path, value: str) -> Path:
    p = Path(value)
    return p if p.is_absolute() else base / p


def _load_server(ld: _Loader, t: Mapping[str, Any], base: Path) -> ServerConfig:
    ld.unknown(t, "server", _SERVER_KEYS)
    d = ServerConfig()
    listen: list[Listen] = []
    for item in ld.string_list(t, "server", "listen") if "listen" in t else ():
        try:
            host, port = _split_host_port(item, what="listen address")
            listen.append(Listen(host, port))
        except ValueError as exc:
            ld.error("server.listen", str(exc))
    host_keys = tuple(_resolve(base, k) for k in ld.string_list(t, "server", "host_keys"))
    state_dir = ld.typed(t, "server", "state_dir", str, None)
    runtime_dir = ld.typed(t, "server", "runtime_dir", str, None)
    audit_file = ld.typed(t, "server", "audit_file", str, None)
    stall = ld.typed(t, "server", "stall_timeout", (int, float), d.stall_timeout)
    if stall <= 0:
        ld.error("server.stall_timeout", "must be a positive number of seconds")
    return ServerConfig(
        listen=tuple(listen) or d.listen,
        host_keys=host_keys or d.host_keys,
        state_dir=_resolve(base, state_dir) if state_dir else d.state_dir,
        runtime_dir=_resolve(base, runtime_dir) if runtime_dir else d.runtime_dir,
        enabled=ld.typed(t, "server", "enabled", bool, True),
        stall_timeout=float(stall),
        audit_file=_resolve(base, audit_file) if audit_file else None,
        redact=_load_redact(ld, t, "server"),
    )


def _load_redact(ld: _Loader, t: Mapping[str, Any], key: str) -> tuple[RedactRule, ...]:
    if "redact" not in t:
        return ()
    try:
        return parse_rules(t["redact"])
    except ValueError as exc:
        ld.error(f"{key}.redact", str(exc))
        return ()


def _load_ssh(ld: _Loader, t: Mapping[str, Any], base: Path) -> SSHSettings:
    ld.unknown(t, "ssh", _SSH_KEYS)
    d = SSHSettings()
    startups = d.max_startups
    if "max_startups" in t:
        raw = t["max_startups"]
        m = re.fullmatch(r"(\d+)(?::(\d+):(\d+))?", str(raw))
        if not m:
            ld.error("ssh.max_startups", "must be N or START:RATE:FULL like sshd's 10:30:100")
        else:
            start = int(m.group(1))
            rate = int(m.group(2) or 100)
            full = int(m.group(3) or start)
            if not (0 < start <= full and 0 <= rate <= 100):
                ld.error("ssh.max_startups", "needs 0 < START <= FULL and RATE in 0..100")
            startups = (start, rate, full)
    nums: dict[str, float] = {}
    for name in ("login_timeout", "penalty_authfail", "penalty_max", "keepalive_interval"):
        value = ld.typed(t, "ssh", name, (int, float), getattr(d, name))
        if value < 0:
            ld.error(f"ssh.{name}", "must not be negative")
        nums[name] = float(value)
    ints: dict[str, int] = {}
    for name in ("max_auth_tries", "keepalive_count_max"):
        value = ld.typed(t, "ssh", name, int, getattr(d, name))
        if value < 1:
            ld.error(f"ssh.{name}", "must be at least 1")
        ints[name] = value
    revoked = ld.typed(t, "ssh", "revoked_keys", str, None)
    per_source = ld.typed(t, "ssh", "per_source_max_startups", int, None)
    if per_source is not None and per_source < 1:
        ld.error("ssh.per_source_max_startups", "must be at least 1 (leave it out for none)")
    return SSHSettings(
        per_source_max_startups=per_source,
        max_startups=startups,
        user_ca_keys=tuple(
            str(_resolve(base, p)) for p in ld.string_list(t, "ssh", "user_ca_keys")),
        revoked_keys=str(_resolve(base, revoked)) if revoked else None,
        login_timeout=nums["login_timeout"], penalty_authfail=nums["penalty_authfail"],
        penalty_max=nums["penalty_max"], keepalive_interval=nums["keepalive_interval"],
        max_auth_tries=ints["max_auth_tries"], keepalive_count_max=ints["keepalive_count_max"],
    )


def _load_vm(ld: _Loader, key: str, name: str, t: Mapping[str, Any]) -> VMConfig | None:
    ld.unknown(t, key, _VM_KEYS)
    if "port" not in t:
        ld.error(f"{key}.port", "is required, e.g. port = \"pty:/dev/pts/7\"")
        return None
    raw_port = ld.typed(t, key, "port", str, None)
    if raw_port is None:
        return None
    try:
        port = parse_port(raw_port)
    except ValueError as exc:
        ld.error(f"{key}.port", str(exc))
        return None
    baud = ld.typed(t, key, "baud", int, DEFAULT_BAUD)
    if baud not in (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600):
        ld.error(f"{key}.baud", f"{baud} is not a standard rate (9600 ... 115200 ... 921600)")
    qmp = ld.typed(t, key, "qmp", str, None)
    if qmp is not None and not re.fullmatch(r"unix:/.+|tcp:[^:]+:\d+", qmp):
        ld.error(f"{key}.qmp", "must be 'unix:/path/to/qmp.sock' or 'tcp:HOST:PORT'")
    if port.kind is PortKind.QMP and qmp is None:
        ld.error(f"{key}.port", "'qmp:' ports need qmp = \"unix:/path\" for the same VM")
    ring_size = DEFAULT_RING_SIZE
    if "ring_size" in t:
        try:
            ring_size = parse_size(t["ring_size"])
        except ValueError as exc:
            ld.error(f"{key}.ring_size", str(exc))
    on_detach = None
    raw_detach = ld.typed(t, key, "on_detach", str, None)
    if raw_detach:
        try:
            on_detach = parse_bytes_literal(raw_detach)
        except UnicodeEncodeError:
            ld.error(f"{key}.on_detach", "must be bytes: characters U+0000..U+00FF only")
        if len(raw_detach) > 256:
            ld.error(f"{key}.on_detach", "is longer than 256 bytes")
    idle = ld.typed(t, key, "idle_timeout", (int, float), None)
    if idle is not None and idle <= 0:
        ld.error(f"{key}.idle_timeout", "must be a positive number of seconds")
    return VMConfig(
        name=name, port=port, baud=baud, qmp=qmp, ring_size=ring_size, on_detach=on_detach,
        idle_timeout=float(idle) if idle else None, enabled=ld.typed(t, key, "enabled", bool, True),
        redact=_load_redact(ld, t, key),
    )


def _load_user(ld: _Loader, key: str, name: str, t: Mapping[str, Any], base: Path,
               groups: tuple[str, ...]) -> UserConfig:
    ld.unknown(t, key, _USER_KEYS)
    keys: list[AuthorizedKey] = []
    for i, line in enumerate(ld.string_list(t, key, "keys")):
        try:
            keys.extend(parse_authorized_keys(line, source=f"{key}.keys[{i}]"))
        except KeyParseError as exc:
            ld.error(f"{key}.keys", str(exc))
    file = ld.typed(t, key, "authorized_keys", str, None)
    if file:
        kpath = _resolve(base, file)
        try:
            text = kpath.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            ld.error(f"{key}.authorized_keys", f"cannot read {kpath}: {exc}")
        else:
            try:
                keys.extend(parse_authorized_keys(text, source=str(kpath)))
            except KeyParseError as exc:
                ld.error(f"{key}.authorized_keys", str(exc))
    if not keys:
        ld.error(key, "has no keys: give keys = [...] or authorized_keys = \"FILE\"")
    extra = ld.string_list(t, key, "groups")
    return UserConfig(name=name, keys=tuple(keys), groups=tuple(dict.fromkeys(groups + extra)))


def _load_grant(ld: _Loader, key: str, t: object, users: Mapping[str, UserConfig],
                groups: Mapping[str, Any]) -> Grant | None:
    if not isinstance(t, dict):
        ld.error(key, "must be a table")
        return None
    ld.unknown(t, key, _GRANT_KEYS)
    names = ld.string_list(t, key, "users")
    group_names = ld.string_list(t, key, "groups")
    for user in names:
        if user not in users:
            ld.error(f"{key}.users", f"{user!r} is not a configured user")
    for group in group_names:
        if group not in groups:
            ld.error(f"{key}.groups", f"{group!r} is not a configured group")
    if not names and not group_names:
        ld.error(key, "names no users or groups")
    vms = ld.string_list(t, key, "vms")
    if not vms:
        ld.error(f"{key}.vms", "is required: a list of VM name globs, e.g. [\"web-*\"]")
    raw_role = ld.typed(t, key, "role", str, None)
    try:
        role = Role[str(raw_role).upper()]
    except KeyError:
        ld.error(f"{key}.role", "must be one of reader, contributor, owner")
        return None
    mfa = ld.typed(t, key, "mfa", str, None)
    if mfa not in (None, "totp"):
        ld.error(f"{key}.mfa", "must be \"totp\" (or left out)")
    return Grant(users=names, groups=group_names, vms=vms, role=role, mfa=mfa)
