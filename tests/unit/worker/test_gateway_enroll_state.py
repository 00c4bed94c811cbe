"""The worker's gateway enrollment state: what is stored, how it is checked, how it is swapped.

Certificates come from a real :class:`~byteleap.gateway.ca.GatewayCA`; no network here (the
enrollment over HTTPS is tested end to end in tests/integration/gateway/test_enroll_relay.py).
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import stat
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID

from byteleap.core import gateway_protocol as gp
from byteleap.core.identity import WorkerKey
from byteleap.gateway.ca import GatewayCA, load_csr
from byteleap.worker import gateway_enroll
from byteleap.worker.gateway_enroll import GatewayEnrollError, GatewayEnrollment

GATEWAY_ID = "c0" * 16
WS_URL = "wss://gateway.example:8444/v1/worker"
DAY = 86400.0


def tls_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def issue(ca: GatewayCA, key: ec.EllipticCurvePrivateKey, worker_id: str, days: int = 30) -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, worker_id)]))
        .sign(key, hashes.SHA256())
    )
    return ca.issue_worker_cert(csr, worker_id, days).pem


def store(
    state: Path, ca: GatewayCA, worker: WorkerKey, key: ec.EllipticCurvePrivateKey | None = None
) -> GatewayEnrollment:
    key = key or tls_key()
    return GatewayEnrollment.create(
        state,
        worker_id=worker.worker_id,
        key_pem=key_pem(key),
        cert_pem=issue(ca, key, worker.worker_id),
        ca_pem=ca.cert_pem,
        gateway_id=GATEWAY_ID,
        ws_url=WS_URL,
        enrolled_at=1_700_000_000.0,
    )


@pytest.fixture
def ca() -> GatewayCA:
    return GatewayCA.create()


@pytest.fixture
def worker() -> WorkerKey:
    return WorkerKey.generate()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def layout(state: Path) -> Path:
    """Check that ``state`` holds the ``gateway`` link and its one generation, nothing else;
    returns the generation."""
    link = state / "gateway"
    assert link.is_symlink()
    generation = state / str(link.readlink())
    assert generation.name.startswith(".gateway-") and generation.is_dir()
    assert sorted(p.name for p in state.iterdir()) == sorted(["gateway", generation.name])
    return generation


def error_of(state: Path, **kwargs: str) -> GatewayEnrollError:
    with pytest.raises(GatewayEnrollError) as info:
        GatewayEnrollment.load(state, **kwargs)
    assert info.value.code == "state"
    return info.value


# ------------------------------------------------------------------------------------------------
# Stored, loaded, used


def test_nothing_stored_loads_as_none(tmp_path: Path) -> None:
    assert GatewayEnrollment.load(tmp_path) is None
    assert GatewayEnrollment.load(tmp_path / "not-created-yet") is None


def test_the_state_is_four_files_with_safe_modes_and_loads_back(
    tmp_path: Path, ca: GatewayCA, worker: WorkerKey
) -> None:
    created = store(tmp_path, ca, worker)
    directory = tmp_path / "gateway"
    assert sorted(p.name for p in directory.iterdir()) == [
        "ca.pem",
        "cert.pem",
        "gateway.json",
        "key.pem",
    ]
    assert mode(directory) == 0o700
    assert mode(directory / "key.pem") == 0o600
    state = json.loads((directory / "gateway.json").read_text())
    assert state == {
        "gateway_id": GATEWAY_ID,
        "ws_url": WS_URL,
        "not_after": created.not_after,
        "enrolled_at": 1_700_000_000.0,
    }
    loaded = GatewayEnrollment.load(tmp_path, worker_id=worker.worker_id)
    assert loaded is not None
    assert (loaded.worker_id, loaded.gateway_id, loaded.ws_url) == (
        worker.worker_id,
        GATEWAY_ID,
        WS_URL,
    )
    assert (loaded.not_before, loaded.not_after) == (created.not_before, created.not_after)
    assert loaded.not_after - loaded.not_before == pytest.approx(30 * DAY, abs=600)
    assert "PRIVATE" not in repr(loaded)
    assert mode(layout(tmp_path)) == 0o700


def test_the_tls_context_pins_the_ca_and_presents_the_certificate(
    tmp_path: Path, ca: GatewayCA, worker: WorkerKey
) -> None:
    context = store(tmp_path, ca, worker).ssl_context()
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    (only,) = context.get_ca_certs(binary_form=True)
    assert only == ca.certificate.public_bytes(serialization.Encoding.DER)


def test_renewal_is_due_when_a_third_of_the_lifetime_is_left(
    tmp_path: Path, ca: GatewayCA, worker: WorkerKey
) -> None:
    enrollment = store(tmp_path, ca, worker)
    lifetime = enrollment.not_after - enrollment.not_before
    assert not enrollment.needs_renewal(enrollment.not_before + 0.6 * lifetime)
    assert enrollment.needs_renewal(enrollment.not_before + 0.7 * lifetime)
    assert not enrollment.expired(enrollment.not_after - 1)
    assert enrollment.expired(enrollment.not_after)


# ------------------------------------------------------------------------------------------------
# Renewal


def test_a_renewal_request_is_proven_and_its_answer_swaps_the_state(
    tmp_path: Path, ca: GatewayCA, worker: WorkerKey
) -> None:
    enrollment = store(tmp_path, ca, worker)
    old_key = (tmp_path / "gateway" / "key.pem").read_bytes()
    session_id = os.urandom(16)
    new_key_pem, request = enrollment.renewal_request(worker, session_id)

    csr = load_csr(request.csr_pem)  # what the gateway does with it
    csr_der = csr.public_bytes(serialization.Encoding.DER)
    Ed25519PublicKey.from_public_bytes(worker.public_key).verify(
        request.proof, gp.renew_proof_message(session_id, csr_der)
    )
    issued = ca.issue_worker_cert(csr, worker.worker_id, 60)

    enrollment.store_renewed(new_key_pem, gp.CertRenewed(cert_pem=issued.pem, not_after=0.0))
    assert enrollment.not_after == pytest.approx(issued.not_after)
    key_file = tmp_path / "gateway" / "key.pem"
    assert key_file.read_bytes() == new_key_pem != old_key
    assert mode(key_file) == 0o600
    loaded = GatewayEnrollment.load(tmp_path, worker_id=worker.worker_id)
    assert loaded is not None and loaded.not_after == enrollment.not_after
    assert loaded.enrolled_at == 1_700_000_000.0
    layout(tmp_path)  # the old generation is gone


@pytest.mark.parametrize("wrong", ["key", "ca", "worker"])
def test_a_renewed_certificate_that_does_not_fit_is_refused_and_nothing_changes(
    tmp_path: Path, ca: GatewayCA, worker: WorkerKey, wrong: str
) -> None:
    enrollment = store(tmp_path, ca, worker)
    before = {p.name: p.read_bytes() for p in (tmp_path / "gateway").iterdir()}
    new_key_pem, _request = enrollment.renewal_request(worker, os.urandom(16))
    new_key = serialization.load_pem_private_key(new_key_pem, None)
    assert isinstance(new_key, ec.EllipticCurvePrivateKey)
    if wrong == "key":
        cert_pem = issue(ca, tls_key(), worker.worker_id)
    elif wrong == "ca":
        cert_pem = issue(GatewayCA.create(), new_key, worker.worker_id)
    else:
        cert_pem = issue(ca, new_key, WorkerKey.generate().worker_id)
    with pytest.raises(GatewayEnrollError) as info:
        enrollment.store_renewed(new_key_pem, gp.CertRenewed(cert_pem=cert_pem, not_after=0.0))
    assert info.value.code == "bad_answer"
    assert "the renewed certificate" in str(info.value)
    assert {p.name: p.read_bytes() for p in (tmp_path / "gateway").iterdir()} == before


def test_a_renewal_request_with_another_workers_key_is_refused(
    tmp_path: Path, ca: GatewayCA, worker: WorkerKey
) -> None:
    enrollment = store(tmp_path, ca, worker)
    with pytest.raises(GatewayEnrollError, match="the certificate"):
        enrollment.renewal_request(WorkerKey.generate(), os.urandom(16))


def test_create_refuses_what_does_not_fit(tmp_path: Path, ca: GatewayCA, worker: WorkerKey) -> None:
    key = tls_key()
    good = {
        "worker_id": worker.worker_id,
        "key_pem": key_pem(key),
        "cert_pem": issue(ca, key, worker.worker_id),
        "ca_pem": ca.cert_pem,
        "gateway_id": GATEWAY_ID,
        "ws_url": WS_URL,
    }
    for change, expected in (
        ({"key_pem": key_pem(tls_key())}, "does not certify this worker's TLS key"),
        ({"ca_pem": GatewayCA.create().cert_pem}, "not issued by the gateway's CA"),
        ({"worker_id": WorkerKey.generate().worker_id}, "not this worker"),
        ({"ws_url": "ws://gateway.example/v1/worker"}, "is not wss://"),
        ({"gateway_id": "not-an-id"}, "is not a gateway id"),
        ({"cert_pem": "garbage"}, "is not a PEM certificate"),
    ):
        with pytest.raises(GatewayEnrollError, match=expected):
            GatewayEnrollment.create(tmp_path, **{**good, **change}, enrolled_at=0.0)  # type: ignore[arg-type]
        assert GatewayEnrollment.load(tmp_path) is None
    with pytest.raises(GatewayEnrollError, match="already expired"):
        GatewayEnrollment.create(tmp_path, **good, enrolled_at=time.time() + 31 * 86400)  # type: ignore[arg-type]
    assert GatewayEnrollment.load(tmp_path) is None


# ------------------------------------------------------------------------------------------------
# Damaged state: one clear error naming the file


def test_a_corrupted_state_file_is_a_clear_error(
    tmp_path: Path, ca: GatewayCA, worker: WorkerKey
) -> None:
    store(tmp_path, ca, worker)
    state_file = tmp_path / "gateway" / "gateway.json"
    for content in (b"{not json", b'{"gateway_id": "x"}', b"[]", b"\xff\xfe"):
        state_file.write_bytes(content)
        error = error_of(tmp_path)
        assert str(state_file) in str(error) and "corrupted" in str(error)
    state_file.write_text(
        json.dumps({"gateway_id": "zz", "ws_url": WS_URL, "not_after": 1.0, "enrolled_at": 1.0})
    )
    assert "bad gateway_id or ws_url" in str(error_of(tmp_path))


def test_a_key_others_can_read_is_refused(tmp_path: Path, ca: GatewayCA, worker: WorkerKey) -> None:
    store(tmp_path, ca, worker)
    key_file = tmp_path / "gateway" / "key.pem"
    key_file.chmod(0o644)
    error = error_of(tmp_path)
    assert str(key_file) in str(error) and "0644" in str(error)


def test_missing_and_garbled_files_are_clear_errors(
    tmp_path: Path, ca: GatewayCA, worker: WorkerKey
) -> None:
    store(tmp_path, ca, worker)
    directory = tmp_path / "gateway"
    cert = directory / "cert.pem"
    saved = cert.read_bytes()
    cert.write_text("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    assert f"{cert} is not a PEM certificate" in str(error_of(tmp_path))
    cert.unlink()
    assert f"gateway certificate {cert} is missing" in str(error_of(tmp_path))
    cert.write_bytes(saved)
    (directory / "key.pem").write_bytes(key_pem(tls_key()))  # mode stays 0600
    assert "does not certify this worker's TLS key" in str(error_of(tmp_path))


def test_a_certificate_of_another_worker_or_ca_is_refused(
    tmp_path: Path, ca: GatewayCA, worker: WorkerKey
) -> None:
    store(tmp_path, ca, worker)
    other = WorkerKey.generate()
    assert f"not this one ({other.worker_id})" in str(error_of(tmp_path, worker_id=other.worker_id))
    (tmp_path / "gateway" / "ca.pem").write_text(GatewayCA.create().cert_pem)
    assert "not issued by the gateway's CA" in str(error_of(tmp_path))


def test_a_link_to_anywhere_else_is_refused(
    tmp_path: Path, ca: GatewayCA, worker: WorkerKey
) -> None:
    store(tmp_path / "real", ca, worker)
    (tmp_path / "worker").mkdir()
    elsewhere = layout(tmp_path / "real")
    (tmp_path / "worker" / "gateway").symlink_to(elsewhere)
    assert "not to a state generation beside it" in str(error_of(tmp_path / "worker"))
    (tmp_path / "worker" / "gateway").unlink()
    (tmp_path / "worker" / "gateway").symlink_to(".gateway-gone")
    assert "links to a missing directory" in str(error_of(tmp_path / "worker"))


def test_a_plain_directory_is_read_and_replaced_by_a_link(
    tmp_path: Path, ca: GatewayCA, worker: WorkerKey
) -> None:
    store(tmp_path / "real", ca, worker)
    generation = layout(tmp_path / "real")
    generation.rename(tmp_path / "gateway")  # as an operator might restore a backup
    shutil.rmtree(tmp_path / "real")
    loaded = GatewayEnrollment.load(tmp_path, worker_id=worker.worker_id)
    assert loaded is not None
    loaded.ssl_context()
    store(tmp_path, ca, worker)
    layout(tmp_path)


# ------------------------------------------------------------------------------------------------
# Atomic replacement


def test_a_write_that_fails_midway_keeps_the_old_state(
    tmp_path: Path, ca: GatewayCA, worker: WorkerKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = store(tmp_path, ca, worker)
    before = {p.name: p.read_bytes() for p in (tmp_path / "gateway").iterdir()}
    generation = layout(tmp_path)
    real_write = gateway_enroll.write_exclusive
    written: list[str] = []

    def failing(path: Path, data: bytes, file_mode: int = 0o600) -> None:
        if len(written) == 2:
            raise OSError(28, "No space left on device")
        written.append(path.name)
        real_write(path, data, file_mode)

    monkeypatch.setattr(gateway_enroll, "write_exclusive", failing)
    with pytest.raises(GatewayEnrollError, match="No space left on device") as info:
        store(tmp_path, ca, worker)
    assert info.value.code == "state"
    assert {p.name: p.read_bytes() for p in (tmp_path / "gateway").iterdir()} == before
    assert layout(tmp_path) == generation
    loaded = GatewayEnrollment.load(tmp_path)
    assert loaded is not None and loaded.not_after == old.not_after


def test_readers_always_find_a_complete_state_while_it_is_replaced(
    tmp_path: Path, ca: GatewayCA, worker: WorkerKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    enrollment = store(tmp_path, ca, worker)
    seen: list[bytes] = []
    real_replace = Path.replace

    def observed(self: Path, target: str | os.PathLike[str]) -> Path:
        seen.append((tmp_path / "gateway" / "cert.pem").read_bytes())  # just before the switch
        result = real_replace(self, target)
        seen.append((tmp_path / "gateway" / "cert.pem").read_bytes())  # just after it
        enrollment.ssl_context()  # key and certificate of one generation
        return result

    monkeypatch.setattr(Path, "replace", observed)
    store(tmp_path, ca, worker)
    assert len(seen) == 2 and seen[0] != seen[1]


def test_a_crash_before_the_switch_keeps_the_old_state(
    tmp_path: Path, ca: GatewayCA, worker: WorkerKey
) -> None:
    store(tmp_path, ca, worker)
    current = layout(tmp_path)
    old_cert = (current / "cert.pem").read_bytes()
    store(tmp_path / "other", ca, worker)  # a complete generation that never got linked
    layout(tmp_path / "other").rename(tmp_path / ".gateway-0123456789abcdef")
    shutil.rmtree(tmp_path / "other")
    (tmp_path / ".gateway.link-0123456789abcdef").symlink_to(".gateway-0123456789abcdef")
    (tmp_path / ".gateway-partial").mkdir()  # and one still being written
    loaded = GatewayEnrollment.load(tmp_path)
    assert loaded is not None
    assert (tmp_path / "gateway" / "cert.pem").read_bytes() == old_cert
    assert (tmp_path / ".gateway-partial").exists()  # loading only reads
    store(tmp_path, ca, worker)  # the next replacement clears what the crash left
    layout(tmp_path)


def test_a_crash_after_the_switch_keeps_the_new_state(
    tmp_path: Path, ca: GatewayCA, worker: WorkerKey
) -> None:
    store(tmp_path, ca, worker)
    current = layout(tmp_path)
    new_cert = (current / "cert.pem").read_bytes()
    kept = tmp_path / ".gateway-kept-by-a-crash"
    shutil.copytree(current, kept)  # stands for the old generation, not yet removed
    (kept / "cert.pem").write_text("the old certificate")
    loaded = GatewayEnrollment.load(tmp_path)
    assert loaded is not None
    assert (tmp_path / "gateway" / "cert.pem").read_bytes() == new_cert
    loaded.store_renewed(*_renewed(loaded, ca, worker))
    assert not kept.exists()
    layout(tmp_path)


def _renewed(
    enrollment: GatewayEnrollment, ca: GatewayCA, worker: WorkerKey
) -> tuple[bytes, gp.CertRenewed]:
    key_pem_bytes, request = enrollment.renewal_request(worker, os.urandom(16))
    issued = ca.issue_worker_cert(load_csr(request.csr_pem), worker.worker_id, 30)
    return key_pem_bytes, gp.CertRenewed(cert_pem=issued.pem, not_after=issued.not_after)


def test_an_interrupted_first_enrollment_counts_for_nothing(
    tmp_path: Path, ca: GatewayCA, worker: WorkerKey
) -> None:
    store(tmp_path / "a", ca, worker)
    layout(tmp_path / "a").rename(tmp_path / ".gateway-never-linked")
    assert GatewayEnrollment.load(tmp_path) is None
    store(tmp_path, ca, worker)
    assert not (tmp_path / ".gateway-never-linked").exists()
