"""An in-process gateway on loopback: both TLS listeners, a real store, a clock tests move.

``gw`` starts the daemon's own :class:`~byteleap.gateway.agent.Gateway` (CA, signing key,
listener certificate, store on SQLite, or on PostgreSQL for tests parametrised with
``store_backend``), with one validator key and two renter keys. Background loops are not
started: tests call ``gw.gateway.leases.tick()`` and ``gw.gateway.hub.check()`` themselves, so
time only moves when ``gw.clock`` is advanced.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from byteleap.core import gateway_protocol as p
from byteleap.core.lease import FeedPage, verify_record
from byteleap.gateway.agent import Gateway, prepare_keys
from byteleap.gateway.ca import client_tls_context
from byteleap.gateway.config import (
    ApiListen,
    GatewayConfig,
    LeaseSettings,
    StoreSettings,
    WorkerListen,
)
from byteleap.gateway.keys import KEY_PREFIXES, new_secret, secret_hash
from byteleap.gateway.store import open_store
from tests.support.fixtures import free_port
from tests.support.postgres import postgres_url

from .worker_double import FakeWorker, WorkerConnection

MINER = "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty"
SSH_KEY = (
    Ed25519PrivateKey.generate()
    .public_key()
    .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    .decode()
    + " renter@laptop"
)


class Clock:
    """Wall clock for leases, records and tokens; starts at the real time, moves on demand."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Gw:
    gateway: Gateway
    clock: Clock
    home: Path
    validator_key: str
    renters: dict[str, str]
    http: aiohttp.ClientSession
    connections: list[WorkerConnection] = field(default_factory=list)

    @property
    def api(self) -> str:
        return self.gateway.config.api_url

    async def call(
        self, method: str, path: str, key: str | None, body: Any = None
    ) -> tuple[int, Any]:
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        data = None if body is None else msgspec.json.encode(body)
        async with self.http.request(
            method, self.api + path, data=data, headers=headers
        ) as response:
            raw = await response.read()
            return response.status, msgspec.json.decode(raw) if raw else None

    async def token(self, worker: FakeWorker, miner: str = MINER) -> p.TokenResponse:
        status, body = await self.call(
            "POST",
            "/v1/enrollment-tokens",
            self.validator_key,
            {"worker_id": worker.worker_id, "miner_hotkey": miner},
        )
        assert status == 201, body
        return msgspec.convert(body, p.TokenResponse)

    async def enroll(self, worker: FakeWorker) -> FakeWorker:
        token = await self.token(worker)
        status, body = await self.call(
            "POST", "/v1/enroll", token.token, worker.enroll_body(token.token)
        )
        assert status == 200, body
        worker.accept(msgspec.convert(body, p.EnrollResponse))
        return worker

    async def online(
        self, name: str = "w", gpus: list[p.GpuSlot] | None = None
    ) -> tuple[FakeWorker, WorkerConnection]:
        """An enrolled worker, connected and welcomed."""
        worker = await self.enroll(FakeWorker(self.home / name))
        conn = await worker.connect()
        self.connections.append(conn)
        await conn.hello(gpus=gpus)
        return worker, conn

    async def lease(
        self, renter: str = "alice", gpus: int = 1, duration_s: float = 3600, **extra: Any
    ) -> tuple[int, Any]:
        body = {"gpus": gpus, "ssh_public_key": SSH_KEY, "duration_s": duration_s, **extra}
        return await self.call("POST", "/v1/leases", self.renters[renter], body)

    async def feed(self, after: int = 0) -> FeedPage:
        status, body = await self.call("GET", f"/v1/lease-feed?after={after}", self.validator_key)
        assert status == 200, body
        return msgspec.convert(body, FeedPage)

    async def records(self) -> list[Any]:
        """Every record of the feed, verified with the gateway's public key."""
        signer = self.gateway.signer
        trusted = {signer.gateway_id: Ed25519PublicKey.from_public_bytes(signer.public_key)}
        page = await self.feed()
        return [verify_record(signed, trusted) for signed in page.records]


@pytest.fixture
def store_backend(request: pytest.FixtureRequest) -> str:
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
async def gw(
    tmp_path: Path, store_backend: str, request: pytest.FixtureRequest
) -> AsyncIterator[Gw]:
    state = tmp_path / "state"
    url = (
        f"sqlite:///{state / 'gateway.db'}" if store_backend == "sqlite" else postgres_url(request)
    )
    config = GatewayConfig(
        state_dir=str(state),
        public_names=["localhost", "127.0.0.1"],
        api=ApiListen(host="127.0.0.1", port=free_port()),
        workers=WorkerListen(
            host="127.0.0.1",
            port=free_port(),
            heartbeat_interval_s=5,
            heartbeat_timeout_s=30,
            revocation_check_s=0.2,
        ),
        leases=LeaseSettings(checkpoint_s=300, worker_grace_s=300, start_timeout_s=900),
        store=StoreSettings(url=url),
    )
    ca, signer = prepare_keys(config)
    store = open_store(url)
    clock = Clock()
    gateway = Gateway(config, store, ca, signer, clock=clock)
    await gateway.start()
    validator_key = new_secret(KEY_PREFIXES["validator"])
    store.add_api_key("validator", "val-1", secret_hash(validator_key), clock())
    renters = {}
    for name in ("alice", "bob"):
        renters[name] = new_secret(KEY_PREFIXES["renter"])
        store.add_api_key("renter", name, secret_hash(renters[name]), clock())
    http = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=client_tls_context(ca.cert_pem))
    )
    running = Gw(gateway, clock, tmp_path, validator_key, renters, http)
    try:
        yield running
    finally:
        for conn in running.connections:
            await conn.close()
        await http.close()
        await gateway.stop()
        store.close()
