"""byteleap-validator as a real process: start-up validation, the Type=notify contract (READY only
once it can serve, STATUS, WATCHDOG, STOPPING), waiting for an unreachable chain, publishing its
endpoint, and a restart that expires challenges a killed predecessor left open."""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from byteleap.chain.devnet import DevnetChain
from byteleap.core.identity import HotkeySigner
from byteleap.core.scoring import ScoringParams
from byteleap.validator.store import IssuedChallenge, RosterWorker, open_store
from tests.support.fixtures import WAIT, agent_command, free_port
from tests.support.notify_harness import NotifyHarness

START_TIMEOUT = 60.0
URI = "//Alice"


@pytest.fixture
def home() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="blv-", dir="/tmp") as name:
        yield Path(name)


def _chain(home: Path, *, register: bool = True, permit: bool = True) -> DevnetChain:
    chain = DevnetChain.create(home / "chain.db")
    if register:
        chain.register(
            128,
            HotkeySigner.from_uri(URI).ss58_address,
            stake_rao=10**12,
            validator_permit=permit,
        )
    return chain


def _config(home: Path, port: int, extra: str = "") -> Path:
    config = home / "validator.yaml"
    config.write_text(
        f"state_dir: {home / 'state'}\n"
        "listen:\n"
        "  host: 127.0.0.1\n"
        f"  port: {port}\n"
        "  public_ip: 127.0.0.1\n"
        "chain:\n"
        "  network: devnet\n"
        f"  devnet_path: {home / 'chain.db'}\n"
        "  snapshot_refresh_s: 0.5\n"
        f"store: {{url: 'sqlite:///{home / 'state' / 'validator.db'}'}}\n"
        "rounds: {interval_s: 2, cpu_n: 256}\n"
        "scoring: {challenge_interval_seconds: 2}\n" + extra
    )
    return config


def _command(config: Path) -> list[str]:
    return agent_command("validator", config, "--hotkey-uri", URI)


def _exits_2(config: Path, expected: str) -> None:
    done = subprocess.run(
        _command(config), capture_output=True, text=True, timeout=START_TIMEOUT, check=False
    )
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith("byteleap-validator: error: ") and expected in errors[0]


def test_bad_config_and_unregistered_hotkey_exit_2_with_one_line(home: Path) -> None:
    _chain(home, register=False)
    bad = home / "bad.yaml"
    bad.write_text("rounds: {interval_s: 240}\nscoring: {challenge_interval_seconds: 60}\n")
    _exits_2(bad, "challenge_interval_seconds")
    _exits_2(_config(home, free_port()), "is not registered on netuid 128")


async def test_ready_after_the_chain_answers_then_status_and_clean_stop(home: Path) -> None:
    chain = _chain(home)
    chain.set_available(False)  # start with the chain down: no READY until a snapshot arrives
    port = free_port()
    with NotifyHarness(
        _command(_config(home, port)), env={"PYTHONUNBUFFERED": "1"}, watchdog_sec=2.0
    ) as harness:
        waiting = await asyncio.to_thread(harness.wait_for, "STATUS", START_TIMEOUT)
        assert waiting.fields["STATUS"].startswith("waiting for the chain: "), waiting.raw
        assert not harness.find("READY")
        chain.set_available(True)
        await asyncio.to_thread(harness.wait_for, "READY=1", START_TIMEOUT)
        ready = harness.find("READY")[0]
        assert ready.fields["STATUS"].startswith("0 miners, 0 workers online, round "), ready.raw
        await asyncio.to_thread(harness.wait_for, "WATCHDOG=1", WAIT)
        snapshot = chain.snapshot_sync(128)  # the endpoint was published on chain
        me = snapshot.by_hotkey(HotkeySigner.from_uri(URI).ss58_address)
        assert me is not None and me.endpoint is not None
        assert (me.endpoint.ip, me.endpoint.port) == ("127.0.0.1", port)
        assert await asyncio.to_thread(harness.terminate) == 0
        assert harness.find("STOPPING=1")


async def test_restart_expires_what_a_killed_run_left_open(home: Path) -> None:
    _chain(home)
    (home / "state").mkdir(mode=0o700)
    store = open_store(f"sqlite:///{home / 'state' / 'validator.db'}")
    try:
        store.upgrade()
        miner, worker = "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty", "a" * 32
        store.sync_roster(miner, 1, [RosterWorker(worker_id=worker, online=True, devices=())], 0)
        left_open = IssuedChallenge(
            challenge_id=b"\x01" * 16,
            round_id=7,
            miner_hotkey=miner,
            worker_id=worker,
            device_uuid="cpu-0",
            n=256,
            precision="fp32",
            seed=b"\x02" * 32,
            issued_at=time.time(),
        )
        store.issue([left_open])
    finally:
        store.close()
    with NotifyHarness(
        _command(_config(home, free_port())), env={"PYTHONUNBUFFERED": "1"}
    ) as harness:
        await asyncio.to_thread(harness.wait_for, "READY=1", START_TIMEOUT)
        assert await asyncio.to_thread(harness.terminate) == 0
        assert "left open by the previous run" in harness.output()
    store = open_store(f"sqlite:///{home / 'state' / 'validator.db'}")
    try:
        assert store.challenge_states()[left_open.challenge_id].value == "expired"
        inputs = store.scoring_inputs(time.time(), ScoringParams(challenge_interval_seconds=2))
        assert all(w.successes == 0 and w.failures == 0 for w in inputs)  # not counted
    finally:
        store.close()
