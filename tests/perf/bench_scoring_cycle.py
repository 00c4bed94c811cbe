"""Benchmark: one full scoring cycle on a full network, for SQLite and PostgreSQL.

256 miners x 100 workers (25 600), each with a full 169 h availability bitmap (random bits) and
a full 180 min challenge history (45 outcomes, ~90 % verified), loaded into a fresh store. The
cycle is what the validator does every scoring interval::

    inputs = store.scoring_inputs(now, params)      # one row per worker
    result = score_network(inputs, now=now, params=params)
    store.record_cycle(result, block=..., uids=...)  # every factor of every worker and miner

Each measured cycle runs in a fresh child process, so its peak RSS (``ru_maxrss``) is that of a
process doing only this (interpreter, numpy, msgspec and the driver included), not of the seeding.
Targets: a cycle within 2 s and 300 MiB. PostgreSQL is skipped (with the reason in the JSON) when
it is unreachable. Also reported: one heartbeat pass over every worker (``mark_present``) and the
rate of ``finish`` transactions.

Usage: ``python -m tests.perf.bench_scoring_cycle [--miners N] [--workers N] [--repeats N]``
(``tests.perf.run`` includes it).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from byteleap.core.scoring import DEFAULT_PARAMS, AvailabilityBitmap, score_network
from byteleap.validator.store import (
    ChallengeState,
    DeviceClaim,
    DeviceOutcome,
    IssuedChallenge,
    RosterWorker,
    WorkerRoundOutcome,
    open_store,
)
from byteleap.validator.store_sql import HistoryEntry, SqlStore

TARGET_CYCLE_S = 2.0
TARGET_PEAK_RSS_MIB = 300.0
NOW = 1_800_000_000.0
OUTCOMES_PER_WORKER = 45  # 180 min / 240 s
FINISH_SAMPLE = 300


def _miner(i: int) -> str:
    return f"5Miner{i:04d}" + "x" * 38


def _worker(i: int, j: int) -> str:
    return f"{i:04d}{j:04d}" + "0" * 24


def seed(store: SqlStore, miners: int, workers: int, rng: random.Random) -> None:
    """Rosters for every miner, then a full week of availability and a full challenge window
    of history for every worker (bulk-loaded: replaying 1.15 M rounds would take hours)."""
    params = DEFAULT_PARAMS
    for i in range(miners):
        roster = [
            RosterWorker(
                worker_id=_worker(i, j),
                online=True,
                devices=(
                    DeviceClaim(uuid=f"GPU-{i:04d}-{j:04d}", name="H100", mem_bytes=80 << 30),
                ),
            )
            for j in range(workers)
        ]
        store.sync_roster(_miner(i), i, roster, NOW - 60)
    head = int(NOW // params.bucket_seconds)
    spacing = params.challenge_window_seconds / OUTCOMES_PER_WORKER
    rows = []
    for i in range(miners):
        for j in range(workers):
            bits = rng.getrandbits(params.window_buckets) | 1
            bitmap = AvailabilityBitmap(params.bucket_seconds, params.window_buckets, head, bits)
            base = rng.uniform(5e13, 9e14)
            history = [
                HistoryEntry(
                    NOW - (k + 0.5) * spacing, ok, base * rng.uniform(0.9, 1.1) if ok else 0
                )
                for k in range(OUTCOMES_PER_WORKER)
                for ok in (rng.random() < 0.9,)
            ]
            rows.append((_miner(i), _worker(i, j), bitmap, history))
    store.load_worker_stats(rows)


def heartbeat_pass(store: SqlStore, miners: int, workers: int) -> float:
    """Seconds to mark every worker present once (one call per miner), in a new bucket."""
    start = time.perf_counter()
    for i in range(miners):
        store.mark_present([(_miner(i), _worker(i, j)) for j in range(workers)], NOW + 1)
    return time.perf_counter() - start


def finish_rate(store: SqlStore, miners: int, workers: int, count: int) -> float:
    """``issue`` + ``record_commit`` + ``finish`` round trips per second (one device each)."""
    start = time.perf_counter()
    for k in range(count):
        i, j = k % miners, (k // miners) % workers
        cid = k.to_bytes(16, "big")
        store.issue(
            [
                IssuedChallenge(
                    challenge_id=cid,
                    round_id=k,
                    miner_hotkey=_miner(i),
                    worker_id=_worker(i, j),
                    device_uuid=f"GPU-{i:04d}-{j:04d}",
                    n=8192,
                    precision="fp32",
                    seed=b"s" * 32,
                    issued_at=NOW - 30,
                )
            ]
        )
        store.record_commit(cid, b"r" * 32, NOW - 20)
        store.finish(
            WorkerRoundOutcome(
                round_id=k,
                miner_hotkey=_miner(i),
                worker_id=_worker(i, j),
                finished_at=NOW - 10,
                devices=(
                    DeviceOutcome(
                        challenge_id=cid, state=ChallengeState.VERIFIED, reason="ok", flops=6e14
                    ),
                ),
            )
        )
    return count / (time.perf_counter() - start)


def _peak_rss_mib() -> float:
    """This process's peak RSS. ``VmHWM`` rather than ``ru_maxrss``: Linux carries the parent's
    peak into ``ru_maxrss`` across fork and exec, which would report the seeding process."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child_cycle(url: str, now: float) -> dict[str, Any]:
    """One measured cycle in this (fresh) process."""
    store = open_store(url, params=DEFAULT_PARAMS)
    try:
        store.check()
        baseline = _peak_rss_mib()
        t0 = time.perf_counter()
        inputs = store.scoring_inputs(now, DEFAULT_PARAMS)
        t1 = time.perf_counter()
        result = score_network(inputs, now=now, params=DEFAULT_PARAMS)
        t2 = time.perf_counter()
        cycle_id = store.record_cycle(
            result, block=1, uids={m.miner_hotkey: k for k, m in enumerate(result.miners)}
        )
        t3 = time.perf_counter()
        peak = _peak_rss_mib()
        back = store.cycle(cycle_id)
        if back is None or back.result != result:
            raise RuntimeError("the recorded cycle did not read back equal")
    finally:
        store.close()
    return {
        "workers": len(inputs),
        "scoring_inputs_s": t1 - t0,
        "score_network_s": t2 - t1,
        "record_cycle_s": t3 - t2,
        "cycle_s": t3 - t0,
        "baseline_rss_mib": baseline,
        "peak_rss_mib": peak,
    }


def _measure(url: str, repeats: int) -> dict[str, Any]:
    runs = []
    for r in range(repeats):
        proc = subprocess.run(
            [sys.executable, "-m", "tests.perf.bench_scoring_cycle", "--child", url],
            input=json.dumps({"now": NOW + 2 + r}),
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).resolve().parents[2],
        )
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark child failed:\n{proc.stderr}")
        runs.append(json.loads(proc.stdout))
    keys = ("scoring_inputs_s", "score_network_s", "record_cycle_s", "cycle_s")
    out: dict[str, Any] = {k: statistics.median(run[k] for run in runs) for k in keys}
    out["peak_rss_mib"] = max(run["peak_rss_mib"] for run in runs)
    out["baseline_rss_mib"] = max(run["baseline_rss_mib"] for run in runs)
    out["workers"] = runs[0]["workers"]
    out["repeats"] = repeats
    return out


def _backend(url: str, miners: int, workers: int, repeats: int, finishes: int) -> dict[str, Any]:
    store = open_store(url, params=DEFAULT_PARAMS, timeout_s=60)
    assert isinstance(store, SqlStore)
    try:
        store.upgrade()
        start = time.perf_counter()
        seed(store, miners, workers, random.Random(7))
        seed_s = time.perf_counter() - start
        result = _measure(url, repeats)
        result["seed_s"] = seed_s
        result["mark_present_all_s"] = heartbeat_pass(store, miners, workers)
        result["finish_per_s"] = finish_rate(store, miners, workers, finishes)
    finally:
        store.close()
    result["within_targets"] = (
        result["cycle_s"] <= TARGET_CYCLE_S and result["peak_rss_mib"] <= TARGET_PEAK_RSS_MIB
    )
    return result


@contextmanager
def _sqlite_url() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        yield f"sqlite:///{tmp}/validator.db"


def bench_scoring_cycle(
    miners: int = 256, workers: int = 100, repeats: int = 3, finishes: int = FINISH_SAMPLE
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "miners": miners,
        "workers_per_miner": workers,
        "outcomes_per_worker": OUTCOMES_PER_WORKER,
        "targets": {"cycle_s": TARGET_CYCLE_S, "peak_rss_mib": TARGET_PEAK_RSS_MIB},
    }
    with _sqlite_url() as url:
        out["sqlite"] = _backend(url, miners, workers, repeats, finishes)
    _report("sqlite", out["sqlite"])
    # Imported here: the measuring child process must not pay for pytest and the helpers.
    from tests.support.postgres import base_url, fresh_schema, unreachable_reason

    reason = unreachable_reason(base_url())
    if reason is not None:
        out["postgresql"] = {"skipped": reason}
        print(f"scoring cycle postgresql: skipped: {reason}", file=sys.stderr)
    else:
        with fresh_schema() as url:
            out["postgresql"] = _backend(url, miners, workers, repeats, finishes)
        _report("postgresql", out["postgresql"])
    return out


def _report(name: str, r: dict[str, Any]) -> None:
    print(
        f"scoring cycle {name} ({r['workers']} workers): {r['cycle_s']:.3f} s "
        f"(inputs {r['scoring_inputs_s']:.3f}, score {r['score_network_s']:.3f}, "
        f"record {r['record_cycle_s']:.3f}), peak RSS {r['peak_rss_mib']:.0f} MiB; "
        f"heartbeat pass {r['mark_present_all_s']:.2f} s, {r['finish_per_s']:.0f} finish/s",
        file=sys.stderr,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--miners", type=int, default=256)
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--finishes", type=int, default=FINISH_SAMPLE)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child_cycle(args.child, json.loads(sys.stdin.read())["now"])))
        return
    result = bench_scoring_cycle(args.miners, args.workers, args.repeats, args.finishes)
    text = json.dumps(result, indent=2) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
