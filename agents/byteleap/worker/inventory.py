"""Hardware inventory and live metrics of a worker host.

Everything is read from ``/proc``, ``/sys``, netlink (pyroute2) and NVML (``pynvml``): no
subprocess (``dmidecode``, ``lsblk``, ``nvidia-smi``) and no network lookup (no public IP). Each
source fails on its own with a logged warning; the inventory is still produced without it.

* :func:`collect_inventory` builds the :class:`~byteleap.core.wire.Inventory` sent in ``Register``
  and ``InventoryUpdate``. Lists are sorted so that the same hardware always encodes to the same
  bytes, and :func:`inventory_fingerprint` hashes that encoding: the worker sends an
  ``InventoryUpdate`` only when the fingerprint changes, not on every heartbeat.
* :func:`collect_live` builds the :class:`~byteleap.core.wire.Heartbeat` (load, memory, uptime,
  per-GPU utilisation, memory and temperature).

GPUs come from NVML, plus the NVIDIA GPUs bound to ``vfio-pci`` (passed through to VMs), which
NVML cannot see: they are found in sysfs and reported with ``vfio_bound=True``, a uuid derived
from their PCI address (``PCI-0000:81:00.0``), a name from a device-id table and
``mem_bytes=0`` (unknown). NVML is initialised and shut down around each collection so that the
worker never holds the GPUs open while an operator rebinds one to ``vfio-pci``.

NVML and netlink are reached through the small :class:`Nvml` and :class:`Netlink` protocols so
that tests (and other hosts) can inject fakes; :class:`PynvmlNvml` and :class:`PyrouteNetlink`
are the real implementations.

The collectors are synchronous and may block (NVML start-up can take a second per GPU without
persistence mode): an asyncio caller runs them with ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import msgspec

from byteleap.core import wire

__all__ = [
    "PROC_ROOT",
    "SYS_ROOT",
    "LinkInfo",
    "Netlink",
    "Nvml",
    "NvmlDevice",
    "NvmlSample",
    "NvmlUnavailableError",
    "PynvmlNvml",
    "PyrouteNetlink",
    "collect_inventory",
    "collect_live",
    "inventory_fingerprint",
    "normalize_pci_address",
    "nvidia_device_name",
]

log = logging.getLogger(__name__)

PROC_ROOT: Final = Path("/proc")
SYS_ROOT: Final = Path("/sys")

_MAX_LIST: Final = 32  # Inventory.disks / nics cap (wire)
_SECTOR: Final = 512  # /sys/block/<dev>/size is always in 512-byte units
_SKIPPED_DISK_PREFIXES: Final = ("loop", "ram", "zram")
# Link kinds (IFLA_INFO_KIND) that are software interfaces, not host NICs: a container host has
# one veth per container, which would crowd out (and overflow) the 32 NICs the wire allows.
_VIRTUAL_LINK_KINDS: Final = frozenset(
    {
        "bareudp",
        "bridge",
        "dummy",
        "erspan",
        "geneve",
        "gre",
        "gretap",
        "ifb",
        "ip6erspan",
        "ip6gre",
        "ip6gretap",
        "ip6tnl",
        "ipip",
        "ipvlan",
        "macvlan",
        "macvtap",
        "netkit",
        "nlmon",
        "sit",
        "tun",
        "veth",
        "vrf",
        "vti",
        "vti6",
        "vxlan",
        "wireguard",
        "xfrm",
    }
)
_NVIDIA_VENDOR: Final = 0x10DE
_DISPLAY_CLASS: Final = 0x03  # PCI base class: display controller (VGA 0x0300, 3D 0x0302)
_VFIO_DRIVER: Final = "vfio-pci"
_VFIO_UUID_PREFIX: Final = "PCI-"

# NVIDIA PCI device id -> product name (as NVML spells it where known). Used only for GPUs bound to
# vfio-pci, which NVML cannot name. Sources: pci.ids and the original agent's table.
_NVIDIA_DEVICE_NAMES: Final[dict[int, str]] = {
    # Volta / Turing
    0x1DB1: "NVIDIA Tesla V100-SXM2-16GB",
    0x1DB4: "NVIDIA Tesla V100-PCIE-16GB",
    0x1DB5: "NVIDIA Tesla V100-SXM2-32GB",
    0x1DB6: "NVIDIA Tesla V100-PCIE-32GB",
    0x1EB8: "NVIDIA Tesla T4",
    # Ampere
    0x20B0: "NVIDIA A100-SXM4-40GB",
    0x20B2: "NVIDIA A100-SXM4-80GB",
    0x20B5: "NVIDIA A100 80GB PCIe",
    0x20B7: "NVIDIA A30",
    0x20F1: "NVIDIA A100-PCIE-40GB",
    0x20F3: "NVIDIA A100",
    0x20F5: "NVIDIA A100",
    0x2203: "NVIDIA GeForce RTX 3090 Ti",
    0x2204: "NVIDIA GeForce RTX 3090",
    0x2230: "NVIDIA RTX A6000",
    0x2231: "NVIDIA RTX A5000",
    0x2235: "NVIDIA A40",
    0x2236: "NVIDIA A10",
    0x2237: "NVIDIA A10G",
    # Hopper
    0x2321: "NVIDIA H100 NVL",
    0x2322: "NVIDIA H800 PCIe",
    0x2324: "NVIDIA H800",
    0x2329: "NVIDIA H20",
    0x2330: "NVIDIA H100 80GB HBM3",
    0x2331: "NVIDIA H100 PCIe",
    0x2335: "NVIDIA H200",
    0x2337: "NVIDIA H100",
    0x2339: "NVIDIA H100",
    0x2338: "NVIDIA H200",
    0x233B: "NVIDIA H200 NVL",
    0x233D: "NVIDIA H200",
    # Ada Lovelace
    0x2684: "NVIDIA GeForce RTX 4090",
    0x2685: "NVIDIA GeForce RTX 4090 D",
    0x26B1: "NVIDIA RTX 6000 Ada Generation",
    0x26B5: "NVIDIA L40",
    0x26B9: "NVIDIA L40S",
    0x27B8: "NVIDIA L4",
    # Blackwell
    0x2901: "NVIDIA B200",
    0x2941: "NVIDIA GB200",
    0x2B85: "NVIDIA GeForce RTX 5090",
    0x2B87: "NVIDIA GeForce RTX 5090 D",
    0x2C02: "NVIDIA GeForce RTX 5080",
}

_PCI_ADDRESS = re.compile(r"\A([0-9a-fA-F]{4,8}):([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])\Z")
_NON_PRINTABLE = re.compile(r"[^ -~]+")
_SPACES = re.compile(r"\s+")
_ENCODER: Final = msgspec.msgpack.Encoder(order="deterministic")

_T = TypeVar("_T")

# --------------------------------------------------------------------------------------------
# Injectable facades


class NvmlUnavailableError(Exception):
    """NVML cannot be used on this host: no NVIDIA driver, or the library is missing."""


@dataclass(frozen=True, slots=True)
class NvmlDevice:
    uuid: str
    name: str
    mem_bytes: int
    pci_bus_id: str
    """As NVML reports it (``00000000:81:00.0``); normalised to the sysfs form by the caller."""
    compute_capability: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class NvmlSample:
    uuid: str
    util_pct: int
    mem_used_bytes: int
    temp_c: int


class Nvml(Protocol):
    """The part of NVML the inventory uses. ``init`` and ``shutdown`` bracket each collection."""

    def init(self) -> None:
        """Start NVML; raise :class:`NvmlUnavailableError` when there is no driver or library."""

    def shutdown(self) -> None: ...

    def driver_version(self) -> str: ...

    def device_count(self) -> int: ...

    def device(self, index: int) -> NvmlDevice: ...

    def sample(self, index: int) -> NvmlSample: ...


@dataclass(frozen=True, slots=True)
class LinkInfo:
    """One network link as netlink reports it."""

    name: str
    mac: str = ""
    mtu: int = 0
    operstate: str = ""
    loopback: bool = False
    kind: str | None = None
    """``IFLA_INFO_KIND`` (``veth``, ``bridge``, ``bond``...); ``None`` for a plain device."""


class Netlink(Protocol):
    def links(self) -> list[LinkInfo]: ...


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


class PynvmlNvml:
    """:class:`Nvml` over ``pynvml`` (nvidia-ml-py)."""

    def __init__(self) -> None:
        self._nvml: Any = None

    def init(self) -> None:
        try:
            import pynvml  # optional at run time: a host may have no driver
        except ImportError as exc:
            raise NvmlUnavailableError(f"pynvml is not installed: {exc}") from None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            if exc.value in (
                pynvml.NVML_ERROR_LIBRARY_NOT_FOUND,
                pynvml.NVML_ERROR_DRIVER_NOT_LOADED,
            ):
                raise NvmlUnavailableError(str(exc)) from None
            raise
        self._nvml = pynvml

    def shutdown(self) -> None:
        nvml, self._nvml = self._nvml, None
        if nvml is not None:
            nvml.nvmlShutdown()

    def _lib(self) -> Any:
        if self._nvml is None:
            raise RuntimeError("NVML is not initialised")
        return self._nvml

    def driver_version(self) -> str:
        return _text(self._lib().nvmlSystemGetDriverVersion())

    def device_count(self) -> int:
        return int(self._lib().nvmlDeviceGetCount())

    def device(self, index: int) -> NvmlDevice:
        nvml = self._lib()
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        try:
            major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
            capability: tuple[int, int] | None = (int(major), int(minor))
        except nvml.NVMLError:
            capability = None
        return NvmlDevice(
            uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
            name=_text(nvml.nvmlDeviceGetName(handle)),
            mem_bytes=int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
            pci_bus_id=_text(nvml.nvmlDeviceGetPciInfo(handle).busId),
            compute_capability=capability,
        )

    def sample(self, index: int) -> NvmlSample:
        nvml = self._lib()
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        return NvmlSample(
            uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
            util_pct=int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
            mem_used_bytes=int(nvml.nvmlDeviceGetMemoryInfo(handle).used),
            temp_c=int(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
        )


class PyrouteNetlink:
    """:class:`Netlink` over pyroute2's ``IPRoute`` (one RTM_GETLINK dump per call)."""

    _IFF_LOOPBACK: Final = 0x8

    def links(self) -> list[LinkInfo]:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return self._dump()
        # pyroute2 0.9's synchronous API runs its own event loop and refuses to start inside a
        # running one: dump from a helper thread (a few milliseconds).
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="netlink") as pool:
            return pool.submit(self._dump).result()

    def _dump(self) -> list[LinkInfo]:
        # pyroute2 ships no type information.
        from pyroute2 import IPRoute

        links: list[LinkInfo] = []
        with IPRoute() as ipr:
            for msg in ipr.get_links():
                name = msg.get("ifname")
                if not name:
                    continue
                kind = msg.get(("linkinfo", "kind"))
                links.append(
                    LinkInfo(
                        name=_text(name),
                        mac=_text(msg.get("address") or ""),
                        mtu=int(msg.get("mtu") or 0),
                        operstate=_text(msg.get("operstate") or ""),
                        loopback=bool(int(msg["flags"]) & self._IFF_LOOPBACK),
                        kind=_text(kind) if kind else None,
                    )
                )
        return links


# --------------------------------------------------------------------------------------------
# Logging: a source that is broken stays broken; say so once, not at every collection.

_LOGGED: set[str] = set()


def _once(level: int, key: str, message: str, *args: object) -> None:
    if key in _LOGGED:
        log.debug(message, *args)
        return
    _LOGGED.add(key)
    log.log(level, message, *args)


def _warn(key: str, message: str, *args: object) -> None:
    _once(logging.WARNING, key, message, *args)


def _source(key: str, what: str, default: _T, read: Callable[[], _T]) -> _T:
    """``read()``, or ``default`` with a warning when it fails."""
    try:
        return read()
    except Exception as exc:  # any failure of one source must not sink the others
        _warn(key, "inventory: cannot read %s: %s", what, exc)
        return default


# --------------------------------------------------------------------------------------------
# Helpers


def _clean(text: str, limit: int) -> str:
    """Printable ASCII (wire strings that reach logs must be), whitespace collapsed, truncated."""
    text = _SPACES.sub(" ", text)
    return _NON_PRINTABLE.sub("", text).strip()[:limit]


def _read(path: Path) -> str:
    return path.read_text(encoding="ascii", errors="replace").strip()


def _valid(item: _T) -> bool:
    """Whether ``item`` passes the wire's bounds (constructing a Struct does not check them)."""
    try:
        msgspec.msgpack.decode(_ENCODER.encode(item), type=type(item))
    except msgspec.ValidationError as exc:
        _warn(f"invalid:{item!r}", "inventory: dropping %r: %s", item, exc)
        return False
    return True


def _cap(items: list[_T], what: str) -> list[_T]:
    if len(items) > _MAX_LIST:
        _warn(f"cap:{what}", "inventory: %d %s found, reporting %d", len(items), what, _MAX_LIST)
    return items[:_MAX_LIST]


def _key_values(text: str) -> Iterable[tuple[str, str]]:
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            yield key.strip(), value.strip()


def _meminfo(proc_root: Path) -> dict[str, int]:
    """``/proc/meminfo`` in bytes."""
    result: dict[str, int] = {}
    for key, value in _key_values(_read(proc_root / "meminfo")):
        number, _, unit = value.partition(" ")
        try:
            result[key] = int(number) * (1024 if unit.strip().lower() == "kb" else 1)
        except ValueError:
            continue
    return result


def _parse_cpu_list(text: str) -> int:
    """Number of CPUs in a sysfs CPU list such as ``0-31,64-95``."""
    count = 0
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        count += int(last or first) - int(first) + 1
    return count


def normalize_pci_address(address: str) -> str:
    """``00000000:81:00.0`` (NVML) -> ``0000:81:00.0`` (sysfs); lowercase; unknown forms as is."""
    match = _PCI_ADDRESS.match(address.strip())
    if match is None:
        return address.strip()
    domain, bus, device, function = match.groups()
    domain_value = int(domain, 16)
    domain_text = f"{domain_value:04x}" if domain_value <= 0xFFFF else f"{domain_value:08x}"
    return f"{domain_text}:{bus.lower()}:{device.lower()}.{function}"


def nvidia_device_name(device_id: int) -> str:
    """Product name of an NVIDIA PCI device id; ``NVIDIA <id>`` (4 hex digits) when unknown."""
    return _NVIDIA_DEVICE_NAMES.get(device_id, f"NVIDIA {device_id:04x}")


# --------------------------------------------------------------------------------------------
# Sources


def _cpu(proc_root: Path, sys_root: Path) -> tuple[str, int]:
    cpuinfo = _source("cpuinfo", "/proc/cpuinfo", "", lambda: _read(proc_root / "cpuinfo"))
    fields: dict[str, str] = {}
    processors = 0
    for key, value in _key_values(cpuinfo):
        if key == "processor":
            processors += 1
        fields.setdefault(key, value)
    model = next(
        (fields[k] for k in ("model name", "Model", "cpu model", "Processor") if fields.get(k)),
        "",
    )
    if not model and "CPU implementer" in fields:  # arm64 kernels print no model name
        model = f"ARM implementer {fields['CPU implementer']} part {fields.get('CPU part', '?')}"
    model = _clean(model, 256) or "unknown"

    def online() -> int:
        return _parse_cpu_list(_read(sys_root / "devices/system/cpu/online"))

    cores = _source("cpu-online", "online CPUs", 0, online) or processors
    if not cores:
        cores = len(os.sched_getaffinity(0))
    return model, min(max(cores, 1), 65536)


def _mem_total(proc_root: Path) -> int:
    return max(0, _meminfo(proc_root).get("MemTotal", 0))


def _disks(sys_root: Path) -> list[wire.Disk]:
    disks: list[wire.Disk] = []
    for entry in sorted((sys_root / "block").iterdir(), key=lambda p: p.name):
        name = entry.name
        if name.startswith(_SKIPPED_DISK_PREFIXES):
            continue
        if not (entry / "device").exists():  # device-mapper, md, nbd: views of other disks
            continue
        try:
            size = int(_read(entry / "size")) * _SECTOR
        except (OSError, ValueError) as exc:
            _warn(f"disk:{name}", "inventory: cannot read the size of %s: %s", name, exc)
            continue
        if size <= 0:  # empty optical or card-reader drive
            continue
        try:
            rotational = _read(entry / "queue/rotational") == "1"
        except OSError:
            rotational = False
        try:
            model = _clean(_read(entry / "device/model"), 256)
        except OSError:
            model = ""
        disk = wire.Disk(name=_clean(name, 64), model=model, size_bytes=size, rotational=rotational)
        if _valid(disk):
            disks.append(disk)
    return _cap(disks, "disks")


def _link_speed(sys_root: Path, name: str) -> int:
    try:
        speed = int(_read(sys_root / "class/net" / name / "speed"))
    except (OSError, ValueError):  # EINVAL while the link is down, absent on virtual links
        return 0
    return speed if 0 < speed <= 10_000_000 else 0


def _nics(sys_root: Path, netlink: Netlink) -> list[wire.Nic]:
    nics: list[wire.Nic] = []
    for link in sorted(netlink.links(), key=lambda link: link.name):
        if link.loopback or link.name == "lo" or link.kind in _VIRTUAL_LINK_KINDS:
            continue
        nic = wire.Nic(name=link.name, speed_mbps=_link_speed(sys_root, link.name))
        if _valid(nic):
            nics.append(nic)
    return _cap(nics, "nics")


def _nvml_init(nvml: Nvml) -> bool:
    """Start NVML; ``False`` (logged once, at info) when the host has no NVIDIA driver."""
    try:
        nvml.init()
    except NvmlUnavailableError as exc:
        _once(logging.INFO, "nvml-unavailable", "inventory: no NVML, so no host GPUs: %s", exc)
        return False
    return True


def _nvml_shutdown(nvml: Nvml) -> None:
    try:
        nvml.shutdown()
    except Exception as exc:  # nothing left to do about it
        _warn("nvml-shutdown", "inventory: NVML shutdown failed: %s", exc)


def _nvml_gpus(nvml: Nvml) -> list[wire.GpuInfo]:
    if not _nvml_init(nvml):
        return []
    try:
        driver = _source("nvml-driver", "the NVIDIA driver version", "", nvml.driver_version)
        gpus: list[wire.GpuInfo] = []
        for index in range(nvml.device_count()):
            try:
                device = nvml.device(index)
            except Exception as exc:  # a lost GPU must not hide the others
                _warn(f"nvml-device:{index}", "inventory: cannot read GPU %d: %s", index, exc)
                continue
            capability = device.compute_capability
            gpu = wire.GpuInfo(
                uuid=device.uuid,
                name=_clean(device.name, 256),
                mem_bytes=max(0, device.mem_bytes),
                pci_bus_id=normalize_pci_address(device.pci_bus_id),
                driver_version=_clean(driver, 32),
                compute_capability=f"{capability[0]}.{capability[1]}" if capability else "",
            )
            if _valid(gpu):
                gpus.append(gpu)
        return gpus
    finally:
        _nvml_shutdown(nvml)


def _vfio_gpus(sys_root: Path) -> list[wire.GpuInfo]:
    """NVIDIA display controllers bound to vfio-pci (invisible to NVML)."""
    gpus: list[wire.GpuInfo] = []
    devices = sys_root / "bus/pci/devices"
    if not devices.is_dir():
        return gpus
    for entry in sorted(devices.iterdir(), key=lambda p: p.name):
        try:
            if int(_read(entry / "vendor"), 16) != _NVIDIA_VENDOR:
                continue
            if int(_read(entry / "class"), 16) >> 16 != _DISPLAY_CLASS:
                continue
            driver = entry / "driver"
            if not driver.is_symlink() or driver.readlink().name != _VFIO_DRIVER:
                continue
            device_id = int(_read(entry / "device"), 16)
        except (OSError, ValueError) as exc:
            _warn(f"pci:{entry.name}", "inventory: cannot read PCI device %s: %s", entry.name, exc)
            continue
        address = normalize_pci_address(entry.name)
        gpu = wire.GpuInfo(
            uuid=_VFIO_UUID_PREFIX + address,
            name=nvidia_device_name(device_id),
            mem_bytes=0,
            pci_bus_id=address,
            vfio_bound=True,
        )
        if _valid(gpu):
            gpus.append(gpu)
    return gpus


def _merge_gpus(host: list[wire.GpuInfo], vfio: list[wire.GpuInfo]) -> list[wire.GpuInfo]:
    """One entry per PCI address and uuid (NVML wins), sorted by PCI address."""
    merged: dict[str, wire.GpuInfo] = {}
    uuids: set[str] = set()
    for gpu in [*host, *vfio]:
        if gpu.pci_bus_id in merged or gpu.uuid in uuids:
            _warn(f"gpu-dup:{gpu.uuid}", "inventory: duplicate GPU %s ignored", gpu.uuid)
            continue
        merged[gpu.pci_bus_id] = gpu
        uuids.add(gpu.uuid)
    return _cap([merged[address] for address in sorted(merged)], "GPUs")


# --------------------------------------------------------------------------------------------
# Public API


def collect_inventory(
    *,
    proc_root: Path = PROC_ROOT,
    sys_root: Path = SYS_ROOT,
    nvml: Nvml | None = None,
    netlink: Netlink | None = None,
) -> wire.Inventory:
    """The host's hardware as a wire :class:`~byteleap.core.wire.Inventory`.

    Never raises for a missing or broken source: CPU, memory, disks, NICs, NVML GPUs and
    vfio-bound GPUs are each collected independently (a failure is logged once as a warning; no
    NVIDIA driver is logged once at info and means no host GPUs). ``cpu_cores`` counts online
    logical CPUs. Lists are sorted (disks and NICs by name, GPUs by PCI address) so the encoding,
    and :func:`inventory_fingerprint`, only change when the hardware does.
    """
    nvml = PynvmlNvml() if nvml is None else nvml
    netlink = PyrouteNetlink() if netlink is None else netlink
    cpu_model, cpu_cores = _cpu(proc_root, sys_root)
    host_gpus: list[wire.GpuInfo] = _source("nvml", "NVML GPUs", [], lambda: _nvml_gpus(nvml))
    vfio_gpus: list[wire.GpuInfo] = _source("vfio", "vfio GPUs", [], lambda: _vfio_gpus(sys_root))
    return wire.Inventory(
        cpu_model=cpu_model,
        cpu_cores=cpu_cores,
        mem_bytes=_source("meminfo", "/proc/meminfo", 0, lambda: _mem_total(proc_root)),
        disks=_source("disks", "block devices", [], lambda: _disks(sys_root)),
        nics=_source("nics", "network links", [], lambda: _nics(sys_root, netlink)),
        gpus=_merge_gpus(host_gpus, vfio_gpus),
    )


def inventory_fingerprint(inventory: wire.Inventory) -> bytes:
    """SHA-256 of the canonical MessagePack encoding of ``inventory`` (32 bytes)."""
    return hashlib.sha256(_ENCODER.encode(inventory)).digest()


def _first_float(path: Path) -> float:
    return float(_read(path).split()[0])


def _mem_used(proc_root: Path) -> int:
    info = _meminfo(proc_root)
    total = info["MemTotal"]
    available = info.get("MemAvailable")
    if available is None:  # kernels before 3.14
        available = sum(info.get(k, 0) for k in ("MemFree", "Buffers", "Cached"))
    return max(0, total - available)


def _clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high) if math.isfinite(value) else low


def _nvml_live(nvml: Nvml) -> list[wire.GpuLive]:
    if not _nvml_init(nvml):
        return []
    try:
        samples: list[wire.GpuLive] = []
        uuids: set[str] = set()
        for index in range(nvml.device_count()):
            try:
                sample = nvml.sample(index)
            except Exception as exc:  # a lost GPU must not hide the others
                _warn(f"nvml-sample:{index}", "inventory: cannot sample GPU %d: %s", index, exc)
                continue
            live = wire.GpuLive(
                uuid=sample.uuid,
                util_pct=int(_clamp(sample.util_pct, 0, 100)),
                mem_used_bytes=max(0, sample.mem_used_bytes),
                temp_c=int(_clamp(sample.temp_c, -64, 255)),
            )
            if live.uuid not in uuids and _valid(live):
                uuids.add(live.uuid)
                samples.append(live)
        return _cap(samples, "GPU samples")
    finally:
        _nvml_shutdown(nvml)


def collect_live(*, proc_root: Path = PROC_ROOT, nvml: Nvml | None = None) -> wire.Heartbeat:
    """Light live metrics as a ready-to-send :class:`~byteleap.core.wire.Heartbeat`.

    Reads ``/proc/loadavg``, ``/proc/meminfo`` (used = total - available), ``/proc/uptime`` and
    samples the NVML GPUs (vfio-bound GPUs cannot be sampled). A failed source reads as 0.
    """
    nvml = PynvmlNvml() if nvml is None else nvml
    load1 = _source("loadavg", "/proc/loadavg", 0.0, lambda: _first_float(proc_root / "loadavg"))
    uptime = _source("uptime", "/proc/uptime", 0.0, lambda: _first_float(proc_root / "uptime"))
    return wire.Heartbeat(
        uptime_s=_clamp(uptime, 0.0, 1e10),
        load1=_clamp(load1, 0.0, 1e6),
        mem_used_bytes=_source("memused", "/proc/meminfo", 0, lambda: _mem_used(proc_root)),
        gpus=_source("nvml-live", "NVML GPU samples", [], lambda: _nvml_live(nvml)),
    )
