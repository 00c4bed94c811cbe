"""An upgrade keeps what the operator and the install made: edited configs and the secrets.

The "previous build" is this build's agent packages repacked one version lower (``~prev1``):
same files, so dpkg's conffile logic has an operator edit to keep and no prompt to ask, and the
maintainer scripts run their upgrade path (postinst ``configure`` with an old version) for real.
Both versions sit in one flat apt repository; apt installs the old ones by version, then
``apt-get upgrade`` moves to the current build.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .container import BootedContainer, booted
from .units import AGENTS, APT_ENV, REPO_INSIDE

pytestmark = pytest.mark.system

OPERATOR_EDIT = "# edited by the operator: kept across upgrades\n"


def _field(deb: Path, name: str) -> str:
    return subprocess.run(
        ["dpkg-deb", "--field", str(deb), name], capture_output=True, text=True, check=True
    ).stdout.strip()


def _repack_older(deb: Path, out_dir: Path, work: Path) -> str:
    """``deb`` rebuilt as version ``<version>~prev1`` in ``out_dir``; returns that version."""
    tree = work / deb.stem
    subprocess.run(["dpkg-deb", "--raw-extract", str(deb), str(tree)], check=True)
    control = tree / "DEBIAN" / "control"
    version = _field(deb, "Version")
    older = f"{version}~prev1"
    lines = control.read_text().splitlines()
    control.write_text(
        "".join(
            (f"Version: {older}" if line.startswith("Version: ") else line) + "\n" for line in lines
        )
    )
    subprocess.run(
        ["dpkg-deb", "--build", str(tree), str(out_dir / f"{deb.stem}-prev1.deb")],
        check=True,
        capture_output=True,
    )
    return older


@pytest.fixture(scope="module")
def two_versions(debs: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A flat repository with this build and the agents one version lower; the old version."""
    repo = tmp_path_factory.mktemp("upgrade-repo")
    work = tmp_path_factory.mktemp("upgrade-work")
    older = ""
    for deb in sorted(debs.glob("*.deb")):
        shutil.copy(deb, repo / deb.name)
        if _field(deb, "Package") != "byteleap-common":
            older = _repack_older(deb, repo, work)
    packages = subprocess.run(
        ["apt-ftparchive", "packages", "."], cwd=repo, capture_output=True, text=True, check=True
    )
    (repo / "Packages").write_text(packages.stdout)
    return repo, older


@pytest.fixture(scope="module")
def container(
    two_versions: tuple[Path, str], image: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BootedContainer]:
    repo, _ = two_versions
    log = tmp_path_factory.mktemp("upgrade-container") / "console.log"
    name = f"byteleap-upgrade-{os.getpid()}"
    with booted(image, name, log, binds=((repo, REPO_INSIDE),)) as booted_container:
        booted_container.use_apt_repository(REPO_INSIDE)
        yield booted_container


def test_upgrade_keeps_edited_configs_and_secrets(
    container: BootedContainer, two_versions: tuple[Path, str]
) -> None:
    _, older = two_versions
    container.run(
        "apt-get",
        "install",
        "-y",
        "--no-install-recommends",
        *(f"{agent.package}={older}" for agent in AGENTS),
        env=APT_ENV,
    )
    for agent in AGENTS:
        installed = container.output("dpkg-query", "-W", "-f=${Version}", agent.package)
        assert installed == older
        config = f"/etc/byteleap/{agent.agent}.yaml"
        edited = container.output("cat", config) + "\n" + OPERATOR_EDIT
        container.write_file(config, edited)
    secrets = {
        name: container.output("cat", f"/etc/byteleap/{name}")
        for name in ("miner-enrollment.secret", "worker-enrollment.secret")
    }

    upgrade = container.run("apt-get", "upgrade", "-y", env=APT_ENV, timeout=300)

    for agent in AGENTS:
        installed = container.output("dpkg-query", "-W", "-f=${Version}", agent.package)
        assert installed != older, f"{agent.package} not upgraded:\n{upgrade.stdout}"
        config = container.output("cat", f"/etc/byteleap/{agent.agent}.yaml")
        assert config.endswith(OPERATOR_EDIT.strip()), f"{agent.agent}.yaml lost the edit"
        assert container.output("systemctl", "is-enabled", agent.unit) == "enabled"
        leftovers = container.run(
            "sh", "-c", f"ls /etc/byteleap/{agent.agent}.yaml.dpkg-*", check=False
        )
        assert leftovers.returncode != 0, leftovers.stdout
    for name, before in secrets.items():
        assert container.output("cat", f"/etc/byteleap/{name}") == before, f"{name} replaced"
        assert container.output("stat", "-c", "%a %U", f"/etc/byteleap/{name}") == "600 root"
