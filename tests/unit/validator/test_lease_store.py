"""Lease records in the validator store, on SQLite and PostgreSQL (fixtures in conftest.py):
the feed cursor and the records move together, the newest record of a lease wins, scoring
credits a lease to exactly the (miner, worker) it was signed for, retention drops what can no
longer count."""

from __future__ import annotations

import msgspec
import pytest
from rich.console import Console

from byteleap.chain.port import Neuron, SubnetSnapshot
from byteleap.cli.scores import worker_table
from byteleap.core.lease import LeaseRecord, verify_record
from byteleap.core.scoring import DEFAULT_PARAMS, score_network
from byteleap.validator.store import DeviceClaim, RosterWorker, StoreError, VerifiedLease
from byteleap.validator.store_sql import SqlStore
from byteleap.validator.weights import run_cycle
from tests.unit.validator.lease_helpers import (
    MINER_A,
    MINER_B,
    WORKER_1,
    WORKER_2,
    SigningGateway,
    lease_id,
)

NOW = 1_800_000_000.0
WINDOW = DEFAULT_PARAMS.window_seconds


def roster(store: SqlStore, miner: str, *workers: str, at: float = NOW) -> None:
    store.sync_roster(
        miner,
        None,
        [
            RosterWorker(worker_id=w, online=True, devices=(DeviceClaim(uuid=f"GPU-{w[:4]}"),))
            for w in workers
        ],
        at,
    )
    store.mark_present([(miner, w) for w in workers], at)


def stored(store: SqlStore, gateway: SigningGateway) -> dict[str, LeaseRecord]:
    return {v.record.lease_id: v.record for v in store.leases(gateway.gateway_id)}


def snapshot(*hotkeys: str) -> SubnetSnapshot:
    return SubnetSnapshot(
        netuid=128,
        block=100,
        tempo=360,
        weights_rate_limit=100,
        min_allowed_weights=0,
        max_weight_limit=65535,
        commit_reveal_enabled=False,
        max_uids=256,
        neurons=tuple(
            Neuron(
                uid=uid,
                hotkey=hk,
                coldkey=hk,
                stake_rao=0,
                validator_permit=False,
                active=True,
                last_update=0,
            )
            for uid, hk in enumerate(hotkeys)
        ),
    )


# ---- cursor and records -------------------------------------------------------------------------


def test_records_and_cursor_move_together_and_the_newest_record_wins(store: SqlStore) -> None:
    gw = SigningGateway()
    a, b = lease_id(), lease_id()
    gw.sign(a, start=NOW - 100)
    gw.sign(b, start=NOW - 90, devices=("GPU-7", "GPU-8"))
    gw.sign(a, start=NOW - 100, active_until=NOW - 40)
    gw.sign(a, start=NOW - 100, active_until=NOW - 10, ended=True)
    assert store.lease_cursor(gw.gateway_id) == 0

    assert store.record_lease_page(gw.gateway_id, 0, gw.page(1, 3), NOW) == 3
    assert store.lease_cursor(gw.gateway_id) == 3
    leases = stored(store, gw)
    assert (leases[a].seq, leases[a].active_until, leases[a].ended) == (3, NOW - 40, False)
    assert leases[b].device_uuids == ["GPU-7", "GPU-8"]

    assert store.record_lease_page(gw.gateway_id, 3, gw.page(4, 4), NOW) == 4
    assert stored(store, gw)[a].ended
    # What is stored is what the gateway signed: it verifies again.
    for verified in store.leases(gw.gateway_id):
        assert verify_record(verified.signed, {gw.gateway_id: gw.key.public_key()}) == (
            verified.record
        )
    assert store.leases("f" * 32) == []


def test_an_older_record_never_replaces_a_newer_one(store: SqlStore) -> None:
    gw = SigningGateway()
    a = lease_id()
    for until in (NOW - 50, NOW - 40, NOW - 30):
        gw.sign(a, start=NOW - 60, active_until=until)
    store.record_lease_page(gw.gateway_id, 0, gw.page(1, 3), NOW)
    # The cursor is lost (a restored backup, an operator's reset) and the feed is read again.
    with store._transaction(write=True) as tx:
        tx.execute("DELETE FROM lease_feeds")
    assert store.lease_cursor(gw.gateway_id) == 0
    assert store.record_lease_page(gw.gateway_id, 0, gw.page(1, 2), NOW) == 2
    assert (stored(store, gw)[a].seq, stored(store, gw)[a].active_until) == (3, NOW - 30)


def test_a_retried_page_is_a_no_op_and_a_moved_cursor_is_refused(store: SqlStore) -> None:
    gw = SigningGateway()
    for k in range(4):
        gw.sign(lease_id(), start=NOW - 100 + k)
    assert store.record_lease_page(gw.gateway_id, 0, gw.page(1, 2), NOW) == 2
    # The first attempt committed but its answer was lost: the retry changes nothing.
    assert store.record_lease_page(gw.gateway_id, 0, gw.page(1, 2), NOW) == 2
    # Another writer moved the cursor: a page from the old cursor is refused.
    with pytest.raises(StoreError, match="is at 2, not 1"):
        store.record_lease_page(gw.gateway_id, 1, gw.page(2, 4), NOW)
    assert store.lease_cursor(gw.gateway_id) == 2
    assert len(store.leases()) == 2


@pytest.mark.parametrize(
    ("after", "pick", "message"),
    [
        (0, [2, 3], "without a gap"),  # does not start after the cursor
        (0, [1, 3], "without a gap"),  # a hole inside the page
        (0, [1, 1], "without a gap"),  # a duplicate
        (0, [], "no lease records"),
    ],
)
def test_pages_out_of_sequence_change_nothing(
    store: SqlStore, after: int, pick: list[int], message: str
) -> None:
    gw = SigningGateway()
    for k in range(3):
        gw.sign(lease_id(), start=NOW - 100 + k)
    page = [gw.page(i, i)[0] for i in pick]
    with pytest.raises(StoreError, match=message):
        store.record_lease_page(gw.gateway_id, after, page, NOW)
    assert store.lease_cursor(gw.gateway_id) == 0
    assert store.leases() == []


def test_a_record_of_another_gateway_is_refused_in_this_feed(store: SqlStore) -> None:
    ours, theirs = SigningGateway(), SigningGateway()
    theirs.sign(lease_id(), start=NOW)
    with pytest.raises(StoreError, match="in the feed of"):
        store.record_lease_page(ours.gateway_id, 0, theirs.page(1, 1), NOW)
    assert store.leases() == []
    # Each gateway has its own cursor.
    ours.sign(lease_id(), start=NOW)
    store.record_lease_page(theirs.gateway_id, 0, theirs.page(1, 1), NOW)
    assert store.lease_cursor(ours.gateway_id) == 0
    assert store.lease_cursor(theirs.gateway_id) == 1


def test_an_incoherent_record_is_refused_whoever_verified_it(store: SqlStore) -> None:
    gw = SigningGateway()
    gw.sign(lease_id(), start=NOW)
    good = gw.page(1, 1)[0]
    bad = msgspec.structs.replace(good.record, active_until=NOW - 1)  # a caller's bug
    with pytest.raises(StoreError, match="before start"):
        store.record_lease_page(gw.gateway_id, 0, [VerifiedLease(bad, good.signed)], NOW)
    assert store.lease_cursor(gw.gateway_id) == 0


# ---- active leases ------------------------------------------------------------------------------


def test_active_leases_are_the_unended_ones_confirmed_since(store: SqlStore) -> None:
    gw = SigningGateway()
    running, stale, ended = lease_id(), lease_id(), lease_id()
    gw.sign(running, start=NOW - 600, active_until=NOW - 30)
    gw.sign(stale, start=NOW - 600, active_until=NOW - 500)
    gw.sign(ended, start=NOW - 600, active_until=NOW - 10, ended=True)
    store.record_lease_page(gw.gateway_id, 0, gw.page(1, 3), NOW)
    assert [r.lease_id for r in store.active_leases(NOW - 120)] == [running]
    assert {r.lease_id for r in store.active_leases(NOW - 600)} == {running, stale}
    (record,) = store.active_leases(NOW - 120)
    assert record == stored(store, gw)[running]


# ---- scoring ------------------------------------------------------------------------------------


def test_a_worker_leased_half_the_window_scores_lease_one_half(store: SqlStore) -> None:
    roster(store, MINER_A, WORKER_1, WORKER_2)
    gw = SigningGateway()
    gw.sign(lease_id(), start=NOW - WINDOW / 2, active_until=NOW)
    # Credit is never extrapolated: a lease confirmed until an hour ago counts until then.
    gw.sign(lease_id(), worker=WORKER_2, start=NOW - WINDOW / 4, active_until=NOW - 3600)
    store.record_lease_page(gw.gateway_id, 0, gw.page(1, 2), NOW)

    result = score_network(store.scoring_inputs(NOW, DEFAULT_PARAMS), now=NOW)
    by_worker = {w.worker_id: w for w in result.workers}
    assert by_worker[WORKER_1].leased_seconds == pytest.approx(WINDOW / 2)
    assert by_worker[WORKER_1].lease == pytest.approx(0.5)
    assert by_worker[WORKER_2].lease == pytest.approx((WINDOW / 4 - 3600) / WINDOW)
    # Leased time in the challenge window counts as participation.
    assert by_worker[WORKER_1].participation == pytest.approx(1.0)

    # byteleapctl scores shows the leased time and the factor, from the stored cycle.
    cycle = store.cycle(store.record_cycle(result, block=1, uids={MINER_A: 0}))
    assert cycle is not None
    console = Console(record=True, width=200)
    console.print(worker_table(cycle))
    rows = {line.split("│")[2].strip(): line for line in console.export_text().splitlines()[4:-1]}
    assert "84.5 h" in rows[WORKER_1[:12] + "…"] and "0.500" in rows[WORKER_1[:12] + "…"]
    assert "41.2 h" in rows[WORKER_2[:12] + "…"]


def test_a_lease_credits_only_the_miner_and_worker_it_was_signed_for(store: SqlStore) -> None:
    # Both miners list WORKER_1 (a copied worker id); the gateway leased MINER_A's.
    roster(store, MINER_A, WORKER_1)
    roster(store, MINER_B, WORKER_1, WORKER_2)
    gw = SigningGateway()
    gw.sign(lease_id(), miner=MINER_A, worker=WORKER_1, start=NOW - 3600, active_until=NOW)
    # A lease for a worker the validator never saw creates nothing.
    gw.sign(lease_id(), miner=MINER_A, worker="9" * 32, start=NOW - 3600, active_until=NOW)
    store.record_lease_page(gw.gateway_id, 0, gw.page(1, 2), NOW)

    inputs = {(w.miner_hotkey, w.worker_id): w for w in store.scoring_inputs(NOW, DEFAULT_PARAMS)}
    assert set(inputs) == {(MINER_A, WORKER_1), (MINER_B, WORKER_1), (MINER_B, WORKER_2)}
    assert list(inputs[(MINER_A, WORKER_1)].lease_intervals) == [(NOW - 3600, NOW)]
    assert list(inputs[(MINER_B, WORKER_1)].lease_intervals) == []
    assert list(inputs[(MINER_B, WORKER_2)].lease_intervals) == []


def test_only_leases_of_the_given_gateways_count(store: SqlStore) -> None:
    roster(store, MINER_A, WORKER_1)
    kept, dropped = SigningGateway(), SigningGateway()
    kept.sign(lease_id(), start=NOW - 7200, active_until=NOW - 3600)
    dropped.sign(lease_id(), start=NOW - 3600, active_until=NOW)
    store.record_lease_page(kept.gateway_id, 0, kept.page(1, 1), NOW)
    store.record_lease_page(dropped.gateway_id, 0, dropped.page(1, 1), NOW)

    def intervals(gateways: set[str] | None) -> list[tuple[float, float]]:
        (only,) = store.scoring_inputs(NOW, DEFAULT_PARAMS, lease_gateways=gateways)
        return sorted(only.lease_intervals)

    assert intervals({kept.gateway_id}) == [(NOW - 7200, NOW - 3600)]
    assert intervals(set()) == []
    assert intervals(None) == [(NOW - 7200, NOW - 3600), (NOW - 3600, NOW)]


def test_a_lease_counts_only_while_its_miner_is_registered(store: SqlStore) -> None:
    roster(store, MINER_A, WORKER_1)
    roster(store, MINER_B, WORKER_2)
    gw = SigningGateway()
    gw.sign(lease_id(), miner=MINER_A, start=NOW - WINDOW / 2, active_until=NOW)
    gw.sign(lease_id(), miner=MINER_B, worker=WORKER_2, start=NOW - WINDOW, active_until=NOW)
    store.record_lease_page(gw.gateway_id, 0, gw.page(1, 2), NOW)

    _, result, uids = run_cycle(
        store, snapshot(MINER_A), NOW, DEFAULT_PARAMS, lease_gateways={gw.gateway_id}
    )
    assert uids == {MINER_A: 0}
    (only,) = result.workers
    assert only.miner_hotkey == MINER_A
    assert only.lease == pytest.approx(0.5)
    assert result.weights == {MINER_A: 1.0}


# ---- retention ----------------------------------------------------------------------------------


def test_retention_drops_leases_that_left_the_window(store: SqlStore) -> None:
    gw = SigningGateway()
    old, running_long_ago, recent = lease_id(), lease_id(), lease_id()
    gw.sign(old, start=NOW - WINDOW - 7200, active_until=NOW - WINDOW - 10, ended=True)
    gw.sign(running_long_ago, start=NOW - WINDOW - 7200, active_until=NOW - WINDOW - 1)
    gw.sign(recent, start=NOW - WINDOW - 7200, active_until=NOW - WINDOW + 10, ended=True)
    store.record_lease_page(gw.gateway_id, 0, gw.page(1, 3), NOW)

    deleted = store.prune(NOW, keep_challenges_s=3600, keep_cycles=10, history_window_s=3600)
    assert deleted == 2
    assert set(stored(store, gw)) == {recent}
    assert store.lease_cursor(gw.gateway_id) == 3  # the cursor stays: nothing is read twice
    assert store.prune(NOW, keep_challenges_s=3600, keep_cycles=10, history_window_s=3600) == 0
