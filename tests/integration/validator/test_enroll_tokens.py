"""The validator's answer to ``GatewayTokenRequest`` over real loopback sessions.

A scripted miner (the one of test_miners_server.py) asks; the hub's token issuer is a stand-in
that records what it was asked and answers, refuses or stalls as a test says (the real issuer
against a real gateway is in tests/integration/gateway/test_enroll_relay.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from byteleap.chain.port import SubnetSnapshot
from byteleap.core import wire
from byteleap.validator.config import MinerListen, MinerPolicy
from byteleap.validator.enrollment import EnrollmentError
from byteleap.validator.miners import TOKEN_BURST, TOKEN_REQUESTS_IN_FLIGHT, MinerHub
from tests.support.fixtures import WAIT, eventually
from tests.support.gateway_fixtures import GRANT

from .test_miners_server import PATH, WORKER, Miner, key, snapshot, validator


@dataclass
class Issuer:
    """A TokenIssuer that records its calls; ``gate`` holds every answer back until set."""

    configured: bool = True
    refuse: EnrollmentError | None = None
    gate: asyncio.Event | None = None
    calls: list[tuple[str, str]] = field(default_factory=list)
    cancelled: int = 0

    async def issue(self, worker_id: str, miner_hotkey: str) -> wire.GatewayGrant:
        self.calls.append((worker_id, miner_hotkey))
        if self.gate is not None:
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        if self.refuse is not None:
            raise self.refuse
        return GRANT


Start = Callable[..., Awaitable[tuple[MinerHub, str]]]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        yield session


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    hubs: list[MinerHub] = []

    async def make(tokens: Any, **policy: Any) -> tuple[MinerHub, str]:
        current: SubnetSnapshot = snapshot("miner1", "miner2")
        hub = MinerHub(
            MinerListen(path=PATH),
            MinerPolicy(**{"handshake_timeout_s": WAIT, **policy}),
            signer=validator(),
            snapshot=lambda: current,
            tokens=tokens,
            close_timeout_s=1.0,
        )
        await hub.start(host="127.0.0.1", port=0)
        hubs.append(hub)
        host, port = hub.addresses[0]
        return hub, f"http://{host}:{port}{PATH}"

    yield make
    for hub in hubs:
        await hub.stop()


async def connected(http: aiohttp.ClientSession, url: str, name: str = "miner1") -> Miner:
    """The scripted miner ``name``, past its hello."""
    miner = Miner(key(name))
    await miner.connect(http, url)
    return miner


async def answer(miner: Miner, frame_id: int) -> wire.Message:
    """The next frame answering ``frame_id`` (rosters and pings are skipped)."""
    while True:
        frame = await miner.recv()
        if frame.id == frame_id:
            return frame.msg


async def ask(miner: Miner, frame_id: int, worker_id: str = WORKER) -> wire.Message:
    await miner.send(wire.GatewayTokenRequest(worker_id=worker_id), id=frame_id)
    return await answer(miner, frame_id)


async def test_a_token_is_bound_to_the_hotkey_the_session_proved(
    start: Start, http: aiohttp.ClientSession
) -> None:
    issuer = Issuer()
    _hub, url = await start(issuer)
    miner = await connected(http, url)
    reply = await ask(miner, 41)
    assert reply == wire.GatewayTokenGrant(worker_id=WORKER, grant=GRANT)
    assert issuer.calls == [(WORKER, key("miner1").ss58_address)]
    other = await connected(http, url, "miner2")
    assert isinstance(await ask(other, 5, "cd" * 16), wire.GatewayTokenGrant)
    assert issuer.calls[-1] == ("cd" * 16, key("miner2").ss58_address)


@pytest.mark.parametrize("tokens", [None, Issuer(configured=False)], ids=["none", "empty"])
async def test_without_a_gateway_the_answer_is_no_gateway_at_once(
    start: Start, http: aiohttp.ClientSession, tokens: Issuer | None
) -> None:
    _hub, url = await start(tokens)
    miner = await connected(http, url)
    reply = await ask(miner, 9)
    assert isinstance(reply, wire.Error)
    assert (reply.code, reply.ref) == (wire.ErrorCode.NO_GATEWAY, 9)
    assert "has no gateway configured" in reply.message
    assert tokens is None or not tokens.calls


async def test_the_issuers_refusal_is_relayed_with_its_code(
    start: Start, http: aiohttp.ClientSession
) -> None:
    refusal = EnrollmentError(wire.ErrorCode.GATEWAY_REFUSED, "gateway market: worker_revoked")
    _hub, url = await start(Issuer(refuse=refusal))
    miner = await connected(http, url)
    reply = await ask(miner, 12)
    assert reply == wire.Error(
        code=wire.ErrorCode.GATEWAY_REFUSED, message="gateway market: worker_revoked", ref=12
    )


async def test_a_request_without_a_frame_id_is_refused(
    start: Start, http: aiohttp.ClientSession
) -> None:
    issuer = Issuer()
    _hub, url = await start(issuer)
    miner = await connected(http, url)
    reply = await ask(miner, 0)
    assert isinstance(reply, wire.Error) and reply.code is wire.ErrorCode.UNEXPECTED_MESSAGE
    assert not issuer.calls


async def test_requests_in_flight_are_capped_per_miner(
    start: Start, http: aiohttp.ClientSession
) -> None:
    issuer = Issuer(gate=asyncio.Event())
    _hub, url = await start(issuer)
    miner = await connected(http, url)
    for frame_id in range(1, TOKEN_REQUESTS_IN_FLIGHT + 1):
        await miner.send(wire.GatewayTokenRequest(worker_id=WORKER), id=frame_id)
    await eventually(lambda: len(issuer.calls) == TOKEN_REQUESTS_IN_FLIGHT)
    extra = await ask(miner, 99)
    assert isinstance(extra, wire.Error) and extra.code is wire.ErrorCode.RATE_LIMITED
    assert "already in flight" in extra.message
    assert issuer.gate is not None
    issuer.gate.set()
    for frame_id in range(1, TOKEN_REQUESTS_IN_FLIGHT + 1):
        assert isinstance(await answer(miner, frame_id), wire.GatewayTokenGrant)


async def test_a_miner_asking_too_often_is_rate_limited_but_kept(
    start: Start, http: aiohttp.ClientSession
) -> None:
    issuer = Issuer()
    hub, url = await start(issuer)
    miner = await connected(http, url)
    for frame_id in range(1, TOKEN_BURST + 1):
        assert isinstance(await ask(miner, frame_id), wire.GatewayTokenGrant)
    over = await ask(miner, 1000)
    assert isinstance(over, wire.Error) and over.code is wire.ErrorCode.RATE_LIMITED
    assert "per minute" in over.message
    assert len(issuer.calls) == TOKEN_BURST
    other = await connected(http, url, "miner2")  # its own bucket
    assert isinstance(await ask(other, 1), wire.GatewayTokenGrant)
    again = await ask(miner, 1001)  # the over-eager miner is still connected, still refused
    assert isinstance(again, wire.Error) and again.code is wire.ErrorCode.RATE_LIMITED
    session = hub.get(key("miner1").ss58_address)
    assert session is not None and not session.closed


async def test_a_miner_that_leaves_cancels_its_pending_requests(
    start: Start, http: aiohttp.ClientSession
) -> None:
    issuer = Issuer(gate=asyncio.Event())
    hub, url = await start(issuer)
    miner = Miner(key("miner1"))
    channel = await miner.connect(http, url)
    await miner.send(wire.GatewayTokenRequest(worker_id=WORKER), id=3)
    await eventually(lambda: len(issuer.calls) == 1)
    await channel.close()
    await eventually(lambda: issuer.cancelled == 1)
    await eventually(lambda: hub.get(key("miner1").ss58_address) is None)
