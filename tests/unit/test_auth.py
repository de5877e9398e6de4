"""Certificates, revocation, MaxStartups and per-source penalties, without sockets."""

from __future__ import annotations

import base64
import shutil
import subprocess
import time
from pathlib import Path

import asyncssh
import pytest

from serialmux.auth import (
    CertRefused,
    Gate,
    Revocations,
    check_certificate,
    is_certificate,
    load_cas,
    parse_revocations,
)
from serialmux.config import SSHSettings, UserConfig
from serialmux.errors import ConfigError
from serialmux.mfa import LOCKOUT_FIRST, LOCKOUT_MAX, Throttle, TotpStore, TotpUnavailable

USERS = {n: UserConfig(name=n, keys=()) for n in ("alice", "bob")}


@pytest.fixture
def ca() -> asyncssh.SSHKey:
    """A user CA key."""
    return asyncssh.generate_private_key("ssh-ed25519")


@pytest.fixture
def user_key() -> asyncssh.SSHKey:
    """alice's key."""
    return asyncssh.generate_private_key("ssh-ed25519")


def cert(ca: asyncssh.SSHKey, key: asyncssh.SSHKey, principals: list[str], **kw: object) -> bytes:
    kw.setdefault("key_id", "alice@corp")
    c = ca.generate_user_certificate(key, principals=principals, **kw)  # type: ignore[arg-type]
    return c.public_data


def check(blob: bytes, ca: asyncssh.SSHKey, revoked: Revocations | None = None,
          peer: str = "127.0.0.1"):  # type: ignore[no-untyped-def]
    return check_certificate(blob, cas={ca.public_data: "SHA256:ca"},
                             revoked=revoked or Revocations(None), users=USERS, peer_host=peer)


def test_principal_names_the_user(ca: asyncssh.SSHKey, user_key: asyncssh.SSHKey) -> None:
    """A valid certificate logs in as the configured user its principal names."""
    got = check(cert(ca, user_key, ["alice"], serial=42), ca)
    assert (got.user, got.key_id, got.serial) == ("alice", "alice@corp", 42)
    assert got.key.public_data == user_key.public_data


def test_certificate_blob_is_recognised(ca: asyncssh.SSHKey, user_key: asyncssh.SSHKey) -> None:
    """Certificates are told from plain keys by their algorithm name."""
    assert is_certificate(cert(ca, user_key, ["alice"]))
    assert not is_certificate(user_key.public_data)
    assert not is_certificate(b"\x00")


@pytest.mark.parametrize(("principals", "kw", "reason"), [
    ([], {}, "no principals"),
    (["alice"], {"valid_after": time.time() - 7200, "valid_before": time.time() - 3600},
     "expired"),
    (["alice"], {"valid_after": time.time() + 3600}, "not yet valid"),
    (["nobody"], {}, "no principal is a configured user"),
    (["alice", "bob"], {}, "must name one"),
    (["alice"], {"force_command": "nmi"}, "force-command"),
    (["alice"], {"source_address": ["10.0.0.0/8"]}, "source-address"),
])
def test_bad_certificates_are_refused(ca: asyncssh.SSHKey, user_key: asyncssh.SSHKey,
                                      principals: list[str], kw: dict[str, object],
                                      reason: str) -> None:
    """Empty principals, validity, unknown users, several users, force-command, source-address."""
    with pytest.raises(CertRefused, match=reason):
        check(cert(ca, user_key, principals, **kw), ca)


def test_source_address_allows_listed_network(ca: asyncssh.SSHKey,
                                              user_key: asyncssh.SSHKey) -> None:
    """source-address is implemented: a listed network may log in."""
    assert check(cert(ca, user_key, ["alice"], source_address=["127.0.0.0/8"]), ca).user == "alice"


def test_untrusted_ca_is_refused(ca: asyncssh.SSHKey, user_key: asyncssh.SSHKey) -> None:
    """A certificate from a CA not in user_ca_keys gets nothing."""
    other = asyncssh.generate_private_key("ssh-ed25519")
    with pytest.raises(CertRefused, match="untrusted CA"):
        check(cert(other, user_key, ["alice"]), ca)


def test_host_certificate_is_refused(ca: asyncssh.SSHKey, user_key: asyncssh.SSHKey) -> None:
    """A host certificate is not a user certificate."""
    blob = ca.generate_host_certificate(user_key, "host", principals=["alice"]).public_data
    with pytest.raises(CertRefused, match="not a user certificate"):
        check(blob, ca)


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")
def test_unknown_critical_option_is_refused(tmp_path: Path) -> None:
    """A certificate with a critical option serialmux does not know is refused."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", tmp_path / "ca"],
                   check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", tmp_path / "u"],
                   check=True)
    subprocess.run(["ssh-keygen", "-q", "-s", tmp_path / "ca", "-I", "x", "-n", "alice",
                    "-O", "critical:verify-required-by-moon", tmp_path / "u.pub"], check=True)
    ca_key = asyncssh.read_public_key(tmp_path / "ca.pub")
    blob = base64.b64decode((tmp_path / "u-cert.pub").read_text().split()[1])
    with pytest.raises(CertRefused, match="certificate refused"):
        check_certificate(blob, cas={ca_key.public_data: "x"}, revoked=Revocations(None),
                          users=USERS, peer_host="127.0.0.1")
    subprocess.run(["ssh-keygen", "-q", "-s", tmp_path / "ca", "-I", "x", "-n", "alice",
                    tmp_path / "u.pub"], check=True)  # the same without the option is fine
    blob = base64.b64decode((tmp_path / "u-cert.pub").read_text().split()[1])
    assert check_certificate(blob, cas={ca_key.public_data: "x"}, revoked=Revocations(None),
                             users=USERS, peer_host="127.0.0.1").user == "alice"


def test_revocation_by_key_serial_and_id(tmp_path: Path, ca: asyncssh.SSHKey,
                                         user_key: asyncssh.SSHKey) -> None:
    """revoked_keys refuses by certified key, by serial, by key id and by CA key."""
    path = tmp_path / "revoked"
    blob = cert(ca, user_key, ["alice"], serial=7, key_id="laptop-7")
    for line, reason in [(user_key.export_public_key().decode(), "certified key"),
                         ("serial:7", "serial 7"), ("id:laptop-7", "key id"),
                         (ca.export_public_key().decode(), "signing CA")]:
        path.write_text(f"# revoked\n{line}\n")
        with pytest.raises(CertRefused, match=reason):
            check(blob, ca, Revocations(str(path)))
    path.write_text("serial:8\n")
    assert check(blob, ca, Revocations(str(path))).user == "alice"


def test_revocation_file_change_is_picked_up(tmp_path: Path, ca: asyncssh.SSHKey,
                                             user_key: asyncssh.SSHKey) -> None:
    """Editing revoked_keys takes effect without a restart; an unreadable file fails closed."""
    path = tmp_path / "revoked"
    path.write_text("")
    revoked = Revocations(str(path))
    assert revoked.check_key(user_key.public_data) is None
    path.write_text(user_key.export_public_key().decode() + "# longer now\n")
    assert revoked.check_key(user_key.public_data) == "key is revoked"
    path.unlink()
    assert "unusable" in (revoked.check_key(b"anything") or "")


def test_revocation_file_errors_name_the_line() -> None:
    """A bad revoked_keys line is an error naming file and line."""
    with pytest.raises(ConfigError, match=r"revoked:3: not a public key"):
        parse_revocations("serial:1\n\nnonsense here\n", "revoked")
    with pytest.raises(ConfigError, match=r"revoked:1: serial"):
        parse_revocations("serial:x\n", "revoked")


def test_load_cas_reports_bad_file(tmp_path: Path) -> None:
    """An unreadable user_ca_keys file is a config error naming it."""
    with pytest.raises(ConfigError, match="user_ca_keys"):
        load_cas([str(tmp_path / "missing.pub")])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_max_startups_caps_and_drops_early() -> None:
    """10:30:100: below 10 all admitted, at 100 all dropped, between dropped at random."""
    gate = Gate(SSHSettings(), rng=lambda: 0.999)  # never below the drop probability
    assert all(gate.admit(f"10.0.0.{i}") is None for i in range(100))
    assert "MaxStartups" in (gate.admit("10.0.1.1") or "")
    low = Gate(SSHSettings(), rng=lambda: 0.0)  # always below it
    assert all(low.admit("10.0.0.1") is None for _ in range(10))
    assert "random early drop" in (low.admit("10.0.0.1") or "")


def test_gate_counts_return_to_zero() -> None:
    """Every admitted connection releases its slot once, authenticated or not."""
    gate = Gate(SSHSettings(per_source_max_startups=2))
    assert gate.admit("a") is None
    assert gate.admit("a") is None
    assert "PerSourceMaxStartups" in (gate.admit("a") or "")
    assert gate.admit("b") is None
    gate.authenticated("a")
    gate.closed("a", was_authenticated=True, failed=False)
    gate.closed("a", was_authenticated=False, failed=False)
    gate.closed("b", was_authenticated=False, failed=False)
    assert (gate.unauthenticated, gate.per_source) == (0, {})


def test_penalty_after_failures_then_expires() -> None:
    """Failed logins penalise the source once past 15 s; others are unaffected; it expires."""
    clock = Clock()
    gate = Gate(SSHSettings(), clock=clock)
    for _ in range(2):  # 10 s: below the 15 s minimum, not enforced yet
        assert gate.admit("1.2.3.4") is None
        gate.closed("1.2.3.4", was_authenticated=False, failed=True)
    assert gate.admit("1.2.3.4") is None
    gate.closed("1.2.3.4", was_authenticated=False, failed=True)
    assert "penalised" in (gate.admit("1.2.3.4") or "")
    assert gate.admit("1.2.3.5") is None
    clock.now += 16
    assert gate.admit("1.2.3.4") is None


def test_connections_that_never_log_in_add_the_noauth_penalty() -> None:
    """Closing without a login costs penalty_noauth (1 s): 15 in a row are refused, not 14."""
    clock = Clock()
    gate = Gate(SSHSettings(), clock=clock)
    for _ in range(14):
        assert gate.admit("1.2.3.4") is None
        gate.closed("1.2.3.4", was_authenticated=False, failed=False)
    assert gate.admit("1.2.3.4") is None
    gate.closed("1.2.3.4", was_authenticated=False, failed=False)
    assert "penalised" in (gate.admit("1.2.3.4") or "")
    gate.closed("9.9.9.9", was_authenticated=True, failed=False)  # logged in: no penalty
    assert "9.9.9.9" not in gate.penalties


def test_exempt_sources_are_never_penalised() -> None:
    """penalty_exempt: listed sources earn no penalty; listing one lifts its penalty."""
    import ipaddress

    clock = Clock()
    gate = Gate(SSHSettings(), clock=clock)
    for host in ("10.1.2.3", "::1"):
        for _ in range(20):
            gate.penalise(host, 5)
        assert "penalised" in (gate.admit(host) or "")
        gate.settings = SSHSettings(penalty_exempt=(ipaddress.ip_network("10.0.0.0/8"),
                                                    ipaddress.ip_network("::1")))
        assert gate.admit(host) is None  # a reload that lists it lets it in at once
        gate.penalise(host, 600)
        assert gate.admit(host) is None
        gate.settings = SSHSettings()
    assert not gate.exempt("unix-socket-peer")


def test_penalty_is_capped_at_penalty_max() -> None:
    """However many failures, a penalty never exceeds penalty_max."""
    clock = Clock()
    gate = Gate(SSHSettings(penalty_max=30), clock=clock)
    for _ in range(1000):
        gate.penalise("h", 5)
    assert gate.penalties["h"].expiry - clock.now == 30


def test_totp_store_enrol_verify_and_no_replay(tmp_path: Path) -> None:
    """An enrolled secret is 0600; a right code passes once; a wrong one fails."""
    import pyotp

    store = TotpStore(tmp_path)
    uri = store.enroll("alice")
    assert uri.startswith("otpauth://totp/")
    assert (store.path("alice").stat().st_mode & 0o777) == 0o600
    secret = pyotp.parse_uri(uri).secret
    code = pyotp.TOTP(secret).now()
    assert store.verify("alice", code)
    assert not store.verify("alice", code)  # replay in the same step
    assert not store.verify("alice", "12345x")


def test_totp_loose_or_missing_secret_is_refused(tmp_path: Path) -> None:
    """A missing or group-readable secret file is refused with what to do."""
    store = TotpStore(tmp_path)
    with pytest.raises(TotpUnavailable, match="totp-enroll alice"):
        store.check("alice")
    store.enroll("alice")
    store.path("alice").chmod(0o640)
    with pytest.raises(TotpUnavailable, match="chmod 600"):
        store.check("alice")


def test_totp_enroll_cli_writes_secret_and_prints_uri(tmp_path: Path) -> None:
    """`serialmux totp-enroll USER` stores a 0600 secret and prints the otpauth URI once."""
    from click.testing import CliRunner

    from serialmux.cli import main

    key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    config = tmp_path / "serialmux.toml"
    config.write_text(f'[server]\nstate_dir = "{tmp_path}/state"\n'
                      f'[users.alice]\nkeys = ["{key}"]\n')
    result = CliRunner().invoke(main, ["totp-enroll", "alice", "-c", str(config)])
    assert result.exit_code == 0, result.output
    assert "otpauth://totp/serialmux:alice?secret=" in result.output
    assert (tmp_path / "state/totp/alice").stat().st_mode & 0o777 == 0o600
    missing = CliRunner().invoke(main, ["totp-enroll", "bob", "-c", str(config)])
    assert missing.exit_code == 1


@pytest.mark.parametrize(("sig_alg", "accepted"), [("ssh-rsa", False), ("rsa-sha2-256", True),
                                                   ("rsa-sha2-512", True)])
def test_sha1_signed_certificate_is_refused(user_key: asyncssh.SSHKey, sig_alg: str,
                                            accepted: bool) -> None:
    """A certificate an RSA CA signed with ssh-rsa (SHA-1) is refused; rsa-sha2-* is not."""
    rsa_ca = asyncssh.generate_private_key("ssh-rsa", key_size=2048)
    blob = cert(rsa_ca, user_key, ["alice"], sig_alg=sig_alg)
    if accepted:
        assert check(blob, rsa_ca).user == "alice"
    else:
        with pytest.raises(CertRefused, match=r"ssh-rsa \(SHA-1\)"):
            check(blob, rsa_ca)


def test_source_address_matches_ipv4_mapped_peer(ca: asyncssh.SSHKey,
                                                 user_key: asyncssh.SSHKey) -> None:
    """source-address 10.0.0.0/8 admits ::ffff:10.1.2.3 (a dual-stack IPv4 peer), not others."""
    blob = cert(ca, user_key, ["alice"], source_address=["10.0.0.0/8"])
    assert check(blob, ca, peer="::ffff:10.1.2.3").user == "alice"
    with pytest.raises(CertRefused, match="source-address"):
        check(blob, ca, peer="::ffff:192.168.0.1")


def test_totp_throttle_locks_user_then_doubles_up_to_max() -> None:
    """3 wrong codes lock the user out 30 s, each further one doubles it, capped at 15 min."""
    clock = Clock()
    throttle = Throttle(clock)
    for _ in range(2):
        throttle.failed("alice", "10.0.0.1")
    assert throttle.locked("alice", "10.0.0.2") == 0
    throttle.failed("alice", "10.0.0.1")
    assert throttle.locked("alice", "10.0.0.2") == LOCKOUT_FIRST  # any source: the user is locked
    clock.now += LOCKOUT_FIRST
    assert throttle.locked("alice", "10.0.0.2") == 0
    throttle.failed("alice", "10.0.0.2")
    assert throttle.locked("alice", "10.0.0.3") == 2 * LOCKOUT_FIRST
    for _ in range(20):
        throttle.failed("alice", "10.0.0.2")
    assert throttle.locked("alice", "10.0.0.3") == LOCKOUT_MAX
    throttle.succeeded("alice")
    assert throttle.locked("alice", "10.0.0.3") == 0


def test_totp_throttle_locks_a_source_across_users() -> None:
    """Wrong codes for many users from one address lock that address out, not others."""
    clock = Clock()
    throttle = Throttle(clock)
    for user in ("alice", "bob", "carol"):
        throttle.failed(user, "10.6.6.6")
    assert throttle.locked("dave", "10.6.6.6") == LOCKOUT_FIRST
    assert throttle.locked("dave", "10.0.0.1") == 0
    throttle.succeeded("alice")  # a right code does not clear the source
    assert throttle.locked("alice", "10.6.6.6") == LOCKOUT_FIRST


def test_totp_throttle_one_prompt_per_user() -> None:
    """A user's second prompt is refused while the first is open, allowed after it ends."""
    throttle = Throttle(Clock())
    with throttle.prompting("alice") as first:
        assert first
        with throttle.prompting("alice") as second, throttle.prompting("bob") as other:
            assert not second
            assert other
    with throttle.prompting("alice") as again:
        assert again
