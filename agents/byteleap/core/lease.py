"""Signed lease records: what a gateway attests about rented GPUs, and what validators score.

A gateway appends one record per event of a lease to its feed, each with the next sequence
number of that gateway and signed with the gateway's Ed25519 key:

* at start: ``active_until == start``, ``ended`` false;
* at every checkpoint while the lease is confirmed running (the worker reports the VM alive):
  ``active_until`` moves forward;
* at the end (terminated, expired or failed): ``ended`` true, ``active_until`` is the end.

A validator credits a lease with ``[start, active_until]`` of the newest record it holds for that
``(gateway_id, lease_id)``. A gateway that crashes or disappears therefore stops earning its
miners credit at its last checkpoint: credit is never extrapolated. Records are immutable: a
later record supersedes, never edits, an earlier one.

The signature covers ``SIGNATURE_DOMAIN || record`` where ``record`` is the exact JSON bytes that
travel in the feed, so a verifier checks the bytes it received, not a re-encoding of them.
``gateway_id`` is derived from the public key (:func:`gateway_id_of`): a record signed by one key
cannot claim another gateway's id.
"""

from __future__ import annotations

import hashlib
import math
from typing import Annotated, Final

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from msgspec import Meta

from .wire import DeviceUuid, Hotkey, WorkerId

__all__ = [
    "MAX_FEED_PAGE",
    "MAX_LEASE_DEVICES",
    "SIGNATURE_DOMAIN",
    "FeedPage",
    "LeaseRecord",
    "LeaseRecordError",
    "SignedLeaseRecord",
    "gateway_id_of",
    "sign_record",
    "verify_record",
]

SIGNATURE_DOMAIN: Final = b"byteleap/lease-record/v1\x00"
GATEWAY_ID_DOMAIN: Final = b"byteleap/gateway-id/v1"
MAX_LEASE_DEVICES: Final = 32
MAX_FEED_PAGE: Final = 1000
"""Most records in one feed page; a reader pages on with ``next_seq``."""
_MAX_RECORD_BYTES: Final = 16 * 1024

GatewayId = Annotated[str, Meta(pattern=r"\A[0-9a-f]{32}\Z")]
LeaseId = Annotated[str, Meta(pattern=r"\A[0-9a-f]{32}\Z")]
Seq = Annotated[int, Meta(ge=1, le=2**63 - 1)]
UnixTime = Annotated[float, Meta(ge=0.0, le=2.0**40)]


class LeaseRecordError(Exception):
    """A record that does not decode, does not verify, or does not make sense."""


class LeaseRecord(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One gateway's statement about one lease at one moment."""

    gateway_id: GatewayId
    seq: Seq
    lease_id: LeaseId
    miner_hotkey: Hotkey
    worker_id: WorkerId
    device_uuids: Annotated[list[DeviceUuid], Meta(min_length=1, max_length=MAX_LEASE_DEVICES)]
    start: UnixTime
    active_until: UnixTime
    ended: bool
    issued_at: UnixTime

    def check(self) -> None:
        """Raise :class:`LeaseRecordError` unless the times are coherent and devices unique."""
        for name in ("start", "active_until", "issued_at"):
            if not math.isfinite(getattr(self, name)):
                raise LeaseRecordError(f"lease {self.lease_id}: {name} is not finite")
        if self.active_until < self.start:
            raise LeaseRecordError(f"lease {self.lease_id}: active_until is before start")
        if self.issued_at < self.active_until:
            raise LeaseRecordError(f"lease {self.lease_id}: issued before its active_until")
        if len(set(self.device_uuids)) != len(self.device_uuids):
            raise LeaseRecordError(f"lease {self.lease_id}: a device is listed twice")


class SignedLeaseRecord(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``record``: the JSON encoding of a :class:`LeaseRecord`; ``signature``: Ed25519 over
    ``SIGNATURE_DOMAIN || record``. Both are base64 in JSON."""

    record: Annotated[bytes, Meta(max_length=_MAX_RECORD_BYTES)]
    signature: Annotated[bytes, Meta(min_length=64, max_length=64)]


class FeedPage(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``GET /v1/lease-feed?after=<seq>``: records with ``seq > after`` in order, at most
    :data:`MAX_FEED_PAGE`; ``next_after`` is the last seq returned (``after`` when empty)."""

    gateway_id: GatewayId
    records: Annotated[list[SignedLeaseRecord], Meta(max_length=MAX_FEED_PAGE)]
    next_after: Annotated[int, Meta(ge=0, le=2**63 - 1)]


_RECORD_ENCODER: Final = msgspec.json.Encoder()
_RECORD_DECODER: Final = msgspec.json.Decoder(LeaseRecord)


def gateway_id_of(public_key: Ed25519PublicKey | bytes) -> str:
    """32 hex characters naming a gateway by its signing key."""
    raw = public_key if isinstance(public_key, bytes) else _raw(public_key)
    if len(raw) != 32:
        raise LeaseRecordError(f"an Ed25519 public key has 32 bytes, got {len(raw)}")
    return hashlib.sha256(GATEWAY_ID_DOMAIN + raw).digest()[:16].hex()


def _raw(public_key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def sign_record(record: LeaseRecord, key: Ed25519PrivateKey) -> SignedLeaseRecord:
    """Sign ``record`` (checked first; its gateway_id must be the key's)."""
    record.check()
    if record.gateway_id != gateway_id_of(key.public_key()):
        raise LeaseRecordError("the record's gateway_id is not this signing key's")
    data = _RECORD_ENCODER.encode(record)
    return SignedLeaseRecord(record=data, signature=key.sign(SIGNATURE_DOMAIN + data))


def verify_record(signed: SignedLeaseRecord, trusted: dict[str, Ed25519PublicKey]) -> LeaseRecord:
    """The record if it decodes, is coherent, and is signed by the trusted key of the gateway it
    names (``trusted``: gateway_id -> public key); :class:`LeaseRecordError` otherwise."""
    try:
        record = _RECORD_DECODER.decode(signed.record)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise LeaseRecordError(f"lease record does not decode: {exc}") from None
    key = trusted.get(record.gateway_id)
    if key is None:
        raise LeaseRecordError(f"lease record from untrusted gateway {record.gateway_id}")
    try:
        key.verify(signed.signature, SIGNATURE_DOMAIN + signed.record)
    except InvalidSignature:
        raise LeaseRecordError(
            f"lease record {record.gateway_id}/{record.seq}: bad signature"
        ) from None
    record.check()
    return record
