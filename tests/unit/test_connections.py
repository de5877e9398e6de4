"""credential_problem: would an open connection's key or certificate still log in now?"""

from __future__ import annotations

import time
from pathlib import Path

import asyncssh
import pytest

from serialmux.auth import Revocations
from serialmux.config import Config, parse_config
from serialmux.connections import Credential, credential_problem

ALICE = asyncssh.generate_private_key("ssh-ed25519")
BOB = asyncssh.generate_private_key("ssh-ed25519")
CA = asyncssh.generate_private_key("ssh-ed25519")
NO_REVOCATIONS = Revocations(None)


def config(alice: str | None = None, bob: str | None = None) -> Config:
    """alice and bob with the given authorized-key lines (default: their own keys)."""
    alice = alice if alice is not None else ALICE.export_public_key().decode().strip()
    bob = bob if bob is not None else BOB.export_public_key().decode().strip()
    text = (f'[server]\nlisten = ["127.0.0.1:0"]\n[vms.a]\nport = "pty:/dev/pts/1"\n'
            f"[users.alice]\nkeys = ['{alice}']\n[users.bob]\nkeys = ['{bob}']\n")
    return parse_config(text, Path("/x.toml"))


def key_problem(cfg: Config, revoked: Revocations = NO_REVOCATIONS, host: str = "10.1.1.1"
                ) -> str | None:
    cred = Credential("alice", ALICE.public_data, at=time.time())
    return credential_problem(cred, config=cfg, cas={}, revoked=revoked, peer_host=host)


def test_plain_key_still_accepted() -> None:
    """An unchanged configuration keeps a plain-key login."""
    assert key_problem(config()) is None


def test_plain_key_moved_to_another_user() -> None:
    """alice's key now listed under bob (alice has another key): no longer alice's."""
    moved = config(alice=BOB.export_public_key().decode().strip(),
                   bob=ALICE.export_public_key().decode().strip())
    assert key_problem(moved) == "the key you logged in with was removed from the configuration"


def test_plain_key_no_longer_allowed_from_the_address() -> None:
    """A from= added to the key that excludes the connection's address ends it."""
    line = "from=\"192.168.0.0/16\" " + ALICE.export_public_key().decode().strip()
    assert "no longer allowed from this address" in (key_problem(config(alice=line)) or "")


def test_plain_key_revoked(tmp_path: Path) -> None:
    """A key listed in the revocation file is refused for the open connection too."""
    path = tmp_path / "revoked"
    path.write_text(ALICE.export_public_key().decode())
    assert key_problem(config(), Revocations(str(path))) == "key is revoked"


@pytest.mark.parametrize(("trusted", "revoked", "expected"), [
    (True, "", None),
    (False, "", "certificate signed by an untrusted CA"),
    (True, "serial:5\n", "certificate serial 5 is revoked"),
    (True, "id:laptop\n", "certificate key id is revoked"),
])
def test_certificate_rechecked(tmp_path: Path, trusted: bool, revoked: str,
                               expected: str | None) -> None:
    """A certificate login: CA trust and revocation are judged now, validity at login time."""
    login = time.time()
    cert = CA.generate_user_certificate(ALICE, principals=["alice"], key_id="laptop", serial=5,
                                        valid_after=login - 60, valid_before=login + 60)
    path = tmp_path / "revoked"
    path.write_text(revoked)
    cred = Credential("alice", ALICE.public_data, certificate=cert.public_data, at=login)
    cas = {CA.public_data: "fp"} if trusted else {}
    problem = credential_problem(cred, config=config(), cas=cas, revoked=Revocations(str(path)),
                                 peer_host="10.1.1.1")
    assert problem == expected


def test_revocations_tell_when_the_file_changes(tmp_path: Path) -> None:
    """Revocations.on_change runs when the file is re-read with new contents, not on first load."""
    path = tmp_path / "revoked"
    path.write_text("serial:1\n")
    revoked = Revocations(str(path))
    calls: list[int] = []
    revoked.on_change = lambda: calls.append(1)
    revoked.check_key(b"x")
    assert calls == []
    path.write_text("serial:1\nserial:2\n")
    revoked.check_key(b"x")
    assert calls == [1]
    assert 2 in revoked.serials
