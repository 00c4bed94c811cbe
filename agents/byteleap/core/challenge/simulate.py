"""Simulated dishonest provers, for the demo and the soundness tests.

They start from an honest result and commit to garbage for part of it, the cheapest way to fake
work that the commitment still binds; the verifier must catch them at the rate ``verifier`` states.
"""

from __future__ import annotations

import numpy as np

from .prover import ProvenChallenge


def skipping_prover(
    honest: ProvenChallenge, skip_fraction: float, rng: np.random.Generator
) -> ProvenChallenge:
    """Commit to plausible random integers instead of ``round(skip_fraction * n)`` rows of C.

    The garbage stays inside the value range an honest row could have, so only the recomputed
    columns (not the plausibility check) can catch it.
    """
    spec = honest.spec
    n = spec.n
    rows = np.stack([np.frombuffer(r.values, "<f4") for r in honest.reveal(range(n))])
    skipped = rng.permutation(n)[: round(skip_fraction * n)]
    bound = 4**spec.value_bits * 8
    rows[skipped] = rng.integers(-bound, bound, size=(len(skipped), n)).astype(np.float32)
    return ProvenChallenge.from_host_rows(spec, rows, "skipping-prover")
