"""BittensorChain: the ChainPort on a real Bittensor network (finney, test, a local node).

This is the only module of the agents that imports ``bittensor`` (11.3.0, research/bittensor.md
§2.2); the identity code's btauth/1 helpers are the one other place that loads it. Importing it
costs ~0.35 s, so :func:`byteleap.chain.config.open_chain` imports this module only when a real
network is configured.

Connection. One ``bittensor.Client`` per port, opened on the first call (constructing a port does
no I/O) and opened again after a transport failure, an unexpected SDK error or two timeouts in a
row. Every call runs under ``asyncio.timeout``: ``timeout_s`` for reads, ``write_timeout_s`` for
writes, which wait until the extrinsic is in a block (``wait_for_inclusion=True``) but not for
finality, and the larger of the two for connecting (which downloads the runtime metadata). A
write that times out may still land; the error says so, and the next attempt learns it from the
rate limit. ``fallback_endpoints`` are tried when the main endpoint fails;
``None`` keeps the SDK's public pool for the network (finney has one), a list replaces it.

Reads. :meth:`BittensorChain.subnet` pins the head block and reads, at that block, the
metagraph (one runtime-API call) and the four hyperparameters the port reports that the metagraph
does not lift (``WeightsSetRateLimit``, ``MinAllowedWeights``, ``MaxWeightsLimit``,
``CommitRevealWeightsEnabled``); stake is the neuron's ``total_stake`` in rao and an endpoint
is the axon's ``ip:port`` (None when nothing, or ``0.0.0.0``, is published).
:meth:`BittensorChain.weights` reads the ``Weights`` storage map, i.e. the u16 values as stored,
not the SDK's per-row fractions.

Writes are SDK intents signed by the agent's hotkey: ``ServeAxon`` for the endpoint and
``SetWeights``, which reads the subnet's commit-reveal switch and picks the direct
``set_mechanism_weights`` or the commit-reveal v4 ``commit_timelocked_mechanism_weights`` (drand
timelock; the chain reveals at ``reveal_round``, no reveal call needed). Inputs are validated
here first, so malformed weights or endpoints are refused with a clear message before anything
is signed.

Errors map onto the port's: transport failures (``RpcConnectionError``, ``ConnectionNotReady``,
``OSError``), timeouts and anything unexpected from the SDK -> :class:`ChainUnavailable`;
``ChainError`` codes ``RATE_LIMITED`` -> :class:`RateLimited` (blocks parsed from the SDK's
"retry in ~N blocks", else computed from chain state), ``NOT_REGISTERED`` ->
:class:`NotRegistered`, any other code -> ``ChainRejected(code.name)``; an unsuccessful
``ExtrinsicResult`` the same way. Secrets never reach a message: the SDK sees only the signer.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, Protocol, TypeVar

import bittensor as bt

from .port import (
    DEFAULT_NETUID,
    U16_MAX,
    ChainError,
    ChainRejected,
    ChainUnavailable,
    Endpoint,
    Neuron,
    NotRegistered,
    RateLimited,
    SubnetSnapshot,
    TxOutcome,
    check_endpoint,
    check_ss58,
    check_version_key,
    check_weights_mapping,
)
from .weights import quantize_weights

__all__ = ["BittensorChain", "ChainSigner"]

log = logging.getLogger("byteleap.chain")

T = TypeVar("T")

_CLOSE_TIMEOUT_S: Final = 5.0
_TIMEOUTS_BEFORE_RECONNECT: Final = 2
_RETRY_IN: Final = re.compile(r"retry in ~?\s*(\d+)\s*blocks?", re.IGNORECASE)
_EXTRINSIC_BLOCK: Final = re.compile(r"^(\d+)-\d+$")


def _storage(name: str) -> tuple[str, str]:
    """A SubtensorModule storage descriptor from the SDK's generated catalog.

    An item the SDK no longer knows raises AttributeError when this module is imported, so a
    version bump that renames chain storage fails loudly instead of reading nothing.
    """
    item = getattr(bt.storage.SubtensorModule, name)
    return (str(item.container), str(item.name))


_WEIGHTS_SET_RATE_LIMIT: Final = _storage("WeightsSetRateLimit")
_MIN_ALLOWED_WEIGHTS: Final = _storage("MinAllowedWeights")
_MAX_WEIGHTS_LIMIT: Final = _storage("MaxWeightsLimit")
_COMMIT_REVEAL_ENABLED: Final = _storage("CommitRevealWeightsEnabled")
_NETWORKS_ADDED: Final = _storage("NetworksAdded")
_WEIGHTS: Final = _storage("Weights")
_LAST_UPDATE: Final = _storage("LastUpdate")
_SERVING_RATE_LIMIT: Final = _storage("ServingRateLimit")


class ChainSigner(Protocol):
    """What signs the port's writes: the agent's sr25519 hotkey.

    :class:`~byteleap.core.identity.HotkeySigner` fits, and so does any ``bittensor.Signer``
    (a ``bittensor_core.Keypair`` included).
    """

    @property
    def ss58_address(self) -> str: ...

    @property
    def public_key(self) -> bytes: ...

    @property
    def crypto_type(self) -> int: ...

    def sign(self, message: bytes) -> bytes: ...


def _check_netuid(netuid: object) -> int:
    if isinstance(netuid, bool) or not isinstance(netuid, int) or not 0 <= netuid <= U16_MAX:
        raise ChainRejected(
            "INVALID_ARGUMENT", f"netuid must be an integer in 0..65535, got {netuid!r}"
        )
    return netuid


def _checked_weights(weights: object) -> dict[int, float]:
    """uid -> weight as plain ints and floats, after the same checks the devnet makes."""
    weights = check_weights_mapping(weights)
    try:
        quantize_weights(weights, U16_MAX)  # validates uids and values; the SDK clips live
    except ValueError as exc:
        raise ChainRejected("INVALID_ARGUMENT", str(exc)) from None
    return {int(uid): float(weight) for uid, weight in weights.items()}


def _endpoint_of(axon: str | None) -> Endpoint | None:
    """``ip:port`` or ``[v6]:port`` from the metagraph; None when absent or not dialable."""
    if not axon:
        return None
    host, _, port_text = axon.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        address = ipaddress.ip_address(host)
        endpoint = Endpoint(ip=str(address), port=int(port_text))
    except ValueError:
        return None
    return None if address.is_unspecified else endpoint


def _block_of(result: Any, fallback: int) -> int:
    match = _EXTRINSIC_BLOCK.match(str(getattr(result, "extrinsic_id", None) or ""))
    return int(match.group(1)) if match else fallback


def _as_int(value: Any, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


class BittensorChain:
    """A :class:`~byteleap.chain.port.ChainPort` on a Bittensor network (see the module doc).

    ``network``: ``finney``, ``test``, ``local`` (``$BT_CHAIN_ENDPOINT`` or
    ``ws://127.0.0.1:9944``) or a ``ws://``/``wss://`` URL. ``signer``: the hotkey writes are
    signed with; ``None`` makes a read-only port whose writes raise
    ``ChainRejected("NOT_AUTHORIZED")``. ``substrate``: a ``bittensor.Substrate`` to use instead
    of the RPC backend (tests inject an in-memory fake).
    """

    default_netuid: Final = DEFAULT_NETUID

    def __init__(
        self,
        network: str = "finney",
        *,
        signer: ChainSigner | None = None,
        fallback_endpoints: Sequence[str] | None = None,
        timeout_s: float = 12.0,
        write_timeout_s: float = 60.0,
        substrate: Any | None = None,
    ) -> None:
        for name, value in (("timeout_s", timeout_s), ("write_timeout_s", write_timeout_s)):
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        self._network = network
        self._fallbacks = None if fallback_endpoints is None else list(fallback_endpoints)
        self._signer = signer
        self._timeout_s = float(timeout_s)
        self._write_timeout_s = float(write_timeout_s)
        self._substrate = substrate
        # Resolving the name validates it now (ValueError for an unknown network), with no I/O.
        probe = bt.Client(network, fallback_endpoints=[], archive_endpoints=[], substrate=substrate)
        self._endpoint = str(probe.endpoint)
        self._client: bt.Client | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        self._timeouts = 0

    def __repr__(self) -> str:
        hotkey = None if self._signer is None else self._signer.ss58_address
        return f"BittensorChain({self._network!r}, endpoint={self._endpoint!r}, hotkey={hotkey!r})"

    @property
    def network(self) -> str:
        return self._network

    @property
    def endpoint(self) -> str:
        """The main endpoint's URL."""
        return self._endpoint

    @property
    def hotkey(self) -> str | None:
        """The SS58 address this port acts as (None: read-only)."""
        return None if self._signer is None else self._signer.ss58_address

    # --------------------------------------------------------------------------------------------
    # Connection and error mapping

    async def _connected(self) -> bt.Client:
        if self._closed:
            raise ChainUnavailable(f"chain {self._endpoint}: this port has been closed")
        async with self._lock:
            if self._client is None:
                client = bt.Client(
                    self._network, fallback_endpoints=self._fallbacks, substrate=self._substrate
                )
                try:
                    await client.connect()
                except BaseException:
                    await self._close_quietly(client)
                    raise
                self._client = client
            return self._client

    @staticmethod
    async def _close_quietly(client: bt.Client) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                await client.close()

    async def _drop(self, client: bt.Client | None) -> None:
        """Forget a connection in doubt, so that the next call opens a fresh one."""
        if client is not None and self._client is client:
            self._client = None
            await self._close_quietly(client)

    async def _call(
        self,
        what: str,
        operation: Callable[[bt.Client], Awaitable[T]],
        *,
        timeout_s: float | None = None,
        rate_limit_wait: Callable[[], Awaitable[int]] | None = None,
    ) -> T:
        """Run ``operation`` on the connection under the timeout, with SDK errors mapped."""
        bound = self._timeout_s if timeout_s is None else timeout_s
        client: bt.Client | None = None
        # Connecting downloads the runtime metadata, so it gets the longer of the two bounds.
        limit = max(self._timeout_s, self._write_timeout_s)
        try:
            async with asyncio.timeout(limit):
                client = await self._connected()
            limit = bound
            async with asyncio.timeout(limit):
                result = await operation(client)
            self._timeouts = 0
            return result
        except ChainError:
            raise
        except TimeoutError:
            # One slow answer says little about the connection; a second one in a row replaces
            # it (a silently dead socket would otherwise be waited on forever).
            self._timeouts += 1
            if self._timeouts >= _TIMEOUTS_BEFORE_RECONNECT:
                self._timeouts = 0
                await self._drop(client)
            raise ChainUnavailable(
                f"{what}: {self._endpoint} did not answer within {limit:g} s"
            ) from None
        except bt.ChainError as exc:
            if exc.code is bt.ErrorCode.UNKNOWN and isinstance(exc.__cause__, Exception):
                # The SDK wraps a transport failure during submission this way.
                await self._drop(client)
                raise ChainUnavailable(f"{what}: {self._endpoint}: {exc.message}") from None
            raise await self._domain_error(what, exc, rate_limit_wait) from None
        except (bt.RpcConnectionError, bt.ConnectionNotReady, OSError) as exc:
            await self._drop(client)
            raise ChainUnavailable(f"{what}: cannot reach {self._endpoint}: {exc}") from None
        except bt.PolicyError as exc:
            raise ChainRejected("POLICY_VIOLATION", f"{what}: {exc}") from None
        except bt.BittensorError as exc:
            raise ChainRejected("INVALID_ARGUMENT", f"{what}: {exc}") from None
        except Exception as exc:
            log.debug("unexpected error from the bittensor SDK during %s", what, exc_info=True)
            await self._drop(client)
            raise ChainUnavailable(
                f"{what}: unexpected error from the bittensor SDK talking to {self._endpoint}: "
                f"{type(exc).__name__}: {exc}"
            ) from None

    async def _domain_error(
        self,
        what: str,
        exc: bt.ChainError,
        rate_limit_wait: Callable[[], Awaitable[int]] | None,
    ) -> ChainError:
        detail = str(exc.message or exc)
        if exc.name and exc.name not in detail:
            detail = f"{exc.name}: {detail}"
        code = exc.code
        if code is bt.ErrorCode.NOT_REGISTERED:
            return NotRegistered(f"{what}: {detail}")
        if code is bt.ErrorCode.RATE_LIMITED:
            match = _RETRY_IN.search(detail)
            if match:
                blocks = int(match.group(1))
            elif rate_limit_wait is not None:
                blocks = await self._best_effort(rate_limit_wait)
            else:
                blocks = 1
            return RateLimited(f"{what}: {detail}", blocks)
        hint = exc.remediation if code is not bt.ErrorCode.UNKNOWN else ""
        return ChainRejected(code.name, f"{what}: {detail}" + (f" (hint: {hint})" if hint else ""))

    async def _best_effort(self, wait: Callable[[], Awaitable[int]]) -> int:
        """Blocks to wait per chain state, or 1 when the chain cannot tell us in time."""
        try:
            async with asyncio.timeout(self._timeout_s):
                return max(1, await wait())
        except Exception:
            log.debug("could not compute the rate-limit wait", exc_info=True)
            return 1

    def _acting(self, action: str) -> ChainSigner:
        if self._signer is None:
            raise ChainRejected(
                "NOT_AUTHORIZED",
                f"cannot {action}: this port is read-only (no hotkey to sign with)",
            )
        return self._signer

    # --------------------------------------------------------------------------------------------
    # ChainPort: reads

    async def head_block(self) -> int:
        async def read(client: bt.Client) -> int:
            return int(await client.block())

        return await self._call("read the head block", read)

    async def block_time(self) -> float:
        async def read(client: bt.Client) -> float:
            return float(await client.block_time())

        return await self._call("read the block time", read)

    async def subnet(self, netuid: int) -> SubnetSnapshot:
        netuid = _check_netuid(netuid)

        async def read(client: bt.Client) -> tuple[int, Any, tuple[Any, ...]]:
            view = await client.at()  # every read below at this one block
            graph, *parameters = await asyncio.gather(
                view.subnets.metagraph(netuid, commitments=False),
                view.query(_WEIGHTS_SET_RATE_LIMIT, [netuid]),
                view.query(_MIN_ALLOWED_WEIGHTS, [netuid]),
                view.query(_MAX_WEIGHTS_LIMIT, [netuid]),
                view.query(_COMMIT_REVEAL_ENABLED, [netuid]),
            )
            return int(view.block), graph, tuple(parameters)

        block, graph, (rate_limit, min_weights, max_weight, commit_reveal) = await self._call(
            f"read subnet {netuid}", read
        )
        if graph is None:
            raise ChainRejected(
                "SUBNET_NOT_EXISTS", f"subnet {netuid} does not exist on {self._network}"
            )
        neurons = tuple(
            sorted(
                (
                    Neuron(
                        uid=int(n.uid),
                        hotkey=str(n.hotkey),
                        coldkey=str(n.coldkey),
                        stake_rao=max(0, _as_int(getattr(n.total_stake, "rao", 0))),
                        validator_permit=bool(n.validator_permit),
                        active=bool(n.active),
                        last_update=max(0, _as_int(n.last_update)),
                        endpoint=_endpoint_of(n.axon),
                    )
                    for n in graph.neurons
                ),
                key=lambda neuron: neuron.uid,
            )
        )
        max_weight_limit = _as_int(max_weight, U16_MAX)
        return SubnetSnapshot(
            netuid=netuid,
            block=block,
            tempo=max(1, _as_int(graph.tempo, 1)),
            weights_rate_limit=max(0, _as_int(rate_limit)),
            min_allowed_weights=max(0, _as_int(min_weights)),
            max_weight_limit=min(U16_MAX, max(1, max_weight_limit)),
            commit_reveal_enabled=bool(commit_reveal),
            max_uids=min(U16_MAX, max(1, _as_int(graph.max_uids, len(neurons) or 1))),
            neurons=neurons,
        )

    async def uid_of(self, netuid: int, hotkey: str) -> int | None:
        netuid = _check_netuid(netuid)
        hotkey = check_ss58("hotkey", hotkey)

        async def read(client: bt.Client) -> tuple[Any, Any]:
            exists, uid = await asyncio.gather(
                client.query(_NETWORKS_ADDED, [netuid]),
                client.neurons.uid(hotkey, netuid),
            )
            return exists, uid

        exists, uid = await self._call(f"look up {hotkey} on subnet {netuid}", read)
        if not exists:
            raise ChainRejected(
                "SUBNET_NOT_EXISTS", f"subnet {netuid} does not exist on {self._network}"
            )
        return None if uid is None else int(uid)

    async def weights(self, netuid: int) -> dict[int, dict[int, int]]:
        netuid = _check_netuid(netuid)

        async def read(client: bt.Client) -> tuple[Any, list[tuple[Any, Any]]]:
            exists, rows = await asyncio.gather(
                client.query(_NETWORKS_ADDED, [netuid]),
                client.query_map(_WEIGHTS, [netuid]),  # mechanism 0: index == netuid
            )
            return exists, rows

        exists, rows = await self._call(f"read the weights of subnet {netuid}", read)
        if not exists:
            raise ChainRejected(
                "SUBNET_NOT_EXISTS", f"subnet {netuid} does not exist on {self._network}"
            )
        visible: dict[int, dict[int, int]] = {}
        for validator_uid, row in rows:
            values = {int(uid): int(value) for uid, value in row or [] if int(value) > 0}
            if values:
                visible[int(validator_uid)] = dict(sorted(values.items()))
        return dict(sorted(visible.items()))

    # --------------------------------------------------------------------------------------------
    # ChainPort: writes

    async def _execute(
        self,
        what: str,
        intent: Any,
        signer: ChainSigner,
        rate_limit_wait: Callable[[], Awaitable[int]],
    ) -> tuple[Any, int]:
        """Submit ``intent`` and wait for inclusion; (the result, the block it landed in)."""

        submitting = False

        async def write(client: bt.Client) -> tuple[Any, int]:
            nonlocal submitting
            head = int(await client.block())
            submitting = True
            result = await client.execute(
                intent, signer, wait_for_inclusion=True, wait_for_finalization=False
            )
            if not result.success:
                raise result.error or bt.ChainError(result.message or "extrinsic failed")
            return result, _block_of(result, head)

        try:
            return await self._call(
                what, write, timeout_s=self._write_timeout_s, rate_limit_wait=rate_limit_wait
            )
        except ChainUnavailable as exc:
            if not submitting:
                raise
            raise ChainUnavailable(f"{exc} (if it was submitted, it may still land)") from None

    async def publish_endpoint(self, netuid: int, ip: str, port: int) -> TxOutcome:
        signer = self._acting("publish an endpoint")
        netuid = _check_netuid(netuid)
        canonical_ip = check_endpoint(ip, port)
        endpoint = Endpoint(ip=canonical_ip, port=port)

        async def serving_rate_limit() -> int:
            client = await self._connected()
            return _as_int(await client.query(_SERVING_RATE_LIMIT, [netuid]), 1)

        _, block = await self._execute(
            f"publish endpoint {endpoint} on subnet {netuid}",
            bt.ServeAxon(netuid=netuid, ip=canonical_ip, port=port),
            signer,
            serving_rate_limit,
        )
        return TxOutcome(
            block=block,
            path="serve",
            message=f"{signer.ss58_address} serves at {endpoint} on subnet {netuid}",
        )

    async def set_weights(
        self, netuid: int, weights: Mapping[int, float], *, version_key: int = 0
    ) -> TxOutcome:
        signer = self._acting("set weights")
        netuid = _check_netuid(netuid)
        wanted = _checked_weights(weights)
        version_key = check_version_key(version_key)

        async def weights_wait() -> int:
            client = await self._connected()
            head, uid, limit, last = await asyncio.gather(
                client.block(),
                client.neurons.uid(signer.ss58_address, netuid),
                client.query(_WEIGHTS_SET_RATE_LIMIT, [netuid]),
                client.query(_LAST_UPDATE, [netuid]),
            )
            if uid is None or not isinstance(last, list | tuple) or int(uid) >= len(last):
                return 1
            return _as_int(limit) - (int(head) - _as_int(last[int(uid)]))

        result, block = await self._execute(
            f"set {len(wanted)} weights on subnet {netuid}",
            bt.SetWeights(netuid=netuid, weights=wanted, version_key=version_key),
            signer,
            weights_wait,
        )
        reveal_round = (result.data or {}).get("reveal_round")
        if reveal_round is not None:
            return TxOutcome(
                block=block,
                path="timelocked",
                reveal_round=int(reveal_round),
                message=f"{len(wanted)} weights committed (commit-reveal v4), revealed by the "
                f"chain at drand round {int(reveal_round)}",
            )
        return TxOutcome(block=block, path="direct", message=f"{len(wanted)} weights set")

    async def close(self) -> None:
        """Close the connection; later calls raise :class:`ChainUnavailable`."""
        self._closed = True
        async with self._lock:
            client, self._client = self._client, None
        if client is not None:
            await self._close_quietly(client)
