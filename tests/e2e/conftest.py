"""The real-guest tests need QEMU; ./dev test installs it, so a skip here is loud and rare."""

from __future__ import annotations

import shutil

import pytest

QEMU = "qemu-system-x86_64"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip every tests/e2e test, with the install hint, when QEMU is not installed."""
    if shutil.which(QEMU) is not None:
        return
    skip = pytest.mark.skip(reason=f"{QEMU} is not installed (apt-get install qemu-system-x86)")
    here = config.rootpath / "tests" / "e2e"
    for item in items:
        if here in item.path.parents:
            item.add_marker(skip)
