"""``WorkerLink.request_gateway_grant`` against the scripted miner of test_link.py: the request
waits for a registered session, matches its answer by frame id, and fails clearly."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from byteleap.core import wire
from byteleap.core.challenge.prover import NumpyBackend
from byteleap.core.identity import WorkerKey
from byteleap.worker.challenges import ChallengeRunner, Device
from byteleap.worker.link import LinkSettings, MinerRequestError, WorkerLink
from tests.support.fixtures import WAIT
from tests.support.gateway_fixtures import GRANT

from .test_link import INVENTORY_A, SECRET, FakeMiner, MinerSession


@pytest.fixture
async def miner() -> AsyncIterator[FakeMiner]:
    fake = FakeMiner()
    app = web.Application()
    app.router.add_get("/worker", fake.handler)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    fake.url = f"ws://{host}:{port}/worker"
    yield fake
    await runner.cleanup()


@pytest.fixture
async def link(miner: FakeMiner, tmp_path: Path) -> AsyncIterator[WorkerLink]:
    key = WorkerKey.generate()
    worker = WorkerLink(
        LinkSettings(url=miner.url, reconnect_initial_s=0.05, reconnect_max_s=0.2),
        key=key,
        secret=SECRET,
        runner=ChallengeRunner(
            key.worker_id,
            [Device("cpu-0", NumpyBackend(), frozenset({"fp32"}))],
            max_n=256,
            result_ttl_s=60.0,
        ),
        state_dir=tmp_path,
        collect_inventory=lambda: INVENTORY_A,
        collect_live=lambda: wire.Heartbeat(uptime_s=1.0, load1=0.1, mem_used_bytes=1),
        rng=random.Random(3),
    )
    task = asyncio.create_task(worker.run())
    yield worker
    await asyncio.wait_for(worker.stop(), WAIT)
    await asyncio.wait_for(task, WAIT)


async def requested(session: MinerSession) -> int:
    frame_id, _msg = await session.expect(wire.GatewayEnrollRequest)
    assert frame_id > 1  # never 0, never Register's
    return frame_id


async def test_the_request_waits_for_the_session_and_takes_its_own_answer(
    miner: FakeMiner, link: WorkerLink
) -> None:
    pending = asyncio.create_task(link.request_gateway_grant(timeout_s=WAIT))
    session = await miner.next_session()  # asked only once registered
    frame_id = await requested(session)
    # An error about something else and a grant for another request change nothing.
    await session.channel.send_error(wire.ErrorCode.DEVICE_BUSY, "busy", ref=frame_id + 1)
    other = wire.GatewayEnrollGrant(worker_id=link.worker_id, grant=GRANT)
    await session.channel.send(other, id=frame_id + 1)
    await asyncio.sleep(0.05)
    assert not pending.done()
    mine = wire.GatewayEnrollGrant(worker_id=link.worker_id, grant=GRANT)
    await session.channel.send(mine, id=frame_id)
    assert await asyncio.wait_for(pending, WAIT) == mine


async def test_the_miners_refusal_carries_its_code(miner: FakeMiner, link: WorkerLink) -> None:
    pending = asyncio.create_task(link.request_gateway_grant(timeout_s=WAIT))
    session = await miner.next_session()
    frame_id = await requested(session)
    await session.channel.send_error(wire.ErrorCode.NO_GATEWAY, "no gateway", ref=frame_id)
    with pytest.raises(MinerRequestError) as info:
        await asyncio.wait_for(pending, WAIT)
    assert info.value.code is wire.ErrorCode.NO_GATEWAY
    assert str(info.value) == "NO_GATEWAY: no gateway"


async def test_a_grant_naming_another_worker_is_refused(miner: FakeMiner, link: WorkerLink) -> None:
    pending = asyncio.create_task(link.request_gateway_grant(timeout_s=WAIT))
    session = await miner.next_session()
    frame_id = await requested(session)
    forged = wire.GatewayEnrollGrant(worker_id="ee" * 16, grant=GRANT)
    await session.channel.send(forged, id=frame_id)
    with pytest.raises(MinerRequestError) as info:
        await asyncio.wait_for(pending, WAIT)
    assert info.value.code is None and "not this one" in str(info.value)


async def test_a_link_that_drops_fails_the_request_at_once(
    miner: FakeMiner, link: WorkerLink
) -> None:
    pending = asyncio.create_task(link.request_gateway_grant(timeout_s=WAIT))
    session = await miner.next_session()
    await requested(session)
    await session.channel.close()
    with pytest.raises(MinerRequestError) as info:
        await asyncio.wait_for(pending, WAIT / 2)
    assert info.value.code is None and "closed while asking" in str(info.value)
    # The next session serves the next request.
    again = asyncio.create_task(link.request_gateway_grant(timeout_s=WAIT))
    session = await miner.next_session()
    frame_id = await requested(session)
    grant = wire.GatewayEnrollGrant(worker_id=link.worker_id, grant=GRANT)
    await session.channel.send(grant, id=frame_id)
    assert await asyncio.wait_for(again, WAIT) == grant


async def test_no_answer_in_time(miner: FakeMiner, link: WorkerLink) -> None:
    await miner.next_session()
    with pytest.raises(MinerRequestError) as info:
        await link.request_gateway_grant(timeout_s=0.2)
    assert info.value.code is None
    assert "no answer within 0.2 s" in str(info.value)
