"""SnapshotCache: the last good snapshot stays in force through an outage."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

import pytest

from byteleap.chain.port import ChainUnavailable, SubnetSnapshot, TxOutcome
from byteleap.chain.snapshot import SnapshotCache
from tests.support.fixtures import eventually


def _snapshot(block: int) -> SubnetSnapshot:
    return SubnetSnapshot(
        netuid=128,
        block=block,
        tempo=20,
        weights_rate_limit=4,
        min_allowed_weights=1,
        max_weight_limit=65535,
        commit_reveal_enabled=False,
        max_uids=256,
        neurons=(),
    )


class FlakyChain:
    def __init__(self) -> None:
        self.block = 0
        self.down = False

    async def subnet(self, netuid: int) -> SubnetSnapshot:
        if self.down:
            raise ChainUnavailable("connection refused")
        self.block += 1
        return _snapshot(self.block)

    async def head_block(self) -> int:
        return self.block

    async def block_time(self) -> float:
        return 0.25

    async def uid_of(self, netuid: int, hotkey: str) -> int | None:
        return None

    async def publish_endpoint(self, netuid: int, ip: str, port: int) -> TxOutcome:
        raise NotImplementedError

    async def set_weights(
        self, netuid: int, weights: Mapping[int, float], *, version_key: int = 0
    ) -> TxOutcome:
        raise NotImplementedError

    async def weights(self, netuid: int) -> dict[int, dict[int, int]]:
        return {}

    async def close(self) -> None:
        return None


async def test_outage_keeps_the_last_snapshot_and_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    chain = FlakyChain()
    seen: list[int] = []
    cache = SnapshotCache(
        chain,
        128,
        refresh_s=0.01,
        retry_min_s=0.01,
        retry_max_s=0.02,
        on_change=lambda s: seen.append(s.block),
    )
    task = asyncio.create_task(cache.run())
    try:
        assert (await cache.first()).block >= 1
        chain.down = True
        with caplog.at_level(logging.INFO, logger="byteleap.chain"):
            await eventually(lambda: cache.outage is not None)
            before = cache.current
            await asyncio.sleep(0.05)  # several failed refreshes
            assert cache.current is before  # still serving the last good one
            chain.down = False
            await eventually(lambda: cache.outage is None)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1  # one line per outage, not one per retry
        assert any("reachable again" in r.getMessage() for r in caplog.records)
        assert cache.current is not None and before is not None
        assert cache.current.block > before.block
        assert seen == sorted(seen)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_refresh_raises_while_down_and_before_any_snapshot() -> None:
    chain = FlakyChain()
    chain.down = True
    cache = SnapshotCache(chain, 128)
    with pytest.raises(ChainUnavailable):
        await cache.refresh()
    assert cache.current is None
