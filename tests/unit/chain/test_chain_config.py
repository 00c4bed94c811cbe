"""The chain: config section and open_chain."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from byteleap.chain.config import ChainConfig, open_chain
from byteleap.chain.devnet import DevnetChain
from byteleap.core.config import ConfigError, ConfigStruct, load_config
from byteleap.core.identity import HotkeySigner
from tests.contract.chain_contract import dev_hotkey

ALICE = dev_hotkey("//Alice")


class AgentConfig(ConfigStruct, frozen=True, kw_only=True):
    """How the miner and validator configs embed the section."""

    chain: ChainConfig = msgspec.field(default_factory=ChainConfig)


def load(tmp_path: Path, yaml_text: str, environ: dict[str, str] | None = None) -> ChainConfig:
    config_file = tmp_path / "agent.yaml"
    config_file.write_text(yaml_text)
    return load_config(config_file, AgentConfig, env_prefix="AGENT", environ=environ or {}).chain


def test_defaults_are_mainnet_subnet_128() -> None:
    config = ChainConfig()

    assert (config.network, config.netuid, config.devnet_path) == ("finney", 128, None)
    assert config.fallback_endpoints == []
    assert (config.timeout_s, config.write_timeout_s, config.snapshot_refresh_s) == (
        12.0,
        60.0,
        60.0,
    )


@pytest.mark.parametrize(
    "network", ["finney", "test", "local", "ws://127.0.0.1:9944", "wss://x.io"]
)
def test_accepted_networks(tmp_path: Path, network: str) -> None:
    assert load(tmp_path, f"chain: {{network: '{network}'}}\n").network == network


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("chain: {network: mainnet}\n", "network 'mainnet' is not one of"),
        ("chain: {network: 'http://node:9944'}\n", "nor a ws:// or wss:// URL"),
        ("chain: {network: 'ws://'}\n", "not a ws:// or wss:// URL with a host"),
        ("chain: {network: devnet}\n", "network 'devnet' needs devnet_path"),
        ("chain: {fallback_endpoints: ['https://a']}\n", r"fallback_endpoints\[0\]"),
        ("chain: {netuid: 70000}\n", "chain.netuid"),
        ("chain: {timeout_s: 0}\n", "chain.timeout_s"),
        ("chain: {netwerk: finney}\n", "did you mean 'network'"),
    ],
)
def test_invalid_sections_are_refused_with_the_key_named(
    tmp_path: Path, yaml_text: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        load(tmp_path, yaml_text)
    assert "chain" in str(caught.value)


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        "chain: {network: finney}\n",
        {"AGENT__CHAIN__NETWORK": "devnet", "AGENT__CHAIN__DEVNET_PATH": "/srv/chain.sqlite"},
    )

    assert (config.network, config.devnet_path) == ("devnet", "/srv/chain.sqlite")


async def test_devnet_opens_a_devnet_chain_acting_as_the_hotkey(tmp_path: Path) -> None:
    path = tmp_path / "chain.sqlite"
    DevnetChain.create(path).register(128, ALICE)

    port = open_chain(
        ChainConfig(network="devnet", devnet_path=str(path)), HotkeySigner.from_uri("//Alice")
    )

    assert isinstance(port, DevnetChain)
    assert port.hotkey == ALICE
    assert (await port.publish_endpoint(128, "127.0.0.1", 8091)).path == "serve"
    await port.close()


@pytest.mark.parametrize(
    ("network", "endpoint"),
    [
        ("finney", "wss://entrypoint-finney.opentensor.ai:443"),
        ("test", "wss://test.finney.opentensor.ai:443"),
        ("ws://127.0.0.1:9944", "ws://127.0.0.1:9944"),
    ],
)
async def test_other_networks_open_the_bittensor_adapter_without_io(
    network: str, endpoint: str
) -> None:
    from byteleap.chain.bittensor import BittensorChain

    signer = HotkeySigner.from_uri("//Alice")
    port = open_chain(ChainConfig(network=network, timeout_s=3, write_timeout_s=30), signer)

    assert isinstance(port, BittensorChain)
    assert (port.network, port.endpoint, port.hotkey) == (network, endpoint, ALICE)
    await port.close()


async def test_without_a_signer_the_port_is_read_only() -> None:
    from byteleap.chain.bittensor import BittensorChain
    from byteleap.chain.port import ChainRejected

    port = open_chain(ChainConfig(network="test"), None)

    assert isinstance(port, BittensorChain) and port.hotkey is None
    with pytest.raises(ChainRejected, match="read-only"):
        await port.set_weights(128, {0: 1.0})
    await port.close()
