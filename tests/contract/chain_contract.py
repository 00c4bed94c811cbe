"""The ChainPort contract: one suite every chain adapter must pass (DESIGN §6).

The cases live in :class:`ChainContract`; they talk to an adapter only through a
:class:`ChainHarness`, which builds a chain in a given state (:class:`ChainFixture`), hands out
ports acting as a hotkey, moves the head forward and takes the chain down. An adapter's test
module plugs in by providing a ``chain_harness`` fixture and subclassing the contract::

    @pytest.fixture(params=[pytest.param(DevnetHarness, id="devnet")])
    async def chain_harness(request, tmp_path): ...

    class TestChainContract(ChainContract):
        pass

(another adapter is one more ``pytest.param`` of that fixture). This module is not named
``test_*.py``, so pytest collects its cases only through such subclasses.

Every hotkey in a fixture is derived from a Substrate dev URI (:data:`DEV_URIS`), so a harness
that must sign (bittensor with a fake substrate) can find the key with :func:`dev_uri_of`.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import pytest

from byteleap.chain.port import (
    ChainPort,
    ChainRejected,
    ChainUnavailable,
    Endpoint,
    NotRegistered,
    RateLimited,
    SubnetSnapshot,
)
from byteleap.chain.weights import quantize_weights
from byteleap.core.identity import HotkeySigner
from tests.support.fixtures import WAIT

TAO = 10**9
DEV_URIS = ("//Alice", "//Bob", "//Charlie", "//Dave", "//Eve", "//Ferdie")


@functools.cache
def dev_hotkey(uri: str) -> str:
    """The SS58 address of a dev URI (``//Alice`` ...)."""
    return HotkeySigner.from_uri(uri).ss58_address


def dev_coldkey(uri: str) -> str:
    return dev_hotkey(f"{uri}//cold")


def dev_uri_of(ss58: str) -> str:
    """The dev URI behind a fixture hotkey or coldkey (raises KeyError for others)."""
    for uri in DEV_URIS:
        for candidate in (uri, f"{uri}//cold"):
            if dev_hotkey(candidate) == ss58:
                return candidate
    raise KeyError(f"{ss58} is not a fixture key")


class ManualClock:
    """A clock tests move by hand: no sleeping, no flakiness."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True)
class NeuronFixture:
    uri: str
    """Dev URI of the hotkey (the coldkey is ``uri//cold``)."""
    stake_rao: int = 0
    validator_permit: bool = False
    endpoint: Endpoint | None = None
    last_update: int = 0
    """Block of the last weights submission, 0 for never."""

    @property
    def hotkey(self) -> str:
        return dev_hotkey(self.uri)

    @property
    def coldkey(self) -> str:
        return dev_coldkey(self.uri)


@dataclass(frozen=True)
class ChainFixture:
    """A subnet state to build; neuron ``i`` gets uid ``i``."""

    netuid: int = 128
    head_block: int = 1000
    tempo: int = 20
    weights_rate_limit: int = 10
    min_allowed_weights: int = 1
    max_weight_limit: int = 65535
    commit_reveal: bool = False
    max_uids: int = 256
    neurons: tuple[NeuronFixture, ...] = ()


class ChainHarness(Protocol):
    """What the contract needs to know about an adapter under test."""

    models_commit_reveal: bool
    """Whether timelocked weights become visible in ``weights()`` once their reveal is due."""

    async def build(self, fixture: ChainFixture) -> None:
        """Create the chain in exactly this state, with the head at ``fixture.head_block``."""
        ...

    def port(self, hotkey: str) -> ChainPort:
        """A port acting as ``hotkey`` (registered or not); the harness closes it."""
        ...

    def advance(self, blocks: int) -> None:
        """Move the head ``blocks`` blocks forward."""
        ...

    def make_unavailable(self) -> None:
        """Make the chain unreachable for every port from now on."""
        ...

    async def close(self) -> None: ...


VALIDATOR = NeuronFixture("//Alice", stake_rao=5000 * TAO, validator_permit=True)
MINER_V4 = NeuronFixture("//Bob", endpoint=Endpoint(ip="10.0.0.2", port=8091))
MINER_V6 = NeuronFixture("//Charlie", stake_rao=3, endpoint=Endpoint(ip="2001:db8::2", port=8092))
NO_PERMIT = NeuronFixture("//Dave", stake_rao=TAO, last_update=997)
OUTSIDER = "//Eve"  # never registered
BASE = ChainFixture(neurons=(VALIDATOR, MINER_V4, MINER_V6, NO_PERMIT))
U16_HALF = 32767  # a max_weight_limit of ~50 %


async def _rejected(call: Awaitable[Any], code: str) -> ChainRejected:
    with pytest.raises(ChainRejected) as caught:
        await call
    assert caught.value.code == code, str(caught.value)
    return caught.value


class ChainContract:
    """The cases; subclass in a ``test_*.py`` module that defines ``chain_harness``."""

    # --- reads ---------------------------------------------------------------------------------

    async def test_snapshot_maps_every_neuron(self, chain_harness: ChainHarness) -> None:
        await chain_harness.build(BASE)
        snap = await chain_harness.port(dev_hotkey(OUTSIDER)).subnet(BASE.netuid)

        assert isinstance(snap, SubnetSnapshot)
        assert snap.netuid == BASE.netuid
        assert snap.block == BASE.head_block
        assert [n.uid for n in snap.neurons] == [0, 1, 2, 3]
        for uid, (neuron, spec) in enumerate(zip(snap.neurons, BASE.neurons, strict=True)):
            assert neuron.uid == uid
            assert neuron.hotkey == spec.hotkey
            assert neuron.coldkey == spec.coldkey
            assert neuron.stake_rao == spec.stake_rao
            assert neuron.validator_permit == spec.validator_permit
            assert neuron.endpoint == spec.endpoint
            assert neuron.last_update == spec.last_update
            assert neuron.active, "freshly registered neurons are active"
        assert snap.by_hotkey(MINER_V6.hotkey) is snap.neurons[2]
        assert [v.uid for v in snap.validators()] == [0]
        assert [v.uid for v in snap.validators(min_stake_rao=5001 * TAO)] == []

    async def test_snapshot_reports_subnet_parameters(self, chain_harness: ChainHarness) -> None:
        fixture = replace(
            BASE,
            netuid=7,
            tempo=30,
            weights_rate_limit=7,
            min_allowed_weights=2,
            max_weight_limit=30000,
            commit_reveal=True,
            max_uids=64,
        )
        await chain_harness.build(fixture)
        snap = await chain_harness.port(dev_hotkey(OUTSIDER)).subnet(7)

        assert (snap.netuid, snap.tempo, snap.weights_rate_limit) == (7, 30, 7)
        assert (snap.min_allowed_weights, snap.max_weight_limit) == (2, 30000)
        assert snap.commit_reveal_enabled is True
        assert snap.max_uids == 64

    async def test_unknown_subnet_is_rejected(self, chain_harness: ChainHarness) -> None:
        await chain_harness.build(BASE)
        port = chain_harness.port(VALIDATOR.hotkey)

        await _rejected(port.subnet(BASE.netuid + 1), "SUBNET_NOT_EXISTS")

    async def test_uid_of_known_and_unknown_hotkeys(self, chain_harness: ChainHarness) -> None:
        await chain_harness.build(BASE)
        port = chain_harness.port(dev_hotkey(OUTSIDER))

        assert await port.uid_of(BASE.netuid, MINER_V4.hotkey) == 1
        assert await port.uid_of(BASE.netuid, NO_PERMIT.hotkey) == 3
        assert await port.uid_of(BASE.netuid, dev_hotkey(OUTSIDER)) is None

    async def test_head_block_moves_forward_with_the_chain(
        self, chain_harness: ChainHarness
    ) -> None:
        await chain_harness.build(BASE)
        port = chain_harness.port(VALIDATOR.hotkey)

        first = await port.head_block()
        again = await port.head_block()
        chain_harness.advance(5)
        later = await port.head_block()

        assert first == again == BASE.head_block
        assert later == first + 5
        block_time = await port.block_time()
        assert math.isfinite(block_time) and block_time > 0

    # --- endpoints -----------------------------------------------------------------------------

    @pytest.mark.parametrize(
        ("ip", "port"), [("192.0.2.7", 9443), ("2001:db8::7", 1), ("127.0.0.1", 65535)]
    )
    async def test_published_endpoint_is_what_everyone_reads(
        self, chain_harness: ChainHarness, ip: str, port: int
    ) -> None:
        await chain_harness.build(BASE)
        miner = chain_harness.port(MINER_V4.hotkey)

        outcome = await miner.publish_endpoint(BASE.netuid, ip, port)

        assert outcome.path == "serve"
        assert outcome.block >= BASE.head_block
        snap = await chain_harness.port(VALIDATOR.hotkey).subnet(BASE.netuid)
        assert snap.neurons[1].endpoint == Endpoint(ip=ip, port=port)
        assert snap.neurons[2].endpoint == MINER_V6.endpoint, "only the acting neuron changes"

    @pytest.mark.parametrize(
        ("ip", "port"),
        [("not-an-ip", 8091), ("10.0.0.300", 8091), ("10.0.0.2", 0), ("10.0.0.2", 65536)],
    )
    async def test_invalid_endpoint_is_rejected(
        self, chain_harness: ChainHarness, ip: str, port: int
    ) -> None:
        await chain_harness.build(BASE)

        await _rejected(
            chain_harness.port(MINER_V4.hotkey).publish_endpoint(BASE.netuid, ip, port),
            "INVALID_ARGUMENT",
        )
        snap = await chain_harness.port(MINER_V4.hotkey).subnet(BASE.netuid)
        assert snap.neurons[1].endpoint == MINER_V4.endpoint, "a rejected write changes nothing"

    async def test_unregistered_hotkey_cannot_publish(self, chain_harness: ChainHarness) -> None:
        await chain_harness.build(BASE)

        with pytest.raises(NotRegistered):
            await chain_harness.port(dev_hotkey(OUTSIDER)).publish_endpoint(
                BASE.netuid, "10.0.0.9", 8091
            )

    # --- weights -------------------------------------------------------------------------------

    async def test_weights_are_quantised_and_visible_directly(
        self, chain_harness: ChainHarness
    ) -> None:
        await chain_harness.build(BASE)
        validator = chain_harness.port(VALIDATOR.hotkey)

        outcome = await validator.set_weights(BASE.netuid, {1: 2.0, 2: 1.0, 3: 0.0})

        assert outcome.path == "direct"
        assert outcome.reveal_round is None
        assert outcome.block == BASE.head_block
        # max-upscaled to 65535, 0.5 * 65535 rounded half to even, the zero dropped
        assert await validator.weights(BASE.netuid) == {0: {1: 65535, 2: 32768}}
        snap = await validator.subnet(BASE.netuid)
        assert snap.neurons[0].last_update == outcome.block

    async def test_weights_respect_the_subnets_cap(self, chain_harness: ChainHarness) -> None:
        fixture = replace(BASE, max_weight_limit=U16_HALF)
        await chain_harness.build(fixture)
        validator = chain_harness.port(VALIDATOR.hotkey)
        wanted = {1: 10.0, 2: 1.0, 3: 1.0}

        await validator.set_weights(BASE.netuid, wanted)

        stored = (await validator.weights(BASE.netuid))[0]
        assert stored == quantize_weights(wanted, U16_HALF)
        assert stored[1] == 65535
        assert stored[1] / sum(stored.values()) <= U16_HALF / 65535 + 1e-4
        assert stored[2] == stored[3] < 65535

    async def test_new_weights_replace_the_old_set(self, chain_harness: ChainHarness) -> None:
        await chain_harness.build(BASE)
        validator = chain_harness.port(VALIDATOR.hotkey)

        await validator.set_weights(BASE.netuid, {1: 1.0, 2: 1.0})
        chain_harness.advance(BASE.weights_rate_limit)
        await validator.set_weights(BASE.netuid, {3: 1.0})

        assert await validator.weights(BASE.netuid) == {0: {3: 65535}}

    async def test_commit_reveal_takes_the_timelocked_path(
        self, chain_harness: ChainHarness
    ) -> None:
        await chain_harness.build(replace(BASE, commit_reveal=True))
        validator = chain_harness.port(VALIDATOR.hotkey)

        outcome = await validator.set_weights(BASE.netuid, {1: 1.0, 2: 3.0})

        assert outcome.path == "timelocked"
        assert outcome.reveal_round is not None
        if chain_harness.models_commit_reveal:
            assert await validator.weights(BASE.netuid) == {}, "hidden until revealed"
            chain_harness.advance(outcome.reveal_round - outcome.block - 1)
            assert await validator.weights(BASE.netuid) == {}
            chain_harness.advance(1)
            assert await validator.weights(BASE.netuid) == {0: {1: 21845, 2: 65535}}

    async def test_rate_limit_says_how_long_to_wait(self, chain_harness: ChainHarness) -> None:
        await chain_harness.build(BASE)
        validator = chain_harness.port(VALIDATOR.hotkey)
        await validator.set_weights(BASE.netuid, {1: 1.0})
        chain_harness.advance(3)

        with pytest.raises(RateLimited) as caught:
            await validator.set_weights(BASE.netuid, {2: 1.0})

        assert caught.value.retry_in_blocks == BASE.weights_rate_limit - 3
        assert await validator.weights(BASE.netuid) == {0: {1: 65535}}, "nothing written"
        chain_harness.advance(caught.value.retry_in_blocks - 1)
        with pytest.raises(RateLimited) as again:
            await validator.set_weights(BASE.netuid, {2: 1.0})
        assert again.value.retry_in_blocks == 1
        chain_harness.advance(1)
        await validator.set_weights(BASE.netuid, {2: 1.0})
        assert await validator.weights(BASE.netuid) == {0: {2: 65535}}

    async def test_rate_limit_counts_from_the_last_update_on_chain(
        self, chain_harness: ChainHarness
    ) -> None:
        recent = replace(VALIDATOR, last_update=BASE.head_block - 4)
        await chain_harness.build(replace(BASE, neurons=(recent, *BASE.neurons[1:])))

        with pytest.raises(RateLimited) as caught:
            await chain_harness.port(VALIDATOR.hotkey).set_weights(BASE.netuid, {1: 1.0})

        assert caught.value.retry_in_blocks == BASE.weights_rate_limit - 4

    async def test_unregistered_hotkey_cannot_set_weights(
        self, chain_harness: ChainHarness
    ) -> None:
        await chain_harness.build(BASE)

        with pytest.raises(NotRegistered):
            await chain_harness.port(dev_hotkey(OUTSIDER)).set_weights(BASE.netuid, {1: 1.0})

    async def test_weights_need_a_validator_permit(self, chain_harness: ChainHarness) -> None:
        # Outside its rate limit: subtensor checks the rate limit before the permit, the devnet
        # the other way round, and the contract does not fix the order.
        idle = replace(NO_PERMIT, last_update=0)
        await chain_harness.build(replace(BASE, neurons=(*BASE.neurons[:3], idle)))
        port = chain_harness.port(NO_PERMIT.hotkey)

        await _rejected(port.set_weights(BASE.netuid, {1: 1.0}), "NOT_AUTHORIZED")
        assert await port.weights(BASE.netuid) == {}

    async def test_weights_for_unknown_uids_are_rejected(self, chain_harness: ChainHarness) -> None:
        await chain_harness.build(BASE)
        validator = chain_harness.port(VALIDATOR.hotkey)

        await _rejected(validator.set_weights(BASE.netuid, {1: 1.0, 42: 1.0}), "INVALID_ARGUMENT")
        assert await validator.weights(BASE.netuid) == {}

    async def test_too_few_weights_are_rejected_but_a_self_weight_is_not(
        self, chain_harness: ChainHarness
    ) -> None:
        await chain_harness.build(replace(BASE, min_allowed_weights=3))
        validator = chain_harness.port(VALIDATOR.hotkey)

        # three uids given, but the zero is dropped: two remain
        await _rejected(
            validator.set_weights(BASE.netuid, {1: 1.0, 2: 1.0, 3: 0.0}), "INVALID_ARGUMENT"
        )
        outcome = await validator.set_weights(BASE.netuid, {0: 1.0})
        assert outcome.path == "direct"
        assert await validator.weights(BASE.netuid) == {0: {0: 65535}}

    @pytest.mark.parametrize(
        "weights",
        [
            {},
            {1: 0.0, 2: 0.0},
            {1: -1.0, 2: 2.0},
            {1: math.nan},
            {1: math.inf, 2: 1.0},
            {70000: 1.0},
        ],
        ids=["empty", "all-zero", "negative", "nan", "inf", "uid-beyond-u16"],
    )
    async def test_malformed_weights_are_rejected(
        self, chain_harness: ChainHarness, weights: dict[int, float]
    ) -> None:
        await chain_harness.build(BASE)
        validator = chain_harness.port(VALIDATOR.hotkey)

        await _rejected(validator.set_weights(BASE.netuid, weights), "INVALID_ARGUMENT")
        snap = await validator.subnet(BASE.netuid)
        assert snap.neurons[0].last_update == 0, "a rejected submission is not an update"

    # --- outage --------------------------------------------------------------------------------

    async def test_unavailable_chain_fails_fast_with_chain_unavailable(
        self, chain_harness: ChainHarness
    ) -> None:
        await chain_harness.build(BASE)
        port = chain_harness.port(VALIDATOR.hotkey)
        chain_harness.make_unavailable()
        calls: list[Callable[[], Awaitable[object]]] = [
            port.head_block,
            port.block_time,
            lambda: port.subnet(BASE.netuid),
            lambda: port.uid_of(BASE.netuid, MINER_V4.hotkey),
            lambda: port.publish_endpoint(BASE.netuid, "10.0.0.1", 8091),
            lambda: port.set_weights(BASE.netuid, {1: 1.0}),
            lambda: port.weights(BASE.netuid),
        ]

        for call in calls:
            # the bound only catches a hang (a daemon must never wait forever on the chain)
            async with asyncio.timeout(WAIT):
                with pytest.raises(ChainUnavailable):
                    await call()
