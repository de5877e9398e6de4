"""Stopping with clients connected, and what a leaving writer leaves behind (on_detach)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncssh

from tests.integration.conftest import GRANTS
from tests.support import WAIT, Client, Gateway, PtyVM, User, gateway

ON_DETACH = {"web-01": 'on_detach = "logout\\r"'}


async def test_stop_closes_every_connection_and_refuses_new_sessions(
        tmp_path: Path, users: dict[str, User], vm: PtyVM) -> None:
    """L7: stop ends `logs -f` and idle connections; none runs a command; serve() waits for them."""
    vm.start()
    gw = Gateway(tmp_path, {"web-01": vm.port},
                 {k: v for k, v in users.items() if k != "mallory"}, GRANTS)
    await gw.start()
    assert gw.daemon is not None
    assert gw._task is not None
    try:
        conn = await gw.connect(users["alice"], "web-01")
        follow = Client(conn, await conn.create_process("logs -f", encoding=None))
        vm.write(b"before the stop\r\n")
        await follow.wait_out(b"before the stop")
        idle = await gw.connect(users["bob"], "web-01")
        async with asyncio.timeout(WAIT):
            assert (await idle.run("who", encoding=None)).exit_status == 0
        gw.daemon.stop()
        try:
            async with asyncio.timeout(WAIT):
                late = await idle.run("status", encoding=None)
        except (asyncssh.Error, OSError):
            pass  # the connection was closed first: also refused
        else:
            assert late.exit_status == 1
            assert b"serialmux is shutting down" in (late.stderr or b"")
        async with asyncio.timeout(WAIT * 2):
            await gw._task
        assert not gw.daemon.connections.servers  # closed before serve() returned
        async with asyncio.timeout(WAIT):
            await idle.wait_closed()
            await conn.wait_closed()
        await follow.wait_out(b"serialmux is shutting down", stream="err")
        await gw.wait_audit("daemon_stop")
    finally:
        await gw.stop()
        await follow.close()


async def test_on_detach_not_sent_is_audited_as_failed(
        tmp_path: Path, users: dict[str, User]) -> None:
    """L6: a writer leaving while the port is down: on_detach audited "failed" with why."""
    async with gateway(tmp_path, vms={"web-01": f"pty:{tmp_path}/no-such-pty"},
                       users={"bob": users["bob"]}, grants=[(["bob"], ["*"], "owner")],
                       vm_extra=ON_DETACH) as gw:
        c = await gw.attach(users["bob"], "web-01")
        await c.wait_out(b"(writer)")
        await c.close()
        rec = await gw.wait_audit("on_detach", user="bob")
        assert rec["result"] == "failed"
        assert "not sent: the console is down" in rec["reason"]
