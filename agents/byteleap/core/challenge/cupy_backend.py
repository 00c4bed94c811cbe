"""GPU prover: the same Philox as a CUDA kernel, cuBLAS GEMM with fp32 accumulation and output.

Installed with the ``cuda`` extra (``cupy-cuda12x``). The kernel computes one Philox4x64-10 block
per thread, exactly as ``prf.philox_block`` (block j uses counter j + 1), and writes its 32 signed
bytes, shifted to the challenge's value range, straight into the input precision:

* fp32 and tf32: float32 (tf32 only changes the GEMM's compute type);
* fp16 and bf16: the 16-bit pattern, built from the float32 bits. Entries are integers with
  ``|x| <= 128``, so the conversion is exact and needs no rounding mode.

The product always accumulates and is stored in fp32 (``cublasGemmEx`` with CUBLAS_COMPUTE_32F, or
32F_FAST_TF32 for tf32), which ``spec`` proves exact; C is therefore bit-identical to the numpy
prover's. Rows of C are hashed on the host in bands (pinned-free plain copies, several hashing
threads); C stays in VRAM until phase 2 reveals rows or the challenge is released.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..merkle import leaf_hash
from . import prf
from .spec import ChallengeError, ChallengeSpec

_KERNEL_SOURCE = r"""
typedef unsigned long long u64;

__device__ __forceinline__ void philox4x64_10(u64 c[4], u64 k0, u64 k1) {
    #pragma unroll
    for (int r = 0; r < 10; ++r) {
        u64 lo0 = 0xD2E7470EE14C6C93ULL * c[0];
        u64 hi0 = __umul64hi(0xD2E7470EE14C6C93ULL, c[0]);
        u64 lo1 = 0xCA5A826395121157ULL * c[2];
        u64 hi1 = __umul64hi(0xCA5A826395121157ULL, c[2]);
        u64 n0 = hi1 ^ c[1] ^ k0;
        u64 n2 = hi0 ^ c[3] ^ k1;
        c[0] = n0; c[1] = lo1; c[2] = n2; c[3] = lo0;
        k0 += 0x9E3779B97F4A7C15ULL;
        k1 += 0xBB67AE8584CAA73BULL;
    }
}

__device__ __forceinline__ int element(const u64 c[4], int e, int shift) {
    signed char byte = (signed char)((c[e >> 3] >> (8 * (e & 7))) & 0xFF);
    return ((int)byte) >> shift;  /* arithmetic, as numpy's right_shift on int8 */
}

__device__ __forceinline__ unsigned short to_bf16_bits(int v) {
    return (unsigned short)(__float_as_uint((float)v) >> 16);  /* exact: |v| <= 128 */
}

__device__ __forceinline__ unsigned short to_fp16_bits(int v) {
    if (v == 0) return 0;
    unsigned int f = __float_as_uint((float)v);
    unsigned int sign = (f >> 16) & 0x8000u;
    int exponent = (int)((f >> 23) & 0xFF) - 127 + 15;
    unsigned int mantissa = (f >> 13) & 0x3FFu;  /* exact: at most 8 significant bits */
    return (unsigned short)(sign | ((unsigned int)exponent << 10) | mantissa);
}

extern "C" __global__ void philox_fill_f32(
        u64 k0, u64 k1, u64 stream, u64 c2, u64 c3, u64 first_block, u64 nblocks,
        int shift, float* out) {
    u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= nblocks) return;
    u64 c[4] = {first_block + j + 1ULL, stream, c2, c3};
    philox4x64_10(c, k0, k1);
    float* dst = out + j * 32ULL;
    #pragma unroll
    for (int e = 0; e < 32; ++e) dst[e] = (float)element(c, e, shift);
}

extern "C" __global__ void philox_fill_u16(
        u64 k0, u64 k1, u64 stream, u64 c2, u64 c3, u64 first_block, u64 nblocks,
        int shift, int bf16, unsigned short* out) {
    u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= nblocks) return;
    u64 c[4] = {first_block + j + 1ULL, stream, c2, c3};
    philox4x64_10(c, k0, k1);
    unsigned short* dst = out + j * 32ULL;
    #pragma unroll
    for (int e = 0; e < 32; ++e) {
        int v = element(c, e, shift);
        dst[e] = bf16 ? to_bf16_bits(v) : to_fp16_bits(v);
    }
}
"""

# cuBLAS / CUDA enum values (cublas_api.h, library_types.h); stable ABI constants.
_CUBLAS_OP_N = 0
_CUBLAS_OP_T = 1
_CUDA_R_32F = 0
_CUDA_R_16F = 2
_CUDA_R_16BF = 14
_CUBLAS_COMPUTE_32F = 68
_CUBLAS_COMPUTE_32F_FAST_TF32 = 77
_CUBLAS_GEMM_DEFAULT = -1

_THREADS_PER_BLOCK = 256
_HASH_BAND_BYTES = 256 << 20


def _cupy() -> Any:
    import cupy

    return cupy


def is_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        cp = _cupy()
        return int(cp.cuda.runtime.getDeviceCount()) > 0
    except Exception:
        return False


def device_identity(device: int) -> tuple[str, str]:
    """The name and PCI address (``0000:17:00.0``) of CUDA device ``device``."""
    cp = _cupy()
    name = cp.cuda.runtime.getDeviceProperties(device)["name"]
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return str(name), str(cp.cuda.runtime.deviceGetPCIBusId(device)).lower()


class _DeviceMatrix:
    """C in the VRAM of CUDA device ``device``; any thread may read rows or release it."""

    def __init__(self, c: Any, device: int) -> None:
        self._c: Any | None = c
        self._device = device

    def row_bytes(self, index: int) -> bytes:
        c = self._c  # once: release() may run in another thread
        if c is None:
            raise ChallengeError("challenge result was already released")
        with _cupy().cuda.Device(self._device):
            row: np.ndarray = c[index].get()
        return row.astype("<f4", copy=False).tobytes()

    def release(self) -> None:
        """Drop C and return the pool's free blocks to the driver (waits for the device).

        The memory pool is per device: free the one of C's device, not the calling thread's.
        """
        if self._c is not None:
            self._c = None
            cp = _cupy()
            with cp.cuda.Device(self._device):
                cp.get_default_memory_pool().free_all_blocks()


class CupyBackend:
    """Prover on one CUDA device."""

    name = "cupy"

    def __init__(self, device: int = 0) -> None:
        cp = _cupy()
        self._device = device
        with cp.cuda.Device(device):
            self._module = cp.RawModule(code=_KERNEL_SOURCE, options=("--std=c++14",))
            self._fill_f32 = self._module.get_function("philox_fill_f32")
            self._fill_u16 = self._module.get_function("philox_fill_u16")

    def generate(self, spec: ChallengeSpec, stream: int, first_row: int, row_count: int) -> Any:
        """Rows of a stream's matrix in the spec's input precision (float32 or 16-bit patterns)."""
        cp = _cupy()
        n = spec.n
        k0, k1, c2, c3 = prf.key_words(spec.key)
        shift = 7 - spec.value_bits
        nblocks = row_count * n // prf.BLOCK_BYTES
        first_block = first_row * n // prf.BLOCK_BYTES
        grid = ((nblocks + _THREADS_PER_BLOCK - 1) // _THREADS_PER_BLOCK,)
        block = (_THREADS_PER_BLOCK,)
        u64 = np.uint64
        common = (
            u64(k0),
            u64(k1),
            u64(stream),
            u64(c2),
            u64(c3),
            u64(first_block),
            u64(nblocks),
            np.int32(shift),
        )
        if spec.precision in ("fp32", "tf32"):
            out = cp.empty((row_count, n), dtype=cp.float32)
            self._fill_f32(grid, block, (*common, out))
        else:
            out = cp.empty((row_count, n), dtype=cp.uint16)
            self._fill_u16(grid, block, (*common, np.int32(spec.precision == "bf16"), out))
        return out

    def compute(self, spec: ChallengeSpec, threads: int) -> tuple[_DeviceMatrix, list[bytes]]:
        cp = _cupy()
        n = spec.n
        with cp.cuda.Device(self._device):
            a = self.generate(spec, prf.STREAM_A, 0, n)
            b_t = self.generate(spec, prf.STREAM_B_T, 0, n)
            c = cp.empty((n, n), dtype=cp.float32)
            self._gemm(spec, a, b_t, c)
            del a, b_t
            leaves = self._hash_rows(spec, c, threads)
            cp.cuda.get_current_stream().synchronize()
        return _DeviceMatrix(c, self._device), leaves

    def _gemm(self, spec: ChallengeSpec, a: Any, b_t: Any, c: Any) -> None:
        """Row-major C = A @ B_t.T as column-major C^T = op_T(B_t^T) @ A^T."""
        cp = _cupy()
        from cupy_backends.cuda.libs import cublas

        n = spec.n
        in_type = {
            "fp32": _CUDA_R_32F,
            "tf32": _CUDA_R_32F,
            "bf16": _CUDA_R_16BF,
            "fp16": _CUDA_R_16F,
        }[spec.precision]
        compute = _CUBLAS_COMPUTE_32F_FAST_TF32 if spec.precision == "tf32" else _CUBLAS_COMPUTE_32F
        one = np.array(1.0, dtype=np.float32)
        zero = np.array(0.0, dtype=np.float32)
        handle = cp.cuda.device.get_cublas_handle()
        cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
        cublas.gemmEx(
            handle,
            _CUBLAS_OP_T,
            _CUBLAS_OP_N,
            n,
            n,
            n,
            one.ctypes.data,
            b_t.data.ptr,
            in_type,
            n,
            a.data.ptr,
            in_type,
            n,
            zero.ctypes.data,
            c.data.ptr,
            _CUDA_R_32F,
            n,
            compute,
            _CUBLAS_GEMM_DEFAULT,
        )

    def _hash_rows(self, spec: ChallengeSpec, c: Any, threads: int) -> list[bytes]:
        from concurrent.futures import ThreadPoolExecutor

        n = spec.n
        band = max(1, min(n, _HASH_BAND_BYTES // (4 * n)))
        leaves: list[bytes] = []
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            for start in range(0, n, band):
                host = np.ascontiguousarray(c[start : start + band].get(), dtype="<f4")
                ids = range(start, start + host.shape[0])
                leaves.extend(
                    pool.map(
                        lambda i, h=host, s=start: leaf_hash(
                            spec.challenge_id, i, memoryview(h[i - s])
                        ),
                        ids,
                        chunksize=64,
                    )
                )
        return leaves
