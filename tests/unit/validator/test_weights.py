"""WeightSetter: the newest weights land once the chain takes them, whatever it said before."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest

from byteleap.chain.port import (
    ChainRejected,
    ChainUnavailable,
    NotRegistered,
    RateLimited,
    SubnetSnapshot,
    TxOutcome,
)
from byteleap.validator.store import WeightsRecord
from byteleap.validator.weights import PendingWeights, WeightSetter, uid_weights
from tests.support.fixtures import eventually


class ScriptedChain:
    """A chain whose set_weights answers from a script (exceptions raised, else accepted)."""

    def __init__(self, *answers: Exception | None) -> None:
        self.answers = list(answers)
        self.calls: list[dict[int, float]] = []
        self.block = 100
        self.down = False
        """While set, every call fails with ChainUnavailable (an outage of unknown length)."""

    async def set_weights(
        self, netuid: int, weights: Mapping[int, float], *, version_key: int = 0
    ) -> TxOutcome:
        self.calls.append(dict(weights))
        if self.down:
            raise ChainUnavailable("down")
        answer = self.answers.pop(0) if self.answers else None
        if answer is not None:
            raise answer
        self.block += 1
        return TxOutcome(block=self.block, path="direct")

    # the rest of the port is not used by the WeightSetter
    async def head_block(self) -> int:
        return self.block

    async def block_time(self) -> float:
        return 0.01

    async def subnet(self, netuid: int) -> SubnetSnapshot:
        raise NotImplementedError

    async def uid_of(self, netuid: int, hotkey: str) -> int | None:
        raise NotImplementedError

    async def publish_endpoint(self, netuid: int, ip: str, port: int) -> TxOutcome:
        raise NotImplementedError

    async def weights(self, netuid: int) -> dict[int, dict[int, int]]:
        return {}

    async def close(self) -> None:
        return None


def _setter(chain: ScriptedChain, records: list[tuple[int, WeightsRecord]]) -> WeightSetter:
    async def record(cycle_id: int, rec: WeightsRecord) -> None:
        records.append((cycle_id, rec))

    return WeightSetter(
        chain, 128, record=record, block_time_s=0.001, retry_min_s=0.01, retry_max_s=0.05
    )


async def test_accepted_weights_are_recorded_with_their_block() -> None:
    chain = ScriptedChain()
    records: list[tuple[int, WeightsRecord]] = []
    setter = _setter(chain, records)
    assert await setter.attempt(PendingWeights(7, {1: 0.25, 2: 0.75})) is None
    assert chain.calls == [{1: 0.25, 2: 0.75}]
    [(cycle_id, rec)] = records
    assert (cycle_id, rec.status, rec.block, rec.path) == (7, "submitted", 101, "direct")
    assert rec.weights == {1: 0.25, 2: 0.75}
    assert setter.last_block == 101


async def test_all_zero_scores_submit_nothing() -> None:
    chain = ScriptedChain()
    records: list[tuple[int, WeightsRecord]] = []
    assert await _setter(chain, records).attempt(PendingWeights(3, {})) is None
    assert chain.calls == []
    assert [r.status for _, r in records] == ["skipped"]


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (ChainUnavailable("connection refused"), "unavailable"),
        (NotRegistered("hotkey has no uid"), "not_registered"),
        (ChainRejected("NOT_AUTHORIZED", "no validator permit"), "rejected"),
    ],
)
async def test_refusals_are_recorded_and_retried_later(error: Exception, status: str) -> None:
    chain = ScriptedChain(error)
    records: list[tuple[int, WeightsRecord]] = []
    setter = _setter(chain, records)
    delay = await setter.attempt(PendingWeights(1, {4: 1.0}))
    assert delay is not None and 0 < delay <= 0.05
    assert records[-1][1].status == status
    assert str(error) in records[-1][1].message
    assert setter.pending is None  # attempt() alone does not queue; run() keeps its own


async def test_rate_limit_waits_the_blocks_the_chain_asks_for() -> None:
    chain = ScriptedChain(RateLimited("retry in ~40 blocks", retry_in_blocks=40))
    setter = WeightSetter(
        chain,
        128,
        record=lambda cycle_id, rec: asyncio.sleep(0),
        block_time_s=0.5,
        retry_min_s=1.0,
    )
    assert await setter.attempt(PendingWeights(1, {4: 1.0})) == pytest.approx(41 * 0.5)


async def test_outage_then_recovery_lands_the_newest_weights() -> None:
    chain = ScriptedChain()
    chain.down = True
    records: list[tuple[int, WeightsRecord]] = []
    setter = _setter(chain, records)
    task = asyncio.create_task(setter.run())
    try:
        setter.submit(PendingWeights(1, {1: 1.0}))
        await eventually(lambda: len(chain.calls) >= 2)  # refused, then retried
        setter.submit(PendingWeights(2, {2: 1.0}))  # a newer cycle replaces the pending one
        chain.down = False
        await eventually(lambda: any(r.status == "submitted" for _, r in records))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    submitted = [(cid, r) for cid, r in records if r.status == "submitted"]
    assert [(cid, r.weights) for cid, r in submitted] == [(2, {2: 1.0})]
    assert chain.calls[-1] == {2: 1.0}
    assert setter.pending is None


def test_uid_weights_drop_miners_without_uid_and_zero_weights() -> None:
    from byteleap.core.scoring import WorkerInput, score_network

    result = score_network(
        [
            WorkerInput(miner_hotkey="hkA", worker_id="a" * 32, availability=1.0, successes=40),
            WorkerInput(miner_hotkey="hkB", worker_id="b" * 32, availability=1.0, successes=40),
            WorkerInput(miner_hotkey="hkC", worker_id="c" * 32, availability=0.0),
        ],
        now=1_000_000.0,
    )
    assert uid_weights(result, {"hkA": 5, "hkC": 9}) == {5: pytest.approx(0.5)}
