"""LeaseVmManager against libvirt's test driver: a fake GPU host, real disks and seeds.

GPU binding and the network are recording fakes here (the real network has its own tests in a
network namespace, tests/integration/worker/vm/test_network_netns.py).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from byteleap.worker.vm import VmError
from byteleap.worker.vm.config import VmSettings
from byteleap.worker.vm.disks import GIB
from byteleap.worker.vm.domain import domain_name
from byteleap.worker.vm.manager import LeaseVmManager, LeaseVmSpec, VmStartError
from byteleap.worker.vm.seed import InvalidSshKeyError
from tests.support.libvirt_fixtures import (
    GPU_BEHIND_BRIDGE,
    GPU_COMPANION,
    GPU_PLAIN,
    GPU_SHARED_GROUP,
    GPU_WITH_AUDIO,
    NIC,
    FakeGpuBinder,
    LibvirtHost,
    RecordingNetwork,
    ed25519_key,
    rsa_key,
    virtual_size,
    vm_settings,
    write_node_fixture,
)


def new_lease() -> str:
    return secrets.token_hex(16)


@dataclass
class Rig:
    tmp_path: Path
    host: LibvirtHost
    binder: FakeGpuBinder
    network: RecordingNetwork
    settings: VmSettings
    manager: LeaseVmManager

    @property
    def state_dir(self) -> Path:
        return self.tmp_path / "state" / "leases"

    @property
    def vm_dir(self) -> Path:
        return Path(self.settings.vm_dir)

    def new_manager(self) -> LeaseVmManager:
        """A restarted worker: same libvirtd, binder state and network, new manager object."""
        self.manager = LeaseVmManager(
            self.host.uri,
            self.settings,
            self.binder,
            state_dir=self.state_dir,
            network=self.network,
            open_connection=self.host.open,
        )
        return self.manager

    def spec(
        self, lease_id: str, *gpus: str, key: str | None = None, disk_gib: int = 1
    ) -> LeaseVmSpec:
        return LeaseVmSpec(
            lease_id=lease_id,
            gpus=gpus or (GPU_WITH_AUDIO,),
            ssh_public_key=key or ed25519_key(),
            disk_gib=disk_gib,
        )

    def domain(self, lease_id: str) -> Any:
        return self.host.conn.lookupByName(domain_name(lease_id))

    def traces(self, lease_id: str) -> dict[str, bool]:
        """Every place a lease can leave something behind."""
        return {
            "domain": domain_name(lease_id) in self.host.domain_names(),
            "state": (self.state_dir / f"{lease_id}.json").exists(),
            "dir": (self.vm_dir / lease_id).exists(),
            "rules": lease_id in self.network.rules,
        }


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    host = LibvirtHost(write_node_fixture(tmp_path / "node.xml"))
    binder = FakeGpuBinder()
    network = RecordingNetwork()
    settings = vm_settings(tmp_path)
    rig = Rig(tmp_path, host, binder, network, settings, manager=None)  # type: ignore[arg-type]
    rig.new_manager()
    yield rig
    host.drop()


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


NOTHING = {"domain": False, "state": False, "dir": False, "rules": False}


async def test_full_lifecycle(rig: Rig) -> None:
    lease = new_lease()
    key = ed25519_key()
    info = await rig.manager.start(rig.spec(lease, GPU_WITH_AUDIO, key=key, disk_gib=3))
    assert info.domain == f"byteleap-lease-{lease}"
    assert info.gpus == (GPU_WITH_AUDIO,)
    assert info.hostdevs == (GPU_WITH_AUDIO, GPU_COMPANION)
    assert (info.ssh_port, info.vm_address, info.bridge) == (42200, "10.213.0.2", "blbr0")
    assert (info.vcpus, info.memory_mib) == (4, 1024)
    assert rig.binder.held == {GPU_WITH_AUDIO}
    assert rig.network.rules[lease].slot == 0

    domain = rig.domain(lease)
    assert domain.isActive()
    live = ET.fromstring(domain.XMLDesc(0))
    addresses = [
        "{}:{}:{}.{}".format(
            *(a.get(k, "")[2:] for k in ("domain", "bus", "slot", "function"))  # strip 0x
        )
        for a in live.iterfind("devices/hostdev/source/address")
    ]
    assert addresses == [GPU_WITH_AUDIO, GPU_COMPANION]
    assert {h.get("managed") for h in live.iterfind("devices/hostdev")} == {"no"}
    assert live.findall("devices/graphics") == []
    assert live.find("devices/interface/source").get("bridge") == "blbr0"  # type: ignore[union-attr]

    lease_dir = rig.vm_dir / lease
    assert sorted(p.name for p in lease_dir.iterdir()) == ["disk.qcow2", "seed.iso"]
    assert virtual_size(lease_dir / "disk.qcow2") == 3 * GIB  # the size the lease asked for
    state_file = rig.state_dir / f"{lease}.json"
    assert state_file.stat().st_mode & 0o777 == 0o600
    state = json.loads(state_file.read_text())
    assert state["phase"] == "running" and state["hostdevs"] == [GPU_WITH_AUDIO, GPU_COMPANION]
    assert key.split()[1] not in state_file.read_text()  # the key lives in the seed only

    status = await rig.manager.status(lease)
    assert (status.state, status.guest_agent) == ("running", "unknown")  # test driver
    assert status.info == info

    assert await rig.manager.stop(lease) is True
    assert rig.traces(lease) == NOTHING
    assert rig.binder.held == set()
    assert ("release", GPU_WITH_AUDIO) in rig.binder.calls
    assert (await rig.manager.status(lease)).state == "missing"
    assert await rig.manager.stop(lease) is False  # nothing left: a no-op


async def test_repeated_start_returns_the_running_vm(rig: Rig) -> None:
    lease = new_lease()
    first = await rig.manager.start(rig.spec(lease, GPU_PLAIN))
    assert await rig.manager.start(rig.spec(lease, GPU_PLAIN)) == first
    with pytest.raises(VmStartError, match="already has a VM"):
        await rig.manager.start(rig.spec(lease, GPU_BEHIND_BRIDGE))
    await rig.manager.stop(lease)


async def test_bridges_in_the_iommu_group_stay_with_the_host(rig: Rig) -> None:
    lease = new_lease()
    info = await rig.manager.start(rig.spec(lease, GPU_BEHIND_BRIDGE))
    assert info.hostdevs == (GPU_BEHIND_BRIDGE,)
    await rig.manager.stop(lease)


@pytest.mark.parametrize(
    ("gpus", "message"),
    [
        ((GPU_SHARED_GROUP,), f"also holds {NIC}.*not part of the GPU"),
        ((NIC,), "is not a GPU"),
        (("0000:99:00.0",), "unknown to libvirt"),
    ],
)
async def test_unleasable_devices_are_refused_and_nothing_stays(
    rig: Rig, gpus: tuple[str, ...], message: str
) -> None:
    lease = new_lease()
    with pytest.raises(VmStartError, match=f"reading the GPUs' IOMMU groups failed: .*{message}"):
        await rig.manager.start(rig.spec(lease, *gpus))
    assert rig.traces(lease) == NOTHING
    assert rig.binder.calls == []


async def test_bad_requests_change_nothing(rig: Rig) -> None:
    lease = new_lease()
    with pytest.raises(InvalidSshKeyError, match="3072 bits"):
        await rig.manager.start(rig.spec(lease, key=rsa_key(2048)))
    with pytest.raises(VmStartError, match="listed twice"):
        await rig.manager.start(rig.spec(lease, GPU_PLAIN, GPU_PLAIN))
    with pytest.raises(VmStartError, match="bad GPU address"):
        await rig.manager.start(rig.spec(lease, "41:00.0"))
    with pytest.raises(ValueError, match="lease id"):
        await rig.manager.start(rig.spec("../etc/passwd"))
    for disk_gib in (0, rig.settings.max_disk_gib + 1):
        with pytest.raises(VmStartError, match=r"vm\.max_disk_gib"):
            await rig.manager.start(rig.spec(lease, disk_gib=disk_gib))
    assert rig.traces(lease) == NOTHING
    assert not rig.state_dir.exists() or list(rig.state_dir.iterdir()) == []
    assert rig.binder.calls == []


async def test_network_failure_undoes_everything(rig: Rig) -> None:
    rig.network.fail_setup = True
    lease = new_lease()
    with pytest.raises(VmStartError, match=r"setting up the network failed: .*injected"):
        await rig.manager.start(rig.spec(lease, GPU_WITH_AUDIO))
    assert rig.traces(lease) == NOTHING
    assert rig.binder.held == set()
    # Undone in reverse: network, lease folder, then the GPU.
    assert rig.network.calls[-1] == ("teardown", lease, 0)
    assert rig.binder.calls[-1] == ("release", GPU_WITH_AUDIO)
    # The slot and port are free again.
    rig.network.fail_setup = False
    info = await rig.manager.start(rig.spec(new_lease(), GPU_WITH_AUDIO))
    assert (info.ssh_port, info.bridge) == (42200, "blbr0")


async def test_domain_failure_undoes_the_defined_domain(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = rig.manager._define_and_start

    def define_then_fail(spec: Any) -> None:
        original(spec)
        raise VmError("qemu: VFIO group 42 is not viable (injected)")

    monkeypatch.setattr(rig.manager, "_define_and_start", define_then_fail)
    lease = new_lease()
    with pytest.raises(VmStartError, match=r"defining and starting the domain failed: .*viable"):
        await rig.manager.start(rig.spec(lease, GPU_WITH_AUDIO))
    assert rig.traces(lease) == NOTHING
    assert rig.binder.held == set()


async def test_failed_bind_releases_the_gpus_already_bound(rig: Rig) -> None:
    rig.binder.fail_on = {GPU_PLAIN}
    lease = new_lease()
    with pytest.raises(VmStartError, match=f"binding GPU {GPU_PLAIN} failed"):
        await rig.manager.start(rig.spec(lease, GPU_WITH_AUDIO, GPU_PLAIN))
    assert rig.binder.held == set()
    assert rig.binder.calls == [
        ("bind", GPU_WITH_AUDIO),
        ("bind", GPU_PLAIN),
        ("release", GPU_PLAIN),
        ("release", GPU_WITH_AUDIO),
    ]
    assert rig.traces(lease) == NOTHING


async def test_untrusted_base_image_is_never_booted(rig: Rig) -> None:
    append(Path(rig.settings.base_image), b"backdoor")
    lease = new_lease()
    with pytest.raises(VmStartError, match=r"verifying the base image failed: .*refusing"):
        await rig.manager.start(rig.spec(lease))
    assert rig.traces(lease) == NOTHING
    assert rig.binder.held == set()


async def test_incomplete_undo_is_left_for_recovery(rig: Rig) -> None:
    rig.network.fail_setup = True
    rig.binder.fail_release_on = {GPU_PLAIN}
    lease = new_lease()
    with pytest.raises(VmStartError, match=r"cleanup incomplete .*recover"):
        await rig.manager.start(rig.spec(lease, GPU_PLAIN))
    assert rig.traces(lease)["state"]  # kept: recovery knows what is left
    rig.binder.fail_release_on = set()
    report = await rig.manager.recover(active_lease_ids=[])
    assert report.removed == (lease,) and report.errors == ()
    assert rig.traces(lease) == NOTHING
    assert rig.binder.held == set()


async def test_two_leases_never_share_a_gpu_port_subnet_or_mac(rig: Rig) -> None:
    a, b, c = new_lease(), new_lease(), new_lease()
    first = await rig.manager.start(rig.spec(a, GPU_WITH_AUDIO))
    second = await rig.manager.start(rig.spec(b, GPU_PLAIN, GPU_BEHIND_BRIDGE))
    assert first.ssh_port != second.ssh_port
    assert first.vm_address != second.vm_address and first.bridge != second.bridge
    assert second.vcpus == 8 and second.memory_mib == 2048
    macs = {
        ET.fromstring(rig.domain(lease).XMLDesc(0)).find("devices/interface/mac").get("address")  # type: ignore[union-attr]
        for lease in (a, b)
    }
    assert len(macs) == 2
    with pytest.raises(VmStartError, match=f"GPU {GPU_PLAIN} is already leased \\(lease {b}\\)"):
        await rig.manager.start(rig.spec(c, GPU_PLAIN))
    assert rig.traces(c) == NOTHING
    assert await rig.manager.free_gpus() == [GPU_SHARED_GROUP]
    # Freed resources are reused.
    await rig.manager.stop(a)
    third = await rig.manager.start(rig.spec(c, GPU_WITH_AUDIO))
    assert (third.ssh_port, third.bridge) == (first.ssh_port, first.bridge)


async def test_concurrent_starts_for_one_gpu_give_it_to_exactly_one(rig: Rig) -> None:
    rig.binder.slow_s = 0.2
    leases = [new_lease() for _ in range(3)]
    results = await asyncio.gather(
        *(rig.manager.start(rig.spec(lease, GPU_PLAIN)) for lease in leases),
        return_exceptions=True,
    )
    started = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, VmStartError)]
    assert len(started) == 1 and len(refused) == 2
    assert all("already leased" in str(r) for r in refused)


async def test_the_event_loop_keeps_running_during_slow_steps(rig: Rig) -> None:
    rig.binder.slow_s = 0.6
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.05)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        await rig.manager.start(rig.spec(new_lease(), GPU_PLAIN))
    finally:
        task.cancel()
    assert ticks >= 8  # a blocked loop would not have ticked during the 0.6 s bind


async def test_a_cancelled_caller_does_not_leave_a_half_built_vm(rig: Rig) -> None:
    rig.binder.slow_s = 0.3
    lease = new_lease()
    caller = asyncio.create_task(rig.manager.start(rig.spec(lease, GPU_PLAIN)))
    await asyncio.sleep(0.1)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller

    async def running() -> bool:
        return (await rig.manager.status(lease)).state == "running"

    for _ in range(200):
        if await running():
            break
        await asyncio.sleep(0.05)
    assert await running()
    assert await rig.manager.stop(lease)
    assert rig.traces(lease) == NOTHING


async def test_recover_after_a_crash_keeps_active_and_cleans_orphans(rig: Rig) -> None:
    kept, ended, half = new_lease(), new_lease(), new_lease()
    await rig.manager.start(rig.spec(kept, GPU_WITH_AUDIO))
    await rig.manager.start(rig.spec(ended, GPU_PLAIN))

    # The worker dies while starting a third lease: its state says "starting", its folder and
    # GPU binding exist, no domain yet.
    rig.network.fail_setup = True
    rig.binder.fail_release_on = {GPU_BEHIND_BRIDGE}
    with pytest.raises(VmStartError):
        await rig.manager.start(rig.spec(half, GPU_BEHIND_BRIDGE))
    rig.network.fail_setup = False
    rig.binder.fail_release_on = set()
    # Strays without any state: a GPU bound by an earlier run and a bridge nobody owns.
    rig.binder.held.add(GPU_SHARED_GROUP)
    rig.network.bridges.add(7)

    manager = rig.new_manager()  # the old object is simply dropped, as a crash would
    report = await manager.recover(active_lease_ids=[kept, half])

    assert report.kept == (kept,)
    assert report.failed == (half,)  # active at the gateway, but its VM never came up
    assert report.removed == (ended,)
    assert report.errors == ()
    assert rig.domain(kept).isActive()
    assert rig.traces(kept) == {"domain": True, "state": True, "dir": True, "rules": True}
    for lease in (ended, half):
        assert rig.traces(lease) == NOTHING
    assert rig.binder.held == {GPU_WITH_AUDIO}
    assert rig.network.bridges == {rig.network.rules[kept].slot}
    status = await manager.status(kept)
    assert status.state == "running"

    # Recovery is idempotent.
    again = await manager.recover(active_lease_ids=[kept])
    assert (again.kept, again.failed, again.removed, again.errors) == ((kept,), (), (), ())


async def test_recover_restarts_a_kept_vm_after_a_host_reboot(rig: Rig) -> None:
    lease = new_lease()
    await rig.manager.start(rig.spec(lease, GPU_PLAIN))
    # A reboot: the domain is shut off, GPU bindings (driverctl --nosave) and network are gone.
    rig.domain(lease).destroy()
    rig.binder.held.clear()
    rig.network.rules.clear()
    rig.network.bridges.clear()

    manager = rig.new_manager()
    assert (await manager.status(lease)).state == "shutoff"
    report = await manager.recover(active_lease_ids=[lease])
    assert report.kept == (lease,)
    assert rig.domain(lease).isActive()
    assert rig.binder.held == {GPU_PLAIN}
    assert lease in rig.network.rules
    assert (await manager.status(lease)).state == "running"


async def test_recover_fails_an_active_lease_whose_domain_vanished(rig: Rig) -> None:
    lease = new_lease()
    await rig.manager.start(rig.spec(lease, GPU_PLAIN))
    rig.domain(lease).destroy()
    rig.domain(lease).undefine()
    report = await rig.new_manager().recover(active_lease_ids=[lease])
    assert report.failed == (lease,)
    assert any("domain is gone" in e for e in report.errors)
    assert rig.traces(lease) == NOTHING
    assert rig.binder.held == set()


async def test_recover_removes_a_domain_without_any_state(rig: Rig) -> None:
    lease = new_lease()
    await rig.manager.start(rig.spec(lease, GPU_PLAIN))
    (rig.state_dir / f"{lease}.json").write_text("{corrupt")
    report = await rig.new_manager().recover(active_lease_ids=[])
    assert report.removed == (lease,)
    assert any("unreadable" in e for e in report.errors)
    assert rig.traces(lease) == NOTHING
    assert rig.binder.held == set()  # released as a stray binding


async def test_stop_refuses_while_a_start_is_in_flight(rig: Rig) -> None:
    rig.binder.slow_s = 0.3
    lease = new_lease()
    start = asyncio.create_task(rig.manager.start(rig.spec(lease, GPU_PLAIN)))
    await asyncio.sleep(0.1)
    with pytest.raises(VmError, match="in progress"):
        await rig.manager.stop(lease)
    await start
    assert await rig.manager.stop(lease)


async def test_a_dropped_libvirt_connection_is_reopened(rig: Rig) -> None:
    assert await rig.manager.free_gpus()
    assert rig.host.opens == 1
    rig.host.drop()  # libvirtd restarted
    assert await rig.manager.free_gpus()
    assert rig.host.opens == 2


async def test_no_libvirt_is_a_clear_error(tmp_path: Path) -> None:
    def refuse(uri: str) -> Any:
        import libvirt

        raise libvirt.libvirtError("Failed to connect socket to '/run/libvirt/libvirt-sock'")

    manager = LeaseVmManager(
        "qemu:///system",
        vm_settings(tmp_path),
        FakeGpuBinder(),
        state_dir=tmp_path / "state",
        network=RecordingNetwork(),
        open_connection=refuse,
    )
    with pytest.raises(VmError, match="cannot connect to libvirt at qemu:///system"):
        await manager.status(new_lease())
