"""The miner's WebSocket endpoint for workers (docs/worker-miner.md, miner side).

One aiohttp handler per connection runs the sequence of the protocol:

1. admission: a global cap on concurrent connections (``policy.max_connections``) refuses the
   excess with close 4006 before any cryptography;
2. the secure handshake (:func:`core.channel.accept`, Ed25519 peers, under
   ``policy.handshake_timeout_s``), with a per-connection inbound rate limit and the link's frame
   size limits;
3. ``EnrollProof`` (always first): a pinned key needs no proof; an unknown key must prove the
   enrollment secret (``HMAC-SHA256(secret, channel_binding)``), else ``AUTH_FAILED`` + 4002; a
   new key beyond ``policy.max_workers`` gets ``CAPACITY_REACHED`` + 4006;
4. ``Register``: the worker id must be the one derived from the session key (``KEY_MISMATCH`` +
   4002); only now is anything written (the key pinned, the worker marked online, its
   inventory stored) and ``RegisterAck`` sent. A newer connection of the same worker replaces the
   older one, which is closed with 4009;
5. steady state: heartbeats, inventory updates, answers to relayed requests
   (:mod:`byteleap.miner.relay`), and the worker's own ``GatewayEnrollRequest``: the miner asks
   its validators for a gateway enrollment token bound to the session's worker id (never one the
   worker names) and answers ``GatewayEnrollGrant`` or ``Error`` under the request's frame id.
   One such request runs at a time per connection, at most ``ENROLL_BURST`` at once and one per
   ``ENROLL_INTERVAL_S`` after that; more get ``RATE_LIMITED``.

Every refusal happens before any registry write (admission writes once, in one transaction); steps
3-4 share the handshake deadline. A sweeper task closes workers silent for longer than
``policy.heartbeat_timeout_s`` and marks them offline.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import sqlite3
import ssl
import time
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

from ..core import wire
from ..core.channel import (
    AcceptFailed,
    Channel,
    ChannelClosed,
    CloseCode,
    RateLimiter,
    accept,
    close_reason,
)
from ..core.credentials import enrollment_mac
from ..core.identity import IdentityKind, PeerIdentity, Signer, worker_id_of
from ..core.logs import log_fields
from ..core.session import SessionConfig
from .config import MinerConfig, WorkerListen
from .registry import RegistryError, WorkerRegistry
from .relay import RelayError, WorkerConnections, WorkerLink

__all__ = [
    "PROLOGUE",
    "MinerServer",
    "tls_context",
]

log = logging.getLogger(__name__)

PROLOGUE = wire.WORKER_MINER_PROLOGUE
LINK = wire.Link.WORKER_MINER
MAX_SWEEP_INTERVAL_S = 5.0
REFUSAL_CLOSE_TIMEOUT_S = 1.0
LAST_SEEN_WRITE_INTERVAL_S = 60.0
"""Heartbeats update the registry's ``last_seen`` at most this often per connection."""
ENROLL_BURST = 3
ENROLL_INTERVAL_S = 20.0
"""A worker asks for a gateway token when it has no usable certificate: rarely."""

_REFUSAL_CLOSE: dict[wire.ErrorCode, CloseCode] = {
    wire.ErrorCode.AUTH_FAILED: CloseCode.UNAUTHORIZED,
    wire.ErrorCode.KEY_MISMATCH: CloseCode.UNAUTHORIZED,
    wire.ErrorCode.NOT_ENROLLED: CloseCode.UNAUTHORIZED,
    wire.ErrorCode.CAPACITY_REACHED: CloseCode.CAPACITY_REACHED,
    wire.ErrorCode.UNEXPECTED_MESSAGE: CloseCode.PROTOCOL_ERROR,
    wire.ErrorCode.SHUTTING_DOWN: CloseCode.GOING_AWAY,
}


def tls_context(listen: WorkerListen) -> ssl.SSLContext | None:
    """The server TLS context when a certificate is configured (raises ValueError/OSError)."""
    if listen.tls_cert_file is None and listen.tls_key_file is None:
        return None
    if listen.tls_cert_file is None or listen.tls_key_file is None:
        raise ValueError("workers.tls_cert_file and workers.tls_key_file must be set together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(listen.tls_cert_file, listen.tls_key_file)
    except ssl.SSLError as exc:
        raise ValueError(f"workers TLS certificate/key unusable: {exc}") from exc
    return context


def _accept_any_worker(_: PeerIdentity) -> bool:
    # Any Ed25519 key may finish the handshake; admission happens on the enrollment proof.
    return True


class _Refused(wire.CodedError):
    """Refuse the connection: ``to_error()`` goes to the worker, then a close with ``close``
    (by default the one :data:`_REFUSAL_CLOSE` maps ``code`` to)."""

    def __init__(
        self, code: wire.ErrorCode, message: str, *, close: CloseCode | None = None
    ) -> None:
        super().__init__(code, message)
        self.close = (
            close if close is not None else _REFUSAL_CLOSE.get(code, CloseCode.PROTOCOL_ERROR)
        )

    @classmethod
    def of(cls, exc: wire.CodedError) -> _Refused:
        return cls(exc.code, exc.message)


class MinerServer:
    """The aiohttp application serving ``workers.path`` and its dead-worker sweeper."""

    def __init__(
        self,
        config: MinerConfig,
        *,
        signer: Signer,
        registry: WorkerRegistry,
        enrollment_secret: bytes,
        connections: WorkerConnections | None = None,
        session_config: SessionConfig | None = None,
        ssl_context: ssl.SSLContext | None = None,
        close_timeout_s: float = 5.0,
        sweep_interval_s: float | None = None,
        last_seen_interval_s: float = LAST_SEEN_WRITE_INTERVAL_S,
        on_change: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not enrollment_secret:
            raise ValueError("the enrollment secret is empty")
        self.config = config
        self.policy = config.policy
        self.registry = registry
        self.connections = connections if connections is not None else WorkerConnections()
        self._signer = signer
        self._secret = enrollment_secret
        self._session_config = session_config
        self._ssl = ssl_context
        self._close_timeout = close_timeout_s
        self._sweep_interval = sweep_interval_s or min(
            MAX_SWEEP_INTERVAL_S, self.policy.heartbeat_timeout_s / 4
        )
        self._last_seen_interval = last_seen_interval_s
        self._on_change = on_change
        self._clock = clock
        self._open = 0
        self._stopping = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self.app = web.Application()
        self.app.router.add_get(config.workers.path, self._handle)

    # ------------------------------------------------------------------ lifecycle

    async def start(self, host: str | None = None, port: int | None = None) -> None:
        """Bind and serve (``host``/``port`` override the config; port 0 picks a free one)."""
        self._runner = web.AppRunner(
            self.app, shutdown_timeout=self._close_timeout + 1.0, access_log=None
        )
        await self._runner.setup()
        site = web.TCPSite(
            self._runner,
            host if host is not None else self.config.workers.host,
            port if port is not None else self.config.workers.port,
            ssl_context=self._ssl,
        )
        try:
            await site.start()
        except BaseException:
            await self._runner.cleanup()
            self._runner = None
            raise
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="miner-worker-sweeper")
        log.info("listening for workers on %s", ", ".join(self.urls))

    async def stop(self, reason: str = "miner shutting down") -> None:
        """Close every worker connection (4008), fail pending requests, stop listening."""
        self._stopping = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        self.connections.fail_all(wire.ErrorCode.SHUTTING_DOWN, reason)
        closing = [
            self._close(link.channel, CloseCode.GOING_AWAY, reason)
            for link in self.connections.links()
        ]
        if closing:
            await asyncio.gather(*closing, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        try:  # the handlers marked their workers offline; this also covers a failed write
            self.registry.mark_all_offline()
        except sqlite3.Error:
            log.exception("could not mark the workers offline in the registry")

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Bound (host, port) pairs."""
        if self._runner is None:
            return []
        return [(str(a[0]), int(a[1])) for a in self._runner.addresses if isinstance(a, tuple)]

    @property
    def urls(self) -> list[str]:
        scheme = "wss" if self._ssl is not None else "ws"
        out = []
        for host, port in self.addresses:
            shown = f"[{host}]" if ":" in host else host
            out.append(f"{scheme}://{shown}:{port}{self.config.workers.path}")
        return out

    @property
    def connection_count(self) -> int:
        """Open WebSocket connections, registered or not."""
        return self._open

    async def disconnect(
        self, worker_id: str, reason: str = "worker removed by the operator"
    ) -> bool:
        """Close a worker's live connection (4002) and mark it offline; False if not connected."""
        link = self.connections.get(worker_id)
        if link is None:
            return False
        if self.connections.detach(link, reason):
            self._mark_offline(worker_id)
            self._changed()
        await self._close(link.channel, CloseCode.UNAUTHORIZED, reason)
        return True

    def status_line(self) -> str:
        """One human line for systemd's STATUS=."""
        online = len(self.connections)
        enrolled = self.registry.count()
        noun = "worker" if online == 1 else "workers"
        return f"{online} {noun} online, {enrolled}/{self.policy.max_workers} enrolled"

    def _changed(self) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change()
        except Exception:
            log.exception("status callback failed")

    def _mark_offline(self, worker_id: str) -> None:
        """A failed write is logged; the sweep's backstop retries it."""
        try:
            self.registry.mark_offline(worker_id)
        except sqlite3.Error:
            log.exception(
                "could not mark the worker offline in the registry",
                extra=log_fields(worker_id=worker_id),
            )

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _close(self, channel: Any, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            await channel.close(code, reason)

    # ------------------------------------------------------------------ dead workers

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval)
            try:
                self.sweep()
            except Exception:
                log.exception("worker sweep failed")

    def sweep(self) -> list[str]:
        """Close and mark offline workers that missed their heartbeats; returns their ids."""
        timeout = self.policy.heartbeat_timeout_s
        now = self._clock()
        dead = [link for link in self.connections.links() if now - link.last_heartbeat > timeout]
        gone: list[str] = []
        for link in dead:
            reason = f"no heartbeat for {timeout:g} s"
            if self.connections.detach(link, reason):
                self._mark_offline(link.worker_id)
                gone.append(link.worker_id)
                log.warning(
                    "worker missed its heartbeats; closing",
                    extra=log_fields(worker_id=link.worker_id, timeout_s=timeout),
                )
            self._spawn(self._close(link.channel, CloseCode.GOING_AWAY, reason), "miner-close-dead")
        # Backstop: a row online without a live connection, left by a mark_offline that failed
        # (in an earlier sweep or handler: one failed just now is retried on the next tick).
        for worker_id in self.registry.online_ids() - set(self.connections) - set(gone):
            self.registry.mark_offline(worker_id)
            gone.append(worker_id)
        if gone:
            self._changed()
        return gone

    # ------------------------------------------------------------------ connections

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self._stopping:
            return await self._refuse_early(request, "miner shutting down")
        if self._open >= self.policy.max_connections:
            log.warning(
                "connection refused: at the connection limit",
                extra=log_fields(peer=request.remote, limit=self.policy.max_connections),
            )
            return await self._refuse_early(
                request,
                f"miner at its limit of {self.policy.max_connections} connections; retry later",
            )
        self._open += 1
        try:
            return await self._serve(request)
        finally:
            self._open -= 1

    async def _refuse_early(self, request: web.Request, reason: str) -> web.StreamResponse:
        """Refuse before the handshake: upgrade, close 4006 with a reason, nothing else."""
        ws = web.WebSocketResponse(
            max_msg_size=1024, compress=False, timeout=REFUSAL_CLOSE_TIMEOUT_S
        )
        await ws.prepare(request)
        code = CloseCode.GOING_AWAY if self._stopping else CloseCode.CAPACITY_REACHED
        with contextlib.suppress(Exception):
            await ws.close(code=code, message=close_reason(reason).encode())
        return ws

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        try:
            channel = await accept(
                request,
                signer=self._signer,
                authorize=_accept_any_worker,
                prologue=PROLOGUE,
                link=LINK,
                config=self._session_config,
                handshake_timeout=self.policy.handshake_timeout_s,
                peer_kind=IdentityKind.ED25519,
                rate_limit=RateLimiter(self.policy.messages_per_second, self.policy.message_burst),
                close_timeout=self._close_timeout,
            )
        except AcceptFailed as exc:
            log.info(
                "worker handshake failed: %s",
                exc.reason,
                extra=log_fields(peer=request.remote, close_code=exc.code),
            )
            return exc.response
        worker_id = worker_id_of(channel.peer.public_key)
        link: WorkerLink | None = None
        try:
            link, register_id = await self._admit(channel, worker_id, request.remote)
            await channel.send(
                wire.RegisterAck(
                    worker_id=worker_id, heartbeat_interval_s=self.policy.heartbeat_interval_s
                ),
                id=register_id,
            )
            await self._steady(channel, link)
        except _Refused as refusal:
            log.warning(
                "worker refused: %s",
                refusal.message,
                extra=log_fields(worker_id=worker_id, peer=request.remote, error=refusal.code.name),
            )
            with contextlib.suppress(ChannelClosed, wire.WireError):
                await channel.send(refusal.to_error())
            await channel.close(refusal.close, refusal.message)
        except ChannelClosed as exc:
            level = logging.INFO if exc.by_peer else logging.WARNING
            log.log(
                level,
                "worker connection closed: %s",
                exc.reason,
                extra=log_fields(worker_id=worker_id, close_code=exc.code, by_peer=exc.by_peer),
            )
        except Exception:
            log.exception("worker connection failed", extra=log_fields(worker_id=worker_id))
            with contextlib.suppress(ChannelClosed, wire.WireError):
                await channel.send_error(wire.ErrorCode.INTERNAL, "internal error")
        finally:
            if link is not None and self.connections.detach(link):
                self._mark_offline(worker_id)
                log.info("worker offline", extra=log_fields(worker_id=worker_id))
                self._changed()
            await channel.close()
        return channel.response

    async def _admit(
        self, channel: Channel, worker_id: str, peer: str | None
    ) -> tuple[WorkerLink, int]:
        """EnrollProof then Register, under the handshake deadline; the only registry write
        happens at the end, after every check passed."""
        try:
            async with asyncio.timeout(self.policy.handshake_timeout_s):
                first = await channel.recv()
                known = self._check_enrollment(channel, first)
                second = await channel.recv()
        except TimeoutError:
            raise _Refused(
                wire.ErrorCode.NOT_ENROLLED,
                "enrollment not completed in time",
                close=CloseCode.HANDSHAKE_FAILED,
            ) from None
        register = second.msg
        if not isinstance(register, wire.Register):
            raise _Refused(
                wire.ErrorCode.UNEXPECTED_MESSAGE,
                f"expected Register, got {type(register).__name__}",
            )
        if register.worker_id != worker_id:
            raise _Refused(
                wire.ErrorCode.KEY_MISMATCH, "worker_id does not belong to this session's key"
            )
        if self._stopping:
            raise _Refused(wire.ErrorCode.SHUTTING_DOWN, "miner shutting down")
        # No await from here to attach(): the sweeper and other handlers see one consistent step.
        try:
            enrolled = self.registry.register(
                channel.peer.public_key,
                register.agent_version,
                register.inventory,
                enroll=not known,
            )
        except RegistryError as exc:
            raise _Refused.of(exc) from None
        if enrolled:
            log.info(
                "enrolled new worker",
                extra=log_fields(worker_id=worker_id, peer=peer, version=register.agent_version),
            )
        link = WorkerLink(worker_id, channel, register.inventory, clock=self._clock)
        old = self.connections.attach(link)
        if old is not None:
            log.info(
                "worker reconnected; closing its older connection",
                extra=log_fields(worker_id=worker_id),
            )
            self._spawn(
                self._close(old.channel, CloseCode.REPLACED, "replaced by a newer connection"),
                "miner-close-replaced",
            )
        log.info(
            "worker online",
            extra=log_fields(
                worker_id=worker_id,
                peer=peer,
                version=register.agent_version,
                gpus=len(register.inventory.gpus),
            ),
        )
        self._changed()
        return link, second.id

    def _check_enrollment(self, channel: Channel, frame: wire.Frame) -> bool:
        """True for a pinned key; False for a new key that proved the secret; else refuse."""
        proof = frame.msg
        if not isinstance(proof, wire.EnrollProof):
            raise _Refused(
                wire.ErrorCode.UNEXPECTED_MESSAGE,
                f"expected EnrollProof first, got {type(proof).__name__}",
            )
        if self.registry.check_known(channel.peer.public_key) is not None:
            return True  # pinned: a rotated secret must not lock out enrolled workers
        expected = enrollment_mac(self._secret, channel.channel_binding)
        if not hmac.compare_digest(expected, proof.mac):
            raise _Refused(
                wire.ErrorCode.AUTH_FAILED,
                "enrollment proof does not match this miner's enrollment secret",
            )
        try:
            self.registry.check_capacity()  # refused before Register; register() checks again
        except RegistryError as exc:
            raise _Refused.of(exc) from None
        return False

    async def _steady(self, channel: Channel, link: WorkerLink) -> None:
        worker_id = link.worker_id
        # Liveness is link.last_heartbeat, in memory. The registry's last_seen is informational
        # (shown by the control API), so it is written at most once per
        # LAST_SEEN_WRITE_INTERVAL_S rather than on every heartbeat: that keeps SQLite writes on
        # the event loop to a trickle at 100 workers, at the price of a last_seen up to that
        # much behind the truth (registration and inventory changes are always written).
        last_written = link.last_heartbeat  # register() wrote last_seen
        enroll_limiter = RateLimiter(1.0 / ENROLL_INTERVAL_S, ENROLL_BURST, clock=self._clock)
        enrolling: asyncio.Task[None] | None = None
        try:
            while True:
                frame = await channel.recv()
                if isinstance(frame.msg, wire.GatewayEnrollRequest):
                    busy = enrolling is not None and not enrolling.done()
                    refusal = self._enroll_refusal(frame.id, busy, enroll_limiter)
                    if refusal is not None:
                        log.info(
                            "gateway enrollment request refused: %s",
                            refusal.message,
                            extra=log_fields(worker_id=worker_id),
                        )
                        with contextlib.suppress(wire.WireError):
                            await channel.send(refusal.to_error(frame.id), id=frame.id)
                    else:
                        enrolling = asyncio.create_task(
                            self._relay_enrollment(channel, worker_id, frame.id, enroll_limiter),
                            name="miner-gateway-enroll",
                        )
                    continue
                last_written = self._steady_frame(link, frame, last_written)
        finally:
            if enrolling is not None:  # nobody is left to answer
                enrolling.cancel()
                await asyncio.gather(enrolling, return_exceptions=True)

    def _steady_frame(self, link: WorkerLink, frame: wire.Frame, last_written: float) -> float:
        """Handle one frame of a registered worker; returns when ``last_seen`` was written."""
        worker_id = link.worker_id
        msg = frame.msg
        if isinstance(msg, wire.Heartbeat):
            leased_before = link.leased_devices
            link.record_heartbeat(msg)
            if link.last_heartbeat - last_written >= self._last_seen_interval:
                self.registry.touch(worker_id)
                last_written = link.last_heartbeat
            self._leased_changed(link, leased_before)
        elif isinstance(msg, wire.InventoryUpdate):
            leased_before = link.leased_devices
            link.inventory = msg.inventory
            self.registry.update_inventory(worker_id, msg.inventory)
            log.info(
                "worker inventory changed",
                extra=log_fields(worker_id=worker_id, gpus=len(msg.inventory.gpus)),
            )
            self._leased_changed(link, leased_before)
        elif isinstance(msg, wire.ChallengeCommit | wire.ChallengeReveal | wire.Pong):
            if not link.deliver(frame):
                log.debug(
                    "answer to no pending request dropped",
                    extra=log_fields(worker_id=worker_id, frame_id=frame.id),
                )
        elif isinstance(msg, wire.Error):
            if not link.deliver(frame):
                log.warning(
                    "worker reported an error: %s %s",
                    msg.code.name,
                    msg.message,
                    extra=log_fields(worker_id=worker_id, ref=msg.ref),
                )
        else:  # EnrollProof / Register again
            raise _Refused(
                wire.ErrorCode.UNEXPECTED_MESSAGE, f"{type(msg).__name__} after registration"
            )
        return last_written

    def _leased_changed(self, link: WorkerLink, before: frozenset[str]) -> None:
        """Tell the validators when a heartbeat or inventory changed the worker's leased GPUs:
        they must stop (or resume) challenging them."""
        leased = link.leased_devices
        if leased != before:
            log.info(
                "worker's leased GPUs changed",
                extra=log_fields(worker_id=link.worker_id, leased=" ".join(sorted(leased))),
            )
            self._changed()

    def _enroll_refusal(
        self, frame_id: int, busy: bool, limiter: RateLimiter
    ) -> wire.CodedError | None:
        if frame_id == 0:
            return wire.CodedError(
                wire.ErrorCode.UNEXPECTED_MESSAGE, "a GatewayEnrollRequest needs a frame id"
            )
        if busy:
            return wire.CodedError(
                wire.ErrorCode.RATE_LIMITED, "a gateway enrollment request is already in flight"
            )
        if not limiter.allow():
            return wire.CodedError(
                wire.ErrorCode.RATE_LIMITED,
                f"at most {ENROLL_BURST} gateway enrollment requests, then one per "
                f"{ENROLL_INTERVAL_S:g} s",
            )
        return None

    async def _relay_enrollment(
        self, channel: Channel, worker_id: str, frame_id: int, limiter: RateLimiter
    ) -> None:
        """Ask the validators for a token bound to this session's worker and answer."""
        answer: wire.Message
        try:
            grant = await self.connections.gateway_grant(worker_id)
        except RelayError as exc:
            if exc.code is wire.ErrorCode.NO_VALIDATOR:
                # Nobody was asked: a worker that starts before the miner reaches a validator
                # must not find itself rate-limited once one is there.
                limiter.refund()
            log.warning(
                "no gateway token for the worker: %s: %s",
                exc.code.name,
                exc.message,
                extra=log_fields(worker_id=worker_id),
            )
            answer = exc.to_error(frame_id)
        except Exception:
            log.exception(
                "relaying a gateway enrollment failed", extra=log_fields(worker_id=worker_id)
            )
            answer = wire.Error(code=wire.ErrorCode.INTERNAL, message="miner error", ref=frame_id)
        else:
            log.info(
                "gateway token relayed to the worker",
                extra=log_fields(worker_id=worker_id, gateway_id=grant.gateway_id),
            )
            answer = wire.GatewayEnrollGrant(worker_id=worker_id, grant=grant)
        with contextlib.suppress(ChannelClosed):
            await channel.send(answer, id=frame_id)
