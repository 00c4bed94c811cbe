"""GPUs for leased VMs: binding them to vfio-pci and back, and what to pass through with them.

Binding is privileged and the worker is not: with ``gpu.mode: auto`` it starts the templated
helper ``byteleap-gpu-vfio@<address>.service``, which binds the GPU (and its companion
functions) to vfio-pci while it is active, and stops it to hand the GPU back to its host driver.
polkit lets the worker's user start and stop exactly these units, nothing else
(:class:`SystemdGpuBinder`). With ``gpu.mode: passthrough`` the GPUs are on vfio-pci from boot
and binding only checks that (:class:`PreboundGpuBinder`).

A GPU rarely travels alone: its audio, USB and UCSI functions share its IOMMU group and must go
to the same VM. :func:`passthrough_functions` reads the group from libvirt's node devices and
returns the GPU with those functions; any other endpoint in the group (a NIC behind the same
switch without ACS) makes the GPU unleasable, since passing it through would hand the renter a
device of the host.
"""

from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from . import VmError, run_tool
from .domain import PciAddress

__all__ = [
    "UNIT_TEMPLATE",
    "GpuBinder",
    "PciFunction",
    "PreboundGpuBinder",
    "SystemdGpuBinder",
    "list_display_functions",
    "passthrough_functions",
    "read_pci_function",
    "unit_name",
]

log = logging.getLogger(__name__)

UNIT_TEMPLATE: Final = "byteleap-gpu-vfio@{}.service"
_UNIT_NAME: Final = re.compile(
    r"byteleap-gpu-vfio@([0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7])\.service"
)
VFIO_DRIVER: Final = "vfio-pci"
_CLASS_DISPLAY: Final = 0x03
_CLASS_BRIDGE: Final = 0x06


def unit_name(address: PciAddress) -> str:
    return UNIT_TEMPLATE.format(address)


class GpuBinder(Protocol):
    """Hands a GPU to vfio-pci for a lease and back (blocking; call from a thread)."""

    def bind(self, address: PciAddress) -> None:
        """Return once the GPU is on vfio-pci; :class:`VmError` otherwise."""

    def release(self, address: PciAddress) -> None:
        """Give the GPU back to the host; nothing if it was not bound."""

    def bound(self) -> frozenset[PciAddress]:
        """The GPUs this binder holds on vfio-pci now (what a crash may have left behind)."""


def _sysfs_driver(sysfs_root: Path, address: PciAddress) -> str | None:
    device = sysfs_root / "bus" / "pci" / "devices" / str(address)
    if not device.exists():
        raise VmError(f"GPU {address} is not a PCI device of this host ({device} is missing)")
    try:
        return (device / "driver").readlink().name
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise VmError(f"cannot read the driver of {address}: {exc.strerror}") from None


class SystemdGpuBinder:
    """``gpu.mode: auto``: start/stop ``byteleap-gpu-vfio@<address>.service`` via systemctl."""

    def __init__(
        self,
        *,
        timeout_s: float,
        systemctl: str = "systemctl",
        sysfs_root: Path = Path("/sys"),
    ) -> None:
        self.timeout_s = timeout_s
        self.systemctl = systemctl
        self.sysfs_root = sysfs_root

    def _systemctl(self, *args: str, what: str) -> str:
        # --no-ask-password: polkit decides from the rule alone, never by prompting someone.
        return run_tool(
            [self.systemctl, "--no-ask-password", *args], what=what, timeout_s=self.timeout_s
        )

    def bind(self, address: PciAddress) -> None:
        unit = unit_name(address)
        self._systemctl("start", unit, what=f"binding GPU {address} to vfio-pci ({unit})")
        state = self._systemctl(
            "show", "--property=ActiveState", "--value", unit, what=f"checking {unit}"
        ).strip()
        if state != "active":
            # The unit's ConditionPathExists= skips a missing device without failing the start.
            raise VmError(
                f"binding GPU {address}: {unit} is {state or 'unknown'} after start "
                "(is the address a PCI device of this host?)"
            )
        driver = _sysfs_driver(self.sysfs_root, address)
        if driver != VFIO_DRIVER:
            raise VmError(
                f"binding GPU {address}: {unit} is active but the GPU is on "
                f"{driver or 'no driver'}, not {VFIO_DRIVER}"
            )

    def release(self, address: PciAddress) -> None:
        unit = unit_name(address)
        self._systemctl("stop", unit, what=f"handing GPU {address} back to the host ({unit})")

    def bound(self) -> frozenset[PciAddress]:
        listing = self._systemctl(
            "list-units",
            "--plain",
            "--no-legend",
            "--state=active",
            UNIT_TEMPLATE.format("*"),
            what="listing bound GPUs",
        )
        found: set[PciAddress] = set()
        for line in listing.splitlines():
            fields = line.split()
            match = _UNIT_NAME.fullmatch(fields[0]) if fields else None
            if match:
                found.add(PciAddress.parse(match.group(1)))
        return frozenset(found)


class PreboundGpuBinder:
    """``gpu.mode: passthrough``: GPUs live on vfio-pci from boot; binding only checks it."""

    def __init__(self, *, sysfs_root: Path = Path("/sys")) -> None:
        self.sysfs_root = sysfs_root

    def bind(self, address: PciAddress) -> None:
        driver = _sysfs_driver(self.sysfs_root, address)
        if driver != VFIO_DRIVER:
            raise VmError(
                f"GPU {address} is on {driver or 'no driver'}, not {VFIO_DRIVER}: with "
                "gpu.mode passthrough the host binds leasable GPUs at boot (vfio-setup bind)"
            )

    def release(self, address: PciAddress) -> None:
        """Nothing: the GPU stays on vfio-pci for the next lease."""

    def bound(self) -> frozenset[PciAddress]:
        return frozenset()


# --------------------------------------------------------------------------------------------
# Node devices


@dataclass(frozen=True)
class PciFunction:
    """One PCI function as libvirt's node device XML describes it."""

    address: PciAddress
    class_code: int
    vendor_id: int
    product_id: int
    product: str
    iommu_group: int | None
    group_members: tuple[PciAddress, ...]

    @property
    def base_class(self) -> int:
        return self.class_code >> 16


def _int(text: str | None, base: int, what: str) -> int:
    try:
        return int(text or "", base)
    except ValueError:
        raise VmError(f"node device XML: {what} is not a number: {text!r:.40}") from None


def parse_pci_nodedev(xml: str) -> PciFunction:
    """A :class:`PciFunction` from a PCI node device's XML; :class:`VmError` if malformed."""
    try:
        root = ET.fromstring(xml)  # noqa: S314 - XML from libvirtd
    except ET.ParseError as exc:
        raise VmError(f"node device XML does not parse: {exc}") from None
    cap = root.find("./capability[@type='pci']")
    if cap is None:
        raise VmError(f"node device {root.findtext('name')!r} is not a PCI device")
    address = PciAddress(
        _int(cap.findtext("domain"), 0, "domain"),
        _int(cap.findtext("bus"), 0, "bus"),
        _int(cap.findtext("slot"), 0, "slot"),
        _int(cap.findtext("function"), 0, "function"),
    )
    vendor = cap.find("vendor")
    product = cap.find("product")
    group = cap.find("iommuGroup")
    members: list[PciAddress] = []
    if group is not None:
        for member in group.iterfind("address"):
            members.append(
                PciAddress(
                    _int(member.get("domain"), 16, "domain"),
                    _int(member.get("bus"), 16, "bus"),
                    _int(member.get("slot"), 16, "slot"),
                    _int(member.get("function"), 16, "function"),
                )
            )
    return PciFunction(
        address=address,
        class_code=_int(cap.findtext("class"), 16, "class") if cap.findtext("class") else 0,
        vendor_id=_int(vendor.get("id") if vendor is not None else "0", 16, "vendor id"),
        product_id=_int(product.get("id") if product is not None else "0", 16, "product id"),
        product=(product.text or "").strip() if product is not None else "",
        iommu_group=_int(group.get("number"), 10, "iommuGroup") if group is not None else None,
        group_members=tuple(sorted(members)),
    )


def read_pci_function(conn: Any, address: PciAddress) -> PciFunction:
    """The node device at ``address`` through the libvirt connection ``conn``."""
    import libvirt

    try:
        device = conn.nodeDeviceLookupByName(address.nodedev_name)
        xml = device.XMLDesc(0)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_NODE_DEVICE:
            raise VmError(f"PCI device {address} is unknown to libvirt on this host") from None
        raise VmError(f"reading PCI device {address} from libvirt: {exc}") from None
    function = parse_pci_nodedev(xml)
    if function.address != address:
        raise VmError(f"libvirt node device {address.nodedev_name} describes {function.address}")
    return function


def passthrough_functions(conn: Any, gpu: PciAddress) -> tuple[PciAddress, ...]:
    """The GPU followed by its companion functions: everything a VM needs to own it."""
    function = read_pci_function(conn, gpu)
    if function.base_class != _CLASS_DISPLAY:
        raise VmError(
            f"PCI device {gpu} is not a GPU (class {function.class_code:06x}): refusing to lease it"
        )
    if function.iommu_group is None or not function.group_members:
        raise VmError(
            f"GPU {gpu} has no IOMMU group: enable the IOMMU (intel_iommu=on / amd_iommu=on) "
            "before leasing GPUs"
        )
    companions: list[PciAddress] = []
    for member in function.group_members:
        if member == gpu:
            continue
        other = read_pci_function(conn, member)
        if other.base_class == _CLASS_BRIDGE:
            continue  # bridges stay with the host; VFIO only needs the endpoints
        if not member.same_device(gpu):
            raise VmError(
                f"IOMMU group {function.iommu_group} of GPU {gpu} also holds {member} "
                f"(class {other.class_code:06x}), which is not part of the GPU: passing the GPU "
                "through would hand that device to the renter; move the GPU or enable ACS"
            )
        companions.append(member)
    return (gpu, *sorted(companions))


def list_display_functions(conn: Any) -> list[PciFunction]:
    """Every PCI display function (GPU) libvirt knows on this host, by address."""
    import libvirt

    try:
        devices = conn.listAllDevices(libvirt.VIR_CONNECT_LIST_NODE_DEVICES_CAP_PCI_DEV)
        functions = [parse_pci_nodedev(device.XMLDesc(0)) for device in devices]
    except libvirt.libvirtError as exc:
        raise VmError(f"listing PCI devices through libvirt: {exc}") from None
    return sorted((f for f in functions if f.base_class == _CLASS_DISPLAY), key=lambda f: f.address)
