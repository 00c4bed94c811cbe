"""Check a revealed sample against a commitment, in O(k * m * n) time and O(m * n) memory.

For every sampled row the verifier

1. checks the row has n float32 values and that every value is an integer with
   ``|c| <= n * 4**b`` (a free plausibility check on all n entries: an honest product can hold
   nothing else);
2. hashes the revealed bytes into the leaf and folds the Merkle path (directions from the index,
   length from (index, n)) up to the committed root;
3. regenerates row i of A and rows j of B-transposed for the m secret columns straight from the
   PRF, computes the m entries exactly in float64, and compares them with the revealed values
   within ``tolerance`` (zero, see below).

Every check must pass; the first failure is reported with a stable reason code.

Soundness. Let a prover compute a fraction f of the rows of C correctly and commit to whatever it
likes for the rest. The root binds it to one value per row before the sample is drawn (SHA-256
collision resistance). The k rows are drawn uniformly without replacement after the commit, so all
of them land on correct rows with probability ``C(f*n, k) / C(n, k) <= f**k``. A committed row with
w wrong entries survives its m secret columns with probability ``C(n - w, m) / C(n, m) <=
(1 - w/n)**m``; a row that was not computed (guessed) has w close to n and also fails the integer
plausibility check. So a cheating device passes with probability about ``f**k``: with the default
k = 16, skipping 10% of the work passes 18.5% of the time and skipping half passes 0.0015%.
Results cannot be reused across challenges or devices: the leaf hashes include the challenge id
and the PRF key includes the seed, miner hotkey, worker id and device uuid.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence

import msgspec
import numpy as np

from .. import merkle
from . import prf
from .spec import ChallengeSpec, RevealSample, magnitude_bound, value_bits


class Verdict(msgspec.Struct, frozen=True):
    """Outcome of one device's verification. ``reason`` is a stable code, ``detail`` is prose."""

    ok: bool
    reason: str
    detail: str = ""
    row: int | None = None
    rows_checked: int = 0
    entries_checked: int = 0


OK = "ok"
MISSING_ROW = "missing_row"
UNEXPECTED_ROW = "unexpected_row"
BAD_ROW_LENGTH = "bad_row_length"
IMPLAUSIBLE_VALUE = "implausible_value"
BAD_MERKLE_PATH = "bad_merkle_path"
WRONG_VALUE = "wrong_value"
BAD_ROOT = "bad_root"


def tolerance(spec: ChallengeSpec) -> float:
    """Largest |computed - exact| an honest device can produce: 0 for every allowed size.

    ``spec.value_bits`` keeps every input, product and partial sum an integer of magnitude at most
    ``n * 4**b <= 2**24`` (see ``spec``), all exactly representable in the fp32 accumulator, so
    each floating-point step is exact in fp32, tf32, bf16 and fp16 inputs alike. The general
    bound for an n-term fp32 dot product, ``gamma_n * sum|a_k b_k|`` with
    ``gamma_n = n u / (1 - n u)``, ``u = 2**-24``, would only apply if a value could round, and
    none can. (The verifier computes in float64, exact for integers below 2**53.)
    """
    if spec.n * 4**spec.value_bits > 2**24:  # unreachable: value_bits guarantees it
        raise ValueError("challenge size breaks the exactness bound")
    return 0.0


def verify(
    spec: ChallengeSpec,
    root: bytes,
    sample: RevealSample,
    revealed: Mapping[int, tuple[bytes, Sequence[bytes]]],
) -> Verdict:
    """Verify the rows revealed for ``sample`` against ``root``; all checks must pass."""
    if len(root) != merkle.HASH_SIZE:
        return Verdict(ok=False, reason=BAD_ROOT, detail="commitment is not a 32-byte hash")
    extra = set(revealed) - set(sample.rows)
    if extra:
        return Verdict(
            ok=False, reason=UNEXPECTED_ROW, detail=f"rows not asked for: {sorted(extra)[:5]}"
        )
    n = spec.n
    bits = value_bits(n)
    bound = magnitude_bound(n)
    tol = tolerance(spec)
    key = spec.key
    stream_a = prf.Stream(key, prf.STREAM_A)
    stream_b = prf.Stream(key, prf.STREAM_B_T)
    entries = 0
    for checked, (index, columns) in enumerate(zip(sample.rows, sample.columns, strict=True)):
        item = revealed.get(index)
        if item is None:
            return _fail(index, checked, entries, MISSING_ROW, f"row {index} was not revealed")
        values_bytes, path = item
        if len(values_bytes) != 4 * n:
            return _fail(
                index,
                checked,
                entries,
                BAD_ROW_LENGTH,
                f"row {index} has {len(values_bytes)} bytes, expected {4 * n}",
            )
        values = np.frombuffer(values_bytes, dtype="<f4")
        if not _plausible(values, bound):
            return _fail(
                index,
                checked,
                entries,
                IMPLAUSIBLE_VALUE,
                f"row {index} holds a value no honest product can have",
            )
        leaf = merkle.leaf_hash(spec.challenge_id, index, values_bytes)
        folded = merkle.root_from_proof(leaf, index, n, path)
        if folded is None or not hmac.compare_digest(folded, root):
            return _fail(
                index,
                checked,
                entries,
                BAD_MERKLE_PATH,
                f"row {index} does not match the committed root",
            )
        a_row = prf.row(stream_a, prf.STREAM_A, n, bits, index).astype(np.float64)
        cols = np.asarray(columns, dtype=np.int64)
        b_cols = np.stack([prf.row(stream_b, prf.STREAM_B_T, n, bits, int(j)) for j in cols])
        expected = b_cols.astype(np.float64) @ a_row
        diff = np.abs(values[cols].astype(np.float64) - expected)
        entries += len(cols)
        if not np.all(diff <= tol):
            bad = int(cols[int(np.argmax(diff))])
            return _fail(
                index,
                checked,
                entries,
                WRONG_VALUE,
                f"C[{index}, {bad}] differs from the recomputed value",
            )
    return Verdict(ok=True, reason=OK, rows_checked=len(sample.rows), entries_checked=entries)


def _fail(index: int, checked: int, entries: int, reason: str, detail: str) -> Verdict:
    return Verdict(
        ok=False,
        reason=reason,
        detail=detail,
        row=index,
        rows_checked=checked,
        entries_checked=entries,
    )


def _plausible(values: np.ndarray, bound: int) -> bool:
    if not np.all(np.isfinite(values)):
        return False
    if np.any(np.abs(values) > bound):
        return False
    return bool(np.all(values == np.rint(values)))
