"""The SSH front under attack and its policy: certificates, limits, disable, on_detach, audit.

Every test runs the real daemon on port 0 with real asyncssh (or OpenSSH)
clients; every wait is bounded and waits on a condition.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from asyncssh.public_key import SSHLocalKeyPair
from structlog.testing import capture_logs

from serialmux import commands
from serialmux.access import Identity
from serialmux.logs import logs_chunks, print_logs
from tests.support import (
    WAIT,
    Gateway,
    PtyVM,
    User,
    gateway,
    openssh_args,
    run_cli,
    ssh_binary,
)

GRANTS = [(["alice"], ["*"], "owner"), (["bob"], ["web-*"], "contributor"),
          (["carol"], ["web-*"], "reader")]


async def wait_for(predicate: Any, timeout: float = WAIT) -> None:
    """Wait until *predicate()* is true, re-checking on each loop turn (no fixed sleeps)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def audited(gw: Gateway, event: str) -> int:
    """How many audit records of *event* the gateway has written so far."""
    return sum(1 for e in gw.audit_events if e["event"] == event)


def cfg(gw: Gateway) -> tuple[str, str]:
    """The --config option pointing at the gateway's file."""
    return ("--config", str(gw.config_path))


def ring_text(gw: Gateway, vm: str) -> bytes:
    """The VM's scrollback as `serialmux logs` prints it (markers included)."""
    out = io.BytesIO()
    assert gw.daemon is not None
    print_logs(logs_chunks(gw.daemon.rings.path(vm), lines=None), out)
    return out.getvalue()


@contextlib.asynccontextmanager
async def started(tmp: Path, vm: PtyVM, users: dict[str, User], **kw: Any
                  ) -> AsyncIterator[Gateway]:
    """A gateway serving web-01 on *vm* with alice/bob/carol and the standard grants."""
    vm.start()
    kw.setdefault("grants", GRANTS)
    async with gateway(tmp, vms={"web-01": vm.port},
                       users={k: v for k, v in users.items() if k != "mallory"}, **kw) as g:
        yield g


# ----------------------------------------------------------------------------
# Certificates


@pytest.fixture
def ca(tmp_path: Path) -> asyncssh.SSHKey:
    """A user CA whose public key is written to tmp/ca.pub."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    (tmp_path / "ca.pub").write_bytes(key.export_public_key())
    (tmp_path / "revoked").write_text("# nothing revoked yet\n")
    return key


CA_EXTRA = '[ssh]\nuser_ca_keys = ["ca.pub"]\nrevoked_keys = "revoked"'


async def cert_connect(gw: Gateway, ca: asyncssh.SSHKey, principals: list[str], login: str,
                       **kw: Any) -> asyncssh.SSHClientConnection:
    """Connect with a fresh key certified by *ca* for *principals*."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    kw.setdefault("key_id", "cert-of-" + ",".join(principals))
    signer = kw.pop("signer", ca)
    cert = signer.generate_user_certificate(key, principals=principals, **kw)
    conn = await asyncssh.connect("127.0.0.1", gw.port, username=login,
                                  client_keys=[(key, cert)], known_hosts=None, agent_path=None)
    gw.conns.append(conn)
    return conn


async def test_certificate_principal_names_the_user(tmp_path: Path, users: dict[str, User],
                                                    vm: PtyVM, ca: asyncssh.SSHKey) -> None:
    """A certificate for principal alice logs in as alice (login = VM); key id+serial audited."""
    async with started(tmp_path, vm, users, extra=CA_EXTRA) as gw:
        conn = await cert_connect(gw, ca, ["alice"], "web-01", serial=4242)
        result = await conn.run("who", encoding=None)
        assert result.exit_status == 0
        rec = await gw.wait_audit("auth_success", user="alice")
        assert (rec["key_id"], rec["serial"]) == ("cert-of-alice", 4242)
        conn.close()


@pytest.mark.parametrize(("principals", "kw", "reason"), [
    ([], {}, "no principals"),
    (["alice"], {"valid_after": time.time() - 7200, "valid_before": time.time() - 60},
     "expired"),
    (["alice"], {"valid_after": time.time() + 3600}, "not yet valid"),
    (["ghost"], {}, "no principal is a configured user"),
    (["alice"], {"serial": 666}, "serial 666 is revoked"),
    (["alice"], {"key_id": "stolen-laptop"}, "key id is revoked"),
    (["alice"], {"signer": "other"}, "untrusted CA"),
])
async def test_bad_certificates_are_refused(tmp_path: Path, users: dict[str, User], vm: PtyVM,
                                            ca: asyncssh.SSHKey, principals: list[str],
                                            kw: dict[str, Any], reason: str) -> None:
    """Empty principals, expired, not yet valid, unknown principal, revoked, wrong CA: refused."""
    (tmp_path / "revoked").write_text("serial:666\nid:stolen-laptop\n")
    if kw.get("signer") == "other":
        kw["signer"] = asyncssh.generate_private_key("ssh-ed25519")
    async with started(tmp_path, vm, users, extra=CA_EXTRA) as gw:
        with pytest.raises(asyncssh.PermissionDenied):
            await cert_connect(gw, ca, principals, "web-01", **kw)
        rec = await gw.wait_audit("auth_failure")
        assert reason in rec["reason"]
        assert not [e for e in gw.audit_events if e["event"] == "auth_success"]


async def test_revoked_plain_key_is_refused(tmp_path: Path, users: dict[str, User],
                                            vm: PtyVM, ca: asyncssh.SSHKey) -> None:
    """A user's own key listed in revoked_keys is refused (file re-read without restart)."""
    async with started(tmp_path, vm, users, extra=CA_EXTRA) as gw:
        (tmp_path / "revoked").write_text(users["bob"].public + "\n")
        with pytest.raises(asyncssh.PermissionDenied):
            await gw.connect(users["bob"], "web-01")
        await gw.wait_audit("auth_failure", reason="key is revoked")


async def test_alice_certificate_cannot_act_as_bob(tmp_path: Path, users: dict[str, User],
                                                   vm: PtyVM, ca: asyncssh.SSHKey) -> None:
    """Identity is the principal: alice's certificate gets alice's grants, never bob's."""
    grants = [(["alice"], ["web-*"], "reader"), (["bob"], ["*"], "owner")]
    async with started(tmp_path, vm, users, extra=CA_EXTRA, grants=grants) as gw:
        conn = await cert_connect(gw, ca, ["alice"], "web-01")
        result = await conn.run("disable --reason x", encoding=None)
        assert result.exit_status == 1
        assert b"needs the owner role" in result.stderr
        conn.close()
        for login in ("bob", "bob@web-01", "web-01+ro"):
            conn = await cert_connect(gw, ca, ["alice"], login)
            result = await conn.run("who", encoding=None)
            conn.close()
            assert (login, result.exit_status) != ("bob", 0)
        refused = [e for e in gw.audit_events if e["event"] == "refused"]
        assert refused
        assert all(e["user"] == "alice" for e in refused)


@pytest.mark.skipif(ssh_binary() is None, reason="needs OpenSSH")
async def test_openssh_client_with_ssh_keygen_certificate(tmp_path: Path,
                                                          users: dict[str, User],
                                                          vm: PtyVM) -> None:
    """OpenSSH's client presents an ssh-keygen certificate; the principal names the user."""
    keygen = ["ssh-keygen", "-q", "-t", "ed25519", "-N", ""]
    for cmd in ([*keygen, "-f", str(tmp_path / "ca")], [*keygen, "-f", str(tmp_path / "id")],
                ["ssh-keygen", "-q", "-s", str(tmp_path / "ca"), "-I", "alice-laptop",
                 "-n", "alice", "-z", "77", "-V", "-5m:+5m", str(tmp_path / "id.pub")]):
        proc = await asyncio.create_subprocess_exec(*cmd)
        assert await proc.wait() == 0
    (tmp_path / "revoked").write_text("")
    async with started(tmp_path, vm, users, extra=CA_EXTRA) as gw:
        user = User("alice", users["alice"].key, tmp_path / "id")
        proc = await asyncio.create_subprocess_exec(
            *openssh_args(gw, user, "web-01", "-o", f"CertificateFile={tmp_path}/id-cert.pub"),
            "who", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _out, err = await asyncio.wait_for(proc.communicate(), WAIT)
        assert proc.returncode == 0, err
        rec = await gw.wait_audit("auth_success", user="alice")
        assert (rec["key_id"], rec["serial"]) == ("alice-laptop", 77)


# ----------------------------------------------------------------------------
# Limits


async def test_fifty_keys_on_one_connection_are_cut_at_max_auth_tries(
        gw: Gateway, users: dict[str, User]) -> None:
    """50 unknown keys offered on one connection: disconnected after MaxAuthTries (6)."""
    keys = [asyncssh.generate_private_key("ssh-ed25519") for _ in range(50)]
    with pytest.raises((asyncssh.PermissionDenied, asyncssh.DisconnectError)):
        await asyncssh.connect("127.0.0.1", gw.port, username="web-01", client_keys=keys,
                               known_hosts=None, agent_path=None)
    limit = await gw.wait_audit("auth_limit")
    failures = [e for e in gw.audit_events
                if e["event"] == "auth_failure" and e["session"] == limit["session"]]
    assert len(failures) == 6


class _BadSigner(SSHLocalKeyPair):
    """A listed public key whose signatures are wrong: someone without the private key."""

    def sign(self, data: bytes) -> bytes:
        signature = super().sign(data)
        return signature[:-1] + bytes([signature[-1] ^ 1])


async def test_bad_signature_on_a_listed_key_counts_as_a_failure(
        gw: Gateway, users: dict[str, User]) -> None:
    """alice's public key with a forged signature is refused and counted (MaxAuthTries,
    penalties) like an unknown key; alice's real key still gets in."""
    forged = _BadSigner(users["alice"].key, None, None, None)
    with pytest.raises(asyncssh.PermissionDenied):
        await asyncssh.connect("127.0.0.1", gw.port, username="web-01", client_keys=[forged],
                               known_hosts=None, agent_path=None)
    rec = await gw.wait_audit("auth_failure", reason="bad signature")
    assert rec["fingerprint"] == users["alice"].key.get_fingerprint("sha256")
    assert rec["attempt"] == 1
    assert not [e for e in gw.audit_events
                if e["event"] == "auth_success" and e["session"] == rec["session"]]
    conn = await gw.connect(users["alice"], "web-01")
    assert (await conn.run("who")).exit_status == 0
    conn.close()


async def failed_login(gw: Gateway, user: User, **kw: Any) -> str:
    """One connection that fails to authenticate; return how it ended."""
    try:
        conn = await asyncssh.connect("127.0.0.1", gw.port, username="web-01",
                                      client_keys=[user.key], known_hosts=None, agent_path=None,
                                      login_timeout=WAIT, **kw)
    except asyncssh.PermissionDenied:
        return "denied"
    except (asyncssh.DisconnectError, ConnectionError, OSError, asyncssh.ConnectionLost):
        return "dropped"
    conn.close()
    await conn.wait_closed()
    return "accepted"


async def test_per_source_penalty_after_many_failures(gw: Gateway,
                                                      users: dict[str, User]) -> None:
    """200 failed logins from one source: penalised (dropped fast); another source is fine."""
    started_at = time.monotonic()
    outcomes = [await failed_login(gw, users["mallory"]) for _ in range(200)]
    elapsed = time.monotonic() - started_at
    # 3 x 5 s reaches the 15 s minimum; the server may see the 3rd close after the 4th opens.
    first_drop = outcomes.index("dropped")
    assert 3 <= first_drop <= 5
    assert set(outcomes[:first_drop]) == {"denied"}
    assert set(outcomes[first_drop:]) == {"dropped"}
    assert elapsed < 30
    rec = await gw.wait_audit("connection_refused")
    assert "penalised" in rec["reason"]
    # alice from the same address is refused too; from 127.0.0.2 she gets in.
    assert await failed_login(gw, users["alice"]) == "dropped"
    conn = await gw.connect(users["alice"], "web-01", local_addr=("127.0.0.2", 0))
    assert (await conn.run("who")).exit_status == 0
    conn.close()


@pytest.mark.parametrize("exempt", [False, True])
async def test_connections_that_never_log_in_penalise_their_source(
        tmp_path: Path, users: dict[str, User], vm: PtyVM, exempt: bool) -> None:
    """20 connections closed before any login (a scanner) lock their address out, as
    sshd's noauth penalty does; another address, or one in penalty_exempt, gets in."""
    extra = '[ssh]\npenalty_exempt = ["127.0.0.1", "10.0.0.0/8"]' if exempt else ""
    async with started(tmp_path, vm, users, extra=extra) as gw:
        for n in range(1, 21):  # one at a time: MaxStartups never drops one
            await close_all(await open_silent(1, gw.port))
            await wait_for(lambda n=n: audited(gw, "disconnect")
                           + audited(gw, "connection_refused") >= n)
        assert await failed_login(gw, users["alice"]) == ("accepted" if exempt else "dropped")
        if exempt:
            assert audited(gw, "connection_refused") == 0
        else:
            assert audited(gw, "disconnect") >= 15  # 1 s each: refused only past the 15 s minimum
            rec = await gw.wait_audit("connection_refused")
            assert "penalised" in rec["reason"]
        conn = await gw.connect(users["alice"], "web-01", local_addr=("127.0.0.2", 0))
        assert (await conn.run("who")).exit_status == 0
        conn.close()


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])


async def open_silent(n: int, port: int, host: str = "127.0.0.1"
                      ) -> list[asyncio.StreamWriter]:
    """Open *n* TCP connections that never send an SSH banner."""
    writers = []
    for _ in range(n):
        _, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(host, 0))
        writers.append(writer)
    return writers


async def close_all(writers: list[asyncio.StreamWriter]) -> None:
    for w in writers:
        w.close()
    for w in writers:
        with contextlib.suppress(OSError):
            await w.wait_closed()


async def test_max_startups_caps_silent_connections_and_recovers(
        tmp_path: Path, users: dict[str, User], vm: PtyVM) -> None:
    """300 banner-less connections: at most 100 held, the rest dropped; login timeout frees
    them, a real user gets in, and fds and memory return to the baseline."""
    async with started(tmp_path, vm, users, extra="[ssh]\nlogin_timeout = 3") as gw:
        assert gw.daemon is not None
        gate = gw.daemon.gate
        probe = await gw.connect(users["alice"], "web-01")  # warm up the code paths
        probe.close()
        await probe.wait_closed()
        await wait_for(lambda: gate.unauthenticated == 0)
        fds, rss = fd_count(), rss_kib()
        flood = await open_silent(300, gw.port)
        await wait_for(lambda: audited(gw, "connection_refused") + gate.unauthenticated >= 300)
        assert 10 <= gate.unauthenticated <= 100
        assert audited(gw, "connection_refused") >= 200
        # The daemon frees the held ones itself (login timeout), clients still silent.
        await wait_for(lambda: gate.unauthenticated == 0, timeout=WAIT + 3)
        # Each timed-out connection cost its source the noauth penalty, so the
        # flooding address is refused for a while; alice comes from another one.
        assert gate.penalties["127.0.0.1"].active
        conn = await gw.connect(users["alice"], "web-01", local_addr=("127.0.0.2", 0))
        assert (await conn.run("who")).exit_status == 0
        conn.close()
        await conn.wait_closed()
        gw.conns.remove(conn)
        await close_all(flood)
        await wait_for(lambda: fd_count() <= fds + 2)
        assert rss_kib() - rss < 32 * 1024
        assert gate.per_source == {}
        assert gate.unauthenticated == 0


async def test_per_source_max_startups_keeps_other_sources_in(
        tmp_path: Path, users: dict[str, User], vm: PtyVM) -> None:
    """With per_source_max_startups, one flooding address cannot lock others out."""
    extra = "[ssh]\nper_source_max_startups = 5"
    async with started(tmp_path, vm, users, extra=extra) as gw:
        assert gw.daemon is not None
        gate = gw.daemon.gate
        flood = await open_silent(300, gw.port)
        await wait_for(lambda: audited(gw, "connection_refused") >= 295)
        assert gate.per_source == {"127.0.0.1": 5}
        conn = await gw.connect(users["alice"], "web-01", local_addr=("127.0.0.2", 0))
        assert (await conn.run("who")).exit_status == 0
        conn.close()
        await close_all(flood)
        await wait_for(lambda: gate.unauthenticated == 0)


class Proxy:
    """A TCP relay that can freeze: the client 'vanishes' without closing its socket."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.frozen = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _client(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.target)
        self.writers += [w, uw]
        for src, dst in ((r, uw), (ur, w)):
            task = asyncio.create_task(self._pipe(src, dst))
            self.tasks.add(task)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                if self.frozen.is_set():
                    await asyncio.Event().wait()  # swallow: the peer hears nothing more
                dst.write(data)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for w in self.writers:
            w.close()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def test_keepalive_frees_a_vanished_writer(tmp_path: Path, users: dict[str, User],
                                                 vm: PtyVM) -> None:
    """A writer whose network vanishes is dropped by keepalives; on_detach reaches the guest."""
    extra = "[ssh]\nkeepalive_interval = 0.3\nkeepalive_count_max = 2"
    async with started(tmp_path, vm, users, extra=extra,
                       vm_extra={"web-01": 'on_detach = "logout\\r"'}) as gw:
        proxy = Proxy(gw.port)
        port = await proxy.start()
        conn = await asyncssh.connect("127.0.0.1", port, username="web-01",
                                      client_keys=[users["alice"].key], known_hosts=None,
                                      agent_path=None)
        process = await conn.create_process(term_type="xterm", encoding=None)
        await gw.wait_audit("attach", user="alice")
        proxy.frozen.set()
        await vm.wait_received(b"logout\r")
        assert gw.console("web-01").writer is None
        await gw.wait_audit("detach", user="alice")
        process.close()
        conn.abort()
        await proxy.close()


# ----------------------------------------------------------------------------
# Groups, enable / disable


async def test_group_grant_gives_members_the_role(tmp_path: Path, users: dict[str, User],
                                                  vm: PtyVM) -> None:
    """A grant to a group makes its members writers; non-members get nothing."""
    extra = ('[groups]\nops = ["carol"]\n[[grants]]\ngroups = ["ops"]\nvms = ["web-*"]\n'
             'role = "contributor"')
    async with started(tmp_path, vm, users, extra=extra,
                       grants=[(["alice"], ["db-*"], "owner")]) as gw:
        c = await gw.attach(users["carol"], "web-01")
        await c.wait_out(b"(writer)")
        c.send(b"via group")
        await vm.wait_received(b"via group")
        await c.close()
        a = await gw.attach(users["alice"], "web-01")
        assert await a.wait_closed() == 1
        assert b"access denied" in a.err


async def test_disable_while_attached_persists_and_enable(tmp_path: Path,
                                                         users: dict[str, User],
                                                         vm: PtyVM) -> None:
    """An owner disables over SSH: attached sessions are told and closed, new ones refused
    with since-when and why, across a restart; contributors cannot; enable reopens."""
    async with started(tmp_path, vm, users) as gw:
        watcher = await gw.attach(users["carol"], "web-01")
        await watcher.wait_out(b"(read-only)")
        bob = await gw.connect(users["bob"], "web-01")
        denied = await bob.run('disable --reason "not me"', encoding=None)
        assert denied.exit_status == 1
        assert b"needs the owner role" in denied.stderr
        alice = await gw.connect(users["alice"], "web-01")
        result = await alice.run('disable --reason "kernel upgrade, back at 14:00"',
                                 encoding=None)
        assert result.exit_status == 0
        await watcher.wait_out(b"console disabled by alice: kernel upgrade, back at 14:00")
        assert await watcher.wait_closed() == 1
        await gw.wait_audit("disable", user="alice", vm="web-01")
    async with started(tmp_path, vm, users) as gw:
        refused = await gw.attach(users["bob"], "web-01")
        assert await refused.wait_closed() == 1
        assert re.search(rb"console web-01 is disabled: kernel upgrade, back at 14:00 "
                         rb"\(by alice at \d{4}-\d\d-\d\dT\d\d:\d\d", refused.err)
        alice = await gw.connect(users["alice"], "web-01")
        assert (await alice.run("enable")).exit_status == 0
        ok = await gw.attach(users["bob"], "web-01")
        await ok.wait_out(b"(writer)")
        await ok.close()


async def test_a_disabled_console_refuses_actions_until_enabled(
        tmp_path: Path, users: dict[str, User], vm: PtyVM) -> None:
    """Disabled, a console refuses actions (sysrq, break) over SSH and from the host's CLI,
    audited and with no action marker in the ring; enabled again, break goes through."""
    async with started(tmp_path, vm, users) as gw:
        alice = await gw.connect(users["alice"], "web-01")
        assert (await alice.run('disable --reason "maintenance"')).exit_status == 0
        bob = await gw.connect(users["bob"], "web-01")
        over_ssh = await bob.run("sysrq h", encoding=None)
        assert over_ssh.exit_status == 1
        assert b"console web-01 is disabled: maintenance" in over_ssh.stderr
        await gw.wait_audit("command", action="sysrq", user="bob", result="refused")
        local = await run_cli("break", "web-01", *cfg(gw))
        assert local.status == 1
        assert "console web-01 is disabled: maintenance" in local.err
        await gw.wait_audit("command", action="break", result="refused")
        assert b"sent by" not in ring_text(gw, "web-01")
        assert (await alice.run("enable")).exit_status == 0
        again = await bob.run("break", encoding=None)
        assert again.exit_status == 0, again.stderr
        assert b"BREAK sent by bob" in ring_text(gw, "web-01")


async def test_server_enabled_false_refuses_everything(tmp_path: Path, users: dict[str, User],
                                                       vm: PtyVM) -> None:
    """[server] enabled = false: every attach is refused with the reason."""
    async with started(tmp_path, vm, users, extra="enabled = false") as gw:
        c = await gw.attach(users["alice"], "web-01")
        assert await c.wait_closed() == 1
        assert b"disabled for all VMs: disabled in the configuration" in c.err


async def read_through(gw: Gateway, vm: str, count: int) -> None:
    """Wait until *vm*'s console has read *count* bytes (each chunk is in the ring by then)."""
    console = gw.console(vm)
    async with asyncio.timeout(WAIT):
        while console.bytes_read < count:
            await console.backlog.wait_beyond(console.backlog.end)


async def test_vm_enabled_false_refuses_attaches_and_enable_cannot_lift_it(
        tmp_path: Path, users: dict[str, User], vm: PtyVM) -> None:
    """[vms.NAME] enabled = false: output is still read into the ring, SSH and local attaches
    are refused saying so, and enable (CLI or SSH) clears a runtime disable but fails naming
    the file and key; disabled.json never holds the configuration's disable."""
    async with started(tmp_path, vm, users, vm_extra={"web-01": "enabled = false"}) as gw:
        vm.write(b"booting while disabled\r\n")
        await read_through(gw, "web-01", 24)
        assert b"booting while disabled" in ring_text(gw, "web-01")
        refused = await gw.attach(users["alice"], "web-01")
        assert await refused.wait_closed() == 1
        assert (b"console web-01 is disabled: disabled in the configuration "
                b"([vms.web-01] enabled = false)") in refused.err
        local = await run_cli("attach", "web-01", *cfg(gw))
        assert local.status == 1
        assert "console web-01 is disabled: disabled in the configuration" in local.err
        assert (await run_cli("disable", "web-01", "--reason", "also", *cfg(gw))).status == 0
        result = await run_cli("enable", "web-01", *cfg(gw))
        assert result.status == 1
        assert (f"web-01 stays disabled: [vms.web-01] enabled = false in {gw.config_path}"
                in result.err)
        await gw.wait_audit("enable", vm="web-01", result="refused")
        state = json.loads((tmp_path / "state" / "disabled.json").read_text())
        assert state == {"all": None, "vms": {}}  # the runtime "also" was cleared
        alice = await gw.connect(users["alice"], "web-01")
        over_ssh = await alice.run("enable", encoding=None)
        assert over_ssh.exit_status == 1
        assert b"[vms.web-01] enabled = false" in over_ssh.stderr
        again = await gw.attach(users["alice"], "web-01")
        assert await again.wait_closed() == 1
        assert b"disabled in the configuration" in again.err


async def test_server_enabled_false_is_not_written_to_disabled_json(
        tmp_path: Path, users: dict[str, User], vm: PtyVM) -> None:
    """[server] enabled = false stays out of disabled.json (so setting it true and restarting
    lifts it), and enable (all) fails saying it needs the config changed and a restart."""
    async with started(tmp_path, vm, users, extra="enabled = false") as gw:
        assert (await run_cli("disable", "web-01", *cfg(gw))).status == 0
        state = json.loads((tmp_path / "state" / "disabled.json").read_text())
        assert state["all"] is None
        result = await run_cli("enable", *cfg(gw))
        assert result.status == 1
        assert "every VM stays disabled: [server] enabled = false in" in result.err
        assert "restart serialmux" in result.err


async def test_enable_vm_fails_while_server_enabled_is_false(
        tmp_path: Path, users: dict[str, User], vm: PtyVM) -> None:
    """[server] enabled = false: enable VM clears the VM's runtime entry, then fails (exit 1,
    audited refused) naming the file and key and that a restart is needed; attaches stay
    refused."""
    async with started(tmp_path, vm, users, extra="enabled = false") as gw:
        assert (await run_cli("disable", "web-01", *cfg(gw))).status == 0
        result = await run_cli("enable", "web-01", *cfg(gw))
        assert result.status == 1
        assert (f"web-01 stays disabled: [server] enabled = false in {gw.config_path} "
                "disables every VM; set it to true there, then restart serialmux") in result.err
        await gw.wait_audit("enable", vm="web-01", result="refused",
                            reason="[server] enabled = false in the configuration")
        state = json.loads((tmp_path / "state" / "disabled.json").read_text())
        assert state == {"all": None, "vms": {}}
        c = await gw.attach(users["alice"], "web-01")
        assert await c.wait_closed() == 1
        assert b"disabled for all VMs: disabled in the configuration" in c.err


async def test_server_enabled_changed_by_a_reload_waits_for_a_restart(
        tmp_path: Path, users: dict[str, User], vm: PtyVM) -> None:
    """A reload that flips [server] enabled does not apply it, not even at the next disable
    and enable of all VMs: the value the daemon started with holds until a restart."""
    async with started(tmp_path, vm, users) as gw:
        assert gw.daemon is not None
        gw.extra = "enabled = false"
        gw.config_path.write_text(gw.toml())
        assert await gw.daemon.reload("test")
        assert (await run_cli("disable", *cfg(gw))).status == 0
        result = await run_cli("enable", *cfg(gw))
        assert result.status == 0, result.err
        assert gw.daemon.disabling.all_vms is None
        ok = await gw.attach(users["alice"], "web-01")
        await ok.wait_out(b"(writer)")
        await ok.close()
    async with started(tmp_path, vm, users, extra="enabled = false") as gw:
        assert gw.daemon is not None
        gw.extra = ""
        gw.config_path.write_text(gw.toml())
        assert await gw.daemon.reload("test")
        result = await run_cli("enable", *cfg(gw))
        assert result.status == 1
        assert "every VM stays disabled: [server] enabled = false in" in result.err
        assert "restart serialmux" in result.err
        refused = await gw.attach(users["alice"], "web-01")
        assert await refused.wait_closed() == 1
        assert b"disabled for all VMs: disabled in the configuration" in refused.err


@pytest.mark.parametrize(("contents", "error"), [
    ('["web-01"]', "the top level is an array, not an object"),
    ('"everything"', "the top level is a string, not an object"),
    ('{"all": 5, "vms": []}', '"all" is a number, not a string; ignored'),
    ("[" * 200_000, "nested too deeply to parse"),
], ids=["array", "string", "all-not-a-string", "nested-too-deep"])
async def test_disabled_json_of_the_wrong_shape_is_logged_and_ignored(
        contents: str, error: str, tmp_path: Path, users: dict[str, User], vm: PtyVM) -> None:
    """A disabled.json that is valid JSON but not an object, whose "all" is not a string, or
    that is nested deeper than the parser recurses, is logged naming the file and saying
    what is wrong, and read as empty: the daemon starts and serves."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "disabled.json").write_text(contents)
    with capture_logs() as logs:
        async with started(tmp_path, vm, users) as gw:
            c = await gw.attach(users["alice"], "web-01")
            await c.wait_out(b"(writer)")
            await c.close()
    unreadable = [e for e in logs if e["event"] == "disabled_state_unreadable"]
    assert [(e["path"], e["error"]) for e in unreadable] == [(str(state / "disabled.json"), error)]


# ----------------------------------------------------------------------------
# When the writer leaves


ON_DETACH = {"web-01": 'on_detach = "logout\\r"'}


async def test_on_detach_on_takeover_and_disconnect(tmp_path: Path, users: dict[str, User],
                                                    vm: PtyVM) -> None:
    """on_detach reaches the guest when the writer is displaced and when it disconnects."""
    async with started(tmp_path, vm, users, vm_extra=ON_DETACH) as gw:
        first = await gw.attach(users["alice"], "web-01")
        await gw.wait_audit("attach", user="alice")
        second = await gw.attach(users["bob"], "web-01")
        await vm.wait_received(b"logout\r")
        await gw.wait_audit("on_detach", user="alice", reason="displaced")
        await first.wait_closed()
        await second.close()
        await gw.wait_audit("on_detach", user="bob")
        await vm.wait_received(b"logout\rlogout\r")
        assert ring_text(gw, "web-01").count(b"on_detach sent after") == 2


async def test_idle_timeout_disconnects_writer_and_sends_on_detach(
        tmp_path: Path, users: dict[str, User], vm: PtyVM) -> None:
    """A writer who types nothing for idle_timeout is disconnected; the guest gets on_detach."""
    vm_extra = {"web-01": 'on_detach = "logout\\r"\nidle_timeout = 0.5'}
    async with started(tmp_path, vm, users, vm_extra=vm_extra) as gw:
        watcher = await gw.attach(users["carol"], "web-01")
        c = await gw.attach(users["alice"], "web-01")
        await c.wait_out(b"(writer)")
        c.send(b"x")
        await vm.wait_received(b"x")
        await c.wait_out(b"idle for 0.5 s: disconnected")
        assert await c.wait_closed() == 1
        await vm.wait_received(b"xlogout\r")
        rec = await gw.wait_audit("idle_timeout", user="alice")
        assert rec["result"] == "disconnected"
        await gw.wait_audit("detach", user="alice", reason="idle timeout")
        ring = ring_text(gw, "web-01")
        assert b"alice idle for 0.5 s: disconnected" in ring
        assert b"on_detach sent" in ring
        assert not watcher.closed  # watchers are never idle-kicked
        await watcher.close()


# ----------------------------------------------------------------------------
# Redaction


async def test_redaction_in_ring_not_in_live_view(tmp_path: Path, users: dict[str, User],
                                                  vm: PtyVM) -> None:
    """A secret split across two reads reaches the live view intact and the ring redacted."""
    rules = 'redact = [{name = "aws", pattern = "AKIA[0-9A-Z]{16}"}]'
    async with started(tmp_path, vm, users, vm_extra={"web-01": rules},
                       extra='redact = ["hunter[0-9]"]') as gw:
        c = await gw.attach(users["alice"], "web-01+replay=0")
        await c.wait_out(b"(writer)")
        vm.write(b"export KEY=AKIAABCDEF")
        await c.wait_out(b"AKIAABCDEF")  # a separate read of the port
        vm.write(b"GHIJKLMNOP done\r\npw hunter2\r\n")
        await c.wait_out(b"pw hunter2")
        assert b"AKIAABCDEFGHIJKLMNOP" in c.out
        await wait_for(lambda: b"pw [redacted:secret]" in ring_text(gw, "web-01"))
        ring = ring_text(gw, "web-01")
        assert b"export KEY=[redacted:aws] done" in ring
        assert b"AKIA" not in ring
        assert b"hunter2" not in ring
        vm.write(b"Password: ")  # no newline: flushed to the ring by the timer
        await wait_for(lambda: b"Password: " in ring_text(gw, "web-01"))
        await c.close()


# ----------------------------------------------------------------------------
# Audit


REQUIRED = {"id", "index", "time", "event"}
PER_EVENT = {
    "connect": {"session", "peer"},
    "auth_success": {"session", "peer", "user", "fingerprint", "result"},
    "auth_failure": {"session", "peer", "fingerprint", "reason", "result"},
    "attach": {"session", "peer", "user", "vm", "fingerprint", "result"},
    "detach": {"session", "peer", "user", "vm", "bytes_in", "bytes_out", "duration", "reason"},
    "takeover": {"session", "peer", "user", "vm", "previous_user", "previous_session"},
    "refused": {"session", "peer", "user", "vm", "reason"},
    "command": {"session", "peer", "user", "vm", "action", "result"},
    "disable": {"session", "user", "vm", "reason", "result"},
    "enable": {"session", "user", "vm", "result"},
    "disconnect": {"session", "peer"},
}


async def test_every_audit_event_is_json_with_its_fields(tmp_path: Path,
                                                         users: dict[str, User],
                                                         vm: PtyVM) -> None:
    """Each event of a busy scenario parses as JSON with id, index, UTC time and its facts;
    console bytes never appear; user strings are escaped and capped; SIGUSR1 reopens."""
    audit = tmp_path / "audit.log"
    async with started(tmp_path, vm, users, extra=f'audit_file = "{audit}"') as gw:
        a = await gw.attach(users["alice"], "web-01")
        await a.wait_out(b"(writer)")
        a.send(b"TYPED-BY-ALICE-0xfeed\r")
        vm.write(b"PRINTED-BY-GUEST-0xbeef\r\n")
        await a.wait_out(b"PRINTED-BY-GUEST-0xbeef")
        a.process.channel.send_break(100)
        await a.wait_out(b"BREAK sent")
        b = await gw.attach(users["bob"], "web-01")
        await a.wait_closed()
        await b.close()
        with pytest.raises(asyncssh.PermissionDenied):
            await gw.connect(users["mallory"], "web-01" + "A" * 500)
        owner = await gw.connect(users["alice"], "web-01")
        await owner.run("\x1b]0;owned\x07" + "B" * 500)
        await owner.run("disable --reason 'audit test'")
        await owner.run("enable")
        owner.close()
        await gw.wait_audit("detach", user="bob")
        # rotation: move the file away, SIGUSR1, new events land in a new file
        rotated = tmp_path / "audit.log.1"
        audit.rename(rotated)
        os.kill(os.getpid(), signal.SIGUSR1)
        await wait_for(audit.exists)
        c = await gw.attach(users["carol"], "web-01")
        await c.wait_out(b"(read-only)")
        await c.close()
        await gw.wait_audit("detach", user="carol")
    assert gw.daemon is not None
    gw.daemon.audit.close()
    lines = rotated.read_text().splitlines()
    new_lines = audit.read_text().splitlines()
    assert any('"user":"carol"' in line for line in new_lines)
    records = [json.loads(line) for line in lines + new_lines]
    assert [r["index"] for r in records] == sorted(r["index"] for r in records)
    assert len({r["id"] for r in records}) == len(records)
    seen = set()
    for rec in records:
        assert rec.keys() >= REQUIRED, rec
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rec["time"])
        missing = PER_EVENT.get(rec["event"], set()) - rec.keys()
        assert not missing, (rec["event"], missing)
        seen.add(rec["event"])
    assert set(PER_EVENT) <= seen, set(PER_EVENT) - seen
    text = "\n".join(lines + new_lines)
    assert "TYPED-BY-ALICE" not in text
    assert "PRINTED-BY-GUEST" not in text
    login = next(r["login"] for r in records if r.get("login", "").startswith("web-01A"))
    assert len(login) <= 200
    command = next(r["command"] for r in records if r.get("command", "").startswith("\\x1b"))
    assert "\x1b" not in command
    assert "\x07" not in command
    assert len(command) <= 200


# ----------------------------------------------------------------------------
# What is never offered


@pytest.mark.skipif(shutil.which("ssh-agent") is None, reason="needs ssh-agent")
async def test_agent_and_x11_forwarding_are_refused(gw: Gateway, users: dict[str, User],
                                                    tmp_path: Path) -> None:
    """X11 forwarding is refused; an agent forwarding request is ignored (no agent path)."""
    sock = tmp_path / "agent.sock"
    agent = await asyncio.create_subprocess_exec("ssh-agent", "-D", "-a", str(sock),
                                                 stdout=asyncio.subprocess.DEVNULL)
    await wait_for(sock.exists)
    conn = await asyncssh.connect("127.0.0.1", gw.port, username="web-01",
                                  client_keys=[users["alice"].key], known_hosts=None,
                                  agent_path=str(tmp_path / "agent.sock"), agent_forwarding=True)
    gw.conns.append(conn)
    with pytest.raises(asyncssh.ChannelOpenError, match="X11"):
        await conn.create_process(term_type="xterm", x11_forwarding=True,
                                  x11_display="127.0.0.1:99")
    process = await conn.create_process(term_type="xterm", encoding=None)
    await gw.wait_audit("attach", user="alice")
    assert gw.daemon is not None
    (session,) = gw.daemon.sessions
    assert session.process.channel.get_agent_path() is None
    assert session.process.channel.get_x11_display() is None
    process.close()
    agent.terminate()
    await agent.wait()


async def test_forwarding_and_foreign_subsystems_are_refused_and_audited(
        gw: Gateway, users: dict[str, User], tmp_path: Path) -> None:
    """TCP and UNIX forwarding (both directions) and an sftp or unknown subsystem are refused,
    each audited as `refused` with the user, the login's VM and what was asked."""
    conn = await gw.connect(users["bob"], "web-01+ro")
    sock = str(tmp_path / "fwd.sock")
    with pytest.raises(asyncssh.ChannelOpenError):
        await conn.open_connection("127.0.0.1", 22)
    with pytest.raises(asyncssh.ChannelListenError):
        await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", 1)
    with pytest.raises(asyncssh.ChannelOpenError):
        await conn.open_unix_connection(sock)
    with pytest.raises(asyncssh.ChannelListenError):
        await conn.forward_remote_path(sock, sock)
    with pytest.raises((asyncssh.ChannelOpenError, asyncssh.SFTPError)):
        await conn.start_sftp_client()
    other = await conn.create_process(subsystem="netconf", encoding=None)
    async with asyncio.timeout(WAIT):
        await other.wait_closed()
    assert other.exit_status == 1
    asked = [("direct-tcpip", "127.0.0.1:22"), ("tcpip-forward", "127.0.0.1:0"),
             ("direct-streamlocal@openssh.com", sock),
             ("streamlocal-forward@openssh.com", sock), ("subsystem", "sftp")]
    for request, target in asked:
        rec = await gw.wait_audit("refused", request=request, target=target)
        assert (rec["user"], rec["vm"]) == ("bob", "web-01"), rec
        assert rec["session"]
        assert rec["peer"].startswith("127.0.0.1:")
        assert "not offered" in rec["reason"]
    await gw.wait_audit("refused", user="bob", vm="web-01", reason="subsystem 'netconf'")


@pytest.mark.skipif(ssh_binary() is None, reason="needs OpenSSH")
async def test_openssh_exec_of_a_shell_command_is_refused(gw: Gateway,
                                                          users: dict[str, User]) -> None:
    """OpenSSH `ssh host /bin/sh -c ...` gets no shell: usage error, nothing run."""
    proc = await asyncio.create_subprocess_exec(
        *openssh_args(gw, users["alice"], "web-01"), "/bin/sh", "-c", "id",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), WAIT)
    assert proc.returncode == 2
    assert b"there is no shell here" in err
    assert not out


# ----------------------------------------------------------------------------
# ssh-audit


SSH_AUDIT = Path(sys.executable).with_name("ssh-audit")


@pytest.mark.skipif(not SSH_AUDIT.exists(), reason="pip install ssh-audit (test extra)")
async def test_ssh_audit_finds_no_failures_and_strict_kex(gw: Gateway) -> None:
    """ssh-audit reports no 'fail' findings and the server offers strict key exchange."""
    proc = await asyncio.create_subprocess_exec(
        str(SSH_AUDIT), "-j", "-p", str(gw.port), "127.0.0.1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, _err = await asyncio.wait_for(proc.communicate(), WAIT * 3)
    report = json.loads(out)
    kex = [k["algorithm"] for k in report["kex"]]
    assert "kex-strict-s-v00@openssh.com" in kex
    failures = [(section, item["algorithm"], item["notes"]["fail"])
                for section in ("kex", "key", "enc", "mac")
                for item in report.get(section, []) if item.get("notes", {}).get("fail")]
    assert not failures, failures
    assert not report.get("cves"), report.get("cves")


# ----------------------------------------------------------------------------
# Review findings: disable --all, reasons, logs -f, MaxSessions, +ro actions


async def test_disable_all_needs_owner_of_every_vm(tmp_path: Path, users: dict[str, User],
                                                   vm: PtyVM) -> None:
    """disable/enable --all by an owner of only some VMs is refused, saying why; nothing changes."""
    other = PtyVM()
    vm.start()
    other.start()
    grants = [(["alice"], ["web-01"], "owner"), (["bob"], ["*"], "owner")]
    try:
        async with gateway(tmp_path, vms={"web-01": vm.port, "db-01": other.port},
                           users={n: users[n] for n in ("alice", "bob")}, grants=grants) as gw:
            held = await gw.attach(users["bob"], "db-01")
            await held.wait_out(b"connected to db-01")
            conn = await gw.connect(users["alice"], "web-01")
            for command in ("disable --all --reason pwned", "enable --all"):
                result = await conn.run(command, encoding=None)
                assert result.exit_status == 1
                assert b"--all needs the owner role on every VM" in result.stderr
            await gw.wait_audit("refused", user="alice", command="disable", vm="*")
            assert gw.daemon is not None
            assert gw.daemon.disabling.all_vms is None
            assert not held.closed
            bob = await gw.connect(users["bob"], "web-01")
            result = await bob.run("disable --all --reason maintenance", encoding=None)
            assert result.exit_status == 0
            assert await held.wait_closed() == 1
            assert (await bob.run("enable --all", encoding=None)).exit_status == 0
    finally:
        other.close()


@pytest.mark.parametrize("reason", ["\x1b]0;owned\x07\x1b[2J", "line\nbreak", "x" * 201])
async def test_disable_reason_must_be_short_printable_text(gw: Gateway, users: dict[str, User],
                                                          reason: str) -> None:
    """--reason with control characters or over 200 characters is a usage error; nothing done."""
    conn = await gw.connect(users["alice"], "web-01")
    result = await conn.run(f"disable --reason {shlex.quote(reason)}", encoding=None)
    assert result.exit_status == 2
    assert b"printable text of at most 200 characters" in result.stderr
    assert gw.console("web-01").disabled is None


async def test_disable_reason_shown_to_others_is_escaped(gw: Gateway,
                                                         users: dict[str, User]) -> None:
    """A reason with escapes (control socket, old state file) reaches others escaped, cut short."""
    assert gw.daemon is not None
    gw.daemon.disabling.disable("web-01", "\x1b[2Jgone" + "y" * 300, Identity(
        user="root", fingerprint="", peer="local", session_id="t", local=True))
    c = await gw.attach(users["bob"], "web-01")
    assert await c.wait_closed() == 1
    assert b"\\x1b[2Jgone" in c.err
    assert b"\x1b" not in c.err
    assert len(c.err) < 400
    status = await (await gw.connect(users["alice"], "web-01")).run("status", encoding=None)
    assert b"\x1b" not in status.stdout
    assert b"disabled: \\x1b[2Jgone" in status.stdout


async def test_logs_follow_is_capped_and_never_starves_reload(
        tmp_path: Path, users: dict[str, User], vm: PtyVM) -> None:
    """4 logs -f per user (a 5th is refused, saying so); 12 follows leave reload working."""
    grants = [(["alice", "bob", "carol"], ["*"], "reader")]
    async with started(tmp_path, vm, users, grants=grants) as gw:
        procs = []
        for name in ("alice", "bob", "carol"):
            conn = await gw.connect(users[name], "web-01")
            procs += [await conn.create_process("logs -f", encoding=None) for _ in range(4)]
            if name == "carol":
                fifth = await conn.run("logs -f", encoding=None)
                assert fifth.exit_status == 1
                assert b"too many follows open (at most 4 per user" in fifth.stderr
        await wait_for(lambda: sum(commands._follows.values()) == 12)
        assert gw.daemon is not None
        async with asyncio.timeout(WAIT):
            assert await gw.daemon.reload("test")
        for p in procs:
            p.stdin.write_eof()
        async with asyncio.timeout(WAIT):
            for p in procs:
                await p.wait_closed()
        await wait_for(lambda: not commands._follows)


async def test_logs_reads_stdin_in_bounded_chunks() -> None:
    """logs watches stdin for EOF reading at most 4096 bytes at a time, discarding them."""
    asked: list[int] = []
    chunks = [b"x" * 4096] * 3 + [b""]

    class Stdin:
        async def read(self, n: int = -1) -> bytes:
            asked.append(n)
            return chunks.pop(0)

    class Process:
        stdin = Stdin()

    await commands._wait_eof(Process())
    assert asked == [commands.STDIN_CHUNK] * 4
    assert commands.STDIN_CHUNK == 4096


async def test_max_sessions_per_connection(tmp_path: Path, users: dict[str, User],
                                           vm: PtyVM) -> None:
    """A connection holds at most max_sessions session channels; the next is refused, saying so."""
    async with started(tmp_path, vm, users, extra="[ssh]\nmax_sessions = 3") as gw:
        conn = await gw.connect(users["carol"], "web-01")
        procs = [await conn.create_process(encoding=None) for _ in range(3)]
        with pytest.raises(asyncssh.ChannelOpenError, match="at most 3 sessions per connection"):
            await conn.create_process(encoding=None)
        await gw.wait_audit("refused", reason="MaxSessions: 3 sessions open", user="carol",
                            vm="web-01", request="session")
        procs[0].close()
        await procs[0].wait_closed()

        async def reopened() -> asyncssh.SSHClientProcess[bytes]:
            while True:
                try:
                    return await conn.create_process(encoding=None)
                except asyncssh.ChannelOpenError:
                    await asyncio.sleep(0.01)  # the server sees the close a moment later

        async with asyncio.timeout(WAIT):
            procs[0] = await reopened()
        for p in procs:
            p.close()


async def test_read_only_session_cannot_break_sysrq_nmi_or_reset(gw: Gateway,
                                                                 users: dict[str, User],
                                                                 vm: PtyVM) -> None:
    """An owner's +ro session is refused BREAK, SysRq, NMI and reset (escapes, SSH break)."""
    c = await gw.attach(users["alice"], "web-01+ro")
    await c.wait_out(b"(read-only)")
    for keys, action in ((b"\x1db", "break"), (b"\x1dsh", "sysrq"), (b"\x1dny", "nmi"),
                         (b"\x1dry", "reset")):
        c.send(keys)
        await c.wait_out(f"read-only session (+ro): {action} not sent".encode())
        await gw.wait_audit("command", user="alice", action=action, result="refused",
                            reason="read-only session (+ro)")
    c.process.channel.send_break(100)
    await wait_for(lambda: len([e for e in gw.audit_events if e["event"] == "command"
                                and e.get("action") == "break"]) == 2)
    assert not [e for e in gw.audit_events if e["event"] == "command" and e["result"] != "refused"]
    assert b"BREAK sent" not in ring_text(gw, "web-01")
    await c.close()
