"""Domain XML of a leased VM, parsed back: what the VM gets, and what it must never get."""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from typing import Any

import pytest

from byteleap.worker.vm.domain import (
    GUEST_AGENT_CHANNEL,
    METADATA_NAMESPACE,
    DomainSpec,
    PciAddress,
    domain_name,
    guest_agent_state,
    has_nvram,
    lease_id_of_domain,
    render_domain_xml,
    validate_lease_id,
)

LEASE = "0123456789abcdef0123456789abcdef"
GPU = PciAddress.parse("0000:41:00.0")
AUDIO = PciAddress.parse("0000:41:00.1")
GPU2 = PciAddress.parse("0000:81:00.0")


def spec(**changes: Any) -> DomainSpec:
    base = DomainSpec(
        lease_id=LEASE,
        uuid="5f4f5c7a-3b5e-4d5e-9a3c-1234567890ab",
        domain_type="kvm",
        vcpus=16,
        memory_mib=131072,
        memory_hard_limit_mib=135168,
        machine="q35",
        cpu_mode="host-passthrough",
        firmware="efi",
        disk_path="/var/lib/byteleap/vms/x/disk.qcow2",
        seed_path="/var/lib/byteleap/vms/x/seed.iso",
        console_log="/var/lib/byteleap/vms/x/console.log",
        bridge="blbr3",
        mac="52:54:00:ab:cd:ef",
        hostdevs=(GPU, AUDIO, GPU2),
    )
    return dataclasses.replace(base, **changes)


def parse(s: DomainSpec) -> ET.Element:
    return ET.fromstring(render_domain_xml(s))


def attr(element: ET.Element, path: str, name: str) -> str | None:
    """Attribute ``name`` of the one element at ``path`` (which must exist)."""
    found = element.find(path)
    assert found is not None, f"no {path}"
    return found.get(name)


def test_identity_machine_and_limits() -> None:
    root = parse(spec())
    assert root.get("type") == "kvm"
    assert root.findtext("name") == f"byteleap-lease-{LEASE}"
    assert root.findtext("uuid") == "5f4f5c7a-3b5e-4d5e-9a3c-1234567890ab"
    assert (
        root.findtext(f"./metadata/{{{METADATA_NAMESPACE}}}lease/{{{METADATA_NAMESPACE}}}id")
        == LEASE
    )
    assert attr(root, "os/type", "machine") == "q35"
    assert attr(root, "cpu", "mode") == "host-passthrough"
    assert root.findtext("vcpu") == "16"
    memory = root.find("memory")
    assert memory is not None and (memory.text, memory.get("unit")) == ("131072", "MiB")
    assert root.findtext("memtune/hard_limit") == "135168"
    assert root.findtext("cputune/shares") == str(16 * 1024)
    assert root.findtext("on_crash") == "destroy"
    assert root.findtext("on_poweroff") == "destroy"


def test_every_gpu_and_companion_is_an_unmanaged_vfio_hostdev() -> None:
    hostdevs = parse(spec()).findall("devices/hostdev")
    assert len(hostdevs) == 3
    seen = []
    for hostdev in hostdevs:
        assert (hostdev.get("mode"), hostdev.get("type"), hostdev.get("managed")) == (
            "subsystem",
            "pci",
            "no",
        )
        assert attr(hostdev, "driver", "name") == "vfio"
        address = hostdev.find("source/address")
        assert address is not None
        seen.append(
            PciAddress(
                *(int(address.get(k, ""), 16) for k in ("domain", "bus", "slot", "function"))
            )
        )
    assert seen == [GPU, AUDIO, GPU2]


def test_disk_seed_nic_agent_console_and_no_balloon() -> None:
    devices = parse(spec()).find("devices")
    assert devices is not None
    disk, cdrom = devices.findall("disk")
    assert disk.get("device") == "disk"
    assert attr(disk, "source", "file") == "/var/lib/byteleap/vms/x/disk.qcow2"
    assert attr(disk, "target", "bus") == "virtio"
    assert attr(disk, "driver", "type") == "qcow2"
    assert cdrom.get("device") == "cdrom"
    assert cdrom.find("readonly") is not None
    assert attr(cdrom, "source", "file") == "/var/lib/byteleap/vms/x/seed.iso"
    (nic,) = devices.findall("interface")
    assert nic.get("type") == "bridge"
    assert attr(nic, "source", "bridge") == "blbr3"
    assert attr(nic, "model", "type") == "virtio"
    assert attr(nic, "mac", "address") == "52:54:00:ab:cd:ef"
    channels = devices.findall("channel")
    assert [attr(c, "target", "name") for c in channels] == [GUEST_AGENT_CHANNEL]
    serial = devices.find("serial")
    assert serial is not None and serial.get("type") == "file"
    assert attr(serial, "source", "path") == "/var/lib/byteleap/vms/x/console.log"
    assert attr(devices, "memballoon", "model") == "none"


def test_no_graphics_by_default() -> None:
    root = parse(spec())
    assert root.findall("devices/graphics") == []
    assert [attr(v, "model", "type") for v in root.findall("devices/video")] == ["none"]
    assert "vnc" not in render_domain_xml(spec()).lower()


def test_vnc_listens_on_localhost_only_with_a_password() -> None:
    root = parse(spec(vnc_password="s3cr3t!x"))
    (graphics,) = root.findall("devices/graphics")
    assert graphics.get("type") == "vnc"
    assert graphics.get("listen") == "127.0.0.1"
    assert [listen.get("address") for listen in graphics.findall("listen")] == ["127.0.0.1"]
    assert graphics.get("passwd") == "s3cr3t!x"


def test_firmware_choices() -> None:
    efi = parse(spec(firmware="efi")).find("os")
    assert efi is not None and efi.get("firmware") == "efi"
    feature = efi.find("firmware/feature")
    assert feature is not None and (feature.get("name"), feature.get("enabled")) == (
        "secure-boot",
        "no",
    )
    bios = parse(spec(firmware="bios")).find("os")
    assert bios is not None and bios.get("firmware") is None and bios.find("firmware") is None
    assert attr(parse(spec(cpu_mode="host-model")), "cpu", "check") is None


def test_hostile_paths_are_escaped_not_interpreted() -> None:
    nasty = "/srv/vms/a'b\"c<d>&e</source><hostdev/>.qcow2"
    root = parse(spec(disk_path=nasty, hostdevs=(GPU,)))
    assert attr(root, "devices/disk/source", "file") == nasty
    assert len(root.findall("devices/hostdev")) == 1


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"lease_id": "../../etc"}, "lease id"),
        ({"lease_id": LEASE.upper()}, "lease id"),
        ({"uuid": "not-a-uuid"}, "UUID"),
        ({"vcpus": 0}, "vcpus"),
        ({"memory_hard_limit_mib": 1024}, "hard limit"),
        ({"disk_path": "relative.qcow2"}, "absolute"),
        ({"mac": "00:11:22:33:44:55"}, "mac"),
        ({"hostdevs": (GPU, GPU)}, "twice"),
        ({"vnc_password": "123456789"}, "VNC"),
    ],
)
def test_spec_rejects_bad_values(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        spec(**changes)


def test_pci_addresses() -> None:
    address = PciAddress.parse("0000:C1:00.1")
    assert str(address) == "0000:c1:00.1"
    assert address.nodedev_name == "pci_0000_c1_00_1"
    assert address.same_device(PciAddress.parse("0000:c1:00.0"))
    assert not address.same_device(PciAddress.parse("0000:c2:00.1"))
    for bad in ("41:00.0", "0000:41:00.8", "0000:41:20.0", "0000:41:00.0;rm", ""):
        with pytest.raises(ValueError, match="PCI address"):
            PciAddress.parse(bad)


def test_lease_ids_and_names() -> None:
    assert domain_name(LEASE) == "byteleap-lease-" + LEASE
    assert lease_id_of_domain(domain_name(LEASE)) == LEASE
    assert lease_id_of_domain("byteleap-lease-xyz") is None
    assert lease_id_of_domain("my-own-vm") is None
    assert validate_lease_id(LEASE) == LEASE
    with pytest.raises(ValueError, match="lease id"):
        validate_lease_id(LEASE + "0")


def test_guest_agent_state_from_live_xml() -> None:
    def live(state: str | None) -> str:
        attr = f" state='{state}'" if state else ""
        return (
            "<domain><devices><channel type='unix'>"
            f"<target type='virtio' name='{GUEST_AGENT_CHANNEL}'{attr}/>"
            "</channel></devices></domain>"
        )

    assert guest_agent_state(live("connected")) == "connected"
    assert guest_agent_state(live("disconnected")) == "disconnected"
    assert guest_agent_state(live(None)) == "unknown"
    assert guest_agent_state("<domain><devices/></domain>") == "unknown"
    assert guest_agent_state("not xml") == "unknown"


def test_nvram_detection() -> None:
    assert has_nvram("<domain><os><nvram>/var/lib/libvirt/qemu/nvram/x.fd</nvram></os></domain>")
    assert not has_nvram(render_domain_xml(spec()))
