"""An in-process gateway on loopback: both TLS listeners, a real store, a clock tests move.

``gw`` is :func:`tests.support.gateway_fixtures.running_gateway` (store on SQLite, or on
PostgreSQL for tests parametrised with ``store_backend``) with renters ``alice`` and ``bob``,
and :class:`Gw`'s helpers for enrolling and connecting fake workers, renting and reading the feed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from byteleap.core import gateway_protocol as p
from byteleap.core.lease import FeedPage, verify_record
from tests.support.gateway_fixtures import MINER, SSH_KEY, RunningGateway, running_gateway
from tests.support.postgres import postgres_url

from .worker_double import FakeWorker, WorkerConnection


@dataclass
class Gw(RunningGateway):
    connections: list[WorkerConnection] = field(default_factory=list)

    @property
    def home(self) -> Path:
        """The test's own directory (the gateway's state is ``home / "state"``)."""
        return Path(self.gateway.config.state_dir).parent

    async def token(self, worker: FakeWorker, miner: str = MINER) -> p.TokenResponse:
        return msgspec.convert(
            await self.enrollment_token(worker.worker_id, miner), p.TokenResponse
        )

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
    url = None if store_backend == "sqlite" else postgres_url(request)
    async with running_gateway(
        Gw, tmp_path / "state", url=url, renters=("alice", "bob")
    ) as running:
        try:
            yield running
        finally:
            for conn in running.connections:
                await conn.close()
