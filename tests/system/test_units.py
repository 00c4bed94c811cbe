"""The unit files as systemd itself reads them (no PID 1 needed, research/infra.md §3).

``systemd-analyze verify`` ignores most parse errors in its exit code, so a unit passes only with
exit code 0 **and** empty stderr. It runs against a throw-away root holding systemd's own units
and stand-ins for the executables, so ExecStart paths resolve as on an installed host.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from .units import AGENTS, GPU_HELPER_TEMPLATE, HELPER_EXECUTABLES, SYSTEMD_DIR, AgentUnit

pytestmark = pytest.mark.system

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
HOST_UNIT_DIR = Path("/lib/systemd/system")


def _require_analyze() -> str:
    if SYSTEMD_ANALYZE is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    return SYSTEMD_ANALYZE


def _executable(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)


@pytest.fixture(scope="module")
def verify_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _require_analyze()
    if not (HOST_UNIT_DIR / "sysinit.target").exists():
        pytest.skip(f"{HOST_UNIT_DIR} lacks systemd's own units")
    root = tmp_path_factory.mktemp("verify-root")
    unit_dir = root / "usr/lib/systemd/system"
    shutil.copytree(HOST_UNIT_DIR, unit_dir, symlinks=True)
    (root / "etc").mkdir()
    for unit in SYSTEMD_DIR.glob("*.service"):
        shutil.copy(unit, unit_dir / unit.name)
    for agent in AGENTS:
        _executable(root / agent.executable.relative_to("/"))
    for helper in HELPER_EXECUTABLES:
        _executable(root / helper.relative_to("/"))
    return root


def _verify(root: Path, unit: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_require_analyze(), "verify", f"--root={root}", unit],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=root,
    )


def _security(unit_file: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    result = subprocess.run(
        [_require_analyze(), "security", "--offline=true", "--no-pager", str(unit_file)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, f"no exposure level in:\n{result.stdout}\n{result.stderr}"
    return float(match.group(1)), result


@pytest.mark.parametrize("agent", AGENTS, ids=lambda a: a.agent)
def test_agent_unit_verifies_without_any_complaint(verify_root: Path, agent: AgentUnit) -> None:
    result = _verify(verify_root, agent.unit)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr


def test_gpu_helper_template_verifies_without_any_complaint(verify_root: Path) -> None:
    instance = GPU_HELPER_TEMPLATE.replace("@", "@gpu0")
    result = _verify(verify_root, instance)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr


@pytest.mark.parametrize("agent", AGENTS, ids=lambda a: a.agent)
def test_agent_unit_exposure_is_within_its_ceiling(agent: AgentUnit) -> None:
    exposure, result = _security(SYSTEMD_DIR / agent.unit)
    assert exposure <= agent.max_exposure, result.stdout


@pytest.mark.parametrize("agent", AGENTS, ids=lambda a: a.agent)
def test_agent_unit_runs_as_notify_service_with_watchdog_and_credentials(
    agent: AgentUnit,
) -> None:
    text = (SYSTEMD_DIR / agent.unit).read_text()
    for line in (
        "Type=notify",
        "NotifyAccess=main",
        "Restart=on-failure",
        f"User=byteleap-{agent.agent}",
        f"StateDirectory=byteleap/{agent.agent}",
        f"ExecStart={agent.executable} --config /etc/byteleap/{agent.agent}.yaml",
    ):
        assert line in text.splitlines(), f"{agent.unit} lacks {line!r}"
    assert re.search(r"^WatchdogSec=\d+s$", text, re.MULTILINE), f"{agent.unit}: no WatchdogSec"


def test_a_broken_unit_is_caught_by_the_verify_check(verify_root: Path) -> None:
    # Guards the check itself: systemd-analyze exits 0 on these typos and only says so on stderr.
    unit_dir = verify_root / "usr/lib/systemd/system"
    broken = (SYSTEMD_DIR / "byteleap-miner.service").read_text()
    broken = broken.replace("Type=notify", "Type=notfy").replace("Restart=", "Restrat=")
    (unit_dir / "byteleap-broken.service").write_text(broken)
    result = _verify(verify_root, "byteleap-broken.service")
    assert "notfy" in result.stderr
    assert "Restrat" in result.stderr
