"""The secure channel: handshake authentication, MITM resistance, frames, replay, rekey, expiry."""

from __future__ import annotations

import itertools
import struct
import time
import types
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from byteleap.core import session as session_module
from byteleap.core.identity import (
    HotkeySigner,
    IdentityKind,
    PeerIdentity,
    Signer,
    WorkerKey,
)
from byteleap.core.session import (
    FRAME_HEADER_BYTES,
    FRAME_OVERHEAD,
    ClientFinish,
    ClientHello,
    HandshakeError,
    Initiator,
    MalformedFrame,
    ReplayedFrame,
    Responder,
    SecureSession,
    ServerHello,
    SessionConfig,
    SessionError,
    SessionExpired,
    StaleFrame,
    TamperedFrame,
    WireIdentity,
)

PROLOGUE = b"byteleap/worker-miner/v1"
ALICE = HotkeySigner.from_uri("//Alice")
BOB = HotkeySigner.from_uri("//Bob")
WORKER = WorkerKey.generate()
OTHER_WORKER = WorkerKey.generate()
SMALL = SessionConfig(replay_window=8, max_forward_jump=32)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def accept_all(_peer: PeerIdentity) -> bool:
    return True


def only(*allowed: Signer) -> Callable[[PeerIdentity], bool]:
    identities = {s.identity for s in allowed}
    return lambda peer: peer in identities


@dataclass
class Pair:
    client: SecureSession
    server: SecureSession


def handshake(
    client: Signer = WORKER,
    server: Signer = ALICE,
    *,
    config: SessionConfig | None = None,
    clock: Callable[[], float] = time.monotonic,
    client_authorize: Callable[[PeerIdentity], bool] = accept_all,
    server_authorize: Callable[[PeerIdentity], bool] = accept_all,
) -> Pair:
    initiator = Initiator(client, client_authorize, PROLOGUE, config, clock)
    responder = Responder(server, server_authorize, PROLOGUE, config, clock)
    server_hello = responder.respond(initiator.hello())
    finish, client_session = initiator.finish(server_hello)
    server_session = responder.complete(finish)
    return Pair(client_session, server_session)


def header(frame: bytes) -> tuple[int, int, int]:
    version, epoch, sequence = struct.unpack(">BIQ", frame[:13])
    return version, epoch, sequence


# Deterministic handshakes: Ed25519 signs deterministically (sr25519 does not), and
# fix_randomness() makes the ephemeral keys and nonces fixed too.
FIXED_CLIENT = WorkerKey(Ed25519PrivateKey.from_private_bytes(bytes([5]) * 32))
FIXED_SERVER = WorkerKey(Ed25519PrivateKey.from_private_bytes(bytes([6]) * 32))


def fix_randomness(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every handshake from here on draws the same ephemeral keys and nonces (client's, then
    server's), so two handshakes between the same keys derive the same traffic secrets."""
    ephemerals = itertools.cycle(
        [X25519PrivateKey.from_private_bytes(bytes([b]) * 32) for b in (1, 2)]
    )
    nonces = itertools.cycle([bytes([3]) * 32, bytes([4]) * 32])
    monkeypatch.setattr(
        session_module, "X25519PrivateKey", types.SimpleNamespace(generate=lambda: next(ephemerals))
    )
    monkeypatch.setattr(
        session_module, "secrets", types.SimpleNamespace(token_bytes=lambda _n: next(nonces))
    )


def _x25519_pub() -> bytes:
    return (
        X25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


# ------------------------------------------------------------------------------------------------
# Successful handshakes


@pytest.mark.parametrize(
    ("client", "server"),
    [
        (WORKER, ALICE),  # worker (ed25519) -> miner (hotkey)
        (ALICE, WORKER),  # the other way round
        (ALICE, BOB),  # miner -> validator, both sr25519
        (WORKER, OTHER_WORKER),  # both ed25519
    ],
    ids=["worker->miner", "hotkey->worker", "miner->validator", "worker->worker"],
)
def test_handshake_authenticates_both_sides(client: Signer, server: Signer) -> None:
    seen: dict[str, PeerIdentity] = {}

    def client_auth(peer: PeerIdentity) -> bool:
        seen["client saw"] = peer
        return True

    def server_auth(peer: PeerIdentity) -> bool:
        seen["server saw"] = peer
        return True

    pair = handshake(client, server, client_authorize=client_auth, server_authorize=server_auth)
    assert pair.client.peer == server.identity
    assert pair.server.peer == client.identity
    assert seen == {"client saw": server.identity, "server saw": client.identity}


def test_bidirectional_messages() -> None:
    pair = handshake()
    for i in range(5):
        assert pair.server.open(pair.client.seal(b"to server %d" % i)) == b"to server %d" % i
        assert pair.client.open(pair.server.seal(b"to client %d" % i)) == b"to client %d" % i
    assert pair.server.open(pair.client.seal(b"")) == b""


def test_frame_format() -> None:
    pair = handshake()
    frames = [pair.client.seal(b"abc") for _ in range(3)]
    assert [header(f) for f in frames] == [(1, 0, 0), (1, 0, 1), (1, 0, 2)]
    assert all(len(f) == FRAME_OVERHEAD + 3 for f in frames)
    assert FRAME_HEADER_BYTES == 13
    # the two directions count independently
    assert header(pair.server.seal(b"x")) == (1, 0, 0)


def test_channel_binding_equal_within_and_different_across_sessions() -> None:
    one, two = handshake(), handshake()
    assert one.client.channel_binding == one.server.channel_binding
    assert len(one.client.channel_binding) == 32
    assert one.client.channel_binding != two.client.channel_binding


def test_key_schedule_known_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixed long-term keys, ephemerals and nonces give a fixed channel binding and fixed first
    frames: any change to the transcript, the signed messages or the key schedule changes these
    bytes (and peers running the previous code could no longer talk to this one)."""
    fix_randomness(monkeypatch)
    pair = handshake(FIXED_CLIENT, FIXED_SERVER)
    assert pair.client.channel_binding.hex() == (
        "93b04658566398683dab55aacaffab3f4307db2ac1b49a62a6325adade3696c6"
    )
    assert pair.server.channel_binding == pair.client.channel_binding
    assert pair.client.seal(b"hello").hex() == (
        "010000000000000000000000004e296878ab756d976576df760609ec47f28e666a26"
    )
    assert pair.server.seal(b"hello").hex() == (
        "010000000000000000000000005c20da9476f97f2028cf65b60e3499a839d80d73a1"
    )


def test_peer_kind_is_enforced() -> None:
    initiator = Initiator(WORKER, accept_all, PROLOGUE)
    responder = Responder(ALICE, accept_all, PROLOGUE, peer_kind=IdentityKind.SR25519)
    with pytest.raises(HandshakeError) as excinfo:
        responder.respond(initiator.hello())
    assert excinfo.value.reason == "kind_mismatch"

    initiator = Initiator(WORKER, accept_all, PROLOGUE, peer_kind=IdentityKind.ED25519)
    responder = Responder(ALICE, accept_all, PROLOGUE)
    with pytest.raises(HandshakeError) as excinfo:
        initiator.finish(responder.respond(initiator.hello()))
    assert excinfo.value.reason == "kind_mismatch"


# ------------------------------------------------------------------------------------------------
# Handshake failures


def test_server_authorize_rejects_unknown_client() -> None:
    initiator = Initiator(WORKER, accept_all, PROLOGUE)
    responder = Responder(ALICE, only(OTHER_WORKER), PROLOGUE)
    with pytest.raises(HandshakeError) as excinfo:
        responder.respond(initiator.hello())
    assert excinfo.value.reason == "unauthorized"
    assert excinfo.value.code == "handshake_failed"


class CountingSigner:
    """Counts signatures made with a real key."""

    def __init__(self, signer: Signer) -> None:
        self.identity = signer.identity
        self._signer = signer
        self.count = 0

    def sign(self, message: bytes) -> bytes:
        self.count += 1
        return self._signer.sign(message)


@pytest.mark.parametrize(
    ("authorize", "peer_kind", "reason"),
    [
        (only(OTHER_WORKER), None, "unauthorized"),
        (accept_all, IdentityKind.SR25519, "kind_mismatch"),
    ],
)
def test_server_refuses_before_signing_anything(
    authorize: Callable[[PeerIdentity], bool], peer_kind: IdentityKind | None, reason: str
) -> None:
    """An unknown client must not get a server signature (work, and a signing oracle)."""
    server = CountingSigner(ALICE)
    responder = Responder(server, authorize, PROLOGUE, peer_kind=peer_kind)
    with pytest.raises(HandshakeError) as excinfo:
        responder.respond(Initiator(WORKER, accept_all, PROLOGUE).hello())
    assert excinfo.value.reason == reason
    assert server.count == 0
    # the control: an accepted client gets exactly one signature
    Responder(server, accept_all, PROLOGUE).respond(Initiator(WORKER, accept_all, PROLOGUE).hello())
    assert server.count == 1


def test_client_refuses_before_signing_anything() -> None:
    client = CountingSigner(WORKER)
    initiator = Initiator(client, only(BOB), PROLOGUE)
    with pytest.raises(HandshakeError) as excinfo:
        initiator.finish(Responder(ALICE, accept_all, PROLOGUE).respond(initiator.hello()))
    assert excinfo.value.reason == "unauthorized"
    assert client.count == 0


def test_client_authorize_rejects_unexpected_server() -> None:
    initiator = Initiator(WORKER, only(BOB), PROLOGUE)
    responder = Responder(ALICE, accept_all, PROLOGUE)
    with pytest.raises(HandshakeError) as excinfo:
        initiator.finish(responder.respond(initiator.hello()))
    assert excinfo.value.reason == "unauthorized"


class Impostor:
    """Claims one identity but holds another key."""

    def __init__(self, claimed: Signer, actual: Signer) -> None:
        self.identity = claimed.identity
        self._actual = actual

    def sign(self, message: bytes) -> bytes:
        return self._actual.sign(message)


def test_server_signing_with_the_wrong_key_is_rejected() -> None:
    initiator = Initiator(WORKER, only(ALICE), PROLOGUE)
    responder = Responder(Impostor(ALICE, BOB), accept_all, PROLOGUE)
    with pytest.raises(HandshakeError) as excinfo:
        initiator.finish(responder.respond(initiator.hello()))
    assert excinfo.value.reason == "bad_signature"


def test_client_signing_with_the_wrong_key_is_rejected() -> None:
    initiator = Initiator(Impostor(WORKER, OTHER_WORKER), accept_all, PROLOGUE)
    responder = Responder(ALICE, only(WORKER), PROLOGUE)
    finish, _ = initiator.finish(responder.respond(initiator.hello()))
    with pytest.raises(HandshakeError) as excinfo:
        responder.complete(finish)
    assert excinfo.value.reason == "bad_signature"


def test_prologue_mismatch() -> None:
    initiator = Initiator(WORKER, accept_all, b"byteleap/miner-validator/v1")
    responder = Responder(ALICE, accept_all, PROLOGUE)
    with pytest.raises(HandshakeError) as excinfo:
        responder.respond(initiator.hello())
    assert excinfo.value.reason == "prologue_mismatch"


def test_prologue_is_bound_into_the_signatures() -> None:
    """Even if a relay rewrote the prologue field, the transcripts would not match."""
    initiator = Initiator(WORKER, accept_all, b"byteleap/miner-validator/v1")
    responder = Responder(ALICE, accept_all, PROLOGUE)
    hello = msgspec.msgpack.decode(initiator.hello(), type=ClientHello)
    forged = msgspec.msgpack.encode(msgspec.structs.replace(hello, prologue=PROLOGUE))
    with pytest.raises(HandshakeError) as excinfo:
        initiator.finish(responder.respond(forged))
    assert excinfo.value.reason == "bad_signature"


def test_wrong_version() -> None:
    initiator = Initiator(WORKER, accept_all, PROLOGUE)
    hello = msgspec.msgpack.decode(initiator.hello(), type=ClientHello)
    for version in (0, 2, 255):
        responder = Responder(ALICE, accept_all, PROLOGUE)
        data = msgspec.msgpack.encode(msgspec.structs.replace(hello, version=version))
        with pytest.raises(HandshakeError) as excinfo:
            responder.respond(data)
        assert excinfo.value.reason == "version"
    # a future version with a different layout still reads as a version error
    responder = Responder(ALICE, accept_all, PROLOGUE)
    with pytest.raises(HandshakeError) as excinfo:
        responder.respond(msgspec.msgpack.encode(["client_hello", 2, {"new": "layout"}]))
    assert excinfo.value.reason == "version"


def test_server_hello_wrong_version() -> None:
    initiator = Initiator(WORKER, accept_all, PROLOGUE)
    responder = Responder(ALICE, accept_all, PROLOGUE)
    reply = msgspec.msgpack.decode(responder.respond(initiator.hello()), type=ServerHello)
    with pytest.raises(HandshakeError) as excinfo:
        initiator.finish(msgspec.msgpack.encode(msgspec.structs.replace(reply, version=2)))
    assert excinfo.value.reason == "version"


@pytest.mark.parametrize(
    "point",
    [
        bytes(32),  # zero
        (1).to_bytes(32, "little"),  # order 1
        bytes.fromhex(
            "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"
        ),  # order 8
        bytes.fromhex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),  # p-1
    ],
)
def test_low_order_ephemeral_keys_are_rejected(point: bytes) -> None:
    initiator = Initiator(WORKER, accept_all, PROLOGUE)
    hello = msgspec.msgpack.decode(initiator.hello(), type=ClientHello)
    responder = Responder(ALICE, accept_all, PROLOGUE)
    with pytest.raises(HandshakeError) as excinfo:
        responder.respond(msgspec.msgpack.encode(msgspec.structs.replace(hello, ephemeral=point)))
    assert excinfo.value.reason == "bad_key"

    # and from the server side
    initiator = Initiator(WORKER, accept_all, PROLOGUE)
    responder = Responder(ALICE, accept_all, PROLOGUE)
    reply = msgspec.msgpack.decode(responder.respond(initiator.hello()), type=ServerHello)
    with pytest.raises(HandshakeError) as excinfo:
        initiator.finish(msgspec.msgpack.encode(msgspec.structs.replace(reply, ephemeral=point)))
    assert excinfo.value.reason == "bad_key"


def test_handshake_timeout() -> None:
    clock = FakeClock()
    config = SessionConfig(handshake_timeout_seconds=5)
    initiator = Initiator(WORKER, accept_all, PROLOGUE, config, clock)
    responder = Responder(ALICE, accept_all, PROLOGUE, config, clock)
    assert initiator.deadline == responder.deadline == clock.now + 5
    reply = responder.respond(initiator.hello())
    clock.advance(5.1)
    with pytest.raises(HandshakeError) as excinfo:
        initiator.finish(reply)
    assert excinfo.value.reason == "timeout"
    with pytest.raises(HandshakeError) as excinfo:
        responder.complete(b"")
    assert excinfo.value.reason == "timeout"


def test_handshake_objects_are_single_use() -> None:
    initiator = Initiator(WORKER, accept_all, PROLOGUE)
    responder = Responder(ALICE, accept_all, PROLOGUE)
    with pytest.raises(HandshakeError) as excinfo:
        initiator.finish(b"")
    assert excinfo.value.reason == "state"
    hello = initiator.hello()
    with pytest.raises(HandshakeError):
        initiator.hello()
    with pytest.raises(HandshakeError):
        responder.complete(b"")
    reply = responder.respond(hello)
    with pytest.raises(HandshakeError):
        responder.respond(hello)
    finish, _ = initiator.finish(reply)
    responder.complete(finish)
    with pytest.raises(HandshakeError):
        responder.complete(finish)
    with pytest.raises(HandshakeError):
        initiator.finish(reply)


def test_a_failed_handshake_cannot_be_resumed() -> None:
    initiator = Initiator(WORKER, accept_all, PROLOGUE)
    responder = Responder(ALICE, accept_all, PROLOGUE)
    reply = responder.respond(initiator.hello())
    with pytest.raises(HandshakeError):
        initiator.finish(b"\x00")
    with pytest.raises(HandshakeError) as excinfo:
        initiator.finish(reply)  # the genuine reply, too late
    assert excinfo.value.reason == "state"


def test_invalid_prologue_argument() -> None:
    with pytest.raises(ValueError):
        Initiator(WORKER, accept_all, b"")
    with pytest.raises(ValueError):
        Responder(ALICE, accept_all, b"x" * 129)


def test_oversized_handshake_messages() -> None:
    config = SessionConfig(max_handshake_bytes=256)
    initiator = Initiator(WORKER, accept_all, PROLOGUE, config)
    hello = initiator.hello()
    responder = Responder(ALICE, accept_all, PROLOGUE, config)
    with pytest.raises(HandshakeError) as excinfo:
        responder.respond(hello + b"\x00" * 300)
    assert excinfo.value.reason == "oversize"
    responder = Responder(ALICE, accept_all, PROLOGUE, config)  # a failed one stays failed
    reply = responder.respond(hello)
    with pytest.raises(HandshakeError) as excinfo:
        initiator.finish(reply + b"\x00" * 300)
    assert excinfo.value.reason == "oversize"


def test_message_types_are_not_interchangeable() -> None:
    initiator = Initiator(WORKER, accept_all, PROLOGUE)
    hello = initiator.hello()
    # a ClientHello reflected back as a ServerHello
    with pytest.raises(HandshakeError) as excinfo:
        initiator.finish(hello)
    assert excinfo.value.reason == "malformed"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda h: [*h, b"extra"],  # unknown trailing field
        lambda h: h[:-1],  # missing field
        lambda h: [h[0], h[1], h[2].decode(), *h[3:]],  # str instead of bytes
        lambda h: [h[0], h[1], h[2], h[3][:31], *h[4:]],  # short ephemeral
        lambda h: [h[0], h[1], h[2], h[3], h[4] + b"\x00", h[5]],  # long nonce
        lambda h: [*h[:5], ["rsa", h[5][1]]],  # unknown identity kind
        lambda h: [*h[:5], ["ed25519", h[5][1][:16]]],  # short identity key
        lambda h: [h[0], True, *h[2:]],  # bool version
        lambda h: ["server_hello", *h[1:]],  # wrong tag
        lambda h: {"version": 1},  # map instead of array
    ],
)
def test_malformed_client_hello(mutate: Callable[[list[object]], object]) -> None:
    raw = msgspec.msgpack.decode(Initiator(WORKER, accept_all, PROLOGUE).hello())
    assert isinstance(raw, list)
    responder = Responder(ALICE, accept_all, PROLOGUE)
    with pytest.raises(HandshakeError) as excinfo:
        responder.respond(msgspec.msgpack.encode(mutate(raw)))
    assert excinfo.value.reason in {"malformed", "version"}


def test_invalid_utf8_in_the_tag_is_malformed() -> None:
    # msgpack str header (fixstr, 12 bytes) with invalid UTF-8 content: msgspec raises
    # UnicodeDecodeError, not DecodeError, for this; it must still surface as HandshakeError.
    data = b"\x96\xac" + b"client\xdfhello" + b"\x01"
    responder = Responder(ALICE, accept_all, PROLOGUE)
    with pytest.raises(HandshakeError) as excinfo:
        responder.respond(data)
    assert excinfo.value.reason == "malformed"


def test_deeply_nested_input_is_malformed() -> None:
    # ["client_hello", 1, [[[[...]]]]]: the version probe skips the nested field recursively
    data = b"\x93\xacclient_hello\x01" + b"\x91" * 1000 + b"\xc0"
    responder = Responder(ALICE, accept_all, PROLOGUE)
    with pytest.raises(HandshakeError) as excinfo:
        responder.respond(data)
    assert excinfo.value.reason == "malformed"


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(st.binary(max_size=1500), st.text(max_size=20), st.none(), st.integers()))
def test_random_input_only_ever_raises_handshake_error(data: object) -> None:
    responder = Responder(ALICE, accept_all, PROLOGUE)
    with pytest.raises(HandshakeError):
        responder.respond(data)  # type: ignore[arg-type]
    initiator = Initiator(WORKER, accept_all, PROLOGUE)
    initiator.hello()
    with pytest.raises(HandshakeError):
        initiator.finish(data)  # type: ignore[arg-type]


_msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.binary(max_size=40)
    | st.text(max_size=8)
    | st.floats(),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=4), children, max_size=4)
    ),
    max_leaves=16,
)


@settings(max_examples=200)
@given(
    tag=st.sampled_from(["client_hello", "server_hello", "client_finish", "x"]),
    rest=st.lists(_msgpack_values, max_size=7),
)
def test_structured_garbage_only_ever_raises_handshake_error(tag: str, rest: list[object]) -> None:
    data = msgspec.msgpack.encode([tag, *rest])
    responder = Responder(ALICE, accept_all, PROLOGUE)
    with pytest.raises(HandshakeError):
        responder.respond(data)
    initiator = Initiator(WORKER, accept_all, PROLOGUE)
    initiator.hello()
    with pytest.raises(HandshakeError):
        initiator.finish(data)
    initiator = Initiator(WORKER, accept_all, PROLOGUE)
    responder = Responder(ALICE, accept_all, PROLOGUE)
    responder.respond(initiator.hello())
    with pytest.raises(HandshakeError):
        responder.complete(data)


@settings(max_examples=50)
@given(data=st.binary(max_size=200))
def test_random_client_finish_only_ever_raises_handshake_error(data: bytes) -> None:
    initiator = Initiator(WORKER, accept_all, PROLOGUE)
    responder = Responder(ALICE, accept_all, PROLOGUE)
    responder.respond(initiator.hello())
    with pytest.raises(HandshakeError):
        responder.complete(data)


@settings(max_examples=150)
@given(st.data())
def test_any_bit_flip_in_the_handshake_fails_it(data: st.DataObject) -> None:
    """Every handshake byte is authenticated: a single flipped bit anywhere aborts the handshake
    on one side or the other, and never yields a session."""
    which = data.draw(st.sampled_from(["client_hello", "server_hello", "client_finish"]))
    initiator = Initiator(WORKER, accept_all, PROLOGUE)
    responder = Responder(ALICE, accept_all, PROLOGUE)

    def flip(message: bytes) -> bytes:
        bit = data.draw(st.integers(0, len(message) * 8 - 1))
        out = bytearray(message)
        out[bit // 8] ^= 1 << (bit % 8)
        return bytes(out)

    with pytest.raises(HandshakeError):
        hello = initiator.hello()
        reply = responder.respond(flip(hello) if which == "client_hello" else hello)
        finish, _ = initiator.finish(flip(reply) if which == "server_hello" else reply)
        responder.complete(flip(finish) if which == "client_finish" else finish)


# ------------------------------------------------------------------------------------------------
# Man in the middle


def test_mitm_substituting_the_client_ephemeral_is_detected() -> None:
    initiator = Initiator(WORKER, only(ALICE), PROLOGUE)
    responder = Responder(ALICE, only(WORKER), PROLOGUE)
    # The attacker replaces the worker's ephemeral key with its own, keeping the worker's claimed
    # identity: a ClientHello of its own making, as an Initiator holding the wrong key.
    genuine = msgspec.msgpack.decode(initiator.hello(), type=ClientHello)
    attacker = Initiator(Impostor(WORKER, OTHER_WORKER), accept_all, PROLOGUE)
    tampered = msgspec.msgpack.decode(attacker.hello(), type=ClientHello)
    assert tampered.identity == genuine.identity and tampered.ephemeral != genuine.ephemeral
    reply = responder.respond(msgspec.msgpack.encode(tampered))  # server cannot tell yet
    with pytest.raises(HandshakeError) as excinfo:
        initiator.finish(reply)  # but the server signed a transcript the client never sent
    assert excinfo.value.reason == "bad_signature"
    # Nor can the attacker finish the server side: its ClientFinish covers exactly the
    # transcript the server holds, but is signed with the wrong key.
    forged, _ = attacker.finish(reply)
    with pytest.raises(HandshakeError) as excinfo:
        responder.complete(forged)
    assert excinfo.value.reason == "bad_signature"


def test_mitm_substituting_the_server_ephemeral_is_detected() -> None:
    initiator = Initiator(WORKER, only(ALICE), PROLOGUE)
    responder = Responder(ALICE, only(WORKER), PROLOGUE)
    reply = msgspec.msgpack.decode(responder.respond(initiator.hello()), type=ServerHello)
    tampered = msgspec.structs.replace(reply, ephemeral=_x25519_pub())
    with pytest.raises(HandshakeError) as excinfo:
        initiator.finish(msgspec.msgpack.encode(tampered))
    assert excinfo.value.reason == "bad_signature"


def test_mitm_resigning_with_its_own_identity_is_refused_by_pinning() -> None:
    """An attacker terminating the handshake itself must sign with its own key: pinning stops it."""
    initiator = Initiator(WORKER, only(ALICE), PROLOGUE)
    mitm = Responder(BOB, accept_all, PROLOGUE)
    with pytest.raises(HandshakeError) as excinfo:
        initiator.finish(mitm.respond(initiator.hello()))
    assert excinfo.value.reason == "unauthorized"


def test_mitm_swapping_the_server_identity_breaks_the_signature() -> None:
    initiator = Initiator(WORKER, accept_all, PROLOGUE)
    responder = Responder(ALICE, accept_all, PROLOGUE)
    reply = msgspec.msgpack.decode(responder.respond(initiator.hello()), type=ServerHello)
    swapped = msgspec.structs.replace(
        reply, identity=WireIdentity(IdentityKind.SR25519, BOB.identity.public_key)
    )
    with pytest.raises(HandshakeError) as excinfo:
        initiator.finish(msgspec.msgpack.encode(swapped))
    assert excinfo.value.reason == "bad_signature"


def test_mitm_swapping_the_client_identity_cannot_finish() -> None:
    """Claiming someone else's identity in the ClientHello needs their key for ClientFinish:
    a genuine ClientFinish of that identity, captured from another session, does not do."""
    initiator = Initiator(WORKER, accept_all, PROLOGUE)
    responder = Responder(ALICE, accept_all, PROLOGUE)
    captured, _ = initiator.finish(responder.respond(initiator.hello()))

    initiator = Initiator(OTHER_WORKER, accept_all, PROLOGUE)
    responder = Responder(ALICE, only(WORKER), PROLOGUE)
    hello = msgspec.msgpack.decode(initiator.hello(), type=ClientHello)
    claimed = msgspec.structs.replace(
        hello, identity=WireIdentity(IdentityKind.ED25519, WORKER.public_key)
    )
    responder.respond(msgspec.msgpack.encode(claimed))
    with pytest.raises(HandshakeError) as excinfo:
        responder.complete(captured)  # WORKER's own signature, over another transcript
    assert excinfo.value.reason == "bad_signature"


@pytest.mark.parametrize("same_labels", [False, True], ids=["labels", "labels-equal"])
def test_reflected_server_signature_is_not_a_client_signature(
    monkeypatch: pytest.MonkeyPatch, same_labels: bool
) -> None:
    """The server's own signature replayed as the ClientFinish must fail, even between two ends
    with the same key. That rests on the signed field lists differing (the client's also covers
    the server's signature), not on the role labels: with both labels made equal it still fails.
    """
    if same_labels:
        monkeypatch.setattr(session_module, "_ROLE_CLIENT", session_module._ROLE_SERVER)
    initiator = Initiator(ALICE, accept_all, PROLOGUE)
    responder = Responder(ALICE, accept_all, PROLOGUE)  # same identity on both ends
    reply_bytes = responder.respond(initiator.hello())
    reply = msgspec.msgpack.decode(reply_bytes, type=ServerHello)
    with pytest.raises(HandshakeError) as excinfo:
        responder.complete(msgspec.msgpack.encode(ClientFinish(signature=reply.signature)))
    assert excinfo.value.reason == "bad_signature"
    # and an honest handshake still works with these labels
    handshake(ALICE, ALICE)


# ------------------------------------------------------------------------------------------------
# Frames


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_flipped_bit_is_rejected_and_does_not_disturb_the_channel(
    data: st.DataObject,
) -> None:
    pair = handshake(config=SMALL)
    plaintext = data.draw(st.binary(max_size=64))
    frame = pair.client.seal(plaintext)
    bit = data.draw(st.integers(0, len(frame) * 8 - 1))
    tampered = bytearray(frame)
    tampered[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(SessionError) as excinfo:
        pair.server.open(bytes(tampered))
    if bit < 8:  # protocol version byte
        assert isinstance(excinfo.value, MalformedFrame)
    elif bit < 40:  # key epoch
        if header(bytes(tampered))[1] == 1:  # the next epoch: its key does not authenticate it
            assert isinstance(excinfo.value, TamperedFrame)
        else:  # any other epoch: we hold no key for it
            assert isinstance(excinfo.value, StaleFrame)
    else:  # sequence number, ciphertext, tag
        assert isinstance(excinfo.value, TamperedFrame)
        assert excinfo.value.code == "tampered_frame"
    # the failure changed nothing: the genuine frame is still accepted, exactly once
    assert pair.server.open(frame) == plaintext
    with pytest.raises(ReplayedFrame):
        pair.server.open(frame)


def test_truncated_and_oversized_frames_are_malformed() -> None:
    config = SessionConfig(max_seal_bytes=FRAME_OVERHEAD + 10, max_open_bytes=FRAME_OVERHEAD + 10)
    pair = handshake(config=config)
    frame = pair.client.seal(b"0123456789")
    for cut in (0, 1, FRAME_HEADER_BYTES, FRAME_OVERHEAD - 1):
        with pytest.raises(MalformedFrame):
            pair.server.open(frame[:cut])
    with pytest.raises(MalformedFrame):
        pair.server.open(frame + b"\x00")
    with pytest.raises(ValueError):
        pair.client.seal(b"01234567890")
    with pytest.raises(MalformedFrame):
        pair.server.open(bytearray(frame))  # type: ignore[arg-type]
    assert pair.server.open(frame) == b"0123456789"


def test_seal_and_open_limits_are_separate() -> None:
    """Each direction of a link has its own limit: a small one out, a large one in."""
    small = SessionConfig(max_seal_bytes=FRAME_OVERHEAD + 4, max_open_bytes=FRAME_OVERHEAD + 100)
    large = SessionConfig(max_seal_bytes=FRAME_OVERHEAD + 100, max_open_bytes=FRAME_OVERHEAD + 4)
    initiator = Initiator(WORKER, accept_all, PROLOGUE, small)
    responder = Responder(ALICE, accept_all, PROLOGUE, large)
    finish, client = initiator.finish(responder.respond(initiator.hello()))
    server = responder.complete(finish)
    assert server.open(client.seal(b"1234")) == b"1234"
    with pytest.raises(ValueError, match="max_seal_bytes"):
        client.seal(b"12345")
    assert client.open(server.seal(b"x" * 100)) == b"x" * 100  # 100 in: allowed
    with pytest.raises(ValueError, match="max_seal_bytes"):
        server.seal(b"x" * 101)
    with pytest.raises(MalformedFrame, match="max_open_bytes"):
        server.open(bytes(FRAME_OVERHEAD + 5))  # refused by size, before any crypto
    assert client.config is small and server.config is large


def test_default_limits_fit_the_largest_wire_frame() -> None:
    from byteleap.core import wire

    config = SessionConfig()
    assert config.max_seal_bytes == config.max_open_bytes == wire.MAX_FRAME_BYTES + FRAME_OVERHEAD


def test_replayed_frame() -> None:
    pair = handshake()
    frame = pair.client.seal(b"pay me once")
    assert pair.server.open(frame) == b"pay me once"
    with pytest.raises(ReplayedFrame) as excinfo:
        pair.server.open(frame)
    assert excinfo.value.code == "replayed_frame"


def test_reordered_within_the_window_is_accepted_once() -> None:
    pair = handshake(config=SMALL)
    frames = [pair.client.seal(b"%d" % i) for i in range(8)]
    order = [7, 0, 3, 1, 6, 2, 5, 4]
    assert [pair.server.open(frames[i]) for i in order] == [b"%d" % i for i in order]
    for frame in frames:
        with pytest.raises(ReplayedFrame):
            pair.server.open(frame)


@given(st.permutations(range(8)))
def test_any_order_within_the_window_delivers_each_frame_once(order: list[int]) -> None:
    pair = handshake(config=SMALL)
    frames = [pair.client.seal(b"%d" % i) for i in range(8)]
    assert [pair.server.open(frames[i]) for i in order] == [b"%d" % i for i in order]
    for i in order:
        with pytest.raises(ReplayedFrame):
            pair.server.open(frames[i])


def test_reordered_beyond_the_window_is_stale() -> None:
    pair = handshake(config=SMALL)  # window 8
    frames = [pair.client.seal(b"%d" % i) for i in range(10)]
    assert pair.server.open(frames[9]) == b"9"
    assert pair.server.open(frames[2]) == b"2"  # 9 - 2 = 7 < 8: in the window
    with pytest.raises(StaleFrame) as excinfo:
        pair.server.open(frames[1])  # 9 - 1 = 8: just out
    assert excinfo.value.code == "stale_frame"
    with pytest.raises(StaleFrame):
        pair.server.open(frames[0])


def test_forward_jump_beyond_the_limit_is_stale_and_harmless() -> None:
    pair = handshake(config=SMALL)  # max_forward_jump 32
    frames = [pair.client.seal(b"%d" % i) for i in range(40)]
    with pytest.raises(StaleFrame):
        pair.server.open(frames[39])  # 39 - (-1) = 40 > 32
    assert pair.server.open(frames[0]) == b"0"  # window untouched
    assert pair.server.open(frames[32]) == b"32"  # 32 - 0 = 32: allowed
    assert pair.server.open(frames[39]) == b"39"


def test_frame_from_another_session_is_rejected() -> None:
    one, two = handshake(), handshake()
    frame = one.client.seal(b"for session one")
    with pytest.raises(TamperedFrame):
        two.server.open(frame)
    assert one.server.open(frame) == b"for session one"


def test_frame_reflected_to_its_sender_is_rejected() -> None:
    pair = handshake()
    frame = pair.client.seal(b"hello")
    with pytest.raises(TamperedFrame):
        pair.client.open(frame)
    assert pair.server.open(frame) == b"hello"


# ------------------------------------------------------------------------------------------------
# Rekey


def test_rekey_after_n_frames_keeps_the_channel_working() -> None:
    config = SessionConfig(rekey_after_frames=3)
    pair = handshake(config=config)
    for i in range(20):
        frame = pair.client.seal(b"c%d" % i)
        assert header(frame) == (1, i // 3, i)  # epoch advances every 3 frames, seq never resets
        assert pair.server.open(frame) == b"c%d" % i
        assert pair.client.open(pair.server.seal(b"s%d" % i)) == b"s%d" % i


def test_rekey_changes_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two sessions from the same traffic secrets, one rekeying after every frame: the same
    plaintext at the same sequence number encrypts differently once it has rekeyed."""
    fix_randomness(monkeypatch)
    rekeying = handshake(FIXED_CLIENT, FIXED_SERVER, config=SessionConfig(rekey_after_frames=1))
    steady = handshake(FIXED_CLIENT, FIXED_SERVER)
    assert rekeying.client.channel_binding == steady.client.channel_binding  # same secrets
    assert rekeying.client.seal(b"same") == steady.client.seal(b"same")  # sequence 0, epoch 0
    rekeyed, not_rekeyed = rekeying.client.seal(b"same"), steady.client.seal(b"same")
    assert header(rekeyed) == (1, 1, 1) and header(not_rekeyed) == (1, 0, 1)
    # The ciphertext without its tag depends only on key, nonce and plaintext (not on the header,
    # which only enters the tag): equal bytes here would mean the key and IV did not change.
    ciphertext = slice(FRAME_HEADER_BYTES, -16)
    assert rekeyed[ciphertext] != not_rekeyed[ciphertext]
    # A body moved under the other epoch's header authenticates under neither key.
    body = slice(FRAME_HEADER_BYTES, None)
    with pytest.raises(TamperedFrame):
        rekeying.server.open(not_rekeyed[:FRAME_HEADER_BYTES] + rekeyed[body])
    with pytest.raises(TamperedFrame):
        rekeying.server.open(rekeyed[:FRAME_HEADER_BYTES] + not_rekeyed[body])
    assert rekeying.server.open(rekeyed) == b"same"
    assert steady.server.open(not_rekeyed) == b"same"


def test_epoch_skips_and_old_epochs_are_rejected() -> None:
    config = SessionConfig(rekey_after_frames=1)
    pair = handshake(config=config)
    frames = [pair.client.seal(b"%d" % i) for i in range(4)]  # epochs 0, 1, 2, 3
    assert [header(f)[1] for f in frames] == [0, 1, 2, 3]
    assert pair.server.open(frames[0]) == b"0"
    with pytest.raises(StaleFrame):
        pair.server.open(frames[2])  # epoch +2
    assert pair.server.open(frames[1]) == b"1"  # epoch +1: followed
    with pytest.raises(StaleFrame):
        # an older epoch is gone for good, even for a frame never seen
        pair.server.open(pair_old_epoch_frame(config))
    assert pair.server.open(frames[2]) == b"2"
    assert pair.server.open(frames[3]) == b"3"


def pair_old_epoch_frame(config: SessionConfig) -> bytes:
    """Some frame with epoch 0 (content irrelevant: old epochs are refused before decryption)."""
    return struct.pack(">BIQ", 1, 0, 99) + bytes(16)


def test_out_of_order_frame_from_the_previous_epoch_is_stale() -> None:
    config = SessionConfig(rekey_after_frames=2)
    pair = handshake(config=config)
    frames = [pair.client.seal(b"%d" % i) for i in range(3)]  # epochs 0, 0, 1
    assert pair.server.open(frames[0]) == b"0"
    assert pair.server.open(frames[2]) == b"2"
    with pytest.raises(StaleFrame):
        pair.server.open(frames[1])


def test_tampered_next_epoch_frame_does_not_advance_the_epoch() -> None:
    config = SessionConfig(rekey_after_frames=1)
    pair = handshake(config=config)
    f0, f1 = pair.client.seal(b"0"), pair.client.seal(b"1")
    bad = f1[:-1] + bytes([f1[-1] ^ 1])
    with pytest.raises(TamperedFrame):
        pair.server.open(bad)
    assert pair.server.open(f0) == b"0"  # still on epoch 0
    assert pair.server.open(f1) == b"1"


def test_rekey_after_seconds() -> None:
    clock = FakeClock()
    config = SessionConfig(rekey_after_seconds=60)
    pair = handshake(config=config, clock=clock)
    first = pair.client.seal(b"a")
    clock.advance(61)
    second = pair.client.seal(b"b")
    third = pair.client.seal(b"c")
    assert [header(f)[1] for f in (first, second, third)] == [0, 1, 1]
    assert [pair.server.open(f) for f in (first, second, third)] == [b"a", b"b", b"c"]


# ------------------------------------------------------------------------------------------------
# Expiry


def test_session_expires() -> None:
    clock = FakeClock()
    config = SessionConfig(max_age_seconds=100)
    pair = handshake(config=config, clock=clock)
    assert pair.client.expires_at == clock.now + 100
    assert [s.expired for s in (pair.client, pair.server)] == [False, False]
    in_flight = pair.client.seal(b"late")
    clock.advance(99.9)
    assert pair.server.open(pair.client.seal(b"ok")) == b"ok"
    clock.advance(0.2)
    assert [s.expired for s in (pair.client, pair.server)] == [True, True]
    with pytest.raises(SessionExpired) as excinfo:
        pair.client.seal(b"too late")
    assert excinfo.value.code == "session_expired"
    with pytest.raises(SessionExpired):
        pair.server.open(in_flight)


def test_error_codes_are_stable() -> None:
    assert {c.code for c in (SessionError, HandshakeError, TamperedFrame, ReplayedFrame)} == {
        "session_error",
        "handshake_failed",
        "tampered_frame",
        "replayed_frame",
    }
    assert (StaleFrame.code, SessionExpired.code, MalformedFrame.code) == (
        "stale_frame",
        "session_expired",
        "malformed_frame",
    )
    for cls in (HandshakeError, TamperedFrame, ReplayedFrame, StaleFrame, SessionExpired):
        assert issubclass(cls, SessionError)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"replay_window": 0},
        {"rekey_after_frames": 0},
        {"rekey_after_frames": 2**32},
        {"max_age_seconds": 0},
        {"handshake_timeout_seconds": -1},
        {"max_handshake_bytes": 10},
        {"max_seal_bytes": FRAME_OVERHEAD},
        {"max_open_bytes": FRAME_OVERHEAD},
    ],
)
def test_config_validation(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SessionConfig(**kwargs)  # type: ignore[arg-type]


def test_handshake_error_reasons_are_the_listed_ones() -> None:
    assert HandshakeError("timeout", "late").reason == "timeout"
    with pytest.raises(ValueError, match="unknown handshake failure reason"):
        HandshakeError("timed out", "a typo is a bug, not a new reason")


def test_repr_shows_no_secrets() -> None:
    pair = handshake()
    text = repr(pair.client)
    assert pair.client.channel_binding.hex() not in text
    assert "SecureSession" in text


def test_an_authorize_callback_that_raises_propagates_and_ends_the_handshake() -> None:
    def broken(_peer: PeerIdentity) -> bool:
        raise RuntimeError("policy store down")

    initiator = Initiator(WORKER, accept_all, PROLOGUE)
    responder = Responder(ALICE, broken, PROLOGUE)
    hello = initiator.hello()
    with pytest.raises(RuntimeError, match="policy store down"):
        responder.respond(hello)
    with pytest.raises(HandshakeError) as excinfo:
        responder.respond(hello)
    assert excinfo.value.reason == "state"
