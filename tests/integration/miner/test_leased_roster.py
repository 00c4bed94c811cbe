"""A GPU in a leased VM, from the worker's heartbeat to the validator's store and rounds.

Everything between the worker and the validator's store is real and on loopback: the
``MinerServer`` and its ``ValidatorUplinks`` (a devnet chain names the validator), the
validator's ``MinerHub`` with a ``RoundEngine`` on a SQLite store. The worker is conftest's
``FakeWorker``; its heartbeats name the leased GPU as a worker with a gateway lease does.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from byteleap.chain.devnet import DevnetChain
from byteleap.core import wire
from byteleap.core.identity import HotkeySigner
from byteleap.miner.uplink import (
    VALIDATOR_PATH,
    UplinkSettings,
    ValidatorUplinks,
    client_session,
    worker_roster,
)
from byteleap.validator.config import MinerListen, MinerPolicy, RoundSettings
from byteleap.validator.db import AsyncStore
from byteleap.validator.miners import MinerHub
from byteleap.validator.rounds import RoundEngine, RoundReport
from byteleap.validator.store_sqlite import SQLiteStore
from tests.support.fixtures import WAIT, eventually

from .conftest import FakeWorker, MakeMiner, Miner, alice

NETUID = 7
TAO = 10**9
N = 128


@dataclass
class Network:
    miner: Miner
    engine: RoundEngine
    store_path: Path
    http: aiohttp.ClientSession

    def leased_flags(self) -> dict[str, bool]:
        """What the validator's store says of each GPU it knows: leased or not."""
        with contextlib.closing(sqlite3.connect(self.store_path)) as db:
            rows = db.execute("SELECT uuid, leased FROM worker_devices").fetchall()
        return {uuid: bool(leased) for uuid, leased in rows}

    async def worker(self, *gpus: str) -> FakeWorker:
        worker = FakeWorker(gpus=gpus)
        await worker.connect(self.http, self.miner.url)
        asyncio.create_task(worker.serve())  # noqa: RUF006 - it ends when its channel closes
        return worker


@pytest.fixture
async def network(
    tmp_path: Path, make_miner: MakeMiner, http: aiohttp.ClientSession
) -> AsyncIterator[Network]:
    validator = HotkeySigner.from_uri("//Bob")
    chain = DevnetChain.create(tmp_path / "chain.db", netuid=NETUID)
    chain.register(NETUID, alice().ss58_address)
    chain.register(NETUID, validator.ss58_address, stake_rao=2000 * TAO, validator_permit=True)
    snapshot = await chain.as_hotkey(validator.ss58_address).subnet(NETUID)

    store = SQLiteStore(tmp_path / "validator.db")
    store.upgrade()
    hub = MinerHub(
        MinerListen(path=VALIDATOR_PATH),
        MinerPolicy(handshake_timeout_s=WAIT),
        signer=validator,
        snapshot=lambda: snapshot,
        close_timeout_s=1.0,
    )
    engine = RoundEngine(AsyncStore(store), hub, RoundSettings(cpu_n=N, gpu_max_n=N))
    hub.listener = engine
    await hub.start(host="127.0.0.1", port=0)
    await chain.as_hotkey(validator.ss58_address).publish_endpoint(
        NETUID, "127.0.0.1", int(hub.addresses[0][1])
    )

    uplinks: list[ValidatorUplinks] = []
    # As the daemon wires it: a change of the miner's workers sends the roster again.
    miner = await make_miner(on_change=lambda: uplinks[0].roster_changed() if uplinks else None)
    async with client_session() as uplink_http:
        uplinks.append(
            ValidatorUplinks(
                chain=chain.as_hotkey(alice().ss58_address),
                signer=alice(),
                relay=miner.connections,
                roster=lambda: worker_roster(miner.registry, miner.connections),
                http=uplink_http,
                settings=UplinkSettings(
                    netuid=NETUID,
                    min_stake_rao=1000 * TAO,
                    snapshot_refresh_s=0.1,
                    reconnect_min_s=0.05,
                    reconnect_max_s=0.4,
                    roster_debounce_s=0.05,
                    roster_interval_s=60,  # only a change can bring a new roster in time
                    connect_timeout_s=WAIT,
                    close_timeout_s=1.0,
                ),
            )
        )
        uplinks[0].start()
        try:
            yield Network(miner, engine, tmp_path / "validator.db", http)
        finally:
            await uplinks[0].stop()
            await hub.stop()
            store.close()


def outcomes(report: RoundReport) -> dict[str, tuple[str, str]]:
    return {d.device_uuid: (d.state, d.reason) for d in report.devices()}


async def heartbeat(worker: FakeWorker, *leased: str) -> None:
    assert worker.channel is not None
    await worker.channel.send(
        wire.Heartbeat(uptime_s=1.0, load1=0.1, mem_used_bytes=1, leased_devices=list(leased))
    )


async def test_a_leased_gpu_is_marked_in_the_store_and_skipped_by_rounds(
    network: Network,
) -> None:
    worker = await network.worker("GPU-1", "GPU-2")
    await eventually(lambda: network.leased_flags() == {"GPU-1": False, "GPU-2": False})

    # A renter's VM holds GPU-2. The heartbeat also names what no inventory of this worker
    # lists (the CPU, another worker's GPU): the miner passes on only its own leased GPU.
    await heartbeat(worker, "GPU-2", wire.CPU_DEVICE, "GPU-of-someone-else")
    await eventually(lambda: network.leased_flags() == {"GPU-1": False, "GPU-2": True})
    report = await network.engine.run_round()
    assert outcomes(report) == {"GPU-1": ("verified", "ok"), "GPU-2": ("skipped", "leased")}
    challenged = [
        f.msg.device_uuid for f in worker.received if isinstance(f.msg, wire.ChallengeRequest)
    ]
    assert challenged == ["GPU-1"]

    # The lease ended: the next heartbeat lists nothing, and GPU-2 is challenged again.
    await heartbeat(worker)
    await eventually(lambda: network.leased_flags() == {"GPU-1": False, "GPU-2": False})
    report = await network.engine.run_round()
    assert outcomes(report) == {"GPU-1": ("verified", "ok"), "GPU-2": ("verified", "ok")}
