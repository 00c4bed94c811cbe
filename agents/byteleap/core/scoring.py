"""Validator scoring: pure functions from measured facts to miner weights (DESIGN §5).

Nothing here reads a clock, a file or a database: the caller passes ``now`` (unix seconds) and the
facts it has verified. Every intermediate factor comes back in a typed result, so ``byteleapctl
scores`` can show why a miner got its weight.

The pipeline, per worker and then per miner::

    availability = present 5-minute buckets in the last 169 h / 2028            ∈ [0, 1]
    lease        = leased seconds in the last 169 h / window seconds            ∈ [0, 1]
    participation= min(1, successes / baseline + leased share of challenge window)
    rank         = share of challenged workers whose median FLOP/s ≤ this one's ∈ [0, 1]
    challenge    = b · participation + r · rank            (b + r = 1)         ∈ [0, 1]
    worker_score = (l · lease + c · challenge) · availability  (l + c = 1)     ∈ [0, 1]
    miner_score  = min(cap, Σ of its top-100 worker scores)
    weight       = miner_score / Σ miner_score          (empty when every score is 0)

Lessons from ByteLeap's ranker, and what we do instead:

* It re-read every heartbeat row of the last 169 h on every cycle. Availability here is a 2028-bit
  bitmap per worker (254 bytes) that is updated once per heartbeat and counted with a few big-int
  operations.
* It averaged lease over all workers and, as soon as a miner had any lease, replaced its challenge
  score with the network average. Here both factors are per worker. Leased workers are not
  challenged, so leased time in the challenge window is credited to participation at the baseline
  rate: being rented never lowers a worker's score.
* It ranked on ``1/t`` of single challenges, which magnifies noise and rewards one lucky peak. Here
  the rank uses the median verified FLOP/s of each worker, so consistency beats peaks, and it is a
  percentile, so scale does not matter.
* When every score was 0 it gave every miner ``1/n``: emission for doing nothing. Here the weights
  are then empty and the caller skips the submission.
"""

from __future__ import annotations

import functools
import math
import struct
from bisect import bisect_right
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple, TypeVar

import msgspec

__all__ = [
    "DEFAULT_PARAMS",
    "AvailabilityBitmap",
    "LeaseInterval",
    "MinerScore",
    "MinerTotal",
    "NetworkScore",
    "ScoringError",
    "ScoringParams",
    "WorkerInput",
    "WorkerScore",
    "availability_ratio",
    "challenge_score",
    "lease_fraction",
    "miner_score",
    "normalize_weights",
    "participation",
    "percentile_ranks",
    "score_network",
    "throughput_statistic",
    "worker_score",
]

K = TypeVar("K", bound=Hashable)


class ScoringError(ValueError):
    """Invalid scoring parameters or inputs (a bug or a misconfiguration upstream, never noise)."""


def _finite(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ScoringError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ScoringError(f"{name} must be a positive integer, got {value!r}")
    return value


def _whole_seconds(name: str, value: float, unit_seconds: int) -> None:
    """``value`` units must be a positive whole number of seconds (fractions: short devnets)."""
    seconds = _finite(name, value) * unit_seconds
    if seconds < 1.0 or abs(seconds - round(seconds)) > 1e-6:
        raise ScoringError(f"{name} must be a positive whole number of seconds, got {value!r}")


def _non_negative_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ScoringError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def _clamp01(value: float) -> float:
    return 0.0 if value < 0.0 else 1.0 if value > 1.0 else value


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


class ScoringParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Scoring knobs; validated on construction and when decoded from config.

    Weight pairs are relative: ``w_lease``/``w_challenge`` and ``split_baseline``/``split_rank``
    are each divided by their sum, so only the ratio matters and every factor stays in [0, 1].
    That keeps ``miner_score_cap`` meaningful: 100 means "100 perfect workers".

    Defaults: lease 0.9 / challenge 0.1 (the newest seed; 0.7/0.3 is ByteLeap's older split);
    challenge split 0.5 participation / 0.5 rank, so a worker that shows up reliably earns half the
    challenge factor and speed earns the other half; 169 h of 300 s buckets (2028); participation
    baseline ``(180 min · 60 / 240 s) · 0.8 = 36`` verified successes, as in ByteLeap.
    """

    w_lease: float = 0.9
    w_challenge: float = 0.1
    window_hours: float = 169
    bucket_seconds: int = 300
    challenge_window_minutes: float = 180
    challenge_interval_seconds: float = 240.0
    participation_threshold: float = 0.8
    split_baseline: float = 0.5
    split_rank: float = 0.5
    max_workers_per_miner: int = 100
    miner_score_cap: float = 100.0

    def __post_init__(self) -> None:
        for name in ("w_lease", "w_challenge", "split_baseline", "split_rank"):
            if _finite(name, getattr(self, name)) < 0.0:
                raise ScoringError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.w_lease + self.w_challenge <= 0.0:
            raise ScoringError("w_lease + w_challenge must be > 0")
        if self.split_baseline + self.split_rank <= 0.0:
            raise ScoringError("split_baseline + split_rank must be > 0")
        _whole_seconds("window_hours", self.window_hours, 3600)
        _positive_int("bucket_seconds", self.bucket_seconds)
        if self.window_seconds % self.bucket_seconds:
            raise ScoringError(
                f"window_hours·3600 ({self.window_seconds} s) must be a multiple of "
                f"bucket_seconds ({self.bucket_seconds})"
            )
        _whole_seconds("challenge_window_minutes", self.challenge_window_minutes, 60)
        if _finite("challenge_interval_seconds", self.challenge_interval_seconds) <= 0.0:
            raise ScoringError("challenge_interval_seconds must be > 0")
        threshold = _finite("participation_threshold", self.participation_threshold)
        if not 0.0 < threshold <= 1.0:
            raise ScoringError(f"participation_threshold must be in (0, 1], got {threshold!r}")
        if self.challenge_interval_seconds > self.challenge_window_minutes * 60:
            raise ScoringError("challenge_interval_seconds must not exceed the challenge window")
        _positive_int("max_workers_per_miner", self.max_workers_per_miner)
        if _finite("miner_score_cap", self.miner_score_cap) <= 0.0:
            raise ScoringError("miner_score_cap must be > 0")

    @property
    def window_seconds(self) -> int:
        """Length of the availability and lease window (169 h = 608 400 s)."""
        return round(self.window_hours * 3600)

    @property
    def window_buckets(self) -> int:
        """Buckets in the availability window: ``window_seconds / bucket_seconds`` (2028)."""
        return self.window_seconds // self.bucket_seconds

    @property
    def challenge_window_seconds(self) -> int:
        """Length of the window whose verified challenges count (180 min = 10 800 s)."""
        return round(self.challenge_window_minutes * 60)

    @property
    def participation_baseline(self) -> float:
        """Successes that earn full participation: ``window / interval · threshold`` (36)."""
        return (
            self.challenge_window_seconds
            / self.challenge_interval_seconds
            * self.participation_threshold
        )

    @property
    def lease_weight(self) -> float:
        """``w_lease / (w_lease + w_challenge)``."""
        return self.w_lease / (self.w_lease + self.w_challenge)

    @property
    def challenge_weight(self) -> float:
        """``w_challenge / (w_lease + w_challenge)``."""
        return self.w_challenge / (self.w_lease + self.w_challenge)

    @property
    def baseline_share(self) -> float:
        """``split_baseline / (split_baseline + split_rank)``."""
        return self.split_baseline / (self.split_baseline + self.split_rank)

    @property
    def rank_share(self) -> float:
        """``split_rank / (split_baseline + split_rank)``."""
        return self.split_rank / (self.split_baseline + self.split_rank)


DEFAULT_PARAMS: Final = ScoringParams()


# --------------------------------------------------------------------------------------------
# Availability
# --------------------------------------------------------------------------------------------

_BITMAP_MAGIC: Final = b"BLAV"
_BITMAP_VERSION: Final = 1
_BITMAP_HEADER: Final = struct.Struct("<4sBIIq")  # magic, version, bucket_s, n_buckets, head


_I64_MIN: Final = -(1 << 63)
_I64_MAX: Final = (1 << 63) - 1
_U32_MAX: Final = (1 << 32) - 1


@functools.lru_cache(maxsize=16)
def _low_mask(n_bits: int) -> int:
    """``2**n_bits - 1``, cached: a window's mask is reused by every mark of every bitmap."""
    return (1 << n_bits) - 1


def _bucket_of(unix_time: float, bucket_seconds: int) -> int:
    _finite("unix_time", unix_time)
    return int(unix_time // bucket_seconds)  # floor division is exact for int and float


@dataclass(frozen=True, slots=True)
class AvailabilityBitmap:
    """Presence of one worker in the last ``n_buckets`` buckets of ``bucket_seconds``.

    Bucket ``b`` holds unix times ``[b·bucket_seconds, (b+1)·bucket_seconds)``. Bit ``k`` of
    ``bits`` (least significant first) is bucket ``head - k``; only ``k < n_buckets`` exist, so a
    bucket ages out as soon as a newer mark pushes it past the window. Immutable: :meth:`mark`
    returns a new bitmap. Every operation is a handful of big-int operations over at most
    ``n_buckets`` bits, independent of how many heartbeats were seen.

    Stored with :meth:`to_bytes` (21-byte header + 254 bytes for 2028 buckets).
    """

    bucket_seconds: int = 300
    n_buckets: int = 2028
    head: int = 0
    bits: int = 0

    def __post_init__(self) -> None:
        if _positive_int("bucket_seconds", self.bucket_seconds) > _U32_MAX:
            raise ScoringError("bucket_seconds must fit in 32 bits")
        if _positive_int("n_buckets", self.n_buckets) > _U32_MAX:
            raise ScoringError("n_buckets must fit in 32 bits")
        if isinstance(self.head, bool) or not isinstance(self.head, int):
            raise ScoringError(f"head must be an integer, got {self.head!r}")
        if not _I64_MIN <= self.head <= _I64_MAX:
            raise ScoringError(f"head bucket {self.head} out of the 64-bit range")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ScoringError(f"bits must be an integer, got {self.bits!r}")
        if self.bits < 0 or self.bits.bit_length() > self.n_buckets:
            raise ScoringError(f"bits must fit in n_buckets={self.n_buckets} bits")

    @classmethod
    def empty(cls, params: ScoringParams = DEFAULT_PARAMS) -> AvailabilityBitmap:
        """A bitmap with the geometry of ``params`` and no bucket present."""
        return cls(bucket_seconds=params.bucket_seconds, n_buckets=params.window_buckets)

    def bucket(self, unix_time: float) -> int:
        """Absolute bucket index of ``unix_time``: ``floor(t / bucket_seconds)``."""
        return _bucket_of(unix_time, self.bucket_seconds)

    def mark(self, unix_time: float) -> AvailabilityBitmap:
        """Record that the worker was seen at ``unix_time``; return the updated bitmap.

        A newer bucket moves the head forward and drops what falls out of the window; a bucket
        already older than the window is ignored (returns ``self``). Mark with the validator's
        own receive time, never a peer-supplied timestamp: a time far in the future would push
        the whole history out of the window.
        """
        b = self.bucket(unix_time)
        if self.bits == 0:
            return AvailabilityBitmap(self.bucket_seconds, self.n_buckets, b, 1)
        if b > self.head:
            shift = b - self.head
            kept = (self.bits << shift) & _low_mask(self.n_buckets) if shift < self.n_buckets else 0
            return AvailabilityBitmap(self.bucket_seconds, self.n_buckets, b, kept | 1)
        k = self.head - b
        if k >= self.n_buckets or self.bits >> k & 1:
            return self
        return AvailabilityBitmap(
            self.bucket_seconds, self.n_buckets, self.head, self.bits | 1 << k
        )

    def is_present(self, unix_time: float) -> bool:
        """Whether the bucket of ``unix_time`` is marked (False once it has aged out)."""
        k = self.head - self.bucket(unix_time)
        return 0 <= k < self.n_buckets and bool(self.bits >> k & 1)

    def _count_buckets(self, first: int, last: int) -> int:
        """Marked buckets with absolute index in ``[first, last]``."""
        k_lo = max(self.head - last, 0)
        k_hi = min(self.head - first, self.n_buckets - 1)
        if k_lo > k_hi:
            return 0
        return ((self.bits >> k_lo) & ((1 << (k_hi - k_lo + 1)) - 1)).bit_count()

    def present_buckets(self, now: float) -> int:
        """Marked buckets among the ``n_buckets`` most recent ones at ``now``.

        The window is the ``n_buckets`` buckets ending with the current one. While the current
        bucket is still in progress and not yet marked it is not held against the worker: the
        window then ends with the previous bucket instead. So a worker that is always online
        has exactly ``n_buckets`` present, not ``n_buckets - 1`` for the first minute of every
        bucket. Marks more than ``n_buckets`` (+1 in that case) buckets old never count.
        """
        now_b = self.bucket(now)
        last = now_b if self.is_present(now) else now_b - 1
        return self._count_buckets(last - self.n_buckets + 1, last)

    def availability(self, now: float) -> float:
        """``present_buckets(now) / n_buckets``, in [0, 1]."""
        return availability_ratio(self.present_buckets(now), self.n_buckets)

    def resized(self, n_buckets: int) -> AvailabilityBitmap:
        """The same history in a window of ``n_buckets`` (for a changed ``window_hours``).

        Growing keeps every bucket (older ones were already dropped); shrinking drops the oldest.
        A different ``bucket_seconds`` cannot be converted: start from :meth:`empty` instead.
        """
        _positive_int("n_buckets", n_buckets)
        return AvailabilityBitmap(
            self.bucket_seconds, n_buckets, self.head, self.bits & ((1 << n_buckets) - 1)
        )

    def to_bytes(self) -> bytes:
        """Serialise: ``"BLAV" | u8 version | u32 bucket_s | u32 n | i64 head | bits (LE)``."""
        header = _BITMAP_HEADER.pack(
            _BITMAP_MAGIC, _BITMAP_VERSION, self.bucket_seconds, self.n_buckets, self.head
        )
        return header + self.bits.to_bytes((self.n_buckets + 7) // 8, "little")

    @classmethod
    def from_bytes(cls, data: bytes) -> AvailabilityBitmap:
        """Inverse of :meth:`to_bytes`; rejects wrong magic, version, length or stray bits."""
        if len(data) < _BITMAP_HEADER.size:
            raise ScoringError(f"availability bitmap too short ({len(data)} bytes)")
        magic, version, bucket_seconds, n_buckets, head = _BITMAP_HEADER.unpack_from(data)
        if magic != _BITMAP_MAGIC:
            raise ScoringError("not an availability bitmap (bad magic)")
        if version != _BITMAP_VERSION:
            raise ScoringError(f"unsupported availability bitmap version {version}")
        expected = _BITMAP_HEADER.size + (n_buckets + 7) // 8
        if len(data) != expected:
            raise ScoringError(f"availability bitmap is {len(data)} bytes, expected {expected}")
        bits = int.from_bytes(data[_BITMAP_HEADER.size :], "little")
        return cls(bucket_seconds, n_buckets, head, bits)


def availability_ratio(present_buckets: int, window_buckets: int) -> float:
    """``clamp(present_buckets / window_buckets, 0, 1)``: the share of the window seen online."""
    _non_negative_int("present_buckets", present_buckets)
    _positive_int("window_buckets", window_buckets)
    return _clamp01(present_buckets / window_buckets)


# --------------------------------------------------------------------------------------------
# Lease
# --------------------------------------------------------------------------------------------


class LeaseInterval(NamedTuple):
    """One verified lease ``[start, end)`` in unix seconds; a running lease ends at ``now``."""

    start: float
    end: float


def _check_intervals(intervals: Iterable[tuple[float, float]]) -> None:
    for start, end in intervals:
        if _finite("lease start", start) > _finite("lease end", end):
            raise ScoringError(f"lease interval ends before it starts: ({start!r}, {end!r})")


def _union_seconds(
    intervals: Iterable[tuple[float, float]], window_start: float, window_end: float
) -> float:
    """Seconds of ``[window_start, window_end]`` covered by the union of already checked
    intervals (finite, ``start <= end``): clip, sort, merge, sum."""
    clipped: list[tuple[float, float]] = []
    for start, end in intervals:
        s, e = max(float(start), window_start), min(float(end), window_end)
        if e > s:
            clipped.append((s, e))
    clipped.sort()
    total = 0.0
    cur_s = cur_e = -math.inf
    for s, e in clipped:
        if s > cur_e:
            if cur_e > cur_s:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        elif e > cur_e:
            cur_e = e
    if cur_e > cur_s:
        total += cur_e - cur_s
    return total


def _union_fraction(
    intervals: Iterable[tuple[float, float]], window_start: float, window_end: float
) -> float:
    """:func:`lease_fraction` of already checked intervals over a finite window."""
    if window_end <= window_start:
        raise ScoringError(f"empty lease window [{window_start!r}, {window_end!r}]")
    return _clamp01(
        _union_seconds(intervals, window_start, window_end) / (window_end - window_start)
    )


def lease_fraction(
    intervals: Iterable[tuple[float, float]], window_start: float, window_end: float
) -> float:
    """``|union(intervals) ∩ [window_start, window_end]| / (window_end - window_start)``, in [0,1].

    Time-weighted, so a worker rented for half the week scores 0.5. Intervals are clipped to the
    window and merged first: overlapping or duplicated records (two validators' copies, a renewal
    that overlaps its predecessor) never count the same second twice. O(k log k) in the number
    of intervals. An interval with ``end < start`` or a non-finite bound is an upstream bug and
    raises :class:`ScoringError`.
    """
    ws, we = _finite("window_start", window_start), _finite("window_end", window_end)
    if we <= ws:
        raise ScoringError(f"empty lease window [{window_start!r}, {window_end!r}]")
    intervals = list(intervals)  # may be an iterator: checked, then read again
    _check_intervals(intervals)
    return _union_fraction(intervals, ws, we)


# --------------------------------------------------------------------------------------------
# Challenge
# --------------------------------------------------------------------------------------------


def participation(successes: int, baseline: float, leased_share: float = 0.0) -> float:
    """``min(1, successes / baseline + leased_share)``, in [0, 1].

    ``successes`` counts verified, successful challenges in the challenge window. A failed or
    unanswered challenge is simply not a success: it earns nothing and is not subtracted, so a
    transient fault costs exactly one challenge's worth and nothing more. ``leased_share`` is the
    leased fraction of the challenge window: leased workers are not challenged, so that time is
    credited at the baseline rate (ByteLeap instead swapped in the network average for the whole
    miner as soon as one worker was leased).
    """
    _non_negative_int("successes", successes)
    if _finite("baseline", baseline) <= 0.0:
        raise ScoringError("baseline must be > 0")
    share = _clamp01(_finite("leased_share", leased_share))
    return _clamp01(successes / baseline + share)


def throughput_statistic(throughputs: Sequence[float]) -> float | None:
    """Median of a worker's verified FLOP/s, or ``None`` if it has none.

    The median, not the mean or the best, so a steady worker beats one that is fast once and
    slow otherwise, and a single outlier (a lucky timing) moves nothing.
    """
    if not throughputs:
        return None
    values = sorted(_finite("throughput", t) for t in throughputs)
    if values[0] < 0.0:
        raise ScoringError("throughputs must be >= 0")
    mid = len(values) // 2
    if len(values) % 2:
        return values[mid]
    lo, hi = values[mid - 1], values[mid]
    return lo + (hi - lo) / 2  # no overflow for non-negative values


def percentile_ranks(statistics: Mapping[K, float | None]) -> dict[K, float]:
    """Rank each key by its statistic: ``#{v : s_v ≤ s_k} / N`` over the N keys with one.

    The empirical CDF: the fastest worker (and all workers tied with it) get 1.0, a single
    challenged worker gets 1.0, ties get equal ranks, and a worker that was challenged at all gets
    at least ``1/N``. Keys whose statistic is ``None`` (no verified success) get 0 and are left
    out of N, so idle or failing workers do not inflate anyone's rank. Order-independent.
    """
    pool = sorted(s for s in statistics.values() if s is not None)
    n = len(pool)
    return {key: (0.0 if s is None else bisect_right(pool, s) / n) for key, s in statistics.items()}


def challenge_score(
    participation: float, rank: float, params: ScoringParams = DEFAULT_PARAMS
) -> float:
    """``baseline_share · participation + rank_share · rank``, in [0, 1] (default 0.5/0.5)."""
    p = _clamp01(_finite("participation", participation))
    r = _clamp01(_finite("rank", rank))
    return _clamp01(params.baseline_share * p + params.rank_share * r)


def worker_score(
    lease: float, challenge: float, availability: float, params: ScoringParams = DEFAULT_PARAMS
) -> float:
    """``(lease_weight · lease + challenge_weight · challenge) · availability``, in [0, 1].

    Availability multiplies both parts: a worker that is rarely reachable is worth little to a
    renter whatever it did while it was up.
    """
    lease_v = _clamp01(_finite("lease", lease))
    challenge_v = _clamp01(_finite("challenge", challenge))
    avail = _clamp01(_finite("availability", availability))
    return _clamp01((params.lease_weight * lease_v + params.challenge_weight * challenge_v) * avail)


# --------------------------------------------------------------------------------------------
# Miner and weights
# --------------------------------------------------------------------------------------------


class MinerTotal(msgspec.Struct, frozen=True, kw_only=True):
    """Result of :func:`miner_score`."""

    raw: float
    """Σ of the counted worker scores, before the cap."""
    score: float
    """``min(cap, raw)``."""
    capped: bool
    counted: tuple[str, ...]
    """Worker ids that were summed (best first)."""
    dropped: tuple[str, ...]
    """Worker ids beyond ``max_workers_per_miner`` (best first)."""


def miner_score(
    worker_scores: Mapping[str, float], params: ScoringParams = DEFAULT_PARAMS
) -> MinerTotal:
    """``min(cap, Σ of the top max_workers_per_miner worker scores)`` (100 and 100).

    Workers are taken by score, highest first, ties by worker id, so the result does not depend
    on input order. Registering a 101st worker therefore never helps and never hurts. The sum
    uses ``math.fsum`` (exactly rounded, order-independent).
    """
    for wid, s in worker_scores.items():
        if _finite(f"score of worker {wid!r}", s) < 0.0:
            raise ScoringError(f"score of worker {wid!r} must be >= 0")
    ordered = sorted(worker_scores.items(), key=lambda item: (-item[1], item[0]))
    top = ordered[: params.max_workers_per_miner]
    raw = math.fsum(s for _, s in top)
    return MinerTotal(
        raw=raw,
        score=min(params.miner_score_cap, raw),
        capped=raw > params.miner_score_cap,
        counted=tuple(wid for wid, _ in top),
        dropped=tuple(wid for wid, _ in ordered[params.max_workers_per_miner :]),
    )


def normalize_weights(miner_scores: Mapping[str, float]) -> dict[str, float]:
    """``score_m / Σ score`` for every miner given, keys in sorted order; ``{}`` if all are 0.

    The sum is ``math.fsum`` and division by one positive total is monotone, so the weights sum
    to 1 (to rounding) and never reorder miners. An all-zero network yields an empty mapping and
    the caller skips ``set_weights``: ByteLeap fell back to ``1/n`` for every miner, which paid
    emission to miners that had done nothing.
    """
    for hk, s in miner_scores.items():
        if _finite(f"score of miner {hk!r}", s) < 0.0:
            raise ScoringError(f"score of miner {hk!r} must be >= 0")
    total = math.fsum(miner_scores.values())
    if total <= 0.0:
        return {}
    return {hk: miner_scores[hk] / total for hk in sorted(miner_scores)}


# --------------------------------------------------------------------------------------------
# Whole network
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerInput:
    """What the validator verified about one worker, as of ``now``.

    * ``availability``: the worker's :class:`AvailabilityBitmap` (counted at ``now``) or an
      already computed ratio (clamped to [0, 1]).
    * ``lease_intervals``: verified, gateway-signed leases; anything outside the window is
      ignored, so the caller may pass more than the window.
    * ``successes`` / ``failures``: verified challenge outcomes in the challenge window.
      Failures are reported but only count as non-successes.
    * ``throughputs``: verified FLOP/s (all devices of the worker together) of the successful
      challenges to rank on, normally those of the window. For a worker leased through the
      whole window, pass its latest pre-lease measurements, or it drops to rank 0 while rented.
    """

    miner_hotkey: str
    worker_id: str
    availability: AvailabilityBitmap | float = 0.0
    lease_intervals: Sequence[tuple[float, float]] = ()
    throughputs: Sequence[float] = ()
    successes: int = 0
    failures: int = 0

    def __post_init__(self) -> None:
        for name in ("miner_hotkey", "worker_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ScoringError(f"{name} must be a non-empty string, got {value!r}")
        if not isinstance(self.availability, AvailabilityBitmap):
            _finite("availability", self.availability)
        _non_negative_int("successes", self.successes)
        _non_negative_int("failures", self.failures)
        _check_intervals(self.lease_intervals)
        for t in self.throughputs:
            if _finite("throughput", t) < 0.0:
                raise ScoringError(f"throughputs must be >= 0, got {t!r}")


class WorkerScore(msgspec.Struct, frozen=True, kw_only=True):
    """Every factor behind one worker's score."""

    miner_hotkey: str
    worker_id: str
    present_buckets: int | None
    """Marked buckets in the window (``None`` when a ratio was passed instead of a bitmap)."""
    window_buckets: int
    availability: float
    leased_seconds: float
    """Leased seconds in the availability window (overlaps merged)."""
    lease: float
    challenge_leased_share: float
    """Leased fraction of the challenge window, credited to participation."""
    successes: int
    failures: int
    participation_baseline: float
    participation: float
    throughput: float | None
    """Median verified FLOP/s, the ranked statistic; ``None`` if never challenged."""
    rank: float
    challenge: float
    score: float
    counted: bool
    """Among the miner's top ``max_workers_per_miner``."""


class MinerScore(msgspec.Struct, frozen=True, kw_only=True):
    """One miner's total and weight."""

    miner_hotkey: str
    workers: int
    counted_workers: int
    raw: float
    score: float
    capped: bool
    weight: float
    """Normalised weight; 0 when the network total is 0 (no weights are submitted then)."""


class NetworkScore(msgspec.Struct, frozen=True, kw_only=True):
    """Output of :func:`score_network`; ``msgspec.json.encode`` gives the full explanation."""

    now: float
    window_start: float
    challenge_window_start: float
    params: ScoringParams
    rank_pool: int
    """Workers with at least one verified throughput (the N of the percentile rank)."""
    workers: tuple[WorkerScore, ...]
    """Sorted by (miner_hotkey, worker_id)."""
    miners: tuple[MinerScore, ...]
    """Sorted by miner_hotkey."""
    weights: dict[str, float]
    """Miner hotkey → weight, sorted by hotkey; empty when every miner scored 0."""


def score_network(
    workers: Iterable[WorkerInput], *, now: float, params: ScoringParams = DEFAULT_PARAMS
) -> NetworkScore:
    """Score every worker, then every miner, then normalise to weights.

    Per worker (windows end at ``now``):

    * availability from its bitmap (same geometry as ``params``) or the given ratio;
    * ``lease = lease_fraction(intervals, now - window, now)``;
    * ``participation(successes, baseline, share)`` with
      ``share = lease_fraction(intervals, now - challenge_window, now)``;
    * ``rank = percentile_ranks(median throughput)`` across all workers of all miners;
    * ``challenge_score`` and ``worker_score`` as documented there.

    Then :func:`miner_score` per hotkey and :func:`normalize_weights`. The result does not depend
    on the order of ``workers``. A (miner_hotkey, worker_id) pair given twice raises
    :class:`ScoringError`. Miners without workers are absent; treat them as weight 0.
    """
    t_now = _finite("now", now)
    window_start = t_now - params.window_seconds
    challenge_start = t_now - params.challenge_window_seconds

    by_key: dict[tuple[str, str], WorkerInput] = {}
    for w in workers:
        key = (w.miner_hotkey, w.worker_id)
        if key in by_key:
            raise ScoringError(f"worker {w.worker_id!r} of miner {w.miner_hotkey!r} given twice")
        by_key[key] = w
    keys = sorted(by_key)

    stats = {key: throughput_statistic(by_key[key].throughputs) for key in keys}
    ranks = percentile_ranks(stats)
    rank_pool = sum(1 for s in stats.values() if s is not None)

    partial: dict[tuple[str, str], WorkerScore] = {}
    for key in keys:
        w = by_key[key]
        present: int | None
        if isinstance(w.availability, AvailabilityBitmap):
            bm = w.availability
            if (bm.bucket_seconds, bm.n_buckets) != (params.bucket_seconds, params.window_buckets):
                raise ScoringError(
                    f"availability bitmap of worker {w.worker_id!r} has geometry "
                    f"{bm.bucket_seconds} s x {bm.n_buckets}, params want "
                    f"{params.bucket_seconds} s x {params.window_buckets} (use resized() or reset)"
                )
            present = bm.present_buckets(t_now)
            avail = availability_ratio(present, params.window_buckets)
        else:
            present = None
            avail = _clamp01(float(w.availability))
        # lease intervals were checked when the WorkerInput was built: merge without re-checking
        leased = _union_seconds(w.lease_intervals, window_start, t_now)
        lease = _clamp01(leased / params.window_seconds)
        ch_share = _union_fraction(w.lease_intervals, challenge_start, t_now)
        part = participation(w.successes, params.participation_baseline, ch_share)
        rank = ranks[key]
        challenge = challenge_score(part, rank, params)
        partial[key] = WorkerScore(
            miner_hotkey=key[0],
            worker_id=key[1],
            present_buckets=present,
            window_buckets=params.window_buckets,
            availability=avail,
            leased_seconds=leased,
            lease=lease,
            challenge_leased_share=ch_share,
            successes=w.successes,
            failures=w.failures,
            participation_baseline=params.participation_baseline,
            participation=part,
            throughput=stats[key],
            rank=rank,
            challenge=challenge,
            score=worker_score(lease, challenge, avail, params),
            counted=False,
        )

    per_miner: dict[str, dict[str, float]] = {}
    for (hk, wid), ws in partial.items():
        per_miner.setdefault(hk, {})[wid] = ws.score
    totals = {hk: miner_score(scores, params) for hk, scores in sorted(per_miner.items())}
    weights = normalize_weights({hk: t.score for hk, t in totals.items()})

    counted = {(hk, wid) for hk, t in totals.items() for wid in t.counted}
    worker_results = tuple(
        msgspec.structs.replace(partial[key], counted=key in counted) for key in keys
    )
    miner_results = tuple(
        MinerScore(
            miner_hotkey=hk,
            workers=len(per_miner[hk]),
            counted_workers=len(t.counted),
            raw=t.raw,
            score=t.score,
            capped=t.capped,
            weight=weights.get(hk, 0.0),
        )
        for hk, t in totals.items()
    )
    return NetworkScore(
        now=t_now,
        window_start=window_start,
        challenge_window_start=challenge_start,
        params=params,
        rank_pool=rank_pool,
        workers=worker_results,
        miners=miner_results,
        weights=weights,
    )
