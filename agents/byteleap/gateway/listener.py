"""What the gateway's two HTTPS listeners share: serving an aiohttp app on a TLS socket, and the
JSON error answer ``{"error": "<stable_code>", "message": "<one line>"}``."""

from __future__ import annotations

import ssl
from typing import Final

import msgspec
from aiohttp import web

from ..core.gateway_protocol import ApiError

__all__ = ["ApiFailure", "bound_port", "json_error", "json_response", "serve"]

SHUTDOWN_TIMEOUT_S: Final = 3.0
_ENCODER: Final = msgspec.json.Encoder()


class ApiFailure(Exception):  # noqa: N818 - an answer, not a fault
    """An error answer: HTTP ``status``, stable ``code``, one-line ``message``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def json_response(status: int, body: msgspec.Struct) -> web.Response:
    return web.Response(
        status=status,
        body=_ENCODER.encode(body),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def json_error(status: int, code: str, message: str) -> web.Response:
    return json_response(status, ApiError(error=code, message=message))


async def serve(
    app: web.Application, ssl_context: ssl.SSLContext, host: str, port: int
) -> web.AppRunner:
    """``app`` listening on ``host:port`` with TLS (port 0 picks a free one); stop it with
    ``runner.cleanup()``."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def bound_port(runner: web.AppRunner | None, what: str) -> int:
    """The TCP port ``runner`` listens on."""
    for address in [] if runner is None else runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    raise RuntimeError(f"the {what} listener is not bound")
