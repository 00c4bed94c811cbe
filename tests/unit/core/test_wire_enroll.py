"""The gateway-enrollment messages of the wire: where they may travel and what they may hold."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from byteleap.core import wire
from byteleap.core.wire import Direction, ErrorCode, Frame, Link, WireError
from byteleap.gateway.ca import GatewayCA

WORKER_UP = (Link.WORKER_MINER, Direction.UP)
WORKER_DOWN = (Link.WORKER_MINER, Direction.DOWN)
MINER_UP = (Link.MINER_VALIDATOR, Direction.UP)
MINER_DOWN = (Link.MINER_VALIDATOR, Direction.DOWN)
ROUTES = [WORKER_UP, WORKER_DOWN, MINER_UP, MINER_DOWN]
WORKER_ID = "0f" * 16
CA_PEM = GatewayCA.create().cert_pem


def grant_fields(**over: Any) -> dict[str, Any]:
    return {
        "gateway_id": "ab" * 16,
        "token": "ble_" + "A" * 43,
        "expires_at": 1_700_000_600.0,
        "enroll_url": "https://gw.example.org:8443/v1/enroll",
        "ws_url": "wss://gw.example.org:8444/v1/worker",
        "ca_pem": CA_PEM,
        **over,
    }


def raw(tag: str, **fields: Any) -> bytes:
    return msgspec.msgpack.encode(
        {"v": wire.PROTOCOL_VERSION, "id": 7, "msg": {"type": tag, **fields}}
    )


def refused(route: tuple[Link, Direction], data: bytes) -> WireError:
    with pytest.raises(WireError) as info:
        wire.decode(*route, data)
    return info.value


def test_each_message_travels_one_way_only() -> None:
    grant = wire.GatewayGrant(**grant_fields())
    messages = {
        WORKER_UP: wire.GatewayEnrollRequest(),
        WORKER_DOWN: wire.GatewayEnrollGrant(worker_id=WORKER_ID, grant=grant),
        MINER_UP: wire.GatewayTokenRequest(worker_id=WORKER_ID),
        MINER_DOWN: wire.GatewayTokenGrant(worker_id=WORKER_ID, grant=grant),
    }
    for home, msg in messages.items():
        data = wire.encode(Frame(id=7, msg=msg))
        assert wire.decode(*home, data) == Frame(id=7, msg=msg)
        for route in ROUTES:
            if route != home:
                assert refused(route, data).code is ErrorCode.UNKNOWN_MESSAGE


def test_a_grant_with_the_largest_ca_fits_the_miner_to_worker_limit() -> None:
    pem = "-----BEGIN CERTIFICATE-----\n" + "A" * (8192 - 28)
    grant = wire.GatewayGrant(**grant_fields(ca_pem=pem, enroll_url="https://" + "h" * 504))
    data = wire.encode(Frame(id=7, msg=wire.GatewayEnrollGrant(worker_id=WORKER_ID, grant=grant)))
    assert len(data) < wire.max_frame_bytes(*WORKER_DOWN)
    assert isinstance(wire.decode(*WORKER_DOWN, data).msg, wire.GatewayEnrollGrant)


@pytest.mark.parametrize(
    "over",
    [
        {"token": "short"},  # too short for a bearer credential
        {"token": "ble_" + "A" * 200},
        {"token": "ble_AAAA AAAA"},  # a space would split the header
        {"token": "ble_AAAAAAAA\r\nX-Evil: 1"},
        {"enroll_url": "http://gw.example.org/v1/enroll"},  # plaintext
        {"enroll_url": "https://gw.example.org/v1/enroll\n"},
        {"enroll_url": "https://" + "h" * 600},
        {"ws_url": "ws://gw.example.org:8444/v1/worker"},
        {"ws_url": "https://gw.example.org:8444/v1/worker"},
        {"ca_pem": "not a certificate"},
        {"ca_pem": "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n"},
        {"ca_pem": "-----BEGIN CERTIFICATE-----\n\x00"},
        {"ca_pem": "-----BEGIN CERTIFICATE-----\n" + "A" * 9000},
        {"gateway_id": "AB" * 16},
        {"gateway_id": "ab" * 15},
        {"expires_at": -1.0},
        {"expires_at": "soon"},
        {"extra": 1},
    ],
    ids=lambda over: next(iter(over)),
)
def test_a_grant_that_does_not_fit_is_refused(over: dict[str, Any]) -> None:
    fields = grant_fields(**over)
    for route, tag in ((WORKER_DOWN, "gateway_enroll_grant"), (MINER_DOWN, "gateway_token_grant")):
        error = refused(route, raw(tag, worker_id=WORKER_ID, grant=fields))
        assert error.code is ErrorCode.BAD_FRAME
        assert error.ref == 7


def test_requests_are_strict() -> None:
    assert refused(WORKER_UP, raw("gateway_enroll_request", worker_id=WORKER_ID)).code is (
        ErrorCode.BAD_FRAME  # the worker cannot name whom the token is for
    )
    assert refused(MINER_UP, raw("gateway_token_request")).code is ErrorCode.BAD_FRAME
    assert refused(MINER_UP, raw("gateway_token_request", worker_id="x" * 32)).code is (
        ErrorCode.BAD_FRAME
    )
    assert refused(
        MINER_UP, raw("gateway_token_request", worker_id=WORKER_ID, miner_hotkey="5F")
    ).code is (ErrorCode.BAD_FRAME)  # nor can the miner name the hotkey
    missing = grant_fields()
    del missing["ca_pem"]
    assert refused(
        WORKER_DOWN, raw("gateway_enroll_grant", worker_id=WORKER_ID, grant=missing)
    ).code is (ErrorCode.BAD_FRAME)


def test_the_enrollment_error_codes_are_stable() -> None:
    assert {c.name: c.value for c in ErrorCode if c.value // 1000 == 4} == {
        "NO_GATEWAY": 4000,
        "GATEWAY_UNAVAILABLE": 4001,
        "GATEWAY_REFUSED": 4002,
        "NO_VALIDATOR": 4003,
    }
    error = wire.Error(code=ErrorCode.NO_GATEWAY, message="validator has no gateway", ref=7)
    for route in ROUTES:
        assert wire.decode(*route, wire.encode(Frame(id=7, msg=error))).msg == error


def test_a_peer_of_the_previous_version_is_told_the_version() -> None:
    old = msgspec.msgpack.encode(
        {"v": wire.PROTOCOL_VERSION - 1, "id": 3, "msg": {"type": "gateway_enroll_request"}}
    )
    error = refused(WORKER_UP, old)
    assert error.code is ErrorCode.UNSUPPORTED_VERSION
    assert error.peer_version == wire.PROTOCOL_VERSION - 1
