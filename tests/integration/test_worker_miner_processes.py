"""Real byteleap-miner and byteleap-worker processes on loopback, as systemd would run them.

Covers the issue's end-to-end contract: workers enroll and heartbeat, a CPU challenge runs end to
end (commit, reveal, verify with core's verifier) while the worker keeps its watchdog pings, a
kill -9 of the miner is survived (workers reconnect and resume within 15 s), and a restarted worker
keeps its worker_id.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.notify_harness import NotifyHarness

pytestmark = pytest.mark.slow

SECRET = b"e2e-enrollment-secret-0123456789abcdef"
START = 60.0
RECONNECT_LIMIT_S = 15.0


@pytest.fixture
def home() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="blwm-", dir="/tmp") as name:  # short socket paths
        yield Path(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _secret(path: Path) -> Path:
    path.write_bytes(SECRET + b"\n")
    path.chmod(0o600)
    return path


def _miner(home: Path, port: int) -> list[str]:
    config = home / "miner.yaml"
    config.write_text(
        f"state_dir: {home / 'miner'}\n"
        f"workers: {{host: 127.0.0.1, port: {port}}}\n"
        "policy:\n"
        f"  enrollment_secret_file: {_secret(home / 'miner.secret')}\n"
        "  heartbeat_interval_s: 1\n"
        "  heartbeat_timeout_s: 10\n"
    )
    return [
        sys.executable, "-m", "byteleap.miner.agent", "--config", str(config),
        "--hotkey-uri", "//Alice", "--control-socket", str(home / "control.sock"),
    ]  # fmt: skip


def _worker(home: Path, name: str, port: int) -> list[str]:
    config = home / f"{name}.yaml"
    config.write_text(
        f"state_dir: {home / name}\n"
        "miner:\n"
        f"  url: ws://127.0.0.1:{port}/worker\n"
        f"  enrollment_secret_file: {_secret(home / (name + '.secret'))}\n"
        "  reconnect_initial_s: 0.2\n"
        "  reconnect_max_s: 2\n"
        "heartbeat_interval_s: 1\n"
        "challenge: {backend: numpy}\n"
        "gpu: {mode: host}\n"
    )
    return [sys.executable, "-m", "byteleap.worker.agent", "--config", str(config)]


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
    port = _free_port()
    env = {"PYTHONUNBUFFERED": "1"}
    with ExitStack() as stack:
        miner = stack.enter_context(NotifyHarness(_miner(home, port), env=env, watchdog_sec=3))
        await asyncio.to_thread(miner.wait_for, "READY=1", START)
        workers = [
            stack.enter_context(NotifyHarness(_worker(home, n, port), env=env, watchdog_sec=1))
            for n in ("w1", "w2")
        ]
        for w in workers:
            ready = await asyncio.to_thread(w.wait_for, "READY=1", START)
            assert "STATUS" in ready.fields
        ids = await _wait_online(control, 2, START)

        # A CPU challenge end to end, verified by the miner's control endpoint with core.verify;
        # the worker's event loop keeps pinging the watchdog while numpy computes.
        first = sorted(ids)[0]
        await asyncio.sleep(1.5)  # a few pings before the challenge
        started = time.monotonic()
        body = {"worker_id": first, "device_uuid": "cpu-0", "n": 4096}
        async with control.post("http://miner/challenge", json=body) as response:
            assert response.status == 200, await response.text()
            result = await response.json()
        finished = time.monotonic()
        assert result["verdict"]["ok"] is True, result
        await asyncio.sleep(1.8)
        for harness, period in ((workers[0], 1.0), (workers[1], 1.0), (miner, 3.0)):
            window = period * 0.6
            pings = [
                t for t in harness.watchdog_times() if started - window <= t <= finished + window
            ]
            assert len(pings) >= 2, pings
            assert max(b - a for a, b in itertools.pairwise(pings)) < period, pings

        # kill -9 the miner, start it again: both workers are back within 15 s.
        miner.send_signal(signal.SIGKILL)
        await asyncio.to_thread(miner.proc.wait, 10)
        killed_at = time.monotonic()
        miner2 = stack.enter_context(NotifyHarness(_miner(home, port), env=env, watchdog_sec=3))
        await asyncio.to_thread(miner2.wait_for, "READY=1", START)
        back = await _wait_online(control, 2, RECONNECT_LIMIT_S)
        assert back == ids
        assert time.monotonic() - killed_at < RECONNECT_LIMIT_S

        # A restarted worker keeps its identity (and its enrollment).
        assert await asyncio.to_thread(workers[0].terminate) == 0
        assert workers[0].find("STOPPING=1")
        restarted = stack.enter_context(
            NotifyHarness(_worker(home, "w1", port), env=env, watchdog_sec=1)
        )
        await asyncio.to_thread(restarted.wait_for, "READY=1", START)
        assert await _wait_online(control, 2, START) == ids
        async with control.get("http://miner/workers") as response:
            assert len(await response.json()) == 2  # no new enrollment

        for harness in (restarted, workers[1], miner2):
            assert await asyncio.to_thread(harness.terminate) == 0
            assert harness.find("STOPPING=1")
