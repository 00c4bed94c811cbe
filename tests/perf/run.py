"""Benchmarks of the proof of compute, the Merkle tree and the validator's scoring cycle (store +
scoring, bench_scoring_cycle.py); ``make bench`` writes build/bench.json.

Figures are ratios within one run on one machine (prover vs bare numpy.matmul of the same n), never
timed assertions in tests. Usage: ``python -m tests.perf.run [--out FILE] [--quick]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from byteleap.core import merkle
from byteleap.core.challenge import ChallengeSpec, draw_sample, prf, prove, verify
from byteleap.core.challenge.device_process import DeviceProcess
from byteleap.core.challenge.prover import cpu_threads

from .bench_scoring_cycle import bench_scoring_cycle


def _spec(n: int, tag: str) -> ChallengeSpec:
    digest = hashlib.sha256(tag.encode()).digest()
    return ChallengeSpec(
        challenge_id=digest[:16],
        seed=hashlib.sha256(digest).digest(),
        miner_hotkey="5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY",
        worker_id="0" * 32,
        device_uuid="cpu0",
        n=n,
    )


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_prover(sizes: list[int], repeats: int) -> list[dict[str, Any]]:
    out = []
    rng = np.random.default_rng(0)
    for n in sizes:
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        np.matmul(a, b.T)  # warm BLAS threads
        bare = _median_time(lambda a=a, b=b: np.matmul(a, b.T), repeats)
        del a, b
        spec = _spec(n, f"bench-{n}")
        proofs: list[float] = []
        for _ in range(repeats):
            p = prove(spec)
            proofs.append(p.elapsed_s)
            p.release()
        prover = statistics.median(proofs)
        out.append(
            {
                "n": n,
                "bare_matmul_s": bare,
                "prover_s": prover,
                "overhead_ratio": prover / bare - 1.0,
                "bare_gflops": 2 * n**3 / bare / 1e9,
                "prover_gflops": 2 * n**3 / prover / 1e9,
            }
        )
        print(
            f"prover n={n}: {prover * 1e3:.1f} ms vs matmul {bare * 1e3:.1f} ms "
            f"(overhead {100 * (prover / bare - 1):.1f}%)",
            file=sys.stderr,
        )
    return out


def bench_prover_process(sizes: list[int], repeats: int) -> dict[str, Any]:
    """What proving in a child process (device_process, one per GPU) costs over proving in the
    worker's own process: start-up, the product end to end, and a reveal of 16 rows."""
    prover = DeviceProcess("numpy", "cpu-bench")
    start = time.perf_counter()
    prover.start()
    started_s = time.perf_counter() - start
    rows = list(range(0, 16))
    out: list[dict[str, Any]] = []
    try:
        for n in sizes:
            spec = _spec(n, f"process-{n}")

            def local(spec: ChallengeSpec = spec) -> None:
                prove(spec).release()

            def remote(spec: ChallengeSpec = spec) -> None:
                prove(spec, prover).release()

            local()  # warm BLAS threads in both processes
            remote()
            local_s = _median_time(local, repeats)
            remote_s = _median_time(remote, repeats)
            held_local, held_remote = prove(spec), prove(spec, prover)
            reveal_local = _median_time(lambda h=held_local: h.reveal(rows), repeats)
            reveal_remote = _median_time(lambda h=held_remote: h.reveal(rows), repeats)
            held_local.release()
            held_remote.release()
            out.append(
                {
                    "n": n,
                    "in_process_s": local_s,
                    "child_process_s": remote_s,
                    "overhead_ratio": remote_s / local_s - 1.0,
                    "reveal_16_rows_in_process_s": reveal_local,
                    "reveal_16_rows_child_process_s": reveal_remote,
                }
            )
            print(
                f"prover process n={n}: {remote_s * 1e3:.1f} ms vs in-process "
                f"{local_s * 1e3:.1f} ms (overhead {100 * (remote_s / local_s - 1):.1f}%); "
                f"reveal 16 rows {reveal_remote * 1e3:.2f} vs {reveal_local * 1e3:.2f} ms",
                file=sys.stderr,
            )
    finally:
        prover.stop()
    return {"backend": "numpy", "start_s": started_s, "sizes": out}


def _synthetic_commitment(
    spec: ChallengeSpec, rows: tuple[int, ...]
) -> tuple[bytes, dict[int, tuple[bytes, list[bytes]]]]:
    """Exact sampled rows of a product too large to compute here, in a tree of random leaves.

    The verifier only sees the sampled rows and their paths, so its cost is the real one.
    """
    n, bits = spec.n, spec.value_bits
    a_rows = np.stack([prf.row(spec.key, prf.STREAM_A, n, bits, i) for i in rows]).astype(
        np.float32
    )
    c_rows = np.empty((len(rows), n), dtype=np.float32)
    band = 2048
    for start in range(0, n, band):
        b_band = prf.rows(spec.key, prf.STREAM_B_T, n, bits, start, band).astype(np.float32)
        c_rows[:, start : start + band] = a_rows @ b_band.T
    leaves = [os.urandom(32) for _ in range(n)]
    values = {}
    for i, r in zip(rows, c_rows, strict=True):
        data = r.astype("<f4").tobytes()
        leaves[i] = merkle.leaf_hash(spec.challenge_id, i, data)
        values[i] = data
    tree = merkle.MerkleTree(leaves)
    return tree.root, {i: (values[i], tree.proof(i)) for i in rows}


def bench_verifier(sizes: list[int], k: int, m: int, repeats: int) -> list[dict[str, Any]]:
    out = []
    rng = random.Random(1)
    for n in sizes:
        spec = _spec(n, f"verify-{n}")
        sample = draw_sample(n, k, m, rng)
        if n <= 4096:
            proof = prove(spec)
            root = proof.root
            revealed = {r.index: (r.values, r.path) for r in proof.reveal(sample.rows)}
            proof.release()
        else:
            root, revealed = _synthetic_commitment(spec, sample.rows)
        verdict = verify(spec, root, sample, revealed)
        if not verdict.ok:
            raise RuntimeError(f"benchmark commitment failed to verify: {verdict}")
        t = _median_time(
            lambda spec=spec, root=root, sample=sample, revealed=revealed: verify(
                spec, root, sample, revealed
            ),
            repeats,
        )
        # one thread verifies one proof at a time: proofs/s per core is the reciprocal
        out.append({"n": n, "k": k, "m": m, "verify_s": t, "proofs_per_s_per_core": 1.0 / t})
        print(f"verifier n={n} k={k} m={m}: {t * 1e3:.2f} ms", file=sys.stderr)
    return out


def bench_merkle(n: int, repeats: int) -> dict[str, Any]:
    rows = np.random.default_rng(2).standard_normal((n, n), dtype=np.float32)
    size = rows.nbytes
    single = _median_time(lambda: merkle.MerkleTree.from_rows(b"c" * 16, rows, threads=1), repeats)
    threads = cpu_threads()
    multi = _median_time(
        lambda: merkle.MerkleTree.from_rows(b"c" * 16, rows, threads=threads), repeats
    )
    blob = rows.tobytes()
    sha = _median_time(lambda: hashlib.sha256(blob).digest(), repeats)
    blake = _median_time(lambda: hashlib.blake2b(blob, digest_size=32).digest(), repeats)
    result = {
        "rows": n,
        "bytes": size,
        "build_gbps_1_thread": size / single / 1e9,
        "build_gbps_all_threads": size / multi / 1e9,
        "threads": threads,
        "sha256_gbps": size / sha / 1e9,
        "blake2b256_gbps": size / blake / 1e9,
    }
    print(
        f"merkle {size >> 20} MiB: {result['build_gbps_1_thread']:.2f} GB/s (1 thread), "
        f"{result['build_gbps_all_threads']:.2f} GB/s ({threads} threads); raw sha256 "
        f"{result['sha256_gbps']:.2f} vs blake2b {result['blake2b256_gbps']:.2f} GB/s",
        file=sys.stderr,
    )
    return result


def run(quick: bool = False) -> dict[str, Any]:
    repeats = 1 if quick else 3
    return {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "cpus": cpu_threads(),
        },
        "prover": bench_prover([256, 512] if quick else [1024, 2048, 4096], repeats),
        "prover_process": bench_prover_process([256] if quick else [1024, 4096], repeats),
        "verifier": bench_verifier(
            [256, 2048] if quick else [2048, 32768], 16, 8, 3 if quick else 20
        ),
        "merkle": bench_merkle(512 if quick else 4096, repeats),
        "scoring_cycle": (
            bench_scoring_cycle(4, 5, repeats=1, finishes=10) if quick else bench_scoring_cycle()
        ),
        "targets": {
            "prover_overhead_at_4096": 0.25,
            "verify_s_at_2048": 0.005,
            "verify_s_at_32768": 0.020,
            "scoring_cycle_s": 2.0,
            "scoring_cycle_peak_rss_mib": 300,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("build/bench.json"))
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    args = parser.parse_args()
    result = run(quick=args.quick)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
