"""Worker inventory: fake /proc and /sys trees, fake NVML and netlink, one real smoke test."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from byteleap.core import wire
from byteleap.worker import inventory
from byteleap.worker.inventory import (
    LinkInfo,
    NvmlDevice,
    NvmlSample,
    NvmlUnavailableError,
    collect_inventory,
    collect_live,
    inventory_fingerprint,
)

GiB = 1024**3

CPUINFO = """\
processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9654 96-Core Processor
cpu MHz\t\t: 2400.000

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9654 96-Core Processor
"""

MEMINFO = """\
MemTotal:       263921356 kB
MemFree:        100000000 kB
MemAvailable:   200000000 kB
Buffers:          1000000 kB
Cached:          50000000 kB
HugePages_Total:       0
"""

H100 = NvmlDevice(
    uuid="GPU-8f6c2a1e-0000-1111-2222-333344445555",
    name="NVIDIA H100 80GB HBM3",
    mem_bytes=80 * GiB,
    pci_bus_id="00000000:1B:00.0",
    compute_capability=(9, 0),
)
RTX4090 = NvmlDevice(
    uuid="GPU-1d2e3f40-aaaa-bbbb-cccc-ddddeeeeffff",
    name="NVIDIA GeForce RTX 4090",
    mem_bytes=24 * GiB,
    pci_bus_id="00000000:01:00.0",
    compute_capability=(8, 9),
)


@dataclass
class FakeNvml:
    devices: list[NvmlDevice] = field(default_factory=lambda: [H100, RTX4090])
    unavailable: bool = False
    broken: set[int] = field(default_factory=set)
    driver: str = "570.124.06"
    calls: list[str] = field(default_factory=list)
    active: bool = False

    def init(self) -> None:
        self.calls.append("init")
        if self.unavailable:
            raise NvmlUnavailableError("NVML Shared Library Not Found")
        self.active = True

    def shutdown(self) -> None:
        self.calls.append("shutdown")
        self.active = False

    def driver_version(self) -> str:
        assert self.active
        return self.driver

    def device_count(self) -> int:
        assert self.active
        return len(self.devices)

    def device(self, index: int) -> NvmlDevice:
        assert self.active
        if index in self.broken:
            raise RuntimeError("GPU is lost")
        return self.devices[index]

    def sample(self, index: int) -> NvmlSample:
        assert self.active
        if index in self.broken:
            raise RuntimeError("GPU is lost")
        device = self.devices[index]
        return NvmlSample(
            uuid=device.uuid, util_pct=37 + index, mem_used_bytes=GiB * (index + 1), temp_c=61
        )


@dataclass
class FakeNetlink:
    items: list[LinkInfo] = field(
        default_factory=lambda: [
            LinkInfo(name="lo", mac="00:00:00:00:00:00", mtu=65536, loopback=True),
            LinkInfo(name="eth1", mac="02:00:00:00:00:02", mtu=9000, operstate="DOWN"),
            LinkInfo(name="eth0", mac="02:00:00:00:00:01", mtu=1500, operstate="UP"),
            LinkInfo(name="docker0", mac="02:42:00:00:00:01", kind="bridge"),
            LinkInfo(name="veth1a2b3c", mac="ae:00:00:00:00:01", kind="veth"),
            LinkInfo(name="bond0", mac="02:00:00:00:00:03", kind="bond"),
        ]
    )
    fail: bool = False

    def links(self) -> list[LinkInfo]:
        if self.fail:
            raise OSError("netlink socket refused")
        return list(self.items)


@dataclass
class Host:
    proc: Path
    sys: Path

    def add_pci(
        self, address: str, *, vendor: str, klass: str, device: str, driver: str | None
    ) -> None:
        entry = self.sys / "bus/pci/devices" / address
        entry.mkdir(parents=True)
        (entry / "vendor").write_text(vendor + "\n")
        (entry / "class").write_text(klass + "\n")
        (entry / "device").write_text(device + "\n")
        if driver is not None:
            target = self.sys / "bus/pci/drivers" / driver
            target.mkdir(parents=True, exist_ok=True)
            (entry / "driver").symlink_to(target)

    def add_disk(
        self, name: str, *, sectors: int, rotational: bool, model: str | None, device: bool = True
    ) -> None:
        entry = self.sys / "block" / name
        (entry / "queue").mkdir(parents=True)
        (entry / "size").write_text(f"{sectors}\n")
        (entry / "queue/rotational").write_text("1\n" if rotational else "0\n")
        if device:
            (entry / "device").mkdir()
            if model is not None:
                (entry / "device/model").write_text(model)


@pytest.fixture(autouse=True)
def _fresh_log_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inventory, "_LOGGED", set())


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    proc, sys = tmp_path / "proc", tmp_path / "sys"
    proc.mkdir()
    (proc / "cpuinfo").write_text(CPUINFO)
    (proc / "meminfo").write_text(MEMINFO)
    (proc / "loadavg").write_text("3.25 2.10 1.05 2/1234 56789\n")
    (proc / "uptime").write_text("12345.67 98765.43\n")
    (sys / "devices/system/cpu").mkdir(parents=True)
    (sys / "devices/system/cpu/online").write_text("0-95,128-223\n")
    (sys / "class/net/eth0").mkdir(parents=True)
    (sys / "class/net/eth0/speed").write_text("25000\n")
    (sys / "class/net/eth1").mkdir(parents=True)
    (sys / "class/net/eth1/speed").write_text("-1\n")  # link down
    h = Host(proc=proc, sys=sys)
    h.add_disk("nvme0n1", sectors=7_501_476_528, rotational=False, model="SAMSUNG MZQL27T6HBLA")
    h.add_disk("sda", sectors=3_907_029_168, rotational=True, model="ST2000NM0055-1V4 \n")
    h.add_disk("loop0", sectors=1000, rotational=False, model=None, device=False)
    h.add_disk("zram0", sectors=1000, rotational=False, model=None, device=False)
    h.add_disk("ram0", sectors=1000, rotational=False, model=None, device=False)
    h.add_disk("dm-0", sectors=1000, rotational=False, model=None, device=False)
    h.add_disk("sr0", sectors=0, rotational=True, model="DVD-ROM")
    # An H200 bound to vfio-pci (for a VM), its audio function, an NVIDIA GPU on the nvidia
    # driver (NVML's business), an unbound one and a non-NVIDIA VGA device.
    h.add_pci("0000:81:00.0", vendor="0x10de", klass="0x030200", device="0x2335", driver="vfio-pci")
    h.add_pci("0000:81:00.1", vendor="0x10de", klass="0x040300", device="0x22a3", driver="vfio-pci")
    h.add_pci("0000:1b:00.0", vendor="0x10de", klass="0x030200", device="0x2330", driver="nvidia")
    h.add_pci("0000:c1:00.0", vendor="0x10de", klass="0x030000", device="0x2684", driver=None)
    h.add_pci("0000:03:00.0", vendor="0x1a03", klass="0x030000", device="0x2000", driver="ast")
    yield h


def collect(host: Host, **kwargs: object) -> wire.Inventory:
    args: dict[str, object] = {"nvml": FakeNvml(), "netlink": FakeNetlink()}
    args.update(kwargs)
    return collect_inventory(proc_root=host.proc, sys_root=host.sys, **args)  # type: ignore[arg-type]


def round_trip(inv: wire.Inventory) -> wire.Inventory:
    frame = wire.Frame(msg=wire.InventoryUpdate(inventory=inv), id=7)
    decoded = wire.decode(wire.Link.WORKER_MINER, wire.Direction.UP, wire.encode(frame))
    assert isinstance(decoded.msg, wire.InventoryUpdate)
    return decoded.msg.inventory


def test_full_inventory_round_trips(host: Host) -> None:
    inv = collect(host)
    assert round_trip(inv) == inv
    assert inv.cpu_model == "AMD EPYC 9654 96-Core Processor"
    assert inv.cpu_cores == 192
    assert inv.mem_bytes == 263921356 * 1024
    assert inv.disks == [
        wire.Disk(
            name="nvme0n1",
            model="SAMSUNG MZQL27T6HBLA",
            size_bytes=7_501_476_528 * 512,
            rotational=False,
        ),
        wire.Disk(
            name="sda", model="ST2000NM0055-1V4", size_bytes=3_907_029_168 * 512, rotational=True
        ),
    ]
    assert inv.nics == [
        wire.Nic(name="bond0", speed_mbps=0),
        wire.Nic(name="eth0", speed_mbps=25000),
        wire.Nic(name="eth1", speed_mbps=0),
    ]
    assert [gpu.pci_bus_id for gpu in inv.gpus] == ["0000:01:00.0", "0000:1b:00.0", "0000:81:00.0"]
    rtx, h100, h200 = inv.gpus
    assert h100 == wire.GpuInfo(
        uuid=H100.uuid,
        name="NVIDIA H100 80GB HBM3",
        mem_bytes=80 * GiB,
        pci_bus_id="0000:1b:00.0",
        driver_version="570.124.06",
        compute_capability="9.0",
        vfio_bound=False,
    )
    assert rtx.uuid == RTX4090.uuid
    assert rtx.compute_capability == "8.9"
    assert h200 == wire.GpuInfo(
        uuid="PCI-0000:81:00.0",
        name="NVIDIA H200",
        mem_bytes=0,
        pci_bus_id="0000:81:00.0",
        vfio_bound=True,
    )


def test_nvml_is_bracketed_by_init_and_shutdown(host: Host) -> None:
    nvml = FakeNvml()
    collect(host, nvml=nvml)
    collect_live(proc_root=host.proc, nvml=nvml)
    assert nvml.calls == ["init", "shutdown", "init", "shutdown"]


def test_vfio_gpu_uuid_is_stable_and_unknown_devices_are_named_by_id(host: Host) -> None:
    host.add_pci("0000:e1:00.0", vendor="0x10de", klass="0x030200", device="0x2f99", driver=None)
    host.add_pci(
        "0000:e2:00.0", vendor="0x10de", klass="0x030000", device="0x2f99", driver="vfio-pci"
    )
    first = collect(host, nvml=FakeNvml(unavailable=True))
    second = collect(host, nvml=FakeNvml(unavailable=True))
    assert first == second
    vfio = {gpu.uuid: gpu for gpu in first.gpus}
    assert set(vfio) == {"PCI-0000:81:00.0", "PCI-0000:e2:00.0"}
    assert all(gpu.vfio_bound for gpu in first.gpus)
    assert vfio["PCI-0000:e2:00.0"].name == "NVIDIA 2f99"
    assert round_trip(first) == first


def test_nvml_unavailable_means_no_host_gpus_logged_once_at_info(
    host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=inventory.__name__)
    for _ in range(3):
        inv = collect(host, nvml=FakeNvml(unavailable=True))
    assert [gpu.uuid for gpu in inv.gpus] == ["PCI-0000:81:00.0"]
    assert inv.disks and inv.nics and inv.cpu_cores == 192 and inv.mem_bytes > 0
    records = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert len(records) == 1
    assert records[0].levelno == logging.INFO
    assert "NVML" in records[0].getMessage()
    assert round_trip(inv) == inv


def test_nvml_failure_keeps_everything_else(
    host: Host, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom() -> None:
        raise RuntimeError("NVML_ERROR_UNKNOWN")

    nvml = FakeNvml()
    monkeypatch.setattr(nvml, "init", boom)
    inv = collect(host, nvml=nvml)
    assert [gpu.vfio_bound for gpu in inv.gpus] == [True]
    assert len(inv.disks) == 2 and len(inv.nics) == 3
    assert any(r.levelno == logging.WARNING for r in caplog.records)
    assert round_trip(inv) == inv


def test_one_lost_gpu_does_not_hide_the_others(host: Host) -> None:
    inv = collect(host, nvml=FakeNvml(broken={0}))
    assert [gpu.uuid for gpu in inv.gpus] == [RTX4090.uuid, "PCI-0000:81:00.0"]
    live = collect_live(proc_root=host.proc, nvml=FakeNvml(broken={0}))
    assert [gpu.uuid for gpu in live.gpus] == [RTX4090.uuid]


def test_every_source_fails_independently(host: Host, caplog: pytest.LogCaptureFixture) -> None:
    (host.proc / "cpuinfo").unlink()
    (host.proc / "meminfo").unlink()
    (host.sys / "devices/system/cpu/online").unlink()
    for entry in (host.sys / "block").iterdir():
        for path in sorted(entry.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        entry.rmdir()
    (host.sys / "block").rmdir()
    inv = collect(host, netlink=FakeNetlink(fail=True))
    assert inv.cpu_model == "unknown"
    assert inv.cpu_cores >= 1  # from the process's CPU affinity
    assert inv.mem_bytes == 0
    assert inv.disks == [] and inv.nics == []
    assert len(inv.gpus) == 3
    assert round_trip(inv) == inv
    assert sum(r.levelno == logging.WARNING for r in caplog.records) >= 4


def test_invalid_values_are_dropped_or_cleaned(host: Host) -> None:
    weird = NvmlDevice(
        uuid="GPU with spaces/and slashes",
        name="bad",
        mem_bytes=1,
        pci_bus_id="0000:02:00.0",
    )
    nvml = FakeNvml(devices=[H100, weird], driver="570.1\x00")
    long_name = LinkInfo(name="x" * 80)
    inv = collect(host, nvml=nvml, netlink=FakeNetlink(items=[long_name]))
    assert [gpu.uuid for gpu in inv.gpus] == [H100.uuid, "PCI-0000:81:00.0"]
    assert inv.gpus[0].driver_version == "570.1"
    assert inv.gpus[0].compute_capability == "9.0"
    assert inv.nics == []
    (host.proc / "cpuinfo").write_text("model name\t: Caf\u00e9\tCPU\u2122 \n")
    assert collect(host).cpu_model == "Caf CPU"


def test_lists_are_capped_at_the_wire_limits(host: Host) -> None:
    links = [LinkInfo(name=f"enp{i}s0") for i in range(40)]
    devices = [
        NvmlDevice(
            uuid=f"GPU-{i:08x}", name="NVIDIA H100", mem_bytes=GiB, pci_bus_id=f"0000:{i:02x}:00.0"
        )
        for i in range(40)
    ]
    inv = collect(host, netlink=FakeNetlink(items=links), nvml=FakeNvml(devices=devices))
    assert len(inv.nics) == 32
    assert len(inv.gpus) == wire.MAX_DEVICES_PER_WORKER
    assert round_trip(inv) == inv


def test_fingerprint_is_stable_and_tracks_hardware_changes(host: Host) -> None:
    first = collect(host)
    assert inventory_fingerprint(first) == inventory_fingerprint(collect(host))
    assert len(inventory_fingerprint(first)) == 32
    # A GPU appears (bound to vfio-pci): the worker must send an InventoryUpdate.
    host.add_pci(
        "0000:c2:00.0", vendor="0x10de", klass="0x030200", device="0x2901", driver="vfio-pci"
    )
    grown = collect(host)
    assert any(gpu.name == "NVIDIA B200" for gpu in grown.gpus)
    assert inventory_fingerprint(grown) != inventory_fingerprint(first)
    # The order NVML enumerates in does not matter.
    reordered = collect(host, nvml=FakeNvml(devices=[RTX4090, H100]))
    assert inventory_fingerprint(reordered) == inventory_fingerprint(grown)
    # Nor does the round trip through the wire.
    assert inventory_fingerprint(round_trip(grown)) == inventory_fingerprint(grown)


def test_live_metrics(host: Host) -> None:
    beat = collect_live(proc_root=host.proc, nvml=FakeNvml())
    assert beat.load1 == 3.25
    assert beat.uptime_s == 12345.67
    assert beat.mem_used_bytes == (263921356 - 200000000) * 1024
    assert beat.gpus == [
        wire.GpuLive(uuid=H100.uuid, util_pct=37, mem_used_bytes=GiB, temp_c=61),
        wire.GpuLive(uuid=RTX4090.uuid, util_pct=38, mem_used_bytes=2 * GiB, temp_c=61),
    ]
    frame = wire.Frame(msg=beat)
    assert wire.decode(wire.Link.WORKER_MINER, wire.Direction.UP, wire.encode(frame)) == frame


def test_live_metrics_survive_missing_sources(host: Host) -> None:
    for name in ("loadavg", "uptime", "meminfo"):
        (host.proc / name).unlink()
    beat = collect_live(proc_root=host.proc, nvml=FakeNvml(unavailable=True))
    assert beat == wire.Heartbeat(uptime_s=0.0, load1=0.0, mem_used_bytes=0, gpus=[])


def test_pci_address_normalisation_and_names() -> None:
    assert inventory.normalize_pci_address("00000000:1B:00.0") == "0000:1b:00.0"
    assert inventory.normalize_pci_address("00010000:01:00.7") == "00010000:01:00.7"
    assert inventory.nvidia_device_name(0x2330) == "NVIDIA H100 80GB HBM3"
    assert inventory.nvidia_device_name(0x2B85) == "NVIDIA GeForce RTX 5090"
    assert inventory.nvidia_device_name(0x0ABC) == "NVIDIA 0abc"


def test_smoke_on_this_machine() -> None:
    """Real /proc, /sys, netlink and NVML (absent here): a valid Inventory and Heartbeat."""
    inv = collect_inventory()
    assert inv.cpu_cores >= 1 and inv.mem_bytes > 0
    assert all(nic.name != "lo" for nic in inv.nics)
    assert round_trip(inv) == inv
    beat = collect_live()
    frame = wire.Frame(msg=beat)
    assert wire.decode(wire.Link.WORKER_MINER, wire.Direction.UP, wire.encode(frame)) == frame
