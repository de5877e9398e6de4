"""Static checks are part of the suite: mypy --strict and ruff must be clean."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run ./dev test, which installs the test extras")
    return found


@pytest.mark.timeout(300)
def test_mypy_strict_is_clean() -> None:
    """mypy --strict reports nothing on the serialmux package."""
    done = subprocess.run([_tool("mypy")], cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.timeout(120)
def test_ruff_is_clean() -> None:
    """ruff check reports nothing on the package, the tests and the benchmarks."""
    done = subprocess.run([_tool("ruff"), "check", "serialmux", "tests", "bench"], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
