"""TOTP second factor per grant: asked in the session before attach; right, wrong, exhausted."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pyotp

from serialmux.mfa import TotpStore
from tests.support import WAIT, Gateway, PtyVM, User

MFA_GRANT = '[[grants]]\nusers = ["alice"]\nvms = ["web-*"]\nrole = "owner"\nmfa = "totp"'


async def start(tmp_path: Path, users: dict[str, User], vm: PtyVM, *, enrol: bool = True
                ) -> tuple[Gateway, pyotp.TOTP]:
    vm.start()
    uri = (TotpStore(tmp_path / "state").enroll("alice") if enrol
           else pyotp.TOTP(pyotp.random_base32()).provisioning_uri(name="nobody"))
    gw = Gateway(tmp_path, vms={"web-01": vm.port},
                 users={n: users[n] for n in ("alice", "carol")},
                 grants=[(["carol"], ["web-*"], "reader")], extra=MFA_GRANT)
    await gw.start()
    return gw, pyotp.parse_uri(uri)


async def test_right_code_attaches(tmp_path: Path, users: dict[str, User], vm: PtyVM) -> None:
    """The code is asked for before attach; the right one attaches as writer and is audited."""
    gw, totp = await start(tmp_path, users, vm)
    try:
        c = await gw.attach(users["alice"], "web-01")
        await c.wait_out(b"TOTP code for alice on web-01 (attempt 1 of 3): ")
        assert gw.console("web-01").writer is None  # not attached before the code
        c.send(totp.now().encode() + b"\r")
        await c.wait_out(b"connected to web-01 (writer)")
        c.send(b"typed")
        await vm.wait_received(b"typed")
        assert totp.now().encode() not in vm.received  # the code never reaches the guest
        rec = await gw.wait_audit("mfa", user="alice", result="ok")
        assert rec["method"] == "totp"
        await c.close()
    finally:
        await gw.stop()


async def test_wrong_then_right_code(tmp_path: Path, users: dict[str, User], vm: PtyVM) -> None:
    """A wrong code is told and asked again; the right one on the second try attaches."""
    gw, totp = await start(tmp_path, users, vm)
    try:
        c = await gw.attach(users["alice"], "web-01")
        await c.wait_out(b"(attempt 1 of 3)")
        c.send(b"000000\r")
        await c.wait_out(b"wrong code")
        await c.wait_out(b"(attempt 2 of 3)")
        c.send(totp.now().encode() + b"\r")
        await c.wait_out(b"(writer)")
        await c.close()
    finally:
        await gw.stop()


async def test_three_wrong_codes_refuse(tmp_path: Path, users: dict[str, User],
                                        vm: PtyVM) -> None:
    """Three wrong codes end the session without attaching; audited as refused."""
    gw, _ = await start(tmp_path, users, vm)
    try:
        c = await gw.attach(users["alice"], "web-01")
        for attempt in (1, 2, 3):
            await c.wait_out(f"(attempt {attempt} of 3)".encode())
            c.send(b"12345\x7f0\r" if attempt == 1 else b"999999\r")
        assert await c.wait_closed() == 1
        assert b"second factor refused: 3 wrong codes" in c.err
        await gw.wait_audit("mfa", user="alice", result="refused", reason="3 wrong codes")
        assert not [e for e in gw.audit_events if e["event"] == "attach"]
        assert gw.console("web-01").writer is None
    finally:
        await gw.stop()


async def test_no_terminal_is_refused_with_advice(tmp_path: Path, users: dict[str, User],
                                                  vm: PtyVM) -> None:
    """The console subsystem and exec without a PTY cannot answer: refused, told to use -t."""
    gw, _ = await start(tmp_path, users, vm)
    try:
        c = await gw.attach(users["alice"], "web-01", subsystem="console")
        assert await c.wait_closed() == 1
        assert b"use an interactive session" in c.err
        conn = await gw.connect(users["alice"], "web-01")
        result = await conn.run("nmi", encoding=None)
        assert result.exit_status == 1
        assert b"use an interactive session" in result.stderr
        conn.close()
    finally:
        await gw.stop()


async def test_grant_without_mfa_is_not_asked(tmp_path: Path, users: dict[str, User],
                                              vm: PtyVM) -> None:
    """carol's grant has no mfa: she attaches without a prompt."""
    gw, _ = await start(tmp_path, users, vm)
    try:
        c = await gw.attach(users["carol"], "web-01")
        await c.wait_out(b"(read-only)")
        assert b"TOTP" not in c.out
        await c.close()
    finally:
        await gw.stop()


async def test_missing_secret_refuses_with_what_to_do(tmp_path: Path, users: dict[str, User],
                                                      vm: PtyVM) -> None:
    """No enrolled secret: refused, naming the enrolment command."""
    gw, _ = await start(tmp_path, users, vm, enrol=False)
    try:
        c = await gw.attach(users["alice"], "web-01")
        assert await c.wait_closed() == 1
        assert b"serialmux totp-enroll alice" in c.err
    finally:
        await gw.stop()


async def test_command_with_terminal_asks_then_runs(tmp_path: Path, users: dict[str, User],
                                                    vm: PtyVM) -> None:
    """`ssh -t web-01@host status` under an mfa grant asks for the code, then runs."""
    gw, totp = await start(tmp_path, users, vm)
    try:
        conn = await gw.connect(users["alice"], "web-01")
        process = await conn.create_process("status", term_type="xterm", encoding=None)
        out = bytearray()
        async with asyncio.timeout(WAIT):
            while b"TOTP code" not in out:
                out += await process.stdout.read(1024)
            process.stdin.write(totp.now().encode() + b"\r")
            while chunk := await process.stdout.read(1024):
                out += chunk
        await process.wait_closed()
        assert process.exit_status == 0
        assert b"console: " in out
        conn.close()
    finally:
        await gw.stop()


async def test_wrong_codes_lock_out_the_user_and_penalise_the_source(
        tmp_path: Path, users: dict[str, User], vm: PtyVM) -> None:
    """After 3 wrong codes no prompt is given, even on a new channel; the source is penalised."""
    gw, _ = await start(tmp_path, users, vm)
    try:
        c = await gw.attach(users["alice"], "web-01")
        for attempt in (1, 2, 3):
            await c.wait_out(f"(attempt {attempt} of 3)".encode())
            c.send(b"999999\r")
        assert await c.wait_closed() == 1
        failures = [e for e in gw.audit_events if e["event"] == "mfa_failure"]
        assert len(failures) == 3
        # Another channel on the same connection, with the right code ready: no prompt at all.
        process = await c.conn.create_process(term_type="xterm", encoding=None)
        async with asyncio.timeout(WAIT):
            err = await process.stderr.read()
            await process.wait_closed()
        assert b"too many wrong codes for alice" in err
        assert process.exit_status == 1
        await gw.wait_audit("mfa", user="alice", result="refused")
        assert gw.console("web-01").writer is None
        # Each wrong code costs the source penalty_authfail (5 s), like a failed key.
        assert gw.daemon is not None
        left = gw.daemon.gate.penalties["127.0.0.1"].expiry - time.monotonic()
        assert 3 * 5 - 1 < left <= 3 * 5
    finally:
        await gw.stop()


async def test_one_prompt_at_a_time_per_user(tmp_path: Path, users: dict[str, User],
                                             vm: PtyVM) -> None:
    """While alice has a prompt open, a second channel asking for her code is refused."""
    gw, totp = await start(tmp_path, users, vm)
    try:
        c = await gw.attach(users["alice"], "web-01")
        await c.wait_out(b"(attempt 1 of 3)")
        second = await c.conn.create_process(term_type="xterm", encoding=None)
        async with asyncio.timeout(WAIT):
            err = await second.stderr.read()
            await second.wait_closed()
        assert b"another TOTP prompt for alice is open" in err
        assert b"TOTP code" not in err
        c.send(totp.now().encode() + b"\r")
        await c.wait_out(b"connected to web-01 (writer)")
        await c.close()
    finally:
        await gw.stop()
