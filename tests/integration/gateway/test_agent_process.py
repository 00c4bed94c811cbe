"""byteleap-gateway as a real process: exit 2 on bad config, keys or store; the Type=notify
contract (READY once both listeners serve, STATUS, WATCHDOG, STOPPING); key material on disk."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from byteleap.gateway.store import open_store
from tests.support.fixtures import WAIT, agent_command, free_port
from tests.support.notify_harness import NotifyHarness

START_TIMEOUT = 60.0


@pytest.fixture
def home() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="blg-", dir="/tmp") as name:
        yield Path(name)


def _config(home: Path, api: int, workers: int) -> Path:
    config = home / "gateway.yaml"
    config.write_text(
        f"state_dir: {home / 'state'}\n"
        "public_names: [localhost, 127.0.0.1]\n"
        f"api: {{host: 127.0.0.1, port: {api}}}\n"
        f"workers: {{host: 127.0.0.1, port: {workers}}}\n"
        f"store: {{url: 'sqlite:///{home / 'state' / 'gateway.db'}'}}\n"
    )
    return config


def _exits_2(config: Path, expected: str) -> None:
    done = subprocess.run(
        agent_command("gateway", config),
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith("byteleap-gateway: error: ") and expected in errors[0]


async def test_ready_status_watchdog_and_a_clean_stop(home: Path) -> None:
    api, workers = free_port(), free_port()
    with NotifyHarness(
        agent_command("gateway", _config(home, api, workers)),
        env={"PYTHONUNBUFFERED": "1"},
        watchdog_sec=2.0,
    ) as harness:
        ready = await asyncio.to_thread(harness.wait_for, "READY=1", START_TIMEOUT)
        assert ready.fields["STATUS"] == "0 workers connected, 0 GPUs idle, 0 leases running"
        await asyncio.to_thread(harness.wait_for, "WATCHDOG=1", WAIT)
        state = home / "state"
        for name in ("ca.key", "signing.key", "server.key", "gateway.db"):
            assert (state / name).stat().st_mode & 0o777 == 0o600, name
        context = ssl.create_default_context(cafile=str(state / "ca.crt"))
        async with aiohttp.ClientSession() as http:
            async with http.get(f"https://localhost:{api}/v1/gpus", ssl=context) as response:
                assert response.status == 401
                assert (await response.json())["error"] == "unauthorized"
            with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
                async with http.get(f"http://127.0.0.1:{api}/v1/gpus"):
                    pass  # no plaintext on the API port
        assert await asyncio.to_thread(harness.terminate) == 0
        assert harness.find("STOPPING=1")


def test_bad_config_keys_and_store_exit_2_with_one_line(home: Path) -> None:
    bad = home / "bad.yaml"
    bad.write_text("public_names: ['not a name']\n")
    _exits_2(bad, "public_names")

    config = _config(home, free_port(), free_port())
    state = home / "state"
    state.mkdir(mode=0o700)
    (state / "signing.key").write_bytes(b"not a key")
    (state / "signing.key").chmod(0o600)
    _exits_2(config, "signing key")

    (state / "signing.key").unlink()
    store = open_store(f"sqlite:///{state / 'gateway.db'}")
    try:
        store.upgrade()
        store.bind_gateway_id("0" * 32)  # written under another signing key
    finally:
        store.close()
    _exits_2(config, "belongs to gateway " + "0" * 32)
