"""The libvirt domain of a leased VM: a typed model of exactly what we need, and its XML.

One domain per lease, named ``byteleap-lease-<lease_id>``, with:

* q35, ``host-passthrough`` (or ``host-model``) CPU, UEFI by firmware autoselection (secure boot
  off: guest NVIDIA modules are unsigned) or SeaBIOS;
* a virtio disk (the lease's qcow2 overlay) and a read-only SATA cdrom (the cloud-init seed);
* one virtio NIC on the lease's bridge;
* every leased GPU and its companion functions as ``<hostdev managed='no'>``: the privileged
  helper unit already bound them to vfio-pci, so libvirt never rebinds a host device itself;
* the QEMU guest agent channel, a virtio RNG (fresh guests need entropy for SSH host keys),
  memballoon off (VFIO pins all guest memory anyway), suspend off;
* no graphics and no emulated video unless ``vnc_password`` is set: then one VNC display bound to
  127.0.0.1 with that password, for the operator only;
* the serial console written to a log file;
* ``on_crash`` destroy (a crashed guest is not restarted behind the lease's back), a memory hard
  limit and CPU shares;
* ``<metadata>`` naming the lease, so a domain is recognised as ours even if renamed.

The XML is built with :mod:`xml.etree.ElementTree`, never from string templates: every value is
escaped by the serializer.
"""

from __future__ import annotations

import re
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "DOMAIN_PREFIX",
    "GUEST_AGENT_CHANNEL",
    "METADATA_NAMESPACE",
    "DomainSpec",
    "PciAddress",
    "domain_name",
    "guest_agent_state",
    "lease_id_of_domain",
    "render_domain_xml",
    "validate_lease_id",
]

DOMAIN_PREFIX: Final = "byteleap-lease-"
METADATA_NAMESPACE: Final = "https://github.com/byteleap-agents/byteleap/xmlns/lease/v1"
METADATA_PREFIX: Final = "byteleap"
GUEST_AGENT_CHANNEL: Final = "org.qemu.guest_agent.0"
_LEASE_ID: Final = re.compile(r"[0-9a-f]{32}")
_PCI_ADDRESS: Final = re.compile(
    r"(?P<domain>[0-9a-f]{4}):(?P<bus>[0-9a-f]{2}):(?P<slot>[0-1][0-9a-f])\.(?P<function>[0-7])"
)
_MAC: Final = re.compile(r"52:54:00(:[0-9a-f]{2}){3}")

ET.register_namespace(METADATA_PREFIX, METADATA_NAMESPACE)


def validate_lease_id(lease_id: str) -> str:
    """``lease_id`` if it is 32 lowercase hex characters (it names files, domains and rules)."""
    if not isinstance(lease_id, str) or not _LEASE_ID.fullmatch(lease_id):
        raise ValueError(f"lease id must be 32 lowercase hex characters, got {lease_id!r:.80}")
    return lease_id


def domain_name(lease_id: str) -> str:
    return DOMAIN_PREFIX + validate_lease_id(lease_id)


def lease_id_of_domain(name: str) -> str | None:
    """The lease id in a domain name of ours; None for any other domain."""
    if not name.startswith(DOMAIN_PREFIX):
        return None
    rest = name[len(DOMAIN_PREFIX) :]
    return rest if _LEASE_ID.fullmatch(rest) else None


@dataclass(frozen=True, order=True)
class PciAddress:
    """A PCI function address, ``0000:41:00.0`` (domain:bus:slot.function)."""

    domain: int
    bus: int
    slot: int
    function: int

    def __post_init__(self) -> None:
        limits = (("domain", 0xFFFF), ("bus", 0xFF), ("slot", 0x1F), ("function", 7))
        for name, limit in limits:
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value <= limit:
                raise ValueError(f"PCI {name} must be within 0..{limit:#x}, got {value!r}")

    @classmethod
    def parse(cls, text: str) -> PciAddress:
        """``0000:41:00.0`` (case-insensitive; the domain is required)."""
        match = _PCI_ADDRESS.fullmatch(text.strip().lower()) if isinstance(text, str) else None
        if match is None:
            raise ValueError(f"not a PCI address like 0000:41:00.0: {text!r:.40}")
        return cls(*(int(match.group(part), 16) for part in ("domain", "bus", "slot", "function")))

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.slot:02x}.{self.function:x}"

    @property
    def nodedev_name(self) -> str:
        """The libvirt node device name, ``pci_0000_41_00_0``."""
        return f"pci_{self.domain:04x}_{self.bus:02x}_{self.slot:02x}_{self.function:x}"

    def same_device(self, other: PciAddress) -> bool:
        """Whether ``other`` is a function of the same physical device (same slot)."""
        return (self.domain, self.bus, self.slot) == (other.domain, other.bus, other.slot)

    def xml_attributes(self) -> dict[str, str]:
        return {
            "domain": f"0x{self.domain:04x}",
            "bus": f"0x{self.bus:02x}",
            "slot": f"0x{self.slot:02x}",
            "function": f"0x{self.function:x}",
        }


@dataclass(frozen=True, kw_only=True)
class DomainSpec:
    """Everything a leased VM's domain is made of (see the module docstring)."""

    lease_id: str
    uuid: str
    domain_type: Literal["kvm", "test"]
    vcpus: int
    memory_mib: int
    memory_hard_limit_mib: int
    machine: str
    cpu_mode: Literal["host-passthrough", "host-model"]
    firmware: Literal["efi", "bios"]
    disk_path: str
    seed_path: str
    console_log: str
    bridge: str
    mac: str
    hostdevs: tuple[PciAddress, ...]
    vnc_password: str | None = None

    def __post_init__(self) -> None:
        validate_lease_id(self.lease_id)
        uuid.UUID(self.uuid)  # ValueError on a malformed one
        if not 1 <= self.vcpus <= 4096:
            raise ValueError(f"vcpus must be within 1..4096, got {self.vcpus}")
        if self.memory_mib < 64:
            raise ValueError(f"memory must be at least 64 MiB, got {self.memory_mib}")
        if self.memory_hard_limit_mib < self.memory_mib:
            raise ValueError("the memory hard limit must not be below the memory")
        for name in ("disk_path", "seed_path", "console_log"):
            if not getattr(self, name).startswith("/"):
                raise ValueError(f"{name} must be an absolute path")
        if not _MAC.fullmatch(self.mac):
            raise ValueError(f"mac must be a 52:54:00:xx:xx:xx address, got {self.mac!r}")
        if len(set(self.hostdevs)) != len(self.hostdevs):
            raise ValueError("a PCI device is listed twice")
        if self.vnc_password is not None and not 1 <= len(self.vnc_password) <= 8:
            raise ValueError("a VNC password has 1 to 8 characters")

    @property
    def name(self) -> str:
        return domain_name(self.lease_id)


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    if text is not None:
        element.text = text
    return element


def render_domain_xml(spec: DomainSpec) -> str:
    """The domain XML for ``spec`` (what ``virConnect.defineXML`` takes)."""
    root = ET.Element("domain", {"type": spec.domain_type})
    _sub(root, "name", spec.name)
    _sub(root, "uuid", spec.uuid)
    _sub(root, "title", f"ByteLeap lease {spec.lease_id}")
    metadata = _sub(root, "metadata")
    lease = _sub(metadata, f"{{{METADATA_NAMESPACE}}}lease")
    _sub(lease, f"{{{METADATA_NAMESPACE}}}id", spec.lease_id)
    _sub(root, "memory", str(spec.memory_mib), unit="MiB")
    _sub(root, "currentMemory", str(spec.memory_mib), unit="MiB")
    memtune = _sub(root, "memtune")
    _sub(memtune, "hard_limit", str(spec.memory_hard_limit_mib), unit="MiB")
    _sub(root, "vcpu", str(spec.vcpus), placement="static")
    cputune = _sub(root, "cputune")
    # Weight against the host's other work (the worker, other leases) in proportion to size.
    _sub(cputune, "shares", str(1024 * spec.vcpus))

    os_attrs = {"firmware": "efi"} if spec.firmware == "efi" else {}
    os_element = _sub(root, "os", **os_attrs)
    _sub(os_element, "type", "hvm", arch="x86_64", machine=spec.machine)
    if spec.firmware == "efi":
        firmware = _sub(os_element, "firmware")
        _sub(firmware, "feature", enabled="no", name="secure-boot")
    _sub(os_element, "boot", dev="hd")

    features = _sub(root, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    cpu_attrs: dict[str, str] = {"mode": spec.cpu_mode}
    if spec.cpu_mode == "host-passthrough":
        cpu_attrs["check"] = "none"
    _sub(root, "cpu", **cpu_attrs)
    _sub(root, "clock", offset="utc")
    _sub(root, "on_poweroff", "destroy")
    _sub(root, "on_reboot", "restart")
    _sub(root, "on_crash", "destroy")
    pm = _sub(root, "pm")
    _sub(pm, "suspend-to-mem", enabled="no")
    _sub(pm, "suspend-to-disk", enabled="no")

    devices = _sub(root, "devices")
    disk = _sub(devices, "disk", type="file", device="disk")
    _sub(disk, "driver", name="qemu", type="qcow2", discard="unmap")
    _sub(disk, "source", file=spec.disk_path)
    _sub(disk, "target", dev="vda", bus="virtio")

    cdrom = _sub(devices, "disk", type="file", device="cdrom")
    _sub(cdrom, "driver", name="qemu", type="raw")
    _sub(cdrom, "source", file=spec.seed_path)
    _sub(cdrom, "target", dev="sda", bus="sata")
    _sub(cdrom, "readonly")

    nic = _sub(devices, "interface", type="bridge")
    _sub(nic, "mac", address=spec.mac)
    _sub(nic, "source", bridge=spec.bridge)
    _sub(nic, "model", type="virtio")

    for address in spec.hostdevs:
        hostdev = _sub(devices, "hostdev", mode="subsystem", type="pci", managed="no")
        _sub(hostdev, "driver", name="vfio")
        source = _sub(hostdev, "source")
        _sub(source, "address", **address.xml_attributes())

    channel = _sub(devices, "channel", type="unix")
    _sub(channel, "source", mode="bind")
    _sub(channel, "target", type="virtio", name=GUEST_AGENT_CHANNEL)

    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=spec.console_log, append="off")
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="file")
    _sub(console, "source", path=spec.console_log, append="off")
    _sub(console, "target", type="serial", port="0")

    if spec.vnc_password is not None:
        graphics = _sub(
            devices,
            "graphics",
            type="vnc",
            port="-1",
            autoport="yes",
            listen="127.0.0.1",
            passwd=spec.vnc_password,
        )
        _sub(graphics, "listen", type="address", address="127.0.0.1")
        video = _sub(devices, "video")
        _sub(video, "model", type="vga")
    else:
        video = _sub(devices, "video")
        _sub(video, "model", type="none")

    rng = _sub(devices, "rng", model="virtio")
    _sub(rng, "backend", "/dev/urandom", model="random")
    _sub(devices, "memballoon", model="none")
    ET.indent(root)
    return ET.tostring(root, encoding="unicode")


GuestAgentState = Literal["connected", "disconnected", "unknown"]


def guest_agent_state(live_xml: str) -> GuestAgentState:
    """Whether the guest agent is connected, from a running domain's live XML.

    QEMU domains report ``state='connected'`` on the agent channel's target once the agent in
    the guest has opened it; drivers that do not track it (libvirt's test driver) give
    ``unknown``.
    """
    try:
        root = ET.fromstring(live_xml)  # noqa: S314 - XML from libvirtd, not from a renter
    except ET.ParseError:
        return "unknown"
    for target in root.iterfind("./devices/channel/target"):
        if target.get("name") != GUEST_AGENT_CHANNEL:
            continue
        state = target.get("state")
        if state == "connected":
            return "connected"
        if state == "disconnected":
            return "disconnected"
    return "unknown"


def has_nvram(xml: str) -> bool:
    """Whether a domain's XML has a UEFI variable store (undefine must then remove it too)."""
    try:
        root = ET.fromstring(xml)  # noqa: S314 - XML from libvirtd
    except ET.ParseError:
        return False
    return root.find("./os/nvram") is not None
