"""byteleap-miner as a real process: start-up validation, Type=notify contract, end-to-end
challenge through the control socket, SIGTERM drain, registry persisted across the restart."""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from byteleap.core.channel import CloseCode
from byteleap.miner.registry import WorkerRegistry
from tests.support.fixtures import WAIT, agent_command, free_port, write_secret
from tests.support.notify_harness import NotifyHarness

from .conftest import SECRET, FakeWorker

START_TIMEOUT = 60.0


@pytest.fixture
def home() -> Iterator[Path]:
    # Short path: the control socket lives here (AF_UNIX paths are limited to ~107 bytes).
    with tempfile.TemporaryDirectory(prefix="blm-", dir="/tmp") as name:
        yield Path(name)


def _write_config(home: Path, port: int, secret: bytes = SECRET) -> Path:
    secret_file = write_secret(home / "enrollment.secret", secret)
    config = home / "miner.yaml"
    config.write_text(
        f"state_dir: {home / 'state'}\n"
        "workers:\n"
        "  host: 127.0.0.1\n"
        f"  port: {port}\n"
        "policy:\n"
        f"  enrollment_secret_file: {secret_file}\n"
        "  heartbeat_interval_s: 1\n"
        "  heartbeat_timeout_s: 30\n"
        "logging:\n"
        "  level: debug\n"
    )
    return config


def _command(home: Path, config: Path) -> list[str]:
    return agent_command(
        "miner", config, "--hotkey-uri", "//Alice", "--control-socket", str(home / "control.sock")
    )


def test_config_and_secret_errors_exit_2_with_one_line(home: Path) -> None:
    config = _write_config(home, free_port())
    bad = home / "bad.yaml"
    bad.write_text("policy:\n  max_workers: 101\n")
    (home / "enrollment.secret").chmod(0o644)
    for cfg, expected in ((bad, "max_workers"), (config, "chmod 600")):
        done = subprocess.run(
            _command(home, cfg), capture_output=True, text=True, timeout=START_TIMEOUT
        )
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert lines[0].startswith("byteleap-miner: error: ") and expected in lines[0]
        assert not (home / "state").exists()


async def test_daemon_serves_workers_and_drains_on_sigterm(
    home: Path, http: aiohttp.ClientSession
) -> None:
    port = free_port()
    config = _write_config(home, port)
    env = {"PYTHONUNBUFFERED": "1"}
    with NotifyHarness(_command(home, config), env=env, watchdog_sec=2) as harness:
        ready = await asyncio.to_thread(harness.wait_for, "READY=1", START_TIMEOUT)
        assert ready.fields["STATUS"] == "0 workers online, 0/100 enrolled"
        state = home / "state"
        assert (state.stat().st_mode & 0o777) == 0o700
        assert ((home / "control.sock").stat().st_mode & 0o777) == 0o660

        worker = FakeWorker()
        await worker.connect(http, f"ws://127.0.0.1:{port}/worker")
        serving = asyncio.create_task(worker.serve())
        beating = asyncio.create_task(worker.heartbeat(0.5))
        await asyncio.to_thread(harness.wait_for, "STATUS=1 worker online, 1/100 enrolled", WAIT)

        connector = aiohttp.UnixConnector(path=str(home / "control.sock"))
        async with aiohttp.ClientSession(connector=connector) as control:
            async with control.get("http://miner/workers") as response:
                (entry,) = await response.json()
            assert entry["worker_id"] == worker.worker_id and entry["connected"] is True
            body = {"worker_id": worker.worker_id, "device_uuid": "cpu-0", "n": 256}
            async with control.post("http://miner/challenge", json=body) as response:
                assert response.status == 200, await response.text()
                result = await response.json()
            assert result["verdict"]["ok"] is True, result

        assert harness.find("WATCHDOG=1")
        assert await asyncio.to_thread(harness.terminate) == 0
        assert harness.find("STOPPING=1")
        async with asyncio.timeout(WAIT):
            await serving
        beating.cancel()
        await asyncio.gather(beating, return_exceptions=True)
        assert worker.closed is not None and worker.closed.code == CloseCode.GOING_AWAY
        output = harness.output()
        assert "worker online" in output and "miner stopped" in output, output
        assert SECRET.decode() not in output
        assert not (home / "control.sock").exists()

    # Nothing lost: the pinned key and counters survive; nobody is online after the stop.
    registry = WorkerRegistry(home / "state" / "workers.db")
    try:
        record = registry.get(worker.worker_id)
        assert record is not None
        assert not record.online and record.challenges_ok == 1
        assert record.public_key == worker.key.public_key
    finally:
        registry.close()
    assert (home / "state" / "workers.db").stat().st_size > 0
