"""Tests for systemd/: the service unit, its sandbox score, sysusers.d and tmpfiles.d files."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SYSTEMD_DIR = Path(__file__).resolve().parents[2] / "systemd"
UNIT = SYSTEMD_DIR / "serialmux.service"
SYSUSERS = SYSTEMD_DIR / "serialmux.sysusers"
TMPFILES = SYSTEMD_DIR / "serialmux.tmpfiles"

MAX_EXPOSURE = 4.9  # the top of systemd-analyze's "OK" band

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment; units repeat keys, so no dict."""
    entries = []
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def service_values(key: str) -> list[str]:
    """Every value assigned to key in the [Service] section, in order."""
    return [v for s, k, v in unit_entries(UNIT.read_text()) if s == "Service" and k == key]


def run_tool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a systemd tool without pager or colours, bounded in time."""
    env = {**os.environ, "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0", "LC_ALL": "C.UTF-8"}
    return subprocess.run(
        args, capture_output=True, text=True, env=env, input=stdin, timeout=60, check=False
    )


def test_notify_service_basics() -> None:
    """The unit is Type=notify with main-only notify access, a watchdog and HUP reload."""
    assert service_values("Type") == ["notify"]
    assert service_values("NotifyAccess") == ["main"]
    assert service_values("WatchdogSec") == ["30s"]
    assert service_values("ExecReload") == ["/bin/kill -HUP $MAINPID"]
    assert service_values("Restart") == ["on-failure"]
    assert service_values("TimeoutStopSec") == ["20s"]
    (exec_start,) = service_values("ExecStart")
    assert exec_start.startswith("/")
    assert "%" not in exec_start
    assert exec_start.endswith("serve --config /etc/serialmux/serialmux.toml")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("User", "serialmux"),
        ("Group", "serialmux"),
        ("SupplementaryGroups", "kvm"),
        ("StateDirectory", "serialmux"),
        ("StateDirectoryMode", "0750"),
        ("RuntimeDirectory", "serialmux"),
        ("ConfigurationDirectory", "serialmux"),
        ("UMask", "0027"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("NoNewPrivileges", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "no"),
        ("CapabilityBoundingSet", ""),
        ("AmbientCapabilities", ""),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
        ("SystemCallFilter", "@system-service"),
        ("SystemCallArchitectures", "native"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("RestrictNamespaces", "yes"),
        ("RestrictRealtime", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("ProtectClock", "yes"),
        ("ProtectHostname", "yes"),
        ("ProtectProc", "invisible"),
    ],
)
def test_hardening_key(key: str, value: str) -> None:
    """Each sandbox and identity setting the design asks for is in [Service]."""
    assert value in service_values(key)


@needs_analyze
def test_unit_verifies(tmp_path: Path) -> None:
    """systemd-analyze verify accepts the unit (ExecStart pointed at a binary that exists)."""
    copy = tmp_path / "serialmux.service"
    text = re.sub(r"(?m)^ExecStart=\S+", "ExecStart=/bin/true", UNIT.read_text())
    copy.write_text(text)
    result = run_tool("systemd-analyze", "verify", str(copy))
    assert result.returncode == 0, result.stderr
    assert "serialmux.service" not in result.stderr, result.stderr


@needs_analyze
def test_security_exposure_ok() -> None:
    """systemd-analyze security rates the sandbox at most 4.9 ("OK" or better)."""
    result = run_tool("systemd-analyze", "security", "--offline=yes", str(UNIT))
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for serialmux\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout[-2000:]
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="no systemd-sysusers")
def test_sysusers_creates_user(tmp_path: Path) -> None:
    """systemd-sysusers (dry run, empty root) would create the serialmux user and group."""
    (tmp_path / "etc").mkdir()
    result = run_tool(
        "systemd-sysusers", "--dry-run", f"--root={tmp_path}", "-", stdin=SYSUSERS.read_text()
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    assert "Creating group 'serialmux'" in out
    assert "Creating user 'serialmux'" in out


def test_tmpfiles_directories() -> None:
    """tmpfiles.d creates /run/serialmux and /var/lib/serialmux 0750 owned by serialmux."""
    rows = {}
    for line in TMPFILES.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            kind, path, mode, user, group, age = line.split()
            rows[path] = (kind, mode, user, group, age)
    assert rows["/run/serialmux"] == ("d", "0750", "serialmux", "serialmux", "-")
    assert rows["/var/lib/serialmux"] == ("d", "0750", "serialmux", "serialmux", "-")
