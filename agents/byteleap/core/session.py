"""The authenticated, encrypted channel used by every ByteLeap link (sans-IO).

The state machines here take and return ``bytes``; the caller moves them over a WebSocket (or
anything else that preserves message boundaries). Keeping I/O out makes every failure mode testable
without sockets and lets the worker->miner and miner->validator links share one implementation.

Handshake (three messages, SIGMA-style: ephemeral Diffie-Hellman authenticated by signatures)::

    Initiator (client)                               Responder (server)
    ClientHello{version, prologue, e_c, n_c, id_c}  -->
                                                    <--  ServerHello{version, e_s, n_s, id_s, sig_s}
    ClientFinish{sig_c}                             -->

    th    = SHA-256(lp(PROTOCOL_LABEL, prologue, ClientHello bytes, e_s, n_s, kind_s, pub_s))
    sig_s = Sign_s(lp("... server signature", th))
    sig_c = Sign_c(lp("... client signature", th, sig_s))
    keys  = HKDF-SHA256(ikm=X25519(e_c, e_s), salt=SHA-256(lp(th, sig_s, sig_c)))
            -> client->server secret, server->client secret, channel binding

``lp`` is length-prefixed concatenation, so no two different field lists hash alike. Both
ephemeral keys and both identities are covered by both signatures, so a man in the middle that
swaps an ephemeral key breaks a signature, and one that swaps an identity must sign as itself and is
then refused by the caller's ``authorize`` callback (pinning and allow-lists live there). The two
signed messages have different field lists (the client's also covers ``sig_s``), so under ``lp``
neither can ever equal the other and a signature cannot be reflected from one role to the other,
even between two ends with the same key; the labels separate these signatures from anything else
the same long-term key signs. The prologue names the link (e.g. ``b"byteleap/worker-miner/v1"``),
so a session for one link cannot be replayed into another.

Frames: ``header(version u8, key epoch u32, sequence u64) || AES-256-GCM(ciphertext || tag)``; the
header is the associated data and the nonce is the per-epoch IV XOR the sequence number, so a nonce
never repeats under a key. Each direction has its own key, sequence and replay window; keys ratchet
forward (HKDF) every ``rekey_after_frames`` frames or ``rekey_after_seconds``; a session ends after
``max_age_seconds`` and the caller must handshake again. Sequence numbers cannot run out first: at
most ``2**32`` epochs of at most ``2**24`` frames is ``2**56`` frames, far below ``2**64``.

``SecureSession.channel_binding`` is a 32-byte value derived with the traffic keys: equal on both
ends, unique per session, unknown to anyone outside it. A higher layer proves it knows a shared
secret without sending it by sending ``HMAC-SHA256(secret, channel_binding)`` inside the channel;
this is how worker enrollment proves knowledge of the miner's enrollment secret. Because the value
is bound to this session, the proof cannot be relayed into a different session.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, ClassVar, NoReturn, TypeVar

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from byteleap.core import wire
from byteleap.core.identity import (
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    IdentityKind,
    PeerIdentity,
    Signer,
)

__all__ = [
    "FRAME_HEADER_BYTES",
    "FRAME_OVERHEAD",
    "FRAME_VERSION",
    "HANDSHAKE_VERSION",
    "PROTOCOL_LABEL",
    "Authorize",
    "ClientFinish",
    "ClientHello",
    "HandshakeError",
    "Initiator",
    "MalformedFrame",
    "ReplayedFrame",
    "Responder",
    "SecureSession",
    "ServerHello",
    "SessionConfig",
    "SessionError",
    "SessionExpired",
    "StaleFrame",
    "TamperedFrame",
    "WireIdentity",
]

PROTOCOL_LABEL = b"byteleap/session/v1"
HANDSHAKE_VERSION = 1
FRAME_VERSION = 1
MAX_PROLOGUE_BYTES = 128

_ROLE_SERVER = PROTOCOL_LABEL + b" server signature"
_ROLE_CLIENT = PROTOCOL_LABEL + b" client signature"
_INFO_TRAFFIC = PROTOCOL_LABEL + b" traffic secrets"
_INFO_REKEY = PROTOCOL_LABEL + b" rekey"
_INFO_KEY = PROTOCOL_LABEL + b" aead key"
_INFO_IV = PROTOCOL_LABEL + b" aead iv"

_HEADER = struct.Struct(">BIQ")
FRAME_HEADER_BYTES = _HEADER.size  # 13
_TAG_BYTES = 16
FRAME_OVERHEAD = FRAME_HEADER_BYTES + _TAG_BYTES
_U32_MAX = 2**32 - 1
_X25519_BYTES = 32
_NONCE_BYTES = 32


# --------------------------------------------------------------------------------------------------
# Errors


class SessionError(Exception):
    """Base of every session failure; ``code`` is a stable short string for wire errors and logs."""

    code: ClassVar[str] = "session_error"


class HandshakeError(SessionError):
    """The handshake failed; ``reason`` says why (stable strings, listed in ``REASONS``)."""

    code: ClassVar[str] = "handshake_failed"
    REASONS: ClassVar[frozenset[str]] = frozenset(
        {
            "malformed",  # not a well-formed handshake message of the expected type
            "oversize",  # larger than SessionConfig.max_handshake_bytes
            "version",  # unsupported handshake version
            "prologue_mismatch",  # the two sides are not speaking about the same link
            "kind_mismatch",  # peer identity of the wrong kind (hotkey where a worker key belongs)
            "unauthorized",  # the caller's authorize() refused the peer
            "bad_signature",  # transcript signature invalid: wrong key or tampered handshake
            "bad_key",  # low-order / invalid ephemeral key, or reflected key
            "timeout",  # past the handshake deadline
            "state",  # API called out of order or after a failure
        }
    )

    def __init__(self, reason: str, message: str) -> None:
        if reason not in self.REASONS:
            raise ValueError(f"unknown handshake failure reason {reason!r}")
        super().__init__(message)
        self.reason = reason


class TamperedFrame(SessionError):  # noqa: N818 - names are the protocol's vocabulary
    """The frame did not authenticate under the expected key (modified, forged, or foreign)."""

    code: ClassVar[str] = "tampered_frame"


class ReplayedFrame(SessionError):  # noqa: N818 - names are the protocol's vocabulary
    """An authentic frame whose sequence number was already accepted."""

    code: ClassVar[str] = "replayed_frame"


class StaleFrame(SessionError):  # noqa: N818 - names are the protocol's vocabulary
    """A frame outside the acceptance window: older than the replay window, too far ahead, or from
    a key epoch other than the current or the next one."""

    code: ClassVar[str] = "stale_frame"


class SessionExpired(SessionError):  # noqa: N818 - names are the protocol's vocabulary
    """The session outlived ``max_age_seconds`` (or exhausted its counters): handshake again."""

    code: ClassVar[str] = "session_expired"


class MalformedFrame(SessionError):  # noqa: N818 - names are the protocol's vocabulary
    """The bytes are not a frame of this protocol version (too short, too long, wrong version)."""

    code: ClassVar[str] = "malformed_frame"


# --------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Limits and lifetimes. The defaults suit every ByteLeap link; tests shrink them.

    ``max_seal_bytes`` bounds the frames this end seals (``seal()`` refuses larger plaintext) and
    ``max_open_bytes`` the frames it opens (``open()`` refuses larger frames): the two directions
    of a link may have different limits. Both count whole frames, :data:`FRAME_OVERHEAD` included.
    """

    handshake_timeout_seconds: float = 10.0
    max_handshake_bytes: int = 1024
    replay_window: int = 1024
    max_forward_jump: int = 1 << 16
    rekey_after_frames: int = 1 << 20
    rekey_after_seconds: float = 3600.0
    max_age_seconds: float = 6 * 3600.0
    max_seal_bytes: int = wire.MAX_FRAME_BYTES + FRAME_OVERHEAD
    max_open_bytes: int = wire.MAX_FRAME_BYTES + FRAME_OVERHEAD

    def __post_init__(self) -> None:
        if not self.handshake_timeout_seconds > 0:
            raise ValueError("handshake_timeout_seconds must be positive")
        if self.max_handshake_bytes < 256:
            raise ValueError("max_handshake_bytes must be at least 256")
        if self.replay_window < 1:
            raise ValueError("replay_window must be at least 1")
        if self.max_forward_jump < 1:
            raise ValueError("max_forward_jump must be at least 1")
        # AES-GCM's safety margin per key: stay far below 2**32 messages (NIST SP 800-38D).
        if not 1 <= self.rekey_after_frames <= 1 << 24:
            raise ValueError("rekey_after_frames must be in [1, 2**24]")
        if not self.rekey_after_seconds > 0:
            raise ValueError("rekey_after_seconds must be positive")
        if not self.max_age_seconds > 0:
            raise ValueError("max_age_seconds must be positive")
        for name in ("max_seal_bytes", "max_open_bytes"):
            if getattr(self, name) <= FRAME_OVERHEAD:
                raise ValueError(f"{name} must exceed the {FRAME_OVERHEAD}-byte overhead")


Authorize = Callable[[PeerIdentity], bool]
"""Caller policy: return True to accept a peer identity (pinning, allow-lists, chain checks)."""

Clock = Callable[[], float]

# --------------------------------------------------------------------------------------------------
# Wire messages (msgpack arrays, strict: exact types, exact lengths, no unknown fields)

_PublicKey = Annotated[
    bytes, msgspec.Meta(min_length=PUBLIC_KEY_BYTES, max_length=PUBLIC_KEY_BYTES)
]
_Ephemeral = Annotated[bytes, msgspec.Meta(min_length=_X25519_BYTES, max_length=_X25519_BYTES)]
_Nonce = Annotated[bytes, msgspec.Meta(min_length=_NONCE_BYTES, max_length=_NONCE_BYTES)]
_Signature = Annotated[bytes, msgspec.Meta(min_length=SIGNATURE_BYTES, max_length=SIGNATURE_BYTES)]
_Prologue = Annotated[bytes, msgspec.Meta(min_length=1, max_length=MAX_PROLOGUE_BYTES)]
_Version = Annotated[int, msgspec.Meta(ge=0, le=255)]


class WireIdentity(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    kind: IdentityKind
    public_key: _PublicKey


class ClientHello(
    msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True, tag="client_hello"
):
    version: _Version
    prologue: _Prologue
    ephemeral: _Ephemeral
    nonce: _Nonce
    identity: WireIdentity


class ServerHello(
    msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True, tag="server_hello"
):
    version: _Version
    ephemeral: _Ephemeral
    nonce: _Nonce
    identity: WireIdentity
    signature: _Signature


class ClientFinish(
    msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True, tag="client_finish"
):
    signature: _Signature


# Version probes: read only the leading version so a peer speaking a newer layout gets a clear
# "version" error instead of "malformed".
class _ClientHelloVersion(msgspec.Struct, array_like=True, tag="client_hello"):
    version: int


class _ServerHelloVersion(msgspec.Struct, array_like=True, tag="server_hello"):
    version: int


_ENCODER = msgspec.msgpack.Encoder()
_M = TypeVar("_M", ClientHello, ServerHello, ClientFinish)
_DECODERS: dict[type, msgspec.msgpack.Decoder[object]] = {
    t: msgspec.msgpack.Decoder(t)
    for t in (ClientHello, ServerHello, ClientFinish, _ClientHelloVersion, _ServerHelloVersion)
}
_PROBES: dict[type, type] = {ClientHello: _ClientHelloVersion, ServerHello: _ServerHelloVersion}


def _fail(reason: str, message: str) -> NoReturn:
    raise HandshakeError(reason, message)


def _decode(data: object, message_type: type[_M], limit: int) -> _M:
    name = message_type.__name__
    if not isinstance(data, bytes):
        _fail("malformed", f"{name} must be bytes")
    if len(data) > limit:
        _fail("oversize", f"{name} is {len(data)} bytes, limit {limit}")
    probe_type = _PROBES.get(message_type)
    try:
        if probe_type is not None:
            version = getattr(_DECODERS[probe_type].decode(data), "version", None)
            if version != HANDSHAKE_VERSION:
                _fail("version", f"unsupported handshake version {version!r}")
        message = _DECODERS[message_type].decode(data)
    # Besides DecodeError, msgspec raises UnicodeDecodeError for invalid UTF-8 in a str (the tag)
    # and RecursionError for deeply nested arrays in skipped fields: all just malformed input.
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        _fail("malformed", f"malformed {name}: {exc}")
    assert isinstance(message, message_type)
    return message


def _lp(*parts: bytes) -> bytes:
    """Length-prefixed concatenation: unambiguous, unlike plain concatenation."""
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def _transcript_hash(
    prologue: bytes,
    client_hello: bytes,
    server_ephemeral: bytes,
    server_nonce: bytes,
    server: PeerIdentity,
) -> bytes:
    material = _lp(
        PROTOCOL_LABEL,
        prologue,
        client_hello,
        server_ephemeral,
        server_nonce,
        server.kind.value.encode(),
        server.public_key,
    )
    return hashlib.sha256(material).digest()


def _public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _x25519(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    """ECDH that refuses low-order peer keys (an all-zero secret would be known to everyone)."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:  # OpenSSL refuses the all-zero result itself
        _fail("bad_key", "peer ephemeral key is of low order")
    if hmac.compare_digest(shared, bytes(_X25519_BYTES)):  # pragma: no cover - belt and braces
        _fail("bad_key", "peer ephemeral key is of low order")
    return shared


def _identity_of(claimed: WireIdentity) -> PeerIdentity:
    return PeerIdentity(claimed.kind, claimed.public_key)


def _wire(identity: PeerIdentity) -> WireIdentity:
    return WireIdentity(kind=identity.kind, public_key=identity.public_key)


def _check_prologue(prologue: bytes) -> bytes:
    if not isinstance(prologue, bytes) or not 1 <= len(prologue) <= MAX_PROLOGUE_BYTES:
        raise ValueError(f"prologue must be 1..{MAX_PROLOGUE_BYTES} bytes")
    return prologue


# --------------------------------------------------------------------------------------------------
# Handshake


_R = TypeVar("_R")


class _Handshake:
    """Shared plumbing: arguments, deadline, single-use state, peer policy, state wiping.

    ``authorize`` is the caller's policy for the peer's identity; ``peer_kind``, if given, is
    enforced before it. ``config`` defaults to :class:`SessionConfig`'s defaults.
    """

    _NEW, _WAITING, _DONE, _FAILED = "new", "waiting", "done", "failed"

    def __init__(
        self,
        signer: Signer,
        authorize: Authorize,
        prologue: bytes,
        config: SessionConfig | None = None,
        clock: Clock = time.monotonic,
        *,
        peer_kind: IdentityKind | None = None,
    ) -> None:
        self._signer = signer
        self._authorize = authorize
        self._prologue = _check_prologue(prologue)
        self._config = config or SessionConfig()
        self._clock = clock
        self._peer_kind = peer_kind
        self._deadline = clock() + self._config.handshake_timeout_seconds
        self._state = self._NEW
        self._wipe()

    @property
    def deadline(self) -> float:
        """Clock time by which the handshake must complete; the caller closes the transport then."""
        return self._deadline

    def _wipe(self) -> None:
        """Drop the per-handshake state (ephemeral key, shared secret, transcript).

        Called on construction (to initialise it), on failure and on completion: the one place
        that knows what a subclass keeps between steps.
        """

    def _step(self, expected: str, step: str, run: Callable[[], _R]) -> _R:
        """Run one handshake step: state and deadline checks first; any failure (including in
        ``authorize``) ends the handshake for good."""
        if self._state != expected:
            _fail("state", f"{step}() called in state {self._state!r}")
        try:
            if self._clock() > self._deadline:
                _fail("timeout", "handshake did not complete before its deadline")
            return run()
        except BaseException:
            self._state = self._FAILED
            self._wipe()
            raise

    def _admit(self, peer: PeerIdentity) -> None:
        if self._peer_kind is not None and peer.kind is not self._peer_kind:
            _fail(
                "kind_mismatch",
                f"peer identity is {peer.kind.value}, expected {self._peer_kind.value}",
            )
        if not self._authorize(peer):
            _fail("unauthorized", f"peer {peer} is not authorized")

    def _session(
        self,
        *,
        shared: bytes,
        transcript: bytes,
        server_signature: bytes,
        client_signature: bytes,
        peer: PeerIdentity,
        initiator: bool,
    ) -> SecureSession:
        salt = hashlib.sha256(_lp(transcript, server_signature, client_signature)).digest()
        okm = HKDF(algorithm=hashes.SHA256(), length=96, salt=salt, info=_INFO_TRAFFIC).derive(
            shared
        )
        c2s, s2c, binding = okm[:32], okm[32:64], okm[64:]
        self._state = self._DONE
        self._wipe()
        return SecureSession(
            peer=peer,
            send_secret=c2s if initiator else s2c,
            recv_secret=s2c if initiator else c2s,
            channel_binding=binding,
            config=self._config,
            clock=self._clock,
        )


class Initiator(_Handshake):
    """Client side: ``hello()`` -> send; receive -> ``finish()`` -> send the returned bytes.

    ``authorize`` is called with the server's identity before its signature is checked; the
    session is returned only after both. ``peer_kind``, if given, is enforced first.
    """

    _ephemeral: X25519PrivateKey | None
    _client_hello: bytes

    def _wipe(self) -> None:
        self._ephemeral = None
        self._client_hello = b""

    def hello(self) -> bytes:
        """The ClientHello to send."""
        return self._step(self._NEW, "hello", self._hello)

    def finish(self, server_hello: bytes) -> tuple[bytes, SecureSession]:
        """Verify the ServerHello; return the ClientFinish to send and the ready session."""
        return self._step(self._WAITING, "finish", lambda: self._finish(server_hello))

    def _hello(self) -> bytes:
        self._ephemeral = X25519PrivateKey.generate()
        message = ClientHello(
            version=HANDSHAKE_VERSION,
            prologue=self._prologue,
            ephemeral=_public_bytes(self._ephemeral),
            nonce=secrets.token_bytes(_NONCE_BYTES),
            identity=_wire(self._signer.identity),
        )
        self._client_hello = _ENCODER.encode(message)
        self._state = self._WAITING
        return self._client_hello

    def _finish(self, data: bytes) -> tuple[bytes, SecureSession]:
        assert self._ephemeral is not None
        message = _decode(data, ServerHello, self._config.max_handshake_bytes)
        peer = _identity_of(message.identity)
        self._admit(peer)
        own_ephemeral = _public_bytes(self._ephemeral)
        if hmac.compare_digest(message.ephemeral, own_ephemeral):
            _fail("bad_key", "server reflected the client's ephemeral key")
        shared = _x25519(self._ephemeral, message.ephemeral)
        transcript = _transcript_hash(
            self._prologue, self._client_hello, message.ephemeral, message.nonce, peer
        )
        if not peer.verify(_lp(_ROLE_SERVER, transcript), message.signature):
            _fail("bad_signature", f"server signature does not verify for {peer}")
        client_signature = self._signer.sign(_lp(_ROLE_CLIENT, transcript, message.signature))
        finish = _ENCODER.encode(ClientFinish(signature=client_signature))
        session = self._session(
            shared=shared,
            transcript=transcript,
            server_signature=message.signature,
            client_signature=client_signature,
            peer=peer,
            initiator=True,
        )
        return finish, session


class Responder(_Handshake):
    """Server side: receive -> ``respond()`` -> send; receive -> ``complete()`` -> session.

    ``authorize`` runs on the client's claimed identity inside ``respond()``, before the server
    signs anything, so unknown clients are dropped cheaply; the claim is proven by the client's
    signature in ``complete()``, and no session exists before that.
    """

    _peer: PeerIdentity | None
    _shared: bytes
    _transcript: bytes
    _server_signature: bytes

    def _wipe(self) -> None:
        self._peer = None
        self._shared = self._transcript = self._server_signature = b""

    def respond(self, client_hello: bytes) -> bytes:
        """Check the ClientHello and return the ServerHello to send."""
        return self._step(self._NEW, "respond", lambda: self._respond(client_hello))

    def complete(self, client_finish: bytes) -> SecureSession:
        """Verify the ClientFinish and return the ready session."""
        return self._step(self._WAITING, "complete", lambda: self._complete(client_finish))

    def _respond(self, data: bytes) -> bytes:
        message = _decode(data, ClientHello, self._config.max_handshake_bytes)
        if not hmac.compare_digest(message.prologue, self._prologue):
            _fail("prologue_mismatch", "client is speaking about a different link (prologue)")
        peer = _identity_of(message.identity)
        self._admit(peer)
        ephemeral_key = X25519PrivateKey.generate()  # used once, here: never stored
        shared = _x25519(ephemeral_key, message.ephemeral)
        own = self._signer.identity
        ephemeral = _public_bytes(ephemeral_key)
        nonce = secrets.token_bytes(_NONCE_BYTES)
        transcript = _transcript_hash(self._prologue, data, ephemeral, nonce, own)
        signature = self._signer.sign(_lp(_ROLE_SERVER, transcript))
        self._peer, self._shared = peer, shared
        self._transcript, self._server_signature = transcript, signature
        self._state = self._WAITING
        return _ENCODER.encode(
            ServerHello(
                version=HANDSHAKE_VERSION,
                ephemeral=ephemeral,
                nonce=nonce,
                identity=_wire(own),
                signature=signature,
            )
        )

    def _complete(self, data: bytes) -> SecureSession:
        peer = self._peer
        assert peer is not None
        message = _decode(data, ClientFinish, self._config.max_handshake_bytes)
        signed = _lp(_ROLE_CLIENT, self._transcript, self._server_signature)
        if not peer.verify(signed, message.signature):
            _fail("bad_signature", f"client signature does not verify for {peer}")
        return self._session(
            shared=self._shared,
            transcript=self._transcript,
            server_signature=self._server_signature,
            client_signature=message.signature,
            peer=peer,
            initiator=False,
        )


# --------------------------------------------------------------------------------------------------
# Established session


def _expand(secret: bytes, info: bytes, length: int) -> bytes:
    return HKDFExpand(algorithm=hashes.SHA256(), length=length, info=info).derive(secret)


class _Cipher:
    """One direction's key for one epoch. The traffic secret is kept only to ratchet forward."""

    __slots__ = ("_aead", "_iv", "_secret", "epoch")

    def __init__(self, secret: bytes, epoch: int) -> None:
        self._secret = secret
        self.epoch = epoch
        self._aead = AESGCM(_expand(secret, _INFO_KEY, 32))
        self._iv = int.from_bytes(_expand(secret, _INFO_IV, 12), "big")

    def successor(self) -> _Cipher:
        info = _INFO_REKEY + (self.epoch + 1).to_bytes(4, "big")
        return _Cipher(_expand(self._secret, info, 32), self.epoch + 1)

    def _nonce(self, sequence: int) -> bytes:
        return (self._iv ^ sequence).to_bytes(12, "big")

    def seal(self, sequence: int, header: bytes, plaintext: bytes) -> bytes:
        return self._aead.encrypt(self._nonce(sequence), plaintext, header)

    def open(self, sequence: int, header: bytes, ciphertext: bytes) -> bytes:
        return self._aead.decrypt(self._nonce(sequence), ciphertext, header)


class SecureSession:
    """An established channel: ``seal()`` outgoing plaintext, ``open()`` incoming frames.

    Created by :class:`Initiator` / :class:`Responder`; not thread-safe (one event loop owns it).
    ``open()`` authenticates first and only then checks the replay window, so ``ReplayedFrame`` and
    ``StaleFrame`` always describe genuine frames, and a frame that fails authentication never moves
    the window or the key epoch.
    """

    __slots__ = (
        "_binding",
        "_bitmap",
        "_clock",
        "_config",
        "_expires_at",
        "_peer",
        "_recv",
        "_recv_next",
        "_send",
        "_send_epoch_frames",
        "_send_epoch_started",
        "_send_sequence",
        "_top",
        "_window_mask",
    )

    def __init__(
        self,
        *,
        peer: PeerIdentity,
        send_secret: bytes,
        recv_secret: bytes,
        channel_binding: bytes,
        config: SessionConfig,
        clock: Clock,
    ) -> None:
        now = clock()
        self._peer = peer
        self._binding = channel_binding
        self._config = config
        self._clock = clock
        self._expires_at = now + config.max_age_seconds
        self._send = _Cipher(send_secret, 0)
        self._send_sequence = 0
        self._send_epoch_frames = 0
        self._send_epoch_started = now
        self._recv = _Cipher(recv_secret, 0)
        self._recv_next: _Cipher | None = None
        self._top = -1  # highest accepted sequence number
        self._bitmap = 0  # bit i set <=> sequence (top - i) accepted
        self._window_mask = (1 << config.replay_window) - 1

    def __repr__(self) -> str:
        return f"SecureSession(peer={self._peer}, expires_at={self._expires_at:.3f})"

    @property
    def peer(self) -> PeerIdentity:
        """The authenticated long-term identity at the other end."""
        return self._peer

    @property
    def channel_binding(self) -> bytes:
        """32 bytes unique to this session and equal on both ends (see the module docstring)."""
        return self._binding

    @property
    def config(self) -> SessionConfig:
        """The limits and lifetimes this session enforces."""
        return self._config

    @property
    def expires_at(self) -> float:
        """Clock time (the injected clock, monotonic by default) when the session stops working."""
        return self._expires_at

    @property
    def expired(self) -> bool:
        return self._clock() >= self._expires_at

    def _check_alive(self, now: float) -> None:
        if now >= self._expires_at:
            raise SessionExpired("session reached its maximum age; handshake again")

    def seal(self, plaintext: bytes) -> bytes:
        """Encrypt ``plaintext`` into the next frame in this direction."""
        now = self._clock()
        self._check_alive(now)
        if len(plaintext) > self._config.max_seal_bytes - FRAME_OVERHEAD:
            raise ValueError(
                f"plaintext of {len(plaintext)} bytes exceeds max_seal_bytes "
                f"({self._config.max_seal_bytes} less the {FRAME_OVERHEAD}-byte overhead)"
            )
        if (
            self._send_epoch_frames >= self._config.rekey_after_frames
            or now - self._send_epoch_started >= self._config.rekey_after_seconds
        ):
            if self._send.epoch >= _U32_MAX:
                raise SessionExpired("key epochs exhausted; handshake again")
            self._send = self._send.successor()
            self._send_epoch_frames = 0
            self._send_epoch_started = now
        sequence = self._send_sequence  # < 2**56: see the module docstring
        header = _HEADER.pack(FRAME_VERSION, self._send.epoch, sequence)
        frame = header + self._send.seal(sequence, header, plaintext)
        self._send_sequence = sequence + 1
        self._send_epoch_frames += 1
        return frame

    def open(self, frame: bytes) -> bytes:
        """Authenticate and decrypt one frame from the peer, enforcing replay and epoch rules."""
        self._check_alive(self._clock())
        if not isinstance(frame, bytes):
            raise MalformedFrame("a frame must be bytes")
        if len(frame) < FRAME_OVERHEAD:
            raise MalformedFrame(f"frame of {len(frame)} bytes is shorter than its overhead")
        if len(frame) > self._config.max_open_bytes:
            limit = self._config.max_open_bytes
            raise MalformedFrame(f"frame of {len(frame)} bytes exceeds max_open_bytes ({limit})")
        version, epoch, sequence = _HEADER.unpack_from(frame)
        if version != FRAME_VERSION:
            raise MalformedFrame(f"unsupported frame version {version}")
        current = self._recv
        if epoch == current.epoch:
            cipher = current
        elif epoch == current.epoch + 1:
            if self._recv_next is None:
                self._recv_next = current.successor()
            cipher = self._recv_next
        elif epoch < current.epoch:
            raise StaleFrame(f"frame from retired key epoch {epoch} (current {current.epoch})")
        else:
            raise StaleFrame(f"frame skips key epochs: {epoch} after {current.epoch}")
        header = frame[:FRAME_HEADER_BYTES]
        try:
            plaintext = cipher.open(sequence, header, frame[FRAME_HEADER_BYTES:])
        except InvalidTag:
            raise TamperedFrame("frame failed authentication") from None
        self._check_window(sequence)
        if cipher is not current:  # the peer ratcheted; follow and forget the old key
            self._recv, self._recv_next = cipher, None
        self._mark(sequence)
        return plaintext

    def _check_window(self, sequence: int) -> None:
        top = self._top
        if sequence > top:
            if sequence - top > self._config.max_forward_jump:
                raise StaleFrame(f"sequence {sequence} jumps too far ahead of {top}")
            return
        offset = top - sequence
        if offset >= self._config.replay_window:
            raise StaleFrame(f"sequence {sequence} is older than the replay window")
        if (self._bitmap >> offset) & 1:
            raise ReplayedFrame(f"sequence {sequence} was already received")

    def _mark(self, sequence: int) -> None:
        if sequence > self._top:
            shift = sequence - self._top
            if shift >= self._config.replay_window:
                self._bitmap = 1
            else:
                self._bitmap = ((self._bitmap << shift) | 1) & self._window_mask
            self._top = sequence
        else:
            self._bitmap |= 1 << (self._top - sequence)
