"""A second factor per grant: TOTP (RFC 6238, pyotp), asked for inside the session.

asyncssh offers no "partial success" (publickey, then keyboard-interactive),
so the code is asked for in the SSH session, after the key and before attach
or command, on the client's terminal. Sessions without a terminal (the
``console`` subsystem, ``ssh host cmd`` without ``-t``) are refused with a
message saying to use an interactive session.

Secrets live in ``state_dir/totp/USER`` (base32, one line), the directory
0700 and each file 0600 and owned by the daemon's user; a file readable by
anyone else is refused, as sshd refuses a loose ``authorized_keys``. A code is
accepted once: the time step last used per user is remembered (in memory), so
a code seen over someone's shoulder cannot be replayed in the same 30 s.

Guessing is throttled (:class:`Throttle`): wrong codes are counted per user
and per source address, across channels and connections; past
``FREE_FAILURES`` the user (or source) is refused for ``LOCKOUT_FIRST``
seconds, doubling with each further wrong code up to ``LOCKOUT_MAX``. Only one
prompt per user is open at a time, so parallel channels do not multiply the
tries.

Enrolment: ``serialmux totp-enroll USER`` (see docs/security.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyotp

from .auth import check_private_file
from .config import check_name

MAX_TRIES = 3
CODE_TIMEOUT = 60.0  # seconds to type a code
ISSUER = "serialmux"
FREE_FAILURES = 3  # wrong codes (per user, per source) before the first lockout
LOCKOUT_FIRST = 30.0  # seconds; doubles with each further wrong code
LOCKOUT_MAX = 900.0
MAX_TRACKED = 65536  # users + sources remembered; then the stale ones are dropped


@dataclass(slots=True)
class _Failures:
    count: int = 0
    until: float = 0.0  # refused before this time
    last: float = 0.0


class Throttle:
    """Count wrong codes per user and per source; refuse while one of them is locked out.

    Plain synchronous code with an injectable clock, so it is tested without a loop.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._failures: dict[str, _Failures] = {}
        self._prompting: set[str] = set()

    def locked(self, user: str, source: str) -> float:
        """Seconds *user* (or *source*) must still wait before a code is asked; 0 if none."""
        now = self._clock()
        left = 0.0
        for key in (f"user:{user}", f"source:{source}"):
            entry = self._failures.get(key)
            if entry is not None:
                if entry.until <= now and now - entry.last > LOCKOUT_MAX:
                    del self._failures[key]  # forgiven after a quiet LOCKOUT_MAX
                else:
                    left = max(left, entry.until - now)
        return left

    def failed(self, user: str, source: str) -> None:
        """Count one wrong code against *user* and *source*."""
        now = self._clock()
        if len(self._failures) >= MAX_TRACKED:
            for key in [k for k, e in self._failures.items()
                        if e.until <= now and now - e.last > LOCKOUT_MAX]:
                del self._failures[key]
        for key in (f"user:{user}", f"source:{source}"):
            entry = self._failures.setdefault(key, _Failures())
            entry.count += 1
            entry.last = now
            if entry.count >= FREE_FAILURES:
                lock = LOCKOUT_FIRST * 2 ** min(entry.count - FREE_FAILURES, 16)
                entry.until = now + min(lock, LOCKOUT_MAX)

    def succeeded(self, user: str) -> None:
        """A right code: *user*'s count starts again (the source's does not)."""
        self._failures.pop(f"user:{user}", None)

    @contextlib.contextmanager
    def prompting(self, user: str) -> Iterator[bool]:
        """Hold *user*'s one prompt slot; yields False if another prompt has it."""
        if user in self._prompting:
            yield False
            return
        self._prompting.add(user)
        try:
            yield True
        finally:
            self._prompting.discard(user)


class TotpUnavailable(Exception):
    """No usable secret for a user; the message says what to do."""


class TotpStore:
    """Per-user TOTP secrets under ``state_dir/totp`` and the last step each used."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "totp"
        self._last_step: dict[str, int] = {}
        self.throttle = Throttle()

    def path(self, user: str) -> Path:
        """The secret file of *user* (a checked name)."""
        if not check_name(user):
            raise ValueError(f"not a valid user name: {user!r}")
        return self.dir / user

    def enroll(self, user: str) -> str:
        """Create (or replace) *user*'s secret; return the ``otpauth://`` URI to show once."""
        secret = pyotp.random_base32()
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        path = self.path(user)
        tmp = path.with_name(f".{user}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        os.replace(tmp, path)
        uri: str = pyotp.TOTP(secret).provisioning_uri(name=user, issuer_name=ISSUER)
        return uri

    def _secret(self, user: str) -> str:
        path = self.path(user)
        try:
            problem = check_private_file(path)
            secret = path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            raise TotpUnavailable(
                f"no TOTP secret is enrolled for {user}; ask an administrator to run "
                f"'serialmux totp-enroll {user}'") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise TotpUnavailable(f"the TOTP secret of {user} cannot be read: {exc}") from None
        if problem:
            raise TotpUnavailable(f"the TOTP secret of {user} is refused: {problem}")
        return secret

    def check(self, user: str) -> None:
        """Raise :class:`TotpUnavailable` unless *user* has a usable secret."""
        self._secret(user)

    def verify(self, user: str, code: str, now: float | None = None) -> bool:
        """Return whether *code* is valid now (±1 step) and was not used before."""
        code = code.strip()
        if not (code.isdigit() and len(code) == 6):
            return False
        totp = pyotp.TOTP(self._secret(user))
        now = time.time() if now is None else now
        step = int(now // totp.interval)
        for candidate in (step, step - 1, step + 1):
            if candidate <= self._last_step.get(user, -1):
                continue
            if pyotp.utils.strings_equal(totp.generate_otp(candidate), code):
                self._last_step[user] = candidate
                return True
        return False


async def prompt(store: TotpStore, user: str, vm: str,
                 read: Callable[[], Awaitable[bytes]], write: Callable[[bytes], None], *,
                 source: str = "?", on_failure: Callable[[], None] | None = None,
                 tries: int = MAX_TRIES, limit: float = CODE_TIMEOUT) -> tuple[bool, str]:
    """Ask *user* for a code on a terminal, up to *tries* times; return (ok, reason).

    *read* returns the next bytes typed (b"" at end of input). Input is not
    echoed. The whole exchange is bounded by *limit* seconds. *source* is the
    client's address, for the throttle; *on_failure* runs after each wrong code.
    """
    try:
        store.check(user)
    except TotpUnavailable as exc:
        return False, str(exc)
    throttle = store.throttle
    with throttle.prompting(user) as mine:
        if not mine:
            return False, (f"another TOTP prompt for {user} is open; answer it (or close it) "
                           "first")
        return await _ask(store, user, vm, read, write, source=source, on_failure=on_failure,
                          tries=tries, limit=limit)


async def _ask(store: TotpStore, user: str, vm: str, read: Callable[[], Awaitable[bytes]],
               write: Callable[[bytes], None], *, source: str,
               on_failure: Callable[[], None] | None, tries: int,
               limit: float) -> tuple[bool, str]:
    throttle = store.throttle
    try:
        async with asyncio.timeout(limit):
            for attempt in range(1, tries + 1):
                wait = throttle.locked(user, source)
                if wait > 0:
                    return False, (f"too many wrong codes for {user} or from this address: "
                                   f"try again in {wait:.0f} s")
                write(f"TOTP code for {user} on {vm} (attempt {attempt} of {tries}): ".encode())
                line = await _read_line(read)
                write(b"\r\n")
                if line is None:
                    return False, "input closed before a code was entered"
                if store.verify(user, line):
                    throttle.succeeded(user)
                    return True, f"code accepted on attempt {attempt}"
                throttle.failed(user, source)
                if on_failure is not None:
                    on_failure()
                if attempt < tries:
                    write(b"wrong code\r\n")
    except TimeoutError:
        write(b"\r\n")
        return False, f"no code entered within {limit:g} s"
    return False, f"{tries} wrong codes"


async def _read_line(read: Callable[[], Awaitable[bytes]]) -> str | None:
    line = bytearray()
    while True:
        data = await read()
        if not data:
            return None
        for byte in data:
            if byte in (0x0D, 0x0A):
                return line.decode("ascii", errors="replace")
            if byte in (0x03, 0x04):  # ^C, ^D: give up
                return None
            if byte in (0x08, 0x7F):
                del line[-1:]
            elif len(line) < 32:
                line.append(byte)
