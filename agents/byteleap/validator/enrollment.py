"""Enrollment tokens from the configured gateways, for the workers of connected miners.

A miner relays its worker's wish to enroll as ``GatewayTokenRequest{worker_id}``
(docs/miner-validator.md); :class:`EnrollmentTokens` asks the gateways of the ``gateways:``
section, in their configured order, ``POST {url}/v1/enrollment-tokens {"worker_id",
"miner_hotkey"}`` with this validator's API key there, over HTTPS whose only trust root is that
gateway's CA (:mod:`~byteleap.validator.gateway_client`). ``miner_hotkey`` is always the hotkey
the miner's session proved, never anything the miner says.

The first gateway that answers 201 wins. Its answer is checked before it travels on: the CA it
names must be the CA this validator pins for it (``ca_file``), its ``gateway_id`` must be the one
derived from the configured signing key, and every field must fit the wire (an https enrollment
URL, a wss worker URL, a token a bearer header can carry). The grant sent to the miner carries
the pinned CA, re-encoded, so a worker trusts exactly what this validator trusts.

Every failure is an :class:`EnrollmentError` with a wire code the miner relays to the worker:
``NO_GATEWAY`` (none configured), ``GATEWAY_REFUSED`` (a gateway answered 4xx, e.g. a revoked
worker or a wrong API key), ``GATEWAY_UNAVAILABLE`` (unreachable, TLS failure, 5xx, timeout, an
answer that does not check out). With several gateways the error names what each one did.
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Final

import aiohttp
import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..core import wire
from ..core.gateway_protocol import TokenRequest, TokenResponse
from ..core.logs import log_fields
from .config import GatewaySettings
from .gateway_client import (
    TRANSPORT_ERRORS,
    bearer_headers,
    error_detail,
    gateway_client,
    read_bounded,
    shown,
    transport_failure,
)

__all__ = [
    "ENROLLMENT_TOKENS_PATH",
    "MAX_TOKEN_ANSWER_BYTES",
    "TOKEN_REQUEST_TIMEOUT_S",
    "EnrollmentError",
    "EnrollmentTokens",
    "GatewayAccess",
]

log = logging.getLogger(__name__)

ENROLLMENT_TOKENS_PATH: Final = "/v1/enrollment-tokens"
TOKEN_REQUEST_TIMEOUT_S: Final = 10.0
"""One gateway's whole answer; the miner waits longer for the validator (it may try two)."""
MAX_TOKEN_ANSWER_BYTES: Final = 32 * 1024
_RESPONSE_DECODER: Final = msgspec.json.Decoder(TokenResponse)


class EnrollmentError(wire.CodedError):
    """No token: ``code`` is what the miner and the worker are told."""


@dataclasses.dataclass(frozen=True)
class GatewayAccess:
    """One configured gateway with what the validator needs to call it."""

    settings: GatewaySettings
    api_key: str = dataclasses.field(repr=False)
    ssl_context: ssl.SSLContext = dataclasses.field(repr=False)

    @property
    def token_url(self) -> str:
        return self.settings.url.rstrip("/") + ENROLLMENT_TOKENS_PATH


class _Refused(Exception):  # noqa: N818 - one gateway's answer, folded into EnrollmentError
    def __init__(self, code: wire.ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class EnrollmentTokens:
    """Asks the configured gateways for one-time enrollment tokens (see the module docstring).

    One HTTP client per gateway, opened on first use; :meth:`close` closes them.
    """

    def __init__(
        self,
        gateways: Sequence[GatewayAccess],
        *,
        request_timeout_s: float = TOKEN_REQUEST_TIMEOUT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.gateways = tuple(gateways)
        self._timeout = request_timeout_s
        self._clock = clock
        self._clients: dict[str, aiohttp.ClientSession] = {}
        self.issued = 0
        """Tokens obtained so far."""

    def __repr__(self) -> str:  # the accesses hold API keys: never show them
        return f"EnrollmentTokens({[g.settings.name for g in self.gateways]})"

    @property
    def configured(self) -> bool:
        return bool(self.gateways)

    async def close(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.close()

    async def issue(self, worker_id: str, miner_hotkey: str) -> wire.GatewayGrant:
        """A token bound to ``worker_id`` and ``miner_hotkey`` from the first gateway that
        grants one; :class:`EnrollmentError` when none does."""
        if not self.gateways:
            raise EnrollmentError(
                wire.ErrorCode.NO_GATEWAY, "this validator has no gateway configured"
            )
        failures: list[tuple[GatewayAccess, _Refused]] = []
        for access in self.gateways:
            try:
                grant = await self._ask(access, worker_id, miner_hotkey)
            except _Refused as exc:
                log.warning(
                    "gateway %s gave no enrollment token: %s",
                    access.settings.name,
                    exc.message,
                    extra=log_fields(
                        gateway=access.settings.name, worker_id=worker_id, miner=miner_hotkey
                    ),
                )
                failures.append((access, exc))
                continue
            self.issued += 1
            log.info(
                "enrollment token obtained from gateway %s",
                access.settings.name,
                extra=log_fields(
                    gateway=access.settings.name, worker_id=worker_id, miner=miner_hotkey
                ),
            )
            return grant
        refused = any(why.code is wire.ErrorCode.GATEWAY_REFUSED for _, why in failures)
        code = wire.ErrorCode.GATEWAY_REFUSED if refused else wire.ErrorCode.GATEWAY_UNAVAILABLE
        if len(failures) == 1:
            only, why = failures[0]
            raise EnrollmentError(code, f"gateway {only.settings.name}: {why.message}")
        said = "; ".join(f"{gw.settings.name}: {why.message}" for gw, why in failures)
        raise EnrollmentError(code, f"no gateway gave a token ({said})")

    def _client(self, access: GatewayAccess) -> aiohttp.ClientSession:
        name = access.settings.name
        client = self._clients.get(name)
        if client is None or client.closed:
            client = gateway_client(access.ssl_context, self._timeout, limit=4)
            self._clients[name] = client
        return client

    async def _ask(
        self, access: GatewayAccess, worker_id: str, miner_hotkey: str
    ) -> wire.GatewayGrant:
        url = access.token_url
        body = msgspec.json.encode(TokenRequest(worker_id=worker_id, miner_hotkey=miner_hotkey))
        headers = {**bearer_headers(access.api_key), "Content-Type": "application/json"}
        try:
            async with self._client(access).post(
                url, data=body, headers=headers, allow_redirects=False
            ) as response:
                if response.status != 201:
                    raise await self._http_refusal(access, response)
                raw = await read_bounded(response, MAX_TOKEN_ANSWER_BYTES)
        except TRANSPORT_ERRORS as exc:
            _, message = transport_failure(exc, url, access.settings.ca_file, self._timeout)
            raise _Refused(wire.ErrorCode.GATEWAY_UNAVAILABLE, message) from None
        return self._grant(access, raw)

    async def _http_refusal(
        self, access: GatewayAccess, response: aiohttp.ClientResponse
    ) -> _Refused:
        status = response.status
        detail = await error_detail(response)
        if status == 401:
            return _Refused(
                wire.ErrorCode.GATEWAY_REFUSED,
                f"the gateway refused this validator's API key (HTTP {status}{detail}); "
                f"check the key in {access.settings.api_key_source}",
            )
        if 300 <= status < 400:
            return _Refused(
                wire.ErrorCode.GATEWAY_UNAVAILABLE, f"HTTP {status}: redirects are not followed"
            )
        if 400 <= status < 500 and status not in (408, 429):
            return _Refused(wire.ErrorCode.GATEWAY_REFUSED, f"HTTP {status}{detail}")
        return _Refused(wire.ErrorCode.GATEWAY_UNAVAILABLE, f"HTTP {status}{detail}")

    def _grant(self, access: GatewayAccess, raw: bytes) -> wire.GatewayGrant:
        """The gateway's answer as a wire grant, checked against this validator's pins."""
        unavailable = wire.ErrorCode.GATEWAY_UNAVAILABLE
        url = access.token_url
        try:
            answer = _RESPONSE_DECODER.decode(raw)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise _Refused(
                unavailable, f"{url} sent a malformed answer: {shown(str(exc))}"
            ) from None
        if answer.gateway_id != access.settings.gateway_id:
            raise _Refused(
                unavailable,
                f"{url} calls itself gateway {answer.gateway_id}, but the configured signing "
                f"key is gateway {access.settings.gateway_id}'s",
            )
        pinned = _pinned_ca(access, answer.ca_pem)
        if pinned is None:
            raise _Refused(
                unavailable,
                f"{url} names a CA other than the one in ca_file {access.settings.ca_file}",
            )
        if answer.expires_at <= self._clock():
            raise _Refused(unavailable, f"{url} sent a token that has already expired")
        try:
            return msgspec.convert(
                {
                    "gateway_id": answer.gateway_id,
                    "token": answer.token,
                    "expires_at": answer.expires_at,
                    "enroll_url": answer.enroll_url,
                    "ws_url": answer.ws_url,
                    "ca_pem": pinned,
                },
                wire.GatewayGrant,
            )
        except msgspec.ValidationError as exc:
            raise _Refused(
                unavailable, f"{url} sent a grant that does not fit the wire: {shown(str(exc))}"
            ) from None


def _pinned_ca(access: GatewayAccess, ca_pem: str) -> str | None:
    """The PEM of the pinned CA the gateway named, or None when it named another one."""
    try:
        named = x509.load_pem_x509_certificate(ca_pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        return None
    der = named.public_bytes(serialization.Encoding.DER)
    if der not in access.ssl_context.get_ca_certs(binary_form=True):
        return None
    return named.public_bytes(serialization.Encoding.PEM).decode("ascii")
