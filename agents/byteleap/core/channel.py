"""An authenticated, encrypted, typed message channel over an aiohttp WebSocket.

This is the I/O glue around the sans-IO :mod:`byteleap.core.session` and the typed
:mod:`byteleap.core.wire` messages, shared by the worker->miner and miner->validator links:

* :func:`dial` (the peer that dials out: worker, miner) runs the :class:`~session.Initiator`,
  :func:`accept` (inside an aiohttp handler: miner, validator) runs the :class:`~session.Responder`.
  Handshake messages and sealed frames are binary WebSocket messages, one per message.
* :class:`Channel` seals ``wire.Frame`` s on :meth:`Channel.send` and opens + strictly decodes them
  on :meth:`Channel.recv`. The dialing side always sends ``Direction.UP``.

Failure policy is strict, because a peer that breaks the protocol is either buggy or hostile and
neither deserves a second chance on the same connection: text messages, oversize messages, frames
that fail authentication (tampered, replayed, stale), an expired session, a frame that does not
decode, or a peer over its rate limit all close the connection with a distinct :class:`CloseCode`
(4000-4999) and raise :class:`ChannelClosed`. For failures the peer can be told about (wire
errors, rate limiting) an :class:`~wire.Error` is sent first, inside the channel, so the peer's logs
say why.
A handshake failure in :func:`accept` closes the socket before the handler gets anything, so no
application state is ever touched for an unauthenticated or unauthorized peer.

Typical server handler::

    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            channel = await accept(request, signer=..., authorize=..., prologue=..., link=...)
        except AcceptFailed as exc:
            return exc.response
        try:
            while True:
                frame = await channel.recv()
                ...
        except ChannelClosed:
            pass
        finally:
            await channel.close()
        return channel.response

One task may call :meth:`Channel.recv` at a time (aiohttp refuses concurrent receives); any number
of tasks may :meth:`Channel.send` concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import ssl as ssl_module
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, NoReturn

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web

from byteleap.core import wire
from byteleap.core.identity import IdentityKind, PeerIdentity, Signer
from byteleap.core.session import (
    FRAME_OVERHEAD,
    Authorize,
    HandshakeError,
    Initiator,
    Responder,
    SecureSession,
    SessionConfig,
    SessionError,
    SessionExpired,
)

__all__ = [
    "AcceptFailed",
    "Channel",
    "ChannelClosed",
    "CloseCode",
    "RateLimiter",
    "accept",
    "close_code_name",
    "close_reason",
    "closed_text",
    "dial",
    "inbound_max_msg_size",
]

_MAX_CLOSE_REASON = 123  # RFC 6455: a close frame's payload is at most 125 bytes, 2 are the code
DEFAULT_CLOSE_TIMEOUT = 5.0


class CloseCode(enum.IntEnum):
    """WebSocket close codes of the ByteLeap channel (4000-4999 is the private-use range)."""

    NORMAL = 1000
    PROTOCOL_ERROR = 4000
    """The peer broke the transport protocol: text message, unknown message, wrong version."""
    HANDSHAKE_FAILED = 4001
    UNAUTHORIZED = 4002
    """The peer's identity is of the wrong kind or refused by the ``authorize`` policy."""
    BAD_FRAME = 4003
    """A frame failed authentication (tampered, replayed, stale) or did not decode."""
    FRAME_TOO_LARGE = 4004
    SESSION_EXPIRED = 4005
    CAPACITY_REACHED = 4006
    RATE_LIMITED = 4007
    GOING_AWAY = 4008
    REPLACED = 4009
    """A newer connection from the same identity took this one's place."""


class ChannelClosed(Exception):  # noqa: N818 - it is a state, not a fault of the caller
    """The channel is closed. ``code``/``reason`` are the WebSocket close code and reason.

    ``by_peer`` is True when the other end closed (its code and reason), False when this end did
    (for a protocol violation it detected, or a local :meth:`Channel.close`). ``code`` is an ``int``
    because a peer or the transport may use any code (1000, 1006, ...).
    """

    def __init__(self, code: int, reason: str, *, by_peer: bool = False) -> None:
        super().__init__(f"channel closed ({code}{' by peer' if by_peer else ''}): {reason}")
        self.code = code
        self.reason = reason
        self.by_peer = by_peer


class AcceptFailed(ChannelClosed):
    """:func:`accept` refused the connection; return ``response`` from the aiohttp handler."""

    def __init__(
        self, code: int, reason: str, *, by_peer: bool, response: web.WebSocketResponse
    ) -> None:
        super().__init__(code, reason, by_peer=by_peer)
        self.response = response


class RateLimiter:
    """Token bucket: ``burst`` messages at once, ``rate_per_s`` sustained.

    One instance per connection (it holds that connection's bucket). Refilling lazily on each
    call keeps it free of timers and tasks.
    """

    __slots__ = ("_burst", "_clock", "_last", "_rate", "_tokens")

    def __init__(
        self, rate_per_s: float, burst: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not rate_per_s > 0:
            raise ValueError("rate_per_s must be positive")
        if not burst >= 1:
            raise ValueError("burst must be at least 1")
        self._rate = float(rate_per_s)
        self._burst = float(burst)
        self._clock = clock
        self._tokens = self._burst
        self._last = clock()

    def allow(self, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens if available; False (taking nothing) when over the limit."""
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens >= cost:
            self._tokens -= cost
            return True
        return False

    def refund(self, cost: float = 1.0) -> None:
        """Give back ``cost`` tokens that :meth:`allow` took for work that did not happen
        (never above ``burst``)."""
        self._tokens = min(self._burst, self._tokens + cost)


def _sealed_limit(link: wire.Link, direction: wire.Direction) -> int:
    """The largest sealed frame of ``link`` in ``direction``: the wire limit plus the overhead."""
    return wire.max_frame_bytes(link, direction) + FRAME_OVERHEAD


def _other(direction: wire.Direction) -> wire.Direction:
    return wire.Direction.DOWN if direction is wire.Direction.UP else wire.Direction.UP


def inbound_max_msg_size(link: wire.Link, inbound: wire.Direction, config: SessionConfig) -> int:
    """aiohttp ``max_msg_size`` for what arrives on ``link`` in ``inbound``.

    The largest frame the session opens (the link's limit plus the session's overhead, or the
    config's ``max_open_bytes`` if smaller), and room for a handshake message. aiohttp refuses a
    message whose length is >= ``max_msg_size`` (exclusive), hence the ``+ 1``.
    """
    frame = min(_sealed_limit(link, inbound), config.max_open_bytes)
    return max(frame, config.max_handshake_bytes) + 1


def _session_config(
    link: wire.Link, outbound: wire.Direction, config: SessionConfig | None, timeout: float | None
) -> SessionConfig:
    """The caller's session config (or the default) with its frame limits fitted to the link.

    Each direction gets the smaller of the caller's limit and the link's, so an explicit
    ``max_seal_bytes`` / ``max_open_bytes`` still holds; ``timeout``, if given, replaces the
    handshake timeout.
    """
    base = config or SessionConfig()
    changes: dict[str, Any] = {
        "max_seal_bytes": min(base.max_seal_bytes, _sealed_limit(link, outbound)),
        "max_open_bytes": min(base.max_open_bytes, _sealed_limit(link, _other(outbound))),
    }
    if timeout is not None:
        changes["handshake_timeout_seconds"] = timeout
    return dataclasses.replace(base, **changes)


def close_code_name(code: int) -> str:
    """``GOING_AWAY``, ``UNAUTHORIZED``... for our codes and the WebSocket standard ones."""
    for enum_type in (CloseCode, WSCloseCode):
        with contextlib.suppress(ValueError):
            return enum_type(code).name
    return "unknown"


def closed_text(exc: ChannelClosed, peer_error: wire.Error | None, peer: str) -> str:
    """One log phrase for a closed channel: code, name, reason, and what ``peer`` said last."""
    text = f"close code {exc.code} ({close_code_name(exc.code)})"
    if exc.reason:
        text += f": {exc.reason}"
    if peer_error is not None:
        text += f"; {peer} said {peer_error.code.name}"
        if peer_error.message:
            text += f": {peer_error.message}"
    return text


def close_reason(text: str) -> str:
    """``text`` cut to fit a WebSocket close frame (123 bytes of UTF-8) without splitting a
    character; a cut reason ends in ``...``. Unencodable characters become ``?``."""
    data = text.encode("utf-8", "replace")
    if len(data) <= _MAX_CLOSE_REASON:
        return data.decode("utf-8")
    return data[: _MAX_CLOSE_REASON - 3].decode("utf-8", "ignore") + "..."


def _handshake_failure(exc: HandshakeError | TimeoutError) -> tuple[CloseCode, str]:
    """The close code and the reason sent to the peer for a failed or timed-out handshake."""
    if isinstance(exc, TimeoutError):
        return CloseCode.HANDSHAKE_FAILED, "handshake timeout"
    if exc.reason in ("unauthorized", "kind_mismatch"):
        code = CloseCode.UNAUTHORIZED
    elif exc.reason == "oversize":
        code = CloseCode.FRAME_TOO_LARGE
    else:
        code = CloseCode.HANDSHAKE_FAILED
    return code, f"handshake failed: {exc.reason}"


def _wire_close_code(exc: wire.WireError) -> CloseCode:
    if exc.code is wire.ErrorCode.FRAME_TOO_LARGE:
        return CloseCode.FRAME_TOO_LARGE
    if exc.code is wire.ErrorCode.BAD_FRAME:
        return CloseCode.BAD_FRAME
    return CloseCode.PROTOCOL_ERROR


class _ServerWebSocket(web.WebSocketResponse):
    """Reports aiohttp's own oversize refusal (1009) with this protocol's code and a reason.

    aiohttp closes the socket itself inside ``receive()`` when a message exceeds
    ``max_msg_size``, before the channel sees it; overriding the public ``close`` is the one
    place to put 4004 on the wire instead of 1009.
    """

    async def close(
        self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True
    ) -> bool:
        if code == WSCloseCode.MESSAGE_TOO_BIG:
            code, message = CloseCode.FRAME_TOO_LARGE, message or b"message too large"
        return await super().close(code=code, message=message, drain=drain)


_WebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


def _peer_closed(ws: _WebSocket, msg: aiohttp.WSMessage) -> ChannelClosed:
    if msg.type is WSMsgType.CLOSE:
        code = msg.data if isinstance(msg.data, int) else (ws.close_code or 1006)
        reason = msg.extra if isinstance(msg.extra, str) else ""
    else:  # CLOSING / CLOSED: aiohttp already consumed the close frame
        code, reason = (ws.close_code or 1006), ""
    return ChannelClosed(int(code), reason or "connection closed", by_peer=True)


async def _close_ws(ws: _WebSocket, code: int, reason: str) -> None:
    with contextlib.suppress(Exception):  # the transport may already be gone
        await ws.close(code=code, message=close_reason(reason).encode())


async def _receive_bytes(
    ws: _WebSocket,
    what: str,
    refuse: Callable[[CloseCode, str], Awaitable[NoReturn]] | None = None,
) -> bytes:
    """The next binary message (``what``: "a ClientHello", "a frame", ...), skipping pings.

    Raises :class:`ChannelClosed` (``by_peer``) when the peer closed. A text message, an oversize
    message or a transport error goes to ``refuse(code, reason)``, which must close and raise;
    the default closes ``ws`` and raises :class:`ChannelClosed`.
    """
    while True:
        msg = await ws.receive()
        if msg.type is WSMsgType.BINARY:
            data: bytes = msg.data
            return data
        if msg.type in (WSMsgType.PING, WSMsgType.PONG):
            continue
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
            raise _peer_closed(ws, msg)
        if msg.type is WSMsgType.TEXT:
            code, reason = CloseCode.PROTOCOL_ERROR, f"text message where {what} was expected"
        elif msg.type is WSMsgType.ERROR and _too_big(msg):
            code, reason = CloseCode.FRAME_TOO_LARGE, f"message too large for {what}"
        else:
            code, reason = CloseCode.PROTOCOL_ERROR, f"transport error: {msg.data!r}"
        if refuse is not None:
            await refuse(code, reason)
        await _close_ws(ws, code, reason)
        raise ChannelClosed(code, reason)


@contextlib.asynccontextmanager
async def _handshake_deadline(ws: _WebSocket, deadline: float) -> AsyncIterator[None]:
    """Run the handshake steps of the block under ``deadline`` (event-loop time).

    A :class:`HandshakeError` or the deadline passing closes ``ws`` with the matching code and
    reason and raises :class:`ChannelClosed` (by this side); anything else passes through.
    """
    try:
        async with asyncio.timeout_at(deadline):
            yield
    except (HandshakeError, TimeoutError) as exc:
        code, reason = _handshake_failure(exc)
        await _close_ws(ws, code, reason)
        detail = f"{reason}: {exc}" if isinstance(exc, HandshakeError) else reason
        raise ChannelClosed(code, detail) from exc


def _too_big(msg: aiohttp.WSMessage) -> bool:
    return (
        isinstance(msg.data, aiohttp.WebSocketError)
        and msg.data.code == WSCloseCode.MESSAGE_TOO_BIG
    )


class Channel:
    """An established channel: authenticated peer, sealed frames, strict decoding.

    Built by :func:`dial` and :func:`accept` only.
    """

    def __init__(
        self,
        ws: _WebSocket,
        session: SecureSession,
        *,
        link: wire.Link,
        outbound: wire.Direction,
        rate_limit: RateLimiter | None,
    ) -> None:
        self._ws = ws
        self._session = session
        self._link = link
        self._outbound = outbound
        self._inbound = _other(outbound)
        self._outbound_types = wire.message_types(link, outbound)
        # What the session will seal, as a wire-frame size: never more than the link allows.
        self._outbound_limit = min(
            wire.max_frame_bytes(link, outbound), session.config.max_seal_bytes - FRAME_OVERHEAD
        )
        self._rate_limit = rate_limit
        self._send_lock = asyncio.Lock()
        self._closed_exc: ChannelClosed | None = None

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"Channel({self._link.value}, peer={self._session.peer}, {state})"

    @property
    def peer(self) -> PeerIdentity:
        """The authenticated identity at the other end."""
        return self._session.peer

    @property
    def channel_binding(self) -> bytes:
        """32 bytes unique to this session, equal on both ends (enrollment proofs use it)."""
        return self._session.channel_binding

    @property
    def link(self) -> wire.Link:
        return self._link

    @property
    def expires_at(self) -> float:
        """``time.monotonic()`` time when the session expires; reconnect before then."""
        return self._session.expires_at

    @property
    def closed(self) -> bool:
        return self._closed_exc is not None or self._ws.closed

    @property
    def close_code(self) -> int | None:
        """The code this channel was closed with (either side), None while open."""
        if self._closed_exc is not None:
            return self._closed_exc.code
        return self._ws.close_code

    @property
    def response(self) -> web.WebSocketResponse:
        """Server side: the response the aiohttp handler must return."""
        if not isinstance(self._ws, web.WebSocketResponse):
            raise TypeError("only an accepted channel has a server response")
        return self._ws

    def _check_open(self) -> None:
        if self._closed_exc is not None:
            raise self._closed_exc
        if self._ws.closed:
            code = self._ws.close_code or 1006
            self._closed_exc = ChannelClosed(code, "connection closed", by_peer=True)
            raise self._closed_exc

    async def send(self, msg: wire.Message, *, id: int = 0) -> None:
        """Seal and send one message. Safe to call from several tasks.

        Raises :class:`wire.WireError` (and sends nothing) for a message this side may not send
        on this link or one over the link's size limit: that is a local bug, not the peer's.
        """
        if not isinstance(msg, self._outbound_types):
            raise wire.WireError(
                wire.ErrorCode.UNKNOWN_MESSAGE,
                f"{type(msg).__name__} is not sent {self._outbound.value} on {self._link.value}",
            )
        data = wire.encode(wire.Frame(msg=msg, id=id))
        if len(data) > self._outbound_limit:
            raise wire.WireError(
                wire.ErrorCode.FRAME_TOO_LARGE,
                f"frame of {len(data)} bytes exceeds the {self._outbound_limit}-byte limit",
            )
        await self._send_plaintext(data)

    async def _send_plaintext(self, data: bytes) -> None:
        # Seal and write under one lock: sequence numbers then leave in order, so the peer's
        # replay window never sees a gap caused by two senders racing.
        async with self._send_lock:
            self._check_open()
            try:
                sealed = self._session.seal(data)
            except SessionExpired as exc:
                await self._fail(CloseCode.SESSION_EXPIRED, str(exc))
            try:
                await self._ws.send_bytes(sealed)
            except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
                self._closed_exc = ChannelClosed(
                    self._ws.close_code or 1006, f"send failed: {exc}", by_peer=True
                )
                raise self._closed_exc from exc

    async def send_error(
        self,
        code: wire.ErrorCode,
        message: str = "",
        ref: int = 0,
        *,
        id: int | None = None,
    ) -> None:
        """Send an :class:`wire.Error`; its frame id defaults to ``ref`` (answering that frame).

        A ``message`` longer than the wire allows is cut, ending in ``...``.
        """
        error = wire.CodedError(code, message, ref=ref).to_error()
        await self.send(error, id=ref if id is None else id)

    async def recv(self) -> wire.Frame:
        """The next frame from the peer (one task at a time).

        Raises :class:`ChannelClosed` when the peer closed, or after this side closed the
        connection because the peer broke the protocol.
        """
        self._check_open()
        try:
            sealed = await _receive_bytes(self._ws, "a frame", self._fail)
        except ChannelClosed as exc:
            if self._closed_exc is None:  # the peer closed
                self._closed_exc = exc
                raise
            raise self._closed_exc from None  # this side closed (while we waited, or just now)
        return await self._open(sealed)

    async def _open(self, sealed: bytes) -> wire.Frame:
        if self._rate_limit is not None and not self._rate_limit.allow():
            await self._refuse(
                wire.WireError(wire.ErrorCode.RATE_LIMITED, "message rate limit exceeded"),
                CloseCode.RATE_LIMITED,
            )
        try:
            plaintext = self._session.open(sealed)
        except SessionExpired as exc:
            await self._fail(CloseCode.SESSION_EXPIRED, str(exc))
        except SessionError as exc:  # tampered, replayed, stale, malformed: nothing to answer
            await self._fail(CloseCode.BAD_FRAME, f"{exc.code}: {exc}")
        try:
            return wire.decode(self._link, self._inbound, plaintext)
        except wire.WireError as exc:
            await self._refuse(exc, _wire_close_code(exc))

    async def _refuse(self, exc: wire.WireError, code: CloseCode) -> NoReturn:
        """Tell the peer why in an Error, then close: the strict policy for every wire error."""
        with contextlib.suppress(ChannelClosed, wire.WireError):
            await self.send(exc.to_error(), id=exc.ref)
        await self._fail(code, f"{exc.code.name}: {exc.message}")

    async def _fail(self, code: CloseCode, reason: str) -> NoReturn:
        await self.close(code, reason)
        assert self._closed_exc is not None
        raise self._closed_exc

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close the connection (idempotent). Pending and later calls raise ChannelClosed."""
        if self._closed_exc is None:
            self._closed_exc = ChannelClosed(code, reason or "closed")
        await _close_ws(self._ws, code, reason)

    def __aiter__(self) -> AsyncIterator[wire.Frame]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[wire.Frame]:
        """Frames until the peer closes normally; protocol failures still raise."""
        while True:
            try:
                frame = await self.recv()
            except ChannelClosed as exc:
                if exc.by_peer and exc.code in (WSCloseCode.OK, WSCloseCode.GOING_AWAY):
                    return
                raise
            yield frame


async def dial(
    session: aiohttp.ClientSession,
    url: str,
    *,
    signer: Signer,
    authorize: Authorize,
    prologue: bytes,
    link: wire.Link,
    config: SessionConfig | None = None,
    handshake_timeout: float | None = None,
    ssl: ssl_module.SSLContext | aiohttp.Fingerprint | bool | None = None,
    peer_kind: IdentityKind | None = None,
    rate_limit: RateLimiter | None = None,
    heartbeat: float | None = None,
    close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    headers: Mapping[str, str] | None = None,
) -> Channel:
    """Connect to ``url`` and run the client side of the handshake.

    ``headers`` go on the HTTP upgrade request (the miner's btauth/1 signature travels there).
    ``handshake_timeout`` (default: the config's) bounds the connection and the handshake
    together. Raises :class:`ChannelClosed` if the server refuses us (its code, ``by_peer``), if
    the server fails our ``authorize`` (4002) or the handshake fails or times out (4001);
    connection failures (a connection timeout included) raise ``aiohttp.ClientError`` /
    ``OSError`` / ``TimeoutError`` as aiohttp does.
    """
    outbound = wire.Direction.UP
    cfg = _session_config(link, outbound, config, handshake_timeout)
    initiator = Initiator(signer, authorize, prologue, cfg, peer_kind=peer_kind)
    deadline = asyncio.get_running_loop().time() + cfg.handshake_timeout_seconds
    async with asyncio.timeout_at(deadline):  # a transport failure like any other
        ws = await session.ws_connect(
            url,
            max_msg_size=inbound_max_msg_size(link, _other(outbound), cfg),
            ssl=True if ssl is None else ssl,
            heartbeat=heartbeat,
            compress=0,
            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=close_timeout),
            headers=headers,
        )
    try:
        async with _handshake_deadline(ws, deadline):
            await ws.send_bytes(initiator.hello())
            server_hello = await _receive_bytes(ws, "a ServerHello")
            finish, secure = initiator.finish(server_hello)
            await ws.send_bytes(finish)
    except BaseException:
        await _close_ws(ws, CloseCode.HANDSHAKE_FAILED, "handshake aborted")  # if still open
        raise
    return Channel(ws, secure, link=link, outbound=outbound, rate_limit=rate_limit)


async def accept(
    request: web.Request,
    *,
    signer: Signer,
    authorize: Authorize,
    prologue: bytes,
    link: wire.Link,
    config: SessionConfig | None = None,
    handshake_timeout: float | None = None,
    peer_kind: IdentityKind | None = None,
    rate_limit: RateLimiter | None = None,
    heartbeat: float | None = None,
    close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
) -> Channel:
    """Upgrade ``request`` and run the server side of the handshake under a deadline.

    ``authorize`` sees the client's claimed identity before the server signs anything; the
    claim is proven before this returns. On any failure the socket is closed with a
    :class:`CloseCode` and reason and :class:`AcceptFailed` is raised: return its ``response``.
    """
    outbound = wire.Direction.DOWN
    cfg = _session_config(link, outbound, config, handshake_timeout)
    responder = Responder(signer, authorize, prologue, cfg, peer_kind=peer_kind)
    ws = _ServerWebSocket(
        max_msg_size=inbound_max_msg_size(link, _other(outbound), cfg),
        compress=False,  # sealed frames do not compress; and no inflate bombs
        heartbeat=heartbeat,
        timeout=close_timeout,
    )
    await ws.prepare(request)
    deadline = asyncio.get_running_loop().time() + cfg.handshake_timeout_seconds
    try:
        async with _handshake_deadline(ws, deadline):
            client_hello = await _receive_bytes(ws, "a ClientHello")
            await ws.send_bytes(responder.respond(client_hello))
            client_finish = await _receive_bytes(ws, "a ClientFinish")
            secure = responder.complete(client_finish)
    except ChannelClosed as exc:
        await _close_ws(ws, exc.code, exc.reason)  # if still open
        raise AcceptFailed(exc.code, exc.reason, by_peer=exc.by_peer, response=ws) from exc
    except (ConnectionError, RuntimeError) as exc:
        await _close_ws(ws, CloseCode.HANDSHAKE_FAILED, "handshake aborted")
        raise AcceptFailed(1006, f"connection lost: {exc}", by_peer=True, response=ws) from exc
    except BaseException:
        await _close_ws(ws, CloseCode.GOING_AWAY, "handshake aborted")
        raise
    return Channel(ws, secure, link=link, outbound=outbound, rate_limit=rate_limit)
