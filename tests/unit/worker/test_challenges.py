"""The worker's challenge runner: honest results verify, failures never leave a device busy."""

from __future__ import annotations

import asyncio
import hashlib
import random
import threading

import pytest

from byteleap.core import wire
from byteleap.core.challenge import ChallengeSpec, ProvenChallenge, draw_sample, prove, verify
from byteleap.core.challenge.prover import Backend, NumpyBackend, ResultMatrix
from byteleap.worker.challenges import ChallengeRefusedError, ChallengeRunner, Device
from tests.support.fixtures import eventually

WORKER_ID = "0123456789abcdef" * 2
HOTKEY = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def request(
    tag: str,
    *,
    n: int = 128,
    device: str = "cpu-0",
    deadline_ms: int = 60_000,
    precision: str = "fp32",
) -> wire.ChallengeRequest:
    digest = hashlib.sha256(tag.encode()).digest()
    return wire.ChallengeRequest(
        challenge_id=digest[:16],
        seed=hashlib.sha256(digest).digest(),
        miner_hotkey=HOTKEY,
        device_uuid=device,
        n=n,
        precision=precision,  # type: ignore[arg-type]
        deadline_ms=deadline_ms,
    )


def runner(**kw: object) -> ChallengeRunner:
    devices = [Device(uuid="cpu-0", backend=NumpyBackend(), precisions=frozenset({"fp32"}))]
    return ChallengeRunner(WORKER_ID, devices, max_n=4096, result_ttl_s=300, **kw)  # type: ignore[arg-type]


async def test_commit_reveal_verifies() -> None:
    r = runner()
    req = request("a")
    commit = await r.run(req)
    assert r.busy_devices == frozenset() and r.held_results == 1
    spec = ChallengeSpec(
        challenge_id=req.challenge_id,
        seed=req.seed,
        miner_hotkey=HOTKEY,
        worker_id=WORKER_ID,
        device_uuid="cpu-0",
        n=req.n,
    )
    sample = draw_sample(req.n, 8, 8, random.Random(0))
    reveal = r.reveal(
        wire.RevealRequest(
            challenge_id=req.challenge_id, device_uuid="cpu-0", rows=list(sample.rows)
        )
    )
    revealed = {row.index: (row.values, row.path) for row in reveal.rows}
    assert verify(spec, commit.merkle_root, sample, revealed).ok
    assert r.release(req.challenge_id) and r.held_results == 0
    with pytest.raises(ChallengeRefusedError) as gone:
        r.reveal(wire.RevealRequest(challenge_id=req.challenge_id, device_uuid="cpu-0", rows=[0]))
    assert gone.value.code == wire.ErrorCode.CHALLENGE_UNKNOWN


@pytest.mark.parametrize(
    ("req", "code", "named"),
    [
        (request("x", device="GPU-nope"), wire.ErrorCode.DEVICE_UNKNOWN, "GPU-nope"),
        (request("x", n=8192), wire.ErrorCode.CHALLENGE_INVALID, "8192"),
        (request("x", precision="bf16"), wire.ErrorCode.CHALLENGE_INVALID, "bf16"),
    ],
)
async def test_bad_challenges_are_refused(
    req: wire.ChallengeRequest, code: wire.ErrorCode, named: str
) -> None:
    r = runner()
    with pytest.raises(ChallengeRefusedError) as refused:
        await r.run(req)
    assert refused.value.code == code
    assert named in refused.value.message  # the miner's log says what was wrong
    error = refused.value.to_error(ref=7)
    assert (error.code, error.ref, error.message) == (code, 7, refused.value.message)


async def test_failing_prover_never_leaves_the_device_busy() -> None:
    def broken(spec: ChallengeSpec, backend: Backend) -> ProvenChallenge:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    r = runner(prover=broken)
    with pytest.raises(ChallengeRefusedError) as failed:
        await r.run(request("boom"))
    assert failed.value.code == wire.ErrorCode.INTERNAL
    assert r.busy_devices == frozenset()

    def out_of_memory(spec: ChallengeSpec, backend: Backend) -> ProvenChallenge:
        raise MemoryError

    r = runner(prover=out_of_memory)
    with pytest.raises(ChallengeRefusedError) as oom:
        await r.run(request("oom"))
    assert oom.value.code == wire.ErrorCode.CHALLENGE_INVALID
    assert r.busy_devices == frozenset()


async def test_one_challenge_per_device_and_deadline() -> None:
    gate = threading.Event()
    late_results: list[ProvenChallenge] = []

    def slow(spec: ChallengeSpec, backend: Backend) -> ProvenChallenge:
        gate.wait(10)
        proof = prove(spec, backend)
        late_results.append(proof)
        return proof

    r = runner(prover=slow)
    first = asyncio.create_task(r.run(request("slow", deadline_ms=200)))
    await asyncio.sleep(0.05)
    assert r.busy_devices == frozenset({"cpu-0"})
    with pytest.raises(ChallengeRefusedError) as busy:
        await r.run(request("second"))
    assert busy.value.code == wire.ErrorCode.DEVICE_BUSY
    try:
        # The refusal comes at the deadline, not when the thread gives up...
        with pytest.raises(ChallengeRefusedError) as late:
            await asyncio.wait_for(first, 2.0)
        assert late.value.code == wire.ErrorCode.CHALLENGE_EXPIRED
        assert not gate.is_set()
        # ... but the device stays busy while the thread is still computing.
        await asyncio.sleep(0.1)
        assert r.busy_devices == frozenset({"cpu-0"})
        with pytest.raises(ChallengeRefusedError) as still_busy:
            await r.run(request("still busy"))
        assert still_busy.value.code == wire.ErrorCode.DEVICE_BUSY
    finally:
        gate.set()
    await eventually(lambda: r.busy_devices == frozenset())
    assert r.held_results == 0
    await eventually(lambda: len(late_results) == 1 and late_results[0].released)
    assert (await r.run(request("third"))).device_uuid == "cpu-0"
    r.close()


async def test_results_are_freed_in_their_devices_executor() -> None:
    """Freeing may wait for a GPU: never on the event loop, and after the device's own work."""
    freed_in: list[str] = []

    class Recorded:
        def __init__(self, inner: ResultMatrix) -> None:
            self.inner = inner

        def row_bytes(self, index: int) -> bytes:
            return self.inner.row_bytes(index)

        def release(self) -> None:
            freed_in.append(threading.current_thread().name)
            self.inner.release()

    class RecordingBackend(NumpyBackend):
        def compute(self, spec: ChallengeSpec, threads: int) -> tuple[ResultMatrix, list[bytes]]:
            result, leaves = super().compute(spec, threads)
            return Recorded(result), leaves

    clock = Clock()
    device = Device(uuid="cpu-0", backend=RecordingBackend(), precisions=frozenset({"fp32"}))
    r = ChallengeRunner(WORKER_ID, [device], max_n=4096, result_ttl_s=300, clock=clock)
    released, expired = request("released"), request("expired")
    await r.run(released)
    await r.run(expired)
    assert r.release(released.challenge_id) and not r.release(released.challenge_id)
    clock.now += 301
    assert r.sweep() == 1 and r.held_results == 0
    await eventually(lambda: len(freed_in) == 2)
    assert all(name.startswith("challenge-cpu-0") for name in freed_in), freed_in
    r.close()


async def test_results_expire_and_ids_are_not_reused() -> None:
    clock = Clock()
    r = runner(clock=clock)
    req = request("ttl")
    await r.run(req)
    with pytest.raises(ChallengeRefusedError) as reused:
        await r.run(req)
    assert reused.value.code == wire.ErrorCode.CHALLENGE_INVALID
    clock.now += 301
    with pytest.raises(ChallengeRefusedError) as expired:
        r.reveal(wire.RevealRequest(challenge_id=req.challenge_id, device_uuid="cpu-0", rows=[1]))
    assert expired.value.code == wire.ErrorCode.CHALLENGE_EXPIRED
    await r.run(request("ttl2"))
    clock.now += 301
    assert r.sweep() == 1 and r.held_results == 0
    r.close()


async def test_reveal_of_another_device_or_bad_row_is_refused() -> None:
    r = runner()
    req = request("rows")
    await r.run(req)
    with pytest.raises(ChallengeRefusedError) as other:
        r.reveal(wire.RevealRequest(challenge_id=req.challenge_id, device_uuid="cpu-1", rows=[0]))
    assert other.value.code == wire.ErrorCode.CHALLENGE_UNKNOWN
    with pytest.raises(ChallengeRefusedError) as bad:
        r.reveal(wire.RevealRequest(challenge_id=req.challenge_id, device_uuid="cpu-0", rows=[999]))
    assert bad.value.code == wire.ErrorCode.CHALLENGE_INVALID
