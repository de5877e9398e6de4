"""FIDO security keys (sk-ssh-ed25519, sk-ecdsa-sha2-nistp256): user presence is enforced.

The security key is emulated in software: a real ed25519 / P-256 key signs the FIDO message
(application hash, flags, counter, data hash) with the flags byte the test chooses, so a
signature can claim user presence (a touch) or not. Real asyncssh clients log in to the real
daemon; as OpenSSH sshd does, a signature without the user-presence flag is refused, for a
plain key and for a certificate, unless the certificate carries ``no-touch-required``.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncssh
import pytest
from asyncssh.packet import Byte, MPInt, String, UInt32
from asyncssh.sk_ecdsa import _SKECDSAKey
from asyncssh.sk_eddsa import _SKEd25519Key
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from serialmux.keys import KeyParseError, parse_authorized_keys
from tests.support import Gateway, PtyVM, User, gateway

APPLICATION = "ssh:"
USER_PRESENT = 0x01  # SSH_SK_USER_PRESENCE_REQD: the authenticator was touched
NO_TOUCH = 0x00


def _fido_message(data: bytes, flags: int) -> bytes:
    """What a FIDO authenticator signs for an SSH signature request (counter 1)."""
    return (hashlib.sha256(APPLICATION.encode()).digest() + Byte(flags) + UInt32(1)
            + hashlib.sha256(data).digest())


def soft_sk_ed25519(flags: int) -> asyncssh.SSHKey:
    """An sk-ssh-ed25519 key whose signatures carry *flags* (no hardware needed)."""
    private = Ed25519PrivateKey.generate()
    public = private.public_key().public_bytes(serialization.Encoding.Raw,
                                               serialization.PublicFormat.Raw)

    class SoftKey(_SKEd25519Key):  # type: ignore[misc]
        def sign_ssh(self, data: bytes, sig_algorithm: bytes) -> bytes:
            return String(private.sign(_fido_message(data, flags))) + Byte(flags) + UInt32(1)

    key: asyncssh.SSHKey = SoftKey(public, APPLICATION, 0, b"handle", b"")
    return key


def soft_sk_ecdsa(flags: int) -> asyncssh.SSHKey:
    """An sk-ecdsa-sha2-nistp256 key whose signatures carry *flags*."""
    private = ec.generate_private_key(ec.SECP256R1())
    public = private.public_key().public_bytes(serialization.Encoding.X962,
                                               serialization.PublicFormat.UncompressedPoint)

    class SoftKey(_SKECDSAKey):  # type: ignore[misc]
        def sign_ssh(self, data: bytes, sig_algorithm: bytes) -> bytes:
            der = private.sign(_fido_message(data, flags), ec.ECDSA(hashes.SHA256()))
            r, s = decode_dss_signature(der)
            return String(MPInt(r) + MPInt(s)) + Byte(flags) + UInt32(1)

    key: asyncssh.SSHKey = SoftKey(b"nistp256", public, APPLICATION, 0, b"handle", b"")
    return key


SOFT_KEYS = pytest.mark.parametrize("make_key", [soft_sk_ed25519, soft_sk_ecdsa],
                                    ids=["sk-ed25519", "sk-ecdsa"])


@pytest.fixture
def ca(tmp_path: Path) -> asyncssh.SSHKey:
    """A user CA trusted by the gateway (tmp/ca.pub)."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    (tmp_path / "ca.pub").write_bytes(key.export_public_key())
    return key


async def login(gw: Gateway, key: asyncssh.SSHKey,
                cert: asyncssh.SSHCertificate | None = None) -> int | None:
    """Log in to web-01 with *key* (and *cert*) and run ``who``; its exit status."""
    pairs = asyncssh.load_keypairs([(key, cert) if cert is not None else key])
    async with asyncssh.connect("127.0.0.1", gw.port, username="web-01", client_keys=pairs,
                                known_hosts=None, agent_path=None) as conn:
        result = await conn.run("who", encoding=None)
        return result.exit_status


async def refused(gw: Gateway, key: asyncssh.SSHKey,
                  cert: asyncssh.SSHCertificate | None = None) -> None:
    """Assert that the login is refused and audited as a failed signature."""
    with pytest.raises(asyncssh.PermissionDenied):
        await login(gw, key, cert)
    await gw.wait_audit("auth_failure", reason="bad signature")
    assert not [e for e in gw.audit_events if e["event"] == "auth_success"]


@contextlib.asynccontextmanager
async def bob_trusting_the_ca(tmp_path: Path, users: dict[str, User], vm: PtyVM
                              ) -> AsyncIterator[Gateway]:
    """A gateway where bob (a reader) may log in with a certificate from ca.pub."""
    async with gateway(tmp_path, vms={"web-01": vm.port}, users={"bob": users["bob"]},
                       grants=[(["bob"], ["*"], "reader")],
                       extra='[ssh]\nuser_ca_keys = ["ca.pub"]') as gw:
        yield gw


@SOFT_KEYS
async def test_sk_certificate_without_touch_is_refused(
        tmp_path: Path, users: dict[str, User], vm: PtyVM, ca: asyncssh.SSHKey,
        make_key: Callable[[int], asyncssh.SSHKey]) -> None:
    """A CA-signed FIDO certificate whose signature lacks user presence (no touch) is refused."""
    vm.start()
    key = make_key(NO_TOUCH)
    cert = ca.generate_user_certificate(key, "bob-sk", principals=["bob"])
    async with bob_trusting_the_ca(tmp_path, users, vm) as gw:
        await refused(gw, key, cert)


@SOFT_KEYS
async def test_sk_certificate_with_touch_logs_in(
        tmp_path: Path, users: dict[str, User], vm: PtyVM, ca: asyncssh.SSHKey,
        make_key: Callable[[int], asyncssh.SSHKey]) -> None:
    """The same FIDO certificate signing with the user-presence flag set logs in as bob."""
    vm.start()
    key = make_key(USER_PRESENT)
    cert = ca.generate_user_certificate(key, "bob-sk", principals=["bob"])
    async with bob_trusting_the_ca(tmp_path, users, vm) as gw:
        assert await login(gw, key, cert) == 0
        await gw.wait_audit("auth_success", user="bob", key_id="bob-sk")


@SOFT_KEYS
async def test_sk_certificate_with_no_touch_required_needs_no_touch(
        tmp_path: Path, users: dict[str, User], vm: PtyVM, ca: asyncssh.SSHKey,
        make_key: Callable[[int], asyncssh.SSHKey]) -> None:
    """A certificate with the no-touch-required extension logs in without user presence."""
    vm.start()
    key = make_key(NO_TOUCH)
    cert = ca.generate_user_certificate(key, "bob-sk", principals=["bob"],
                                        touch_required=False)
    assert cert.options.get("no-touch-required")
    async with bob_trusting_the_ca(tmp_path, users, vm) as gw:
        assert await login(gw, key, cert) == 0
        await gw.wait_audit("auth_success", user="bob", key_id="bob-sk")


def _sk_user(name: str, key: asyncssh.SSHKey, tmp: Path) -> User:
    """A configured user whose key is the software security key *key*."""
    return User(name, key, tmp / f"id_{name}-unused")


@pytest.mark.parametrize("flags", [NO_TOUCH, USER_PRESENT], ids=["no-touch", "touched"])
async def test_plain_sk_key_needs_touch(tmp_path: Path, vm: PtyVM, flags: int) -> None:
    """A FIDO key listed as a user's key logs in only with user presence (plain keys too)."""
    vm.start()
    key = soft_sk_ed25519(flags)
    gina = _sk_user("gina", key, tmp_path)
    async with gateway(tmp_path, vms={"web-01": vm.port}, users={"gina": gina},
                       grants=[(["gina"], ["*"], "reader")]) as gw:
        if flags == NO_TOUCH:
            await refused(gw, key)
        else:
            assert await login(gw, key) == 0


def test_no_touch_required_key_option_is_a_load_error() -> None:
    """`no-touch-required` on a plain key is refused at load (only from= is implemented)."""
    line = soft_sk_ed25519(NO_TOUCH).export_public_key().decode().strip()
    with pytest.raises(KeyParseError, match="'no-touch-required' is not supported"):
        parse_authorized_keys(f"no-touch-required {line}", source="keys.txt")
