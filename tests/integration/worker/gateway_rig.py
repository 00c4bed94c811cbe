"""A worker's gateway link against a real in-process gateway, with leased VMs on libvirt's
test driver (a fake GPU host), for tests/integration/worker/test_gateway_link*.py.

The gateway is the daemon's own :class:`~byteleap.gateway.agent.Gateway` (both TLS listeners, a
SQLite store, a clock the test moves); the worker side is the real
:class:`~byteleap.worker.gateway_link.GatewayLink` driving a real
:class:`~byteleap.worker.vm.manager.LeaseVmManager` and a real
:class:`~byteleap.worker.challenges.ChallengeRunner`. Only GPU binding and the host network are
recording fakes (they need root), and the binder checks that a GPU left challenge duty before it
is bound. Enrollment is the worker's own (:mod:`byteleap.worker.gateway_enroll`) with the grant
taken straight from the gateway's API (the relay through miner and validator has its own tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from byteleap.core import wire
from byteleap.core.challenge.prover import NumpyBackend
from byteleap.core.identity import WorkerKey
from byteleap.gateway.config import LeaseSettings
from byteleap.worker import gateway_enroll
from byteleap.worker.challenges import ChallengeRunner, Device
from byteleap.worker.gateway_enroll import CERT_FILE, GATEWAY_DIR, GatewayEnrollment
from byteleap.worker.gateway_link import GatewayLink, GatewayLinkSettings, GatewayStatus
from byteleap.worker.vm.config import VmSettings
from byteleap.worker.vm.domain import PciAddress
from byteleap.worker.vm.manager import LeaseVmManager
from tests.support.gateway_fixtures import SSH_KEY, RunningGateway
from tests.support.gateway_fixtures import make_csr as make_csr
from tests.support.gateway_fixtures import running_gateway as start_gateway
from tests.support.libvirt_fixtures import (
    GPU_WITH_AUDIO,
    FakeGpuBinder,
    LibvirtHost,
    RecordingNetwork,
    vm_settings,
    write_node_fixture,
)

WAIT = 15.0
SSH_HOST = "203.0.113.9"
# NVML sees one GPU on its host driver (the one a lease gets first: the gateway picks by PCI
# address); the others are on vfio-pci or unknown to it.
NVML_ADDRESS = GPU_WITH_AUDIO
NVML_UUID = "GPU-8f1c0a52-7d3e-4b6a-9e21-3c5d7f9a1b2e"
NVML_NAME = "NVIDIA H100 80GB HBM3"


def inventory_with(nvml_address: str = NVML_ADDRESS, vfio: bool = False) -> wire.Inventory:
    """An inventory where NVML names the GPU at ``nvml_address`` (or sysfs lists it on vfio)."""
    uuid = f"PCI-{nvml_address}" if vfio else NVML_UUID
    return wire.Inventory(
        cpu_model="test cpu",
        cpu_cores=32,
        mem_bytes=128 << 30,
        gpus=[
            wire.GpuInfo(
                uuid=uuid,
                name=NVML_NAME,
                mem_bytes=0 if vfio else 80 << 30,
                pci_bus_id=nvml_address,
                vfio_bound=vfio,
            )
        ],
    )


# --------------------------------------------------------------------------------------------
# Certificates


def certificate_serial(state_dir: Path) -> str:
    """The serial (hex, as the gateway stores it) of the worker's stored certificate."""
    pem = (state_dir / GATEWAY_DIR / CERT_FILE).read_bytes()
    return f"{x509.load_pem_x509_certificate(pem).serial_number:x}"


def private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# --------------------------------------------------------------------------------------------
# The gateway


@dataclass
class GatewaySide(RunningGateway):
    @property
    def renter_key(self) -> str:
        return self.renters["alice"]

    async def call(
        self, method: str, path: str, key: str | None = None, body: Any = None
    ) -> tuple[int, Any]:
        """As the renter unless ``key`` names another credential."""
        return await super().call(method, path, self.renter_key if key is None else key, body)

    async def grant(self, key: WorkerKey) -> wire.GatewayEnrollGrant:
        """What the relay brings the worker: a token from the validator's gateway call."""
        token = await self.enrollment_token(key.worker_id)
        return wire.GatewayEnrollGrant(
            worker_id=key.worker_id, grant=msgspec.convert(token, wire.GatewayGrant)
        )

    async def lease(self, worker_id: str, duration_s: float = 3600) -> Any:
        body = {
            "gpus": 1,
            "worker_id": worker_id,
            "ssh_public_key": SSH_KEY,
            "duration_s": duration_s,
        }
        status, lease = await self.call("POST", "/v1/leases", body=body)
        assert status == 201, lease
        return lease

    async def view(self, lease_id: str) -> Any:
        status, view = await self.call("GET", f"/v1/leases/{lease_id}")
        assert status == 200, view
        return view

    async def wait_state(self, lease_id: str, *states: str, within: float = WAIT) -> Any:
        deadline = time.monotonic() + within
        while True:
            view = await self.view(lease_id)
            if view["state"] in states:
                return view
            if time.monotonic() > deadline:
                raise AssertionError(f"lease {lease_id} stayed {view['state']}: {view}")
            await asyncio.sleep(0.02)

    async def gpus(self) -> Any:
        status, listed = await self.call("GET", "/v1/gpus")
        assert status == 200, listed
        return listed["workers"]


def running_gateway(
    state: Path, **lease_settings: Any
) -> contextlib.AbstractAsyncContextManager[GatewaySide]:
    """A gateway with small VM sizes per GPU and a fast heartbeat (``lease_settings``
    override the :class:`LeaseSettings`)."""
    values: dict[str, Any] = {
        "checkpoint_s": 300,
        "worker_grace_s": 300,
        "start_timeout_s": 900,
        "vcpus_per_gpu": 4,
        "memory_mib_per_gpu": 1024,
        "disk_gib_per_gpu": 1,
    }
    values.update(lease_settings)
    return start_gateway(
        GatewaySide, state, heartbeat_interval_s=0.3, leases=LeaseSettings(**values)
    )


# --------------------------------------------------------------------------------------------
# The worker


@dataclass
class DutyCheckingBinder(FakeGpuBinder):
    """Refuses to bind a GPU that is still on challenge duty (auto mode's promise)."""

    runner: ChallengeRunner | None = None
    uuid_of: dict[str, str] = field(default_factory=dict)

    def bind(self, address: PciAddress) -> None:
        uuid = self.uuid_of.get(str(address))
        if self.runner is not None and uuid is not None:
            assert uuid in self.runner.leased_devices, f"{uuid} bound while on challenge duty"
        super().bind(address)


@dataclass
class WorkerSide:
    tmp: Path
    key: WorkerKey
    host: LibvirtHost
    binder: DutyCheckingBinder
    network: RecordingNetwork
    settings: VmSettings
    runner: ChallengeRunner
    inventory: wire.Inventory
    wall: Callable[[], float] = time.time
    statuses: list[GatewayStatus] = field(default_factory=list)
    enroll_calls: int = 0
    link: GatewayLink | None = None
    manager: LeaseVmManager | None = None
    task: asyncio.Task[None] | None = None

    @property
    def state_dir(self) -> Path:
        return self.tmp / "worker"

    def new_link(self, gateway: GatewaySide, **overrides: Any) -> GatewayLink:
        self.manager = LeaseVmManager(
            self.host.uri,
            self.settings,
            self.binder,
            state_dir=self.state_dir / "leases",
            network=self.network,
            open_connection=self.host.open,
        )

        async def enroll() -> GatewayEnrollment:
            self.enroll_calls += 1
            return await gateway_enroll.enroll(
                self.state_dir, self.key, lambda: gateway.grant(self.key)
            )

        values: dict[str, Any] = {
            "ssh_host": SSH_HOST,
            "reconnect_initial_s": 0.05,
            "reconnect_max_s": 0.2,
            "maintenance_s": 0.1,
            "renewal_check_s": 0.1,
        }
        values.update(overrides)
        self.link = GatewayLink(
            GatewayLinkSettings(**values),
            key=self.key,
            vm=self.settings,
            vms=self.manager,
            duty=self.runner,
            state_dir=self.state_dir,
            load_enrollment=lambda: GatewayEnrollment.load(
                self.state_dir, worker_id=self.key.worker_id
            ),
            enroll=enroll,
            collect_inventory=lambda: self.inventory,
            on_status=self.statuses.append,
            wall_clock=lambda: self.wall(),
        )
        return self.link

    def start(self, gateway: GatewaySide, **overrides: Any) -> GatewayLink:
        link = self.new_link(gateway, **overrides)
        self.task = asyncio.create_task(link.run())
        return link

    async def stop(self) -> None:
        if self.link is not None:
            await self.link.stop()
        if self.task is not None:
            await self.task
            self.task = None
        # The manager's libvirt connection is the test host's (it outlives the worker).

    async def crash(self) -> None:
        """The worker process dies: no goodbye, libvirt and the files stay."""
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        self.task = None

    def domains(self) -> list[str]:
        return self.host.domain_names()


def worker_side(tmp: Path, inventory: wire.Inventory | None = None) -> WorkerSide:
    host = LibvirtHost(write_node_fixture(tmp / "node.xml"))
    runner = ChallengeRunner(
        "0" * 32,
        [
            Device(uuid="cpu-0", backend=NumpyBackend(), precisions=frozenset({"fp32"})),
            Device(uuid=NVML_UUID, backend=NumpyBackend(), precisions=frozenset({"fp32"})),
        ],
        max_n=1024,
        result_ttl_s=60,
    )
    binder = DutyCheckingBinder(runner=runner, uuid_of={NVML_ADDRESS: NVML_UUID})
    return WorkerSide(
        tmp=tmp,
        key=WorkerKey.generate(),
        host=host,
        binder=binder,
        network=RecordingNetwork(),
        settings=vm_settings(tmp),
        runner=runner,
        inventory=inventory if inventory is not None else inventory_with(),
    )


async def eventually(check: Callable[[], Any], within: float = WAIT) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)
