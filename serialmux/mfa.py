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
Enrolment: ``serialmux totp-enroll USER`` (see docs/security.md).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pyotp

from .auth import check_private_file
from .config import check_name

MAX_TRIES = 3
CODE_TIMEOUT = 60.0  # seconds to type a code
ISSUER = "serialmux"


class TotpUnavailable(Exception):
    """No usable secret for a user; the message says what to do."""


class TotpStore:
    """Per-user TOTP secrets under ``state_dir/totp`` and the last step each used."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "totp"
        self._last_step: dict[str, int] = {}

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
                 tries: int = MAX_TRIES, limit: float = CODE_TIMEOUT) -> tuple[bool, str]:
    """Ask *user* for a code on a terminal, up to *tries* times; return (ok, reason).

    *read* returns the next bytes typed (b"" at end of input). Input is not
    echoed. The whole exchange is bounded by *limit* seconds.
    """
    try:
        store.check(user)
    except TotpUnavailable as exc:
        return False, str(exc)
    try:
        async with asyncio.timeout(limit):
            for attempt in range(1, tries + 1):
                write(f"TOTP code for {user} on {vm} (attempt {attempt} of {tries}): ".encode())
                line = await _read_line(read)
                write(b"\r\n")
                if line is None:
                    return False, "input closed before a code was entered"
                if store.verify(user, line):
                    return True, f"code accepted on attempt {attempt}"
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
