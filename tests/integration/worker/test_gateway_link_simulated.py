"""The simulated GPU host the devnet gives its workers (``vm.domain_type: test``): libvirt's test
driver serves its GPUs, binding and networking only keep books, and a lease still goes through
the real LeaseVmManager (disk overlay, seed ISO, domain) and the real gateway link."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from byteleap.core.identity import WorkerKey
from byteleap.worker.agent import build_lease_vms
from byteleap.worker.challenges import ChallengeRunner
from byteleap.worker.config import WorkerConfig
from byteleap.worker.gateway_enroll import GatewayEnrollment, enroll
from byteleap.worker.gateway_link import GatewayLink, GatewayLinkSettings
from byteleap.worker.vm.domain import PciAddress
from byteleap.worker.vm.manager import LeaseVmManager, LeaseVmSpec
from byteleap.worker.vm.simulated import (
    SimulatedGpuBinder,
    SimulatedNetwork,
    simulated_gpu_addresses,
    simulated_host_xml,
)
from tests.support.libvirt_fixtures import ed25519_key, make_base_image

from .gateway_rig import eventually, running_gateway


def worker_config(tmp_path: Path, gpus: int = 3) -> WorkerConfig:
    node = tmp_path / "node.xml"
    node.write_text(simulated_host_xml(gpus))
    base = tmp_path / "base.qcow2"
    return msgspec.convert(
        {
            "state_dir": str(tmp_path / "worker"),
            "gpu": {"mode": "auto"},
            "vm": {
                "libvirt_uri": f"test://{node}",
                "domain_type": "test",
                "vm_dir": str(tmp_path / "vms"),
                "base_image": str(base),
                "base_image_sha256": make_base_image(base),
                "max_disk_gib": 3,
                "vcpus_per_gpu": 4,
                "memory_mib_per_gpu": 1024,
                "firmware": "bios",
                "shutdown_timeout_s": 1.0,
            },
            "gateway": {"enabled": True, "ssh_host": "127.0.0.1"},
        },
        WorkerConfig,
    )


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[LeaseVmManager]:
    vms = build_lease_vms(worker_config(tmp_path), tmp_path / "worker")
    try:
        yield vms
    finally:
        await vms.close()


def test_the_simulated_host_has_the_gpus_asked_for() -> None:
    assert simulated_gpu_addresses(3) == ["0000:41:00.0", "0000:42:00.0", "0000:43:00.0"]
    with pytest.raises(ValueError, match="1 to 32"):
        simulated_host_xml(0)


async def test_a_simulated_host_leases_every_gpu_without_root(manager: LeaseVmManager) -> None:
    assert isinstance(manager.binder, SimulatedGpuBinder)
    assert isinstance(manager.network, SimulatedNetwork)
    gpus = await manager.host_gpus()
    assert [g.address for g in gpus] == simulated_gpu_addresses(3)
    assert all(g.vendor_id == 0x10DE and g.problem is None for g in gpus)

    lease = secrets.token_hex(16)
    info = await manager.start(
        LeaseVmSpec(
            lease_id=lease, gpus=(gpus[1].address,), ssh_public_key=ed25519_key(), disk_gib=1
        )
    )
    assert info.hostdevs == (gpus[1].address,) and info.ssh_port == 42200
    assert manager.binder.bound() == {PciAddress.parse(gpus[1].address)}
    assert manager.network.inventory().rule_lease_ids == {lease}
    assert (await manager.status(lease)).state == "running"
    assert await manager.stop(lease)
    assert manager.binder.bound() == frozenset()
    assert manager.network.inventory().rule_lease_ids == frozenset()


async def test_a_devnet_worker_rents_out_a_simulated_gpu(tmp_path: Path) -> None:
    cfg = worker_config(tmp_path, gpus=2)
    assert cfg.vm is not None
    state_dir = tmp_path / "worker"
    vms = build_lease_vms(cfg, state_dir)
    key = WorkerKey.generate()
    runner = ChallengeRunner(key.worker_id, [], max_n=1024, result_ttl_s=60)
    async with running_gateway(tmp_path / "gateway") as gateway:
        link = GatewayLink(
            GatewayLinkSettings(
                ssh_host="127.0.0.1", reconnect_initial_s=0.05, reconnect_max_s=0.2
            ),
            key=key,
            vm=cfg.vm,
            vms=vms,
            duty=runner,
            state_dir=state_dir,
            load_enrollment=lambda: GatewayEnrollment.load(state_dir, worker_id=key.worker_id),
            enroll=lambda: enroll(state_dir, key, lambda: gateway.grant(key)),
        )
        task = asyncio.create_task(link.run())
        try:
            await eventually(lambda: gateway.gateway.leases.online(key.worker_id))
            [listed] = await gateway.gpus()
            assert [g["uuid"] for g in listed["gpus"]] == [
                f"PCI-{a}" for a in simulated_gpu_addresses(2)
            ]
            lease = await gateway.lease(key.worker_id)
            view = await gateway.wait_state(lease["lease_id"], "running")
            assert view["ssh"] == {"host": "127.0.0.1", "port": 42200, "user": "renter"}
            status, _ = await gateway.call("DELETE", f"/v1/leases/{lease['lease_id']}")
            assert status == 200
            await eventually(lambda: not link.held_leases())
            assert vms.binder.bound() == frozenset()
        finally:
            await link.stop()
            await task
            await vms.close()
            runner.close()
