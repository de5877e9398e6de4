"""actions.Repeats: a session's repeated identical refusals are audited sparingly."""

from __future__ import annotations

from typing import Any

from serialmux.actions import Repeats
from serialmux.log import Audit


def test_repeated_refusals_are_audited_sparingly_and_add_up() -> None:
    """Repeats: the first 3 identical refusals in full, then one summary per interval carrying
    suppressed=N, and flush() the rest; the events' counts add up to the refusals."""
    audit = Audit()
    events: list[dict[str, Any]] = []
    audit.listeners.append(events.append)
    now = [0.0]
    repeats = Repeats(audit, clock=lambda: now[0])
    for i in range(1000):
        now[0] = i * 0.5  # 500 s in all: 8 intervals of 60 s
        repeats.event("command", action="break", result="refused", reason="role too low")
    repeats.event("command", action="nmi", result="refused", reason="role too low")
    repeats.flush()
    breaks = [e for e in events if e["action"] == "break"]
    assert len(breaks) <= Repeats.FREE + 500 / Repeats.INTERVAL + 1
    assert sum(int(e.get("suppressed", 1)) for e in breaks) == 1000
    assert next(e for e in events if e["action"] == "nmi").get("suppressed") is None


def test_refusals_with_different_arguments_are_counted_apart() -> None:
    """A refused sysrq b, s and c are three kinds, each audited with its own key: a summary
    never folds one key's refusals into another's (b, a reboot, vanished behind c)."""
    audit = Audit()
    events: list[dict[str, Any]] = []
    audit.listeners.append(events.append)
    repeats = Repeats(audit, clock=lambda: 0.0)
    for key in "hhhhbsc":
        repeats.event("command", action="sysrq", arg=key, result="refused", reason="role too low")
    repeats.flush()
    assert sorted({e["arg"] for e in events}) == ["b", "c", "h", "s"]
    counts = {k: sum(int(e.get("suppressed", 1)) for e in events if e["arg"] == k) for k in "hbsc"}
    assert counts == {"h": 4, "b": 1, "s": 1, "c": 1}
