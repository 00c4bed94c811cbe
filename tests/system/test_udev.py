"""The worker's udev rules as udevd reads them, inside the cached Debian 12 root.

udevd does not run in a container and there is no VFIO or NVIDIA device here, so ``udevadm test``
runs the full rule set against an existing device: a syntax error in our file would be reported
while the rules are read. A deliberately broken copy proves the check can fail.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .image import run_in_image
from .units import SYSTEMD_DIR, UDEV_DIR

pytestmark = pytest.mark.system

RULES = UDEV_DIR / "60-byteleap-worker.rules"
INSTALLED = "/usr/lib/udev/rules.d/60-byteleap-worker.rules"
SYSUSERS = SYSTEMD_DIR / "byteleap-worker.sysusers"
# The group the rules name must exist, as the package's sysusers.d entry makes it at install.
UDEVADM_TEST = (
    "systemd-sysusers /usr/lib/sysusers.d/byteleap-worker.conf"
    " && udevadm test /sys/devices/virtual/mem/null"
)


def _udevadm_test(image: Path, rules: Path) -> str:
    binds = ((rules, INSTALLED), (SYSUSERS, "/usr/lib/sysusers.d/byteleap-worker.conf"))
    result = run_in_image(image, "/bin/sh", "-c", UDEVADM_TEST, binds=binds)
    return result.stdout + result.stderr


def test_worker_rules_are_read_without_errors(image: Path) -> None:
    output = _udevadm_test(image, RULES)
    assert f"Reading rules file: {INSTALLED}" in output, output
    complaints = [line for line in output.splitlines() if "60-byteleap-worker.rules:" in line]
    assert complaints == [], "\n".join(complaints)


def test_a_broken_rule_is_reported(image: Path, tmp_path: Path) -> None:
    broken = tmp_path / "60-byteleap-worker.rules"
    broken.write_text(RULES.read_text() + 'SUBSYSTEM=="vfio", GRUOP="byteleap-gpu"\n')
    output = _udevadm_test(image, broken)
    assert any("60-byteleap-worker.rules:" in line for line in output.splitlines()), output
