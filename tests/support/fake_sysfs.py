"""Fake sysfs and procfs trees laid out like the kernel's, for tools that read PCI state.

:class:`FakeHost` builds ``sys/`` (``devices/pci<domain>:<bus>/...`` device directories,
``bus/pci/devices/<BDF>`` links into them, ``driver`` and ``iommu_group`` links,
``kernel/iommu_groups/<n>/devices/<BDF>``, ``bus/pci/drivers/<name>/{bind,unbind,new_id,...}``,
``bus/pci/drivers_probe``, ``module/<name>``), ``proc/`` (``cmdline``, ``cpuinfo``,
``sys/kernel/osrelease``, ``version``, ``driver/nvidia/gpus/<BDF>/information`` while a GPU is on
the nvidia driver, and processes: ``<pid>/comm`` and ``<pid>/fd/<n>`` links) and an empty config
``root/`` with the installed kernel's module tree.

A tree of plain files cannot react to writes. :class:`FakeKernel` plays the kernel's part: call
it with every (relative path, value) written into ``sys/`` and it moves ``driver`` links on
unbind and drivers_probe, keeps ``driver_override`` as the kernel shows it and fails writes the
kernel would fail.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

NVIDIA = 0x10DE

CPUINFO = """\
processor\t: {n}
vendor_id\t: {vendor}
cpu family\t: 25
model name\t: {model}
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic {virt}

"""
CPU_MODELS = {
    "GenuineIntel": ("Intel(R) Xeon(R) Platinum 8480+", "vmx"),
    "AuthenticAMD": ("AMD EPYC 9654 96-Core Processor", "svm"),
}

# The module each PCI driver comes from (pcieport is built in: no module).
DRIVER_MODULES = {
    "nvidia": "nvidia",
    "vfio-pci": "vfio_pci",
    "snd_hda_intel": "snd_hda_intel",
    "xhci_hcd": "xhci_pci",
    "nvidia-gpu": "i2c_nvidia_gpu",
    "nvme": "nvme",
    "ahci": "ahci",
    "mlx5_core": "mlx5_core",
    "ast": "ast",
    "pcieport": None,
}

# /proc/driver/nvidia/gpus/<BDF>/information laid out as the nvidia driver writes it.
NVIDIA_INFORMATION = """\
Model: \t\t NVIDIA {model}
IRQ:   \t\t {irq}
GPU UUID: \t GPU-{minor:08x}-5a4e-4c1f-9b1e-0c2a7d3e{minor:04x}
Video BIOS: \t 96.00.74.00.01
Bus Type: \t PCIe
DMA Size: \t 52 bits
DMA Mask: \t 0xfffffffffffff
Bus Location: \t {bdf}
Device Minor: \t {minor}
GPU Excluded:\t No
"""
# What every process has open besides a GPU: none of it may count as holding one.
ORDINARY_FDS = ("/dev/null", "pipe:[40321]", "socket:[40322]")


@dataclass(frozen=True)
class Function:
    device: int
    pci_class: int
    host_driver: str


@dataclass(frozen=True)
class Card:
    """An NVIDIA product: the GPU at function 0, then its companion functions."""

    gpu: Function
    companions: tuple[Function, ...] = ()

    @property
    def functions(self) -> tuple[Function, ...]:
        return (self.gpu, *self.companions)


def _gpu(device: int, pci_class: int = 0x030200) -> Function:
    return Function(device, pci_class, "nvidia")


H100_SXM = Card(_gpu(0x2330))
H100_PCIE = Card(_gpu(0x2331))
H200 = Card(_gpu(0x2335))
A100_SXM = Card(_gpu(0x20B0))
A100_PCIE = Card(_gpu(0x20B5))
RTX_4090 = Card(_gpu(0x2684, 0x030000), (Function(0x22BA, 0x040300, "snd_hda_intel"),))
# Turing boards carry a USB-C controller and its UCSI function besides HDMI audio.
RTX_2080_TI = Card(
    _gpu(0x1E07, 0x030000),
    (
        Function(0x10F7, 0x040300, "snd_hda_intel"),
        Function(0x1AD6, 0x0C0330, "xhci_hcd"),
        Function(0x1AD7, 0x0C8000, "nvidia-gpu"),
    ),
)

NVME = Function(0xA80A, 0x010802, "nvme")  # vendor 144d (Samsung)
NIC = Function(0x1021, 0x020000, "mlx5_core")  # vendor 15b3 (Mellanox)
SATA = Function(0x7901, 0x010601, "ahci")  # vendor 1022 (AMD FCH)


@dataclass
class FakeDevice:
    bdf: str
    vendor: int
    device: int
    pci_class: int
    host_driver: str | None
    group: int | None
    directory: Path  # under sys/devices

    @property
    def ids(self) -> str:
        return f"{self.vendor:04x}:{self.device:04x}"


def _relative_link(link: Path, target: Path) -> None:
    link.symlink_to(os.path.relpath(target, link.parent))


class FakeHost:
    """One host's sysfs, procfs and config root under ``base``."""

    def __init__(
        self,
        base: Path,
        *,
        cpu: str = "GenuineIntel",
        iommu: bool = True,
        cmdline: str | None = None,
        kernel: str = "6.1.0-28-amd64",
    ) -> None:
        self.sys = base / "sys"
        self.proc = base / "proc"
        self.root = base / "root"
        self.iommu = iommu
        self.kernel = kernel
        self.devices: dict[str, FakeDevice] = {}
        # /dev/nvidia<minor> of each GPU, given out in the order the nvidia driver first takes them.
        self.nvidia_minors: dict[str, int] = {}
        for directory in ("devices", "bus/pci/devices", "bus/pci/drivers", "module"):
            (self.sys / directory).mkdir(parents=True)
        # The kernel has the directory with the IOMMU off too; it is just empty.
        (self.sys / "kernel/iommu_groups").mkdir(parents=True)
        for attribute in ("drivers_probe", "drivers_autoprobe", "rescan"):
            (self.sys / "bus/pci" / attribute).write_text("")
        (self.proc / "sys/kernel").mkdir(parents=True)
        if cmdline is None:
            iommu_args = "intel_iommu=on iommu=pt" if cpu == "GenuineIntel" else "iommu=pt"
            cmdline = f"BOOT_IMAGE=/boot/vmlinuz-{kernel} root=UUID=6c1e ro quiet {iommu_args}"
        self.set_cmdline(cmdline)
        model, virt = CPU_MODELS.get(cpu, ("unknown", ""))
        (self.proc / "cpuinfo").write_text(
            "".join(CPUINFO.format(n=n, vendor=cpu, model=model, virt=virt) for n in range(2))
        )
        (self.proc / "sys/kernel/osrelease").write_text(f"{kernel}\n")
        (self.proc / "version").write_text(f"Linux version {kernel} (debian-kernel) #1 SMP\n")
        vfio_dir = self.root / "lib/modules" / kernel / "kernel/drivers/vfio/pci"
        vfio_dir.mkdir(parents=True)
        (vfio_dir / "vfio-pci.ko").write_bytes(b"\x7fELF")
        (self.root / "etc/modprobe.d").mkdir(parents=True)
        (self.root / "etc/default/grub.d").mkdir(parents=True)

    def argv(self, *args: str) -> list[str]:
        """Global options pointing the tool at this host, then ``args``."""
        return [
            "--sysfs-root",
            str(self.sys),
            "--proc-root",
            str(self.proc),
            "--root",
            str(self.root),
            *args,
        ]

    # ---- procfs

    def set_cmdline(self, cmdline: str) -> None:
        (self.proc / "cmdline").write_text(cmdline + "\n")

    def nvidia_information(self, bdf: str) -> Path:
        return self.proc / "driver/nvidia/gpus" / bdf / "information"

    def set_nvidia_information(self, bdf: str, minor: int | None = None) -> Path:
        """What the nvidia driver shows for a GPU it has (minor: keep or give out the next)."""
        if minor is None:
            minor = self.nvidia_minors.get(bdf, max(self.nvidia_minors.values(), default=-1) + 1)
        self.nvidia_minors[bdf] = minor
        device = self.devices[bdf]
        path = self.nvidia_information(bdf)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = NVIDIA_INFORMATION.format(model=device.ids, irq=150 + minor, minor=minor, bdf=bdf)
        path.write_text(text)
        return path

    def remove_nvidia_information(self, bdf: str) -> None:
        """As when the nvidia driver lets the GPU go (or lays procfs out some other way)."""
        shutil.rmtree(self.nvidia_information(bdf).parent, ignore_errors=True)

    def nvidia_node(self, bdf: str) -> str:
        return f"/dev/nvidia{self.nvidia_minors[bdf]}"

    def add_process(self, pid: int, comm: str, open_files: Iterable[str] = ()) -> Path:
        """A process with ``open_files`` open (after stdin/out/err), as ``proc/<pid>/fd`` links.

        The links dangle (there is no /dev in the tree): readlink, all the tool does, works.
        """
        directory = self.proc / str(pid)
        (directory / "fd").mkdir(parents=True)
        (directory / "comm").write_text(f"{comm[:15]}\n")  # the kernel cuts it to 15 characters
        for fd, target in enumerate((*ORDINARY_FDS, *open_files)):
            (directory / "fd" / str(fd)).symlink_to(target)
        return directory

    def hold_gpu(self, bdf: str, pid: int, comm: str) -> Path:
        """A process using the GPU as CUDA or NVML does: its node, nvidiactl and nvidia-uvm."""
        return self.add_process(
            pid, comm, ("/dev/nvidiactl", "/dev/nvidia-uvm", self.nvidia_node(bdf))
        )

    def end_process(self, pid: int) -> None:
        shutil.rmtree(self.proc / str(pid))

    # ---- drivers and modules

    def load_module(self, name: str) -> None:
        (self.sys / "module" / name / "parameters").mkdir(parents=True, exist_ok=True)

    def add_driver(self, name: str) -> Path:
        directory = self.sys / "bus/pci/drivers" / name
        if directory.is_dir():
            return directory
        directory.mkdir(parents=True)
        for attribute in ("bind", "unbind", "new_id", "remove_id", "uevent"):
            (directory / attribute).write_text("")
        module = DRIVER_MODULES.get(name, name.replace("-", "_"))
        if module is not None:
            self.load_module(module)
            _relative_link(directory / "module", self.sys / "module" / module)
        return directory

    def load_vfio(self) -> None:
        self.load_module("vfio")
        self.load_module("vfio_iommu_type1")
        self.add_driver("vfio-pci")

    # ---- devices

    def add_device(
        self,
        bdf: str,
        function: Function,
        *,
        vendor: int = NVIDIA,
        group: int | None = None,
        parent: str | None = None,
        driver: str | None = None,
    ) -> FakeDevice:
        """A PCI function below ``parent`` (a bridge added before) or the host bridge.

        ``driver`` defaults to the function's host driver; pass "" for an unbound device.
        """
        if parent is None:
            domain, bus = bdf.split(":")[:2]
            directory = self.sys / "devices" / f"pci{domain}:{bus}" / bdf
        else:
            directory = self.devices[parent].directory / bdf
        directory.mkdir(parents=True)
        for attribute, value in (
            ("vendor", f"0x{vendor:04x}"),
            ("device", f"0x{function.device:04x}"),
            ("class", f"0x{function.pci_class:06x}"),
            ("subsystem_vendor", f"0x{vendor:04x}"),
            ("subsystem_device", "0x0000"),
            ("driver_override", "(null)"),
            ("numa_node", "0"),
            ("enable", "1"),
        ):
            (directory / attribute).write_text(value + "\n")
        _relative_link(self.sys / "bus/pci/devices" / bdf, directory)
        device = FakeDevice(
            bdf, vendor, function.device, function.pci_class, function.host_driver, None, directory
        )
        self.devices[bdf] = device
        if group is not None and self.iommu:
            self.join_group(bdf, group)
        bound = function.host_driver if driver is None else driver
        if bound:
            self.bind(bdf, bound)
        return device

    def add_root_port(self, bdf: str, group: int | None = None) -> FakeDevice:
        bridge = Function(0x1A38, 0x060400, "pcieport")
        return self.add_device(bdf, bridge, vendor=0x8086, group=group)

    def add_card(
        self,
        bdf: str,
        card: Card,
        *,
        group: int | None,
        parent: str | None = None,
        driver: str | None = None,
    ) -> list[str]:
        """The card's functions at ``bdf`` (function 0) and up, all in one IOMMU group.

        ``driver`` binds every function to it (e.g. "vfio-pci"); default: their host drivers.
        """
        slot = bdf.rsplit(".", 1)[0]
        addresses = []
        for number, function in enumerate(card.functions):
            address = f"{slot}.{number}"
            self.add_device(address, function, group=group, parent=parent, driver=driver)
            addresses.append(address)
        return addresses

    def join_group(self, bdf: str, group: int) -> None:
        device = self.devices[bdf]
        members = self.sys / "kernel/iommu_groups" / str(group) / "devices"
        members.mkdir(parents=True, exist_ok=True)
        for attribute in ("type", "reserved_regions"):
            path = members.parent / attribute
            if not path.exists():
                path.write_text("DMA\n" if attribute == "type" else "")
        _relative_link(members / bdf, device.directory)
        _relative_link(device.directory / "iommu_group", members.parent)
        device.group = group

    def bind(self, bdf: str, driver: str) -> None:
        device = self.devices[bdf]
        if self.driver_of(bdf) is not None:
            raise AssertionError(f"{bdf} is bound already")
        directory = self.add_driver(driver)
        _relative_link(device.directory / "driver", directory)
        _relative_link(directory / bdf, device.directory)
        if driver == "nvidia" and device.pci_class >> 16 == 0x03:
            self.set_nvidia_information(bdf)

    def unbind(self, bdf: str) -> None:
        device = self.devices[bdf]
        driver = self.driver_of(bdf)
        if driver is None:
            return
        (device.directory / "driver").unlink()
        (self.sys / "bus/pci/drivers" / driver / bdf).unlink()
        if driver == "nvidia":
            self.remove_nvidia_information(bdf)

    def driver_of(self, bdf: str) -> str | None:
        link = self.devices[bdf].directory / "driver"
        return link.readlink().name if link.is_symlink() else None

    def override_of(self, bdf: str) -> str:
        return (self.devices[bdf].directory / "driver_override").read_text().strip()

    def set_override(self, bdf: str, driver: str | None) -> None:
        (self.devices[bdf].directory / "driver_override").write_text(f"{driver or '(null)'}\n")


@dataclass
class FakeKernel:
    """The kernel's reaction to sysfs writes in a :class:`FakeHost` (pass it as the observer)."""

    host: FakeHost
    writes: list[tuple[str, str]] = field(default_factory=list)
    vfio_ids: set[str] = field(default_factory=set)
    """vendor:device IDs vfio-pci claims on probe, as with ``vfio-pci.ids=`` at boot."""
    busy: set[str] = field(default_factory=set)
    """Devices whose driver refuses to let go (unbind fails with EBUSY)."""

    def __call__(self, relative: str, value: str) -> None:
        self.writes.append((relative, value))
        parts = relative.split("/")
        match parts:
            case ["bus", "pci", "devices", bdf, "driver_override"]:
                self.host.set_override(bdf, value.strip() or None)
            case ["bus", "pci", "drivers", driver, "unbind"]:
                self._unbind(driver, value.strip())
            case ["bus", "pci", "drivers_probe"]:
                self._probe(value.strip())
            case _:
                raise OSError(errno.EINVAL, f"the fake kernel does not emulate {relative}")

    def _device(self, bdf: str) -> FakeDevice:
        device = self.host.devices.get(bdf)
        if device is None:
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        return device

    def _unbind(self, driver: str, bdf: str) -> None:
        self._device(bdf)
        if self.host.driver_of(bdf) != driver:
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        if bdf in self.busy:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        self.host.unbind(bdf)

    def _loaded(self, driver: str) -> bool:
        return (self.host.sys / "bus/pci/drivers" / driver).is_dir()

    def _probe(self, bdf: str) -> None:
        device = self._device(bdf)
        if self.host.driver_of(bdf) is not None:
            return
        override = self.host.override_of(bdf)
        if override != "(null)":
            # Only the named driver may bind; if it is not loaded the device stays unbound.
            if self._loaded(override):
                self.host.bind(bdf, override)
        elif device.ids in self.vfio_ids and self._loaded("vfio-pci"):
            self.host.bind(bdf, "vfio-pci")
        elif device.host_driver and self._loaded(device.host_driver):
            self.host.bind(bdf, device.host_driver)


def snapshot(base: Path) -> dict[str, str]:
    """Every file and link under ``base`` with its content or target, to prove what changed."""
    state: dict[str, str] = {}
    for path in sorted(base.rglob("*")):
        key = str(path.relative_to(base))
        if path.is_symlink():
            state[key] = "-> " + str(path.readlink())
        elif path.is_file():
            state[key] = path.read_text(errors="replace")
        else:
            state[key] = "<dir>"
    return state
