"""`byteleapctl devnet up --gateway`: a renter's lease shows in the scores.

Real processes on loopback: a gateway, the validator reading its feed, two miners, two workers
with simulated GPUs on libvirt's test driver that enroll through their miner and the validator.
The simulated renter leases a GPU of worker-1 for part of the run; the validator credits the
signed lease time to exactly that worker, and its miner outranks the other one on chain.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from byteleap.chain.devnet import DevnetChain
from byteleap.core.identity import HotkeySigner, WorkerKey
from byteleap.devnet.network import NETUID, VALIDATOR_URI
from byteleap.gateway.store import open_store as open_gateway_store
from byteleap.validator.store import open_store
from byteleap.worker.gateway_enroll import GatewayEnrollment
from byteleap.worker.gateway_link import BOOK_FILE

pytestmark = pytest.mark.slow


async def _weights(root: Path) -> dict[int, int]:
    chain = DevnetChain(root / "chain.db")
    try:
        validator_uid = await chain.uid_of(
            NETUID, HotkeySigner.from_uri(VALIDATOR_URI).ss58_address
        )
        weights = await chain.weights(NETUID)
    finally:
        await chain.close()
    assert validator_uid is not None
    return weights[validator_uid]


def test_devnet_gateway_lease_is_scored(tmp_path: Path) -> None:
    root = tmp_path / "devnet"
    command = [
        str(Path(sys.executable).with_name("byteleapctl")),
        "devnet",
        "up",
        "--gateway",
        "--miners",
        "2",
        "--workers",
        "2",
        "--rounds",
        "3",
        "--dir",
        str(root),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "renter: leased a GPU of worker-1" in done.stdout
    assert "on worker-1" in done.stdout and "ended (expired)" in done.stdout

    leased = WorkerKey.load(root / "worker-1" / "worker.key").worker_id
    other = WorkerKey.load(root / "worker-2" / "worker.key").worker_id
    store = open_store(f"sqlite:///{root / 'validator' / 'validator.db'}")
    try:
        cycle = store.latest_cycle()
    finally:
        store.close()
    assert cycle is not None
    by_id = {w.worker_id: w for w in cycle.result.workers}
    assert by_id[leased].leased_seconds > 0 and by_id[leased].lease > 0
    assert by_id[other].leased_seconds == 0 and by_id[other].lease == 0
    miners = {m.miner_hotkey: m for m in cycle.result.miners}
    leased_miner = by_id[leased].miner_hotkey
    other_miner = by_id[other].miner_hotkey
    assert miners[leased_miner].score > miners[other_miner].score
    weights = asyncio.run(_weights(root))
    assert weights[cycle.uids[leased_miner]] > weights[cycle.uids[other_miner]]

    # Both workers enrolled through the relay (a certificate from the gateway's CA each).
    for name in ("worker-1", "worker-2"):
        key = WorkerKey.load(root / name / "worker.key")
        enrollment = GatewayEnrollment.load(root / name, worker_id=key.worker_id)
        assert enrollment is not None
    # The gateway signed a start and an end for the lease, for that worker and miner.
    gateway = open_gateway_store(f"sqlite:///{root / 'gateway' / 'gateway.db'}")
    try:
        entries = gateway.feed(0, 1000)
    finally:
        gateway.close()
    records = [msgspec.json.decode(e.signed.record) for e in entries]
    assert {(r["worker_id"], r["miner_hotkey"]) for r in records} == {(leased, leased_miner)}
    assert records[-1]["ended"] is True
    # The worker gave the GPU back: nothing left in its lease book.
    book = msgspec.json.decode((root / "worker-1" / BOOK_FILE).read_bytes())
    assert book["leases"] == {}
