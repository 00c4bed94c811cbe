"""Leased-VM test helpers: a fake GPU host for libvirt's test driver, fake GPU binding and
networking, base images and SSH keys.

libvirt's ``test:///<file>`` driver reads a node description from an XML file. Its PCI node
devices stand in for a GPU host: NVIDIA H100s with their IOMMU groups, one with a companion
function, one behind a bridge, one sharing its group with a foreign NIC. Each ``test:///<file>``
connection is a separate in-memory host, so :class:`LibvirtHost` hands the same connection to
every manager: like libvirtd, it outlives a crashed worker.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from byteleap.worker.vm import VmError
from byteleap.worker.vm.config import VmSettings
from byteleap.worker.vm.domain import PciAddress
from byteleap.worker.vm.network import LeaseAddressing, NetworkInventory
from byteleap.worker.vm.simulated import SimulatedPci, simulated_node_xml

NVIDIA = 0x10DE
H100_SXM = 0x2330
CLASS_3D = 0x030200
CLASS_AUDIO = 0x040300
CLASS_BRIDGE = 0x060400
CLASS_ETHERNET = 0x020000

# The GPUs of the default fixture host.
GPU_WITH_AUDIO = "0000:41:00.0"  # + 0000:41:00.1 (audio) in IOMMU group 42
GPU_COMPANION = "0000:41:00.1"
GPU_BEHIND_BRIDGE = "0000:81:00.0"  # group 43 also holds the bridge 0000:80:01.0
GPU_PLAIN = "0000:a1:00.0"  # alone in group 44
GPU_SHARED_GROUP = "0000:c1:00.0"  # group 45 also holds the NIC 0000:c2:00.0: unleasable
NIC = "0000:c2:00.0"


DEFAULT_DEVICES: tuple[SimulatedPci, ...] = (
    SimulatedPci(GPU_WITH_AUDIO, CLASS_3D, NVIDIA, H100_SXM, "GH100 [H100 SXM5 80GB]", 42),
    SimulatedPci(GPU_COMPANION, CLASS_AUDIO, NVIDIA, 0x22A3, "GH100 audio controller", 42),
    SimulatedPci(
        "0000:80:01.0", CLASS_BRIDGE, 0x1022, 0x1483, "PCIe root port", 43, "pcieport", "AMD"
    ),
    SimulatedPci(GPU_BEHIND_BRIDGE, CLASS_3D, NVIDIA, H100_SXM, "GH100 [H100 SXM5 80GB]", 43),
    SimulatedPci(GPU_PLAIN, CLASS_3D, NVIDIA, H100_SXM, "GH100 [H100 SXM5 80GB]", 44),
    SimulatedPci(GPU_SHARED_GROUP, CLASS_3D, NVIDIA, H100_SXM, "GH100 [H100 SXM5 80GB]", 45),
    SimulatedPci(
        NIC, CLASS_ETHERNET, 0x8086, 0x1572, "Ethernet Controller X710", 45, "i40e", "Intel"
    ),
)


def node_fixture_xml(devices: tuple[SimulatedPci, ...] = DEFAULT_DEVICES) -> str:
    """A libvirt test-driver node with 128 GiB, 32 CPUs and ``devices`` as PCI node devices."""
    return simulated_node_xml(devices, cpus=32, memory_gib=128)


def write_node_fixture(path: Path, devices: tuple[SimulatedPci, ...] = DEFAULT_DEVICES) -> str:
    """Write the node XML to ``path`` and return its ``test://`` URI."""
    path.write_text(node_fixture_xml(devices), encoding="utf-8")
    return f"test://{path.absolute()}"


class LibvirtHost:
    """One test-driver "libvirtd": every :meth:`open` returns the same live connection until
    :meth:`drop` closes it (as a libvirtd restart would), after which a fresh one is made."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.opens = 0
        self._conn: Any = None

    def open(self, uri: str) -> Any:
        assert uri == self.uri, f"manager opened {uri}, expected {self.uri}"
        self.opens += 1
        if self._conn is None:
            self._conn = libvirt.open(uri)
        return self._conn

    @property
    def conn(self) -> Any:
        if self._conn is None:
            self._conn = libvirt.open(self.uri)
        return self._conn

    def drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def domain_names(self) -> list[str]:
        return sorted(domain.name() for domain in self.conn.listAllDomains(0))


@dataclass
class FakeGpuBinder:
    """Binding without systemd: records calls; ``fail_on`` / ``slow_s`` inject trouble."""

    fail_on: set[str] = field(default_factory=set)
    fail_release_on: set[str] = field(default_factory=set)
    slow_s: float = 0.0
    held: set[str] = field(default_factory=set)
    calls: list[tuple[str, str]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def bind(self, address: PciAddress) -> None:
        with self._lock:
            self.calls.append(("bind", str(address)))
        if self.slow_s:
            time.sleep(self.slow_s)
        if str(address) in self.fail_on:
            raise VmError(f"binding GPU {address}: injected failure")
        with self._lock:
            self.held.add(str(address))

    def release(self, address: PciAddress) -> None:
        with self._lock:
            self.calls.append(("release", str(address)))
            if str(address) in self.fail_release_on:
                raise VmError(f"releasing GPU {address}: injected failure")
            self.held.discard(str(address))

    def bound(self) -> frozenset[PciAddress]:
        with self._lock:
            return frozenset(PciAddress.parse(a) for a in self.held)


@dataclass
class RecordingNetwork:
    """The network port without netlink or nftables: what is set up, by lease and slot."""

    fail_setup: bool = False
    rules: dict[str, LeaseAddressing] = field(default_factory=dict)
    bridges: set[int] = field(default_factory=set)
    calls: list[tuple[str, str | None, int | None]] = field(default_factory=list)

    def setup(self, addr: LeaseAddressing) -> None:
        self.calls.append(("setup", addr.lease_id, addr.slot))
        if self.fail_setup:
            raise VmError(f"lease {addr.lease_id}: injected network failure")
        self.rules[addr.lease_id] = addr
        self.bridges.add(addr.slot)

    def teardown(self, lease_id: str | None, slot: int | None) -> None:
        self.calls.append(("teardown", lease_id, slot))
        if lease_id is not None:
            self.rules.pop(lease_id, None)
        if slot is not None:
            self.bridges.discard(slot)

    def inventory(self) -> NetworkInventory:
        return NetworkInventory(frozenset(self.rules), frozenset(self.bridges))


def make_base_image(path: Path, size: str = "64M") -> str:
    """An empty qcow2 base image at ``path``; returns its SHA-256."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def vm_settings(tmp_path: Path, **overrides: Any) -> VmSettings:
    """Settings for the test driver with a fresh base image under ``tmp_path``."""
    base = tmp_path / "base.qcow2"
    digest = make_base_image(base) if not base.exists() else _sha256(base)
    values: dict[str, Any] = {
        "domain_type": "test",
        "vm_dir": str(tmp_path / "vms"),
        "base_image": str(base),
        "base_image_sha256": digest,
        "max_disk_gib": 4,
        "vcpus_per_gpu": 4,
        "memory_mib_per_gpu": 1024,
        "firmware": "bios",
        "shutdown_timeout_s": 2.0,
        "tool_timeout_s": 30.0,
    }
    values.update(overrides)
    return VmSettings(**values)


def virtual_size(image: Path) -> int:
    """The virtual size of a disk image in bytes, as qemu-img reads it."""
    out = subprocess.run(
        ["qemu-img", "info", "--output=json", str(image)], check=True, capture_output=True
    )
    size = json.loads(out.stdout)["virtual-size"]
    assert isinstance(size, int)
    return size


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# SSH keys


def ed25519_key(comment: str = "renter@laptop") -> str:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode() + f" {comment}"


def rsa_key(bits: int) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits).public_key()
    return key.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()


def ecdsa_key(curve: ec.EllipticCurve) -> str:
    key = ec.generate_private_key(curve).public_key()
    return key.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
