"""The challenge PRF: Philox4x64-10 layout, slicing invariance, value range."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from byteleap.core.challenge import prf, spec

KEYS = st.binary(min_size=32, max_size=32)


def test_philox_known_answer() -> None:
    """Random123's published vector for philox4x64-10 with zero key and counter."""
    # block j uses counter j + 1, so counter 0 is block 2**64 - 1
    words = prf.philox_block(bytes(32), 0, 2**64 - 1)
    assert words == (
        0x16554D9ECA36314C,
        0xDB20FE9D672D0FDC,
        0xD7E772CEE186176B,
        0x7E68B68AEC7BA23B,
    )


@settings(max_examples=30, deadline=None)
@given(KEYS, st.integers(0, 1), st.integers(0, 1000))
def test_numpy_stream_matches_reference(key: bytes, stream: int, block: int) -> None:
    got = prf.raw_bytes(key, stream, block * 32, 64).view(np.uint8).tobytes()
    want = b"".join(
        w.to_bytes(8, "little")
        for b in (block, block + 1)
        for w in prf.philox_block(key, stream, b)
    )
    assert got == want


@settings(max_examples=25, deadline=None)
@given(KEYS, st.sampled_from([64, 128, 192, 320]), st.integers(0, 1), st.data())
def test_any_slice_equals_the_full_matrix(
    key: bytes, n: int, stream: int, data: st.DataObject
) -> None:
    bits = spec.value_bits(n)
    full = prf.matrix(key, stream, n, bits, dtype=np.int8)
    start = data.draw(st.integers(0, n - 1))
    count = data.draw(st.integers(1, n - start))
    assert np.array_equal(prf.rows(key, stream, n, bits, start, count), full[start : start + count])
    i = data.draw(st.integers(0, n - 1))
    assert np.array_equal(prf.row(key, stream, n, bits, i), full[i])
    reused = prf.Stream(key, stream)
    for j in (i, 0, n - 1, i):
        assert np.array_equal(prf.row(reused, stream, n, bits, j), full[j])


def test_threaded_generation_is_identical() -> None:
    key = bytes(range(32))
    one = prf.matrix(key, prf.STREAM_A, 512, 7, threads=1)
    four = prf.matrix(key, prf.STREAM_A, 512, 7, threads=4)
    assert np.array_equal(one, four)


@pytest.mark.parametrize("n", [64, 1024, 2048, 4096, 32768, 65536])
def test_value_range_keeps_fp32_sums_exact(n: int) -> None:
    bits = spec.value_bits(n)
    assert n * 4**bits <= 2**24
    assert bits == 7 or n * 4 ** (bits + 1) > 2**24  # the largest range that is still exact
    sample = prf.rows(bytes(32), 0, n, bits, 0, 1)
    assert sample.min() >= -(2**bits)
    assert sample.max() < 2**bits


def test_values_are_uniform_over_the_range() -> None:
    n = 2048
    bits = spec.value_bits(n)
    values = prf.matrix(b"k" * 32, prf.STREAM_A, n, bits, dtype=np.int8).ravel()
    counts = np.bincount(values.astype(np.int64) + 2**bits, minlength=2 ** (bits + 1))
    expected = values.size / counts.size
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 2 * counts.size  # df = 127; this bound fails only for a broken mapping


def test_streams_and_keys_are_independent() -> None:
    a = prf.rows(b"a" * 32, prf.STREAM_A, 256, 7, 0, 4)
    b = prf.rows(b"a" * 32, prf.STREAM_B_T, 256, 7, 0, 4)
    c = prf.rows(b"b" * 32, prf.STREAM_A, 256, 7, 0, 4)
    assert not np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_bad_reads_are_refused() -> None:
    with pytest.raises(spec.ChallengeError):
        prf.rows(bytes(32), 0, 64, 7, 60, 10)
    with pytest.raises(spec.ChallengeError):
        prf.raw_bytes(bytes(32), 0, 3, 32)
    with pytest.raises(spec.ChallengeError):
        prf.key_words(b"short")
