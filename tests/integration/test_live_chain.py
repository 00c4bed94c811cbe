"""Opt-in, read-only smoke test of BittensorChain against a real Bittensor network.

Skipped unless ``BYTELEAP_LIVE_CHAIN`` names a network: ``test``, ``finney``, ``local`` or a
``ws://``/``wss://`` URL. ``BYTELEAP_LIVE_NETUID`` picks the subnet (default 128; testnet
netuids differ from mainnet ones, ``btcli subnet list --network test`` shows them). Nothing is
signed or submitted. Example::

    export BYTELEAP_LIVE_CHAIN=test BYTELEAP_LIVE_NETUID=128
    .venv/bin/pytest tests/integration/test_live_chain.py
"""

from __future__ import annotations

import math
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from byteleap.chain.bittensor import BittensorChain
from byteleap.chain.port import U16_MAX

NETWORK = os.environ.get("BYTELEAP_LIVE_CHAIN", "")
NETUID = int(os.environ.get("BYTELEAP_LIVE_NETUID", "128"))

pytestmark = pytest.mark.skipif(
    not NETWORK, reason="set BYTELEAP_LIVE_CHAIN=test|finney|local|ws://... to read a real chain"
)


@pytest.fixture
async def chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[BittensorChain]:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("BTCLI_TOKEN_SYMBOLS_CACHE", str(tmp_path / "symbols.json"))
    port = BittensorChain(NETWORK, timeout_s=60.0)  # public nodes can be slow; no signer
    yield port
    await port.close()


async def test_the_live_subnet_maps_to_a_consistent_snapshot(chain: BittensorChain) -> None:
    head = await chain.head_block()
    block_time = await chain.block_time()
    snapshot = await chain.subnet(NETUID)

    assert head > 0
    assert math.isfinite(block_time) and block_time > 0
    assert snapshot.netuid == NETUID and snapshot.block >= head
    assert snapshot.tempo >= 1 and 1 <= snapshot.max_weight_limit <= U16_MAX
    uids = [neuron.uid for neuron in snapshot.neurons]
    assert uids == sorted(set(uids)) and len(uids) <= snapshot.max_uids
    for neuron in snapshot.neurons:
        assert neuron.stake_rao >= 0 and neuron.last_update <= snapshot.block
    for neuron in snapshot.neurons[:5]:
        assert await chain.uid_of(NETUID, neuron.hotkey) == neuron.uid


async def test_the_live_weights_are_u16_rows_of_known_uids(chain: BittensorChain) -> None:
    snapshot = await chain.subnet(NETUID)
    weights = await chain.weights(NETUID)

    for validator_uid, row in weights.items():
        assert 0 <= validator_uid < snapshot.max_uids
        assert row and all(0 < value <= U16_MAX for value in row.values())
