"""The HTTPS API: validators, enrolling workers and renters (docs/gateway.md).

| route | who | what |
|---|---|---|
| ``POST /v1/enrollment-tokens`` | validator key | a one-time enrollment token for a worker |
| ``GET /v1/lease-feed?after=N`` | validator key | signed lease records with ``seq > N`` |
| ``POST /v1/enroll`` | enrollment token | CSR + proof in, worker certificate out |
| ``GET /v1/gpus`` | renter key | online workers and their GPUs |
| ``POST /v1/leases``, ``GET /v1/leases`` | renter key | rent GPUs; list own leases |
| ``GET``/``DELETE /v1/leases/{id}`` | renter key | one lease; end it |
| ``POST /v1/leases/{id}/extend`` | renter key | move ``ends_at`` |

Every credential is ``Authorization: Bearer <secret>``, looked up by its SHA-256. Each failed
authentication (missing, malformed or unknown credential, bad enrollment proof) takes a token
from the remote address's bucket (``auth.failures_per_minute``, ``auth.failure_burst``); an
address with an empty bucket gets 429 before any check. Bodies are limited to
``api.max_body_bytes`` and decoded strictly. Every error is ``{"error": "<stable_code>",
"message": "<one line>"}`` with a fitting status; another renter's lease is 404, exactly like a
lease that does not exist.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Final, NoReturn, ParamSpec, TypeVar

import msgspec
from aiohttp import web
from cryptography.hazmat.primitives import serialization

from ..core.gateway_protocol import (
    EnrollRequest,
    EnrollResponse,
    ExtendRequest,
    LeaseList,
    LeaseRequest,
    TokenRequest,
    TokenResponse,
    enroll_proof_message,
)
from ..core.identity import IdentityKind, PeerIdentity, worker_id_of
from ..core.lease import MAX_FEED_PAGE, FeedPage
from ..core.logs import log_fields
from .ca import CsrError, GatewayCA, load_csr
from .config import GatewayConfig
from .keys import TOKEN_PREFIX, KeyKind, LeaseSigner, new_secret, parse_bearer, secret_hash
from .leases import LeaseManager, lease_view
from .listener import ApiFailure, bound_port, json_error, json_response, serve
from .store import GatewayStore, StoreConflict, StoreError, StoreUnavailable, TokenError

__all__ = ["ApiFailure", "FailureLimiter", "GatewayApi"]

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")
S = TypeVar("S", bound=msgspec.Struct)

_LEASE_ID: Final = re.compile(r"\A[0-9a-f]{32}\Z")
_MAX_TRACKED_ADDRESSES: Final = 65536
_HTTP_CODES: Final = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


class FailureLimiter:
    """Failed authentications per remote address: a token bucket each, refilled over time.

    Only failures take tokens; an address whose bucket is empty is refused before any check,
    until it refills. At most ``max_addresses`` buckets are kept (least recently used first out).
    """

    def __init__(
        self,
        per_minute: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_addresses: int = _MAX_TRACKED_ADDRESSES,
    ) -> None:
        self._rate = per_minute / 60.0
        self._burst = float(burst)
        self._clock = clock
        self._max = max_addresses
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _tokens(self, address: str) -> float:
        entry = self._buckets.get(address)
        if entry is None:
            return self._burst
        tokens, at = entry
        return min(self._burst, tokens + (self._clock() - at) * self._rate)

    def blocked(self, address: str) -> bool:
        return self._tokens(address) < 1.0

    def failed(self, address: str) -> None:
        tokens = max(0.0, self._tokens(address) - 1.0)
        self._buckets[address] = (tokens, self._clock())
        self._buckets.move_to_end(address)
        while len(self._buckets) > self._max:
            self._buckets.popitem(last=False)


class GatewayApi:
    """The aiohttp application behind the API listener."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        store: GatewayStore,
        ca: GatewayCA,
        signer: LeaseSigner,
        leases: LeaseManager,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.ca = ca
        self.signer = signer
        self.leases = leases
        self._clock = clock
        self.limiter = FailureLimiter(config.auth.failures_per_minute, config.auth.failure_burst)
        self._runner: web.AppRunner | None = None
        self.app = web.Application(
            client_max_size=config.api.max_body_bytes, middlewares=[self._errors]
        )
        add = self.app.router
        add.add_post("/v1/enrollment-tokens", self._tokens)
        add.add_get("/v1/lease-feed", self._feed)
        add.add_post("/v1/enroll", self._enroll)
        add.add_get("/v1/gpus", self._gpus)
        add.add_post("/v1/leases", self._create)
        add.add_get("/v1/leases", self._list)
        add.add_get("/v1/leases/{lease_id}", self._get)
        add.add_delete("/v1/leases/{lease_id}", self._terminate)
        add.add_post("/v1/leases/{lease_id}/extend", self._extend)

    # ------------------------------------------------------------------ lifecycle

    async def start(
        self, ssl_context: ssl.SSLContext, host: str | None = None, port: int | None = None
    ) -> None:
        self._runner = await serve(
            self.app,
            ssl_context,
            host if host is not None else self.config.api.host,
            port if port is not None else self.config.api.port,
        )

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def port(self) -> int:
        return bound_port(self._runner, "API")

    # ------------------------------------------------------------------ plumbing

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiFailure as exc:  # LeaseError included
            return json_error(exc.status, exc.code, exc.message)
        except StoreUnavailable as exc:
            log.warning("store unavailable: %s", exc)
            return json_error(503, "store_unavailable", "the gateway's store is unavailable; retry")
        except StoreError as exc:
            log.error("store error on %s %s: %s", request.method, request.path, exc)
            return json_error(500, "internal", "internal error")
        except web.HTTPException as exc:
            code = _HTTP_CODES.get(exc.status, "http_error")
            return json_error(exc.status, code, exc.reason)
        except Exception:
            log.exception("request %s %s failed", request.method, request.path)
            return json_error(500, "internal", "internal error")

    async def _db(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await asyncio.to_thread(fn, *args, **kwargs)

    @staticmethod
    async def _body(request: web.Request, kind: type[S]) -> S:
        data = await request.read()  # 413 above client_max_size
        try:
            return msgspec.json.decode(data, type=kind, strict=True)
        except msgspec.ValidationError as exc:
            raise ApiFailure(400, "bad_request", f"invalid request body: {exc}") from None
        except msgspec.DecodeError:
            raise ApiFailure(400, "bad_request", "the request body is not JSON") from None

    def _remote(self, request: web.Request) -> str:
        return request.remote or "unknown"

    def _check_blocked(self, request: web.Request) -> None:
        if self.limiter.blocked(self._remote(request)):
            raise ApiFailure(429, "rate_limited", "too many failed authentications; wait")

    def _auth_failed(self, request: web.Request, status: int, code: str, message: str) -> NoReturn:
        self.limiter.failed(self._remote(request))
        log.warning(
            "authentication failed: %s",
            code,
            extra=log_fields(peer=self._remote(request), path=request.path),
        )
        raise ApiFailure(status, code, message)

    def _bearer(self, request: web.Request) -> str:
        self._check_blocked(request)
        secret = parse_bearer(request.headers.get("Authorization"))
        if secret is None:
            self._auth_failed(
                request, 401, "unauthorized", "missing or malformed Authorization: Bearer header"
            )
        return secret

    async def _authenticate(self, request: web.Request, kind: KeyKind) -> str:
        secret = self._bearer(request)
        owner = await self._db(self.store.api_key_owner, kind, secret_hash(secret))
        if owner is None:
            self._auth_failed(request, 401, "invalid_api_key", f"not a valid {kind} API key")
        return owner

    async def _refuse_revoked(self, worker_id: str) -> None:
        worker = await self._db(self.store.worker, worker_id)
        if worker is not None and worker.revoked_at is not None:
            raise ApiFailure(403, "worker_revoked", f"worker {worker_id} is revoked")

    @staticmethod
    def _lease_id(request: web.Request) -> str:
        lease_id = request.match_info["lease_id"]
        if not _LEASE_ID.match(lease_id):
            raise ApiFailure(404, "not_found", "no such lease")
        return lease_id

    # ------------------------------------------------------------------ validators

    async def _tokens(self, request: web.Request) -> web.Response:
        validator = await self._authenticate(request, "validator")
        body = await self._body(request, TokenRequest)
        try:
            PeerIdentity.from_ss58(body.miner_hotkey)
        except ValueError:
            raise ApiFailure(400, "invalid_hotkey", "miner_hotkey is not an SS58 address") from None
        await self._refuse_revoked(body.worker_id)
        token = new_secret(TOKEN_PREFIX)
        now = self._clock()
        expires_at = now + self.config.tokens.ttl_s
        await self._db(
            self.store.add_token,
            secret_hash(token),
            worker_id=body.worker_id,
            miner_hotkey=body.miner_hotkey,
            issued_by=validator,
            now=now,
            expires_at=expires_at,
        )
        log.info(
            "enrollment token issued",
            extra=log_fields(worker_id=body.worker_id, miner=body.miner_hotkey, by=validator),
        )
        return json_response(
            201,
            TokenResponse(
                token=token,
                expires_at=expires_at,
                enroll_url=self.config.enroll_url,
                ws_url=self.config.ws_url,
                ca_pem=self.ca.cert_pem,
                gateway_id=self.signer.gateway_id,
            ),
        )

    async def _feed(self, request: web.Request) -> web.Response:
        await self._authenticate(request, "validator")
        raw = request.query.get("after", "0")
        if not raw.isascii() or not raw.isdigit() or len(raw) > 19 or int(raw) > 2**63 - 1:
            raise ApiFailure(400, "bad_request", "after must be an integer >= 0")
        after = int(raw)
        entries = await self._db(self.store.feed, after, MAX_FEED_PAGE)
        page = FeedPage(
            gateway_id=self.signer.gateway_id,
            records=[entry.signed for entry in entries],
            next_after=entries[-1].seq if entries else after,
        )
        return json_response(200, page)

    # ------------------------------------------------------------------ enrollment

    async def _enroll(self, request: web.Request) -> web.Response:
        token = self._bearer(request)
        token_hash = secret_hash(token)
        row = await self._db(self.store.token, token_hash)
        now = self._clock()
        if row is None:
            self._auth_failed(request, 401, "token_unknown", "unknown enrollment token")
        if row.used_at is not None:
            self._auth_failed(request, 401, "token_used", "the enrollment token was already used")
        if row.expires_at <= now:
            self._auth_failed(request, 401, "token_expired", "the enrollment token has expired")
        body = await self._body(request, EnrollRequest)
        if worker_id_of(body.worker_public_key) != body.worker_id:
            raise ApiFailure(
                400, "worker_id_mismatch", "worker_id is not derived from worker_public_key"
            )
        if body.worker_id != row.worker_id:
            self._auth_failed(
                request, 403, "token_wrong_worker", "the token was issued for another worker"
            )
        try:
            csr = load_csr(body.csr_pem)
        except CsrError as exc:
            raise ApiFailure(400, exc.code, str(exc)) from None
        message = enroll_proof_message(token, csr.public_bytes(serialization.Encoding.DER))
        if not PeerIdentity(IdentityKind.ED25519, body.worker_public_key).verify(
            message, body.proof
        ):
            self._auth_failed(
                request, 403, "proof_invalid", "the proof is not the worker key's signature"
            )
        await self._refuse_revoked(body.worker_id)
        try:
            issued = self.ca.issue_worker_cert(
                csr, body.worker_id, self.config.tls.worker_cert_days
            )
        except CsrError as exc:
            raise ApiFailure(400, exc.code, str(exc)) from None
        try:
            await self._db(
                self.store.enroll,
                token_hash,
                now=now,
                worker_id=body.worker_id,
                public_key=body.worker_public_key,
                serial=issued.serial_hex,
                not_before=issued.not_before,
                not_after=issued.not_after,
            )
        except TokenError as exc:  # lost a race with a concurrent use of the same token
            self._auth_failed(request, 401, exc.code, f"enrollment token refused: {exc}")
        except StoreConflict as exc:
            raise ApiFailure(403, "worker_revoked", str(exc)) from None
        log.info(
            "worker enrolled",
            extra=log_fields(
                worker_id=body.worker_id, miner=row.miner_hotkey, serial=issued.serial_hex
            ),
        )
        return json_response(
            200,
            EnrollResponse(
                cert_pem=issued.pem,
                ca_pem=self.ca.cert_pem,
                not_after=issued.not_after,
                ws_url=self.config.ws_url,
            ),
        )

    # ------------------------------------------------------------------ renters

    async def _gpus(self, request: web.Request) -> web.Response:
        await self._authenticate(request, "renter")
        return json_response(200, self.leases.gpus())

    async def _create(self, request: web.Request) -> web.Response:
        renter = await self._authenticate(request, "renter")
        body = await self._body(request, LeaseRequest)
        lease = await self.leases.create(renter, body)
        return json_response(201, lease_view(lease))

    async def _list(self, request: web.Request) -> web.Response:
        renter = await self._authenticate(request, "renter")
        leases = await self.leases.list_leases(renter)
        return json_response(200, LeaseList(leases=[lease_view(lease) for lease in leases]))

    async def _get(self, request: web.Request) -> web.Response:
        renter = await self._authenticate(request, "renter")
        lease = await self.leases.get(renter, self._lease_id(request))
        return json_response(200, lease_view(lease))

    async def _terminate(self, request: web.Request) -> web.Response:
        renter = await self._authenticate(request, "renter")
        lease = await self.leases.terminate(renter, self._lease_id(request))
        return json_response(200, lease_view(lease))

    async def _extend(self, request: web.Request) -> web.Response:
        renter = await self._authenticate(request, "renter")
        lease_id = self._lease_id(request)
        body = await self._body(request, ExtendRequest)
        lease = await self.leases.extend(renter, lease_id, body.duration_s)
        return json_response(200, lease_view(lease))
