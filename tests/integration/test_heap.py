"""The daemon's heap (serialmux.heap): frozen once ready, and what a removal left reclaimed."""

from __future__ import annotations

import asyncio
import gc
import weakref
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from tests.support import WAIT, PtyVM, User, gateway, make_user


def _tracked(obj: object) -> bool:
    """Whether a full collection would walk *obj* (frozen objects are not in get_objects)."""
    return any(o is obj for o in gc.get_objects())


async def test_once_ready_the_consoles_are_frozen_and_stay_so_until_stop(tmp_path: Path) -> None:
    """serve's daemon freezes its heap once ready: full collections no longer walk the
    consoles; after stop the heap is thawed again."""
    vm = PtyVM()
    alice: User = make_user("alice", tmp_path)
    async with gateway(tmp_path, vms={"web-01": vm.port}, users={"alice": alice},
                       grants=[(["alice"], ["*"], "owner")], freeze_heap=True) as gw:
        assert gw.daemon is not None
        console = gw.daemon.consoles["web-01"]
        assert gc.get_freeze_count() > 0
        assert not _tracked(console)
        assert not _tracked(console.port)
    assert gc.get_freeze_count() == 0
    assert _tracked(console)
    vm.close()


async def test_a_console_removed_by_reload_is_reclaimed_by_one_later_pass(tmp_path: Path) -> None:
    """A console removed by a reload lives in reference cycles among frozen objects: one
    thaw-collect-freeze pass after the removal frees it, and the heap is frozen again."""
    vms = {"web-01": PtyVM(), "web-02": PtyVM()}
    alice = make_user("alice", tmp_path)
    refrozen = asyncio.Event()

    def heard(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
        if event["event"] == "heap_refrozen":
            refrozen.set()
        return event

    async with gateway(tmp_path, vms={n: v.port for n, v in vms.items()},
                       users={"alice": alice}, grants=[(["alice"], ["*"], "owner")],
                       freeze_heap=True) as gw:
        assert gw.daemon is not None
        gw.daemon.heap.refreeze_after = 0.05
        removed = weakref.ref(gw.daemon.consoles["web-02"])
        kept = gw.daemon.consoles["web-01"]
        with capture_logs(processors=[heard]):
            gw.vms = {"web-01": vms["web-01"].port}
            gw.config_path.write_text(gw.toml())
            assert await gw.daemon.reload("test")
            async with asyncio.timeout(WAIT):
                await refrozen.wait()
        assert removed() is None
        assert gw.daemon.heap.refreezes == 1
        assert gc.get_freeze_count() > 0
        assert not _tracked(kept)
    for v in vms.values():
        v.close()
