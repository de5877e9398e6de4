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
