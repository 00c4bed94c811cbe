"""bin/vfio-setup against fake sysfs/procfs trees: in process (with a fake kernel moving drivers)
and as a subprocess (a plain tree, where nothing moves unless the kernel would)."""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from byteleap.worker import inventory
from tests.support.fake_sysfs import (
    A100_PCIE,
    A100_SXM,
    H100_PCIE,
    H100_SXM,
    H200,
    NIC,
    NVME,
    RTX_2080_TI,
    RTX_4090,
    SATA,
    FakeHost,
    FakeKernel,
    Function,
    snapshot,
)

REPO = Path(__file__).resolve().parents[3]
TOOL = REPO / "bin" / "vfio-setup"
UNIT = REPO / "systemd" / "byteleap-gpu-vfio@.service"

GPU_SOFTDEPS = (
    "softdep nvidia pre: vfio-pci\n"
    "softdep nvidia_drm pre: vfio-pci\n"
    "softdep nvidia_modeset pre: vfio-pci\n"
    "softdep nvidia_uvm pre: vfio-pci\n"
    "softdep nouveau pre: vfio-pci\n"
)
HEADER = "# Written by vfio-setup bind --static; remove with vfio-setup unbind --static.\n"
MODPROBE_HEAD = (
    HEADER
    + "# vfio-pci claims every device with these vendor:device IDs at boot, before the host\n"
    "# drivers below load (they wait for it).\n"
)


def _load_tool() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("vfio_setup", str(TOOL))
    spec = importlib.util.spec_from_loader("vfio_setup", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look the module up while the class bodies run.
    sys.modules["vfio_setup"] = module
    loader.exec_module(module)
    return module


tool: Any = _load_tool()


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@dataclass
class FakeClock:
    """The tool's Clock without real time: sleeping moves ``now`` on and may make things happen."""

    now_s: float = 1000.0
    slept: list[float] = field(default_factory=list)
    on_sleep: Callable[[int], None] | None = None
    """Called after each sleep with the number of sleeps so far (a holder lets go, say)."""

    def now(self) -> float:
        return self.now_s

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now_s += seconds
        if self.on_sleep is not None:
            self.on_sleep(len(self.slept))


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Iterator[Any]:
    """``run(host, *args, kernel=None, clock=None)``: main() in process; the kernel (a fresh
    FakeKernel unless given) reacts to writes; waiting for GPU holders takes no real time (a
    fresh FakeClock unless given)."""

    def invoke(
        host: FakeHost,
        *args: str,
        kernel: FakeKernel | None = None,
        clock: FakeClock | None = None,
    ) -> Result:
        capsys.readouterr()
        kernel = FakeKernel(host) if kernel is None else kernel
        clock = FakeClock() if clock is None else clock
        code = tool.main(host.argv(*args), after_sysfs_write=kernel, clock=clock)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    yield invoke


def cli(host: FakeHost | None, *args: str, python: str = sys.executable) -> Result:
    argv = [*(host.argv() if host else []), *args]
    done = subprocess.run(
        [python, str(TOOL), *argv], capture_output=True, text=True, timeout=60, check=False
    )
    return Result(done.returncode, done.stdout, done.stderr)


# --------------------------------------------------------------------------------------------
# Hosts


def intel_h100(tmp_path: Path, *, vfio: bool = True) -> FakeHost:
    """Two H100 SXM behind their own root ports, an NVMe and a NIC in groups of their own."""
    host = FakeHost(tmp_path, cpu="GenuineIntel")
    host.add_root_port("0000:17:01.0", group=10)
    host.add_card("0000:18:00.0", H100_SXM, group=11, parent="0000:17:01.0")
    host.add_root_port("0000:2a:01.0", group=20)
    host.add_card("0000:2b:00.0", H100_SXM, group=21, parent="0000:2a:01.0")
    host.add_device("0000:01:00.0", NVME, vendor=0x144D, group=1)
    host.add_device("0000:02:00.0", NIC, vendor=0x15B3, group=2)
    if vfio:
        host.load_vfio()
    return host


def amd_h200(tmp_path: Path) -> FakeHost:
    host = FakeHost(tmp_path, cpu="AuthenticAMD")
    host.add_root_port("0000:40:01.1", group=30)
    host.add_card("0000:41:00.0", H200, group=31, parent="0000:40:01.1")
    host.add_device("0000:c0:00.0", SATA, vendor=0x1022, group=40)
    host.load_vfio()
    return host


def rtx_4090(tmp_path: Path) -> FakeHost:
    """The root port shares the group (no ACS below it): bridges are allowed."""
    host = FakeHost(tmp_path, cpu="AuthenticAMD")
    host.add_root_port("0000:00:01.1", group=5)
    host.add_card("0000:01:00.0", RTX_4090, group=5, parent="0000:00:01.1")
    host.load_vfio()
    return host


def nvme_in_gpu_group(tmp_path: Path) -> FakeHost:
    """An H100 PCIe whose IOMMU group 9 also holds an NVMe (no ACS between them)."""
    host = FakeHost(tmp_path, cpu="GenuineIntel")
    host.add_card("0000:41:00.0", H100_PCIE, group=9)
    host.add_device("0000:42:00.0", NVME, vendor=0x144D, group=9)
    host.load_vfio()
    return host


def mixed(tmp_path: Path) -> FakeHost:
    """An A100 SXM stays on nvidia for challenges; an A100 PCIe is leased (on vfio-pci)."""
    host = FakeHost(tmp_path, cpu="AuthenticAMD")
    host.add_card("0000:81:00.0", A100_SXM, group=50)
    host.add_card("0000:c1:00.0", A100_PCIE, group=60, driver="vfio-pci")
    host.set_override("0000:c1:00.0", "vfio-pci")
    host.load_vfio()
    return host


# --------------------------------------------------------------------------------------------
# list


def test_list_shows_gpus_models_drivers_groups_and_companions(tmp_path: Path, run: Any) -> None:
    host = rtx_4090(tmp_path)
    host.add_card("0000:21:00.0", RTX_2080_TI, group=7)
    result = run(host, "list")
    assert result.code == 0
    assert result.out.splitlines() == [
        "GPU 0000:01:00.0 10de:2684 NVIDIA GeForce RTX 4090",
        "    driver nvidia, IOMMU group 5",
        "    + 0000:01:00.1 10de:22ba HD audio, driver snd_hda_intel",
        "GPU 0000:21:00.0 10de:1e07 unknown NVIDIA GPU",
        "    driver nvidia, IOMMU group 7",
        "    + 0000:21:00.1 10de:10f7 HD audio, driver snd_hda_intel",
        "    + 0000:21:00.2 10de:1ad6 USB controller, driver xhci_hcd",
        "    + 0000:21:00.3 10de:1ad7 serial bus controller (UCSI), driver nvidia-gpu",
    ]


def test_list_json_describes_each_gpu_and_companion(tmp_path: Path, run: Any) -> None:
    result = run(mixed(tmp_path), "--json", "list")
    assert result.code == 0
    gpus = result.json()["gpus"]
    assert [gpu["bdf"] for gpu in gpus] == ["0000:81:00.0", "0000:c1:00.0"]
    assert gpus[1] == {
        "bdf": "0000:c1:00.0",
        "ids": "10de:20b5",
        "class": "0x030200",
        "kind": "3D controller",
        "model": "NVIDIA A100 80GB PCIe",
        "driver": "vfio-pci",
        "driver_override": "vfio-pci",
        "iommu_group": "60",
        "companions": [],
        "holder_check": None,  # no /dev/nvidia* node off the nvidia driver
    }
    assert gpus[0]["driver"] == "nvidia"
    assert gpus[0]["driver_override"] is None
    assert gpus[0]["holder_check"] == {
        "state": "clear",
        "device_node": "/dev/nvidia0",
        "holders": [],
        "unavailable": None,
    }


def test_options_may_follow_the_command(tmp_path: Path, run: Any) -> None:
    host = amd_h200(tmp_path)
    result = run(host, "list", "--json")
    assert result.json()["gpus"][0]["model"] == "NVIDIA H200"


def test_list_without_nvidia_gpus_says_so(tmp_path: Path, run: Any) -> None:
    host = FakeHost(tmp_path)
    host.add_device("0000:01:00.0", NVME, vendor=0x144D, group=1)
    result = run(host, "list")
    assert result.code == 0
    assert "no NVIDIA GPU" in result.out


def test_missing_sysfs_is_an_environment_error(tmp_path: Path) -> None:
    result = cli(None, "--sysfs-root", str(tmp_path / "nowhere"), "list")
    assert result.code == 2
    assert "nowhere/bus/pci/devices does not exist" in result.err
    assert len(result.err.splitlines()) == 1


def test_unreadable_device_attribute_is_an_environment_error(tmp_path: Path, run: Any) -> None:
    host = amd_h200(tmp_path)
    (host.devices["0000:41:00.0"].directory / "class").unlink()
    result = run(host, "list")
    assert result.code == 2
    assert "0000:41:00.0/class" in result.err


# --------------------------------------------------------------------------------------------
# bind --dynamic


def test_bind_dynamic_moves_gpu_and_audio_to_vfio(tmp_path: Path, run: Any) -> None:
    host = rtx_4090(tmp_path)
    kernel = FakeKernel(host)
    result = run(host, "bind", "--dynamic", "0000:01:00.0", kernel=kernel)
    assert (result.code, result.err) == (0, "")
    assert kernel.writes == [
        ("bus/pci/devices/0000:01:00.0/driver_override", "vfio-pci"),
        ("bus/pci/drivers/nvidia/unbind", "0000:01:00.0"),
        ("bus/pci/drivers_probe", "0000:01:00.0"),
        ("bus/pci/devices/0000:01:00.1/driver_override", "vfio-pci"),
        ("bus/pci/drivers/snd_hda_intel/unbind", "0000:01:00.1"),
        ("bus/pci/drivers_probe", "0000:01:00.1"),
    ]
    assert host.driver_of("0000:01:00.0") == "vfio-pci"
    assert host.driver_of("0000:01:00.1") == "vfio-pci"
    assert host.override_of("0000:01:00.0") == "vfio-pci"
    assert result.out.splitlines() == [
        "GPU 0000:01:00.0 10de:2684 NVIDIA GeForce RTX 4090: nvidia -> vfio-pci (bound)",
        "  + 0000:01:00.1 10de:22ba HD audio: snd_hda_intel -> vfio-pci (bound)",
    ]


def test_bind_dynamic_json_reports_each_device(tmp_path: Path, run: Any) -> None:
    host = rtx_4090(tmp_path)
    result = run(host, "--json", "bind", "--dynamic")
    data = result.json()
    assert data["ok"] is True
    assert data["changed"] is True
    assert data["changed_files"] == []
    assert data["reboot_required"] is False
    assert [(d["bdf"], d["role"], d["driver_before"], d["driver_after"], d["status"])
            for d in data["devices"]] == [
        ("0000:01:00.0", "gpu", "nvidia", "vfio-pci", "bound"),
        ("0000:01:00.1", "companion", "snd_hda_intel", "vfio-pci", "bound"),
    ]  # fmt: skip


def test_bind_dynamic_without_addresses_takes_every_nvidia_gpu(tmp_path: Path, run: Any) -> None:
    host = intel_h100(tmp_path)
    result = run(host, "bind", "--dynamic")
    assert result.code == 0
    assert host.driver_of("0000:18:00.0") == "vfio-pci"
    assert host.driver_of("0000:2b:00.0") == "vfio-pci"
    assert host.driver_of("0000:01:00.0") == "nvme"
    assert host.driver_of("0000:17:01.0") == "pcieport"


def test_bind_dynamic_leaves_a_gpu_on_vfio_alone(tmp_path: Path, run: Any) -> None:
    host = mixed(tmp_path)
    kernel = FakeKernel(host)
    result = run(host, "--json", "bind", "--dynamic", "0000:c1:00.0", kernel=kernel)
    assert result.code == 0
    assert kernel.writes == []
    data = result.json()
    assert data["changed"] is False
    assert data["devices"][0]["status"] == "unchanged"
    text = run(host, "bind", "--dynamic", "0000:c1:00.0", kernel=kernel)
    assert "already on vfio-pci, unchanged" in text.out


def test_bind_dynamic_on_a_mixed_host_touches_only_the_named_gpu(tmp_path: Path, run: Any) -> None:
    host = mixed(tmp_path)
    host.add_card("0000:e1:00.0", A100_SXM, group=70)
    kernel = FakeKernel(host)
    result = run(host, "bind", "--dynamic", "0000:81:00.0", kernel=kernel)
    assert result.code == 0
    assert {value for _, value in kernel.writes} <= {"vfio-pci", "0000:81:00.0"}
    assert host.driver_of("0000:81:00.0") == "vfio-pci"
    assert host.driver_of("0000:e1:00.0") == "nvidia"


def test_bind_refuses_a_group_shared_with_an_nvme(tmp_path: Path, run: Any) -> None:
    host = nvme_in_gpu_group(tmp_path)
    before = snapshot(tmp_path)
    kernel = FakeKernel(host)
    for mode in ("--dynamic", "--static"):
        result = run(host, "bind", mode, "0000:41:00.0", kernel=kernel)
        assert result.code == 1
        assert result.err.splitlines() == [
            "vfio-setup: 0000:41:00.0: IOMMU group 9 also holds 0000:42:00.0 (144d:a80a NVMe "
            "controller), which a VM given the GPU would get too: put the GPU in a slot with its "
            "own IOMMU group (or enable ACS in the firmware)"
        ]
    assert kernel.writes == []
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("other", "vendor", "kind"),
    [(NIC, 0x15B3, "Ethernet controller"), (SATA, 0x1022, "SATA controller")],
)
def test_bind_refuses_groups_with_nics_and_sata(
    tmp_path: Path, run: Any, other: Function, vendor: int, kind: str
) -> None:
    host = amd_h200(tmp_path)
    host.add_device("0000:42:00.0", other, vendor=vendor, group=31)
    result = run(host, "bind", "--dynamic")
    assert result.code == 1
    assert f"0000:42:00.0 ({vendor:04x}:{other.device:04x} {kind})" in result.err
    assert host.driver_of("0000:41:00.0") == "nvidia"


def test_bind_refuses_another_gpu_in_the_group(tmp_path: Path, run: Any) -> None:
    host = FakeHost(tmp_path)
    host.add_card("0000:41:00.0", H100_SXM, group=3)
    host.add_card("0000:42:00.0", H100_SXM, group=3)
    host.load_vfio()
    result = run(host, "bind", "--dynamic", "0000:41:00.0")
    assert result.code == 1
    assert "also holds 0000:42:00.0 (10de:2330 3D controller)" in result.err


def test_bind_checks_the_groups_of_companion_functions_too(tmp_path: Path, run: Any) -> None:
    host = FakeHost(tmp_path)
    host.add_device("0000:41:00.0", RTX_4090.gpu, group=3)
    host.add_device("0000:41:00.1", RTX_4090.companions[0], group=4)
    host.add_device("0000:42:00.0", NIC, vendor=0x15B3, group=4)
    host.load_vfio()
    kernel = FakeKernel(host)
    result = run(host, "bind", "--dynamic", kernel=kernel)
    assert result.code == 1
    assert "0000:41:00.0: IOMMU group 4 also holds 0000:42:00.0 (15b3:1021 Ethernet" in result.err
    assert kernel.writes == []
    text = run(host, "verify").out
    assert "IOMMU group 3: group 4 holds 0000:42:00.0 (15b3:1021 Ethernet controller)" in text


@pytest.mark.parametrize(
    ("cpu", "args"),
    [("GenuineIntel", "intel_iommu=on iommu=pt"), ("AuthenticAMD", "amd_iommu=on iommu=pt")],
)
def test_bind_without_iommu_names_the_kernel_arguments(
    tmp_path: Path, run: Any, cpu: str, args: str
) -> None:
    host = FakeHost(tmp_path, cpu=cpu, iommu=False, cmdline="BOOT_IMAGE=/vmlinuz ro quiet")
    host.add_card("0000:41:00.0", H100_SXM, group=None)
    host.load_vfio()
    kernel = FakeKernel(host)
    for mode in ("--dynamic", "--static"):
        result = run(host, "bind", mode, kernel=kernel)
        assert result.code == 1
        (line,) = result.err.splitlines()
        assert f"add '{args}' to GRUB_CMDLINE_LINUX_DEFAULT" in line
        assert "reboot" in line
    assert kernel.writes == []
    assert not (host.root / "etc/modprobe.d/byteleap-vfio.conf").exists()


def test_bind_without_iommu_says_to_drop_an_iommu_off_argument(tmp_path: Path, run: Any) -> None:
    host = FakeHost(tmp_path, iommu=False, cmdline="ro intel_iommu=off")
    host.add_card("0000:41:00.0", H100_SXM, group=None)
    result = run(host, "bind", "--dynamic")
    assert result.code == 1
    assert "remove intel_iommu=off and add 'intel_iommu=on iommu=pt'" in result.err
    assert "enable VT-d in the firmware setup" in result.err


def test_bind_refuses_a_gpu_without_group_when_the_iommu_is_on(tmp_path: Path, run: Any) -> None:
    host = intel_h100(tmp_path)
    (host.devices["0000:18:00.0"].directory / "iommu_group").unlink()
    result = run(host, "bind", "--dynamic", "0000:18:00.0")
    assert result.code == 1
    assert "0000:18:00.0: has no IOMMU group although the IOMMU is on" in result.err


def test_bind_dynamic_needs_the_vfio_driver_loaded(tmp_path: Path, run: Any) -> None:
    host = intel_h100(tmp_path, vfio=False)
    kernel = FakeKernel(host)
    result = run(host, "bind", "--dynamic", kernel=kernel)
    assert result.code == 1
    assert "the vfio-pci driver is not loaded" in result.err
    assert "modprobe vfio-pci" in result.err
    assert kernel.writes == []


@pytest.mark.parametrize(
    ("bdf", "message"),
    [
        ("0000:01:00.0", "0000:01:00.0: not an NVIDIA device (144d:a80a NVMe controller)"),
        ("0000:99:00.0", "0000:99:00.0: no such PCI device on this host"),
        # The audio function of a card: the GPU is the one to name, its companions follow.
        ("0000:61:00.1", "0000:61:00.1: the HD audio function of an NVIDIA card, not a GPU: "
         "name the GPU 0000:61:00.0"),
    ],
)  # fmt: skip
def test_bind_refuses_devices_that_are_not_nvidia_gpus(
    tmp_path: Path, run: Any, bdf: str, message: str
) -> None:
    host = intel_h100(tmp_path)
    host.add_card("0000:61:00.0", RTX_4090, group=61)
    kernel = FakeKernel(host)
    result = run(host, "bind", "--dynamic", bdf, kernel=kernel)
    assert result.code == 1
    assert message in result.err
    assert kernel.writes == []


@pytest.mark.parametrize(
    "bdf",
    [
        "41:00.0",
        "0000:41:00.8",
        "0000:41:20.0",
        "0000:4g:00.0",
        "0000:41:00.0/../../../x",
        "../../../../etc/passwd",
        "0000:41:00.0\n",
        "",
    ],
)
def test_malformed_addresses_are_usage_errors(tmp_path: Path, run: Any, bdf: str) -> None:
    host = intel_h100(tmp_path)
    before = snapshot(tmp_path)
    kernel = FakeKernel(host)
    result = run(host, "bind", "--dynamic", bdf, kernel=kernel)
    assert result.code == 2
    assert "invalid PCI address" in result.err
    assert kernel.writes == []
    assert snapshot(tmp_path) == before


def test_addresses_are_taken_in_either_case(tmp_path: Path, run: Any) -> None:
    host = FakeHost(tmp_path)
    host.add_card("0000:ab:00.0", H100_SXM, group=4)
    host.load_vfio()
    result = run(host, "bind", "--dynamic", "0000:AB:00.0")
    assert result.code == 0
    assert host.driver_of("0000:ab:00.0") == "vfio-pci"


def test_bind_dynamic_reports_a_device_the_kernel_did_not_move(tmp_path: Path) -> None:
    # A plain tree: the writes land in files and no driver link moves, as when a process holds
    # the GPU and the driver does not let go.
    host = rtx_4090(tmp_path)
    result = cli(host, "bind", "--dynamic", "0000:01:00.0")
    assert result.code == 1
    assert result.err.splitlines()[0] == (
        "vfio-setup: 0000:01:00.0: still on nvidia after drivers_probe, not vfio-pci: is a "
        "process holding the GPU (nvidia-smi, fuser -v /dev/nvidia*)? Stop it and try again"
    )
    assert host.driver_of("0000:01:00.0") == "nvidia"
    # Rolled back: the override it set is cleared again, the companion never touched.
    assert host.override_of("0000:01:00.0") == ""
    assert host.override_of("0000:01:00.1") == "(null)"
    assert (host.sys / "bus/pci/drivers_probe").read_text() == "0000:01:00.0"


def test_bind_dynamic_rolls_back_when_a_companion_is_stuck(tmp_path: Path, run: Any) -> None:
    host = rtx_4090(tmp_path)
    kernel = FakeKernel(host, busy={"0000:01:00.1"})
    result = run(host, "--json", "bind", "--dynamic", kernel=kernel)
    assert result.code == 1
    assert "vfio-setup: 0000:01:00.1: the kernel refused: Device or resource busy" in result.err
    assert host.driver_of("0000:01:00.0") == "nvidia"
    assert host.override_of("0000:01:00.0") == "(null)"
    assert host.driver_of("0000:01:00.1") == "snd_hda_intel"
    assert host.override_of("0000:01:00.1") == "(null)"
    data = result.json()
    assert data["ok"] is False
    assert data["changed"] is False
    assert [d["status"] for d in data["devices"]] == ["rolled back", "failed"]


def test_sysfs_links_leading_outside_the_tree_are_not_written(tmp_path: Path, run: Any) -> None:
    host = rtx_4090(tmp_path / "host")
    outside = tmp_path / "outside"
    outside.write_text("precious\n")
    override = host.devices["0000:01:00.0"].directory / "driver_override"
    override.unlink()
    override.symlink_to(outside)
    result = run(host, "bind", "--dynamic")
    assert result.code == 2
    assert "outside" in result.err
    assert outside.read_text() == "precious\n"


# --------------------------------------------------------------------------------------------
# bind --dynamic: processes holding the GPU (the nvidia driver's unbind would hang on them)

PERSISTENCED_REFUSAL = (
    "vfio-setup: 0000:01:00.0: /dev/nvidia0 is held open by pid 1234 (nvidia-persiste) after "
    "waiting 10 s; unbinding it now would hang in the nvidia driver until that process lets go: "
    "run 'nvidia-smi -i 0000:01:00.0 -pm 0' (persistence off for this GPU) or stop "
    "nvidia-persistenced"
)


def test_bind_dynamic_refuses_a_gpu_held_open_and_touches_nothing(tmp_path: Path, run: Any) -> None:
    host = rtx_4090(tmp_path)
    host.hold_gpu("0000:01:00.0", 1234, "nvidia-persistenced")
    before = snapshot(tmp_path)
    kernel = FakeKernel(host)
    clock = FakeClock()
    result = run(host, "bind", "--dynamic", "0000:01:00.0", kernel=kernel, clock=clock)
    assert result.code == 1
    assert result.err.splitlines() == [PERSISTENCED_REFUSAL]
    assert result.out.splitlines() == [
        "GPU 0000:01:00.0 10de:2684 NVIDIA GeForce RTX 4090: nvidia -> nvidia (failed)"
    ]
    assert kernel.writes == []
    assert host.driver_of("0000:01:00.0") == "nvidia"
    assert host.override_of("0000:01:00.0") == "(null)"
    assert host.driver_of("0000:01:00.1") == "snd_hda_intel"
    assert snapshot(tmp_path) == before
    # Polled every 0.25 s for the default 10 s before giving up.
    assert clock.slept == [0.25] * 40


def test_bind_dynamic_rolls_back_the_first_gpu_when_the_second_is_held(
    tmp_path: Path, run: Any
) -> None:
    host = intel_h100(tmp_path)
    host.hold_gpu("0000:2b:00.0", 4321, "python3")
    kernel = FakeKernel(host)
    result = run(host, "--json", "bind", "--dynamic", kernel=kernel)
    assert result.code == 1
    message = (
        "0000:2b:00.0: /dev/nvidia1 is held open by pid 4321 (python3) after waiting 10 s; "
        "unbinding it now would hang in the nvidia driver until that process lets go: stop that "
        "process, then try again"
    )
    assert result.err.splitlines() == [f"vfio-setup: {message}"]
    assert host.driver_of("0000:18:00.0") == "nvidia"
    assert host.override_of("0000:18:00.0") == "(null)"
    assert not any(
        "0000:2b:00.0" in path or value == "0000:2b:00.0" for path, value in kernel.writes
    )
    data = result.json()
    assert (data["ok"], data["changed"], data["errors"]) == (False, False, [message])
    first, second = data["devices"]
    assert (first["bdf"], first["status"], first["driver_after"]) == (
        "0000:18:00.0",
        "rolled back",
        "nvidia",
    )
    assert first["holder_check"]["state"] == "clear"
    assert (second["bdf"], second["status"], second["driver_after"]) == (
        "0000:2b:00.0",
        "failed",
        "nvidia",
    )
    assert second["message"] == message
    assert second["holder_check"] == {
        "state": "held",
        "device_node": "/dev/nvidia1",
        "holders": [{"pid": 4321, "comm": "python3"}],
        "unavailable": None,
    }


def test_bind_dynamic_names_every_holder(tmp_path: Path, run: Any) -> None:
    host = rtx_4090(tmp_path)
    host.hold_gpu("0000:01:00.0", 1234, "nvidia-persistenced")
    host.hold_gpu("0000:01:00.0", 80, "dcgm-exporter")
    result = run(host, "--json", "bind", "--dynamic", "--holder-wait", "0")
    assert result.code == 1
    lines = result.err.splitlines()
    assert [line.split(";")[0] for line in lines] == [
        "vfio-setup: 0000:01:00.0: /dev/nvidia0 is held open by pid 80 (dcgm-exporter)",
        "vfio-setup: 0000:01:00.0: /dev/nvidia0 is held open by pid 1234 (nvidia-persiste)",
    ]
    assert lines[0].endswith(": stop that process, then try again")
    assert lines[1].endswith("or stop nvidia-persistenced")
    holders = result.json()["devices"][0]["holder_check"]["holders"]
    assert holders == [
        {"pid": 80, "comm": "dcgm-exporter"},
        {"pid": 1234, "comm": "nvidia-persiste"},
    ]


@pytest.mark.parametrize("polls", [1, 3])
def test_bind_dynamic_waits_for_a_holder_that_lets_go(tmp_path: Path, run: Any, polls: int) -> None:
    host = rtx_4090(tmp_path)
    host.hold_gpu("0000:01:00.0", 4242, "nvidia-smi")

    def nvidia_smi_exits(sleeps: int) -> None:
        if sleeps == polls:
            host.end_process(4242)

    clock = FakeClock(on_sleep=nvidia_smi_exits)
    result = run(host, "--json", "bind", "--dynamic", clock=clock)
    assert (result.code, result.err) == (0, "")
    assert clock.slept == [0.25] * polls
    assert host.driver_of("0000:01:00.0") == "vfio-pci"
    assert host.driver_of("0000:01:00.1") == "vfio-pci"
    gpu = result.json()["devices"][0]
    assert gpu["status"] == "bound"
    assert gpu["holder_check"]["state"] == "clear"


def test_holder_wait_zero_checks_once(tmp_path: Path, run: Any) -> None:
    host = rtx_4090(tmp_path)
    host.hold_gpu("0000:01:00.0", 1234, "nvidia-persistenced")
    clock = FakeClock()
    kernel = FakeKernel(host)
    result = run(host, "bind", "--dynamic", "--holder-wait", "0", kernel=kernel, clock=clock)
    assert result.code == 1
    assert result.err.splitlines() == [PERSISTENCED_REFUSAL.replace(" after waiting 10 s", "")]
    assert clock.slept == []
    assert kernel.writes == []
    host.end_process(1234)
    again = run(host, "bind", "--dynamic", "--holder-wait", "0", kernel=kernel, clock=clock)
    assert (again.code, again.err) == (0, "")
    assert clock.slept == []
    assert host.driver_of("0000:01:00.0") == "vfio-pci"


def test_holder_wait_ends_on_time(tmp_path: Path, run: Any) -> None:
    host = rtx_4090(tmp_path)
    host.hold_gpu("0000:01:00.0", 1234, "cuda-app")
    clock = FakeClock()
    result = run(host, "bind", "--dynamic", "--holder-wait", "0.6", clock=clock)
    assert result.code == 1
    assert "held open by pid 1234 (cuda-app) after waiting 0.6 s;" in result.err
    assert clock.slept == pytest.approx([0.25, 0.25, 0.1])


@pytest.mark.parametrize(
    ("information", "reason"),
    [
        (None, "cannot read {proc}/driver/nvidia/gpus/0000:01:00.0/information: No such file or "
         "directory"),
        ("Model: \t\t NVIDIA GeForce RTX 4090\nBus Location: \t 0000:01:00.0\n",
         "no 'Device Minor' line in {proc}/driver/nvidia/gpus/0000:01:00.0/information"),
    ],
)  # fmt: skip
def test_bind_dynamic_goes_on_when_holders_cannot_be_checked(
    tmp_path: Path, run: Any, information: str | None, reason: str
) -> None:
    host = rtx_4090(tmp_path)

    def lay_out_differently() -> None:
        if information is None:
            host.remove_nvidia_information("0000:01:00.0")
        else:
            host.nvidia_information("0000:01:00.0").write_text(information)

    lay_out_differently()
    reason = reason.format(proc=host.proc)
    result = run(host, "bind", "--dynamic")
    assert (result.code, result.err) == (0, "")
    assert result.out.splitlines()[0] == (
        "GPU 0000:01:00.0 10de:2684 NVIDIA GeForce RTX 4090: nvidia -> vfio-pci (bound): could "
        f"not check which processes hold it: {reason}"
    )
    assert host.driver_of("0000:01:00.0") == "vfio-pci"
    host.hold_gpu("0000:01:00.0", 1, "init")  # unknowable without the minor: nothing changes
    assert run(host, "unbind", "--dynamic").code == 0
    lay_out_differently()  # the nvidia driver took it back and wrote its file again
    data = run(host, "--json", "bind", "--dynamic").json()
    assert data["ok"] is True
    assert data["devices"][0]["holder_check"] == {
        "state": "unchecked",
        "device_node": None,
        "holders": [],
        "unavailable": reason,
    }
    assert data["devices"][0]["message"] == f"could not check which processes hold it: {reason}"


def test_only_the_gpus_own_device_node_counts(tmp_path: Path, run: Any) -> None:
    host = intel_h100(tmp_path)
    assert host.nvidia_node("0000:2b:00.0") == "/dev/nvidia1"
    # The other GPU, the driver's shared nodes, and names that merely start the same.
    host.hold_gpu("0000:18:00.0", 500, "python3")
    host.add_process(
        501,
        "Xorg",
        (
            "/dev/nvidiactl",
            "/dev/nvidia-uvm",
            "/dev/nvidia-uvm-tools",
            "/dev/nvidia-modeset",
            "/dev/nvidia10",
            "/dev/nvidia-caps/nvidia-cap1",
            "/tmp/dev/nvidia1",
        ),
    )
    ended = host.add_process(502, "zombie", ["/dev/nvidia1"])
    shutil.rmtree(ended / "fd")  # a process without an fd directory (exited, or a kernel thread)
    result = run(host, "--json", "bind", "--dynamic", "0000:2b:00.0")
    assert (result.code, result.err) == (0, "")
    assert result.json()["devices"][0]["holder_check"] == {
        "state": "clear",
        "device_node": "/dev/nvidia1",
        "holders": [],
        "unavailable": None,
    }
    assert host.driver_of("0000:2b:00.0") == "vfio-pci"


def test_companions_and_gpus_on_vfio_are_not_checked(tmp_path: Path, run: Any) -> None:
    host = mixed(tmp_path)
    host.hold_gpu("0000:81:00.0", 1234, "nvidia-persistenced")
    result = run(host, "--json", "bind", "--dynamic", "0000:c1:00.0")
    assert result.code == 0
    assert result.json()["devices"][0]["holder_check"] is None
    rtx = rtx_4090(tmp_path / "rtx")
    data = run(rtx, "--json", "bind", "--dynamic").json()
    assert [d["holder_check"] is None for d in data["devices"]] == [False, True]


def test_list_and_debug_show_who_holds_each_gpu(tmp_path: Path, run: Any) -> None:
    host = intel_h100(tmp_path)
    host.hold_gpu("0000:18:00.0", 1234, "nvidia-persistenced")
    host.hold_gpu("0000:18:00.0", 99, "python3")
    host.remove_nvidia_information("0000:2b:00.0")
    held = "    /dev/nvidia0 held open by pid 99 (python3), pid 1234 (nvidia-persiste)"
    unknown = (
        f"    holders unknown: cannot read {host.proc}/driver/nvidia/gpus/0000:2b:00.0/"
        "information: No such file or directory"
    )
    listed = run(host, "list")
    assert listed.code == 0
    assert listed.out.splitlines() == [
        "GPU 0000:18:00.0 10de:2330 NVIDIA H100 80GB HBM3",
        "    driver nvidia, IOMMU group 11",
        held,
        "GPU 0000:2b:00.0 10de:2330 NVIDIA H100 80GB HBM3",
        "    driver nvidia, IOMMU group 21",
        unknown,
    ]
    debug_lines = run(host, "debug").out.splitlines()
    assert held in debug_lines
    assert unknown in debug_lines
    gpus = run(host, "--json", "debug").json()["list"]["gpus"]
    assert gpus[0]["holder_check"]["holders"] == [
        {"pid": 99, "comm": "python3"},
        {"pid": 1234, "comm": "nvidia-persiste"},
    ]
    assert gpus[1]["holder_check"]["state"] == "unchecked"
    assert run(host, "--json", "list").json()["gpus"] == gpus


@pytest.mark.parametrize("value", ["-1", "600.5", "nan", "inf", "ten", ""])
def test_a_bad_holder_wait_is_a_usage_error(tmp_path: Path, run: Any, value: str) -> None:
    host = rtx_4090(tmp_path)
    kernel = FakeKernel(host)
    result = run(host, "bind", "--dynamic", "--holder-wait", value, kernel=kernel)
    assert result.code == 2
    (line,) = result.err.splitlines()
    assert line == (
        f"vfio-setup: error: argument --holder-wait: {value!r} is not a number of seconds from 0 "
        "to 600 (see vfio-setup --help)"
    )
    assert kernel.writes == []


def test_holder_wait_of_600_is_allowed(tmp_path: Path, run: Any) -> None:
    host = rtx_4090(tmp_path)
    result = run(host, "bind", "--dynamic", "--holder-wait", "600")
    assert result.code == 0


# --------------------------------------------------------------------------------------------
# unbind --dynamic


def test_unbind_dynamic_returns_gpu_and_companions_to_host_drivers(
    tmp_path: Path, run: Any
) -> None:
    host = rtx_4090(tmp_path)
    kernel = FakeKernel(host)
    assert run(host, "bind", "--dynamic", kernel=kernel).code == 0
    kernel.writes.clear()
    result = run(host, "unbind", "--dynamic", "0000:01:00.0", kernel=kernel)
    assert (result.code, result.err) == (0, "")
    assert kernel.writes == [
        ("bus/pci/devices/0000:01:00.0/driver_override", "\n"),
        ("bus/pci/drivers/vfio-pci/unbind", "0000:01:00.0"),
        ("bus/pci/drivers_probe", "0000:01:00.0"),
        ("bus/pci/devices/0000:01:00.1/driver_override", "\n"),
        ("bus/pci/drivers/vfio-pci/unbind", "0000:01:00.1"),
        ("bus/pci/drivers_probe", "0000:01:00.1"),
    ]
    assert host.driver_of("0000:01:00.0") == "nvidia"
    assert host.driver_of("0000:01:00.1") == "snd_hda_intel"
    assert host.override_of("0000:01:00.0") == "(null)"
    assert result.out.splitlines() == [
        "GPU 0000:01:00.0 10de:2684 NVIDIA GeForce RTX 4090: vfio-pci -> nvidia (unbound)",
        "  + 0000:01:00.1 10de:22ba HD audio: vfio-pci -> snd_hda_intel (unbound)",
    ]


def test_unbind_dynamic_leaves_host_gpus_alone(tmp_path: Path, run: Any) -> None:
    host = mixed(tmp_path)
    kernel = FakeKernel(host)
    result = run(host, "--json", "unbind", "--dynamic", "0000:81:00.0", kernel=kernel)
    assert result.code == 0
    assert kernel.writes == []
    assert result.json()["changed"] is False


def test_unbind_dynamic_on_mixed_host_returns_only_the_leased_gpu(tmp_path: Path, run: Any) -> None:
    host = mixed(tmp_path)
    result = run(host, "--json", "unbind", "--dynamic")
    assert result.code == 0
    assert result.json()["changed"] is True
    assert host.driver_of("0000:c1:00.0") == "nvidia"
    assert host.driver_of("0000:81:00.0") == "nvidia"


def test_unbind_dynamic_clears_a_stale_override(tmp_path: Path, run: Any) -> None:
    host = amd_h200(tmp_path)
    host.unbind("0000:41:00.0")
    host.set_override("0000:41:00.0", "vfio-pci")  # a bind that failed half way
    result = run(host, "--json", "unbind", "--dynamic")
    assert result.code == 0
    assert result.json()["changed"] is True
    assert host.override_of("0000:41:00.0") == "(null)"
    assert host.driver_of("0000:41:00.0") == "nvidia"


def test_unbind_dynamic_fails_when_a_static_binding_reclaims_the_gpu(
    tmp_path: Path, run: Any
) -> None:
    host = amd_h200(tmp_path)
    host.unbind("0000:41:00.0")
    host.bind("0000:41:00.0", "vfio-pci")
    kernel = FakeKernel(host, vfio_ids={"10de:2335"})
    result = run(host, "unbind", "--dynamic", kernel=kernel)
    assert result.code == 1
    assert "0000:41:00.0: vfio-pci claimed it again" in result.err
    assert "run 'vfio-setup unbind --static'" in result.err


def test_unbind_dynamic_without_host_driver_leaves_the_gpu_unbound(
    tmp_path: Path, run: Any
) -> None:
    host = FakeHost(tmp_path)
    host.add_card("0000:41:00.0", H100_SXM, group=3, driver="vfio-pci")  # nvidia never loaded
    result = run(host, "unbind", "--dynamic")
    assert result.code == 0
    assert host.driver_of("0000:41:00.0") is None
    assert "no host driver claimed it (is the nvidia module loaded?)" in result.out


# --------------------------------------------------------------------------------------------
# bind --static / unbind --static


def test_bind_static_writes_exact_files(tmp_path: Path, run: Any) -> None:
    host = intel_h100(tmp_path)
    result = run(host, "--json", "bind", "--static")
    assert result.code == 0
    modprobe = host.root / "etc/modprobe.d/byteleap-vfio.conf"
    grub = host.root / "etc/default/grub.d/91-byteleap-vfio.cfg"
    assert modprobe.read_text() == (
        MODPROBE_HEAD + "options vfio-pci ids=10de:2330\n" + GPU_SOFTDEPS
    )
    assert grub.read_text() == (
        HEADER + "# Sourced by update-grub after /etc/default/grub; run update-grub after a "
        "change.\n"
        'GRUB_CMDLINE_LINUX_DEFAULT="${GRUB_CMDLINE_LINUX_DEFAULT:-} vfio-pci.ids=10de:2330"\n'
    )
    assert stat.S_IMODE(modprobe.stat().st_mode) == 0o644
    data = result.json()
    assert data["changed"] is True
    assert data["changed_files"] == [str(modprobe), str(grub)]
    assert data["reboot_required"] is True
    assert data["ids"] == ["10de:2330"]
    assert [d["status"] for d in data["devices"]] == ["pending reboot", "pending reboot"]


def test_bind_static_text_says_what_to_run(tmp_path: Path, run: Any) -> None:
    host = amd_h200(tmp_path)
    result = run(host, "bind", "--static")
    assert result.code == 0
    assert result.out.splitlines() == [
        "GPU 0000:41:00.0 10de:2335 NVIDIA H200: nvidia now, vfio-pci after reboot",
        f"changed: {host.root}/etc/modprobe.d/byteleap-vfio.conf",
        f"changed: {host.root}/etc/default/grub.d/91-byteleap-vfio.cfg",
        "reboot required: run 'update-initramfs -u -k all' and 'update-grub', then reboot",
        "vfio-pci takes every device with ID 10de:2335 at boot (all cards of a model)",
    ]


def test_bind_static_includes_companions_and_their_softdeps(tmp_path: Path, run: Any) -> None:
    host = rtx_4090(tmp_path)
    host.add_card("0000:21:00.0", RTX_2080_TI, group=7)
    assert run(host, "bind", "--static").code == 0
    assert (host.root / "etc/modprobe.d/byteleap-vfio.conf").read_text() == (
        MODPROBE_HEAD + "options vfio-pci ids=10de:10f7,10de:1ad6,10de:1ad7,10de:1e07,"
        "10de:22ba,10de:2684\n" + GPU_SOFTDEPS + "softdep snd_hda_intel pre: vfio-pci\n"
        "softdep xhci_pci pre: vfio-pci\n"
        "softdep i2c_nvidia_gpu pre: vfio-pci\n"
    )


def test_bind_static_twice_changes_nothing_the_second_time(tmp_path: Path, run: Any) -> None:
    host = rtx_4090(tmp_path)
    assert run(host, "bind", "--static").code == 0
    first = snapshot(host.root)
    modprobe = host.root / "etc/modprobe.d/byteleap-vfio.conf"
    mtime = modprobe.stat().st_mtime_ns
    result = run(host, "--json", "bind", "--static")
    assert result.code == 0
    data = result.json()
    assert (data["changed"], data["changed_files"], data["reboot_required"]) == (False, [], False)
    assert snapshot(host.root) == first
    assert modprobe.stat().st_mtime_ns == mtime
    text = run(host, "bind", "--static")
    assert "static configuration already up to date: nothing changed" in text.out
    assert "reboot required" not in text.out


def test_bind_static_rewrites_when_the_gpus_change(tmp_path: Path, run: Any) -> None:
    host = amd_h200(tmp_path)
    assert run(host, "bind", "--static").code == 0
    host.add_card("0000:81:00.0", H100_SXM, group=81)
    result = run(host, "--json", "bind", "--static")
    assert result.json()["changed_files"] == [
        str(host.root / "etc/modprobe.d/byteleap-vfio.conf"),
        str(host.root / "etc/default/grub.d/91-byteleap-vfio.cfg"),
    ]
    assert (
        "ids=10de:2330,10de:2335\n" in (host.root / "etc/modprobe.d/byteleap-vfio.conf").read_text()
    )


def test_bind_static_writes_only_under_root(tmp_path: Path, run: Any) -> None:
    host = intel_h100(tmp_path / "host")
    other_root = tmp_path / "image"
    outside = snapshot(tmp_path / "host")
    result = run(host, "--root", str(other_root), "bind", "--static")
    assert result.code == 0
    assert snapshot(tmp_path / "host") == outside
    assert sorted(str(p.relative_to(other_root)) for p in other_root.rglob("*") if p.is_file()) == [
        "etc/default/grub.d/91-byteleap-vfio.cfg",
        "etc/modprobe.d/byteleap-vfio.conf",
    ]


def test_bind_static_refuses_a_config_dir_leading_outside_root(tmp_path: Path, run: Any) -> None:
    host = amd_h200(tmp_path / "host")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(host.root / "etc/modprobe.d")
    (host.root / "etc/modprobe.d").symlink_to(elsewhere)
    result = run(host, "bind", "--static")
    assert result.code == 2
    assert "leads outside" in result.err
    assert list(elsewhere.iterdir()) == []


def test_grub_dropin_is_shell_sourceable(tmp_path: Path, run: Any) -> None:
    host = rtx_4090(tmp_path)
    assert run(host, "bind", "--static").code == 0
    grub = host.root / "etc/default/grub.d/91-byteleap-vfio.cfg"
    sh = shutil.which("sh")
    assert sh is not None
    done = subprocess.run(
        [sh, "-euc", '. "$1"; printf %s "$GRUB_CMDLINE_LINUX_DEFAULT"', "sh", str(grub)],
        env={"GRUB_CMDLINE_LINUX_DEFAULT": "quiet splash", "PATH": os.defpath},
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout == "quiet splash vfio-pci.ids=10de:22ba,10de:2684"
    unset = subprocess.run(
        [sh, "-euc", '. "$1"; printf %s "$GRUB_CMDLINE_LINUX_DEFAULT"', "sh", str(grub)],
        env={"PATH": os.defpath},
        capture_output=True,
        text=True,
        check=True,
    )
    assert unset.stdout == " vfio-pci.ids=10de:22ba,10de:2684"


def test_bind_static_refuses_when_a_same_model_gpu_is_not_named(tmp_path: Path, run: Any) -> None:
    host = intel_h100(tmp_path)
    result = run(host, "bind", "--static", "0000:18:00.0")
    assert result.code == 1
    assert result.err.splitlines() == [
        "vfio-setup: 0000:2b:00.0 (10de:2330 3D controller) has the ID of a named device but was "
        "not named, and a static binding by ID takes every such card: name all of them, or bind "
        "by address with 'vfio-setup bind --dynamic 0000:18:00.0'"
    ]
    assert list((host.root / "etc/modprobe.d").iterdir()) == []
    both = run(host, "bind", "--static", "0000:18:00.0", "0000:2b:00.0")
    assert both.code == 0


def test_bind_static_by_address_keeps_other_models_on_the_host(tmp_path: Path, run: Any) -> None:
    host = mixed(tmp_path)
    result = run(host, "--json", "bind", "--static", "0000:c1:00.0")
    assert result.code == 0
    assert result.json()["ids"] == ["10de:20b5"]
    assert [d["status"] for d in result.json()["devices"]] == ["unchanged"]


def test_bind_static_with_ids_skips_discovery(tmp_path: Path) -> None:
    root = tmp_path / "image"
    result = cli(
        None,
        "--sysfs-root",
        str(tmp_path / "no-sysfs"),
        "--proc-root",
        str(tmp_path / "no-proc"),
        "--root",
        str(root),
        "--json",
        "bind",
        "--static",
        "--ids",
        "10DE:2335,10de:2330,10de:2335",
    )
    assert result.code == 0, result.err
    assert (root / "etc/modprobe.d/byteleap-vfio.conf").read_text() == (
        MODPROBE_HEAD + "options vfio-pci ids=10de:2330,10de:2335\n" + GPU_SOFTDEPS
        + "softdep snd_hda_intel pre: vfio-pci\n"
        "softdep xhci_pci pre: vfio-pci\n"
        "softdep i2c_nvidia_gpu pre: vfio-pci\n"
    )  # fmt: skip
    data = result.json()
    assert data["devices"] == []
    assert data["reboot_required"] is True
    assert any("no IOMMU or group checks" in note for note in data["notes"])


def test_bind_static_ids_refuses_foreign_vendors(tmp_path: Path, run: Any) -> None:
    host = intel_h100(tmp_path)
    result = run(host, "bind", "--static", "--ids", "10de:2330,8086:1572")
    assert result.code == 1
    assert "8086:1572: not an NVIDIA vendor:device ID" in result.err
    assert list((host.root / "etc/modprobe.d").iterdir()) == []


@pytest.mark.parametrize(
    "args",
    [
        ("bind", "--static", "--ids", "10de:233"),
        ("bind", "--static", "--ids", "10de:2330;reboot"),
        ("bind", "--static", "--ids", "10de:2330", "0000:18:00.0"),
        ("bind", "--dynamic", "--ids", "10de:2330"),
        ("bind", "0000:18:00.0"),
        ("bind", "--static", "--dynamic"),
        ("unbind", "--static", "0000:18:00.0"),
        ("bind", "--static", "--holder-wait", "5"),
        ("unbind", "--dynamic", "--holder-wait", "5"),
        ("verify", "--mode", "sometimes"),
        ("frobnicate",),
        (),
    ],
)
def test_usage_errors_exit_2_with_one_line(tmp_path: Path, run: Any, args: tuple[str, ...]) -> None:
    host = intel_h100(tmp_path)
    before = snapshot(tmp_path)
    result = run(host, *args)
    assert result.code == 2
    assert len(result.err.splitlines()) == 1
    assert result.err.startswith("vfio-setup: error: ")
    assert snapshot(tmp_path) == before


def test_usage_error_with_json_still_prints_json(tmp_path: Path, run: Any) -> None:
    result = run(intel_h100(tmp_path), "--json", "bind", "--dynamic", "nope")
    assert result.code == 2
    assert result.json()["ok"] is False
    assert "invalid PCI address" in result.json()["errors"][0]


def test_unbind_static_removes_both_files_and_nothing_else(tmp_path: Path, run: Any) -> None:
    host = intel_h100(tmp_path)
    keep = host.root / "etc/modprobe.d/other.conf"
    keep.write_text("options foo bar=1\n")
    assert run(host, "bind", "--static").code == 0
    result = run(host, "--json", "unbind", "--static")
    assert result.code == 0
    data = result.json()
    assert data["changed_files"] == [
        str(host.root / "etc/modprobe.d/byteleap-vfio.conf"),
        str(host.root / "etc/default/grub.d/91-byteleap-vfio.cfg"),
    ]
    assert data["reboot_required"] is True
    assert sorted(p.name for p in (host.root / "etc/modprobe.d").iterdir()) == ["other.conf"]
    again = run(host, "--json", "unbind", "--static")
    assert (again.json()["changed"], again.json()["reboot_required"]) == (False, False)
    assert "nothing changed" in run(host, "unbind", "--static").out


# --------------------------------------------------------------------------------------------
# verify


def boot_with_static_binding(host: FakeHost, run: Any) -> None:
    """bind --static, then what the reboot does: vfio-pci takes the IDs before nvidia."""
    assert run(host, "bind", "--static").code == 0
    ids = (host.root / "etc/modprobe.d/byteleap-vfio.conf").read_text()
    kernel = FakeKernel(host, vfio_ids=set(ids.split("ids=")[1].split()[0].split(",")))
    for bdf, device in host.devices.items():
        if device.vendor == 0x10DE:
            host.unbind(bdf)
            kernel("bus/pci/drivers_probe", bdf)
    host.set_cmdline(f"ro quiet intel_iommu=on iommu=pt vfio-pci.ids={','.join(kernel.vfio_ids)}")


def test_verify_static_passes_after_reboot(tmp_path: Path, run: Any) -> None:
    host = intel_h100(tmp_path)
    boot_with_static_binding(host, run)
    result = run(host, "verify")
    assert (result.code, result.err) == (0, "")
    sysfs = host.sys
    assert result.out.splitlines() == [
        "IOMMU",
        f"  [ok]   on: 6 groups in {sysfs}/kernel/iommu_groups",
        "  [ok]   kernel command line has intel_iommu=on iommu=pt (GenuineIntel)",
        "Modules",
        "  [ok]   vfio_pci loaded",
        "  [ok]   vfio_iommu_type1 loaded",
        "GPUs",
        "  [ok]   0000:18:00.0 10de:2330 NVIDIA H100 80GB HBM3: vfio-pci, IOMMU group 11 (only "
        "its own functions)",
        "  [ok]   0000:2b:00.0 10de:2330 NVIDIA H100 80GB HBM3: vfio-pci, IOMMU group 21 (only "
        "its own functions)",
        "Static configuration (mode: static)",
        f"  [ok]   {host.root}/etc/modprobe.d/byteleap-vfio.conf",
        f"  [ok]   {host.root}/etc/default/grub.d/91-byteleap-vfio.cfg",
        "VFIO-bound NVIDIA GPUs: 2",
        "Other NVIDIA GPUs: 0",
        "Total: 2",
    ]


def test_verify_static_before_reboot_says_reboot(tmp_path: Path, run: Any) -> None:
    host = rtx_4090(tmp_path)
    assert run(host, "bind", "--static").code == 0
    result = run(host, "verify")
    assert result.code == 1
    assert result.err.splitlines() == [
        "vfio-setup: 0000:01:00.0: on nvidia although 10de:2684 is bound statically: reboot "
        "pending, or the host driver loaded first: run 'update-initramfs -u -k all' and "
        "'update-grub', then reboot",
        "vfio-setup: 0000:01:00.1: on snd_hda_intel although 10de:22ba is bound statically: "
        "reboot pending, or the host driver loaded first: run 'update-initramfs -u -k all' and "
        "'update-grub', then reboot",
    ]
    assert result.out.splitlines()[-3:] == [
        "VFIO-bound NVIDIA GPUs: 0",
        "Other NVIDIA GPUs: 1",
        "Total: 1",
    ]


def test_verify_static_without_files_says_bind(tmp_path: Path, run: Any) -> None:
    host = amd_h200(tmp_path)
    result = run(host, "verify", "--mode", "static")
    assert result.code == 1
    lines = result.err.splitlines()
    assert lines[0] == (
        "vfio-setup: 0000:41:00.0: on nvidia, not vfio-pci: run 'vfio-setup bind --static', "
        "then run 'update-initramfs -u -k all' and 'update-grub', then reboot"
    )
    assert any("byteleap-vfio.conf is missing" in line for line in lines)
    assert all(line.startswith("vfio-setup: ") for line in lines)


def test_verify_static_names_a_model_missing_from_the_binding(tmp_path: Path, run: Any) -> None:
    host = amd_h200(tmp_path)
    boot_with_static_binding(host, run)
    host.add_card("0000:81:00.0", H100_SXM, group=81)  # a card added later
    result = run(host, "verify")
    assert result.code == 1
    assert "0000:81:00.0: 10de:2330 is not in" in result.err
    assert "Other NVIDIA GPUs: 1" in result.out


def test_verify_dynamic_mixed_host_passes(tmp_path: Path, run: Any) -> None:
    host = mixed(tmp_path)
    result = run(host, "--json", "verify")
    assert result.code == 0, result.err
    data = result.json()
    assert data["ok"] is True
    assert data["mode"] == "dynamic"
    assert data["summary"] == {"vfio_bound": 1, "other": 1, "total": 2}
    assert [gpu["group_safe"] for gpu in data["gpus"]] == [True, True]
    assert data["failures"] == []
    text = run(host, "verify")
    # AMD-Vi is on by default: only iommu=pt is worth a warning.
    assert "  [--]   kernel command line lacks amd_iommu=on (on by the kernel's default here)" in (
        text.out.splitlines()
    )
    assert text.out.splitlines()[-3:] == [
        "VFIO-bound NVIDIA GPUs: 1",
        "Other NVIDIA GPUs: 1",
        "Total: 2",
    ]


def test_verify_reports_an_unsafe_group(tmp_path: Path, run: Any) -> None:
    host = nvme_in_gpu_group(tmp_path)
    host.add_card("0000:81:00.0", H100_PCIE, group=10)
    result = run(host, "--json", "verify", "--mode", "dynamic")
    assert result.code == 1
    data = result.json()
    assert [gpu["group_safe"] for gpu in data["gpus"]] == [False, True]
    assert data["failures"] == [
        "0000:41:00.0: IOMMU group 9 also holds 0000:42:00.0 (144d:a80a NVMe controller), which "
        "a VM given the GPU would get too: put the GPU in a slot with its own IOMMU group (or "
        "enable ACS in the firmware)"
    ]
    text = run(host, "verify", "--mode", "dynamic")
    assert (
        "  [FAIL] 0000:41:00.0 10de:2331 NVIDIA H100 PCIe: nvidia, IOMMU group 9: also holds "
        "0000:42:00.0 (144d:a80a NVMe controller)"
    ) in text.out.splitlines()
    assert len(text.err.splitlines()) == 1


@pytest.mark.parametrize(
    ("cpu", "arg"), [("GenuineIntel", "intel_iommu=on"), ("AuthenticAMD", "amd_iommu=on")]
)
def test_verify_without_iommu(tmp_path: Path, run: Any, cpu: str, arg: str) -> None:
    host = FakeHost(tmp_path, cpu=cpu, iommu=False, cmdline="ro quiet")
    host.add_card("0000:41:00.0", H200, group=None)
    host.load_vfio()
    result = run(host, "verify")
    assert result.code == 1
    (line,) = result.err.splitlines()  # one failure, said once
    assert f"add '{arg} iommu=pt' to GRUB_CMDLINE_LINUX_DEFAULT, run update-grub and reboot" in line
    assert "  [FAIL] off: no IOMMU groups" in result.out
    assert f"  [warn] kernel command line lacks {arg} iommu=pt" in result.out


def test_verify_warns_about_a_missing_passthrough_argument(tmp_path: Path, run: Any) -> None:
    host = amd_h200(tmp_path)
    host.set_cmdline("ro quiet amd_iommu=on")
    result = run(host, "verify")
    assert (result.code, result.err) == (0, "")
    assert "  [warn] kernel command line lacks iommu=pt (recommended for AuthenticAMD)" in (
        result.out.splitlines()
    )


def test_verify_dynamic_accepts_an_installed_but_unloaded_vfio_module(
    tmp_path: Path, run: Any
) -> None:
    host = intel_h100(tmp_path, vfio=False)
    result = run(host, "verify")
    assert result.code == 0, result.err
    assert "vfio_pci not loaded; loadable" in result.out
    assert "[--]   vfio_iommu_type1 not loaded yet (the first VM loads it)" in result.out
    shutil.rmtree(host.root / "lib/modules")
    missing = run(host, "verify")
    assert missing.code == 1
    assert "install the kernel's module package (Ubuntu: linux-modules-extra-6.1.0-28-amd64)" in (
        missing.err
    )


def test_verify_without_gpus_fails(tmp_path: Path, run: Any) -> None:
    host = FakeHost(tmp_path)
    host.load_vfio()
    result = run(host, "verify")
    assert result.code == 1
    assert "no NVIDIA GPU in" in result.err
    assert result.out.splitlines()[-1] == "Total: 0"


def test_verify_dynamic_warns_about_static_binding_and_legacy_files(
    tmp_path: Path, run: Any
) -> None:
    host = amd_h200(tmp_path)
    assert run(host, "bind", "--static").code == 0
    (host.root / "etc/modprobe.d/nvidia-blacklist.conf").write_text("blacklist nvidia\n")
    result = run(host, "verify", "--mode", "dynamic")
    assert result.code == 0
    assert "byteleap-vfio.conf present: vfio-pci takes its IDs at boot" in result.out
    assert "nvidia-blacklist.conf: left by the closed vfio-setup" in result.out


def test_verify_needs_procfs(tmp_path: Path, run: Any) -> None:
    host = amd_h200(tmp_path)
    (host.proc / "cmdline").unlink()
    result = run(host, "verify")
    assert result.code == 2
    assert "cannot read" in result.err
    assert "cmdline" in result.err


# --------------------------------------------------------------------------------------------
# debug


def test_debug_dumps_everything(tmp_path: Path, run: Any) -> None:
    host = nvme_in_gpu_group(tmp_path)
    assert run(host, "bind", "--static", "--ids", "10de:2331").code == 0
    result = run(host, "debug")
    assert result.code == 0  # for bug reports: the failed checks are in the text
    lines = result.out.splitlines()
    assert "kernel: 6.1.0-28-amd64" in lines
    assert "cpu vendor: GenuineIntel" in lines
    assert any(line.startswith("cmdline: BOOT_IMAGE=") for line in lines)
    assert (
        "  0000:42:00.0 0x010802 144d:a80a NVMe controller: driver nvme, override none, "
        "IOMMU group 9"
    ) in lines
    assert "  9: 0000:41:00.0 0000:42:00.0" in lines
    assert "  | options vfio-pci ids=10de:2331" in lines
    assert f"{host.root}/etc/modprobe.d/nvidia-blacklist.conf: absent" in lines
    assert "GPU 0000:41:00.0 10de:2331 NVIDIA H100 PCIe" in lines
    assert "Total: 1" in lines


def test_debug_json(tmp_path: Path, run: Any) -> None:
    host = mixed(tmp_path)
    data = run(host, "--json", "debug").json()
    assert set(data) == {
        "kernel",
        "cmdline",
        "cpu_vendor",
        "modules",
        "pci_devices",
        "iommu_groups",
        "config_files",
        "list",
        "verify",
    }
    assert data["iommu_groups"] == {"50": ["0000:81:00.0"], "60": ["0000:c1:00.0"]}
    assert data["modules"]["vfio_pci"] is True
    assert data["verify"]["summary"]["total"] == 2
    assert data["config_files"][str(host.root / "etc/modprobe.d/byteleap-vfio.conf")] is None


def test_debug_goes_on_without_procfs(tmp_path: Path, run: Any) -> None:
    host = mixed(tmp_path)
    shutil.rmtree(host.proc)
    result = run(host, "debug")
    assert result.code == 0
    assert result.out.startswith("kernel: (unreadable: cannot read")


# --------------------------------------------------------------------------------------------
# The program itself


def test_cli_runs_as_a_program_with_the_system_python(tmp_path: Path) -> None:
    mode = TOOL.stat().st_mode
    assert mode & stat.S_IXUSR
    assert TOOL.read_text().splitlines()[0] == "#!/usr/bin/python3"
    host = amd_h200(tmp_path)
    done = subprocess.run(
        [str(TOOL), *host.argv("--json", "list")], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["gpus"][0]["bdf"] == "0000:41:00.0"


def test_help_exits_zero() -> None:
    result = cli(None, "--help")
    assert result.code == 0
    assert "list" in result.out
    assert "verify" in result.out


def test_source_parses_as_python_3_10() -> None:
    # Ubuntu 22.04's /usr/bin/python3 is 3.10.
    ast.parse(TOOL.read_text(), feature_version=(3, 10))
    assert "tomllib" not in TOOL.read_text()


def _python_3_10() -> str | None:
    """A working python3.10 on PATH (version managers put shims there that may not run)."""
    python = shutil.which("python3.10")
    if python is None:
        return None
    check = [python, "-c", "import sys; sys.exit(sys.version_info[:2] != (3, 10))"]
    works = subprocess.run(check, capture_output=True, timeout=30, check=False).returncode == 0
    return python if works else None


PYTHON_3_10 = _python_3_10()


@pytest.mark.skipif(PYTHON_3_10 is None, reason="no working python3.10 on PATH")
def test_runs_under_python_3_10(tmp_path: Path) -> None:
    python = PYTHON_3_10
    assert python is not None
    host = rtx_4090(tmp_path)
    result = cli(host, "--json", "verify", python=python)
    assert result.code == 0, result.err
    assert result.json()["summary"]["total"] == 1


def test_only_the_standard_library_is_imported() -> None:
    tree = ast.parse(TOOL.read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level == 0
    }
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}
    assert "subprocess" not in imported


def test_model_names_match_the_worker_inventory() -> None:
    names: dict[int, str] = inventory._NVIDIA_DEVICE_NAMES
    assert names == tool.MODEL_NAMES


# --------------------------------------------------------------------------------------------
# Packaging


def test_unit_binds_and_unbinds_through_vfio_setup() -> None:
    lines = UNIT.read_text().splitlines()
    assert "ExecStart=/usr/sbin/vfio-setup bind --dynamic %I" in lines
    assert "ExecStop=/usr/sbin/vfio-setup unbind --dynamic %I" in lines
    assert "driverctl" not in UNIT.read_text()


def test_worker_package_ships_the_tool_in_sbin() -> None:
    install = (REPO / "debian/byteleap-worker.install").read_text().splitlines()
    assert "bin/vfio-setup usr/sbin/" in install
