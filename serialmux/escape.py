"""The in-band escape parser: what the user types → pass-through bytes and commands.

Every chunk an SSH session reads from its client goes through one
:class:`EscapeParser`. Bytes that are not part of an escape sequence come back
as ``bytes`` items for the VM; an escape character (Ctrl-], 0x1d, as in telnet
and ``virsh console``) followed by a key becomes a command event::

    ^] .    Command(DISCONNECT)           ^] ?    Command(HELP)
    ^] b    Command(BREAK)                ^] s K  Command(SYSRQ, "K")
    ^] n    Confirm(NMI), then y/Y → Command(NMI, confirmed=True), else → Cancelled(NMI)
    ^] r    Confirm(RESET), then y/Y → Command(RESET, confirmed=True), else → Cancelled(RESET)
            (an action not in ``confirm``, one the VM has nothing to carry, comes
            back at once as Command(action) to be refused: there is nothing to ask)
    ^] ^]   one literal 0x1d for the VM
    ^] X    Unknown(X): the session prints a hint, X is not sent

The parser is pure and synchronous: it owns no I/O and no event loop, keeps
its state across :meth:`EscapeParser.feed` calls (a sequence may be split
between chunks anywhere), and returns the events of one chunk in order.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "CONFIRMED",
    "HELP_TEXT",
    "SYSRQ_KEYS",
    "Action",
    "Cancelled",
    "Command",
    "Confirm",
    "EscapeParser",
    "Event",
    "Unknown",
    "help_text",
]

DEFAULT_ESCAPE = 0x1D

# Keys the kernel's Magic SysRq handler knows live in [0-9a-z]; anything else
# after "s" is most likely a slip of the finger, so it cancels.
SYSRQ_KEYS = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyz")


class Action(enum.Enum):
    """A command the user asked for with an escape sequence."""

    DISCONNECT = "disconnect"
    HELP = "help"
    BREAK = "break"
    NMI = "nmi"
    RESET = "reset"
    SYSRQ = "sysrq"


@dataclass(frozen=True, slots=True)
class Command:
    """Do ``action`` now; ``arg`` is the SysRq key for :attr:`Action.SYSRQ`."""

    action: Action
    arg: str | None = None
    confirmed: bool = False  # the user answered y to Confirm(action)


@dataclass(frozen=True, slots=True)
class Confirm:
    """Ask the user to confirm ``action``; the next byte typed is the answer."""

    action: Action


@dataclass(frozen=True, slots=True)
class Cancelled:
    """The user declined a confirmation, or gave no valid SysRq key."""

    action: Action


@dataclass(frozen=True, slots=True)
class Unknown:
    """The escape character was followed by ``key``, which means nothing; it was dropped."""

    key: int


Event = bytes | Command | Confirm | Cancelled | Unknown

_IMMEDIATE: dict[int, Action] = {
    ord("."): Action.DISCONNECT,
    ord("?"): Action.HELP,
    ord("b"): Action.BREAK,
}
_CONFIRMED: dict[int, Action] = {
    ord("n"): Action.NMI,
    ord("r"): Action.RESET,
}
#: The actions that ask y/N first.
CONFIRMED = frozenset(_CONFIRMED.values())
_SYSRQ_KEY = ord("s")
_YES = frozenset(b"yY")


class _State(enum.Enum):
    NORMAL = enum.auto()
    ESCAPE = enum.auto()  # saw the escape character, waiting for the command key
    CONFIRM = enum.auto()  # asked to confirm self._confirming, waiting for the answer
    SYSRQ = enum.auto()  # saw "s", waiting for the SysRq key


def _key_name(escape: int) -> str:
    if escape < 0x20:
        return "^" + chr(escape + 0x40)
    if escape == 0x7F:
        return "^?"
    return chr(escape)


def help_text(escape: int = DEFAULT_ESCAPE) -> str:
    """The lines ``<escape> ?`` prints, CRLF-terminated, for this escape character."""
    e = _key_name(escape)
    lines = [
        "serialmux escape sequences:",
        f"  {e} .    disconnect",
        f"  {e} ?    this help",
        f"  {e} b    send a serial BREAK",
        f"  {e} s K  send Magic SysRq K (K is 0-9 or a-z)",
        f"  {e} n    send an NMI (asks y/N)",
        f"  {e} r    reset the VM (asks y/N)",
        f"  {e} {e}   send one {e} to the VM",
    ]
    return "".join(line + "\r\n" for line in lines)


HELP_TEXT = help_text()


class EscapeParser:
    """Split typed input into pass-through bytes and escape commands.

    One parser per session; it is not thread-safe and needs no event loop.
    """

    __slots__ = ("_confirming", "_escape", "_state", "confirm")

    def __init__(self, escape: int = DEFAULT_ESCAPE) -> None:
        if not 0 <= escape <= 0xFF:
            raise ValueError(f"escape character must be a byte value, got {escape!r}")
        self._escape = escape
        self._state = _State.NORMAL
        self._confirming = Action.NMI
        #: Actions asked y/N before they are sent. The session takes out those the
        #: VM cannot carry (no hypervisor control): asking first would be pointless.
        self.confirm: frozenset[Action] = CONFIRMED

    @property
    def pending(self) -> bool:
        """True while in the middle of an escape sequence (its next byte is not for the VM)."""
        return self._state is not _State.NORMAL

    def passes(self, data: bytes) -> bool:
        """True if ``feed(data)`` would return ``[data]`` (and change nothing): plain typing."""
        return self._state is _State.NORMAL and bool(data) and data.find(self._escape) < 0

    def feed(self, data: bytes) -> list[Event]:
        """Parse one chunk; return its events in order, adjacent pass-through bytes joined.

        A chunk without the escape character, fed outside a sequence, comes
        back as ``[data]`` itself with no per-byte work.
        """
        escape = self._escape
        if self._state is _State.NORMAL:
            if not data:
                return []
            if data.find(escape) < 0:
                return [data]
        events: list[Event] = []
        text = bytearray()  # pass-through bytes not yet emitted
        i = 0
        n = len(data)
        while i < n:
            if self._state is _State.NORMAL:
                j = data.find(escape, i)
                if j < 0:
                    text += data[i:]
                    break
                text += data[i:j]
                self._state = _State.ESCAPE
                i = j + 1
                continue
            key = data[i]
            i += 1
            event = self._key(key)
            if event is None:
                continue
            if isinstance(event, bytes):
                text += event
                continue
            if text:
                events.append(bytes(text))
                text.clear()
            events.append(event)
        if text:
            events.append(bytes(text))
        return events

    def _key(self, key: int) -> Event | None:
        """Consume one byte of an escape sequence; return its event, or None if more follow."""
        state = self._state
        self._state = _State.NORMAL
        if state is _State.CONFIRM:
            if key in _YES:
                return Command(self._confirming, confirmed=True)
            return Cancelled(self._confirming)
        if state is _State.SYSRQ:
            if key in SYSRQ_KEYS:
                return Command(Action.SYSRQ, chr(key))
            return Cancelled(Action.SYSRQ)
        # state is ESCAPE: this is the command key.
        if key == self._escape:
            return bytes((key,))
        action = _IMMEDIATE.get(key)
        if action is not None:
            return Command(action)
        action = _CONFIRMED.get(key)
        if action is not None and action not in self.confirm:
            return Command(action)
        if action is not None:
            self._confirming = action
            self._state = _State.CONFIRM
            return Confirm(action)
        if key == _SYSRQ_KEY:
            self._state = _State.SYSRQ
            return None
        return Unknown(key)
