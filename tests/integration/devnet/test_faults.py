"""The validator under faults, on a real devnet: SIGKILL mid-round, a PostgreSQL restart, a chain
outage. In every case rounds go on, every challenge ends in a terminal state, and no outcome is
counted twice: each worker's history holds exactly one entry per verified or failed challenge
(every devnet worker has one device, ``cpu-0``)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from byteleap.chain.devnet import DevnetChain
from byteleap.core.scoring import ScoringParams
from byteleap.devnet.network import Devnet, DevnetPlan
from byteleap.validator.store import ChallengeState, Store, open_store
from tests.support.postgres import postgres_url

pytestmark = pytest.mark.slow

# Long windows (many rounds) so the whole test stays inside the scoring window.
PLAN = DevnetPlan(miners=1, workers=3, rounds=200, round_interval_s=2, n=1024)
WAIT_S = 90.0


async def _until(check: Callable[[], bool], what: str, within: float = WAIT_S) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {within:g} s")
        await asyncio.sleep(0.005)


def _open(store: Store) -> set[bytes]:
    return {cid for cid, state in store.challenge_states().items() if not state.terminal}


def _cycles(store: Store) -> int:
    return store.status().cycles


def _assert_nothing_double_counted(devnet: Devnet) -> None:
    """After the devnet stopped: every challenge terminal, each counted exactly once."""
    store = open_store(devnet.store_url)
    try:
        _check_counts(store)
    finally:
        store.close()


def _check_counts(store: Store) -> None:
    states = store.challenge_states()
    assert all(state.terminal for state in states.values()), "a challenge was left open"
    finished = sum(
        1 for s in states.values() if s in (ChallengeState.VERIFIED, ChallengeState.FAILED)
    )
    inputs = store.scoring_inputs(time.time(), PLAN_PARAMS)
    counted = sum(w.successes + w.failures for w in inputs)
    assert counted == finished


PLAN_PARAMS = ScoringParams(**PLAN.scoring())


@pytest.fixture
async def devnet(tmp_path: Path) -> AsyncIterator[Devnet]:
    async with Devnet(PLAN, tmp_path / "devnet") as net:
        yield net


async def test_sigkill_mid_round_expires_open_challenges_and_counts_nothing_twice(
    devnet: Devnet,
) -> None:
    await devnet.start()
    store = devnet.store()
    for _attempt in range(5):
        await _until(lambda: bool(_open(store)), "a round in flight")
        await devnet.kill_validator()
        left_open = _open(store)
        if left_open:
            break
        await devnet.start_validator()  # the round finished between our look and the kill
    else:
        pytest.fail("could not catch the validator mid-round in 5 attempts")

    before = _cycles(store)
    await devnet.start_validator()
    await _until(lambda: not (left_open & _open(store)), "the restart expires what was open")
    await _until(lambda: _cycles(store) >= before + 2, "rounds after the restart")

    states = store.challenge_states()
    assert all(states[cid] is ChallengeState.EXPIRED for cid in left_open)
    await devnet.stop()  # SIGTERM: the round in flight is expired by the validator itself
    _assert_nothing_double_counted(devnet)


async def test_chain_outage_keeps_rounds_going_and_weights_land_after(devnet: Devnet) -> None:
    await devnet.start()
    store = devnet.store()
    chain = DevnetChain(devnet.chain_path)
    await _until(lambda: _submitted(store), "weights before the outage")

    chain.set_available(False)
    down_at = time.time()
    start = _cycles(store)
    try:
        await _until(lambda: _cycles(store) >= start + 3, "rounds scored during the outage")
        # a cycle's weights record follows the cycle itself by a moment: wait for it
        await _until(lambda: _latest_weights(store) == "unavailable", "a refused submission")
    finally:
        chain.set_available(True)
    up_at = time.time()
    await _until(lambda: _submitted(store, after=up_at), "weights once the chain is back")
    assert devnet.validator_pid is not None  # never restarted
    record = store.last_submitted_weights()
    assert record is not None and record.at >= up_at > down_at
    await devnet.stop()
    _assert_nothing_double_counted(devnet)


def _latest_weights(store: Store) -> str | None:
    cycle = store.latest_cycle()
    return None if cycle is None or cycle.weights is None else cycle.weights.status


def _submitted(store: Store, after: float = 0.0) -> bool:
    record = store.last_submitted_weights()
    return record is not None and record.at >= after


CLUSTERS = Path("/etc/postgresql")


def _restart_postgres() -> None:
    for version in sorted(p.name for p in CLUSTERS.iterdir()):
        subprocess.run(
            [
                "pg_ctlcluster",
                "--skip-systemctl-redirect",
                version,
                "main",
                "restart",
                "-m",
                "fast",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )


@pytest.mark.system
async def test_postgresql_restart_is_survived_and_loses_nothing(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if os.geteuid() != 0 or shutil.which("pg_ctlcluster") is None:
        pytest.skip("restarting PostgreSQL needs root and pg_ctlcluster (the local cluster)")
    if not CLUSTERS.is_dir():  # noqa: ASYNC240 - one stat before anything starts
        pytest.skip("no local PostgreSQL cluster to restart")
    url = postgres_url(request)
    async with Devnet(PLAN, tmp_path / "devnet", store_url=url) as devnet:
        await devnet.start()
        store = devnet.store()
        before = _cycles(store)
        await _until(lambda: _cycles(store) >= before + 1, "a scored round before the restart")
        pid = devnet.validator_pid
        await asyncio.to_thread(_restart_postgres)
        restarted = _cycles_when_reachable(store)
        await _until_async(store, restarted + 2)
        assert devnet.validator_pid == pid  # it survived, it was not restarted
        await devnet.stop()
        _assert_nothing_double_counted(devnet)


def _cycles_when_reachable(store: Store) -> int:
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            return _cycles(store)
        except Exception:  # the devnet's own connection is being re-established too
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


async def _until_async(store: Store, cycles: int) -> None:
    await _until(lambda: _cycles_when_reachable(store) >= cycles, "rounds after the restart")
