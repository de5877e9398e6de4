"""Actions on a VM (BREAK, SysRq, NMI, reset): one path for escape keys, commands and the CLI.

Every action is checked against the identity's role, audited (who, VM,
action, result, QMP error class) and marked in the ring, so the guest's
answer can be read in context later (``NMI sent by alice``).

What carries each action depends on the port (see docs/hypervisor.md):
BREAK goes to the port (``IAC BRK`` on a telnet socket, ``tcsendbreak`` on a
tty), except on a QEMU PTY or plain socket, which cannot carry one: there QMP
``chardev-send-break`` puts it on the guest's UART. SysRq uses ``IAC BRK`` +
key on a telnet socket, else QMP ``send-key`` alt+sysrq+KEY, which works
whatever the port; NMI and reset need QMP.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .access import Action, Identity, allowed
from .config import PortKind, Role
from .console import Attachment, Console
from .errors import AccessDenied, HypervisorError, HypervisorUnavailable, SerialmuxError
from .escape import Action as Key

if TYPE_CHECKING:
    from .daemon import Daemon
    from .log import Audit
    from .qmp import Hypervisor

SYSRQ_KEYS = re.compile(r"[0-9a-z]")
SYSRQ_USAGE = "sysrq takes one key: 0-9 or a-z (e.g. 'h' for help)"

_FROM_ESCAPE = {
    Key.BREAK: Action.BREAK,
    Key.NMI: Action.NMI,
    Key.RESET: Action.RESET,
    Key.SYSRQ: Action.SYSRQ,
}


@dataclass(slots=True)
class _Streak:
    count: int = 0  # refusals seen with this key
    held: int = 0  # of them not audited since the last event for this key
    last: float = 0.0  # monotonic time of that last event
    fields: dict[str, Any] | None = None


class Repeats:
    """Audit one session's repeated identical refusals sparingly.

    A reader typing ``^] b`` in a loop would otherwise write an audit event (and
    a log line) per keystroke. The first :attr:`FREE` refusals of each kind
    (event, action, arg, result, reason) are audited in full; later ones are
    counted, and at most one summary event per :attr:`INTERVAL` seconds
    carries ``suppressed=N``, the refusals it stands for. :meth:`flush` (at
    detach) writes the rest. So the count adds up: events without
    ``suppressed`` count one each, the others N.
    """

    FREE = 3
    INTERVAL = 60.0

    def __init__(self, audit: Audit, clock: Callable[[], float] = time.monotonic) -> None:
        self._audit = audit
        self._clock = clock
        self._streaks: dict[tuple[object, ...], _Streak] = {}

    def event(self, event: str, **fields: Any) -> None:
        """Audit *event* now, or count it towards the next summary."""
        key = (event, fields.get("action"), fields.get("arg"), fields.get("result"),
               fields.get("reason"))
        streak = self._streaks.setdefault(key, _Streak())
        streak.count += 1
        now = self._clock()
        if streak.count <= self.FREE:
            self._audit.event(event, **fields)
            streak.last = now
            return
        streak.held += 1
        streak.fields = fields
        if now - streak.last >= self.INTERVAL:
            self._summary(event, streak, now)

    def flush(self) -> None:
        """Write a summary for every kind with refusals not yet audited."""
        now = self._clock()
        for key, streak in self._streaks.items():
            if streak.held:
                self._summary(str(key[0]), streak, now)

    def _summary(self, event: str, streak: _Streak, now: float) -> None:
        self._audit.event(event, suppressed=streak.held, **(streak.fields or {}))
        streak.held = 0
        streak.last = now


def from_escape(key: Key) -> Action:
    """Map an escape-key action to the access action it needs."""
    return _FROM_ESCAPE[key]


def role_of(daemon: Daemon, identity: Identity, vm: str) -> Role | None:
    """The role of *identity* on *vm*; local root (control socket) is owner."""
    if identity.local:
        return Role.OWNER
    return daemon.config.role_for(identity.user, vm)


async def perform(
    daemon: Daemon, console: Console, identity: Identity, action: Action, arg: str | None = None,
    *, repeats: Repeats | None = None, confirmed: bool = True, told: Attachment | None = None,
) -> str:
    """Do *action* on *console* for *identity*; return a one-line result or raise.

    Every session attached to *console* hears of a done action, but *told* (the
    attached session that asked, which gets the result itself). Refusals and
    failures are audited through *repeats* when given (a session's
    escape keys, which a user can repeat as fast as they type). An escape's
    NMI or reset comes *confirmed* False when it was not asked y/N because
    the VM had no hypervisor control: it is only ever refused.
    """
    not_ok = daemon.audit.event if repeats is None else repeats.event
    audit = {
        "vm": console.name,
        "user": identity.user,
        "session": identity.session_id,
        "peer": identity.peer,
        "action": action.name.lower(),
        "arg": arg,
    }
    if not allowed(role_of(daemon, identity, console.name), action):
        not_ok("command", result="refused", reason="role too low", **audit)
        raise AccessDenied(
            f"{action.name.lower()} needs the contributor or owner role",
            user=identity.user,
            vm=console.name,
        )
    refusal = daemon.disabling.refusal(console)
    if refusal:  # a disabled console takes nothing, from the SSH side or the host's CLI
        not_ok("command", result="refused", reason=refusal, **audit)
        raise SerialmuxError(refusal)
    try:
        if not confirmed and action in (Action.NMI, Action.RESET) and console.hypervisor:
            raise SerialmuxError(f"{action.name} not sent: {console.name} has hypervisor "
                                 "control only since you typed it; type the escape again")
        text = await _do(console, action, arg)
    except HypervisorError as exc:
        not_ok(
            "command", result="failed", reason=str(exc), error_class=exc.error_class, **audit
        )
        raise
    except SerialmuxError as exc:
        not_ok("command", result="failed", reason=str(exc), **audit)
        raise
    daemon.audit.event("command", result="ok", **audit)
    what = action.name if action is not Action.SYSRQ else f"SysRq {arg}"
    console.mark(
        "ACTION", f"{what} sent by {identity.user}", user=identity.user, action=action.name.lower()
    )
    # Whoever else is attached hears of it, as at a shared console (conserver does too).
    console.notice(f"{what} sent by {identity.user}", skip=told)
    return text


async def _do(console: Console, action: Action, arg: str | None) -> str:
    from .port import BRK, IAC  # the telnet bytes

    name = console.name
    hv = console.hypervisor
    if action is Action.BREAK:
        return await _break(console, hv)
    if action is Action.SYSRQ:
        if not arg or not SYSRQ_KEYS.fullmatch(arg):
            raise SerialmuxError(SYSRQ_USAGE)
        if console.port.spec.telnet and console.up:
            await console.port.write_raw(bytes((IAC, BRK)) + arg.encode())
            return f"SysRq {arg} sent to {name} (BREAK + key on the serial line)"
        if hv is None:
            raise HypervisorUnavailable(
                "SysRq needs a qmp = ... control socket, or a unix+telnet: port", vm=name
            )
        await hv.sysrq(arg)
        return f"SysRq {arg} sent to {name} (QMP send-key)"
    if hv is None:
        raise HypervisorUnavailable(
            f'{action.name} is not available: no qmp = "unix:..." configured for this VM', vm=name
        )
    if action is Action.NMI:
        await hv.nmi()
        return f"NMI sent to {name}"
    if action is Action.RESET:
        await hv.reset()
        return f"{name} reset"
    raise SerialmuxError(f"{action.name.lower()} is not an action")


async def _break(console: Console, hv: Hypervisor | None) -> str:
    """Send *console*'s VM a serial BREAK, by whatever can carry one; return the result."""
    name = console.name
    # Through QEMU when it can: a PTY has no BREAK to carry (tcsendbreak succeeds and
    # QEMU drops it), nor has a plain socket. chardev-send-break puts one on the UART
    # behind the chardev, if QMP names the chardev holding this port.
    spec = console.port.spec
    via_qemu = hv is not None and not spec.telnet and spec.kind is not PortKind.TTY
    if via_qemu:
        assert hv is not None
        chardev = await _chardev(console, hv)
        if chardev is not None:
            await hv.send_break(chardev)
            return f"BREAK sent to {name} (QMP chardev-send-break {chardev})"
        if spec.kind in _SOCKETS:
            if not console.up:
                raise SerialmuxError(f"{name}: BREAK not sent: the console is down")
            raise SerialmuxError(
                f"{name}: BREAK not sent: QEMU names no chardev on this port "
                f"({_SOCKETS[spec.kind]}); for Magic SysRq use ^] s KEY or 'sysrq KEY'")
    problem = await console.port.send_break()
    if problem:
        raise SerialmuxError(f"{name}: BREAK not sent: {problem}")
    if via_qemu:
        return (
            f"BREAK sent to {name} (tcsendbreak; QEMU names no chardev on this PTY, and "
            "a QEMU -serial pty drops it: for Magic SysRq use ^] s KEY or 'sysrq KEY')"
        )
    return f"BREAK sent to {name}"


#: Socket ports QMP can name a chardev for, and why it may not (shown when it does not).
_SOCKETS = {
    PortKind.UNIX: "no chardev listens on that path",
    PortKind.TCP: "no chardev is connected to our end",
    PortKind.LISTEN_UNIX: "no chardev dials that path",
}


async def _chardev(console: Console, hv: Hypervisor) -> str | None:
    """The QEMU chardev holding *console*'s port: a ``qmp:`` port's label, else the one
    QMP reports on the port's PTY or socket; None if QEMU names none (or it is down)."""
    port = console.port
    spec = port.spec
    if spec.kind is PortKind.QMP:
        return spec.path
    if not console.up:
        return None
    if spec.kind is PortKind.PTY:
        return await hv.chardev_of_pty(os.path.realpath(spec.path))
    if spec.kind in (PortKind.UNIX, PortKind.LISTEN_UNIX):
        return await hv.chardev_of_unix(spec.path)
    if spec.kind is PortKind.TCP:
        ours = port.local_address()
        return None if ours is None else await hv.chardev_of_peer(*ours)
    return None
