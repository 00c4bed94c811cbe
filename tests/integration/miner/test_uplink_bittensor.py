"""The miner's chain-facing behaviour holds on BittensorChain, not only on the devnet.

``ValidatorUplinks`` reads the subnet through a real ``BittensorChain`` whose node is the
in-memory fake Substrate (the SDK decodes the metagraph for real). It must dial only permitted
validators with the configured stake and an endpoint, keep its links through a chain outage, and
pick up changes once the chain is back. The start-up registration check must survive a chain
that cannot be reached (a real RPC client against a closed loopback port).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from byteleap.chain.bittensor import BittensorChain
from byteleap.chain.config import ChainConfig
from byteleap.core.identity import HotkeySigner
from byteleap.miner.agent import open_miner_chain
from byteleap.miner.config import MinerConfig
from byteleap.miner.relay import WorkerConnections
from byteleap.miner.uplink import UplinkSettings, ValidatorUplinks, client_session
from tests.contract.chain_contract import ChainFixture, NeuronFixture
from tests.support.fake_substrate import FakeSubstrate
from tests.support.fixtures import WAIT, free_port

NETUID = 7
TAO = 10**9
MIN_STAKE = 1000 * TAO


@pytest.fixture(autouse=True)
def temp_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("BTCLI_TOKEN_SYMBOLS_CACHE", str(tmp_path / "symbols.json"))


def validator(
    uri: str, stake_tao: int, *, permit: bool = True, served: bool = True
) -> NeuronFixture:
    from byteleap.chain.port import Endpoint

    endpoint = Endpoint(ip="127.0.0.1", port=free_port()) if served else None
    return NeuronFixture(uri, stake_rao=stake_tao * TAO, validator_permit=permit, endpoint=endpoint)


SUBNET = ChainFixture(
    netuid=NETUID,
    neurons=(
        NeuronFixture("//Alice"),  # this miner
        validator("//Bob", 5000),  # dialed
        validator("//Charlie", 10),  # permitted, too little stake
        validator("//Dave", 9000, permit=False),  # stake, no permit
        validator("//Eve", 9000, served=False),  # no endpoint
    ),
)


@pytest.fixture
async def uplinks() -> AsyncIterator[tuple[ValidatorUplinks, FakeSubstrate]]:
    fake = FakeSubstrate.from_fixture(SUBNET)
    alice = HotkeySigner.from_uri("//Alice")
    chain = BittensorChain("local", signer=alice, substrate=fake, timeout_s=WAIT)
    http = client_session()
    links = ValidatorUplinks(
        chain=chain,
        signer=alice,
        relay=WorkerConnections(),
        roster=list,
        http=http,
        settings=UplinkSettings(
            netuid=NETUID,
            min_stake_rao=MIN_STAKE,
            reconnect_min_s=0.05,
            reconnect_max_s=0.2,
            connect_timeout_s=WAIT,
            close_timeout_s=1.0,
        ),
    )
    try:
        yield links, fake
    finally:
        await links.stop()
        await http.close()
        await chain.close()


def dialed(links: ValidatorUplinks) -> list[str]:
    return [status.hotkey for status in links.status()]


async def test_dials_only_permitted_staked_served_validators(
    uplinks: tuple[ValidatorUplinks, FakeSubstrate],
) -> None:
    links, _ = uplinks

    assert await links.refresh()

    assert dialed(links) == [SUBNET.neurons[1].hotkey]
    assert links.snapshot is not None and links.snapshot.block == SUBNET.head_block


async def test_keeps_its_links_through_an_outage_and_catches_up_after(
    uplinks: tuple[ValidatorUplinks, FakeSubstrate],
) -> None:
    links, fake = uplinks
    assert await links.refresh()
    fake.available = False

    assert not await links.refresh()

    assert not links.chain_reachable
    assert "chain unreachable" in links.status_line()
    assert dialed(links) == [SUBNET.neurons[1].hotkey], "the last snapshot stays in force"

    fake.available = True
    fake.subnets[NETUID].neurons[2].stake_rao = 2 * MIN_STAKE  # Charlie now qualifies
    fake.head += 5
    assert await links.refresh()

    assert "chain unreachable" not in links.status_line()
    assert dialed(links) == [SUBNET.neurons[1].hotkey, SUBNET.neurons[2].hotkey]
    assert links.snapshot is not None and links.snapshot.block == SUBNET.head_block + 5


async def test_a_validator_that_loses_its_permit_is_dropped(
    uplinks: tuple[ValidatorUplinks, FakeSubstrate],
) -> None:
    links, fake = uplinks
    assert await links.refresh()

    fake.subnets[NETUID].neurons[1].validator_permit = False
    assert await links.refresh()

    assert dialed(links) == []


async def test_an_unreachable_chain_at_start_up_is_not_fatal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = MinerConfig(
        chain=msgspec.convert(
            {"network": f"ws://127.0.0.1:{free_port()}", "netuid": NETUID, "timeout_s": WAIT},
            ChainConfig,
        )
    )

    with caplog.at_level(logging.WARNING, logger="byteleap.miner"):
        chain = await open_miner_chain(config, HotkeySigner.from_uri("//Alice"))
    try:
        assert isinstance(chain, BittensorChain)
        assert "chain unreachable at start-up" in caplog.text
        assert "registration" in caplog.text
    finally:
        await chain.close()
