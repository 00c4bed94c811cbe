"""The worker's gateway link without a network: what it reports, how it turns gateway messages
into VM operations, and what it does when those fail. VMs and challenge duty are recording
fakes; the messages it would send are decoded back from the bytes it writes."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import msgspec
import pytest

from byteleap.core import gateway_protocol as gp
from byteleap.core import wire
from byteleap.core.identity import WorkerKey
from byteleap.worker.config import WorkerConfig
from byteleap.worker.gateway_link import (
    BOOK_FILE,
    GatewayLink,
    GatewayLinkSettings,
    GatewayState,
    GatewayStatus,
    GpuIdentity,
    _Session,
    gpu_slots,
)
from byteleap.worker.vm import VmError
from byteleap.worker.vm.config import VmSettings
from byteleap.worker.vm.manager import (
    HostGpu,
    LeaseVmSpec,
    RecoveryReport,
    VmInfo,
    VmStartError,
    VmStatus,
)

NVIDIA = 0x10DE
A, B, C = "0000:41:00.0", "0000:81:00.0", "0000:c1:00.0"
NVML_A = "GPU-11111111-2222-3333-4444-555555555555"
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHd0nA6xW8S9Rz3PqzCqYl0n1m3y7wq3wYbYbR0dM1Xk"


def host(address: str, *, vendor: int = NVIDIA, problem: str | None = None) -> HostGpu:
    return HostGpu(address=address, vendor_id=vendor, product="GH100 [H100]", problem=problem)


def inventory(*gpus: wire.GpuInfo) -> wire.Inventory:
    return wire.Inventory(cpu_model="cpu", cpu_cores=8, mem_bytes=1 << 30, gpus=list(gpus))


def nvml(address: str, uuid: str = NVML_A) -> wire.GpuInfo:
    return wire.GpuInfo(uuid=uuid, name="NVIDIA H100", mem_bytes=80 << 30, pci_bus_id=address)


def vfio(address: str) -> wire.GpuInfo:
    return wire.GpuInfo(
        uuid=f"PCI-{address}", name="NVIDIA H100", mem_bytes=0, pci_bus_id=address, vfio_bound=True
    )


# --------------------------------------------------------------------------------------------
# GPUs as reported


def test_slots_name_gpus_as_their_host_driver_did() -> None:
    slots, learned = gpu_slots(
        [host(A), host(B), host("0000:02:00.0", vendor=0x1A03)],
        inventory(nvml(A)),
        {},
        held=set(),
        mode="auto",
    )
    by_address = {s.pci_bus_id: s for s in slots}
    assert set(by_address) == {A, B}  # a BMC's VGA (ASPEED) is not rented out
    assert by_address[A].uuid == NVML_A and by_address[A].mem_bytes == 80 << 30
    assert by_address[B].uuid == f"PCI-{B}" and by_address[B].name == "GH100 [H100]"
    assert learned == {A: GpuIdentity(uuid=NVML_A, name="NVIDIA H100", mem_bytes=80 << 30)}

    # On vfio-pci NVML no longer sees it: the remembered identity stays.
    slots, again = gpu_slots([host(A)], inventory(vfio(A)), learned, held={A}, mode="auto")
    assert [(s.uuid, s.state) for s in slots] == [(NVML_A, "leased")]
    assert again == learned


def test_slots_mark_what_cannot_be_leased() -> None:
    slots, _ = gpu_slots(
        [host(A), host(B, problem="IOMMU group shared with a NIC"), host(C)],
        inventory(nvml(A), vfio(C)),
        {},
        held=set(),
        mode="passthrough",
    )
    states = {s.pci_bus_id: s.state for s in slots}
    # passthrough: a GPU still on its host driver is not leasable; a shared group never is
    assert states == {A: "unavailable", B: "unavailable", C: "idle"}


def test_a_uuid_is_reported_once() -> None:
    remembered = {A: GpuIdentity(uuid=NVML_A, name="x", mem_bytes=1)}
    slots, _ = gpu_slots(
        [host(A), host(B)], inventory(nvml(B)), remembered, held=set(), mode="auto"
    )
    assert [s.uuid for s in slots] == [NVML_A]  # stale memory vs NVML now: one slot per uuid


# --------------------------------------------------------------------------------------------
# Settings, config, status


def test_settings_refuse_a_bad_ssh_host_and_backoffs() -> None:
    with pytest.raises(ValueError, match="ssh_host"):
        GatewayLinkSettings(ssh_host="host name with spaces")
    with pytest.raises(ValueError, match="reconnect_max_s"):
        GatewayLinkSettings(ssh_host="gpu1.example", reconnect_initial_s=5, reconnect_max_s=1)
    with pytest.raises(ValueError, match="enroll_retry_max_s"):
        GatewayLinkSettings(ssh_host="gpu1.example", enroll_retry_initial_s=9, enroll_retry_max_s=1)
    with pytest.raises(ValueError, match="expiry_grace_s"):
        GatewayLinkSettings(ssh_host="gpu1.example", expiry_grace_s=0)


def vm_section(**extra: Any) -> dict[str, Any]:
    return {"base_image": "/img/base.qcow2", "base_image_sha256": "0" * 64, **extra}


def test_the_gateway_section_needs_vms_and_an_ssh_host() -> None:
    with pytest.raises(msgspec.ValidationError, match="needs a vm: section"):
        msgspec.convert({"gateway": {"enabled": True, "ssh_host": "h"}}, WorkerConfig)
    with pytest.raises(msgspec.ValidationError, match="ssh_host"):
        msgspec.convert({"vm": vm_section(), "gateway": {"enabled": True}}, WorkerConfig)
    with pytest.raises(msgspec.ValidationError, match="test:///"):
        msgspec.convert({"vm": vm_section(domain_type="test")}, WorkerConfig)
    cfg = msgspec.convert(
        {"vm": vm_section(), "gateway": {"enabled": True, "ssh_host": "203.0.113.5"}},
        WorkerConfig,
    )
    assert cfg.gateway.enabled and cfg.gateway.ssh_host == "203.0.113.5"
    assert not msgspec.convert({}, WorkerConfig).gateway.enabled  # opt-in


def test_status_lines() -> None:
    assert GatewayStatus(state=GatewayState.CONNECTED, leases=2).line() == (
        "gateway connected, 2 lease(s)"
    )
    waiting = GatewayStatus(state=GatewayState.WAITING, reason="connection refused", retry_in_s=3)
    assert waiting.line() == "gateway: connection refused; retrying in 3.0s"


# --------------------------------------------------------------------------------------------
# Leases with fake VMs


@dataclass
class FakeVms:
    gpus: list[HostGpu] = field(default_factory=lambda: [host(A), host(B)])
    fail_start: str | None = None
    fail_stop: bool = False
    start_gate: asyncio.Event | None = None
    states: dict[str, str] = field(default_factory=dict)
    kept: tuple[str, ...] = ()
    calls: list[tuple[str, str]] = field(default_factory=list)
    recovered_with: list[set[str]] = field(default_factory=list)
    specs: list[LeaseVmSpec] = field(default_factory=list)

    async def start(self, spec: LeaseVmSpec) -> VmInfo:
        self.calls.append(("start", spec.lease_id))
        self.specs.append(spec)
        if self.start_gate is not None:
            await self.start_gate.wait()
        if self.fail_start is not None:
            raise VmStartError(self.fail_start)
        self.states[spec.lease_id] = "running"
        return VmInfo(
            lease_id=spec.lease_id,
            domain=f"byteleap-lease-{spec.lease_id}",
            uuid="u",
            gpus=spec.gpus,
            hostdevs=spec.gpus,
            vcpus=4,
            memory_mib=1024,
            bridge="blbr0",
            vm_address="10.213.0.2",
            ssh_port=42200,
        )

    async def stop(self, lease_id: str) -> bool:
        self.calls.append(("stop", lease_id))
        if self.fail_stop:
            raise VmError(f"lease {lease_id}: cleanup incomplete: injected")
        return self.states.pop(lease_id, None) is not None

    async def status(self, lease_id: str) -> VmStatus:
        state = self.states.get(lease_id, "missing")
        return VmStatus(lease_id=lease_id, state=state, guest_agent="unknown", info=None)  # type: ignore[arg-type]

    async def recover(self, active_lease_ids: Collection[str]) -> RecoveryReport:
        self.recovered_with.append(set(active_lease_ids))
        kept = tuple(x for x in active_lease_ids if x in self.kept)
        failed = tuple(x for x in active_lease_ids if x not in self.kept)
        return RecoveryReport(kept=kept, failed=failed)

    async def host_gpus(self) -> list[HostGpu]:
        return list(self.gpus)


@dataclass
class FakeDuty:
    events: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)

    async def withdraw(self, uuids: Iterable[str]) -> None:
        self.events.append(("withdraw", tuple(sorted(uuids))))

    def restore(self, uuids: Iterable[str]) -> None:
        self.events.append(("restore", tuple(sorted(uuids))))


class FakeWs:
    def __init__(self) -> None:
        self.sent: list[gp.Message] = []

    async def send_bytes(self, data: bytes) -> None:
        self.sent.append(gp.decode(gp.UP, data).msg)  # what the gateway would accept


def settings(tmp_path: Path) -> VmSettings:
    return VmSettings(
        base_image=str(tmp_path / "base.qcow2"),
        base_image_sha256="0" * 64,
        vcpus_per_gpu=4,
        memory_mib_per_gpu=1024,
        max_disk_gib=10,
    )


@dataclass
class Rig:
    link: GatewayLink
    vms: FakeVms
    duty: FakeDuty
    ws: FakeWs
    state_dir: Path
    wall: list[float]

    def connect(self) -> None:
        self.link._session = _Session(
            ws=cast(Any, self.ws),
            enrollment=cast(Any, None),
            session_id=b"\0" * 16,
            heartbeat_interval_s=15,
            started_at=0.0,
        )

    def sent(self, kind: type[gp.Message]) -> list[Any]:
        return [m for m in self.ws.sent if isinstance(m, kind)]

    def book(self) -> dict[str, Any]:
        return cast(dict[str, Any], json.loads((self.state_dir / BOOK_FILE).read_text()))


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    vms, duty = FakeVms(), FakeDuty()
    wall = [time.time()]

    async def enroll() -> Any:
        raise AssertionError("no enrollment in these tests")

    link = GatewayLink(
        GatewayLinkSettings(ssh_host="203.0.113.5", expiry_grace_s=60, maintenance_s=0.01),
        key=WorkerKey.generate(),
        vm=settings(tmp_path),
        vms=vms,
        duty=duty,
        state_dir=tmp_path,
        load_enrollment=lambda: None,
        enroll=enroll,
        collect_inventory=lambda: inventory(nvml(A)),
        wall_clock=lambda: wall[0],
    )
    rig = Rig(link, vms, duty, FakeWs(), tmp_path, wall)
    rig.connect()
    return rig


async def stopped_by_maintenance(rig: Rig) -> None:
    """Wait until maintenance has stopped every held lease and its stop task has finished."""
    for _ in range(500):
        if not rig.link.held_leases() and not rig.link._lease_tasks:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"still held: {rig.link.held_leases()}")


def start(lease_id: str, *uuids: str, vcpus: int = 4, memory: int = 1024, disk: int = 10) -> Any:
    return gp.StartLease(
        lease_id=lease_id,
        device_uuids=list(uuids or (NVML_A,)),
        ssh_public_key=SSH_KEY,
        vcpus=vcpus,
        memory_mib=memory,
        disk_gib=disk,
        ends_at=time.time() + 3600,
    )


def lease_id() -> str:
    return secrets.token_hex(16)


async def test_a_gpu_leaves_challenge_duty_before_its_vm_starts(rig: Rig) -> None:
    lid = lease_id()
    await rig.link._start_lease(start(lid))
    assert rig.duty.events == [("withdraw", (NVML_A,))]
    assert rig.vms.calls == [("start", lid)]
    [started] = rig.sent(gp.LeaseStarted)
    assert (started.ssh_host, started.ssh_port, started.ssh_user) == (
        "203.0.113.5",
        42200,
        "renter",
    )
    assert rig.link.leased_devices == {NVML_A}
    assert rig.book()["leases"][lid]["phase"] == "running"
    assert (rig.state_dir / BOOK_FILE).stat().st_mode & 0o777 == 0o600

    await rig.link._stop_lease(lid, "terminated")
    assert rig.sent(gp.LeaseStopped)[0].lease_id == lid
    assert rig.duty.events[-1] == ("restore", (NVML_A,))
    assert rig.link.leased_devices == frozenset() and rig.book()["leases"] == {}


async def test_a_vm_gets_the_disk_the_lease_asks_for_up_to_the_worker_maximum(rig: Rig) -> None:
    # Two GPUs: the gateway asks twice its per-GPU sizes; the worker's bound is per lease.
    lid = lease_id()
    await rig.link._start_lease(start(lid, NVML_A, f"PCI-{B}", vcpus=8, memory=2048, disk=10))
    assert [(s.gpus, s.disk_gib) for s in rig.vms.specs] == [((A, B), 10)]
    assert rig.sent(gp.LeaseStarted)[0].lease_id == lid
    small = lease_id()
    await rig.link._stop_lease(lid, "terminated")
    await rig.link._start_lease(start(small, disk=3))
    assert rig.vms.specs[-1].disk_gib == 3


@pytest.mark.parametrize(
    ("request_", "why"),
    [
        (start("0" * 32, "GPU-unknown"), "no GPU GPU-unknown on this worker"),
        (start("0" * 32, vcpus=16), "asks for 16 vCPUs; this worker gives 4 per GPU"),
        (start("0" * 32, memory=4096), "asks for 4096 MiB"),
        (start("0" * 32, disk=500), "asks for a 500 GiB disk; this worker's VMs get at most 10"),
    ],
)
async def test_a_start_this_worker_cannot_honour_is_refused(
    rig: Rig, request_: gp.StartLease, why: str
) -> None:
    await rig.link._start_lease(request_)
    [failed] = rig.sent(gp.LeaseFailed)
    assert why in failed.reason
    assert rig.vms.calls == [] and rig.duty.events == []  # nothing touched


async def test_a_gpu_in_one_lease_is_refused_to_another(rig: Rig) -> None:
    await rig.link._start_lease(start(lease_id()))
    await rig.link._start_lease(start(lease_id()))
    [failed] = rig.sent(gp.LeaseFailed)
    assert f"GPU {A} is in another lease" in failed.reason
    assert len(rig.vms.calls) == 1


async def test_a_failed_start_reports_the_reason_and_returns_the_gpu(rig: Rig) -> None:
    rig.vms.fail_start = "lease x: binding GPU 0000:41:00.0 failed: unit failed\nsecond line"
    lid = lease_id()
    await rig.link._start_lease(start(lid))
    [failed] = rig.sent(gp.LeaseFailed)
    assert failed.lease_id == lid and "\n" not in failed.reason and "unit failed" in failed.reason
    assert rig.duty.events == [("withdraw", (NVML_A,)), ("restore", (NVML_A,))]
    assert rig.book()["leases"] == {}


async def test_a_repeated_start_while_booting_starts_one_vm(rig: Rig) -> None:
    rig.vms.start_gate = asyncio.Event()
    lid = lease_id()
    first = asyncio.create_task(rig.link._start_lease(start(lid)))
    await asyncio.sleep(0.05)
    await rig.link._start_lease(start(lid))  # the gateway sends it again after a reconnect
    stop = asyncio.create_task(rig.link._stop_lease(lid, "terminated"))
    await asyncio.sleep(0.05)
    assert rig.vms.calls == [("start", lid)]  # the stop waits for the start
    rig.vms.start_gate.set()
    await asyncio.gather(first, stop)
    assert [type(m).__name__ for m in rig.ws.sent] == ["LeaseStarted", "LeaseStopped"]
    assert rig.vms.calls == [("start", lid), ("stop", lid)]


async def test_a_start_repeated_after_it_ran_is_answered_again(rig: Rig) -> None:
    lid = lease_id()
    await rig.link._start_lease(start(lid))
    await rig.link._start_lease(start(lid))
    assert len(rig.sent(gp.LeaseStarted)) == 2
    assert rig.duty.events == [("withdraw", (NVML_A,))]  # withdrawn once


async def test_a_failed_stop_is_retried_and_keeps_the_gpu_off_duty(rig: Rig) -> None:
    lid = lease_id()
    await rig.link._start_lease(start(lid))
    rig.vms.fail_stop = True
    await rig.link._stop_lease(lid, "terminated")
    assert rig.sent(gp.LeaseStopped) == []
    assert rig.book()["leases"][lid]["phase"] == "stopping"
    assert rig.link.leased_devices == {NVML_A}
    health = await rig.link._health(rig.link.held_leases()[lid])
    assert health.state == "stopped"
    rig.vms.fail_stop = False
    rig.link._stop_retry_at[lid] = 0.0
    task = asyncio.create_task(rig.link._maintain())
    try:
        await stopped_by_maintenance(rig)
    finally:
        task.cancel()
    assert not rig.link.held_leases() and rig.duty.events[-1] == ("restore", (NVML_A,))


async def test_extend_moves_the_end_and_expiry_stops_the_vm(rig: Rig) -> None:
    lid = lease_id()
    await rig.link._start_lease(start(lid))
    ends_at = rig.wall[0] + 10
    await rig.link._extend(gp.ExtendLease(lease_id=lid, ends_at=ends_at))
    assert rig.book()["leases"][lid]["ends_at"] == ends_at
    await rig.link._extend(gp.ExtendLease(lease_id="f" * 32, ends_at=ends_at))  # not ours

    rig.wall[0] = ends_at + 61  # past the end and the grace: the gateway never said stop
    task = asyncio.create_task(rig.link._maintain())
    try:
        await stopped_by_maintenance(rig)
    finally:
        task.cancel()
    assert ("stop", lid) in rig.vms.calls and not rig.link.held_leases()
    assert rig.sent(gp.LeaseStopped)[0].lease_id == lid


async def test_health_is_running_only_while_libvirt_says_so(rig: Rig) -> None:
    lid = lease_id()
    await rig.link._start_lease(start(lid))
    held = rig.link.held_leases()[lid]
    assert (await rig.link._health(held)).state == "running"
    for vm_state, detail in (
        ("shutoff", "VM shutoff"),
        ("crashed", "VM crashed"),
        ("paused", "VM paused"),
    ):
        rig.vms.states[lid] = vm_state
        health = await rig.link._health(held)
        assert (health.state, health.detail) == ("failed", detail)


async def test_recovery_keeps_what_survived_and_reports_the_rest(rig: Rig) -> None:
    kept, lost = lease_id(), lease_id()
    await rig.link._start_lease(start(kept, NVML_A))
    await rig.link._start_lease(start(lost, f"PCI-{B}"))
    rig.vms.kept = (kept,)
    rig.duty.events.clear()

    restarted = GatewayLink(
        rig.link.settings,
        key=rig.link._key,
        vm=rig.link._vm,
        vms=rig.vms,
        duty=rig.duty,
        state_dir=rig.state_dir,
        load_enrollment=lambda: None,
        enroll=rig.link._enroll,
        collect_inventory=lambda: inventory(nvml(A)),
    )
    await restarted._recover()
    assert rig.vms.recovered_with == [{kept, lost}]
    held = restarted.held_leases()
    assert held[kept].phase == "running" and held[lost].phase == "failed"
    assert rig.duty.events == [("withdraw", (NVML_A,))]
    hello = await restarted._hello()
    health = {h.lease_id: h for h in hello.leases}
    assert health[lost].state == "failed" and "restart" in health[lost].detail
    restarted._delivered(hello.leases)  # as the session does once the hello is sent
    await asyncio.sleep(0.05)  # the book is saved in the background
    assert set(restarted.held_leases()) == {kept}  # a reported failure is forgotten


async def test_a_corrupt_book_is_set_aside(rig: Rig) -> None:
    (rig.state_dir / BOOK_FILE).write_text("{not json")
    await rig.link._recover()
    assert rig.vms.recovered_with == [set()]  # nothing known: every lease VM is torn down
    assert (rig.state_dir / "gateway-leases.corrupt").exists()
    assert rig.link.held_leases() == {}


async def test_a_failure_with_nobody_to_tell_waits_for_the_next_hello(rig: Rig) -> None:
    rig.link._session = None
    lid = lease_id()
    rig.vms.fail_start = "no"
    await rig.link._start_lease(start(lid))
    assert rig.link.held_leases()[lid].phase == "failed"
    hello = await rig.link._hello()
    assert [(h.lease_id, h.state) for h in hello.leases] == [(lid, "failed")]
    assert hello.capacity == gp.Capacity(vcpus=8, memory_mib=2048, disk_gib=20)


async def test_no_heartbeat_when_libvirt_cannot_answer(rig: Rig) -> None:
    lid = lease_id()
    await rig.link._start_lease(start(lid))

    async def broken(lease_id: str) -> VmStatus:
        raise VmError("cannot connect to libvirt at qemu:///system: connection refused")

    rig.vms.status = broken  # type: ignore[method-assign]
    with pytest.raises(VmError):
        await rig.link._worker_state()


async def test_leased_gpus_are_named_as_the_inventory_names_them(rig: Rig) -> None:
    await rig.link._start_lease(start(lease_id()))
    # Leased, the GPU is on vfio-pci: the inventory lists it by its PCI-derived uuid.
    assert rig.link.leased_inventory_uuids(inventory(vfio(A), nvml(B, "GPU-b"))) == [f"PCI-{A}"]
    assert rig.link.leased_devices == {NVML_A}  # the gateway's (stable) name
