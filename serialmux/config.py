"""Configuration: :func:`load_config`, the one place that validates, and the config types.

A config is read from one TOML file. Every problem is reported as a
:class:`~serialmux.errors.ConfigError` naming the file, the line (when the key
can be found in the text) and the dotted key, e.g.
``/etc/serialmux/serialmux.toml:14: vms.web-01.port: unknown port type 'ptty'``.
All problems are collected before raising, so one run of ``check-config``
shows them all (:class:`ConfigErrors`).

The frozen dataclasses live in :mod:`serialmux.configtypes` so that this
module can import them: callers import both the types and :func:`load_config`
from here, and the loader needs the types, so the types are the lower module.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from .configtypes import (
    DEFAULT_BAUD,
    RING_SYNC_MODES,
    Config,
    DiscoveryConfig,
    Grant,
    IPNetwork,
    Listen,
    PortKind,
    PortSpec,
    Role,
    ServerConfig,
    SSHSettings,
    UserConfig,
    VMConfig,
    _split_host_port,
    check_name,
    parse_bytes_literal,
    parse_port,
)
from .errors import ConfigError
from .keys import AuthorizedKey, KeyParseError, parse_authorized_keys
from .redact import RedactRule, parse_rules
from .ring import DEFAULT_RING_SIZE, parse_size

__all__ = [
    "Config",
    "ConfigError",
    "ConfigErrors",
    "DiscoveryConfig",
    "Grant",
    "Listen",
    "PortKind",
    "PortSpec",
    "Role",
    "SSHSettings",
    "ServerConfig",
    "UserConfig",
    "VMConfig",
    "check_name",
    "load_config",
    "parse_config",
]

class ConfigErrors(ConfigError):
    """Several configuration problems found in one file."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)




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


_KIND_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               list: "a list", dict: "a table"}


def _kind_words(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if set(kinds) == {int, float}:
        return "a number"
    return " or ".join(_KIND_WORDS.get(k, k.__name__) for k in kinds)


class _Loader:
    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.where = _Locator(text)
        self.errors: list[ConfigError] = []
        # Keys whose value came from elsewhere ([defaults] for a VM): the error names that key.
        self.origin: dict[str, str] = {}
        self._said: set[tuple[str, str]] = set()

    def error(self, key: str, message: str) -> None:
        key = self.origin.get(key, key)
        if (key, message) in self._said:  # one [defaults] mistake, not one per VM
            return
        self._said.add((key, message))
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
            self.error(f"{key}.{name}", f"must be {_kind_words(kind)}, not {type(value).__name__}")
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
                "audit_file", "redact", "ring_sync"}
_SSH_KEYS = {"login_timeout", "max_auth_tries", "max_startups", "penalty_authfail", "penalty_max",
             "penalty_noauth", "penalty_exempt",
             "keepalive_interval", "keepalive_count_max", "user_ca_keys", "revoked_keys",
             "per_source_max_startups", "max_sessions"}
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
    path = Path(path).absolute()  # named in messages and compared by `serialmux reload`
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
        ld.origin = {f"{key}.{k}": f"defaults.{k}" for k in defaults if k not in table}
        vm = _load_vm(ld, key, name, {**defaults, **table})
        ld.origin = {}
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
        ld.error("discovery.libvirt", "is not a key: libvirt domains are discovered through "
                                      "dir = \"/run/serialmux/vms\" and the libvirt hook "
                                      "config/libvirt-hook (see docs/operations.md)")
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
        except ValueError as exc:
            ld.error("server.listen", str(exc))
            continue
        if Listen(host, port) in listen:
            ld.error("server.listen", f"{item!r} is listed twice")
            continue
        listen.append(Listen(host, port))
    host_keys = tuple(_resolve(base, k) for k in ld.string_list(t, "server", "host_keys"))
    if len(set(host_keys)) != len(host_keys):
        ld.error("server.host_keys", "a host key file is listed twice")
    state_dir = ld.typed(t, "server", "state_dir", str, None)
    runtime_dir = ld.typed(t, "server", "runtime_dir", str, None)
    audit_file = ld.typed(t, "server", "audit_file", str, None)
    ring_sync = ld.typed(t, "server", "ring_sync", str, d.ring_sync)
    if ring_sync not in RING_SYNC_MODES:
        ld.error("server.ring_sync", f"must be one of {', '.join(RING_SYNC_MODES)}")
        ring_sync = d.ring_sync
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
        ring_sync=ring_sync,
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
    for name in ("login_timeout", "penalty_authfail", "penalty_noauth", "penalty_max",
                 "keepalive_interval"):
        value = ld.typed(t, "ssh", name, (int, float), getattr(d, name))
        if value < 0:
            ld.error(f"ssh.{name}", "must not be negative")
        nums[name] = float(value)
    ints: dict[str, int] = {}
    for name in ("max_auth_tries", "keepalive_count_max", "max_sessions"):
        value = ld.typed(t, "ssh", name, int, getattr(d, name))
        if value < 1:
            ld.error(f"ssh.{name}", "must be at least 1")
        ints[name] = value
    revoked = ld.typed(t, "ssh", "revoked_keys", str, None)
    per_source = ld.typed(t, "ssh", "per_source_max_startups", int, None)
    if per_source is not None and per_source < 1:
        ld.error("ssh.per_source_max_startups", "must be at least 1 (leave it out for none)")
    exempt: list[IPNetwork] = []
    for text in ld.string_list(t, "ssh", "penalty_exempt"):
        try:
            exempt.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            ld.error("ssh.penalty_exempt",
                     f"{text!r} is not an address or network (e.g. \"10.0.0.0/8\", \"::1\")")
    return SSHSettings(
        per_source_max_startups=per_source,
        penalty_noauth=nums["penalty_noauth"], penalty_exempt=tuple(exempt),
        max_startups=startups,
        user_ca_keys=tuple(
            str(_resolve(base, p)) for p in ld.string_list(t, "ssh", "user_ca_keys")),
        revoked_keys=str(_resolve(base, revoked)) if revoked else None,
        login_timeout=nums["login_timeout"], penalty_authfail=nums["penalty_authfail"],
        penalty_max=nums["penalty_max"], keepalive_interval=nums["keepalive_interval"],
        max_auth_tries=ints["max_auth_tries"], keepalive_count_max=ints["keepalive_count_max"],
        max_sessions=ints["max_sessions"],
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
