"""An in-process gateway on loopback, shared by the gateway's and the worker's integration tests.

:func:`running_gateway` starts the daemon's own :class:`~byteleap.gateway.agent.Gateway` (CA,
signing key, listener certificate, both TLS listeners, a store on SQLite unless ``url`` names
another) with one validator key and the given renters' keys, and an HTTPS client that trusts
only the gateway's CA. Background loops are not started: tests call
``gateway.leases.tick()`` and ``gateway.hub.check()`` themselves, so lease time only moves when
the :class:`Clock` is advanced.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from byteleap.core import wire
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

# A grant as the relay carries it (the relay tests never dial its URLs).
GRANT = wire.GatewayGrant(
    gateway_id="ab" * 16,
    token="ble_" + "A" * 43,
    expires_at=2_000_000_000.0,
    enroll_url="https://gw.example.org:8443/v1/enroll",
    ws_url="wss://gw.example.org:8444/v1/worker",
    ca_pem="-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
)

MINER = "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty"
SSH_KEY = (
    Ed25519PrivateKey.generate()
    .public_key()
    .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    .decode()
    + " renter@laptop"
)


class Clock:
    """Wall clock for leases, records and tokens; starts at ``now`` (default: the real time)
    and moves only on demand."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class RunningGateway:
    """A started gateway, its clock, its API keys and a client for its HTTPS API."""

    gateway: Gateway
    clock: Clock
    validator_key: str
    renters: dict[str, str]
    """renter name -> API key"""
    http: aiohttp.ClientSession

    @property
    def api(self) -> str:
        return self.gateway.config.api_url

    async def call(
        self, method: str, path: str, key: str | None, body: Any = None
    ) -> tuple[int, Any]:
        """``(status, decoded JSON body or None)`` of one API request (``key``: Bearer)."""
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        data = None if body is None else msgspec.json.encode(body)
        async with self.http.request(
            method, self.api + path, data=data, headers=headers
        ) as response:
            raw = await response.read()
            return response.status, msgspec.json.decode(raw) if raw else None

    async def enrollment_token(self, worker_id: str, miner: str = MINER) -> Any:
        """The validator's ``POST /v1/enrollment-tokens`` for ``worker_id`` (a JSON body)."""
        status, body = await self.call(
            "POST",
            "/v1/enrollment-tokens",
            self.validator_key,
            {"worker_id": worker_id, "miner_hotkey": miner},
        )
        assert status == 201, body
        return body


def make_csr(key: ec.EllipticCurvePrivateKey, common_name: str) -> tuple[str, bytes]:
    """A CSR for ``CN=common_name``: (PEM, DER)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return (
        csr.public_bytes(serialization.Encoding.PEM).decode(),
        csr.public_bytes(serialization.Encoding.DER),
    )


G = TypeVar("G", bound=RunningGateway)


@contextlib.asynccontextmanager
async def running_gateway(
    kind: type[G],
    state: Path,
    *,
    url: str | None = None,
    heartbeat_interval_s: float = 5.0,
    renters: tuple[str, ...] = ("alice",),
    leases: LeaseSettings | None = None,
) -> AsyncIterator[G]:
    """A gateway with its state in ``state``, as a ``kind`` (a :class:`RunningGateway`)."""
    url = f"sqlite:///{state / 'gateway.db'}" if url is None else url
    config = GatewayConfig(
        state_dir=str(state),
        public_names=["localhost", "127.0.0.1"],
        api=ApiListen(host="127.0.0.1", port=free_port()),
        workers=WorkerListen(
            host="127.0.0.1",
            port=free_port(),
            heartbeat_interval_s=heartbeat_interval_s,
            heartbeat_timeout_s=30,
            revocation_check_s=0.2,
        ),
        leases=leases or LeaseSettings(checkpoint_s=300, worker_grace_s=300, start_timeout_s=900),
        store=StoreSettings(url=url),
    )
    ca, signer = prepare_keys(config)
    store = open_store(url)
    clock = Clock()
    gateway = Gateway(config, store, ca, signer, clock=clock)
    await gateway.start()
    validator_key = new_secret(KEY_PREFIXES["validator"])
    store.add_api_key("validator", "val-1", secret_hash(validator_key), clock())
    keys = {name: new_secret(KEY_PREFIXES["renter"]) for name in renters}
    for name, key in keys.items():
        store.add_api_key("renter", name, secret_hash(key), clock())
    http = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=client_tls_context(ca.cert_pem))
    )
    try:
        yield kind(gateway, clock, validator_key, keys, http)
    finally:
        await http.close()
        await gateway.stop()
        store.close()
