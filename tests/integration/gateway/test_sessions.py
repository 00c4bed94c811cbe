"""The mTLS worker listener: who may open a session, replacement, revocation, renewal."""

from __future__ import annotations

import asyncio
import ssl

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from byteleap.core import gateway_protocol as p
from byteleap.core.channel import CloseCode
from byteleap.core.identity import WorkerKey
from byteleap.gateway.ca import GatewayCA, client_tls_context, load_csr

from .conftest import Gw
from .worker_double import FakeWorker, gpu, make_csr

REFUSED = (aiohttp.ClientError, ssl.SSLError, ConnectionError)


async def test_a_client_certificate_from_another_ca_is_refused(gw: Gw) -> None:
    worker = await gw.enroll(FakeWorker(gw.home / "w"))
    rogue = GatewayCA.create()
    csr_pem, _ = make_csr(worker.tls_key, worker.worker_id)
    forged = rogue.issue_worker_cert(load_csr(csr_pem), worker.worker_id, 30)
    (worker.home / "worker.crt").write_text(forged.pem)
    with pytest.raises(REFUSED) as refused:
        conn = await worker.connect()
        try:  # TLS 1.3 reports the refused certificate on the first read
            await conn.hello()
        finally:
            await conn.close()
    # Refused by TLS itself: an HTTP answer (even a 403) would mean the handshake succeeded.
    assert not isinstance(refused.value, aiohttp.WSServerHandshakeError)
    assert not gw.gateway.hub.sessions


async def test_a_client_without_a_certificate_is_refused(gw: Gw) -> None:
    worker = await gw.enroll(FakeWorker(gw.home / "w"))
    assert worker.ca_pem is not None
    with pytest.raises(REFUSED) as refused:
        conn = await worker.connect(context=client_tls_context(worker.ca_pem))
        try:
            await conn.hello()
        finally:
            await conn.close()
    assert not isinstance(refused.value, aiohttp.WSServerHandshakeError)
    assert not gw.gateway.hub.sessions


async def test_hello_must_name_the_certificate_s_worker(gw: Gw) -> None:
    worker = await gw.enroll(FakeWorker(gw.home / "w"))
    conn = await worker.connect()
    gw.connections.append(conn)
    await conn.send(
        p.Hello(
            worker_id=WorkerKey.generate().worker_id,
            agent_version="0.1.0",
            capacity=p.Capacity(vcpus=1, memory_mib=1, disk_gib=1),
        )
    )
    error = await conn.expect(p.Error)
    assert error.code is p.ErrorCode.KEY_MISMATCH
    code, _ = await conn.closed()
    assert code == CloseCode.UNAUTHORIZED
    assert not gw.gateway.leases.online(worker.worker_id)


async def test_garbage_and_silence_close_the_session(gw: Gw) -> None:
    worker = await gw.enroll(FakeWorker(gw.home / "w"))
    conn = await worker.connect()
    gw.connections.append(conn)
    await conn.ws.send_bytes(b"\x81\xa1v\x02")  # {"v": 2}: not a frame of this version
    error = await conn.expect(p.Error)
    assert error.code in (p.ErrorCode.BAD_FRAME, p.ErrorCode.UNSUPPORTED_VERSION)
    code, _ = await conn.closed()
    assert code == CloseCode.PROTOCOL_ERROR


async def test_a_newer_session_replaces_the_older(gw: Gw) -> None:
    worker, first = await gw.online()
    second = await worker.connect()
    gw.connections.append(second)
    await second.hello()
    code, _ = await first.closed()
    assert code == CloseCode.REPLACED
    assert gw.gateway.hub.sessions[worker.worker_id] is not None
    assert gw.gateway.leases.online(worker.worker_id)


async def test_revocation_cuts_the_live_session_and_refuses_the_next(gw: Gw) -> None:
    worker, conn = await gw.online()
    assert gw.gateway.store.revoke_worker(worker.worker_id, gw.clock())  # as byteleapctl does
    error = await conn.expect(p.Error)  # the watcher runs every 0.2 s in these tests
    assert error.code is p.ErrorCode.REVOKED
    code, _ = await conn.closed()
    assert code == CloseCode.UNAUTHORIZED
    assert not gw.gateway.leases.online(worker.worker_id)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await worker.connect()
    assert refused.value.status == 403
    token = await gw.call(
        "POST",
        "/v1/enrollment-tokens",
        gw.validator_key,
        {
            "worker_id": worker.worker_id,
            "miner_hotkey": "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty",
        },
    )
    assert token == (
        403,
        {"error": "worker_revoked", "message": f"worker {worker.worker_id} is revoked"},
    )


async def test_renewal_keeps_the_session_and_both_certificates_work(gw: Gw) -> None:
    worker, conn = await gw.online()
    assert conn.welcome is not None
    new_key = ec.generate_private_key(ec.SECP256R1())
    csr_pem, csr_der = make_csr(new_key, worker.worker_id)
    proof = worker.key.sign(p.renew_proof_message(conn.welcome.session_id, csr_der))
    await conn.send(p.RenewCert(csr_pem=csr_pem, proof=proof), ref=7)
    frame = await conn.recv()
    assert frame.id == 7 and isinstance(frame.msg, p.CertRenewed), frame
    renewed = x509.load_pem_x509_certificate(frame.msg.cert_pem.encode())
    assert renewed.public_key() == new_key.public_key()
    # Still the same session: a lease request reaches the worker through it.
    status, lease = await gw.lease()
    assert status == 201, lease
    start = await conn.expect(p.StartLease)
    assert start.lease_id == lease["lease_id"]
    # The old certificate still opens a session, and so does the new one.
    old = await worker.connect()
    gw.connections.append(old)
    await old.hello()
    worker.tls_key = new_key
    worker.cert_pem = frame.msg.cert_pem
    worker._write_files()
    new = await worker.connect()
    gw.connections.append(new)
    await new.hello()


async def test_renewal_with_a_bad_proof_or_subject_is_refused_in_session(gw: Gw) -> None:
    worker, conn = await gw.online()
    assert conn.welcome is not None
    key = ec.generate_private_key(ec.SECP256R1())
    csr_pem, csr_der = make_csr(key, worker.worker_id)
    stolen = WorkerKey.generate().sign(p.renew_proof_message(conn.welcome.session_id, csr_der))
    await conn.send(p.RenewCert(csr_pem=csr_pem, proof=stolen), ref=1)
    assert (await conn.expect(p.Error)).code is p.ErrorCode.PROOF_INVALID
    # A proof bound to another session does not count either (and renewals are rate-limited).
    replayed = worker.key.sign(p.renew_proof_message(b"\x00" * 16, csr_der))
    await conn.send(p.RenewCert(csr_pem=csr_pem, proof=replayed), ref=2)
    assert (await conn.expect(p.Error)).code is p.ErrorCode.RATE_LIMITED
    await conn.send(p.Heartbeat(gpus=[gpu(0), gpu(1)]))
    assert gw.gateway.leases.online(worker.worker_id)


async def test_renewal_refuses_a_foreign_subject(gw: Gw) -> None:
    worker, conn = await gw.online()
    assert conn.welcome is not None
    key = ec.generate_private_key(ec.SECP256R1())
    csr_pem, csr_der = make_csr(key, "0" * 32)
    proof = worker.key.sign(p.renew_proof_message(conn.welcome.session_id, csr_der))
    await conn.send(p.RenewCert(csr_pem=csr_pem, proof=proof), ref=3)
    error = await conn.expect(p.Error)
    assert error.code is p.ErrorCode.CSR_INVALID and "CN=" in error.message


async def test_silent_workers_are_cut_and_their_leases_wait_out_the_grace(gw: Gw) -> None:
    worker, conn = await gw.online()
    status, lease = await gw.lease()
    assert status == 201
    await conn.expect(p.StartLease)
    session = gw.gateway.hub.sessions[worker.worker_id]
    session.last_seen -= 31  # heartbeat_timeout_s is 30 in these tests
    await gw.gateway.hub.check()
    code, _ = await conn.closed()
    assert code == CloseCode.GOING_AWAY
    stored = gw.gateway.store.lease(lease["lease_id"])
    assert stored is not None and stored.state == "starting"


async def test_shutdown_tells_workers_and_keeps_leases(gw: Gw) -> None:
    _, conn = await gw.online()
    status, lease = await gw.lease()
    assert status == 201
    start = await conn.expect(p.StartLease)
    await conn.send(
        p.LeaseStarted(lease_id=start.lease_id, ssh_host="10.0.0.9", ssh_port=22, ssh_user="u")
    )
    for _ in range(500):
        stored = gw.gateway.store.lease(lease["lease_id"])
        if stored is not None and stored.state == "running":
            break
        await asyncio.sleep(0.01)
    await gw.gateway.stop()
    code, _ = await conn.closed()
    assert code == CloseCode.GOING_AWAY
    stored = gw.gateway.store.lease(lease["lease_id"])
    assert stored is not None and stored.state == "running"  # a restart is not the end
