"""What a challenge is: the parameters a validator sends and everything derived from them.

Values are small integers, by design. Every entry of A and B is an integer ``x`` with
``-2**b <= x < 2**b``, where ``b = value_bits(n)`` is the largest ``b <= 7`` with
``n * 4**b <= 2**24``.
Then, for any summation order:

* every input is exactly representable in fp32, tf32 (11-bit significand), bf16 (8) and fp16 (11),
  because ``|x| <= 2**7``;
* every product is an integer with ``|a*b| <= 4**b`` and every partial sum of any subset is an
  integer with ``|s| <= n * 4**b <= 2**24``;
* every integer of magnitude ``<= 2**24`` is exactly representable in fp32's 24-bit significand,
  so no rounding step of an fp32-accumulating GEMM (round-to-nearest, truncation, FMA, tensor-core
  accumulation, split-K) can change a value.

So an honest device produces the exact product bit for bit, whichever precision it multiplies in,
and the precision-derived tolerance is zero (see ``verifier.tolerance``). A float tolerance, as
ByteLeap used (``|d| <= 0.02``), would also accept cheaper approximate products.
"""

from __future__ import annotations

import hashlib
import random
import secrets
from typing import Annotated, Literal

import msgspec

Precision = Literal["fp32", "tf32", "bf16", "fp16"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "tf32", "bf16", "fp16")

MIN_N = 64
MAX_N = 65536
N_MULTIPLE = 64  # rows start on a PRF block boundary and GEMM tiles stay aligned
ACCUMULATOR_SIGNIFICAND_BITS = 24  # fp32
MAX_VALUE_BITS = 7  # entries are drawn from one signed byte

CHALLENGE_ID_SIZE = 16
SEED_SIZE = 32
KEY_DOMAIN = b"byteleap/challenge-key/v1"

MAX_SAMPLE_ROWS = 256
MAX_SAMPLE_COLUMNS = 256


class ChallengeError(ValueError):
    """A challenge or a sample that cannot be run (bad size, id, seed...)."""


class ChallengeSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One device's challenge. The key binds the result to this seed, miner, worker and device."""

    challenge_id: Annotated[bytes, msgspec.Meta(min_length=16, max_length=16)]
    seed: Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
    miner_hotkey: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    worker_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    device_uuid: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    n: int
    precision: Precision = "fp32"

    def __post_init__(self) -> None:
        check_size(self.n)
        if len(self.challenge_id) != CHALLENGE_ID_SIZE:
            raise ChallengeError(f"challenge_id must be {CHALLENGE_ID_SIZE} bytes")
        if len(self.seed) != SEED_SIZE:
            raise ChallengeError(f"seed must be {SEED_SIZE} bytes")
        if self.precision not in PRECISIONS:
            raise ChallengeError(f"unknown precision {self.precision!r}")

    @property
    def key(self) -> bytes:
        return derive_key(self.seed, self.miner_hotkey, self.worker_id, self.device_uuid)

    @property
    def value_bits(self) -> int:
        return value_bits(self.n)

    @property
    def flops(self) -> int:
        """Floating-point operations of the product: 2 n^3."""
        return 2 * self.n**3


def check_size(n: int) -> None:
    if not MIN_N <= n <= MAX_N or n % N_MULTIPLE:
        raise ChallengeError(
            f"matrix size {n} is not a multiple of {N_MULTIPLE} in [{MIN_N}, {MAX_N}]"
        )


def value_bits(n: int) -> int:
    """Largest b <= 7 with n * 4**b <= 2**24: every partial sum then stays exact in fp32."""
    check_size(n)
    bits = MAX_VALUE_BITS
    while n * 4**bits > 2**ACCUMULATOR_SIGNIFICAND_BITS:
        bits -= 1
    return bits


def magnitude_bound(n: int) -> int:
    """Largest possible |C[i, j]|: n * 4**b (reached only if every product is (-2**b)**2)."""
    bound: int = n << (2 * value_bits(n))
    return bound


def derive_key(seed: bytes, miner_hotkey: str, worker_id: str, device_uuid: str) -> bytes:
    """key = SHA-256(domain || seed || hotkey || worker_id || device uuid), length-prefixed.

    Length prefixes keep ("ab", "c") and ("a", "bc") apart; the device uuid makes the matrices of
    two GPUs of one host unrelated, so one GPU cannot answer for another.
    """
    h = hashlib.sha256(KEY_DOMAIN)
    for part in (seed, miner_hotkey.encode(), worker_id.encode(), device_uuid.encode()):
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.digest()


class RevealSample(msgspec.Struct, frozen=True):
    """Phase-2 sample, drawn by the validator after the commit arrives.

    ``rows`` go to the prover; ``columns[r]`` (the entries recomputed for row ``rows[r]``) stay with
    the validator: the prover reveals whole rows, so it never learns which entries are checked.
    """

    rows: tuple[int, ...]
    columns: tuple[tuple[int, ...], ...]


def draw_sample(n: int, k: int, m: int, rng: random.Random | None = None) -> RevealSample:
    """k distinct rows and, for each, m distinct columns, drawn with a CSPRNG by default."""
    check_size(n)
    if not 1 <= k <= min(n, MAX_SAMPLE_ROWS):
        raise ChallengeError(f"row sample size k={k} outside [1, {min(n, MAX_SAMPLE_ROWS)}]")
    if not 1 <= m <= min(n, MAX_SAMPLE_COLUMNS):
        raise ChallengeError(f"column sample size m={m} outside [1, {min(n, MAX_SAMPLE_COLUMNS)}]")
    chooser = rng if rng is not None else secrets.SystemRandom()
    rows = tuple(chooser.sample(range(n), k))
    columns = tuple(tuple(chooser.sample(range(n), m)) for _ in rows)
    return RevealSample(rows=rows, columns=columns)
