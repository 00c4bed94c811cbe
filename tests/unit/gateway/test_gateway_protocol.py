"""The gateway<->worker messages and the HTTP bodies: strict, capped, versioned."""

from __future__ import annotations

import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given
from hypothesis import strategies as st

from byteleap.core import gateway_protocol as p

LEASE = "c" * 32
SLOT = p.GpuSlot(
    uuid="GPU-1", pci_bus_id="0000:41:00.0", name="H100", mem_bytes=80 << 30, state="idle"
)
CAPACITY = p.Capacity(vcpus=8, memory_mib=1024, disk_gib=10)

UP_MESSAGES: list[p.Message] = [
    p.Hello(
        worker_id="a" * 32,
        agent_version="0.1.0",
        gpus=[SLOT],
        capacity=CAPACITY,
        leases=[p.LeaseHealth(lease_id=LEASE, state="running")],
    ),
    p.Heartbeat(gpus=[SLOT], leases=[p.LeaseHealth(lease_id=LEASE, state="failed", detail="x")]),
    p.LeaseStarted(lease_id=LEASE, ssh_host="2001:db8::1", ssh_port=22, ssh_user="ubuntu"),
    p.LeaseFailed(lease_id=LEASE, reason="no device"),
    p.LeaseStopped(lease_id=LEASE),
    p.RenewCert(csr_pem="-----BEGIN CERTIFICATE REQUEST-----\n", proof=b"s" * 64),
    p.Pong(nonce=3),
    p.Error(code=p.ErrorCode.INTERNAL, message="oops", ref=4),
]
DOWN_MESSAGES: list[p.Message] = [
    p.Welcome(session_id=b"i" * 16, heartbeat_interval_s=15, cert_not_after=1.9e9),
    p.StartLease(
        lease_id=LEASE,
        device_uuids=["GPU-1", "GPU-2"],
        ssh_public_key="ssh-ed25519 AAAA",
        vcpus=8,
        memory_mib=1024,
        disk_gib=10,
        ends_at=1.9e9,
    ),
    p.ExtendLease(lease_id=LEASE, ends_at=1.9e9),
    p.StopLease(lease_id=LEASE, reason="expired"),
    p.CertRenewed(cert_pem="-----BEGIN CERTIFICATE-----\n", not_after=1.9e9),
    p.Ping(nonce=1),
]


@pytest.mark.parametrize("message", UP_MESSAGES, ids=lambda m: type(m).__name__)
def test_up_messages_round_trip_and_are_refused_downstream(message: p.Message) -> None:
    data = p.encode(p.Frame(id=9, msg=message))
    assert p.decode(p.UP, data) == p.Frame(id=9, msg=message)
    if not isinstance(message, p.Error):
        with pytest.raises(p.ProtocolError) as refused:
            p.decode(p.DOWN, data)
        assert refused.value.code is p.ErrorCode.UNKNOWN_MESSAGE


@pytest.mark.parametrize("message", DOWN_MESSAGES, ids=lambda m: type(m).__name__)
def test_down_messages_round_trip_and_are_refused_upstream(message: p.Message) -> None:
    data = p.encode(p.Frame(msg=message))
    assert p.decode(p.DOWN, data).msg == message
    with pytest.raises(p.ProtocolError) as refused:
        p.decode(p.UP, data)
    assert refused.value.code is p.ErrorCode.UNKNOWN_MESSAGE


def _raw(frame: dict[str, object]) -> bytes:
    return msgspec.msgpack.encode(frame)


def test_strict_decoding_refuses_what_is_not_exactly_a_frame() -> None:
    ping = {"type": "pong", "nonce": 1}
    cases: list[tuple[bytes, p.ErrorCode]] = [
        (_raw({"v": 2, "id": 5, "msg": ping}), p.ErrorCode.UNSUPPORTED_VERSION),
        (_raw({"v": 1, "id": 5, "msg": {**ping, "extra": 1}}), p.ErrorCode.BAD_FRAME),
        (_raw({"v": 1, "id": 5, "msg": {"type": "launch_missiles"}}), p.ErrorCode.UNKNOWN_MESSAGE),
        (_raw({"v": 1, "id": -1, "msg": ping}), p.ErrorCode.BAD_FRAME),
        (
            _raw({"v": 1, "msg": {"type": "lease_stopped", "lease_id": "C" * 32}}),
            p.ErrorCode.BAD_FRAME,
        ),
        (b"\xc1garbage", p.ErrorCode.BAD_FRAME),
        (b"\x00" * (p.MAX_UP_BYTES + 1), p.ErrorCode.FRAME_TOO_LARGE),
    ]
    for data, code in cases:
        with pytest.raises(p.ProtocolError) as refused:
            p.decode(p.UP, data)
        assert refused.value.code is code, (data[:40], refused.value)
    with pytest.raises(p.ProtocolError) as version:
        p.decode(p.UP, cases[0][0])
    assert version.value.ref == 5


def test_duplicates_and_bounds_are_refused_at_construction_and_decode() -> None:
    with pytest.raises(ValueError, match="duplicate gpu uuid"):
        p.Heartbeat(gpus=[SLOT, SLOT])
    dup = _raw(
        {
            "v": 1,
            "id": 0,
            "msg": {
                "type": "heartbeat",
                "gpus": [],
                "leases": [
                    {"lease_id": LEASE, "state": "running"},
                    {"lease_id": LEASE, "state": "running"},
                ],
            },
        }
    )
    with pytest.raises(p.ProtocolError, match="duplicate lease_id"):
        p.decode(p.UP, dup)
    bad_user = _raw(
        {
            "v": 1,
            "id": 0,
            "msg": {
                "type": "lease_started",
                "lease_id": LEASE,
                "ssh_host": "h",
                "ssh_port": 22,
                "ssh_user": "root; reboot",
            },
        }
    )
    with pytest.raises(p.ProtocolError):
        p.decode(p.UP, bad_user)


@given(st.binary(max_size=512))
def test_decode_raises_only_protocol_errors(data: bytes) -> None:
    for direction in (p.UP, p.DOWN):
        try:
            p.decode(direction, data)
        except p.ProtocolError as exc:
            assert exc.message.isascii() and len(exc.message) <= 256


def test_error_messages_are_printable_ascii() -> None:
    error = p.ProtocolError(p.ErrorCode.BAD_FRAME, "bad \u00e9\nline")
    assert error.message.isascii() and "\n" not in error.message
    assert p.decode(p.UP, p.encode(p.Frame(msg=error.to_error()))).msg == error.to_error()


def test_proof_messages_bind_their_context() -> None:
    one = p.enroll_proof_message("ble_a", b"csr")
    assert one.startswith(p.ENROLL_PROOF_DOMAIN)
    assert one != p.enroll_proof_message("ble_b", b"csr")
    assert one != p.enroll_proof_message("ble_a", b"csR")
    renew = p.renew_proof_message(b"s" * 16, b"csr")
    assert renew.startswith(p.RENEW_PROOF_DOMAIN) and renew != p.renew_proof_message(
        b"t" * 16, b"csr"
    )


def _openssh(key: object) -> str:
    assert isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey)
    return key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()


def test_ssh_keys_of_accepted_types_are_normalized() -> None:
    ed = _openssh(ed25519.Ed25519PrivateKey.generate().public_key())
    assert p.normalize_ssh_public_key(f"  {ed}   me@host \n") == f"{ed} me@host"
    assert p.normalize_ssh_public_key(ed) == ed
    for curve in (ec.SECP256R1(), ec.SECP384R1(), ec.SECP521R1()):
        key = _openssh(ec.generate_private_key(curve).public_key())
        assert p.normalize_ssh_public_key(key) == key


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ssh-ed25519",
        "ssh-ed25519 !!!!",
        "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQC",
        "ecdsa-sha2-nistp256 " + "A" * 20,
        "sk-ssh-ed25519@openssh.com AAAA",
        "x" * (p.MAX_SSH_KEY_BYTES + 1),
    ],
)
def test_malformed_ssh_keys_are_refused(text: str) -> None:
    with pytest.raises(p.SshKeyError):
        p.normalize_ssh_public_key(text)


def test_ssh_key_type_must_match_its_blob() -> None:
    ed = _openssh(ed25519.Ed25519PrivateKey.generate().public_key())
    ecdsa = _openssh(ec.generate_private_key(ec.SECP256R1()).public_key())
    with pytest.raises(p.SshKeyError):
        p.normalize_ssh_public_key("ssh-ed25519 " + ecdsa.split()[1])
    with pytest.raises(p.SshKeyError, match="one line"):
        p.normalize_ssh_public_key(ed + "\r me@host")
    with pytest.raises(p.SshKeyError, match="printable ASCII"):
        p.normalize_ssh_public_key(ed + " caf\u00e9")


def test_http_bodies_are_strict() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(
            b'{"gpus": 1, "ssh_public_key": "k", "duration_s": 60, "foo": 1}', type=p.LeaseRequest
        )
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(
            b'{"gpus": 33, "ssh_public_key": "k", "duration_s": 60}', type=p.LeaseRequest
        )
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"worker_id": "A", "miner_hotkey": "5F"}', type=p.TokenRequest)
    request = msgspec.json.decode(
        b'{"worker_id": "' + b"a" * 32 + b'", "worker_public_key": "' + b"A" * 43 + b'=", '
        b'"csr_pem": "x", "proof": "' + b"A" * 86 + b'=="}',
        type=p.EnrollRequest,
    )
    assert len(request.worker_public_key) == 32 and len(request.proof) == 64
