"""Scoring cycles and weight submission.

A scoring cycle reads one row per worker from the store (with the gateway-signed lease intervals of
that exact miner and worker, from the configured gateways), scores the network with the pure
functions of :mod:`byteleap.core.scoring`, keeps only miners registered in the current chain
snapshot (so a lease credits its miner only while it is registered), and stores every factor
(``byteleapctl scores`` explains any weight from that record).

Weights then go to the chain through the :class:`~byteleap.chain.port.ChainPort`. The chain may
refuse for a while (rate limit) or be unreachable; neither stops anything else: the
:class:`WeightSetter` keeps the newest cycle's weights pending and retries on its own schedule (the
rate limit's ``retry_in_blocks``, or a capped exponential backoff during an outage), so weights land
as soon as the chain takes them. A newer cycle replaces weights that were still pending.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass

from ..chain.port import (
    ChainError,
    ChainPort,
    ChainRejected,
    NotRegistered,
    RateLimited,
    SubnetSnapshot,
)
from ..core.backoff import Backoff
from ..core.scoring import NetworkScore, ScoringParams, score_network
from .store import Store, WeightsRecord

__all__ = ["PendingWeights", "WeightSetter", "run_cycle", "uid_weights"]

log = logging.getLogger("byteleap.validator.weights")


def uid_weights(result: NetworkScore, uids: Mapping[str, int]) -> dict[int, float]:
    """Miner hotkey weights -> uid weights (miners without a uid are dropped)."""
    return {uids[hk]: w for hk, w in result.weights.items() if hk in uids and w > 0.0}


def run_cycle(
    store: Store,
    snapshot: SubnetSnapshot,
    now: float,
    params: ScoringParams,
    *,
    lease_gateways: Collection[str] | None = None,
) -> tuple[int, NetworkScore, dict[str, int]]:
    """Score every worker of the miners registered in ``snapshot`` and record the cycle.

    ``lease_gateways``: the ids of the gateways whose leases count (None: every stored one).
    Synchronous (store I/O and scoring): run it in a thread. Returns (cycle id, result,
    hotkey -> uid of the miners that were scored).
    """
    registered = {n.hotkey: n.uid for n in snapshot.neurons}
    inputs = [
        w
        for w in store.scoring_inputs(now, params, lease_gateways=lease_gateways)
        if w.miner_hotkey in registered
    ]
    result = score_network(inputs, now=now, params=params)
    uids = {m.miner_hotkey: registered[m.miner_hotkey] for m in result.miners}
    cycle_id = store.record_cycle(result, block=snapshot.block, uids=uids)
    return cycle_id, result, uids


@dataclass(frozen=True, slots=True)
class PendingWeights:
    cycle_id: int
    weights: dict[int, float]
    """uid -> normalised weight."""


def _failure_status(exc: ChainError) -> str:
    """The stored status of a failed submission (other than a rate limit)."""
    if isinstance(exc, NotRegistered):
        return "not_registered"
    if isinstance(exc, ChainRejected):
        return "rejected"
    return "unavailable"  # ChainUnavailable, or an unknown domain error: transient


class WeightSetter:
    """Submits the newest pending weights, retrying until the chain takes them.

    ``record(cycle_id, record)`` persists each attempt's outcome (the agent passes the store,
    wrapped so it survives database restarts). ``on_submitted`` is told the block of each
    accepted submission (for the STATUS line).
    """

    def __init__(
        self,
        chain: ChainPort,
        netuid: int,
        *,
        record: Callable[[int, WeightsRecord], Awaitable[None]],
        version_key: int = 0,
        block_time_s: float = 12.0,
        retry_min_s: float = 2.0,
        retry_max_s: float = 300.0,
        clock: Callable[[], float] = time.time,
        on_submitted: Callable[[int], None] | None = None,
    ) -> None:
        self._chain = chain
        self._netuid = netuid
        self._record = record
        self._version_key = version_key
        self._block_time = block_time_s
        self._retry_min = retry_min_s
        self._backoff = Backoff(retry_min_s, retry_max_s)
        self._clock = clock
        self._on_submitted = on_submitted
        self._pending: PendingWeights | None = None
        self._wake = asyncio.Event()
        self.last_block: int | None = None
        self.last_error: str | None = None

    @property
    def pending(self) -> PendingWeights | None:
        return self._pending

    def submit(self, pending: PendingWeights) -> None:
        """Queue weights (replacing older pending ones) and try right away."""
        self._pending = pending
        self._backoff.reset()
        self._wake.set()

    async def run(self) -> None:
        """Forever: wait for pending weights, try, sleep as the outcome says."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            pending = self._pending
            if pending is None:
                continue
            delay = await self.attempt(pending)
            if delay is None or self._pending is not pending:
                continue
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()  # a newer cycle cuts the wait short
            except TimeoutError:
                self._wake.set()

    async def attempt(self, pending: PendingWeights) -> float | None:
        """One submission; returns the seconds to wait before retrying, or None when done."""
        now = self._clock()
        if not pending.weights:
            await self._persist(pending, WeightsRecord(at=now, status="skipped"))
            self._done(pending)
            return None
        try:
            outcome = await self._chain.set_weights(
                self._netuid, pending.weights, version_key=self._version_key
            )
        except RateLimited as exc:
            wait = max(self._retry_min, (exc.retry_in_blocks + 1) * self._block_time)
            await self._failed(pending, "rate_limited", str(exc))
            return wait
        except ChainError as exc:  # anything else, unknown errors included: back off and retry
            await self._failed(pending, _failure_status(exc), str(exc))
            return self._backoff.next_delay()
        record = WeightsRecord(
            at=self._clock(),
            status="submitted",
            block=outcome.block,
            path=outcome.path,
            message=outcome.message,
            weights=dict(pending.weights),
        )
        await self._persist(pending, record)
        if self.last_error is not None:
            log.info("weights accepted again after: %s", self.last_error)
        self.last_error = None
        self.last_block = outcome.block
        log.info(
            "weights of cycle %d set at block %d (%s, %d uids)",
            pending.cycle_id,
            outcome.block,
            outcome.path,
            len(pending.weights),
        )
        if self._on_submitted is not None:
            self._on_submitted(outcome.block)
        self._done(pending)
        return None

    def _done(self, pending: PendingWeights) -> None:
        if self._pending is pending:
            self._pending = None
        self._backoff.reset()

    async def _failed(self, pending: PendingWeights, status: str, message: str) -> None:
        if message != self.last_error:
            level = logging.INFO if status == "rate_limited" else logging.WARNING
            log.log(
                level, "weights of cycle %d not set (%s): %s", pending.cycle_id, status, message
            )
        self.last_error = message
        await self._persist(
            pending,
            WeightsRecord(
                at=self._clock(), status=status, message=message, weights=dict(pending.weights)
            ),
        )

    async def _persist(self, pending: PendingWeights, record: WeightsRecord) -> None:
        await self._record(pending.cycle_id, record)
