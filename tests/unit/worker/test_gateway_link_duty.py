"""A leased GPU leaves challenge duty first: nothing of ours runs or stays in its memory when it
moves to vfio-pci, and it comes back after the lease (ChallengeRunner.withdraw / restore)."""

from __future__ import annotations

import asyncio
import hashlib
import threading

import pytest

from byteleap.core import wire
from byteleap.core.challenge import ChallengeSpec, ProvenChallenge, prove
from byteleap.core.challenge.prover import Backend, NumpyBackend
from byteleap.worker.challenges import ChallengeRefusedError, ChallengeRunner, Device

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
