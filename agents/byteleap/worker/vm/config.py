"""The ``vm:`` section of the worker configuration: how leased VMs are built and networked.

Without a ``vm:`` section the worker takes no leases. With one, ``base_image`` and its
``base_image_sha256`` are required: a lease never boots an image nobody vouched for.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta

from byteleap.core.config import ConfigStruct, Port, PositiveSeconds

__all__ = ["DEFAULT_DNS_SERVERS", "DEFAULT_ISOLATED_RANGES", "VmSettings"]

Sha256Hex = Annotated[str, Meta(pattern=r"\A[0-9a-f]{64}\Z")]
AbsolutePath = Annotated[str, Meta(pattern=r"\A/[^\x00\n]*\Z", max_length=4096)]

DEFAULT_DNS_SERVERS: Final = ("1.1.1.1", "9.9.9.9")
# What a leased VM may never open connections to: the host's own private networks (and every
# other lease, all of which live in 10.0.0.0/8), carrier-grade NAT and link-local (cloud metadata
# services answer at 169.254.169.254).
DEFAULT_ISOLATED_RANGES: Final = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "169.254.0.0/16",
)
_LEASE_SUPERNET: Final = ipaddress.IPv4Network("10.0.0.0/8")


class VmSettings(ConfigStruct, frozen=True, kw_only=True):
    # The libvirt connection; the worker's user reaches qemu:///system through the libvirt group.
    libvirt_uri: Annotated[str, Meta(min_length=1, max_length=512)] = "qemu:///system"
    # "test" is libvirt's test driver (tests and dry runs); production is "kvm".
    domain_type: Literal["kvm", "test"] = "kvm"
    # Overlays, seed ISOs and console logs, one folder per lease. QEMU (user libvirt-qemu) must be
    # able to traverse it, so it cannot live in the worker's 0700 state directory.
    vm_dir: AbsolutePath = "/var/lib/byteleap/vms"
    base_image: AbsolutePath
    base_image_sha256: Sha256Hex
    # The largest disk one lease may ask for (the gateway asks leases.disk_gib_per_gpu x GPUs;
    # the default fits 8 GPUs at the gateway's default 200 GiB). Overlays are thin: a renter
    # fills vm_dir up to this much per lease.
    max_disk_gib: Annotated[int, Meta(ge=1, le=65536)] = 1600
    vcpus_per_gpu: Annotated[int, Meta(ge=1, le=256)] = 8
    memory_mib_per_gpu: Annotated[int, Meta(ge=512, le=4 * 1024 * 1024)] = 65536
    # The domain's memory hard limit is its memory plus this (QEMU itself, VFIO mappings).
    memory_overhead_mib: Annotated[int, Meta(ge=256, le=65536)] = 4096
    machine: Annotated[str, Meta(pattern=r"\A(q35|pc-q35-[0-9.]+)\Z")] = "q35"
    cpu_mode: Literal["host-passthrough", "host-model"] = "host-passthrough"
    # UEFI (OVMF) maps large GPU BARs that SeaBIOS cannot; "bios" for images without EFI boot.
    firmware: Literal["efi", "bios"] = "efi"
    # VNC for the operator's debugging, bound to 127.0.0.1 with a random password; off by default.
    vnc_localhost: bool = False
    # Lease networks: lease slot n gets bridge blbr<n> and 10.<a>.<n>.0/30 from this /16.
    subnet_pool: Annotated[str, Meta(max_length=18)] = "10.213.0.0/16"
    ssh_port_first: Port = 42200
    ssh_port_last: Port = 42455
    dns_servers: Annotated[list[str], Meta(min_length=1, max_length=4)] = msgspec.field(
        default_factory=lambda: list(DEFAULT_DNS_SERVERS)
    )
    isolated_ranges: Annotated[list[str], Meta(max_length=64)] = msgspec.field(
        default_factory=lambda: list(DEFAULT_ISOLATED_RANGES)
    )
    shutdown_timeout_s: PositiveSeconds = 60.0
    gpu_timeout_s: PositiveSeconds = 150.0
    tool_timeout_s: PositiveSeconds = 120.0

    def __post_init__(self) -> None:
        pool = self.pool_network()
        if pool.prefixlen != 16 or not pool.subnet_of(_LEASE_SUPERNET):
            raise ValueError(f"subnet_pool must be a /16 inside 10.0.0.0/8, got {pool}")
        if self.ssh_port_first > self.ssh_port_last:
            raise ValueError("ssh_port_first must not be greater than ssh_port_last")
        for server in self.dns_servers:
            try:
                ipaddress.IPv4Address(server)
            except ValueError:
                raise ValueError(f"dns_servers: {server!r} is not an IPv4 address") from None
        for text in self.isolated_ranges:
            try:
                ipaddress.IPv4Network(text)
            except ValueError:
                raise ValueError(f"isolated_ranges: {text!r} is not an IPv4 network") from None

    def pool_network(self) -> ipaddress.IPv4Network:
        """``subnet_pool`` as a network (ValueError when it is not an IPv4 network)."""
        try:
            return ipaddress.IPv4Network(self.subnet_pool)
        except ValueError:
            raise ValueError(
                f"subnet_pool {self.subnet_pool!r} is not an IPv4 network like 10.213.0.0/16"
            ) from None

    @property
    def ssh_port_count(self) -> int:
        return self.ssh_port_last - self.ssh_port_first + 1
