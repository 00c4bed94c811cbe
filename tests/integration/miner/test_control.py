"""The control API on its Unix socket: peer credentials, workers list, end-to-end self-test."""

from __future__ import annotations

import asyncio
import os
import stat
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from byteleap.core.channel import CloseCode
from byteleap.miner.control import ControlServer, default_control_path
from byteleap.miner.uplink import ValidatorState, ValidatorStatus
from tests.support.fixtures import WAIT, eventually

from .conftest import FakeWorker, MakeMiner, Miner, alice

BOB = "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty"  # //Bob, a validator
VALIDATOR = ValidatorStatus(
    hotkey=BOB,
    uid=3,
    url="ws://127.0.0.1:9000/v1/miner",
    state=ValidatorState.CONNECTED,
    since=1700000000.0,
    sessions=2,
)


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to ~107 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="blm-", dir="/tmp") as name:
        yield Path(name)


Setup = Callable[..., Awaitable[tuple[Miner, ControlServer, aiohttp.ClientSession]]]


@pytest.fixture
async def setup(make_miner: MakeMiner, socket_dir: Path) -> AsyncIterator[Setup]:
    controls: list[ControlServer] = []
    sessions: list[aiohttp.ClientSession] = []

    async def start(
        allowed_uids: frozenset[int] | None = None,
    ) -> tuple[Miner, ControlServer, aiohttp.ClientSession]:
        miner = await make_miner()
        control = ControlServer(
            registry=miner.registry,
            connections=miner.connections,
            miner_hotkey=alice().ss58_address,
            path=socket_dir / "control.sock",
            allowed_uids=allowed_uids,
            status=miner.server.status_line,
            close_worker=miner.server.disconnect,
            validators=lambda: [VALIDATOR],
        )
        await control.start()
        controls.append(control)
        client = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(control.path)),
            timeout=aiohttp.ClientTimeout(total=60),
        )
        sessions.append(client)
        return miner, control, client

    yield start
    for client in sessions:
        await client.close()
    for control in controls:
        await control.stop()


async def _json(response: aiohttp.ClientResponse) -> Any:
    return await response.json()


def test_default_path_prefers_the_runtime_directory() -> None:
    env = {"RUNTIME_DIRECTORY": "/run/byteleap-miner:/run/other"}
    assert default_control_path("/var/lib/x", env) == Path("/run/byteleap-miner/control.sock")
    assert default_control_path("/var/lib/x", {}) == Path("/var/lib/x/control.sock")


async def test_socket_mode_status_and_workers(
    setup: Setup, http: aiohttp.ClientSession, socket_dir: Path
) -> None:
    miner, control, client = await setup()
    assert stat.S_IMODE(control.path.stat().st_mode) == 0o660

    async with client.get("http://miner/workers") as response:
        assert response.status == 200
        assert await response.json() == []

    worker = FakeWorker(gpus=("GPU-1111",))
    await worker.connect(http, miner.url)
    async with client.get("http://miner/workers") as response:
        (entry,) = await response.json()
    assert entry["worker_id"] == worker.worker_id
    assert entry["online"] is True and entry["connected"] is True
    assert entry["devices"] == ["GPU-1111", "cpu-0"]
    assert entry["inventory"]["gpus"][0]["uuid"] == "GPU-1111"

    async with client.get("http://miner/status") as response:
        status = await response.json()
    assert status["online"] == 1 and status["enrolled"] == 1
    assert status["status"].startswith("1 worker online")
    assert status["hotkey"] == alice().ss58_address
    (validator,) = status["validators"]
    assert validator["hotkey"] == BOB and validator["state"] == "connected"
    assert validator["uid"] == 3 and validator["sessions"] == 2 and validator["last_error"] is None

    await control.stop()
    assert not control.path.exists()


async def test_other_uids_are_refused(setup: Setup) -> None:
    _miner, _control, client = await setup(allowed_uids=frozenset({os.getuid() + 4242}))
    async with client.get("http://miner/workers") as response:
        assert response.status == 403
        assert (await response.json())["error"] == "FORBIDDEN"


async def test_self_test_challenge_end_to_end(setup: Setup, http: aiohttp.ClientSession) -> None:
    miner, _control, client = await setup()
    worker = FakeWorker()
    await worker.connect(http, miner.url)
    serving = asyncio.create_task(worker.serve())
    try:
        body = {"worker_id": worker.worker_id, "device_uuid": "cpu-0", "n": 256}
        async with client.post("http://miner/challenge", json=body) as response:
            assert response.status == 200, await response.text()
            result = await response.json()
        assert result["verdict"]["ok"] is True, result
        assert result["verdict"]["rows_checked"] == 16
        assert len(result["root"]) == 64
        assert result["timings"]["commit_s"] > 0
        assert len(result["rows"]) == 16
        # Counted in the registry, released on the worker.
        assert miner.outcomes == [(worker.worker_id, True)]
        record = miner.registry.get(worker.worker_id)
        assert record is not None
        assert (record.challenges_ok, record.challenges_failed) == (1, 0)
        await eventually(lambda: worker.runner is not None and worker.runner.held_results == 0)
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)


async def test_self_test_refusals_and_bad_requests(
    setup: Setup, http: aiohttp.ClientSession
) -> None:
    miner, _control, client = await setup()
    gate = threading.Event()
    worker = FakeWorker(gate=gate)
    await worker.connect(http, miner.url)
    serving = asyncio.create_task(worker.serve())
    try:
        body = {"worker_id": worker.worker_id, "device_uuid": "cpu-0", "n": 128}
        first = asyncio.create_task(client.post("http://miner/challenge", json=body))
        await eventually(lambda: bool(miner.connections.busy_devices(worker.worker_id)))
        async with client.post("http://miner/challenge", json=body) as response:
            assert response.status == 409
            error = await response.json()
        assert error["error"] == "DEVICE_BUSY" and error["code"] == 3001
        gate.set()
        async with await first as response:
            assert response.status == 200
            assert (await response.json())["verdict"]["ok"] is True

        unknown = {**body, "device_uuid": "GPU-none"}
        async with client.post("http://miner/challenge", json=unknown) as response:
            assert response.status == 404
            assert (await response.json())["error"] == "DEVICE_UNKNOWN"
        offline = {**body, "worker_id": "a" * 32}
        async with client.post("http://miner/challenge", json=offline) as response:
            assert response.status == 503
            assert (await response.json())["error"] == "WORKER_OFFLINE"
        for bad in ({**body, "n": 100}, {**body, "extra": 1}, {"worker_id": "x"}):
            async with client.post("http://miner/challenge", json=bad) as response:
                assert response.status == 400, bad
        async with client.post("http://miner/challenge", data=b"not json") as response:
            assert response.status == 400
    finally:
        gate.set()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)


async def test_removing_a_worker_unpins_and_disconnects_it(
    setup: Setup, http: aiohttp.ClientSession
) -> None:
    miner, _control, client = await setup()
    worker = FakeWorker()
    await worker.connect(http, miner.url)
    serving = asyncio.create_task(worker.serve())
    async with client.delete(f"http://miner/workers/{worker.worker_id}") as response:
        assert response.status == 200
    async with asyncio.timeout(WAIT):
        await serving
    assert worker.closed is not None and worker.closed.code == CloseCode.UNAUTHORIZED
    assert miner.registry.count() == 0
    assert worker.worker_id not in miner.connections
    async with client.delete(f"http://miner/workers/{worker.worker_id}") as response:
        assert response.status == 404
