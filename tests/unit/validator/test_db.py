"""AsyncStore: transient outages are waited out (logged once), real errors and shutdown are not."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import pytest

from byteleap.validator.db import AsyncStore
from byteleap.validator.store import StoreError, StoreUnavailable
from byteleap.validator.store_sqlite import SQLiteStore


class Flaky:
    """A store whose ``excluded_devices`` fails ``outage`` times, then answers."""

    backend = "fake"

    def __init__(self, outage: int, error: Exception | None = None) -> None:
        self.outage = outage
        self.error = error or StoreUnavailable("connection refused (database restarting)")
        self.calls = 0
        self.threads: set[int] = set()

    def excluded_devices(self) -> set[tuple[str, str, str]]:
        self.calls += 1
        self.threads.add(threading.get_ident())
        if self.calls <= self.outage:
            raise self.error
        return {("miner", "worker", "GPU-1")}


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)


async def test_an_outage_is_retried_with_capped_backoff_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    flaky, sleeps = Flaky(outage=12), Sleeps()
    store = AsyncStore(flaky, initial_backoff_s=0.5, max_backoff_s=4.0, sleep=sleeps)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="byteleap.validator.db"):
        assert await store.excluded_devices() == {("miner", "worker", "GPU-1")}
    assert flaky.calls == 13
    assert threading.get_ident() not in flaky.threads  # never on the event loop's thread
    assert len(sleeps.delays) == 12
    assert all(0 < d <= 4.0 for d in sleeps.delays)
    assert max(sleeps.delays) > 2.0  # it did back off
    messages = [r.getMessage() for r in caplog.records]
    assert [m for m in messages if "unavailable" in m] == [
        "store unavailable, retrying until it is back: connection refused (database restarting)"
    ]
    assert len([m for m in messages if "available again" in m]) == 1
    assert store.available and store.outage is None


async def test_outage_state_is_visible_while_it_lasts() -> None:
    flaky = Flaky(outage=10**9)
    blocked = asyncio.Event()

    async def sleep(delay: float) -> None:
        blocked.set()
        await asyncio.Event().wait()

    store = AsyncStore(flaky, sleep=sleep)  # type: ignore[arg-type]
    call = asyncio.create_task(store.excluded_devices())
    await asyncio.wait_for(blocked.wait(), 30)
    assert not store.available and "restarting" in (store.outage or "")
    call.cancel()  # shutdown: no more retries
    with pytest.raises(asyncio.CancelledError):
        await call
    calls = flaky.calls
    await asyncio.sleep(0)
    assert flaky.calls == calls


async def test_a_permanent_error_is_not_retried() -> None:
    flaky = Flaky(outage=1, error=StoreError("schema version 9 is newer than this code"))
    store = AsyncStore(flaky, sleep=Sleeps())  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="schema version 9"):
        await store.excluded_devices()
    assert flaky.calls == 1


def test_backoff_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="backoff"):
        AsyncStore(Flaky(0), initial_backoff_s=5, max_backoff_s=1)  # type: ignore[arg-type]


async def test_calls_reach_a_real_store(tmp_path: Path) -> None:
    sqlite = SQLiteStore(tmp_path / "v.db")
    store = AsyncStore(sqlite)
    try:
        await store.upgrade()
        await store.check()
        assert await store.sweep_unfinished(1.0, "test") == 0
        assert (await store.status()).challenges_total == 0
        await store.mark_present(iter([]), 1.0)  # a generator is materialised once
    finally:
        await store.close()
