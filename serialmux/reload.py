"""Reload: re-read the config file, diff it against the running one, apply it in place.

:func:`plan_reload` is pure: it compares two :class:`~serialmux.config.Config`
values and says which consoles to add, remove, reopen or update, and which
settings only a restart can change. :func:`reload_daemon` runs on SIGHUP
(``systemctl reload``) and on ``serialmux reload``, and returns a
:class:`ReloadResult` (the control socket's reply: what was rejected, and what
was left out): a config with errors is
rejected with every error logged and the running one stays; otherwise the user
CAs and revocation list are rebuilt from it. Access goes first: every open SSH
connection's key or certificate is checked again (:mod:`serialmux.connections`:
those no longer accepted are disconnected), then every remaining session and
exec command against the new grants, and a ``[vms.NAME] enabled`` that turns
false closes that console's sessions
(:meth:`~serialmux.disabling.Disabling.apply_config`). Then the plan is applied
(a changed ``redact`` gets a new redactor; a changed ``[server] redact``
applies to discovered consoles too): its steps wait on ports and disks, each
bounded, and access never waits for them. Before those steps, the SSH listeners take
the new host keys and ``[ssh]`` login and keepalive settings for the connections
they accept from then on, and listen on the new ``[server] listen`` addresses only
(:class:`~serialmux.sshd.Listeners`): whole or not at all, and a key or an address
that fails keeps them as they were without holding back the rest of the reload.

What reload leaves alone: a console whose ``[vms.NAME]`` did not change keeps
its port, ring and sessions untouched (not a byte is lost or repeated). A
``[vms.NAME]`` added for a discovered VM takes its console over, and one
removed while NAME's files are in the discovery directory hands the console
back to discovery (reopened, sessions kept) instead of removing it. Disabled
VMs stay disabled across both, and across removal and return
(:meth:`~serialmux.disabling.Disabling.disable`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .access import Identity
from .auth import Revocations, load_cas
from .config import Config, ConfigErrors, Role, VMConfig, load_config
from .errors import ConfigError
from .log import get_logger
from .redact import Redactor
from .sshd import ListenerError, Listeners, PendingListeners

if TYPE_CHECKING:
    from .console import Console
    from .daemon import Daemon

log = get_logger(__name__)

# VMConfig fields that need the port (or QMP connection, or ring) opened again.
_REOPEN_FIELDS = ("port", "baud", "qmp", "ring_size")


@dataclass
class Plan:
    """What a reload changes."""

    added: list[VMConfig] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    reopened: list[VMConfig] = field(default_factory=list)
    updated: list[VMConfig] = field(default_factory=list)  # same port: swapped in place
    restart_needed: list[str] = field(default_factory=list)  # setting names

    def describe(self) -> str:
        """A one-line summary for logs and the audit trail."""
        parts = [f"{len(self.added)} added", f"{len(self.removed)} removed",
                 f"{len(self.reopened)} reopened", f"{len(self.updated)} updated"]
        return ", ".join(parts)


@dataclass
class ReloadResult:
    """What a reload did, for whoever asked (``serialmux reload``); true unless rejected.

    A rejected reload (*errors*: the config has errors; the running one stays)
    applied nothing. An applied one may still have left out what was asked:
    *listeners_kept* says why the SSH listeners stayed as they were, and
    *restart_needed* names the settings that change only on a restart.
    """

    applied: bool
    path: str | None = None
    errors: list[str] = field(default_factory=list)
    listeners_kept: str | None = None
    restart_needed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # applied, but the operator must act

    def __bool__(self) -> bool:
        return self.applied


def plan_reload(old: Config, new: Config) -> Plan:
    """Compare the static VMs and server settings of *old* and *new*."""
    plan = Plan()
    for name, vm in new.vms.items():
        before = old.vms.get(name)
        if before is None:
            plan.added.append(vm)
        elif any(getattr(before, f) != getattr(vm, f) for f in _REOPEN_FIELDS):
            plan.reopened.append(vm)
        elif before != vm:
            plan.updated.append(vm)
    plan.removed = [name for name in old.vms if name not in new.vms]
    plan.restart_needed = restart_needed(old, new)
    return plan


def restart_needed(started: Config, new: Config) -> list[str]:
    """The settings of *new* that differ from *started*'s and only a restart applies.

    The daemon compares with the config it started with, not the last one
    reloaded: a change is pending until the restart, and one reverted is not.
    """
    names = [f"server.{name}" for name in ("state_dir", "runtime_dir", "audit_file", "enabled")
             if getattr(started.server, name) != getattr(new.server, name)]
    return names + (["discovery"] if started.discovery != new.discovery else [])


def access_lost(config: Config, identity: Identity, vm: str, writer: bool) -> str | None:
    """Why *identity* may no longer hold its session on *vm* under *config*, or None."""
    if identity.local:
        return None  # local root/admins are not configured users
    user = config.users.get(identity.user)
    if user is None:
        return f"user {identity.user} was removed from the configuration"
    if identity.key_id is None and identity.fingerprint not in {k.fingerprint for k in user.keys}:
        return "the key you logged in with was removed from the configuration"
    role = config.role_for(identity.user, vm)
    if role is None:
        return f"your grant on {vm} was removed"
    if writer and role < Role.CONTRIBUTOR:
        return f"your grant on {vm} no longer allows typing"
    return None


def _new_redactor(console: Console, vm: VMConfig) -> None:
    """Apply *vm*'s redact rules to output from now on; held-back output goes out first."""
    console.flush_redacted()  # it was read under the old rules
    console.redactor = Redactor(vm.redact) if vm.redact else None


async def reload_daemon(daemon: Daemon, who: str) -> ReloadResult:
    """Re-read ``daemon.config.path`` and apply it; say what was rejected or left out.

    Runs under ``daemon.changes`` (the caller holds it), so reloads and
    discovery never interleave.
    """
    notifier = daemon.notifier
    notifier.reloading()
    path = daemon.config.path
    if path is None:
        log.error("reload_impossible", reason="the configuration was not read from a file")
        notifier.ready(daemon.summary())
        return ReloadResult(False, errors=["the configuration was not read from a file"])
    log.info("reloading", path=str(path), by=who)
    try:
        new = await asyncio.to_thread(load_config, path)
        # The trust roots follow the file too: a removed CA, a new revoked_keys path or a
        # changed CA file take effect now (read before anything changes: all or nothing).
        cas = await asyncio.to_thread(load_cas, new.ssh.user_ca_keys)
    except ConfigError as exc:
        errors = exc.errors if isinstance(exc, ConfigErrors) else [exc]
        for error in errors:
            log.error("reload_config_error", path=str(path), error=str(error))
        daemon.audit.event("reload", user=who, path=str(path), result="failed",
                           reason=f"{'; '.join(str(e) for e in errors)}; old config kept")
        notifier.ready(f"{daemon.summary()}; reload rejected ({len(errors)} errors), "
                       "running the previous config")
        return ReloadResult(False, str(path), errors=[str(e) for e in errors])
    # The listeners change whole or not at all, and never hold the rest back: a removed
    # user must go even if a new address cannot be bound.
    listening: PendingListeners | None = None
    kept = None
    try:
        listening = await daemon.listeners.prepare(new)
    except ListenerError as exc:
        kept = str(exc)
        log.error("reload_listeners_kept", reason=kept)
    try:
        plan = await _apply(daemon, new, cas, who, listening,
                            None if kept is None else f"kept as they were: {kept}")
        problems = [] if daemon.revoked.error is None else [
            f"[ssh] revoked_keys is unusable, so every key and certificate is refused (and "
            f"the connections open were cut): {daemon.revoked.error}"]
        return ReloadResult(True, str(path), listeners_kept=kept,
                            restart_needed=plan.restart_needed, problems=problems)
    finally:
        if listening is not None:
            Listeners.abort(listening)  # if the reload ended early: nothing left listening


async def _apply(daemon: Daemon, new: Config, cas: dict[bytes, str], who: str,
                 listening: PendingListeners | None, listeners: str | None) -> Plan:
    """Apply a loaded config (the second half of :func:`reload_daemon`); return its plan."""
    notifier = daemon.notifier
    path = new.path
    plan = plan_reload(daemon.config, new)
    plan.restart_needed = restart_needed(daemon.config_at_start, new)
    old = daemon.config
    daemon.config = new
    daemon.user_cas = cas
    if new.ssh.revoked_keys != old.ssh.revoked_keys:
        daemon.revoked = daemon.watch_revocations(Revocations(new.ssh.revoked_keys))
    else:
        daemon.revoked.refresh()
    # Who may no longer be here, and consoles the new config disables, first: the steps
    # below wait on ports and disks (each bounded), and access must not wait for them.
    # Connections first (a whole login no longer accepted), then single sessions and commands.
    cut = daemon.connections.recheck("configuration reloaded")
    kicked = len(cut)
    for session in list(daemon.sessions):
        if session.identity.session_id in cut:
            continue  # told with its connection
        reason = access_lost(new, session.identity, session.console.name, session.att.writer)
        if reason is not None:
            kicked += 1
            daemon.audit.event("reload_disconnect", vm=session.console.name,
                               user=session.identity.user, session=session.identity.session_id,
                               peer=session.identity.peer, reason=reason, result="ok")
            session.att.on_closed(f"disconnected: {reason} (configuration reloaded)")
    kicked += daemon.connections.recheck_grants(new, "configuration reloaded")
    daemon.disabling.apply_config(old, [vm.name for vm in plan.reopened + plan.updated], who)
    # The listeners next, before anything waits (a shutdown that began meanwhile has
    # closed them all: what prepare() bound is then closed too, by the caller).
    if listening is not None and not daemon.stopping:
        changes = daemon.listeners.commit(listening)  # new connections get the new keys
        listeners = "; ".join(changes) or "new host keys and [ssh] settings for new connections"
        for change in changes:
            log.info("reload_listen", change=change)
    for name in plan.removed:
        if name not in daemon.consoles:
            continue
        found = (await daemon.discovery.static_removed(name)
                 if daemon.discovery is not None else None)
        if found is None:
            await daemon.remove_console(name, f"VM {name} was removed from the configuration")
        elif old.vms[name].redact != found.redact:
            _new_redactor(daemon.consoles[name], found)
    for vm in plan.reopened:
        await daemon.reopen_console(vm)
    for vm in plan.added:
        if vm.name in daemon.consoles:  # was discovered; the static entry wins
            if daemon.discovery is not None:
                daemon.discovery.static_added(vm.name)
            discovered = daemon.consoles[vm.name].vm
            await daemon.reopen_console(vm)
            if discovered.redact != vm.redact:
                _new_redactor(daemon.consoles[vm.name], vm)
        else:
            await daemon.add_console(vm, "console added by a configuration reload")
    for vm in plan.updated:
        daemon.consoles[vm.name].use_config(vm)
    for vm in plan.reopened + plan.updated:
        before = old.vms.get(vm.name)
        if before is not None and before.redact != vm.redact:
            _new_redactor(daemon.consoles[vm.name], vm)
    if daemon.discovery is not None and old.server.redact != new.server.redact:
        for vm in daemon.discovery.server_redact_changed():
            _new_redactor(daemon.consoles[vm.name], vm)
    # [vms.NAME] enabled on the consoles added or handed back to discovery meanwhile.
    daemon.disabling.apply_config(old, [vm.name for vm in plan.added] + plan.removed, who)
    for setting in plan.restart_needed:
        log.warning("reload_needs_restart", setting=setting,
                    hint="this setting takes effect when serialmux restarts")
    daemon.audit.event("reload", user=who, path=str(path), result="ok",
                       changes=plan.describe(), listeners=listeners, disconnected=kicked,
                       restart_needed=",".join(plan.restart_needed) or None)
    log.info("reloaded", changes=plan.describe(), disconnected=kicked)
    notifier.ready(daemon.summary())
    daemon.status_changed()
    return plan
