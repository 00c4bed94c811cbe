"""A simulated GPU host for ``vm.domain_type: test`` (the devnet and dry runs).

libvirt's test driver (``test:///<node.xml>``) keeps domains in memory and runs nothing, so the
rest of a lease must not touch the host either: :class:`SimulatedGpuBinder` and
:class:`SimulatedNetwork` keep the same books as the real binder and network (what is bound,
which lease has rules and a bridge) without systemd, netlink or nftables, and need no privileges.
:func:`simulated_host_xml` describes a host with some NVIDIA GPUs, each alone in its IOMMU group,
for the test driver to serve as node devices (:func:`simulated_node_xml`: any PCI functions).

Like the test driver's domains, their state lives only as long as the worker process: a
restarted worker finds an empty host, and its recovery reports the leases it held as failed.
"""

from __future__ import annotations

import threading
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from .domain import PciAddress
from .network import LeaseAddressing, NetworkInventory

__all__ = [
    "MAX_SIMULATED_GPUS",
    "SimulatedGpuBinder",
    "SimulatedNetwork",
    "SimulatedPci",
    "simulated_gpu_addresses",
    "simulated_host_xml",
    "simulated_node_xml",
]

MAX_SIMULATED_GPUS: Final = 32
_NVIDIA: Final = 0x10DE
_H100_PCIE: Final = 0x2331
_CLASS_3D: Final = 0x030200
_FIRST_BUS: Final = 0x41
_FIRST_GROUP: Final = 40


def simulated_gpu_addresses(count: int) -> list[str]:
    """The PCI addresses of the GPUs :func:`simulated_host_xml` describes."""
    if not 1 <= count <= MAX_SIMULATED_GPUS:
        raise ValueError(f"a simulated host has 1 to {MAX_SIMULATED_GPUS} GPUs, not {count}")
    return [str(PciAddress(0, _FIRST_BUS + index, 0, 0)) for index in range(count)]


@dataclass(frozen=True)
class SimulatedPci:
    """One PCI function of a simulated host, as a libvirt node device."""

    address: str
    class_code: int
    vendor_id: int
    product_id: int
    product: str
    iommu_group: int
    driver: str = "vfio-pci"
    vendor: str = "NVIDIA Corporation"


def simulated_host_xml(gpus: int, *, cpus: int = 32, memory_gib: int = 256) -> str:
    """A libvirt test-driver node description with ``gpus`` NVIDIA H100 PCIe GPUs."""
    devices = [
        SimulatedPci(address, _CLASS_3D, _NVIDIA, _H100_PCIE, "GH100 [H100 PCIe]", group)
        for group, address in enumerate(simulated_gpu_addresses(gpus), start=_FIRST_GROUP)
    ]
    return simulated_node_xml(devices, cpus=cpus, memory_gib=memory_gib)


def simulated_node_xml(devices: Sequence[SimulatedPci], *, cpus: int, memory_gib: int) -> str:
    """A libvirt test-driver node description: ``devices`` as PCI node devices, each IOMMU
    group listing every device that names it."""
    node = ET.Element("node")
    cpu = ET.SubElement(node, "cpu")
    for tag, text in (
        ("mhz", "2400"),
        ("model", "x86_64"),
        ("active", str(cpus)),
        ("nodes", "1"),
        ("sockets", "1"),
        ("cores", str(cpus)),
        ("threads", "1"),
    ):
        ET.SubElement(cpu, tag).text = text
    ET.SubElement(node, "memory").text = str(memory_gib * 1024 * 1024)
    computer = ET.SubElement(node, "device")
    ET.SubElement(computer, "name").text = "computer"
    hardware = ET.SubElement(ET.SubElement(computer, "capability", type="system"), "hardware")
    # The test driver refuses a node without a system UUID.
    ET.SubElement(hardware, "uuid").text = "6f0c1c1e-5d3a-4b8e-9a57-2f4de1b0c7a9"
    groups: dict[int, list[PciAddress]] = {}
    for device in devices:
        groups.setdefault(device.iommu_group, []).append(PciAddress.parse(device.address))
    for device in devices:
        address = PciAddress.parse(device.address)
        element = ET.SubElement(node, "device")
        ET.SubElement(element, "name").text = address.nodedev_name
        ET.SubElement(element, "parent").text = "computer"
        ET.SubElement(ET.SubElement(element, "driver"), "name").text = device.driver
        cap = ET.SubElement(element, "capability", type="pci")
        ET.SubElement(cap, "class").text = f"0x{device.class_code:06x}"
        for tag, value in (
            ("domain", address.domain),
            ("bus", address.bus),
            ("slot", address.slot),
            ("function", address.function),
        ):
            ET.SubElement(cap, tag).text = str(value)
        ET.SubElement(cap, "product", id=f"0x{device.product_id:04x}").text = device.product
        ET.SubElement(cap, "vendor", id=f"0x{device.vendor_id:04x}").text = device.vendor
        group = ET.SubElement(cap, "iommuGroup", number=str(device.iommu_group))
        for member in sorted(groups[device.iommu_group]):
            ET.SubElement(group, "address", member.xml_attributes())
    ET.indent(node)
    return ET.tostring(node, encoding="unicode")


class SimulatedGpuBinder:
    """The :class:`~.gpus.GpuBinder` of a simulated host: remembers what is bound."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: set[PciAddress] = set()

    def bind(self, address: PciAddress) -> None:
        with self._lock:
            self._held.add(address)

    def release(self, address: PciAddress) -> None:
        with self._lock:
            self._held.discard(address)

    def bound(self) -> frozenset[PciAddress]:
        with self._lock:
            return frozenset(self._held)


class SimulatedNetwork:
    """The :class:`~.network.LeaseNetworkPort` of a simulated host: remembers each lease's
    rules and bridge, touches no interface and no firewall."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: set[str] = set()
        self._bridges: set[int] = set()

    def setup(self, addr: LeaseAddressing) -> None:
        with self._lock:
            self._rules.add(addr.lease_id)
            self._bridges.add(addr.slot)

    def teardown(self, lease_id: str | None, slot: int | None) -> None:
        with self._lock:
            if lease_id is not None:
                self._rules.discard(lease_id)
            if slot is not None:
                self._bridges.discard(slot)

    def inventory(self) -> NetworkInventory:
        with self._lock:
            return NetworkInventory(frozenset(self._rules), frozenset(self._bridges))
