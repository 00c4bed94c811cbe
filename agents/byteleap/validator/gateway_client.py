"""HTTPS to a configured gateway: the pinned CA, bearer key, bounded answers, error bodies.

Shared by the lease feed reader (:mod:`~byteleap.validator.leases`) and the enrollment-token
broker (:mod:`~byteleap.validator.enrollment`), so both talk to a gateway the same way: its CA
(``ca_file``) is the only trust root and host names are checked, redirects are never followed
(the API key goes to the configured URL only), answers are read up to a bound, and whatever the
gateway says in an error body is cut and cleaned before it reaches a log line.
"""

from __future__ import annotations

import ssl
from typing import Final

import aiohttp
import msgspec

__all__ = [
    "CONNECT_TIMEOUT_S",
    "MAX_ERROR_BYTES",
    "TRANSPORT_ERRORS",
    "AnswerTooLarge",
    "bearer_headers",
    "error_detail",
    "gateway_client",
    "gateway_ssl_context",
    "read_bounded",
    "shown",
    "transport_failure",
]

MAX_ERROR_BYTES: Final = 4096
CONNECT_TIMEOUT_S: Final = 10.0
_SHOWN_CHARS: Final = 200


class _GatewayError(msgspec.Struct, frozen=True):
    """The gateway's error body; anything else in it is ignored."""

    error: str = ""
    message: str = ""


_ERROR_DECODER: Final = msgspec.json.Decoder(_GatewayError)


class AnswerTooLarge(Exception):  # noqa: N818 - a refusal of the peer's answer
    """The gateway's answer is larger than the reader accepts."""


TRANSPORT_ERRORS: Final = (AnswerTooLarge, aiohttp.ClientError, OSError)
"""What one request to a gateway raises short of an HTTP answer (TLS, timeouts included);
:func:`transport_failure` says what went wrong."""


def transport_failure(
    exc: BaseException, url: str, ca_file: str, timeout_s: float
) -> tuple[str, str]:
    """``(kind, message)`` for one of :data:`TRANSPORT_ERRORS` raised by a request to ``url``:
    ``tls``, ``unreachable`` or ``protocol`` (an answer too large); the message is safe to log."""
    if isinstance(exc, AnswerTooLarge):
        return "protocol", f"{url}: {exc}"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return "tls", (
            f"the certificate of {url} does not verify against ca_file {ca_file} "
            f"({shown(str(exc.certificate_error))})"
        )
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        return "tls", f"TLS with {url} failed: {shown(str(exc))}"
    if isinstance(exc, TimeoutError):
        return "unreachable", f"{url} did not answer within {timeout_s:g} s"
    return "unreachable", f"cannot reach {url}: {shown(str(exc))}"


def gateway_ssl_context(ca_file: str) -> ssl.SSLContext:
    """A client context trusting only the CA in ``ca_file`` (host names checked).

    Raises :class:`ValueError` naming the file when it cannot be read or holds no certificate.
    """
    # PROTOCOL_TLS_CLIENT verifies the chain and the host name and, unlike
    # create_default_context(), loads no system CA: the gateway's CA is the only root.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=ca_file)
    except FileNotFoundError:
        raise ValueError(f"ca_file {ca_file} does not exist") from None
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        raise ValueError(f"ca_file {ca_file} holds no usable PEM certificate ({reason})") from None
    if not context.get_ca_certs():
        raise ValueError(f"ca_file {ca_file} holds no CA certificate")
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def gateway_client(
    ssl_context: ssl.SSLContext, request_timeout_s: float, *, limit: int = 1
) -> aiohttp.ClientSession:
    """An HTTP client for one gateway: its TLS context, at most ``limit`` connections, and
    every request bounded by ``request_timeout_s`` (connecting by at most 10 s of it)."""
    timeout = aiohttp.ClientTimeout(
        total=request_timeout_s, connect=min(CONNECT_TIMEOUT_S, request_timeout_s)
    )
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ssl_context, limit=limit), timeout=timeout
    )


def bearer_headers(api_key: str) -> dict[str, str]:
    """Headers of one request: set per request, never as session defaults, so the key goes
    to the URL it is meant for only."""
    return {"Authorization": f"Bearer {api_key}", "Accept": "application/json"}


def shown(text: str) -> str:
    """Untrusted text from a gateway, safe for one log line."""
    clean = "".join(c if c.isprintable() else "?" for c in text)
    return clean if len(clean) <= _SHOWN_CHARS else clean[:_SHOWN_CHARS] + "..."


async def read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body of ``response``; :class:`AnswerTooLarge` beyond ``limit`` bytes."""
    if response.content_length is not None and response.content_length > limit:
        raise AnswerTooLarge(f"answer of {response.content_length} bytes, limit {limit}")
    body = bytearray()
    async for chunk in response.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > limit:
            raise AnswerTooLarge(f"answer larger than {limit} bytes")
    return bytes(body)


async def error_detail(response: aiohttp.ClientResponse) -> str:
    """``": <code> <message>"`` from the gateway's error body, or "" when there is none
    readable (the status then says enough)."""
    try:
        error = _ERROR_DECODER.decode(await read_bounded(response, MAX_ERROR_BYTES))
    except (
        AnswerTooLarge,
        msgspec.DecodeError,
        UnicodeDecodeError,
        aiohttp.ClientError,
        TimeoutError,
    ):
        return ""
    text = f"{error.error} {error.message}".strip()
    return ": " + shown(text) if text else ""
