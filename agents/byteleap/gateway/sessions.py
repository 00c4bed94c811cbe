"""The worker listener: mTLS WebSocket sessions (``GET /v1/worker``).

TLS requires a client certificate that chains to the gateway's CA (``ssl.CERT_REQUIRED``); a
certificate from any other CA never reaches this code. Then, per connection:

1. admission: at most ``workers.max_connections`` at once;
2. the certificate: its CN is the worker id; its serial must be one this gateway issued to that
   worker, and neither the certificate nor the worker may be revoked (else HTTP 403 before the
   upgrade);
3. ``Hello`` within ``hello_timeout_s``, naming the same worker id (else ``KEY_MISMATCH``, close
   4002). The session is registered (a newer session of the same worker replaces the older one,
   which is closed with 4009), ``Welcome`` goes out, and the lease manager reconciles;
4. steady state: heartbeats, lease answers, in-session certificate renewal, all rate-limited.

A watcher checks every ``revocation_check_s``: workers revoked in the store (``byteleapctl
gateway worker revoke`` writes there) are disconnected at once and their leases failed; sessions
silent for ``heartbeat_timeout_s`` or whose newest certificate has expired are closed.

Renewal keeps the session: the worker sends a CSR (CN = worker_id) and its Ed25519 key's
signature over ``renew_proof_message(session_id, csr_der)``; the gateway checks it against the key
the worker enrolled with, issues and records a new certificate, and answers ``CertRenewed``. The
old certificate stays valid until it expires (unless the worker is revoked).

Outbound messages go through a bounded per-session queue and a writer task, so the lease manager
never waits on a slow worker; a worker that lets the queue fill is disconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
import time
from collections.abc import Callable
from typing import Any, Final

from aiohttp import WSMsgType, web
from cryptography.hazmat.primitives import serialization

from ..core.channel import CloseCode, RateLimiter
from ..core.gateway_protocol import (
    MAX_UP_BYTES,
    UP,
    CertRenewed,
    Error,
    ErrorCode,
    Frame,
    Heartbeat,
    Hello,
    LeaseFailed,
    LeaseStarted,
    LeaseStopped,
    Message,
    Pong,
    ProtocolError,
    RenewCert,
    Welcome,
    decode,
    encode,
    renew_proof_message,
)
from ..core.identity import IdentityKind, PeerIdentity
from ..core.logs import log_fields
from .ca import CsrError, GatewayCA, certificate_identity, load_csr
from .config import GatewayConfig
from .leases import LeaseManager
from .listener import bound_port, json_error, serve
from .store import GatewayStore, StoreConflict, StoreError, WorkerRow

__all__ = ["RENEW_MIN_INTERVAL_S", "WorkerHub", "WorkerSession"]

log = logging.getLogger(__name__)

OUTBOUND_QUEUE: Final = 256
RENEW_MIN_INTERVAL_S: Final = 30.0
CLOSE_TIMEOUT_S: Final = 2.0
_CLOSE_FOR: Final = {
    ErrorCode.RATE_LIMITED: CloseCode.RATE_LIMITED,
    ErrorCode.FRAME_TOO_LARGE: CloseCode.FRAME_TOO_LARGE,
}


class WorkerSession:
    """One worker's live, authenticated session (the lease manager's ``WorkerLink``)."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        worker: WorkerRow,
        *,
        serial: str,
        cert_not_after: float,
        clock: Callable[[], float],
    ) -> None:
        self._ws = ws
        self._worker = worker
        self.serial = serial
        self.cert_not_after = cert_not_after
        """Expiry of the newest certificate this session holds (moves on with renewals)."""
        self.session_id = secrets.token_bytes(16)
        self.last_seen = clock()
        self.last_renewal: float | None = None
        self.closed = False
        self.close_code: int = CloseCode.NORMAL
        self.close_reason = ""
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=OUTBOUND_QUEUE)
        self._writer: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None

    @property
    def worker_id(self) -> str:
        return self._worker.worker_id

    @property
    def miner_hotkey(self) -> str:
        return self._worker.miner_hotkey

    @property
    def public_key(self) -> bytes:
        return self._worker.public_key

    def start(self) -> None:
        self._writer = asyncio.create_task(self._write(), name=f"gateway-worker-{self.worker_id}")

    def send(self, message: Message, *, ref: int = 0) -> bool:
        if self.closed:
            return False
        try:
            self._queue.put_nowait(encode(Frame(id=ref, msg=message)))
        except asyncio.QueueFull:
            self.close(CloseCode.RATE_LIMITED, "worker does not read its messages")
            return False
        return True

    def close(self, code: int, reason: str) -> None:
        """Close after what is queued (the writer sends the close frame)."""
        if self.closed:
            return
        self.closed = True
        self.close_code = code
        self.close_reason = reason
        try:
            self._queue.put_nowait(None)
        except asyncio.QueueFull:  # a stuck peer: drop its backlog
            if self._writer is not None:
                self._writer.cancel()
            self._closer = asyncio.get_running_loop().create_task(self._close_now())

    async def _write(self) -> None:
        try:
            while True:
                data = await self._queue.get()
                if data is None:
                    break
                await self._ws.send_bytes(data)
        except (ConnectionError, RuntimeError) as exc:  # the peer went away
            log.info("worker session send failed: %s", exc, extra=self._fields())
        finally:
            self.closed = True
            await self._close_now()

    async def _close_now(self) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self._ws.close(code=self.close_code, message=self.close_reason.encode()[:120])

    async def finish(self) -> None:
        """Wait for the writer to flush and close (called when the reader stops)."""
        if not self.closed:
            self.close(CloseCode.NORMAL, "session ended")
        if self._writer is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await asyncio.shield(self._writer)
            self._writer.cancel()

    def _fields(self) -> dict[str, Any]:
        return log_fields(worker_id=self.worker_id)


class WorkerHub:
    """The worker listener, its sessions and its watcher."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        ca: GatewayCA,
        store: GatewayStore,
        leases: LeaseManager,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.listen = config.workers
        self.ca = ca
        self.store = store
        self.leases = leases
        self._clock = clock
        self._wall = wall_clock
        self.sessions: dict[str, WorkerSession] = {}
        self._open = 0
        self._stopping = False
        self._revoked_seen: set[str] = set()
        self._runner: web.AppRunner | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.app = web.Application(client_max_size=4096)
        self.app.router.add_get(self.listen.path, self._handle)

    # ------------------------------------------------------------------ lifecycle

    async def start(
        self, ssl_context: ssl.SSLContext, host: str | None = None, port: int | None = None
    ) -> None:
        if ssl_context.verify_mode != ssl.CERT_REQUIRED:
            raise ValueError("the worker listener requires client certificates")
        self._runner = await serve(
            self.app,
            ssl_context,
            host if host is not None else self.listen.host,
            port if port is not None else self.listen.port,
        )
        self._watcher = asyncio.create_task(self._watch(), name="gateway-session-watcher")

    async def stop(self) -> None:
        self._stopping = True
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        sessions = list(self.sessions.values())
        for session in sessions:
            session.close(CloseCode.GOING_AWAY, "gateway shutting down")
        # Let the writers send the close frames before the server drops the connections.
        await asyncio.gather(*(session.finish() for session in sessions), return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def port(self) -> int:
        return bound_port(self._runner, "worker")

    # ------------------------------------------------------------------ watcher

    async def _watch(self) -> None:
        while True:
            try:
                await self.check()
            except StoreError as exc:
                log.error("session check failed: %s", exc)
            except Exception:
                log.exception("session check failed")
            await asyncio.sleep(self.listen.revocation_check_s)

    async def check(self) -> None:
        """Cut revoked workers, silent sessions and sessions whose certificate expired."""
        revoked = await asyncio.to_thread(self.store.revoked_workers)
        for worker_id in sorted(revoked - self._revoked_seen):
            await self.revoked(worker_id)
        self._revoked_seen |= revoked
        now, wall = self._clock(), self._wall()
        for session in list(self.sessions.values()):
            if now - session.last_seen > self.listen.heartbeat_timeout_s:
                log.warning("worker silent; disconnecting", extra=session._fields())
                session.close(CloseCode.GOING_AWAY, "no heartbeat")
            elif wall > session.cert_not_after:
                log.warning("worker certificate expired; disconnecting", extra=session._fields())
                session.close(CloseCode.SESSION_EXPIRED, "certificate expired")

    async def revoked(self, worker_id: str) -> None:
        """A worker was revoked: cut its session now and fail its leases."""
        session = self.sessions.get(worker_id)
        if session is not None:
            log.warning("worker revoked; disconnecting", extra=session._fields())
            session.send(Error(code=ErrorCode.REVOKED, message="worker revoked"))
            session.close(CloseCode.UNAUTHORIZED, "worker revoked")
        await self.leases.worker_revoked(worker_id)

    # ------------------------------------------------------------------ connections

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self._stopping:
            return json_error(503, "shutting_down", "gateway shutting down")
        if self._open >= self.listen.max_connections:
            return json_error(503, "capacity_reached", "too many worker connections; retry")
        self._open += 1
        try:
            return await self._serve(request)
        finally:
            self._open -= 1

    async def _identify(self, request: web.Request) -> tuple[WorkerRow, str, float] | web.Response:
        transport = request.transport
        ssl_object = None if transport is None else transport.get_extra_info("ssl_object")
        der = None if ssl_object is None else ssl_object.getpeercert(binary_form=True)
        if not der:  # pragma: no cover - CERT_REQUIRED makes TLS refuse this first
            return json_error(401, "certificate_required", "a client certificate is required")
        worker_id, serial, not_after = certificate_identity(der)
        why = await asyncio.to_thread(self.store.session_allowed, worker_id, serial)
        worker = None if why else await asyncio.to_thread(self.store.worker, worker_id)
        if why or worker is None:
            log.warning(
                "worker session refused: %s",
                why,
                extra=log_fields(worker_id=worker_id or None, serial=serial, peer=request.remote),
            )
            code = "worker_revoked" if why == "worker revoked" else "certificate_refused"
            return json_error(403, code, why or "worker unknown")
        return worker, serial, not_after

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        try:
            identity = await self._identify(request)
        except StoreError as exc:
            log.error("cannot check a worker certificate: %s", exc)
            return json_error(503, "store_unavailable", "the gateway's store is unavailable")
        if isinstance(identity, web.Response):
            return identity
        worker, serial, not_after = identity
        ws = web.WebSocketResponse(
            max_msg_size=MAX_UP_BYTES + 1,
            heartbeat=self.listen.heartbeat_interval_s,
            compress=False,
        )
        await ws.prepare(request)
        session = WorkerSession(
            ws, worker, serial=serial, cert_not_after=not_after, clock=self._clock
        )
        session.start()
        registered = False
        try:
            hello = await self._hello(ws, session)
            if hello is None:
                return ws
            self._register(session)
            registered = True
            session.send(
                Welcome(
                    session_id=session.session_id,
                    heartbeat_interval_s=self.listen.heartbeat_interval_s,
                    cert_not_after=not_after,
                )
            )
            log.info(
                "worker online: %d GPU(s)",
                len(hello.gpus),
                extra=log_fields(worker_id=worker.worker_id, peer=request.remote),
            )
            await self.leases.worker_online(session, hello, worker.miner_hotkey)
            await self._steady(ws, session)
        except Exception:
            log.exception("worker session failed", extra=session._fields())
            session.send(Error(code=ErrorCode.INTERNAL, message="internal error"))
            session.close(CloseCode.PROTOCOL_ERROR, "internal error")
        finally:
            if registered:
                if self.sessions.get(session.worker_id) is session:
                    del self.sessions[session.worker_id]
                await self.leases.worker_offline(session)
                log.info(
                    "worker offline: %s", session.close_reason or "closed", extra=session._fields()
                )
            await session.finish()
        return ws

    async def _hello(self, ws: web.WebSocketResponse, session: WorkerSession) -> Hello | None:
        try:
            async with asyncio.timeout(self.listen.hello_timeout_s):
                message = await ws.receive()
        except TimeoutError:
            session.close(CloseCode.HANDSHAKE_FAILED, "no hello")
            return None
        if message.type != WSMsgType.BINARY:
            session.close(CloseCode.PROTOCOL_ERROR, "expected a binary hello")
            return None
        try:
            frame = decode(UP, message.data)
        except ProtocolError as exc:
            self._refuse(session, exc)
            return None
        if not isinstance(frame.msg, Hello):
            self._refuse(
                session,
                ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "the first message must be hello"),
            )
            return None
        if frame.msg.worker_id != session.worker_id:
            self._refuse(
                session,
                ProtocolError(
                    ErrorCode.KEY_MISMATCH, "hello names another worker than the certificate"
                ),
                CloseCode.UNAUTHORIZED,
            )
            return None
        return frame.msg

    def _refuse(
        self, session: WorkerSession, error: ProtocolError, close: int | None = None
    ) -> None:
        log.warning("worker refused: %s", error, extra=session._fields())
        session.send(error.to_error())
        session.close(close or _CLOSE_FOR.get(error.code, CloseCode.PROTOCOL_ERROR), error.message)

    def _register(self, session: WorkerSession) -> None:
        older = self.sessions.get(session.worker_id)
        self.sessions[session.worker_id] = session
        if older is not None:
            older.close(CloseCode.REPLACED, "replaced by a newer session")

    async def _steady(self, ws: web.WebSocketResponse, session: WorkerSession) -> None:
        limiter = RateLimiter(self.listen.messages_per_second, self.listen.message_burst)
        async for message in ws:
            if session.closed:
                break
            if message.type != WSMsgType.BINARY:
                if message.type in (WSMsgType.ERROR, WSMsgType.CLOSE, WSMsgType.CLOSING):
                    break
                self._refuse(session, ProtocolError(ErrorCode.BAD_FRAME, "text frames refused"))
                break
            if not limiter.allow():
                self._refuse(session, ProtocolError(ErrorCode.RATE_LIMITED, "too many messages"))
                break
            try:
                frame = decode(UP, message.data)
            except ProtocolError as exc:
                self._refuse(session, exc)
                break
            session.last_seen = self._clock()
            await self._dispatch(session, frame)

    async def _dispatch(self, session: WorkerSession, frame: Frame) -> None:
        msg = frame.msg
        if isinstance(msg, Heartbeat):
            await self.leases.heartbeat(session, msg)
        elif isinstance(msg, LeaseStarted):
            await self.leases.lease_started(session, msg)
        elif isinstance(msg, LeaseFailed):
            await self.leases.lease_failed(session, msg)
        elif isinstance(msg, LeaseStopped):
            await self.leases.lease_stopped(session, msg)
        elif isinstance(msg, RenewCert):
            await self._renew(session, frame.id, msg)
        elif isinstance(msg, Error):
            log.warning(
                "worker reported %s: %s", msg.code.name, msg.message, extra=session._fields()
            )
        elif isinstance(msg, Pong):
            pass
        else:  # a second Hello
            session.send(
                Error(code=ErrorCode.UNEXPECTED_MESSAGE, message="hello was already received"),
                ref=frame.id,
            )

    async def _renew(self, session: WorkerSession, ref: int, request: RenewCert) -> None:
        def refuse(code: ErrorCode, message: str) -> None:
            log.warning("certificate renewal refused: %s", message, extra=session._fields())
            session.send(Error(code=code, message=message, ref=ref), ref=ref)

        now = self._clock()
        if session.last_renewal is not None and now - session.last_renewal < RENEW_MIN_INTERVAL_S:
            refuse(ErrorCode.RATE_LIMITED, f"one renewal per {RENEW_MIN_INTERVAL_S:g} s")
            return
        session.last_renewal = now
        try:
            csr = load_csr(request.csr_pem)
        except CsrError as exc:
            refuse(ErrorCode.CSR_INVALID, str(exc))
            return
        message = renew_proof_message(
            session.session_id, csr.public_bytes(serialization.Encoding.DER)
        )
        if not PeerIdentity(IdentityKind.ED25519, session.public_key).verify(
            message, request.proof
        ):
            refuse(ErrorCode.PROOF_INVALID, "the proof is not the worker key's signature")
            return
        try:
            issued = self.ca.issue_worker_cert(
                csr, session.worker_id, self.config.tls.worker_cert_days
            )
        except CsrError as exc:
            refuse(ErrorCode.CSR_INVALID, str(exc))
            return
        try:
            await asyncio.to_thread(
                self.store.add_certificate,
                issued.serial_hex,
                session.worker_id,
                not_before=issued.not_before,
                not_after=issued.not_after,
                now=self._wall(),
            )
        except StoreConflict as exc:
            refuse(ErrorCode.REVOKED, str(exc))
            return
        except StoreError as exc:
            log.error("cannot record a renewed certificate: %s", exc, extra=session._fields())
            session.send(
                Error(code=ErrorCode.INTERNAL, message="try again later", ref=ref), ref=ref
            )
            return
        session.cert_not_after = max(session.cert_not_after, issued.not_after)
        session.send(CertRenewed(cert_pem=issued.pem, not_after=issued.not_after), ref=ref)
        log.info(
            "worker certificate renewed",
            extra=log_fields(worker_id=session.worker_id, serial=issued.serial_hex),
        )
