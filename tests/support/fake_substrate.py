"""An in-memory bittensor ``Substrate``: the chain behind a real ``bittensor.Client``, offline.

bittensor 11.3 lets a ``Client`` run on any implementation of its ``Substrate`` protocol
(``bt.Client(network, substrate=...)``; research/bittensor.md §4.3). This fake implements the
subset the SDK touches for what :class:`~byteleap.chain.bittensor.BittensorChain` does, so the
SDK's own code runs for real: metagraph decoding, ``SetWeights`` (rate-limit preflight, clip,
u16 quantisation, the commit-reveal v4 timelock encryption) and ``ServeAxon``.

It models one chain the way subtensor does, so writes change what later reads return:

* storage items by their chain names (``Uids``, ``LastUpdate``, ``Weights``, ...) and the
  ``SubnetInfoRuntimeApi.get_metagraph`` runtime call with the runtime's field names;
* extrinsics are checked like the pallet does and fail with the pallet's error *names*
  (``NeuronNoValidatorPermit``, ``UidVecContainInvalidOne``, ``SettingWeightsTooFast``,
  ``HotKeyNotRegisteredInNetwork``, ...), which the SDK classifies into ``ErrorCode``s;
* timelocked commits are kept pending (never revealed: there is no drand here);
* :attr:`FakeSubstrate.available` False makes every call raise ``RpcConnectionError``, as an
  unreachable node does.

Both contract adapters are seeded from the same :class:`ChainFixture`
(:meth:`FakeSubstrate.from_fixture`). Storage and field names are the chain's and can change
with a runtime upgrade: a bittensor version bump must re-run the contract suite.
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import bittensor as bt

from tests.contract.chain_contract import ChainFixture

__all__ = ["FakeNeuron", "FakeSubnet", "FakeSubstrate", "Submission"]

U16_MAX = 65535
FEE_RAO = 1_000


@dataclass
class FakeNeuron:
    hotkey: str
    coldkey: str
    stake_rao: int = 0
    validator_permit: bool = False
    axon: tuple[int, int, int] | None = None
    """(ip as an integer, port, ip_type 4|6), as ``serve_axon`` stores it."""
    last_update: int = 0
    registered_at: int = 0


@dataclass
class FakeSubnet:
    netuid: int
    tempo: int = 20
    weights_rate_limit: int = 10
    min_allowed_weights: int = 1
    max_weight_limit: int = U16_MAX
    commit_reveal: bool = False
    max_uids: int = 256
    reveal_period_epochs: int = 1
    neurons: list[FakeNeuron] = field(default_factory=list)
    weights: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    """validator uid -> [(uid, u16)], what ``Weights`` holds."""
    commits: dict[int, list[tuple[int, bytes, int]]] = field(default_factory=dict)
    """validator uid -> [(block, ciphertext, reveal_round)]: pending timelocked commits."""

    def uid_of(self, hotkey: str) -> int | None:
        for uid, neuron in enumerate(self.neurons):
            if neuron.hotkey == hotkey:
                return uid
        return None


def _axon_of(ip: str, port: int) -> tuple[int, int, int]:
    address = ipaddress.ip_address(ip)
    return int(address), port, address.version


@dataclass(frozen=True)
class Submission:
    """One extrinsic as the SDK handed it to ``submit``."""

    module: str
    function: str
    params: dict[str, Any]
    signer: str
    wait_for_inclusion: bool
    wait_for_finalization: bool


class FakeSubstrate:
    """See the module docstring. ``head`` is the block every read and write happens at."""

    def __init__(self, *, head: int = 1000, block_time: float = 12.0) -> None:
        self.head = head
        self.seconds_per_block = block_time
        self.available = True
        self.subnets: dict[int, FakeSubnet] = {}
        self.token_symbols: dict[int, str] = {}
        self.connects = 0
        self.serving_rate_limit = 50
        self.submitted: list[Submission] = []
        self.fail_next: str | None = None
        """A pallet error name the next extrinsic fails with, whatever it is (chain-side checks
        the SDK does not preflight, or races with another submission)."""
        self.raise_next: BaseException | None = None
        """An exception the next ``submit`` raises (a transport failure mid-submission)."""

    @classmethod
    def from_fixture(cls, fixture: ChainFixture) -> FakeSubstrate:
        fake = cls(head=fixture.head_block)
        subnet = FakeSubnet(
            netuid=fixture.netuid,
            tempo=fixture.tempo,
            weights_rate_limit=fixture.weights_rate_limit,
            min_allowed_weights=fixture.min_allowed_weights,
            max_weight_limit=fixture.max_weight_limit,
            commit_reveal=fixture.commit_reveal,
            max_uids=fixture.max_uids,
        )
        for spec in fixture.neurons:
            subnet.neurons.append(
                FakeNeuron(
                    hotkey=spec.hotkey,
                    coldkey=spec.coldkey,
                    stake_rao=spec.stake_rao,
                    validator_permit=spec.validator_permit,
                    axon=None
                    if spec.endpoint is None
                    else _axon_of(spec.endpoint.ip, spec.endpoint.port),
                    last_update=spec.last_update,
                    registered_at=fixture.head_block,
                )
            )
        fake.subnets[subnet.netuid] = subnet
        return fake

    # --- plumbing ------------------------------------------------------------------------------

    def _up(self) -> None:
        if not self.available:
            raise bt.RpcConnectionError(
                "could not connect to any endpoint: [Errno 111] Connection refused (fake chain)"
            )

    def balance(self, rao: int, netuid: int = 0) -> bt.Balance:
        return bt.Balance(int(rao), netuid, self.token_symbols.get(netuid) if netuid else None)

    async def connect(self) -> None:
        self._up()
        self.connects += 1

    async def close(self) -> None:
        return None

    async def block_hash(self, block: int | None = None) -> str:
        self._up()
        return f"0x{self.head if block is None else block:064x}"

    async def block_number(self) -> int:
        self._up()
        return self.head

    async def finalized_block_number(self) -> int:
        self._up()
        return max(0, self.head - 2)

    async def block_time(self) -> float:
        self._up()
        return self.seconds_per_block

    async def blocks(self, *, finalized: bool = False) -> AsyncIterator[dict[str, Any]]:
        self._up()
        yield {"header": {"number": self.head, "parentHash": None}}

    # --- reads ---------------------------------------------------------------------------------

    async def query(
        self,
        module: str,
        storage_function: str,
        params: list[Any] | None = None,
        block_hash: str | None = None,
    ) -> Any:
        self._up()
        args = list(params or [])
        if module != "SubtensorModule":
            raise NotImplementedError(f"fake substrate has no storage {module}.{storage_function}")
        if storage_function == "NetworksAdded":
            return args[0] in self.subnets
        subnet = self.subnets.get(args[0]) if args else None
        if storage_function == "Uids":
            return None if subnet is None else subnet.uid_of(args[1])
        if subnet is None:
            return None  # what an absent map key decodes to
        by_name: dict[str, Any] = {
            "CommitRevealWeightsEnabled": subnet.commit_reveal,
            "WeightsSetRateLimit": subnet.weights_rate_limit,
            "MinAllowedWeights": subnet.min_allowed_weights,
            "MaxWeightsLimit": subnet.max_weight_limit,
            "MaxAllowedUids": subnet.max_uids,
            "SubnetEpochConsensus": "Yuma",
            "LastUpdate": [n.last_update for n in subnet.neurons],
            "ValidatorPermit": [n.validator_permit for n in subnet.neurons],
            "Tempo": subnet.tempo,
            "RevealPeriodEpochs": subnet.reveal_period_epochs,
            "LastEpochBlock": self.head - self.head % (subnet.tempo + 1),
            "PendingEpochAt": 0,
            "SubnetEpochIndex": self.head // (subnet.tempo + 1),
            "BlocksSinceLastStep": self.head % (subnet.tempo + 1),
            "ServingRateLimit": self.serving_rate_limit,
        }
        if storage_function not in by_name:
            raise NotImplementedError(f"fake substrate has no storage {module}.{storage_function}")
        return by_name[storage_function]

    async def query_map(
        self,
        module: str,
        storage_function: str,
        params: list[Any] | None = None,
        block_hash: str | None = None,
    ) -> list[tuple[Any, Any]]:
        self._up()
        args = list(params or [])
        if (module, storage_function) == ("SubtensorModule", "TokenSymbol"):
            return []
        if (module, storage_function) == ("SubtensorModule", "Weights"):
            subnet = self.subnets.get(args[0])
            if subnet is None:
                return []
            return [(uid, list(row)) for uid, row in sorted(subnet.weights.items())]
        if module == "Commitments":
            return []
        raise NotImplementedError(f"fake substrate has no map {module}.{storage_function}")

    async def runtime_call(
        self, api: str, method: str, params: list[Any], block_hash: str | None = None
    ) -> Any:
        self._up()
        if (api, method) != ("SubnetInfoRuntimeApi", "get_metagraph"):
            raise NotImplementedError(f"fake substrate has no runtime call {api}.{method}")
        subnet = self.subnets.get(params[0])
        return None if subnet is None else self._metagraph(subnet)

    def _metagraph(self, subnet: FakeSubnet) -> dict[str, Any]:
        neurons = subnet.neurons
        count = len(neurons)
        owner = neurons[0] if neurons else None
        return {
            "netuid": subnet.netuid,
            "name": list(b"byteleap"),
            "symbol": list("\u03b1".encode()),
            "block": self.head,
            "tempo": subnet.tempo,
            "last_step": self.head - self.head % (subnet.tempo + 1),
            "blocks_since_last_step": self.head % (subnet.tempo + 1),
            "owner_hotkey": owner.hotkey if owner else "",
            "owner_coldkey": owner.coldkey if owner else "",
            "network_registered_at": 0,
            "num_uids": count,
            "max_uids": subnet.max_uids,
            "hotkeys": [n.hotkey for n in neurons],
            "coldkeys": [n.coldkey for n in neurons],
            "identities": [None] * count,
            "axons": [
                {
                    "block": 0,
                    "version": 1,
                    "ip": n.axon[0] if n.axon else 0,
                    "port": n.axon[1] if n.axon else 0,
                    "ip_type": n.axon[2] if n.axon else 4,
                    "protocol": 4,
                    "placeholder1": 0,
                    "placeholder2": 0,
                }
                for n in neurons
            ],
            "active": [True] * count,
            "validator_permit": [n.validator_permit for n in neurons],
            "last_update": [n.last_update for n in neurons],
            "block_at_registration": [n.registered_at for n in neurons],
            "alpha_stake": [n.stake_rao for n in neurons],
            "tao_stake": [0] * count,
            "total_stake": [n.stake_rao for n in neurons],
            "emission": [0] * count,
            "rank": [0] * count,
            "trust": [0] * count,
            "consensus": [0] * count,
            "incentives": [0] * count,
            "dividends": [0] * count,
            "pruning_score": [0] * count,
        }

    # --- writes --------------------------------------------------------------------------------

    async def compose(self, call: Any) -> Any:
        self._up()
        return call

    async def estimate_fee(self, call: Any, keypair: Any) -> bt.Balance:
        self._up()
        return bt.Balance.from_rao(FEE_RAO)

    async def submit(
        self,
        call: Any,
        keypair: Any,
        *,
        nonce: int | None = None,
        period: int | None = None,
        wait_for_inclusion: bool = True,
        wait_for_finalization: bool = True,
    ) -> bt.ExtrinsicResult:
        self._up()
        module, function, params = call
        signer = str(keypair.ss58_address)
        self.submitted.append(
            Submission(
                module, function, dict(params), signer, wait_for_inclusion, wait_for_finalization
            )
        )
        if self.raise_next is not None:
            exc, self.raise_next = self.raise_next, None
            raise exc
        handlers = {
            "set_mechanism_weights": self._set_weights,
            "commit_timelocked_mechanism_weights": self._commit_weights,
            "serve_axon": self._serve_axon,
        }
        if module != "SubtensorModule" or function not in handlers:
            raise NotImplementedError(f"fake substrate cannot dispatch {module}.{function}")
        error, self.fail_next = self.fail_next or handlers[function](signer, params), None
        block_hash = await self.block_hash()
        extrinsic_id = f"{self.head}-0001"
        if error is not None:
            return bt.ExtrinsicResult(
                success=False,
                message=error,
                block_hash=block_hash,
                extrinsic_id=extrinsic_id,
                error=bt.ChainError(error, error),
            )
        return bt.ExtrinsicResult(
            success=True,
            message="Success",
            block_hash=block_hash,
            extrinsic_id=extrinsic_id,
            fee=bt.Balance.from_rao(FEE_RAO),
        )

    def _registered(self, signer: str, netuid: int) -> tuple[FakeSubnet, int] | str:
        subnet = self.subnets.get(netuid)
        if subnet is None:
            return "SubnetNotExists"
        uid = subnet.uid_of(signer)
        if uid is None:
            return "HotKeyNotRegisteredInSubNet"
        return subnet, uid

    def _weights_allowed(self, signer: str, params: dict[str, Any]) -> tuple[FakeSubnet, int] | str:
        found = self._registered(signer, int(params["netuid"]))
        if isinstance(found, str):
            return found
        subnet, uid = found
        if not subnet.neurons[uid].validator_permit:
            return "NeuronNoValidatorPermit"
        last = subnet.neurons[uid].last_update
        if subnet.weights_rate_limit and last and self.head - last < subnet.weights_rate_limit:
            return "SettingWeightsTooFast"
        return subnet, uid

    def _set_weights(self, signer: str, params: dict[str, Any]) -> str | None:
        found = self._weights_allowed(signer, params)
        if isinstance(found, str):
            return found
        subnet, uid = found
        if subnet.commit_reveal:
            return "CommitRevealEnabled"
        dests = [int(d) for d in params["dests"]]
        values = [int(v) for v in params["weights"]]
        if len(dests) != len(values):
            return "WeightVecNotEqualSize"
        if len(set(dests)) != len(dests):
            return "DuplicateUids"
        if any(not 0 <= d < len(subnet.neurons) for d in dests):
            return "UidVecContainInvalidOne"
        is_self_weight = dests == [uid]
        if not is_self_weight and len(dests) < subnet.min_allowed_weights:
            return "WeightVecLengthIsLow"
        total = sum(values)
        if not is_self_weight and total and max(values) * U16_MAX > subnet.max_weight_limit * total:
            return "MaxWeightExceeded"
        top = max(values) if values else 0
        # The pallet max-upscales what it stores.
        subnet.weights[uid] = [
            (d, round(v * U16_MAX / top) if top else 0) for d, v in zip(dests, values, strict=True)
        ]
        subnet.neurons[uid].last_update = self.head
        return None

    def _commit_weights(self, signer: str, params: dict[str, Any]) -> str | None:
        found = self._weights_allowed(signer, params)
        if isinstance(found, str):
            return found
        subnet, uid = found
        if not subnet.commit_reveal:
            return "CommitRevealDisabled"
        commit = bytes(params["commit"])
        subnet.commits.setdefault(uid, []).append((self.head, commit, int(params["reveal_round"])))
        subnet.neurons[uid].last_update = self.head
        return None

    def _serve_axon(self, signer: str, params: dict[str, Any]) -> str | None:
        subnet = self.subnets.get(int(params["netuid"]))
        uid = None if subnet is None else subnet.uid_of(signer)
        if subnet is None or uid is None:
            return "HotKeyNotRegisteredInNetwork"
        ip_type = int(params["ip_type"])
        if ip_type not in (4, 6):
            return "InvalidIpType"
        ip = int(params["ip"])
        try:
            address = ipaddress.IPv4Address(ip) if ip_type == 4 else ipaddress.IPv6Address(ip)
        except ValueError:
            return "InvalidIpAddress"
        if address.is_unspecified:
            return "InvalidIpAddress"
        port = int(params["port"])
        if port == 0:
            return "InvalidPort"
        subnet.neurons[uid].axon = (ip, port, ip_type)
        return None
