"""A changed ``revoked_keys`` file cuts the open connections it revokes, with nobody logging in.

The daemon looks at the file every ``connections.REVOCATION_CHECK_INTERVAL`` seconds (a
stat); nothing else happens between the edit and the cut: no login, no new channel, no
reload. Real daemon on port 0, real asyncssh clients, a real PTY VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import asyncssh

from serialmux import connections
from serialmux.auth import Revocations
from tests.support import WAIT, Gateway, PtyVM, User, gateway

GRANTS = [(["alice"], ["*"], "owner"), (["bob"], ["web-*"], "contributor")]
EXTRA = '[ssh]\nuser_ca_keys = ["ca.pub"]\nrevoked_keys = "revoked"'
# The cut comes within one check interval; the rest is slack for a loaded machine.
CUT_WITHIN = connections.REVOCATION_CHECK_INTERVAL + WAIT


@contextlib.asynccontextmanager
async def started(tmp: Path, vm: PtyVM, users: dict[str, User]
                  ) -> AsyncIterator[tuple[Gateway, asyncssh.SSHKey]]:
    """A gateway for alice and bob trusting a fresh CA, with an empty revocation file."""
    ca = asyncssh.generate_private_key("ssh-ed25519")
    (tmp / "ca.pub").write_bytes(ca.export_public_key())
    (tmp / "revoked").write_text("# nothing revoked yet\n")
    vm.start()
    async with gateway(tmp, vms={"web-01": vm.port},
                       users={k: users[k] for k in ("alice", "bob")}, grants=GRANTS,
                       extra=EXTRA) as gw:
        yield gw, ca


async def closed(conn: asyncssh.SSHClientConnection) -> None:
    """Wait until the daemon has closed *conn*."""
    async with asyncio.timeout(CUT_WITHIN):
        await conn.wait_closed()


async def test_revoked_key_disconnects_its_open_session(tmp_path: Path, users: dict[str, User],
                                                        vm: PtyVM) -> None:
    """Appending bob's key to revoked_keys tells and cuts his writer session; alice stays."""
    async with started(tmp_path, vm, users) as (gw, _):
        bob = await gw.attach(users["bob"], "web-01")
        await bob.wait_out(b"(writer)")
        alice = await gw.attach(users["alice"], "web-01+ro")
        await alice.wait_out(b"(read-only)")
        with (tmp_path / "revoked").open("a") as f:
            f.write(users["bob"].public + "\n")
        await bob.wait_out(b"disconnected: key is revoked (revocation list changed)",
                           timeout=CUT_WITHIN)
        await closed(bob.conn)
        rec = await gw.wait_audit("access_revoked", user="bob")
        assert (rec["trigger"], rec["result"]) == ("revocation list changed", "disconnected")
        assert rec["fingerprint"] == users["bob"].key.get_fingerprint("sha256")
        assert not [e for e in gw.audit_events
                    if e["event"] == "access_revoked" and e.get("user") == "alice"]
        vm.write(b"alice still watches\r\n")
        await alice.wait_out(b"alice still watches")
        assert not alice.closed
        await alice.close()


async def test_revoked_ca_disconnects_its_certificates(tmp_path: Path, users: dict[str, User],
                                                       vm: PtyVM) -> None:
    """A CA key put in revoked_keys (file replaced by rename) cuts idle connections it signed."""
    async with started(tmp_path, vm, users) as (gw, ca):
        key = asyncssh.generate_private_key("ssh-ed25519")
        cert = ca.generate_user_certificate(key, "bob-laptop", principals=["bob"], serial=9)
        certified = await asyncssh.connect(
            "127.0.0.1", gw.port, username="web-01", client_keys=[(key, cert)],
            known_hosts=None, agent_path=None)
        gw.conns.append(certified)
        alice = await gw.connect(users["alice"], "web-01")
        assert (await certified.run("who", encoding=None)).exit_status == 0
        new = tmp_path / "revoked.new"
        new.write_text(ca.export_public_key().decode())
        os.replace(new, tmp_path / "revoked")
        await closed(certified)
        rec = await gw.wait_audit("access_revoked", user="bob")
        assert (rec["key_id"], rec["serial"]) == ("bob-laptop", 9)
        assert rec["reason"] == "signing CA: key is revoked"
        assert (await alice.run("who", encoding=None)).exit_status == 0


def test_revocations_notice_a_replaced_file_and_ignore_same_contents(tmp_path: Path) -> None:
    """A file renamed into place is stale even at equal size; a rewrite to equal contents
    re-checks nobody (no on_change), new contents do."""
    path = tmp_path / "revoked"
    path.write_text("serial:1\n")
    revoked = Revocations(str(path))
    calls: list[int] = []
    revoked.on_change = lambda: calls.append(1)
    assert not revoked.stale(revoked.stamp())
    new = tmp_path / "revoked.new"
    new.write_text("serial:1\n")
    os.replace(new, path)
    assert revoked.stale(revoked.stamp())
    revoked.refresh()
    assert calls == []
    assert not revoked.stale(revoked.stamp())
    new.write_text("serial:2\n")
    os.replace(new, path)
    revoked.refresh()
    assert calls == [1]
    assert revoked.serials == {2}


async def test_a_revocation_file_made_unusable_fails_closed_the_same_every_way(
        tmp_path: Path, users: dict[str, User], vm: PtyVM) -> None:
    """A malformed line in revoked_keys (meant to revoke bob): the watcher cuts the open
    sessions as a reload would (it left them, while a reload cut them), new logins are
    refused, and check-config and reload say the file is unusable (they said OK)."""
    from tests.support import run_cli

    async with started(tmp_path, vm, users) as (gw, _):
        bob = await gw.attach(users["bob"], "web-01")
        await bob.wait_out(b"(writer)")
        with (tmp_path / "revoked").open("a") as f:
            f.write(users["bob"].public + "\nserial:abc\n")
        await bob.wait_out(b"revocation list unusable", timeout=CUT_WITHIN)
        await closed(bob.conn)
        try:
            late = await gw.connect(users["alice"], "web-01")
        except asyncssh.PermissionDenied:
            pass
        else:
            late.close()
            raise AssertionError("a login went through an unusable revocation list")
        check = await run_cli("check-config", str(gw.config_path))
        assert check.status == 1
        assert "revoked_keys is unusable" in check.err
        assert "serial: needs a decimal" in check.err
        reload = await run_cli("reload", "--config", str(gw.config_path))
        assert reload.status == 1, reload
        assert "serialmux: problem: [ssh] revoked_keys is unusable" in reload.err
