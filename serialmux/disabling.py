"""What is disabled, and why: the runtime record in ``disabled.json`` and the config's switches.

Two sources disable a console. At run time, ``disable`` (over SSH or the
control socket) disables one VM or all of them; :class:`Disabling` keeps
that record in ``state_dir/disabled.json`` across restarts, and a VM's entry
outlives its console: a discovered VM that stops, or a ``[vms.NAME]`` that a
reload removes, is still disabled when it comes back, and for ever if it never
does, until ``enable`` clears it. The configuration disables too:
``[server] enabled = false`` every VM, ``[vms.NAME] enabled = false`` one. It
comes first (it is the one to lift before a runtime entry, kept meanwhile,
matters again) and is never written to ``disabled.json``, which holds only
runtime disables: ``enable`` cannot lift it, and says which key in which file
still does. ``[server] enabled`` is read once, at start (:meth:`Disabling.load`):
a reload does not apply it (it needs a restart), so neither does a later
``disable`` or ``enable``. Nor does ``enable VM`` report a VM enabled while every
VM is still disabled, by that key or by a runtime disable of all VMs.

``Console.disabled`` is a copy of what is in force for that VM, set from here
whenever it may change (a console added, a disable or enable, a reload); a
disabled console refuses attaches and actions alike (:meth:`Disabling.refusal`).
A damaged ``disabled.json`` is logged, naming it, and read as empty: it never
stops the daemon. One that cannot be written (a full disk, a read-only state
dir) is logged too (``disabled_state_unsaved``), and the disable or enable stays
in force in memory, its sessions closed and audited; the reply says it will not
survive a restart.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from .access import Identity
from .commands import MAX_REASON, clean_text
from .config import Config
from .console import Console
from .errors import SerialmuxError
from .log import get_logger, utc_now

if TYPE_CHECKING:
    from .daemon import Daemon

log = get_logger(__name__)


class Disabling:
    """The daemon's disabled state: the runtime record, its file, and what is in force."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.all_vms: str | None = None  # in force: a runtime disable, or the config's
        self._runtime_all: str | None = None  # only a runtime disable: what disabled.json holds
        # The one record of disabled VMs (what disabled.json holds): name -> "REASON (by USER
        # at TIME)". Kept while a VM is absent; Console.disabled is set from it and the
        # config ([vms.NAME] enabled = false) by reason().
        self.vms: dict[str, str] = {}
        # [server] enabled as the daemon started with it: a reload does not apply it
        # (reload.plan_reload lists it as needing a restart), so nothing here reads the
        # live config's. Set again by load(), at start.
        self._server_enabled = daemon.config.server.enabled

    @property
    def path(self) -> Path:
        """Where the runtime disables are kept (``state_dir/disabled.json``)."""
        return self.daemon.state_dir / "disabled.json"

    def load(self) -> None:
        """Read disabled.json; a file that is not what :meth:`_save` writes is logged
        (naming it) and read as empty, so a damaged file never stops the daemon."""
        path = self.path
        self._server_enabled = self.daemon.config.server.enabled
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            data = {}
        except RecursionError:  # nested arrays or objects deeper than the parser recurses
            log.error("disabled_state_unreadable", path=str(path),
                      error="nested too deeply to parse",
                      hint="read as empty; the next disable or enable rewrites it")
            data = {}
        except (OSError, ValueError) as exc:
            log.error("disabled_state_unreadable", path=str(path), error=str(exc))
            data = {}
        if not isinstance(data, dict):
            log.error("disabled_state_unreadable", path=str(path),
                      error=f"the top level is {_json_kind(data)}, not an object",
                      hint="read as empty; the next disable or enable rewrites it")
            data = {}
        everything = data.get("all")
        if everything is not None and not isinstance(everything, str):
            log.error("disabled_state_unreadable", path=str(path),
                      error=f'"all" is {_json_kind(everything)}, not a string; ignored')
            everything = None
        self._runtime_all = everything or None
        vms = data.get("vms")
        self.vms = ({n: t for n, t in vms.items() if isinstance(t, str) and t}
                    if isinstance(vms, dict) else {})
        self._copy_all()

    def _copy_all(self) -> None:
        """Set :attr:`all_vms`: the runtime disable, else ``[server] enabled = false``'s
        (as at start: see :attr:`_server_enabled`)."""
        self.all_vms = self._runtime_all or (
            None if self._server_enabled else "disabled in the configuration")

    def _save(self) -> str:
        """Write the runtime disables to :attr:`path`, durably; never raises.

        Returns ``""`` once saved, else what to add to the reply: the state in
        memory stays in force (sessions are closed, the step audited) but will not
        survive a restart. The failure is logged as ``disabled_state_unsaved``.
        """
        # Only runtime disables: the configuration's are its own to lift.
        data = {"all": self._runtime_all, "vms": dict(sorted(self.vms.items()))}
        path = self.path
        tmp = path.with_suffix(".tmp")
        try:
            with open(tmp, "w") as f:
                f.write(json.dumps(data, indent=1))
                f.flush()
                os.fsync(f.fileno())  # the data is on disk before the rename points at it
            os.replace(tmp, path)
        except OSError as exc:
            log.error("disabled_state_unsaved", path=str(path), error=str(exc),
                      hint="in force until the daemon stops; lost on restart")
            with contextlib.suppress(OSError):
                tmp.unlink()
            return (f"; NOT saved to {path} ({exc.strerror or exc}): "
                    "it will not survive a restart")
        _fsync_dir(path.parent)
        return ""

    def refusal(self, console: Console) -> str | None:
        """Why attaching to *console* is refused now, or None."""
        if self.all_vms:
            return ("serialmux is disabled for all VMs: "
                    f"{clean_text(self.all_vms, 2 * MAX_REASON)}")
        if console.disabled:
            return (f"console {console.name} is disabled: "
                    f"{clean_text(console.disabled, 2 * MAX_REASON)}")
        return None

    def disable(self, vm: str | None, reason: str, who: Identity) -> str:
        """Disable one VM (or all), persist it, and close the sessions attached.

        A VM's entry in :attr:`vms` (and disabled.json) outlives its
        console: a discovered VM that stops, or a ``[vms.NAME]`` that a reload
        removes, is still disabled when it comes back, after a restart too,
        and for ever if it never does, until :meth:`enable` clears it.
        """
        reason = clean_text(reason)  # shown to every user refused, and in the ring
        text = f"{reason} (by {who.user} at {utc_now()})"
        if vm is None:
            self._runtime_all = text
            self._copy_all()
            targets = list(self.daemon.consoles.values())
        else:
            self.vms[vm] = text
            targets = self._copy(vm)
        unsaved = self._save()
        self.daemon.audit.event("disable", vm=vm or "*", user=who.user, session=who.session_id,
                                peer=who.peer, reason=reason, result="ok",
                                saved=False if unsaved else None)
        for console in targets:
            console.mark("ACTION", f"disabled by {who.user}: {reason}", user=who.user,
                         action="disable")
            console.close_all(f"console disabled by {who.user}: {reason}")
        return f"disabled {vm or 'all VMs'}: {reason}{unsaved}"

    def enable(self, vm: str | None, who: Identity) -> str:
        """Enable one VM (or all) again; a VM with no console now has its entry cleared too.

        ``enable`` (all) lifts only the all-VMs switch: VMs disabled one by one stay so.
        A disable by the configuration (``[server] enabled = false``, ``[vms.NAME]
        enabled = false``) is not lifted, nor (by ``enable VM``) a runtime disable of
        all VMs: the VM's runtime entry is cleared all the same, then
        :class:`SerialmuxError` says what still disables it and how to lift that.
        """
        # The consoles refused now: each one this lets in again gets a ring marker, as
        # disable() leaves one, so `serialmux logs` shows when the console came back.
        refused = [c for c in (self.daemon.consoles.values() if vm is None
                               else filter(None, [self.daemon.consoles.get(vm)]))
                   if self.refusal(c) is not None]
        if vm is None:
            self._runtime_all = None
            self._copy_all()
        else:
            self.vms.pop(vm, None)
            self._copy(vm)
        for console in refused:
            if self.refusal(console) is None:
                console.mark("ACTION", f"enabled by {who.user}", user=who.user, action="enable")
        unsaved = self._save()
        kept = self._still_disabled(vm)
        self.daemon.audit.event(
            "enable", vm=vm or "*", user=who.user, session=who.session_id, peer=who.peer,
            result="refused" if kept else "ok",
            reason="; ".join(why for why, _ in kept) or None,
            saved=False if unsaved else None)
        if kept:
            cleared = "Its runtime disable" if vm else "The runtime disable of all VMs"
            raise SerialmuxError(
                f"{vm or 'every VM'} stays disabled: " + "; and ".join(how for _, how in kept)
                + f". {cleared}, if any, was cleared{unsaved}.")
        return f"enabled {vm or 'all VMs'}{unsaved}"

    def _still_disabled(self, vm: str | None) -> list[tuple[str, str]]:
        """What still disables *vm* (None: every VM) once its runtime entry is cleared:
        (the audit's reason, the error's words naming what to change and where)."""
        where = self.daemon.config.path or "the configuration file"
        kept: list[tuple[str, str]] = []
        key = self._config_key(vm) if vm is not None else None
        if key is not None:
            kept.append((f"{key} = false in the configuration",
                         f"{key} = false in {where}; set it to true there, then run "
                         "'serialmux reload' (or systemctl reload serialmux)"))
        if not self._server_enabled:
            kept.append(("[server] enabled = false in the configuration",
                         f"[server] enabled = false in {where}"
                         + (" disables every VM" if vm is not None else "")
                         + "; set it to true there, then restart serialmux"))
        if vm is not None and self._runtime_all:
            kept.append(("a runtime disable of all VMs is in force",
                         "a runtime disable of all VMs is in force ("
                         f"{clean_text(self._runtime_all, 2 * MAX_REASON)}); lift it with "
                         "'serialmux enable' with no VM (or 'enable --all' over SSH)"))
        return kept

    def _config_key(self, vm: str) -> str | None:
        """The config key that disables *vm*, ``[vms.NAME] enabled``, or None."""
        entry = self.daemon.config.vms.get(vm)
        return f"[vms.{vm}] enabled" if entry is not None and not entry.enabled else None

    def reason(self, vm: str) -> str | None:
        """Why *vm* is disabled now (what its console shows), or None.

        The configuration's ``[vms.NAME] enabled = false`` comes first: it is the
        one to lift before a runtime entry (kept meanwhile) matters again.
        """
        key = self._config_key(vm)
        if key is not None:
            return f"disabled in the configuration ({key} = false)"
        return self.vms.get(vm)

    def apply_config(self, old: Config, names: Iterable[str], who: str) -> None:
        """After a reload: each console in *names* takes the disabled state the config says.

        A console the new configuration disables (``enabled = false``, or a static
        entry with it taking over a discovered VM) gets a ring marker and its
        sessions are told and closed, as :meth:`disable` does; one it enables
        again falls back to its runtime entry, if any.
        """
        for name in names:
            console = self.daemon.consoles.get(name)
            if console is None:
                continue
            before = old.vms.get(name)
            was = before is not None and not before.enabled
            self._copy(name)
            key = self._config_key(name)
            if was and key is None:  # enabled again by the configuration: say so, as enable does
                self.daemon.audit.event("enable", vm=name, user=who, result="ok",
                                        source="configuration")
                console.mark("ACTION", "enabled by a configuration reload" + (
                    f" (still disabled: {console.disabled})" if console.disabled else ""),
                    user=who, action="enable")
                continue
            if was or key is None:
                continue
            self.daemon.audit.event("disable", vm=name, user=who, reason=f"{key} = false",
                                    result="ok", source="configuration")
            console.mark("ACTION", f"disabled by a configuration reload: {key} = false",
                         user=who, action="disable")
            console.close_all(f"console disabled by a configuration reload: {key} = false")

    def _copy(self, vm: str) -> list[Console]:
        """Copy *vm*'s disabled state (:meth:`reason`) to its console; return it
        (none if absent)."""
        console = self.daemon.consoles.get(vm)
        if console is None:
            return []
        console.disabled = self.reason(vm)
        return [console]


def _fsync_dir(directory: Path) -> None:
    """Make a rename in *directory* durable; best effort (not every filesystem allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _json_kind(value: object) -> str:
    """What JSON *value* is, for a message: ``an array``, ``a string``, ``null`` ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    return "an object" if isinstance(value, dict) else "a number"
