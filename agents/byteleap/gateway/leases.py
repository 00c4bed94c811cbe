"""Leases: scheduling, the state machine, worker reconciliation and the signed records.

States: ``pending`` (accepted, not yet sent to the worker) -> ``starting`` (StartLease sent) ->
``running`` (the worker answered LeaseStarted) -> ``ended`` (terminated by the renter or expired)
or ``failed`` (the worker failed it, never started it in ``start_timeout_s``, lost it, was
revoked, or stayed away longer than ``worker_grace_s``). ``pending`` and ``starting`` may end or
fail too. ``ends_at`` is fixed when the lease is created (``now + duration_s``) and moves only by
``extend``.

Scheduling: a lease gets N GPUs on ONE online worker: GPUs the worker reports ``idle`` and no
active lease holds, and vCPUs, memory and disk (``leases.*_per_gpu`` x N) within the capacity
the worker announced, minus its other active leases. Among the workers that fit (or the one the
renter named) the one with the fewest free GPUs wins (best fit keeps large blocks free for large
requests); ties go to the lowest worker id.

Records (core/lease.py): one when the lease starts running (``active_until == start``), one per
checkpoint (every ``checkpoint_s``) if the worker confirmed the VM running since the previous
record (``active_until`` = that confirmation, at most ``ends_at``), and one final record
(``ended``) when a running lease ends or fails, with ``active_until`` the last confirmation, never
after the end. Credit is never extrapolated: a worker that goes silent earns nothing past its
last heartbeat. A lease that never ran has no records. Each record is signed and stored in the
same transaction as the lease change it reports (store.py).

Reconciliation when a worker (re)connects, from the leases its Hello lists: running leases it no
longer holds fail; starting or pending ones it does not hold are (re)sent StartLease (workers
treat a known lease_id as a no-op and answer LeaseStarted again); leases it holds that are not
active here are stopped.

All changes happen under one lock, in memory only after the store accepted them; sends to
workers never block (sessions queue them).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Final, ParamSpec, Protocol, TypeVar

import msgspec

from ..core.gateway_protocol import (
    Capacity,
    ExtendLease,
    GpuSlot,
    GpusResponse,
    GpuView,
    Heartbeat,
    Hello,
    LeaseFailed,
    LeaseHealth,
    LeaseRequest,
    LeaseStarted,
    LeaseState,
    LeaseStopped,
    LeaseView,
    Message,
    SshEndpoint,
    SshKeyError,
    StartLease,
    StopLease,
    WorkerGpus,
    normalize_ssh_public_key,
)
from ..core.lease import LeaseRecord, LeaseRecordError, SignedLeaseRecord
from ..core.logs import log_fields
from .config import LeaseSettings
from .keys import LeaseSigner
from .listener import ApiFailure
from .store import GatewayStore, Lease, RecordMaker, StoreConflict, StoreError

__all__ = ["Counts", "LeaseError", "LeaseManager", "OnlineWorker", "WorkerLink", "lease_view"]

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

MAX_LISTED_LEASES: Final = 1000


class LeaseError(ApiFailure):
    """A refused renter request: HTTP ``status``, stable ``code``, one-line ``message``."""


class WorkerLink(Protocol):
    """What the lease manager needs of a worker's live session."""

    @property
    def worker_id(self) -> str: ...

    def send(self, message: Message) -> bool:
        """Queue ``message``; False when the session is closed (nothing was sent)."""
        ...


@dataclass
class OnlineWorker:
    link: WorkerLink
    miner_hotkey: str
    capacity: Capacity
    gpus: list[GpuSlot]
    connected_at: float


@dataclass(frozen=True)
class Counts:
    workers: int
    idle_gpus: int
    running: int
    active: int


def lease_view(lease: Lease) -> LeaseView:
    ssh = None
    if lease.state == "running" and lease.ssh_host and lease.ssh_port and lease.ssh_user:
        ssh = SshEndpoint(host=lease.ssh_host, port=lease.ssh_port, user=lease.ssh_user)
    return LeaseView(
        lease_id=lease.lease_id,
        state=lease.state,
        worker_id=lease.worker_id,
        device_uuids=list(lease.device_uuids),
        created_at=lease.created_at,
        ends_at=lease.ends_at,
        started_at=lease.started_at,
        ended_at=lease.ended_at,
        ssh=ssh,
        end_reason=lease.end_reason,
        message=lease.message,
    )


def _pci_key(gpu: GpuSlot) -> str:
    return gpu.pci_bus_id.lower()


def _stop_strays(link: WorkerLink, leases: Iterable[LeaseHealth]) -> None:
    """Stop the VMs a worker runs for leases that are not active here."""
    for health in leases:
        if health.state in ("starting", "running"):
            link.send(StopLease(lease_id=health.lease_id, reason="not an active lease"))


class LeaseManager:
    """Owns every active lease and the view of online workers (one per gateway)."""

    def __init__(
        self,
        store: GatewayStore,
        signer: LeaseSigner,
        settings: LeaseSettings,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.signer = signer
        self.settings = settings
        self._clock = clock
        self._lock = asyncio.Lock()
        self._active: dict[str, Lease] = {}
        self._workers: dict[str, OnlineWorker] = {}
        self._lost: dict[str, float] = {}
        """worker_id -> when it disconnected, while it has active leases."""

    # ------------------------------------------------------------------ helpers

    async def _db(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await asyncio.to_thread(fn, *args, **kwargs)

    def _record(self, lease: Lease, active_until: float, *, ended: bool) -> RecordMaker:
        assert lease.started_at is not None
        start = lease.started_at
        until = max(start, active_until)
        issued = max(self._clock(), until)

        def make(seq: int) -> SignedLeaseRecord:
            record = LeaseRecord(
                gateway_id=self.signer.gateway_id,
                seq=seq,
                lease_id=lease.lease_id,
                miner_hotkey=lease.miner_hotkey,
                worker_id=lease.worker_id,
                device_uuids=list(lease.device_uuids),
                start=start,
                active_until=until,
                ended=ended,
                issued_at=issued,
            )
            return self.signer.sign(record)

        return make

    def _send(self, worker_id: str, message: Message) -> bool:
        online = self._workers.get(worker_id)
        return online is not None and online.link.send(message)

    def _start_message(self, lease: Lease) -> StartLease:
        return StartLease(
            lease_id=lease.lease_id,
            device_uuids=list(lease.device_uuids),
            ssh_public_key=lease.ssh_public_key,
            vcpus=lease.vcpus,
            memory_mib=lease.memory_mib,
            disk_gib=lease.disk_gib,
            ends_at=lease.ends_at,
        )

    async def _save(
        self, lease: Lease, expect: LeaseState, record: RecordMaker | None = None
    ) -> Lease:
        """Persist ``lease`` (record included), then make it the in-memory truth."""
        seq = await self._db(self.store.update_lease, lease, expect=expect, record=record)
        if lease.active:
            self._active[lease.lease_id] = lease
        else:
            self._active.pop(lease.lease_id, None)
            if not self._leases_on(lease.worker_id):
                self._lost.pop(lease.worker_id, None)
        if seq is not None:
            log.info(
                "lease %s: record %d (%s)",
                lease.lease_id,
                seq,
                lease.state,
                extra=log_fields(lease_id=lease.lease_id, seq=seq, worker_id=lease.worker_id),
            )
        return lease

    async def _finish(
        self, lease: Lease, state: LeaseState, reason: str, message: str = ""
    ) -> Lease:
        """End or fail an active lease (final record when it ran) and stop its VM."""
        now = self._clock()
        record = None
        changes: dict[str, object] = {
            "state": state,
            "ended_at": now,
            "end_reason": reason,
            "message": message[:256],
        }
        if lease.started_at is not None:
            end = min(now, lease.ends_at)
            confirmed = lease.confirmed_at if lease.confirmed_at is not None else lease.started_at
            until = max(lease.recorded_until or lease.started_at, min(confirmed, end))
            record = self._record(lease, until, ended=True)
            changes.update(recorded_until=until, last_record_at=now)
        done = msgspec.structs.replace(lease, **changes)
        saved = await self._save(done, lease.state, record)
        self._send(lease.worker_id, StopLease(lease_id=lease.lease_id, reason=reason))
        log.info(
            "lease %s %s (%s)",
            lease.lease_id,
            state,
            reason,
            extra=log_fields(lease_id=lease.lease_id, worker_id=lease.worker_id),
        )
        return saved

    def _owned(self, renter: str, lease: Lease | None, lease_id: str) -> Lease:
        if lease is None or lease.renter != renter:  # another renter's lease does not exist
            raise LeaseError(404, "not_found", f"no lease {lease_id}")
        return lease

    # ------------------------------------------------------------------ start-up

    async def load(self) -> int:
        """Take over the active leases a previous run left; returns how many."""
        now = self._clock()
        async with self._lock:
            leases = await self._db(self.store.active_leases)
            for lease in leases:
                if lease.state == "running" and lease.confirmed_at is None:
                    lease = msgspec.structs.replace(lease, confirmed_at=lease.recorded_until)
                self._active[lease.lease_id] = lease
                if lease.worker_id not in self._workers:
                    self._lost.setdefault(lease.worker_id, now)
        return len(leases)

    # ------------------------------------------------------------------ renters

    async def create(self, renter: str, request: LeaseRequest) -> Lease:
        try:
            ssh_key = normalize_ssh_public_key(request.ssh_public_key)
        except SshKeyError as exc:
            raise LeaseError(400, "invalid_ssh_key", str(exc)) from None
        settings = self.settings
        if not settings.min_duration_s <= request.duration_s <= settings.max_duration_s:
            raise LeaseError(
                400,
                "duration_out_of_range",
                f"duration_s must be between {settings.min_duration_s:g} and "
                f"{settings.max_duration_s:g}",
            )
        async with self._lock:
            mine = sum(1 for lease in self._active.values() if lease.renter == renter)
            if mine >= settings.max_active_per_renter:
                raise LeaseError(
                    409,
                    "too_many_leases",
                    f"at most {settings.max_active_per_renter} active leases per renter",
                )
            worker, devices = self._choose(request.gpus, request.worker_id)
            now = self._clock()
            lease = Lease(
                lease_id=secrets.token_hex(16),
                renter=renter,
                worker_id=worker.link.worker_id,
                miner_hotkey=worker.miner_hotkey,
                device_uuids=tuple(devices),
                ssh_public_key=ssh_key,
                vcpus=settings.vcpus_per_gpu * request.gpus,
                memory_mib=settings.memory_mib_per_gpu * request.gpus,
                disk_gib=settings.disk_gib_per_gpu * request.gpus,
                state="pending",
                created_at=now,
                ends_at=now + request.duration_s,
            )
            await self._db(self.store.insert_lease, lease)
            self._active[lease.lease_id] = lease
            log.info(
                "lease %s created for %s: %d GPU(s) on worker %s",
                lease.lease_id,
                renter,
                len(devices),
                lease.worker_id,
                extra=log_fields(lease_id=lease.lease_id, worker_id=lease.worker_id),
            )
            return await self._dispatch(lease)

    async def _dispatch(self, lease: Lease) -> Lease:
        """Send StartLease; a pending lease becomes starting once it is on its way."""
        if not self._send(lease.worker_id, self._start_message(lease)):
            return lease
        if lease.state != "pending":
            return lease
        return await self._save(msgspec.structs.replace(lease, state="starting"), "pending")

    def _choose(self, gpus: int, worker_id: str | None) -> tuple[OnlineWorker, list[str]]:
        if worker_id is not None:
            named = self._workers.get(worker_id)
            if named is None:
                raise LeaseError(409, "worker_unavailable", f"worker {worker_id} is not online")
            candidates = [named]
        else:
            candidates = list(self._workers.values())
        best: tuple[int, str, OnlineWorker, list[str]] | None = None
        for worker in candidates:
            free = self._free_gpus(worker)
            if len(free) < gpus or not self._resources_fit(worker, gpus):
                continue
            key = (len(free), worker.link.worker_id)
            if best is None or key < best[:2]:
                best = (*key, worker, [g.uuid for g in free[:gpus]])
        if best is None:
            where = "no online worker has" if worker_id is None else f"worker {worker_id} lacks"
            raise LeaseError(
                409, "no_capacity", f"{where} {gpus} idle GPU(s) with room for their VM"
            )
        return best[2], best[3]

    def _held(self, worker_id: str) -> set[str]:
        return {uuid for lease in self._leases_on(worker_id) for uuid in lease.device_uuids}

    def _free_gpus(self, worker: OnlineWorker) -> list[GpuSlot]:
        held = self._held(worker.link.worker_id)
        return sorted(
            (g for g in worker.gpus if g.state == "idle" and g.uuid not in held), key=_pci_key
        )

    def _resources_fit(self, worker: OnlineWorker, gpus: int) -> bool:
        mine = self._leases_on(worker.link.worker_id)
        s = self.settings
        capacity = worker.capacity
        return (
            sum(x.vcpus for x in mine) + s.vcpus_per_gpu * gpus <= capacity.vcpus
            and sum(x.memory_mib for x in mine) + s.memory_mib_per_gpu * gpus <= capacity.memory_mib
            and sum(x.disk_gib for x in mine) + s.disk_gib_per_gpu * gpus <= capacity.disk_gib
        )

    def _leases_on(self, worker_id: str) -> list[Lease]:
        return [lease for lease in self._active.values() if lease.worker_id == worker_id]

    async def get(self, renter: str, lease_id: str) -> Lease:
        lease = self._active.get(lease_id)
        if lease is None:
            lease = await self._db(self.store.lease, lease_id)
        return self._owned(renter, lease, lease_id)

    async def list_leases(self, renter: str) -> list[Lease]:
        stored = await self._db(self.store.leases_of, renter, MAX_LISTED_LEASES)
        return [self._active.get(lease.lease_id, lease) for lease in stored]

    async def extend(self, renter: str, lease_id: str, duration_s: float) -> Lease:
        async with self._lock:
            lease = self._active.get(lease_id)
            if lease is None:
                stored = self._owned(renter, await self._db(self.store.lease, lease_id), lease_id)
                raise LeaseError(409, "lease_not_active", f"lease {lease_id} is {stored.state}")
            lease = self._owned(renter, lease, lease_id)
            ends_at = lease.ends_at + duration_s
            if ends_at - lease.created_at > self.settings.max_duration_s:
                raise LeaseError(
                    400,
                    "duration_out_of_range",
                    f"a lease may last at most {self.settings.max_duration_s:g} s in all",
                )
            saved = await self._save(msgspec.structs.replace(lease, ends_at=ends_at), lease.state)
            if saved.state != "pending":
                self._send(saved.worker_id, ExtendLease(lease_id=lease_id, ends_at=ends_at))
            return saved

    async def terminate(self, renter: str, lease_id: str) -> Lease:
        async with self._lock:
            lease = self._active.get(lease_id)
            if lease is None:  # already over: DELETE is idempotent
                return self._owned(renter, await self._db(self.store.lease, lease_id), lease_id)
            self._owned(renter, lease, lease_id)
            return await self._finish(lease, "ended", "terminated")

    def gpus(self) -> GpusResponse:
        workers = []
        for worker_id in sorted(self._workers):
            worker = self._workers[worker_id]
            held = self._held(worker_id)
            views = [
                GpuView(
                    uuid=g.uuid,
                    name=g.name,
                    mem_bytes=g.mem_bytes,
                    state="leased" if g.uuid in held else g.state,
                )
                for g in sorted(worker.gpus, key=_pci_key)
            ]
            idle = sum(1 for v in views if v.state == "idle")
            workers.append(WorkerGpus(worker_id=worker_id, idle=idle, gpus=views))
        return GpusResponse(workers=workers)

    def counts(self) -> Counts:
        return Counts(
            workers=len(self._workers),
            idle_gpus=sum(len(self._free_gpus(w)) for w in self._workers.values()),
            running=sum(1 for lease in self._active.values() if lease.state == "running"),
            active=len(self._active),
        )

    # ------------------------------------------------------------------ workers

    def online(self, worker_id: str) -> bool:
        return worker_id in self._workers

    async def worker_online(self, link: WorkerLink, hello: Hello, miner_hotkey: str) -> None:
        """A worker (re)connected: remember its GPUs and reconcile its leases."""
        async with self._lock:
            worker_id = link.worker_id
            self._workers[worker_id] = OnlineWorker(
                link=link,
                miner_hotkey=miner_hotkey,
                capacity=hello.capacity,
                gpus=list(hello.gpus),
                connected_at=self._clock(),
            )
            self._lost.pop(worker_id, None)
            held = {h.lease_id: h for h in hello.leases}
            for lease in self._leases_on(worker_id):
                health = held.pop(lease.lease_id, None)
                await self._guard(self._reconcile(lease, health), lease)
            _stop_strays(link, held.values())

    async def _reconcile(self, lease: Lease, health: LeaseHealth | None) -> None:
        if lease.state == "running":
            if health is None or health.state in ("stopped", "failed"):
                detail = "" if health is None else health.detail
                await self._finish(lease, "failed", "worker_lost_lease", detail)
            elif health.state == "running":
                self._active[lease.lease_id] = msgspec.structs.replace(
                    lease, confirmed_at=self._clock()
                )
            return
        if health is not None and health.state == "failed":
            await self._finish(lease, "failed", "start_failed", health.detail)
            return
        await self._dispatch(lease)  # pending or starting: (re)send StartLease

    async def _guard(self, work: Awaitable[object], lease: Lease) -> None:
        """Run one lease's change; a store failure is logged and retried by a later event."""
        try:
            await work
        except StoreConflict as exc:
            log.warning("lease %s changed meanwhile: %s", lease.lease_id, exc)
        except LeaseRecordError as exc:  # a bug, not the worker's fault: keep the session
            log.error("lease %s: record refused: %s", lease.lease_id, exc)
        except StoreError as exc:
            log.error(
                "lease %s: store failed, will retry: %s",
                lease.lease_id,
                exc,
                extra=log_fields(lease_id=lease.lease_id),
            )

    async def worker_offline(self, link: WorkerLink) -> None:
        async with self._lock:
            worker_id = link.worker_id
            current = self._workers.get(worker_id)
            if current is None or current.link is not link:
                return  # a newer session took its place
            del self._workers[worker_id]
            if self._leases_on(worker_id):
                self._lost[worker_id] = self._clock()

    async def worker_revoked(self, worker_id: str) -> None:
        """Fail every active lease of a revoked worker now: nothing it says counts anymore."""
        async with self._lock:
            for lease in self._leases_on(worker_id):
                await self._guard(self._finish(lease, "failed", "worker_revoked"), lease)
            self._workers.pop(worker_id, None)
            self._lost.pop(worker_id, None)

    def _worker_lease(self, worker_id: str, lease_id: str) -> Lease | None:
        lease = self._active.get(lease_id)
        return lease if lease is not None and lease.worker_id == worker_id else None

    async def heartbeat(self, link: WorkerLink, beat: Heartbeat) -> None:
        async with self._lock:
            worker_id = link.worker_id
            online = self._workers.get(worker_id)
            if online is None or online.link is not link:
                return
            online.gpus = list(beat.gpus)
            now = self._clock()
            reported = {h.lease_id: h for h in beat.leases}
            for lease in self._leases_on(worker_id):
                health = reported.pop(lease.lease_id, None)
                if lease.state != "running":
                    if health is not None and health.state == "failed":
                        await self._guard(
                            self._finish(lease, "failed", "start_failed", health.detail), lease
                        )
                    continue
                if health is not None and health.state == "running":
                    self._active[lease.lease_id] = msgspec.structs.replace(lease, confirmed_at=now)
                else:
                    detail = "" if health is None else health.detail
                    await self._guard(
                        self._finish(lease, "failed", "worker_lost_lease", detail), lease
                    )
            _stop_strays(link, reported.values())

    async def lease_started(self, link: WorkerLink, started: LeaseStarted) -> None:
        async with self._lock:
            lease = self._worker_lease(link.worker_id, started.lease_id)
            if lease is None:
                link.send(StopLease(lease_id=started.lease_id, reason="not an active lease"))
                return
            now = self._clock()
            endpoint = {
                "ssh_host": started.ssh_host,
                "ssh_port": started.ssh_port,
                "ssh_user": started.ssh_user,
            }
            if lease.state == "running":  # a repeated answer after a reconnect
                self._active[lease.lease_id] = msgspec.structs.replace(
                    lease, confirmed_at=now, **endpoint
                )
                return
            running = msgspec.structs.replace(
                lease,
                state="running",
                started_at=now,
                confirmed_at=now,
                recorded_until=now,
                last_record_at=now,
                **endpoint,
            )
            await self._guard(
                self._save(running, lease.state, self._record(running, now, ended=False)), lease
            )

    async def lease_failed(self, link: WorkerLink, failed: LeaseFailed) -> None:
        async with self._lock:
            lease = self._worker_lease(link.worker_id, failed.lease_id)
            if lease is None:
                return
            reason = "worker_failed" if lease.state == "running" else "start_failed"
            await self._guard(self._finish(lease, "failed", reason, failed.reason), lease)

    async def lease_stopped(self, link: WorkerLink, stopped: LeaseStopped) -> None:
        async with self._lock:
            lease = self._worker_lease(link.worker_id, stopped.lease_id)
            if lease is None:
                return  # the answer to our StopLease
            await self._guard(self._finish(lease, "failed", "stopped_by_worker"), lease)

    # ------------------------------------------------------------------ time

    async def tick(self) -> None:
        """Expiries, start timeouts, grace periods and checkpoints due now."""
        async with self._lock:
            now = self._clock()
            s = self.settings
            for lease in list(self._active.values()):
                lost_since = self._lost.get(lease.worker_id)
                work: Awaitable[object]
                if lease.ends_at <= now:
                    work = self._finish(lease, "ended", "expired")
                elif lease.state in ("pending", "starting"):
                    if now - lease.created_at < s.start_timeout_s:
                        continue
                    work = self._finish(lease, "failed", "start_timeout")
                elif lost_since is not None and now - lost_since >= s.worker_grace_s:
                    work = self._finish(lease, "failed", "worker_lost")
                elif self._checkpoint_due(lease, now):
                    work = self._checkpoint(lease, now)
                else:
                    continue
                await self._guard(work, lease)

    def _checkpoint_due(self, lease: Lease, now: float) -> bool:
        if lease.state != "running" or lease.confirmed_at is None:
            return False
        if lease.last_record_at is not None and now - lease.last_record_at < (
            self.settings.checkpoint_s
        ):
            return False
        return lease.recorded_until is None or lease.confirmed_at > lease.recorded_until

    async def _checkpoint(self, lease: Lease, now: float) -> None:
        assert lease.confirmed_at is not None
        until = min(lease.confirmed_at, lease.ends_at)
        updated = msgspec.structs.replace(lease, recorded_until=until, last_record_at=now)
        await self._save(updated, "running", self._record(updated, until, ended=False))

    async def run(self) -> None:
        """Tick every ``tick_s`` until cancelled (errors are logged, never fatal)."""
        while True:
            try:
                await self.tick()
            except StoreError as exc:  # StoreUnavailable included
                log.error("lease tick failed: %s", exc)
            except Exception:
                log.exception("lease tick failed")
            await asyncio.sleep(self.settings.tick_s)
