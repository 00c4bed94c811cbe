"""The validator store, on SQLite and PostgreSQL alike (fixtures in conftest.py).

Every Store method is exercised through the public API and checked by what a caller sees:
schema versions, rosters and device conflicts, presence, the challenge lifecycle (including
replays and crashes), scoring inputs, cycles, weights and retention.
"""

from __future__ import annotations

import math
import sqlite3
import string
import threading
from pathlib import Path

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from byteleap.core.scoring import (
    DEFAULT_PARAMS,
    AvailabilityBitmap,
    ScoringParams,
    WorkerInput,
    score_network,
)
from byteleap.validator.store import (
    SCHEMA_VERSION,
    ChallengeState,
    DeviceClaim,
    DeviceOutcome,
    IssuedChallenge,
    RosterWorker,
    Store,
    StoreError,
    StoreUnavailable,
    WeightsRecord,
    WorkerRoundOutcome,
    open_store,
    redact_url,
)
from byteleap.validator.store_sql import HistoryEntry, SqlStore, decode_history, encode_history
from byteleap.validator.store_sqlite import SQLiteStore
from tests.support.fixtures import free_port

NOW = 1_800_000_000.0  # a bucket boundary
M1 = "5MinerOne"
M2 = "5MinerTwo"


def worker(
    wid: str, *uuids: str, online: bool = True, leased: tuple[str, ...] = ()
) -> RosterWorker:
    return RosterWorker(
        worker_id=wid,
        online=online,
        devices=tuple(DeviceClaim(uuid=u, name="H100", mem_bytes=80 << 30) for u in uuids),
        leased_devices=leased,
    )


def challenge(
    cid: bytes, wid: str = "w1", miner: str = M1, round_id: int = 1, device: str = "GPU-1"
) -> IssuedChallenge:
    return IssuedChallenge(
        challenge_id=cid,
        round_id=round_id,
        miner_hotkey=miner,
        worker_id=wid,
        device_uuid=device,
        n=4096,
        precision="fp32",
        seed=b"s" * 32,
        issued_at=NOW,
    )


def verified(cid: bytes, flops: float = 1e12) -> DeviceOutcome:
    return DeviceOutcome(
        challenge_id=cid,
        state=ChallengeState.VERIFIED,
        reason="ok",
        merkle_root=b"r" * 32,
        committed_at=NOW + 1,
        rtt_s=0.01,
        elapsed_s=1.0,
        flops=flops,
    )


def failed(cid: bytes, reason: str = "bad_row") -> DeviceOutcome:
    return DeviceOutcome(challenge_id=cid, state=ChallengeState.FAILED, reason=reason)


def outcome(
    *devices: DeviceOutcome,
    wid: str = "w1",
    miner: str = M1,
    round_id: int = 1,
    at: float = NOW + 10,
) -> WorkerRoundOutcome:
    return WorkerRoundOutcome(
        round_id=round_id, miner_hotkey=miner, worker_id=wid, finished_at=at, devices=devices
    )


def play_round(
    store: SqlStore, round_id: int, wid: str, *, ok: bool, at: float, flops: float = 1e12
) -> None:
    """One single-device round of worker ``wid`` of M1, issued, committed and finished."""
    cid = f"{wid}-{round_id}".encode()
    store.issue([challenge(cid, wid, round_id=round_id)])
    store.record_commit(cid, b"r" * 32, at - 1)
    device = verified(cid, flops) if ok else failed(cid)
    assert store.finish(outcome(device, wid=wid, round_id=round_id, at=at))


def inputs_by_worker(
    store: SqlStore, now: float, params: ScoringParams = DEFAULT_PARAMS
) -> dict[tuple[str, str], WorkerInput]:
    return {(w.miner_hotkey, w.worker_id): w for w in store.scoring_inputs(now, params)}


# ---- schema -----------------------------------------------------------------------------------


def test_upgrade_from_empty_is_idempotent_and_check_follows(empty_store: SqlStore) -> None:
    assert empty_store.schema_version() == 0
    with pytest.raises(StoreError, match="byteleapctl db upgrade"):
        empty_store.check()
    status = empty_store.status()
    assert (status.schema_version, status.expected_version) == (0, SCHEMA_VERSION)
    assert status.workers == 0 and status.last_cycle_at is None

    assert empty_store.upgrade() == list(range(1, SCHEMA_VERSION + 1))
    assert empty_store.upgrade() == []
    empty_store.check()
    assert empty_store.schema_version() == SCHEMA_VERSION
    assert empty_store.status().schema_version == SCHEMA_VERSION


def test_concurrent_upgrades_apply_each_migration_once(store_url: str) -> None:
    stores = [open_store(store_url, timeout_s=30) for _ in range(3)]
    applied: list[list[int]] = []
    errors: list[BaseException] = []

    def upgrade(s: Store) -> None:
        try:
            applied.append(s.upgrade())
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=upgrade, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.close()
    assert errors == []
    assert sorted(v for run in applied for v in run) == list(range(1, SCHEMA_VERSION + 1))


def test_a_database_newer_than_the_code_is_refused(store: SqlStore) -> None:
    with store._transaction(write=True) as tx:
        tx.execute(
            "INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
            (SCHEMA_VERSION + 1, "from the future", NOW),
        )
    assert store.schema_version() == SCHEMA_VERSION + 1
    with pytest.raises(StoreError, match="newer than this code"):
        store.check()
    with pytest.raises(StoreError, match="newer than this code"):
        store.upgrade()
    assert store.status().schema_version == SCHEMA_VERSION + 1


def test_methods_on_an_empty_database_raise_store_error(empty_store: SqlStore) -> None:
    with pytest.raises(StoreError) as raised:
        empty_store.excluded_devices()
    assert not isinstance(raised.value, StoreUnavailable)  # retrying would not help


# ---- roster and presence ----------------------------------------------------------------------


def test_roster_sets_online_and_absent_workers_go_offline(store: SqlStore) -> None:
    assert store.sync_roster(M1, 3, [worker("w1", "GPU-1"), worker("w2", "GPU-2")], NOW) == []
    assert (store.status().workers, store.status().online_workers) == (2, 2)

    store.sync_roster(M1, 3, [worker("w1", "GPU-1"), worker("w3", "GPU-3", online=False)], NOW)
    status = store.status()
    assert (status.miners, status.workers, status.online_workers) == (1, 3, 1)

    store.mark_offline(M1, NOW + 1)
    assert store.status().online_workers == 0
    store.sync_roster(M1, 3, [worker("w1", "GPU-1")], NOW + 2)
    assert store.status().online_workers == 1


def test_first_claim_wins_and_the_conflict_survives_resync(store: SqlStore) -> None:
    store.sync_roster(M1, 1, [worker("a", "GPU-X", "GPU-A")], NOW)
    conflicts = store.sync_roster(M2, 2, [worker("b", "GPU-X", "GPU-B")], NOW + 1)

    assert [
        (c.uuid, c.owner_miner, c.owner_worker, c.miner_hotkey, c.worker_id) for c in conflicts
    ] == [("GPU-X", M1, "a", M2, "b")]
    assert store.excluded_devices() == {(M2, "b", "GPU-X")}

    # Both keep reporting it: the owner stays the owner, the loser stays excluded.
    owner_view = store.sync_roster(M1, 1, [worker("a", "GPU-X", "GPU-A")], NOW + 2)
    again = store.sync_roster(M2, 2, [worker("b", "GPU-X", "GPU-B")], NOW + 3)
    assert [c.worker_id for c in owner_view] == ["b"]  # the owner is told too
    assert len(again) == 1
    assert (again[0].first_seen, again[0].last_seen) == (NOW + 1, NOW + 3)
    assert store.excluded_devices() == {(M2, "b", "GPU-X")}


def test_a_released_device_goes_to_the_next_claimant(store: SqlStore) -> None:
    store.sync_roster(M1, 1, [worker("a", "GPU-X")], NOW)
    store.sync_roster(M2, 2, [worker("b", "GPU-X")], NOW)
    assert store.excluded_devices() == {(M2, "b", "GPU-X")}

    store.sync_roster(M1, 1, [worker("a")], NOW + 1)  # the owner's miner no longer reports it
    assert store.excluded_devices() == set()
    assert store.sync_roster(M2, 2, [worker("b", "GPU-X")], NOW + 2) == []
    conflicts = store.sync_roster(M1, 1, [worker("a", "GPU-X")], NOW + 3)
    assert [(c.owner_worker, c.worker_id) for c in conflicts] == [("b", "a")]
    assert store.excluded_devices() == {(M1, "a", "GPU-X")}


def test_two_workers_of_one_miner_cannot_share_a_device(store: SqlStore) -> None:
    conflicts = store.sync_roster(M1, 1, [worker("w1", "GPU-1"), worker("w2", "GPU-1")], NOW)
    assert [(c.owner_worker, c.worker_id) for c in conflicts] == [("w1", "w2")]
    assert store.excluded_devices() == {(M1, "w2", "GPU-1")}
    # w2 stops claiming it: it is no longer excluded.
    store.sync_roster(M1, 1, [worker("w1", "GPU-1"), worker("w2", "GPU-2")], NOW + 1)
    assert store.excluded_devices() == set()
    assert store.conflicts() == []


@pytest.mark.parametrize(
    ("workers", "message"),
    [
        ([worker("w1", "GPU-1"), worker("w1", "GPU-2")], "listed twice"),
        ([worker("w1", "GPU-1", "GPU-1")], "lists a device twice"),
        ([worker("w1", "GPU-1", leased=("GPU-9",))], "leases a device it does not list"),
        ([worker("", "GPU-1")], "worker_id"),
    ],
)
def test_an_invalid_roster_changes_nothing(
    store: SqlStore, workers: list[RosterWorker], message: str
) -> None:
    store.sync_roster(M1, 1, [worker("w0", "GPU-0")], NOW)
    with pytest.raises(StoreError, match=message):
        store.sync_roster(M1, 1, workers, NOW + 1)
    assert (store.status().workers, store.status().online_workers) == (1, 1)


def test_presence_marks_buckets_idempotently(store: SqlStore) -> None:
    store.sync_roster(M1, 1, [worker("w1", "GPU-1"), worker("w2", "GPU-2")], NOW)
    assert store.availability(M1, "w1") == AvailabilityBitmap.empty()

    store.mark_present([(M1, "w1"), (M1, "w2"), (M1, "ghost"), (M2, "w1")], NOW)
    store.mark_present([(M1, "w1")], NOW + 1)  # same bucket: no change
    store.mark_present(iter([(M1, "w1")]), NOW + 300)
    store.mark_present([], NOW + 600)

    w1 = store.availability(M1, "w1")
    assert w1 is not None
    assert w1.is_present(NOW) and w1.is_present(NOW + 300) and not w1.is_present(NOW + 600)
    assert w1.present_buckets(NOW + 301) == 2
    w2 = store.availability(M1, "w2")
    assert w2 is not None and w2.present_buckets(NOW + 301) == 1
    assert store.availability(M1, "ghost") is None  # presence needs a roster first
    assert store.status().workers == 2


def test_scoring_sees_workers_seen_within_the_window(store: SqlStore) -> None:
    window = DEFAULT_PARAMS.window_seconds
    store.sync_roster(M1, 1, [worker("old", "GPU-1"), worker("new", "GPU-2")], NOW - window - 600)
    store.mark_present([(M1, "old"), (M1, "new")], NOW - window - 600)
    store.mark_present([(M1, "new")], NOW - 10)
    assert set(inputs_by_worker(store, NOW)) == {(M1, "new")}
    # Listed offline does not count as seen.
    store.sync_roster(M1, 1, [worker("old", "GPU-1", online=False)], NOW)
    assert set(inputs_by_worker(store, NOW)) == {(M1, "new")}


# ---- challenges -------------------------------------------------------------------------------


def test_challenge_lifecycle_and_replayed_finish(store: SqlStore) -> None:
    store.sync_roster(M1, 1, [worker("w1", "GPU-1", "GPU-2")], NOW)
    store.issue([challenge(b"c1", device="GPU-1"), challenge(b"c2", device="GPU-2")])
    assert store.challenge_states(1) == {b"c1": ChallengeState.ISSUED, b"c2": ChallengeState.ISSUED}
    assert store.status().challenges_open == 2

    store.record_commit(b"c1", b"r" * 32, NOW + 1)
    store.record_commit(b"c1", b"other-root", NOW + 2)  # past issued: a no-op
    assert store.challenge_states()[b"c1"] is ChallengeState.COMMITTED

    done = outcome(verified(b"c1", 2e12), verified(b"c2", 3e12))
    assert store.finish(done) is True
    assert store.finish(done) is False  # a replay counts nothing
    assert store.challenge_states(1) == {
        b"c1": ChallengeState.VERIFIED,
        b"c2": ChallengeState.VERIFIED,
    }
    assert store.challenge_states(2) == {}
    assert store.history(M1, "w1") == [HistoryEntry(NOW + 10, True, 5e12)]
    w1 = inputs_by_worker(store, NOW + 20)[(M1, "w1")]
    assert (w1.successes, w1.failures, list(w1.throughputs)) == (1, 0, [5e12])
    status = store.status()
    assert (status.challenges_open, status.challenges_total) == (0, 2)


def test_a_round_with_one_failed_device_is_one_failure(store: SqlStore) -> None:
    store.sync_roster(M1, 1, [worker("w1", "GPU-1", "GPU-2")], NOW)
    store.issue([challenge(b"c1", device="GPU-1"), challenge(b"c2", device="GPU-2")])
    assert store.finish(outcome(verified(b"c1"), failed(b"c2", "bad_row")))
    assert store.challenge_states() == {
        b"c1": ChallengeState.VERIFIED,
        b"c2": ChallengeState.FAILED,
    }
    w1 = inputs_by_worker(store, NOW + 20)[(M1, "w1")]
    assert (w1.successes, w1.failures, list(w1.throughputs)) == (0, 1, [])


def test_issue_is_idempotent_for_a_retry_and_refuses_reuse(store: SqlStore) -> None:
    store.issue([challenge(b"c1")])
    store.issue([challenge(b"c1"), challenge(b"c2")])  # a retried call: c1 unchanged, c2 new
    assert set(store.challenge_states()) == {b"c1", b"c2"}
    with pytest.raises(StoreError, match="already issued"):
        store.issue([challenge(b"c1", device="GPU-9")])
    with pytest.raises(StoreError, match="given twice"):
        store.issue([challenge(b"c3"), challenge(b"c3")])
    assert b"c3" not in store.challenge_states()
    store.sync_roster(M1, 1, [worker("w1", "GPU-1")], NOW)
    assert store.finish(outcome(verified(b"c1"), verified(b"c2")))
    with pytest.raises(StoreError, match="already issued"):
        store.issue([challenge(b"c1")])  # finished: re-issuing is a bug


def test_commit_of_an_unknown_challenge_is_an_error(store: SqlStore) -> None:
    with pytest.raises(StoreError, match="unknown challenge"):
        store.record_commit(b"nope", b"r" * 32, NOW)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (outcome(verified(b"c1"), wid="w2"), "belongs to round 1 of worker 'w1'"),
        (outcome(verified(b"c1"), round_id=7), "belongs to round 1"),
        (outcome(verified(b"zz")), "unknown challenge"),
        (outcome(verified(b"c1"), verified(b"c1")), "twice"),
        (outcome(), "no device outcome"),
        (
            outcome(DeviceOutcome(challenge_id=b"c1", state=ChallengeState.COMMITTED, reason="x")),
            "must end terminal",
        ),
        (
            outcome(
                DeviceOutcome(
                    challenge_id=b"c1", state=ChallengeState.FAILED, reason="x", flops=1.0
                )
            ),
            "did not verify",
        ),
        (outcome(verified(b"c1", math.inf)), "finite"),
    ],
)
def test_a_wrong_finish_raises_and_changes_nothing(
    store: SqlStore, bad: WorkerRoundOutcome, message: str
) -> None:
    store.sync_roster(M1, 1, [worker("w1", "GPU-1"), worker("w2", "GPU-2")], NOW)
    store.issue([challenge(b"c1")])
    with pytest.raises(StoreError, match=message):
        store.finish(bad)
    assert store.challenge_states() == {b"c1": ChallengeState.ISSUED}
    assert store.history(M1, "w1") == [] and store.history(M1, "w2") == []


def test_sweep_expires_open_challenges_without_counting_them(store: SqlStore) -> None:
    store.sync_roster(M1, 1, [worker("w1", "GPU-1", "GPU-2"), worker("w2", "GPU-3")], NOW)
    play_round(store, 1, "w2", ok=True, at=NOW + 5)
    store.issue([challenge(b"c1", device="GPU-1"), challenge(b"c2", device="GPU-2")])
    store.record_commit(b"c1", b"r" * 32, NOW + 1)

    assert store.sweep_unfinished(NOW + 30, "validator_restart") == 2
    assert store.sweep_unfinished(NOW + 31, "validator_restart") == 0
    states = store.challenge_states()
    assert states[b"c1"] is states[b"c2"] is ChallengeState.EXPIRED
    assert states[b"w2-1"] is ChallengeState.VERIFIED
    # The round a crash interrupted cannot be finished afterwards, and counts nothing.
    assert store.finish(outcome(verified(b"c1"), verified(b"c2"))) is False
    w1 = inputs_by_worker(store, NOW + 60)[(M1, "w1")]
    assert (w1.successes, w1.failures) == (0, 0)
    assert store.history(M1, "w1") == []


def test_concurrent_finishes_of_one_round_count_once(store: SqlStore) -> None:
    store.sync_roster(M1, 1, [worker("w1", "GPU-1")], NOW)
    store.issue([challenge(b"c1")])
    done = outcome(verified(b"c1"))
    results: list[bool] = []
    errors: list[BaseException] = []

    def finish() -> None:
        try:
            results.append(store.finish(done))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=finish) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(results) == [False, False, False, True]
    assert len(store.history(M1, "w1")) == 1


# ---- scoring inputs ---------------------------------------------------------------------------


def test_scoring_inputs_count_the_challenge_window_only(store: SqlStore) -> None:
    window = DEFAULT_PARAMS.challenge_window_seconds
    store.sync_roster(M1, 1, [worker("w1", "GPU-1"), worker("w2", "GPU-2"), worker("w3")], NOW)
    store.mark_present([(M1, "w1"), (M1, "w2"), (M1, "w3")], NOW)
    play_round(store, 1, "w1", ok=True, at=NOW - window - 1, flops=9e12)  # before the window
    play_round(store, 2, "w1", ok=True, at=NOW - window, flops=1e12)  # first second of it
    play_round(store, 3, "w1", ok=False, at=NOW - 100)
    play_round(store, 4, "w1", ok=True, at=NOW - 50, flops=3e12)
    play_round(store, 1, "w2", ok=False, at=NOW - 10)

    got = inputs_by_worker(store, NOW)
    assert sorted(got) == [(M1, "w1"), (M1, "w2"), (M1, "w3")]
    w1, w2, w3 = got[(M1, "w1")], got[(M1, "w2")], got[(M1, "w3")]
    assert (w1.successes, w1.failures, list(w1.throughputs)) == (2, 1, [1e12, 3e12])
    assert (w2.successes, w2.failures, list(w2.throughputs)) == (0, 1, [])
    assert (w3.successes, w3.failures, list(w3.throughputs)) == (0, 0, [])
    assert w1.availability == store.availability(M1, "w1")
    assert isinstance(w3.availability, AvailabilityBitmap)
    assert w3.availability.present_buckets(NOW) == 1

    result = score_network(got.values(), now=NOW)
    assert [w.successes for w in result.workers] == [2, 0, 0]


def test_outcomes_after_now_are_not_counted_yet(store: SqlStore) -> None:
    store.sync_roster(M1, 1, [worker("w1", "GPU-1")], NOW)
    play_round(store, 1, "w1", ok=True, at=NOW - 50, flops=3e12)
    play_round(store, 2, "w1", ok=False, at=NOW + 100)
    w1 = inputs_by_worker(store, NOW)[(M1, "w1")]
    assert (w1.successes, w1.failures, list(w1.throughputs)) == (1, 0, [3e12])
    w1 = inputs_by_worker(store, NOW + 100)[(M1, "w1")]
    assert (w1.successes, w1.failures) == (1, 1)


def test_bitmaps_follow_changed_scoring_geometry(store: SqlStore) -> None:
    store.sync_roster(M1, 1, [worker("w1", "GPU-1")], NOW)
    store.mark_present([(M1, "w1")], NOW)
    shorter = ScoringParams(window_hours=24, challenge_window_minutes=60)
    coarser = ScoringParams(bucket_seconds=600)
    for params in (shorter, coarser):
        (w1,) = store.scoring_inputs(NOW + 1, params)
        assert isinstance(w1.availability, AvailabilityBitmap)
        assert (w1.availability.bucket_seconds, w1.availability.n_buckets) == (
            params.bucket_seconds,
            params.window_buckets,
        )
        score_network([w1], now=NOW + 1, params=params)  # accepted as is
    (same,) = store.scoring_inputs(NOW + 1, shorter)
    assert isinstance(same.availability, AvailabilityBitmap)
    assert same.availability.present_buckets(NOW + 1) == 1  # resized keeps the marks


def test_history_is_trimmed_to_the_challenge_window_on_write(store_url: str) -> None:
    params = ScoringParams(challenge_window_minutes=60, challenge_interval_seconds=240)
    store = open_store(store_url, params=params)
    assert isinstance(store, SqlStore)
    try:
        store.upgrade()
        store.sync_roster(M1, 1, [worker("w1", "GPU-1")], NOW)
        for k in range(5):
            play_round(store, k, "w1", ok=True, at=NOW + k * 1800, flops=float(k + 1))
        assert [e.finished_at for e in store.history(M1, "w1")] == [
            NOW + 3600,
            NOW + 5400,
            NOW + 7200,
        ]
    finally:
        store.close()


# ---- cycles and weights -----------------------------------------------------------------------


def _two_miners(store: SqlStore) -> None:
    store.sync_roster(M1, 1, [worker("w1", "GPU-1"), worker("w2", "GPU-2")], NOW)
    store.sync_roster(M2, 2, [worker("x1", "GPU-3")], NOW)
    store.mark_present([(M1, "w1"), (M1, "w2"), (M2, "x1")], NOW)
    play_round(store, 1, "w1", ok=True, at=NOW + 1, flops=1.5e12)
    play_round(store, 1, "w2", ok=False, at=NOW + 2)


def test_a_cycle_reads_back_equal_with_every_factor(store: SqlStore) -> None:
    assert store.latest_cycle() is None
    _two_miners(store)
    result = score_network(store.scoring_inputs(NOW + 10, DEFAULT_PARAMS), now=NOW + 10)
    assert result.weights and result.rank_pool == 1
    cycle_id = store.record_cycle(result, block=1234, uids={M1: 1, M2: 2})

    back = store.cycle(cycle_id)
    assert back is not None
    assert back.result == result
    assert (back.cycle_id, back.at, back.block, back.uids) == (
        cycle_id,
        NOW + 10,
        1234,
        {M1: 1, M2: 2},
    )
    assert back.weights is None
    assert store.latest_cycle() == back
    assert store.cycle(cycle_id + 1000) is None
    assert store.status().last_cycle_at == NOW + 10

    # A retried call returns the same cycle; a different result for the same time is refused.
    assert store.record_cycle(result, block=1234, uids={M1: 1, M2: 2}) == cycle_id
    with pytest.raises(StoreError, match="different cycle"):
        store.record_cycle(result, block=1235, uids={M1: 1, M2: 2})
    later = score_network(store.scoring_inputs(NOW + 20, DEFAULT_PARAMS), now=NOW + 20)
    assert store.record_cycle(later, block=None, uids={}) > cycle_id
    latest = store.latest_cycle()
    assert latest is not None and latest.result == later and latest.block is None


def test_weights_records(store: SqlStore) -> None:
    _two_miners(store)
    result = score_network(store.scoring_inputs(NOW + 10, DEFAULT_PARAMS), now=NOW + 10)
    first = store.record_cycle(result, block=1, uids={M1: 1, M2: 2})
    assert store.last_submitted_weights() is None

    limited = WeightsRecord(at=NOW + 11, status="rate_limited", message="too soon")
    submitted = WeightsRecord(
        at=NOW + 12, status="submitted", block=7, path="commit_reveal", weights={1: 0.25, 2: 0.75}
    )
    store.record_weights(first, limited)
    store.record_weights(first, submitted)
    store.record_weights(first, submitted)  # a retried call: no duplicate
    cycle = store.cycle(first)
    assert cycle is not None and cycle.weights == submitted
    assert store.last_submitted_weights() == submitted

    later = store.record_cycle(score_network((), now=NOW + 20), block=2, uids={})
    skipped = WeightsRecord(at=NOW + 21, status="skipped", message="every score was 0")
    store.record_weights(later, skipped)
    latest = store.latest_cycle()
    assert latest is not None and latest.weights == skipped
    assert store.last_submitted_weights() == submitted
    with pytest.raises(StoreError, match="no cycle"):
        store.record_weights(later + 1000, skipped)


# ---- retention --------------------------------------------------------------------------------


def test_prune_keeps_what_scoring_and_explaining_need(store: SqlStore) -> None:
    params = DEFAULT_PARAMS
    store.sync_roster(M1, 1, [worker("w1", "GPU-1")], NOW)
    store.sync_roster(M2, 2, [worker("gone", "GPU-X")], NOW - params.window_seconds - 10)
    assert store.sync_roster(M1, 1, [worker("w1", "GPU-1"), worker("w2", "GPU-X")], NOW)
    play_round(store, 1, "w1", ok=True, at=NOW - 7200)
    play_round(store, 2, "w1", ok=True, at=NOW - 60)
    store.issue([challenge(b"open", round_id=3)])
    cycles = [
        store.record_cycle(score_network((), now=NOW - 100 + k), block=k, uids={}) for k in range(4)
    ]
    submitted = WeightsRecord(at=NOW - 99, status="submitted", weights={1: 1.0})
    store.record_weights(cycles[0], submitted)

    deleted = store.prune(NOW, keep_challenges_s=3600, keep_cycles=2, history_window_s=3600)

    # w1-1 (old, terminal); cycle 1 (not newest, not submitted); one history entry; the stale
    # worker and its miner.
    assert deleted == 1 + 1 + 1 + 1 + 1
    assert set(store.challenge_states()) == {b"w1-2", b"open"}
    assert store.cycle(cycles[1]) is None
    assert [store.cycle(c) is not None for c in (cycles[0], cycles[2], cycles[3])] == [True] * 3
    assert store.last_submitted_weights() == submitted
    assert [e.finished_at for e in store.history(M1, "w1")] == [NOW - 60]
    status = store.status()
    assert (status.miners, status.workers) == (1, 2)
    # The pruned worker's claim is gone with it: the device belongs to its next claimant.
    assert store.excluded_devices() == set()
    assert store.sync_roster(M1, 1, [worker("w1", "GPU-1"), worker("w2", "GPU-X")], NOW + 1) == []
    assert store.prune(NOW, keep_challenges_s=3600, keep_cycles=2, history_window_s=3600) == 0


# ---- failures ---------------------------------------------------------------------------------


def test_unreachable_postgresql_is_unavailable_not_a_hang() -> None:
    url = f"postgresql://postgres:hunter2@127.0.0.1:{free_port()}/test"
    store = open_store(url, timeout_s=1)
    try:
        with pytest.raises(StoreUnavailable) as raised:
            store.schema_version()
        assert "hunter2" not in str(raised.value)
        with pytest.raises(StoreUnavailable):
            store.upgrade()
    finally:
        store.close()


def test_postgresql_recovers_after_its_connections_are_killed(pg_url: str) -> None:
    marker = f"byteleap-test-{free_port()}"
    store = open_store(f"{pg_url}&application_name={marker}", timeout_s=5, pool_size=2)
    try:
        store.upgrade()
        store.sync_roster(M1, 1, [worker("w1", "GPU-1")], NOW)
        # What a server restart does to a client: every connection it holds dies.
        with psycopg.connect(pg_url, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = %s",
                (marker,),
            ).fetchall()
        assert killed, "the store held no connection"
        outcomes = []
        for _ in range(2):
            try:
                outcomes.append(store.status().workers)
            except StoreUnavailable:
                outcomes.append(None)
        assert outcomes[-1] == 1
    finally:
        store.close()


def test_a_busy_sqlite_database_is_unavailable_then_works(tmp_path: Path) -> None:
    path = tmp_path / "v.db"
    store = SQLiteStore(path, timeout_s=0.2)
    store.upgrade()
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreUnavailable, match="busy"):
            store.sync_roster(M1, 1, [worker("w1", "GPU-1")], NOW)
        blocker.execute("ROLLBACK")
        store.sync_roster(M1, 1, [worker("w1", "GPU-1")], NOW)
        assert store.status().workers == 1
    finally:
        blocker.close()
        store.close()


def test_sqlite_files_are_private_and_urls_resolve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    absolute = tmp_path / "new" / "validator.db"
    open_store(f"sqlite:///{absolute}").close()
    assert (absolute.parent.stat().st_mode & 0o777, absolute.stat().st_mode & 0o777) == (
        0o700,
        0o600,
    )
    monkeypatch.chdir(tmp_path)
    store = open_store("sqlite:///relative/v.db")
    try:
        assert store.status().location == "relative/v.db"
        store.upgrade()
    finally:
        store.close()
    assert (tmp_path / "relative" / "v.db").exists()
    for bad in ("sqlite://", "sqlite:///", "sqlite:///dir/", "sqlite:///x.db?mode=ro"):
        with pytest.raises(StoreError):
            open_store(bad)


def test_unsupported_urls_are_refused_without_showing_passwords() -> None:
    with pytest.raises(StoreError, match="unsupported store URL") as raised:
        open_store("mysql://root:s3cret@db/validator")
    assert "s3cret" not in str(raised.value)
    with pytest.raises(StoreError, match="malformed") as malformed:
        open_store("postgresql://u:s3cret@host/db?nonsense_option=1")
    assert "s3cret" not in str(malformed.value)


def test_a_closed_store_says_so(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "v.db")
    store.close()
    store.close()  # twice is fine
    with pytest.raises(StoreError, match="closed"):
        store.schema_version()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://val:pw@db:5432/v", "postgresql://val:***@db:5432/v"),
        (
            "postgresql://val@db/v?password=pw&sslmode=require",
            "postgresql://val@db/v?password=***&sslmode=require",
        ),
        ("postgresql://db/v", "postgresql://db/v"),
        ("host=db password='p w' user=x", "host=db password=*** user=x"),
        ("sqlite:////var/lib/v.db", "sqlite:////var/lib/v.db"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@given(st.text(alphabet=string.ascii_letters + string.digits + "-._~!$&'()*+,;=", min_size=1))
def test_redact_url_never_shows_a_password(password: str) -> None:
    url = f"postgresql://user:{password}@db.example:5432/validator?sslmode=require"
    assert redact_url(url) == "postgresql://user:***@db.example:5432/validator?sslmode=require"


# ---- history encoding -------------------------------------------------------------------------

finite = st.floats(allow_nan=False, allow_infinity=False)


@given(st.lists(st.tuples(finite, st.booleans(), st.floats(min_value=0, allow_infinity=False))))
def test_history_encoding_round_trips(entries: list[tuple[float, bool, float]]) -> None:
    blob = encode_history(entries)
    assert len(blob) == 1 + 17 * len(entries)
    assert decode_history(blob) == [HistoryEntry(t, ok, f) for t, ok, f in entries]


@pytest.mark.parametrize(
    "blob",
    [
        b"\x02" + bytes(17),
        b"\x01" + bytes(16),
        encode_history([(math.nan, True, 1.0)]),
        encode_history([(1.0, True, -1.0)]),
        b"\x01" + bytes(8) + b"\x07" + bytes(8),
    ],
)
def test_corrupt_history_is_a_store_error(blob: bytes) -> None:
    with pytest.raises(StoreError):
        decode_history(blob)
    assert decode_history(None) == []
