"""The miner's links to its validators (docs/miner-validator.md, miner side).

:class:`ValidatorUplinks` decides whom to dial; each :class:`ValidatorLink` keeps one connection.

Whom to dial
------------
Every ``snapshot_refresh_s`` the subnet snapshot is read through the :class:`ChainPort`. Every
neuron with a validator permit, at least ``min_stake_rao`` of stake and a published, routable
endpoint gets one link. At the next refresh after a validator loses any of these, its link is
closed with 4002 (UNAUTHORIZED) and the reason; a link whose validator moved to another endpoint
is closed and dialed again at the new address. A chain outage changes nothing: the last snapshot
and every link stay, the snapshot is retried with a jittered backoff, and the outage is logged
once when it starts and once when it ends.

One link
--------
1. ``GET ws://<ip>:<port>/v1/miner`` signed with btauth/1 (receiver bound to the validator's
   hotkey, a fresh nonce on every attempt), then the secure session (prologue
   ``byteleap/miner-validator/v1``). The validator must prove the hotkey the snapshot names; any
   other key (a man in the middle, or an endpoint now serving someone else) is refused with 4002
   before anything is sent.
2. ``MinerHello`` then a full ``WorkerRoster``; the roster again after every change
   (:meth:`ValidatorUplinks.roster_changed`, at most once per ``roster_debounce_s``) and at least
   every ``roster_interval_s``.
3. Requests are served concurrently, each in its own task, so the receive loop never waits on a
   worker. A ``ChallengeBatch`` is dispatched to every worker at the same instant and each
   challenge is answered (``DeviceCommit`` or ``DeviceFailure``) as soon as its worker answers.
4. When the connection ends: one log line with the reason, a full-jitter exponential backoff
   capped at ``reconnect_max_s`` (it starts again from ``reconnect_min_s`` after a session that
   lasted ``stable_after_s``), then 1 again; hello and roster re-synchronise the validator. An
   HTTP 401/403 refusal waits the long backoff (between half the cap and the cap): the validator
   will not change its mind in a second; its reason is logged (the short text it sends, kept by
   the middleware of :func:`client_session`). The session is renewed shortly before its maximum
   age, once no request of the validator is in flight.

Validation
----------
Every answer names the challenge it answers; nothing a validator sends reaches a worker
unchecked. A challenge for another miner's hotkey is refused (``CHALLENGE_INVALID``); one for a
worker this miner does not have gets ``DEVICE_UNKNOWN``, one for an offline worker
``WORKER_OFFLINE``; busy, leased and unknown devices are refused by the relay. Reveals and
releases are accepted only for challenges *this* validator dispatched through this miner
(``CHALLENGE_UNKNOWN`` otherwise), so one validator cannot read or free another's results. The
record of dispatched challenges is bounded: an entry is forgotten on release, on failure, after
the challenge's deadline plus ``challenge_memory_s``, and the oldest go first beyond
``MAX_REMEMBERED_CHALLENGES``.

Gateway enrollment
------------------
:meth:`ValidatorUplinks.gateway_token` serves the workers' ``GatewayEnrollRequest`` (registered
with the relay as its token source): it sends ``GatewayTokenRequest{worker_id}`` to the connected
validators one after the other, the most staked first, each with ``token_timeout_s`` and all of
them within ``token_total_s``, until one answers ``GatewayTokenGrant`` for that worker. When none
does, the refusal names what each validator said and carries the most telling code
(``GATEWAY_REFUSED``, ``GATEWAY_UNAVAILABLE``, ``RATE_LIMITED``, ``NO_GATEWAY``, in that order);
with no validator connected it is ``NO_VALIDATOR``. A request pending on a link that closes fails
at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import dataclasses
import enum
import http
import ipaddress
import logging
import random
import secrets
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Final

import aiohttp
import msgspec

from byteleap import __version__

from ..chain.port import ChainError, ChainPort, Endpoint, Neuron, SubnetSnapshot
from ..core import wire
from ..core.backoff import Backoff
from ..core.channel import (
    Channel,
    ChannelClosed,
    CloseCode,
    RateLimiter,
    closed_text,
    dial,
)
from ..core.identity import HotkeySigner, IdentityKind, PeerIdentity
from ..core.logs import log_fields
from ..core.session import SessionConfig
from .config import MinerConfig
from .registry import WorkerRegistry
from .relay import RelayError, WorkerConnections

__all__ = [
    "MAX_REMEMBERED_CHALLENGES",
    "RAO_PER_TAO",
    "VALIDATOR_PATH",
    "Backoff",
    "UplinkSettings",
    "ValidatorLink",
    "ValidatorState",
    "ValidatorStatus",
    "ValidatorUplinks",
    "client_session",
    "tao_to_rao",
    "worker_roster",
]

log = logging.getLogger(__name__)
_PEER = "validator"  # who closed on us, in log phrases

VALIDATOR_PATH: Final = "/v1/miner"
PROLOGUE: Final = wire.MINER_VALIDATOR_PROLOGUE
LINK: Final = wire.Link.MINER_VALIDATOR
RAO_PER_TAO: Final = 10**9
MAX_REMEMBERED_CHALLENGES: Final = 4 * wire.MAX_BATCH_DEVICES
"""Dispatched challenges remembered per validator (for reveals and releases), at most."""
_SHUTDOWN_REASON: Final = "miner shutting down"
_ROTATE_MARGIN_S: Final = 60.0
_REFUSED_STATUSES: Final = frozenset({401, 403})
_HTTP_REFUSAL_HINT: Final = {
    401: "the validator refused the btauth/1 signature (unsigned, bad or stale: "
    "check this host's clock)",
    403: "the validator refused this miner (hotkey not registered in its snapshot, request "
    "addressed to another hotkey, or replayed)",
}


_MAX_REFUSAL_TEXT: Final = 200
_refusal_text: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "byteleap_validator_refusal_text", default=None
)
"""The body of the last 401/403 answer to an upgrade, in the task that dialed."""


async def _capture_refusal_text(
    request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
) -> aiohttp.ClientResponse:
    """Keep the short text a validator sends with a refusal: aiohttp's ws_connect drops it."""
    response = await handler(request)
    if response.status in _REFUSED_STATUSES and request.url.path == VALIDATOR_PATH:
        try:
            body = await response.content.read(_MAX_REFUSAL_TEXT)
        except (aiohttp.ClientError, OSError):
            body = b""
        text = body.decode("utf-8", "replace").strip()
        # Untrusted text bound for the logs: printable ASCII only.
        _refusal_text.set("".join(c if " " <= c <= "~" else "?" for c in text))
    return response


def client_session() -> aiohttp.ClientSession:
    """The HTTP client for :class:`ValidatorUplinks`: no limit on connections (one per
    validator, held for hours), and the reason a validator gives for a 401/403 kept for the
    log (with another session only the status and a hint are logged)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), middlewares=(_capture_refusal_text,)
    )


def tao_to_rao(tao: float) -> int:
    """A stake in TAO as an integer number of rao (1 TAO = 10**9 rao)."""
    if not tao >= 0:
        raise ValueError(f"a stake must be a non-negative number of TAO, got {tao!r}")
    return round(tao * RAO_PER_TAO)


@dataclasses.dataclass(frozen=True, slots=True)
class UplinkSettings:
    """What the uplinks need from the configuration (tests build it directly, with tiny times)."""

    netuid: int
    min_stake_rao: int = 0
    snapshot_refresh_s: float = 60.0
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0
    stable_after_s: float = 30.0
    """A session that lasted this long resets the backoff: its validator is likely back soon."""
    roster_interval_s: float = 60.0
    roster_debounce_s: float = 1.0
    connect_timeout_s: float = 10.0
    """Bounds the TCP connection, the upgrade and the handshake together."""
    reveal_timeout_s: float = 30.0
    """How long a worker gets to answer a reveal (a RevealBatch carries no deadline)."""
    challenge_memory_s: float = 600.0
    """How long after its deadline a dispatched challenge is remembered for reveal and release."""
    token_timeout_s: float = 25.0
    """How long one validator gets to answer a gateway token request (it may ask two gateways)."""
    token_total_s: float = 45.0
    """How long a token request may take over all validators (a worker waits 60 s)."""
    ws_heartbeat_s: float = 30.0
    """WebSocket ping interval: a silently dead connection is noticed within 1.5 of it."""
    close_timeout_s: float = 5.0
    messages_per_second: float = 100.0
    message_burst: int = 500
    """Inbound limit per validator; a round is about one echo per worker plus three batches."""

    def __post_init__(self) -> None:
        if not 0 <= self.netuid < 65536:
            raise ValueError(f"netuid must be in [0, 65535], got {self.netuid}")
        if self.min_stake_rao < 0:
            raise ValueError("min_stake_rao must not be negative")
        for name in (
            "snapshot_refresh_s",
            "reconnect_min_s",
            "reconnect_max_s",
            "stable_after_s",
            "roster_interval_s",
            "roster_debounce_s",
            "connect_timeout_s",
            "reveal_timeout_s",
            "challenge_memory_s",
            "token_timeout_s",
            "token_total_s",
            "ws_heartbeat_s",
            "close_timeout_s",
            "messages_per_second",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must not be smaller than reconnect_min_s")
        if self.message_burst < 1:
            raise ValueError("message_burst must be at least 1")

    @classmethod
    def from_config(cls, config: MinerConfig) -> UplinkSettings:
        """Settings from the ``chain:`` and ``validators:`` sections of the miner config."""
        policy = config.validators
        return cls(
            netuid=config.chain.netuid,
            min_stake_rao=tao_to_rao(policy.min_stake_tao),
            snapshot_refresh_s=config.chain.snapshot_refresh_s,
            reconnect_min_s=policy.reconnect_min_s,
            reconnect_max_s=policy.reconnect_max_s,
            roster_interval_s=policy.roster_interval_s,
            connect_timeout_s=policy.connect_timeout_s,
            reveal_timeout_s=policy.reveal_timeout_s,
        )


class ValidatorState(enum.StrEnum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    """The session is up and the hello was sent."""
    WAITING = "waiting"
    """Disconnected or refused; waiting ``retry_in_s`` before the next attempt."""
    STOPPED = "stopped"


class ValidatorStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One validator link as the STATUS line and the control API show it."""

    hotkey: str
    uid: int
    url: str
    state: ValidatorState
    since: float
    """Wall-clock time (``time.time()``) the link entered ``state``."""
    sessions: int = 0
    """Sessions established so far."""
    failures: int = 0
    """Consecutive failed attempts (0 while connected)."""
    last_error: str | None = None
    """Why the last attempt failed or the last session ended."""
    retry_in_s: float | None = None


def worker_roster(
    registry: WorkerRegistry, connections: WorkerConnections
) -> list[wire.WorkerSummary]:
    """The roster the validators see: every enrolled worker, online when it has a live link,
    with its live inventory (else the last one stored) and the GPUs its last heartbeat says
    are leased (of those the inventory lists; none without a link)."""
    summaries: list[wire.WorkerSummary] = []
    for record in registry.workers():
        link = connections.get(record.worker_id)
        live = link is not None and not link.closed
        inventory = link.inventory if link is not None else record.inventory
        if inventory is None:  # enrolled but never registered: nothing to show
            continue
        leased = sorted(link.leased_devices) if link is not None else []
        summaries.append(
            wire.WorkerSummary(
                worker_id=record.worker_id, online=live, leased_devices=leased, inventory=inventory
            )
        )
    return summaries[: wire.MAX_WORKERS_PER_MINER]


def _routable(endpoint: Endpoint) -> bool:
    address = ipaddress.ip_address(endpoint.ip)
    return not (address.is_unspecified or address.is_multicast)


class _LinkDownError(Exception):
    """An attempt failed or a session ended; the message is the reason to log.

    ``refused``: the validator refused us (HTTP 401/403, or closed us as unauthorized): wait long.
    ``rotate``: a planned renewal, reconnect at once.
    """

    def __init__(self, reason: str, *, refused: bool = False, rotate: bool = False) -> None:
        super().__init__(reason)
        self.refused = refused
        self.rotate = rotate


class _Issued:
    """A challenge this validator dispatched through this miner: for reveals and releases."""

    __slots__ = ("device_uuid", "expires_at", "worker_id")

    def __init__(self, worker_id: str, device_uuid: str, expires_at: float) -> None:
        self.worker_id = worker_id
        self.device_uuid = device_uuid
        self.expires_at = expires_at


@dataclasses.dataclass(frozen=True, slots=True)
class _Context:
    """What every link shares (built by :class:`ValidatorUplinks`)."""

    signer: HotkeySigner
    relay: WorkerConnections
    roster: Callable[[], tuple[wire.WorkerRoster, frozenset[str]]]
    http: aiohttp.ClientSession
    settings: UplinkSettings
    agent_version: str
    session_config: SessionConfig | None
    rng: random.Random | None
    notify: Callable[[], None]
    """Told when a link's state changes (for the STATUS line)."""


class ValidatorLink:
    """One validator: the connection loop and the requests it serves.

    Built and run by :class:`ValidatorUplinks`; :meth:`start` runs the loop in a task,
    :meth:`stop` closes the connection with a code and a reason and ends it.
    """

    def __init__(self, neuron: Neuron, endpoint: Endpoint, context: _Context) -> None:
        self.hotkey = neuron.hotkey
        self.uid = neuron.uid
        self.endpoint = endpoint
        self.url = f"ws://{endpoint.host}:{endpoint.port}{VALIDATOR_PATH}"
        self._expected = PeerIdentity.from_ss58(neuron.hotkey)  # raises ValueError
        self._ctx = context
        self._settings = context.settings
        self._backoff = Backoff(
            self._settings.reconnect_min_s, self._settings.reconnect_max_s, rng=context.rng
        )
        self._status = ValidatorStatus(
            hotkey=self.hotkey,
            uid=self.uid,
            url=self.url,
            state=ValidatorState.CONNECTING,
            since=time.time(),
        )
        self._task: asyncio.Task[None] | None = None
        self._channel: Channel | None = None
        self._stopping = False
        self._stop_close: tuple[int, str] = (CloseCode.GOING_AWAY, _SHUTDOWN_REASON)
        self._roster_wanted = asyncio.Event()
        self._requests: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        """Set while no request of the validator is in flight."""
        self._idle.set()
        self._issued: collections.OrderedDict[bytes, _Issued] = collections.OrderedDict()
        self._auth_refusal: str | None = None
        self._peer_error: wire.Error | None = None
        self._last_logged_reason: str | None = None
        self._token_waits: dict[int, asyncio.Future[wire.GatewayTokenGrant]] = {}

    def __repr__(self) -> str:
        return f"ValidatorLink({self.hotkey}, {self.url}, {self._status.state.value})"

    # -- public ------------------------------------------------------------------------------
    @property
    def status(self) -> ValidatorStatus:
        return self._status

    @property
    def connected(self) -> bool:
        return self._status.state is ValidatorState.CONNECTED

    @property
    def remembered_challenges(self) -> int:
        """Dispatched challenges still remembered for reveal and release."""
        return len(self._issued)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"validator-link-{self.uid}")

    def update(self, neuron: Neuron) -> None:
        """The snapshot changed something that does not need a new connection (the uid)."""
        if neuron.uid != self.uid:
            self.uid = neuron.uid
            self._status = msgspec.structs.replace(self._status, uid=neuron.uid)

    def roster_changed(self) -> None:
        self._roster_wanted.set()

    async def gateway_token(
        self,
        worker_id: str,
        timeout_s: float,
    ) -> wire.GatewayGrant:
        """Ask this validator for a gateway enrollment token bound to ``worker_id``.

        Raises :class:`RelayError`: the validator's own refusal (its code), ``NO_VALIDATOR``
        when the link is down or goes down, ``GATEWAY_UNAVAILABLE`` when no answer comes in
        ``timeout_s``.
        """
        channel = self._channel
        if channel is None or not self.connected:
            raise RelayError(
                wire.ErrorCode.NO_VALIDATOR,
                f"validator {self.hotkey} is not connected",
                worker_id=worker_id,
            )
        frame_id = self._new_token_id()
        future: asyncio.Future[wire.GatewayTokenGrant] = asyncio.get_running_loop().create_future()
        self._token_waits[frame_id] = future
        try:
            async with asyncio.timeout(timeout_s):
                await channel.send(wire.GatewayTokenRequest(worker_id=worker_id), id=frame_id)
                answer = await future
        except TimeoutError:
            raise RelayError(
                wire.ErrorCode.GATEWAY_UNAVAILABLE,
                f"validator {self.hotkey} did not answer within {timeout_s:g} s",
                worker_id=worker_id,
            ) from None
        except ChannelClosed:
            raise RelayError(
                wire.ErrorCode.NO_VALIDATOR,
                f"the link to validator {self.hotkey} closed",
                worker_id=worker_id,
            ) from None
        finally:
            self._token_waits.pop(frame_id, None)
            if not future.done():
                future.cancel()
        if answer.worker_id != worker_id:
            raise RelayError(
                wire.ErrorCode.UNEXPECTED_MESSAGE,
                f"validator {self.hotkey} answered with a token for worker {answer.worker_id}",
                worker_id=worker_id,
            )
        return answer.grant

    def _new_token_id(self) -> int:
        while True:
            frame_id = secrets.randbits(63)
            if frame_id and frame_id not in self._token_waits:
                return frame_id

    def _token_answer(self, frame: wire.Frame) -> bool:
        """Resolve the token request ``frame`` answers; False if it answers none."""
        msg = frame.msg
        keys = [frame.id]
        if isinstance(msg, wire.Error):
            keys.append(msg.ref)
        for key in keys:
            future = self._token_waits.get(key) if key else None
            if future is None or future.done():
                continue
            if isinstance(msg, wire.GatewayTokenGrant):
                future.set_result(msg)
            elif isinstance(msg, wire.Error):
                future.set_exception(
                    RelayError(
                        msg.code,
                        f"validator {self.hotkey}: {msg.message or 'refused'}",
                    )
                )
            else:
                return False
            return True
        return False

    def _fail_token_waits(self, reason: str) -> None:
        waits, self._token_waits = self._token_waits, {}
        for future in waits.values():
            if not future.done():
                future.set_exception(
                    RelayError(
                        wire.ErrorCode.NO_VALIDATOR,
                        f"the link to validator {self.hotkey} closed: {reason}",
                    )
                )

    async def stop(self, code: int = CloseCode.GOING_AWAY, reason: str = _SHUTDOWN_REASON) -> None:
        """Close the connection with ``code`` and ``reason``, end the loop and every request."""
        self._stopping = True
        self._stop_close = (code, reason)
        channel = self._channel
        if channel is not None:
            await channel.close(code, reason)
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        requests = list(self._requests)
        for request in requests:
            request.cancel()
        if requests:
            await asyncio.gather(*requests, return_exceptions=True)
        self._set_status(ValidatorState.STOPPED, retry_in_s=None)

    # -- the connection loop ------------------------------------------------------------------
    async def _run(self) -> None:
        while not self._stopping:
            await self._attempt()

    async def _attempt(self) -> None:
        self._set_status(ValidatorState.CONNECTING, retry_in_s=None)
        established_at: float | None = None
        try:
            channel = await self._connect()
            self._channel = channel
            try:
                established_at = time.monotonic()
                await self._session(channel)
            finally:
                self._channel = None
                self._fail_token_waits("session ended")
                if self._stopping:
                    await channel.close(*self._stop_close)
                else:
                    await channel.close(CloseCode.NORMAL, "reconnecting")
        except _LinkDownError as exc:
            down = exc
        except Exception as exc:  # a bug must not end the link: log it, back off, retry
            log.exception("validator link: unexpected failure", extra=self._fields())
            down = _LinkDownError(f"internal error: {exc!r}")
        else:  # pragma: no cover - _session only ends by raising
            down = _LinkDownError("session ended")
        if self._stopping:
            return
        lasted = None if established_at is None else time.monotonic() - established_at
        if down.rotate:
            self._backoff.reset()
            delay = 0.0
        elif down.refused:
            delay = self._backoff.long_delay()
        else:
            if lasted is not None and lasted >= self._settings.stable_after_s:
                self._backoff.reset()
            delay = self._backoff.next_delay()
        failures = self._status.failures + 1 if lasted is None else 0
        self._set_status(
            ValidatorState.WAITING,
            last_error=str(down),
            retry_in_s=round(delay, 3),
            failures=failures,
        )
        self._log_down(str(down), lasted, delay, rotate=down.rotate)
        await asyncio.sleep(delay)

    def _log_down(self, reason: str, lasted: float | None, delay: float, *, rotate: bool) -> None:
        fields = self._fields(retry_in_s=round(delay, 2))
        if rotate:
            log.info("validator link: %s", reason, extra=fields)
        elif lasted is not None:
            log.warning(
                "validator link: disconnected after %.1fs: %s; reconnecting in %.1fs",
                lasted,
                reason,
                delay,
                extra=fields,
            )
        elif reason != self._last_logged_reason:
            log.warning(
                "validator link: cannot connect: %s; retrying in %.1fs",
                reason,
                delay,
                extra=fields,
            )
        else:  # the same failure again: once at warning is enough for an operator
            log.debug("validator link: still failing: %s", reason, extra=fields)
        self._last_logged_reason = None if lasted is not None else reason

    def _authorize(self, peer: PeerIdentity) -> bool:
        if peer == self._expected:
            return True
        self._auth_refusal = (
            f"refusing the validator at {self.endpoint}: it proved hotkey {peer.display}, the "
            f"chain says {self.hotkey} serves there (man in the middle, or a stale endpoint)"
        )
        return False

    async def _connect(self) -> Channel:
        self._auth_refusal = None
        self._peer_error = None
        settings = self._settings
        # Signed for this attempt only: a fresh nonce each time, bound to this validator.
        headers = self._ctx.signer.btauth_headers(
            method="GET", path=VALIDATOR_PATH, receiver_ss58=self.hotkey
        )
        _refusal_text.set(None)
        try:
            return await dial(
                self._ctx.http,
                self.url,
                signer=self._ctx.signer,
                authorize=self._authorize,
                prologue=PROLOGUE,
                link=LINK,
                config=self._ctx.session_config,
                handshake_timeout=settings.connect_timeout_s,
                peer_kind=IdentityKind.SR25519,
                rate_limit=RateLimiter(settings.messages_per_second, settings.message_burst),
                heartbeat=settings.ws_heartbeat_s,
                close_timeout=settings.close_timeout_s,
                headers=headers,
            )
        except ChannelClosed as exc:
            if self._auth_refusal is not None:
                raise _LinkDownError(self._auth_refusal) from None
            if exc.by_peer:
                raise _LinkDownError(
                    f"the validator closed the handshake: {closed_text(exc, None, _PEER)}",
                    refused=exc.code == CloseCode.UNAUTHORIZED,
                ) from None
            raise _LinkDownError(f"handshake failed: {exc.reason}") from None
        except aiohttp.WSServerHandshakeError as exc:
            status = exc.status
            phrase = _status_phrase(status)
            if status in _REFUSED_STATUSES:
                said = _refusal_text.get()
                reason = f'validator said "{said}"' if said else _HTTP_REFUSAL_HINT[status]
                raise _LinkDownError(
                    f"refused with HTTP {status} {phrase}: {reason}", refused=True
                ) from None
            raise _LinkDownError(
                f"WebSocket upgrade failed: HTTP {status} {phrase} ({exc.message})"
            ) from None
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, ConnectionRefusedError):
                raise _LinkDownError("connection refused") from None
            detail = exc.os_error.strerror or str(exc.os_error) or str(exc)
            raise _LinkDownError(f"cannot connect: {detail}") from None
        except TimeoutError:
            raise _LinkDownError(
                f"timed out after {settings.connect_timeout_s:g}s connecting"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise _LinkDownError(f"connection failed: {exc or type(exc).__name__}") from None

    async def _session(self, channel: Channel) -> None:
        """Hello, roster, then serve until the connection ends (always raises _LinkDownError)."""
        roster, _ids = self._ctx.roster()
        self._roster_wanted.clear()
        try:
            await channel.send(
                wire.MinerHello(
                    miner_hotkey=self._ctx.signer.ss58_address,
                    agent_version=self._ctx.agent_version,
                )
            )
            await channel.send(roster)
        except ChannelClosed as exc:
            raise _LinkDownError(
                f"closed during the hello: {closed_text(exc, None, _PEER)}"
            ) from None
        self._set_status(
            ValidatorState.CONNECTED,
            sessions=self._status.sessions + 1,
            failures=0,
            last_error=None,
            retry_in_s=None,
        )
        self._last_logged_reason = None
        log.info(
            "connected to validator %s (uid %d)",
            self.hotkey,
            self.uid,
            extra=self._fields(workers=len(roster.workers)),
        )
        helpers = [
            asyncio.create_task(self._roster_loop(channel), name="validator-roster"),
            asyncio.create_task(self._rotate(channel), name="validator-rotate"),
        ]
        receive = asyncio.create_task(self._receive(channel), name="validator-receive")
        try:
            done, _ = await asyncio.wait([receive, *helpers], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises the reason the session ended
            raise _LinkDownError("session ended")  # pragma: no cover - the tasks only raise
        finally:
            for task in (receive, *helpers):
                task.cancel()
            await asyncio.gather(receive, *helpers, return_exceptions=True)

    async def _receive(self, channel: Channel) -> None:
        try:
            while True:
                frame = await channel.recv()
                msg = frame.msg
                if isinstance(msg, wire.ChallengeBatch):
                    self._spawn(self._challenges(channel, msg), "validator-challenges")
                elif isinstance(msg, wire.RevealBatch):
                    self._spawn(self._reveals(channel, msg), "validator-reveals")
                elif isinstance(msg, wire.ReleaseBatch):
                    self._spawn(self._releases(msg), "validator-releases")
                elif isinstance(msg, wire.EchoRequest):
                    self._spawn(self._echo(channel, frame.id, msg), "validator-echo")
                elif isinstance(msg, wire.GatewayTokenGrant):
                    if not self._token_answer(frame):
                        log.debug(
                            "token grant for no pending request dropped", extra=self._fields()
                        )
                elif isinstance(msg, wire.Ping):
                    await channel.send(wire.Pong(nonce=msg.nonce), id=frame.id)
                elif isinstance(msg, wire.Error):
                    if self._token_answer(frame):
                        continue
                    self._peer_error = msg
                    log.warning(
                        "validator reported an error: %s: %s",
                        msg.code.name,
                        msg.message,
                        extra=self._fields(ref=msg.ref),
                    )
        except ChannelClosed as exc:
            refused = exc.by_peer and exc.code == CloseCode.UNAUTHORIZED
            text = closed_text(exc, self._peer_error, _PEER)
            if exc.by_peer and exc.code == CloseCode.REPLACED:
                text += " (another connection with this miner's hotkey took its place: is a "
                text += "second miner running with the same hotkey?)"
            raise _LinkDownError(text, refused=refused) from None

    async def _roster_loop(self, channel: Channel) -> None:
        """The roster after every change (debounced) and at least every roster_interval_s."""
        settings = self._settings
        last_sent = time.monotonic()
        while True:
            wait = settings.roster_interval_s - (time.monotonic() - last_sent)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, wait)):
                    await self._roster_wanted.wait()
            pause = settings.roster_debounce_s - (time.monotonic() - last_sent)
            if pause > 0:
                await asyncio.sleep(pause)
            self._roster_wanted.clear()
            try:
                roster, _ids = self._ctx.roster()
            except Exception:  # keep the validator's last roster; try again at the next tick
                log.exception("cannot build the worker roster", extra=self._fields())
                last_sent = time.monotonic()
                continue
            try:
                await channel.send(roster)
            except ChannelClosed:
                return  # the receive loop reports why
            last_sent = time.monotonic()

    async def _rotate(self, channel: Channel) -> None:
        """Renew the session before its maximum age, between the validator's requests."""
        margin = min(_ROTATE_MARGIN_S, (channel.expires_at - time.monotonic()) / 10)
        await asyncio.sleep(max(0.0, channel.expires_at - time.monotonic() - 2 * margin))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, channel.expires_at - time.monotonic() - margin)):
                await self._idle.wait()
        raise _LinkDownError("renewing the session before its maximum age", rotate=True)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._requests.add(task)
        self._idle.clear()
        task.add_done_callback(self._request_done)

    def _request_done(self, task: asyncio.Task[None]) -> None:
        self._requests.discard(task)
        if not self._requests:
            self._idle.set()
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "validator request failed",
                exc_info=task.exception(),
                extra=self._fields(),
            )

    # -- requests ----------------------------------------------------------------------------
    async def _answer(self, channel: Channel, msg: wire.Message, *, id: int = 0) -> None:
        """Send an answer; a closed connection loses it (the validator times the device out)."""
        try:
            await channel.send(msg, id=id)
        except ChannelClosed:
            log.debug(
                "answer %s lost: the connection closed", type(msg).__name__, extra=self._fields()
            )

    async def _challenges(self, channel: Channel, batch: wire.ChallengeBatch) -> None:
        try:
            _roster, known = self._ctx.roster()
        except Exception:  # the batch is still answered: live workers are known anyway
            log.exception("cannot build the worker roster", extra=self._fields())
            known = frozenset(self._ctx.relay)
        self._forget_expired()
        await asyncio.gather(*(self._challenge(channel, dc, known) for dc in batch.challenges))

    async def _challenge(
        self, channel: Channel, dc: wire.DeviceChallenge, known: frozenset[str]
    ) -> None:
        own = self._ctx.signer.ss58_address
        relay = self._ctx.relay
        failure: tuple[wire.ErrorCode, str] | None = None
        if dc.miner_hotkey != own:
            failure = (
                wire.ErrorCode.CHALLENGE_INVALID,
                f"challenge for miner {dc.miner_hotkey}, this miner is {own}",
            )
        elif dc.worker_id not in known and dc.worker_id not in relay:
            failure = (wire.ErrorCode.DEVICE_UNKNOWN, f"this miner has no worker {dc.worker_id}")
        elif dc.challenge_id in self._issued:
            failure = (wire.ErrorCode.CHALLENGE_INVALID, "challenge id already dispatched")
        if failure is not None:
            await self._answer(channel, _failure(dc, *failure))
            return
        self._remember(dc)
        try:
            commit = await relay.challenge(dc.worker_id, dc.request())
        except RelayError as exc:
            self._issued.pop(dc.challenge_id, None)
            await self._answer(channel, _failure(dc, exc.code, exc.message))
            return
        except Exception as exc:
            self._issued.pop(dc.challenge_id, None)
            log.exception("relaying a challenge failed", extra=self._fields())
            await self._answer(
                channel, _failure(dc, wire.ErrorCode.INTERNAL, f"miner error: {exc!r}")
            )
            return
        await self._answer(
            channel,
            wire.DeviceCommit(
                challenge_id=dc.challenge_id,
                worker_id=dc.worker_id,
                device_uuid=dc.device_uuid,
                merkle_root=commit.merkle_root,
                elapsed_ms=commit.elapsed_ms,
            ),
        )

    async def _reveals(self, channel: Channel, batch: wire.RevealBatch) -> None:
        self._forget_expired()
        await asyncio.gather(*(self._reveal(channel, req) for req in batch.requests))

    async def _reveal(self, channel: Channel, req: wire.DeviceRevealRequest) -> None:
        issued = self._issued.get(req.challenge_id)
        failure: tuple[wire.ErrorCode, str] | None = None
        if issued is None:
            failure = (
                wire.ErrorCode.CHALLENGE_UNKNOWN,
                "no such challenge was dispatched by this validator (or it was released)",
            )
        elif (issued.worker_id, issued.device_uuid) != (req.worker_id, req.device_uuid):
            failure = (
                wire.ErrorCode.CHALLENGE_INVALID,
                f"challenge was dispatched to {issued.worker_id}/{issued.device_uuid}",
            )
        if failure is not None:
            await self._answer(channel, _failure(req, *failure))
            return
        try:
            reveal = await self._ctx.relay.reveal(
                req.worker_id, req.request(), timeout=self._settings.reveal_timeout_s
            )
        except RelayError as exc:
            await self._answer(channel, _failure(req, exc.code, exc.message))
            return
        except Exception as exc:
            log.exception("relaying a reveal failed", extra=self._fields())
            await self._answer(
                channel, _failure(req, wire.ErrorCode.INTERNAL, f"miner error: {exc!r}")
            )
            return
        answer = wire.DeviceReveal(
            challenge_id=req.challenge_id,
            worker_id=req.worker_id,
            device_uuid=req.device_uuid,
            rows=reveal.rows,
        )
        try:
            await self._answer(channel, answer)
        except wire.WireError as exc:  # too large for the link: say so instead of nothing
            await self._answer(channel, _failure(req, exc.code, exc.message))

    async def _releases(self, batch: wire.ReleaseBatch) -> None:
        relay = self._ctx.relay
        targets: list[tuple[str, bytes]] = []
        for challenge_id in batch.challenge_ids:
            issued = self._issued.pop(challenge_id, None)
            if issued is None:
                log.debug(
                    "release of a challenge this validator did not dispatch ignored",
                    extra=self._fields(challenge_id=challenge_id.hex()),
                )
                continue
            targets.append((issued.worker_id, challenge_id))
        if targets:
            await asyncio.gather(*(relay.release(w, c) for w, c in targets))

    async def _echo(self, channel: Channel, frame_id: int, request: wire.EchoRequest) -> None:
        try:
            await self._ctx.relay.echo(request.worker_id)
        except RelayError as exc:
            await self._answer(
                channel,
                wire.CodedError(
                    wire.ErrorCode.WORKER_OFFLINE, f"{exc.code.name}: {exc.message}", ref=frame_id
                ).to_error(),
                id=frame_id,
            )
            return
        await self._answer(
            channel, wire.EchoReply(nonce=request.nonce, worker_id=request.worker_id), id=frame_id
        )

    # -- bookkeeping -------------------------------------------------------------------------
    def _remember(self, dc: wire.DeviceChallenge) -> None:
        expires = time.monotonic() + dc.deadline_ms / 1000 + self._settings.challenge_memory_s
        self._issued[dc.challenge_id] = _Issued(dc.worker_id, dc.device_uuid, expires)
        while len(self._issued) > MAX_REMEMBERED_CHALLENGES:
            self._issued.popitem(last=False)

    def _forget_expired(self) -> None:
        now = time.monotonic()
        for challenge_id in [c for c, i in self._issued.items() if i.expires_at <= now]:
            del self._issued[challenge_id]

    def _set_status(self, state: ValidatorState, **changes: Any) -> None:
        changed = state is not self._status.state
        since = time.time() if changed else self._status.since
        self._status = msgspec.structs.replace(self._status, state=state, since=since, **changes)
        if changed:
            self._ctx.notify()

    def _fields(self, **extra: Any) -> dict[str, Any]:
        return log_fields(validator=self.hotkey, validator_uid=self.uid, url=self.url, **extra)


def _failure(
    item: wire.DeviceChallenge | wire.DeviceRevealRequest, code: wire.ErrorCode, message: str
) -> wire.DeviceFailure:
    failure = wire.CodedError(code, message).to_error()  # escaped and cut to the wire's limit
    return wire.DeviceFailure(
        challenge_id=item.challenge_id,
        worker_id=item.worker_id,
        device_uuid=item.device_uuid,
        code=failure.code,
        message=failure.message,
    )


def _status_phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


class ValidatorUplinks:
    """Every permitted validator's link, kept in step with the chain.

    ``roster`` returns this miner's workers (see :func:`worker_roster`); it is called on the
    event loop, at most once per ``roster_debounce_s`` for all links together.
    """

    def __init__(
        self,
        *,
        chain: ChainPort,
        signer: HotkeySigner,
        relay: WorkerConnections,
        roster: Callable[[], Sequence[wire.WorkerSummary]],
        http: aiohttp.ClientSession,
        settings: UplinkSettings,
        agent_version: str = __version__,
        session_config: SessionConfig | None = None,
        rng: random.Random | None = None,
        on_status: Callable[[], None] | None = None,
    ) -> None:
        """``on_status()`` is told when a link connects or drops and when the chain becomes
        unreachable or reachable again (the daemon refreshes its STATUS line)."""
        self.settings = settings
        self._on_status = on_status
        self._chain = chain
        self._signer = signer
        self._roster_source = roster
        self._context = _Context(
            signer=signer,
            relay=relay,
            roster=self._current_roster,
            http=http,
            settings=settings,
            agent_version=agent_version,
            session_config=session_config,
            rng=rng,
            notify=self._notify,
        )
        self._chain_backoff = Backoff(
            min(settings.reconnect_min_s, settings.snapshot_refresh_s),
            settings.snapshot_refresh_s,
            rng=rng,
        )
        self._links: dict[str, ValidatorLink] = {}
        self._snapshot: SubnetSnapshot | None = None
        self._outage_since: float | None = None
        self._registered: bool | None = None
        self._skipped: dict[str, str] = {}
        self._roster: tuple[wire.WorkerRoster, frozenset[str]] | None = None
        self._roster_at = 0.0
        self._retiring: set[ValidatorLink] = set()
        self._refresher: asyncio.Task[None] | None = None
        self._stopping = False
        relay.set_gateway_tokens(self.gateway_token)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start refreshing the snapshot (the first read happens at once, in the background)."""
        if self._refresher is not None:
            raise RuntimeError("ValidatorUplinks.start() was already called")
        self._refresher = asyncio.create_task(self._refresh_loop(), name="validator-refresh")

    async def stop(self, reason: str = _SHUTDOWN_REASON) -> None:
        """Stop refreshing and close every link with GOING_AWAY."""
        self._stopping = True
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
        # Links a refresh was retiring when it was cancelled are finished here too.
        links = [*self._links.values(), *self._retiring]
        self._links = {}
        if links:
            await asyncio.gather(*(link.stop(CloseCode.GOING_AWAY, reason) for link in links))

    # -- gateway enrollment --------------------------------------------------------------------
    async def gateway_token(self, worker_id: str) -> wire.GatewayGrant:
        """A gateway enrollment token for ``worker_id`` from the first connected validator that
        gives one (most staked first); :class:`RelayError` when none does."""
        links = [link for link in self._links.values() if link.connected]
        if not links:
            raise RelayError(
                wire.ErrorCode.NO_VALIDATOR,
                "no validator is connected to this miner; try again later",
                worker_id=worker_id,
            )
        links.sort(key=self._stake, reverse=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.token_total_s
        failures: list[RelayError] = []
        for link in links:
            remaining = deadline - loop.time()
            if remaining <= 0:
                failures.append(
                    RelayError(
                        wire.ErrorCode.GATEWAY_UNAVAILABLE,
                        f"validator {link.hotkey} not asked: "
                        f"{self.settings.token_total_s:g} s spent",
                    )
                )
                break
            try:
                grant = await link.gateway_token(
                    worker_id, min(self.settings.token_timeout_s, remaining)
                )
            except RelayError as exc:
                log.info(
                    "validator %s gave no gateway token: %s: %s",
                    link.hotkey,
                    exc.code.name,
                    exc.message,
                    extra=log_fields(validator=link.hotkey, worker_id=worker_id),
                )
                failures.append(exc)
                continue
            log.info(
                "gateway token for worker %s from validator %s",
                worker_id,
                link.hotkey,
                extra=log_fields(validator=link.hotkey, worker_id=worker_id),
            )
            return grant
        raise _combined_refusal(worker_id, failures)

    def _stake(self, link: ValidatorLink) -> int:
        neuron = self._snapshot.by_hotkey(link.hotkey) if self._snapshot is not None else None
        return neuron.stake_rao if neuron is not None else 0

    # -- status ------------------------------------------------------------------------------
    @property
    def snapshot(self) -> SubnetSnapshot | None:
        """The last snapshot read (None until the chain first answered)."""
        return self._snapshot

    @property
    def chain_reachable(self) -> bool:
        return self._outage_since is None

    @property
    def connected_count(self) -> int:
        return sum(1 for link in self._links.values() if link.connected)

    def links(self) -> list[ValidatorLink]:
        return list(self._links.values())

    def status(self) -> list[ValidatorStatus]:
        """Every link's status, by uid."""
        return sorted((link.status for link in self._links.values()), key=lambda s: s.uid)

    def status_line(self) -> str:
        """``N validators connected`` (of M permitted), and the chain when it is unreachable."""
        connected = self.connected_count
        noun = "validator" if connected == 1 else "validators"
        line = f"{connected}/{len(self._links)} {noun} connected"
        if not self.chain_reachable:
            line += ", chain unreachable"
        return line

    def _notify(self) -> None:
        if self._on_status is None:
            return
        try:
            self._on_status()
        except Exception:
            log.exception("status callback failed")

    # -- roster ------------------------------------------------------------------------------
    def roster_changed(self) -> None:
        """The workers changed: every connected validator gets the new roster (debounced)."""
        self._roster = None
        for link in self._links.values():
            link.roster_changed()

    def _current_roster(self) -> tuple[wire.WorkerRoster, frozenset[str]]:
        """The roster and its worker ids, built at most once per debounce for all links."""
        now = time.monotonic()
        if self._roster is None or now - self._roster_at >= self.settings.roster_debounce_s:
            workers = list(self._roster_source())[: wire.MAX_WORKERS_PER_MINER]
            roster = wire.WorkerRoster(workers=workers)
            self._roster = (roster, frozenset(w.worker_id for w in workers))
            self._roster_at = now
        return self._roster

    # -- the snapshot ------------------------------------------------------------------------
    async def _refresh_loop(self) -> None:
        while True:
            ok = await self.refresh()
            delay = self.settings.snapshot_refresh_s if ok else self._chain_backoff.next_delay()
            await asyncio.sleep(delay)

    async def refresh(self) -> bool:
        """Read the snapshot once and bring the links in line; False if the chain failed."""
        try:
            snapshot = await self._chain.subnet(self.settings.netuid)
        except ChainError as exc:
            self._chain_failed(str(exc))
            return False
        except Exception as exc:  # an adapter bug must not end the refreshes
            log.exception("reading the subnet snapshot failed")
            self._chain_failed(f"internal error: {exc!r}")
            return False
        if self._outage_since is not None:
            log.info(
                "chain reachable again after %.0fs; snapshot at block %d",
                time.monotonic() - self._outage_since,
                snapshot.block,
            )
            self._outage_since = None
            self._notify()
        self._chain_backoff.reset()
        if self._stopping:
            return True
        await self._apply(snapshot)
        return True

    def _chain_failed(self, reason: str) -> None:
        if self._outage_since is not None:
            log.debug("chain still unavailable: %s", reason)
            return
        self._outage_since = time.monotonic()
        self._notify()
        if self._snapshot is None:
            log.warning("cannot read the subnet from the chain: %s; retrying", reason)
        else:
            log.warning(
                "cannot read the subnet from the chain: %s; keeping the snapshot of block %d "
                "and %d validator links, retrying",
                reason,
                self._snapshot.block,
                len(self._links),
            )

    async def _apply(self, snapshot: SubnetSnapshot) -> None:
        self._snapshot = snapshot
        self._check_registration(snapshot)
        wanted = self._permitted(snapshot)
        retire: list[tuple[ValidatorLink, int, str]] = []
        for hotkey, link in list(self._links.items()):
            target = wanted.get(hotkey)
            if target is None:
                reason = _why_dropped(snapshot, hotkey, self.settings.min_stake_rao)
                log.info("closing the link to validator %s: %s", hotkey, reason)
                retire.append((link, CloseCode.UNAUTHORIZED, reason))
            elif target[1] != link.endpoint:
                log.info(
                    "validator %s moved from %s to %s; reconnecting",
                    hotkey,
                    link.endpoint,
                    target[1],
                )
                retire.append((link, CloseCode.NORMAL, f"validator moved to {target[1]}"))
            else:
                link.update(target[0])
        for link, _code, _reason in retire:
            del self._links[link.hotkey]
            self._retiring.add(link)
        try:
            await asyncio.gather(*(link.stop(code, reason) for link, code, reason in retire))
        finally:
            self._retiring.difference_update(link for link, _code, _reason in retire)
        added = False
        for hotkey, (neuron, endpoint) in wanted.items():
            if hotkey in self._links or self._stopping:
                continue
            try:
                link = ValidatorLink(neuron, endpoint, self._context)
            except ValueError as exc:
                self._skip(hotkey, f"its hotkey is unusable: {exc}")
                continue
            log.info(
                "dialing validator %s (uid %d) at %s",
                hotkey,
                neuron.uid,
                link.url,
            )
            self._links[hotkey] = link
            link.start()
            added = True
        if added or retire:
            self._notify()

    def _permitted(self, snapshot: SubnetSnapshot) -> dict[str, tuple[Neuron, Endpoint]]:
        """Validators to link to: permit, enough stake, a routable endpoint; not this miner."""
        own = self._signer.ss58_address
        wanted: dict[str, tuple[Neuron, Endpoint]] = {}
        for neuron in snapshot.validators(self.settings.min_stake_rao):
            if neuron.hotkey == own:
                continue
            endpoint = neuron.endpoint
            if endpoint is None:
                self._skip(neuron.hotkey, "it has published no endpoint")
                continue
            if not _routable(endpoint):
                self._skip(neuron.hotkey, f"its endpoint {endpoint} is not routable")
                continue
            self._skipped.pop(neuron.hotkey, None)
            wanted[neuron.hotkey] = (neuron, endpoint)
        return wanted

    def _skip(self, hotkey: str, reason: str) -> None:
        """Log once per reason why a permitted validator is not dialed."""
        if self._skipped.get(hotkey) != reason:
            self._skipped[hotkey] = reason
            log.info("not dialing validator %s: %s", hotkey, reason)

    def _check_registration(self, snapshot: SubnetSnapshot) -> None:
        registered = snapshot.by_hotkey(self._signer.ss58_address) is not None
        if registered == self._registered:
            return
        if not registered:
            log.error(
                "this miner's hotkey %s is not registered on netuid %d: validators will refuse "
                "it and it earns nothing until it is registered again",
                self._signer.ss58_address,
                self.settings.netuid,
            )
        elif self._registered is False:
            log.info("this miner's hotkey is registered on netuid %d again", self.settings.netuid)
        self._registered = registered


_TOKEN_CODE_RANK: Final = (
    wire.ErrorCode.GATEWAY_REFUSED,
    wire.ErrorCode.GATEWAY_UNAVAILABLE,
    wire.ErrorCode.RATE_LIMITED,
    wire.ErrorCode.NO_GATEWAY,
)


def _combined_refusal(worker_id: str, failures: Sequence[RelayError]) -> RelayError:
    """One refusal for every validator's: the most telling code, every message."""
    if len(failures) == 1:
        only = failures[0]
        return RelayError(only.code, only.message, worker_id=worker_id)
    codes = {failure.code for failure in failures}
    code = next((c for c in _TOKEN_CODE_RANK if c in codes), failures[0].code)
    said = "; ".join(f"{f.code.name}: {f.message}" for f in failures)
    return RelayError(code, f"no validator gave a gateway token ({said})", worker_id=worker_id)


def _why_dropped(snapshot: SubnetSnapshot, hotkey: str, min_stake_rao: int) -> str:
    neuron = snapshot.by_hotkey(hotkey)
    if neuron is None:
        return "it is no longer registered on the subnet"
    if not neuron.validator_permit:
        return "it lost its validator permit"
    if neuron.stake_rao < min_stake_rao:
        return (
            f"its stake {neuron.stake_rao / RAO_PER_TAO:g} TAO is below the minimum of "
            f"{min_stake_rao / RAO_PER_TAO:g} TAO"
        )
    if neuron.endpoint is None:
        return "it withdrew its endpoint"
    return f"its endpoint {neuron.endpoint} is not routable"
