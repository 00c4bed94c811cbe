"""core/lease.py: what a validator may believe of a gateway's lease records.

A record is believed only when it decodes strictly, is coherent, names the gateway whose trusted
key signed exactly the bytes received, under the lease-record domain. Everything else, however it
was made, raises LeaseRecordError.
"""

from __future__ import annotations

import math

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from byteleap.core.lease import (
    MAX_FEED_PAGE,
    MAX_LEASE_DEVICES,
    SIGNATURE_DOMAIN,
    FeedPage,
    LeaseRecord,
    LeaseRecordError,
    SignedLeaseRecord,
    gateway_id_of,
    sign_record,
    verify_record,
)

KEY = Ed25519PrivateKey.from_private_bytes(b"\x07" * 32)
GATEWAY = gateway_id_of(KEY.public_key())
TRUSTED = {GATEWAY: KEY.public_key()}
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(b"\x09" * 32)
OTHER = gateway_id_of(OTHER_KEY.public_key())
MINER = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"
T0 = 1_800_000_000.0
ENCODER = msgspec.json.Encoder()


def record(**overrides: object) -> LeaseRecord:
    fields: dict[str, object] = {
        "gateway_id": GATEWAY,
        "seq": 1,
        "lease_id": "ab" * 16,
        "miner_hotkey": MINER,
        "worker_id": "cd" * 16,
        "device_uuids": ["GPU-1", "GPU-2"],
        "start": T0,
        "active_until": T0 + 600,
        "ended": False,
        "issued_at": T0 + 601,
    }
    fields.update(overrides)
    return LeaseRecord(**fields)  # type: ignore[arg-type]


def raw_signed(data: bytes, key: Ed25519PrivateKey = KEY) -> SignedLeaseRecord:
    """Bytes signed as a gateway would, without sign_record's checks (a buggy or hostile one)."""
    return SignedLeaseRecord(record=data, signature=key.sign(SIGNATURE_DOMAIN + data))


def as_json(**fields: object) -> bytes:
    return ENCODER.encode(msgspec.structs.asdict(record()) | fields)


# ---- the honest path ----------------------------------------------------------------------------


def test_a_signed_record_verifies_back_to_itself() -> None:
    original = record()
    signed = sign_record(original, KEY)
    assert verify_record(signed, TRUSTED) == original
    # It travels in a feed page as JSON (bytes as base64) and still verifies.
    page = FeedPage(gateway_id=GATEWAY, records=[signed], next_after=1)
    decoded = msgspec.json.decode(msgspec.json.encode(page), type=FeedPage)
    assert decoded == page
    assert verify_record(decoded.records[0], TRUSTED) == original


times = st.floats(min_value=0.0, max_value=2.0**39, allow_nan=False, allow_infinity=False)
durations = st.floats(min_value=0.0, max_value=1e7, allow_nan=False, allow_infinity=False)
devices = st.lists(
    st.text("ABCDEFabcdef0123456789-", min_size=1, max_size=40),
    min_size=1,
    max_size=MAX_LEASE_DEVICES,
    unique=True,
)


@given(start=times, ran=durations, lag=durations, ended=st.booleans(), uuids=devices)
def test_any_coherent_record_round_trips(
    start: float, ran: float, lag: float, ended: bool, uuids: list[str]
) -> None:
    original = record(
        start=start,
        active_until=start + ran,
        issued_at=start + ran + lag,
        ended=ended,
        device_uuids=uuids,
    )
    assert verify_record(sign_record(original, KEY), TRUSTED) == original


# ---- tampering ----------------------------------------------------------------------------------


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_changed_byte_of_the_record_is_refused(data: st.DataObject) -> None:
    signed = sign_record(record(), KEY)
    index = data.draw(st.integers(0, len(signed.record) - 1))
    flip = data.draw(st.integers(1, 255))
    changed = bytearray(signed.record)
    changed[index] ^= flip
    assume(is_utf8(bytes(changed)))  # invalid UTF-8: see the test below
    with pytest.raises(LeaseRecordError):
        verify_record(SignedLeaseRecord(record=bytes(changed), signature=signed.signature), TRUSTED)


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_a_record_that_is_not_utf8_is_refused() -> None:
    signed = sign_record(record(), KEY)
    broken = b'{"\xe7' + signed.record[3:]
    with pytest.raises(LeaseRecordError, match="does not decode"):
        verify_record(SignedLeaseRecord(record=broken, signature=signed.signature), TRUSTED)


@given(index=st.integers(0, 63), flip=st.integers(1, 255))
def test_any_changed_byte_of_the_signature_is_refused(index: int, flip: int) -> None:
    signed = sign_record(record(), KEY)
    signature = bytearray(signed.signature)
    signature[index] ^= flip
    with pytest.raises(LeaseRecordError, match="bad signature"):
        verify_record(SignedLeaseRecord(record=signed.record, signature=bytes(signature)), TRUSTED)


def test_a_re_encoding_with_the_same_meaning_is_refused() -> None:
    """The signature covers the bytes received: whitespace added in transit breaks it."""
    signed = sign_record(record(), KEY)
    spaced = signed.record.replace(b",", b", ")
    assert msgspec.json.decode(spaced, type=LeaseRecord) == record()
    with pytest.raises(LeaseRecordError, match="bad signature"):
        verify_record(SignedLeaseRecord(record=spaced, signature=signed.signature), TRUSTED)


def test_a_signature_without_the_domain_is_refused() -> None:
    data = ENCODER.encode(record())
    with pytest.raises(LeaseRecordError, match="bad signature"):
        verify_record(SignedLeaseRecord(record=data, signature=KEY.sign(data)), TRUSTED)


# ---- whose record -------------------------------------------------------------------------------


def test_a_record_naming_another_gateway_is_refused_whoever_signed_it() -> None:
    both = {GATEWAY: KEY.public_key(), OTHER: OTHER_KEY.public_key()}
    # Our key, the other gateway's id: sign_record will not make it ...
    with pytest.raises(LeaseRecordError, match="not this signing key's"):
        sign_record(record(gateway_id=OTHER), KEY)
    # ... and forged by hand it fails against the key of the gateway it names.
    forged = raw_signed(ENCODER.encode(record(gateway_id=OTHER)))
    with pytest.raises(LeaseRecordError, match="bad signature"):
        verify_record(forged, both)
    # The other gateway's genuine record is refused where only we are trusted.
    genuine = sign_record(record(gateway_id=OTHER), OTHER_KEY)
    with pytest.raises(LeaseRecordError, match="untrusted gateway"):
        verify_record(genuine, TRUSTED)


def test_a_record_signed_by_an_untrusted_key_is_refused() -> None:
    stranger = Ed25519PrivateKey.generate()
    # Claiming our id: the signature does not match our key.
    claimed = raw_signed(ENCODER.encode(record()), stranger)
    with pytest.raises(LeaseRecordError, match="bad signature"):
        verify_record(claimed, TRUSTED)
    # Its own id: nobody trusts it.
    own = sign_record(record(gateway_id=gateway_id_of(stranger.public_key())), stranger)
    with pytest.raises(LeaseRecordError, match="untrusted gateway"):
        verify_record(own, TRUSTED)
    with pytest.raises(LeaseRecordError, match="untrusted gateway"):
        verify_record(own, {})


def test_gateway_ids_come_from_the_key_alone() -> None:
    raw = KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert gateway_id_of(raw) == gateway_id_of(KEY.public_key()) == GATEWAY
    assert len(GATEWAY) == 32 and int(GATEWAY, 16) >= 0
    assert GATEWAY != OTHER
    for bad in (b"", raw[:31], raw + b"\0"):
        with pytest.raises(LeaseRecordError, match="32 bytes"):
            gateway_id_of(bad)


# ---- what a signature cannot make right ---------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"active_until": T0 - 1}, "active_until is before start"),
        ({"issued_at": T0 + 599}, "issued before its active_until"),
        ({"device_uuids": ["GPU-1", "GPU-1"]}, "listed twice"),
    ],
)
def test_incoherent_records_are_refused_even_when_signed(
    fields: dict[str, object], message: str
) -> None:
    with pytest.raises(LeaseRecordError, match=message):
        sign_record(record(**fields), KEY)
    with pytest.raises(LeaseRecordError, match=message):
        verify_record(raw_signed(ENCODER.encode(record(**fields))), TRUSTED)


@given(uuids=st.lists(st.sampled_from(["GPU-1", "GPU-2", "GPU-3"]), min_size=2, max_size=6))
def test_duplicate_devices_are_always_refused(uuids: list[str]) -> None:
    if len(set(uuids)) == len(uuids):
        uuids = [*uuids, uuids[0]]
    with pytest.raises(LeaseRecordError, match="listed twice"):
        verify_record(raw_signed(ENCODER.encode(record(device_uuids=uuids))), TRUSTED)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_times_are_refused(value: float) -> None:
    with pytest.raises(LeaseRecordError, match="not finite"):
        sign_record(record(issued_at=value), KEY)


@pytest.mark.parametrize(
    "data",
    [
        as_json(seq=0),  # sequence numbers start at 1
        as_json(start=-1.0),
        as_json(device_uuids=[]),
        as_json(device_uuids=[f"GPU-{i}" for i in range(MAX_LEASE_DEVICES + 1)]),
        as_json(device_uuids=["GPU 1"]),  # not a device uuid
        as_json(worker_id="not-a-worker-id"),
        as_json(miner_hotkey="0OIl"),  # not base58
        as_json(lease_id="AB" * 16),  # upper-case hex
        as_json(extra="field"),  # unknown fields are refused, not ignored
        as_json(ended="yes"),
        b"[]",
        b"\xff\xfe",
    ],
)
def test_malformed_records_are_refused_even_when_signed(data: bytes) -> None:
    with pytest.raises(LeaseRecordError, match="does not decode"):
        verify_record(raw_signed(data), TRUSTED)


def test_feed_pages_and_signed_records_have_hard_limits() -> None:
    signed = sign_record(record(), KEY)
    over = {"gateway_id": GATEWAY, "records": [signed] * (MAX_FEED_PAGE + 1), "next_after": 1}
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(msgspec.json.encode(over), type=FeedPage)
    short = {"record": signed.record, "signature": signed.signature[:63]}
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(msgspec.json.encode(short), type=SignedLeaseRecord)
    huge = {"record": b"x" * (16 * 1024 + 1), "signature": signed.signature}
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(msgspec.json.encode(huge), type=SignedLeaseRecord)
    unknown = {"gateway_id": GATEWAY, "records": [], "next_after": 0, "more": True}
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(msgspec.json.encode(unknown), type=FeedPage)
