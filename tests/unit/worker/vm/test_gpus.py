"""GPU binding through the helper units (a fake systemctl and sysfs), and node device parsing."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from byteleap.worker.vm import VmError
from byteleap.worker.vm.domain import PciAddress
from byteleap.worker.vm.gpus import (
    PreboundGpuBinder,
    SystemdGpuBinder,
    parse_pci_nodedev,
    unit_name,
)
from tests.support.libvirt_fixtures import DEFAULT_DEVICES, node_fixture_xml

GPU = PciAddress.parse("0000:41:00.0")

# A stand-in for systemctl: logs its argv, answers `show` with $STATE, lists $ACTIVE units,
# fails with $FAIL on start, sleeps $SLEEP seconds.
FAKE_SYSTEMCTL = """\
import os, sys, time
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
time.sleep(float(os.environ.get("SLEEP", "0")))
verb = sys.argv[2]
if verb == "start" and os.environ.get("FAIL"):
    sys.stderr.write(os.environ["FAIL"] + "\\n")
    sys.exit(1)
if verb == "show":
    print(os.environ.get("STATE", "active"))
if verb == "list-units":
    for unit in os.environ.get("ACTIVE", "").split():
        print(unit, "loaded active exited ByteLeap: GPU bound to vfio-pci for a lease")
"""


@pytest.fixture
def systemctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    script = tmp_path / "systemctl"
    script.write_text(f"#!{sys.executable}\n{FAKE_SYSTEMCTL}")
    script.chmod(0o755)
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "calls.log"))
    return script


def fake_sysfs(root: Path, address: str, driver: str | None) -> Path:
    device = root / "bus" / "pci" / "devices" / address
    device.mkdir(parents=True)
    if driver is not None:
        target = root / "bus" / "pci" / "drivers" / driver
        target.mkdir(parents=True, exist_ok=True)
        (device / "driver").symlink_to(os.path.relpath(target, device))
    return root


def calls(tmp_path: Path) -> list[str]:
    return (tmp_path / "calls.log").read_text().splitlines()


def test_bind_starts_the_helper_unit_and_checks_the_driver(tmp_path: Path, systemctl: Path) -> None:
    sysfs = fake_sysfs(tmp_path / "sys", str(GPU), "vfio-pci")
    binder = SystemdGpuBinder(timeout_s=10, systemctl=str(systemctl), sysfs_root=sysfs)
    binder.bind(GPU)
    binder.release(GPU)
    unit = "byteleap-gpu-vfio@0000:41:00.0.service"
    assert unit_name(GPU) == unit
    assert calls(tmp_path) == [
        f"--no-ask-password start {unit}",
        f"--no-ask-password show --property=ActiveState --value {unit}",
        f"--no-ask-password stop {unit}",
    ]


def test_a_failed_start_says_why(
    tmp_path: Path, systemctl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAIL", "Job for byteleap-gpu-vfio@0000:41:00.0.service failed.")
    binder = SystemdGpuBinder(timeout_s=10, systemctl=str(systemctl), sysfs_root=tmp_path)
    with pytest.raises(VmError, match=r"binding GPU 0000:41:00.0.*status 1: Job for .* failed"):
        binder.bind(GPU)


def test_a_skipped_unit_is_not_a_bound_gpu(
    tmp_path: Path, systemctl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STATE", "inactive")  # ConditionPathExists= failed: start "succeeds"
    binder = SystemdGpuBinder(timeout_s=10, systemctl=str(systemctl), sysfs_root=tmp_path)
    with pytest.raises(VmError, match="is inactive after start"):
        binder.bind(GPU)


def test_the_gpu_must_end_up_on_vfio_pci(tmp_path: Path, systemctl: Path) -> None:
    sysfs = fake_sysfs(tmp_path / "sys", str(GPU), "nvidia")
    binder = SystemdGpuBinder(timeout_s=10, systemctl=str(systemctl), sysfs_root=sysfs)
    with pytest.raises(VmError, match="on nvidia, not vfio-pci"):
        binder.bind(GPU)


def test_a_hanging_systemctl_times_out(
    tmp_path: Path, systemctl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLEEP", "5")
    binder = SystemdGpuBinder(timeout_s=0.5, systemctl=str(systemctl), sysfs_root=tmp_path)
    with pytest.raises(VmError, match=r"did not finish within 0.5 s"):
        binder.bind(GPU)


def test_missing_systemctl(tmp_path: Path) -> None:
    binder = SystemdGpuBinder(timeout_s=1, systemctl=str(tmp_path / "nope"))
    with pytest.raises(VmError, match="is not installed"):
        binder.release(GPU)


def test_bound_lists_active_helper_units_only(
    tmp_path: Path, systemctl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "ACTIVE",
        "byteleap-gpu-vfio@0000:41:00.0.service byteleap-gpu-vfio@0000:c1:00.0.service "
        "byteleap-gpu-vfio@bogus.service sshd.service",
    )
    binder = SystemdGpuBinder(timeout_s=10, systemctl=str(systemctl))
    assert binder.bound() == {GPU, PciAddress.parse("0000:c1:00.0")}
    listing = "list-units --plain --no-legend --state=active byteleap-gpu-vfio@*.service"
    assert calls(tmp_path)[-1].endswith(listing)


def test_prebound_binder_only_checks(tmp_path: Path) -> None:
    sysfs = fake_sysfs(tmp_path / "sys", str(GPU), "vfio-pci")
    fake_sysfs(sysfs, "0000:81:00.0", "nvidia")
    binder = PreboundGpuBinder(sysfs_root=sysfs)
    binder.bind(GPU)
    binder.release(GPU)
    assert binder.bound() == frozenset()
    with pytest.raises(VmError, match="on nvidia, not vfio-pci"):
        binder.bind(PciAddress.parse("0000:81:00.0"))
    with pytest.raises(VmError, match="not a PCI device of this host"):
        binder.bind(PciAddress.parse("0000:99:00.0"))


def test_node_device_xml_is_parsed() -> None:
    import xml.etree.ElementTree as ET

    node = ET.fromstring(node_fixture_xml())
    by_name = {d.findtext("name"): d for d in node.iterfind("device")}
    gpu = parse_pci_nodedev(ET.tostring(by_name["pci_0000_41_00_0"], encoding="unicode"))
    assert gpu.address == GPU
    assert gpu.base_class == 0x03 and gpu.vendor_id == 0x10DE and gpu.product_id == 0x2330
    assert gpu.iommu_group == 42
    assert gpu.group_members == (GPU, PciAddress.parse("0000:41:00.1"))
    assert len(DEFAULT_DEVICES) == len(by_name) - 1  # plus "computer"


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("<device", "does not parse"),
        ("<device><name>usb_1</name><capability type='usb'/></device>", "not a PCI device"),
        (
            "<device><capability type='pci'><domain>x</domain></capability></device>",
            "not a number",
        ),
    ],
)
def test_malformed_node_devices(xml: str, message: str) -> None:
    with pytest.raises(VmError, match=message):
        parse_pci_nodedev(xml)
