"""Relay of challenges from the miner to its live workers, with correlation ids and deadlines.

:class:`WorkerConnections` holds one :class:`WorkerLink` per connected, registered worker (the
server attaches a link after ``Register`` and detaches it when the socket goes). Callers (the
local control API today, the validator link later) use four coroutines:

* :meth:`WorkerConnections.challenge` sends a ``ChallengeRequest`` and returns the worker's
  ``ChallengeCommit``;
* :meth:`WorkerConnections.reveal` sends a ``RevealRequest`` and returns the ``ChallengeReveal``;
* :meth:`WorkerConnections.release` frees a held result (fire and forget);
* :meth:`WorkerConnections.echo` measures the miner<->worker round trip (``Ping``/``Pong``).

Every request carries a fresh non-zero frame id; the worker's answer (or ``Error``) repeats it and
the connection's receive loop resolves the waiting future through :meth:`WorkerLink.deliver`.
Every request has a deadline. Every refusal is a :class:`RelayError` whose ``code`` is the
``wire.ErrorCode`` a validator-facing caller puts into a ``DeviceFailure``:

=====================  ====================================================================
``WORKER_OFFLINE``     no live connection, or it went away while the request was pending
``DEVICE_UNKNOWN``     the device is not in the worker's inventory
``DEVICE_LEASED``      ``is_leased(worker_id, device_uuid)`` says the device is rented out (by
                       default: the worker's last heartbeat lists it in ``leased_devices``)
``DEVICE_BUSY``        a challenge is already in flight on that device
``CHALLENGE_EXPIRED``  no answer before the deadline
(worker's code)        the worker answered with ``Error`` (e.g. ``CHALLENGE_UNKNOWN``)
=====================  ====================================================================

The miner checks busy and leased devices *before* anything is sent, so a challenge never reaches
a rented or computing device. A device stays busy from the request until the commit (or error)
arrives; after a timeout it stays busy until the late answer comes or ``late_grace_s`` passes,
because the worker's thread is still computing and a second request would only be refused.

The validator-facing relay plugs in here: ``DeviceChallenge.request()`` and
``DeviceRevealRequest.request()`` build the worker messages, ``RelayError.code`` becomes
``DeviceFailure.code``, and ``is_leased`` defaults to what the workers' heartbeats say
(:attr:`WorkerLink.leased_devices`).

Requests also travel up: a worker's ``GatewayEnrollRequest`` asks the validators for a gateway
enrollment token. :meth:`WorkerConnections.gateway_grant` hands it to the source the validator
links register with :meth:`WorkerConnections.set_gateway_tokens`; without one (no validator
links) the answer is ``NO_VALIDATOR``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Protocol, TypeVar

from ..core import wire
from ..core.channel import ChannelClosed

__all__ = [
    "CPU_DEVICE_UUID",
    "GatewayTokenSource",
    "IsLeased",
    "RelayError",
    "WorkerConnections",
    "WorkerLink",
    "inventory_devices",
]

log = logging.getLogger(__name__)

CPU_DEVICE_UUID = wire.CPU_DEVICE
"""The worker's CPU prover. The inventory lists GPUs only; every worker can compute on its CPU."""

DEFAULT_ECHO_TIMEOUT_S = 5.0
DEFAULT_LATE_GRACE_S = 60.0
_DEADLINE_SLACK_S = 5.0  # transfer and scheduling on top of the worker's own deadline

IsLeased = Callable[[str, str], bool]
"""``is_leased(worker_id, device_uuid)``: True while the device is rented out."""

GatewayTokenSource = Callable[[str], Awaitable[wire.GatewayGrant]]
"""``source(worker_id)``: a validator's gateway grant for that worker, or :class:`RelayError`."""

_M = TypeVar("_M", bound=wire.Message)


class RelayError(wire.CodedError):
    """A request the relay refused or the worker failed; ``code`` is the wire error code."""

    def __init__(
        self,
        code: wire.ErrorCode,
        message: str,
        *,
        worker_id: str = "",
        device_uuid: str | None = None,
    ) -> None:
        super().__init__(code, message)
        self.args = (f"{code.name}: {message}",)
        self.worker_id = worker_id
        self.device_uuid = device_uuid


class Sender(Protocol):
    """What the relay needs from a connection (``core.channel.Channel`` satisfies it)."""

    async def send(self, msg: wire.Message, *, id: int = 0) -> None: ...

    async def close(self, code: int = ..., reason: str = "") -> None: ...


def inventory_devices(inventory: wire.Inventory | None) -> frozenset[str]:
    """Devices a worker can be challenged on: its GPUs and its CPU prover."""
    gpus = inventory.gpus if inventory is not None else []
    return frozenset({CPU_DEVICE_UUID, *(gpu.uuid for gpu in gpus)})


class _Pending:
    __slots__ = ("device", "expect", "future", "kind")

    def __init__(
        self,
        future: asyncio.Future[wire.Message],
        expect: type[wire.Message],
        kind: str,
        device: str | None,
    ) -> None:
        self.future = future
        self.expect = expect
        self.kind = kind
        self.device = device


class WorkerLink:
    """One live, registered worker connection and the requests waiting on it."""

    def __init__(
        self,
        worker_id: str,
        channel: Sender,
        inventory: wire.Inventory,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.worker_id = worker_id
        self.channel = channel
        self.inventory = inventory
        self.last_heartbeat = clock()
        """``clock()`` time of registration or of the last heartbeat."""
        self.heartbeat: wire.Heartbeat | None = None
        self._clock = clock
        self._pending: dict[int, _Pending] = {}
        # Timed-out requests the worker may still answer: their device, and the grace timer.
        self._late: dict[int, tuple[str | None, asyncio.TimerHandle]] = {}
        self._closed: RelayError | None = None

    def __repr__(self) -> str:
        return f"WorkerLink({self.worker_id}, pending={len(self._pending)})"

    @property
    def closed(self) -> bool:
        return self._closed is not None

    @property
    def busy_devices(self) -> frozenset[str]:
        """Devices with a challenge in flight (or timed out and not yet answered)."""
        pending = (item.device for item in self._pending.values())
        late = (device for device, _timer in self._late.values())
        return frozenset(d for d in (*pending, *late) if d is not None)

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def leased_devices(self) -> frozenset[str]:
        """GPUs the last heartbeat says are in leased VMs, of those the inventory lists (a
        worker cannot mark another worker's or an invented device)."""
        if self.heartbeat is None or not self.heartbeat.leased_devices:
            return frozenset()
        listed = {gpu.uuid for gpu in self.inventory.gpus}
        return frozenset(uuid for uuid in self.heartbeat.leased_devices if uuid in listed)

    def record_heartbeat(self, heartbeat: wire.Heartbeat) -> None:
        self.heartbeat = heartbeat
        self.last_heartbeat = self._clock()

    def deliver(self, frame: wire.Frame) -> bool:
        """Resolve the request this frame answers; False if it answers nothing pending."""
        msg = frame.msg
        key = frame.id
        if isinstance(msg, wire.Error) and key not in self._pending:
            key = msg.ref
        elif isinstance(msg, wire.Pong) and key not in self._pending:
            key = msg.nonce  # a worker may answer a Ping with id 0: the nonce is the id too
        pending = self._pending.pop(key, None) if key else None
        if pending is None:
            if key and key in self._late:
                self._finish_late(key)
                log.debug("late answer %s to request %d dropped", type(msg).__name__, key)
                return True
            return False
        if pending.future.done():
            return True
        if isinstance(msg, wire.Error):
            pending.future.set_exception(
                RelayError(
                    msg.code,
                    msg.message or "refused by the worker",
                    worker_id=self.worker_id,
                    device_uuid=pending.device,
                )
            )
        elif isinstance(msg, pending.expect):
            pending.future.set_result(msg)
        else:
            pending.future.set_exception(
                RelayError(
                    wire.ErrorCode.UNEXPECTED_MESSAGE,
                    f"worker answered a {pending.kind} with {type(msg).__name__}",
                    worker_id=self.worker_id,
                    device_uuid=pending.device,
                )
            )
        return True

    def fail(self, code: wire.ErrorCode, message: str) -> None:
        """The link is gone: fail every pending request now (idempotent)."""
        if self._closed is None:
            self._closed = RelayError(code, message, worker_id=self.worker_id)
        pending, self._pending = self._pending, {}
        for item in pending.values():
            if not item.future.done():
                item.future.set_exception(
                    RelayError(code, message, worker_id=self.worker_id, device_uuid=item.device)
                )
        late, self._late = self._late, {}
        for _device, timer in late.values():
            timer.cancel()

    def _register(self, cid: int, item: _Pending) -> None:
        if self._closed is not None:
            raise RelayError(
                self._closed.code,
                self._closed.message,
                worker_id=self.worker_id,
                device_uuid=item.device,
            )
        self._pending[cid] = item

    def _unregister(self, cid: int, *, timed_out: bool, grace: float) -> None:
        item = self._pending.pop(cid, None)
        if item is None:
            return
        if timed_out and self._closed is None:
            # Keep the device busy: the worker is still computing and will answer late.
            timer = asyncio.get_running_loop().call_later(grace, self._finish_late, cid)
            self._late[cid] = (item.device, timer)

    def _finish_late(self, cid: int) -> None:
        late = self._late.pop(cid, None)
        if late is not None:
            late[1].cancel()


class WorkerConnections:
    """Live worker links by worker id, and the request/response relay over them."""

    def __init__(
        self,
        *,
        is_leased: IsLeased | None = None,
        devices_of: Callable[[wire.Inventory | None], frozenset[str]] = inventory_devices,
        late_grace_s: float = DEFAULT_LATE_GRACE_S,
        on_outcome: Callable[[str, bool], None] | None = None,
    ) -> None:
        """``on_outcome(worker_id, ok)`` is told when a challenge ends on the worker's side:
        ok when its reveal arrived, not ok when the worker refused, failed or timed out.
        ``is_leased`` defaults to the live worker's heartbeat (:meth:`leased_by_heartbeat`)."""
        self.is_leased: IsLeased = is_leased or self.leased_by_heartbeat
        self._devices_of = devices_of
        self._late_grace = late_grace_s
        self._on_outcome = on_outcome
        self._links: dict[str, WorkerLink] = {}
        self._token_source: GatewayTokenSource | None = None
        # Frame ids unique across all connections: random start, never 0, fits an int63.
        self._ids = itertools.count(secrets.randbelow(2**40) + 1)

    # ------------------------------------------------------------------ links

    def attach(self, link: WorkerLink) -> WorkerLink | None:
        """Make ``link`` the worker's live connection; returns the one it replaces (if any),
        whose pending requests have been failed (the caller closes its socket)."""
        old = self._links.get(link.worker_id)
        self._links[link.worker_id] = link
        if old is not None and old is not link:
            old.fail(wire.ErrorCode.WORKER_OFFLINE, "replaced by a newer connection")
            return old
        return None

    def detach(self, link: WorkerLink, reason: str = "worker disconnected") -> bool:
        """Forget ``link`` and fail its pending requests; True if it was the live connection."""
        link.fail(wire.ErrorCode.WORKER_OFFLINE, reason)
        if self._links.get(link.worker_id) is link:
            del self._links[link.worker_id]
            return True
        return False

    def get(self, worker_id: str) -> WorkerLink | None:
        return self._links.get(worker_id)

    def links(self) -> list[WorkerLink]:
        return list(self._links.values())

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self._links

    def __len__(self) -> int:
        return len(self._links)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._links))

    def devices(self, worker_id: str) -> frozenset[str]:
        """Challengeable devices of a live worker (empty when offline)."""
        link = self._links.get(worker_id)
        return self._devices_of(link.inventory) if link is not None else frozenset()

    def leased_by_heartbeat(self, worker_id: str, device_uuid: str) -> bool:
        """True when the live worker's last heartbeat lists the device as leased."""
        link = self._links.get(worker_id)
        return link is not None and device_uuid in link.leased_devices

    def busy_devices(self, worker_id: str) -> frozenset[str]:
        """Devices of a live worker with a challenge in flight (empty when offline)."""
        link = self._links.get(worker_id)
        return link.busy_devices if link is not None else frozenset()

    def check_device(self, worker_id: str, device_uuid: str) -> WorkerLink:
        """The live link, if a challenge may go to that device now; else :class:`RelayError`."""
        link = self._live(worker_id, device_uuid)
        if device_uuid not in self._devices_of(link.inventory):
            raise RelayError(
                wire.ErrorCode.DEVICE_UNKNOWN,
                f"worker {worker_id} has no device {device_uuid!r}",
                worker_id=worker_id,
                device_uuid=device_uuid,
            )
        if self.is_leased(worker_id, device_uuid):
            raise RelayError(
                wire.ErrorCode.DEVICE_LEASED,
                f"device {device_uuid} is leased",
                worker_id=worker_id,
                device_uuid=device_uuid,
            )
        if device_uuid in link.busy_devices:
            raise RelayError(
                wire.ErrorCode.DEVICE_BUSY,
                f"device {device_uuid} already has a challenge in flight",
                worker_id=worker_id,
                device_uuid=device_uuid,
            )
        return link

    def _live(self, worker_id: str, device_uuid: str | None = None) -> WorkerLink:
        link = self._links.get(worker_id)
        if link is None or link.closed:
            raise RelayError(
                wire.ErrorCode.WORKER_OFFLINE,
                f"worker {worker_id} is not connected",
                worker_id=worker_id,
                device_uuid=device_uuid,
            )
        return link

    def fail_all(self, code: wire.ErrorCode, message: str) -> None:
        """Fail every pending request on every link (shutdown)."""
        for link in list(self._links.values()):
            link.fail(code, message)

    # ------------------------------------------------------------------ requests

    async def challenge(
        self,
        worker_id: str,
        request: wire.ChallengeRequest,
        timeout: float | None = None,  # noqa: ASYNC109 - a deadline is part of the request
    ) -> wire.ChallengeCommit:
        """Forward ``request`` to the worker and return its commit.

        ``timeout`` defaults to the request's own deadline plus a few seconds of transfer.
        """
        device = request.device_uuid
        link = self.check_device(worker_id, device)
        wait = timeout if timeout is not None else request.deadline_ms / 1000 + _DEADLINE_SLACK_S
        try:
            commit = await self._request(
                link, request, wire.ChallengeCommit, "challenge", wait, device=device
            )
        except RelayError as exc:
            if exc.code is not wire.ErrorCode.WORKER_OFFLINE:
                self._outcome(worker_id, ok=False)
            raise
        if commit.challenge_id != request.challenge_id or commit.device_uuid != device:
            self._outcome(worker_id, ok=False)
            raise RelayError(
                wire.ErrorCode.CHALLENGE_INVALID,
                "the commit names another challenge or device",
                worker_id=worker_id,
                device_uuid=device,
            )
        return commit

    async def reveal(
        self,
        worker_id: str,
        request: wire.RevealRequest,
        timeout: float,  # noqa: ASYNC109 - a deadline is part of the request
    ) -> wire.ChallengeReveal:
        """Ask the worker for the sampled rows of a committed challenge."""
        link = self._live(worker_id, request.device_uuid)
        try:
            reveal = await self._request(link, request, wire.ChallengeReveal, "reveal", timeout)
        except RelayError as exc:
            if exc.code is not wire.ErrorCode.WORKER_OFFLINE:
                self._outcome(worker_id, ok=False)
            raise
        if reveal.challenge_id != request.challenge_id or reveal.device_uuid != request.device_uuid:
            self._outcome(worker_id, ok=False)
            raise RelayError(
                wire.ErrorCode.CHALLENGE_INVALID,
                "the reveal names another challenge or device",
                worker_id=worker_id,
                device_uuid=request.device_uuid,
            )
        self._outcome(worker_id, ok=True)
        return reveal

    async def release(self, worker_id: str, challenge_id: bytes) -> bool:
        """Tell the worker to free a result; False when it is offline (it frees it on its own)."""
        link = self._links.get(worker_id)
        if link is None or link.closed:
            return False
        try:
            await link.channel.send(wire.ChallengeRelease(challenge_id=challenge_id))
        except ChannelClosed:
            return False
        return True

    async def echo(
        self,
        worker_id: str,
        timeout: float = DEFAULT_ECHO_TIMEOUT_S,  # noqa: ASYNC109 - a deadline is part of the request
    ) -> float:
        """Round trip miner -> worker -> miner in seconds (``Ping``/``Pong``)."""
        link = self._live(worker_id)
        cid = next(self._ids)
        start = time.perf_counter()
        await self._request(link, wire.Ping(nonce=cid), wire.Pong, "ping", timeout, cid=cid)
        return time.perf_counter() - start

    async def _request(
        self,
        link: WorkerLink,
        msg: wire.Message,
        expect: type[_M],
        kind: str,
        wait_s: float,
        *,
        device: str | None = None,
        cid: int | None = None,
    ) -> _M:
        cid = cid if cid is not None else next(self._ids)
        future: asyncio.Future[wire.Message] = asyncio.get_running_loop().create_future()
        link._register(cid, _Pending(future, expect, kind, device))
        timed_out = False
        try:
            try:
                await link.channel.send(msg, id=cid)
            except ChannelClosed as exc:
                raise RelayError(
                    wire.ErrorCode.WORKER_OFFLINE,
                    f"connection lost: {exc.reason}",
                    worker_id=link.worker_id,
                    device_uuid=device,
                ) from None
            except wire.WireError as exc:  # a message we may not send: a local bug
                raise RelayError(
                    wire.ErrorCode.INTERNAL, str(exc), worker_id=link.worker_id, device_uuid=device
                ) from None
            try:
                async with asyncio.timeout(wait_s):
                    answer = await asyncio.shield(future)
            except TimeoutError:
                timed_out = True
                raise RelayError(
                    wire.ErrorCode.CHALLENGE_EXPIRED,
                    f"no answer to the {kind} within {wait_s:g} s",
                    worker_id=link.worker_id,
                    device_uuid=device,
                ) from None
        finally:
            link._unregister(cid, timed_out=timed_out, grace=self._late_grace)
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: no "never retrieved" warning
            else:
                future.cancel()
        assert isinstance(answer, expect)
        return answer

    # ------------------------------------------------------------------ gateway enrollment

    def set_gateway_tokens(self, source: GatewayTokenSource | None) -> None:
        """Where :meth:`gateway_grant` gets tokens (the validator links); None: nowhere."""
        self._token_source = source

    async def gateway_grant(self, worker_id: str) -> wire.GatewayGrant:
        """A gateway enrollment token for ``worker_id`` from the validators.

        ``worker_id`` must be the worker's authenticated id (the server passes its session's),
        so a worker can only ever obtain tokens bound to itself.
        """
        source = self._token_source
        if source is None:
            raise RelayError(
                wire.ErrorCode.NO_VALIDATOR,
                "this miner has no validator links to ask for a gateway token",
                worker_id=worker_id,
            )
        return await source(worker_id)

    def _outcome(self, worker_id: str, *, ok: bool) -> None:
        if self._on_outcome is None:
            return
        try:
            self._on_outcome(worker_id, ok)
        except Exception:
            log.exception("recording a challenge outcome failed")
