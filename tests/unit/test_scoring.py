"""Scoring formulas (DESIGN §5): hand-computed values and properties."""

from __future__ import annotations

import math
import random

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from byteleap.core.scoring import (
    DEFAULT_PARAMS,
    AvailabilityBitmap,
    LeaseInterval,
    ScoringError,
    ScoringParams,
    WorkerInput,
    availability_ratio,
    challenge_score,
    lease_fraction,
    miner_score,
    normalize_weights,
    participation,
    percentile_ranks,
    score_network,
    throughput_statistic,
    worker_score,
)

B = 300  # bucket seconds
N = 2028  # buckets in 169 h
T0 = 1_700_000_100  # a bucket boundary (5_666_667 · 300)
HOUR = 3600
WINDOW = 169 * HOUR

# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


def test_default_params_match_design() -> None:
    p = ScoringParams()
    assert (p.w_lease, p.w_challenge) == (0.9, 0.1)
    assert p.window_seconds == 608_400
    assert p.window_buckets == 2028
    assert p.challenge_window_seconds == 10_800
    assert p.participation_baseline == pytest.approx(36.0)
    assert (p.lease_weight, p.challenge_weight) == (0.9, 0.1)
    assert (p.baseline_share, p.rank_share) == (0.5, 0.5)
    assert (p.max_workers_per_miner, p.miner_score_cap) == (100, 100.0)


def test_weight_pairs_are_relative() -> None:
    p = ScoringParams(w_lease=7, w_challenge=3, split_baseline=3, split_rank=1)
    assert p.lease_weight == pytest.approx(0.7)
    assert p.challenge_weight == pytest.approx(0.3)
    assert p.baseline_share == pytest.approx(0.75)
    assert p.rank_share == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"w_lease": -0.1}, "w_lease must be >= 0"),
        ({"w_lease": 0.0, "w_challenge": 0.0}, r"w_lease \+ w_challenge must be > 0"),
        ({"w_challenge": math.nan}, "finite"),
        ({"split_baseline": 0.0, "split_rank": 0.0}, "split_baseline"),
        ({"split_rank": -1.0}, "split_rank must be >= 0"),
        ({"bucket_seconds": 7}, "multiple of bucket_seconds"),
        ({"bucket_seconds": 0}, "bucket_seconds must be a positive integer"),
        ({"window_hours": 0}, "window_hours"),
        ({"participation_threshold": 0.0}, "participation_threshold"),
        ({"participation_threshold": 1.5}, "participation_threshold"),
        ({"challenge_interval_seconds": 0.0}, "challenge_interval_seconds"),
        ({"challenge_interval_seconds": 20_000.0}, "must not exceed"),
        ({"max_workers_per_miner": 0}, "max_workers_per_miner"),
        ({"miner_score_cap": 0.0}, "miner_score_cap"),
    ],
)
def test_params_validation(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ScoringError, match=match):
        ScoringParams(**kwargs)  # type: ignore[arg-type]


def test_params_decode_from_config() -> None:
    p = msgspec.convert({"w_lease": 0.7, "w_challenge": 0.3}, ScoringParams)
    assert p.lease_weight == pytest.approx(0.7)
    with pytest.raises(msgspec.ValidationError, match="w_lease must be >= 0"):
        msgspec.convert({"w_lease": -1.0}, ScoringParams)
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.convert({"w_leese": 0.7}, ScoringParams)


# --------------------------------------------------------------------------------------------
# Availability bitmap
# --------------------------------------------------------------------------------------------


def test_empty_bitmap() -> None:
    bm = AvailabilityBitmap.empty()
    assert (bm.bucket_seconds, bm.n_buckets) == (B, N)
    assert bm.present_buckets(T0) == 0
    assert bm.availability(T0) == 0.0
    assert not bm.is_present(T0)


def test_mark_once_and_same_bucket_counts_once() -> None:
    bm = AvailabilityBitmap.empty().mark(T0).mark(T0 + 60).mark(T0 + 299.5)
    assert bm.present_buckets(T0 + 299) == 1
    assert bm.availability(T0) == pytest.approx(1 / 2028)
    assert bm.mark(T0 + 120) is bm  # already marked: no new object


def test_always_online_is_exactly_one() -> None:
    bm = AvailabilityBitmap.empty()
    for i in range(N + 50):
        bm = bm.mark(T0 + i * B + 17)
    last = T0 + (N + 49) * B
    assert bm.present_buckets(last + 100) == N
    assert bm.availability(last + 100) == 1.0
    # First second of the next bucket, before its first heartbeat: not held against the worker.
    assert bm.availability(last + B) == 1.0
    # Once that bucket is over, the missed one counts.
    assert bm.present_buckets(last + 2 * B) == N - 1


def test_bucket_ages_out_after_169_hours() -> None:
    bm = AvailabilityBitmap.empty().mark(T0)
    assert bm.present_buckets(T0 + (N - 1) * B) == 1  # current bucket is the 2028th
    assert bm.present_buckets(T0 + N * B) == 1  # in-progress bucket not yet seen: grace
    assert bm.present_buckets(T0 + WINDOW + B) == 0  # 169 h + one bucket: gone
    assert bm.present_buckets(T0 + 10 * WINDOW) == 0


def test_newer_mark_drops_aged_buckets() -> None:
    bm = AvailabilityBitmap.empty().mark(T0).mark(T0 + B).mark(T0 + N * B)
    assert not bm.is_present(T0)
    assert bm.is_present(T0 + B)
    assert bm.present_buckets(T0 + N * B) == 2
    far = bm.mark(T0 + 50 * WINDOW)
    assert far.bits == 1
    assert far.present_buckets(T0 + 50 * WINDOW) == 1


def test_old_and_out_of_order_marks() -> None:
    bm = AvailabilityBitmap.empty().mark(T0 + 10 * B).mark(T0)  # late heartbeat, in window
    assert bm.is_present(T0)
    assert bm.present_buckets(T0 + 10 * B) == 2
    ahead = AvailabilityBitmap.empty().mark(T0 + 3000 * B)
    assert ahead.mark(T0) is ahead  # older than the window: ignored


def test_count_before_head() -> None:
    bm = AvailabilityBitmap.empty()
    for i in range(10):
        bm = bm.mark(T0 + i * B)
    assert bm.present_buckets(T0 + 4 * B) == 5  # clock behind the newest mark


def test_bitmap_rejects_bad_values() -> None:
    with pytest.raises(ScoringError, match="finite"):
        AvailabilityBitmap.empty().mark(math.nan)
    with pytest.raises(ScoringError, match="bits must fit"):
        AvailabilityBitmap(bucket_seconds=B, n_buckets=3, head=0, bits=8)
    with pytest.raises(ScoringError, match="n_buckets"):
        AvailabilityBitmap(bucket_seconds=B, n_buckets=0)
    with pytest.raises(ScoringError, match="64-bit"):
        AvailabilityBitmap().mark(1e30)


def test_serialisation_size_and_errors() -> None:
    bm = AvailabilityBitmap.empty().mark(T0).mark(T0 - 100 * B)
    data = bm.to_bytes()
    assert len(data) == 21 + 254
    assert AvailabilityBitmap.from_bytes(data) == bm
    with pytest.raises(ScoringError, match="magic"):
        AvailabilityBitmap.from_bytes(b"XXXX" + data[4:])
    with pytest.raises(ScoringError, match="version"):
        AvailabilityBitmap.from_bytes(data[:4] + b"\x09" + data[5:])
    with pytest.raises(ScoringError, match="expected"):
        AvailabilityBitmap.from_bytes(data + b"\x00")
    with pytest.raises(ScoringError, match="too short"):
        AvailabilityBitmap.from_bytes(data[:10])
    small = AvailabilityBitmap(bucket_seconds=B, n_buckets=3).to_bytes()
    with pytest.raises(ScoringError, match="bits must fit"):
        AvailabilityBitmap.from_bytes(small[:-1] + b"\xff")


def test_resized_keeps_newest() -> None:
    bm = AvailabilityBitmap.empty().mark(T0).mark(T0 - 5 * B).mark(T0 - 20 * B)
    small = bm.resized(10)
    assert small.n_buckets == 10
    assert small.present_buckets(T0) == 2
    assert small.resized(N).present_buckets(T0) == 2


def test_availability_ratio() -> None:
    assert availability_ratio(1014, 2028) == 0.5
    assert availability_ratio(3000, 2028) == 1.0
    with pytest.raises(ScoringError):
        availability_ratio(-1, 2028)


offsets = st.lists(st.integers(min_value=-3 * N, max_value=0), min_size=0, max_size=60)


@settings(max_examples=150, deadline=None)
@given(offsets=offsets, seconds=st.integers(0, B - 1), gap=st.integers(0, 3 * N), data=st.data())
def test_bitmap_mark_count_round_trip(
    offsets: list[int], seconds: int, gap: int, data: st.DataObject
) -> None:
    """Count == distinct marked buckets inside the window, in any marking order."""
    newest = T0 + (max(offsets) if offsets else 0) * B
    now = newest + gap * B + seconds
    now_b = now // B
    buckets = {T0 // B + o for o in offsets}
    order = data.draw(st.permutations(offsets))
    bm = AvailabilityBitmap.empty()
    for o in order:
        bm = bm.mark(T0 + o * B + seconds)
    last = now_b if now_b in buckets else now_b - 1
    expected = sum(1 for b in buckets if last - N < b <= last)
    assert bm.present_buckets(now) == expected
    assert 0.0 <= bm.availability(now) <= 1.0
    # the stored state depends only on the set of marks, not on their order
    ref = AvailabilityBitmap.empty()
    for o in sorted(offsets):
        ref = ref.mark(T0 + o * B)
    assert bm == ref
    assert AvailabilityBitmap.from_bytes(bm.to_bytes()) == bm


@given(
    n=st.integers(1, 4096),
    bucket_seconds=st.integers(1, 2**32 - 1),
    head=st.integers(-(2**63), 2**63 - 1),
    data=st.data(),
)
def test_bitmap_serialisation_round_trip(
    n: int, bucket_seconds: int, head: int, data: st.DataObject
) -> None:
    bits = data.draw(st.integers(0, (1 << n) - 1))
    bm = AvailabilityBitmap(bucket_seconds=bucket_seconds, n_buckets=n, head=head, bits=bits)
    raw = bm.to_bytes()
    assert len(raw) == 21 + (n + 7) // 8
    assert AvailabilityBitmap.from_bytes(raw) == bm


# --------------------------------------------------------------------------------------------
# Lease
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("intervals", "expected"),
    [
        ([], 0.0),
        ([(10, 30)], 0.2),
        ([(10, 30), (20, 40)], 0.3),  # overlap
        ([(10, 30), (10, 30)], 0.2),  # duplicate record
        ([(0, 100), (10, 20)], 1.0),  # nested
        ([(10, 20), (20, 30)], 0.2),  # adjacent
        ([(-50, 10), (90, 200)], 0.2),  # clipped at both ends
        ([(200, 300), (-10, 0)], 0.0),  # outside
        ([(40, 40)], 0.0),  # empty
        ([LeaseInterval(60, 70), LeaseInterval(5, 15)], 0.2),  # unsorted, named
    ],
)
def test_lease_fraction(intervals: list[tuple[float, float]], expected: float) -> None:
    assert lease_fraction(intervals, 0, 100) == pytest.approx(expected)


def test_lease_fraction_errors() -> None:
    with pytest.raises(ScoringError, match="ends before"):
        lease_fraction([(30, 10)], 0, 100)
    with pytest.raises(ScoringError, match="empty lease window"):
        lease_fraction([], 100, 100)
    with pytest.raises(ScoringError, match="finite"):
        lease_fraction([(0, math.inf)], 0, 100)


intervals_strategy = st.lists(
    st.tuples(st.integers(0, 200), st.integers(0, 60)).map(lambda p: (p[0], p[0] + p[1])),
    max_size=20,
)


@given(intervals=intervals_strategy, data=st.data())
def test_lease_fraction_matches_brute_force(
    intervals: list[tuple[int, int]], data: st.DataObject
) -> None:
    """Overlaps never double count: compare against covering unit cells of [50, 150)."""
    covered = {c for s, e in intervals for c in range(max(s, 50), min(e, 150))}
    frac = lease_fraction(intervals, 50, 150)
    assert frac == pytest.approx(len(covered) / 100)
    assert 0.0 <= frac <= 1.0
    assert lease_fraction(intervals * 2, 50, 150) == frac
    assert lease_fraction(data.draw(st.permutations(intervals)), 50, 150) == frac
    assert frac <= sum(lease_fraction([iv], 50, 150) for iv in intervals) + 1e-12


# --------------------------------------------------------------------------------------------
# Challenge
# --------------------------------------------------------------------------------------------


def test_participation() -> None:
    assert participation(0, 36) == 0.0
    assert participation(18, 36) == 0.5
    assert participation(36, 36) == 1.0
    assert participation(50, 36) == 1.0
    assert participation(18, 36, leased_share=0.25) == 0.75  # leased time credited
    assert participation(0, 36, leased_share=1.0) == 1.0
    with pytest.raises(ScoringError):
        participation(-1, 36)
    with pytest.raises(ScoringError):
        participation(1, 0)


def test_throughput_statistic_is_median() -> None:
    assert throughput_statistic([]) is None
    assert throughput_statistic([5.0]) == 5.0
    assert throughput_statistic([3.0, 1.0, 2.0]) == 2.0
    assert throughput_statistic([1.0, 2.0, 3.0, 100.0]) == 2.5
    # consistency beats peaks
    steady = throughput_statistic([10.0, 10.0, 10.0])
    peaky = throughput_statistic([1.0, 1.0, 100.0])
    assert steady is not None and peaky is not None and steady > peaky
    with pytest.raises(ScoringError):
        throughput_statistic([-1.0])
    with pytest.raises(ScoringError):
        throughput_statistic([math.nan])
    big = throughput_statistic([1.7e308, 1.7e308])
    assert big is not None and math.isfinite(big)


def test_percentile_ranks() -> None:
    assert percentile_ranks({"a": 1.0, "b": 2.0, "c": 3.0, "d": None}) == {
        "a": pytest.approx(1 / 3),
        "b": pytest.approx(2 / 3),
        "c": 1.0,
        "d": 0.0,
    }
    ties = percentile_ranks({"a": 2.0, "b": 2.0, "c": 1.0})
    assert ties["a"] == ties["b"] == 1.0
    assert ties["c"] == pytest.approx(1 / 3)
    assert percentile_ranks({"only": 1e9}) == {"only": 1.0}
    assert percentile_ranks({"x": None, "y": None}) == {"x": 0.0, "y": 0.0}
    assert percentile_ranks({}) == {}


@given(
    st.dictionaries(
        st.integers(0, 50), st.one_of(st.none(), st.integers(0, 5).map(float)), max_size=30
    )
)
def test_percentile_ranks_properties(stats: dict[int, float | None]) -> None:
    ranks = percentile_ranks(stats)
    assert ranks.keys() == stats.keys()
    for k, r in ranks.items():
        assert 0.0 <= r <= 1.0
        assert (r == 0.0) == (stats[k] is None)
    for a, sa in stats.items():
        for b, sb in stats.items():
            if sa is not None and sb is not None:
                if sa == sb:
                    assert ranks[a] == ranks[b]  # ties equal
                elif sa < sb:
                    assert ranks[a] < ranks[b]
    present = [s for s in stats.values() if s is not None]
    if present:
        assert all(ranks[k] == 1.0 for k, s in stats.items() if s == max(present))


def test_challenge_score() -> None:
    assert challenge_score(1.0, 0.5) == 0.75
    assert challenge_score(0.0, 0.0) == 0.0
    assert challenge_score(1.0, 1.0) == 1.0
    p = ScoringParams(split_baseline=0.7, split_rank=0.3)
    assert challenge_score(0.5, 1.0, p) == pytest.approx(0.35 + 0.3)


def test_worker_score() -> None:
    assert worker_score(0.5, 0.75, 0.8) == pytest.approx((0.9 * 0.5 + 0.1 * 0.75) * 0.8)
    assert worker_score(1.0, 1.0, 1.0) == 1.0
    assert worker_score(1.0, 1.0, 0.0) == 0.0
    p = ScoringParams(w_lease=0.7, w_challenge=0.3)
    assert worker_score(0.0, 1.0, 1.0, p) == pytest.approx(0.3)


unit = st.floats(0.0, 1.0)


@given(lease=unit, challenge=unit, a1=unit, a2=unit, l2=unit, c2=unit)
def test_worker_score_monotone_and_bounded(
    lease: float, challenge: float, a1: float, a2: float, l2: float, c2: float
) -> None:
    s = worker_score(lease, challenge, a1)
    assert 0.0 <= s <= 1.0
    lo, hi = sorted((a1, a2))
    assert worker_score(lease, challenge, lo) <= worker_score(lease, challenge, hi)
    lo, hi = sorted((lease, l2))
    assert worker_score(lo, challenge, a1) <= worker_score(hi, challenge, a1)
    lo, hi = sorted((challenge, c2))
    assert worker_score(lease, lo, a1) <= worker_score(lease, hi, a1)


# --------------------------------------------------------------------------------------------
# Miner and weights
# --------------------------------------------------------------------------------------------


def test_miner_score_sums() -> None:
    total = miner_score({"w1": 0.5, "w2": 0.25})
    assert total.raw == 0.75
    assert total.score == 0.75
    assert not total.capped
    assert total.counted == ("w1", "w2")
    assert total.dropped == ()


def test_miner_score_top_100_only() -> None:
    scores = {f"w{i:03d}": 1.0 for i in range(100)} | {f"x{i}": 0.5 for i in range(7)}
    total = miner_score(scores)
    assert total.raw == 100.0
    assert total.score == 100.0
    assert len(total.counted) == 100
    assert set(total.dropped) == {f"x{i}" for i in range(7)}


def test_miner_score_cap_and_ties() -> None:
    p = ScoringParams(miner_score_cap=1.5, max_workers_per_miner=3)
    total = miner_score({"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}, p)
    assert (total.raw, total.score, total.capped) == (3.0, 1.5, True)
    assert total.counted == ("a", "b", "c")  # ties broken by worker id
    assert total.dropped == ("d",)
    assert miner_score({}).score == 0.0


@given(
    scores=st.lists(unit, max_size=130),
    cap=st.floats(0.1, 200.0),
    k=st.integers(1, 120),
)
def test_miner_score_properties(scores: list[float], cap: float, k: int) -> None:
    p = ScoringParams(miner_score_cap=cap, max_workers_per_miner=k)
    total = miner_score({f"w{i}": s for i, s in enumerate(scores)}, p)
    top = sorted(scores, reverse=True)[:k]
    assert total.score <= cap
    assert total.score == pytest.approx(min(cap, math.fsum(top)))
    assert len(total.counted) == min(k, len(scores))
    assert len(total.counted) + len(total.dropped) == len(scores)


def test_normalize_weights() -> None:
    assert normalize_weights({"b": 3.0, "a": 1.0}) == {"a": 0.25, "b": 0.75}
    assert list(normalize_weights({"b": 3.0, "a": 1.0, "c": 0.0})) == ["a", "b", "c"]
    assert normalize_weights({"a": 0.0, "b": 0.0}) == {}
    assert normalize_weights({}) == {}
    with pytest.raises(ScoringError):
        normalize_weights({"a": -1.0})


@given(st.dictionaries(st.text(min_size=1, max_size=4), st.floats(0.0, 100.0), max_size=40))
def test_normalize_weights_properties(scores: dict[str, float]) -> None:
    weights = normalize_weights(scores)
    if all(s == 0.0 for s in scores.values()):
        assert weights == {}
        return
    assert math.fsum(weights.values()) == pytest.approx(1.0)
    assert list(weights) == sorted(scores)
    for a in scores:
        assert 0.0 <= weights[a] <= 1.0
        for b in scores:
            if scores[a] <= scores[b]:
                assert weights[a] <= weights[b]


# --------------------------------------------------------------------------------------------
# Whole network
# --------------------------------------------------------------------------------------------


def test_score_network_hand_computed() -> None:
    now = T0
    lease = (now - 3 * HOUR, now)  # leased for the whole challenge window
    result = score_network(
        [
            WorkerInput(
                miner_hotkey="hk-b",
                worker_id="w1",
                availability=1.0,
                throughputs=[1e12],
                successes=18,
            ),
            WorkerInput(
                miner_hotkey="hk-a",
                worker_id="w2",
                availability=0.5,
                lease_intervals=[lease],
            ),
            WorkerInput(
                miner_hotkey="hk-a",
                worker_id="w1",
                availability=1.0,
                throughputs=[1e12, 3e12, 2e12],
                successes=36,
                failures=4,
            ),
            WorkerInput(miner_hotkey="hk-c", worker_id="idle"),
        ],
        now=now,
    )
    by = {(w.miner_hotkey, w.worker_id): w for w in result.workers}
    assert list(by) == [("hk-a", "w1"), ("hk-a", "w2"), ("hk-b", "w1"), ("hk-c", "idle")]
    assert result.rank_pool == 2

    a1 = by["hk-a", "w1"]
    assert (a1.throughput, a1.rank, a1.participation, a1.failures) == (2e12, 1.0, 1.0, 4)
    assert a1.challenge == 1.0
    assert a1.score == pytest.approx(0.1)

    a2 = by["hk-a", "w2"]
    assert a2.leased_seconds == 3 * HOUR
    assert a2.lease == pytest.approx(10_800 / 608_400)
    assert a2.challenge_leased_share == 1.0
    assert (a2.participation, a2.rank, a2.throughput, a2.challenge) == (1.0, 0.0, None, 0.5)
    assert a2.score == pytest.approx((0.9 * 10_800 / 608_400 + 0.1 * 0.5) * 0.5)

    b1 = by["hk-b", "w1"]
    assert (b1.participation, b1.rank, b1.challenge) == (0.5, 0.5, 0.5)
    assert b1.score == pytest.approx(0.05)

    idle = by["hk-c", "idle"]
    assert (idle.score, idle.availability, idle.present_buckets) == (0.0, 0.0, None)

    miners = {m.miner_hotkey: m for m in result.miners}
    assert miners["hk-a"].score == pytest.approx(a1.score + a2.score)
    assert miners["hk-a"].workers == miners["hk-a"].counted_workers == 2
    total = a1.score + a2.score + b1.score
    assert result.weights == {
        "hk-a": pytest.approx((a1.score + a2.score) / total),
        "hk-b": pytest.approx(b1.score / total),
        "hk-c": 0.0,
    }
    assert [m.weight for m in result.miners] == list(result.weights.values())
    assert all(w.counted for w in result.workers)
    # the whole explanation is plain JSON for byteleapctl
    decoded = msgspec.json.decode(msgspec.json.encode(result))
    assert decoded["workers"][0]["rank"] == 1.0


def test_score_network_with_bitmap() -> None:
    bm = AvailabilityBitmap.empty()
    for i in range(N // 2):
        bm = bm.mark(T0 - i * B)
    result = score_network(
        [WorkerInput(miner_hotkey="m", worker_id="w", availability=bm, successes=36)], now=T0
    )
    w = result.workers[0]
    assert (w.present_buckets, w.window_buckets, w.availability) == (1014, 2028, 0.5)
    assert w.rank == 0.0
    assert w.score == pytest.approx(0.1 * 0.5 * 0.5)
    assert result.weights == {"m": 1.0}


def test_score_network_all_zero_gives_no_weights() -> None:
    result = score_network(
        [WorkerInput(miner_hotkey=f"m{i}", worker_id="w", successes=36) for i in range(3)],
        now=T0,
    )
    assert result.weights == {}
    assert all(m.weight == 0.0 for m in result.miners)
    assert score_network([], now=T0).weights == {}


def test_score_network_rejects_bad_input() -> None:
    w = WorkerInput(miner_hotkey="m", worker_id="w", availability=1.0)
    with pytest.raises(ScoringError, match="given twice"):
        score_network([w, w], now=T0)
    odd = AvailabilityBitmap(bucket_seconds=60, n_buckets=N)
    with pytest.raises(ScoringError, match="geometry"):
        score_network([WorkerInput(miner_hotkey="m", worker_id="w", availability=odd)], now=T0)
    with pytest.raises(ScoringError, match="non-empty"):
        WorkerInput(miner_hotkey="", worker_id="w")
    with pytest.raises(ScoringError, match="throughputs"):
        WorkerInput(miner_hotkey="m", worker_id="w", throughputs=[-1.0])
    with pytest.raises(ScoringError, match="ends before"):
        WorkerInput(miner_hotkey="m", worker_id="w", lease_intervals=[(2.0, 1.0)])
    with pytest.raises(ScoringError, match="successes"):
        WorkerInput(miner_hotkey="m", worker_id="w", successes=-1)
    with pytest.raises(ScoringError, match="finite"):
        WorkerInput(miner_hotkey="m", worker_id="w", availability=math.nan)


def test_score_network_top_100_workers() -> None:
    workers = [
        WorkerInput(
            miner_hotkey="big", worker_id=f"w{i:03d}", availability=(i + 1) / 105, successes=36
        )
        for i in range(105)
    ]
    result = score_network(workers, now=T0)
    dropped = {w.worker_id for w in result.workers if not w.counted}
    assert dropped == {f"w{i:03d}" for i in range(5)}  # the five least available
    (miner,) = result.miners
    assert (miner.workers, miner.counted_workers) == (105, 100)
    assert miner.raw == pytest.approx(math.fsum(w.score for w in result.workers if w.counted))


# Bitmaps with the default geometry; the head may lie behind or (clock skew) ahead of T0.
bitmaps = st.builds(
    AvailabilityBitmap,
    head=st.integers(T0 // B - N - 10, T0 // B + 10),
    bits=st.one_of(st.integers(0, (1 << N) - 1), st.just((1 << N) - 1), st.just(0)),
)

worker_inputs = st.builds(
    WorkerInput,
    miner_hotkey=st.sampled_from(["m1", "m2", "m3"]),
    worker_id=st.sampled_from([f"w{i}" for i in range(8)]),
    availability=st.one_of(unit, bitmaps),
    lease_intervals=st.lists(
        st.tuples(st.integers(-2 * WINDOW, 0), st.integers(0, WINDOW)).map(
            lambda p: (T0 + p[0], T0 + p[0] + p[1])
        ),
        max_size=3,
    ),
    throughputs=st.lists(st.floats(0.0, 1e16), max_size=4),
    successes=st.integers(0, 60),
    failures=st.integers(0, 10),
)


def unique(ws: list[WorkerInput]) -> list[WorkerInput]:
    seen: dict[tuple[str, str], WorkerInput] = {}
    for w in ws:
        seen.setdefault((w.miner_hotkey, w.worker_id), w)
    return list(seen.values())


@settings(max_examples=60, deadline=None)
@given(st.lists(worker_inputs, max_size=12).map(unique), st.randoms(use_true_random=False))
def test_score_network_properties(ws: list[WorkerInput], rnd: random.Random) -> None:
    result = score_network(ws, now=T0)
    given_avail = {(w.miner_hotkey, w.worker_id): w.availability for w in ws}
    for w in result.workers:
        avail = given_avail[w.miner_hotkey, w.worker_id]
        if isinstance(avail, AvailabilityBitmap):
            assert w.present_buckets == avail.present_buckets(T0)
            assert w.availability == avail.availability(T0)
        else:
            assert w.present_buckets is None
        for f in (
            w.availability,
            w.lease,
            w.challenge_leased_share,
            w.participation,
            w.rank,
            w.challenge,
            w.score,
        ):
            assert 0.0 <= f <= 1.0
    for m in result.miners:
        assert 0.0 <= m.score <= DEFAULT_PARAMS.miner_score_cap
    if result.weights:
        assert math.fsum(result.weights.values()) == pytest.approx(1.0)
    else:
        assert all(m.score == 0.0 for m in result.miners)
    shuffled = list(ws)
    rnd.shuffle(shuffled)
    assert score_network(shuffled, now=T0) == result  # input order does not matter


@settings(max_examples=60, deadline=None)
@given(
    others=st.lists(worker_inputs, max_size=6).map(unique),
    base=worker_inputs,
    more_avail=unit,
    more_lease=st.integers(0, WINDOW),
    more_successes=st.integers(0, 40),
)
def test_worker_score_monotone_in_inputs(
    others: list[WorkerInput],
    base: WorkerInput,
    more_avail: float,
    more_lease: int,
    more_successes: int,
) -> None:
    """More availability, more leased time or more successes never lower a worker's score."""
    avail = base.availability
    if isinstance(avail, AvailabilityBitmap):
        avail = avail.availability(T0)
    me = WorkerInput(
        miner_hotkey="me",
        worker_id="x",
        availability=avail,
        lease_intervals=base.lease_intervals,
        throughputs=base.throughputs,
        successes=base.successes,
    )
    assert isinstance(me.availability, float)
    better = WorkerInput(
        miner_hotkey="me",
        worker_id="x",
        availability=min(1.0, me.availability + more_avail),
        lease_intervals=[*me.lease_intervals, (T0 - more_lease, T0)],
        throughputs=me.throughputs,
        successes=me.successes + more_successes,
    )

    def score(w: WorkerInput) -> float:
        res = score_network([*others, w], now=T0)
        return next(s.score for s in res.workers if s.miner_hotkey == "me")

    assert score(better) >= score(me)


def test_short_devnet_windows_are_whole_seconds() -> None:
    params = ScoringParams(
        window_hours=0.05,
        bucket_seconds=5,
        challenge_window_minutes=1.5,
        challenge_interval_seconds=5,
    )
    assert (params.window_seconds, params.window_buckets) == (180, 36)
    assert params.challenge_window_seconds == 90
    with pytest.raises(ScoringError, match="window_hours"):
        ScoringParams(window_hours=0.0001)  # 0.36 s
    with pytest.raises(ScoringError, match="challenge_window_minutes"):
        ScoringParams(challenge_window_minutes=0.501)  # 30.06 s
