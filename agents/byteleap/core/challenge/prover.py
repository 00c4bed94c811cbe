"""Compute a challenge, commit to it, and reveal sampled rows later.

The prover fills A and B-transposed from the PRF, multiplies them on its backend, hashes every row
of C into a Merkle tree (``merkle``) and commits the root. C stays in the backend's memory (host RAM
for numpy, VRAM for CuPy) until phase 2 asks for rows or the caller releases it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Protocol

import msgspec
import numpy as np
import numpy.typing as npt

from ..merkle import MerkleTree, hash_rows
from . import prf
from .spec import ChallengeError, ChallengeSpec


class RevealedRow(msgspec.Struct, frozen=True):
    """Row ``index`` of C as float32 little-endian bytes, with its Merkle path."""

    index: int
    values: bytes
    path: list[bytes]


class ResultMatrix(Protocol):
    """Where a backend keeps C between commit and reveal."""

    def row_bytes(self, index: int) -> bytes: ...

    def release(self) -> None: ...


class Backend(Protocol):
    name: str

    def compute(self, spec: ChallengeSpec, threads: int) -> tuple[ResultMatrix, list[bytes]]:
        """C, kept where it was computed, and the leaf hash of each of its rows."""
        ...


def cpu_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


class _HostMatrix:
    def __init__(self, c: npt.NDArray[np.float32]) -> None:
        self._c: npt.NDArray[np.float32] | None = c

    def row_bytes(self, index: int) -> bytes:
        if self._c is None:
            raise ChallengeError("challenge result was already released")
        data: bytes = self._c[index].astype("<f4", copy=False).tobytes()
        return data

    def release(self) -> None:
        self._c = None


class NumpyBackend:
    """CPU prover: numpy's Philox and BLAS sgemm. CPU challenges are always computed in fp32."""

    name = "numpy"

    def compute(self, spec: ChallengeSpec, threads: int) -> tuple[ResultMatrix, list[bytes]]:
        bits = spec.value_bits
        key = spec.key
        # Below n=4096 generation takes ~3 ms a matrix; extra threads only fight BLAS's own.
        gen_threads = threads if spec.n >= 4096 else 1
        a = prf.matrix(key, prf.STREAM_A, spec.n, bits, dtype=np.float32, threads=gen_threads)
        b_t = prf.matrix(key, prf.STREAM_B_T, spec.n, bits, dtype=np.float32, threads=gen_threads)
        c = np.matmul(a, b_t.T)
        del a, b_t
        if c.dtype.byteorder not in ("<", "=") or not c.flags.c_contiguous:
            c = np.ascontiguousarray(c, dtype="<f4")
        return _HostMatrix(c), hash_rows(spec.challenge_id, c, threads=threads)


class ProvenChallenge:
    """A computed challenge: the commitment now, revealed rows on request, then released."""

    def __init__(
        self,
        spec: ChallengeSpec,
        backend: str,
        result: ResultMatrix,
        tree: MerkleTree,
        elapsed_s: float,
    ) -> None:
        self.spec = spec
        self.backend = backend
        self.elapsed_s = elapsed_s
        self._result = result
        self._tree = tree
        self._released = False

    @classmethod
    def from_host_rows(
        cls, spec: ChallengeSpec, rows: npt.NDArray[np.float32], backend: str
    ) -> ProvenChallenge:
        """Commit to given rows of C held in host memory (simulations, adversarial tests)."""
        if rows.shape != (spec.n, spec.n):
            raise ChallengeError(f"rows must be {spec.n}x{spec.n}, got {rows.shape}")
        c = np.ascontiguousarray(rows, dtype="<f4")
        tree = MerkleTree.from_rows(spec.challenge_id, c)
        return cls(spec, backend, _HostMatrix(c), tree, 0.0)

    @property
    def root(self) -> bytes:
        return self._tree.root

    @property
    def released(self) -> bool:
        return self._released

    def reveal(self, rows: Sequence[int]) -> list[RevealedRow]:
        if self._released:
            raise ChallengeError("challenge result was already released")
        if len(set(rows)) != len(rows):
            raise ChallengeError("reveal request names a row twice")
        out = []
        for index in rows:
            if not 0 <= index < self.spec.n:
                raise ChallengeError(f"row {index} outside an {self.spec.n}x{self.spec.n} result")
            values = self._result.row_bytes(index)
            out.append(RevealedRow(index=index, values=values, path=self._tree.proof(index)))
        return out

    def release(self) -> None:
        """Free C (host or device memory). Idempotent."""
        if not self._released:
            self._released = True
            self._result.release()


def available_backends() -> list[str]:
    names = ["numpy"]
    from . import cupy_backend

    if cupy_backend.is_available():
        names.append("cupy")
    return names


def get_backend(name: str, *, device: int = 0) -> Backend:
    if name == "numpy":
        return NumpyBackend()
    if name == "cupy":
        from . import cupy_backend

        return cupy_backend.CupyBackend(device)
    raise ChallengeError(f"unknown prover backend {name!r} (known: numpy, cupy)")


def prove(
    spec: ChallengeSpec, backend: Backend | None = None, *, threads: int | None = None
) -> ProvenChallenge:
    """Run the challenge end to end; ``elapsed_s`` covers generation, product and hashing."""
    chosen = backend if backend is not None else NumpyBackend()
    start = time.perf_counter()
    result, leaves = chosen.compute(spec, threads or cpu_threads())
    tree = MerkleTree(leaves)
    elapsed = time.perf_counter() - start
    return ProvenChallenge(spec, chosen.name, result, tree, elapsed)
