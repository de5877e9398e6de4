"""Tests for serialmux.escape: the in-band escape parser."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from serialmux.escape import (
    HELP_TEXT,
    Action,
    Cancelled,
    Command,
    Confirm,
    EscapeParser,
    Event,
    Unknown,
    help_text,
)

ESC = 0x1D


def merged(events: list[Event]) -> list[Event]:
    """Join adjacent bytes items, so events split across feeds compare equal."""
    out: list[Event] = []
    for ev in events:
        if isinstance(ev, bytes) and out and isinstance(out[-1], bytes):
            out[-1] = out[-1] + ev
        else:
            out.append(ev)
    return out


def feed_all(data: bytes, cuts: list[int]) -> list[Event]:
    """Feed data split at the given offsets and return all events."""
    parser = EscapeParser()
    events: list[Event] = []
    last = 0
    for cut in sorted(set(cuts)):
        events += parser.feed(data[last:cut])
        last = cut
    events += parser.feed(data[last:])
    return events


def strip_escapes(data: bytes) -> bytes:
    """A reference model: the bytes a VM should receive from data (independent of the parser)."""
    out = bytearray()
    i = 0
    while i < len(data):
        b = data[i]
        if b != ESC:
            out.append(b)
            i += 1
            continue
        if i + 1 >= len(data):
            break
        key = data[i + 1]
        if key == ESC:
            out.append(ESC)
            i += 2
        elif key in b"nrs":
            i += 3  # the key plus the answer / SysRq key
        else:
            i += 2
    return bytes(out)


# Inputs rich in the bytes that matter to the parser.
interesting = st.lists(
    st.one_of(st.sampled_from([ESC, *b".?bnrsyYxq0\r"]), st.integers(0, 255)),
    max_size=60,
).map(bytes)


@given(data=interesting, cuts=st.lists(st.integers(0, 60), max_size=8))
def test_split_anywhere_same_events(data: bytes, cuts: list[int]) -> None:
    """Any input split at any points gives the same events as fed whole."""
    whole = EscapeParser().feed(data)
    assert merged(feed_all(data, cuts)) == whole


@given(data=interesting)
def test_pass_through_is_input_minus_sequences(data: bytes) -> None:
    """The pass-through bytes are exactly the input with escape sequences removed."""
    events = EscapeParser().feed(data)
    passed = b"".join(ev for ev in events if isinstance(ev, bytes))
    assert passed == strip_escapes(data)


@given(data=interesting)
def test_feed_coalesces_pass_through(data: bytes) -> None:
    """One feed never returns two adjacent bytes items, nor an empty one."""
    events = EscapeParser().feed(data)
    for a, b in itertools.pairwise(events):
        assert not (isinstance(a, bytes) and isinstance(b, bytes))
    assert all(ev for ev in events if isinstance(ev, bytes))


@given(data=st.binary(max_size=200).filter(lambda d: ESC not in d))
def test_plain_chunk_returned_as_is(data: bytes) -> None:
    """A chunk with no escape byte comes back as [data], the same object."""
    events = EscapeParser().feed(data)
    if data:
        assert len(events) == 1
        assert events[0] is data
    else:
        assert events == []


def test_double_escape_is_one_literal() -> None:
    """Escape char twice yields one literal 0x1d, joined with the text around it."""
    assert EscapeParser().feed(b"a\x1d\x1db") == [b"a\x1db"]


@pytest.mark.parametrize(
    ("key", "action"),
    [(b".", Action.DISCONNECT), (b"?", Action.HELP), (b"b", Action.BREAK)],
)
def test_immediate_commands(key: bytes, action: Action) -> None:
    """^]. ^]? and ^]b yield their command at once, between the surrounding text."""
    parser = EscapeParser()
    assert parser.feed(b"ab\x1d" + key + b"cd") == [b"ab", Command(action), b"cd"]
    assert not parser.pending


@pytest.mark.parametrize(("key", "action"), [(b"n", Action.NMI), (b"r", Action.RESET)])
@pytest.mark.parametrize("answer", [b"y", b"Y"])
def test_confirmed_yes(key: bytes, action: Action, answer: bytes) -> None:
    """^]n / ^]r ask to confirm, and y or Y runs the command, swallowing the answer."""
    parser = EscapeParser()
    assert parser.feed(b"\x1d" + key) == [Confirm(action)]
    assert parser.pending
    assert parser.feed(answer + b"ls") == [Command(action, confirmed=True), b"ls"]
    assert not parser.pending


@pytest.mark.parametrize(("key", "action"), [(b"n", Action.NMI), (b"r", Action.RESET)])
def test_action_without_confirmation_comes_at_once_unconfirmed(key: bytes,
                                                               action: Action) -> None:
    """^]n / ^]r when the session takes them out of `confirm` (no hypervisor): an unconfirmed
    Command at once, to be refused, and the next byte is typing, not an answer."""
    parser = EscapeParser()
    parser.confirm = frozenset()
    assert parser.feed(b"\x1d" + key + b"y") == [Command(action, confirmed=False), b"y"]
    assert not parser.pending


@pytest.mark.parametrize(("key", "action"), [(b"n", Action.NMI), (b"r", Action.RESET)])
@pytest.mark.parametrize("answer", [b"n", b"\r", b"\x1d", b"x"])
def test_confirmed_no(key: bytes, action: Action, answer: bytes) -> None:
    """Anything but y/Y after a confirmation cancels, and that byte is swallowed."""
    events = EscapeParser().feed(b"\x1d" + key + answer + b"z")
    assert events == [Confirm(action), Cancelled(action), b"z"]


def test_sysrq_key() -> None:
    """^]s K yields Command(SYSRQ, K) with no confirmation."""
    assert EscapeParser().feed(b"\x1dsh") == [Command(Action.SYSRQ, "h")]
    assert EscapeParser().feed(b"\x1ds9") == [Command(Action.SYSRQ, "9")]


@pytest.mark.parametrize("key", [b"H", b"!", b"\r", b"\x1d"])
def test_sysrq_invalid_key_cancels(key: bytes) -> None:
    """A SysRq key outside [0-9a-z] cancels and is swallowed."""
    assert EscapeParser().feed(b"\x1ds" + key + b"x") == [Cancelled(Action.SYSRQ), b"x"]


def test_unknown_key_dropped() -> None:
    """^] followed by a meaningless key yields Unknown and does not pass the key on."""
    assert EscapeParser().feed(b"a\x1dxb") == [b"a", Unknown(ord("x")), b"b"]


def test_state_carries_across_feeds() -> None:
    """An escape at the end of one chunk applies to the first byte of the next."""
    parser = EscapeParser()
    assert parser.feed(b"ls\x1d") == [b"ls"]
    assert parser.pending
    assert parser.feed(b"s") == []
    assert parser.pending
    assert parser.feed(b"bmore") == [Command(Action.SYSRQ, "b"), b"more"]
    assert not parser.pending


def test_custom_escape_char() -> None:
    """A parser built with another escape character uses that one and passes 0x1d."""
    parser = EscapeParser(escape=0x01)
    assert parser.feed(b"\x1d.\x01.") == [b"\x1d.", Command(Action.DISCONNECT)]


def test_help_lists_every_escape() -> None:
    """HELP_TEXT uses CRLF line endings and names every escape key."""
    lines = HELP_TEXT.split("\r\n")
    assert lines[-1] == ""
    assert "\n" not in HELP_TEXT.replace("\r\n", "")
    for key in [".", "?", "b", "s", "n", "r"]:
        assert any(line.strip().startswith(f"^] {key}") for line in lines), key
    assert any(line.strip().startswith("^] ^]") for line in lines)
    assert "^A ." in help_text(0x01)
