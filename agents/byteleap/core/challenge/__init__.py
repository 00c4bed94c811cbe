"""Proof of compute: PRF-generated matrices, the product committed by a Merkle root, sampled reveal.

* ``spec``     - challenge parameters, key derivation, value range, phase-2 sampling.
* ``prf``      - keyed counter-based Philox PRF filling A and B-transposed (numpy's C Philox).
* ``prover``   - compute, commit, reveal, release (numpy backend).
* ``cupy_backend`` - the same on a CUDA GPU (``cuda`` extra).
* ``verifier`` - O(k m n) check of a revealed sample, with the soundness argument.
"""

from .prover import ProvenChallenge, RevealedRow, get_backend, prove
from .spec import ChallengeError, ChallengeSpec, RevealSample, draw_sample
from .verifier import Verdict, verify

__all__ = [
    "ChallengeError",
    "ChallengeSpec",
    "ProvenChallenge",
    "RevealSample",
    "RevealedRow",
    "Verdict",
    "draw_sample",
    "get_backend",
    "prove",
    "verify",
]
