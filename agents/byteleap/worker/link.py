"""The worker's link to its miner: dial, enroll, register, then serve until the link drops.

One :class:`WorkerLink` owns the connection loop of docs/worker-miner.md:

1. dial the miner (``ws://``, or ``wss://`` with the certificate's SHA-256 fingerprint pinned)
   and run the secure-session handshake (:func:`byteleap.core.channel.dial`); the miner's sr25519
   hotkey must be the configured one, or else the one pinned in ``<state_dir>/miner.pin`` (trust
   on first use: the first miner that acknowledges our registration is pinned, any other hotkey is
   refused afterwards with one clear log line);
2. send ``EnrollProof`` (HMAC-SHA256 of the channel binding under the enrollment secret: the
   secret never crosses the wire) and ``Register`` with the current inventory, and wait for
   ``RegisterAck``;
3. steady state, concurrently: heartbeats (``collect_live`` in a thread, and the GPUs leased
   VMs hold from ``leased_devices``) every ``min(configured, miner's)`` interval, an
   ``InventoryUpdate`` only when the inventory fingerprint changes, and the receive loop that
   serves challenges (each in its own task, so the loop keeps receiving), reveals, releases and
   pings;
4. on any disconnect: one log line with the reason, then a full-jitter exponential backoff and
   back to 1. The backoff grows while attempts fail and starts again from
   ``reconnect_initial_s`` when a registered session ends (a restarted miner gets its workers
   back within seconds), unless sessions keep ending quickly (flap protection: the second
   session in a row that lasted less than ``stable_after_s`` does not reset it).

Results of challenges survive reconnects (a miner may still ask for the reveal); the runner frees
them on ``ChallengeRelease`` or when their time to live runs out (swept periodically, connected or
not). Clocks, sleeping, randomness and the inventory collectors are injectable for tests.

The worker also asks the miner something: :meth:`WorkerLink.request_gateway_grant` sends
``GatewayEnrollRequest`` (a fresh frame id) once a session is registered and waits for the
``GatewayEnrollGrant`` or ``Error`` that repeats the id; the grant must name this worker.
Failures are :class:`MinerRequestError` (with the miner's code when it answered one).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
import msgspec

from byteleap import __version__
from byteleap.core import wire
from byteleap.core.backoff import Backoff
from byteleap.core.channel import (
    Channel,
    ChannelClosed,
    CloseCode,
    closed_text,
    dial,
)
from byteleap.core.credentials import enrollment_mac
from byteleap.core.files import PrivateFileError, read_private_file, write_new_file
from byteleap.core.identity import IdentityKind, PeerIdentity, WorkerKey
from byteleap.core.logs import log_fields

from . import inventory as inventory_mod
from .challenges import ChallengeRefusedError, ChallengeRunner
from .config import WorkerConfig
from .reconnect import ReconnectLoop, first_to_end

__all__ = [
    "GATEWAY_GRANT_TIMEOUT_S",
    "PIN_FILE",
    "PROLOGUE",
    "Backoff",
    "LinkSettings",
    "LinkState",
    "LinkStatus",
    "MinerRequestError",
    "WorkerLink",
    "read_pin",
    "write_pin",
]

log = logging.getLogger(__name__)
_PEER = "miner"  # who closed on us, in log phrases

PROLOGUE: Final = wire.WORKER_MINER_PROLOGUE
PIN_FILE: Final = "miner.pin"
_SHUTDOWN_REASON: Final = "worker shutting down"
_ROTATE_MARGIN_S: Final = 60.0  # reconnect this long before the session's maximum age
_PIN_MAX_BYTES: Final = 256  # one ss58 address and a newline
_REFUSED: Final = "refused by miner"
GATEWAY_GRANT_TIMEOUT_S: Final = 60.0
"""The miner tries its validators for up to 45 s; this leaves room for the way there and back."""


# --------------------------------------------------------------------------------------------
# Settings, status, backoff


@dataclasses.dataclass(frozen=True, slots=True)
class LinkSettings:
    """What the link needs from the configuration (tests build it directly, with tiny times)."""

    url: str
    tls_fingerprint: bytes | None = None
    """SHA-256 of the miner's DER certificate (``wss://`` only)."""
    miner_hotkey: str | None = None
    """Configured miner hotkey (ss58); ``None``: trust on first use, pinned in the state dir."""
    connect_timeout_s: float = 10.0
    """Bounds the TCP/TLS connection and the handshake together."""
    register_timeout_s: float = 10.0
    """How long to wait for ``RegisterAck`` after sending ``Register``."""
    reconnect_initial_s: float = 1.0
    reconnect_max_s: float = 10.0
    stable_after_s: float = 60.0
    """Sessions shorter than this are quick: the second quick one in a row does not reset the
    backoff (a miner that keeps dropping its workers is not hammered)."""
    heartbeat_interval_s: float = 30.0
    inventory_interval_s: float = 60.0
    sweep_interval_s: float = 10.0
    close_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        scheme = urlsplit(self.url).scheme
        if scheme not in ("ws", "wss"):
            raise ValueError(f"miner.url: must be ws:// or wss://, got {self.url!r}")
        if self.tls_fingerprint is not None:
            if len(self.tls_fingerprint) != 32:
                raise ValueError("miner.tls_fingerprint: must be a SHA-256 digest (32 bytes)")
            if scheme != "wss":
                raise ValueError("miner.tls_fingerprint: is only used with a wss:// miner.url")
        for name in (
            "connect_timeout_s",
            "register_timeout_s",
            "reconnect_initial_s",
            "reconnect_max_s",
            "heartbeat_interval_s",
            "inventory_interval_s",
            "sweep_interval_s",
            "close_timeout_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        Backoff(self.reconnect_initial_s, self.reconnect_max_s)  # refuses max < initial

    @classmethod
    def from_config(cls, cfg: WorkerConfig) -> LinkSettings:
        """Settings from the worker config. Raises ``ValueError`` naming the bad key."""
        miner = cfg.miner
        fingerprint = None
        if miner.tls_fingerprint is not None:
            fingerprint = bytes.fromhex(miner.tls_fingerprint.replace(":", ""))
        if miner.hotkey is not None:
            try:
                PeerIdentity.from_ss58(miner.hotkey)
            except ValueError:
                raise ValueError(
                    f"miner.hotkey: {miner.hotkey!r} is not a valid ss58 address"
                ) from None
        return cls(
            url=miner.url,
            tls_fingerprint=fingerprint,
            miner_hotkey=miner.hotkey,
            connect_timeout_s=miner.connect_timeout_s,
            register_timeout_s=max(miner.connect_timeout_s, 10.0),
            reconnect_initial_s=miner.reconnect_initial_s,
            reconnect_max_s=miner.reconnect_max_s,
            heartbeat_interval_s=cfg.heartbeat_interval_s,
            sweep_interval_s=min(10.0, cfg.challenge.result_ttl_s / 4),
        )


class LinkState(enum.StrEnum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    """Registered with the miner (``RegisterAck`` received)."""
    WAITING = "waiting"
    """Disconnected or refused; waiting ``retry_in_s`` before the next attempt."""
    STOPPED = "stopped"


@dataclasses.dataclass(frozen=True, slots=True)
class LinkStatus:
    """A snapshot reported to ``on_status`` at every state change."""

    state: LinkState
    url: str
    miner: str | None = None
    """The connected (or last) miner's hotkey, ss58."""
    reason: str | None = None
    """Why the last attempt failed or the last session ended."""
    retry_in_s: float | None = None
    failures: int = 0
    """Consecutive failed attempts (0 while connected)."""
    sessions: int = 0
    """Registrations so far (the first one is the worker's first successful session)."""
    refused: bool = False
    """The miner itself refused the last attempt (closed the handshake or the registration)."""

    @property
    def ever_connected(self) -> bool:
        return self.sessions > 0

    def line(self) -> str:
        """One human line for systemd's STATUS= and logs."""
        if self.state is LinkState.CONNECTED:
            return f"connected to miner {self.miner} at {self.url}"
        if self.state is LinkState.CONNECTING:
            return f"connecting to miner at {self.url}"
        if self.state is LinkState.STOPPED:
            return "stopped"
        retry = f"; retrying in {self.retry_in_s:.1f}s" if self.retry_in_s is not None else ""
        reason = self.reason or "unknown reason"
        if self.refused:
            # The reason of a refusal starts with the same words: say them once, with the url.
            detail = reason.removeprefix(_REFUSED)
            if detail != reason:
                return f"{_REFUSED} at {self.url}{detail}{retry}"
            return f"{_REFUSED} at {self.url}: {reason}{retry}"
        what = "miner link lost" if self.ever_connected else "miner unreachable"
        return f"{what} at {self.url}: {reason}{retry}"


# --------------------------------------------------------------------------------------------
# Enrollment proof and the miner pin


class PinError(Exception):
    """The miner pin file exists but cannot be read or parsed."""


def read_pin(path: Path) -> PeerIdentity | None:
    """The pinned miner identity, ``None`` if nothing is pinned yet.

    The pin decides which miner this worker trusts: like a key, it must be a regular file that
    only its owner can access.
    """
    if not path.exists() and not path.is_symlink():
        return None
    try:
        data = read_private_file(path, _PIN_MAX_BYTES, what="miner pin")
    except PrivateFileError as exc:
        raise PinError(str(exc)) from None
    try:
        return PeerIdentity.from_ss58(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise PinError(
            f"miner pin {path} is corrupted (expected one ss58 address); delete it to trust "
            "the next miner"
        ) from None


def write_pin(path: Path, identity: PeerIdentity) -> bool:
    """Atomically create the pin (mode 0600): the miner's ss58 address on one line.

    Never replaces an existing pin; returns False if there already was one.
    """
    return write_new_file(path, (identity.display + "\n").encode("ascii"))


# --------------------------------------------------------------------------------------------
# Failures


class _LinkDownError(Exception):
    """An attempt failed or a session ended; the message is the reason to log.

    ``refused``: the miner itself closed the handshake or refused the registration.
    """

    def __init__(self, reason: str, *, refused: bool = False) -> None:
        super().__init__(reason)
        self.refused = refused


class MinerRequestError(Exception):
    """A request to the miner got no answer it could use.

    ``code`` is the miner's wire code when it refused (``NO_VALIDATOR``, ``NO_GATEWAY``,
    ``GATEWAY_REFUSED``...); None when the worker never got an answer (not connected in time,
    the link dropped, no answer in time).
    """

    def __init__(self, code: wire.ErrorCode | None, message: str) -> None:
        super().__init__(f"{code.name}: {message}" if code is not None else message)
        self.code = code
        self.message = message


def _internal(exc: Exception) -> wire.CodedError:
    return wire.CodedError(wire.ErrorCode.INTERNAL, f"internal error: {exc}")


# --------------------------------------------------------------------------------------------
# The link


class WorkerLink(ReconnectLoop[LinkStatus]):
    """The connection loop. Run it with :meth:`run`; end it with :meth:`stop`, which closes the
    session with ``GOING_AWAY``."""

    def __init__(
        self,
        settings: LinkSettings,
        *,
        key: WorkerKey,
        secret: bytes,
        runner: ChallengeRunner,
        state_dir: Path,
        collect_inventory: Callable[[], wire.Inventory] = inventory_mod.collect_inventory,
        collect_live: Callable[[], wire.Heartbeat] = inventory_mod.collect_live,
        leased_devices: Callable[[wire.Inventory], list[str]] | None = None,
        initial_inventory: wire.Inventory | None = None,
        on_status: Callable[[LinkStatus], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        agent_version: str = __version__,
    ) -> None:
        super().__init__(LinkStatus(state=LinkState.CONNECTING, url=settings.url), on_status)
        self.settings = settings
        self._key = key
        self._secret = secret
        self._runner = runner
        self._pin_path = Path(state_dir) / PIN_FILE
        self._collect_inventory = collect_inventory
        self._collect_live = collect_live
        self._leased_devices = leased_devices
        self._clock = clock
        self._sleep = sleep
        self._backoff = Backoff(settings.reconnect_initial_s, settings.reconnect_max_s, rng=rng)
        self._agent_version = agent_version
        self._inventory = initial_inventory
        self._inventory_at = clock() if initial_inventory is not None else None
        self._challenge_tasks: set[asyncio.Task[None]] = set()
        self._auth_refusal: str | None = None
        self._peer_error: wire.Error | None = None
        self._expected: PeerIdentity | None = None
        self._trust_source = ""
        self._sent_fingerprint = b""
        self._quick_sessions = 0
        """Registered sessions in a row that lasted at most ``stable_after_s``."""
        self._channel: Channel | None = None
        """The registered session's channel (None between sessions)."""
        self._registered = asyncio.Event()
        self._grant_waits: dict[int, asyncio.Future[wire.GatewayEnrollGrant]] = {}

    # -- public ------------------------------------------------------------------------------
    @property
    def worker_id(self) -> str:
        return self._key.worker_id

    async def request_gateway_grant(
        self,
        timeout_s: float = GATEWAY_GRANT_TIMEOUT_S,
    ) -> wire.GatewayEnrollGrant:
        """Ask the miner for a gateway enrollment token for this worker.

        Waits for a registered session (within ``timeout_s``, which bounds the whole exchange).
        Raises :class:`MinerRequestError`.
        """
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    await self._registered.wait()
                    channel = self._channel
                    if channel is not None:
                        break
                    await asyncio.sleep(0)  # cleared meanwhile: wait for the next session
                frame_id = self._new_request_id()
                future: asyncio.Future[wire.GatewayEnrollGrant] = (
                    asyncio.get_running_loop().create_future()
                )
                self._grant_waits[frame_id] = future
                try:
                    await channel.send(wire.GatewayEnrollRequest(), id=frame_id)
                    grant = await future
                finally:
                    self._grant_waits.pop(frame_id, None)
                    if not future.done():
                        future.cancel()
        except TimeoutError:
            what = "answer" if self._channel is not None else "registered session with the miner"
            raise MinerRequestError(
                None, f"no {what} within {timeout_s:g} s asking for a gateway token"
            ) from None
        except ChannelClosed as exc:
            raise MinerRequestError(
                None, f"the miner link closed while asking for a gateway token: {exc.reason}"
            ) from None
        if grant.worker_id != self._key.worker_id:
            raise MinerRequestError(
                None,
                f"the miner answered with a token for worker {grant.worker_id}, "
                f"not this one ({self._key.worker_id})",
            )
        return grant

    def _new_request_id(self) -> int:
        while True:
            frame_id = secrets.randbits(63)
            if frame_id > 1 and frame_id not in self._grant_waits:  # 1 is Register's
                return frame_id

    def _grant_answer(self, frame: wire.Frame) -> bool:
        """Resolve the request ``frame`` answers; False if it answers none."""
        msg = frame.msg
        keys = [frame.id, msg.ref] if isinstance(msg, wire.Error) else [frame.id]
        for key in keys:
            future = self._grant_waits.get(key) if key else None
            if future is None or future.done():
                continue
            if isinstance(msg, wire.GatewayEnrollGrant):
                future.set_result(msg)
            elif isinstance(msg, wire.Error):
                future.set_exception(MinerRequestError(msg.code, msg.message or "refused"))
            else:
                return False
            return True
        return False

    def _session_ended(self, reason: str) -> None:
        self._channel = None
        self._registered.clear()
        waits, self._grant_waits = self._grant_waits, {}
        for future in waits.values():
            if not future.done():
                future.set_exception(
                    MinerRequestError(None, f"the miner link closed while asking: {reason}")
                )

    # -- the loop ----------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _around_attempts(self) -> AsyncIterator[None]:
        sweeper = asyncio.create_task(self._sweep_loop(), name="worker-sweep")
        try:
            yield
        finally:
            sweeper.cancel()
            await self._cancel_challenges()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper

    def _stopped_status(self) -> LinkStatus:
        return dataclasses.replace(self._status, state=LinkState.STOPPED)

    # -- one attempt -------------------------------------------------------------------------
    async def _attempt(self, http: aiohttp.ClientSession) -> None:
        self._emit(
            dataclasses.replace(
                self._status, state=LinkState.CONNECTING, reason=None, retry_in_s=None
            )
        )
        registered_at: float | None = None
        reason = "session ended"
        refused = False
        try:
            channel = await self._connect(http)
            try:
                ack_interval = await self._register(channel)
                registered_at = self._clock()
                self._on_registered(channel)
                self._channel = channel
                self._registered.set()
                await self._serve(channel, ack_interval)
            finally:
                self._session_ended("stopping" if self._stopping else "reconnecting")
                if self._stopping:
                    await channel.close(CloseCode.GOING_AWAY, _SHUTDOWN_REASON)
                else:
                    await channel.close(CloseCode.NORMAL, "reconnecting")
        except _LinkDownError as exc:
            reason = str(exc)
            refused = exc.refused
        except Exception as exc:  # a bug must not end the worker's only link: back off, retry
            log.exception("miner link: unexpected failure")
            reason = f"internal error: {exc!r}"
        if self._stopping:
            return
        lasted = None if registered_at is None else self._clock() - registered_at
        if lasted is not None:
            quick = lasted <= self.settings.stable_after_s
            self._quick_sessions = self._quick_sessions + 1 if quick else 0
            if self._quick_sessions <= 1:  # not flapping: the miner is likely back soon
                self._backoff.reset()
        delay = self._backoff.next_delay()
        failures = self._status.failures + 1 if lasted is None else 0
        self._emit(
            dataclasses.replace(
                self._status,
                state=LinkState.WAITING,
                reason=reason,
                retry_in_s=delay,
                failures=failures,
                refused=refused,
            )
        )
        fields = log_fields(miner_url=self.settings.url, retry_in_s=round(delay, 2))
        if lasted is None:
            log.warning(
                "miner link: attempt %d failed: %s; retrying in %.1fs",
                failures,
                reason,
                delay,
                extra=fields,
            )
        else:
            log.warning(
                "miner link: disconnected after %.1fs: %s; reconnecting in %.1fs",
                lasted,
                reason,
                delay,
                extra=fields,
            )
        await self._sleep(delay)

    def _authorize(self, peer: PeerIdentity) -> bool:
        expected = self._expected
        if expected is None or peer == expected:
            return True
        self._auth_refusal = (
            f"refusing miner hotkey {peer.display}: this worker trusts only {expected.display} "
            f"({self._trust_source})"
        )
        return False

    async def _connect(self, http: aiohttp.ClientSession) -> Channel:
        self._auth_refusal = None
        self._peer_error = None
        if self.settings.miner_hotkey is not None:
            self._expected = PeerIdentity.from_ss58(self.settings.miner_hotkey)
            self._trust_source = "the configured miner.hotkey"
        else:
            try:
                self._expected = read_pin(self._pin_path)
            except PinError as exc:
                raise _LinkDownError(str(exc)) from None
            self._trust_source = (
                f"pinned in {self._pin_path} on first use; delete that file to trust another miner"
            )
        ssl: aiohttp.Fingerprint | None = None
        if self.settings.tls_fingerprint is not None:
            ssl = aiohttp.Fingerprint(self.settings.tls_fingerprint)
        try:
            return await dial(
                http,
                self.settings.url,
                signer=self._key,
                authorize=self._authorize,
                prologue=PROLOGUE,
                link=wire.Link.WORKER_MINER,
                handshake_timeout=self.settings.connect_timeout_s,
                ssl=ssl,
                peer_kind=IdentityKind.SR25519,
                close_timeout=self.settings.close_timeout_s,
            )
        except ChannelClosed as exc:
            if self._auth_refusal is not None:
                raise _LinkDownError(self._auth_refusal) from None
            if exc.by_peer:
                raise _LinkDownError(
                    f"{_REFUSED} during the handshake with {closed_text(exc, None, _PEER)}",
                    refused=True,
                ) from None
            raise _LinkDownError(f"handshake failed: {exc.reason}") from None
        except aiohttp.ServerFingerprintMismatch as exc:
            raise _LinkDownError(
                f"TLS certificate fingerprint mismatch: the miner presented sha256 "
                f"{exc.got.hex()}, miner.tls_fingerprint is {exc.expected.hex()}"
            ) from None
        except aiohttp.ClientSSLError as exc:
            raise _LinkDownError(f"TLS failed: {exc}") from None
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, ConnectionRefusedError):
                raise _LinkDownError("connection refused") from None
            detail = exc.os_error.strerror or str(exc.os_error) or str(exc)
            raise _LinkDownError(f"cannot connect: {detail}") from None
        except aiohttp.WSServerHandshakeError as exc:
            raise _LinkDownError(
                f"WebSocket upgrade refused: HTTP {exc.status} {exc.message}".rstrip()
            ) from None
        except TimeoutError:
            raise _LinkDownError(
                f"timed out after {self.settings.connect_timeout_s:g}s connecting"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise _LinkDownError(f"connection failed: {exc or type(exc).__name__}") from None

    async def _register(self, channel: Channel) -> float:
        """EnrollProof + Register, wait for the ack; the heartbeat interval the miner asks for."""
        inventory = await self._current_inventory()
        register_id = 1  # the only request this side sends
        try:
            await channel.send(
                wire.EnrollProof(mac=enrollment_mac(self._secret, channel.channel_binding))
            )
            await channel.send(
                wire.Register(
                    worker_id=self._key.worker_id,
                    agent_version=self._agent_version,
                    inventory=inventory,
                ),
                id=register_id,
            )
            self._sent_fingerprint = inventory_mod.inventory_fingerprint(inventory)
            async with asyncio.timeout(self.settings.register_timeout_s):
                while True:
                    frame = await channel.recv()
                    msg = frame.msg
                    if isinstance(msg, wire.RegisterAck):
                        break
                    if isinstance(msg, wire.Ping):
                        await channel.send(wire.Pong(nonce=msg.nonce), id=frame.id)
                    elif isinstance(msg, wire.Error):
                        self._peer_error = msg  # reported with the attempt's failure
                        log.debug(
                            "miner refused the registration: %s: %s",
                            msg.code.name,
                            msg.message,
                        )
                    else:
                        log.warning(
                            "miner sent %s before acknowledging the registration; ignored",
                            type(msg).__name__,
                        )
        except ChannelClosed as exc:
            verb = _REFUSED if exc.by_peer else "registration failed"
            raise _LinkDownError(
                f"{verb} with {closed_text(exc, self._peer_error, _PEER)}", refused=exc.by_peer
            ) from None
        except TimeoutError:
            raise _LinkDownError(
                f"the miner did not acknowledge the registration within "
                f"{self.settings.register_timeout_s:g}s"
            ) from None
        if msg.worker_id != self._key.worker_id:
            raise _LinkDownError(
                f"the miner acknowledged worker {msg.worker_id}, not this worker "
                f"({self._key.worker_id})"
            )
        return msg.heartbeat_interval_s

    def _on_registered(self, channel: Channel) -> None:
        miner = channel.peer
        if self._expected is None and self.settings.miner_hotkey is None:
            try:
                created = write_pin(self._pin_path, miner)
            except OSError as exc:
                log.error("cannot write the miner pin %s: %s", self._pin_path, exc)
            else:
                if created:
                    log.info(
                        "trusting miner %s from now on (pinned in %s)",
                        miner.display,
                        self._pin_path,
                        extra=log_fields(miner=miner.display),
                    )
                else:  # written by someone else meanwhile: kept, and checked at the next connect
                    log.warning("the miner pin %s appeared meanwhile; kept it", self._pin_path)
        status = dataclasses.replace(
            self._status,
            state=LinkState.CONNECTED,
            miner=miner.display,
            reason=None,
            retry_in_s=None,
            failures=0,
            sessions=self._status.sessions + 1,
            refused=False,
        )
        log.info(
            "registered with miner %s at %s as worker %s",
            miner.display,
            self.settings.url,
            self._key.worker_id,
            extra=log_fields(miner=miner.display, worker_id=self._key.worker_id),
        )
        self._emit(status)

    # -- steady state ------------------------------------------------------------------------
    async def _serve(self, channel: Channel, ack_interval: float) -> None:
        interval = min(self.settings.heartbeat_interval_s, ack_interval)
        finished = await first_to_end(
            {
                asyncio.create_task(self._receive(channel), name="worker-receive"),
                asyncio.create_task(self._heartbeats(channel, interval), name="worker-heartbeat"),
                asyncio.create_task(self._inventory_updates(channel), name="worker-inventory"),
                asyncio.create_task(self._rotate(channel), name="worker-rotate"),
            }
        )
        exc = finished.exception()
        if isinstance(exc, _LinkDownError):
            raise exc
        if isinstance(exc, ChannelClosed):
            who = "closed by miner" if exc.by_peer else "closed"
            raise _LinkDownError(f"{who} with {closed_text(exc, self._peer_error, _PEER)}")
        if exc is not None:
            log.error("miner link: internal error", exc_info=exc)
            raise _LinkDownError(f"internal error: {exc!r}")
        raise _LinkDownError(f"{finished.get_name()} ended")

    async def _receive(self, channel: Channel) -> None:
        while True:
            frame = await channel.recv()
            msg = frame.msg
            if isinstance(msg, wire.ChallengeRequest):
                self._spawn(self._challenge(channel, frame.id, msg))
            elif isinstance(msg, wire.RevealRequest):
                self._spawn(self._reveal(channel, frame.id, msg))
            elif isinstance(msg, wire.ChallengeRelease):
                freed = self._runner.release(msg.challenge_id)
                log.debug(
                    "challenge %s released (%s)",
                    msg.challenge_id.hex(),
                    "freed" if freed else "nothing held",
                )
            elif isinstance(msg, wire.GatewayEnrollGrant):
                if not self._grant_answer(frame):
                    log.debug("gateway grant for no pending request dropped")
            elif isinstance(msg, wire.Ping):
                await channel.send(wire.Pong(nonce=msg.nonce), id=frame.id)
            elif isinstance(msg, wire.Error):
                if self._grant_answer(frame):
                    continue
                self._peer_error = msg
                log.warning(
                    "miner reported an error: %s: %s (ref %d)",
                    msg.code.name,
                    msg.message,
                    msg.ref,
                    extra=log_fields(error_code=int(msg.code), ref=msg.ref),
                )
            else:  # RegisterAck again: harmless
                log.debug("ignoring %s from the miner", type(msg).__name__)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._challenge_tasks.add(task)
        task.add_done_callback(self._challenge_tasks.discard)

    async def _challenge(self, channel: Channel, frame_id: int, req: wire.ChallengeRequest) -> None:
        fields = log_fields(
            challenge_id=req.challenge_id.hex(),
            device=req.device_uuid,
            n=req.n,
            precision=req.precision,
        )
        try:
            commit = await self._runner.run(req)
        except ChallengeRefusedError as exc:
            log.warning(
                "challenge %s on %s refused: %s: %s",
                req.challenge_id.hex(),
                req.device_uuid,
                exc.code.name,
                exc,
                extra=fields,
            )
            await self._send_error(channel, exc, frame_id)
            return
        except Exception as exc:  # a bug must not kill the link; the miner gets an answer
            log.exception("challenge %s failed", req.challenge_id.hex(), extra=fields)
            await self._send_error(channel, _internal(exc), frame_id)
            return
        try:
            await channel.send(commit, id=frame_id)
        except (ChannelClosed, wire.WireError) as exc:
            # Nobody can ask for a reveal of a commitment that never arrived: free it now.
            self._runner.release(req.challenge_id)
            log.warning("could not send the commit of %s: %s", req.challenge_id.hex(), exc)
            return
        log.info(
            "challenge %s on %s committed in %d ms",
            req.challenge_id.hex(),
            req.device_uuid,
            commit.elapsed_ms,
            extra=dict(fields, **log_fields(elapsed_ms=commit.elapsed_ms)),
        )

    async def _reveal(self, channel: Channel, frame_id: int, req: wire.RevealRequest) -> None:
        try:
            # Rows may come from device memory and Merkle paths take hashing: off the loop
            # (the held result itself is looked up, or expired, on the loop).
            reveal = await self._runner.reveal_off_loop(req)
        except ChallengeRefusedError as exc:
            log.warning("reveal of %s refused: %s: %s", req.challenge_id.hex(), exc.code.name, exc)
            await self._send_error(channel, exc, frame_id)
            return
        except Exception as exc:
            log.exception("reveal of %s failed", req.challenge_id.hex())
            await self._send_error(channel, _internal(exc), frame_id)
            return
        try:
            await channel.send(reveal, id=frame_id)
        except wire.WireError as exc:  # e.g. too many rows of a huge n for one frame
            refusal = wire.CodedError(wire.ErrorCode.CHALLENGE_INVALID, exc.message)
            await self._send_error(channel, refusal, frame_id)
        except ChannelClosed as exc:
            log.warning("could not send the reveal of %s: %s", req.challenge_id.hex(), exc)

    async def _send_error(self, channel: Channel, error: wire.CodedError, ref: int) -> None:
        """Answer the request ``ref`` with ``error``."""
        with contextlib.suppress(ChannelClosed):
            await channel.send(error.to_error(ref=ref), id=ref)

    async def _heartbeats(self, channel: Channel, interval: float) -> None:
        next_at = self._clock()
        while True:
            try:
                heartbeat = await asyncio.to_thread(self._collect_live)
            except Exception as exc:  # liveness matters more than metrics
                log.warning("live metrics failed: %s", exc)
                heartbeat = wire.Heartbeat(uptime_s=0.0, load1=0.0, mem_used_bytes=0)
            heartbeat = self._with_leases(heartbeat)
            await channel.send(heartbeat)
            next_at += interval
            now = self._clock()
            if next_at <= now:  # fell behind (slow collection, loaded host): skip, no burst
                next_at = now + interval
            await self._sleep(next_at - now)

    def _with_leases(self, heartbeat: wire.Heartbeat) -> wire.Heartbeat:
        """``heartbeat`` naming the leased GPUs as the inventory the miner has lists them.

        Asked here, on the event loop, not in ``collect_live``'s thread: the lease book changes
        on the loop."""
        if self._leased_devices is None or self._inventory is None:
            return heartbeat
        try:
            leased = self._leased_devices(self._inventory)
        except Exception:  # the heartbeat (liveness) goes out whatever happened
            log.exception("cannot list the leased GPUs for the heartbeat")
            return heartbeat
        return msgspec.structs.replace(
            heartbeat, leased_devices=list(leased)[: wire.MAX_DEVICES_PER_WORKER]
        )

    async def _current_inventory(self) -> wire.Inventory:
        fresh = (
            self._inventory is not None
            and self._inventory_at is not None
            and self._clock() - self._inventory_at < self.settings.inventory_interval_s
        )
        if not fresh:
            await self._refresh_inventory()
        assert self._inventory is not None
        return self._inventory

    async def _refresh_inventory(self) -> wire.Inventory | None:
        try:
            inventory = await asyncio.to_thread(self._collect_inventory)
        except Exception:
            log.exception("inventory collection failed")
            if self._inventory is None:
                self._inventory = wire.Inventory(cpu_model="unknown", cpu_cores=1, mem_bytes=0)
                self._inventory_at = self._clock()
            return None
        self._inventory, self._inventory_at = inventory, self._clock()
        return inventory

    async def _inventory_updates(self, channel: Channel) -> None:
        while True:
            await self._sleep(self.settings.inventory_interval_s)
            inventory = await self._refresh_inventory()
            if inventory is None:
                continue
            fingerprint = inventory_mod.inventory_fingerprint(inventory)
            if fingerprint == self._sent_fingerprint:
                continue
            await channel.send(wire.InventoryUpdate(inventory=inventory))
            self._sent_fingerprint = fingerprint
            log.info(
                "inventory changed: sent an update (%d GPUs, %d disks, %d NICs)",
                len(inventory.gpus),
                len(inventory.disks),
                len(inventory.nics),
            )

    async def _rotate(self, channel: Channel) -> None:
        """Reconnect shortly before the session reaches its maximum age."""
        remaining = channel.expires_at - time.monotonic() - _ROTATE_MARGIN_S
        await self._sleep(max(0.0, remaining))
        raise _LinkDownError("session reached its maximum age; reconnecting for a new one")

    async def _sweep_loop(self) -> None:
        while True:
            await self._sleep(self.settings.sweep_interval_s)
            freed = self._runner.sweep()
            if freed:
                log.info("freed %d expired challenge result(s)", freed)

    async def _cancel_challenges(self) -> None:
        tasks = list(self._challenge_tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
