"""The validator's WebSocket endpoint for miners (docs/miner-validator.md, validator side).

Admission, in the order of the protocol, each refusal before anything is stored:

1. a global cap on open connections (``policy.max_connections``): HTTP 503;
2. btauth/1 on the upgrade request (:class:`~byteleap.core.identity.BtAuthVerifier`): unsigned or
   badly signed 401, replayed or addressed to another hotkey 403, each with a short text reason;
3. registration: the caller must be in the current subnet snapshot (the agent's ``snapshot()``),
   else 403 ``not registered on netuid N`` (503 while the validator has no snapshot yet);
4. the secure session (:func:`core.channel.accept`, sr25519) whose peer must be exactly the
   hotkey the btauth headers named, else close 4002;
5. ``MinerHello`` first, naming that same hotkey, before ``policy.handshake_timeout_s`` (counted
   from the upgrade request), else ``Error`` + close.

Then the connection becomes a :class:`MinerSession` in the :class:`MinerHub`, one per hotkey: a
newer connection replaces the older, which is closed with 4009 REPLACED. The session is what the
round engine talks to: ``echo``, ``run_batch``, ``reveal``, ``release``. Answers are matched by
challenge id (and device) against what this session asked; anything else (an unknown challenge,
a second answer, a commit naming another device, a second hello) is dropped with a debug log. The
validator's own clock times everything: each frame's receive time is read as soon as the frame is
opened, before any handling.

Flooding: answers to the validator's own requests are free (each request can be answered once),
everything else (rosters, pings, unsolicited frames) draws from a per-connection token bucket
(``policy.messages_per_second`` / ``message_burst``); a miner over it gets ``Error(RATE_LIMITED)``
and close 4007.

Rosters and disconnects reach the :class:`HubListener` (the round engine, which persists them).
The listener runs outside the receive loop, so a slow or unavailable store never stalls a miner's
commits; per hotkey its calls run one at a time and in order, and only the latest pending event
is kept (a roster replaces the previous one, a disconnect replaces the roster: each is the whole
truth). A disconnect is reported only for the hotkey's current connection, not a replaced one.

:meth:`MinerHub.refresh` applies a new snapshot: sessions whose hotkey left the subnet get
``Error(NOT_PERMITTED)`` and close 4002; a changed uid is recorded with the roster again.

Gateway enrollment: a ``GatewayTokenRequest{worker_id}`` (with a non-zero frame id) is answered
with ``GatewayTokenGrant`` or ``Error`` under the same id, in a task of its own so the receive loop
never waits on a gateway. The token comes from the hub's :class:`TokenIssuer` (the configured
gateways, :mod:`~byteleap.validator.enrollment`), bound to the worker and to the hotkey this
session proved. Without a gateway the answer is ``NO_GATEWAY`` at once. Per session at most
``TOKEN_REQUESTS_IN_FLIGHT`` requests run at a time and ``TOKEN_BURST`` / ``TOKEN_PER_MINUTE``
are allowed (a token bucket); beyond that the answer is ``RATE_LIMITED``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

from aiohttp import web

from ..chain.port import SubnetSnapshot
from ..core import wire
from ..core.channel import (
    AcceptFailed,
    Channel,
    ChannelClosed,
    CloseCode,
    RateLimiter,
    accept,
)
from ..core.identity import BtAuthError, BtAuthVerifier, IdentityKind, PeerIdentity, Signer
from ..core.logs import log_fields
from ..core.session import SessionConfig
from .config import MinerListen, MinerPolicy

__all__ = [
    "LINK",
    "PROLOGUE",
    "BatchAnswer",
    "BatchResult",
    "HubListener",
    "MinerHub",
    "MinerRequestError",
    "MinerSession",
    "RevealAnswer",
    "SnapshotSource",
    "TokenIssuer",
]

log = logging.getLogger(__name__)

PROLOGUE = wire.MINER_VALIDATOR_PROLOGUE
LINK = wire.Link.MINER_VALIDATOR
DEFAULT_CLOSE_TIMEOUT_S = 5.0
DEFAULT_HOOK_DRAIN_S = 5.0
TOKEN_REQUESTS_IN_FLIGHT: Final = 4
TOKEN_BURST: Final = 20
"""A miner's workers may all ask at once when it starts using a gateway: 20 at once, then..."""
TOKEN_PER_MINUTE: Final = 30.0
"""...one every two seconds (a miner has at most 100 workers)."""

SnapshotSource = Callable[[], SubnetSnapshot | None]
"""The agent's current subnet snapshot (None until the first one arrived)."""

BatchAnswer = wire.DeviceCommit | wire.DeviceFailure
RevealAnswer = wire.DeviceReveal | wire.DeviceFailure


class HubListener(Protocol):
    """What the hub reports (the round engine implements it)."""

    async def on_roster(self, session: MinerSession, roster: wire.WorkerRoster) -> None: ...

    async def on_disconnect(self, session: MinerSession) -> None: ...


class TokenIssuer(Protocol):
    """Where enrollment tokens come from (the validator's configured gateways, see
    :mod:`~byteleap.validator.enrollment`). ``issue`` raises a
    :class:`~byteleap.core.wire.CodedError` whose code the miner is told."""

    @property
    def configured(self) -> bool: ...

    async def issue(self, worker_id: str, miner_hotkey: str) -> wire.GatewayGrant: ...


class MinerRequestError(Exception):
    """A request to a miner failed. ``reason`` is a stable code: ``timeout``, ``disconnected``
    or the name of the wire ``ErrorCode`` the miner answered (e.g. ``WORKER_OFFLINE``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class BatchResult:
    """The answers to one ``ChallengeBatch``, timed on the session's clock.

    ``answers`` has every challenge id of the batch: its commit or failure, or None when none
    came before the deadline or the miner went away. ``received_at[cid]`` is when that answer was
    read; ``dispatched_at`` is just before the batch was written to the socket (the echo's
    round trip is timed the same way, so the two subtract cleanly).
    """

    dispatched_at: float
    answers: dict[bytes, BatchAnswer | None]
    received_at: dict[bytes, float]

    def measured(self, challenge_id: bytes) -> float | None:
        """Dispatch to answer, in seconds (None without an answer)."""
        at = self.received_at.get(challenge_id)
        return None if at is None else at - self.dispatched_at


class _Wait:
    """The outstanding answers of one batch (commit or reveal phase)."""

    __slots__ = ("accepts", "answers", "done", "expected", "received_at")

    def __init__(
        self,
        expected: Mapping[bytes, tuple[str, str]],
        accepts: tuple[type[wire.Message], ...],
    ) -> None:
        self.expected = dict(expected)
        """challenge id -> (worker_id, device_uuid) the answer must name."""
        self.accepts = accepts
        self.answers: dict[bytes, wire.Message] = {}
        self.received_at: dict[bytes, float] = {}
        self.done = asyncio.Event()
        if not self.expected:
            self.done.set()

    def offer(
        self, msg: wire.DeviceCommit | wire.DeviceReveal | wire.DeviceFailure, at: float
    ) -> bool:
        """Take ``msg`` if it is the first answer for one of our challenges, for its device."""
        cid = msg.challenge_id
        if not isinstance(msg, self.accepts) or cid in self.answers:
            return False
        if self.expected.get(cid) != (msg.worker_id, msg.device_uuid):
            return False
        self.answers[cid] = msg
        self.received_at[cid] = at
        if len(self.answers) == len(self.expected):
            self.done.set()
        return True

    def refuse_all(self, code: wire.ErrorCode, message: str, at: float) -> None:
        """The miner refused the whole batch: every unanswered challenge fails with ``code``."""
        for cid, (worker_id, device_uuid) in self.expected.items():
            if cid not in self.answers:
                self.answers[cid] = wire.DeviceFailure(
                    challenge_id=cid,
                    worker_id=worker_id,
                    device_uuid=device_uuid,
                    code=code,
                    message=message,
                )
                self.received_at[cid] = at
        self.done.set()


@dataclass(slots=True)
class _Echo:
    nonce: int
    worker_id: str
    future: asyncio.Future[float]


class MinerSession:
    """One admitted miner connection: its identity, its latest roster, and requests to it.

    Built by :class:`MinerHub` only. Every request method is safe to call after the miner went
    away: it answers at once (None answers, or :class:`MinerRequestError` for ``echo``).
    """

    def __init__(
        self,
        channel: Channel,
        *,
        hotkey: str,
        uid: int,
        agent_version: str,
        remote: str | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.channel = channel
        self.hotkey = hotkey
        """Canonical ss58 (format 42) of the miner's hotkey, proven by the session."""
        self.uid = uid
        """The miner's uid in the latest snapshot."""
        self.agent_version = agent_version
        self.remote = remote
        self.roster: wire.WorkerRoster | None = None
        """The latest roster, None until the first arrives."""
        self.roster_at: float | None = None
        self.connected_at = clock()
        self._clock = clock
        self._waits: dict[bytes, _Wait] = {}
        self._batch_frames: dict[int, _Wait] = {}
        self._echoes: dict[int, _Echo] = {}
        self._gone: str | None = None
        self.token_limiter = RateLimiter(TOKEN_PER_MINUTE / 60.0, TOKEN_BURST, clock=clock)
        """Enrollment-token requests of this miner (its own bucket, apart from flooding)."""
        self.token_tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        state = f"gone: {self._gone}" if self._gone else "open"
        return f"MinerSession({self.hotkey}, uid={self.uid}, {state})"

    @property
    def closed(self) -> bool:
        return self._gone is not None or self.channel.closed

    @property
    def pending(self) -> int:
        """Challenges and echoes waiting for an answer."""
        return len(self._waits) + len(self._echoes)

    # ------------------------------------------------------------------ requests

    async def echo(self, worker_id: str, timeout_s: float) -> float:
        """Round trip validator -> miner -> worker -> back, in seconds on the session's clock.

        Raises :class:`MinerRequestError` (``timeout``, ``disconnected``, or the miner's error
        code such as ``WORKER_OFFLINE``).
        """
        if self.closed:
            raise MinerRequestError("disconnected", f"miner {self.hotkey} is not connected")
        frame_id = self._new_id()
        nonce = secrets.randbits(63)
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._echoes[frame_id] = _Echo(nonce, worker_id, future)
        try:
            async with asyncio.timeout(timeout_s):
                started = self._clock()
                try:
                    await self.channel.send(
                        wire.EchoRequest(nonce=nonce, worker_id=worker_id), id=frame_id
                    )
                except ChannelClosed:
                    raise MinerRequestError(
                        "disconnected", f"miner {self.hotkey} went away"
                    ) from None
                received = await future
        except TimeoutError:
            raise MinerRequestError(
                "timeout", f"no echo from worker within {timeout_s:g} s"
            ) from None
        finally:
            self._echoes.pop(frame_id, None)
        return received - started

    async def run_batch(self, batch: wire.ChallengeBatch, deadline: float) -> BatchResult:
        """Send every challenge of ``batch`` at once; wait for each commit or failure until
        ``deadline`` (event-loop time, ``loop.time()``) or until the miner goes away."""
        expected = {c.challenge_id: (c.worker_id, c.device_uuid) for c in batch.challenges}
        wait = _Wait(expected, (wire.DeviceCommit, wire.DeviceFailure))
        dispatched_at = await self._exchange(batch, wait, deadline)
        answers: dict[bytes, BatchAnswer | None] = {}
        for cid in expected:
            msg = wait.answers.get(cid)
            assert msg is None or isinstance(msg, wire.DeviceCommit | wire.DeviceFailure)
            answers[cid] = msg
        return BatchResult(dispatched_at, answers, dict(wait.received_at))

    async def reveal(
        self, batch: wire.RevealBatch, deadline: float
    ) -> dict[bytes, RevealAnswer | None]:
        """Send the reveal requests at once; each reveal or failure, or None at the deadline
        (event-loop time) or when the miner goes away."""
        expected = {r.challenge_id: (r.worker_id, r.device_uuid) for r in batch.requests}
        wait = _Wait(expected, (wire.DeviceReveal, wire.DeviceFailure))
        await self._exchange(batch, wait, deadline)
        answers: dict[bytes, RevealAnswer | None] = {}
        for cid in expected:
            msg = wait.answers.get(cid)
            assert msg is None or isinstance(msg, wire.DeviceReveal | wire.DeviceFailure)
            answers[cid] = msg
        return answers

    async def release(self, batch: wire.ReleaseBatch) -> None:
        """Tell the miner its workers may free these results (nothing to wait for)."""
        if self.closed:
            return
        with contextlib.suppress(ChannelClosed):
            await self.channel.send(batch)

    async def _exchange(
        self, batch: wire.ChallengeBatch | wire.RevealBatch, wait: _Wait, deadline: float
    ) -> float:
        """Send ``batch`` and wait for ``wait`` to fill up; returns the dispatch time."""
        clash = [cid for cid in wait.expected if cid in self._waits]
        if clash:  # a caller bug: two batches would share an answer
            raise ValueError(f"challenge {clash[0].hex()} is already waiting for an answer")
        frame_id = self._new_id()
        for cid in wait.expected:
            self._waits[cid] = wait
        self._batch_frames[frame_id] = wait
        dispatched_at = self._clock()
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):  # the send too: a stalled socket
                    if self.closed:
                        wait.done.set()
                    else:
                        try:
                            await self.channel.send(batch, id=frame_id)
                        except ChannelClosed:
                            wait.done.set()
                    await wait.done.wait()
        finally:
            self._batch_frames.pop(frame_id, None)
            for cid in wait.expected:
                if self._waits.get(cid) is wait:
                    del self._waits[cid]
        return dispatched_at

    def _new_id(self) -> int:
        while True:
            frame_id = secrets.randbits(63)
            if frame_id and frame_id not in self._echoes and frame_id not in self._batch_frames:
                return frame_id

    # ------------------------------------------------------------------ inbound

    def handle(self, frame: wire.Frame, at: float) -> bool:
        """Route one frame read at ``at``; True when it answered one of our requests.

        Never raises for anything the miner sent.
        """
        msg = frame.msg
        if isinstance(msg, wire.DeviceCommit | wire.DeviceReveal | wire.DeviceFailure):
            wait = self._waits.get(msg.challenge_id)
            if wait is not None and wait.offer(msg, at):
                return True
            log.debug(
                "unsolicited %s dropped",
                type(msg).__name__,
                extra=log_fields(
                    miner=self.hotkey,
                    challenge_id=msg.challenge_id.hex(),
                    worker_id=msg.worker_id,
                    device=msg.device_uuid,
                ),
            )
            return False
        if isinstance(msg, wire.EchoReply):
            echo = self._echoes.get(frame.id)
            if (
                echo is not None
                and echo.nonce == msg.nonce
                and echo.worker_id == msg.worker_id
                and not echo.future.done()
            ):
                echo.future.set_result(at)
                return True
            log.debug("unsolicited EchoReply dropped", extra=log_fields(miner=self.hotkey))
            return False
        if isinstance(msg, wire.Error):
            return self._error(frame.id, msg, at)
        if isinstance(msg, wire.WorkerRoster):
            self.roster = msg
            self.roster_at = at
            return False
        if isinstance(msg, wire.GatewayTokenRequest):  # served by the hub
            return False
        if not isinstance(msg, wire.Pong):  # a second MinerHello
            log.debug(
                "unexpected %s dropped", type(msg).__name__, extra=log_fields(miner=self.hotkey)
            )
        return False

    def _error(self, frame_id: int, error: wire.Error, at: float) -> bool:
        for key in (frame_id, error.ref):
            if not key:
                continue
            echo = self._echoes.get(key)
            if echo is not None and not echo.future.done():
                echo.future.set_exception(
                    MinerRequestError(error.code.name, error.message or "refused by the miner")
                )
                return True
            wait = self._batch_frames.get(key)
            if wait is not None and not wait.done.is_set():
                wait.refuse_all(error.code, error.message or "batch refused by the miner", at)
                return True
        log.warning(
            "miner reported an error: %s %s",
            error.code.name,
            error.message,
            extra=log_fields(miner=self.hotkey, ref=error.ref),
        )
        return False

    def gone(self, reason: str) -> None:
        """The connection ended: every waiting request is answered now (idempotent)."""
        if self._gone is None:
            self._gone = reason
        for wait in list(self._waits.values()):
            wait.done.set()
        for echo in list(self._echoes.values()):
            if not echo.future.done():
                echo.future.set_exception(
                    MinerRequestError("disconnected", f"miner {self.hotkey} went away: {reason}")
                )
        for task in list(self.token_tasks):  # nobody is left to answer
            task.cancel()


_Event = Literal["roster", "offline"]


class _ListenerQueue:
    """Runs listener calls per hotkey, one at a time, in order, keeping only the latest event."""

    def __init__(self, listener: Callable[[], HubListener | None]) -> None:
        self._listener = listener
        self._pending: dict[str, tuple[_Event, MinerSession]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def post(self, event: _Event, session: MinerSession) -> None:
        hotkey = session.hotkey
        self._pending[hotkey] = (event, session)
        if hotkey not in self._tasks:
            self._tasks[hotkey] = asyncio.create_task(
                self._drain(hotkey), name=f"validator-miner-events-{hotkey[:8]}"
            )

    async def _drain(self, hotkey: str) -> None:
        try:
            while (item := self._pending.pop(hotkey, None)) is not None:
                event, session = item
                listener = self._listener()
                if listener is None:
                    continue
                try:
                    if event == "roster":
                        if session.roster is not None:
                            await listener.on_roster(session, session.roster)
                    else:
                        await listener.on_disconnect(session)
                except Exception:
                    log.exception(
                        "recording a miner's %s failed", event, extra=log_fields(miner=hotkey)
                    )
        finally:
            self._tasks.pop(hotkey, None)

    async def drain(self, within_s: float) -> None:
        """Let pending calls finish for up to ``within_s`` seconds, then cancel the rest."""
        tasks = list(self._tasks.values())
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=within_s)
        for task in late:
            task.cancel()
        if late:
            log.warning("%d miner event(s) not recorded before shutdown", len(late))
            await asyncio.gather(*late, return_exceptions=True)


class MinerHub:
    """The aiohttp application serving ``listen.path``, and the sessions it admitted."""

    def __init__(
        self,
        listen: MinerListen,
        policy: MinerPolicy,
        *,
        signer: Signer,
        snapshot: SnapshotSource,
        listener: HubListener | None = None,
        tokens: TokenIssuer | None = None,
        session_config: SessionConfig | None = None,
        close_timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S,
        hook_drain_s: float = DEFAULT_HOOK_DRAIN_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if signer.identity.kind is not IdentityKind.SR25519:
            raise ValueError("the validator signs with its sr25519 hotkey")
        self.listen = listen
        self.policy = policy
        self.listener = listener
        """Receives rosters and disconnects; set it before :meth:`start`."""
        self.tokens = tokens
        """Enrollment tokens for the miners' workers; None: the validator has no gateway."""
        self._signer = signer
        self._snapshot = snapshot
        self._verifier = BtAuthVerifier(
            signer.identity.display,
            max_age=policy.btauth_max_age_s,
            allowed_skew=policy.btauth_allowed_skew_s,
        )
        self._session_config = session_config
        self._close_timeout = close_timeout_s
        self._hook_drain = hook_drain_s
        self._clock = clock
        self._sessions: dict[str, MinerSession] = {}
        self._events = _ListenerQueue(lambda: self.listener)
        self._open = 0
        self._stopping = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._runner: web.AppRunner | None = None
        self.app = web.Application()
        self.app.router.add_get(listen.path, self._handle, allow_head=False)

    # ------------------------------------------------------------------ lifecycle

    async def start(self, host: str | None = None, port: int | None = None) -> None:
        """Bind and serve (``host``/``port`` override the config; port 0 picks a free one)."""
        self._runner = web.AppRunner(
            self.app, shutdown_timeout=self._close_timeout + 1.0, access_log=None
        )
        await self._runner.setup()
        site = web.TCPSite(
            self._runner,
            host if host is not None else self.listen.host,
            port if port is not None else self.listen.port,
        )
        try:
            await site.start()
        except BaseException:
            await self._runner.cleanup()
            self._runner = None
            raise
        log.info("listening for miners on %s", ", ".join(self.urls))

    async def stop(self, reason: str = "validator shutting down") -> None:
        """Close every miner (4008), report them offline, stop listening."""
        self._stopping = True
        closing = []
        for session in list(self._sessions.values()):
            self._end(session, reason)
            closing.append(self._close(session.channel, CloseCode.GOING_AWAY, reason))
        if closing:
            await asyncio.gather(*closing, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._events.drain(self._hook_drain)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        if self._runner is None:
            return []
        return [(str(a[0]), int(a[1])) for a in self._runner.addresses if isinstance(a, tuple)]

    @property
    def urls(self) -> list[str]:
        out = []
        for host, port in self.addresses:
            shown = f"[{host}]" if ":" in host else host
            out.append(f"ws://{shown}:{port}{self.listen.path}")
        return out

    @property
    def connection_count(self) -> int:
        """Open WebSocket connections, admitted or not."""
        return self._open

    def sessions(self) -> list[MinerSession]:
        """The admitted, open sessions (one per hotkey)."""
        return [s for s in self._sessions.values() if not s.closed]

    def get(self, hotkey: str) -> MinerSession | None:
        return self._sessions.get(hotkey)

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[MinerSession]:
        return iter(self.sessions())

    async def refresh(self) -> list[str]:
        """Apply the current snapshot: close sessions no longer registered (returns their
        hotkeys), record changed uids. Without a snapshot nothing changes."""
        snapshot = self._snapshot()
        if snapshot is None:
            return []
        revoked: list[MinerSession] = []
        for session in list(self._sessions.values()):
            neuron = snapshot.by_hotkey(session.hotkey)
            if neuron is None:
                revoked.append(session)
            elif neuron.uid != session.uid:
                log.info(
                    "miner's uid changed",
                    extra=log_fields(miner=session.hotkey, old_uid=session.uid, uid=neuron.uid),
                )
                session.uid = neuron.uid
                if session.roster is not None:
                    self._events.post("roster", session)
        reason = f"not registered on netuid {snapshot.netuid}"
        for session in revoked:
            log.info("miner deregistered; closing", extra=log_fields(miner=session.hotkey))
            self._end(session, reason)
        if revoked:  # concurrently: each close may wait for its peer
            await asyncio.gather(*(self._revoke(s.channel, reason) for s in revoked))
        return [s.hotkey for s in revoked]

    async def _revoke(self, channel: Channel, reason: str) -> None:
        with contextlib.suppress(ChannelClosed, wire.WireError, TimeoutError):
            async with asyncio.timeout(self._close_timeout):  # a peer that stopped reading
                await channel.send_error(wire.ErrorCode.NOT_PERMITTED, reason)
        await self._close(channel, CloseCode.UNAUTHORIZED, reason)

    # ------------------------------------------------------------------ helpers

    def _attach(self, session: MinerSession) -> None:
        old = self._sessions.get(session.hotkey)
        self._sessions[session.hotkey] = session
        if old is not None:
            log.info(
                "miner reconnected; closing its older connection",
                extra=log_fields(miner=session.hotkey),
            )
            old.gone("replaced by a newer connection")
            self._spawn(
                self._close(old.channel, CloseCode.REPLACED, "replaced by a newer connection"),
                "validator-close-replaced",
            )

    def _end(self, session: MinerSession, reason: str) -> None:
        """Detach ``session`` (if current: report the miner offline) and answer its waiters."""
        session.gone(reason)
        if self._sessions.get(session.hotkey) is session:
            del self._sessions[session.hotkey]
            self._events.post("offline", session)
            log.info("miner offline: %s", reason, extra=log_fields(miner=session.hotkey))

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _close(self, channel: Channel, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            await channel.close(code, reason)

    # ------------------------------------------------------------------ connections

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self._stopping:
            return web.Response(status=503, text="validator shutting down\n")
        if self._open >= self.policy.max_connections:
            log.warning(
                "miner connection refused: at the connection limit",
                extra=log_fields(peer=request.remote, limit=self.policy.max_connections),
            )
            return web.Response(
                status=503,
                text=f"validator at its limit of {self.policy.max_connections} connections; "
                "retry later\n",
            )
        self._open += 1
        try:
            return await self._serve(request)
        finally:
            self._open -= 1

    def _admission(self, request: web.Request) -> tuple[PeerIdentity, int] | web.Response:
        """The caller's proven identity and uid, or the HTTP refusal (before any upgrade)."""
        try:
            caller = self._verifier.verify(request.headers, method="GET", path=request.raw_path)
        except BtAuthError as exc:
            log.info(
                "miner refused: %s",
                exc.reason,
                extra=log_fields(peer=request.remote, status=exc.status),
            )
            return web.Response(status=exc.status, text=exc.reason + "\n")
        try:
            identity = PeerIdentity.from_ss58(caller)
        except ValueError:
            return web.Response(status=401, text="btauth/1 hotkey is not an sr25519 address\n")
        hotkey = identity.display
        snapshot = self._snapshot()
        if snapshot is None:
            return web.Response(
                status=503, text="validator has no subnet snapshot yet; retry later\n"
            )
        neuron = snapshot.by_hotkey(hotkey)
        if neuron is None:
            log.info(
                "miner refused: not registered",
                extra=log_fields(miner=hotkey, peer=request.remote, netuid=snapshot.netuid),
            )
            return web.Response(status=403, text=f"not registered on netuid {snapshot.netuid}\n")
        return identity, neuron.uid

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        deadline = asyncio.get_running_loop().time() + self.policy.handshake_timeout_s
        admitted = self._admission(request)
        if isinstance(admitted, web.Response):
            return admitted
        identity, uid = admitted
        hotkey = identity.display
        try:
            channel = await accept(
                request,
                signer=self._signer,
                authorize=lambda peer: peer == identity,
                prologue=PROLOGUE,
                link=LINK,
                config=self._session_config,
                handshake_timeout=max(0.001, deadline - asyncio.get_running_loop().time()),
                peer_kind=IdentityKind.SR25519,
                heartbeat=self.policy.heartbeat_s,
                close_timeout=self._close_timeout,
            )
        except AcceptFailed as exc:
            log.info(
                "miner handshake failed: %s",
                exc.reason,
                extra=log_fields(miner=hotkey, peer=request.remote, close_code=exc.code),
            )
            return exc.response
        session: MinerSession | None = None
        try:
            hello = await self._hello(channel, hotkey, deadline)
            if hello is None:
                return channel.response
            session = MinerSession(
                channel,
                hotkey=hotkey,
                uid=uid,
                agent_version=hello.agent_version,
                remote=request.remote,
                clock=self._clock,
            )
            self._attach(session)
            log.info(
                "miner online",
                extra=log_fields(
                    miner=hotkey, uid=uid, peer=request.remote, version=hello.agent_version
                ),
            )
            await self._receive(session)
        except ChannelClosed as exc:
            log.log(
                logging.INFO if exc.by_peer else logging.WARNING,
                "miner connection closed: %s",
                exc.reason,
                extra=log_fields(miner=hotkey, close_code=exc.code, by_peer=exc.by_peer),
            )
        except Exception:
            log.exception("miner connection failed", extra=log_fields(miner=hotkey))
            with contextlib.suppress(ChannelClosed, wire.WireError):
                await channel.send_error(wire.ErrorCode.INTERNAL, "internal error")
        finally:
            if session is not None:
                self._end(session, "connection closed")
            await channel.close()
        return channel.response

    async def _hello(
        self, channel: Channel, hotkey: str, deadline: float
    ) -> wire.MinerHello | None:
        """The MinerHello, or None after refusing the connection (Error + close)."""
        try:
            async with asyncio.timeout_at(deadline):
                frame = await channel.recv()
        except TimeoutError:
            await self._refuse(
                channel,
                hotkey,
                wire.ErrorCode.UNEXPECTED_MESSAGE,
                "no MinerHello in time",
                CloseCode.HANDSHAKE_FAILED,
            )
            return None
        hello = frame.msg
        if not isinstance(hello, wire.MinerHello):
            await self._refuse(
                channel,
                hotkey,
                wire.ErrorCode.UNEXPECTED_MESSAGE,
                f"expected MinerHello first, got {type(hello).__name__}",
                CloseCode.PROTOCOL_ERROR,
            )
            return None
        try:
            claimed: PeerIdentity | None = PeerIdentity.from_ss58(hello.miner_hotkey)
        except ValueError:
            claimed = None
        if claimed != channel.peer:
            await self._refuse(
                channel,
                hotkey,
                wire.ErrorCode.KEY_MISMATCH,
                "MinerHello names another hotkey than this session's",
                CloseCode.UNAUTHORIZED,
            )
            return None
        if self._stopping:
            await self._refuse(
                channel,
                hotkey,
                wire.ErrorCode.SHUTTING_DOWN,
                "validator shutting down",
                CloseCode.GOING_AWAY,
            )
            return None
        snapshot = self._snapshot()  # a refresh may have removed it since the upgrade
        if snapshot is not None and snapshot.by_hotkey(hotkey) is None:
            await self._refuse(
                channel,
                hotkey,
                wire.ErrorCode.NOT_PERMITTED,
                f"not registered on netuid {snapshot.netuid}",
                CloseCode.UNAUTHORIZED,
            )
            return None
        return hello

    async def _refuse(
        self,
        channel: Channel,
        hotkey: str,
        code: wire.ErrorCode,
        message: str,
        close: CloseCode,
    ) -> None:
        log.warning("miner refused: %s", message, extra=log_fields(miner=hotkey, error=code.name))
        with contextlib.suppress(ChannelClosed, wire.WireError):
            await channel.send_error(code, message)
        await channel.close(close, message)

    async def _receive(self, session: MinerSession) -> None:
        channel = session.channel
        limiter = RateLimiter(
            self.policy.messages_per_second, self.policy.message_burst, clock=self._clock
        )
        while True:
            frame = await channel.recv()
            at = self._clock()  # before anything else: this is the answer's arrival time
            try:
                answered = session.handle(frame, at)
            except Exception:  # a bug here must not cost the miner its connection
                log.exception(
                    "handling a %s failed",
                    type(frame.msg).__name__,
                    extra=log_fields(miner=session.hotkey),
                )
                answered = False
            if (
                isinstance(frame.msg, wire.WorkerRoster)
                and self._sessions.get(session.hotkey) is session
            ):
                self._events.post("roster", session)
            if isinstance(frame.msg, wire.GatewayTokenRequest):
                await self._token_request(session, frame.id, frame.msg)
            if not answered and not limiter.allow():
                await self._refuse(
                    channel,
                    session.hotkey,
                    wire.ErrorCode.RATE_LIMITED,
                    "message rate limit exceeded",
                    CloseCode.RATE_LIMITED,
                )
                return

    # ------------------------------------------------------------------ enrollment tokens

    async def _token_request(
        self, session: MinerSession, frame_id: int, request: wire.GatewayTokenRequest
    ) -> None:
        """Refuse at once, or start the task that asks the gateway and answers."""
        tokens = self.tokens
        if frame_id == 0:
            code, message = wire.ErrorCode.UNEXPECTED_MESSAGE, "a token request needs a frame id"
        elif tokens is None or not tokens.configured:
            code = wire.ErrorCode.NO_GATEWAY
            message = f"validator {self._signer.identity.display} has no gateway configured"
        elif len(session.token_tasks) >= TOKEN_REQUESTS_IN_FLIGHT:
            code = wire.ErrorCode.RATE_LIMITED
            message = (
                f"{TOKEN_REQUESTS_IN_FLIGHT} token requests of this miner are already in flight"
            )
        elif not session.token_limiter.allow():
            code = wire.ErrorCode.RATE_LIMITED
            message = (
                f"at most {TOKEN_PER_MINUTE:g} token requests per minute (burst {TOKEN_BURST})"
            )
        else:
            task = asyncio.create_task(
                self._issue_token(tokens, session, frame_id, request.worker_id),
                name=f"validator-token-{session.hotkey[:8]}",
            )
            session.token_tasks.add(task)
            task.add_done_callback(session.token_tasks.discard)
            return
        log.info(
            "token request refused: %s",
            message,
            extra=log_fields(miner=session.hotkey, worker_id=request.worker_id),
        )
        await self._answer_token(
            session, wire.CodedError(code, message).to_error(frame_id), frame_id
        )

    async def _issue_token(
        self, tokens: TokenIssuer, session: MinerSession, frame_id: int, worker_id: str
    ) -> None:
        answer: wire.Message
        try:
            # The session's proven hotkey, never the miner's say-so: records will carry it.
            grant = await tokens.issue(worker_id, session.hotkey)
        except wire.CodedError as exc:
            answer = exc.to_error(frame_id)
        except Exception:
            log.exception(
                "asking a gateway for a token failed",
                extra=log_fields(miner=session.hotkey, worker_id=worker_id),
            )
            answer = wire.Error(
                code=wire.ErrorCode.INTERNAL, message="validator error", ref=frame_id
            )
        else:
            answer = wire.GatewayTokenGrant(worker_id=worker_id, grant=grant)
        await self._answer_token(session, answer, frame_id)

    async def _answer_token(
        self, session: MinerSession, answer: wire.Message, frame_id: int
    ) -> None:
        if session.closed:
            return
        try:
            await session.channel.send(answer, id=frame_id)
        except ChannelClosed:
            log.debug(
                "token answer lost: the miner went away", extra=log_fields(miner=session.hotkey)
            )
        except wire.WireError:  # a grant that does not fit the wire: the issuer's bug
            log.exception("token answer not sendable", extra=log_fields(miner=session.hotkey))
            with contextlib.suppress(ChannelClosed, wire.WireError):
                await session.channel.send_error(
                    wire.ErrorCode.INTERNAL, "validator error", ref=frame_id
                )
