"""The worker's gateway link against a real gateway: leases become VMs on libvirt's test driver.

A renter leases through the gateway's REST API; the real worker link starts the VM with the real
LeaseVmManager, the gateway signs the records; stops, failures, restarts, stale certificates and
in-session renewal are followed end to end.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from byteleap.core.channel import CloseCode
from byteleap.core.lease import verify_record
from byteleap.gateway.ca import GatewayCA, load_csr
from byteleap.gateway.config import LeaseSettings
from byteleap.worker.gateway_enroll import GatewayEnrollment
from byteleap.worker.gateway_link import BOOK_FILE, GatewayState
from byteleap.worker.vm.config import VmSettings
from byteleap.worker.vm.disks import GIB
from byteleap.worker.vm.domain import domain_name
from tests.integration.gateway.conftest import SSH_KEY
from tests.support.libvirt_fixtures import (
    GPU_PLAIN,
    GPU_SHARED_GROUP,
    GPU_WITH_AUDIO,
    virtual_size,
    vm_settings,
)

from .gateway_rig import (
    NVML_NAME,
    NVML_UUID,
    SSH_HOST,
    GatewaySide,
    WorkerSide,
    certificate_serial,
    eventually,
    inventory_with,
    make_csr,
    private_pem,
    running_gateway,
    worker_side,
)

PLAIN = f"PCI-{GPU_PLAIN}"  # known to libvirt only


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[GatewaySide]:
    async with running_gateway(tmp_path / "gateway") as side:
        yield side


@pytest.fixture
async def worker(tmp_path: Path) -> AsyncIterator[WorkerSide]:
    side = worker_side(tmp_path)
    try:
        yield side
    finally:
        await side.stop()
        side.runner.close()
        side.host.drop()


async def online(gateway: GatewaySide, worker: WorkerSide) -> None:
    await eventually(lambda: gateway.gateway.leases.online(worker.key.worker_id))


def records(gateway: GatewaySide) -> list[dict[str, object]]:
    """The gateway's feed, every record verified with its signing key."""
    signer = gateway.gateway.signer
    trusted = {signer.gateway_id: Ed25519PublicKey.from_public_bytes(signer.public_key)}
    entries = gateway.gateway.store.feed(0, 1000)
    return [
        {"lease_id": r.lease_id, "ended": r.ended, "devices": r.device_uuids}
        for r in (verify_record(entry.signed, trusted) for entry in entries)
    ]


async def test_a_lease_runs_as_a_vm_and_ends_with_it(
    gateway: GatewaySide, worker: WorkerSide
) -> None:
    worker.start(gateway)
    await online(gateway, worker)
    assert worker.enroll_calls == 1
    [listed] = await gateway.gpus()
    states = {g["uuid"]: g["state"] for g in listed["gpus"]}
    # NVML's uuid for the GPU on its host driver, a PCI-derived one for the others; a GPU whose
    # IOMMU group holds a NIC of the host is never offered.
    assert states == {
        NVML_UUID: "idle",
        "PCI-0000:81:00.0": "idle",
        PLAIN: "idle",
        f"PCI-{GPU_SHARED_GROUP}": "unavailable",
    }
    assert {g["name"] for g in listed["gpus"] if g["uuid"] == NVML_UUID} == {NVML_NAME}

    lease = await gateway.lease(worker.key.worker_id)
    view = await gateway.wait_state(lease["lease_id"], "running")
    assert view["device_uuids"] == [NVML_UUID]
    assert view["ssh"] == {"host": SSH_HOST, "port": 42200, "user": "renter"}
    assert domain_name(lease["lease_id"]) in worker.domains()
    held = worker.link.held_leases() if worker.link else {}
    assert held[lease["lease_id"]].phase == "running"
    # auto mode: the GPU left challenge duty before it was bound (the binder checks it)
    assert worker.binder.held == {GPU_WITH_AUDIO}
    assert worker.runner.leased_devices == {NVML_UUID}
    [started] = records(gateway)
    assert started == {"lease_id": lease["lease_id"], "ended": False, "devices": [NVML_UUID]}

    # heartbeats confirm the VM: a checkpoint is due and written
    gateway.clock.advance(301)
    await eventually(lambda: worker.link is not None and worker.link.status.state == "connected")
    confirmed_before = gateway.gateway.leases._active[lease["lease_id"]].confirmed_at
    await eventually(
        lambda: gateway.gateway.leases._active[lease["lease_id"]].confirmed_at != confirmed_before
    )
    await gateway.gateway.leases.tick()
    assert len(records(gateway)) == 2

    status, _ = await gateway.call("DELETE", f"/v1/leases/{lease['lease_id']}")
    assert status == 200
    await eventually(lambda: domain_name(lease["lease_id"]) not in worker.domains())
    await eventually(lambda: worker.link is not None and not worker.link.held_leases())
    assert worker.runner.leased_devices == frozenset()
    assert not worker.network.rules and not worker.binder.held
    assert records(gateway)[-1]["ended"] is True


async def test_a_vm_that_cannot_start_fails_the_lease_with_the_reason(
    gateway: GatewaySide, worker: WorkerSide
) -> None:
    worker.binder.fail_on = {GPU_PLAIN, GPU_WITH_AUDIO, "0000:81:00.0"}
    worker.start(gateway)
    await online(gateway, worker)
    lease = await gateway.lease(worker.key.worker_id)
    view = await gateway.wait_state(lease["lease_id"], "failed")
    assert view["end_reason"] == "start_failed"
    assert "injected failure" in view["message"]
    assert worker.domains() == []
    assert worker.link is not None and not worker.link.held_leases()
    assert worker.runner.leased_devices == frozenset()
    assert records(gateway) == []  # a lease that never ran has no records


async def test_a_restarted_worker_keeps_its_running_lease(
    gateway: GatewaySide, worker: WorkerSide
) -> None:
    worker.start(gateway)
    await online(gateway, worker)
    lease = await gateway.lease(worker.key.worker_id)
    await gateway.wait_state(lease["lease_id"], "running")
    await worker.crash()
    assert domain_name(lease["lease_id"]) in worker.domains()

    worker.start(gateway)
    await online(gateway, worker)
    await eventually(lambda: worker.link is not None and worker.link.held_leases())
    assert worker.enroll_calls == 1  # the stored certificate is used again
    held = worker.link.held_leases() if worker.link else {}
    assert held[lease["lease_id"]].phase == "running"
    confirmed = gateway.gateway.leases._active[lease["lease_id"]].confirmed_at
    gateway.clock.advance(1)  # heartbeats confirm the VM again on the gateway's clock
    await eventually(
        lambda: gateway.gateway.leases._active[lease["lease_id"]].confirmed_at != confirmed
    )
    assert (await gateway.view(lease["lease_id"]))["state"] == "running"
    assert worker.domains() == [domain_name(lease["lease_id"])]


async def test_vms_the_gateway_does_not_know_are_stopped(
    gateway: GatewaySide, worker: WorkerSide
) -> None:
    worker.start(gateway)
    await online(gateway, worker)
    lease = await gateway.lease(worker.key.worker_id)
    await gateway.wait_state(lease["lease_id"], "running")
    await worker.crash()
    # Meanwhile the gateway ended the lease (its StopLease went nowhere).
    status, _ = await gateway.call("DELETE", f"/v1/leases/{lease['lease_id']}")
    assert status == 200

    worker.start(gateway)
    await online(gateway, worker)
    await eventually(lambda: worker.domains() == [])
    await eventually(lambda: worker.link is not None and not worker.link.held_leases())
    assert not worker.network.rules and not worker.binder.held


async def test_a_lease_the_vm_did_not_survive_is_failed_at_reconnect(
    gateway: GatewaySide, worker: WorkerSide
) -> None:
    worker.start(gateway)
    await online(gateway, worker)
    lease = await gateway.lease(worker.key.worker_id)
    await gateway.wait_state(lease["lease_id"], "running")
    await worker.crash()
    domain = worker.host.conn.lookupByName(domain_name(lease["lease_id"]))
    domain.destroy()  # someone removed the VM behind the worker's back
    domain.undefine()

    worker.start(gateway)
    view = await gateway.wait_state(lease["lease_id"], "failed")
    assert view["end_reason"] == "worker_lost_lease"
    await eventually(lambda: worker.link is not None and not worker.link.held_leases())


def store_enrollment(worker: WorkerSide, ca: GatewayCA, gateway: GatewaySide) -> str:
    """Leave an enrollment issued by ``ca`` (never recorded by the gateway) in the worker's
    state directory, as if from an earlier life; returns its serial."""
    tls_key = ec.generate_private_key(ec.SECP256R1())
    csr_pem, _ = make_csr(tls_key, worker.key.worker_id)
    issued = ca.issue_worker_cert(load_csr(csr_pem), worker.key.worker_id, 30)
    GatewayEnrollment.create(
        worker.state_dir,
        worker_id=worker.key.worker_id,
        key_pem=private_pem(tls_key),
        cert_pem=issued.pem,
        ca_pem=ca.cert_pem,
        gateway_id=gateway.gateway.signer.gateway_id,
        ws_url=gateway.gateway.config.ws_url,
        enrolled_at=time.time(),
    )
    return issued.serial_hex


async def test_a_gateway_with_a_new_ca_leads_to_a_new_enrollment(
    gateway: GatewaySide, worker: WorkerSide
) -> None:
    # The worker holds the CA the gateway had before it was re-created, and a certificate from
    # it: the gateway's server certificate no longer chains to what the worker pins.
    store_enrollment(worker, GatewayCA.create(), gateway)
    worker.start(gateway)
    await online(gateway, worker)
    assert worker.enroll_calls == 1
    refusals = [s for s in worker.statuses if s.state is GatewayState.WAITING]
    assert refusals and "pinned CA" in (refusals[0].reason or "")
    assert certificate_serial(worker.state_dir) == (
        gateway.gateway.hub.sessions[worker.key.worker_id].serial
    )


async def test_a_refused_certificate_leads_to_a_new_enrollment(
    gateway: GatewaySide, worker: WorkerSide
) -> None:
    # A certificate of the right CA the gateway never recorded (or lost): HTTP 403.
    stale = store_enrollment(worker, gateway.gateway.ca, gateway)
    worker.start(gateway)
    await online(gateway, worker)
    assert worker.enroll_calls == 1
    refusals = [s for s in worker.statuses if s.state is GatewayState.WAITING]
    assert refusals and "HTTP 403" in (refusals[0].reason or "")
    assert certificate_serial(worker.state_dir) != stale


async def test_the_certificate_is_renewed_in_the_session(
    gateway: GatewaySide, worker: WorkerSide
) -> None:
    worker.wall = lambda: time.time() + 25 * 86400  # a third of the 30 days is left
    worker.start(gateway)
    await online(gateway, worker)
    session = gateway.gateway.hub.sessions[worker.key.worker_id]
    first_serial = session.serial
    await eventually(lambda: certificate_serial(worker.state_dir) != first_serial)
    assert gateway.gateway.hub.sessions[worker.key.worker_id] is session  # still the same one
    assert worker.enroll_calls == 1
    renewed_serial = certificate_serial(worker.state_dir)

    # The next session opens with the renewed certificate.
    session.close(CloseCode.GOING_AWAY, "test")
    await eventually(
        lambda: (
            (s := gateway.gateway.hub.sessions.get(worker.key.worker_id)) is not None
            and s is not session
        )
    )
    assert gateway.gateway.hub.sessions[worker.key.worker_id].serial == renewed_serial


async def test_a_lease_past_its_end_is_stopped_when_the_gateway_is_gone(
    tmp_path: Path, worker: WorkerSide
) -> None:
    async with running_gateway(tmp_path / "gateway") as gateway:
        worker.start(gateway, expiry_grace_s=5)
        await online(gateway, worker)
        lease = await gateway.lease(worker.key.worker_id, duration_s=60)
        await gateway.wait_state(lease["lease_id"], "running")
    # The gateway is down; the lease's end passes.
    worker.wall = lambda: time.time() + 70
    # The domain goes first; the lease is forgotten once its disks, network and GPUs are freed.
    link = worker.link
    assert link is not None
    await eventually(lambda: worker.domains() == [] and not link.held_leases())
    assert not (worker.state_dir / BOOK_FILE).read_text().count(lease["lease_id"])


async def test_gpu_identity_survives_the_move_to_vfio(
    gateway: GatewaySide, worker: WorkerSide
) -> None:
    worker.start(gateway)
    await online(gateway, worker)
    await worker.stop()
    # Restarted with the GPU on vfio-pci: NVML does not see it, sysfs names it by address.
    worker.inventory = inventory_with(vfio=True)
    worker.start(gateway)
    await online(gateway, worker)
    await eventually(lambda: gateway.gateway.leases._workers[worker.key.worker_id].gpus is not None)
    [listed] = await gateway.gpus()
    uuids = {g["uuid"] for g in listed["gpus"]}
    assert NVML_UUID in uuids and f"PCI-{GPU_WITH_AUDIO}" not in uuids


def defaults(struct: type, *names: str) -> dict[str, Any]:
    """The default values of these fields of a settings struct."""
    by_name = {f.name: f.default for f in msgspec.structs.fields(struct)}
    return {name: by_name[name] for name in names}


async def test_a_two_gpu_lease_starts_with_default_vm_sizes(tmp_path: Path) -> None:
    # The gateway asks N x its per-GPU sizes (a 400 GiB disk here); the worker's VM gets them.
    gateway_sizes = defaults(
        LeaseSettings, "vcpus_per_gpu", "memory_mib_per_gpu", "disk_gib_per_gpu"
    )
    worker = worker_side(tmp_path)
    worker.settings = vm_settings(
        tmp_path, **defaults(VmSettings, "vcpus_per_gpu", "memory_mib_per_gpu", "max_disk_gib")
    )
    try:
        async with running_gateway(tmp_path / "gateway", **gateway_sizes) as gateway:
            worker.start(gateway)
            await online(gateway, worker)
            body = {
                "gpus": 2,
                "worker_id": worker.key.worker_id,
                "ssh_public_key": SSH_KEY,
                "duration_s": 3600,
            }
            status, lease = await gateway.call("POST", "/v1/leases", body=body)
            assert status == 201, lease
            lease_id = lease["lease_id"]
            view = await gateway.wait_state(lease_id, "running", "failed")
            assert view["state"] == "running", view
            assert len(view["device_uuids"]) == 2
            disk = Path(worker.settings.vm_dir) / lease_id / "disk.qcow2"
            assert virtual_size(disk) == 2 * gateway_sizes["disk_gib_per_gpu"] * GIB
            _state, memory_kib, _now, vcpus, _cpu = worker.host.conn.lookupByName(
                domain_name(lease_id)
            ).info()
            assert vcpus == 2 * gateway_sizes["vcpus_per_gpu"]
            assert memory_kib == 2 * gateway_sizes["memory_mib_per_gpu"] * 1024
    finally:
        await worker.stop()
        worker.runner.close()
        worker.host.drop()
