"""BittensorChain: the shared ChainPort contract on a fake Substrate, plus what only it does.

The SDK runs for real (``bt.Client`` with ``substrate=FakeSubstrate``): metagraph decoding,
``SetWeights`` preflight, clipping, quantisation, the commit-reveal v4 timelock, ``ServeAxon``.
Only the node is fake (tests/support/fake_substrate.py). Two cases use a real RPC ``bt.Client``
against loopback sockets: a closed port and a listener that never speaks WebSocket.

HOME (and the SDK's token-symbol cache) point at a temp dir: connecting writes
``~/.bittensor/btcli_token_symbols.json``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import bittensor as bt
import pytest

from byteleap.chain.bittensor import BittensorChain
from byteleap.chain.port import (
    ChainPort,
    ChainRejected,
    ChainUnavailable,
    Endpoint,
    NotRegistered,
    RateLimited,
)
from byteleap.core.identity import HotkeySigner
from tests.contract.chain_contract import (
    BASE,
    MINER_V4,
    NO_PERMIT,
    VALIDATOR,
    ChainContract,
    ChainFixture,
    ChainHarness,
    dev_uri_of,
)
from tests.support.fake_substrate import FakeSubstrate
from tests.support.fixtures import WAIT, free_port

NETUID = BASE.netuid


@pytest.fixture(autouse=True)
def temp_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    # The SDK resolves its cache paths from HOME at import time; this one it reads per call.
    monkeypatch.setenv("BTCLI_TOKEN_SYMBOLS_CACHE", str(home / ".bittensor" / "symbols.json"))
    return home


class BittensorHarness:
    """A real ``BittensorChain`` per hotkey, all on one in-memory fake node."""

    models_commit_reveal = False  # reveals need drand; the fake keeps commits pending

    def __init__(self) -> None:
        self.fake = FakeSubstrate()
        self._ports: list[BittensorChain] = []

    async def build(self, fixture: ChainFixture) -> None:
        self.fake = FakeSubstrate.from_fixture(fixture)

    def port(self, hotkey: str) -> ChainPort:
        chain = BittensorChain(
            "local",
            signer=HotkeySigner.from_uri(dev_uri_of(hotkey)),
            substrate=self.fake,
            timeout_s=WAIT,
            write_timeout_s=WAIT,
        )
        self._ports.append(chain)
        return chain

    def advance(self, blocks: int) -> None:
        self.fake.head += blocks

    def make_unavailable(self) -> None:
        self.fake.available = False

    async def close(self) -> None:
        for chain in self._ports:
            await chain.close()


@pytest.fixture(params=[pytest.param(BittensorHarness, id="bittensor-fake-substrate")])
async def chain_harness(request: pytest.FixtureRequest) -> AsyncIterator[ChainHarness]:
    harness: ChainHarness = request.param()
    yield harness
    await harness.close()


class TestChainContract(ChainContract):
    pass


# ------------------------------------------------------------------------------------------------
# What only the bittensor adapter does


@pytest.fixture
async def harness() -> AsyncIterator[BittensorHarness]:
    harness = BittensorHarness()
    yield harness
    await harness.close()


async def test_weights_go_direct_waiting_for_inclusion_not_finality(
    harness: BittensorHarness,
) -> None:
    await harness.build(BASE)

    outcome = await harness.port(VALIDATOR.hotkey).set_weights(NETUID, {1: 1.0, 2: 3.0})

    (sent,) = harness.fake.submitted
    assert (sent.module, sent.function) == ("SubtensorModule", "set_mechanism_weights")
    assert sent.params["dests"] == [1, 2]
    assert sent.params["weights"] == [21845, 65535]
    assert (sent.wait_for_inclusion, sent.wait_for_finalization) == (True, False)
    assert sent.signer == VALIDATOR.hotkey
    assert outcome.path == "direct"


async def test_commit_reveal_commits_a_timelocked_v4_payload(harness: BittensorHarness) -> None:
    await harness.build(replace(BASE, commit_reveal=True))
    validator = harness.port(VALIDATOR.hotkey)

    outcome = await validator.set_weights(NETUID, {1: 1.0, 2: 3.0}, version_key=7)

    (sent,) = harness.fake.submitted
    assert sent.function == "commit_timelocked_mechanism_weights"
    assert sent.params["commit_reveal_version"] == 4
    assert len(sent.params["commit"]) > 64, "a ciphertext, not the weights"
    assert outcome.path == "timelocked"
    assert outcome.reveal_round == sent.params["reveal_round"] > 0
    assert "drand round" in outcome.message
    assert await validator.weights(NETUID) == {}, "hidden until the chain reveals it"
    assert (await validator.subnet(NETUID)).neurons[0].last_update == BASE.head_block


async def test_outcome_block_is_the_block_of_inclusion(harness: BittensorHarness) -> None:
    await harness.build(BASE)

    outcome = await harness.port(MINER_V4.hotkey).publish_endpoint(NETUID, "192.0.2.1", 9000)

    assert outcome.block == BASE.head_block  # the fake includes in the head block
    assert (harness.fake.submitted[0].params["ip"], harness.fake.submitted[0].params["port"]) == (
        3221225985,
        9000,
    )


async def test_an_axon_that_cannot_be_dialled_is_no_endpoint(harness: BittensorHarness) -> None:
    await harness.build(BASE)
    harness.fake.subnets[NETUID].neurons[1].axon = (int.from_bytes(bytes([10, 0, 0, 2])), 0, 4)

    snap = await harness.port(VALIDATOR.hotkey).subnet(NETUID)

    assert snap.neurons[1].endpoint is None  # port 0
    assert snap.neurons[0].endpoint is None  # nothing served: ip 0
    assert snap.neurons[2].endpoint == Endpoint(ip="2001:db8::2", port=8092)


async def test_a_read_only_port_reads_but_cannot_write(harness: BittensorHarness) -> None:
    await harness.build(BASE)
    chain = BittensorChain("local", substrate=harness.fake, timeout_s=WAIT)
    try:
        assert (await chain.subnet(NETUID)).block == BASE.head_block
        for write in (
            chain.set_weights(NETUID, {1: 1.0}),
            chain.publish_endpoint(NETUID, "192.0.2.1", 9000),
        ):
            with pytest.raises(ChainRejected) as caught:
                await write
            assert caught.value.code == "NOT_AUTHORIZED"
            assert "read-only" in str(caught.value)
        assert harness.fake.submitted == []
    finally:
        await chain.close()


@pytest.mark.parametrize(
    ("call", "code"),
    [
        (lambda chain: chain.subnet(-1), "INVALID_ARGUMENT"),
        (lambda chain: chain.subnet(True), "INVALID_ARGUMENT"),
        (lambda chain: chain.uid_of(NETUID, "not-an-address"), "INVALID_ARGUMENT"),
        (lambda chain: chain.uid_of(NETUID + 1, VALIDATOR.hotkey), "SUBNET_NOT_EXISTS"),
        (lambda chain: chain.weights(NETUID + 1), "SUBNET_NOT_EXISTS"),
        (lambda chain: chain.set_weights(NETUID, {1: 1.0}, version_key=-1), "INVALID_ARGUMENT"),
        (lambda chain: chain.set_weights(NETUID, [(1, 1.0)]), "INVALID_ARGUMENT"),
    ],
    ids=[
        "negative",
        "bool",
        "bad-ss58",
        "uid-unknown-subnet",
        "weights-unknown-subnet",
        "version-key",
        "not-a-mapping",
    ],
)
async def test_bad_arguments_are_refused_before_the_chain_is_asked(
    harness: BittensorHarness,
    call: Callable[[ChainPort], Awaitable[object]],
    code: str,
) -> None:
    await harness.build(BASE)

    with pytest.raises(ChainRejected) as caught:
        await call(harness.port(VALIDATOR.hotkey))

    assert caught.value.code == code, str(caught.value)
    assert harness.fake.submitted == []


async def test_a_chain_side_rate_limit_computes_the_wait(harness: BittensorHarness) -> None:
    await harness.build(BASE)
    harness.fake.fail_next = "ServingRateLimitExceeded"  # no "retry in N blocks" to parse

    with pytest.raises(RateLimited) as caught:
        await harness.port(MINER_V4.hotkey).publish_endpoint(NETUID, "192.0.2.1", 9000)

    assert caught.value.retry_in_blocks == harness.fake.serving_rate_limit
    assert "ServingRateLimitExceeded" in str(caught.value)


async def test_other_chain_refusals_keep_the_sdk_code_and_the_pallet_error(
    harness: BittensorHarness,
) -> None:
    await harness.build(BASE)
    harness.fake.fail_next = "NotEnoughStakeToSetWeights"

    with pytest.raises(ChainRejected) as caught:
        await harness.port(VALIDATOR.hotkey).set_weights(NETUID, {1: 1.0})

    assert caught.value.code == "INSUFFICIENT_BALANCE"
    assert "NotEnoughStakeToSetWeights" in str(caught.value)
    assert "hint:" in str(caught.value)


async def test_not_registered_on_chain_is_not_registered(harness: BittensorHarness) -> None:
    await harness.build(BASE)
    harness.fake.fail_next = "HotKeyNotRegisteredInSubNet"  # deregistered after the preflight

    with pytest.raises(NotRegistered):
        await harness.port(VALIDATOR.hotkey).set_weights(NETUID, {1: 1.0})


async def test_a_transport_failure_mid_submission_is_unavailable_and_may_land(
    harness: BittensorHarness,
) -> None:
    await harness.build(BASE)
    try:
        raise ConnectionResetError("connection reset by peer")
    except ConnectionResetError as cause:
        # What RpcSubstrate raises when the socket dies between signing and inclusion.
        failure = bt.ChainError(str(cause))
        failure.__cause__ = cause
    harness.fake.raise_next = failure

    with pytest.raises(ChainUnavailable, match="may still land"):
        await harness.port(VALIDATOR.hotkey).set_weights(NETUID, {1: 1.0})


async def test_the_port_reconnects_after_an_outage(harness: BittensorHarness) -> None:
    await harness.build(BASE)
    chain = harness.port(VALIDATOR.hotkey)
    assert await chain.head_block() == BASE.head_block
    harness.make_unavailable()

    with pytest.raises(ChainUnavailable, match="cannot reach"):
        await chain.head_block()
    with pytest.raises(ChainUnavailable):
        await chain.subnet(NETUID)
    harness.fake.available = True
    harness.advance(2)

    assert await chain.head_block() == BASE.head_block + 2
    assert harness.fake.connects == 2, "one fresh connection after the failure, not one per call"


async def test_one_slow_answer_keeps_the_connection_two_in_a_row_replace_it(
    harness: BittensorHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    await harness.build(BASE)
    # Long enough for the fake to answer on a loaded machine, short enough to wait out three times.
    chain = BittensorChain("local", substrate=harness.fake, timeout_s=1.0, write_timeout_s=1.0)
    answering = asyncio.Event()  # cleared: the node never answers block_number
    real_block_number = harness.fake.block_number

    async def block_number() -> int:
        await answering.wait()
        return await real_block_number()

    monkeypatch.setattr(harness.fake, "block_number", block_number)
    slow = "did not answer within 1 s"
    try:
        with pytest.raises(ChainUnavailable, match=slow):
            await chain.head_block()
        answering.set()
        assert await chain.head_block() == BASE.head_block
        assert harness.fake.connects == 1, "one slow answer: same connection"

        answering.clear()
        for _ in range(2):
            with pytest.raises(ChainUnavailable, match=slow):
                await chain.head_block()
        answering.set()
        assert await chain.head_block() == BASE.head_block
        assert harness.fake.connects == 2, "two in a row: a fresh connection"
    finally:
        await chain.close()


async def test_an_unexpected_sdk_failure_is_unavailable_not_a_crash(
    harness: BittensorHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    await harness.build(BASE)
    chain = harness.port(VALIDATOR.hotkey)

    async def broken(*args: object, **kwargs: object) -> object:
        raise KeyError("hotkeys")  # e.g. a runtime that renamed a metagraph field

    monkeypatch.setattr(harness.fake, "runtime_call", broken)

    with pytest.raises(ChainUnavailable, match="unexpected error from the bittensor SDK"):
        await chain.subnet(NETUID)


async def test_closed_calls_fail_as_unavailable(harness: BittensorHarness) -> None:
    await harness.build(BASE)
    chain = harness.port(VALIDATOR.hotkey)
    await chain.close()

    with pytest.raises(ChainUnavailable, match="closed"):
        await chain.head_block()


def test_a_hotkey_signer_is_a_bittensor_signer() -> None:
    signer = HotkeySigner.from_uri("//Alice")

    assert isinstance(signer, bt.Signer)
    assert bt.resolve_signer(signer, "hotkey") is signer
    assert signer.public_key == signer.identity.public_key
    assert signer.crypto_type == bt.CRYPTO_SR25519


def test_an_unknown_network_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="Unknown network"):
        BittensorChain("mainnet")


# ------------------------------------------------------------------------------------------------
# A real RPC client on loopback: no fake, no network


async def test_a_closed_port_is_unavailable_at_once_not_after_the_timeout() -> None:
    chain = BittensorChain(f"ws://127.0.0.1:{free_port()}", timeout_s=WAIT)
    try:
        with pytest.raises(ChainUnavailable) as caught:
            await chain.subnet(NETUID)
    finally:
        await chain.close()

    message = str(caught.value)
    assert "cannot reach ws://127.0.0.1" in message
    assert "did not answer within" not in message, "refused at once, not timed out"


async def test_every_call_is_bounded_by_the_timeout() -> None:
    """A listener that accepts TCP and never answers the WebSocket handshake."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    chain = BittensorChain(
        f"ws://127.0.0.1:{port}",
        signer=HotkeySigner.from_uri(VALIDATOR.uri),
        timeout_s=0.3,
        write_timeout_s=0.3,
    )
    calls: list[Callable[[], Awaitable[object]]] = [
        chain.head_block,
        chain.block_time,
        lambda: chain.subnet(NETUID),
        lambda: chain.uid_of(NETUID, NO_PERMIT.hotkey),
        lambda: chain.publish_endpoint(NETUID, "192.0.2.1", 9000),
        lambda: chain.set_weights(NETUID, {1: 1.0}),
        lambda: chain.weights(NETUID),
    ]
    try:
        async with asyncio.timeout(WAIT):  # only catches a hang; the SDK's own bound is 10 s
            results = await asyncio.gather(*(call() for call in calls), return_exceptions=True)
    finally:
        await chain.close()
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()

    for result in results:
        assert isinstance(result, ChainUnavailable), repr(result)
        assert "did not answer within 0.3 s" in str(result)
