"""A scripted worker for gateway tests: enrolls over HTTPS, speaks protocol.py over mTLS.

It does only what a test tells it to (send a Hello, answer a StartLease, report a lease), so a
test controls every step of the worker side; nothing here runs a VM.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from byteleap.core import gateway_protocol as p
from byteleap.core.identity import WorkerKey
from byteleap.gateway.ca import client_tls_context
from tests.support.gateway_fixtures import make_csr

M = TypeVar("M", bound=p.Message)

WAIT = 10.0
CAPACITY = p.Capacity(vcpus=64, memory_mib=512 * 1024, disk_gib=4096)


def gpu(index: int, state: p.GpuState = "idle", worker: int = 0) -> p.GpuSlot:
    return p.GpuSlot(
        uuid=f"GPU-{worker:04x}{index:04x}-0000-0000-0000-000000000000",
        pci_bus_id=f"0000:{0x41 + index:02x}:00.0",
        name="NVIDIA H100 80GB HBM3",
        mem_bytes=80 << 30,
        state=state,
    )


@dataclass
class FakeWorker:
    home: Path
    key: WorkerKey = field(default_factory=WorkerKey.generate)
    tls_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    cert_pem: str | None = None
    ca_pem: str | None = None
    ws_url: str | None = None

    @property
    def worker_id(self) -> str:
        return self.key.worker_id

    def enroll_body(
        self,
        token: str,
        *,
        common_name: str | None = None,
        proof_key: WorkerKey | None = None,
        worker_id: str | None = None,
    ) -> dict[str, Any]:
        csr_pem, csr_der = make_csr(self.tls_key, common_name or self.worker_id)
        signer = proof_key or self.key
        proof = signer.sign(p.enroll_proof_message(token, csr_der))
        return {
            "worker_id": worker_id or self.worker_id,
            "worker_public_key": base64.b64encode(self.key.public_key).decode(),
            "csr_pem": csr_pem,
            "proof": base64.b64encode(proof).decode(),
        }

    def accept(self, response: p.EnrollResponse) -> None:
        self.cert_pem = response.cert_pem
        self.ca_pem = response.ca_pem
        self.ws_url = response.ws_url
        self._write_files()

    def _write_files(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        assert self.cert_pem is not None
        (self.home / "worker.crt").write_text(self.cert_pem)
        key_path = self.home / "worker.key"
        key_path.write_bytes(
            self.tls_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_path.chmod(0o600)

    def tls(self) -> ssl.SSLContext:
        assert self.ca_pem is not None
        return client_tls_context(self.ca_pem, self.home / "worker.crt", self.home / "worker.key")

    async def connect(self, *, context: ssl.SSLContext | None = None) -> WorkerConnection:
        assert self.ws_url is not None
        session = aiohttp.ClientSession()
        try:
            ws = await session.ws_connect(
                self.ws_url, ssl=context or self.tls(), timeout=aiohttp.ClientWSTimeout(ws_close=2)
            )
        except BaseException:
            await session.close()
            raise
        return WorkerConnection(self, session, ws)


@dataclass
class WorkerConnection:
    worker: FakeWorker
    session: aiohttp.ClientSession
    ws: aiohttp.ClientWebSocketResponse
    welcome: p.Welcome | None = None
    received: list[p.Frame] = field(default_factory=list)

    async def send(self, message: p.Message, ref: int = 0) -> None:
        await self.ws.send_bytes(p.encode(p.Frame(id=ref, msg=message)))

    async def recv(self, within: float = WAIT) -> p.Frame:
        async with asyncio.timeout(within):
            while True:
                message = await self.ws.receive()
                if message.type == aiohttp.WSMsgType.BINARY:
                    frame = p.decode(p.DOWN, message.data)
                    self.received.append(frame)
                    if isinstance(frame.msg, p.Ping):
                        await self.send(p.Pong(nonce=frame.msg.nonce))
                        continue
                    return frame
                raise ConnectionError(f"{message.type.name}: {message.data} {message.extra}")

    async def expect(self, kind: type[M], within: float = WAIT) -> M:
        frame = await self.recv(within)
        assert isinstance(frame.msg, kind), f"expected {kind.__name__}, got {frame.msg!r}"
        return frame.msg

    async def hello(
        self,
        gpus: list[p.GpuSlot] | None = None,
        leases: list[p.LeaseHealth] | None = None,
        capacity: p.Capacity = CAPACITY,
        worker_id: str | None = None,
    ) -> p.Welcome:
        await self.send(
            p.Hello(
                worker_id=worker_id or self.worker.worker_id,
                agent_version="0.1.0",
                gpus=gpus if gpus is not None else [gpu(0), gpu(1)],
                capacity=capacity,
                leases=leases or [],
            )
        )
        self.welcome = await self.expect(p.Welcome)
        return self.welcome

    async def closed(self, within: float = WAIT) -> tuple[int | None, str]:
        """Wait for the gateway to close the socket: (close code, reason)."""
        async with asyncio.timeout(within):
            while True:
                message = await self.ws.receive()
                if message.type == aiohttp.WSMsgType.CLOSE:  # the code the gateway sent
                    return int(message.data), str(message.extra or "")
                if message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                    return self.ws.close_code, str(message.extra or "")
                if message.type == aiohttp.WSMsgType.BINARY:
                    self.received.append(p.decode(p.DOWN, message.data))

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        await self.session.close()


def decode_json(data: bytes, kind: type[M]) -> M:
    return msgspec.json.decode(data, type=kind)
