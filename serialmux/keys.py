"""Public keys in OpenSSH ``authorized_keys`` format, parsed strictly.

asyncssh stores options it does not understand and then ignores them (a
``restrict`` key still got a PTY). A console gateway must not: every option
is either implemented here or refused when the config is loaded, naming the
file and line. Implemented: ``from="pattern-list"`` (source addresses).
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from dataclasses import dataclass

import asyncssh

_KEY_TYPES = re.compile(
    r"(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|"
    r"sk-ssh-ed25519@openssh\.com|sk-ecdsa-sha2-nistp256@openssh\.com|ssh-ed448)"
)

SUPPORTED_OPTIONS = ("from",)


class KeyParseError(ValueError):
    """An authorized key line could not be used."""


@dataclass(frozen=True, slots=True)
class AuthorizedKey:
    """One public key a user may authenticate with."""

    key_type: str
    public_data: bytes
    fingerprint: str
    comment: str
    from_patterns: tuple[str, ...] = ()

    def allows_from(self, address: str) -> bool:
        """Return whether a connection from *address* may use this key (``from=``)."""
        if not self.from_patterns:
            return True
        address = normalise_address(address)
        allowed = False
        for pattern in self.from_patterns:
            negate = pattern.startswith("!")
            pat = pattern[1:] if negate else pattern
            if _address_matches(address, pat):
                if negate:
                    return False
                allowed = True
        return allowed


def normalise_address(address: str) -> str:
    """*address* with an IPv4-mapped IPv6 form (``::ffff:10.0.0.1``) written as IPv4.

    A dual-stack listener reports IPv4 clients that way; ``from=`` and
    ``source-address`` patterns name them as IPv4.
    """
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _address_matches(address: str, pattern: str) -> bool:
    if "/" in pattern:
        try:
            return ipaddress.ip_address(address) in ipaddress.ip_network(pattern, strict=False)
        except ValueError:
            return False
    return fnmatch.fnmatchcase(address, pattern)


def _split_options(text: str) -> tuple[list[str], str]:
    """Split the leading option list (quotes respected) from the rest of the line."""
    options: list[str] = []
    current = []
    quoted = False
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == '"':
            quoted = not quoted
        elif ch == "\\" and quoted and i + 1 < len(text):
            current.append(text[i + 1])
            i += 2
            continue
        elif ch == "," and not quoted:
            options.append("".join(current))
            current = []
            i += 1
            continue
        elif ch in " \t" and not quoted:
            break
        current.append(ch)
        i += 1
    if quoted:
        raise KeyParseError("unterminated quote in key options")
    options.append("".join(current))
    return options, text[i:].strip()


def parse_authorized_keys(text: str, *, source: str) -> list[AuthorizedKey]:
    """Parse authorized_keys *text*; errors name *source* and the line number."""
    keys: list[AuthorizedKey] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            keys.append(_parse_line(line))
        except KeyParseError as exc:
            raise KeyParseError(f"{source} line {number}: {exc}") from None
    return keys


def _parse_line(line: str) -> AuthorizedKey:
    options: list[str] = []
    first = line.split(None, 1)[0]
    if not _KEY_TYPES.fullmatch(first):
        if first.endswith("-cert-v01@openssh.com"):
            raise KeyParseError("certificates are configured with [ssh] user_ca_keys, not as keys")
        options, line = _split_options(line)
    fields = line.split(None, 2)
    if len(fields) < 2 or not _KEY_TYPES.fullmatch(fields[0]):
        raise KeyParseError("expected '[options] KEYTYPE BASE64 [comment]'")
    from_patterns: list[str] = []
    for option in options:
        name, _, value = option.partition("=")
        name = name.lower()
        if name == "from":
            patterns = value.strip('"').split(",")
            if not value or any(not p.strip() or p.strip() == "!" for p in patterns):
                # from="" or from="a,," would match nothing, or (as parsed before) anything.
                raise KeyParseError(
                    'from= needs a non-empty list of address patterns, e.g. '
                    'from="10.0.0.0/8,!10.0.0.1"; an empty pattern is refused')
            from_patterns.extend(p.strip() for p in patterns)
        else:
            raise KeyParseError(
                f"option {name!r} is not supported by serialmux (supported: "
                f"{', '.join(SUPPORTED_OPTIONS)}); serialmux never allows shells, forwarding, "
                "agent or X11, so 'restrict' and 'no-*' are implied: remove the option"
            )
    try:
        key = asyncssh.import_public_key(f"{fields[0]} {fields[1]}")
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise KeyParseError(f"invalid {fields[0]} key: {exc}") from None
    return AuthorizedKey(
        key_type=fields[0],
        public_data=key.public_data,
        fingerprint=key.get_fingerprint("sha256"),
        comment=fields[2] if len(fields) > 2 else "",
        from_patterns=tuple(from_patterns),
    )
