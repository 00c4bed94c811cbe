"""What the system tests know about the shipped units: one entry per agent.

Adding an agent (the gateway) is one :class:`AgentUnit` here; every parametrised test picks it up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SYSTEMD_DIR = REPO / "systemd"
UDEV_DIR = REPO / "udev"
VENV_BIN = Path("/opt/venvs/byteleap/bin")


@dataclass(frozen=True)
class AgentUnit:
    agent: str
    max_exposure: float  # `systemd-analyze security --offline=true` ceiling (DESIGN.md §8)

    @property
    def unit(self) -> str:
        return f"byteleap-{self.agent}.service"

    @property
    def package(self) -> str:
        return f"byteleap-{self.agent}"

    @property
    def executable(self) -> Path:
        return VENV_BIN / f"byteleap-{self.agent}"


AGENTS = (
    AgentUnit("worker", 4.0),
    AgentUnit("miner", 2.0),
    AgentUnit("validator", 2.0),
    AgentUnit("gateway", 2.0),
)

# Executables other units start; a verify root needs them present and executable.
HELPER_EXECUTABLES = (Path("/usr/sbin/vfio-setup"), Path("/sbin/modprobe"))
GPU_HELPER_TEMPLATE = "byteleap-gpu-vfio@.service"

# The local apt repository bin/build-debs writes, and where containers mount it.
DEBS_DIR = REPO / "build" / "debs"
REPO_INSIDE = "/srv/byteleap-debs"
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}
