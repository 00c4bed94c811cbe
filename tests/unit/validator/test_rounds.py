"""RoundEngine against scripted miners and a real store (SQLite and PostgreSQL, see conftest).

The fake miners compute real proofs (numpy, n=128) or cheat, and time their answers on a fake
clock, so every timing assertion is exact arithmetic, never a measurement. After every scenario
every challenge the engine issued must be terminal in the store.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest

from byteleap.core import wire
from byteleap.core.challenge import ProvenChallenge, prove
from byteleap.core.challenge.prover import NumpyBackend
from byteleap.core.challenge.simulate import skipping_prover
from byteleap.core.scoring import AvailabilityBitmap, ScoringParams
from byteleap.validator.config import RoundSettings
from byteleap.validator.db import AsyncStore
from byteleap.validator.miners import BatchResult, MinerRequestError, RevealAnswer
from byteleap.validator.rounds import (
    CPU_DEVICE,
    RoundEngine,
    RoundMiner,
    RoundReport,
    corrected_elapsed,
    gpu_matrix_size,
    gpu_precision,
    roster_workers,
)
from byteleap.validator.store import ChallengeState, Store, StoreError
from byteleap.validator.store_sql import SqlStore

N = 128
MINER = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"
OTHER_MINER = "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty"
SETTINGS = RoundSettings(cpu_n=N, gpu_max_n=N, sample_rows=16, sample_cols=8)
DISPATCHED_AT = 1000.0
"""The fake sessions' monotonic clock at dispatch."""
NOW = 1_700_000_000.0
"""The engine's wall clock (fixed: store timestamps and availability buckets)."""
PARAMS = ScoringParams()


def worker_id() -> str:
    return secrets.token_hex(16)


def gpu(
    uuid: str, *, mem_bytes: int = 16 << 30, vfio: bool = False, capability: str = "9.0"
) -> wire.GpuInfo:
    return wire.GpuInfo(
        uuid=uuid,
        name="Test GPU",
        mem_bytes=mem_bytes,
        pci_bus_id=f"0000:{secrets.randbelow(200) + 1:02x}:00.0",
        compute_capability=capability,
        vfio_bound=vfio,
    )


def summary(
    wid: str, *gpus: wire.GpuInfo, online: bool = True, leased: Sequence[str] = ()
) -> wire.WorkerSummary:
    return wire.WorkerSummary(
        worker_id=wid,
        online=online,
        leased_devices=list(leased),
        inventory=wire.Inventory(
            cpu_model="Test CPU", cpu_cores=2, mem_bytes=8 << 30, gpus=list(gpus)
        ),
    )


@dataclass
class Script:
    """How one device answers. ``commit``/``reveal``: honest, cheat (commit only), corrupt
    (reveal only), silent, or an ErrorCode (a DeviceFailure)."""

    commit: str | wire.ErrorCode = "honest"
    reveal: str | wire.ErrorCode = "honest"
    delay_s: float = 2.0


@dataclass
class FakeMiner:
    """Implements RoundMiner: answers from scripts, on a fake clock."""

    hotkey: str
    roster: wire.WorkerRoster | None
    scripts: dict[str, Script] = field(default_factory=dict)
    rtts: dict[str, float | MinerRequestError] = field(default_factory=dict)
    uid: int = 1
    hang_on_batch: asyncio.Event | None = None
    fail_reveal: Exception | None = None
    echoed: list[str] = field(default_factory=list)
    batches: list[wire.ChallengeBatch] = field(default_factory=list)
    reveals: list[wire.RevealBatch] = field(default_factory=list)
    releases: list[wire.ReleaseBatch] = field(default_factory=list)
    proofs: dict[bytes, ProvenChallenge] = field(default_factory=dict)

    def script(self, device: str) -> Script:
        return self.scripts.get(device, Script())

    async def echo(self, worker_id: str, timeout_s: float) -> float:
        self.echoed.append(worker_id)
        rtt = self.rtts.get(worker_id, 0.5)
        if isinstance(rtt, Exception):
            raise rtt
        return rtt

    async def run_batch(self, batch: wire.ChallengeBatch, deadline: float) -> BatchResult:
        self.batches.append(batch)
        if self.hang_on_batch is not None:
            self.hang_on_batch.set()
            await asyncio.Event().wait()  # until cancelled
        answers: dict[bytes, wire.DeviceCommit | wire.DeviceFailure | None] = {}
        received: dict[bytes, float] = {}
        for c in batch.challenges:
            script = self.script(c.device_uuid)
            if script.commit == "silent":
                answers[c.challenge_id] = None
                continue
            received[c.challenge_id] = DISPATCHED_AT + script.delay_s
            if isinstance(script.commit, wire.ErrorCode):
                answers[c.challenge_id] = wire.DeviceFailure(
                    challenge_id=c.challenge_id,
                    worker_id=c.worker_id,
                    device_uuid=c.device_uuid,
                    code=script.commit,
                )
                continue
            proof = prove(c.request().spec(c.worker_id), NumpyBackend(), threads=1)
            if script.commit == "cheat":
                proof = skipping_prover(proof, 1.0, np.random.default_rng(7))
            self.proofs[c.challenge_id] = proof
            answers[c.challenge_id] = wire.DeviceCommit(
                challenge_id=c.challenge_id,
                worker_id=c.worker_id,
                device_uuid=c.device_uuid,
                merkle_root=proof.root,
                elapsed_ms=int(script.delay_s * 1000),
            )
        return BatchResult(DISPATCHED_AT, answers, received)

    async def reveal(
        self, batch: wire.RevealBatch, deadline: float
    ) -> dict[bytes, RevealAnswer | None]:
        self.reveals.append(batch)
        if self.fail_reveal is not None:
            raise self.fail_reveal
        out: dict[bytes, RevealAnswer | None] = {}
        for r in batch.requests:
            script = self.script(r.device_uuid)
            if script.reveal == "silent":
                out[r.challenge_id] = None
            elif isinstance(script.reveal, wire.ErrorCode):
                out[r.challenge_id] = wire.DeviceFailure(
                    challenge_id=r.challenge_id,
                    worker_id=r.worker_id,
                    device_uuid=r.device_uuid,
                    code=script.reveal,
                )
            else:
                rows = self.proofs[r.challenge_id].reveal(r.rows)
                wire_rows = [
                    wire.RevealedRow(index=row.index, values=row.values, path=row.path)
                    for row in rows
                ]
                if script.reveal == "corrupt":
                    first = wire_rows[0]
                    # Another integer: still plausible, so only the Merkle path can catch it.
                    values = np.frombuffer(first.values, "<f4").copy()
                    values[0] += 1
                    flipped = values.tobytes()
                    wire_rows[0] = wire.RevealedRow(
                        index=first.index, values=flipped, path=first.path
                    )
                out[r.challenge_id] = wire.DeviceReveal(
                    challenge_id=r.challenge_id,
                    worker_id=r.worker_id,
                    device_uuid=r.device_uuid,
                    rows=wire_rows,
                )
        return out

    async def release(self, batch: wire.ReleaseBatch) -> None:
        self.releases.append(batch)

    def dispatched(self) -> list[wire.DeviceChallenge]:
        return [c for b in self.batches for c in b.challenges]


class FakeHub:
    def __init__(self, *miners: RoundMiner) -> None:
        self.miners = list(miners)

    def sessions(self) -> Sequence[RoundMiner]:
        return self.miners


class FailingStore:
    """Delegates to a real store, raising StoreError from one method (a non-transient fault)."""

    def __init__(self, inner: Store, fail: str) -> None:
        self._inner = inner
        self._fail = fail

    def __getattr__(self, name: str) -> object:
        if name == self._fail:

            def broken(*args: object, **kwargs: object) -> object:
                raise StoreError(f"injected failure in {name}")

            return broken
        return getattr(self._inner, name)


def make_engine(
    store: Store, *miners: RoundMiner, settings: RoundSettings = SETTINGS
) -> RoundEngine:
    return RoundEngine(AsyncStore(store), FakeHub(*miners), settings, clock=lambda: NOW)


async def run(engine: RoundEngine, *miners: FakeMiner) -> RoundReport:
    for miner in miners:  # what the hub does when a roster arrives
        if miner.roster is not None:
            await engine.on_roster(miner, miner.roster)
    return await engine.run_round()


def assert_all_terminal(store: Store, *miners: FakeMiner) -> None:
    states = store.challenge_states()
    dispatched = {c.challenge_id for m in miners for c in m.dispatched()}
    assert dispatched <= set(states)
    open_ = {cid.hex(): s for cid, s in states.items() if not s.terminal}
    assert not open_, f"challenges left open: {open_}"


def devices(report: RoundReport) -> dict[str, tuple[str, str]]:
    return {d.device_uuid: (d.state, d.reason) for d in report.devices()}


def inputs(store: Store) -> dict[str, tuple[int, int]]:
    return {w.worker_id: (w.successes, w.failures) for w in store.scoring_inputs(NOW + 1, PARAMS)}


# ---------------------------------------------------------------------------- pure helpers


def test_gpu_size_fits_three_matrices_in_half_the_memory() -> None:
    n = gpu_matrix_size(24 << 30, 65536)
    assert n is not None and n % 64 == 0
    assert 3 * n * n * 4 <= (24 << 30) // 2 < 3 * (n + 64) ** 2 * 4
    assert gpu_matrix_size(80 << 30, 32768) == 32768  # capped
    assert gpu_matrix_size(0, 32768) is None  # unknown memory: not challenged
    assert gpu_matrix_size(1 << 10, 32768) is None


def test_gpu_precision_falls_back_to_fp32_where_the_gpu_cannot_run_it() -> None:
    assert gpu_precision("bf16", "8.0") == "bf16"
    assert gpu_precision("tf32", "7.5") == "fp32"
    assert gpu_precision("bf16", "") == "fp32"  # unknown capability
    assert gpu_precision("fp16", "6.1") == "fp16"


async def test_gpus_get_the_configured_precision_cpus_fp32(store: SqlStore) -> None:
    miner = FakeMiner(
        MINER,
        wire.WorkerRoster(
            workers=[
                summary(worker_id(), gpu("GPU-new"), gpu("GPU-old", capability="7.0")),
                summary(worker_id()),
            ]
        ),
    )
    settings = RoundSettings(cpu_n=N, gpu_max_n=N, precision="bf16")
    report = await run(make_engine(store, miner, settings=settings), miner)
    assert {c.device_uuid: c.precision for c in miner.dispatched()} == {
        "GPU-new": "bf16",
        "GPU-old": "fp32",
        CPU_DEVICE: "fp32",
    }
    assert report.count("verified") == 3  # the proof is exact in every precision
    assert_all_terminal(store, miner)


def test_timing_correction_has_a_floor_of_half_the_measured_time() -> None:
    assert corrected_elapsed(2.0, 0.5) == 1.5
    assert corrected_elapsed(2.0, 1.9) == 1.0  # an inflated echo gains at most a factor 2
    assert corrected_elapsed(2.0, 5.0) == 1.0


def test_roster_claims_only_gpus_and_drops_leases_of_unlisted_devices() -> None:
    wid = worker_id()
    roster = wire.WorkerRoster(
        workers=[summary(wid, gpu("GPU-a"), gpu("GPU-b"), leased=["GPU-b", CPU_DEVICE, "GPU-x"])]
    )
    (worker,) = roster_workers(roster)
    assert [d.uuid for d in worker.devices] == ["GPU-a", "GPU-b"]
    assert worker.leased_devices == ("GPU-b",)


# ---------------------------------------------------------------------------- rounds


async def test_honest_devices_verify_with_positive_throughput(store: SqlStore) -> None:
    cpu_worker, gpu_worker = worker_id(), worker_id()
    miner = FakeMiner(
        MINER,
        wire.WorkerRoster(
            workers=[summary(cpu_worker), summary(gpu_worker, gpu("GPU-1"), gpu("GPU-2"))]
        ),
    )
    report = await run(make_engine(store, miner), miner)

    assert devices(report) == {
        CPU_DEVICE: ("verified", "ok"),
        "GPU-1": ("verified", "ok"),
        "GPU-2": ("verified", "ok"),
    }
    for device in report.devices():
        assert device.n == N
        assert device.flops is not None and device.flops > 0
    # One batch with every device of the miner, one reveal batch, one release of everything.
    assert len(miner.batches) == 1 and len(miner.batches[0].challenges) == 3
    assert len(miner.reveals) == 1 and len(miner.reveals[0].requests) == 3
    assert {r.challenge_id for r in miner.reveals[0].requests} == {
        c.challenge_id for c in miner.dispatched()
    }
    assert len(miner.releases) == 1
    assert set(miner.releases[0].challenge_ids) == {c.challenge_id for c in miner.dispatched()}
    assert set(store.challenge_states(report.round_id).values()) == {ChallengeState.VERIFIED}
    assert inputs(store) == {cpu_worker: (1, 0), gpu_worker: (1, 0)}
    assert_all_terminal(store, miner)


async def test_challenges_carry_fresh_secrets_and_the_configured_shape(
    store: SqlStore,
) -> None:
    wid = worker_id()
    miner = FakeMiner(MINER, wire.WorkerRoster(workers=[summary(wid), summary(worker_id())]))
    settings = RoundSettings(cpu_n=N, gpu_max_n=N, commit_deadline_s=42.5)
    await run(make_engine(store, miner, settings=settings), miner)
    challenges = miner.dispatched()
    assert len({c.seed for c in challenges}) == len({c.challenge_id for c in challenges}) == 2
    for c in challenges:
        assert (c.n, c.precision, c.deadline_ms, c.miner_hotkey) == (N, "fp32", 42_500, MINER)
    rows = miner.reveals[0].requests[0].rows
    assert len(rows) == SETTINGS.sample_rows == len(set(rows))


async def test_flops_use_the_round_trip_corrected_time(store: SqlStore) -> None:
    fast, slow_echo = worker_id(), worker_id()
    miner = FakeMiner(
        MINER,
        wire.WorkerRoster(workers=[summary(fast, gpu("GPU-f")), summary(slow_echo, gpu("GPU-s"))]),
        scripts={"GPU-f": Script(delay_s=2.0), "GPU-s": Script(delay_s=2.0)},
        rtts={fast: 0.5, slow_echo: 1.9},
    )
    report = await run(make_engine(store, miner), miner)
    by_device = {d.device_uuid: d for d in report.devices()}
    flops = 2 * N**3
    fast_dev, slow_dev = by_device["GPU-f"], by_device["GPU-s"]
    assert (fast_dev.measured_s, fast_dev.elapsed_s, fast_dev.rtt_s) == (2.0, 1.5, 0.5)
    assert fast_dev.flops == pytest.approx(flops / 1.5)
    # A miner that slows its echo to 1.9 s is credited with at most twice its measured speed.
    assert (slow_dev.measured_s, slow_dev.elapsed_s) == (2.0, 1.0)
    assert slow_dev.flops == pytest.approx(flops / 1.0)
    assert_all_terminal(store, miner)


async def test_a_cheating_device_fails_with_the_verifier_reason(store: SqlStore) -> None:
    wid = worker_id()
    miner = FakeMiner(
        MINER,
        wire.WorkerRoster(workers=[summary(wid, gpu("GPU-honest"), gpu("GPU-cheat"))]),
        scripts={"GPU-cheat": Script(commit="cheat")},
    )
    report = await run(make_engine(store, miner), miner)
    assert devices(report) == {
        "GPU-honest": ("verified", "ok"),
        "GPU-cheat": ("failed", "wrong_value"),
    }
    (worker,) = report.miners[0].workers
    assert not worker.ok and worker.recorded
    assert inputs(store) == {wid: (0, 1)}  # one device cheated: the worker's round failed
    assert_all_terminal(store, miner)


async def test_a_corrupted_reveal_fails_the_merkle_check(store: SqlStore) -> None:
    miner = FakeMiner(
        MINER,
        wire.WorkerRoster(workers=[summary(worker_id())]),
        scripts={CPU_DEVICE: Script(reveal="corrupt")},
    )
    report = await run(make_engine(store, miner), miner)
    assert devices(report) == {CPU_DEVICE: ("failed", "bad_merkle_path")}
    assert_all_terminal(store, miner)


async def test_device_failures_are_recorded_with_their_code(store: SqlStore) -> None:
    miner = FakeMiner(
        MINER,
        wire.WorkerRoster(workers=[summary(worker_id(), gpu("GPU-busy"), gpu("GPU-gone"))]),
        scripts={
            "GPU-busy": Script(commit=wire.ErrorCode.DEVICE_BUSY),
            "GPU-gone": Script(reveal=wire.ErrorCode.CHALLENGE_UNKNOWN),
        },
    )
    report = await run(make_engine(store, miner), miner)
    assert devices(report) == {
        "GPU-busy": ("failed", "DEVICE_BUSY"),
        "GPU-gone": ("failed", "CHALLENGE_UNKNOWN"),
    }
    # Only the committed device was asked to reveal.
    assert [r.device_uuid for r in miner.reveals[0].requests] == ["GPU-gone"]
    assert_all_terminal(store, miner)


async def test_a_miner_gone_mid_round_expires_its_challenges(store: SqlStore) -> None:
    before_commit, before_reveal = worker_id(), worker_id()
    gone_early = FakeMiner(
        MINER,
        wire.WorkerRoster(workers=[summary(before_commit)]),
        scripts={CPU_DEVICE: Script(commit="silent")},
    )
    gone_late = FakeMiner(
        OTHER_MINER,
        wire.WorkerRoster(workers=[summary(before_reveal)]),
        scripts={CPU_DEVICE: Script(reveal="silent")},
        uid=2,
    )
    report = await run(make_engine(store, gone_early, gone_late), gone_early, gone_late)
    outcome = {m.hotkey: [d.reason for d in m.workers[0].devices] for m in report.miners}
    assert outcome == {MINER: ["no_commit"], OTHER_MINER: ["no_reveal"]}
    assert report.count("expired") == 2
    assert gone_early.reveals == []  # nothing committed, nothing to reveal
    # The miner's fault: counted as failed rounds, unlike a validator failure.
    assert inputs(store) == {before_commit: (0, 1), before_reveal: (0, 1)}
    assert_all_terminal(store, gone_early, gone_late)


async def test_leased_excluded_vfio_and_offline_are_not_challenged(store: SqlStore) -> None:
    partly_leased, all_leased, offline, conflicted = (worker_id() for _ in range(4))
    # Another miner claimed GPU-dup first: this miner's claim is excluded from challenges.
    owner = FakeMiner(
        OTHER_MINER, wire.WorkerRoster(workers=[summary(worker_id(), gpu("GPU-dup"))])
    )
    miner = FakeMiner(
        MINER,
        wire.WorkerRoster(
            workers=[
                summary(partly_leased, gpu("GPU-free"), gpu("GPU-rented"), leased=["GPU-rented"]),
                summary(all_leased, gpu("GPU-l1"), leased=["GPU-l1"]),
                summary(offline, online=False),
                summary(conflicted, gpu("GPU-dup"), gpu("GPU-vfio", vfio=True)),
            ]
        ),
    )
    engine = make_engine(store, miner)
    await engine.on_roster(owner, owner.roster)  # type: ignore[arg-type]
    report = await run(engine, miner)

    assert [c.device_uuid for c in miner.dispatched()] == ["GPU-free"]
    # Online workers are echoed (and present) even with nothing to challenge; offline ones not.
    assert sorted(miner.echoed) == sorted([partly_leased, all_leased, conflicted])
    workers = {w.worker_id: w for w in report.miners[0].workers}
    assert (workers[all_leased].state, workers[all_leased].reason) == (
        "skipped",
        "nothing_to_challenge",
    )
    assert workers[all_leased].present and not workers[offline].present
    rented = {w.worker_id: w.availability for w in store.scoring_inputs(NOW + 1, PARAMS)}[
        all_leased
    ]
    assert isinstance(rented, AvailabilityBitmap) and rented.is_present(NOW)
    assert (workers[offline].state, workers[offline].reason) == ("skipped", "offline")
    assert {d.device_uuid: d.reason for d in workers[conflicted].devices} == {
        "GPU-dup": "excluded",
        "GPU-vfio": "vfio_bound",
    }
    assert {d.device_uuid: d.state for d in workers[partly_leased].devices} == {
        "GPU-free": "verified",
        "GPU-rented": "skipped",
    }
    assert_all_terminal(store, miner)


async def test_a_failed_echo_means_not_challenged_and_not_present(store: SqlStore) -> None:
    answers, silent = worker_id(), worker_id()
    miner = FakeMiner(
        MINER,
        wire.WorkerRoster(workers=[summary(answers), summary(silent)]),
        rtts={silent: MinerRequestError("WORKER_OFFLINE", "worker went away")},
    )
    report = await run(make_engine(store, miner), miner)
    assert {c.worker_id for c in miner.dispatched()} == {answers}
    workers = {w.worker_id: w for w in report.miners[0].workers}
    assert workers[silent].state == "skipped" and not workers[silent].present
    assert workers[silent].reason == "echo:WORKER_OFFLINE"
    assert workers[answers].present
    availability = {w.worker_id: w.availability for w in store.scoring_inputs(NOW + 1, PARAMS)}
    answered_bitmap, silent_bitmap = availability[answers], availability[silent]
    assert isinstance(answered_bitmap, AvailabilityBitmap)
    assert isinstance(silent_bitmap, AvailabilityBitmap)
    assert answered_bitmap.is_present(NOW)
    assert not silent_bitmap.is_present(NOW)
    assert_all_terminal(store, miner)


async def test_a_miner_without_roster_is_left_alone(store: SqlStore) -> None:
    miner = FakeMiner(MINER, None)
    report = await run(make_engine(store, miner), miner)
    assert report.miners[0].workers == () and miner.batches == []


@pytest.mark.parametrize("fail", ["record_commit", "finish"])
async def test_a_store_failure_mid_round_leaves_nothing_open_and_counts_nothing(
    store: SqlStore, fail: str
) -> None:
    wid = worker_id()
    miner = FakeMiner(MINER, wire.WorkerRoster(workers=[summary(wid, gpu("GPU-1"))]))
    engine = make_engine(store, miner)
    await engine.on_roster(miner, miner.roster)  # type: ignore[arg-type]
    engine.store = AsyncStore(FailingStore(store, fail))  # type: ignore[arg-type]
    report = await engine.run_round()

    assert report.swept == 1
    assert report.miners[0].error is None if fail == "finish" else report.miners[0].error
    (worker,) = report.miners[0].workers
    assert not worker.recorded and worker.reason == "validator_error"
    assert devices(report) == {"GPU-1": ("expired", "validator_error")}
    assert set(store.challenge_states(report.round_id).values()) == {ChallengeState.EXPIRED}
    assert inputs(store) == {wid: (0, 0)}  # the validator failed, not the worker
    assert len(miner.releases) == 1  # the worker's results are freed all the same
    assert_all_terminal(store, miner)


async def test_an_exception_in_one_miner_does_not_spoil_the_others(store: SqlStore) -> None:
    broken = FakeMiner(
        MINER, wire.WorkerRoster(workers=[summary(worker_id())]), fail_reveal=RuntimeError("boom")
    )
    fine = FakeMiner(OTHER_MINER, wire.WorkerRoster(workers=[summary(worker_id())]), uid=2)
    report = await run(make_engine(store, broken, fine), broken, fine)
    by_miner = {m.hotkey: m for m in report.miners}
    assert by_miner[MINER].error == "RuntimeError: boom"
    assert [d.state for d in by_miner[MINER].workers[0].devices] == ["expired"]
    assert [d.state for d in by_miner[OTHER_MINER].workers[0].devices] == ["verified"]
    assert report.swept == 1
    assert len(broken.releases) == 1
    assert_all_terminal(store, broken, fine)


async def test_cancelled_round_expires_what_it_dispatched(store: SqlStore) -> None:
    dispatched = asyncio.Event()
    miner = FakeMiner(
        MINER, wire.WorkerRoster(workers=[summary(worker_id())]), hang_on_batch=dispatched
    )
    engine = make_engine(store, miner)
    await engine.on_roster(miner, miner.roster)  # type: ignore[arg-type]
    task = asyncio.create_task(engine.run_round())
    await asyncio.wait_for(dispatched.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(miner.releases) == 1
    assert_all_terminal(store, miner)


async def test_recover_expires_what_a_crash_left_open(store: SqlStore) -> None:
    dispatched = asyncio.Event()
    miner = FakeMiner(
        MINER, wire.WorkerRoster(workers=[summary(worker_id())]), hang_on_batch=dispatched
    )
    engine = make_engine(store, miner)
    await engine.on_roster(miner, miner.roster)  # type: ignore[arg-type]
    # A crash: the sweep at the end of the round cannot reach the store.
    engine.store = AsyncStore(FailingStore(store, "sweep_unfinished"))  # type: ignore[arg-type]
    task = asyncio.create_task(engine.run_round())
    await asyncio.wait_for(dispatched.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ChallengeState.ISSUED in store.challenge_states().values()

    restarted = make_engine(store)
    assert await restarted.recover() == 1
    assert_all_terminal(store, miner)


async def test_roster_and_disconnect_reach_the_store(store: SqlStore) -> None:
    wid = worker_id()
    miner = FakeMiner(MINER, wire.WorkerRoster(workers=[summary(wid, gpu("GPU-1"))]))
    engine = make_engine(store, miner)
    await engine.on_roster(miner, miner.roster)  # type: ignore[arg-type]
    assert store.status().online_workers == 1
    await engine.on_disconnect(miner)
    assert store.status().online_workers == 0
