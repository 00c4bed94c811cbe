"""The miner's part in gateway enrollment, on loopback.

Worker side: a scripted worker (conftest ``FakeWorker``) sends ``GatewayEnrollRequest`` to a real
``MinerServer`` whose token source is a stand-in. Validator side: the real ``ValidatorUplinks``
dial scripted validators (test_uplink.py's ``FakeValidator``) found on a devnet chain, which
answer ``GatewayTokenRequest`` as each test says.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from byteleap.chain.devnet import DevnetChain
from byteleap.core import wire
from byteleap.miner.relay import RelayError
from byteleap.miner.server import ENROLL_BURST
from byteleap.miner.uplink import ValidatorUplinks, client_session
from tests.support.fixtures import WAIT, eventually
from tests.support.gateway_fixtures import GRANT

from .conftest import FakeWorker, MakeMiner, Miner, alice
from .test_uplink import NETUID, CountingChain, FakeValidator, Harness, _hello


@dataclass
class Source:
    """A token source standing in for the validator links."""

    refuse: RelayError | None = None
    gate: asyncio.Event | None = None
    asked: list[str] = field(default_factory=list)
    cancelled: int = 0

    async def __call__(self, worker_id: str) -> wire.GatewayGrant:
        self.asked.append(worker_id)
        if self.gate is not None:
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        if self.refuse is not None:
            raise self.refuse
        return GRANT


async def miner_and_worker(
    make_miner: MakeMiner, http: aiohttp.ClientSession, source: Source | None = None
) -> tuple[Miner, FakeWorker]:
    """A miner whose token source is ``source`` (None: no validator links), and a registered
    worker of it."""
    miner = await make_miner()
    if source is not None:
        miner.connections.set_gateway_tokens(source)
    worker = FakeWorker()
    await worker.connect(http, miner.url)
    return miner, worker


async def ask_held(worker: FakeWorker, source: Source, frame_id: int) -> None:
    """Send a GatewayEnrollRequest that ``source`` (gated) holds; return once it was asked."""
    assert worker.channel is not None
    await worker.channel.send(wire.GatewayEnrollRequest(), id=frame_id)
    await eventually(lambda: len(source.asked) == 1)


async def ask(worker: FakeWorker, frame_id: int) -> wire.Message:
    """Send a GatewayEnrollRequest and return the frame that answers it."""
    assert worker.channel is not None
    await worker.channel.send(wire.GatewayEnrollRequest(), id=frame_id)
    return await answer(worker, frame_id)


async def answer(worker: FakeWorker, frame_id: int) -> wire.Message:
    while True:
        frame = await worker._recv()
        if frame.id == frame_id:
            return frame.msg


# ------------------------------------------------------------------------------------------------
# Worker -> miner


async def test_the_grant_is_for_the_sessions_worker(
    make_miner: MakeMiner, http: aiohttp.ClientSession
) -> None:
    source = Source()
    _, worker = await miner_and_worker(make_miner, http, source)
    reply = await ask(worker, 77)
    assert reply == wire.GatewayEnrollGrant(worker_id=worker.worker_id, grant=GRANT)
    assert source.asked == [worker.worker_id]


async def test_without_validator_links_the_answer_is_no_validator(
    make_miner: MakeMiner, http: aiohttp.ClientSession
) -> None:
    _, worker = await miner_and_worker(make_miner, http)
    reply = await ask(worker, 3)
    assert isinstance(reply, wire.Error)
    assert (reply.code, reply.ref) == (wire.ErrorCode.NO_VALIDATOR, 3)


async def test_a_refusal_from_upstream_reaches_the_worker_with_its_code(
    make_miner: MakeMiner, http: aiohttp.ClientSession
) -> None:
    source = Source(refuse=RelayError(wire.ErrorCode.NO_GATEWAY, "validator X: no gateway"))
    _, worker = await miner_and_worker(make_miner, http, source)
    reply = await ask(worker, 8)
    assert reply == wire.Error(
        code=wire.ErrorCode.NO_GATEWAY, message="validator X: no gateway", ref=8
    )


async def test_one_request_at_a_time_and_a_few_in_all(
    make_miner: MakeMiner, http: aiohttp.ClientSession
) -> None:
    source = Source(gate=asyncio.Event())
    _, worker = await miner_and_worker(make_miner, http, source)
    await ask_held(worker, source, 1)
    busy = await ask(worker, 2)
    assert isinstance(busy, wire.Error) and busy.code is wire.ErrorCode.RATE_LIMITED
    assert "already in flight" in busy.message
    assert source.gate is not None
    source.gate.set()
    assert isinstance(await answer(worker, 1), wire.GatewayEnrollGrant)
    for frame_id in range(3, 3 + ENROLL_BURST - 1):  # a refusal as busy took no token
        assert isinstance(await ask(worker, frame_id), wire.GatewayEnrollGrant)
    over = await ask(worker, 50)
    assert isinstance(over, wire.Error) and over.code is wire.ErrorCode.RATE_LIMITED
    assert "one per 20 s" in over.message
    assert len(source.asked) == ENROLL_BURST
    no_id = await ask(worker, 0)
    assert isinstance(no_id, wire.Error) and no_id.code is wire.ErrorCode.UNEXPECTED_MESSAGE


async def test_no_validator_answers_leave_the_rate_limit_untouched(
    make_miner: MakeMiner, http: aiohttp.ClientSession
) -> None:
    # A worker that starts before its miner reaches a validator asks again and again...
    miner, worker = await miner_and_worker(make_miner, http)
    for frame_id in range(1, 2 * ENROLL_BURST + 2):
        reply = await ask(worker, frame_id)
        assert isinstance(reply, wire.Error) and reply.code is wire.ErrorCode.NO_VALIDATOR
    # ...as does one whose validator link dropped while it asked.
    dropped = Source(refuse=RelayError(wire.ErrorCode.NO_VALIDATOR, "validator link closed"))
    miner.connections.set_gateway_tokens(dropped)
    for frame_id in range(20, 20 + 2 * ENROLL_BURST):
        reply = await ask(worker, frame_id)
        assert isinstance(reply, wire.Error) and reply.code is wire.ErrorCode.NO_VALIDATOR
    # A validator answers now: the whole burst is still there, and only then is it spent.
    miner.connections.set_gateway_tokens(Source())
    for frame_id in range(40, 40 + ENROLL_BURST):
        assert isinstance(await ask(worker, frame_id), wire.GatewayEnrollGrant)
    over = await ask(worker, 60)
    assert isinstance(over, wire.Error) and over.code is wire.ErrorCode.RATE_LIMITED


async def test_refusals_from_a_validator_do_use_up_the_rate_limit(
    make_miner: MakeMiner, http: aiohttp.ClientSession
) -> None:
    source = Source(refuse=RelayError(wire.ErrorCode.NO_GATEWAY, "validator X: no gateway"))
    _, worker = await miner_and_worker(make_miner, http, source)
    for frame_id in range(1, 1 + ENROLL_BURST):
        reply = await ask(worker, frame_id)
        assert isinstance(reply, wire.Error) and reply.code is wire.ErrorCode.NO_GATEWAY
    over = await ask(worker, 10)
    assert isinstance(over, wire.Error) and over.code is wire.ErrorCode.RATE_LIMITED
    assert len(source.asked) == ENROLL_BURST


async def test_a_worker_that_leaves_cancels_its_request(
    make_miner: MakeMiner, http: aiohttp.ClientSession
) -> None:
    source = Source(gate=asyncio.Event())
    _, worker = await miner_and_worker(make_miner, http, source)
    await ask_held(worker, source, 1)
    await worker.close()
    await eventually(lambda: source.cancelled == 1)


# ------------------------------------------------------------------------------------------------
# Miner -> validators


@pytest.fixture
async def harness(
    tmp_path: Path, make_miner: MakeMiner, http: aiohttp.ClientSession
) -> AsyncIterator[Harness]:
    chain = DevnetChain.create(tmp_path / "chain.db", netuid=NETUID)
    chain.register(NETUID, alice().ss58_address)
    miner = await make_miner()
    port = CountingChain(chain.as_hotkey(alice().ss58_address))
    async with client_session() as uplink_http:
        h = Harness(chain, port, miner, http, uplink_http)
        yield h
        if h.uplinks is not None:
            await h.uplinks.stop()
        for runner in h.runners:
            await runner.cleanup()


async def connected(harness: Harness, *fakes: FakeValidator, **settings: Any) -> ValidatorUplinks:
    """The miner's uplinks, started with ``settings``, once every one of ``fakes`` said hello."""
    uplinks = harness.start(**settings)
    for fake in fakes:
        await _hello(fake)
    await eventually(lambda: uplinks.connected_count == len(fakes))
    return uplinks


async def token_request(fake: FakeValidator, worker_id: str) -> int:
    """The id of the next GatewayTokenRequest ``fake`` receives (for ``worker_id``)."""
    frame = await fake.expect_frame(wire.GatewayTokenRequest, lambda m: m.worker_id == worker_id)
    return frame.id


async def test_validators_are_asked_by_stake_until_one_grants(harness: Harness) -> None:
    rich = await harness.validator("//Bob", stake_tao=9000)
    poor = await harness.validator("//Charlie", stake_tao=2000)
    uplinks = await connected(harness, rich, poor)
    worker = "12" * 16
    pending = asyncio.create_task(uplinks.gateway_token(worker))
    first = await token_request(rich, worker)
    assert poor.frames.empty()  # one at a time
    await rich.channel.send(
        wire.Error(code=wire.ErrorCode.NO_GATEWAY, message="no gateway", ref=first), id=first
    )
    second = await token_request(poor, worker)
    await poor.channel.send(wire.GatewayTokenGrant(worker_id=worker, grant=GRANT), id=second)
    assert await asyncio.wait_for(pending, WAIT) == GRANT


async def test_every_refusal_is_named_and_the_most_telling_code_wins(harness: Harness) -> None:
    bob = await harness.validator("//Bob", stake_tao=9000)
    charlie = await harness.validator("//Charlie", stake_tao=2000)
    uplinks = await connected(harness, bob, charlie)
    worker = "34" * 16
    pending = asyncio.create_task(uplinks.gateway_token(worker))
    frame_id = await token_request(bob, worker)
    await bob.channel.send_error(wire.ErrorCode.NO_GATEWAY, "no gateway here", ref=frame_id)
    frame_id = await token_request(charlie, worker)
    await charlie.channel.send_error(
        wire.ErrorCode.GATEWAY_REFUSED, "gateway m: worker_revoked", ref=frame_id
    )
    with pytest.raises(RelayError) as info:
        await asyncio.wait_for(pending, WAIT)
    assert info.value.code is wire.ErrorCode.GATEWAY_REFUSED
    assert "no gateway here" in info.value.message
    assert "worker_revoked" in info.value.message


async def test_a_silent_validator_times_out_and_a_closing_one_fails_at_once(
    harness: Harness,
) -> None:
    bob = await harness.validator("//Bob")
    uplinks = await connected(harness, bob, token_timeout_s=0.3)
    worker = "56" * 16
    with pytest.raises(RelayError) as info:
        await uplinks.gateway_token(worker)
    assert info.value.code is wire.ErrorCode.GATEWAY_UNAVAILABLE
    assert "did not answer within 0.3 s" in info.value.message

    pending = asyncio.create_task(uplinks.gateway_token(worker))
    await token_request(bob, worker)
    await token_request(bob, worker)  # the second request (the first one timed out)
    await bob.channel.close()
    with pytest.raises(RelayError) as info:
        await asyncio.wait_for(pending, WAIT)
    assert info.value.code is wire.ErrorCode.NO_VALIDATOR
    assert "closed" in info.value.message


async def test_a_grant_for_another_worker_is_refused(harness: Harness) -> None:
    bob = await harness.validator("//Bob")
    uplinks = await connected(harness, bob)
    worker = "78" * 16
    pending = asyncio.create_task(uplinks.gateway_token(worker))
    frame_id = await token_request(bob, worker)
    await bob.channel.send(wire.GatewayTokenGrant(worker_id="9a" * 16, grant=GRANT), id=frame_id)
    with pytest.raises(RelayError) as info:
        await asyncio.wait_for(pending, WAIT)
    assert info.value.code is wire.ErrorCode.UNEXPECTED_MESSAGE
    assert "for worker " + "9a" * 16 in info.value.message


async def test_no_connected_validator_is_no_validator(harness: Harness) -> None:
    uplinks = harness.start()
    with pytest.raises(RelayError) as info:
        await uplinks.gateway_token("bc" * 16)
    assert info.value.code is wire.ErrorCode.NO_VALIDATOR
