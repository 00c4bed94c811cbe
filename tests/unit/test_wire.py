"""Wire format: round trips, strict decoding, size limits, and fuzzing (only WireError escapes)."""

from __future__ import annotations

import functools
import math
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from byteleap.core import wire
from byteleap.core.wire import (
    ChallengeBatch,
    ChallengeRequest,
    ChallengeReveal,
    DeviceChallenge,
    DeviceReveal,
    DeviceRevealRequest,
    Direction,
    Disk,
    Error,
    ErrorCode,
    Frame,
    GpuInfo,
    Inventory,
    Link,
    Message,
    Nic,
    Ping,
    Pong,
    RevealBatch,
    RevealedRow,
    RevealRequest,
    WireError,
    WorkerRoster,
    WorkerSummary,
    decode,
    encode,
)

ROUTES = [(link, direction) for link in Link for direction in Direction]
ALL_MESSAGES = sorted(
    {cls for route in ROUTES for cls in wire.message_types(*route)}, key=lambda c: c.__name__
)

# ------------------------------------------------------------------------------------------------
# Strategies derived from the msgspec schema itself, so every constraint declared with Meta is
# exercised and a new message type is covered without touching this file. Sizes are capped to
# keep the suite fast; the limits themselves are tested explicitly below.

MAX_LIST = 2
MAX_BYTES = 64
_INT64 = (-(2**63), 2**63 - 1)

# values must be whole rows of n float32 (n a multiple of 64); keep them small here.
_ROW_VALUES = st.integers(1, 2).flatmap(lambda q: st.binary(min_size=256 * q, max_size=256 * q))


def _int_strategy(t: mi.IntType) -> st.SearchStrategy[int]:
    lo = t.ge if t.ge is not None else (t.gt + 1 if t.gt is not None else _INT64[0])
    hi = t.le if t.le is not None else (t.lt - 1 if t.lt is not None else _INT64[1])
    if t.multiple_of:
        m = t.multiple_of
        return st.integers(math.ceil(lo / m), hi // m).map(lambda q: q * m)
    return st.integers(lo, hi)


def _float_strategy(t: mi.FloatType) -> st.SearchStrategy[float]:
    return st.floats(
        min_value=t.ge if t.ge is not None else t.gt,
        max_value=t.le if t.le is not None else t.lt,
        exclude_min=t.gt is not None,
        exclude_max=t.lt is not None,
        allow_nan=False,
        allow_infinity=False,
    )


def _str_strategy(t: mi.StrType) -> st.SearchStrategy[str]:
    lo = t.min_length or 0
    hi = t.max_length if t.max_length is not None else 40
    if t.pattern is not None:
        return st.from_regex(t.pattern, fullmatch=True).filter(lambda s: lo <= len(s) <= hi)
    return st.text(min_size=lo, max_size=min(hi, 40))


def strategy_for(t: mi.Type) -> st.SearchStrategy[Any]:
    if isinstance(t, mi.IntType):
        return _int_strategy(t)
    if isinstance(t, mi.FloatType):
        return _float_strategy(t)
    if isinstance(t, mi.StrType):
        return _str_strategy(t)
    if isinstance(t, mi.BytesType):
        lo = t.min_length or 0
        hi = min(t.max_length if t.max_length is not None else MAX_BYTES, max(lo, MAX_BYTES))
        return st.binary(min_size=lo, max_size=hi)
    if isinstance(t, mi.BoolType):
        return st.booleans()
    if isinstance(t, mi.LiteralType):
        return st.sampled_from(t.values)
    if isinstance(t, mi.EnumType):
        return st.sampled_from(list(t.cls))
    if isinstance(t, mi.ListType):
        lo = t.min_length or 0
        hi = min(t.max_length if t.max_length is not None else MAX_LIST, max(lo, MAX_LIST))
        return st.lists(strategy_for(t.item_type), min_size=lo, max_size=hi)
    if isinstance(t, mi.StructType):
        return struct_strategy(t.cls)
    if isinstance(t, mi.UnionType):
        return st.one_of(*(strategy_for(m) for m in t.types))
    raise NotImplementedError(f"no strategy for {t!r}")


def _build(cls: type[Any], kwargs: dict[str, Any]) -> Any:
    try:
        return cls(**kwargs)
    except ValueError:  # a cross-field rule (__post_init__) refused the draw, e.g. duplicates
        assume(False)
        raise  # unreachable


@functools.cache
def struct_strategy(cls: type[Any]) -> st.SearchStrategy[Any]:
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in info.fields:
        if cls is RevealedRow and field.name == "values":
            fields[field.name] = _ROW_VALUES
        else:
            fields[field.name] = strategy_for(field.type)
    return st.fixed_dictionaries(fields).map(lambda kw: _build(cls, kw))


def frame_strategy(msg: st.SearchStrategy[Message]) -> st.SearchStrategy[Frame]:
    return st.builds(lambda m, i: Frame(id=i, msg=m), msg, st.integers(0, 2**63 - 1))


@functools.cache
def route_frames(link: Link, direction: Direction) -> st.SearchStrategy[Frame]:
    types = wire.message_types(link, direction)
    return frame_strategy(st.one_of(*(struct_strategy(c) for c in types)))


ANY_FRAME = st.sampled_from(ROUTES).flatmap(lambda r: route_frames(*r).map(lambda f: (r, f)))


def routes_of(cls: type[Message]) -> list[tuple[Link, Direction]]:
    return [route for route in ROUTES if cls in wire.message_types(*route)]


# ------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("cls", ALL_MESSAGES, ids=lambda c: c.__name__)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_message_round_trips(cls: type[Message], data: st.DataObject) -> None:
    frame = data.draw(frame_strategy(struct_strategy(cls)))
    encoded = encode(frame)
    for route in routes_of(cls):
        assert decode(*route, encoded) == frame


def test_every_message_type_is_routed_and_tagged_uniquely() -> None:
    tags = [cls.__struct_config__.tag for cls in ALL_MESSAGES]
    assert len(tags) == len(set(tags))
    assert all(isinstance(t, str) and t.islower() for t in tags)
    for route in ROUTES:
        assert Error in wire.message_types(*route)


def test_frame_layout_is_a_map_with_raw_bytes() -> None:
    frame = Frame(id=9, msg=wire.ChallengeRelease(challenge_id=b"\x01" * 16))
    raw = msgspec.msgpack.decode(encode(frame))
    assert raw == {
        "v": wire.PROTOCOL_VERSION,
        "id": 9,
        "msg": {"type": "challenge_release", "challenge_id": b"\x01" * 16},
    }


def test_decode_accepts_bytearray_and_memoryview() -> None:
    frame = Frame(id=3, msg=Ping(nonce=1))
    encoded = encode(frame)
    route = (Link.WORKER_MINER, Direction.DOWN)
    assert decode(*route, bytearray(encoded)) == frame
    assert decode(*route, memoryview(encoded)) == frame


# ------------------------------------------------------------------------------------------------
# Fuzzing: nothing but WireError may escape decode


def _decode_or_wire_error(route: tuple[Link, Direction], data: bytes) -> None:
    try:
        frame = decode(*route, data)
    except WireError as exc:
        assert isinstance(exc.code, ErrorCode)
        err = exc.to_error()
        assert decode(Link.WORKER_MINER, Direction.UP, encode(Frame(msg=err))).msg == err
    else:
        assert isinstance(frame, Frame)
        assert type(frame.msg) in wire.message_types(*route)


@settings(max_examples=300, deadline=None)
@given(route=st.sampled_from(ROUTES), data=st.binary(max_size=256))
def test_random_bytes_raise_only_wire_error(route: tuple[Link, Direction], data: bytes) -> None:
    _decode_or_wire_error(route, data)


_MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.just(0)),
)


def _mutate(data: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for kind, pos, arg in mutations:
        pos %= len(buf) + 1
        if kind == "flip" and pos < len(buf):
            buf[pos] ^= arg
        elif kind == "cut":
            del buf[pos:]
        elif kind == "insert":
            buf.insert(pos, arg)
        elif kind == "delete" and pos < len(buf):
            del buf[pos]
    return bytes(buf)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(routed=ANY_FRAME, mutations=st.lists(_MUTATION, min_size=1, max_size=4))
def test_mutated_frames_raise_only_wire_error(
    routed: tuple[tuple[Link, Direction], Frame], mutations: list[tuple[str, int, int]]
) -> None:
    route, frame = routed
    _decode_or_wire_error(route, _mutate(encode(frame), mutations))


_JSONISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_FIELD_NAMES = st.sampled_from(
    ["nonce", "challenge_id", "rows", "n", "worker_id", "device_uuid", "inventory", "code", "x"]
)
_TAGS = st.sampled_from(
    sorted({cls.__struct_config__.tag for cls in ALL_MESSAGES} | {"nope"})  # type: ignore[type-var]
)


@settings(max_examples=200, deadline=None)
@given(
    route=st.sampled_from(ROUTES),
    v=st.one_of(st.just(wire.PROTOCOL_VERSION), _JSONISH),
    frame_id=st.one_of(st.integers(0, 2**63 - 1), _JSONISH),
    tag=_TAGS,
    fields=st.dictionaries(_FIELD_NAMES, _JSONISH, max_size=4),
)
def test_structured_garbage_raises_only_wire_error(
    route: tuple[Link, Direction], v: Any, frame_id: Any, tag: str, fields: dict[str, Any]
) -> None:
    data = msgspec.msgpack.encode({"v": v, "id": frame_id, "msg": {"type": tag, **fields}})
    _decode_or_wire_error(route, data)


def test_deeply_nested_input_is_a_wire_error() -> None:
    deep = b"\x91" * 500_000 + b"\xc0"
    version = bytes([wire.PROTOCOL_VERSION])  # a positive fixint
    nested_msg = b"\x83\xa1v" + version + b"\xa2id\x01\xa3msg" + deep
    nested_extra = b"\x84\xa1v" + version + b"\xa2id\x01\xa3msg\x80\xa1x" + deep
    for data in (nested_msg, nested_extra, deep):
        with pytest.raises(WireError) as info:
            decode(Link.WORKER_MINER, Direction.UP, data)
        assert info.value.code is ErrorCode.BAD_FRAME


# ------------------------------------------------------------------------------------------------
# Specific refusals


UP = (Link.WORKER_MINER, Direction.UP)
DOWN = (Link.WORKER_MINER, Direction.DOWN)


def _raw_frame(msg: dict[str, Any], **envelope: Any) -> bytes:
    return msgspec.msgpack.encode({"v": wire.PROTOCOL_VERSION, "id": 5, **envelope, "msg": msg})


def _code(route: tuple[Link, Direction], data: bytes) -> WireError:
    with pytest.raises(WireError) as info:
        decode(*route, data)
    return info.value


@pytest.mark.parametrize("route", ROUTES)
def test_oversize_frame_is_rejected_before_parsing(route: tuple[Link, Direction]) -> None:
    limit = wire.max_frame_bytes(*route)
    err = _code(route, b"\xc1" * (limit + 1))  # invalid msgpack: parsing would say BAD_FRAME
    assert err.code is ErrorCode.FRAME_TOO_LARGE
    assert _code(route, b"\xc1" * limit).code is ErrorCode.BAD_FRAME


def test_max_frame_bytes_is_the_largest_route_limit() -> None:
    assert max(wire.max_frame_bytes(*r) for r in ROUTES) == wire.MAX_FRAME_BYTES
    # a miner can make a worker buffer far less than a worker can make a miner buffer
    assert wire.max_frame_bytes(*DOWN) < wire.max_frame_bytes(*UP)


@pytest.mark.parametrize(
    "version", [0, wire.PROTOCOL_VERSION - 1, wire.PROTOCOL_VERSION + 1, 99, -1]
)
def test_wrong_version_is_unsupported(version: int) -> None:
    err = _code(DOWN, _raw_frame({"type": "ping", "nonce": 1}, v=version))
    assert err.code is ErrorCode.UNSUPPORTED_VERSION
    assert err.peer_version == version
    assert err.ref == 5
    # even when the rest of the frame is a message this version does not know
    err = _code(DOWN, _raw_frame({"type": "hello_v2", "extra": [1]}, v=version, more=1))
    assert err.code is ErrorCode.UNSUPPORTED_VERSION


def test_unknown_tag_is_unknown_message() -> None:
    err = _code(UP, _raw_frame({"type": "teleport", "nonce": 1}))
    assert err.code is ErrorCode.UNKNOWN_MESSAGE
    assert err.ref == 5


def test_missing_or_mistyped_tag_is_bad_frame() -> None:
    assert _code(UP, _raw_frame({"nonce": 1})).code is ErrorCode.BAD_FRAME
    assert _code(UP, _raw_frame({"type": 3, "nonce": 1})).code is ErrorCode.BAD_FRAME


@pytest.mark.parametrize("cls", ALL_MESSAGES, ids=lambda c: c.__name__)
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_message_on_wrong_route_is_rejected(cls: type[Message], data: st.DataObject) -> None:
    encoded = encode(data.draw(frame_strategy(struct_strategy(cls))))
    for route in ROUTES:
        if route not in routes_of(cls):
            err = _code(route, encoded)
            assert err.code is ErrorCode.UNKNOWN_MESSAGE
            assert "not accepted" in err.message


def test_worker_cannot_send_miner_messages() -> None:
    ack = encode(Frame(msg=wire.RegisterAck(worker_id="a" * 32, heartbeat_interval_s=10.0)))
    assert _code(UP, ack).code is ErrorCode.UNKNOWN_MESSAGE
    assert isinstance(decode(*DOWN, ack).msg, wire.RegisterAck)


def test_extra_fields_are_rejected() -> None:
    assert _code(UP, _raw_frame({"type": "pong", "nonce": 1, "debug": True})).code is (
        ErrorCode.BAD_FRAME
    )
    err = _code(UP, _raw_frame({"type": "pong", "nonce": 1}, trace="x"))
    assert err.code is ErrorCode.BAD_FRAME
    assert "trace" in err.message
    # nested struct too
    inv = _inventory(gpus=0)
    raw = msgspec.msgpack.decode(encode(Frame(msg=wire.InventoryUpdate(inventory=inv))))
    raw["msg"]["inventory"]["hostname"] = "h"
    err = _code(UP, msgspec.msgpack.encode(raw))
    assert err.code is ErrorCode.BAD_FRAME
    assert "$.msg.inventory" in err.message


def test_missing_fields_and_envelope_fields_are_rejected() -> None:
    assert _code(
        UP,
        msgspec.msgpack.encode({"v": wire.PROTOCOL_VERSION, "msg": {"type": "pong", "nonce": 1}}),
    ).code is (ErrorCode.BAD_FRAME)
    assert _code(UP, _raw_frame({"type": "challenge_commit"})).code is ErrorCode.BAD_FRAME
    assert _code(UP, msgspec.msgpack.encode([1, 5, {"type": "pong", "nonce": 1}])).code is (
        ErrorCode.BAD_FRAME
    )


def _heartbeat(**over: Any) -> bytes:
    return _raw_frame(
        {"type": "heartbeat", "uptime_s": 1.0, "load1": 0.5, "mem_used_bytes": 1, **over}
    )


def test_heartbeat_names_the_leased_gpus() -> None:
    plain = decode(*UP, _heartbeat()).msg
    assert isinstance(plain, wire.Heartbeat) and plain.leased_devices == []
    leased = decode(*UP, _heartbeat(leased_devices=["GPU-8f1c0a52", "PCI-0000:41:00.0"])).msg
    assert isinstance(leased, wire.Heartbeat)
    assert leased.leased_devices == ["GPU-8f1c0a52", "PCI-0000:41:00.0"]
    too_many = [f"GPU-{i}" for i in range(wire.MAX_DEVICES_PER_WORKER + 1)]
    for bad in (too_many, ["GPU 1"], [""], ["x" * 65], "GPU-1", [7]):
        err = _code(UP, _heartbeat(leased_devices=bad))
        assert err.code is ErrorCode.BAD_FRAME and "leased_devices" in err.message, bad


def _request(**over: Any) -> dict[str, Any]:
    base = {
        "type": "challenge_request",
        "challenge_id": b"c" * 16,
        "seed": b"s" * 32,
        "miner_hotkey": "5F3sa2TJAWMqDhXG6jhV4N8ko9SxwGy8TpaNS1repo5EYjQX",
        "device_uuid": "GPU-0",
        "n": 2048,
        "precision": "fp32",
        "deadline_ms": 30_000,
    }
    return base | over


@pytest.mark.parametrize(
    "over",
    [
        {"n": 2000},  # not a multiple of 64
        {"n": 0},
        {"n": 65536 + 64},
        {"n": "2048"},
        {"n": 2048.0},
        {"challenge_id": b"c" * 15},
        {"challenge_id": "c" * 16},  # str where bytes belong
        {"seed": b"s" * 33},
        {"precision": "fp64"},
        {"device_uuid": ""},
        {"device_uuid": "G" * 65},
        {"device_uuid": "GPU 0"},
        {"miner_hotkey": "0OIl"},  # not base58
        {"miner_hotkey": "5" * 65},
        {"deadline_ms": 0},
        {"deadline_ms": -5},
    ],
)
def test_out_of_range_values_are_rejected(over: dict[str, Any]) -> None:
    assert decode(*DOWN, _raw_frame(_request()))  # the base is valid
    assert _code(DOWN, _raw_frame(_request(**over))).code is ErrorCode.BAD_FRAME


@pytest.mark.parametrize("worker_id", ["A" * 32, "a" * 31, "a" * 33, "g" * 32, "a" * 32 + "\n", 7])
def test_worker_id_is_32_lowercase_hex(worker_id: Any) -> None:
    msg = {"type": "echo_request", "nonce": 1, "worker_id": worker_id}
    assert _code((Link.MINER_VALIDATOR, Direction.DOWN), _raw_frame(msg)).code is (
        ErrorCode.BAD_FRAME
    )


def _row(index: int, n: int = 64, depth: int = 6) -> dict[str, Any]:
    return {"index": index, "values": b"\0" * (4 * n), "path": [b"p" * 32] * depth}


@pytest.mark.parametrize(
    "rows",
    [
        [],  # at least one row
        [_row(1), _row(1)],  # duplicate index
        [_row(1), _row(2, n=128)],  # rows of different widths
        [_row(-1)],
        [_row(65536)],
        [{"index": 1, "values": b"\0" * 100, "path": []}],  # not whole float32 x 64
        [{"index": 1, "values": b"\0" * 260, "path": []}],
        [_row(1, depth=wire.MAX_MERKLE_DEPTH + 1)],
        [{"index": 1, "values": b"\0" * 256, "path": [b"short"]}],
        [_row(i) for i in range(wire.MAX_REVEAL_ROWS + 1)],
    ],
)
def test_bad_reveals_are_rejected(rows: list[dict[str, Any]]) -> None:
    msg = {"type": "challenge_reveal", "challenge_id": b"c" * 16, "device_uuid": "GPU-0"}
    assert decode(*UP, _raw_frame(msg | {"rows": [_row(3)]}))
    assert _code(UP, _raw_frame(msg | {"rows": rows})).code is ErrorCode.BAD_FRAME


@pytest.mark.parametrize("rows", [[], [1, 1], [-1], list(range(257))])
def test_bad_reveal_requests_are_rejected(rows: list[int]) -> None:
    msg = {"type": "reveal_request", "challenge_id": b"c" * 16, "device_uuid": "GPU-0"}
    assert decode(*DOWN, _raw_frame(msg | {"rows": [0, 5]}))
    assert _code(DOWN, _raw_frame(msg | {"rows": rows})).code is ErrorCode.BAD_FRAME


def test_batches_refuse_duplicate_challenges() -> None:
    route = (Link.MINER_VALIDATOR, Direction.DOWN)
    one = _request(worker_id="a" * 32)
    del one["type"]
    dup_id = {"type": "challenge_batch", "round_id": 1, "challenges": [one, one]}
    assert _code(route, _raw_frame(dup_id)).code is ErrorCode.BAD_FRAME
    two = one | {"challenge_id": b"d" * 16}
    ok = decode(*route, _raw_frame(dup_id | {"challenges": [one, two | {"device_uuid": "GPU-1"}]}))
    assert isinstance(ok.msg, ChallengeBatch)
    same_device = dup_id | {"challenges": [one, two]}
    assert _code(route, _raw_frame(same_device)).code is ErrorCode.BAD_FRAME


def test_error_codes_are_unique_and_stable() -> None:
    # aliases (a second name for a value) are hidden from iteration; @enum.unique forbids them
    assert len(ErrorCode.__members__) == len({code.value for code in ErrorCode})
    pinned = {
        "BAD_FRAME": 1000,
        "UNSUPPORTED_VERSION": 1001,
        "FRAME_TOO_LARGE": 1002,
        "UNKNOWN_MESSAGE": 1003,
        "RATE_LIMITED": 1004,
        "UNEXPECTED_MESSAGE": 1005,
        "AUTH_FAILED": 2000,
        "NOT_ENROLLED": 2001,
        "CAPACITY_REACHED": 2002,
        "KEY_MISMATCH": 2003,
        "NOT_PERMITTED": 2004,
        "CHALLENGE_INVALID": 3000,
        "DEVICE_BUSY": 3001,
        "DEVICE_LEASED": 3002,
        "CHALLENGE_UNKNOWN": 3003,
        "CHALLENGE_EXPIRED": 3004,
        "DEVICE_UNKNOWN": 3005,
        "WORKER_OFFLINE": 3006,
        "NO_GATEWAY": 4000,
        "GATEWAY_UNAVAILABLE": 4001,
        "GATEWAY_REFUSED": 4002,
        "NO_VALIDATOR": 4003,
        "INTERNAL": 5000,
        "SHUTTING_DOWN": 5001,
    }
    # every code is pinned: adding, renaming or renumbering one must update this table
    assert {name: code.value for name, code in ErrorCode.__members__.items()} == pinned
    for code in ErrorCode:  # grouped by range
        assert code.value // 1000 in (1, 2, 3, 4, 5)


def test_error_message_is_capped_and_unknown_code_refused() -> None:
    assert decode(*UP, _raw_frame({"type": "error", "code": 2002, "message": "full", "ref": 3}))
    long = {"type": "error", "code": 2002, "message": "x" * 513, "ref": 3}
    assert _code(UP, _raw_frame(long)).code is ErrorCode.BAD_FRAME
    assert _code(UP, _raw_frame({"type": "error", "code": 4242})).code is ErrorCode.BAD_FRAME


def test_wire_error_to_error_truncates_and_keeps_ref() -> None:
    err = WireError(ErrorCode.CAPACITY_REACHED, "y" * 2000, ref=42).to_error()
    assert err.code is ErrorCode.CAPACITY_REACHED
    assert err.ref == 42
    assert len(err.message) == wire.MAX_ERROR_MESSAGE
    assert decode(*DOWN, encode(Frame(id=42, msg=err))).msg == err


@pytest.mark.parametrize("text", ["two\nlines", "tab\there", "caf\u00e9", "bell\x07", "del\x7f"])
def test_error_messages_must_be_printable_ascii(text: str) -> None:
    """Peer-supplied error text is logged: control and non-ASCII characters are refused."""
    assert _code(UP, _raw_frame({"type": "error", "code": 1000, "message": text})).code is (
        ErrorCode.BAD_FRAME
    )
    failure = {
        "type": "device_failure",
        "challenge_id": b"c" * 16,
        "worker_id": "a" * 32,
        "device_uuid": "GPU-0",
        "code": 3001,
    }
    route = (Link.MINER_VALIDATOR, Direction.UP)
    assert decode(*route, _raw_frame(failure | {"message": "busy ~ (50%)"}))
    assert _code(route, _raw_frame(failure | {"message": text})).code is ErrorCode.BAD_FRAME


def test_to_error_escapes_non_printable_text() -> None:
    err = wire.CodedError(ErrorCode.DEVICE_UNKNOWN, "no device 'GPU-\u00e9\n\u20ac' \\ here")
    assert err.message == "no device 'GPU-\\xe9\\n\\u20ac' \\ here"
    msg = err.to_error(ref=7)
    assert msg.message == err.message
    assert decode(*DOWN, encode(Frame(id=7, msg=msg))).msg == msg
    wire_err = WireError(ErrorCode.UNKNOWN_MESSAGE, "tag '\x00\U0001f600'" + "\u00e9" * 600)
    assert str(wire_err).isascii() and str(wire_err).isprintable()
    long = wire_err.to_error()
    assert len(long.message) == wire.MAX_ERROR_MESSAGE
    assert long.message.startswith("tag '\\x00\\U0001f600'\\xe9")
    assert decode(*UP, encode(Frame(msg=long))).msg == long


def test_non_bytes_input_is_a_wire_error() -> None:
    with pytest.raises(WireError):
        decode(*UP, "not bytes")  # type: ignore[arg-type]
    with pytest.raises(WireError):
        decode(*UP, None)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# Worst cases fit their limits


def _inventory(gpus: int = wire.MAX_DEVICES_PER_WORKER) -> Inventory:
    return Inventory(
        cpu_model="C" * 256,
        cpu_cores=65536,
        mem_bytes=2**63 - 1,
        disks=[
            Disk(name=f"{i:064d}", model="M" * 256, size_bytes=2**63 - 1, rotational=True)
            for i in range(32)
        ],
        nics=[Nic(name=f"{i:064d}", speed_mbps=10_000_000) for i in range(32)],
        gpus=[
            GpuInfo(
                uuid=f"{i:064d}",
                name="G" * 256,
                mem_bytes=2**63 - 1,
                pci_bus_id="00000000:ff:1f.7",
                driver_version="9" * 32,
                compute_capability="10.10",
                vfio_bound=True,
            )
            for i in range(gpus)
        ],
    )


def _reveal_rows(n: int, k: int) -> list[RevealedRow]:
    depth = wire.MAX_MERKLE_DEPTH
    return [
        RevealedRow(index=65535 - i, values=b"\x7f" * (4 * n), path=[b"h" * 32] * depth)
        for i in range(k)
    ]


@pytest.mark.parametrize(("n", "k"), [(32768, 16), (65536, 16), (2048, 256), (64, 1)])
def test_reveal_frame_bound_holds(n: int, k: int) -> None:
    rows = _reveal_rows(n, k)
    reveal = DeviceReveal(
        challenge_id=b"c" * 16, worker_id="f" * 32, device_uuid="U" * 64, rows=rows
    )
    worker_reveal = ChallengeReveal(challenge_id=b"c" * 16, device_uuid="U" * 64, rows=rows)
    bound = wire.reveal_frame_bound(n, k)
    for msg, route in ((reveal, (Link.MINER_VALIDATOR, Direction.UP)), (worker_reveal, UP)):
        data = encode(Frame(id=2**63 - 1, msg=msg))
        assert len(data) <= bound
        assert len(data) > bound - 512 - k * 16  # and the bound is not wildly loose
        if bound <= wire.max_frame_bytes(*route):
            assert decode(*route, data).msg == msg


def test_default_reveal_fits() -> None:
    assert wire.reveal_frame_bound(32768, 16) <= wire.WORKER_TO_MINER_MAX_BYTES
    assert wire.reveal_frame_bound(65536, 16) <= wire.MINER_TO_VALIDATOR_MAX_BYTES


def test_largest_roster_and_batches_fit() -> None:
    inv = _inventory()
    workers = [
        WorkerSummary(
            worker_id=f"{i:032x}",
            online=True,
            leased_devices=[f"{j:064d}" for j in range(wire.MAX_DEVICES_PER_WORKER)],
            inventory=inv,
        )
        for i in range(wire.MAX_WORKERS_PER_MINER)
    ]
    up = (Link.MINER_VALIDATOR, Direction.UP)
    roster = encode(Frame(id=1, msg=WorkerRoster(workers=workers)))
    assert len(roster) <= wire.max_frame_bytes(*up)
    assert decode(*up, roster).msg == WorkerRoster(workers=workers)

    challenges = [
        DeviceChallenge(
            worker_id=f"{i // 32:032x}",
            challenge_id=i.to_bytes(16, "big"),
            seed=b"s" * 32,
            miner_hotkey="z" * 64,
            device_uuid=f"{i % 32:064d}",
            n=65536,
            precision="bf16",
            deadline_ms=3_600_000,
        )
        for i in range(wire.MAX_BATCH_DEVICES)
    ]
    down = (Link.MINER_VALIDATOR, Direction.DOWN)
    batch = ChallengeBatch(round_id=2**63 - 1, challenges=challenges)
    data = encode(Frame(id=1, msg=batch))
    assert len(data) <= wire.max_frame_bytes(*down)
    assert decode(*down, data).msg == batch

    requests = [
        DeviceRevealRequest(
            worker_id=c.worker_id,
            challenge_id=c.challenge_id,
            device_uuid=c.device_uuid,
            rows=list(range(65535, 65535 - 256, -1)),
        )
        for c in challenges
    ]
    reveal_batch = RevealBatch(round_id=1, requests=requests)
    data = encode(Frame(id=1, msg=reveal_batch))
    assert len(data) <= wire.max_frame_bytes(*down)
    assert decode(*down, data).msg == reveal_batch

    # what the miner forwards to one worker stays within the worker's small limit
    for msg in (challenges[0].request(), requests[0].request()):
        data = encode(Frame(id=2**63 - 1, msg=msg))
        assert len(data) <= wire.MINER_TO_WORKER_MAX_BYTES
        assert decode(*DOWN, data).msg == msg

    heartbeat = wire.Heartbeat(
        uptime_s=1e10,
        load1=1e6,
        mem_used_bytes=2**63 - 1,
        gpus=[
            wire.GpuLive(uuid=f"{i:064d}", util_pct=100, mem_used_bytes=2**63 - 1, temp_c=-64)
            for i in range(wire.MAX_DEVICES_PER_WORKER)
        ],
        leased_devices=[f"{i:064d}" for i in range(wire.MAX_DEVICES_PER_WORKER)],
    )
    assert decode(*UP, encode(Frame(msg=heartbeat))).msg == heartbeat


def test_relay_helpers_copy_every_field() -> None:
    dc = DeviceChallenge(
        worker_id="0" * 32,
        challenge_id=b"c" * 16,
        seed=b"s" * 32,
        miner_hotkey="5abc",
        device_uuid="GPU-1",
        n=128,
        precision="tf32",
        deadline_ms=10,
    )
    req = dc.request()
    assert isinstance(req, ChallengeRequest)
    assert msgspec.structs.asdict(req) == {
        k: v for k, v in msgspec.structs.asdict(dc).items() if k != "worker_id"
    }
    rr = DeviceRevealRequest(worker_id="0" * 32, challenge_id=b"c" * 16, device_uuid="G", rows=[1])
    assert rr.request() == RevealRequest(challenge_id=b"c" * 16, device_uuid="G", rows=[1])


def test_messages_are_frozen() -> None:
    ping = Ping(nonce=1)
    with pytest.raises(AttributeError):
        ping.nonce = 2  # type: ignore[misc]
    assert encode(Frame(msg=Pong(nonce=1))) != encode(Frame(msg=Ping(nonce=1)))
