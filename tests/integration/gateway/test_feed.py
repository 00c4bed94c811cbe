"""The signed lease feed: what validators read and score (core/lease.py semantics).

Every test here runs on SQLite and on PostgreSQL. Time moves only with ``gw.clock``; the lease
clock's work is done by calling ``tick()``.
"""

from __future__ import annotations

import asyncio

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from byteleap.core import gateway_protocol as p
from byteleap.core.lease import LeaseRecordError, SignedLeaseRecord, verify_record

from .conftest import MINER, Gw
from .worker_double import WorkerConnection, gpu

pytestmark = pytest.mark.parametrize("store_backend", ["sqlite", "postgresql"], indirect=True)


async def _running(gw: Gw, conn: WorkerConnection) -> str:
    status, lease = await gw.lease(worker_id=conn.worker.worker_id)
    assert status == 201, lease
    start = await conn.expect(p.StartLease)
    await conn.send(
        p.LeaseStarted(lease_id=start.lease_id, ssh_host="10.0.0.2", ssh_port=22, ssh_user="ubuntu")
    )
    await _until(lambda: _state(gw, start.lease_id) == "running")
    return start.lease_id


def _state(gw: Gw, lease_id: str) -> str | None:
    lease = gw.gateway.store.lease(lease_id)
    return None if lease is None else lease.state


async def _until(check: object, within: float = 10.0) -> None:
    assert callable(check)
    for _ in range(int(within / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def _beat(conn: WorkerConnection, *lease_ids: str) -> None:
    await conn.send(
        p.Heartbeat(
            gpus=[gpu(0), gpu(1)],
            leases=[p.LeaseHealth(lease_id=x, state="running") for x in lease_ids],
        )
    )


async def test_start_checkpoint_and_end_records_verify_and_are_gap_free(gw: Gw) -> None:
    worker, conn = await gw.online()
    lease_id = await _running(gw, conn)
    started = gw.clock()
    [first] = await gw.records()
    assert (first.seq, first.lease_id, first.worker_id) == (1, lease_id, worker.worker_id)
    assert first.miner_hotkey == MINER and first.device_uuids == [gpu(0).uuid]
    assert first.start == first.active_until == started and not first.ended

    # No confirmation since the start record: a checkpoint would say nothing new.
    gw.clock.advance(400)
    await gw.gateway.leases.tick()
    assert len(await gw.records()) == 1
    await _beat(conn, lease_id)
    confirmed = gw.clock()
    await _until(lambda: gw.gateway.leases._active[lease_id].confirmed_at == confirmed)
    gw.clock.advance(100)  # the checkpoint comes at the next tick, credit only to the heartbeat
    await gw.gateway.leases.tick()
    records = await gw.records()
    assert [r.seq for r in records] == [1, 2]
    assert records[1].active_until == confirmed and not records[1].ended
    # Within checkpoint_s of the last record nothing more is written, even with news.
    await _beat(conn, lease_id)
    await asyncio.sleep(0.05)
    gw.clock.advance(10)
    await gw.gateway.leases.tick()
    assert len(await gw.records()) == 2

    last_beat = gw.clock() - 10
    status, _ = await gw.call("DELETE", f"/v1/leases/{lease_id}", gw.renters["alice"])
    assert status == 200
    records = await gw.records()
    assert [r.seq for r in records] == [1, 2, 3]
    final = records[2]
    assert final.ended and final.start == started
    assert final.active_until == pytest.approx(last_beat)  # never past the last confirmation
    assert final.issued_at >= final.active_until

    # Paging: after=N returns the rest, next_after names the last seq returned.
    page = await gw.feed(after=1)
    assert [r.signature for r in page.records] == [
        r.signature for r in (await gw.feed()).records[1:]
    ]
    assert page.next_after == 3 and page.gateway_id == gw.gateway.signer.gateway_id
    empty = await gw.feed(after=3)
    assert empty.records == [] and empty.next_after == 3


async def test_checkpoints_only_for_leases_their_worker_confirmed(gw: Gw) -> None:
    _, chatty = await gw.online("a", gpus=[gpu(0, worker=1)])
    _, quiet = await gw.online("b", gpus=[gpu(0, worker=2)])
    first = await _running(gw, chatty)
    second = await _running(gw, quiet)
    gw.clock.advance(300)
    await _beat(chatty, first)
    await _until(lambda: gw.gateway.leases._active[first].confirmed_at == gw.clock())
    await gw.gateway.leases.tick()
    records = await gw.records()
    assert [(r.lease_id, r.seq) for r in records] == [(first, 1), (second, 2), (first, 3)]


async def test_a_lost_worker_ends_its_leases_after_the_grace_period(gw: Gw) -> None:
    worker, conn = await gw.online()
    lease_id = await _running(gw, conn)
    gw.clock.advance(30)
    await _beat(conn, lease_id)
    confirmed = gw.clock()
    await _until(lambda: gw.gateway.leases._active[lease_id].confirmed_at == confirmed)
    await conn.close()
    await _until(lambda: not gw.gateway.leases.online(worker.worker_id))
    gw.clock.advance(299)
    await gw.gateway.leases.tick()
    assert _state(gw, lease_id) == "running"  # still within the grace period
    gw.clock.advance(2)
    await gw.gateway.leases.tick()
    lease = gw.gateway.store.lease(lease_id)
    assert lease is not None and (lease.state, lease.end_reason) == ("failed", "worker_lost")
    final = (await gw.records())[-1]
    assert final.ended and final.active_until == confirmed


async def test_a_worker_back_within_grace_keeps_its_lease_and_one_that_lost_it_fails(
    gw: Gw,
) -> None:
    worker, conn = await gw.online()
    lease_id = await _running(gw, conn)
    await conn.close()
    await _until(lambda: not gw.gateway.leases.online(worker.worker_id))
    gw.clock.advance(200)
    again = await worker.connect()
    gw.connections.append(again)
    await again.hello(leases=[p.LeaseHealth(lease_id=lease_id, state="running")])
    gw.clock.advance(200)
    await gw.gateway.leases.tick()
    assert _state(gw, lease_id) == "running"
    await again.close()
    await _until(lambda: not gw.gateway.leases.online(worker.worker_id))
    third = await worker.connect()  # came back without the VM (a reboot): the lease failed
    gw.connections.append(third)
    await third.hello(leases=[])
    await _until(lambda: _state(gw, lease_id) == "failed")
    assert gw.gateway.store.lease(lease_id).end_reason == "worker_lost_lease"  # type: ignore[union-attr]
    assert (await gw.records())[-1].ended


async def test_expiry_ends_the_lease_at_ends_at(gw: Gw) -> None:
    _, conn = await gw.online()
    status, lease = await gw.lease(duration_s=120)
    assert status == 201
    start = await conn.expect(p.StartLease)
    await conn.send(
        p.LeaseStarted(lease_id=start.lease_id, ssh_host="10.0.0.2", ssh_port=22, ssh_user="u")
    )
    await _until(lambda: _state(gw, start.lease_id) == "running")
    gw.clock.advance(100)
    await _beat(conn, start.lease_id)
    await _until(lambda: gw.gateway.leases._active[start.lease_id].confirmed_at == gw.clock())
    gw.clock.advance(50)
    await gw.gateway.leases.tick()
    stop = await conn.expect(p.StopLease)
    assert stop.lease_id == start.lease_id and stop.reason == "expired"
    stored = gw.gateway.store.lease(start.lease_id)
    assert stored is not None and (stored.state, stored.end_reason) == ("ended", "expired")
    final = (await gw.records())[-1]
    assert final.ended and final.active_until <= lease["ends_at"]


async def test_leases_that_never_ran_leave_no_records(gw: Gw) -> None:
    _, conn = await gw.online(gpus=[gpu(0), gpu(1)])
    status, first = await gw.lease()
    assert status == 201
    start = await conn.expect(p.StartLease)
    await conn.send(p.LeaseFailed(lease_id=start.lease_id, reason="no vfio device"))
    cleanup = await conn.expect(p.StopLease)  # whatever the worker left is torn down
    assert (cleanup.lease_id, cleanup.reason) == (start.lease_id, "start_failed")
    assert _state(gw, start.lease_id) == "failed"
    status, second = await gw.lease()
    assert status == 201
    await conn.expect(p.StartLease)
    gw.clock.advance(901)
    await gw.gateway.leases.tick()
    assert _state(gw, second["lease_id"]) == "failed"
    assert gw.gateway.store.lease(second["lease_id"]).end_reason == "start_timeout"  # type: ignore[union-attr]
    assert gw.gateway.store.lease(first["lease_id"]).message == "no vfio device"  # type: ignore[union-attr]
    assert await gw.records() == []


async def test_records_do_not_verify_under_another_key_or_when_altered(gw: Gw) -> None:
    _, conn = await gw.online()
    await _running(gw, conn)
    [signed] = (await gw.feed()).records
    other = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(LeaseRecordError):
        verify_record(signed, {gw.gateway.signer.gateway_id: other})
    altered = SignedLeaseRecord(
        record=signed.record.replace(b'"ended":false', b'"ended":true '), signature=signed.signature
    )
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    key = Ed25519PublicKey.from_public_bytes(gw.gateway.signer.public_key)
    with pytest.raises(LeaseRecordError):
        verify_record(altered, {gw.gateway.signer.gateway_id: key})
    assert verify_record(signed, {gw.gateway.signer.gateway_id: key}).seq == 1
