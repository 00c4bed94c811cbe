"""Rounds never challenge a device that a gateway's signed feed says is leased, whatever the
miner's roster claims; once the lease ended or went unconfirmed past the grace, it is challenged
again (fake miners and a real store, as in test_rounds.py)."""

from __future__ import annotations

import pytest

from byteleap.core import wire
from byteleap.core.lease import LeaseRecord
from byteleap.validator.db import AsyncStore
from byteleap.validator.leases import leased_devices
from byteleap.validator.rounds import RoundEngine
from byteleap.validator.store_sql import SqlStore
from tests.unit.validator.lease_helpers import MINER_B, SigningGateway, lease_id
from tests.unit.validator.test_rounds import (
    MINER,
    NOW,
    SETTINGS,
    FakeHub,
    FakeMiner,
    assert_all_terminal,
    devices,
    gpu,
    run,
    summary,
    worker_id,
)

GRACE = 120.0


def engine_with_feed(store: SqlStore, miner: FakeMiner, *gateways: SigningGateway) -> RoundEngine:
    return RoundEngine(
        AsyncStore(store),
        FakeHub(miner),
        SETTINGS,
        clock=lambda: NOW,
        lease_grace_s={g.gateway_id: GRACE for g in gateways},
    )


def publish(store: SqlStore, gateway: SigningGateway) -> None:
    """What the feed reader does: store the gateway's whole feed."""
    after = store.lease_cursor(gateway.gateway_id)
    store.record_lease_page(
        gateway.gateway_id, after, gateway.page(after + 1, len(gateway.feed)), NOW
    )


async def test_a_device_the_feed_says_is_leased_is_not_challenged(store: SqlStore) -> None:
    wid = worker_id()
    # The roster claims both GPUs are free.
    miner = FakeMiner(MINER, wire.WorkerRoster(workers=[summary(wid, gpu("GPU-1"), gpu("GPU-2"))]))
    gw = SigningGateway()
    gw.sign(
        lease_id(), miner=MINER, worker=wid, devices=("GPU-1",), start=NOW - 3600, active_until=NOW
    )
    publish(store, gw)

    report = await run(engine_with_feed(store, miner, gw), miner)
    assert devices(report) == {"GPU-1": ("skipped", "leased"), "GPU-2": ("verified", "ok")}
    assert [c.device_uuid for c in miner.dispatched()] == ["GPU-2"]
    assert_all_terminal(store, miner)


async def test_a_fully_leased_worker_is_present_but_not_challenged(store: SqlStore) -> None:
    wid = worker_id()
    miner = FakeMiner(MINER, wire.WorkerRoster(workers=[summary(wid, gpu("GPU-1"))]))
    gw = SigningGateway()
    gw.sign(lease_id(), miner=MINER, worker=wid, start=NOW - 60, active_until=NOW)
    publish(store, gw)

    report = await run(engine_with_feed(store, miner, gw), miner)
    (worker,) = report.miners[0].workers
    assert (worker.state, worker.reason, worker.present) == (
        "skipped",
        "nothing_to_challenge",
        True,
    )
    assert miner.batches == []
    availability = store.availability(MINER, wid)
    assert availability is not None and availability.is_present(NOW)


@pytest.mark.parametrize(
    "case", ["ended", "unconfirmed_past_grace", "gateway_not_configured", "other_miner"]
)
async def test_a_device_is_challenged_again_when_the_feed_no_longer_holds_it(
    store: SqlStore, case: str
) -> None:
    wid = worker_id()
    miner = FakeMiner(MINER, wire.WorkerRoster(workers=[summary(wid, gpu("GPU-1"))]))
    gw, configured = SigningGateway(), SigningGateway()
    start = NOW - 3600
    if case == "ended":
        gw.sign(lease_id(), miner=MINER, worker=wid, start=start, active_until=NOW - 5, ended=True)
    elif case == "unconfirmed_past_grace":  # the gateway stopped confirming it (crashed)
        gw.sign(lease_id(), miner=MINER, worker=wid, start=start, active_until=NOW - GRACE - 1)
    elif case == "gateway_not_configured":
        gw.sign(lease_id(), miner=MINER, worker=wid, start=start, active_until=NOW)
    else:  # the same device uuid, leased through another miner's worker
        gw.sign(lease_id(), miner=MINER_B, worker=wid, start=start, active_until=NOW)
    publish(store, gw)
    trusted = configured if case == "gateway_not_configured" else gw

    report = await run(engine_with_feed(store, miner, trusted), miner)
    assert devices(report) == {"GPU-1": ("verified", "ok")}


async def test_the_roster_s_own_leases_still_count(store: SqlStore) -> None:
    wid = worker_id()
    miner = FakeMiner(
        MINER,
        wire.WorkerRoster(workers=[summary(wid, gpu("GPU-1"), gpu("GPU-2"), leased=["GPU-2"])]),
    )
    gw = SigningGateway()
    gw.sign(lease_id(), miner=MINER, worker=wid, devices=("GPU-1",), start=NOW, active_until=NOW)
    publish(store, gw)
    report = await run(engine_with_feed(store, miner, gw), miner)
    assert devices(report) == {"GPU-1": ("skipped", "leased"), "GPU-2": ("skipped", "leased")}


def test_leased_devices_applies_each_gateway_s_grace() -> None:
    slow, fast, unknown = SigningGateway(), SigningGateway(), SigningGateway()
    wid = worker_id()

    def lease(
        gateway: SigningGateway, *uuids: str, until: float, ended: bool = False
    ) -> LeaseRecord:
        return gateway.record(
            lease_id(), seq=1, worker=wid, devices=uuids, start=0, active_until=until, ended=ended
        )

    records = [
        lease(slow, "GPU-1", until=NOW - 500),
        lease(fast, "GPU-2", until=NOW - 500),
        lease(fast, "GPU-3", "GPU-4", until=NOW),
        lease(fast, "GPU-5", until=NOW, ended=True),
        lease(unknown, "GPU-6", until=NOW),
    ]
    grace = {slow.gateway_id: 600.0, fast.gateway_id: 60.0}
    assert leased_devices(records, NOW, grace) == {(MINER, wid): {"GPU-1", "GPU-3", "GPU-4"}}
    assert leased_devices(records, NOW, {}) == {}
