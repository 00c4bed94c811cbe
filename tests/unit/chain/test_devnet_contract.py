"""The shared ChainPort contract (tests/contract/chain_contract.py), run against DevnetChain."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from byteleap.chain.devnet import DevnetChain
from byteleap.chain.port import ChainPort
from tests.contract.chain_contract import ChainContract, ChainFixture, ChainHarness, ManualClock

BLOCK_TIME = 0.25


class DevnetHarness:
    """Builds a devnet chain file in a temp dir; time moves only by :meth:`advance`."""

    models_commit_reveal = True

    def __init__(self, directory: Path) -> None:
        self._path = directory / "chain.sqlite"
        self._clock = ManualClock()
        self._ports: list[DevnetChain] = []
        self._admin: DevnetChain | None = None

    async def build(self, fixture: ChainFixture) -> None:
        admin = DevnetChain.create(
            self._path,
            netuid=fixture.netuid,
            block_time=BLOCK_TIME,
            tempo=fixture.tempo,
            weights_rate_limit=fixture.weights_rate_limit,
            min_allowed_weights=fixture.min_allowed_weights,
            max_weight_limit=fixture.max_weight_limit,
            max_uids=fixture.max_uids,
            commit_reveal=fixture.commit_reveal,
            clock=self._clock,
        )
        self._admin = admin
        self.advance(fixture.head_block)
        for expected_uid, neuron in enumerate(fixture.neurons):
            uid = admin.register(
                fixture.netuid,
                neuron.hotkey,
                coldkey=neuron.coldkey,
                stake_rao=neuron.stake_rao,
                validator_permit=neuron.validator_permit,
            )
            assert uid == expected_uid
            if neuron.endpoint is not None:
                await self.port(neuron.hotkey).publish_endpoint(
                    fixture.netuid, neuron.endpoint.ip, neuron.endpoint.port
                )
            if neuron.last_update:
                admin.set_last_update(fixture.netuid, neuron.hotkey, neuron.last_update)

    def port(self, hotkey: str) -> ChainPort:
        port = DevnetChain(self._path, hotkey=hotkey, clock=self._clock)
        self._ports.append(port)
        return port

    def advance(self, blocks: int) -> None:
        self._clock.advance(blocks * BLOCK_TIME)

    def make_unavailable(self) -> None:
        assert self._admin is not None, "build() first"
        self._admin.set_available(False)

    async def close(self) -> None:
        for port in self._ports:
            await port.close()


@pytest.fixture(params=[pytest.param(DevnetHarness, id="devnet")])
async def chain_harness(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[ChainHarness]:
    harness: ChainHarness = request.param(tmp_path)
    yield harness
    await harness.close()


class TestChainContract(ChainContract):
    pass
