"""Who may do what to which VM: identities, actions, roles and the login-name grammar.

The SSH login name selects the VM (as the AWS and Google Cloud serial consoles
do); the key or certificate selects the person. Options follow the VM name
after ``+``: ``web-01+ro``, ``web-01+safe``, ``web-01+replay=100``.

Identity never comes from the login name: :class:`Identity` is built by the
SSH front from the key or certificate that authenticated, and every decision
here is :func:`allowed` over that identity's :class:`~serialmux.config.Role`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .config import Role, check_name


class Action(enum.Enum):
    """Things a session can ask for; :data:`MIN_ROLE` says what each needs."""

    WATCH = "watch"
    LOGS = "logs"
    STATUS = "status"
    WHO = "who"
    WRITE = "write"
    BREAK = "break"
    SYSRQ = "sysrq"
    NMI = "nmi"
    RESET = "reset"
    DISABLE = "disable"
    KICK = "kick"


MIN_ROLE: dict[Action, Role] = {
    Action.WATCH: Role.READER, Action.LOGS: Role.READER, Action.STATUS: Role.READER,
    Action.WHO: Role.READER,
    Action.WRITE: Role.CONTRIBUTOR, Action.BREAK: Role.CONTRIBUTOR,
    Action.SYSRQ: Role.CONTRIBUTOR, Action.NMI: Role.CONTRIBUTOR, Action.RESET: Role.CONTRIBUTOR,
    Action.DISABLE: Role.OWNER, Action.KICK: Role.OWNER,
}


def allowed(role: Role | None, action: Action) -> bool:
    """Return whether *role* is enough for *action* (None: no grant at all)."""
    return role is not None and role >= MIN_ROLE[action]


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated person on one connection."""

    user: str
    fingerprint: str
    peer: str  # "host:port"
    session_id: str
    key_id: str | None = None  # certificate key id
    serial: int | None = None  # certificate serial
    local: bool = False  # came through the local control socket

    @property
    def peer_host(self) -> str:
        """The peer's address without the port."""
        host = self.peer.rsplit(":", 1)[0] if ":" in self.peer else self.peer
        return host.strip("[]")


DEFAULT_REPLAY = 20
MAX_REPLAY = 100_000

OPTION_HELP = (
    "options after '+': ro (watch only), safe (do not take over; refuse if someone is typing), "
    f"replay=N (lines of scrollback shown on attach, 0 to {MAX_REPLAY}, default 20, 0 for none)"
)


@dataclass(frozen=True, slots=True)
class LoginRequest:
    """What a login name asks for."""

    vm: str
    read_only: bool = False
    safe: bool = False
    replay: int = DEFAULT_REPLAY
    errors: tuple[str, ...] = field(default=())


def parse_login(name: str) -> LoginRequest:
    """Parse ``VM[+option...]``; problems are collected in ``errors``, never raised."""
    vm, *options = name.split("+")
    errors: list[str] = []
    if not check_name(vm):
        errors.append("not a valid VM name")
    read_only = safe = False
    replay = DEFAULT_REPLAY
    for option in options:
        key, eq, value = option.partition("=")
        if option == "ro":
            read_only = True
        elif option == "safe":
            safe = True
        elif key == "replay" and eq and value.isascii() and value.isdigit():
            # ASCII only: str.isdigit() is true for digits int() refuses ("፩").
            # Length first: int() refuses strings of over 4300 digits.
            if len(value.lstrip("0")) <= len(str(MAX_REPLAY)) and int(value) <= MAX_REPLAY:
                replay = int(value)
            else:
                shown = value if len(value) <= 12 else value[:12] + "…"
                errors.append(f"replay={shown} is out of range: replay=N takes 0 to "
                              f"{MAX_REPLAY} lines")
        elif key == "replay":
            errors.append(f"replay takes a number of lines in ASCII digits: replay=N, 0 to "
                          f"{MAX_REPLAY}")
        else:
            shown = option if option.isprintable() and len(option) <= 32 else "?"
            errors.append(f"unknown option {shown!r}; {OPTION_HELP}")
    return LoginRequest(vm=vm, read_only=read_only, safe=safe, replay=replay,
                        errors=tuple(errors))
