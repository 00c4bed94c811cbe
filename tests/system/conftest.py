"""Fixtures shared by the system tests that boot the cached root or install the packages."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from .image import ensure_image, missing_tools
from .units import DEBS_DIR, REPO


@pytest.fixture(scope="session")
def image() -> Path:
    """The cached Debian 12 root (image.py), built first if absent."""
    if os.geteuid() != 0:
        pytest.skip("needs root (debootstrap, systemd-nspawn)")
    if missing := missing_tools():
        pytest.skip(f"missing {', '.join(missing)} (apt-get install debootstrap systemd-container)")
    return ensure_image()


@pytest.fixture(scope="session")
def debs() -> Path:
    """The .debs and their flat apt repository (``bin/build-debs`` rebuilds them only when
    their inputs changed: the hash of those inputs is kept next to them)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (dpkg-buildpackage, systemd-nspawn)")
    result = subprocess.run(
        [str(REPO / "bin" / "build-debs"), str(DEBS_DIR)],
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert result.returncode == 0, f"bin/build-debs failed:\n{result.stdout}\n{result.stderr}"
    return DEBS_DIR
