"""Local control API of the miner: HTTP/JSON on a Unix socket, for operators and tests.

The socket is ``<runtime dir>/control.sock`` (``$RUNTIME_DIRECTORY`` under systemd, else the state
directory), mode 0660, and every request's peer is checked with ``SO_PEERCRED``: only root and
the miner's own uid are served (403 otherwise), whatever the file mode lets through.

Endpoints:

``GET /status``
    ``{"status": "<one line>", "online": n, "enrolled": n, "hotkey": ss58, "validators":
    [{"hotkey", "uid", "url", "state", "since", "sessions", "failures", "last_error",
    "retry_in_s"}, ...]}`` (one entry per permitted validator the miner dials)
``GET /workers``
    every enrolled worker from the registry, with ``online`` (registry) and ``connected`` (a live
    link right now), devices and counters.
``DELETE /workers/{worker_id}``
    retire a worker: unpin its key (it must enroll again) and close its connection.
``POST /challenge`` ``{"worker_id", "device_uuid", "n", "precision"?, "k"?, "m"?,
"deadline_s"?}``
    a self-test through the relay, exactly as a validator would run it: fresh random seed, commit,
    reveal of ``k`` (16) sampled rows, verification with ``core.challenge.verify`` (in a thread),
    release. Answers the root, timings and the verdict; relay refusals are answered with their
    wire error code (``{"error": "DEVICE_BUSY", "code": 3001, "message": ...}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import msgspec
from aiohttp import web

from ..core import wire
from ..core.challenge import ChallengeError, ChallengeSpec, draw_sample, verify
from ..core.challenge.spec import MAX_SAMPLE_COLUMNS, MAX_SAMPLE_ROWS
from ..core.logs import log_fields
from .registry import WorkerRecord, WorkerRegistry
from .relay import RelayError, WorkerConnections
from .uplink import ValidatorStatus

__all__ = [
    "CONTROL_SOCKET_NAME",
    "ControlServer",
    "default_control_path",
    "peer_uid",
]

log = logging.getLogger(__name__)

CONTROL_SOCKET_NAME = "control.sock"
SOCKET_MODE = 0o660
MAX_BODY_BYTES = 64 * 1024
DEFAULT_REVEAL_ROWS = 16
DEFAULT_REVEAL_COLUMNS = 8
DEFAULT_DEADLINE_S = 120.0
_UCRED = struct.Struct("iII")  # struct ucred: pid_t pid, uid_t uid, gid_t gid

_HTTP_STATUS: dict[wire.ErrorCode, int] = {
    wire.ErrorCode.WORKER_OFFLINE: 503,
    wire.ErrorCode.DEVICE_UNKNOWN: 404,
    wire.ErrorCode.DEVICE_BUSY: 409,
    wire.ErrorCode.DEVICE_LEASED: 409,
    wire.ErrorCode.CHALLENGE_EXPIRED: 504,
    wire.ErrorCode.SHUTTING_DOWN: 503,
}


def default_control_path(state_dir: str | Path, environ: Mapping[str, str] | None = None) -> Path:
    """``$RUNTIME_DIRECTORY/control.sock`` (the first entry) or ``<state_dir>/control.sock``."""
    env = os.environ if environ is None else environ
    runtime = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return Path(runtime or state_dir) / CONTROL_SOCKET_NAME


def peer_uid(request: web.Request) -> int | None:
    """The uid of the process at the other end of the Unix socket (``SO_PEERCRED``)."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    _pid, uid, _gid = _UCRED.unpack(raw)
    return int(uid)


class ChallengeBody(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    worker_id: wire.WorkerId
    device_uuid: wire.DeviceUuid
    n: wire.MatrixSize
    precision: wire.Precision = "fp32"
    k: Annotated[int, msgspec.Meta(ge=1, le=MAX_SAMPLE_ROWS)] = DEFAULT_REVEAL_ROWS
    m: Annotated[int, msgspec.Meta(ge=1, le=MAX_SAMPLE_COLUMNS)] = DEFAULT_REVEAL_COLUMNS
    deadline_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = DEFAULT_DEADLINE_S


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(data), status=status, content_type="application/json"
    )


def _error(status: int, error: str, message: str, code: int | None = None) -> web.Response:
    body: dict[str, Any] = {"error": error, "message": message}
    if code is not None:
        body["code"] = code
    return _json(body, status)


def _worker_json(record: WorkerRecord, connections: WorkerConnections) -> dict[str, Any]:
    link = connections.get(record.worker_id)
    inventory = link.inventory if link is not None else record.inventory
    heartbeat = link.heartbeat if link is not None else None
    out: dict[str, Any] = {
        "worker_id": record.worker_id,
        "online": record.online,
        "connected": link is not None,
        "agent_version": record.agent_version,
        "enrolled_at": record.enrolled_at,
        "last_seen": record.last_seen,
        "challenges_ok": record.challenges_ok,
        "challenges_failed": record.challenges_failed,
        "devices": sorted(connections.devices(record.worker_id)) if link is not None else [],
        "busy_devices": sorted(link.busy_devices) if link is not None else [],
        "inventory": msgspec.to_builtins(inventory) if inventory is not None else None,
    }
    if heartbeat is not None:
        out["load1"] = heartbeat.load1
        out["uptime_s"] = heartbeat.uptime_s
    return out


class ControlServer:
    """aiohttp app of the control API, served on a Unix socket."""

    def __init__(
        self,
        *,
        registry: WorkerRegistry,
        connections: WorkerConnections,
        miner_hotkey: str,
        path: str | Path,
        allowed_uids: frozenset[int] | None = None,
        status: Callable[[], str] | None = None,
        close_worker: Callable[[str], Awaitable[object]] | None = None,
        validators: Callable[[], Sequence[ValidatorStatus]] | None = None,
    ) -> None:
        """``close_worker(worker_id)`` closes a retired worker's connection (the server's);
        ``validators()`` lists the validator links (the uplinks')."""
        self.registry = registry
        self.connections = connections
        self.miner_hotkey = miner_hotkey
        self.path = Path(path)
        self.allowed_uids = (
            allowed_uids if allowed_uids is not None else frozenset({0, os.getuid()})
        )
        self._status = status
        self._close_worker = close_worker
        self._validators = validators
        self._runner: web.AppRunner | None = None
        self.app = web.Application(middlewares=[self._peer_check], client_max_size=MAX_BODY_BYTES)
        self.app.router.add_get("/status", self._get_status)
        self.app.router.add_get("/workers", self._get_workers)
        self.app.router.add_delete("/workers/{worker_id}", self._delete_worker)
        self.app.router.add_post("/challenge", self._post_challenge)

    async def start(self) -> None:
        """Bind ``path`` (replacing a stale socket, never another kind of file), mode 0660."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(self.path.lstat().st_mode):
                raise FileExistsError(f"{self.path} exists and is not a socket")
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.path))
            # Before listen(): nobody can connect while the mode is still the umask's.
            self.path.chmod(SOCKET_MODE)
        except BaseException:
            sock.close()
            raise
        self._runner = web.AppRunner(self.app, shutdown_timeout=2.0, access_log=None)
        await self._runner.setup()
        site = web.SockSite(self._runner, sock)
        await site.start()
        log.info("control API on %s", self.path)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(self.path.lstat().st_mode):
                self.path.unlink()

    # ------------------------------------------------------------------ handlers

    @web.middleware
    async def _peer_check(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        uid = peer_uid(request)
        if uid is None or uid not in self.allowed_uids:
            log.warning("control request refused for uid %s", uid)
            return _error(403, "FORBIDDEN", "only root and the miner's own user may use this API")
        return await handler(request)

    async def _get_status(self, request: web.Request) -> web.Response:
        return _json(
            {
                "status": self._status() if self._status is not None else "",
                "online": len(self.connections),
                "enrolled": self.registry.count(),
                "hotkey": self.miner_hotkey,
                "validators": msgspec.to_builtins(
                    list(self._validators()) if self._validators is not None else []
                ),
            }
        )

    async def _get_workers(self, request: web.Request) -> web.Response:
        records = self.registry.workers()
        return _json([_worker_json(r, self.connections) for r in records])

    async def _delete_worker(self, request: web.Request) -> web.Response:
        worker_id = request.match_info["worker_id"]
        if not self.registry.remove(worker_id):
            return _error(404, "NOT_FOUND", f"no enrolled worker {worker_id}")
        log.info("worker removed by operator", extra=log_fields(worker_id=worker_id))
        if self._close_worker is not None and worker_id in self.connections:
            await self._close_worker(worker_id)
        return _json({"removed": worker_id})

    async def _post_challenge(self, request: web.Request) -> web.Response:
        try:
            body = msgspec.json.decode(await request.read(), type=ChallengeBody)
        except msgspec.DecodeError as exc:
            return _error(400, "BAD_REQUEST", str(exc))
        k = min(body.k, body.n)
        m = min(body.m, body.n)
        try:
            spec = ChallengeSpec(
                challenge_id=secrets.token_bytes(16),
                seed=secrets.token_bytes(32),
                miner_hotkey=self.miner_hotkey,
                worker_id=body.worker_id,
                device_uuid=body.device_uuid,
                n=body.n,
                precision=body.precision,
            )
        except (ChallengeError, msgspec.ValidationError) as exc:
            return _error(400, "BAD_REQUEST", str(exc))
        try:
            return _json(await self._run_challenge(spec, k, m, body.deadline_s))
        except RelayError as exc:
            return _error(_HTTP_STATUS.get(exc.code, 502), exc.code.name, exc.message, exc.code)

    async def _run_challenge(
        self, spec: ChallengeSpec, k: int, m: int, deadline_s: float
    ) -> dict[str, Any]:
        worker_id, device = spec.worker_id, spec.device_uuid
        request = wire.ChallengeRequest.from_spec(spec, deadline_ms=max(1, int(deadline_s * 1000)))
        start = time.perf_counter()
        try:
            commit = await self.connections.challenge(worker_id, request)
            committed = time.perf_counter()
            sample = draw_sample(spec.n, k, m)
            reveal = await self.connections.reveal(
                worker_id,
                wire.RevealRequest(
                    challenge_id=spec.challenge_id, device_uuid=device, rows=list(sample.rows)
                ),
                timeout=max(10.0, deadline_s / 4),
            )
            revealed = time.perf_counter()
        finally:
            with contextlib.suppress(Exception):
                await self.connections.release(worker_id, spec.challenge_id)
        rows = {row.index: (row.values, row.path) for row in reveal.rows}
        verdict = await asyncio.to_thread(verify, spec, commit.merkle_root, sample, rows)
        verified = time.perf_counter()
        commit_s = committed - start
        log.info(
            "self-test challenge %s",
            "passed" if verdict.ok else f"FAILED ({verdict.reason})",
            extra=log_fields(worker_id=worker_id, device_uuid=device, n=spec.n),
        )
        return {
            "worker_id": worker_id,
            "device_uuid": device,
            "n": spec.n,
            "precision": spec.precision,
            "challenge_id": spec.challenge_id.hex(),
            "root": commit.merkle_root.hex(),
            "worker_elapsed_ms": commit.elapsed_ms,
            "timings": {
                "commit_s": commit_s,
                "reveal_s": revealed - committed,
                "verify_s": verified - revealed,
                "total_s": verified - start,
            },
            "gflops": spec.flops / commit_s / 1e9 if commit_s > 0 else None,
            "rows": list(sample.rows),
            "verdict": {
                "ok": verdict.ok,
                "reason": verdict.reason,
                "detail": verdict.detail,
                "rows_checked": verdict.rows_checked,
                "entries_checked": verdict.entries_checked,
            },
        }
