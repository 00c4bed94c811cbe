"""The validator's store on the event loop: every call in a thread, transient failures retried.

:class:`~byteleap.validator.store.Store` is synchronous (psycopg and sqlite3 block).
:class:`AsyncStore` runs each call with :func:`asyncio.to_thread` and retries
:class:`StoreUnavailable` with a capped, jittered exponential backoff, for as long as it takes: a
PostgreSQL restart pauses the rounds and the scoring but loses nothing, because every store write
is idempotent (store.py) and is retried with the same arguments. An outage is logged once when it
starts and once when it ends, however many calls wait through it. Any other
:class:`StoreError` (bad schema, corrupt row) is not transient and propagates at once.

Cancellation (shutdown) stops the retrying at once: the waiting call raises
``CancelledError``. A call already running in its thread cannot be interrupted; it finishes there
and its result is dropped, which the idempotent writes make harmless.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from typing import ParamSpec, TypeVar

from ..core.lease import LeaseRecord
from ..core.logs import log_fields
from ..core.scoring import NetworkScore, ScoringParams, WorkerInput
from .store import (
    ChallengeState,
    CycleRecord,
    DeviceConflict,
    IssuedChallenge,
    RosterWorker,
    Store,
    StoreStatus,
    StoreUnavailable,
    VerifiedLease,
    WeightsRecord,
    WorkerRoundOutcome,
)

__all__ = ["DEFAULT_INITIAL_BACKOFF_S", "DEFAULT_MAX_BACKOFF_S", "AsyncStore"]

log = logging.getLogger(__name__)

DEFAULT_INITIAL_BACKOFF_S = 0.5
DEFAULT_MAX_BACKOFF_S = 30.0

P = ParamSpec("P")
T = TypeVar("T")


class AsyncStore:
    """Async facade over a :class:`Store`; one instance per process (it tracks outages)."""

    def __init__(
        self,
        store: Store,
        *,
        initial_backoff_s: float = DEFAULT_INITIAL_BACKOFF_S,
        max_backoff_s: float = DEFAULT_MAX_BACKOFF_S,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < initial_backoff_s <= max_backoff_s:
            raise ValueError("backoff needs 0 < initial_backoff_s <= max_backoff_s")
        self.store = store
        self._initial = initial_backoff_s
        self._max = max_backoff_s
        self._sleep = sleep
        self._clock = clock
        self._outage_since: float | None = None
        self._outage_error = ""

    @property
    def backend(self) -> str:
        return self.store.backend

    @property
    def available(self) -> bool:
        """False from the first failed call of an outage until a call succeeds again."""
        return self._outage_since is None

    @property
    def outage(self) -> str | None:
        """Why the store is unavailable (for STATUS), or None."""
        return None if self._outage_since is None else self._outage_error

    async def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` in a thread, retried while it raises StoreUnavailable."""
        delay = self._initial
        while True:
            try:
                result = await asyncio.to_thread(fn, *args, **kwargs)
            except StoreUnavailable as exc:
                self._failed(fn, exc)
                # Full jitter: many waiting calls must not hammer a database that just came back.
                await self._sleep(random.uniform(delay / 2, delay))  # noqa: S311 - not crypto
                delay = min(self._max, delay * 2)
                continue
            self._succeeded()
            return result

    def _failed(self, fn: Callable[..., object], exc: StoreUnavailable) -> None:
        if self._outage_since is not None:
            return
        self._outage_since = self._clock()
        self._outage_error = str(exc) or type(exc).__name__
        log.warning(
            "store unavailable, retrying until it is back: %s",
            self._outage_error,
            extra=log_fields(backend=self.store.backend, call=getattr(fn, "__name__", "?")),
        )

    def _succeeded(self) -> None:
        if self._outage_since is None:
            return
        lasted = self._clock() - self._outage_since
        self._outage_since = None
        self._outage_error = ""
        log.info(
            "store available again after %.1f s",
            lasted,
            extra=log_fields(backend=self.store.backend, outage_s=round(lasted, 3)),
        )

    # ---- the Store protocol, call by call ---------------------------------------------------

    async def close(self) -> None:
        await asyncio.to_thread(self.store.close)

    async def schema_version(self) -> int:
        return await self.call(self.store.schema_version)

    async def upgrade(self) -> list[int]:
        return await self.call(self.store.upgrade)

    async def check(self) -> None:
        await self.call(self.store.check)

    async def status(self) -> StoreStatus:
        return await self.call(self.store.status)

    async def sync_roster(
        self, miner_hotkey: str, uid: int | None, workers: Sequence[RosterWorker], now: float
    ) -> list[DeviceConflict]:
        return await self.call(self.store.sync_roster, miner_hotkey, uid, workers, now)

    async def excluded_devices(self) -> set[tuple[str, str, str]]:
        return await self.call(self.store.excluded_devices)

    async def mark_offline(self, miner_hotkey: str, now: float) -> None:
        await self.call(self.store.mark_offline, miner_hotkey, now)

    async def mark_present(self, workers: Iterable[tuple[str, str]], now: float) -> None:
        # Materialised: a generator would be consumed by the first attempt.
        await self.call(self.store.mark_present, list(workers), now)

    async def issue(self, challenges: Sequence[IssuedChallenge]) -> None:
        await self.call(self.store.issue, challenges)

    async def record_commit(
        self, challenge_id: bytes, merkle_root: bytes, committed_at: float
    ) -> None:
        await self.call(self.store.record_commit, challenge_id, merkle_root, committed_at)

    async def finish(self, outcome: WorkerRoundOutcome) -> bool:
        return await self.call(self.store.finish, outcome)

    async def sweep_unfinished(self, now: float, reason: str) -> int:
        return await self.call(self.store.sweep_unfinished, now, reason)

    async def challenge_states(self, round_id: int | None = None) -> dict[bytes, ChallengeState]:
        return await self.call(self.store.challenge_states, round_id)

    async def scoring_inputs(
        self,
        now: float,
        params: ScoringParams,
        *,
        lease_gateways: Collection[str] | None = None,
    ) -> list[WorkerInput]:
        return await self.call(
            self.store.scoring_inputs, now, params, lease_gateways=lease_gateways
        )

    async def lease_cursor(self, gateway_id: str) -> int:
        return await self.call(self.store.lease_cursor, gateway_id)

    async def record_lease_page(
        self, gateway_id: str, after: int, leases: Sequence[VerifiedLease], now: float
    ) -> int:
        return await self.call(self.store.record_lease_page, gateway_id, after, leases, now)

    async def active_leases(self, since: float) -> list[LeaseRecord]:
        return await self.call(self.store.active_leases, since)

    async def record_cycle(
        self, result: NetworkScore, *, block: int | None, uids: Mapping[str, int]
    ) -> int:
        return await self.call(self.store.record_cycle, result, block=block, uids=uids)

    async def record_weights(self, cycle_id: int, record: WeightsRecord) -> None:
        await self.call(self.store.record_weights, cycle_id, record)

    async def latest_cycle(self) -> CycleRecord | None:
        return await self.call(self.store.latest_cycle)

    async def cycle(self, cycle_id: int) -> CycleRecord | None:
        return await self.call(self.store.cycle, cycle_id)

    async def last_submitted_weights(self) -> WeightsRecord | None:
        return await self.call(self.store.last_submitted_weights)

    async def prune(
        self, now: float, *, keep_challenges_s: float, keep_cycles: int, history_window_s: float
    ) -> int:
        return await self.call(
            self.store.prune,
            now,
            keep_challenges_s=keep_challenges_s,
            keep_cycles=keep_cycles,
            history_window_s=history_window_s,
        )
