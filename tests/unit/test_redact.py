"""Redaction of guest output for the ring: rules, chunk boundaries, bounded holdback."""

from __future__ import annotations

import pytest

from serialmux.redact import Redactor, RedactRule, parse_rules

AWS = RedactRule("aws", r"AKIA[0-9A-Z]{16}")
KEY = b"AKIAABCDEFGHIJKLMNOP"


def run(r: Redactor, chunks: list[bytes]) -> bytes:
    return b"".join(r.feed(c) for c in chunks) + r.flush()


def test_match_is_replaced_with_rule_name() -> None:
    """A match becomes [redacted:NAME]; the rest of the line is kept."""
    assert run(Redactor((AWS,)), [b"key=" + KEY + b" ok\n"]) == b"key=[redacted:aws] ok\n"


@pytest.mark.parametrize("cut", range(1, len(KEY)))
def test_secret_split_across_reads_is_caught(cut: int) -> None:
    """A secret split at any byte across two reads is still redacted."""
    out = run(Redactor((AWS,)), [b"x " + KEY[:cut], KEY[cut:] + b" y\n"])
    assert out == b"x [redacted:aws] y\n"


def test_secret_split_in_one_byte_reads_is_caught() -> None:
    """Byte-at-a-time output (a slow serial line) is redacted too."""
    data = b"token " + KEY + b"\r\n"
    assert run(Redactor((AWS,)), [bytes([b]) for b in data]) == b"token [redacted:aws]\r\n"


def test_complete_lines_are_released_at_once() -> None:
    """Nothing is held back after a newline."""
    r = Redactor((AWS,))
    assert r.feed(b"line one\nline tw") == b"line one\n"
    assert r.pending == len(b"line tw")


def test_holdback_is_bounded_and_still_catches_a_secret_in_the_window() -> None:
    """A line without newline is released past HOLD, keeping WINDOW bytes to catch secrets."""
    r = Redactor((AWS,), hold=64, window=32)
    out = r.feed(b"a" * 100)
    assert r.pending <= 64
    assert len(out) >= 36
    out += r.feed(KEY[:10])
    out += r.feed(KEY[10:] + b"z" * 100)
    out += r.flush()
    assert KEY not in out
    assert b"[redacted:aws]" in out
    assert r.pending == 0


def test_unnamed_rules_and_tables_parse() -> None:
    """Strings get the name 'secret'; tables give name and pattern."""
    rules = parse_rules(["pass(word)?=\\S+", {"name": "aws", "pattern": "AKIA[0-9A-Z]{16}"}])
    assert [r.name for r in rules] == ["secret", "aws"]
    assert run(Redactor(rules), [b"password=hunter2\n"]) == b"[redacted:secret]\n"


@pytest.mark.parametrize(("value", "message"), [
    (["("], "invalid regex"),
    (["x*"], "matches the empty string"),
    ([{"name": "a b", "pattern": "x"}], "name must be"),
    ([{"pattern": "x", "colour": "red"}], "unknown key 'colour'"),
    ([3], "must be a regex string or a table"),
])
def test_bad_rules_are_refused(value: object, message: str) -> None:
    """Invalid regexes, empty matches, bad names and unknown keys are config errors."""
    with pytest.raises(ValueError, match=message):
        parse_rules(value)
