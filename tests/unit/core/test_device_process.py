"""A GPU's prover in its own process: same commitments as in-process, rows served beside a running
computation, and a process that dies, hangs, lies or is stopped never takes the worker with it.

These run real child processes with the CPU (numpy) backend; the CuPy one is covered on a GPU
host by tests/unit/test_cupy_backend.py.
"""

from __future__ import annotations

import io
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from byteleap.core.challenge import ChallengeError, draw_sample, prove, verify
from byteleap.core.challenge import device_process as dp
from byteleap.core.challenge.device_process import DeviceProcess, ProverProcessError
from tests.unit.test_challenge import make_spec, revealed

GPU = "GPU-11111111-2222-3333-4444-555555555555"


@pytest.fixture
def prover() -> Iterator[DeviceProcess]:
    process = DeviceProcess("numpy", GPU)
    yield process
    process.stop()


def eventually(check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def _gone(pid: int) -> bool:
    """True once ``pid`` is no longer a process (reaped by the parent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_commitment_and_rows_match_the_in_process_prover(prover: DeviceProcess) -> None:
    spec = make_spec(256, tag="child")
    remote = prove(spec, prover)
    local = prove(spec)
    assert remote.root == local.root and remote.backend == "numpy"
    sample = draw_sample(spec.n, 8, 4, random.Random(3))
    assert revealed(remote, sample) == revealed(local, sample)
    assert verify(spec, remote.root, sample, revealed(remote, sample)).ok
    remote.release()
    with pytest.raises(ChallengeError, match="released"):
        remote.reveal([0])


def test_a_cpu_prover_sees_no_gpu_and_a_gpu_prover_only_its_own(tmp_path: Path) -> None:
    cpu = DeviceProcess("numpy", "cpu-0")
    try:
        ready = cpu.start()
        assert ready.visible_devices == "" and ready.pid == cpu.pid != os.getpid()
    finally:
        cpu.stop()
    gpu = DeviceProcess("cupy", GPU, cache_dir=tmp_path / "kernels", environ={"PATH": "/bin"})
    env = gpu.environment()
    assert env["CUDA_VISIBLE_DEVICES"] == GPU
    assert env["CUPY_CACHE_DIR"] == str(tmp_path / "kernels")
    assert env["PATH"] == "/bin"


def test_rows_are_served_while_another_challenge_computes(prover: DeviceProcess) -> None:
    held = prove(make_spec(128, tag="held"), prover)
    computing = threading.Thread(target=prove, args=(make_spec(4096, tag="big"), prover))
    computing.start()
    try:
        eventually(lambda: computing.is_alive(), timeout=5)
        rows = held.reveal([0, 5, 127])
        # The big product takes seconds; the rows came back without waiting for it.
        assert computing.is_alive()
        assert [r.index for r in rows] == [0, 5, 127]
    finally:
        computing.join(60)


def test_stop_releases_the_device_and_the_next_challenge_starts_a_new_process(
    prover: DeviceProcess,
) -> None:
    proof = prove(make_spec(128, tag="before"), prover)
    pid = prover.pid
    assert pid is not None
    prover.stop()
    assert prover.pid is None and _gone(pid)
    with pytest.raises(ChallengeError, match="lost"):
        proof.reveal([0])
    proof.release()  # harmless: its memory went with the process
    again = prove(make_spec(128, tag="after"), prover)
    assert prover.pid not in (None, pid)
    assert again.reveal([1])[0].index == 1
    prover.stop()
    prover.stop()  # idempotent


def test_a_killed_prover_fails_its_results_and_is_replaced(prover: DeviceProcess) -> None:
    proof = prove(make_spec(128, tag="victim"), prover)
    pid = prover.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    eventually(lambda: prover.pid is None, timeout=10)
    with pytest.raises(ChallengeError, match="lost"):
        proof.reveal([0])
    fresh = prove(make_spec(128, tag="survivor"), prover)
    assert prover.pid not in (None, pid)
    assert fresh.root == prove(make_spec(128, tag="survivor")).root


def test_a_prover_that_does_not_answer_in_time_is_killed() -> None:
    slow = DeviceProcess("numpy", GPU, compute_timeout_s=0.05)
    try:
        slow.start()
        pid = slow.pid
        assert pid is not None
        with pytest.raises(ProverProcessError, match="did not answer within"):
            prove(make_spec(4096, tag="hang"), slow)
        assert slow.pid is None
        eventually(lambda: _gone(pid), timeout=10)
    finally:
        slow.stop()


def test_errors_in_the_prover_come_back_typed(prover: DeviceProcess) -> None:
    spec = make_spec(128, tag="twice")
    prover.start()
    prove(spec, prover)
    with pytest.raises(ChallengeError, match="already held"):
        prove(spec, prover)  # the child refuses to overwrite a held result
    assert prover.pid is not None  # a refused request does not end the process


@pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("cupy") is not None, reason="CuPy is installed"
)
def test_a_backend_that_cannot_load_says_why() -> None:
    gpu = DeviceProcess("cupy", GPU)
    with pytest.raises(ProverProcessError, match=r"cannot load the cupy prover: .*cupy"):
        gpu.start()
    assert gpu.pid is None


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ChallengeError, match="unknown prover backend"):
        DeviceProcess("opencl", GPU)


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        (b"\x00\x00\x00\x05hello", "broke the protocol"),
        (b"\xff\xff\xff\xff", "broke the protocol"),
        (b"", "closed its output"),
    ],
)
def test_a_process_that_breaks_the_protocol_is_refused(
    tmp_path: Path, output: bytes, expected: str
) -> None:
    liar = tmp_path / "liar"
    liar.write_text(
        f"#!{sys.executable}\nimport sys\nsys.stdout.buffer.write({output!r})\n"
        # Junk, then wait to be killed; or nothing at all and exit.
        f"sys.stdout.buffer.flush()\nif {bool(output)}: sys.stdin.buffer.read()\n"
    )
    liar.chmod(0o755)
    process = DeviceProcess("numpy", GPU, python=str(liar), start_timeout_s=30)
    with pytest.raises(ProverProcessError, match=expected):
        process.start()
    assert process.pid is None


def test_the_child_exits_when_its_worker_goes_away(tmp_path: Path) -> None:
    """End of input is the child's signal to exit: a dead worker leaves no prover behind."""
    prover = DeviceProcess("numpy", GPU)
    prover.start()
    child = prover._child
    assert child is not None and child.process.stdin is not None
    child.process.stdin.close()  # what the kernel does when the worker dies
    assert child.process.wait(30) == 0
    prover.stop()


# ---- frames


_specs = st.builds(
    lambda tag, n: make_spec(n, tag=tag),
    st.text(min_size=1, max_size=8),
    st.sampled_from([64, 128, 1024]),
)
_requests = st.one_of(
    st.builds(dp.Compute, call=st.integers(0, 2**32), spec=_specs, threads=st.integers(1, 64)),
    st.builds(
        dp.ReadRow,
        call=st.integers(0, 2**32),
        challenge_id=st.binary(min_size=16, max_size=16),
        index=st.integers(0, 65535),
    ),
    st.builds(
        dp.Release, call=st.integers(0, 2**32), challenge_id=st.binary(min_size=16, max_size=16)
    ),
)


@given(st.lists(_requests, max_size=5))
def test_frames_round_trip(requests: list[dp.Request]) -> None:
    stream = io.BytesIO()
    for request in requests:
        dp.write_frame(stream, request)
    stream.seek(0)
    decoded = []
    while (body := dp.read_frame(stream)) is not None:
        decoded.append(dp.decode_request(body))
    assert decoded == requests


@given(st.binary(min_size=1, max_size=64))
def test_truncated_or_foreign_frames_are_errors(junk: bytes) -> None:
    stream = io.BytesIO()
    dp.write_frame(stream, dp.Release(call=1, challenge_id=b"x" * 16))
    whole = stream.getvalue()
    with pytest.raises(dp.FrameError):
        dp.read_frame(io.BytesIO(whole[: len(whole) - 1]))
    with pytest.raises(dp.FrameError):
        dp.decode_reply(junk)


def test_oversized_frames_are_refused_both_ways() -> None:
    header = (dp.MAX_FRAME_BYTES + 1).to_bytes(4, "big")
    with pytest.raises(dp.FrameError, match="exceeds"):
        dp.read_frame(io.BytesIO(header))
    huge = dp.RowData(call=1, values=b"\0" * (dp.MAX_FRAME_BYTES + 1))
    with pytest.raises(dp.FrameError, match="exceeds"):
        dp.write_frame(io.BytesIO(), huge)
    assert msgspec.msgpack.encode(dp.Done(call=1))  # small frames are fine
