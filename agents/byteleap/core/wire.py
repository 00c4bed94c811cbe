"""Typed, versioned wire messages for the worker<->miner and miner<->validator links.

Framing
-------
Every WebSocket message carries exactly one MessagePack-encoded :class:`Frame` (inside the secure
session's AEAD record)::

    Frame{v: int, id: int, msg: {"type": "<tag>", ...fields}}

``v`` is the protocol version, ``id`` the correlation id (0 = none; ids fit an int64): a request
that expects an answer carries a fresh non-zero id and the answer (or an :class:`Error`) repeats
it. ``msg`` is a tagged union (tag field ``"type"``, short snake_case tags) of the messages allowed
on one *link* in one *direction*:

* :attr:`Link.WORKER_MINER`: ``Direction.UP`` is worker->miner, ``Direction.DOWN`` miner->worker;
* :attr:`Link.MINER_VALIDATOR`: ``Direction.UP`` is miner->validator, ``Direction.DOWN``
  validator->miner.

``UP`` always points from the peer that dials out (worker, miner) to the one it dials.
Structs are encoded as maps keyed by field name; bytes fields are raw MessagePack ``bin``.

Decoding is strict: a frame is refused for any unknown message tag, a message that is not allowed
on that link and direction, an unknown or missing field, a wrong type, or a value outside its
bounds (ids and keys have fixed lengths, ``n`` is a multiple of 64 in [64, 65536], at most 256 rows
are requested or revealed, every list is capped). :func:`decode` raises only :class:`WireError`,
whose :class:`ErrorCode` the receiver sends back in an :class:`Error` before it drops the frame
(or the connection).

Versioning
----------
``PROTOCOL_VERSION`` is a major version. Because decoding is strict, there are no compatible minor
changes: adding a message, a field or an error code bumps it. A peer that receives a frame with
another ``v`` answers ``Error(UNSUPPORTED_VERSION)`` in its own version and closes the connection;
the other side reads the refusal's ``v`` from the :class:`WireError` it gets (``peer_version``).
The envelope (``v``, ``id``, ``msg.type``) and the :class:`Error` message are frozen for all
versions so that the refusal stays readable.

Size limits
-----------
The size of a frame is checked before any parsing, against a limit per link and direction:

* UP on both links: 8 MiB. A reveal carries k rows of n float32 values plus their Merkle paths:
  k=16 rows at n=32768 are 2 MiB (n=65536: 4 MiB); a roster of 100 workers with every
  inventory field at its maximum is about 3.1 MiB. :func:`reveal_frame_bound` gives a tight upper
  bound for a reveal so a validator can refuse an (n, k) that would not fit (n=65536 allows k<=31).
* validator->miner: 8 MiB as well; at their worst (100 workers x 32 devices, 256 rows each) a
  challenge batch is about 1 MiB and a reveal batch about 2.9 MiB.
* miner->worker: 64 KiB. Only control messages travel down to a worker (a reveal request of 256
  rows is under 1 KiB), so a compromised or buggy miner cannot make a worker buffer megabytes.

Strings that end up in logs (model names, versions, device ids, error messages) are restricted to
printable ASCII.

Gateway enrollment
------------------
A worker obtains a gateway's one-time enrollment token through its miner and a validator
(docs/worker-miner.md, docs/miner-validator.md): ``GatewayEnrollRequest`` (worker->miner, no
fields: the miner knows who asks from the session), ``GatewayTokenRequest{worker_id}``
(miner->validator), answered by ``GatewayTokenGrant`` and ``GatewayEnrollGrant`` carrying the same
:class:`GatewayGrant`, or by an :class:`Error` (``NO_GATEWAY``, ``GATEWAY_UNAVAILABLE``,
``GATEWAY_REFUSED``, ``NO_VALIDATOR``, ``RATE_LIMITED``).
"""

from __future__ import annotations

import enum
import functools
import operator
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, Final, Generic, TypeVar

import msgspec
from msgspec import Meta

from .challenge import spec as _challenge
from .challenge.spec import ChallengeSpec, Precision

__all__ = [
    "CPU_DEVICE",
    "MAX_BATCH_DEVICES",
    "MAX_DEVICES_PER_WORKER",
    "MAX_ERROR_MESSAGE",
    "MAX_FRAME_BYTES",
    "MAX_MERKLE_DEPTH",
    "MAX_N",
    "MAX_REVEAL_ROWS",
    "MAX_WORKERS_PER_MINER",
    "MINER_TO_VALIDATOR_MAX_BYTES",
    "MINER_TO_WORKER_MAX_BYTES",
    "MIN_N",
    "N_MULTIPLE",
    "PROTOCOL_VERSION",
    "VALIDATOR_TO_MINER_MAX_BYTES",
    "WORKER_TO_MINER_MAX_BYTES",
    "AgentVersion",
    "ChallengeBatch",
    "ChallengeCommit",
    "ChallengeId",
    "ChallengeRelease",
    "ChallengeRequest",
    "ChallengeReveal",
    "CodedError",
    "DeadlineMs",
    "DeviceChallenge",
    "DeviceCommit",
    "DeviceFailure",
    "DeviceReveal",
    "DeviceRevealRequest",
    "DeviceUuid",
    "Digest",
    "Direction",
    "Disk",
    "EchoReply",
    "EchoRequest",
    "ElapsedMs",
    "EnrollProof",
    "Error",
    "ErrorCode",
    "Frame",
    "FrameCodec",
    "GatewayEnrollGrant",
    "GatewayEnrollRequest",
    "GatewayGrant",
    "GatewayTokenGrant",
    "GatewayTokenRequest",
    "GpuInfo",
    "GpuLive",
    "Heartbeat",
    "Hotkey",
    "Inventory",
    "InventoryUpdate",
    "Link",
    "MatrixSize",
    "Message",
    "MinerHello",
    "Nic",
    "Nonce",
    "Ping",
    "Pong",
    "Precision",
    "Register",
    "RegisterAck",
    "ReleaseBatch",
    "RevealBatch",
    "RevealRequest",
    "RevealedRow",
    "RoundId",
    "RowIndex",
    "Seed",
    "WireError",
    "WorkerId",
    "WorkerRoster",
    "WorkerSummary",
    "decode",
    "encode",
    "max_frame_bytes",
    "message_types",
    "reveal_frame_bound",
]

PROTOCOL_VERSION: Final = 2

# Session prologues: a secure session is bound to the link it was opened for.
WORKER_MINER_PROLOGUE: Final = b"byteleap/worker-miner/v1"
MINER_VALIDATOR_PROLOGUE: Final = b"byteleap/miner-validator/v1"

_KIB: Final = 1024
_MIB: Final = 1024 * _KIB
WORKER_TO_MINER_MAX_BYTES: Final = 8 * _MIB
MINER_TO_WORKER_MAX_BYTES: Final = 64 * _KIB
MINER_TO_VALIDATOR_MAX_BYTES: Final = 8 * _MIB
VALIDATOR_TO_MINER_MAX_BYTES: Final = 8 * _MIB
MAX_FRAME_BYTES: Final = max(
    WORKER_TO_MINER_MAX_BYTES,
    MINER_TO_WORKER_MAX_BYTES,
    MINER_TO_VALIDATOR_MAX_BYTES,
    VALIDATOR_TO_MINER_MAX_BYTES,
)
"""The largest frame any direction accepts (for transport buffers)."""

# Challenge bounds come from the challenge spec so the wire cannot accept what a prover refuses.
MIN_N: Final = _challenge.MIN_N
MAX_N: Final = _challenge.MAX_N
N_MULTIPLE: Final = _challenge.N_MULTIPLE
MAX_REVEAL_ROWS: Final = _challenge.MAX_SAMPLE_ROWS
MAX_MERKLE_DEPTH: Final = 32  # a tree of MAX_N leaves needs 16; leaves headroom, still bounded
CPU_DEVICE: Final = "cpu-0"
"""The device name of every worker's CPU prover. Not unique across the network (unlike GPU
UUIDs), so it never takes part in the validator's first-claim-wins device check."""
MAX_WORKERS_PER_MINER: Final = 100
MAX_DEVICES_PER_WORKER: Final = 32
MAX_BATCH_DEVICES: Final = MAX_WORKERS_PER_MINER * MAX_DEVICES_PER_WORKER
MAX_ERROR_MESSAGE: Final = 512
_I63_MAX: Final = 2**63 - 1  # msgspec bounds must fit an int64

# --------------------------------------------------------------------------------------------
# Field types. Patterns use \A...\Z: with ^...$ Python's re also accepts a trailing newline.

_PRINTABLE = r"\A[ -~]*\Z"

WorkerId = Annotated[str, Meta(pattern=r"\A[0-9a-f]{32}\Z")]
"""32 lowercase hex characters derived from the worker's Ed25519 public key."""
DeviceUuid = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"\A[A-Za-z0-9._:-]+\Z")]
"""Device identifier, e.g. ``GPU-8f6c...`` (NVIDIA UUID), ``MIG-...`` or ``cpu-0``."""
Hotkey = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"\A[1-9A-HJ-NP-Za-km-z]+\Z")]
"""An ss58 address (base58 alphabet); the checksum is checked by the identity layer."""
AgentVersion = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"\A[0-9A-Za-z.+~_-]+\Z")]
ChallengeId = Annotated[
    bytes, Meta(min_length=_challenge.CHALLENGE_ID_SIZE, max_length=_challenge.CHALLENGE_ID_SIZE)
]
Seed = Annotated[bytes, Meta(min_length=_challenge.SEED_SIZE, max_length=_challenge.SEED_SIZE)]
Digest = Annotated[bytes, Meta(min_length=32, max_length=32)]
"""A 32-byte hash (Merkle root or node) or MAC."""
MatrixSize = Annotated[int, Meta(ge=MIN_N, le=MAX_N, multiple_of=N_MULTIPLE)]
RowIndex = Annotated[int, Meta(ge=0, lt=MAX_N)]
Nonce = Annotated[int, Meta(ge=0, le=_I63_MAX)]
RoundId = Annotated[int, Meta(ge=0, le=_I63_MAX)]
DeadlineMs = Annotated[int, Meta(ge=1, le=3_600_000)]
"""Time budget in milliseconds from receipt (relative: peers' clocks are not trusted)."""
ElapsedMs = Annotated[int, Meta(ge=0, le=2**32 - 1)]
_FrameId = Annotated[int, Meta(ge=0, le=_I63_MAX)]
_ByteCount = Annotated[int, Meta(ge=0, le=_I63_MAX)]
_Name = Annotated[str, Meta(max_length=64, pattern=_PRINTABLE)]
_Text = Annotated[str, Meta(max_length=256, pattern=_PRINTABLE)]
_ErrorText = Annotated[str, Meta(max_length=MAX_ERROR_MESSAGE, pattern=_PRINTABLE)]
_RowValues = Annotated[bytes, Meta(min_length=MIN_N * 4, max_length=MAX_N * 4)]
_MerklePath = Annotated[list[Digest], Meta(max_length=MAX_MERKLE_DEPTH)]
_RowList = Annotated[list[RowIndex], Meta(min_length=1, max_length=MAX_REVEAL_ROWS)]
_UnixTime = Annotated[float, Meta(ge=0.0, le=2.0**40)]
_GatewayToken = Annotated[str, Meta(pattern=r"\A[A-Za-z0-9_-]{8,128}\Z")]
"""A gateway enrollment token: what an ``Authorization: Bearer`` header may carry."""
_HttpsUrl = Annotated[str, Meta(max_length=512, pattern=r"\Ahttps://[!-~]+\Z")]
_WssUrl = Annotated[str, Meta(max_length=512, pattern=r"\Awss://[!-~]+\Z")]
_CaPem = Annotated[str, Meta(max_length=8192, pattern=r"\A-----BEGIN CERTIFICATE-----\n[ -~\n]*\Z")]
_GatewayId = Annotated[str, Meta(pattern=r"\A[0-9a-f]{32}\Z")]


class _Struct(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of every wire struct: immutable, strict, encoded as a map."""


class Message(_Struct, tag_field="type", frozen=True, kw_only=True):
    """Base of every message; concrete subclasses carry a ``tag``."""


def _unique(values: Iterable[object], what: str) -> None:
    seen: set[object] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"duplicate {what} {value!r}")
        seen.add(value)


# --------------------------------------------------------------------------------------------
# Shared parts


@enum.unique
class ErrorCode(enum.IntEnum):
    """Stable error codes. Never renumber; ranges group them by layer.

    1xxx framing/protocol, 2xxx authentication/admission, 3xxx challenges and devices,
    4xxx gateway enrollment, 5xxx internal.
    """

    BAD_FRAME = 1000
    UNSUPPORTED_VERSION = 1001
    FRAME_TOO_LARGE = 1002
    UNKNOWN_MESSAGE = 1003
    RATE_LIMITED = 1004
    UNEXPECTED_MESSAGE = 1005
    """Well-formed, but not valid in the session's current state (e.g. Register before enroll)."""

    AUTH_FAILED = 2000
    NOT_ENROLLED = 2001
    CAPACITY_REACHED = 2002
    KEY_MISMATCH = 2003
    NOT_PERMITTED = 2004
    """Authenticated, but not allowed: hotkey not registered, no validator permit, low stake."""

    CHALLENGE_INVALID = 3000
    DEVICE_BUSY = 3001
    DEVICE_LEASED = 3002
    CHALLENGE_UNKNOWN = 3003
    CHALLENGE_EXPIRED = 3004
    DEVICE_UNKNOWN = 3005
    WORKER_OFFLINE = 3006

    NO_GATEWAY = 4000
    """The validator has no gateway configured."""
    GATEWAY_UNAVAILABLE = 4001
    """The gateway (or the validator asking it) did not answer: down, TLS failure, timeout."""
    GATEWAY_REFUSED = 4002
    """The gateway answered with a refusal (revoked worker, bad validator key...)."""
    NO_VALIDATOR = 4003
    """The miner has no connected validator that could ask a gateway."""

    INTERNAL = 5000
    SHUTTING_DOWN = 5001


class Error(Message, tag="error", frozen=True, kw_only=True):
    """Refusal of a frame. ``ref`` is the id of the frame refused (0 if unknown).

    Its frame carries the same id when the error answers a request, so ``ref`` only matters
    when the error is logged or sent unsolicited (e.g. just before a close).
    """

    code: ErrorCode
    message: _ErrorText = ""
    ref: _FrameId = 0


class Ping(Message, tag="ping", frozen=True, kw_only=True):
    """Echo request; measures the round trip of a path (the validator's timing uses it)."""

    nonce: Nonce


class Pong(Message, tag="pong", frozen=True, kw_only=True):
    nonce: Nonce


class Disk(_Struct, frozen=True, kw_only=True):
    name: _Name
    model: _Text = ""
    size_bytes: _ByteCount
    rotational: bool = False


class Nic(_Struct, frozen=True, kw_only=True):
    name: _Name
    speed_mbps: Annotated[int, Meta(ge=0, le=10_000_000)] = 0
    """0 when unknown."""


class GpuInfo(_Struct, frozen=True, kw_only=True):
    uuid: DeviceUuid
    name: _Text
    mem_bytes: _ByteCount
    pci_bus_id: Annotated[
        str, Meta(pattern=r"\A[0-9a-fA-F]{4,8}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]\Z")
    ]
    driver_version: Annotated[str, Meta(max_length=32, pattern=_PRINTABLE)] = ""
    """Host driver version; empty when unknown (e.g. bound to vfio-pci)."""
    compute_capability: Annotated[str, Meta(pattern=r"\A(?:[0-9]{1,2}\.[0-9]{1,2})?\Z")] = ""
    """``major.minor``; empty when unknown (e.g. bound to vfio-pci)."""
    vfio_bound: bool = False


class Inventory(_Struct, frozen=True, kw_only=True):
    cpu_model: _Text
    cpu_cores: Annotated[int, Meta(ge=1, le=65536)]
    mem_bytes: _ByteCount
    disks: Annotated[list[Disk], Meta(max_length=32)] = []
    nics: Annotated[list[Nic], Meta(max_length=32)] = []
    gpus: Annotated[list[GpuInfo], Meta(max_length=MAX_DEVICES_PER_WORKER)] = []

    def __post_init__(self) -> None:
        _unique((gpu.uuid for gpu in self.gpus), "gpu uuid")


class GpuLive(_Struct, frozen=True, kw_only=True):
    uuid: DeviceUuid
    util_pct: Annotated[int, Meta(ge=0, le=100)]
    mem_used_bytes: _ByteCount
    temp_c: Annotated[int, Meta(ge=-64, le=255)]


class RevealedRow(_Struct, frozen=True, kw_only=True):
    """Row ``index`` of C: n float32 little-endian values and the leaf's Merkle siblings."""

    index: RowIndex
    values: _RowValues
    path: _MerklePath

    def __post_init__(self) -> None:
        if len(self.values) % (N_MULTIPLE * 4):
            raise ValueError(f"row of {len(self.values)} bytes is not n float32 values")


def _check_rows(rows: list[RevealedRow]) -> None:
    _unique((row.index for row in rows), "row index")
    if rows and any(len(row.values) != len(rows[0].values) for row in rows):
        raise ValueError("revealed rows differ in length")


_RevealedRows = Annotated[list[RevealedRow], Meta(min_length=1, max_length=MAX_REVEAL_ROWS)]

# --------------------------------------------------------------------------------------------
# worker -> miner


class EnrollProof(Message, tag="enroll_proof", frozen=True, kw_only=True):
    """HMAC-SHA256 of the session's channel binding under the miner's enrollment secret."""

    mac: Digest


class Register(Message, tag="register", frozen=True, kw_only=True):
    worker_id: WorkerId
    agent_version: AgentVersion
    inventory: Inventory


class InventoryUpdate(Message, tag="inventory_update", frozen=True, kw_only=True):
    inventory: Inventory


class Heartbeat(Message, tag="heartbeat", frozen=True, kw_only=True):
    uptime_s: Annotated[float, Meta(ge=0, le=1e10)]
    load1: Annotated[float, Meta(ge=0, le=1e6)]
    mem_used_bytes: _ByteCount
    gpus: Annotated[list[GpuLive], Meta(max_length=MAX_DEVICES_PER_WORKER)] = []
    leased_devices: Annotated[list[DeviceUuid], Meta(max_length=MAX_DEVICES_PER_WORKER)] = []
    """GPUs (by their inventory uuid) that this worker's leased VMs hold right now; the miner
    keeps those its inventory lists and reports them in the roster's ``leased_devices``."""


class ChallengeCommit(Message, tag="challenge_commit", frozen=True, kw_only=True):
    challenge_id: ChallengeId
    device_uuid: DeviceUuid
    merkle_root: Digest
    elapsed_ms: ElapsedMs


class ChallengeReveal(Message, tag="challenge_reveal", frozen=True, kw_only=True):
    challenge_id: ChallengeId
    device_uuid: DeviceUuid
    rows: _RevealedRows

    def __post_init__(self) -> None:
        _check_rows(self.rows)


class GatewayEnrollRequest(Message, tag="gateway_enroll_request", frozen=True, kw_only=True):
    """Ask for a gateway enrollment token. No fields: the miner names the worker by its session."""


# --------------------------------------------------------------------------------------------
# Gateway grants (travel validator -> miner -> worker)


class GatewayGrant(_Struct, frozen=True, kw_only=True):
    """A gateway's one-time enrollment token and where to use it (the gateway's TokenResponse).

    ``ca_pem`` is the gateway CA the validator pins for that gateway: the worker trusts only it
    when it enrolls at ``enroll_url`` and connects to ``ws_url``.
    """

    gateway_id: _GatewayId
    token: _GatewayToken
    expires_at: _UnixTime
    enroll_url: _HttpsUrl
    ws_url: _WssUrl
    ca_pem: _CaPem


# --------------------------------------------------------------------------------------------
# miner -> worker


class RegisterAck(Message, tag="register_ack", frozen=True, kw_only=True):
    worker_id: WorkerId
    heartbeat_interval_s: Annotated[float, Meta(gt=0, le=3600)]


class ChallengeRequest(Message, tag="challenge_request", frozen=True, kw_only=True):
    challenge_id: ChallengeId
    seed: Seed
    miner_hotkey: Hotkey
    device_uuid: DeviceUuid
    n: MatrixSize
    precision: Precision
    deadline_ms: DeadlineMs

    @classmethod
    def from_spec(cls, spec: ChallengeSpec, deadline_ms: int) -> ChallengeRequest:
        """The request that asks a worker to prove ``spec`` (its worker id is the recipient)."""
        return cls(
            challenge_id=spec.challenge_id,
            seed=spec.seed,
            miner_hotkey=spec.miner_hotkey,
            device_uuid=spec.device_uuid,
            n=spec.n,
            precision=spec.precision,
            deadline_ms=deadline_ms,
        )

    def spec(self, worker_id: str) -> ChallengeSpec:
        """The challenge this request describes, for the worker ``worker_id`` that received it.

        Raises ``ChallengeError`` for a request no prover can run (e.g. built without
        decoding, so the wire constraints were not checked).
        """
        return ChallengeSpec(
            challenge_id=self.challenge_id,
            seed=self.seed,
            miner_hotkey=self.miner_hotkey,
            worker_id=worker_id,
            device_uuid=self.device_uuid,
            n=self.n,
            precision=self.precision,
        )


class RevealRequest(Message, tag="reveal_request", frozen=True, kw_only=True):
    challenge_id: ChallengeId
    device_uuid: DeviceUuid
    rows: _RowList

    def __post_init__(self) -> None:
        _unique(self.rows, "row index")


class ChallengeRelease(Message, tag="challenge_release", frozen=True, kw_only=True):
    """Phase 2 is over (or abandoned): the worker frees the result."""

    challenge_id: ChallengeId


class GatewayEnrollGrant(Message, tag="gateway_enroll_grant", frozen=True, kw_only=True):
    """The answer to a ``GatewayEnrollRequest`` (same frame id): a token bound to ``worker_id``."""

    worker_id: WorkerId
    grant: GatewayGrant


# --------------------------------------------------------------------------------------------
# miner -> validator


class MinerHello(Message, tag="miner_hello", frozen=True, kw_only=True):
    miner_hotkey: Hotkey
    agent_version: AgentVersion


class WorkerSummary(_Struct, frozen=True, kw_only=True):
    worker_id: WorkerId
    online: bool
    leased_devices: Annotated[list[DeviceUuid], Meta(max_length=MAX_DEVICES_PER_WORKER)] = []
    inventory: Inventory


class WorkerRoster(Message, tag="worker_roster", frozen=True, kw_only=True):
    """The miner's full worker list (replaces the previous one)."""

    workers: Annotated[list[WorkerSummary], Meta(max_length=MAX_WORKERS_PER_MINER)]

    def __post_init__(self) -> None:
        _unique((w.worker_id for w in self.workers), "worker_id")


class DeviceCommit(Message, tag="device_commit", frozen=True, kw_only=True):
    challenge_id: ChallengeId
    worker_id: WorkerId
    device_uuid: DeviceUuid
    merkle_root: Digest
    elapsed_ms: ElapsedMs


class DeviceReveal(Message, tag="device_reveal", frozen=True, kw_only=True):
    challenge_id: ChallengeId
    worker_id: WorkerId
    device_uuid: DeviceUuid
    rows: _RevealedRows

    def __post_init__(self) -> None:
        _check_rows(self.rows)


class DeviceFailure(Message, tag="device_failure", frozen=True, kw_only=True):
    """One device of a batch could not be challenged or revealed (busy, leased, offline...)."""

    challenge_id: ChallengeId
    worker_id: WorkerId
    device_uuid: DeviceUuid
    code: ErrorCode
    message: _ErrorText = ""


class EchoReply(Message, tag="echo_reply", frozen=True, kw_only=True):
    """The miner relayed an :class:`EchoRequest` to the worker as a Ping and got its Pong."""

    nonce: Nonce
    worker_id: WorkerId


class GatewayTokenRequest(Message, tag="gateway_token_request", frozen=True, kw_only=True):
    """One of this miner's workers wants to enroll with the validator's gateway.

    ``worker_id`` comes from the worker's authenticated session at the miner; the validator binds
    the token to it and to the miner hotkey of *this* session.
    """

    worker_id: WorkerId


# --------------------------------------------------------------------------------------------
# validator -> miner


class DeviceChallenge(_Struct, frozen=True, kw_only=True):
    worker_id: WorkerId
    challenge_id: ChallengeId
    seed: Seed
    miner_hotkey: Hotkey
    device_uuid: DeviceUuid
    n: MatrixSize
    precision: Precision
    deadline_ms: DeadlineMs

    def request(self) -> ChallengeRequest:
        """The message the miner forwards to the worker."""
        return ChallengeRequest(**{f: getattr(self, f) for f in ChallengeRequest.__struct_fields__})


class ChallengeBatch(Message, tag="challenge_batch", frozen=True, kw_only=True):
    """All challenges of one round for one miner, dispatched at the same instant."""

    round_id: RoundId
    challenges: Annotated[list[DeviceChallenge], Meta(min_length=1, max_length=MAX_BATCH_DEVICES)]

    def __post_init__(self) -> None:
        _unique((c.challenge_id for c in self.challenges), "challenge_id")
        _unique(((c.worker_id, c.device_uuid) for c in self.challenges), "device")


class DeviceRevealRequest(_Struct, frozen=True, kw_only=True):
    worker_id: WorkerId
    challenge_id: ChallengeId
    device_uuid: DeviceUuid
    rows: _RowList

    def __post_init__(self) -> None:
        _unique(self.rows, "row index")

    def request(self) -> RevealRequest:
        return RevealRequest(
            challenge_id=self.challenge_id, device_uuid=self.device_uuid, rows=self.rows
        )


class RevealBatch(Message, tag="reveal_batch", frozen=True, kw_only=True):
    round_id: RoundId
    requests: Annotated[list[DeviceRevealRequest], Meta(min_length=1, max_length=MAX_BATCH_DEVICES)]

    def __post_init__(self) -> None:
        _unique((r.challenge_id for r in self.requests), "challenge_id")


class ReleaseBatch(Message, tag="release_batch", frozen=True, kw_only=True):
    """The validator is done with these challenges; the miner releases them on the workers."""

    round_id: RoundId
    challenge_ids: Annotated[list[ChallengeId], Meta(min_length=1, max_length=MAX_BATCH_DEVICES)]


class EchoRequest(Message, tag="echo_request", frozen=True, kw_only=True):
    """Measure the validator->miner->worker round trip just before a challenge dispatch."""

    nonce: Nonce
    worker_id: WorkerId


class GatewayTokenGrant(Message, tag="gateway_token_grant", frozen=True, kw_only=True):
    """The answer to a ``GatewayTokenRequest`` (same frame id)."""

    worker_id: WorkerId
    grant: GatewayGrant


# --------------------------------------------------------------------------------------------
# Envelope, links, codec


class Frame(_Struct, frozen=True, kw_only=True):
    """One wire frame. Build with ``Frame(msg=..., id=...)``; ``v`` defaults to this version."""

    v: int = PROTOCOL_VERSION
    id: _FrameId = 0
    msg: Message


class Link(enum.Enum):
    WORKER_MINER = "worker_miner"
    MINER_VALIDATOR = "miner_validator"


class Direction(enum.Enum):
    UP = "up"
    """From the dialing peer: worker->miner, miner->validator."""
    DOWN = "down"
    """Towards the dialing peer: miner->worker, validator->miner."""


_Route = tuple[Link, Direction]
_R = TypeVar("_R")

_MESSAGES: Final[dict[_Route, tuple[type[Message], ...]]] = {
    (Link.WORKER_MINER, Direction.UP): (
        EnrollProof,
        Register,
        InventoryUpdate,
        Heartbeat,
        ChallengeCommit,
        ChallengeReveal,
        GatewayEnrollRequest,
        Pong,
        Error,
    ),
    (Link.WORKER_MINER, Direction.DOWN): (
        RegisterAck,
        ChallengeRequest,
        RevealRequest,
        ChallengeRelease,
        GatewayEnrollGrant,
        Ping,
        Error,
    ),
    (Link.MINER_VALIDATOR, Direction.UP): (
        MinerHello,
        WorkerRoster,
        DeviceCommit,
        DeviceReveal,
        DeviceFailure,
        EchoReply,
        GatewayTokenRequest,
        Pong,
        Error,
    ),
    (Link.MINER_VALIDATOR, Direction.DOWN): (
        ChallengeBatch,
        RevealBatch,
        ReleaseBatch,
        EchoRequest,
        GatewayTokenGrant,
        Ping,
        Error,
    ),
}

_LIMITS: Final[dict[_Route, int]] = {
    (Link.WORKER_MINER, Direction.UP): WORKER_TO_MINER_MAX_BYTES,
    (Link.WORKER_MINER, Direction.DOWN): MINER_TO_WORKER_MAX_BYTES,
    (Link.MINER_VALIDATOR, Direction.UP): MINER_TO_VALIDATOR_MAX_BYTES,
    (Link.MINER_VALIDATOR, Direction.DOWN): VALIDATOR_TO_MINER_MAX_BYTES,
}


def _tag(cls: type[msgspec.Struct]) -> str:
    tag = cls.__struct_config__.tag
    assert isinstance(tag, str)
    return tag


def _envelope_type(types: tuple[type[msgspec.Struct], ...]) -> Any:
    union = functools.reduce(operator.or_, types)
    return msgspec.defstruct(
        "Envelope",
        [("v", int), ("id", _FrameId), ("msg", union)],
        forbid_unknown_fields=True,
        frozen=True,
    )


_ENCODER: Final = msgspec.msgpack.Encoder()


class _HeaderProbe(msgspec.Struct):
    """Lenient view of a frame used only to classify a failed decode."""

    v: msgspec.Raw = msgspec.Raw(b"")
    id: msgspec.Raw = msgspec.Raw(b"")
    msg: msgspec.Raw = msgspec.Raw(b"")


class _TagProbe(msgspec.Struct):
    type: str


_HEADER_DECODER: Final = msgspec.msgpack.Decoder(_HeaderProbe)
_TAG_DECODER: Final = msgspec.msgpack.Decoder(_TagProbe)
_INT_DECODER: Final = msgspec.msgpack.Decoder(int)


def _ascii_safe(text: str) -> str:
    """``text`` with every character outside printable ASCII escaped (``\\n``, ``\\xe9``...).

    Printable ASCII (backslashes included) is kept as it is, so the result is idempotent.
    """
    if text.isascii() and text.isprintable():
        return text
    return "".join(
        c if " " <= c <= "~" else c.encode("unicode_escape").decode("ascii") for c in text
    )


class CodedError(Exception):
    """A refusal that maps to a wire :class:`Error`: ``code`` for the peer, ``message`` for people.

    Base of every agent-side refusal (registry, relay, challenge runner) so each one reports
    itself to the peer the same way. ``message`` is made printable ASCII (other characters are
    escaped), as :class:`Error` requires: it may quote peer-supplied text and ends up in logs.
    """

    def __init__(self, code: ErrorCode, message: str, *, ref: int = 0) -> None:
        message = _ascii_safe(message)
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref

    def to_error(self, ref: int | None = None) -> Error:
        """The :class:`Error` message that reports this to the peer (escaped, length-capped)."""
        message = _ascii_safe(self.message)
        if len(message) > MAX_ERROR_MESSAGE:
            message = message[: MAX_ERROR_MESSAGE - 3] + "..."
        return Error(code=self.code, message=message, ref=self.ref if ref is None else ref)


class WireError(CodedError):
    """A frame that cannot be accepted. ``code`` is what to send back in an :class:`Error`.

    ``ref`` is the refused frame's id when it could be read (else 0); ``peer_version`` is the
    version the peer speaks, set with ``UNSUPPORTED_VERSION``.
    """

    def __init__(
        self, code: ErrorCode, message: str, *, ref: int = 0, peer_version: int | None = None
    ) -> None:
        super().__init__(code, message, ref=ref)
        self.args = (f"{code.name}: {self.message}",)
        self.peer_version = peer_version


class FrameCodec(Generic[_R]):
    """Strict, size-capped decoding of MessagePack ``{v, id, msg}`` frames.

    One union of tagged message structs and one size limit per route (a link and direction).
    :meth:`decode` raises only :class:`WireError`, with a framing code (``FRAME_TOO_LARGE``,
    ``UNSUPPORTED_VERSION``, ``UNKNOWN_MESSAGE``, ``BAD_FRAME``) and the refused frame's id when
    it could be read. The mechanism behind :func:`decode` and the gateway link's
    (:mod:`byteleap.core.gateway_protocol`); ``describe`` names a route in messages.
    """

    def __init__(
        self,
        version: int,
        messages: Mapping[_R, tuple[type[msgspec.Struct], ...]],
        limits: Mapping[_R, int],
        *,
        describe: Callable[[_R], str],
    ) -> None:
        self.version = version
        self._limits = dict(limits)
        self._describe = describe
        self._decoders: dict[_R, msgspec.msgpack.Decoder[Any]] = {
            route: msgspec.msgpack.Decoder(_envelope_type(types))
            for route, types in messages.items()
        }
        self._tags = {
            route: frozenset(_tag(cls) for cls in types) for route, types in messages.items()
        }
        self._all_tags = frozenset(tag for tags in self._tags.values() for tag in tags)

    def decode(self, route: _R, data: bytes | bytearray | memoryview) -> tuple[int, Any]:
        """``(id, msg)`` of one frame travelling on ``route``; :class:`WireError` for anything
        else."""
        limit = self._limits[route]
        try:
            size = memoryview(data).nbytes
        except TypeError:
            raise WireError(ErrorCode.BAD_FRAME, "frame is not bytes") from None
        if size > limit:
            raise WireError(
                ErrorCode.FRAME_TOO_LARGE, f"frame of {size} bytes exceeds the {limit}-byte limit"
            )
        try:
            envelope = self._decoders[route].decode(data)
        except Exception as exc:  # any failure of an untrusted frame is a WireError
            raise self._classify(route, data, exc) from None
        if envelope.v != self.version:
            raise self._version_error(envelope.v, envelope.id)
        return envelope.id, envelope.msg

    def _version_error(self, version: int, ref: int) -> WireError:
        return WireError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {version} is not supported (this peer speaks {self.version})",
            ref=ref,
            peer_version=version,
        )

    def _classify(
        self, route: _R, data: bytes | bytearray | memoryview, exc: Exception
    ) -> WireError:
        """Turn a failed strict decode into the most specific WireError."""
        detail = str(exc) or type(exc).__name__
        try:
            header = _HEADER_DECODER.decode(data)
        except Exception:  # garbage of any kind
            return WireError(ErrorCode.BAD_FRAME, f"malformed frame: {detail}")
        ref = _probe_int(header.id)
        if ref is None or not 0 <= ref <= _I63_MAX:
            ref = 0
        version = _probe_int(header.v)
        if version is not None and version != self.version:
            return self._version_error(version, ref)
        tag = _probe_tag(header.msg)
        if tag is not None and tag not in self._tags[route]:
            if tag in self._all_tags:
                text = f"message {tag!r} is not accepted on {self._describe(route)}"
            else:
                text = f"unknown message type {tag[:64]!r}"
            return WireError(ErrorCode.UNKNOWN_MESSAGE, text, ref=ref)
        return WireError(ErrorCode.BAD_FRAME, f"invalid frame: {detail}", ref=ref)


def message_types(link: Link, direction: Direction) -> tuple[type[Message], ...]:
    """The message classes accepted on ``link`` in ``direction``."""
    return _MESSAGES[(link, direction)]


def max_frame_bytes(link: Link, direction: Direction) -> int:
    return _LIMITS[(link, direction)]


def reveal_frame_bound(n: int, k: int, *, path_length: int = MAX_MERKLE_DEPTH) -> int:
    """Upper bound on the encoded size of a reveal frame of ``k`` rows of an ``n``-wide result.

    Covers both :class:`ChallengeReveal` and :class:`DeviceReveal`, with every field at its
    maximum size and ``path_length`` siblings per row. Compare with :func:`max_frame_bytes`.
    """
    # Per row: map header + keys (~25 B), index (5 B), bin32 header (5 B) + values, array header
    # (3 B) + siblings as bin8 (2 B + 32 B each).
    per_row = 40 + n * 4 + 3 + path_length * 34
    # Frame and message fields: keys, tags, 64-char ids and hotkeys, 16-byte challenge id.
    overhead = 256
    return overhead + k * per_row


def encode(frame: Frame) -> bytes:
    """MessagePack bytes of ``frame``. Field bounds are enforced by the receiver's decode."""
    return _ENCODER.encode(frame)


_CODEC: Final[FrameCodec[_Route]] = FrameCodec(
    PROTOCOL_VERSION,
    _MESSAGES,
    _LIMITS,
    describe=lambda route: f"{route[0].value}/{route[1].value}",
)


def decode(link: Link, direction: Direction, data: bytes | bytearray | memoryview) -> Frame:
    """Decode one frame received on ``link`` travelling in ``direction``.

    Raises :class:`WireError` (and nothing else) when the frame is too large, of another
    protocol version, carries a message not allowed here, or is malformed in any way.
    """
    frame_id, msg = _CODEC.decode((link, direction), data)
    return Frame(id=frame_id, msg=msg)


def _probe_int(raw: msgspec.Raw) -> int | None:
    if not raw:
        return None
    try:
        return _INT_DECODER.decode(raw)
    except Exception:  # best effort; the strict decoder's error stands
        return None


def _probe_tag(raw: msgspec.Raw) -> str | None:
    if not raw:
        return None
    try:
        return _TAG_DECODER.decode(raw).type
    except Exception:  # best effort (bad UTF-8, nesting...); the strict decoder's error stands
        return None
