"""The gateway's exec commands over real SSH: usage errors, audit, limits, disable's reason."""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.support import WAIT, Gateway, PtyVM, User, gateway, openssh_args

pytestmark = pytest.mark.timeout(60)


async def wait_for(predicate: Any, timeout: float = WAIT) -> None:
    """Wait until *predicate()* is true; the loop runs meanwhile (the daemon is in it)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def commands_of(gw: Gateway, **match: Any) -> list[dict[str, Any]]:
    """The `command` audit events so far with the given fields."""
    return [e for e in gw.audit_events
            if e["event"] == "command" and all(e.get(k) == v for k, v in match.items())]


@pytest.mark.parametrize(("command", "user"), [
    ("logs", "carol"), ("who", "carol"), ("status", "carol"), ("help", "carol"),
])
async def test_every_exec_command_is_audited_with_its_vm(gw: Gateway, users: dict[str, User],
                                                        command: str, user: str) -> None:
    """logs, who, status and help each write one `command` event naming the VM and result."""
    conn = await gw.connect(users[user], "web-01")
    result = await conn.run(command, encoding=None)
    assert result.exit_status == 0
    rec = await gw.wait_audit("command", action=command, user=user)
    assert rec["vm"] == "web-01"
    assert rec["result"] == "ok"
    assert {"session", "peer"} <= rec.keys()
    assert len(commands_of(gw, action=command)) == 1


@pytest.mark.parametrize("command", ["kick", "disable --reason x", "enable"])
async def test_owner_commands_refused_for_lower_roles_are_audited(
        gw: Gateway, users: dict[str, User], command: str) -> None:
    """kick, disable and enable by a contributor exit 1 and are audited as refused commands."""
    conn = await gw.connect(users["bob"], "web-01")
    result = await conn.run(command, encoding=None)
    assert result.exit_status == 1
    assert b"needs the owner role" in result.stderr
    name = command.split()[0]
    rec = await gw.wait_audit("command", action=name, user="bob", result="refused")
    assert rec["vm"] == "web-01"
    assert "owner role" in rec["reason"]


async def test_exec_action_is_audited_once(gw: Gateway, users: dict[str, User]) -> None:
    """An exec `break` writes exactly one `command` event (actions.perform's), not two."""
    conn = await gw.connect(users["alice"], "web-01")
    result = await conn.run("break", encoding=None)
    await gw.wait_audit("command", action="break", user="alice")
    assert result.exit_status in (0, 1)
    await (await gw.connect(users["alice"], "web-01")).run("who", encoding=None)
    await gw.wait_audit("command", action="who", user="alice")
    assert len(commands_of(gw, action="break")) == 1


@pytest.mark.parametrize("command", [
    "logs --lines abc", "logs --lines 1e9", "logs --lines", "logs --since", "kick --user",
    "disable --reason",
])
async def test_bad_option_value_ends_only_that_command(gw: Gateway, users: dict[str, User],
                                                      command: str) -> None:
    """A bad or missing option value is a usage error (exit 2, argparse's words on stderr,
    audited as refused); the connection and its interactive console session carry on."""
    conn = await gw.connect(users["alice"], "web-01")
    console = await conn.create_process(term_type="xterm", encoding=None)
    await gw.wait_audit("attach", user="alice")
    result = await asyncio.wait_for(conn.run(command, encoding=None), WAIT)
    name = command.split()[0]
    assert result.exit_status == 2
    assert result.stderr.startswith(f"serialmux: {name}: argument ".encode()), result.stderr
    rec = await gw.wait_audit("command", action=name, user="alice", result="refused")
    assert rec["reason"].startswith(f"{name}: argument ")
    assert not console.stdout.at_eof()
    assert (await asyncio.wait_for(conn.run("who", encoding=None), WAIT)).exit_status == 0
    assert not [e for e in gw.audit_events if e["event"] == "detach"]
    console.close()


@pytest.mark.parametrize(("login", "words"), [
    ("web-01+replay=\u1369", b"replay takes a number of lines in ASCII digits"),
    ("web-01+replay=1000000", b"replay=1000000 is out of range: replay=N takes 0 to 100000"),
    ("web-01+replay=" + "9" * 40, b"replay=999999999999\xe2\x80\xa6 is out of range"),
])
async def test_bad_replay_value_is_refused_and_says_why(gw: Gateway, users: dict[str, User],
                                                       login: str, words: bytes) -> None:
    """+replay= with a non-ASCII digit or out of range is refused (exit 2, audited) and says
    the range; the connection stays up."""
    conn = await gw.connect(users["carol"], login)
    for _ in range(2):  # the first refusal leaves the connection usable
        result = await asyncio.wait_for(conn.run("who", encoding=None), WAIT)
        assert result.exit_status == 2
        assert words in result.stderr, result.stderr
    rec = await gw.wait_audit("refused", user="carol")
    assert "replay" in rec["reason"]


@pytest.mark.skipif(shutil.which("ssh") is None, reason="OpenSSH client not installed")
@pytest.mark.parametrize("words", [["kernel", "upgrade"], ["kernel upgrade"]])
async def test_disable_reason_of_several_words_over_openssh(gw: Gateway, users: dict[str, User],
                                                           words: list[str]) -> None:
    """ssh VM@host disable --reason kernel upgrade (OpenSSH joins its words with spaces): the
    reason is the rest of the words."""
    args = [*openssh_args(gw, users["alice"], "web-01", "-n"), "disable", "--reason", *words]
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(WAIT * 2):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert b"disabled web-01: kernel upgrade" in out
    await gw.wait_audit("disable", vm="web-01", reason="kernel upgrade")


async def test_all_refusal_does_not_count_vms_without_a_grant(tmp_path: Path,
                                                             users: dict[str, User]) -> None:
    """disable/enable --all by an owner of some VMs is refused without saying how many VMs
    there are that the user has no grant on."""
    vms = [PtyVM() for _ in range(3)]
    try:
        for v in vms:
            v.start()
        async with gateway(tmp_path, vms=dict(zip(("web-01", "db-01", "db-02"),
                                                  (v.port for v in vms), strict=True)),
                           users={"alice": users["alice"]},
                           grants=[(["alice"], ["web-01"], "owner")]) as gw:
            conn = await gw.connect(users["alice"], "web-01")
            for command in ("disable --all --reason x", "enable --all"):
                result = await conn.run(command, encoding=None)
                assert result.exit_status == 1
                assert b"--all needs the owner role on every VM" in result.stderr
                assert not re.search(rb"\d", result.stderr), result.stderr
            await gw.wait_audit("command", action="disable", result="refused")
    finally:
        for v in vms:
            v.close()


async def test_sysrq_with_a_bad_key_is_a_usage_error(gw: Gateway, users: dict[str, User]) -> None:
    """`sysrq Z` exits 2 with the valid keys, as every other usage error does (it exited 1),
    and is audited as refused; nothing is sent."""
    conn = await gw.connect(users["alice"], "web-01")
    result = await asyncio.wait_for(conn.run("sysrq Z", encoding=None), WAIT)
    assert result.exit_status == 2
    assert result.stderr == (b"serialmux: sysrq: sysrq takes one key: 0-9 or a-z "
                             b"(e.g. 'h' for help)\n")
    await gw.wait_audit("command", action="sysrq", user="alice", result="refused")
    conn.close()
