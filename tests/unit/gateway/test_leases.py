"""The lease manager against a real store (SQLite and PostgreSQL) and fake worker links."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from byteleap.core import gateway_protocol as p
from byteleap.core.lease import LeaseRecord, verify_record
from byteleap.gateway.config import LeaseSettings
from byteleap.gateway.keys import LeaseSigner
from byteleap.gateway.leases import LeaseError, LeaseManager
from byteleap.gateway.store import GatewayStore
from tests.support.gateway_fixtures import MINER, Clock

NOW = 1_800_000_000.0
SSH = (
    Ed25519PrivateKey.generate()
    .public_key()
    .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    .decode()
)
CAPACITY = p.Capacity(vcpus=64, memory_mib=1 << 20, disk_gib=4000)
REQUEST = p.LeaseRequest(gpus=1, ssh_public_key=SSH, duration_s=3600)


@dataclass
class Link:
    worker_id: str
    sent: list[p.Message] = field(default_factory=list)
    closed: bool = False

    def send(self, message: p.Message) -> bool:
        if self.closed:
            return False
        self.sent.append(message)
        return True

    def of(self, kind: type[p.Message]) -> list[p.Message]:
        return [m for m in self.sent if isinstance(m, kind)]


def _slot(i: int) -> p.GpuSlot:
    return p.GpuSlot(
        uuid=f"GPU-{i}",
        pci_bus_id=f"0000:{0x41 + i:02x}:00.0",
        name="H100",
        mem_bytes=1,
        state="idle",
    )


def _hello(worker_id: str, leases: list[p.LeaseHealth] | None = None) -> p.Hello:
    return p.Hello(
        worker_id=worker_id,
        agent_version="0.1.0",
        gpus=[_slot(0), _slot(1)],
        capacity=CAPACITY,
        leases=leases or [],
    )


def _enroll(store: GatewayStore, worker_id: str) -> None:
    digest = worker_id.encode()[:32].ljust(32, b"x")
    store.add_token(
        digest, worker_id=worker_id, miner_hotkey=MINER, issued_by="v", now=NOW, expires_at=NOW + 60
    )
    store.enroll(
        digest,
        now=NOW,
        worker_id=worker_id,
        public_key=b"k" * 32,
        serial=worker_id[:8],
        not_before=NOW,
        not_after=NOW + 60,
    )


def _state(setup: Setup, lease_id: str) -> str | None:
    lease = setup.store.lease(lease_id)
    return None if lease is None else lease.state


@dataclass
class Setup:
    store: GatewayStore
    signer: LeaseSigner
    clock: Clock
    manager: LeaseManager
    settings: LeaseSettings

    def fresh(self) -> LeaseManager:
        return LeaseManager(self.store, self.signer, self.settings, clock=self.clock)

    def records(self) -> list[LeaseRecord]:
        key = Ed25519PublicKey.from_public_bytes(self.signer.public_key)
        trusted = {self.signer.gateway_id: key}
        return [verify_record(e.signed, trusted) for e in self.store.feed(0, 1000)]


@pytest.fixture
def setup(store: GatewayStore) -> Setup:
    signer = LeaseSigner(Ed25519PrivateKey.generate())
    settings = LeaseSettings(worker_grace_s=300, checkpoint_s=300, max_active_per_renter=2)
    clock = Clock(NOW)
    for worker_id in ("a" * 32, "b" * 32):
        _enroll(store, worker_id)
    return Setup(store, signer, clock, LeaseManager(store, signer, settings, clock=clock), settings)


async def _running(s: Setup, link: Link) -> str:
    lease = await s.manager.create(
        "alice", p.LeaseRequest(gpus=1, ssh_public_key=SSH, duration_s=3600)
    )
    [start] = link.of(p.StartLease)
    assert isinstance(start, p.StartLease) and start.lease_id == lease.lease_id
    await s.manager.lease_started(
        link, p.LeaseStarted(lease_id=lease.lease_id, ssh_host="h", ssh_port=22, ssh_user="u")
    )
    return lease.lease_id


async def test_a_restarted_gateway_takes_over_and_fails_leases_of_workers_that_stay_away(
    setup: Setup,
) -> None:
    link = Link("a" * 32)
    await setup.manager.worker_online(link, _hello(link.worker_id), MINER)
    lease_id = await _running(setup, link)
    started = setup.clock.now
    setup.clock.now += 100
    # A new process on the same store: the lease is still running, its worker not yet back.
    manager = setup.fresh()
    assert await manager.load() == 1
    setup.clock.now += 299
    await manager.tick()
    assert _state(setup, lease_id) == "running"
    setup.clock.now += 2
    await manager.tick()
    lease = setup.store.lease(lease_id)
    assert lease is not None and (lease.state, lease.end_reason) == ("failed", "worker_lost")
    start, final = setup.records()
    assert final.ended and final.active_until == started == start.active_until


async def test_a_worker_back_after_a_restart_keeps_its_lease(setup: Setup) -> None:
    link = Link("a" * 32)
    await setup.manager.worker_online(link, _hello(link.worker_id), MINER)
    lease_id = await _running(setup, link)
    manager = setup.fresh()
    await manager.load()
    back = Link(link.worker_id)
    setup.clock.now += 60
    health = [p.LeaseHealth(lease_id=lease_id, state="running")]
    await manager.worker_online(back, _hello(back.worker_id, health), MINER)
    setup.clock.now += 600
    await manager.tick()  # checkpoint for the confirmation at reconnect, no failure
    assert _state(setup, lease_id) == "running"
    records = setup.records()
    assert [r.seq for r in records] == [1, 2] and records[1].active_until == NOW + 60


async def test_workers_are_told_to_stop_what_is_not_an_active_lease(setup: Setup) -> None:
    link = Link("a" * 32)
    orphan = "d" * 32
    health = [p.LeaseHealth(lease_id=orphan, state="running")]
    await setup.manager.worker_online(link, _hello(link.worker_id, health), MINER)
    assert link.of(p.StopLease) == [p.StopLease(lease_id=orphan, reason="not an active lease")]
    lease_id = await _running(setup, link)
    intruder = Link("b" * 32)
    await setup.manager.worker_online(intruder, _hello(intruder.worker_id), MINER)
    started = p.LeaseStarted(lease_id=lease_id, ssh_host="evil", ssh_port=22, ssh_user="u")
    await setup.manager.lease_started(intruder, started)
    await setup.manager.lease_failed(intruder, p.LeaseFailed(lease_id=lease_id, reason="x"))
    assert intruder.of(p.StopLease)[-1] == p.StopLease(
        lease_id=lease_id, reason="not an active lease"
    )
    lease = setup.store.lease(lease_id)
    assert lease is not None and lease.state == "running" and lease.ssh_host == "h"


async def test_a_replaced_session_is_ignored(setup: Setup) -> None:
    old, new = Link("a" * 32), Link("a" * 32)
    await setup.manager.worker_online(old, _hello(old.worker_id), MINER)
    lease_id = await _running(setup, old)
    await setup.manager.worker_online(
        new, _hello(new.worker_id, [p.LeaseHealth(lease_id=lease_id, state="running")]), MINER
    )
    await setup.manager.worker_offline(old)  # the old session's handler ends after the new one
    assert setup.manager.online(new.worker_id)
    await setup.manager.heartbeat(old, p.Heartbeat(gpus=[], leases=[]))  # stale: no effect
    assert _state(setup, lease_id) == "running"


async def test_revocation_fails_the_worker_s_leases_with_a_final_record(setup: Setup) -> None:
    link = Link("a" * 32)
    await setup.manager.worker_online(link, _hello(link.worker_id), MINER)
    lease_id = await _running(setup, link)
    setup.clock.now += 30
    await setup.manager.worker_revoked(link.worker_id)
    lease = setup.store.lease(lease_id)
    assert lease is not None and (lease.state, lease.end_reason) == ("failed", "worker_revoked")
    assert setup.records()[-1].ended and setup.records()[-1].active_until == NOW
    assert not setup.manager.online(link.worker_id)


async def test_renters_are_capped_and_pending_leases_wait_for_their_worker(setup: Setup) -> None:
    link = Link("a" * 32)
    await setup.manager.worker_online(link, _hello(link.worker_id), MINER)
    link.closed = True  # the session died but its handler has not noticed yet
    first = await setup.manager.create("alice", REQUEST)
    second = await setup.manager.create("alice", REQUEST)
    assert first.state == second.state == "pending"
    with pytest.raises(LeaseError) as capped:
        await setup.manager.create("alice", REQUEST)
    assert (capped.value.status, capped.value.code) == (409, "too_many_leases")
    await setup.manager.worker_offline(link)
    back = Link(link.worker_id)
    await setup.manager.worker_online(back, _hello(back.worker_id), MINER)
    sent = {m.lease_id for m in back.of(p.StartLease) if isinstance(m, p.StartLease)}
    assert sent == {first.lease_id, second.lease_id}
    assert _state(setup, first.lease_id) == _state(setup, second.lease_id) == "starting"
