"""byteleap-miner as a real process: start-up validation (config, secret, chain registration),
Type=notify contract, end-to-end challenge through the control socket, SIGTERM drain, registry
persisted across the restart, and a start with the chain unreachable."""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from byteleap.chain.devnet import DevnetChain
from byteleap.core.channel import CloseCode
from byteleap.core.identity import HotkeySigner
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


def _chain(home: Path, *, register: bool = True) -> DevnetChain:
    """The devnet chain file of the test, with //Alice (the miner) registered on netuid 128."""
    chain = DevnetChain.create(home / "chain.db")
    if register:
        chain.register(128, HotkeySigner.from_uri("//Alice").ss58_address)
    return chain


def _write_config(home: Path, port: int, secret: bytes = SECRET, level: str = "debug") -> Path:
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
        "chain:\n"
        "  network: devnet\n"
        f"  devnet_path: {home / 'chain.db'}\n"
        "  snapshot_refresh_s: 0.5\n"
        "logging:\n"
        f"  level: {level}\n"
    )
    return config


def _command(home: Path, config: Path) -> list[str]:
    return agent_command(
        "miner", config, "--hotkey-uri", "//Alice", "--control-socket", str(home / "control.sock")
    )


def _exits_2_with_one_line(home: Path, config: Path, expected: str) -> None:
    done = subprocess.run(
        _command(home, config), capture_output=True, text=True, timeout=START_TIMEOUT
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("byteleap-miner: error: ") and expected in lines[0], lines[0]
    assert not (home / "state").exists()


def test_config_and_secret_errors_exit_2_with_one_line(home: Path) -> None:
    _chain(home)
    config = _write_config(home, free_port())
    bad = home / "bad.yaml"
    bad.write_text("policy:\n  max_workers: 101\n")
    no_devnet_file = home / "no-devnet.yaml"
    no_devnet_file.write_text("chain:\n  network: devnet\n")
    for cfg, expected in ((bad, "max_workers"), (no_devnet_file, "needs devnet_path")):
        _exits_2_with_one_line(home, cfg, expected)
    (home / "enrollment.secret").chmod(0o644)
    _exits_2_with_one_line(home, config, "chmod 600")


def test_unregistered_hotkey_exits_2_with_one_line(home: Path) -> None:
    _chain(home, register=False)
    config = _write_config(home, free_port(), level="info")  # as an operator runs it
    _exits_2_with_one_line(home, config, "is not registered on netuid 128")


async def test_starts_with_the_chain_unreachable_and_says_so(home: Path) -> None:
    chain = _chain(home)
    chain.set_available(False)
    config = _write_config(home, free_port())
    with NotifyHarness(_command(home, config), env={"PYTHONUNBUFFERED": "1"}) as harness:
        await asyncio.to_thread(harness.wait_for, "READY=1", START_TIMEOUT)
        status = "0 workers online, 0/100 enrolled, 0/0 validators connected, chain unreachable"
        await asyncio.to_thread(harness.wait_for, f"STATUS={status}", WAIT)
        chain.set_available(True)
        status = "0 workers online, 0/100 enrolled, 0/0 validators connected"
        await asyncio.to_thread(harness.wait_for, f"STATUS={status}", WAIT, after=1)
        assert await asyncio.to_thread(harness.terminate) == 0
        output = harness.output()
        assert "chain unreachable at start-up" in output, output


async def test_daemon_serves_workers_and_drains_on_sigterm(
    home: Path, http: aiohttp.ClientSession
) -> None:
    _chain(home)
    port = free_port()
    config = _write_config(home, port)
    env = {"PYTHONUNBUFFERED": "1"}
    with NotifyHarness(_command(home, config), env=env, watchdog_sec=2) as harness:
        ready = await asyncio.to_thread(harness.wait_for, "READY=1", START_TIMEOUT)
        assert (
            ready.fields["STATUS"] == "0 workers online, 0/100 enrolled, 0/0 validators connected"
        )
        state = home / "state"
        assert (state.stat().st_mode & 0o777) == 0o700
        assert ((home / "control.sock").stat().st_mode & 0o777) == 0o660

        worker = FakeWorker()
        await worker.connect(http, f"ws://127.0.0.1:{port}/worker")
        serving = asyncio.create_task(worker.serve())
        beating = asyncio.create_task(worker.heartbeat(0.5))
        status = "1 worker online, 1/100 enrolled, 0/0 validators connected"
        await asyncio.to_thread(harness.wait_for, f"STATUS={status}", WAIT)

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
