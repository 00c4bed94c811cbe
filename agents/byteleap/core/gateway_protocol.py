"""The gateway's contract with its peers: worker WebSocket messages and HTTP API bodies.

Worker link (mTLS WebSocket, ``GET /v1/worker``)
-----------------------------------------------
Every binary WebSocket message is one MessagePack :class:`Frame` ``{v, id, msg}``; ``msg`` is a
tagged union (tag field ``type``) of the messages allowed in one direction: :data:`UP` is
worker->gateway, :data:`DOWN` gateway->worker. ``v`` is the protocol version (a major version:
decoding is strict, so any new message or field bumps it), ``id`` a correlation id (0 = none;
an answer or :class:`Error` repeats the id of the request it answers).

Decoding refuses unknown tags, messages of the other direction, unknown or missing fields, wrong
types and out-of-bounds values; frames are size-checked before parsing (:data:`MAX_UP_BYTES`,
:data:`MAX_DOWN_BYTES`). :func:`decode` raises only :class:`ProtocolError`.

The conversation::

    worker                                  gateway
    Hello(worker_id, gpus, capacity, leases) ->
                                         <- Welcome(session_id, heartbeat_interval_s, ...)
    Heartbeat(gpus, leases) every interval ->
                                         <- StartLease / ExtendLease / StopLease
    LeaseStarted / LeaseFailed / LeaseStopped ->
    RenewCert(csr_pem, proof)            ->
                                         <- CertRenewed(cert_pem, not_after) or Error

The worker's certificate names it (CN = worker_id); ``Hello.worker_id`` must match. Renewal is
in-session: the proof is the worker's Ed25519 signature over :func:`renew_proof_message`, bound to
this session's ``session_id`` so it cannot be replayed into another session.

HTTP API (JSON)
---------------
Request and response bodies of the renter, validator and enrollment endpoints, decoded strictly
with msgspec (``bytes`` fields are base64). Errors are always :class:`ApiError`
``{"error": "<stable_code>", "message": "<one line>"}``. The enrollment proof is the worker's
Ed25519 signature over :func:`enroll_proof_message`.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import re
from typing import Annotated, Any, Final, Literal

import msgspec
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from msgspec import Meta

from .lease import MAX_LEASE_DEVICES, GatewayId, LeaseId
from .wire import AgentVersion, DeviceUuid, FrameCodec, Hotkey, WireError, WorkerId

__all__ = [
    "DOWN",
    "ENROLL_PROOF_DOMAIN",
    "MAX_DOWN_BYTES",
    "MAX_SSH_KEY_BYTES",
    "MAX_UP_BYTES",
    "MIN_RSA_BITS",
    "PROTOCOL_VERSION",
    "RENEW_PROOF_DOMAIN",
    "UP",
    "ApiError",
    "Capacity",
    "CertRenewed",
    "EnrollRequest",
    "EnrollResponse",
    "Error",
    "ErrorCode",
    "ExtendLease",
    "ExtendRequest",
    "Frame",
    "GpuSlot",
    "GpuView",
    "GpusResponse",
    "Heartbeat",
    "Hello",
    "LeaseFailed",
    "LeaseHealth",
    "LeaseList",
    "LeaseRequest",
    "LeaseStarted",
    "LeaseState",
    "LeaseStopped",
    "LeaseView",
    "Message",
    "Ping",
    "Pong",
    "ProtocolError",
    "RenewCert",
    "SshEndpoint",
    "SshKeyError",
    "StartLease",
    "StopLease",
    "TokenRequest",
    "TokenResponse",
    "Welcome",
    "WorkerGpus",
    "decode",
    "encode",
    "enroll_proof_message",
    "normalize_ssh_public_key",
    "renew_proof_message",
]

PROTOCOL_VERSION: Final = 1
MAX_UP_BYTES: Final = 256 * 1024
"""Worker->gateway frames: a Hello with 32 GPUs and 64 leases is under 20 KiB."""
MAX_DOWN_BYTES: Final = 64 * 1024
"""Gateway->worker frames: the largest is a StartLease with a 16 KiB SSH key."""
MAX_SSH_KEY_BYTES: Final = 16 * 1024
MIN_RSA_BITS: Final = 3072
MAX_PEM_CHARS: Final = 8192
MAX_LEASES_PER_WORKER: Final = 64
ENROLL_PROOF_DOMAIN: Final = b"byteleap/gateway-enroll/v1\x00"
RENEW_PROOF_DOMAIN: Final = b"byteleap/gateway-renew/v1\x00"
SESSION_ID_BYTES: Final = 16
_I63: Final = 2**63 - 1

_PRINTABLE = r"\A[ -~]*\Z"
Text = Annotated[str, Meta(max_length=256, pattern=_PRINTABLE)]
Name = Annotated[str, Meta(max_length=128, pattern=_PRINTABLE)]
Pem = Annotated[str, Meta(min_length=1, max_length=MAX_PEM_CHARS, pattern=r"\A[ -~\r\n]*\Z")]
Signature = Annotated[bytes, Meta(min_length=64, max_length=64)]
PublicKey = Annotated[bytes, Meta(min_length=32, max_length=32)]
SessionId = Annotated[bytes, Meta(min_length=SESSION_ID_BYTES, max_length=SESSION_ID_BYTES)]
PciBusId = Annotated[
    str, Meta(pattern=r"\A[0-9a-fA-F]{4,8}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]\Z")
]
Host = Annotated[str, Meta(min_length=1, max_length=253, pattern=r"\A[A-Za-z0-9.:-]+\Z")]
"""A DNS name or an IP address (v4 or v6, no brackets)."""
UnixUser = Annotated[str, Meta(pattern=r"\A[a-z_][a-z0-9_-]{0,31}\Z")]
Time = Annotated[float, Meta(ge=0.0, le=2.0**40)]
Seconds = Annotated[float, Meta(gt=0.0, le=10.0 * 365 * 86400)]
FrameId = Annotated[int, Meta(ge=0, le=_I63)]
Nonce = Annotated[int, Meta(ge=0, le=_I63)]
DeviceList = Annotated[list[DeviceUuid], Meta(min_length=1, max_length=MAX_LEASE_DEVICES)]

LeaseState = Literal["pending", "starting", "running", "ended", "failed"]
"""pending -> starting -> running -> ended | failed (pending/starting may also end or fail)."""
GpuState = Literal["idle", "leased", "busy", "unavailable"]
"""As the worker sees it: ``idle`` may be leased; ``busy`` is a host job (a challenge);
``unavailable`` is broken or being rebound."""
HealthState = Literal["starting", "running", "stopped", "failed"]


class _Struct(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


def _unique(values: list[Any], what: str) -> None:
    if len(set(values)) != len(values):
        raise ValueError(f"duplicate {what}")


# --------------------------------------------------------------------------------------------
# Worker link: shared parts


@enum.unique
class ErrorCode(enum.IntEnum):
    """Stable error codes of the worker link (numbers never change)."""

    BAD_FRAME = 1000
    UNSUPPORTED_VERSION = 1001
    FRAME_TOO_LARGE = 1002
    UNKNOWN_MESSAGE = 1003
    RATE_LIMITED = 1004
    UNEXPECTED_MESSAGE = 1005
    AUTH_FAILED = 2000
    KEY_MISMATCH = 2003
    REVOKED = 2005
    CSR_INVALID = 2006
    PROOF_INVALID = 2007
    LEASE_UNKNOWN = 3010
    INTERNAL = 5000
    SHUTTING_DOWN = 5001


class Message(_Struct, tag_field="type", frozen=True, kw_only=True):
    """Base of every worker-link message."""


class Error(Message, tag="error", frozen=True, kw_only=True):
    code: ErrorCode
    message: Text = ""
    ref: FrameId = 0


class Ping(Message, tag="ping", frozen=True, kw_only=True):
    nonce: Nonce


class Pong(Message, tag="pong", frozen=True, kw_only=True):
    nonce: Nonce


class GpuSlot(_Struct, frozen=True, kw_only=True):
    """One GPU of a worker as it reports it."""

    uuid: DeviceUuid
    pci_bus_id: PciBusId
    name: Name
    mem_bytes: Annotated[int, Meta(ge=0, le=_I63)]
    state: GpuState


class Capacity(_Struct, frozen=True, kw_only=True):
    """What the worker can give leased VMs in total (beyond its GPUs)."""

    vcpus: Annotated[int, Meta(ge=0, le=65536)]
    memory_mib: Annotated[int, Meta(ge=0, le=2**40)]
    disk_gib: Annotated[int, Meta(ge=0, le=2**30)]


class LeaseHealth(_Struct, frozen=True, kw_only=True):
    """A lease's VM as the worker sees it: ``running`` confirms it alive right now."""

    lease_id: LeaseId
    state: HealthState
    detail: Text = ""


_Gpus = Annotated[list[GpuSlot], Meta(max_length=MAX_LEASE_DEVICES)]
_Health = Annotated[list[LeaseHealth], Meta(max_length=MAX_LEASES_PER_WORKER)]


def _check_worker_state(gpus: list[GpuSlot], leases: list[LeaseHealth]) -> None:
    _unique([g.uuid for g in gpus], "gpu uuid")
    _unique([g.pci_bus_id.lower() for g in gpus], "gpu pci_bus_id")
    _unique([h.lease_id for h in leases], "lease_id")


# --------------------------------------------------------------------------------------------
# worker -> gateway


class Hello(Message, tag="hello", frozen=True, kw_only=True):
    worker_id: WorkerId
    agent_version: AgentVersion
    gpus: _Gpus = []
    capacity: Capacity
    leases: _Health = []
    """Every lease VM the worker holds, so the gateway can reconcile after a reconnect."""

    def __post_init__(self) -> None:
        _check_worker_state(self.gpus, self.leases)


class Heartbeat(Message, tag="heartbeat", frozen=True, kw_only=True):
    gpus: _Gpus = []
    leases: _Health = []

    def __post_init__(self) -> None:
        _check_worker_state(self.gpus, self.leases)


class LeaseStarted(Message, tag="lease_started", frozen=True, kw_only=True):
    lease_id: LeaseId
    ssh_host: Host
    ssh_port: Annotated[int, Meta(ge=1, le=65535)]
    ssh_user: UnixUser


class LeaseFailed(Message, tag="lease_failed", frozen=True, kw_only=True):
    lease_id: LeaseId
    reason: Text


class LeaseStopped(Message, tag="lease_stopped", frozen=True, kw_only=True):
    lease_id: LeaseId


class RenewCert(Message, tag="renew_cert", frozen=True, kw_only=True):
    """A CSR for a new certificate (CN = worker_id) and the worker key's proof."""

    csr_pem: Pem
    proof: Signature


# --------------------------------------------------------------------------------------------
# gateway -> worker


class Welcome(Message, tag="welcome", frozen=True, kw_only=True):
    session_id: SessionId
    heartbeat_interval_s: Annotated[float, Meta(gt=0, le=3600)]
    cert_not_after: Time
    """When the certificate this session was opened with expires (renew before)."""


class StartLease(Message, tag="start_lease", frozen=True, kw_only=True):
    lease_id: LeaseId
    device_uuids: DeviceList
    ssh_public_key: Annotated[str, Meta(min_length=1, max_length=MAX_SSH_KEY_BYTES)]
    vcpus: Annotated[int, Meta(ge=1, le=65536)]
    memory_mib: Annotated[int, Meta(ge=1, le=2**40)]
    disk_gib: Annotated[int, Meta(ge=1, le=2**30)]
    ends_at: Time

    def __post_init__(self) -> None:
        _unique(self.device_uuids, "device uuid")


class ExtendLease(Message, tag="extend_lease", frozen=True, kw_only=True):
    lease_id: LeaseId
    ends_at: Time


class StopLease(Message, tag="stop_lease", frozen=True, kw_only=True):
    lease_id: LeaseId
    reason: Text = ""


class CertRenewed(Message, tag="cert_renewed", frozen=True, kw_only=True):
    cert_pem: Pem
    not_after: Time


# --------------------------------------------------------------------------------------------
# Envelope and codec


class Frame(_Struct, frozen=True, kw_only=True):
    v: int = PROTOCOL_VERSION
    id: FrameId = 0
    msg: Message


class Direction(enum.Enum):
    UP = "up"
    """worker -> gateway"""
    DOWN = "down"
    """gateway -> worker"""


UP: Final = Direction.UP
DOWN: Final = Direction.DOWN

_MESSAGES: Final[dict[Direction, tuple[type[Message], ...]]] = {
    UP: (Hello, Heartbeat, LeaseStarted, LeaseFailed, LeaseStopped, RenewCert, Pong, Error),
    DOWN: (Welcome, StartLease, ExtendLease, StopLease, CertRenewed, Ping, Error),
}
_CODEC: Final = FrameCodec(
    PROTOCOL_VERSION,
    _MESSAGES,
    {UP: MAX_UP_BYTES, DOWN: MAX_DOWN_BYTES},
    describe=lambda direction: direction.value,
)
_ENCODER: Final = msgspec.msgpack.Encoder()


class ProtocolError(Exception):
    """A frame that cannot be accepted; ``code``/``message`` go back to the peer."""

    def __init__(self, code: ErrorCode, message: str, *, ref: int = 0) -> None:
        message = message.encode("ascii", "backslashreplace").decode("ascii")
        message = "".join(c if " " <= c <= "~" else " " for c in message)[:256]
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.ref = ref

    def to_error(self) -> Error:
        return Error(code=self.code, message=self.message, ref=self.ref)


def encode(frame: Frame) -> bytes:
    return _ENCODER.encode(frame)


def decode(direction: Direction, data: bytes | bytearray | memoryview) -> Frame:
    """One frame travelling in ``direction``; :class:`ProtocolError` for anything else.

    The worker links' codec (:class:`~byteleap.core.wire.FrameCodec`) does the work; its framing
    codes are the same numbers here.
    """
    try:
        frame_id, msg = _CODEC.decode(direction, data)
    except WireError as exc:
        raise ProtocolError(ErrorCode(exc.code), exc.message, ref=exc.ref) from None
    return Frame(id=frame_id, msg=msg)


# --------------------------------------------------------------------------------------------
# Proofs


def enroll_proof_message(token: str, csr_der: bytes) -> bytes:
    """What the worker key signs to enroll: domain, SHA-256 of the token, the CSR's DER."""
    return ENROLL_PROOF_DOMAIN + hashlib.sha256(token.encode("utf-8")).digest() + csr_der


def renew_proof_message(session_id: bytes, csr_der: bytes) -> bytes:
    """What the worker key signs to renew in-session: domain, the session id, the CSR's DER."""
    return RENEW_PROOF_DOMAIN + session_id + csr_der


# --------------------------------------------------------------------------------------------
# SSH public keys


class SshKeyError(ValueError):
    """The renter's SSH public key is not one we hand to a VM."""


_SSH_TYPES: Final = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
)
_COMMENT: Final = re.compile(r"\A[A-Za-z0-9@._+=:,/-][A-Za-z0-9@._+=:,/ -]{0,127}\Z")


def normalize_ssh_public_key(text: str) -> str:
    """``type base64 [comment]`` on one line, re-encoded from the parsed key.

    Accepts ssh-ed25519, ecdsa-sha2-nistp{256,384,521} and ssh-rsa of at least
    :data:`MIN_RSA_BITS` bits; refuses several lines, ``authorized_keys`` options, odd comments
    and anything that does not parse. The result is what goes into the VM.
    """
    if len(text.encode("utf-8", "replace")) > MAX_SSH_KEY_BYTES:
        raise SshKeyError(f"SSH public key is longer than {MAX_SSH_KEY_BYTES} bytes")
    line = text.strip()
    if not line or any(c in line for c in "\r\n\x00"):
        raise SshKeyError("SSH public key must be exactly one line")
    if not line.isascii() or not line.isprintable():
        raise SshKeyError("SSH public key holds characters outside printable ASCII")
    parts = line.split(None, 2)
    if len(parts) < 2 or parts[0] not in _SSH_TYPES:
        raise SshKeyError(
            "SSH public key must start with one of " + ", ".join(_SSH_TYPES) + " (no options)"
        )
    kind, blob = parts[0], parts[1]
    comment = parts[2].strip() if len(parts) == 3 else ""
    if comment and not _COMMENT.match(comment):
        raise SshKeyError("SSH key comment may hold letters, digits and @._+=:,/- (128 at most)")
    try:
        raw = base64.b64decode(blob, validate=True)
        key = serialization.load_ssh_public_key(f"{kind} {blob}".encode("ascii"))
    except (binascii.Error, ValueError, UnsupportedAlgorithm):
        raise SshKeyError(f"SSH public key does not parse as {kind}") from None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise SshKeyError(f"RSA SSH keys need at least {MIN_RSA_BITS} bits, got {key.key_size}")
    elif not isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
        raise SshKeyError(f"unsupported SSH key type {kind}")
    canonical = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if canonical.split()[1] != base64.b64encode(raw):
        raise SshKeyError("SSH public key blob is not in canonical form")
    return canonical.decode("ascii") + (f" {comment}" if comment else "")


# --------------------------------------------------------------------------------------------
# HTTP API bodies


class ApiError(_Struct, frozen=True, kw_only=True):
    error: str
    message: str


class TokenRequest(_Struct, frozen=True, kw_only=True):
    worker_id: WorkerId
    miner_hotkey: Hotkey


class TokenResponse(_Struct, frozen=True, kw_only=True):
    token: str
    expires_at: float
    enroll_url: str
    ws_url: str
    ca_pem: str
    gateway_id: GatewayId


class EnrollRequest(_Struct, frozen=True, kw_only=True):
    worker_id: WorkerId
    worker_public_key: PublicKey
    csr_pem: Pem
    proof: Signature


class EnrollResponse(_Struct, frozen=True, kw_only=True):
    cert_pem: str
    ca_pem: str
    not_after: float
    ws_url: str


class LeaseRequest(_Struct, frozen=True, kw_only=True):
    gpus: Annotated[int, Meta(ge=1, le=MAX_LEASE_DEVICES)]
    worker_id: WorkerId | None = None
    ssh_public_key: Annotated[str, Meta(min_length=1, max_length=MAX_SSH_KEY_BYTES)]
    duration_s: Seconds


class ExtendRequest(_Struct, frozen=True, kw_only=True):
    duration_s: Seconds


class SshEndpoint(_Struct, frozen=True, kw_only=True):
    host: str
    port: int
    user: str


class LeaseView(_Struct, frozen=True, kw_only=True):
    lease_id: str
    state: LeaseState
    worker_id: str
    device_uuids: list[str]
    created_at: float
    ends_at: float
    started_at: float | None = None
    ended_at: float | None = None
    ssh: SshEndpoint | None = None
    end_reason: str | None = None
    message: str = ""


class LeaseList(_Struct, frozen=True, kw_only=True):
    leases: list[LeaseView]


class GpuView(_Struct, frozen=True, kw_only=True):
    uuid: str
    name: str
    mem_bytes: int
    state: Literal["idle", "leased", "busy", "unavailable"]


class WorkerGpus(_Struct, frozen=True, kw_only=True):
    worker_id: str
    idle: int
    gpus: list[GpuView]


class GpusResponse(_Struct, frozen=True, kw_only=True):
    workers: list[WorkerGpus]
