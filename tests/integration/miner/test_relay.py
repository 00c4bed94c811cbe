"""Relaying challenges through a real miner to a fake worker with the real numpy prover."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from byteleap.core import wire
from byteleap.core.challenge import draw_sample, verify
from byteleap.miner.relay import RelayError, WorkerConnections
from tests.support.fixtures import WAIT, eventually
from tests.unit.miner.builders import N, challenge_request

from .conftest import FakeWorker, MakeMiner, Miner

Connected = Callable[..., Awaitable[tuple[Miner, FakeWorker]]]


@pytest.fixture
async def connected(make_miner: MakeMiner, http: aiohttp.ClientSession) -> AsyncIterator[Connected]:
    tasks: list[asyncio.Task[None]] = []

    async def start(
        *, connections: WorkerConnections | None = None, worker: FakeWorker | None = None
    ) -> tuple[Miner, FakeWorker]:
        miner = await make_miner(connections=connections)
        fake = worker or FakeWorker(gpus=("GPU-1111",))
        await fake.connect(http, miner.url)
        tasks.append(asyncio.create_task(fake.serve()))
        return miner, fake

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_challenge_reveal_release_round_trip(connected: Connected) -> None:
    miner, worker = await connected()
    relay = miner.connections
    request = challenge_request()

    rtt = await relay.echo(worker.worker_id)
    assert 0 < rtt < WAIT

    commit = await relay.challenge(worker.worker_id, request, timeout=WAIT)
    assert commit.challenge_id == request.challenge_id and commit.device_uuid == "cpu-0"
    sample = draw_sample(N, 16, 8)
    reveal = await relay.reveal(
        worker.worker_id,
        wire.RevealRequest(
            challenge_id=request.challenge_id, device_uuid="cpu-0", rows=list(sample.rows)
        ),
        timeout=WAIT,
    )
    spec = request.spec(worker.worker_id)
    rows = {r.index: (r.values, r.path) for r in reveal.rows}
    verdict = await asyncio.to_thread(verify, spec, commit.merkle_root, sample, rows)
    assert verdict.ok, verdict
    assert miner.outcomes == [(worker.worker_id, True)]

    assert await relay.release(worker.worker_id, request.challenge_id)
    assert worker.runner is not None
    await eventually(lambda: worker.runner is not None and worker.runner.held_results == 0)

    # The worker's own refusal comes back as a RelayError with its code.
    with pytest.raises(RelayError) as info:
        await relay.reveal(
            worker.worker_id,
            wire.RevealRequest(challenge_id=request.challenge_id, device_uuid="cpu-0", rows=[0]),
            timeout=WAIT,
        )
    assert info.value.code is wire.ErrorCode.CHALLENGE_UNKNOWN


async def test_refusals_before_anything_is_sent(connected: Connected) -> None:
    leased = {"GPU-1111"}
    connections = WorkerConnections(is_leased=lambda wid, dev: dev in leased)
    miner, worker = await connected(connections=connections)
    relay = miner.connections
    before = len(worker.received)

    cases = [
        ("f" * 32, "cpu-0", wire.ErrorCode.WORKER_OFFLINE),
        (worker.worker_id, "GPU-nope", wire.ErrorCode.DEVICE_UNKNOWN),
        (worker.worker_id, "GPU-1111", wire.ErrorCode.DEVICE_LEASED),
    ]
    for worker_id, device, code in cases:
        with pytest.raises(RelayError) as info:
            await relay.challenge(worker_id, challenge_request(device), timeout=WAIT)
        assert info.value.code is code, (device, info.value)
        assert info.value.device_uuid == device
    await asyncio.sleep(0.05)
    assert len(worker.received) == before  # nothing reached the worker
    assert miner.outcomes == []


async def test_busy_device_is_never_challenged_twice(connected: Connected) -> None:
    gate = threading.Event()
    miner, worker = await connected(worker=FakeWorker(gate=gate))
    relay = miner.connections
    first = asyncio.create_task(relay.challenge(worker.worker_id, challenge_request(), WAIT))
    await eventually(lambda: "cpu-0" in relay.busy_devices(worker.worker_id))
    with pytest.raises(RelayError) as info:
        await relay.challenge(worker.worker_id, challenge_request(), timeout=WAIT)
    assert info.value.code is wire.ErrorCode.DEVICE_BUSY
    requests = [f for f in worker.received if isinstance(f.msg, wire.ChallengeRequest)]
    assert len(requests) == 1
    gate.set()
    commit = await first
    assert commit.device_uuid == "cpu-0"
    assert relay.busy_devices(worker.worker_id) == frozenset()
    # Free again: a new challenge goes through.
    await relay.challenge(worker.worker_id, challenge_request(), timeout=WAIT)


async def test_timeout_expires_and_keeps_the_device_busy_until_the_late_answer(
    connected: Connected,
) -> None:
    gate = threading.Event()
    miner, worker = await connected(worker=FakeWorker(gate=gate))
    relay = miner.connections
    with pytest.raises(RelayError) as info:
        await relay.challenge(worker.worker_id, challenge_request(), timeout=0.2)
    assert info.value.code is wire.ErrorCode.CHALLENGE_EXPIRED
    assert miner.outcomes == [(worker.worker_id, False)]
    with pytest.raises(RelayError) as busy:
        await relay.challenge(worker.worker_id, challenge_request(), timeout=WAIT)
    assert busy.value.code is wire.ErrorCode.DEVICE_BUSY
    gate.set()  # the late commit arrives and frees the device
    await eventually(lambda: relay.busy_devices(worker.worker_id) == frozenset())
    await relay.challenge(worker.worker_id, challenge_request(), timeout=WAIT)


async def test_disconnect_fails_pending_requests_promptly(connected: Connected) -> None:
    gate = threading.Event()
    miner, worker = await connected(worker=FakeWorker(gate=gate))
    relay = miner.connections
    pending = asyncio.create_task(relay.challenge(worker.worker_id, challenge_request(), WAIT))
    await eventually(lambda: "cpu-0" in relay.busy_devices(worker.worker_id))
    loop = asyncio.get_running_loop()
    started = loop.time()
    await worker.close()
    with pytest.raises(RelayError) as info:
        await pending
    assert info.value.code is wire.ErrorCode.WORKER_OFFLINE
    assert loop.time() - started < WAIT / 2
    gate.set()
    with pytest.raises(RelayError) as offline:
        await relay.echo(worker.worker_id)
    assert offline.value.code is wire.ErrorCode.WORKER_OFFLINE
    assert not await relay.release(worker.worker_id, b"\0" * 16)
