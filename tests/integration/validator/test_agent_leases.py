"""byteleap-validator as a real process with a gateway configured: the API key and CA are checked
at start-up (exit 2 with one line), the feed is read into the store, STATUS says from how many
gateways leases arrive, and SIGTERM stops the reader with everything else."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from byteleap.validator.store import open_store
from byteleap.validator.store_sql import SqlStore
from tests.integration.validator.test_agent_process import (
    START_TIMEOUT,
    _chain,
    _command,
    _config,
    _exits_2,
)
from tests.integration.validator.test_lease_feed import API_KEY, FakeGateway
from tests.support.fixtures import free_port, write_secret
from tests.support.notify_harness import NotifyHarness
from tests.unit.validator.lease_helpers import CertAuthority, SigningGateway, lease_id


@pytest.fixture
def home() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="blv-", dir="/tmp") as name:
        yield Path(name)


def gateway_section(home: Path, signer: SigningGateway, port: int, key_file: Path) -> str:
    return (
        "gateways:\n"
        "  - name: market\n"
        f"    url: https://127.0.0.1:{port}\n"
        f"    ca_file: {home / 'gateway-ca.pem'}\n"
        f"    api_key_file: {key_file}\n"
        f"    signing_public_key: {signer.public_hex}\n"
        "    poll_interval_s: 0.5\n"
    )


def test_a_bad_api_key_file_or_ca_file_exits_2_with_one_line(home: Path) -> None:
    _chain(home)
    signer = SigningGateway()
    CertAuthority("gateway CA").write_ca(home / "gateway-ca.pem")
    readable = home / "readable.key"
    readable.write_text(API_KEY)
    readable.chmod(0o644)
    config = _config(home, free_port(), gateway_section(home, signer, 8443, readable))
    _exits_2(config, "gateway market: gateway API key file")

    key = write_secret(home / "market.key", API_KEY.encode())
    (home / "gateway-ca.pem").write_text("not a certificate\n")
    config = _config(home, free_port(), gateway_section(home, signer, 8443, key))
    _exits_2(config, "gateway market: ca_file")


async def test_the_feed_is_read_into_the_store_and_shown_in_status(home: Path) -> None:
    _chain(home)
    ca = CertAuthority("gateway CA")
    ca.write_ca(home / "gateway-ca.pem")
    signer = SigningGateway()
    lease = lease_id()
    now = time.time()
    signer.sign(lease, start=now - 60)
    signer.sign(lease, start=now - 60, active_until=now)
    fake = FakeGateway(signer, ca, home / "server")
    await fake.start()
    key = write_secret(home / "market.key", API_KEY.encode())
    config = _config(home, free_port(), gateway_section(home, signer, fake.port, key))
    try:
        with NotifyHarness(_command(config), env={"PYTHONUNBUFFERED": "1"}) as harness:
            await asyncio.to_thread(harness.wait_for, "READY=1", START_TIMEOUT)
            ready = harness.find("READY")[0].fields["STATUS"]
            assert ready.startswith("0 miners, 0 workers online, round ")

            def leases_shown() -> bool:
                return any(s.endswith(", leases from 1/1 gateways") for s in harness.status_lines())

            deadline = time.monotonic() + START_TIMEOUT
            while not leases_shown():
                assert time.monotonic() < deadline, harness.output()
                await asyncio.sleep(0.1)
            assert await asyncio.to_thread(harness.terminate) == 0
            assert harness.find("STOPPING=1")
            assert API_KEY not in harness.output()
    finally:
        await fake.stop()
    assert fake.requests and fake.requests[0] == 0
    store = open_store(f"sqlite:///{home / 'state' / 'validator.db'}")
    try:
        assert isinstance(store, SqlStore)
        assert store.lease_cursor(signer.gateway_id) == 2
        (stored,) = store.leases(signer.gateway_id)
        assert (stored.record.lease_id, stored.record.seq) == (lease, 2)
    finally:
        store.close()
