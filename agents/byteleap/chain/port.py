"""The chain as the agents see it: one small async port, domain types only (DESIGN §6).

Adapters: :mod:`byteleap.chain.devnet` (a SQLite file shared by local processes) and
:mod:`byteleap.chain.bittensor` (the only module that imports ``bittensor``). No SDK type crosses
this boundary, so the agents and their tests do not care which one they talk to.

A port instance acts *as one hotkey* (the agent's own): :meth:`ChainPort.publish_endpoint` and
:meth:`ChainPort.set_weights` are signed by it. Reads need no identity.

Errors are the four domain errors below, all :class:`ChainError`. A daemon treats
:class:`ChainUnavailable` as "keep serving from the last snapshot, retry with backoff",
:class:`RateLimited` as "wait ``retry_in_blocks``", and the other two as configuration problems
worth a log line at error level.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal, Protocol

import msgspec
from msgspec import Meta

from ..core.identity import PeerIdentity

__all__ = [
    "DEFAULT_NETUID",
    "MAX_UIDS",
    "U16_MAX",
    "ChainError",
    "ChainPort",
    "ChainRejected",
    "ChainUnavailable",
    "Endpoint",
    "Neuron",
    "NotRegistered",
    "RateLimited",
    "SubnetSnapshot",
    "TxOutcome",
    "check_endpoint",
    "check_ss58",
    "check_version_key",
    "check_weights_mapping",
]

DEFAULT_NETUID: Final = 128
MAX_UIDS: Final = 256
"""UIDs per subnet under Yuma consensus."""
U16_MAX: Final = 65535
MAX_VERSION_KEY: Final = 2**64 - 1

Uid = Annotated[int, Meta(ge=0, lt=65536)]
Block = Annotated[int, Meta(ge=0)]


class ChainError(Exception):
    """Base of the port's domain errors; the message is one operator-readable line."""


class ChainUnavailable(ChainError):  # noqa: N818 - names are the port's vocabulary
    """The chain cannot be reached or did not answer in time: retry later."""


class NotRegistered(ChainError):  # noqa: N818 - names are the port's vocabulary
    """The acting hotkey (or the one asked about) has no uid on the subnet."""


class RateLimited(ChainError):  # noqa: N818 - names are the port's vocabulary
    """The chain refuses this write until ``retry_in_blocks`` more blocks have passed."""

    def __init__(self, message: str, retry_in_blocks: int) -> None:
        super().__init__(message)
        self.retry_in_blocks = max(0, int(retry_in_blocks))


class ChainRejected(ChainError):  # noqa: N818 - names are the port's vocabulary
    """The chain refused the call for another reason; ``code`` is a stable upper-case name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


def check_endpoint(ip: object, port: object) -> str:
    """The canonical form of an endpoint ip miners can dial, or :class:`ChainRejected`
    (``INVALID_ARGUMENT``): not an IP, unspecified (0.0.0.0, ::), multicast, or a bad port.
    Every adapter applies it before publishing, so the devnet refuses what the chain would."""
    if not isinstance(ip, str):
        raise ChainRejected("INVALID_ARGUMENT", f"endpoint ip must be a string, got {ip!r}")
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        raise ChainRejected(
            "INVALID_ARGUMENT", f"endpoint ip {ip!r} is not an IP address"
        ) from None
    if address.is_unspecified or address.is_multicast:
        raise ChainRejected(
            "INVALID_ARGUMENT", f"endpoint ip {ip} cannot be dialled (unspecified or multicast)"
        )
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= U16_MAX:
        raise ChainRejected(
            "INVALID_ARGUMENT", f"endpoint port must be an integer in 1..{U16_MAX}, got {port!r}"
        )
    return str(address)


def check_ss58(what: str, address: object) -> str:
    """``address`` if it is an SS58 address, else :class:`ChainRejected` (``INVALID_ARGUMENT``)
    naming it as ``what``."""
    if not isinstance(address, str):
        raise ChainRejected("INVALID_ARGUMENT", f"{what} must be an SS58 address, got {address!r}")
    try:
        PeerIdentity.from_ss58(address)
    except ValueError:
        raise ChainRejected(
            "INVALID_ARGUMENT", f"{what} {address!r} is not an SS58 address"
        ) from None
    return address


def check_version_key(version_key: object) -> int:
    """``version_key`` if it is an unsigned 64-bit integer, else :class:`ChainRejected`."""
    if (
        isinstance(version_key, bool)
        or not isinstance(version_key, int)
        or not 0 <= version_key <= MAX_VERSION_KEY
    ):
        raise ChainRejected(
            "INVALID_ARGUMENT",
            f"version_key must be an unsigned 64-bit integer, got {version_key!r}",
        )
    return version_key


def check_weights_mapping(weights: object) -> Mapping[Any, Any]:
    """``weights`` if it is a mapping (uids and values are checked by ``quantize_weights``),
    else :class:`ChainRejected`."""
    if not isinstance(weights, Mapping):
        raise ChainRejected(
            "INVALID_ARGUMENT", f"weights must be a mapping uid -> weight, got {weights!r}"
        )
    return weights


class Endpoint(msgspec.Struct, frozen=True, kw_only=True):
    """Where a neuron serves (bittensor's "axon" ip:port)."""

    ip: str
    port: Annotated[int, Meta(ge=1, le=65535)]

    def __post_init__(self) -> None:
        try:
            ipaddress.ip_address(self.ip)
        except ValueError:
            raise ValueError(f"endpoint ip {self.ip!r} is not an IP address") from None
        if not 1 <= self.port <= 65535:  # Meta bounds apply when decoding, not here
            raise ValueError(f"endpoint port {self.port} is outside 1-65535")

    @property
    def host(self) -> str:
        """The ip as it appears in a URL (IPv6 in brackets)."""
        return f"[{self.ip}]" if ":" in self.ip else self.ip

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class Neuron(msgspec.Struct, frozen=True, kw_only=True):
    uid: Uid
    hotkey: str
    coldkey: str
    stake_rao: Annotated[int, Meta(ge=0)]
    validator_permit: bool
    active: bool
    last_update: Block
    """Block of this neuron's last weights submission (0: never)."""
    endpoint: Endpoint | None = None


class SubnetSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """One consistent view of a subnet at ``block``."""

    netuid: Annotated[int, Meta(ge=0, lt=65536)]
    block: Block
    tempo: Annotated[int, Meta(ge=1)]
    weights_rate_limit: Annotated[int, Meta(ge=0)]
    """Blocks that must pass between two weight submissions of one validator."""
    min_allowed_weights: Annotated[int, Meta(ge=0)]
    max_weight_limit: Annotated[int, Meta(ge=1, le=U16_MAX)]
    """The largest share one uid may get, as a u16 fraction of 65535 (65535 = no cap)."""
    commit_reveal_enabled: bool
    max_uids: Annotated[int, Meta(ge=1, le=U16_MAX)]
    neurons: tuple[Neuron, ...]
    """Sorted by uid."""

    def by_hotkey(self, hotkey: str) -> Neuron | None:
        for neuron in self.neurons:
            if neuron.hotkey == hotkey:
                return neuron
        return None

    def by_uid(self, uid: int) -> Neuron | None:
        for neuron in self.neurons:
            if neuron.uid == uid:
                return neuron
        return None

    def validators(self, min_stake_rao: int = 0) -> tuple[Neuron, ...]:
        """Neurons with a validator permit and at least ``min_stake_rao`` of stake."""
        return tuple(n for n in self.neurons if n.validator_permit and n.stake_rao >= min_stake_rao)


class TxOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """A write the chain accepted."""

    block: Block
    """The block the write landed in (or the head when it was submitted)."""
    path: Literal["direct", "timelocked", "serve"]
    """How weights went on chain: ``direct`` (set_mechanism_weights) or ``timelocked``
    (commit-reveal v4, revealed by the chain at ``reveal_round``); ``serve`` for endpoints."""
    reveal_round: int | None = None
    """Timelocked weights: when the chain reveals them (bittensor: a drand round; the devnet: a
    block number). Compare it only with values of the same adapter."""
    message: str = ""


class ChainPort(Protocol):
    """What the agents need from a chain. Every method may raise :class:`ChainError`."""

    async def head_block(self) -> int: ...

    async def block_time(self) -> float:
        """Seconds per block."""
        ...

    async def subnet(self, netuid: int) -> SubnetSnapshot: ...

    async def uid_of(self, netuid: int, hotkey: str) -> int | None: ...

    async def publish_endpoint(self, netuid: int, ip: str, port: int) -> TxOutcome:
        """Publish where the acting hotkey serves (raises NotRegistered if it has no uid)."""
        ...

    async def set_weights(
        self, netuid: int, weights: Mapping[int, float], *, version_key: int = 0
    ) -> TxOutcome:
        """Set the acting hotkey's weights, uid -> non-negative weight (any scale).

        Weights are clipped to ``max_weight_limit``, max-upscaled to u16 and rounded, zeros
        dropped, as bittensor does. Raises :class:`NotRegistered`, :class:`RateLimited`, or
        :class:`ChainRejected` (``NOT_AUTHORIZED`` without a validator permit,
        ``INVALID_ARGUMENT`` for unknown uids, too few weights, or negative/non-finite values).
        """
        ...

    async def weights(self, netuid: int) -> dict[int, dict[int, int]]:
        """Weights now visible on chain: validator uid -> {uid: u16 value}."""
        ...

    async def close(self) -> None: ...
