"""Signed lease records as a gateway writes them, and a gateway's CA, for the validator's
lease tests."""

from __future__ import annotations

import datetime
import ipaddress
import secrets
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from byteleap.core.lease import (
    LeaseRecord,
    SignedLeaseRecord,
    gateway_id_of,
    sign_record,
    verify_record,
)
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
    """A throw-away CA, as a gateway keeps one, issuing its server certificates."""

    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write_ca(self, path: Path) -> Path:
        path.write_bytes(self.cert_pem)
        return path

    def server_context(self, directory: Path, host: str = "127.0.0.1") -> ssl.SSLContext:
        """A server TLS context with a certificate for ``host`` (an IP address or a name)."""
        key = ec.generate_private_key(ec.SECP256R1())
        try:
            alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            alt = x509.DNSName(host)
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        directory.mkdir(parents=True, exist_ok=True)
        cert_path = directory / f"server-{secrets.token_hex(4)}.pem"
        key_path = cert_path.with_suffix(".key")
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
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
