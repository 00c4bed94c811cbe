"""Real byteleap-miner and byteleap-worker processes on loopback, as systemd would run them.

Covers the issue's end-to-end contract: workers enroll and heartbeat, a CPU challenge runs end to
end (commit, reveal, verify with core's verifier) while the worker keeps its watchdog pings, a
kill -9 of the miner is survived (workers reconnect and resume within 15 s, with the default
reconnect settings), and a restarted worker keeps its worker_id.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from byteleap.chain.devnet import DevnetChain
from byteleap.core.identity import HotkeySigner
from tests.support.fixtures import agent_command, free_port, write_secret
from tests.support.notify_harness import NotifyHarness

pytestmark = pytest.mark.slow

SECRET = b"e2e-enrollment-secret-0123456789abcdef"
START = 60.0
RECONNECT_LIMIT_S = 15.0
WORKER_WATCHDOG_S = 1.0
MINER_WATCHDOG_S = 3.0
CHALLENGE_N = 5120  # ~3.7 s on 2 cores (4096: ~1.2 s): several worker watchdog periods


@pytest.fixture
def home() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="blwm-", dir="/tmp") as name:  # short socket paths
        yield Path(name)


def _miner(home: Path, port: int) -> list[str]:
    chain = home / "chain.db"
    if not chain.exists():  # the miner must be registered on the (devnet) chain to start
        DevnetChain.create(chain).register(128, HotkeySigner.from_uri("//Alice").ss58_address)
    config = home / "miner.yaml"
    config.write_text(
        f"state_dir: {home / 'miner'}\n"
        f"workers: {{host: 127.0.0.1, port: {port}}}\n"
        "policy:\n"
        f"  enrollment_secret_file: {write_secret(home / 'miner.secret', SECRET)}\n"
        "  heartbeat_interval_s: 1\n"
        "  heartbeat_timeout_s: 10\n"
        f"chain: {{network: devnet, devnet_path: {chain}}}\n"
    )
    return agent_command(
        "miner", config, "--hotkey-uri", "//Alice", "--control-socket", str(home / "control.sock")
    )


def _worker(home: Path, name: str, port: int) -> list[str]:
    config = home / f"{name}.yaml"
    config.write_text(
        f"state_dir: {home / name}\n"
        "miner:\n"
        f"  url: ws://127.0.0.1:{port}/worker\n"
        f"  enrollment_secret_file: {write_secret(home / (name + '.secret'), SECRET)}\n"
        "heartbeat_interval_s: 1\n"
        "challenge: {backend: numpy}\n"
        "gpu: {mode: host}\n"
    )  # the reconnect settings are the defaults: they must bring workers back within 15 s
    return agent_command("worker", config)


@pytest.fixture
async def control(home: Path) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.UnixConnector(path=str(home / "control.sock"))
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


async def _online(control: aiohttp.ClientSession) -> dict[str, dict[str, Any]]:
    try:
        async with control.get("http://miner/workers") as response:
            workers = await response.json()
    except aiohttp.ClientError:
        return {}
    return {w["worker_id"]: w for w in workers if w["online"] and w["connected"]}


async def _wait_online(control: aiohttp.ClientSession, count: int, within: float) -> set[str]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        online = await _online(control)
        if len(online) >= count:
            return set(online)
        await asyncio.sleep(0.1)
    raise AssertionError(f"fewer than {count} workers online after {within} s")


async def test_workers_and_miner_as_real_processes(
    home: Path, control: aiohttp.ClientSession
) -> None:
    port = free_port()
    env = {"PYTHONUNBUFFERED": "1"}
    with ExitStack() as stack:

        def worker(name: str) -> NotifyHarness:
            cmd = _worker(home, name, port)
            return stack.enter_context(NotifyHarness(cmd, env=env, watchdog_sec=WORKER_WATCHDOG_S))

        def miner_process() -> NotifyHarness:
            cmd = _miner(home, port)
            return stack.enter_context(NotifyHarness(cmd, env=env, watchdog_sec=MINER_WATCHDOG_S))

        miner = miner_process()
        await asyncio.to_thread(miner.wait_for, "READY=1", START)
        workers = [worker(n) for n in ("w1", "w2")]
        for w in workers:
            ready = await asyncio.to_thread(w.wait_for, "READY=1", START)
            assert ready.fields.get("STATUS", "").startswith("connected to miner"), ready.raw
        ids = await _wait_online(control, 2, START)

        # A CPU challenge end to end, verified by the miner's control endpoint with core.verify;
        # the worker's event loop keeps pinging the watchdog while numpy computes.
        first = sorted(ids)[0]
        await asyncio.sleep(1.5)  # a few pings before the challenge
        started = time.monotonic()
        body = {"worker_id": first, "device_uuid": "cpu-0", "n": CHALLENGE_N}
        async with control.post("http://miner/challenge", json=body) as response:
            assert response.status == 200, await response.text()
            result = await response.json()
        finished = time.monotonic()
        assert result["verdict"]["ok"] is True, result
        # Long enough that a blocked loop would have missed the watchdog.
        assert result["worker_elapsed_ms"] > 1000 * WORKER_WATCHDOG_S, result
        await asyncio.sleep(1.8)
        for harness, period in (
            (workers[0], WORKER_WATCHDOG_S),
            (workers[1], WORKER_WATCHDOG_S),
            (miner, MINER_WATCHDOG_S),
        ):
            window = period * 0.6
            pings = [
                t for t in harness.watchdog_times() if started - window <= t <= finished + window
            ]
            assert len(pings) >= 2, pings
            assert max(b - a for a, b in itertools.pairwise(pings)) < period, pings
        for harness in workers:
            assert "event loop was blocked" not in harness.output(), harness.output()

        # kill -9 the miner, start it again: both workers are back within 15 s.
        miner.send_signal(signal.SIGKILL)
        await asyncio.to_thread(miner.proc.wait, 10)
        killed_at = time.monotonic()
        miner2 = miner_process()
        await asyncio.to_thread(miner2.wait_for, "READY=1", START)
        back = await _wait_online(control, 2, RECONNECT_LIMIT_S)
        assert back == ids
        assert time.monotonic() - killed_at < RECONNECT_LIMIT_S

        # A restarted worker keeps its identity (and its enrollment).
        assert await asyncio.to_thread(workers[0].terminate) == 0
        assert workers[0].find("STOPPING=1")
        restarted = worker("w1")
        await asyncio.to_thread(restarted.wait_for, "READY=1", START)
        assert await _wait_online(control, 2, START) == ids
        async with control.get("http://miner/workers") as response:
            assert len(await response.json()) == 2  # no new enrollment

        for harness in (restarted, workers[1], miner2):
            assert await asyncio.to_thread(harness.terminate) == 0
            assert harness.find("STOPPING=1")
