"""The ``chain:`` section shared by the miner and validator configs, and the port it opens.

``network`` names the chain: ``finney`` (mainnet), ``test``, ``local`` (a node on this host),
a ``ws://``/``wss://`` URL, or ``devnet``: this project's SQLite devnet
(:class:`~byteleap.chain.devnet.DevnetChain`) at ``devnet_path`` — not bittensor's own "devnet"
network. :func:`open_chain` turns the section into a :class:`~byteleap.chain.port.ChainPort`.
"""

from __future__ import annotations

import urllib.parse
from typing import Annotated, Final

import msgspec
from msgspec import Meta

from byteleap.core.config import ConfigStruct, PositiveSeconds

from .devnet import DevnetChain
from .port import DEFAULT_NETUID, ChainPort, ChainRejected

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
    """Extra ws(s):// endpoints tried when the main one fails."""
    timeout_s: PositiveSeconds = 12.0
    """Upper bound on one chain call."""
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


def open_chain(config: ChainConfig, hotkey_ss58: str | None) -> ChainPort:
    """The port for ``config``, acting as ``hotkey_ss58`` (None: read-only).

    Opening performs no I/O; a missing devnet file or an unreachable node shows up as
    :class:`~byteleap.chain.port.ChainUnavailable` on the first call.
    """
    if config.network == "devnet":
        if not config.devnet_path:  # narrows the type; __post_init__ already refused this
            raise ValueError("network 'devnet' needs devnet_path: the devnet chain file")
        return DevnetChain(config.devnet_path, hotkey=hotkey_ss58, busy_timeout_s=config.timeout_s)
    # Until the bittensor adapter lands, only the devnet can be opened.
    raise ChainRejected(
        "UNSUPPORTED",
        f"network {config.network!r} needs the bittensor adapter (chain/bittensor.py)",
    )
