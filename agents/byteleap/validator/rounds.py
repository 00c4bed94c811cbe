"""Challenge rounds: choose idle devices, dispatch, time, sample, verify, record (DESIGN §4).

One :meth:`RoundEngine.run_round` challenges every connected miner concurrently; per miner:

1. **Choose.** From the miner's latest roster, each online worker's devices: its GPUs that are not
   bound to vfio-pci, not leased and not excluded by a device-uuid conflict
   (``store.excluded_devices()``); a worker without GPUs is challenged on its CPU prover
   ``cpu-0``. Leased means listed in the roster's ``leased_devices`` *or* in a gateway-signed
   lease of that (miner, worker) that has not ended and was last confirmed within its gateway's
   grace (:func:`~byteleap.validator.leases.leased_devices`): a miner cannot get a rented GPU
   challenged by calling it free. A worker left with nothing is skipped. GPU size: the largest
   multiple of 64 with three n x n fp32 matrices in half of the GPU's memory
   (``n = sqrt(mem / 24)``), capped at ``rounds.gpu_max_n``, in ``rounds.precision`` (fp32 where
   tf32/bf16 is configured but the GPU is older than compute capability 8.0 and could not run
   it); CPU: ``rounds.cpu_n`` in fp32.
2. **Echo.** Every online worker, concurrently, just before dispatch. A worker whose echo fails
   is neither challenged nor marked present; the others are marked present (availability),
   fully leased ones included: a rented worker is not challenged, but it is there.
3. **Issue, then dispatch.** Fresh CSPRNG seed and challenge id per device, recorded as issued
   *before* anything is sent; then one ``ChallengeBatch`` with all the miner's devices at the same
   instant (so one GPU cannot answer for several).
4. **Time.** Per device, on the validator's clock: ``measured = commit received - batch sent``;
   ``elapsed = max(measured - rtt, measured / 2)`` with ``rtt`` its worker's echo, so a miner that
   slows its echoes gains at most a factor of two. Commits are recorded.
5. **Reveal.** Rows (k) and secret columns (m) are drawn with ``secrets`` only now, after the
   commits arrived; one ``RevealBatch`` for every committed device. Each reveal is verified in a
   thread (at most ``max_concurrent_verifications`` at once).
6. **Record.** Per worker, one ``store.finish`` with every device's outcome: verified (FLOP/s =
   2 n^3 / elapsed), failed (the verifier's reason or the miner's ``ErrorCode`` name) or expired
   (``no_commit`` / ``no_reveal``: nothing before the deadline, the miner gone included). Then a
   ``ReleaseBatch`` for everything dispatched, whatever happened.

Every challenge reaches a terminal state. The normal paths above finish them, counted in the
workers' histories. When the validator itself fails mid-round (a store error, a bug, cancellation
at shutdown), the challenges it could not finish are *not* finished with a made-up outcome: a
``finally`` of :meth:`RoundEngine.run_round` expires them with ``store.sweep_unfinished`` (which
counts nothing against the workers: the validator failed, not them). Rounds never overlap, so
that sweep cannot touch another round's challenges. If even the sweep cannot run (the store down
at shutdown), :meth:`RoundEngine.recover` expires them at the next start.

The engine is also the hub's :class:`~byteleap.validator.miners.HubListener`: rosters become
``store.sync_roster`` (GPU uuids only: ``cpu-0`` is not unique across the network, so it takes
no part in first-claim-wins), disconnects ``store.mark_offline``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

import msgspec

from ..core import wire
from ..core.challenge import verifier
from ..core.challenge.spec import ChallengeSpec, Precision, RevealSample, draw_sample
from ..core.logs import log_fields
from .config import RoundSettings
from .db import AsyncStore
from .leases import leased_devices
from .miners import BatchResult, MinerRequestError, RevealAnswer
from .store import (
    ChallengeState,
    DeviceClaim,
    DeviceOutcome,
    IssuedChallenge,
    RosterWorker,
    StoreError,
    WorkerRoundOutcome,
)

__all__ = [
    "CPU_DEVICE",
    "DeviceReport",
    "MinerReport",
    "MinerSource",
    "RoundEngine",
    "RoundMiner",
    "RoundReport",
    "WorkerReport",
    "corrected_elapsed",
    "gpu_matrix_size",
    "gpu_precision",
    "roster_workers",
]

log = logging.getLogger(__name__)

CPU_DEVICE = wire.CPU_DEVICE
"""Every worker's CPU prover (worker/agent.py build_devices); not a network-unique uuid."""
GPU_MEMORY_SHARE: Final = 0.5
"""A GPU challenge's three n x n fp32 matrices use at most this share of the GPU's memory."""
DEADLINE_SLACK_S: Final = 2.0
"""Added to the validator's waits on top of the worker's deadline and the path's round trip."""
RELEASE_TIMEOUT_S: Final = 5.0
DEFAULT_SWEEP_TIMEOUT_S: Final = 10.0
AMPERE_PRECISIONS: Final = frozenset({"tf32", "bf16"})

# Reasons (stable codes in DeviceOutcome.reason and the reports).
OK: Final = verifier.OK
NO_COMMIT: Final = "no_commit"
NO_REVEAL: Final = "no_reveal"
VALIDATOR_ERROR: Final = "validator_error"
SWEEP_REASON: Final = "validator_error"
RESTART_REASON: Final = "validator_restart"


class RoundMiner(Protocol):
    """What the engine needs from a connected miner (:class:`~.miners.MinerSession`)."""

    @property
    def hotkey(self) -> str: ...

    @property
    def uid(self) -> int: ...

    @property
    def roster(self) -> wire.WorkerRoster | None: ...

    async def echo(self, worker_id: str, timeout_s: float) -> float: ...

    async def run_batch(self, batch: wire.ChallengeBatch, deadline: float) -> BatchResult: ...

    async def reveal(
        self, batch: wire.RevealBatch, deadline: float
    ) -> dict[bytes, RevealAnswer | None]: ...

    async def release(self, batch: wire.ReleaseBatch) -> None: ...


class MinerSource(Protocol):
    """Where the connected miners come from (:class:`~.miners.MinerHub`)."""

    def sessions(self) -> Sequence[RoundMiner]: ...


# --------------------------------------------------------------------------------------------
# Reports


class DeviceReport(msgspec.Struct, frozen=True, kw_only=True):
    device_uuid: str
    state: str
    """``verified``, ``failed``, ``expired`` or ``skipped`` (not challenged)."""
    reason: str
    """``ok``, a verifier reason, an ErrorCode name, ``no_commit``, ``no_reveal``,
    ``validator_error``; for skipped devices ``leased``, ``excluded``, ``vfio_bound``,
    ``memory_unknown``."""
    challenge_id: str = ""
    """Hex, empty when not challenged."""
    n: int = 0
    precision: str = ""
    rtt_s: float | None = None
    measured_s: float | None = None
    """Batch sent to commit received."""
    elapsed_s: float | None = None
    """``measured`` corrected for the round trip (what the score uses)."""
    flops: float | None = None


class WorkerReport(msgspec.Struct, frozen=True, kw_only=True):
    worker_id: str
    state: str
    """``challenged`` or ``skipped``."""
    reason: str = ""
    """Why it was skipped: ``offline``, ``nothing_to_challenge``, ``echo:<reason>``; or
    ``validator_error`` when its outcome could not be recorded."""
    present: bool = False
    """Answered the echo (marked present)."""
    recorded: bool = False
    """Its outcome is in the store's history."""
    rtt_s: float | None = None
    devices: tuple[DeviceReport, ...] = ()

    @property
    def ok(self) -> bool:
        challenged = [d for d in self.devices if d.state != "skipped"]
        return bool(challenged) and all(d.state == "verified" for d in challenged)


class MinerReport(msgspec.Struct, frozen=True, kw_only=True):
    hotkey: str
    uid: int
    workers: tuple[WorkerReport, ...] = ()
    error: str | None = None
    """Set when the validator failed during this miner's round."""


class RoundReport(msgspec.Struct, frozen=True, kw_only=True):
    round_id: int
    started_at: float
    finished_at: float
    miners: tuple[MinerReport, ...]
    swept: int = 0
    """Challenges left open by a validator failure and expired at the end of the round."""

    def devices(self) -> Iterable[DeviceReport]:
        for miner in self.miners:
            for worker in miner.workers:
                yield from worker.devices

    def count(self, state: str) -> int:
        return sum(1 for d in self.devices() if d.state == state)

    @property
    def challenged_workers(self) -> int:
        return sum(1 for m in self.miners for w in m.workers if w.state == "challenged")

    def summary(self) -> str:
        """One line for logs and STATUS."""
        line = (
            f"round {self.round_id:x}: {len(self.miners)} miners, "
            f"{self.challenged_workers} workers challenged, devices {self.count('verified')} "
            f"verified / {self.count('failed')} failed / {self.count('expired')} expired"
        )
        if self.swept:
            line += f", {self.swept} swept after a validator error"
        return line


# --------------------------------------------------------------------------------------------
# Pure helpers


def gpu_matrix_size(mem_bytes: int, max_n: int) -> int | None:
    """The GPU's n: the largest multiple of 64 with 3 n^2 fp32 values in half its memory,
    capped at ``max_n``; None when the memory is unknown or too small for the smallest n."""
    budget = int(mem_bytes * GPU_MEMORY_SHARE)
    n = math.isqrt(max(0, budget) // (3 * 4))
    n = min(n, max_n) // wire.N_MULTIPLE * wire.N_MULTIPLE
    return n if n >= wire.MIN_N else None


def gpu_precision(configured: Precision, compute_capability: str) -> Precision:
    """``configured``, or fp32 where the GPU cannot run it: tf32 and bf16 need compute
    capability 8.0 or newer (an unknown capability counts as older), as the worker enforces."""
    if configured not in AMPERE_PRECISIONS:
        return configured
    major = compute_capability.partition(".")[0]
    return configured if major.isdigit() and int(major) >= 8 else "fp32"


def corrected_elapsed(measured_s: float, rtt_s: float) -> float:
    """Dispatch-to-commit time minus the path's round trip, never below half the measured time."""
    return max(measured_s - rtt_s, measured_s / 2)


def roster_workers(roster: wire.WorkerRoster) -> list[RosterWorker]:
    """The store's view of a roster: GPUs only take part in device-uuid uniqueness.

    A leased device the worker does not list as a GPU (``cpu-0``, or a miner's mistake) is left
    out, so one bad entry cannot make the store refuse the whole roster.
    """
    out = []
    for w in roster.workers:
        gpus = {g.uuid: g for g in w.inventory.gpus}
        out.append(
            RosterWorker(
                worker_id=w.worker_id,
                online=w.online,
                devices=tuple(
                    DeviceClaim(uuid=g.uuid, name=g.name, mem_bytes=g.mem_bytes)
                    for g in gpus.values()
                ),
                leased_devices=tuple(dict.fromkeys(u for u in w.leased_devices if u in gpus)),
            )
        )
    return out


@dataclass(frozen=True, slots=True)
class _Target:
    uuid: str
    n: int
    precision: Precision


def _choose(
    worker: wire.WorkerSummary,
    miner_hotkey: str,
    excluded: set[tuple[str, str, str]],
    settings: RoundSettings,
    signed_leased: Mapping[tuple[str, str], set[str]],
) -> tuple[list[_Target], list[DeviceReport]]:
    """The worker's devices to challenge, and those skipped with why. ``signed_leased``:
    (miner, worker) -> devices in an active gateway-signed lease."""
    leased = set(worker.leased_devices) | signed_leased.get((miner_hotkey, worker.worker_id), set())
    chosen: list[_Target] = []
    skipped: list[DeviceReport] = []

    def skip(uuid: str, reason: str) -> None:
        skipped.append(DeviceReport(device_uuid=uuid, state="skipped", reason=reason))

    gpus = worker.inventory.gpus
    if not gpus:
        candidates: list[tuple[str, int | None, Precision, bool]] = [
            (CPU_DEVICE, settings.cpu_n, "fp32", False)
        ]
    else:
        candidates = [
            (
                g.uuid,
                gpu_matrix_size(g.mem_bytes, settings.gpu_max_n),
                gpu_precision(settings.precision, g.compute_capability),
                g.vfio_bound,
            )
            for g in gpus
        ]
    for uuid, n, precision, vfio_bound in candidates:
        if uuid in leased:
            skip(uuid, "leased")
        elif (miner_hotkey, worker.worker_id, uuid) in excluded:
            skip(uuid, "excluded")
        elif vfio_bound:
            skip(uuid, "vfio_bound")
        elif n is None:
            skip(uuid, "memory_unknown")
        else:
            chosen.append(_Target(uuid, n, precision))
    return chosen, skipped


# --------------------------------------------------------------------------------------------
# Per-round state


@dataclass(slots=True)
class _Device:
    worker: _Worker
    challenge: wire.DeviceChallenge
    spec: ChallengeSpec
    root: bytes | None = None
    measured_s: float | None = None
    elapsed_s: float | None = None
    committed_at: float | None = None
    sample: RevealSample | None = None
    state: ChallengeState | None = None
    reason: str = ""
    flops: float | None = None

    @property
    def challenge_id(self) -> bytes:
        return self.challenge.challenge_id

    def end(self, state: ChallengeState, reason: str, flops: float | None = None) -> None:
        self.state = state
        self.reason = reason
        self.flops = flops

    def outcome(self) -> DeviceOutcome:
        assert self.state is not None
        return DeviceOutcome(
            challenge_id=self.challenge_id,
            state=self.state,
            reason=self.reason,
            merkle_root=self.root,
            committed_at=self.committed_at,
            rtt_s=self.worker.rtt_s,
            elapsed_s=self.elapsed_s,
            flops=self.flops,
        )

    def report(self, recorded: bool) -> DeviceReport:
        """As the store has it: unrecorded outcomes are expired by the end-of-round sweep."""
        if recorded and self.state is not None:
            state, reason = self.state.value, self.reason
        else:
            state, reason = ChallengeState.EXPIRED.value, VALIDATOR_ERROR
        return DeviceReport(
            device_uuid=self.spec.device_uuid,
            state=state,
            reason=reason,
            challenge_id=self.challenge_id.hex(),
            n=self.spec.n,
            precision=self.spec.precision,
            rtt_s=self.worker.rtt_s,
            measured_s=self.measured_s,
            elapsed_s=self.elapsed_s,
            flops=self.flops if recorded else None,
        )


@dataclass(slots=True)
class _Worker:
    worker_id: str
    targets: list[_Target]
    skipped: list[DeviceReport]
    rtt_s: float | None = None
    skip_reason: str = ""
    devices: list[_Device] = field(default_factory=list)
    recorded: bool = False

    def report(self) -> WorkerReport:
        if self.skip_reason:
            return WorkerReport(
                worker_id=self.worker_id,
                state="skipped",
                reason=self.skip_reason,
                present=self.rtt_s is not None,
                rtt_s=self.rtt_s,
                devices=tuple(self.skipped),
            )
        return WorkerReport(
            worker_id=self.worker_id,
            state="challenged",
            reason="" if self.recorded else VALIDATOR_ERROR,
            present=True,
            recorded=self.recorded,
            rtt_s=self.rtt_s,
            devices=tuple(d.report(self.recorded) for d in self.devices) + tuple(self.skipped),
        )


# --------------------------------------------------------------------------------------------


class RoundEngine:
    """Runs challenge rounds against the hub's miners and records them in the store."""

    def __init__(
        self,
        store: AsyncStore,
        hub: MinerSource,
        settings: RoundSettings,
        *,
        clock: Callable[[], float] = time.time,
        sweep_timeout_s: float = DEFAULT_SWEEP_TIMEOUT_S,
        lease_grace_s: Mapping[str, float] | None = None,
    ) -> None:
        """``clock`` is wall time (unix seconds) for what the store keeps; durations come from
        the sessions' monotonic clock and deadlines from the event loop's. ``lease_grace_s``:
        gateway id -> grace of the gateways whose signed leases keep devices out of rounds."""
        self.store = store
        self._lease_grace = dict(lease_grace_s or {})
        self.hub = hub
        self.settings = settings
        self._clock = clock
        self._sweep_timeout = sweep_timeout_s
        self._verifications = asyncio.Semaphore(settings.max_concurrent_verifications)
        self._lock = asyncio.Lock()
        self._open: set[bytes] = set()
        self._conflicts_seen: set[tuple[str, str, str]] = set()
        self.rounds_run = 0
        self.last_report: RoundReport | None = None

    # ------------------------------------------------------------------ hub listener

    async def on_roster(self, session: RoundMiner, roster: wire.WorkerRoster) -> None:
        """Persist a miner's roster; log device conflicts the first time they are seen."""
        conflicts = await self.store.sync_roster(
            session.hotkey, session.uid, roster_workers(roster), self._clock()
        )
        for c in conflicts:
            key = (c.uuid, c.miner_hotkey, c.worker_id)
            if key in self._conflicts_seen:
                continue
            self._conflicts_seen.add(key)
            log.warning(
                "device uuid claimed twice; the later claim is not challenged",
                extra=log_fields(
                    device=c.uuid,
                    miner=c.miner_hotkey,
                    worker_id=c.worker_id,
                    owner_miner=c.owner_miner,
                    owner_worker=c.owner_worker,
                ),
            )

    async def on_disconnect(self, session: RoundMiner) -> None:
        await self.store.mark_offline(session.hotkey, self._clock())

    # ------------------------------------------------------------------ rounds

    async def recover(self) -> int:
        """At start-up: expire the challenges a previous run left open (not counted)."""
        swept = await self.store.sweep_unfinished(self._clock(), RESTART_REASON)
        if swept:
            log.warning(
                "expired %d challenge(s) left open by the previous run",
                swept,
                extra=log_fields(count=swept),
            )
        return swept

    async def run_round(self) -> RoundReport:
        """Challenge every connected miner once; see the module docstring for the guarantees.

        Failures of one miner's round are in its :class:`MinerReport`; only a store failure
        before anything was issued (reading the excluded devices) raises (:class:`StoreError`).
        """
        async with self._lock:
            round_id = secrets.randbits(63)
            started = self._clock()
            swept = 0
            try:
                excluded = await self.store.excluded_devices()
                signed_leased = await self._signed_leased(started)
                miners = list(self.hub.sessions())
                reports = await asyncio.gather(
                    *(self._run_miner(round_id, m, excluded, signed_leased) for m in miners)
                )
            finally:
                if self._open:
                    swept = await self._sweep(round_id)
            report = RoundReport(
                round_id=round_id,
                started_at=started,
                finished_at=self._clock(),
                miners=tuple(reports),
                swept=swept,
            )
            self.rounds_run += 1
            self.last_report = report
            log.info(report.summary(), extra=log_fields(round_id=round_id))
            return report

    async def _signed_leased(self, now: float) -> dict[tuple[str, str], set[str]]:
        """Devices in an active gateway-signed lease (none when no gateway is configured)."""
        if not self._lease_grace:
            return {}
        since = now - max(self._lease_grace.values())
        return leased_devices(await self.store.active_leases(since), now, self._lease_grace)

    async def _sweep(self, round_id: int) -> int:
        """Expire what this round could not finish (validator failure: counted against no one)."""
        count = len(self._open)
        try:
            async with asyncio.timeout(self._sweep_timeout):
                swept = await self.store.sweep_unfinished(self._clock(), SWEEP_REASON)
        except (TimeoutError, asyncio.CancelledError, StoreError) as exc:
            log.error(
                "could not expire %d unfinished challenge(s) now (%s); the next start expires them",
                count,
                type(exc).__name__,
                extra=log_fields(round_id=round_id),
            )
            return 0
        self._open.clear()
        log.warning(
            "expired %d challenge(s) the validator could not finish",
            swept,
            extra=log_fields(round_id=round_id),
        )
        return swept

    async def _run_miner(
        self,
        round_id: int,
        miner: RoundMiner,
        excluded: set[tuple[str, str, str]],
        signed_leased: Mapping[tuple[str, str], set[str]],
    ) -> MinerReport:
        hotkey = miner.hotkey
        workers: list[_Worker] = []
        dispatched: list[bytes] = []
        error: str | None = None
        try:
            workers = self._plan(miner, excluded, signed_leased)
            online = [w for w in workers if not w.skip_reason]
            await self._echo(miner, online)
            present = [w for w in online if not w.skip_reason]
            await self._mark_present(hotkey, present)
            for worker in present:
                if not worker.targets:  # leased or excluded throughout: present, not challenged
                    worker.skip_reason = "nothing_to_challenge"
            challenged = [w for w in present if not w.skip_reason]
            if challenged:
                devices = self._issue_plan(round_id, hotkey, challenged)
                ids = [d.challenge_id for d in devices]
                self._open.update(ids)
                await self.store.issue([self._issued(round_id, hotkey, d) for d in devices])
                dispatched = ids
                await self._dispatch(round_id, miner, challenged, devices)
                await self._reveal(round_id, miner, devices)
                await self._finish(round_id, hotkey, challenged)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.exception(
                "challenge round failed for a miner",
                extra=log_fields(miner=hotkey, round_id=round_id),
            )
        finally:
            if dispatched:
                await self._release(round_id, miner, dispatched)
        return MinerReport(
            hotkey=hotkey, uid=miner.uid, workers=tuple(w.report() for w in workers), error=error
        )

    def _plan(
        self,
        miner: RoundMiner,
        excluded: set[tuple[str, str, str]],
        signed_leased: Mapping[tuple[str, str], set[str]],
    ) -> list[_Worker]:
        roster = miner.roster
        if roster is None:
            return []
        workers = []
        for summary in roster.workers:
            targets, skipped = _choose(
                summary, miner.hotkey, excluded, self.settings, signed_leased
            )
            worker = _Worker(summary.worker_id, targets, skipped)
            if not summary.online:
                worker.skip_reason = "offline"
            workers.append(worker)
        return workers

    async def _echo(self, miner: RoundMiner, workers: list[_Worker]) -> None:
        async def one(worker: _Worker) -> None:
            try:
                worker.rtt_s = await miner.echo(worker.worker_id, self.settings.echo_timeout_s)
            except MinerRequestError as exc:
                worker.skip_reason = f"echo:{exc.reason}"
            except Exception as exc:
                log.exception("echo failed", extra=log_fields(miner=miner.hotkey))
                worker.skip_reason = f"echo:{type(exc).__name__}"

        await asyncio.gather(*(one(w) for w in workers))

    async def _mark_present(self, hotkey: str, workers: list[_Worker]) -> None:
        if not workers:
            return
        try:
            await self.store.mark_present([(hotkey, w.worker_id) for w in workers], self._clock())
        except StoreError:  # availability of this round is lost; the challenge still counts
            log.exception("could not record presence", extra=log_fields(miner=hotkey))

    def _issue_plan(self, round_id: int, hotkey: str, workers: list[_Worker]) -> list[_Device]:
        deadline_ms = math.ceil(self.settings.commit_deadline_s * 1000)
        devices = []
        for worker in workers:
            for target in worker.targets:
                spec = ChallengeSpec(
                    challenge_id=secrets.token_bytes(16),
                    seed=secrets.token_bytes(32),
                    miner_hotkey=hotkey,
                    worker_id=worker.worker_id,
                    device_uuid=target.uuid,
                    n=target.n,
                    precision=target.precision,
                )
                challenge = wire.DeviceChallenge(
                    worker_id=worker.worker_id,
                    challenge_id=spec.challenge_id,
                    seed=spec.seed,
                    miner_hotkey=hotkey,
                    device_uuid=target.uuid,
                    n=target.n,
                    precision=target.precision,
                    deadline_ms=deadline_ms,
                )
                device = _Device(worker=worker, challenge=challenge, spec=spec)
                worker.devices.append(device)
                devices.append(device)
        return devices

    def _issued(self, round_id: int, hotkey: str, device: _Device) -> IssuedChallenge:
        spec = device.spec
        return IssuedChallenge(
            challenge_id=spec.challenge_id,
            round_id=round_id,
            miner_hotkey=hotkey,
            worker_id=spec.worker_id,
            device_uuid=spec.device_uuid,
            n=spec.n,
            precision=spec.precision,
            seed=spec.seed,
            issued_at=self._clock(),
        )

    def _deadline(self, seconds: float, workers: Iterable[_Worker]) -> float:
        rtt = max((w.rtt_s or 0.0 for w in workers), default=0.0)
        return asyncio.get_running_loop().time() + seconds + rtt + DEADLINE_SLACK_S

    async def _dispatch(
        self, round_id: int, miner: RoundMiner, workers: list[_Worker], devices: list[_Device]
    ) -> None:
        batch = wire.ChallengeBatch(round_id=round_id, challenges=[d.challenge for d in devices])
        deadline = self._deadline(self.settings.commit_deadline_s, workers)
        sent_wall = self._clock()
        result = await miner.run_batch(batch, deadline)
        for device in devices:
            answer = result.answers.get(device.challenge_id)
            measured = result.measured(device.challenge_id)
            if answer is None or measured is None:
                device.end(ChallengeState.EXPIRED, NO_COMMIT)
            elif isinstance(answer, wire.DeviceFailure):
                device.end(ChallengeState.FAILED, answer.code.name)
            else:
                assert device.worker.rtt_s is not None
                device.root = answer.merkle_root
                device.measured_s = measured
                device.elapsed_s = corrected_elapsed(measured, device.worker.rtt_s)
                device.committed_at = sent_wall + measured
                await self.store.record_commit(
                    device.challenge_id, answer.merkle_root, device.committed_at
                )

    async def _reveal(self, round_id: int, miner: RoundMiner, devices: list[_Device]) -> None:
        committed = [d for d in devices if d.state is None]
        if not committed:
            return
        settings = self.settings
        requests = []
        for device in committed:
            n = device.spec.n
            # Drawn only now, after the commits: the prover could not know them in advance.
            device.sample = draw_sample(
                n, min(settings.sample_rows, n), min(settings.sample_cols, n)
            )
            requests.append(
                wire.DeviceRevealRequest(
                    worker_id=device.spec.worker_id,
                    challenge_id=device.challenge_id,
                    device_uuid=device.spec.device_uuid,
                    rows=list(device.sample.rows),
                )
            )
        batch = wire.RevealBatch(round_id=round_id, requests=requests)
        deadline = self._deadline(
            settings.reveal_deadline_s, {d.worker.worker_id: d.worker for d in committed}.values()
        )
        answers = await miner.reveal(batch, deadline)
        await asyncio.gather(*(self._judge(d, answers.get(d.challenge_id)) for d in committed))

    async def _judge(self, device: _Device, answer: RevealAnswer | None) -> None:
        if answer is None:
            device.end(ChallengeState.EXPIRED, NO_REVEAL)
            return
        if isinstance(answer, wire.DeviceFailure):
            device.end(ChallengeState.FAILED, answer.code.name)
            return
        assert device.root is not None and device.sample is not None
        revealed = {row.index: (row.values, row.path) for row in answer.rows}
        async with self._verifications:
            verdict = await asyncio.to_thread(
                verifier.verify, device.spec, device.root, device.sample, revealed
            )
        if not verdict.ok:
            device.end(ChallengeState.FAILED, verdict.reason)
            log.info(
                "device failed verification: %s",
                verdict.detail,
                extra=log_fields(
                    miner=device.spec.miner_hotkey,
                    worker_id=device.spec.worker_id,
                    device=device.spec.device_uuid,
                    reason=verdict.reason,
                ),
            )
            return
        assert device.elapsed_s is not None
        # A zero time only comes from a coarse clock; it must not divide by zero.
        device.end(ChallengeState.VERIFIED, OK, device.spec.flops / max(device.elapsed_s, 1e-9))

    async def _finish(self, round_id: int, hotkey: str, workers: list[_Worker]) -> None:
        for worker in workers:
            if any(d.state is None for d in worker.devices):  # unreachable: every path ends them
                continue
            outcome = WorkerRoundOutcome(
                round_id=round_id,
                miner_hotkey=hotkey,
                worker_id=worker.worker_id,
                finished_at=self._clock(),
                devices=tuple(d.outcome() for d in worker.devices),
            )
            try:
                counted = await self.store.finish(outcome)
            except StoreError:  # left open: the end-of-round sweep expires it
                log.exception(
                    "could not record a worker's round",
                    extra=log_fields(miner=hotkey, worker_id=worker.worker_id),
                )
                continue
            worker.recorded = counted
            self._open.difference_update(d.challenge_id for d in worker.devices)
            if not counted:
                log.warning(
                    "worker's round was already finished; not counted twice",
                    extra=log_fields(miner=hotkey, worker_id=worker.worker_id),
                )

    async def _release(self, round_id: int, miner: RoundMiner, challenge_ids: list[bytes]) -> None:
        try:
            async with asyncio.timeout(RELEASE_TIMEOUT_S):
                await miner.release(
                    wire.ReleaseBatch(round_id=round_id, challenge_ids=challenge_ids)
                )
        except Exception as exc:  # the workers' result TTL frees them anyway
            log.info(
                "could not release a round's results: %s",
                exc,
                extra=log_fields(miner=miner.hotkey, round_id=round_id),
            )
