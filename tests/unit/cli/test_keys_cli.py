"""``byteleapctl keys show`` on a devnet chain file and a temp wallet, as an operator runs it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from byteleap.chain.devnet import DevnetChain
from byteleap.cli.main import app
from byteleap.core.identity import HotkeySigner

NETUID = 7
TAO = 10**9
ALICE = HotkeySigner.from_uri("//Alice").ss58_address
BOB = HotkeySigner.from_uri("//Bob").ss58_address


def keyfile_bytes(uri: str) -> bytes:
    import bittensor_core

    keypair = bittensor_core.Keypair.create_from_uri(uri, crypto_type=1)
    return bytes(bittensor_core.serialized_keypair_to_keyfile_data(keypair))


def write_keyfile(path: Path, uri: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(keyfile_bytes(uri))
    path.chmod(0o600)
    return path


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CREDENTIALS_DIRECTORY", "BYTELEAP_MINER__CHAIN__NETWORK"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def chain(tmp_path: Path) -> DevnetChain:
    devnet = DevnetChain.create(tmp_path / "chain.sqlite", netuid=NETUID)
    devnet.register(NETUID, ALICE, stake_rao=1500 * TAO, validator_permit=True)
    devnet.register(NETUID, HotkeySigner.from_uri("//Charlie").ss58_address)
    return devnet


@pytest.fixture
def wallets(tmp_path: Path) -> Path:
    root = tmp_path / "wallets"
    write_keyfile(root / "op" / "hotkeys" / "alice", "//Alice")
    write_keyfile(root / "op" / "hotkeys" / "bob", "//Bob")
    return root


def config_file(tmp_path: Path, chain: DevnetChain, name: str = "agent.yaml") -> Path:
    path = tmp_path / name
    path.write_text(f"chain: {{network: devnet, devnet_path: '{chain.path}', netuid: {NETUID}}}\n")
    return path


def keys(*args: str) -> Result:
    return CliRunner().invoke(app, ["keys", "show", *args])


def wallet_args(wallets: Path, hotkey: str) -> list[str]:
    return ["--wallet-name", "op", "--wallet-hotkey", hotkey, "--wallet-path", str(wallets)]


def test_a_registered_validator_shows_uid_stake_permit_and_endpoint(
    tmp_path: Path, chain: DevnetChain, wallets: Path
) -> None:
    asyncio.run(chain.as_hotkey(ALICE).publish_endpoint(NETUID, "192.0.2.10", 7800))

    result = keys(
        "--agent",
        "validator",
        "--config",
        str(config_file(tmp_path, chain)),
        *wallet_args(wallets, "alice"),
    )

    assert result.exit_code == 0, result.output
    out = result.stdout
    assert ALICE in out
    assert f"wallet {wallets / 'op' / 'hotkeys' / 'alice'}" in out
    assert f"devnet {chain.path}, netuid {NETUID}" in out
    assert "registered       yes" in out
    assert "uid              0" in out
    assert "1,500.000000000 TAO (1500000000000 rao)" in out
    assert "validator permit yes" in out
    assert "endpoint         192.0.2.10:7800" in out


def test_an_unregistered_hotkey_exits_1_and_says_how_to_register(
    tmp_path: Path, chain: DevnetChain, wallets: Path
) -> None:
    result = keys(
        "--agent",
        "miner",
        "--config",
        str(config_file(tmp_path, chain)),
        *wallet_args(wallets, "bob"),
    )

    assert result.exit_code == 1
    assert BOB in result.stdout
    assert "registered       no" in result.stdout
    assert f"hotkey {BOB} is not registered on netuid {NETUID}" in result.stderr


def test_an_unreachable_chain_exits_1_and_says_so(
    tmp_path: Path, chain: DevnetChain, wallets: Path
) -> None:
    chain.set_available(False)

    result = keys(
        "--agent",
        "miner",
        "--config",
        str(config_file(tmp_path, chain)),
        *wallet_args(wallets, "alice"),
    )

    assert result.exit_code == 1
    assert "chain unreachable, registration not checked" in result.stderr
    assert "not registered" not in result.stderr


def test_no_usable_key_exits_2_naming_the_file(tmp_path: Path, chain: DevnetChain) -> None:
    result = keys(
        "--agent",
        "miner",
        "--config",
        str(config_file(tmp_path, chain)),
        "--wallet-name",
        "nobody",
        "--wallet-path",
        str(tmp_path),
    )

    assert result.exit_code == 2
    assert "no usable hotkey" in result.stderr
    assert str(tmp_path / "nobody" / "hotkeys" / "default") in result.stderr


def test_an_encrypted_hotkey_exits_2(tmp_path: Path, chain: DevnetChain) -> None:
    path = tmp_path / "w" / "hotkeys" / "h"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"$NACL" + bytes(120))

    result = keys(
        "--agent",
        "miner",
        "--wallet-name",
        "w",
        "--wallet-hotkey",
        "h",
        "--wallet-path",
        str(tmp_path),
        "--offline",
    )

    assert result.exit_code == 2
    assert "encrypted" in result.stderr


def test_the_systemd_credential_is_what_the_service_would_use(
    tmp_path: Path, chain: DevnetChain, wallets: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    credentials = tmp_path / "credentials"
    write_keyfile(credentials / "hotkey", "//Alice")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))

    result = keys(
        "--agent",
        "miner",
        "--config",
        str(config_file(tmp_path, chain)),
        *wallet_args(wallets, "bob"),
    )

    assert result.exit_code == 0, result.output
    assert f"systemd credential {credentials / 'hotkey'}" in result.stdout
    assert ALICE in result.stdout


def test_a_hotkey_file_names_the_credential_source(tmp_path: Path, chain: DevnetChain) -> None:
    keyfile = write_keyfile(tmp_path / "etc" / "miner-hotkey", "//Alice")

    result = keys(
        "--agent",
        "miner",
        "--config",
        str(config_file(tmp_path, chain)),
        "--hotkey-file",
        str(keyfile),
    )

    assert result.exit_code == 0, result.output
    assert f"file {keyfile}" in result.stdout


def test_offline_needs_no_config_and_no_chain(tmp_path: Path) -> None:
    result = keys(
        "--agent",
        "validator",
        "--hotkey-uri",
        "//Alice",
        "--config",
        str(tmp_path / "absent.yaml"),
        "--offline",
    )

    assert result.exit_code == 0, result.output
    assert ALICE in result.stdout and "dev URI //Alice" in result.stdout
    assert "registered" not in result.stdout


def test_a_validator_without_permit_is_told_what_it_costs(
    tmp_path: Path, chain: DevnetChain
) -> None:
    charlie = HotkeySigner.from_uri("//Charlie").ss58_address

    result = keys(
        "--agent",
        "validator",
        "--config",
        str(config_file(tmp_path, chain)),
        "--hotkey-uri",
        "//Charlie",
    )

    assert result.exit_code == 0, result.output
    assert charlie in result.stdout
    assert "validator permit no (the chain refuses this validator's weights" in result.stdout
    assert "endpoint         none published" in result.stdout


def test_a_broken_config_exits_2_with_the_key_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("chain: {network: mainnet}\n")

    result = keys("--agent", "miner", "--hotkey-uri", "//Alice", "--config", str(path))

    assert result.exit_code == 2
    assert "config:" in result.stderr and str(path) in result.stderr
    assert "network 'mainnet' is not one of" in result.stderr


def test_the_agent_must_be_named() -> None:
    result = keys("--hotkey-uri", "//Alice", "--offline")

    assert result.exit_code == 2
    assert "--agent" in result.output
