"""A leased GPU leaves challenge duty first: nothing of ours runs or stays in its memory when it
moves to vfio-pci, and it comes back after the lease (ChallengeRunner.withdraw / restore)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading

import pytest

from byteleap.core import wire
from byteleap.core.challenge import ChallengeSpec, ProvenChallenge, prove
from byteleap.core.challenge.device_process import DeviceProcess, ProverProcessError, Ready
from byteleap.core.challenge.prover import Backend, NumpyBackend
from byteleap.worker.challenges import ChallengeRefusedError, ChallengeRunner, Device
from tests.support.fixtures import eventually

WORKER_ID = "0123456789abcdef" * 2
HOTKEY = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"
GPU = "GPU-11111111-2222-3333-4444-555555555555"


def request(tag: str, device: str = GPU) -> wire.ChallengeRequest:
    digest = hashlib.sha256(tag.encode()).digest()
    return wire.ChallengeRequest(
        challenge_id=digest[:16],
        seed=hashlib.sha256(digest).digest(),
        miner_hotkey=HOTKEY,
        device_uuid=device,
        n=128,
        precision="fp32",
        deadline_ms=60_000,
    )


def runner(**kw: object) -> ChallengeRunner:
    devices = [
        Device(uuid=uuid, backend=NumpyBackend(), precisions=frozenset({"fp32"}))
        for uuid in ("cpu-0", GPU)
    ]
    return ChallengeRunner(WORKER_ID, devices, max_n=4096, result_ttl_s=300, **kw)  # type: ignore[arg-type]


async def test_a_withdrawn_device_refuses_challenges_until_restored() -> None:
    r = runner()
    await r.withdraw([GPU, "GPU-not-on-this-worker"])
    assert r.leased_devices == {GPU}
    with pytest.raises(ChallengeRefusedError) as leased:
        await r.run(request("a"))
    assert leased.value.code == wire.ErrorCode.DEVICE_LEASED
    assert GPU in leased.value.message
    assert (await r.run(request("cpu", device="cpu-0"))).device_uuid == "cpu-0"  # others work
    r.restore([GPU])
    assert r.leased_devices == frozenset()
    assert (await r.run(request("b"))).device_uuid == GPU
    r.close()


async def test_withdraw_waits_for_the_running_challenge_and_frees_its_result() -> None:
    gate = threading.Event()
    results: list[ProvenChallenge] = []

    def slow(spec: ChallengeSpec, backend: Backend) -> ProvenChallenge:
        gate.wait(10)
        proof = prove(spec, backend)
        results.append(proof)
        return proof

    r = runner(prover=slow)
    running = asyncio.create_task(r.run(request("running")))
    await asyncio.sleep(0.05)
    withdrawing = asyncio.create_task(r.withdraw([GPU]))
    await asyncio.sleep(0.1)
    assert not withdrawing.done()  # the GPU is still computing for us
    gate.set()
    await asyncio.wait_for(withdrawing, 5)
    assert results and results[0].released  # nothing of ours left in its memory
    with pytest.raises(ChallengeRefusedError) as late:
        await running
    assert late.value.code == wire.ErrorCode.DEVICE_LEASED
    assert r.held_results == 0 and r.busy_devices == frozenset()
    r.close()


async def test_withdraw_frees_held_results_of_that_device_only() -> None:
    r = runner()
    await r.run(request("gpu"))
    await r.run(request("cpu", device="cpu-0"))
    assert r.held_results == 2
    await r.withdraw([GPU])
    assert r.held_results == 1
    with pytest.raises(ChallengeRefusedError) as gone:
        r.reveal(
            wire.RevealRequest(challenge_id=request("gpu").challenge_id, device_uuid=GPU, rows=[0])
        )
    assert gone.value.code == wire.ErrorCode.CHALLENGE_UNKNOWN
    reveal = r.reveal(
        wire.RevealRequest(
            challenge_id=request("cpu", device="cpu-0").challenge_id, device_uuid="cpu-0", rows=[0]
        )
    )
    assert reveal.rows[0].index == 0
    r.close()


async def test_withdraw_ends_the_gpu_prover_process_and_restore_starts_it_again() -> None:
    """Only a process that exits lets go of a GPU (CUDA keeps its device nodes open until then):
    a leased GPU's prover process is gone before the GPU moves, and back after the lease."""
    prover = DeviceProcess("numpy", GPU)
    devices = [
        Device(uuid="cpu-0", backend=NumpyBackend(), precisions=frozenset({"fp32"})),
        Device(uuid=GPU, backend=prover, precisions=frozenset({"fp32"})),
    ]
    r = ChallengeRunner(WORKER_ID, devices, max_n=4096, result_ttl_s=300)
    try:
        assert (await r.run(request("before"))).device_uuid == GPU
        pid = prover.pid
        assert pid is not None
        await r.withdraw([GPU])
        assert prover.pid is None and r.held_results == 0
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # exited and reaped: it holds no device node any more
        r.restore([GPU])
        await eventually(lambda: prover.pid is not None)  # warmed up before any challenge
        assert prover.pid != pid
        commit = await r.run(request("after"))
        reveal = await r.reveal_off_loop(
            wire.RevealRequest(challenge_id=commit.challenge_id, device_uuid=GPU, rows=[0, 1])
        )
        assert [row.index for row in reveal.rows] == [0, 1]
    finally:
        r.close()
    await eventually(lambda: prover.pid is None)  # close() ends it too


async def test_a_prover_that_cannot_start_after_a_lease_fails_only_its_challenges() -> None:
    class Broken(DeviceProcess):
        def start(self) -> Ready:
            raise ProverProcessError("CUDA error: no device")

    devices = [
        Device(uuid="cpu-0", backend=NumpyBackend(), precisions=frozenset({"fp32"})),
        Device(uuid=GPU, backend=Broken("numpy", GPU), precisions=frozenset({"fp32"})),
    ]
    r = ChallengeRunner(WORKER_ID, devices, max_n=4096, result_ttl_s=300)
    try:
        await r.withdraw([GPU])
        r.restore([GPU])  # the warm-up fails and is logged, nothing raises
        with pytest.raises(ChallengeRefusedError) as failed:
            await r.run(request("gpu"))
        assert failed.value.code == wire.ErrorCode.INTERNAL
        assert "no device" in failed.value.message
        assert (await r.run(request("cpu", device="cpu-0"))).device_uuid == "cpu-0"
    finally:
        r.close()
