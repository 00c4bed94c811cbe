"""The keyed counter-based PRF that fills A and B-transposed, identically on CPU and GPU.

Philox4x64-10 (Salmon et al., SC'11) keyed with all 256 bits of the challenge key:

* Philox key        = (u64le(key[0:8]), u64le(key[8:16]))
* block j, stream s = counter (j + 1, s, u64le(key[16:24]), u64le(key[24:32]))

(``j + 1`` because numpy's Philox increments its counter before producing a block; the CuPy kernel
computes exactly the same.) Stream 0 is A, stream 1 is B-transposed. A block is four u64 words =
32 bytes in little-endian order; element ``e`` of a stream is byte ``e`` of the concatenated blocks,
read as a signed byte and shifted right arithmetically by ``8 - (b + 1)`` bits, which gives an
integer uniform on ``[-2**b, 2**b)`` (see ``spec.value_bits``).

Row i of an n x n matrix is elements ``[i*n, (i+1)*n)``, i.e. blocks ``[i*n/32, (i+1)*n/32)``, so a
verifier generates row i of A and row j of B-transposed (= column j of B) alone, as two contiguous
streams, without touching the rest: O(n) work and memory per row.

On CPU the blocks come from numpy's C Philox (about 5 ns per u64 word on these hosts); the
generation is O(n^2) against the O(n^3) product.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import numpy.typing as npt

from .spec import ChallengeError, check_size

STREAM_A = 0
STREAM_B_T = 1
BLOCK_BYTES = 32
WORDS_PER_BLOCK = 4

# Philox4x64-10 constants (Random123), shared with the CuPy kernel.
PHILOX_M0 = 0xD2E7470EE14C6C93
PHILOX_M1 = 0xCA5A826395121157
PHILOX_W0 = 0x9E3779B97F4A7C15
PHILOX_W1 = 0xBB67AE8584CAA73B
PHILOX_ROUNDS = 10

_MASK64 = (1 << 64) - 1


def key_words(key: bytes) -> tuple[int, int, int, int]:
    """Split the 32-byte key into (Philox key 0, key 1, counter word 2, counter word 3)."""
    if len(key) != 32:
        raise ChallengeError("challenge key must be 32 bytes")
    w = [int.from_bytes(key[i : i + 8], "little") for i in range(0, 32, 8)]
    return w[0], w[1], w[2], w[3]


class Stream:
    """One keyed stream; reads reposition the counter instead of building a new generator.

    Building a numpy Philox costs about 17 us and setting its state about 1 us, which matters to a
    verifier that reads k * (m + 1) short rows.
    """

    def __init__(self, key: bytes, stream: int) -> None:
        k0, k1, c2, c3 = key_words(key)
        self._counter = np.array([0, stream, c2, c3], dtype=np.uint64)
        self._bg = np.random.Philox(key=np.array([k0, k1], dtype=np.uint64), counter=self._counter)
        self._state = self._bg.state

    def read(self, first_element: int, count: int) -> npt.NDArray[np.int8]:
        """``count`` bytes from element ``first_element`` on, as signed bytes (unshifted)."""
        if first_element % BLOCK_BYTES or count % BLOCK_BYTES or first_element < 0:
            raise ChallengeError("PRF reads must be aligned to 32-byte blocks")
        self._counter[0] = first_element // BLOCK_BYTES
        self._state["state"]["counter"] = self._counter
        self._state["buffer_pos"] = WORDS_PER_BLOCK  # empty buffer: next word starts a new block
        self._bg.state = self._state
        words: npt.NDArray[np.uint64] = self._bg.random_raw(count // 8)
        return words.view(np.int8)


def raw_bytes(key: bytes, stream: int, first_element: int, count: int) -> npt.NDArray[np.int8]:
    """``count`` stream bytes from element ``first_element`` on, as signed bytes (unshifted)."""
    return Stream(key, stream).read(first_element, count)


def rows(
    key: bytes | Stream, stream: int, n: int, bits: int, first_row: int, row_count: int
) -> npt.NDArray[np.int8]:
    """Rows ``[first_row, first_row + row_count)`` of a stream's n x n matrix, as int8 values.

    ``key`` may be a ready ``Stream`` (then ``stream`` must match how it was built).
    """
    check_size(n)
    if first_row < 0 or row_count < 1 or first_row + row_count > n:
        raise ChallengeError(f"rows {first_row}..{first_row + row_count} outside an {n}x{n} matrix")
    if not 0 <= bits <= 7:
        raise ChallengeError(f"value bits {bits} outside [0, 7]")
    source = key if isinstance(key, Stream) else Stream(key, stream)
    data = source.read(first_row * n, row_count * n)
    np.right_shift(data, 7 - bits, out=data)
    return data.reshape(row_count, n)


def row(key: bytes | Stream, stream: int, n: int, bits: int, index: int) -> npt.NDArray[np.int8]:
    """One row; identical to the same row of the full matrix."""
    one: npt.NDArray[np.int8] = rows(key, stream, n, bits, index, 1)[0]
    return one


def matrix(
    key: bytes,
    stream: int,
    n: int,
    bits: int,
    *,
    dtype: npt.DTypeLike = np.float32,
    threads: int = 1,
) -> npt.NDArray[np.generic]:
    """The full n x n matrix of a stream, converted to ``dtype``.

    With ``threads > 1`` row bands are generated in parallel (numpy's bit generators release the
    GIL while filling), each band from its own counter offset: the result is the same.
    """
    out = np.empty((n, n), dtype=dtype)
    bands = max(1, min(threads, n // 64))
    step = -(-n // bands)

    def fill(start: int) -> None:
        stop = min(start + step, n)
        out[start:stop] = rows(key, stream, n, bits, start, stop - start)

    if bands == 1:
        fill(0)
    else:
        with ThreadPoolExecutor(max_workers=bands) as pool:
            list(pool.map(fill, range(0, n, step)))
    return out


def philox_block(key: bytes, stream: int, block: int) -> tuple[int, int, int, int]:
    """Pure-Python Philox4x64-10 of one block: the reference the numpy and CuPy paths must match."""
    k0, k1, c2, c3 = key_words(key)
    c = [(block + 1) & _MASK64, stream, c2, c3]
    k = [k0, k1]
    for _ in range(PHILOX_ROUNDS):
        p0 = PHILOX_M0 * c[0]
        p1 = PHILOX_M1 * c[2]
        c = [(p1 >> 64) ^ c[1] ^ k[0], p1 & _MASK64, (p0 >> 64) ^ c[3] ^ k[1], p0 & _MASK64]
        k = [(k[0] + PHILOX_W0) & _MASK64, (k[1] + PHILOX_W1) & _MASK64]
    return c[0], c[1], c[2], c[3]
