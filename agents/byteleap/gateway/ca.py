"""The gateway's own certificate authority: worker certificates, the listeners' certificate, TLS.

* CA: an ECDSA P-256 key and a self-signed certificate valid 10 years, made on first start (or by
  ``byteleapctl gateway init``) in the state directory (``ca.key`` 0600, ``ca.crt``), unless the
  unit hands the key over as the systemd credential ``ca-key``. Validators and workers pin the
  CA by the SHA-256 fingerprint of its DER encoding (:attr:`GatewayCA.fingerprint`).
* Listeners: one server certificate (``server.crt``/``server.key``) issued by the CA for every
  ``public_names`` entry (DNS names and IP addresses), re-issued when the names change, when it
  is not from this CA, or when less than a third of its lifetime is left.
* Workers: a certificate per CSR, CN = worker_id, clientAuth only, ``worker_cert_days`` long,
  with a random 159-bit serial (stored by the caller, which enforces revocation).

TLS contexts accept TLS 1.2 and 1.3 only; the worker listener requires a client certificate that
chains to this CA.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import secrets
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..core.files import PrivateFileError, read_private_file, replace_private_file, write_new_file
from .config import CA_KEY_CREDENTIAL, key_path

__all__ = [
    "CA_CERT_FILE",
    "CA_DAYS",
    "CA_KEY_FILE",
    "SERVER_CERT_FILE",
    "SERVER_KEY_FILE",
    "CaError",
    "CsrError",
    "GatewayCA",
    "IssuedCert",
    "certificate_identity",
    "client_tls_context",
    "fingerprint",
    "load_ca",
    "load_csr",
    "load_or_create_ca",
]

CA_KEY_FILE: Final = "ca.key"
CA_CERT_FILE: Final = "ca.crt"
SERVER_CERT_FILE: Final = "server.crt"
SERVER_KEY_FILE: Final = "server.key"
CA_DAYS: Final = 3650
CLOCK_SKEW: Final = datetime.timedelta(minutes=5)
"""Certificates start this long before they are issued, so a peer a little behind accepts them."""
_MAX_PEM_BYTES: Final = 64 * 1024
_CSR_CURVES: Final = (ec.SECP256R1, ec.SECP384R1)


class CaError(Exception):
    """Key material is missing, unsafe, corrupt or inconsistent; the message names the file."""


class CsrError(ValueError):
    """A worker's CSR is refused; ``code`` is the API's stable error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class IssuedCert:
    certificate: x509.Certificate
    pem: str
    serial_hex: str
    not_before: float
    not_after: float


def fingerprint(certificate: x509.Certificate) -> str:
    """64 lowercase hex digits: SHA-256 of the certificate's DER encoding."""
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _serial_hex(serial: int) -> str:
    return format(serial, "x")


def _san(names: Sequence[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name.rstrip(".").lower()))
    return out


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """Signatures only; a CA also signs certificates and CRLs."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_csr(pem: str) -> x509.CertificateSigningRequest:
    """Parse a PEM CSR and check its self-signature (:class:`CsrError` ``csr_invalid``)."""
    try:
        csr = x509.load_pem_x509_csr(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError, UnsupportedAlgorithm):
        raise CsrError("csr_invalid", "csr_pem is not a PEM certificate signing request") from None
    try:
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm):
        valid = False
    if not valid:
        raise CsrError("csr_invalid", "the CSR's signature does not verify")
    return csr


def _check_csr(csr: x509.CertificateSigningRequest, worker_id: str) -> None:
    attributes = list(csr.subject)
    common_names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(attributes) != 1 or len(common_names) != 1 or common_names[0].value != worker_id:
        raise CsrError("csr_subject_mismatch", f"the CSR's subject must be exactly CN={worker_id}")
    try:
        key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise CsrError("csr_invalid", "the CSR's public key is not supported") from None
    if isinstance(key, ed25519.Ed25519PublicKey):
        return
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, _CSR_CURVES):
        return
    raise CsrError("csr_invalid", "the CSR's key must be ECDSA P-256/P-384 or Ed25519")


def certificate_identity(der: bytes) -> tuple[str, str, float]:
    """(CN, serial hex, not_after) of a peer certificate TLS already verified."""
    certificate = x509.load_der_x509_certificate(der)
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = str(names[0].value) if len(names) == 1 else ""
    return (
        common_name,
        _serial_hex(certificate.serial_number),
        certificate.not_valid_after_utc.timestamp(),
    )


class GatewayCA:
    """The CA key and certificate, and everything issued from them."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> None:
        self._key = key
        self.certificate = certificate
        self.cert_pem = certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")
        self.fingerprint = fingerprint(certificate)

    def __repr__(self) -> str:  # never show key material
        return f"GatewayCA(fingerprint={self.fingerprint!r})"

    @classmethod
    def create(cls, key: ec.EllipticCurvePrivateKey | None = None) -> GatewayCA:
        key = key if key is not None else ec.generate_private_key(ec.SECP256R1())
        now = _now()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ByteLeap gateway"),
                x509.NameAttribute(
                    NameOID.COMMON_NAME, f"ByteLeap gateway CA {secrets.token_hex(4)}"
                ),
            ]
        )
        public = key.public_key()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, certificate)

    def private_key_pem(self) -> bytes:
        return _private_pem(self._key)

    def _leaf(
        self,
        subject: x509.Name,
        public_key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey,
        days: int,
        now: datetime.datetime,
        eku: x509.ObjectIdentifier,
        san: list[x509.GeneralName] | None = None,
    ) -> IssuedCert:
        serial = x509.random_serial_number()
        now = now.replace(microsecond=0)  # X.509 keeps whole seconds: report what is signed
        not_before = now - CLOCK_SKEW
        not_after = min(now + datetime.timedelta(days=days), self.certificate.not_valid_after_utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if san is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        certificate = builder.sign(self._key, hashes.SHA256())
        return IssuedCert(
            certificate=certificate,
            pem=certificate.public_bytes(serialization.Encoding.PEM).decode("ascii"),
            serial_hex=_serial_hex(serial),
            not_before=not_before.timestamp(),
            not_after=not_after.timestamp(),
        )

    def issue_worker_cert(
        self, csr: x509.CertificateSigningRequest, worker_id: str, days: int
    ) -> IssuedCert:
        """A client certificate for ``worker_id`` from its (already parsed) CSR.

        Raises :class:`CsrError` when the subject is not exactly ``CN=worker_id`` or the key
        type is not accepted. Only the CSR's key is used: its requested extensions are ignored.
        """
        _check_csr(csr, worker_id)
        public = csr.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, worker_id)])
        return self._leaf(subject, public, days, _now(), ExtendedKeyUsageOID.CLIENT_AUTH)

    def issue_server_cert(
        self, names: Sequence[str], days: int
    ) -> tuple[IssuedCert, ec.EllipticCurvePrivateKey]:
        """A serverAuth certificate with every name as a SAN, and its fresh P-256 key."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
        issued = self._leaf(
            subject, key.public_key(), days, _now(), ExtendedKeyUsageOID.SERVER_AUTH, _san(names)
        )
        return issued, key

    def ensure_server_cert(self, state_dir: Path, names: Sequence[str], days: int) -> float:
        """Keep ``server.crt``/``server.key`` current (see the module docstring); returns the
        certificate's ``not_after``."""
        cert_path = state_dir / SERVER_CERT_FILE
        key_path = state_dir / SERVER_KEY_FILE
        current = self._current_server_cert(cert_path, key_path, names)
        if current is not None:
            return current
        issued, key = self.issue_server_cert(names, days)
        replace_private_file(key_path, _private_pem(key))
        replace_private_file(cert_path, issued.pem.encode("ascii"))
        return issued.not_after

    def _current_server_cert(
        self, cert_path: Path, key_path: Path, names: Sequence[str]
    ) -> float | None:
        try:
            certificate = x509.load_pem_x509_certificate(
                read_private_file(cert_path, _MAX_PEM_BYTES, what="server certificate")
            )
            key = serialization.load_pem_private_key(
                read_private_file(key_path, _MAX_PEM_BYTES, what="server key"), password=None
            )
        except (PrivateFileError, ValueError, TypeError, UnsupportedAlgorithm):
            return None  # missing or unreadable: issue a new one
        if certificate.issuer != self.certificate.subject:
            return None
        try:
            certificate.verify_directly_issued_by(self.certificate)
        except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
            return None
        public = certificate.public_key()
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
            public, ec.EllipticCurvePublicKey
        ):
            return None
        if key.public_key().public_numbers() != public.public_numbers():
            return None
        try:
            san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except x509.ExtensionNotFound:
            return None
        if set(san.value) != set(_san(names)):
            return None
        start = certificate.not_valid_before_utc
        end = certificate.not_valid_after_utc
        if _now() > end - (end - start) / 3:
            return None
        return end.timestamp()

    def server_context(self, state_dir: Path, *, require_client_cert: bool) -> ssl.SSLContext:
        """TLS 1.2+ server context with ``server.crt``; with ``require_client_cert`` the peer
        must present a certificate issued by this CA."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.reload_server_cert(context, state_dir)
        if require_client_cert:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cadata=self.cert_pem)
        return context

    @staticmethod
    def reload_server_cert(context: ssl.SSLContext, state_dir: Path) -> None:
        """Make new connections use the current ``server.crt`` (after a re-issue)."""
        context.load_cert_chain(state_dir / SERVER_CERT_FILE, state_dir / SERVER_KEY_FILE)


def client_tls_context(
    ca_pem: str, cert_file: Path | None = None, key_file: Path | None = None
) -> ssl.SSLContext:
    """What a gateway client uses: trusts only the gateway's CA, TLS 1.2+, optionally with a
    client certificate (workers)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca_pem)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        context.load_cert_chain(cert_file, key_file)
    return context


# ------------------------------------------------------------------------------------------------
# Loading and creating the CA


def _load_key(path: Path, what: str) -> ec.EllipticCurvePrivateKey:
    try:
        data = read_private_file(path, _MAX_PEM_BYTES, what=what)
    except PrivateFileError as exc:
        raise CaError(str(exc)) from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise CaError(f"{what} {path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CaError(f"{what} {path} is not an ECDSA P-256 key")
    return key


def _load_cert(path: Path) -> x509.Certificate:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CaError(f"cannot read CA certificate {path}: {exc.strerror or exc}") from None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise CaError(f"CA certificate {path} is not a PEM certificate") from None


def _key_path(state_dir: Path, environ: Mapping[str, str]) -> tuple[Path, bool]:
    """Where the CA key is, and whether it is a systemd credential (then never created)."""
    return key_path(state_dir, CA_KEY_CREDENTIAL, CA_KEY_FILE, environ)


def load_ca(state_dir: Path, environ: Mapping[str, str] | None = None) -> GatewayCA:
    """The existing CA (:class:`CaError` when it is missing or does not fit together)."""
    env = os.environ if environ is None else environ
    key_path, _ = _key_path(state_dir, env)
    key = _load_key(key_path, "CA key")
    certificate = _load_cert(state_dir / CA_CERT_FILE)
    if certificate.public_key() != key.public_key():
        raise CaError(
            f"CA certificate {state_dir / CA_CERT_FILE} does not belong to the CA key {key_path}"
        )
    basic = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    if not basic.ca:
        raise CaError(f"{state_dir / CA_CERT_FILE} is not a CA certificate")
    return GatewayCA(key, certificate)


def load_or_create_ca(
    state_dir: Path, environ: Mapping[str, str] | None = None
) -> tuple[GatewayCA, bool]:
    """The CA, created first when there is none; returns (ca, created).

    A key from the ``ca-key`` credential without a certificate gets a new self-signed one; a
    key file in ``state_dir`` is created (0600, never overwritten) only when absent.
    """
    env = os.environ if environ is None else environ
    key_path, from_credential = _key_path(state_dir, env)
    cert_path = state_dir / CA_CERT_FILE
    key_exists = key_path.exists() or key_path.is_symlink()
    if key_exists and (cert_path.exists() or cert_path.is_symlink()):
        return load_ca(state_dir, env), False
    if key_exists:
        ca = GatewayCA.create(_load_key(key_path, "CA key"))
    elif from_credential:  # pragma: no cover - _key_path only returns existing credentials
        raise CaError(f"CA key credential {key_path} does not exist")
    else:
        if cert_path.exists():
            raise CaError(
                f"{cert_path} exists but its key {key_path} does not: restore the key or "
                "remove the certificate to start a new CA (every worker must enroll again)"
            )
        ca = GatewayCA.create()
        if not write_new_file(key_path, ca.private_key_pem()):
            return load_ca(state_dir, env), False  # another process created it first
    if not write_new_file(cert_path, ca.cert_pem.encode("ascii")):
        return load_ca(state_dir, env), False
    return ca, True
