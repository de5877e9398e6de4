"""Authentication policy asyncssh does not have: certificates, revocation, MaxStartups, penalties.

Everything here is plain synchronous code (no asyncio, no sockets), so it is
tested without a loop; :mod:`serialmux.sshd` calls it from asyncssh's
callbacks.

* :func:`check_certificate` decides whether an OpenSSH user certificate may
  log in and *as whom*: the certificate's principal names the serialmux user
  (the login name is the VM, so asyncssh's own principal-vs-login-name check
  cannot be used). Refused: no principals (CVE-2024-7594), expired or not yet
  valid, a CA not in ``[ssh] user_ca_keys``, unknown critical options
  (asyncssh's decoder already refuses them), ``force-command`` (serialmux
  chooses commands from the exec request; a forced command would silently
  change what a session does), a CA signature made with ``ssh-rsa`` (SHA-1,
  refused by OpenSSH since 8.2), principals naming no configured user or more
  than one, and anything listed in the revocation file. ``source-address`` is
  implemented, and so is ``no-touch-required``: a FIDO (``sk-*``) certified
  key must sign with user presence (a touch) unless the certificate carries
  that extension (:attr:`CertIdentity.touch_required`), as sshd does with
  ``TrustedUserCAKeys``.
* :class:`Revocations` reads ``[ssh] revoked_keys``: a text file of public
  keys and ``serial:N`` / ``id:KEYID`` lines (see docs/security.md), re-read
  when it changes (checked on every login and channel, and every second by
  :meth:`serialmux.connections.Connections.watch_revocations`).
* :class:`Gate` admits or drops a new TCP connection before the SSH handshake:
  sshd's ``MaxStartups start:rate:full`` (random early drop of unauthenticated
  connections), an optional per-source cap (``PerSourceMaxStartups``) and
  ``PerSourcePenalties`` (a source whose connections fail authentication is
  refused for a while).
"""

from __future__ import annotations

import ipaddress
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import asyncssh
from asyncssh.packet import PacketDecodeError, SSHPacket
from asyncssh.public_key import CERT_TYPE_USER, SSHOpenSSHCertificate, decode_ssh_certificate

from .config import SSHSettings, UserConfig
from .configtypes import IPNetwork
from .errors import ConfigError
from .keys import normalise_address
from .log import get_logger

log = get_logger(__name__)

CERT_SUFFIX = b"-cert-v01@openssh.com"
# CA signature algorithms refused like OpenSSH >= 8.2 (CASignatureAlgorithms): SHA-1;
# b"?" is a signature that could not be parsed.
WEAK_CERT_SIG_ALGS = frozenset({b"ssh-rsa", b"?"})

# OpenSSH PerSourcePenalties defaults not exposed in [ssh]: a penalty is
# enforced only once it reaches PENALTY_MIN seconds, and at most
# PENALTY_MAX_SOURCES addresses are tracked (then new ones are not penalised:
# "overflow:permissive").
PENALTY_MIN = 15.0
PENALTY_MAX_SOURCES = 65536


class CertRefused(Exception):
    """A certificate may not log in; ``reason`` says why (audited, never shown to the client)."""

    def __init__(self, reason: str, *, key_id: str | None = None,
                 serial: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.key_id = key_id
        self.serial = serial


@dataclass(frozen=True, slots=True)
class CertIdentity:
    """Who a valid certificate names."""

    user: str
    key: asyncssh.SSHKey  # the certified key: asyncssh checks the signature with it
    key_id: str
    serial: int
    fingerprint: str  # of the certified key
    ca_fingerprint: str
    # Whether a FIDO (sk-*) certified key must sign with the user-presence flag: always,
    # unless the certificate has the no-touch-required extension (sshd with
    # TrustedUserCAKeys; no key options apply, the CA is not an authorized_keys line).
    touch_required: bool = True


def is_certificate(key_data: bytes) -> bool:
    """Return whether an SSH public-key blob is an OpenSSH certificate (by its algorithm)."""
    if len(key_data) < 4:
        return False
    n = int.from_bytes(key_data[:4], "big")
    return key_data[4:4 + n].endswith(CERT_SUFFIX)


# ----------------------------------------------------------------------------
# Revocation


_Stamp = tuple[int, int, int, int, int]


def _stamp_of(st: os.stat_result) -> _Stamp:
    """What tells one version of a file from another: a new file (``mv``) or new contents."""
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)


class Revocations:
    """The ``revoked_keys`` file: keys, ``serial:N`` and ``id:KEYID`` lines.

    A listed key is refused wherever it appears: as a user's plain key, as the
    key inside a certificate, or as the CA that signed one. The file is
    re-read whenever it changes (another file put in its place, its
    modification or change time, its size); a file that cannot be read
    refuses every certificate and key (fail closed), like sshd's
    ``RevokedKeys``.
    """

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        self._stamp: _Stamp | None = None
        self._loaded = False
        self.keys: frozenset[bytes] = frozenset()
        self.serials: frozenset[int] = frozenset()
        self.key_ids: frozenset[str] = frozenset()
        self.error: str | None = None
        # Called (loop thread, from inside a check) when the file is re-read with new
        # contents after the first load: the daemon then re-checks open connections.
        self.on_change: Callable[[], None] | None = None
        self.refresh()

    def stamp(self) -> _Stamp | None:
        """The file's identity and version now, or None (no file configured, or no stat).

        Only a ``stat``: safe to call in a worker thread. The watcher does, so an unchanged
        file costs the event loop nothing; a changed one is then read on the loop (a small
        text file, as at every login).
        """
        if self.path is None:
            return None
        try:
            return _stamp_of(self.path.stat())
        except OSError:
            return None

    def stale(self, stamp: _Stamp | None) -> bool:
        """Whether a file that looks like *stamp* needs :meth:`refresh` (changed, or unusable)."""
        return self.path is not None and (stamp != self._stamp or self.error is not None)

    def refresh(self) -> None:
        """Re-read the file if it changed since the last read."""
        if self.path is None:
            return
        try:
            stamp = _stamp_of(self.path.stat())
        except OSError as exc:
            self._stamp = None
            self._unusable(f"cannot read {self.path}: {exc.strerror}")
            return
        if stamp == self._stamp and self.error is None:
            return
        try:
            text = self.path.read_text(encoding="utf-8")
            parsed = parse_revocations(text, str(self.path))
        except (OSError, UnicodeDecodeError, ConfigError) as exc:
            self._unusable(str(exc))
            return
        changed = parsed != (self.keys, self.serials, self.key_ids)
        self.keys, self.serials, self.key_ids = parsed
        self.error = None
        self._stamp = stamp
        reread, self._loaded = self._loaded, True
        if reread and changed and self.on_change is not None:
            self.on_change()

    def _unusable(self, error: str) -> None:
        """The file cannot be used: every key and certificate is refused (fail closed). Said
        once per new error; past the first read that is a change like any other, so the
        connections already open are checked too (and refused), as a reload does."""
        if error == self.error:
            return
        self.error = error
        log.error("revocation_list_unusable", path=str(self.path), error=error,
                  hint="every key and certificate is refused until the file is fixed")
        reread, self._loaded = self._loaded, True
        if reread and self.on_change is not None:
            self.on_change()

    def check_key(self, public_data: bytes) -> str | None:
        """Why *public_data* is refused, or None."""
        self.refresh()
        if self.error:
            return f"revocation list unusable ({self.error})"
        if public_data in self.keys:
            return "key is revoked"
        return None


def parse_revocations(text: str, source: str
                      ) -> tuple[frozenset[bytes], frozenset[int], frozenset[str]]:
    """Parse a revocation file; raises :class:`ConfigError` naming the line."""
    keys: set[bytes] = set()
    serials: set[int] = set()
    ids: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("serial:"):
            value = line[7:].strip()
            if not value.isdigit() or int(value) >= 1 << 64:
                raise ConfigError("serial: needs a decimal 64-bit number", path=source,
                                  line=number)
            serials.add(int(value))
        elif line.startswith("id:"):
            value = line[3:].strip()
            if not value:
                raise ConfigError("id: needs a certificate key id", path=source, line=number)
            ids.add(value)
        else:
            try:
                key = asyncssh.import_public_key(" ".join(line.split()[:2]))
            except (asyncssh.KeyImportError, ValueError) as exc:
                raise ConfigError(f"not a public key, serial:N or id:KEYID line ({exc})",
                                  path=source, line=number) from None
            keys.add(key.public_data)
    return frozenset(keys), frozenset(serials), frozenset(ids)


# ----------------------------------------------------------------------------
# Certificates


def load_cas(paths: Iterable[str]) -> dict[bytes, str]:
    """Read the trusted user CA public keys: ``{public_data: fingerprint}``."""
    cas: dict[bytes, str] = {}
    for path in paths:
        try:
            for key in asyncssh.read_public_key_list(path):
                cas[key.public_data] = key.get_fingerprint("sha256")
        except (OSError, asyncssh.KeyImportError, ValueError) as exc:
            raise ConfigError(f"cannot load user CA keys: {exc}", path=path,
                              key="ssh.user_ca_keys") from exc
    return cas


def check_certificate(key_data: bytes, *, cas: Mapping[bytes, str], revoked: Revocations,
                      users: Mapping[str, UserConfig], peer_host: str,
                      now: float | None = None) -> CertIdentity:
    """Validate an OpenSSH user certificate blob and return who it names.

    Raises :class:`CertRefused` with the reason (for the audit) otherwise.
    """
    try:
        cert = decode_ssh_certificate(key_data)
    except asyncssh.KeyImportError as exc:
        raise CertRefused(f"certificate refused: {exc}") from None
    if not isinstance(cert, SSHOpenSSHCertificate):
        raise CertRefused("X.509 certificates are not accepted")
    key_id = str(getattr(cert, "_key_id", ""))
    serial = int(getattr(cert, "_serial", 0))

    def refuse(reason: str) -> CertRefused:
        return CertRefused(reason, key_id=key_id, serial=serial)

    if getattr(cert, "_cert_type", None) != CERT_TYPE_USER:
        raise refuse("not a user certificate")
    ca_fp = cas.get(cert.signing_key.public_data)
    if ca_fp is None:
        raise refuse("certificate signed by an untrusted CA")
    if _signature_algorithm(key_data, cert) in WEAK_CERT_SIG_ALGS:
        raise refuse("certificate signed with ssh-rsa (SHA-1); re-sign it with rsa-sha2-512 "
                     "(ssh-keygen -t rsa-sha2-512) or an ed25519 CA")
    now = time.time() if now is None else now
    if now < getattr(cert, "_valid_after", 0):
        raise refuse("certificate not yet valid")
    if now >= getattr(cert, "_valid_before", 0):
        raise refuse("certificate expired")
    if not cert.principals:
        raise refuse("certificate has no principals (CVE-2024-7594)")
    if "force-command" in cert.options:
        raise refuse("certificate has force-command, which serialmux does not honour")
    sources = cert.options.get("source-address")
    if sources:
        try:
            ip = ipaddress.ip_address(normalise_address(peer_host))
        except ValueError:
            raise refuse("source-address: peer address unknown") from None
        if not any(ip in net for net in cast(Iterable[IPNetwork], sources)):
            raise refuse("source-address does not allow this address")
    for why, data in (("certified key", cert.key.public_data),
                      ("signing CA", cert.signing_key.public_data)):
        problem = revoked.check_key(data)
        if problem:
            raise refuse(f"{why}: {problem}")
    if serial in revoked.serials:
        raise refuse(f"certificate serial {serial} is revoked")
    if key_id in revoked.key_ids:
        raise refuse("certificate key id is revoked")
    named = sorted({p for p in cert.principals if p in users})
    if not named:
        raise refuse("no principal is a configured user")
    if len(named) > 1:
        raise refuse(f"principals name {len(named)} users; a certificate must name one")
    return CertIdentity(user=named[0], key=cert.key, key_id=key_id, serial=serial,
                        fingerprint=cert.key.get_fingerprint("sha256"), ca_fingerprint=ca_fp,
                        touch_required=not cert.options.get("no-touch-required", False))


def _signature_algorithm(key_data: bytes, cert: SSHOpenSSHCertificate) -> bytes:
    """The algorithm of the CA's signature on the certificate blob *key_data*.

    asyncssh verifies the signature while decoding but keeps no record of its
    algorithm, so the blob is walked again up to the signature.
    """
    try:
        packet = SSHPacket(key_data)
        packet.get_string()  # certificate type
        type(cert)._decode(packet, type(cert.key))  # asyncssh has no public parser
        packet.get_string()  # signing key
        return SSHPacket(packet.get_string()).get_string()
    except (PacketDecodeError, asyncssh.KeyImportError, ValueError):
        return b"?"


# ----------------------------------------------------------------------------
# Admission: MaxStartups, per-source caps and penalties


@dataclass(slots=True)
class _Penalty:
    expiry: float
    active: bool = False


class Gate:
    """Admit or drop connections before the handshake; count unauthenticated ones.

    Each admitted connection must later call :meth:`authenticated` or
    :meth:`closed` (both is fine): the counts return to zero when every
    connection has gone, whatever happened.
    """

    def __init__(self, settings: SSHSettings, *, rng: Callable[[], float] = random.random,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._rng = rng
        self._clock = clock
        self.unauthenticated = 0
        self.per_source: dict[str, int] = {}
        self.penalties: dict[str, _Penalty] = {}

    def admit(self, host: str) -> str | None:
        """Return why a new connection from *host* is dropped, or None (and count it)."""
        now = self._clock()
        penalty = self.penalties.get(host)
        if penalty is not None:
            if penalty.expiry <= now or self.exempt(host):  # expired, or exempt since a reload
                del self.penalties[host]
            elif penalty.active:
                return (f"penalised for {penalty.expiry - now:.0f} s after failed or "
                        "unfinished logins")
        start, rate, full = self.settings.max_startups
        n = self.unauthenticated
        if n >= full:
            return f"MaxStartups: {n} unauthenticated connections"
        if n >= start:
            # sshd: drop with probability rate% at start, rising linearly to 100% at full.
            p = rate + (100 - rate) * (n - start) / max(1, full - start)
            if self._rng() * 100 < p:
                return f"MaxStartups: random early drop at {n} unauthenticated connections"
        cap = self.settings.per_source_max_startups
        if cap is not None and self.per_source.get(host, 0) >= cap:
            return f"PerSourceMaxStartups: {cap} unauthenticated connections from this source"
        self.unauthenticated += 1
        self.per_source[host] = self.per_source.get(host, 0) + 1
        return None

    def _release(self, host: str) -> None:
        self.unauthenticated -= 1
        left = self.per_source.get(host, 1) - 1
        if left > 0:
            self.per_source[host] = left
        else:
            self.per_source.pop(host, None)

    def authenticated(self, host: str) -> None:
        """An admitted connection authenticated: it no longer counts."""
        self._release(host)

    def closed(self, host: str, *, was_authenticated: bool, failed: bool) -> None:
        """An admitted connection closed; unauthenticated, it earns its source a penalty.

        As sshd's PerSourcePenalties: ``penalty_authfail`` after a failed login,
        ``penalty_noauth`` for one that ended without any (a scanner, a probe, a
        login timeout). Both only add up to a refusal past the 15 s minimum.
        """
        if not was_authenticated:
            self._release(host)
            settings = self.settings
            self.penalise(host, settings.penalty_authfail if failed else settings.penalty_noauth)

    def exempt(self, host: str) -> bool:
        """Whether *host* is in ``penalty_exempt`` (sshd's PerSourcePenaltyExemptList)."""
        networks = self.settings.penalty_exempt
        if not networks:
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False  # not an IP (a UNIX socket peer): never listed
        return any(address in network for network in networks)

    def penalise(self, host: str, seconds: float) -> None:
        """Add *seconds* to *host*'s penalty (capped at penalty_max); enforce past the minimum."""
        if seconds <= 0 or self.exempt(host):
            return
        now = self._clock()
        penalty = self.penalties.get(host)
        if penalty is None or penalty.expiry <= now:
            if penalty is None and len(self.penalties) >= PENALTY_MAX_SOURCES:
                self._prune(now)
                if len(self.penalties) >= PENALTY_MAX_SOURCES:
                    return
            penalty = self.penalties[host] = _Penalty(expiry=now)
        penalty.expiry = min(penalty.expiry + seconds, now + self.settings.penalty_max)
        if penalty.expiry - now >= min(PENALTY_MIN, self.settings.penalty_max):
            penalty.active = True

    def _prune(self, now: float) -> None:
        for host in [h for h, p in self.penalties.items() if p.expiry <= now]:
            del self.penalties[host]


def check_private_file(path: Path) -> str | None:
    """Why a secret file is unsafe to use (group/other access, not ours), or None."""
    st = path.stat()
    if st.st_mode & 0o077:
        return f"{path} is accessible by group or others (mode {st.st_mode & 0o777:o}); chmod 600"
    if st.st_uid != os.geteuid():
        return f"{path} is not owned by the serialmux user"
    return None
