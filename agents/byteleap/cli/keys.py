"""``byteleapctl keys show``: which hotkey an agent signs with, and what the chain says about it.

The key is found exactly as the agent finds it (:func:`~byteleap.core.identity.load_hotkey`:
``--hotkey-uri``, else the systemd credential ``hotkey`` when ``$CREDENTIALS_DIRECTORY`` holds
one, else the wallet layout), or read from ``--hotkey-file`` (the file a unit's
``LoadCredential=hotkey:PATH`` names). Then, unless ``--offline``, the chain named by the agent's
config is asked, read-only: is the hotkey registered on the netuid, its uid, stake, validator
permit and published endpoint.

Exit codes: 0 the key is usable and registered; 1 not registered, or the chain could not answer
(the message says which); 2 no usable key, or an unusable config.
"""

from __future__ import annotations

import asyncio
import enum
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from ..chain.config import ChainConfig, open_chain
from ..chain.port import ChainError, ChainUnavailable, Neuron, SubnetSnapshot
from ..core.config import ConfigError, load_config
from ..core.identity import (
    DEFAULT_WALLET_PATH,
    HotkeySigner,
    IdentityError,
    LoadedHotkey,
    load_hotkey,
)
from ..miner import config as miner_config
from ..validator import config as validator_config

__all__ = ["EXIT_NOT_REGISTERED", "EXIT_NO_KEY", "Agent", "app"]

EXIT_NOT_REGISTERED = 1
EXIT_NO_KEY = 2
RAO_PER_TAO = 10**9

app = typer.Typer(
    help="Which hotkey an agent signs with, and whether the chain knows it.",
    no_args_is_help=True,
)


class Agent(enum.StrEnum):
    MINER = "miner"
    VALIDATOR = "validator"


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"byteleapctl keys: {message}", err=True)
    raise typer.Exit(code)


def _line(label: str, value: str) -> None:
    typer.echo(f"{label:<17}{value}")


def _load_key(
    hotkey_file: Path | None,
    hotkey_uri: str | None,
    wallet_name: str,
    wallet_hotkey: str,
    wallet_path: str,
) -> LoadedHotkey:
    try:
        if hotkey_file is not None and not hotkey_uri:
            return LoadedHotkey(HotkeySigner.from_keyfile(hotkey_file), "file", str(hotkey_file))
        return load_hotkey(
            uri=hotkey_uri,
            wallet_name=wallet_name,
            wallet_hotkey=wallet_hotkey,
            wallet_path=wallet_path,
        )
    except IdentityError as exc:
        _fail(f"no usable hotkey: {exc}", EXIT_NO_KEY)


def _chain_config(agent: Agent, path: Path | None) -> tuple[ChainConfig, str]:
    """The ``chain:`` section the agent would use (its file, then its environment overrides)."""
    module = miner_config if agent is Agent.MINER else validator_config
    schema: type[miner_config.MinerConfig | validator_config.ValidatorConfig] = (
        miner_config.MinerConfig if agent is Agent.MINER else validator_config.ValidatorConfig
    )
    config_path = path if path is not None else Path(module.DEFAULT_CONFIG_PATH)
    try:
        chain = load_config(config_path, schema, env_prefix=module.ENV_PREFIX).chain
    except ConfigError as exc:
        hint = "" if path is not None else " (pass --config, or --offline to skip the chain)"
        _fail(f"config: {exc}{hint}", EXIT_NO_KEY)
    return chain, str(config_path)


async def _read_subnet(chain_config: ChainConfig) -> SubnetSnapshot:
    chain = open_chain(chain_config, None)  # read-only: nothing is signed
    try:
        return await chain.subnet(chain_config.netuid)
    finally:
        await chain.close()


def _network(chain_config: ChainConfig) -> str:
    if chain_config.network == "devnet":
        return f"devnet {chain_config.devnet_path}"
    return chain_config.network


def _how_to_register(chain_config: ChainConfig) -> str:
    if chain_config.network == "devnet":
        return "the devnet registers its own agents (byteleapctl devnet up)"
    network = chain_config.network
    option = "" if network == "finney" else f" --network {network}"
    return f"register it with `btcli subnet register --netuid {chain_config.netuid}{option}`"


def _show_neuron(agent: Agent, neuron: Neuron) -> None:
    _line("uid", str(neuron.uid))
    _line("stake", f"{neuron.stake_rao / RAO_PER_TAO:,.9f} TAO ({neuron.stake_rao} rao)")
    permit = "yes" if neuron.validator_permit else "no"
    if agent is Agent.VALIDATOR and not neuron.validator_permit:
        permit += " (the chain refuses this validator's weights until it has one)"
    _line("validator permit", permit)
    _line("endpoint", "none published" if neuron.endpoint is None else str(neuron.endpoint))


@app.command()
def show(
    agent: Annotated[Agent, typer.Option("--agent", help="the agent whose key to show")],
    config: Annotated[
        Path | None,
        typer.Option("--config", help="the agent's config (default /etc/byteleap/AGENT.yaml)"),
    ] = None,
    hotkey_uri: Annotated[
        str | None, typer.Option("--hotkey-uri", help="a dev URI such as //Alice (devnets)")
    ] = None,
    wallet_name: Annotated[str, typer.Option("--wallet-name", help="wallet name")] = "default",
    wallet_hotkey: Annotated[
        str, typer.Option("--wallet-hotkey", help="hotkey name in the wallet")
    ] = "default",
    wallet_path: Annotated[
        str, typer.Option("--wallet-path", help="wallets directory")
    ] = DEFAULT_WALLET_PATH,
    hotkey_file: Annotated[
        Path | None,
        typer.Option(
            "--hotkey-file", help="a hotkey keyfile, as the unit's LoadCredential=hotkey:PATH"
        ),
    ] = None,
    offline: Annotated[
        bool, typer.Option("--offline", help="only show the key; do not ask the chain")
    ] = False,
) -> None:
    """Show the hotkey AGENT would sign with, where it comes from, and its state on chain."""
    key = _load_key(hotkey_file, hotkey_uri, wallet_name, wallet_hotkey, wallet_path)
    _line("agent", agent.value)
    _line("hotkey", key.signer.ss58_address)
    _line("from", key.describe())
    if offline:
        return
    chain_config, config_path = _chain_config(agent, config)
    netuid = chain_config.netuid
    _line("config", config_path)
    _line("chain", f"{_network(chain_config)}, netuid {netuid}")
    try:
        snapshot = asyncio.run(_read_subnet(chain_config))
    except ChainUnavailable as exc:
        _fail(f"chain unreachable, registration not checked: {exc}", EXIT_NOT_REGISTERED)
    except ChainError as exc:
        _fail(f"the chain refused the query: {exc}", EXIT_NOT_REGISTERED)
    except ValueError as exc:  # an adapter refusing the chain section
        _fail(f"config: {exc}", EXIT_NO_KEY)
    neuron = snapshot.by_hotkey(key.signer.ss58_address)
    _line("block", str(snapshot.block))
    if neuron is None:
        _line("registered", "no")
        _fail(
            f"hotkey {key.signer.ss58_address} is not registered on netuid {netuid} of "
            f"{_network(chain_config)}; {_how_to_register(chain_config)}",
            EXIT_NOT_REGISTERED,
        )
    _line("registered", "yes")
    _show_neuron(agent, neuron)
