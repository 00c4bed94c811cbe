"""GPU prover parity. Runs only where CuPy sees a CUDA device; CI has none and skips cleanly."""

from __future__ import annotations

import contextlib
import random
import re
from pathlib import Path

import numpy as np
import pytest

from byteleap.core.challenge import cupy_backend, draw_sample, prf, prove, verify
from byteleap.core.challenge.device_process import DeviceProcess

from .test_challenge import make_spec, revealed

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not cupy_backend.is_available(), reason="no CUDA device visible to CuPy"),
]


def _as_float(values: np.ndarray, precision: str) -> np.ndarray:
    if precision in ("fp32", "tf32"):
        return values.astype(np.float32)
    if precision == "fp16":
        return values.view(np.float16).astype(np.float32)
    return (values.astype(np.uint32) << 16).view(np.float32)  # bf16 bits


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16", "fp16"])
@pytest.mark.parametrize("n", [1024, 4096])
def test_gpu_matrices_are_bit_identical(precision: str, n: int) -> None:
    import msgspec

    spec = msgspec.structs.replace(make_spec(n, tag=f"gpu-{n}"), precision=precision)
    backend = cupy_backend.CupyBackend(0)
    for stream in (prf.STREAM_A, prf.STREAM_B_T):
        gpu = _as_float(backend.generate(spec, stream, 0, n).get(), precision)
        cpu = prf.matrix(spec.key, stream, n, spec.value_bits, dtype=np.float32)
        assert np.array_equal(gpu, cpu)


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16", "fp16"])
def test_gpu_prover_matches_cpu_and_verifies(precision: str) -> None:
    import msgspec

    spec = msgspec.structs.replace(make_spec(2048, tag="gpu-prove"), precision=precision)
    gpu = prove(spec, cupy_backend.CupyBackend(0))
    cpu = prove(spec)
    assert gpu.root == cpu.root  # exact product: the commitment is hardware-independent
    rng = random.Random(5)
    for _ in range(20):
        sample = draw_sample(spec.n, 16, 8, rng)
        assert verify(spec, gpu.root, sample, revealed(gpu, sample)).ok
    gpu.release()


def _nvml_uuid(index: int) -> str:
    import pynvml

    pynvml.nvmlInit()
    try:
        uuid = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(index))
    finally:
        pynvml.nvmlShutdown()
    return uuid.decode() if isinstance(uuid, bytes) else str(uuid)


def _nvidia_nodes(pid: int) -> set[str]:
    nodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = str(fd.readlink())
            if re.fullmatch(r"/dev/nvidia[0-9]+", target):
                nodes.add(target)
    return nodes


def test_gpu_prover_process_holds_only_its_gpu_and_lets_go_on_stop(tmp_path: Path) -> None:
    uuid = _nvml_uuid(0)
    prover = DeviceProcess("cupy", uuid, cache_dir=tmp_path / "kernels")
    try:
        ready = prover.start()
        assert ready.visible_devices == uuid and ready.pci_bus_id
        spec = make_spec(2048, tag="gpu-process")
        remote = prove(spec, prover)
        assert remote.root == prove(spec).root
        sample = draw_sample(spec.n, 16, 8, random.Random(9))
        assert verify(spec, remote.root, sample, revealed(remote, sample)).ok
        pid = prover.pid
        assert pid is not None
        assert len(_nvidia_nodes(pid)) == 1  # CUDA_VISIBLE_DEVICES hides every other GPU
    finally:
        prover.stop()
    assert not Path(f"/proc/{pid}").exists()  # exited: the GPU can go to vfio-pci
