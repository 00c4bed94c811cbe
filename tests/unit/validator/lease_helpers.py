"""Signed lease records as a gateway writes them, and a gateway's CA, for the validator's
lease tests."""

from __future__ import annotations

import secrets
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from byteleap.core.lease import (
    LeaseRecord,
    SignedLeaseRecord,
    gateway_id_of,
    sign_record,
    verify_record,
)
from byteleap.gateway.ca import GatewayCA
from byteleap.validator.store import VerifiedLease

MINER_A = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"
MINER_B = "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty"
WORKER_1 = "1" * 32
WORKER_2 = "2" * 32


def lease_id() -> str:
    return secrets.token_hex(16)


class SigningGateway:
    """A gateway's signing key and feed: each :meth:`sign` takes the next sequence number."""

    def __init__(self, key: Ed25519PrivateKey | None = None) -> None:
        self.key = key or Ed25519PrivateKey.generate()
        self.gateway_id = gateway_id_of(self.key.public_key())
        self.feed: list[SignedLeaseRecord] = []

    @property
    def public_hex(self) -> str:
        return self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()

    def record(
        self,
        lease: str,
        *,
        seq: int,
        miner: str = MINER_A,
        worker: str = WORKER_1,
        devices: tuple[str, ...] = ("GPU-1",),
        start: float,
        active_until: float | None = None,
        ended: bool = False,
        issued_at: float | None = None,
    ) -> LeaseRecord:
        until = start if active_until is None else active_until
        return LeaseRecord(
            gateway_id=self.gateway_id,
            seq=seq,
            lease_id=lease,
            miner_hotkey=miner,
            worker_id=worker,
            device_uuids=list(devices),
            start=start,
            active_until=until,
            ended=ended,
            issued_at=until if issued_at is None else issued_at,
        )

    def sign(
        self,
        lease: str,
        *,
        miner: str = MINER_A,
        worker: str = WORKER_1,
        devices: tuple[str, ...] = ("GPU-1",),
        start: float,
        active_until: float | None = None,
        ended: bool = False,
    ) -> SignedLeaseRecord:
        """Append the next record of ``lease`` to the feed."""
        record = self.record(
            lease,
            seq=len(self.feed) + 1,
            miner=miner,
            worker=worker,
            devices=devices,
            start=start,
            active_until=active_until,
            ended=ended,
        )
        signed = sign_record(record, self.key)
        self.feed.append(signed)
        return signed

    def verified(self, signed: SignedLeaseRecord) -> VerifiedLease:
        return VerifiedLease(
            verify_record(signed, {self.gateway_id: self.key.public_key()}), signed
        )

    def page(self, first: int, last: int) -> list[VerifiedLease]:
        """Feed records ``first..last`` (1-based, inclusive), verified."""
        return [self.verified(s) for s in self.feed[first - 1 : last]]


class CertAuthority:
    """A throw-away gateway CA (the gateway's own :class:`GatewayCA`) issuing server
    certificates; ``name`` only labels it in failure output."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ca = GatewayCA.create()

    def __repr__(self) -> str:
        return f"CertAuthority({self.name!r}, fingerprint={self.ca.fingerprint!r})"

    @property
    def cert(self) -> x509.Certificate:
        return self.ca.certificate

    def write_ca(self, path: Path) -> Path:
        path.write_text(self.ca.cert_pem)
        return path

    def server_context(self, directory: Path, host: str = "127.0.0.1") -> ssl.SSLContext:
        """A server TLS context with a certificate for ``host`` (an IP address or a name)."""
        issued, key = self.ca.issue_server_cert([host], days=1)
        directory.mkdir(parents=True, exist_ok=True)
        cert_path = directory / f"server-{secrets.token_hex(4)}.pem"
        key_path = cert_path.with_suffix(".key")
        cert_path.write_text(issued.pem)
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert_path, key_path)
        return context
