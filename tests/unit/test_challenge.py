"""Proof of compute end to end: honest provers pass, cheaters are caught at the predicted rate."""

from __future__ import annotations

import hashlib
import math
import random

import numpy as np
import pytest

from byteleap.core.challenge import (
    ChallengeError,
    ChallengeSpec,
    ProvenChallenge,
    RevealSample,
    draw_sample,
    prf,
    prove,
    verifier,
    verify,
)
from byteleap.core.challenge.prover import RevealedRow
from byteleap.core.challenge.simulate import skipping_prover


def make_spec(
    n: int, *, tag: str = "c0", device: str = "GPU-aaaa", worker: str = "w" * 32
) -> ChallengeSpec:
    digest = hashlib.sha256(tag.encode()).digest()
    return ChallengeSpec(
        challenge_id=digest[:16],
        seed=hashlib.sha256(digest).digest(),
        miner_hotkey="5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY",
        worker_id=worker,
        device_uuid=device,
        n=n,
    )


def revealed(proof: ProvenChallenge, sample: RevealSample) -> dict[int, tuple[bytes, list[bytes]]]:
    return {r.index: (r.values, r.path) for r in proof.reveal(sample.rows)}


def test_product_is_exact() -> None:
    spec = make_spec(256)
    proof = prove(spec, threads=2)
    bits = spec.value_bits
    a = prf.matrix(spec.key, prf.STREAM_A, 256, bits, dtype=np.int64)
    b_t = prf.matrix(spec.key, prf.STREAM_B_T, 256, bits, dtype=np.int64)
    exact = a @ b_t.T
    got = np.stack([np.frombuffer(proof.reveal([i])[0].values, "<f4") for i in range(256)])
    assert np.array_equal(got.astype(np.int64), exact)


def test_honest_cpu_prover_passes_every_verification_at_2048() -> None:
    rng = random.Random(2048)
    passed = 0
    for c in range(4):
        spec = make_spec(2048, tag=f"honest-{c}")
        proof = prove(spec)
        for _ in range(50):
            sample = draw_sample(spec.n, 16, 8, rng)
            verdict = verify(spec, proof.root, sample, revealed(proof, sample))
            assert verdict.ok, verdict
            assert verdict.rows_checked == 16 and verdict.entries_checked == 128
            passed += 1
        proof.release()
    assert passed == 200


@pytest.mark.parametrize("fraction", [0.5, 0.75, 0.9])
def test_partial_provers_are_caught_at_the_predicted_rate(fraction: float) -> None:
    n, k, m, trials = 256, 4, 8, 600
    spec = make_spec(n, tag=f"cheat-{fraction}")
    proof = skipping_prover(prove(spec), 1 - fraction, np.random.default_rng(7))
    rng = random.Random(42)
    passes = 0
    for _ in range(trials):
        sample = draw_sample(n, k, m, rng)
        verdict = verify(spec, proof.root, sample, revealed(proof, sample))
        if verdict.ok:
            passes += 1
        else:
            assert verdict.reason == verifier.WRONG_VALUE
    good = n - round((1 - fraction) * n)
    predicted = math.comb(good, k) / math.comb(n, k)  # <= fraction**k
    assert predicted <= fraction**k
    sigma = math.sqrt(predicted * (1 - predicted) / trials)
    assert abs(passes / trials - predicted) <= 4 * sigma + 1e-9, (passes / trials, predicted)


def test_results_of_another_device_fail() -> None:
    mine = make_spec(256, tag="round-1", device="GPU-aaaa")
    theirs = make_spec(256, tag="round-1", device="GPU-bbbb")
    proof = prove(theirs)
    sample = draw_sample(256, 16, 8, random.Random(1))
    verdict = verify(mine, proof.root, sample, revealed(proof, sample))
    assert not verdict.ok and verdict.reason == verifier.WRONG_VALUE


def test_results_of_an_older_challenge_fail() -> None:
    old = make_spec(256, tag="round-1")
    new = make_spec(256, tag="round-2")
    proof = prove(old)
    sample = draw_sample(256, 16, 8, random.Random(2))
    verdict = verify(new, proof.root, sample, revealed(proof, sample))
    assert not verdict.ok and verdict.reason == verifier.BAD_MERKLE_PATH


def test_results_of_another_worker_fail() -> None:
    mine = make_spec(256, tag="r", worker="a" * 32)
    theirs = make_spec(256, tag="r", worker="b" * 32)
    proof = prove(theirs)
    sample = draw_sample(256, 16, 8, random.Random(3))
    assert not verify(mine, proof.root, sample, revealed(proof, sample)).ok


def test_tampered_reveals_fail() -> None:
    spec = make_spec(256, tag="tamper")
    proof = prove(spec)
    sample = draw_sample(256, 4, 8, random.Random(4))
    good = revealed(proof, sample)
    assert verify(spec, proof.root, sample, good).ok
    first, second = sample.rows[0], sample.rows[1]

    missing = dict(good)
    del missing[first]
    assert verify(spec, proof.root, sample, missing).reason == verifier.MISSING_ROW

    extra = dict(good)
    spare = next(i for i in range(256) if i not in good)
    extra[spare] = good[first]
    assert verify(spec, proof.root, sample, extra).reason == verifier.UNEXPECTED_ROW

    short = dict(good)
    short[first] = (good[first][0][:-4], good[first][1])
    assert verify(spec, proof.root, sample, short).reason == verifier.BAD_ROW_LENGTH

    values = np.frombuffer(good[first][0], "<f4").copy()
    for bad in (np.nan, np.inf, 0.5, 1e9):
        values2 = values.copy()
        values2[3] = bad
        forged = dict(good)
        forged[first] = (values2.tobytes(), good[first][1])
        assert verify(spec, proof.root, sample, forged).reason == verifier.IMPLAUSIBLE_VALUE

    swapped = dict(good)
    swapped[first], swapped[second] = good[second], good[first]
    assert verify(spec, proof.root, sample, swapped).reason == verifier.BAD_MERKLE_PATH

    wrong_root = bytes(32)
    assert verify(spec, wrong_root, sample, good).reason == verifier.BAD_MERKLE_PATH
    assert verify(spec, b"short", sample, good).reason == verifier.BAD_ROOT


def test_a_consistent_but_wrong_row_is_caught_by_the_columns() -> None:
    """Commit to a row with one wrong entry in every column: the Merkle path holds, values don't."""
    spec = make_spec(128, tag="wrongrow")
    honest = prove(spec)
    rows = np.stack([np.frombuffer(honest.reveal([i])[0].values, "<f4") for i in range(128)])
    rows[5] += 1.0
    proof = ProvenChallenge.from_host_rows(spec, rows, "cheater")
    sample = RevealSample(rows=(5,), columns=((0, 1, 2),))
    verdict = verify(spec, proof.root, sample, revealed(proof, sample))
    assert verdict.reason == verifier.WRONG_VALUE and verdict.row == 5


def test_release_frees_the_result() -> None:
    proof = prove(make_spec(128))
    proof.release()
    proof.release()
    assert proof.released
    with pytest.raises(ChallengeError):
        proof.reveal([0])


def test_bad_reveal_requests_are_refused() -> None:
    proof = prove(make_spec(128))
    with pytest.raises(ChallengeError):
        proof.reveal([128])
    with pytest.raises(ChallengeError):
        proof.reveal([1, 1])
    assert isinstance(proof.reveal([0])[0], RevealedRow)


@pytest.mark.parametrize("n", [0, 63, 100, 65600, 131072])
def test_bad_sizes_are_refused(n: int) -> None:
    with pytest.raises(ChallengeError):
        make_spec(n)


def test_bad_samples_are_refused() -> None:
    with pytest.raises(ChallengeError):
        draw_sample(128, 0, 8)
    with pytest.raises(ChallengeError):
        draw_sample(128, 4, 300)


def test_sample_is_distinct_and_in_range() -> None:
    sample = draw_sample(2048, 16, 8)
    assert len(set(sample.rows)) == 16
    assert all(len(set(cols)) == 8 for cols in sample.columns)
    assert all(0 <= x < 2048 for cols in sample.columns for x in cols)


def test_key_binds_every_field() -> None:
    base = make_spec(128)
    keys = {
        base.key,
        make_spec(128, tag="other").key,
        make_spec(128, device="GPU-other").key,
        make_spec(128, worker="x" * 32).key,
    }
    assert len(keys) == 4
