"""The last known subnet snapshot, refreshed in the background; outages keep the old one.

Daemons never ask the chain on a request path: they read :attr:`SnapshotCache.current`, which a
background task refreshes every ``refresh_s``. While the chain is unreachable the last snapshot
stays in force (one warning when the outage starts, one info line when it ends) and refreshes are
retried with the agents' full-jitter exponential backoff (:class:`~byteleap.core.backoff.Backoff`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ..core.backoff import Backoff
from .port import ChainError, ChainPort, SubnetSnapshot

__all__ = ["SnapshotCache"]

log = logging.getLogger("byteleap.chain")


class SnapshotCache:
    def __init__(
        self,
        chain: ChainPort,
        netuid: int,
        *,
        refresh_s: float = 60.0,
        retry_min_s: float = 1.0,
        retry_max_s: float = 60.0,
        on_change: Callable[[SubnetSnapshot], None] | None = None,
    ) -> None:
        self._chain = chain
        self._netuid = netuid
        self._refresh_s = refresh_s
        self._retry_min = retry_min_s
        self._retry_max = max(retry_min_s, min(retry_max_s, refresh_s))
        self._on_change = on_change
        self._current: SubnetSnapshot | None = None
        self._outage: str | None = None
        self._have_one = asyncio.Event()

    @property
    def current(self) -> SubnetSnapshot | None:
        """The newest snapshot, or None before the first one arrived."""
        return self._current

    @property
    def outage(self) -> str | None:
        """Why the last refresh failed, while the chain is unreachable."""
        return self._outage

    async def refresh(self) -> SubnetSnapshot:
        """Fetch a snapshot now (raises :class:`ChainError`; the old one stays in force)."""
        try:
            snapshot = await self._chain.subnet(self._netuid)
        except ChainError as exc:
            if self._outage is None:
                log.warning(
                    "chain unreachable, working from the snapshot of block %s: %s",
                    "none" if self._current is None else self._current.block,
                    exc,
                )
            self._outage = str(exc)
            raise
        if self._outage is not None:
            log.info("chain reachable again (snapshot at block %d)", snapshot.block)
            self._outage = None
        self._current = snapshot
        self._have_one.set()
        if self._on_change is not None:
            self._on_change(snapshot)
        return snapshot

    async def first(self) -> SubnetSnapshot:
        """Wait until a snapshot is available (the background task retries meanwhile)."""
        await self._have_one.wait()
        assert self._current is not None
        return self._current

    async def run(self) -> None:
        """Refresh forever: every ``refresh_s`` when healthy, with backoff during an outage."""
        backoff = Backoff(self._retry_min, self._retry_max)
        while True:
            try:
                await self.refresh()
            except ChainError:
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            await asyncio.sleep(self._refresh_s)
