"""Redaction of secrets in guest output before it reaches the scrollback ring.

``redact`` rules (``[server] redact`` for every VM, ``[vms.NAME] redact`` for
one) are regular expressions over bytes. A match is replaced by
``[redacted:NAME]`` in what is written to the ring (and so in ``logs`` and the
replay on attach); the live view is never changed, so the person at the
console sees what the guest printed.

Limits (documented in docs/security.md):

* Output is redacted line by line: a match never spans a newline, and output
  is held back until its line ends. A line that grows past ``HOLD`` bytes is
  released except its last ``WINDOW`` bytes, so a secret split across reads
  is caught when it is at most ``WINDOW`` bytes long.
* Held-back output is flushed after ``FLUSH_AFTER`` seconds without a newline
  (a prompt such as ``Password:``); a secret whose parts arrive further apart
  than that is not caught.

Pure code: the owner (:class:`serialmux.console.Console`) runs the flush timer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

HOLD = 4096
WINDOW = 256
FLUSH_AFTER = 1.0
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,32}")


@dataclass(frozen=True, slots=True)
class RedactRule:
    """One named pattern."""

    name: str
    pattern: str

    def compiled(self) -> re.Pattern[bytes]:
        """The pattern as a bytes regex (raises :class:`re.error`)."""
        return re.compile(self.pattern.encode("utf-8"))


def parse_rules(value: object) -> tuple[RedactRule, ...]:
    """Parse ``["regex", {name = "aws", pattern = "..."}]``; raises ValueError naming the item."""
    if isinstance(value, str | dict):
        value = [value]
    if not isinstance(value, list):
        raise ValueError("must be a list of regexes or {name = ..., pattern = ...} tables")
    rules: list[RedactRule] = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            rule = RedactRule("secret", item)
        elif isinstance(item, dict):
            unknown = set(item) - {"name", "pattern"}
            if unknown:
                raise ValueError(f"item {i}: unknown key {sorted(unknown)[0]!r}; "
                                 "use name and pattern")
            name, pattern = item.get("name", "secret"), item.get("pattern")
            if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
                raise ValueError(f"item {i}: name must be 1-32 of A-Z a-z 0-9 . _ -")
            if not isinstance(pattern, str):
                raise ValueError(f"item {i}: pattern is required and must be a string")
            rule = RedactRule(name, pattern)
        else:
            raise ValueError(f"item {i}: must be a regex string or a table")
        try:
            compiled = rule.compiled()
        except re.error as exc:
            raise ValueError(f"item {i}: invalid regex {rule.pattern!r}: {exc}") from None
        if compiled.search(b""):
            raise ValueError(f"item {i}: regex {rule.pattern!r} matches the empty string")
        rules.append(rule)
    return tuple(rules)


class Redactor:
    """Feed guest output in; get redacted output for the ring out, with bounded holdback."""

    def __init__(self, rules: tuple[RedactRule, ...], *, hold: int = HOLD,
                 window: int = WINDOW) -> None:
        self._rules = [(r.compiled(), f"[redacted:{r.name}]".encode()) for r in rules]
        self._hold = hold
        self._window = window
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes held back, waiting for their line to end."""
        return len(self._buf)

    def feed(self, data: bytes) -> bytes:
        """Take *data*; return what may go to the ring now (possibly empty)."""
        self._buf += data
        cut = self._buf.rfind(b"\n") + 1
        if len(self._buf) - cut > self._hold:
            cut = len(self._buf) - self._window
            # Never release part of a match that is already complete.
            tail_line = self._buf.rfind(b"\n", 0, cut) + 1
            for regex, _ in self._rules:
                for m in regex.finditer(self._buf, tail_line):
                    if m.start() < cut < m.end():
                        cut = m.start()
        if cut <= 0:
            return b""
        out = bytes(self._buf[:cut])
        del self._buf[:cut]
        return self.redact(out)

    def flush(self) -> bytes:
        """Release everything held (timer, marker, shutdown), redacted."""
        out = bytes(self._buf)
        self._buf.clear()
        return self.redact(out) if out else b""

    def redact(self, data: bytes) -> bytes:
        """Apply every rule to *data*, line by line."""
        lines = data.split(b"\n")
        for regex, label in self._rules:
            lines = [regex.sub(label, line) for line in lines]
        return b"\n".join(lines)
