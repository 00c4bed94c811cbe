"""Channel glue over a real aiohttp server on 127.0.0.1 (ephemeral port, in-process)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from byteleap.core import wire
from byteleap.core.channel import (
    AcceptFailed,
    Channel,
    ChannelClosed,
    CloseCode,
    RateLimiter,
    accept,
    close_reason,
    dial,
    inbound_max_msg_size,
)
from byteleap.core.identity import HotkeySigner, IdentityKind, PeerIdentity, Signer, WorkerKey
from byteleap.core.session import FRAME_OVERHEAD, SessionConfig

PROLOGUE = b"byteleap/worker-miner/v1"
LINK = wire.Link.WORKER_MINER
WAIT = 5.0  # generous bound for a loaded 2-core machine; the happy paths take milliseconds


def _allow(_: PeerIdentity) -> bool:
    return True


def _heartbeat() -> wire.Heartbeat:
    return wire.Heartbeat(uptime_s=1.0, load1=0.5, mem_used_bytes=1024)


Serve = Callable[[Channel], Awaitable[None]]


@dataclass
class Server:
    """Records what the handler saw; ``serve`` runs once a channel is accepted."""

    signer: Signer
    url: str = ""
    authorize: Callable[[PeerIdentity], bool] = _allow
    handshake_timeout: float | None = None
    rate_limit: Callable[[], RateLimiter | None] = lambda: None
    serve: Serve | None = None
    link: wire.Link = LINK
    prologue: bytes = PROLOGUE
    channels: list[Channel] = field(default_factory=list)
    refusals: list[AcceptFailed] = field(default_factory=list)
    frames: list[wire.Frame] = field(default_factory=list)
    closed: asyncio.Queue[ChannelClosed] = field(default_factory=asyncio.Queue)
    upgrade_headers: list[dict[str, str]] = field(default_factory=list)

    async def handler(self, request: web.Request) -> web.StreamResponse:
        self.upgrade_headers.append(dict(request.headers))
        try:
            channel = await accept(
                request,
                signer=self.signer,
                authorize=self.authorize,
                prologue=self.prologue,
                link=self.link,
                handshake_timeout=self.handshake_timeout,
                rate_limit=self.rate_limit(),
            )
        except AcceptFailed as exc:
            self.refusals.append(exc)
            await self.closed.put(exc)
            return exc.response
        self.channels.append(channel)
        try:
            if self.serve is not None:
                await self.serve(channel)
            else:  # default: collect frames until the channel closes
                while True:
                    self.frames.append(await channel.recv())
        except ChannelClosed as exc:
            await self.closed.put(exc)
        finally:
            await channel.close()
        return channel.response


@pytest.fixture
async def make_server() -> AsyncIterator[Callable[..., Awaitable[Server]]]:
    runners: list[web.AppRunner] = []

    async def start(signer: Signer | None = None, **kwargs: Any) -> Server:
        server = Server(signer=signer or HotkeySigner.from_uri("//Alice"), **kwargs)
        app = web.Application()
        app.router.add_get("/ws", server.handler)
        runner = web.AppRunner(app, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        host, port = runner.addresses[0][:2]
        server.url = f"http://{host}:{port}/ws"
        return server

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def _dial(
    http: aiohttp.ClientSession, server: Server, signer: Signer | None = None, **kwargs: Any
) -> Channel:
    options: dict[str, Any] = {
        "signer": signer or WorkerKey.generate(),
        "authorize": _allow,
        "prologue": server.prologue,
        "link": server.link,
        "handshake_timeout": WAIT,
    }
    options.update(kwargs)
    return await dial(http, server.url, **options)


async def _next_close(server: Server) -> ChannelClosed:
    return await asyncio.wait_for(server.closed.get(), WAIT)


async def _expect_close(channel: Channel) -> ChannelClosed:
    """Drain frames until the peer's close arrives; return it (and the frames seen, unused)."""
    with pytest.raises(ChannelClosed) as info:
        async with asyncio.timeout(WAIT):
            while True:
                await channel.recv()
    return info.value


# ------------------------------------------------------------------------------------------------
# Happy paths


async def test_worker_dials_hotkey_server_both_directions(
    make_server: Callable[..., Awaitable[Server]], http: aiohttp.ClientSession
) -> None:
    hotkey = HotkeySigner.from_uri("//Alice")
    worker = WorkerKey.generate()
    seen_by_client: list[PeerIdentity] = []

    async def serve(channel: Channel) -> None:
        frame = await channel.recv()
        assert isinstance(frame.msg, wire.Heartbeat)
        assert frame.id == 7
        await channel.send(wire.Ping(nonce=42), id=frame.id)
        await channel.recv()  # until the client closes: ChannelClosed reaches the handler

    server = await make_server(hotkey, serve=serve)

    def authorize(peer: PeerIdentity) -> bool:
        seen_by_client.append(peer)
        return peer == hotkey.identity

    channel = await _dial(http, server, worker, authorize=authorize, peer_kind=IdentityKind.SR25519)
    assert channel.peer == hotkey.identity
    assert seen_by_client == [hotkey.identity]
    await channel.send(_heartbeat(), id=7)
    frame = await asyncio.wait_for(channel.recv(), WAIT)
    assert frame == wire.Frame(msg=wire.Ping(nonce=42), id=7)
    (server_side,) = server.channels
    assert server_side.peer == worker.identity
    assert server_side.channel_binding == channel.channel_binding
    assert len(channel.channel_binding) == 32
    await channel.close()
    assert channel.closed
    closed = await _next_close(server)
    assert closed.by_peer and closed.code == CloseCode.NORMAL
    with pytest.raises(ChannelClosed):
        await channel.send(_heartbeat())


async def test_miner_validator_link_and_concurrent_senders(
    make_server: Callable[..., Awaitable[Server]], http: aiohttp.ClientSession
) -> None:
    validator = HotkeySigner.from_uri("//Alice")
    miner = HotkeySigner.from_uri("//Bob")
    server = await make_server(
        validator, link=wire.Link.MINER_VALIDATOR, prologue=b"byteleap/miner-validator/v1"
    )
    channel = await _dial(http, server, miner)
    # Many tasks sending at once: the lock keeps sealing and writing in the same order, so the
    # server's replay window accepts every frame.
    await asyncio.gather(*(channel.send(wire.Pong(nonce=i), id=i + 1) for i in range(50)))
    await channel.close()
    await _next_close(server)
    assert sorted(f.id for f in server.frames) == list(range(1, 51))
    assert server.channels[0].peer == miner.identity


async def test_dial_sends_extra_headers_on_the_upgrade_request(
    make_server: Callable[..., Awaitable[Server]], http: aiohttp.ClientSession
) -> None:
    server = await make_server(
        link=wire.Link.MINER_VALIDATOR, prologue=b"byteleap/miner-validator/v1"
    )
    miner = HotkeySigner.from_uri("//Bob")
    signed = {"X-Bittensor-Hotkey": miner.ss58_address, "X-Bittensor-Nonce": "123"}
    channel = await _dial(http, server, miner, headers=signed)
    plain = await _dial(http, server, miner)  # without headers: nothing extra is sent
    await channel.close()
    await plain.close()
    for _ in range(2):
        await _next_close(server)
    with_headers, without = server.upgrade_headers
    assert with_headers["X-Bittensor-Hotkey"] == miner.ss58_address
    assert with_headers["X-Bittensor-Nonce"] == "123"
    assert with_headers["Upgrade"].lower() == "websocket"  # aiohttp's own headers stay
    assert "X-Bittensor-Hotkey" not in without


async def test_send_refuses_wrong_direction_and_oversize_locally(
    make_server: Callable[..., Awaitable[Server]], http: aiohttp.ClientSession
) -> None:
    server = await make_server()
    channel = await _dial(http, server)
    with pytest.raises(wire.WireError) as info:
        await channel.send(wire.Ping(nonce=1))  # Ping only travels down on this link
    assert info.value.code is wire.ErrorCode.UNKNOWN_MESSAGE
    assert not channel.closed
    # One byte over the upstream limit of this link (the encoder does not check field bounds).
    limit = wire.max_frame_bytes(LINK, wire.Direction.UP)
    oversize = wire.Error(code=wire.ErrorCode.INTERNAL, message="")
    overhead = len(wire.encode(wire.Frame(msg=oversize)))
    oversize = wire.Error(code=wire.ErrorCode.INTERNAL, message="x" * (limit - overhead + 8))
    assert len(wire.encode(wire.Frame(msg=oversize))) > limit
    with pytest.raises(wire.WireError) as info:
        await channel.send(oversize)
    assert info.value.code is wire.ErrorCode.FRAME_TOO_LARGE
    assert not channel.closed
    await channel.send_error(wire.ErrorCode.INTERNAL, "x" * 2000, ref=3)
    await channel.close()
    await _next_close(server)
    (frame,) = server.frames  # the peer saw only the error: nothing of the refused sends
    assert frame.id == 3
    assert isinstance(frame.msg, wire.Error) and frame.msg.code is wire.ErrorCode.INTERNAL
    assert len(frame.msg.message) == wire.MAX_ERROR_MESSAGE
    assert frame.msg.message.endswith("...")


async def test_session_limits_fit_the_link_per_direction(
    make_server: Callable[..., Awaitable[Server]], http: aiohttp.ClientSession
) -> None:
    """Each end seals up to its outbound limit and opens up to its inbound one (worker->miner is
    8 MiB, miner->worker 64 KiB), and a caller's smaller limit in its config still holds."""
    accepted: asyncio.Queue[SessionConfig] = asyncio.Queue()

    async def serve(channel: Channel) -> None:
        await accepted.put(channel._session.config)
        while True:
            await channel.recv()

    server, channel = await _established(make_server, http, serve=serve)
    up = wire.max_frame_bytes(LINK, wire.Direction.UP) + FRAME_OVERHEAD
    down = wire.max_frame_bytes(LINK, wire.Direction.DOWN) + FRAME_OVERHEAD
    assert up != down
    client_config = channel._session.config
    assert (client_config.max_seal_bytes, client_config.max_open_bytes) == (up, down)
    server_config = await asyncio.wait_for(accepted.get(), WAIT)
    assert (server_config.max_seal_bytes, server_config.max_open_bytes) == (down, up)
    await channel.close()

    small = SessionConfig(max_seal_bytes=FRAME_OVERHEAD + 200, max_open_bytes=FRAME_OVERHEAD + 300)
    channel = await _dial(http, server, config=small)
    config = channel._session.config
    assert (config.max_seal_bytes, config.max_open_bytes) == (
        small.max_seal_bytes,
        small.max_open_bytes,
    )
    with pytest.raises(wire.WireError) as info:  # refused locally, before the session refuses it
        await channel.send_error(wire.ErrorCode.INTERNAL, "x" * 250)
    assert info.value.code is wire.ErrorCode.FRAME_TOO_LARGE
    assert not channel.closed
    await channel.send_error(wire.ErrorCode.INTERNAL, "fits")
    await channel.close()


# ------------------------------------------------------------------------------------------------
# Refusals during the handshake


async def test_unauthorized_client_refused_before_handler(
    make_server: Callable[..., Awaitable[Server]], http: aiohttp.ClientSession
) -> None:
    server = await make_server(authorize=lambda _peer: False)
    with pytest.raises(ChannelClosed) as info:
        await _dial(http, server)
    assert info.value.code == CloseCode.UNAUTHORIZED
    assert info.value.by_peer
    assert "unauthorized" in info.value.reason
    refusal = await _next_close(server)
    assert refusal.code == CloseCode.UNAUTHORIZED
    assert server.channels == []


async def test_client_refuses_unauthorized_server(
    make_server: Callable[..., Awaitable[Server]], http: aiohttp.ClientSession
) -> None:
    server = await make_server()
    with pytest.raises(ChannelClosed) as info:
        await _dial(http, server, authorize=lambda _peer: False)
    assert info.value.code == CloseCode.UNAUTHORIZED and not info.value.by_peer
    # The server sees the client's close mid-handshake and never produces a channel.
    refusal = await _next_close(server)
    assert refusal.code == CloseCode.UNAUTHORIZED and refusal.by_peer
    assert server.channels == []


async def test_wrong_prologue_fails_handshake(
    make_server: Callable[..., Awaitable[Server]], http: aiohttp.ClientSession
) -> None:
    server = await make_server()
    with pytest.raises(ChannelClosed) as info:
        await _dial(http, server, prologue=b"byteleap/miner-validator/v1")
    assert info.value.code == CloseCode.HANDSHAKE_FAILED
    assert "prologue_mismatch" in info.value.reason
    assert server.channels == []


async def test_handshake_timeout_closes_within_deadline(
    make_server: Callable[..., Awaitable[Server]], http: aiohttp.ClientSession
) -> None:
    server = await make_server(handshake_timeout=0.3)
    loop = asyncio.get_running_loop()
    async with http.ws_connect(server.url) as ws:
        started = loop.time()
        msg = await ws.receive(timeout=WAIT)  # say nothing; wait for the server to give up
        elapsed = loop.time() - started
    assert msg.type is WSMsgType.CLOSE
    assert msg.data == CloseCode.HANDSHAKE_FAILED
    assert msg.extra == "handshake timeout"
    assert 0.2 <= elapsed < 0.3 + 2.0
    assert (await _next_close(server)).code == CloseCode.HANDSHAKE_FAILED
    assert server.channels == []


async def test_dial_handshake_timeout_against_silent_server(
    make_server: Callable[..., Awaitable[Server]], http: aiohttp.ClientSession
) -> None:
    async def silent(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for _ in ws:
            pass
        return ws

    server = await make_server()
    app = web.Application()
    app.router.add_get("/ws", silent)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        server.url = f"http://{host}:{port}/ws"
        with pytest.raises(ChannelClosed) as info:
            await _dial(http, server, handshake_timeout=0.3)
        assert info.value.code == CloseCode.HANDSHAKE_FAILED
        assert info.value.reason == "handshake timeout"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ("hello", CloseCode.PROTOCOL_ERROR),
        (b"\xc1garbage", CloseCode.HANDSHAKE_FAILED),
        (b"\x00" * 2048, CloseCode.FRAME_TOO_LARGE),  # over max_handshake_bytes
    ],
)
async def test_bad_first_message_refused(
    make_server: Callable[..., Awaitable[Server]],
    http: aiohttp.ClientSession,
    payload: str | bytes,
    code: CloseCode,
) -> None:
    server = await make_server()
    async with http.ws_connect(server.url) as ws:
        if isinstance(payload, str):
            await ws.send_str(payload)
        else:
            await ws.send_bytes(payload)
        msg = await ws.receive(timeout=WAIT)
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, code)
    assert (await _next_close(server)).code == code
    assert server.channels == []


# ------------------------------------------------------------------------------------------------
# Violations after the handshake


async def _established(
    make_server: Callable[..., Awaitable[Server]], http: aiohttp.ClientSession, **kwargs: Any
) -> tuple[Server, Channel]:
    server = await make_server(**kwargs)
    channel = await _dial(http, server)
    return server, channel


async def test_text_message_closes_with_protocol_error(
    make_server: Callable[..., Awaitable[Server]], http: aiohttp.ClientSession
) -> None:
    server, channel = await _established(make_server, http)
    await channel._ws.send_str("not a frame")
    closed = await _expect_close(channel)
    assert (closed.code, closed.by_peer) == (CloseCode.PROTOCOL_ERROR, True)
    assert (await _next_close(server)).code == CloseCode.PROTOCOL_ERROR


async def test_garbage_binary_closes_with_bad_frame(
    make_server: Callable[..., Awaitable[Server]], http: aiohttp.ClientSession
) -> None:
    server, channel = await _established(make_server, http)
    await channel._ws.send_bytes(b"\x01" + b"\x00" * 100)
    closed = await _expect_close(channel)
    assert closed.code == CloseCode.BAD_FRAME
    assert "tampered_frame" in closed.reason
    assert (await _next_close(server)).code == CloseCode.BAD_FRAME


async def test_ten_mib_message_closes_with_frame_too_large(
    make_server: Callable[..., Awaitable[Server]], http: aiohttp.ClientSession
) -> None:
    server, channel = await _established(make_server, http)
    with contextlib.suppress(ConnectionError, aiohttp.ClientError):
        await channel._ws.send_bytes(bytes(10 * 1024 * 1024))
    closed = await _expect_close(channel)
    assert closed.code == CloseCode.FRAME_TOO_LARGE
    assert (await _next_close(server)).code == CloseCode.FRAME_TOO_LARGE


async def test_transport_limit_is_the_link_limit_plus_overhead(
    make_server: Callable[..., Awaitable[Server]], http: aiohttp.ClientSession
) -> None:
    largest = wire.WORKER_TO_MINER_MAX_BYTES + FRAME_OVERHEAD
    assert inbound_max_msg_size(LINK, wire.Direction.UP, SessionConfig()) == largest + 1
    # a smaller max_open_bytes lowers it, never below room for a handshake message
    config = SessionConfig(max_open_bytes=5000)
    assert inbound_max_msg_size(LINK, wire.Direction.UP, config) == 5001
    config = SessionConfig(max_open_bytes=100, max_handshake_bytes=1024)
    assert inbound_max_msg_size(LINK, wire.Direction.UP, config) == 1025
    # Exactly the largest legal frame passes the transport and reaches authentication...
    _server, channel = await _established(make_server, http)
    await channel._ws.send_bytes(b"\x01" + bytes(largest - 1))
    assert (await _expect_close(channel)).code == CloseCode.BAD_FRAME
    # ... one byte more is refused by size before any crypto.
    _server, channel = await _established(make_server, http)
    with contextlib.suppress(ConnectionError, aiohttp.ClientError):
        await channel._ws.send_bytes(bytes(largest + 1))
    assert (await _expect_close(channel)).code == CloseCode.FRAME_TOO_LARGE


async def test_replayed_frame_closes_with_bad_frame(
    make_server: Callable[..., Awaitable[Server]], http: aiohttp.ClientSession
) -> None:
    server, channel = await _established(make_server, http)
    ws = channel._ws
    captured: list[bytes] = []
    original = ws.send_bytes

    async def capture(data: bytes, compress: int | None = None) -> None:
        captured.append(bytes(data))
        await original(data, compress)

    ws.send_bytes = capture  # type: ignore[method-assign]
    await channel.send(_heartbeat())
    (sealed,) = captured
    await original(sealed)  # the same authentic bytes again, at the raw WebSocket level
    closed = await _expect_close(channel)
    assert closed.code == CloseCode.BAD_FRAME
    assert "replayed_frame" in closed.reason
    assert (await _next_close(server)).code == CloseCode.BAD_FRAME
    assert len(server.frames) == 1  # the original was delivered, the replay was not


async def test_wire_error_replies_error_then_closes(
    make_server: Callable[..., Awaitable[Server]], http: aiohttp.ClientSession
) -> None:
    server, channel = await _established(make_server, http)
    # An authentic frame carrying a message not allowed upstream (bypassing send()'s own check).
    data = wire.encode(wire.Frame(msg=wire.Ping(nonce=1), id=9))
    await channel._ws.send_bytes(channel._session.seal(data))
    frame = await asyncio.wait_for(channel.recv(), WAIT)
    assert frame.id == 9
    assert isinstance(frame.msg, wire.Error)
    assert frame.msg.code is wire.ErrorCode.UNKNOWN_MESSAGE and frame.msg.ref == 9
    closed = await _expect_close(channel)
    assert closed.code == CloseCode.PROTOCOL_ERROR
    assert (await _next_close(server)).code == CloseCode.PROTOCOL_ERROR
    assert server.frames == []


async def test_bad_field_closes_with_bad_frame(
    make_server: Callable[..., Awaitable[Server]], http: aiohttp.ClientSession
) -> None:
    _server, channel = await _established(make_server, http)
    bad = wire.Heartbeat(uptime_s=-1.0, load1=0.0, mem_used_bytes=0)  # uptime must be >= 0
    await channel._ws.send_bytes(channel._session.seal(wire.encode(wire.Frame(msg=bad, id=4))))
    frame = await asyncio.wait_for(channel.recv(), WAIT)
    assert isinstance(frame.msg, wire.Error) and frame.msg.code is wire.ErrorCode.BAD_FRAME
    assert (await _expect_close(channel)).code == CloseCode.BAD_FRAME


async def test_rate_limit_closes_with_4007(
    make_server: Callable[..., Awaitable[Server]], http: aiohttp.ClientSession
) -> None:
    server, channel = await _established(
        make_server, http, rate_limit=lambda: RateLimiter(rate_per_s=0.01, burst=3)
    )
    for i in range(10):
        with contextlib.suppress(ChannelClosed):
            await channel.send(_heartbeat(), id=i + 1)
    frame = await asyncio.wait_for(channel.recv(), WAIT)
    assert isinstance(frame.msg, wire.Error) and frame.msg.code is wire.ErrorCode.RATE_LIMITED
    closed = await _expect_close(channel)
    assert closed.code == CloseCode.RATE_LIMITED
    assert (await _next_close(server)).code == CloseCode.RATE_LIMITED
    assert [f.id for f in server.frames] == [1, 2, 3]


async def test_server_close_code_reaches_client(
    make_server: Callable[..., Awaitable[Server]], http: aiohttp.ClientSession
) -> None:
    async def serve(channel: Channel) -> None:
        await channel.close(CloseCode.CAPACITY_REACHED, "miner has 100 workers")

    server = await make_server(serve=serve)
    channel = await _dial(http, server)
    closed = await _expect_close(channel)
    assert (closed.code, closed.reason, closed.by_peer) == (
        CloseCode.CAPACITY_REACHED,
        "miner has 100 workers",
        True,
    )


async def test_session_expiry_closes_with_4005(
    make_server: Callable[..., Awaitable[Server]], http: aiohttp.ClientSession
) -> None:
    server = await make_server()
    channel = await _dial(http, server, config=SessionConfig(max_age_seconds=0.05))
    await asyncio.sleep(0.1)
    with pytest.raises(ChannelClosed) as info:
        await channel.send(_heartbeat())
    assert info.value.code == CloseCode.SESSION_EXPIRED and not info.value.by_peer
    assert (await _next_close(server)).code == CloseCode.SESSION_EXPIRED


async def test_async_iteration_ends_on_normal_close(
    make_server: Callable[..., Awaitable[Server]], http: aiohttp.ClientSession
) -> None:
    async def serve(channel: Channel) -> None:
        for i in range(3):
            await channel.send(wire.Ping(nonce=i))
        await channel.close()

    server = await make_server(serve=serve)
    channel = await _dial(http, server)
    nonces = []
    async with asyncio.timeout(WAIT):
        async for frame in channel:
            assert isinstance(frame.msg, wire.Ping)
            nonces.append(frame.msg.nonce)
    assert nonces == [0, 1, 2]


# ------------------------------------------------------------------------------------------------
# Pieces


def test_rate_limiter_token_bucket() -> None:
    now = [0.0]
    limiter = RateLimiter(rate_per_s=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.allow() for _ in range(4)] == [True, True, True, False]
    now[0] = 0.5  # one token back
    assert limiter.allow() and not limiter.allow()
    now[0] = 100.0  # refills only up to the burst
    assert sum(limiter.allow() for _ in range(10)) == 3
    with pytest.raises(ValueError):
        RateLimiter(rate_per_s=0, burst=1)
    with pytest.raises(ValueError):
        RateLimiter(rate_per_s=1, burst=0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ""),
        ("short reason", "short reason"),
        ("x" * 123, "x" * 123),  # exactly the limit: unchanged
        ("x" * 124, "x" * 120 + "..."),
        ("é" * 70, "é" * 60 + "..."),  # 2-byte characters: 120 bytes, then the marker
        ("ab" + "€" * 50, "ab" + "€" * 39 + "..."),  # 3-byte characters never split
        ("bad \udc80 surrogate", "bad ? surrogate"),
    ],
)
def test_close_reason_fits_a_close_frame(text: str, expected: str) -> None:
    reason = close_reason(text)
    assert reason == expected
    assert len(reason.encode()) <= 123


def test_close_codes_are_private_range_and_distinct() -> None:
    codes = [c for c in CloseCode if c is not CloseCode.NORMAL]
    assert all(4000 <= c <= 4999 for c in codes)
    assert len({int(c) for c in codes}) == len(codes)
    assert int(CloseCode.RATE_LIMITED) == 4007 and int(CloseCode.UNAUTHORIZED) == 4002
