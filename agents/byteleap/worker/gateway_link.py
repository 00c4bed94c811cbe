"""The worker's session with its gateway: leases in, VMs out (docs/gateway.md, worker link).

One :class:`GatewayLink` per worker with a ``gateway:`` section. It owns:

* **Enrollment.** The gateway's client certificate lives under ``<state_dir>/gateway/``
  (:mod:`.gateway_enroll`). Without a usable one (missing, expired, refused by the gateway, or
  a gateway whose certificate no longer chains to the CA we pinned: its CA was re-created) the
  link enrolls again through the miner, with the reconnect backoff between failed attempts.
* **The session.** An mTLS WebSocket to the enrollment's ``ws_url``: ``Hello`` (worker id, the
  leasable GPUs with their state, capacity, the lease VMs it holds), ``Welcome``, then a
  ``Heartbeat`` every ``heartbeat_interval_s`` the gateway asks for. Lease health is
  ``running`` only when libvirt says the VM runs right now; if libvirt cannot be asked, no
  heartbeat is sent (a missed confirmation costs the miner credit, a false one would be a lie).
  The certificate is renewed in the session once less than a third of its life is left.
  Disconnects are retried with :class:`~byteleap.core.backoff.Backoff`.
* **Leases.** ``StartLease``: the devices are resolved to PCI addresses, the request is checked
  against what this worker's VMs get, the GPUs leave challenge duty (``gpu.mode: auto``) and
  only then does :class:`~byteleap.worker.vm.manager.LeaseVmManager` start the VM; the answer is
  ``LeaseStarted`` with the SSH endpoint or ``LeaseFailed`` with one line. A repeated
  ``StartLease`` (after a reconnect) is answered again, never started twice. ``StopLease``
  stops the VM, answers ``LeaseStopped`` and puts the GPUs back on challenge duty.
  ``ExtendLease`` moves the lease's end; a lease still running ``expiry_grace_s`` after its end
  (the gateway unreachable meanwhile) is stopped by the worker itself.
* **The lease book** (``<state_dir>/gateway-leases.json``, 0600, atomic): the leases this worker
  holds and the identity (uuid, name, memory) of each GPU by PCI address. A GPU on vfio-pci is
  invisible to NVML, so the uuid it had on the host driver is remembered: the gateway and the
  validator keep seeing one uuid per GPU whichever driver holds it.
* **Recovery.** At start, before any session, :meth:`LeaseVmManager.recover` keeps the VMs of
  the leases in the book (a restarted worker does not end its leases) and removes every other
  trace; leases whose VM is gone are reported failed in the first ``Hello``. The gateway then
  reconciles: leases it no longer considers active are stopped (``StopLease``), pending ones
  are (re)sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable
from pathlib import Path
from typing import Final, Literal, Protocol

import aiohttp
import msgspec

from byteleap import __version__
from byteleap.core import gateway_protocol as gp
from byteleap.core import wire
from byteleap.core.backoff import Backoff
from byteleap.core.channel import CloseCode
from byteleap.core.identity import WorkerKey
from byteleap.core.lease import MAX_LEASE_DEVICES
from byteleap.core.logs import log_fields

from . import inventory as inventory_mod
from .gateway_enroll import GatewayEnrollError
from .reconnect import ReconnectLoop, first_to_end
from .vm import VmError, replace_private_file
from .vm.config import VmSettings
from .vm.manager import HostGpu, LeaseVmSpec, RecoveryReport, VmInfo, VmStatus
from .vm.seed import RENTER_USER

__all__ = [
    "BOOK_FILE",
    "BookError",
    "ChallengeDuty",
    "Enrollment",
    "GatewayLink",
    "GatewayLinkSettings",
    "GatewayState",
    "GatewayStatus",
    "GpuIdentity",
    "HeldLease",
    "LeaseVms",
    "gpu_slots",
]

log = logging.getLogger(__name__)

BOOK_FILE: Final = "gateway-leases.json"
NVIDIA_VENDOR: Final = 0x10DE
RENEW_RETRY_S: Final = 60.0
"""After a refused renewal (the gateway allows one per 30 s), ask again this much later."""
RENEW_ANSWER_S: Final = 60.0
"""A renewal unanswered this long is asked again."""
ENROLL_RATE_LIMITED_S: Final = 20.0
"""After the miner said RATE_LIMITED to an enrollment request, wait at least this long (a miner
lets a worker ask a few times at once, then once per 20 s)."""
STOP_RETRY_S: Final = 60.0
"""A VM that could not be stopped is tried again this much later."""
_BOOK_VERSION: Final = 1
_MAX_BOOK_BYTES: Final = 1 << 20
_REASON_CHARS: Final = 256

Phase = Literal["starting", "running", "stopping", "failed"]
_HOLDING: Final = ("starting", "running", "stopping")
"""Phases in which a lease holds its GPUs."""


# --------------------------------------------------------------------------------------------
# What the link drives


class Enrollment(Protocol):
    """The worker's enrollment with a gateway (:class:`.gateway_enroll.GatewayEnrollment`)."""

    @property
    def gateway_id(self) -> str: ...

    @property
    def ws_url(self) -> str: ...

    @property
    def not_after(self) -> float: ...

    def ssl_context(self) -> ssl.SSLContext: ...

    def needs_renewal(self, now: float) -> bool: ...

    def renewal_request(
        self, worker_key: WorkerKey, session_id: bytes
    ) -> tuple[bytes, gp.RenewCert]: ...

    def store_renewed(self, new_key_pem: bytes, renewed: gp.CertRenewed) -> None: ...


class LeaseVms(Protocol):
    """What the link needs of :class:`~byteleap.worker.vm.manager.LeaseVmManager`."""

    async def start(self, spec: LeaseVmSpec) -> VmInfo: ...

    async def stop(self, lease_id: str) -> bool: ...

    async def status(self, lease_id: str) -> VmStatus: ...

    async def recover(self, active_lease_ids: Collection[str]) -> RecoveryReport: ...

    async def host_gpus(self) -> list[HostGpu]: ...


class ChallengeDuty(Protocol):
    """What the link needs of the :class:`~byteleap.worker.challenges.ChallengeRunner`."""

    async def withdraw(self, uuids: Iterable[str]) -> None: ...

    def restore(self, uuids: Iterable[str]) -> None: ...


# --------------------------------------------------------------------------------------------
# Settings and status


@dataclasses.dataclass(frozen=True, slots=True)
class GatewayLinkSettings:
    ssh_host: str
    """Where renters reach this host's forwarded SSH ports (a DNS name or an IP address)."""
    connect_timeout_s: float = 10.0
    """Bounds TCP, TLS and the WebSocket upgrade together."""
    welcome_timeout_s: float = 10.0
    reconnect_initial_s: float = 1.0
    reconnect_max_s: float = 60.0
    enroll_retry_initial_s: float = 5.0
    enroll_retry_max_s: float = 300.0
    """Enrollment goes through the miner and a validator to the gateway: failed attempts are
    retried more gently than a dropped connection."""
    stable_after_s: float = 60.0
    """A session that lasted this long resets the backoff; shorter ones keep it growing."""
    renewal_check_s: float = 60.0
    expiry_grace_s: float = 300.0
    """A lease still held this long after its end (the gateway did not stop it) is stopped."""
    maintenance_s: float = 5.0
    """How often expiries are looked at and failed stops retried."""
    inventory_interval_s: float = 60.0
    """How often the GPU identities are collected again (NVML, libvirt)."""
    close_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        try:
            msgspec.convert(self.ssh_host, gp.Host)
        except msgspec.ValidationError:
            raise ValueError(
                f"gateway.ssh_host: {self.ssh_host!r} is not a DNS name or an IP address"
            ) from None
        for name in (
            "connect_timeout_s",
            "welcome_timeout_s",
            "reconnect_initial_s",
            "reconnect_max_s",
            "enroll_retry_initial_s",
            "enroll_retry_max_s",
            "stable_after_s",
            "renewal_check_s",
            "expiry_grace_s",
            "maintenance_s",
            "inventory_interval_s",
            "close_timeout_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"gateway.{name} must be positive")
        Backoff(self.reconnect_initial_s, self.reconnect_max_s)  # refuses max < initial
        if self.enroll_retry_max_s < self.enroll_retry_initial_s:
            raise ValueError("gateway.enroll_retry_max_s must not be smaller than the initial")


class GatewayState(enum.StrEnum):
    ENROLLING = "enrolling"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    WAITING = "waiting"
    STOPPED = "stopped"


@dataclasses.dataclass(frozen=True, slots=True)
class GatewayStatus:
    state: GatewayState
    url: str | None = None
    reason: str | None = None
    retry_in_s: float | None = None
    leases: int = 0
    """Leases this worker holds (their VMs exist)."""
    sessions: int = 0

    def line(self) -> str:
        held = f", {self.leases} lease(s)" if self.leases else ""
        if self.state is GatewayState.CONNECTED:
            return f"gateway connected{held}"
        if self.state is GatewayState.ENROLLING:
            return "gateway: enrolling through the miner"
        if self.state is GatewayState.CONNECTING:
            return f"gateway: connecting to {self.url}"
        if self.state is GatewayState.STOPPED:
            return "gateway: stopped"
        retry = f"; retrying in {self.retry_in_s:.1f}s" if self.retry_in_s is not None else ""
        return f"gateway: {self.reason or 'disconnected'}{retry}{held}"


# --------------------------------------------------------------------------------------------
# The lease book


class GpuIdentity(msgspec.Struct, frozen=True, kw_only=True):
    uuid: str
    name: str
    mem_bytes: int


class HeldLease(msgspec.Struct, frozen=True, kw_only=True):
    lease_id: str
    device_uuids: list[str]
    gpus: list[str]
    """PCI addresses, in the order of ``device_uuids``."""
    ends_at: float
    phase: Phase
    detail: str = ""


class _Book(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    version: int = _BOOK_VERSION
    gpus: dict[str, GpuIdentity] = msgspec.field(default_factory=dict)
    """PCI address -> the identity the GPU had on its host driver."""
    leases: dict[str, HeldLease] = msgspec.field(default_factory=dict)


class BookError(Exception):
    """The lease book cannot be read; the message says which file and why."""


def _read_book(path: Path) -> _Book:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return _Book()
    except OSError as exc:
        raise BookError(f"cannot read the lease book {path}: {exc.strerror or exc}") from None
    if len(data) > _MAX_BOOK_BYTES:
        raise BookError(f"the lease book {path} is larger than {_MAX_BOOK_BYTES} bytes")
    try:
        book = msgspec.json.decode(data, type=_Book)
    except msgspec.DecodeError as exc:
        raise BookError(f"the lease book {path} is corrupt: {exc}") from None
    if book.version != _BOOK_VERSION:
        raise BookError(f"the lease book {path} has version {book.version}, not {_BOOK_VERSION}")
    return book


# --------------------------------------------------------------------------------------------
# GPUs as the gateway sees them


def gpu_slots(
    host: Iterable[HostGpu],
    inventory: wire.Inventory | None,
    remembered: dict[str, GpuIdentity],
    *,
    held: set[str],
    mode: Literal["auto", "passthrough"],
) -> tuple[list[gp.GpuSlot], dict[str, GpuIdentity]]:
    """The NVIDIA GPUs libvirt can pass through, named as the host driver names them.

    Returns the slots and the identities to remember (learned from NVML now, or remembered from
    before a GPU went to vfio-pci). ``held``: PCI addresses of leased GPUs.
    """
    by_address = {
        inventory_mod.normalize_pci_address(gpu.pci_bus_id): gpu
        for gpu in (inventory.gpus if inventory is not None else [])
    }
    slots: list[gp.GpuSlot] = []
    learned = dict(remembered)
    for gpu in sorted(host, key=lambda g: g.address):
        if gpu.vendor_id != NVIDIA_VENDOR:
            continue  # a BMC's VGA, another vendor's accelerator: not ours to rent
        address = gpu.address
        seen = by_address.get(address)
        if seen is not None and not seen.vfio_bound:
            identity = GpuIdentity(uuid=seen.uuid, name=seen.name, mem_bytes=seen.mem_bytes)
            learned[address] = identity
        elif address in remembered:
            identity = remembered[address]
        elif seen is not None:
            identity = GpuIdentity(uuid=seen.uuid, name=seen.name, mem_bytes=seen.mem_bytes)
        else:  # libvirt knows it, NVML and sysfs do not (libvirt's test driver)
            name = " ".join(gpu.product.split())[:128] or "NVIDIA GPU"
            identity = GpuIdentity(uuid=f"PCI-{address}", name=name, mem_bytes=0)
        state: gp.GpuState = "idle"
        if address in held:
            state = "leased"
        elif gpu.problem is not None:
            state = "unavailable"
        elif mode == "passthrough" and seen is not None and not seen.vfio_bound:
            state = "unavailable"  # passthrough leases GPUs the host bound to vfio-pci at boot
        slots.append(
            gp.GpuSlot(
                uuid=identity.uuid,
                pci_bus_id=address,
                name=_printable(identity.name, 128) or "NVIDIA GPU",
                mem_bytes=max(0, identity.mem_bytes),
                state=state,
            )
        )
    unique: dict[str, gp.GpuSlot] = {}
    for slot in slots:  # a uuid twice (a stale memory): the first address keeps it
        unique.setdefault(slot.uuid, slot)
    return list(unique.values())[:MAX_LEASE_DEVICES], learned


def _printable(text: str, limit: int = _REASON_CHARS) -> str:
    """One line of printable ASCII (what protocol text fields accept)."""
    flat = " ".join(text.encode("ascii", "backslashreplace").decode("ascii").split())
    return "".join(c if " " <= c <= "~" else " " for c in flat)[:limit]


# --------------------------------------------------------------------------------------------
# Failures


class _LinkDownError(Exception):
    """An attempt failed or a session ended; ``reenroll``: the certificate is not accepted
    (or no longer trusted), enroll again before the next attempt; ``refused``: wait long;
    ``delay_s``: wait exactly this long (enrollment failures have their own backoff)."""

    def __init__(
        self,
        reason: str,
        *,
        reenroll: bool = False,
        refused: bool = False,
        delay_s: float | None = None,
    ) -> None:
        super().__init__(reason)
        self.reenroll = reenroll
        self.refused = refused
        self.delay_s = delay_s


_REENROLL_CLOSES: Final[dict[int, str]] = {
    CloseCode.UNAUTHORIZED: "the gateway refused this worker",
    CloseCode.SESSION_EXPIRED: "the certificate expired",
}
_TLS_REFUSALS: Final = (
    "alert bad certificate",
    "alert certificate expired",
    "alert certificate revoked",
    "alert certificate unknown",
    "alert unknown ca",
    "alert certificate required",
    "alert decrypt error",
    "alert handshake failure",
)


@dataclasses.dataclass(eq=False)
class _Session:
    ws: aiohttp.ClientWebSocketResponse
    enrollment: Enrollment
    session_id: bytes
    heartbeat_interval_s: float
    started_at: float
    next_id: int = 1
    renewal: tuple[int, bytes, float] | None = None
    """Frame id, new key PEM and when the pending renewal was sent."""
    renew_after: float = 0.0
    send_lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)

    def frame_id(self) -> int:
        ref = self.next_id
        self.next_id += 1
        return ref


# --------------------------------------------------------------------------------------------
# The link


class GatewayLink(ReconnectLoop[GatewayStatus]):
    """The gateway session and the leases it brings. :meth:`run` until :meth:`stop`, which
    closes the session but leaves the VMs running (a restart is not the end of a lease)."""

    def __init__(
        self,
        settings: GatewayLinkSettings,
        *,
        key: WorkerKey,
        vm: VmSettings,
        vms: LeaseVms,
        duty: ChallengeDuty,
        state_dir: Path,
        load_enrollment: Callable[[], Enrollment | None],
        enroll: Callable[[], Awaitable[Enrollment]],
        mode: Literal["auto", "passthrough"] = "auto",
        collect_inventory: Callable[[], wire.Inventory] = inventory_mod.collect_inventory,
        on_status: Callable[[GatewayStatus], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        agent_version: str = __version__,
    ) -> None:
        super().__init__(GatewayStatus(state=GatewayState.CONNECTING), on_status)
        self.settings = settings
        self._key = key
        self._vm = vm
        self._vms = vms
        self._duty = duty
        self._book_path = Path(state_dir) / BOOK_FILE
        self._load_enrollment = load_enrollment
        self._enroll = enroll
        self._mode = mode
        self._collect_inventory = collect_inventory
        self._clock = clock
        self._wall = wall_clock
        self._agent_version = agent_version
        self._backoff = Backoff(settings.reconnect_initial_s, settings.reconnect_max_s)
        self._enroll_backoff = Backoff(settings.enroll_retry_initial_s, settings.enroll_retry_max_s)
        self._book = _Book()
        self._host: list[HostGpu] = []
        self._inventory: wire.Inventory | None = None
        self._gpus_at: float | None = None
        self._enrollment: Enrollment | None = None
        self._reenroll = False
        self._session: _Session | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        self._stop_retry_at: dict[str, float] = {}
        self._lease_tasks: set[asyncio.Task[None]] = set()
        self._last_error: gp.Error | None = None

    # -- public ------------------------------------------------------------------------------
    @property
    def leased_devices(self) -> frozenset[str]:
        """Device uuids of the leases this worker holds (not to be challenged)."""
        return frozenset(
            uuid
            for held in self._book.leases.values()
            if held.phase in _HOLDING
            for uuid in held.device_uuids
        )

    def leased_inventory_uuids(self, inventory: wire.Inventory | None = None) -> list[str]:
        """The uuids ``inventory`` (default: the one collected last) lists for the GPUs leases
        hold: what a roster's ``leased_devices`` names (a GPU on vfio-pci is listed by its
        PCI-derived uuid there)."""
        inventory = inventory if inventory is not None else self._inventory
        if inventory is None:
            return []
        held = self._held_addresses()
        return sorted(
            gpu.uuid
            for gpu in inventory.gpus
            if inventory_mod.normalize_pci_address(gpu.pci_bus_id) in held
        )

    def held_leases(self) -> dict[str, HeldLease]:
        return dict(self._book.leases)

    # -- the loop ----------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _around_attempts(self) -> AsyncIterator[None]:
        """Recover the lease VMs first; keep up the maintenance while the attempts go on."""
        maintenance: asyncio.Task[None] | None = None
        try:
            await self._recover()
            maintenance = asyncio.create_task(self._maintain(), name="gateway-maintenance")
            yield
        finally:
            if maintenance is not None:
                maintenance.cancel()
                await asyncio.gather(maintenance, return_exceptions=True)
            await self._end_lease_tasks()

    def _stopped_status(self) -> GatewayStatus:
        return dataclasses.replace(self._status, state=GatewayState.STOPPED)

    # -- recovery ----------------------------------------------------------------------------
    async def _recover(self) -> None:
        """Take the book back and reconcile the host with it (retried while libvirt fails)."""
        while True:
            try:
                self._book = await asyncio.to_thread(_read_book, self._book_path)
            except BookError as exc:
                # Without the book we do not know what we hold: recover() with nothing active
                # tears every lease VM down, and the gateway fails those leases. Kept aside.
                log.error("%s; starting with an empty one (kept as .corrupt)", exc)
                with contextlib.suppress(OSError):
                    self._book_path.replace(self._book_path.with_suffix(".corrupt"))
                self._book = _Book()
            active = [
                lease_id
                for lease_id, held in self._book.leases.items()
                if held.phase in ("starting", "running")
            ]
            try:
                report = await self._vms.recover(active)
            except VmError as exc:
                delay = self._backoff.next_delay()
                self._emit(
                    GatewayStatus(
                        state=GatewayState.WAITING,
                        reason=f"cannot recover lease VMs: {exc}",
                        retry_in_s=delay,
                    )
                )
                log.error("lease recovery failed, retrying in %.1f s: %s", delay, exc)
                await asyncio.sleep(delay)
                continue
            break
        self._backoff.reset()
        kept = set(report.kept)
        for lease_id in active:
            held = self._book.leases[lease_id]
            if lease_id in kept:
                self._book.leases[lease_id] = msgspec.structs.replace(held, phase="running")
            else:
                self._book.leases[lease_id] = msgspec.structs.replace(
                    held, phase="failed", detail="the VM did not survive the worker's restart"
                )
        for held in list(self._book.leases.values()):
            if held.phase == "stopping":
                await self._stop_vm(held, "retrying an interrupted stop")
        await self._save()
        held_devices = self.leased_devices
        if held_devices:
            await self._duty.withdraw(held_devices)
        if active:
            log.info(
                "gateway leases after recovery: %d kept, %d lost",
                len(kept),
                len(active) - len(kept),
            )

    # -- one attempt -------------------------------------------------------------------------
    async def _attempt(self, http: aiohttp.ClientSession) -> None:
        session: _Session | None = None
        reason = "session ended"
        refused = False
        delay: float | None = None
        try:
            enrollment = await self._enrollment_for_attempt()
            self._emit(
                GatewayStatus(
                    state=GatewayState.CONNECTING,
                    url=enrollment.ws_url,
                    leases=self._held_count(),
                    sessions=self._status.sessions,
                )
            )
            ws = await self._connect(http, enrollment)
            try:
                session = await self._open(ws, enrollment)
                self._session = session
                self._emit(
                    GatewayStatus(
                        state=GatewayState.CONNECTED,
                        url=enrollment.ws_url,
                        leases=self._held_count(),
                        sessions=self._status.sessions + 1,
                    )
                )
                log.info(
                    "connected to gateway %s at %s",
                    enrollment.gateway_id,
                    enrollment.ws_url,
                    extra=log_fields(gateway_id=enrollment.gateway_id),
                )
                await self._serve(session)
            finally:
                self._session = None
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self.settings.close_timeout_s):
                        await ws.close(code=CloseCode.GOING_AWAY, message=b"worker going away")
        except _LinkDownError as exc:
            reason = str(exc)
            refused = exc.refused
            delay = exc.delay_s
            if exc.reenroll:
                self._reenroll = True
        if self._stopping:
            return
        if session is not None and self._clock() - session.started_at >= (
            self.settings.stable_after_s
        ):
            self._backoff.reset()
        if delay is None:
            delay = self._backoff.long_delay() if refused else self._backoff.next_delay()
        log.warning("gateway link: %s; retrying in %.1f s", reason, delay)
        self._emit(
            GatewayStatus(
                state=GatewayState.WAITING,
                url=None if self._enrollment is None else self._enrollment.ws_url,
                reason=reason,
                retry_in_s=delay,
                leases=self._held_count(),
                sessions=self._status.sessions,
            )
        )
        await asyncio.sleep(delay)

    async def _enrollment_for_attempt(self) -> Enrollment:
        if self._enrollment is None and not self._reenroll:
            try:
                self._enrollment = await asyncio.to_thread(self._load_enrollment)
            except Exception as exc:  # a damaged state is replaced by a new enrollment
                log.error("gateway enrollment state unusable (%s): enrolling again", exc)
        current = self._enrollment
        if current is not None and not self._reenroll and current.not_after > self._wall():
            return current
        if current is not None and not self._reenroll:
            log.warning("the gateway certificate expired: enrolling again")
        self._emit(
            GatewayStatus(
                state=GatewayState.ENROLLING,
                leases=self._held_count(),
                sessions=self._status.sessions,
            )
        )
        try:
            enrollment = await self._enroll()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every enrollment failure is retried with its backoff
            delay = self._enroll_backoff.next_delay()
            if isinstance(exc, GatewayEnrollError) and exc.wire_code == wire.ErrorCode.RATE_LIMITED:
                delay = max(delay, ENROLL_RATE_LIMITED_S)
            raise _LinkDownError(
                f"enrollment failed: {_printable(str(exc))}", delay_s=delay
            ) from None
        self._enroll_backoff.reset()
        self._enrollment = enrollment
        self._reenroll = False
        log.info(
            "enrolled with gateway %s (certificate valid until %s)",
            enrollment.gateway_id,
            time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(enrollment.not_after)),
            extra=log_fields(gateway_id=enrollment.gateway_id),
        )
        return enrollment

    async def _connect(
        self, http: aiohttp.ClientSession, enrollment: Enrollment
    ) -> aiohttp.ClientWebSocketResponse:
        url = enrollment.ws_url
        try:
            context = await asyncio.to_thread(enrollment.ssl_context)
        except Exception as exc:  # unreadable key or certificate: enroll again
            raise _LinkDownError(
                f"the enrollment's key or certificate is unusable: {exc}", reenroll=True
            ) from None
        try:
            async with asyncio.timeout(self.settings.connect_timeout_s):
                return await http.ws_connect(
                    url,
                    ssl=context,
                    max_msg_size=gp.MAX_DOWN_BYTES + 1,
                    autoping=True,
                    timeout=aiohttp.ClientWSTimeout(ws_close=self.settings.close_timeout_s),
                )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in (401, 403):
                raise _LinkDownError(
                    f"the gateway refused the certificate (HTTP {exc.status})", reenroll=True
                ) from None
            raise _LinkDownError(
                f"WebSocket upgrade refused: HTTP {exc.status} {exc.message}".rstrip()
            ) from None
        except aiohttp.ClientConnectorCertificateError as exc:
            raise _LinkDownError(
                f"the gateway's certificate does not chain to the pinned CA "
                f"({exc.certificate_error}): enrolling again",
                reenroll=True,
            ) from None
        except aiohttp.ClientSSLError as exc:
            text = str(exc).lower()
            refused = any(marker in text for marker in _TLS_REFUSALS)
            raise _LinkDownError(
                f"TLS failed: {exc}" + ("; the gateway refused the certificate" if refused else ""),
                reenroll=refused,
            ) from None
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, ConnectionRefusedError):
                raise _LinkDownError(f"connection to {url} refused") from None
            detail = exc.os_error.strerror or str(exc.os_error) or str(exc)
            raise _LinkDownError(f"cannot connect to {url}: {detail}") from None
        except TimeoutError:
            raise _LinkDownError(
                f"timed out after {self.settings.connect_timeout_s:g} s connecting to {url}"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            text = str(exc).lower()
            if any(marker in text for marker in _TLS_REFUSALS):
                raise _LinkDownError(
                    f"the gateway refused the certificate: {exc}", reenroll=True
                ) from None
            raise _LinkDownError(f"connection failed: {exc or type(exc).__name__}") from None

    async def _open(self, ws: aiohttp.ClientWebSocketResponse, enrollment: Enrollment) -> _Session:
        """Hello, then wait for Welcome."""
        hello = await self._hello()
        await ws.send_bytes(gp.encode(gp.Frame(msg=hello)))
        self._delivered(hello.leases)
        self._last_error = None
        try:
            async with asyncio.timeout(self.settings.welcome_timeout_s):
                while True:
                    frame = await self._receive(ws)
                    msg = frame.msg
                    if isinstance(msg, gp.Welcome):
                        break
                    if isinstance(msg, gp.Error):
                        self._last_error = msg
                        log.warning("gateway refused the hello: %s: %s", msg.code.name, msg.message)
                    elif isinstance(msg, gp.Ping):
                        await ws.send_bytes(
                            gp.encode(gp.Frame(id=frame.id, msg=gp.Pong(nonce=msg.nonce)))
                        )
                    else:
                        log.warning(
                            "gateway sent %s before its welcome; ignored", type(msg).__name__
                        )
        except TimeoutError:
            raise _LinkDownError(
                f"no welcome from the gateway within {self.settings.welcome_timeout_s:g} s"
            ) from None
        self._reenroll = False  # the certificate works: a later failure is not the enrollment's
        return _Session(
            ws=ws,
            enrollment=enrollment,
            session_id=msg.session_id,
            heartbeat_interval_s=msg.heartbeat_interval_s,
            started_at=self._clock(),
        )

    async def _receive(self, ws: aiohttp.ClientWebSocketResponse) -> gp.Frame:
        """The next frame from the gateway; :class:`_LinkDownError` when the socket closes."""
        message = await ws.receive()
        if message.type == aiohttp.WSMsgType.BINARY:
            try:
                return gp.decode(gp.DOWN, message.data)
            except gp.ProtocolError as exc:
                with contextlib.suppress(Exception):
                    await ws.send_bytes(gp.encode(gp.Frame(msg=exc.to_error())))
                await ws.close(code=CloseCode.PROTOCOL_ERROR, message=b"bad frame")
                raise _LinkDownError(f"the gateway sent a bad frame: {exc}") from None
        if message.type == aiohttp.WSMsgType.TEXT:
            await ws.close(code=CloseCode.PROTOCOL_ERROR, message=b"text frames refused")
            raise _LinkDownError("the gateway sent a text frame")
        code = ws.close_code
        if message.type == aiohttp.WSMsgType.CLOSE and isinstance(message.data, int):
            code = message.data
        why = str(message.extra or "") if message.type == aiohttp.WSMsgType.CLOSE else ""
        raise self._closed(code, why)

    def _closed(self, code: int | None, why: str) -> _LinkDownError:
        detail = f" ({why})" if why else ""
        if self._last_error is not None:
            detail += f" after {self._last_error.code.name}: {self._last_error.message}"
        if code in _REENROLL_CLOSES:
            return _LinkDownError(
                f"closed by the gateway with {code}: {_REENROLL_CLOSES[code]}{detail}",
                reenroll=True,
            )
        if code == CloseCode.REPLACED:
            return _LinkDownError(
                f"replaced by a newer session of this worker (4009){detail}", refused=True
            )
        if code is None:
            return _LinkDownError(f"connection to the gateway lost{detail}")
        return _LinkDownError(f"closed by the gateway with {code}{detail}")

    # -- steady state ------------------------------------------------------------------------
    async def _serve(self, session: _Session) -> None:
        finished = await first_to_end(
            {
                asyncio.create_task(self._read(session), name="gateway-receive"),
                asyncio.create_task(self._heartbeats(session), name="gateway-heartbeat"),
                asyncio.create_task(self._renewals(session), name="gateway-renewal"),
            }
        )
        exc = finished.exception()
        if isinstance(exc, _LinkDownError):
            raise exc
        if isinstance(exc, ConnectionError | aiohttp.ClientError):
            raise _LinkDownError(f"connection to the gateway lost: {exc}")
        if exc is not None:
            log.error("gateway link: internal error", exc_info=exc)
            raise _LinkDownError(f"internal error: {exc!r}")
        raise _LinkDownError(f"{finished.get_name()} ended")

    async def _send(self, session: _Session, message: gp.Message, ref: int = 0) -> None:
        async with session.send_lock:
            await session.ws.send_bytes(gp.encode(gp.Frame(id=ref, msg=message)))

    async def _answer(self, message: gp.Message) -> bool:
        """Send on the current session, if any (the gateway reconciles what is lost)."""
        session = self._session
        if session is None:
            return False
        try:
            await self._send(session, message)
        except (ConnectionError, aiohttp.ClientError) as exc:
            log.warning("could not send %s to the gateway: %s", type(message).__name__, exc)
            return False
        return True

    async def _read(self, session: _Session) -> None:
        while True:
            frame = await self._receive(session.ws)
            msg = frame.msg
            if isinstance(msg, gp.StartLease):
                self._spawn(self._start_lease(msg), f"lease-start-{msg.lease_id}")
            elif isinstance(msg, gp.StopLease):
                self._spawn(
                    self._stop_lease(msg.lease_id, msg.reason), f"lease-stop-{msg.lease_id}"
                )
            elif isinstance(msg, gp.ExtendLease):
                await self._extend(msg)
            elif isinstance(msg, gp.CertRenewed):
                await self._renewed(session, frame.id, msg)
            elif isinstance(msg, gp.Ping):
                await self._send(session, gp.Pong(nonce=msg.nonce), ref=frame.id)
            elif isinstance(msg, gp.Error):
                self._last_error = msg
                pending = session.renewal
                if pending is not None and msg.ref == pending[0]:
                    session.renewal = None
                    session.renew_after = self._wall() + RENEW_RETRY_S
                    log.warning(
                        "the gateway refused the certificate renewal: %s: %s",
                        msg.code.name,
                        msg.message,
                    )
                else:
                    log.warning(
                        "the gateway reported %s: %s (ref %d)",
                        msg.code.name,
                        msg.message,
                        msg.ref,
                        extra=log_fields(error_code=int(msg.code), ref=msg.ref),
                    )
            else:  # a second Welcome: harmless
                log.debug("ignoring %s from the gateway", type(msg).__name__)

    async def _heartbeats(self, session: _Session) -> None:
        interval = session.heartbeat_interval_s
        next_at = self._clock()
        while True:
            next_at += interval
            now = self._clock()
            if next_at <= now:  # fell behind: skip, no burst
                next_at = now + interval
            await asyncio.sleep(next_at - now)
            try:
                gpus, leases = await self._worker_state()
            except VmError as exc:
                log.warning("no heartbeat this time: cannot read the lease VMs: %s", exc)
                continue
            await self._send(session, gp.Heartbeat(gpus=gpus, leases=leases))
            self._delivered(leases)
            self._emit(dataclasses.replace(self._status, leases=self._held_count()))

    async def _renewals(self, session: _Session) -> None:
        while True:
            now = self._wall()
            pending = session.renewal
            if pending is not None and now - pending[2] > RENEW_ANSWER_S:
                log.warning("the certificate renewal went unanswered; asking again")
                session.renewal = pending = None
            if (
                pending is None
                and now >= session.renew_after
                and session.enrollment.needs_renewal(now)
            ):
                new_key, request = await asyncio.to_thread(
                    session.enrollment.renewal_request, self._key, session.session_id
                )
                ref = session.frame_id()
                session.renewal = (ref, new_key, now)
                await self._send(session, request, ref=ref)
                log.info("asked the gateway for a new certificate")
            await asyncio.sleep(self.settings.renewal_check_s)

    async def _renewed(self, session: _Session, ref: int, renewed: gp.CertRenewed) -> None:
        pending = session.renewal
        if pending is None or pending[0] != ref:
            log.warning("ignoring a certificate the gateway sent unasked (ref %d)", ref)
            return
        session.renewal = None
        try:
            await asyncio.to_thread(session.enrollment.store_renewed, pending[1], renewed)
            reloaded = await asyncio.to_thread(self._load_enrollment)
        except Exception as exc:  # keep the current certificate; ask again later
            session.renew_after = self._wall() + RENEW_RETRY_S
            log.error("could not store the renewed certificate: %s", exc)
            return
        if reloaded is not None:
            self._enrollment = reloaded
            session.enrollment = reloaded
        log.info(
            "gateway certificate renewed (valid until %s)",
            time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(renewed.not_after)),
        )

    # -- what the worker holds ---------------------------------------------------------------
    def _held_count(self) -> int:
        return sum(1 for held in self._book.leases.values() if held.phase in _HOLDING)

    async def _hello(self) -> gp.Hello:
        try:
            gpus, leases = await self._worker_state(refresh=True)
        except VmError as exc:
            raise _LinkDownError(f"cannot read the lease VMs: {exc}") from None
        return gp.Hello(
            worker_id=self._key.worker_id,
            agent_version=self._agent_version,
            gpus=gpus,
            capacity=self._capacity(len(gpus)),
            leases=leases,
        )

    def _capacity(self, gpus: int) -> gp.Capacity:
        # What this worker's VMs get: per GPU for vCPUs and memory; a disk of at most
        # max_disk_gib per lease, and there are at most as many leases as GPUs.
        vm = self._vm
        return gp.Capacity(
            vcpus=min(65536, vm.vcpus_per_gpu * gpus),
            memory_mib=vm.memory_mib_per_gpu * gpus,
            disk_gib=vm.max_disk_gib * gpus,
        )

    async def _worker_state(
        self, *, refresh: bool = False
    ) -> tuple[list[gp.GpuSlot], list[gp.LeaseHealth]]:
        """The GPU slots and the health of every lease held (raises VmError)."""
        await self._refresh_gpus(force=refresh)
        leases = [await self._health(held) for held in list(self._book.leases.values())]
        return self._slots(), leases[: gp.MAX_LEASES_PER_WORKER]

    async def _health(self, held: HeldLease) -> gp.LeaseHealth:
        lease_id = held.lease_id
        lock = self._locks.get(lease_id)
        if held.phase == "failed":
            return gp.LeaseHealth(lease_id=lease_id, state="failed", detail=_printable(held.detail))
        if held.phase == "stopping":
            return gp.LeaseHealth(lease_id=lease_id, state="stopped", detail="stopping")
        if held.phase == "starting" or (lock is not None and lock.locked()):
            return gp.LeaseHealth(lease_id=lease_id, state="starting")
        status = await self._vms.status(lease_id)
        if status.state == "running":
            return gp.LeaseHealth(lease_id=lease_id, state="running")
        if status.state == "starting":
            return gp.LeaseHealth(lease_id=lease_id, state="starting")
        if status.state == "stopping":
            return gp.LeaseHealth(lease_id=lease_id, state="stopped", detail="VM shutting down")
        return gp.LeaseHealth(lease_id=lease_id, state="failed", detail=f"VM {status.state}")

    def _delivered(self, leases: Iterable[gp.LeaseHealth]) -> None:
        """Failed leases reported to the gateway are forgotten (the gateway fails them)."""
        gone = [
            h.lease_id
            for h in leases
            if h.state == "failed"
            and (held := self._book.leases.get(h.lease_id)) is not None
            and held.phase == "failed"
        ]
        if gone:
            for lease_id in gone:
                del self._book.leases[lease_id]
            self._spawn(self._save(), "gateway-book")

    async def _refresh_gpus(self, *, force: bool = False) -> None:
        now = self._clock()
        if (
            not force
            and self._gpus_at is not None
            and now - self._gpus_at < self.settings.inventory_interval_s
        ):
            return
        self._host = await self._vms.host_gpus()
        try:
            self._inventory = await asyncio.to_thread(self._collect_inventory)
        except Exception:  # NVML trouble: libvirt still knows the GPUs
            log.exception("inventory collection failed; GPU names from libvirt")
        self._gpus_at = now
        _, learned = self._slots_and_identities()
        if learned != self._book.gpus:
            self._book.gpus = learned
            await self._save()

    def _held_addresses(self) -> set[str]:
        """PCI addresses of the GPUs the leases hold."""
        return {
            address
            for lease in self._book.leases.values()
            if lease.phase in _HOLDING
            for address in lease.gpus
        }

    def _slots_and_identities(self) -> tuple[list[gp.GpuSlot], dict[str, GpuIdentity]]:
        return gpu_slots(
            self._host,
            self._inventory,
            self._book.gpus,
            held=self._held_addresses(),
            mode=self._mode,
        )

    def _slots(self) -> list[gp.GpuSlot]:
        return self._slots_and_identities()[0]

    async def _save(self) -> None:
        data = msgspec.json.encode(self._book)
        try:
            await asyncio.to_thread(self._write_book, data)
        except OSError as exc:
            log.error("cannot write the lease book %s: %s", self._book_path, exc)

    def _write_book(self, data: bytes) -> None:
        self._book_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        replace_private_file(self._book_path, data)

    # -- leases ------------------------------------------------------------------------------
    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._lease_tasks.add(task)
        task.add_done_callback(self._lease_done)

    def _lease_done(self, task: asyncio.Task[None]) -> None:
        self._lease_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed", task.get_name(), exc_info=task.exception())

    async def _end_lease_tasks(self) -> None:
        tasks = list(self._lease_tasks)
        for task in tasks:
            task.cancel()  # the VM manager finishes or undoes what it started on its own
        await asyncio.gather(*tasks, return_exceptions=True)

    def _lock(self, lease_id: str) -> asyncio.Lock:
        return self._locks.setdefault(lease_id, asyncio.Lock())

    def _forget_lock(self, lease_id: str) -> None:
        lock = self._locks.get(lease_id)
        if lock is not None and not lock.locked() and lease_id not in self._book.leases:
            del self._locks[lease_id]

    def _refusal(self, start: gp.StartLease) -> tuple[str, list[str]]:
        """Why this worker cannot start the lease ('' if it can) and the devices' addresses."""
        by_uuid = {slot.uuid: slot for slot in self._slots()}
        addresses: list[str] = []
        for uuid in start.device_uuids:
            slot = by_uuid.get(uuid)
            if slot is None:
                return f"no GPU {uuid} on this worker", []
            if slot.state == "unavailable":
                return f"GPU {uuid} cannot be passed through to a VM", []
            addresses.append(slot.pci_bus_id)
        count = len(addresses)
        vm = self._vm
        if start.vcpus > vm.vcpus_per_gpu * count:
            return (
                f"the lease asks for {start.vcpus} vCPUs; this worker gives "
                f"{vm.vcpus_per_gpu} per GPU",
                [],
            )
        if start.memory_mib > vm.memory_mib_per_gpu * count:
            return (
                f"the lease asks for {start.memory_mib} MiB of memory; this worker gives "
                f"{vm.memory_mib_per_gpu} MiB per GPU",
                [],
            )
        if start.disk_gib > vm.max_disk_gib:
            return (
                f"the lease asks for a {start.disk_gib} GiB disk; this worker's VMs get at most "
                f"{vm.max_disk_gib} GiB",
                [],
            )
        for other in self._book.leases.values():
            if other.lease_id != start.lease_id and other.phase in _HOLDING:
                clash = set(addresses) & set(other.gpus)
                if clash:
                    return f"GPU {', '.join(sorted(clash))} is in another lease", []
        return "", addresses

    async def _start_lease(self, start: gp.StartLease) -> None:
        lease_id = start.lease_id
        lock = self._lock(lease_id)
        held = self._book.leases.get(lease_id)
        if lock.locked() and held is not None and held.phase == "starting":
            return  # a repeated StartLease while its VM boots: the answer follows
        async with lock:
            held = self._book.leases.get(lease_id)
            if held is not None and held.phase == "failed":
                await self._fail(lease_id, held.detail)
                return
            if held is not None and held.phase == "stopping":
                await self._fail(lease_id, "the lease's VM is being stopped")
                return
            if held is not None and held.device_uuids != list(start.device_uuids):
                await self._fail(lease_id, "the lease is held here with other GPUs")
                return
            if held is not None:
                addresses = held.gpus
            else:
                await self._refresh_gpus()
                why, addresses = self._refusal(start)
                if why:
                    log.warning(
                        "lease %s refused: %s", lease_id, why, extra=log_fields(lease_id=lease_id)
                    )
                    await self._fail(lease_id, why)
                    return
                held = HeldLease(
                    lease_id=lease_id,
                    device_uuids=list(start.device_uuids),
                    gpus=addresses,
                    ends_at=start.ends_at,
                    phase="starting",
                )
                self._book.leases[lease_id] = held
                await self._save()
                # Off challenge duty before the VM gets them.
                await self._duty.withdraw(held.device_uuids)
            spec = LeaseVmSpec(
                lease_id=lease_id,
                gpus=tuple(addresses),
                ssh_public_key=start.ssh_public_key,
                disk_gib=start.disk_gib,
            )
            try:
                info = await self._vms.start(spec)
            except VmError as exc:
                reason = _printable(str(exc))
                if held.phase != "running":
                    del self._book.leases[lease_id]
                    self._restore(held)
                    await self._save()
                log.error(
                    "lease %s failed to start: %s",
                    lease_id,
                    reason,
                    extra=log_fields(lease_id=lease_id),
                )
                await self._fail(lease_id, reason)
                return
            if held.phase != "running":
                self._book.leases[lease_id] = msgspec.structs.replace(
                    held, phase="running", ends_at=max(held.ends_at, start.ends_at)
                )
                await self._save()
            self._emit(dataclasses.replace(self._status, leases=self._held_count()))
            await self._answer(
                gp.LeaseStarted(
                    lease_id=lease_id,
                    ssh_host=self.settings.ssh_host,
                    ssh_port=info.ssh_port,
                    ssh_user=RENTER_USER,
                )
            )
            log.info(
                "lease %s running: %s, SSH on port %d",
                lease_id,
                ", ".join(held.device_uuids),
                info.ssh_port,
                extra=log_fields(lease_id=lease_id, ssh_port=info.ssh_port),
            )

    async def _fail(self, lease_id: str, reason: str) -> None:
        """Tell the gateway; if no session can, report it failed in the next hello."""
        text = _printable(reason) or "failed"
        if await self._answer(gp.LeaseFailed(lease_id=lease_id, reason=text)):
            if (held := self._book.leases.get(lease_id)) is not None and held.phase == "failed":
                del self._book.leases[lease_id]
                await self._save()
            return
        if lease_id not in self._book.leases:
            self._book.leases[lease_id] = HeldLease(
                lease_id=lease_id,
                device_uuids=[],
                gpus=[],
                ends_at=0.0,
                phase="failed",
                detail=text,
            )
            await self._save()

    def _restore(self, held: HeldLease) -> None:
        """Back to challenge duty: the lease's devices that no other lease holds."""
        others = {
            uuid
            for lease in self._book.leases.values()
            if lease.lease_id != held.lease_id and lease.phase in _HOLDING
            for uuid in lease.device_uuids
        }
        self._duty.restore(set(held.device_uuids) - others)

    async def _stop_lease(self, lease_id: str, reason: str) -> None:
        async with self._lock(lease_id):
            held = self._book.leases.get(lease_id)
            if held is None:
                # Not ours (a VM the gateway does not know as active, or already stopped).
                try:
                    found = await self._vms.stop(lease_id)
                except (VmError, ValueError) as exc:
                    log.error("stopping lease %s failed: %s", lease_id, exc)
                    return
                if found:
                    await self._answer(gp.LeaseStopped(lease_id=lease_id))
                return
            stopped = await self._stop_vm(held, reason or "stopped by the gateway")
            if stopped:
                await self._answer(gp.LeaseStopped(lease_id=lease_id))
        self._forget_lock(lease_id)

    async def _stop_vm(self, held: HeldLease, reason: str) -> bool:
        """Stop a held lease's VM; on success forget it and restore its GPUs."""
        lease_id = held.lease_id
        if held.phase != "stopping":
            held = msgspec.structs.replace(held, phase="stopping")
            self._book.leases[lease_id] = held
            await self._save()
        try:
            await self._vms.stop(lease_id)
        except VmError as exc:
            self._stop_retry_at[lease_id] = self._clock() + STOP_RETRY_S
            log.error(
                "lease %s: stopping its VM failed (tried again in %g s): %s",
                lease_id,
                STOP_RETRY_S,
                exc,
                extra=log_fields(lease_id=lease_id),
            )
            return False
        self._stop_retry_at.pop(lease_id, None)
        del self._book.leases[lease_id]
        await self._save()
        self._restore(held)
        self._emit(dataclasses.replace(self._status, leases=self._held_count()))
        log.info("lease %s stopped (%s)", lease_id, reason, extra=log_fields(lease_id=lease_id))
        return True

    async def _extend(self, extend: gp.ExtendLease) -> None:
        held = self._book.leases.get(extend.lease_id)
        if held is None or held.phase not in ("starting", "running"):
            log.debug("extension of lease %s, which is not held here; ignored", extend.lease_id)
            return
        self._book.leases[extend.lease_id] = msgspec.structs.replace(held, ends_at=extend.ends_at)
        await self._save()
        log.info(
            "lease %s extended until %s",
            extend.lease_id,
            time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(extend.ends_at)),
            extra=log_fields(lease_id=extend.lease_id),
        )

    async def _maintain(self) -> None:
        """Stop leases long past their end and retry stops that failed."""
        while True:
            await asyncio.sleep(self.settings.maintenance_s)
            now = self._wall()
            for held in list(self._book.leases.values()):
                lock = self._locks.get(held.lease_id)
                if lock is not None and lock.locked():
                    continue
                overdue = (
                    held.phase == "running" and now > held.ends_at + self.settings.expiry_grace_s
                )
                retry = held.phase == "stopping" and self._clock() >= self._stop_retry_at.get(
                    held.lease_id, 0.0
                )
                if overdue or retry:
                    why = "its end passed without word from the gateway" if overdue else "retry"
                    self._spawn(self._stop_lease(held.lease_id, why), f"lease-stop-{held.lease_id}")
