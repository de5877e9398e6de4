"""Who is still let in: authenticated connections and running commands, re-checked on change.

An SSH connection authenticates once, but a revoked key or CA, a removed
user or grant must end what that authentication still allows (OpenSSH
``ControlMaster`` keeps one connection open for hours and opens channels on
it at will). :class:`Credential` records what authenticated a connection: a
plain key, or a certificate blob. :func:`credential_problem` (pure) says why
that credential would not be accepted under the current configuration, CAs
and revocation list. :class:`Connections` is the daemon's registry of
SSH connections and exec commands: a reload (or a changed revocation file)
calls :meth:`Connections.recheck`, every new channel calls
:meth:`Connections.problem`, and shutdown calls :meth:`Connections.close_all`.
:meth:`Connections.watch_revocations` (a daemon task) notices a changed
``revoked_keys`` file within :data:`REVOCATION_CHECK_INTERVAL` even when
nobody logs in, so the connections it now revokes are cut then.

Certificates are re-checked with :func:`serialmux.auth.check_certificate` at
the time the connection authenticated: validity (expiry) is checked once at
login, as sshd does; CA trust, revocation and the principal's user are
checked again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import asyncssh

from .access import Identity
from .auth import CertRefused, Revocations, check_certificate
from .config import Config, Role
from .log import get_logger

if TYPE_CHECKING:
    from .daemon import Daemon
    from .sshd import GatewayServer

log = get_logger(__name__)

# Seconds between two looks (a stat, in a worker thread) at the [ssh] revoked_keys file.
REVOCATION_CHECK_INTERVAL = 1.0


@dataclass(frozen=True, slots=True)
class Credential:
    """What authenticated a connection."""

    user: str
    public_data: bytes  # the plain key, or the key inside the certificate
    certificate: bytes | None = None  # the certificate blob, for certificate logins
    at: float = 0.0  # time.time() of the login: certificate validity is judged then


def credential_problem(cred: Credential, *, config: Config, cas: Mapping[bytes, str],
                       revoked: Revocations, peer_host: str) -> str | None:
    """Why *cred* would not log in as ``cred.user`` now, or None (it still would)."""
    if cred.user not in config.users:
        return f"user {cred.user} was removed from the configuration"
    if cred.certificate is not None:
        try:
            cert = check_certificate(cred.certificate, cas=cas, revoked=revoked,
                                     users=config.users, peer_host=peer_host, now=cred.at)
        except CertRefused as exc:
            return exc.reason
        if cert.user != cred.user:
            return f"the certificate now names user {cert.user}"
        return None
    problem = revoked.check_key(cred.public_data)
    if problem:
        return problem
    user = config.user_for_key(cred.public_data)
    if user is None or user.name != cred.user:
        return "the key you logged in with was removed from the configuration"
    entry = next(k for k in user.keys if k.public_data == cred.public_data)
    if not entry.allows_from(peer_host):
        return "the key you logged in with is no longer allowed from this address"
    return None


@dataclass(eq=False)
class Exec:
    """A running exec command (``logs -f``, ``status``...), cut when its grant goes."""

    identity: Identity
    vm: str
    process: asyncssh.SSHServerProcess[bytes]
    needs: Role = Role.READER
    cut_reason: str | None = None
    _timeout: asyncio.Timeout | None = field(default=None, repr=False)

    def cut(self, text: str) -> None:
        """Tell the client *text* on stderr and end the command (its task is cancelled)."""
        if self.cut_reason is not None:
            return
        self.cut_reason = text
        with contextlib.suppress(OSError, asyncssh.Error):
            self.process.stderr.write(f"serialmux: {text}\n".encode())
        if self._timeout is not None:
            # Expire the command's own timeout now: asyncio cancels it and turns the
            # cancellation into TimeoutError at its ``async with`` only, nowhere else.
            self._timeout.reschedule(asyncio.get_running_loop().time())


class Connections:
    """The daemon's open SSH connections (from admission) and its running exec commands."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self.servers: set[GatewayServer] = set()
        self.execs: set[Exec] = set()
        self._none_left = asyncio.Event()
        self._none_left.set()

    # -- registry ------------------------------------------------------------------

    def opened(self, server: GatewayServer) -> None:
        """A connection was admitted (``connection_made``)."""
        self.servers.add(server)
        self._none_left.clear()

    def closed(self, server: GatewayServer) -> None:
        """A connection is gone (``connection_lost``)."""
        self.servers.discard(server)
        if not self.servers:
            self._none_left.set()

    async def wait_none_left(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait (bounded) until every connection has closed; False if some are still open."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._none_left.wait()
        return self._none_left.is_set()

    @contextlib.asynccontextmanager
    async def running(self, identity: Identity, vm: str,
                      process: asyncssh.SSHServerProcess[bytes]) -> AsyncIterator[Exec]:
        """Register an exec command for its duration; a cut ends the body early (no exception)."""
        entry = Exec(identity, vm, process)
        self.execs.add(entry)
        try:
            async with asyncio.timeout(None) as timeout:
                entry._timeout = timeout
                yield entry
        except TimeoutError:
            if entry.cut_reason is None or not timeout.expired():
                raise  # the command's own timeout, not a cut
        finally:
            self.execs.discard(entry)

    async def watch_revocations(self) -> None:
        """Run until cancelled: re-read ``revoked_keys`` whenever it changes.

        A stat every :data:`REVOCATION_CHECK_INTERVAL` seconds, in a worker thread;
        when the file changed, :meth:`Revocations.refresh` reads it, and new contents
        call the daemon's ``on_change`` (:meth:`recheck`): connections it now revokes
        are told, audited (``access_revoked``) and disconnected. The daemon's
        ``revoked`` is looked up each time, since a reload may replace it.
        """
        while True:
            await asyncio.sleep(REVOCATION_CHECK_INTERVAL)
            revoked = self._daemon.revoked
            if revoked.path is None:
                continue
            stamp = await asyncio.to_thread(revoked.stamp)
            if revoked.stale(stamp):
                revoked.refresh()

    # -- checks --------------------------------------------------------------------

    def problem(self, server: GatewayServer) -> str | None:
        """Why *server*'s login would be refused under the current config, or None."""
        cred = server.credential
        if cred is None or (server.identity is not None and server.identity.local):
            return None
        daemon = self._daemon
        return credential_problem(cred, config=daemon.config, cas=daemon.user_cas,
                                  revoked=daemon.revoked, peer_host=server.peer_host)

    def cut(self, server: GatewayServer, reason: str, *, trigger: str) -> None:
        """Tell *server*'s sessions and commands *reason*, audit it, then disconnect."""
        daemon = self._daemon
        ident = server.identity
        daemon.audit.event("access_revoked", session=server.session_id, peer=server.peer,
                           user=ident.user if ident else None,
                           fingerprint=ident.fingerprint if ident else None,
                           key_id=ident.key_id if ident else None,
                           serial=ident.serial if ident else None, trigger=trigger,
                           reason=reason, result="disconnected")
        text = f"disconnected: {reason} ({trigger})"
        self.tell(server.session_id, text)
        server.close(text)
        self.closed(server)  # gone for every later check, before connection_lost arrives

    def tell(self, session_id: str, text: str) -> None:
        """Close the console sessions and exec commands of connection *session_id* with *text*."""
        for session in list(self._daemon.sessions):
            if session.identity.session_id == session_id:
                session.att.on_closed(text)
        for entry in list(self.execs):
            if entry.identity.session_id == session_id:
                entry.cut(text)

    def recheck(self, trigger: str) -> set[str]:
        """Disconnect every connection whose credential is no longer accepted; return their ids."""
        cut: set[str] = set()
        for server in list(self.servers):
            if not server.authenticated:
                continue
            reason = self.problem(server)
            if reason is not None:
                cut.add(server.session_id)
                self.cut(server, reason, trigger=trigger)
        return cut

    def recheck_grants(self, config: Config, trigger: str) -> int:
        """End exec commands whose user no longer has a grant on their VM; return how many."""
        ended = 0
        for entry in list(self.execs):
            if entry.identity.local or entry.cut_reason is not None:
                continue
            role = config.role_for(entry.identity.user, entry.vm)
            if role is None or role < entry.needs or entry.vm not in self._daemon.consoles:
                ended += 1
                reason = (f"your grant on {entry.vm} was removed" if role is None
                          else f"VM {entry.vm} was removed" if role >= entry.needs
                          else f"your grant on {entry.vm} no longer allows this")
                self._daemon.audit.event(
                    "reload_disconnect", vm=entry.vm, user=entry.identity.user,
                    session=entry.identity.session_id, peer=entry.identity.peer,
                    command=entry.process.command, reason=reason, result="ok")
                entry.cut(f"disconnected: {reason} ({trigger})")
        return ended

    def end_commands(self, text: str) -> None:
        """Shutdown: tell every exec command *text* and end it."""
        for entry in list(self.execs):
            entry.cut(text)

    def close_all(self, text: str) -> None:
        """Shutdown: end every command, then disconnect every connection with *text*."""
        self.end_commands(text)
        for server in list(self.servers):
            server.close(text)
