"""The gateway CA: key material on disk, what it issues, and TLS contexts."""

from __future__ import annotations

import ipaddress
import os
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from byteleap.gateway.ca import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    SERVER_CERT_FILE,
    CaError,
    CsrError,
    GatewayCA,
    load_ca,
    load_csr,
    load_or_create_ca,
)

WORKER = "a" * 32


def _csr(key: object, *names: tuple[x509.ObjectIdentifier, str]) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(oid, value) for oid, value in names])
    )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm)  # type: ignore[arg-type]


def test_the_ca_is_created_once_private_and_reloaded(tmp_path: Path) -> None:
    ca, created = load_or_create_ca(tmp_path, environ={})
    assert created
    assert (tmp_path / CA_KEY_FILE).stat().st_mode & 0o777 == 0o600
    again, created = load_or_create_ca(tmp_path, environ={})
    assert not created and again.fingerprint == ca.fingerprint
    cert = ca.certificate
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    years = (cert.not_valid_after_utc - cert.not_valid_before_utc).days / 365
    assert 9.9 < years < 10.1
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert len(ca.fingerprint) == 64 and "PRIVATE" not in repr(ca)


def test_a_lone_certificate_or_a_foreign_key_is_refused(tmp_path: Path) -> None:
    load_or_create_ca(tmp_path, environ={})
    (tmp_path / CA_KEY_FILE).unlink()
    with pytest.raises(CaError, match="exists but its key"):
        load_or_create_ca(tmp_path, environ={})
    other = GatewayCA.create()
    fd = os.open(tmp_path / CA_KEY_FILE, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, other.private_key_pem())
    os.close(fd)
    with pytest.raises(CaError, match="does not belong"):
        load_ca(tmp_path, environ={})
    (tmp_path / CA_KEY_FILE).chmod(0o644)
    with pytest.raises(CaError, match="mode 0644"):
        load_ca(tmp_path, environ={})


def test_a_credential_key_gets_its_certificate(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    key = GatewayCA.create()
    (creds / "ca-key").write_bytes(key.private_key_pem())
    (creds / "ca-key").chmod(0o600)
    state = tmp_path / "state"
    state.mkdir()
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    ca, created = load_or_create_ca(state, environ=env)
    assert created and not (state / CA_KEY_FILE).exists()
    assert ca.certificate.public_key() == key.certificate.public_key()
    assert load_ca(state, environ=env).fingerprint == ca.fingerprint


def test_worker_certificates_come_only_from_matching_csrs() -> None:
    ca = GatewayCA.create()
    for key in (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP384R1()),
        ed25519.Ed25519PrivateKey.generate(),
    ):
        issued = ca.issue_worker_cert(_csr(key, (NameOID.COMMON_NAME, WORKER)), WORKER, 30)
        cert = issued.certificate
        assert cert.subject.rfc4514_string() == f"CN={WORKER}"
        assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
            ExtendedKeyUsageOID.CLIENT_AUTH
        ]
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert issued.serial_hex == format(cert.serial_number, "x")
        cert.verify_directly_issued_by(ca.certificate)
    p256 = ec.generate_private_key(ec.SECP256R1())
    refused = [
        _csr(p256, (NameOID.COMMON_NAME, "b" * 32)),
        _csr(p256, (NameOID.COMMON_NAME, WORKER), (NameOID.ORGANIZATION_NAME, "x")),
        _csr(p256),
        _csr(
            rsa.generate_private_key(public_exponent=65537, key_size=2048),
            (NameOID.COMMON_NAME, WORKER),
        ),
        _csr(ec.generate_private_key(ec.SECP521R1()), (NameOID.COMMON_NAME, WORKER)),
    ]
    codes = []
    for csr in refused:
        with pytest.raises(CsrError) as error:
            ca.issue_worker_cert(csr, WORKER, 30)
        codes.append(error.value.code)
    assert codes == ["csr_subject_mismatch"] * 3 + ["csr_invalid"] * 2


def test_load_csr_checks_the_pem_and_the_self_signature() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    good = _csr(key, (NameOID.COMMON_NAME, WORKER)).public_bytes(serialization.Encoding.PEM)
    assert load_csr(good.decode()).subject.rfc4514_string() == f"CN={WORKER}"
    with pytest.raises(CsrError, match="not a PEM"):
        load_csr("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")
    der = bytearray(
        _csr(key, (NameOID.COMMON_NAME, WORKER)).public_bytes(serialization.Encoding.DER)
    )
    der[-5] ^= 0xFF  # inside the signature
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CsrError, match="signature"):
        load_csr(tampered.decode())


def test_the_server_certificate_follows_the_public_names(tmp_path: Path) -> None:
    ca = GatewayCA.create()
    names = ["gw.example.org", "192.0.2.10", "2001:db8::5"]
    first = ca.ensure_server_cert(tmp_path, names, 90)
    cert = x509.load_pem_x509_certificate((tmp_path / SERVER_CERT_FILE).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["gw.example.org"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("192.0.2.10"),
        ipaddress.ip_address("2001:db8::5"),
    }
    assert (tmp_path / "server.key").stat().st_mode & 0o777 == 0o600
    issued = (tmp_path / SERVER_CERT_FILE).read_bytes()
    assert ca.ensure_server_cert(tmp_path, names, 90) == first
    assert (tmp_path / SERVER_CERT_FILE).read_bytes() == issued  # current: kept
    ca.ensure_server_cert(tmp_path, ["gw.example.org"], 90)
    assert (tmp_path / SERVER_CERT_FILE).read_bytes() != issued  # names changed: re-issued
    other = GatewayCA.create()
    other.ensure_server_cert(tmp_path, ["gw.example.org"], 90)  # not from this CA: re-issued
    cert = x509.load_pem_x509_certificate((tmp_path / SERVER_CERT_FILE).read_bytes())
    assert cert.issuer == other.certificate.subject


def test_tls_contexts_are_tls12_plus_and_the_worker_one_requires_certificates(
    tmp_path: Path,
) -> None:
    ca = GatewayCA.create()
    ca.ensure_server_cert(tmp_path, ["localhost"], 90)
    api = ca.server_context(tmp_path, require_client_cert=False)
    workers = ca.server_context(tmp_path, require_client_cert=True)
    assert api.minimum_version == workers.minimum_version == ssl.TLSVersion.TLSv1_2
    assert api.verify_mode == ssl.CERT_NONE
    assert workers.verify_mode == ssl.CERT_REQUIRED
    assert (tmp_path / CA_CERT_FILE).exists() is False  # contexts never write the CA
