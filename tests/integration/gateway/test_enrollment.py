"""Enrollment over HTTPS: tokens from validators, CSR + proof from workers, certificates out."""

from __future__ import annotations

import base64

import msgspec
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from byteleap.core import gateway_protocol as p
from byteleap.core.identity import WorkerKey

from .conftest import MINER, Gw
from .worker_double import FakeWorker


async def test_enrollment_issues_a_client_certificate_named_by_the_worker_id(gw: Gw) -> None:
    worker = FakeWorker(gw.home / "w")
    token = await gw.token(worker)
    assert token.gateway_id == gw.gateway.signer.gateway_id
    assert token.ca_pem == gw.gateway.ca.cert_pem
    assert token.enroll_url == gw.api + "/v1/enroll"
    assert token.expires_at == gw.clock() + 600
    status, body = await gw.call("POST", "/v1/enroll", token.token, worker.enroll_body(token.token))
    assert status == 200, body
    response = msgspec.convert(body, p.EnrollResponse)
    cert = x509.load_pem_x509_certificate(response.cert_pem.encode())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == worker.worker_id
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.issuer == gw.gateway.ca.certificate.subject
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert 29 <= days <= 30
    stored = gw.gateway.store.worker(worker.worker_id)
    assert stored is not None and stored.miner_hotkey == MINER
    assert stored.public_key == worker.key.public_key
    assert gw.gateway.store.certificate(format(cert.serial_number, "x")) is not None
    worker.accept(response)
    conn = await worker.connect()
    gw.connections.append(conn)
    welcome = await conn.hello()
    assert welcome.cert_not_after == response.not_after


async def test_a_used_token_is_refused_the_second_time(gw: Gw) -> None:
    worker = FakeWorker(gw.home / "w")
    token = (await gw.token(worker)).token
    status, _ = await gw.call("POST", "/v1/enroll", token, worker.enroll_body(token))
    assert status == 200
    status, body = await gw.call("POST", "/v1/enroll", token, worker.enroll_body(token))
    assert (status, body["error"]) == (401, "token_used")


async def test_an_expired_token_is_refused(gw: Gw) -> None:
    worker = FakeWorker(gw.home / "w")
    token = (await gw.token(worker)).token
    gw.clock.advance(601)
    status, body = await gw.call("POST", "/v1/enroll", token, worker.enroll_body(token))
    assert (status, body["error"]) == (401, "token_expired")
    assert gw.gateway.store.worker(worker.worker_id) is None


async def test_an_unknown_token_is_refused(gw: Gw) -> None:
    worker = FakeWorker(gw.home / "w")
    forged = "ble_" + "A" * 43
    status, body = await gw.call("POST", "/v1/enroll", forged, worker.enroll_body(forged))
    assert (status, body["error"]) == (401, "token_unknown")


async def test_a_token_for_another_worker_is_refused_and_stays_usable(gw: Gw) -> None:
    intended, other = FakeWorker(gw.home / "a"), FakeWorker(gw.home / "b")
    token = (await gw.token(intended)).token
    status, body = await gw.call("POST", "/v1/enroll", token, other.enroll_body(token))
    assert (status, body["error"]) == (403, "token_wrong_worker")
    status, _ = await gw.call("POST", "/v1/enroll", token, intended.enroll_body(token))
    assert status == 200


async def test_a_forged_proof_is_refused(gw: Gw) -> None:
    worker = FakeWorker(gw.home / "w")
    token = (await gw.token(worker)).token
    body = worker.enroll_body(token, proof_key=WorkerKey.generate())
    status, answer = await gw.call("POST", "/v1/enroll", token, body)
    assert (status, answer["error"]) == (403, "proof_invalid")
    # A proof for another token does not carry over either.
    other_token = (await gw.token(worker)).token
    replayed = worker.enroll_body(other_token)
    status, answer = await gw.call("POST", "/v1/enroll", token, replayed)
    assert (status, answer["error"]) == (403, "proof_invalid")


async def test_a_worker_id_not_derived_from_the_key_is_refused(gw: Gw) -> None:
    worker, impostor = FakeWorker(gw.home / "w"), WorkerKey.generate()
    token = (await gw.token(worker)).token
    body = worker.enroll_body(token)
    body["worker_public_key"] = base64.b64encode(impostor.public_key).decode()
    status, answer = await gw.call("POST", "/v1/enroll", token, body)
    assert (status, answer["error"]) == (400, "worker_id_mismatch")


async def test_a_csr_for_another_common_name_is_refused(gw: Gw) -> None:
    worker = FakeWorker(gw.home / "w")
    token = (await gw.token(worker)).token
    body = worker.enroll_body(token, common_name="f" * 32)
    status, answer = await gw.call("POST", "/v1/enroll", token, body)
    assert (status, answer["error"]) == (400, "csr_subject_mismatch")
    body["csr_pem"] = (
        "-----BEGIN CERTIFICATE REQUEST-----\nnope\n-----END CERTIFICATE REQUEST-----\n"
    )
    status, answer = await gw.call("POST", "/v1/enroll", token, body)
    assert (status, answer["error"]) == (400, "csr_invalid")
    assert gw.gateway.store.worker(worker.worker_id) is None
