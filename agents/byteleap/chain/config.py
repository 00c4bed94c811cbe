"""The ``chain:`` section shared by the miner and validator configs, and the port it opens.

``network`` names the chain: ``finney`` (mainnet), ``test``, ``local`` (a node on this host),
a ``ws://``/``wss://`` URL, or ``devnet``: this project's SQLite devnet
(:class:`~byteleap.chain.devnet.DevnetChain`) at ``devnet_path`` — not bittensor's own "devnet"
network. :func:`open_chain` turns the section into a :class:`~byteleap.chain.port.ChainPort`:
a :class:`~byteleap.chain.devnet.DevnetChain` for ``devnet``, a
:class:`~byteleap.chain.bittensor.BittensorChain` for everything else. The bittensor adapter
is imported only then, so devnet runs and most tests never load the SDK.
"""

from __future__ import annotations

import urllib.parse
from typing import Annotated, Final

import msgspec
from msgspec import Meta

from byteleap.core.config import ConfigStruct, PositiveSeconds
from byteleap.core.identity import HotkeySigner

from .devnet import DevnetChain
from .port import DEFAULT_NETUID, ChainPort

__all__ = ["NAMED_NETWORKS", "ChainConfig", "open_chain"]

NAMED_NETWORKS: Final = ("finney", "test", "local", "devnet")


def _check_ws_url(what: str, url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"{what} {url!r} is not a ws:// or wss:// URL with a host")


class ChainConfig(ConfigStruct, frozen=True, kw_only=True):
    network: str = "finney"
    """finney | test | local | devnet | ws(s)://host[:port]"""
    devnet_path: str | None = None
    """The devnet chain file; required when ``network`` is ``devnet``."""
    netuid: Annotated[int, Meta(ge=0, le=65535)] = DEFAULT_NETUID
    fallback_endpoints: list[str] = msgspec.field(default_factory=list)
    """ws(s):// endpoints tried when the main one fails. Empty: the SDK's public pool for the
    network (finney has one; test, local and URLs have none)."""
    timeout_s: PositiveSeconds = 12.0
    """Upper bound on one chain read (connecting included)."""
    write_timeout_s: PositiveSeconds = 60.0
    """Upper bound on one write: sign, submit and wait until it is in a block (not finalized)."""
    snapshot_refresh_s: PositiveSeconds = 60.0
    """How often daemons re-read the subnet snapshot."""

    def __post_init__(self) -> None:
        if self.network not in NAMED_NETWORKS:
            if not self.network.startswith(("ws://", "wss://")):
                raise ValueError(
                    f"network {self.network!r} is not one of {', '.join(NAMED_NETWORKS)} "
                    "nor a ws:// or wss:// URL"
                )
            _check_ws_url("network", self.network)
        if self.network == "devnet" and not self.devnet_path:
            raise ValueError("network 'devnet' needs devnet_path: the devnet chain file")
        for index, endpoint in enumerate(self.fallback_endpoints):
            _check_ws_url(f"fallback_endpoints[{index}]", endpoint)


def open_chain(config: ChainConfig, signer: HotkeySigner | None) -> ChainPort:
    """The port for ``config``, acting as ``signer``'s hotkey (None: a read-only port).

    Opening performs no I/O; a missing devnet file or an unreachable node shows up as
    :class:`~byteleap.chain.port.ChainUnavailable` on the first call.
    """
    if config.network == "devnet":
        if not config.devnet_path:  # narrows the type; __post_init__ already refused this
            raise ValueError("network 'devnet' needs devnet_path: the devnet chain file")
        return DevnetChain(
            config.devnet_path,
            hotkey=None if signer is None else signer.ss58_address,
            busy_timeout_s=config.timeout_s,
        )
    from .bittensor import BittensorChain  # loads the SDK: only for real networks

    return BittensorChain(
        config.network,
        signer=signer,
        fallback_endpoints=config.fallback_endpoints or None,
        timeout_s=config.timeout_s,
        write_timeout_s=config.write_timeout_s,
    )
