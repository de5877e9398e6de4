"""The SSH front: asyncssh server with hardened options and our own auth callbacks.

What asyncssh allows unless told otherwise is turned off here (see
``shared/notes/asyncssh-facts.md``): only public-key authentication (and
certificates from configured CAs), no password, keyboard-interactive,
host-based or GSS; no agent or X11 forwarding, no TCP/UNIX forwarding, no
SCP or SFTP; raw bytes (``encoding=None``, ``line_editor=False``); modern
algorithm lists pinned. Failed keys are counted per connection (OpenSSH
``MaxAuthTries``) because asyncssh does not; new connections pass
:class:`serialmux.auth.Gate` (MaxStartups, per-source caps and penalties)
before the handshake, and certificates are checked by
:func:`serialmux.auth.check_certificate` (principal = serialmux user).

Identity comes from the key that authenticated, never from the login name:
:meth:`GatewayServer.validate_public_key` finds the configured user of a
key, :meth:`GatewayServer.auth_completed` binds it once the signature has been
verified, and the session reads it back with :func:`server_of`. At most
``[ssh] max_sessions`` session channels are open per connection (OpenSSH
``MaxSessions``). Refused requests of an authenticated connection
(forwarding of any kind, a subsystem asyncssh itself refuses such as
``sftp``, a session past MaxSessions) are audited as ``refused`` with the
user, the login's VM and what was asked (``request``, ``target``).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncssh

from .access import Identity
from .auth import CertRefused, check_certificate, is_certificate
from .configtypes import check_name
from .connections import Credential
from .errors import ConfigError, SerialmuxError
from .keys import normalise_address
from .log import get_logger

if TYPE_CHECKING:
    from .config import Config
    from .configtypes import Listen
    from .daemon import Daemon

log = get_logger(__name__)

# No NIST-curve ECDH: ssh-audit fails it (curve provenance); every OpenSSH since 6.5 has curve25519.
KEX_ALGS = ["mlkem768x25519-sha256", "curve25519-sha256", "curve25519-sha256@libssh.org",
            "diffie-hellman-group16-sha512", "diffie-hellman-group18-sha512"]
ENCRYPTION_ALGS = ["chacha20-poly1305@openssh.com", "aes256-gcm@openssh.com",
                   "aes128-gcm@openssh.com", "aes256-ctr", "aes128-ctr"]
MAC_ALGS = ["hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com",
            "umac-128-etm@openssh.com"]
_MSG_IGNORE = 2
_EMPTY_STRING = b"\0\0\0\0"

SIG_ALGS = ["ssh-ed25519", "sk-ssh-ed25519@openssh.com", "ecdsa-sha2-nistp256",
            "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "sk-ecdsa-sha2-nistp256@openssh.com",
            "rsa-sha2-512", "rsa-sha2-256"]


def ensure_host_key(path: Path) -> asyncssh.SSHKey:
    """Load the host key at *path*, creating an ed25519 key (0600) if it is missing."""
    if not path.exists():
        path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        key = asyncssh.generate_private_key("ssh-ed25519", comment="serialmux host key")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.export_private_key())
        path.with_name(path.name + ".pub").write_bytes(key.export_public_key())
        log.info("host_key_created", path=str(path), fingerprint=key.get_fingerprint())
        return key
    try:
        return asyncssh.read_private_key(str(path))
    except (OSError, asyncssh.KeyImportError) as exc:
        raise ConfigError(f"cannot load host key: {exc}", path=str(path),
                          key="server.host_keys") from exc


def _without_cbc_ignores(send_packet: Callable[..., None]) -> Callable[..., None]:
    """Wrap a connection's ``send_packet`` to drop asyncssh's empty ``MSG_IGNORE`` packets.

    asyncssh sends an empty ``SSH_MSG_IGNORE`` before every packet once
    encryption is on: the CBC-mode countermeasure of RFC 4251 section 9.3.1
    (it makes the next CBC IV unpredictable). serialmux offers no CBC cipher
    (AEAD, or CTR with encrypt-then-MAC only, see :data:`ENCRYPTION_ALGS`), so
    those packets protect nothing here, and they doubled the packets, the
    encryptions and the ``write`` calls of every console chunk and echo. An
    empty ignore right before a real packet hides neither timing nor size.
    """

    def send(pkttype: int, *args: bytes, handler: Any = None) -> None:
        if pkttype == _MSG_IGNORE and args == (_EMPTY_STRING,):
            return
        send_packet(pkttype, *args, handler=handler)

    return send


class GatewayServer(asyncssh.SSHServer):
    """Per-connection callbacks: called by asyncssh in the event loop, in protocol order."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self._conn: asyncssh.SSHServerConnection | None = None
        self.session_id = secrets.token_hex(6)
        self.peer = "?"
        self.identity: Identity | None = None
        # The user of the key last offered; bound to identity only in auth_completed,
        # after asyncssh verified the signature (an unsigned probe proves nothing).
        self._candidate: Identity | None = None
        self.sessions = 0  # session channels open on this connection
        self.failures = 0
        self.writable = asyncio.Event()
        self.writable.set()
        self.admitted = False  # counted by daemon.gate until authenticated or closed
        self.authenticated = False
        # What authenticated (key or certificate): re-checked on reload and every channel.
        self.credential: Credential | None = None

    # -- connection ------------------------------------------------------------

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        """A TCP connection arrived; the SSH handshake has not started."""
        self._conn = conn
        peer = conn.get_extra_info("peername") or ("?", 0)
        host = normalise_address(peer[0])
        self.peer = f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
        # asyncssh ignores the transport's flow control ("do nothing for now"),
        # so a client that stops reading TCP would let its transport buffer
        # grow without bound. Hook the callbacks so session pumps can wait.
        conn.pause_writing = self.writable.clear  # type: ignore[method-assign]
        conn.resume_writing = self.writable.set  # type: ignore[method-assign]
        conn.send_packet = _without_cbc_ignores(conn.send_packet)  # type: ignore[method-assign]
        # MaxStartups / PerSourceMaxStartups / PerSourcePenalties, before the handshake.
        gate = self._daemon.gate
        gate.settings = self._daemon.config.ssh  # follow a reload
        drop = gate.admit(host)
        if drop is not None:
            self._daemon.audit.event("connection_refused", session=self.session_id,
                                     peer=self.peer, reason=drop, result="dropped")
            asyncio.get_running_loop().call_soon(conn.abort)
            return
        self.admitted = True
        self._daemon.connections.opened(self)
        # asyncssh checks a certificate's principals against the login name,
        # which here is the VM, so certificates are validated by serialmux.auth
        # instead: replace this connection's certificate check (the one hook
        # that sees the raw blob, before asyncssh verifies the signature).
        conn._validate_client_certificate = self._validate_certificate  # type: ignore[method-assign]
        conn.validate_public_key = self._count_bad_signatures(  # type: ignore[method-assign, assignment]
            conn.validate_public_key)
        limited = self._limit_sessions(conn._process_session_open)
        conn._process_session_open = limited  # type: ignore[method-assign, assignment]
        self._daemon.audit.event("connect", session=self.session_id, peer=self.peer)

    def _count_bad_signatures(self, validate: Callable[..., Awaitable[bool]]
                              ) -> Callable[..., Awaitable[bool]]:
        """Wrap asyncssh's key check so an accepted key with a bad signature is a failure.

        A refused key is counted where it is refused; a key we accept whose
        signed request then fails verification (someone who has the public key
        but not the private one) is counted here, towards MaxAuthTries and the
        source's penalty, as sshd does.
        """

        async def validated(username: str, key_data: bytes, msg: bytes,
                            signature: bytes) -> bool:
            self._candidate = None  # set again by the check if it accepts the key
            ok = await validate(username, key_data, msg, signature)
            accepted = self._candidate
            if msg and not ok and accepted is not None:
                self._auth_failed(username, accepted.fingerprint, "bad signature",
                                  key_id=accepted.key_id, serial=accepted.serial)
            return ok

        return validated

    def _limit_sessions(self, open_session: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """Wrap asyncssh's session-open handler with MaxSessions (it opens all it is asked)."""

        def limited_open(packet: Any) -> Any:
            limit = self._daemon.config.ssh.max_sessions
            if self.sessions >= limit:
                self.refused(f"MaxSessions: {limit} sessions open", request="session")
                raise asyncssh.ChannelOpenError(
                    asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                    f"at most {limit} sessions per connection (max_sessions); close one, or "
                    "open another connection")
            chan, session = open_session(packet)
            self.sessions += 1
            session.subsystem_requested = self._audit_subsystems(session.subsystem_requested)
            lost = session.connection_lost

            def session_closed(exc: Exception | None) -> None:
                self.sessions -= 1
                lost(exc)

            session.connection_lost = session_closed
            return chan, session

        return limited_open

    def _audit_subsystems(self, requested: Callable[[str], bool]) -> Callable[[str], bool]:
        """Wrap a session's subsystem check so a subsystem asyncssh refuses is audited.

        asyncssh answers ``sftp`` itself (no SFTP server is configured) and never
        reaches serialmux; any other name is handed to the session, which refuses
        every one but ``console`` and audits it there.
        """

        def subsystem_requested(subsystem: str) -> bool:
            ok = requested(subsystem)
            if not ok:
                self.refused(f"subsystem {subsystem!r} is not offered", request="subsystem",
                             target=subsystem)
            return ok

        return subsystem_requested

    @property
    def login_vm(self) -> str | None:
        """The VM the login name selects (``web-01`` of ``web-01+ro``), once known and valid."""
        username = self._conn.get_extra_info("username") if self._conn is not None else None
        vm = str(username or "").split("+", 1)[0]
        return vm if vm and check_name(vm) else None

    def refused(self, reason: str, **asked: object) -> None:
        """Audit a request of this connection that was refused (``refused``, who and where)."""
        self._daemon.audit.event("refused", session=self.session_id, peer=self.peer,
                                 user=self.identity.user if self.identity else None,
                                 vm=self.login_vm, reason=reason, **asked)

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection closed (cleanly or not)."""
        self.writable.set()
        if not self.admitted:
            return
        self._daemon.connections.closed(self)
        self._daemon.gate.closed(self.peer_host, was_authenticated=self.authenticated,
                                 failed=self.failures > 0)
        self._daemon.audit.event(
            "disconnect", session=self.session_id, peer=self.peer,
            user=self.identity.user if self.identity else None,
            reason=str(exc) if exc else None)

    # -- authentication ---------------------------------------------------------

    def begin_auth(self, username: str) -> bool:
        """Authentication is always required; the login name is only the VM selector."""
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def host_based_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        """Return whether *key* belongs to a configured user (allowed from this address).

        asyncssh calls this twice for an accepted key (probe, then signature);
        a refused key is offered once, so each refusal counts as one failure.
        """
        config = self._daemon.config
        fingerprint = key.get_fingerprint("sha256")
        user = config.user_for_key(key.public_data)
        revoked = self._daemon.revoked.check_key(key.public_data)
        if revoked:
            self._auth_failed(username, fingerprint, revoked)
            return False
        if user is not None:
            entry = next(k for k in user.keys if k.public_data == key.public_data)
            if entry.allows_from(self.peer_host):
                self._candidate = Identity(
                    user=user.name, fingerprint=fingerprint, peer=self.peer,
                    session_id=self.session_id)
                self.credential = Credential(user.name, key.public_data, at=time.time())
                return True
            reason = "key not allowed from this address (from=)"
        else:
            reason = "unknown key"
        self._auth_failed(username, fingerprint, reason)
        return False

    @property
    def peer_host(self) -> str:
        """The peer's address without the port."""
        return self.peer.rsplit(":", 1)[0].strip("[]")

    def _auth_failed(self, username: str, fingerprint: str | None, reason: str, *,
                     key_id: str | None = None, serial: int | None = None) -> None:
        self.failures += 1
        self._daemon.audit.event("auth_failure", session=self.session_id, peer=self.peer,
                                 login=username, fingerprint=fingerprint, key_id=key_id,
                                 serial=serial, reason=reason, result="refused",
                                 attempt=self.failures)
        limit = self._daemon.config.ssh.max_auth_tries
        if self.failures >= limit and self._conn is not None:
            conn = self._conn
            self._daemon.audit.event("auth_limit", session=self.session_id, peer=self.peer,
                                     reason=f"{self.failures} failed keys", result="disconnected")
            asyncio.get_running_loop().call_soon(
                conn.disconnect, asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE,
                "Too many authentication failures")

    async def _validate_certificate(self, username: str,
                                    key_data: bytes) -> asyncssh.SSHKey | None:
        """Replace asyncssh's certificate check: return the certified key, or None.

        Runs for every public-key request; a plain key is left to
        :meth:`validate_public_key` (None here, asyncssh then tries it as a key).
        """
        if not is_certificate(key_data):
            return None
        daemon = self._daemon
        try:
            cert = check_certificate(key_data, cas=daemon.user_cas, revoked=daemon.revoked,
                                     users=daemon.config.users, peer_host=self.peer_host)
        except CertRefused as exc:
            self._auth_failed(username, None, exc.reason, key_id=exc.key_id, serial=exc.serial)
            return None
        # asyncssh's own check sets this on the certified key, and a FIDO key's verify()
        # honours it: without it, a signature with the user-presence flag clear (no
        # touch) would verify. Plain keys get it from asyncssh (always required: keys.py
        # refuses the no-touch-required option).
        cert.key.set_touch_required(cert.touch_required)
        self._candidate = Identity(
            user=cert.user, fingerprint=cert.fingerprint, peer=self.peer,
            session_id=self.session_id, key_id=cert.key_id, serial=cert.serial)
        self.credential = Credential(cert.user, cert.key.public_data, certificate=key_data,
                                     at=time.time())
        return cert.key

    def auth_completed(self) -> None:
        """Authentication succeeded: bind and audit who it was.

        asyncssh validates the signed request last, right before success, so
        the last candidate is the key whose signature was verified.
        """
        ident = self.identity = self._candidate
        self.authenticated = True
        if self.admitted:
            self._daemon.gate.authenticated(self.peer_host)
        self._daemon.audit.event(
            "auth_success", session=self.session_id, peer=self.peer,
            user=ident.user if ident else None,
            fingerprint=ident.fingerprint if ident else None,
            key_id=ident.key_id if ident else None, serial=ident.serial if ident else None,
            result="ok")
        if self._daemon.stopping:
            self.close("serialmux is shutting down")

    def close(self, text: str) -> None:
        """Disconnect with *text* as the reason (reload revoked it, shutdown); idempotent."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.disconnect(asyncssh.DISC_BY_APPLICATION, text)

    # -- forwarding: never offered; each request is refused and audited ---------------

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                             orig_port: int) -> bool:
        """A ``direct-tcpip`` channel (``ssh -L``, ``-W``, ``-J``): refused."""
        self.refused("TCP forwarding is not offered", request="direct-tcpip",
                     target=f"{dest_host}:{dest_port}")
        return False

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        """A ``tcpip-forward`` request (``ssh -R``): refused."""
        self.refused("TCP forwarding is not offered", request="tcpip-forward",
                     target=f"{listen_host}:{listen_port}")
        return False

    def unix_connection_requested(self, dest_path: str) -> bool:
        """A ``direct-streamlocal@openssh.com`` channel (``ssh -L`` to a socket): refused."""
        self.refused("UNIX socket forwarding is not offered",
                     request="direct-streamlocal@openssh.com", target=dest_path)
        return False

    def unix_server_requested(self, listen_path: str) -> bool:
        """A ``streamlocal-forward@openssh.com`` request (``ssh -R`` of a socket): refused."""
        self.refused("UNIX socket forwarding is not offered",
                     request="streamlocal-forward@openssh.com", target=listen_path)
        return False


def server_of(process: asyncssh.SSHServerProcess[bytes]) -> GatewayServer:
    """Return the :class:`GatewayServer` of the connection carrying *process*."""
    conn = process.get_extra_info("connection")
    owner = conn.get_owner()
    assert isinstance(owner, GatewayServer)
    return owner


class ListenerError(SerialmuxError):
    """The listeners cannot take a new configuration; they stay as they are."""


class Listeners:
    """The SSH listeners: one acceptor per ``[server] listen`` address, kept in step by reload.

    A reload changes them in two steps, so that they change whole or not at all:
    :meth:`prepare` loads the new host keys, checks them with the new options as asyncssh
    will use them, and binds the added addresses; it raises :class:`ListenerError`
    (having closed what it bound) when any of that fails. :meth:`commit` then hands the
    new keys and SSH options to every acceptor (they apply to connections accepted from
    then on; asyncssh's ``SSHAcceptor.update``) and stops listening on the removed
    addresses. Connections already made keep what they were made with, as with sshd.
    """

    def __init__(self, daemon: Daemon,
                 handler: Callable[[asyncssh.SSHServerProcess[bytes]], Awaitable[None]]) -> None:
        self._daemon = daemon
        self._handler = handler
        self._by_listen: dict[Listen, asyncssh.SSHAcceptor] = {}

    @property
    def acceptors(self) -> list[asyncssh.SSHAcceptor]:
        """Every acceptor, in ``listen`` order."""
        return list(self._by_listen.values())

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Every bound (host, port), in ``listen`` order (a port 0 resolved)."""
        return [sock.getsockname()[:2] for a in self._by_listen.values() for sock in a.sockets]

    async def start(self, config: Config) -> None:
        """Bind every configured listen address; return when all are listening."""
        keys = [ensure_host_key(p) for p in config.server.host_keys]
        try:
            _check_options(config, self._handler, keys)
        except ListenerError as exc:
            raise ConfigError(str(exc), key="server.host_keys") from exc
        self._by_listen = await self._bind(config, keys, config.server.listen)

    async def prepare(self, config: Config) -> PendingListeners:
        """Load *config*'s host keys and bind its new addresses; change nothing yet."""
        try:
            keys = await asyncio.to_thread(
                lambda: [ensure_host_key(p) for p in config.server.host_keys])
        except (OSError, ConfigError) as exc:
            raise ListenerError(f"cannot load the host keys: {exc}") from exc
        _check_options(config, self._handler, keys)
        added = [listen for listen in config.server.listen if listen not in self._by_listen]
        try:
            bound = await self._bind(config, keys, added)
        except OSError as exc:
            moved = {port for _, port in self.addresses} & {a.port for a in added}
            hint = (f"; moving port {min(moved)} to another address takes a restart"
                    if moved else "")
            raise ListenerError(f"cannot listen: {exc}{hint}") from exc
        return PendingListeners(config, keys, bound)

    def commit(self, pending: PendingListeners) -> list[str]:
        """Apply *pending*; return what changed, for the log and the audit trail."""
        pending.committed = True
        config = pending.config
        options = _live_options(config, pending.keys)
        changes = []
        for listen, acceptor in list(self._by_listen.items()):
            if listen in config.server.listen:
                acceptor.update(**options)  # checked by prepare(): it cannot refuse them
            else:
                acceptor.close()  # its connections stay
                del self._by_listen[listen]
                changes.append(f"stopped listening on {listen}")
        for listen, acceptor in pending.bound.items():
            self._by_listen[listen] = acceptor
            changes.append(f"listening on {listen}")
        # Keep the configured order (the first address is the one status shows first).
        self._by_listen = {listen: self._by_listen[listen] for listen in config.server.listen}
        return changes

    @staticmethod
    def abort(pending: PendingListeners) -> None:
        """Undo :meth:`prepare` unless committed: close what it bound."""
        if pending.committed:
            return
        for acceptor in pending.bound.values():
            acceptor.close()

    async def _bind(self, config: Config, keys: list[asyncssh.SSHKey],
                    listens: Iterable[Listen]) -> dict[Listen, asyncssh.SSHAcceptor]:
        options = _server_options(config, self._handler, keys)
        bound: dict[Listen, asyncssh.SSHAcceptor] = {}
        try:
            for listen in listens:
                bound[listen] = await asyncssh.create_server(
                    lambda: GatewayServer(self._daemon), listen.host, listen.port,
                    reuse_address=True, **options)
        except BaseException:
            for acceptor in bound.values():
                acceptor.close()
            raise
        return bound


def _check_options(
    config: Config,
    handler: Callable[[asyncssh.SSHServerProcess[bytes]], Awaitable[None]],
    keys: list[asyncssh.SSHKey],
) -> None:
    """Raise ListenerError if asyncssh would refuse these options."""
    try:
        asyncssh.SSHServerConnectionOptions(**_server_options(config, handler, keys))
    except (ValueError, TypeError) as exc:
        raise ListenerError(f"the host keys cannot be used: {exc}") from exc


@dataclass
class PendingListeners:
    """What :meth:`Listeners.prepare` made ready for a reload: the new config's host keys
    and acceptors bound on its new addresses."""

    config: Config
    keys: list[asyncssh.SSHKey]
    bound: dict[Listen, asyncssh.SSHAcceptor]
    committed: bool = False  # by Listeners.commit: what is bound is then kept


def _live_options(config: Config, keys: list[asyncssh.SSHKey]) -> dict[str, Any]:
    """The options a reload may change on a running listener."""
    ssh = config.ssh
    return {
        "server_host_keys": keys,
        "login_timeout": ssh.login_timeout,
        "keepalive_interval": ssh.keepalive_interval,
        "keepalive_count_max": ssh.keepalive_count_max,
    }


def _server_options(
    config: Config,
    handler: Callable[[asyncssh.SSHServerProcess[bytes]], Awaitable[None]],
    keys: list[asyncssh.SSHKey],
) -> dict[str, Any]:
    """Every option an SSH listener is made with."""
    return {
        **_live_options(config, keys),
        # As sshd does: every host key is announced (hostkeys-00@openssh.com), so OpenSSH
        # clients (UpdateHostKeys) learn a new key listed after the one in use before the
        # old one goes. It also allows more than one key of a type: the first is used.
        "send_server_host_keys": True,
        "process_factory": handler,
        "encoding": None,
        "line_editor": False,
        "allow_scp": False,
        "agent_forwarding": False,
        "x11_forwarding": False,
        "gss_host": None,
        "password_auth": False,
        "kbdint_auth": False,
        "host_based_auth": False,
        "public_key_auth": True,
        "kex_algs": KEX_ALGS,
        "encryption_algs": ENCRYPTION_ALGS,
        "mac_algs": MAC_ALGS,
        "compression_algs": ["none"],
        "signature_algs": SIG_ALGS,
        "server_version": "serialmux",
    }
