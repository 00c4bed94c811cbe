"""WorkerLink against a minimal fake miner (aiohttp + channel.accept on 127.0.0.1, in-process)."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import hmac
import itertools
import logging
import random
import ssl
import stat
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from byteleap.core import wire
from byteleap.core.challenge import ChallengeSpec, ProvenChallenge, draw_sample, prove, verify
from byteleap.core.challenge.prover import Backend, NumpyBackend
from byteleap.core.channel import AcceptFailed, Channel, ChannelClosed, CloseCode, accept
from byteleap.core.identity import HotkeySigner, IdentityKind, PeerIdentity, WorkerKey, worker_id_of
from byteleap.worker.challenges import ChallengeRunner, Device
from byteleap.worker.inventory import inventory_fingerprint
from byteleap.worker.link import (
    PIN_FILE,
    PROLOGUE,
    Backoff,
    LinkSettings,
    LinkState,
    LinkStatus,
    WorkerLink,
    read_pin,
)
from tests.support.fixtures import WAIT, eventually, free_port

SECRET = b"0123456789abcdef0123456789abcdef"
ALICE = HotkeySigner.from_uri("//Alice")
BOB = HotkeySigner.from_uri("//Bob")
INVENTORY_A = wire.Inventory(cpu_model="Test CPU", cpu_cores=2, mem_bytes=1 << 30)
INVENTORY_B = wire.Inventory(cpu_model="Test CPU", cpu_cores=2, mem_bytes=2 << 30)
M = TypeVar("M", bound=wire.Message)


# --------------------------------------------------------------------------------------------
# Fake miner


@dataclass
class MinerSession:
    """One registered worker connection, as the fake miner sees it."""

    channel: Channel
    register: wire.Register
    frames: asyncio.Queue[wire.Frame] = field(default_factory=asyncio.Queue)
    heartbeats: list[float] = field(default_factory=list)
    beats: list[wire.Heartbeat] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def expect(self, kind: type[M]) -> tuple[int, M]:
        """The next non-heartbeat frame's id and message, which must be a ``kind``."""
        frame = await asyncio.wait_for(self.frames.get(), WAIT)
        assert isinstance(frame.msg, kind), frame
        return frame.id, frame.msg


@dataclass
class FakeMiner:
    signer: HotkeySigner = ALICE
    secret: bytes = SECRET
    ack_interval: float = 30.0
    url: str = ""
    sessions: asyncio.Queue[MinerSession] = field(default_factory=asyncio.Queue)
    all_sessions: list[MinerSession] = field(default_factory=list)
    refusals: list[AcceptFailed] = field(default_factory=list)
    proofs_failed: int = 0
    full: bool = False
    """Refuse every enrollment with CAPACITY_REACHED (as a miner with 100 workers does)."""

    async def handler(self, request: web.Request) -> web.StreamResponse:
        try:
            channel = await accept(
                request,
                signer=self.signer,
                authorize=lambda _peer: True,
                prologue=PROLOGUE,
                link=wire.Link.WORKER_MINER,
                peer_kind=IdentityKind.ED25519,
                close_timeout=1.0,
            )
        except AcceptFailed as exc:
            self.refusals.append(exc)
            return exc.response
        session: MinerSession | None = None
        try:
            proof = (await channel.recv()).msg
            assert isinstance(proof, wire.EnrollProof)
            expected = hmac.new(self.secret, channel.channel_binding, hashlib.sha256).digest()
            if not hmac.compare_digest(proof.mac, expected):
                self.proofs_failed += 1
                await channel.send_error(wire.ErrorCode.AUTH_FAILED, "enrollment proof invalid")
                await channel.close(CloseCode.UNAUTHORIZED, "enrollment failed")
                return channel.response
            if self.full:
                await channel.send_error(wire.ErrorCode.CAPACITY_REACHED, "maximum 100 workers")
                await channel.close(CloseCode.CAPACITY_REACHED, "capacity reached")
                return channel.response
            frame = await channel.recv()
            register = frame.msg
            assert isinstance(register, wire.Register)
            assert register.worker_id == worker_id_of(channel.peer.public_key)
            await channel.send(
                wire.RegisterAck(
                    worker_id=register.worker_id, heartbeat_interval_s=self.ack_interval
                ),
                id=frame.id,
            )
            session = MinerSession(channel=channel, register=register)
            self.all_sessions.append(session)
            await self.sessions.put(session)
            while True:
                frame = await channel.recv()
                if isinstance(frame.msg, wire.Heartbeat):
                    session.heartbeats.append(time.monotonic())
                    session.beats.append(frame.msg)
                else:
                    await session.frames.put(frame)
        except ChannelClosed:
            pass
        finally:
            if session is not None:
                session.closed.set()
            await channel.close()
        return channel.response

    async def next_session(self) -> MinerSession:
        return await asyncio.wait_for(self.sessions.get(), WAIT)


StartMiner = Callable[..., Awaitable[FakeMiner]]


@pytest.fixture
async def start_miner() -> AsyncIterator[StartMiner]:
    runners: list[web.AppRunner] = []

    async def start(ssl_context: ssl.SSLContext | None = None, **kwargs: Any) -> FakeMiner:
        miner = FakeMiner(**kwargs)
        app = web.Application()
        app.router.add_get("/worker", miner.handler)
        runner = web.AppRunner(app, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        runners.append(runner)
        host, port = runner.addresses[0][:2]
        scheme = "wss" if ssl_context is not None else "ws"
        miner.url = f"{scheme}://{host}:{port}/worker"
        return miner

    yield start
    for runner in runners:
        await runner.cleanup()


# --------------------------------------------------------------------------------------------
# Worker


@dataclass
class Worker:
    link: WorkerLink
    runner: ChallengeRunner
    task: asyncio.Task[None]
    statuses: list[LinkStatus]
    inventory: list[wire.Inventory]

    def states(self) -> list[LinkState]:
        return [s.state for s in self.statuses]

    def waiting(self) -> list[LinkStatus]:
        return [s for s in self.statuses if s.state is LinkState.WAITING]


StartWorker = Callable[..., Worker]


@pytest.fixture
async def start_worker(tmp_path: Path) -> AsyncIterator[StartWorker]:
    workers: list[Worker] = []
    key = WorkerKey.generate()

    def start(
        url: str,
        *,
        secret: bytes = SECRET,
        state_dir: Path | None = None,
        prover: Callable[[ChallengeSpec, Backend], ProvenChallenge] | None = None,
        result_ttl_s: float = 60.0,
        rng: random.Random | None = None,
        leased_devices: Callable[[wire.Inventory], list[str]] | None = None,
        **overrides: Any,
    ) -> Worker:
        settings = LinkSettings(
            **{
                "url": url,
                "connect_timeout_s": 5.0,
                "register_timeout_s": 5.0,
                "reconnect_initial_s": 0.05,
                "reconnect_max_s": 0.2,
                "heartbeat_interval_s": 30.0,
                "inventory_interval_s": 30.0,
                "sweep_interval_s": 0.1,
                "close_timeout_s": 1.0,
                **overrides,
            }
        )
        runner = ChallengeRunner(
            key.worker_id,
            [Device(uuid="cpu-0", backend=NumpyBackend(), precisions=frozenset({"fp32"}))],
            max_n=1024,
            result_ttl_s=result_ttl_s,
            prover=prover,
        )
        statuses: list[LinkStatus] = []
        inventory = [INVENTORY_A]
        link = WorkerLink(
            settings,
            key=key,
            secret=secret,
            runner=runner,
            state_dir=state_dir or tmp_path,
            collect_inventory=lambda: inventory[0],
            collect_live=lambda: wire.Heartbeat(uptime_s=1.0, load1=0.1, mem_used_bytes=1),
            leased_devices=leased_devices,
            on_status=statuses.append,
            rng=rng or random.Random(7),
        )
        worker = Worker(link, runner, asyncio.create_task(link.run()), statuses, inventory)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        await asyncio.wait_for(worker.link.stop(), WAIT)
        await asyncio.wait_for(worker.task, WAIT)
        worker.runner.close()


def challenge(tag: str, *, n: int = 256, device: str = "cpu-0") -> wire.ChallengeRequest:
    digest = hashlib.sha256(tag.encode()).digest()
    return wire.ChallengeRequest(
        challenge_id=digest[:16],
        seed=hashlib.sha256(digest).digest(),
        miner_hotkey=ALICE.identity.display,
        device_uuid=device,
        n=n,
        precision="fp32",
        deadline_ms=60_000,
    )


# --------------------------------------------------------------------------------------------
# Tests


async def test_enroll_register_challenge_reveal_release(
    start_miner: StartMiner, start_worker: StartWorker
) -> None:
    miner = await start_miner()
    worker = start_worker(miner.url)
    session = await miner.next_session()
    assert session.register.worker_id == worker.link.worker_id
    assert session.register.inventory == INVENTORY_A
    await eventually(lambda: worker.link.status.state is LinkState.CONNECTED)
    assert worker.link.status.miner == ALICE.identity.display

    req = challenge("honest")
    await session.channel.send(req, id=41)
    frame_id, commit = await session.expect(wire.ChallengeCommit)
    assert frame_id == 41 and commit.challenge_id == req.challenge_id
    assert worker.runner.held_results == 1

    sample = draw_sample(req.n, 8, 8, random.Random(1))
    await session.channel.send(
        wire.RevealRequest(
            challenge_id=req.challenge_id, device_uuid="cpu-0", rows=list(sample.rows)
        ),
        id=42,
    )
    frame_id, reveal = await session.expect(wire.ChallengeReveal)
    assert frame_id == 42
    spec = ChallengeSpec(
        challenge_id=req.challenge_id,
        seed=req.seed,
        miner_hotkey=req.miner_hotkey,
        worker_id=worker.link.worker_id,
        device_uuid="cpu-0",
        n=req.n,
    )
    revealed = {row.index: (row.values, row.path) for row in reveal.rows}
    verdict = verify(spec, commit.merkle_root, sample, revealed)
    assert verdict.ok, verdict

    await session.channel.send(wire.Ping(nonce=99), id=43)
    frame_id, pong = await session.expect(wire.Pong)
    assert frame_id == 43 and pong.nonce == 99

    await session.channel.send(wire.ChallengeRelease(challenge_id=req.challenge_id))
    await eventually(lambda: worker.runner.held_results == 0)
    # A reveal after the release is refused, not crashed on.
    await session.channel.send(
        wire.RevealRequest(challenge_id=req.challenge_id, device_uuid="cpu-0", rows=[0]), id=44
    )
    frame_id, error = await session.expect(wire.Error)
    assert frame_id == 44 and error.ref == 44
    assert error.code is wire.ErrorCode.CHALLENGE_UNKNOWN


async def test_refusals_answer_with_errors_and_the_worker_stays_usable(
    start_miner: StartMiner, start_worker: StartWorker
) -> None:
    gate = threading.Event()

    def slow_prover(spec: ChallengeSpec, backend: Backend) -> ProvenChallenge:
        if spec.n == 128:
            gate.wait(WAIT)
        return prove(spec, backend)

    miner = await start_miner()
    worker = start_worker(miner.url, prover=slow_prover)
    session = await miner.next_session()
    try:
        await session.channel.send(challenge("slow", n=128), id=10)
        await eventually(lambda: worker.runner.busy_devices == {"cpu-0"})
        await session.channel.send(challenge("second"), id=11)
        frame_id, busy = await session.expect(wire.Error)
        assert (frame_id, busy.ref, busy.code) == (11, 11, wire.ErrorCode.DEVICE_BUSY)

        await session.channel.send(challenge("gpu", device="GPU-nonexistent"), id=12)
        frame_id, unknown = await session.expect(wire.Error)
        assert (frame_id, unknown.code) == (12, wire.ErrorCode.DEVICE_UNKNOWN)

        await session.channel.send(challenge("huge", n=2048), id=13)  # max_n is 1024
        frame_id, oversize = await session.expect(wire.Error)
        assert (frame_id, oversize.code) == (13, wire.ErrorCode.CHALLENGE_INVALID)
        assert "2048" in oversize.message

        # The receive loop is not blocked by the running challenge.
        await session.channel.send(wire.Ping(nonce=1), id=14)
        assert (await session.expect(wire.Pong))[0] == 14
    finally:
        gate.set()
    assert (await session.expect(wire.ChallengeCommit))[0] == 10
    assert worker.runner.busy_devices == frozenset()

    await session.channel.send(challenge("after"), id=15)
    assert (await session.expect(wire.ChallengeCommit))[0] == 15
    assert worker.link.status.state is LinkState.CONNECTED


async def test_reconnects_with_backoff_and_registers_again(
    start_miner: StartMiner, start_worker: StartWorker
) -> None:
    miner = await start_miner()
    worker = start_worker(miner.url)
    first = await miner.next_session()
    await first.channel.close(CloseCode.GOING_AWAY, "miner restarting")

    second = await miner.next_session()
    assert second.register.worker_id == first.register.worker_id
    assert second.register.inventory == INVENTORY_A  # state re-sent on reconnect
    await eventually(lambda: worker.link.status.sessions == 2)
    lost = worker.waiting()
    assert len(lost) == 1
    assert lost[0].reason is not None and "4008" in lost[0].reason
    assert lost[0].retry_in_s is not None and 0 <= lost[0].retry_in_s <= 0.05
    assert "miner link lost" in lost[0].line()

    # The miner fills up and drops us: every attempt is refused, delays stay under the cap.
    miner.full = True
    await second.channel.close(CloseCode.GOING_AWAY, "gone")
    await eventually(lambda: len(worker.waiting()) >= 6)
    refused = worker.waiting()[2:]
    assert all(s.retry_in_s is not None and s.retry_in_s <= 0.2 for s in refused)
    assert all(s.reason is not None and "CAPACITY_REACHED" in s.reason for s in refused)
    assert "4006" in (refused[0].reason or "")
    assert [s.failures for s in refused[:3]] == [1, 2, 3]


class CeilingRandom(random.Random):
    """Jitter that always picks the ceiling, to observe the backoff schedule exactly."""

    def uniform(self, a: float, b: float) -> float:
        return b


async def test_backoff_grows_on_failures_restarts_after_a_session_unless_they_flap(
    start_miner: StartMiner, start_worker: StartWorker
) -> None:
    miner = await start_miner(full=True)
    worker = start_worker(
        miner.url,
        rng=CeilingRandom(),
        reconnect_initial_s=0.02,
        reconnect_max_s=0.08,
        stable_after_s=0.3,
    )
    await eventually(lambda: len(worker.waiting()) >= 4)
    assert [s.retry_in_s for s in worker.waiting()[:4]] == [0.02, 0.04, 0.08, 0.08]

    async def session_then_delay(lasting: float) -> float | None:
        session = await miner.next_session()
        count = len(worker.waiting())  # every attempt before this session has been reported
        await asyncio.sleep(lasting)
        await session.channel.close(CloseCode.GOING_AWAY, "bye")
        await eventually(lambda: len(worker.waiting()) > count)
        return worker.waiting()[count].retry_in_s

    # A registered session that ends, even a short one (a miner restart), starts again from
    # the initial delay: the backoff built up by the failures before it is forgotten.
    miner.full = False
    assert await session_then_delay(0.0) == 0.02
    # Sessions that keep ending quickly (a flapping miner) keep growing it...
    assert await session_then_delay(0.0) == 0.04
    assert await session_then_delay(0.0) == 0.08
    # ... until one lasts longer than stable_after_s.
    assert await session_then_delay(0.4) == 0.02
    assert await session_then_delay(0.0) == 0.02  # the first quick one after it: a restart
    assert await session_then_delay(0.0) == 0.04


async def test_connection_refused_is_reported_and_retried(
    start_worker: StartWorker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="byteleap.worker.link")
    port = free_port()
    worker = start_worker(f"ws://127.0.0.1:{port}/worker")
    await eventually(lambda: len(worker.waiting()) >= 3)
    first = worker.waiting()[0]
    assert first.reason == "connection refused" and not first.refused
    assert first.line().startswith(f"miner unreachable at ws://127.0.0.1:{port}")
    assert [s.failures for s in worker.waiting()[:3]] == [1, 2, 3]
    failures = [r for r in caplog.records if "failed: connection refused" in r.getMessage()]
    assert len(failures) >= 3  # one line per attempt


async def test_wrong_enrollment_secret_is_refused_by_the_miner(
    start_miner: StartMiner, start_worker: StartWorker
) -> None:
    miner = await start_miner()
    worker = start_worker(miner.url, secret=b"not-the-secret-of-this-miner!!")
    await eventually(lambda: len(worker.waiting()) >= 2)
    refused = worker.waiting()[0]
    reason = refused.reason
    assert reason is not None
    assert "refused by miner" in reason and "4002" in reason and "AUTH_FAILED" in reason
    assert miner.proofs_failed >= 2 and miner.all_sessions == []
    assert not (worker.link.status.ever_connected)
    # STATUS= says the miner refused us, not that it cannot be reached (and says it once).
    line = refused.line()
    assert refused.refused and line.startswith(f"refused by miner at {miner.url} with close code")
    assert line.count("refused by miner") == 1 and "AUTH_FAILED" in line


async def test_trust_on_first_use_pins_the_miner_and_refuses_another(
    start_miner: StartMiner,
    start_worker: StartWorker,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    alice = await start_miner(signer=ALICE)
    worker = start_worker(alice.url)
    await alice.next_session()
    pin = tmp_path / PIN_FILE
    await eventually(pin.exists)
    assert stat.S_IMODE(pin.stat().st_mode) == 0o600
    assert read_pin(pin) == ALICE.identity
    await worker.link.stop()

    caplog.set_level(logging.WARNING, logger="byteleap.worker.link")
    bob = await start_miner(signer=BOB)
    impostor = start_worker(bob.url)
    await eventually(lambda: len(impostor.waiting()) >= 2)
    reason = impostor.waiting()[0].reason
    assert reason is not None
    assert f"refusing miner hotkey {BOB.identity.display}" in reason
    assert ALICE.identity.display in reason and str(pin) in reason
    assert bob.all_sessions == [] and bob.refusals
    assert any("refusing miner hotkey" in r.getMessage() for r in caplog.records)
    assert read_pin(pin) == ALICE.identity

    # A configured hotkey takes precedence over the pin.
    await impostor.link.stop()
    configured = start_worker(bob.url, miner_hotkey=BOB.identity.display)
    await bob.next_session()
    await eventually(lambda: configured.link.status.state is LinkState.CONNECTED)
    assert read_pin(pin) == ALICE.identity


@pytest.mark.parametrize(("configured", "acked"), [(0.2, 30.0), (30.0, 0.2)])
async def test_heartbeats_at_the_shorter_of_configured_and_acked_interval(
    start_miner: StartMiner, start_worker: StartWorker, configured: float, acked: float
) -> None:
    miner = await start_miner(ack_interval=acked)
    start_worker(miner.url, heartbeat_interval_s=configured)
    session = await miner.next_session()
    await eventually(lambda: len(session.heartbeats) >= 6)
    beats = session.heartbeats
    gaps = [b - a for a, b in itertools.pairwise(beats)]
    # Scheduled on a fixed grid: gaps average the interval even when one runs late.
    assert 0.15 <= (beats[5] - beats[0]) / 5 <= 0.5, gaps
    assert min(gaps) >= 0.05, gaps


async def test_heartbeats_name_the_leased_gpus_of_the_inventory_sent(
    start_miner: StartMiner, start_worker: StartWorker
) -> None:
    leased: set[str] = set()
    asked: list[wire.Inventory] = []

    def leased_devices(inventory: wire.Inventory) -> list[str]:
        asked.append(inventory)
        if "boom" in leased:
            raise RuntimeError("lease book unreadable")
        return sorted(leased)

    miner = await start_miner()
    start_worker(miner.url, heartbeat_interval_s=0.05, leased_devices=leased_devices)
    session = await miner.next_session()
    await eventually(lambda: bool(session.beats))
    assert session.beats[-1].leased_devices == []
    # The uuids are those of the inventory the miner has (the one registered).
    assert asked[-1] == session.register.inventory

    leased.add("GPU-2")
    await eventually(lambda: session.beats[-1].leased_devices == ["GPU-2"])
    leased.add("GPU-1")
    await eventually(lambda: session.beats[-1].leased_devices == ["GPU-1", "GPU-2"])
    leased.clear()
    await eventually(lambda: session.beats[-1].leased_devices == [])

    # Whatever goes wrong asking, the heartbeat (liveness) still goes out.
    leased.add("boom")
    count = len(session.beats)
    await eventually(lambda: len(session.beats) >= count + 3)
    assert session.beats[-1].leased_devices == []


async def test_inventory_update_only_on_change(
    start_miner: StartMiner, start_worker: StartWorker
) -> None:
    miner = await start_miner()
    worker = start_worker(miner.url, inventory_interval_s=0.05)
    session = await miner.next_session()
    await asyncio.sleep(0.5)  # ~10 unchanged collections
    assert session.frames.empty()

    worker.inventory[0] = INVENTORY_B
    _, update = await session.expect(wire.InventoryUpdate)
    assert update.inventory == INVENTORY_B
    assert inventory_fingerprint(update.inventory) != inventory_fingerprint(INVENTORY_A)
    await asyncio.sleep(0.5)
    assert session.frames.empty()

    # After a reconnect the registration carries the current inventory.
    await session.channel.close(CloseCode.GOING_AWAY, "restart")
    again = await miner.next_session()
    assert again.register.inventory == INVENTORY_B


async def test_results_expire_while_disconnected(
    start_miner: StartMiner, start_worker: StartWorker
) -> None:
    miner = await start_miner()
    worker = start_worker(miner.url, result_ttl_s=0.3)
    session = await miner.next_session()
    await session.channel.send(challenge("expiring"), id=5)
    await session.expect(wire.ChallengeCommit)
    assert worker.runner.held_results == 1
    await session.channel.close(CloseCode.GOING_AWAY, "bye")
    await eventually(lambda: worker.runner.held_results == 0)


async def test_a_held_result_survives_a_reconnect(
    start_miner: StartMiner, start_worker: StartWorker
) -> None:
    miner = await start_miner()
    worker = start_worker(miner.url)
    first = await miner.next_session()
    req = challenge("across sessions")
    await first.channel.send(req, id=7)
    _, commit = await first.expect(wire.ChallengeCommit)
    await first.channel.close(CloseCode.GOING_AWAY, "miner restarting")

    # The miner asks for the reveal on the next session: the result was kept.
    second = await miner.next_session()
    assert worker.runner.held_results == 1
    sample = draw_sample(req.n, 4, 4, random.Random(2))
    await second.channel.send(
        wire.RevealRequest(
            challenge_id=req.challenge_id, device_uuid="cpu-0", rows=list(sample.rows)
        ),
        id=8,
    )
    frame_id, reveal = await second.expect(wire.ChallengeReveal)
    assert frame_id == 8
    revealed = {row.index: (row.values, row.path) for row in reveal.rows}
    assert verify(req.spec(worker.link.worker_id), commit.merkle_root, sample, revealed).ok
    await second.channel.send(wire.ChallengeRelease(challenge_id=req.challenge_id))
    await eventually(lambda: worker.runner.held_results == 0)


class ThreadRecordingDict(dict[bytes, Any]):
    """Stands in for the runner's table of held results and records which threads touch it."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[str] = set()

    def _touch(self) -> None:
        self.threads.add(threading.current_thread().name)

    def get(self, key: bytes, default: Any = None) -> Any:
        self._touch()
        return super().get(key, default)

    def pop(self, key: bytes, *default: Any) -> Any:
        self._touch()
        return super().pop(key, *default)

    def __setitem__(self, key: bytes, value: Any) -> None:
        self._touch()
        super().__setitem__(key, value)

    def items(self) -> Any:
        self._touch()
        return super().items()


async def test_an_expired_result_is_dropped_on_the_event_loop(
    start_miner: StartMiner, start_worker: StartWorker
) -> None:
    """Reveals run in a thread, but the held results are only touched on the loop.

    The sweeper iterates them on the loop; a reveal that expired (popped) a result from its
    thread could change the table under the sweeper's feet and kill it.
    """
    miner = await start_miner()
    worker = start_worker(miner.url, result_ttl_s=0.3, sweep_interval_s=60.0)
    held = ThreadRecordingDict()
    worker.runner._held = held
    session = await miner.next_session()
    req = challenge("expires before its reveal")
    await session.channel.send(req, id=3)
    await session.expect(wire.ChallengeCommit)
    await asyncio.sleep(0.4)  # past the time to live; the sweeper is not due yet
    assert worker.runner.held_results == 1
    await session.channel.send(
        wire.RevealRequest(challenge_id=req.challenge_id, device_uuid="cpu-0", rows=[0]), id=4
    )
    frame_id, error = await session.expect(wire.Error)
    assert (frame_id, error.code) == (4, wire.ErrorCode.CHALLENGE_EXPIRED)
    assert worker.runner.held_results == 0
    assert held.threads == {threading.current_thread().name}  # the test's loop thread


async def test_clean_stop_closes_with_going_away(
    start_miner: StartMiner, start_worker: StartWorker
) -> None:
    miner = await start_miner()
    worker = start_worker(miner.url)
    session = await miner.next_session()
    await asyncio.wait_for(worker.link.stop(), WAIT)
    await asyncio.wait_for(session.closed.wait(), WAIT)
    assert session.channel.close_code == CloseCode.GOING_AWAY
    assert worker.link.status.state is LinkState.STOPPED
    assert worker.task.done()


def _self_signed(tmp_path: Path) -> tuple[ssl.SSLContext, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "miner.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "miner.crt", tmp_path / "miner.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context, cert.fingerprint(hashes.SHA256())


async def test_wss_with_a_pinned_certificate_fingerprint(
    start_miner: StartMiner, start_worker: StartWorker, tmp_path: Path
) -> None:
    context, fingerprint = _self_signed(tmp_path)
    miner = await start_miner(ssl_context=context)
    wrong = start_worker(miner.url, tls_fingerprint=bytes(32), state_dir=tmp_path / "a")
    await eventually(lambda: len(wrong.waiting()) >= 1)
    reason = wrong.waiting()[0].reason
    assert reason is not None and "fingerprint mismatch" in reason
    assert fingerprint.hex() in reason
    await wrong.link.stop()

    right = start_worker(miner.url, tls_fingerprint=fingerprint, state_dir=tmp_path / "b")
    await miner.next_session()
    await eventually(lambda: right.link.status.state is LinkState.CONNECTED)


# --------------------------------------------------------------------------------------------
# Pieces


def test_backoff_is_full_jitter_capped_and_resettable() -> None:
    backoff = Backoff(1.0, 8.0, rng=random.Random(3))
    ceilings = []
    for _ in range(6):
        ceilings.append(backoff.ceiling())
        assert 0.0 <= backoff.next_delay() <= ceilings[-1]
    assert ceilings == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    backoff.reset()
    assert backoff.ceiling() == 1.0 and backoff.attempt == 0
    delays = [Backoff(1.0, 1.0, rng=random.Random(seed)).next_delay() for seed in range(200)]
    assert min(delays) < 0.1 and max(delays) > 0.9  # spread over the whole range
    for _ in range(100):
        backoff.next_delay()  # no overflow far past the cap
    assert backoff.ceiling() == 8.0


def test_settings_refuse_inconsistent_values() -> None:
    with pytest.raises(ValueError, match="tls_fingerprint"):
        LinkSettings(url="ws://127.0.0.1:1/worker", tls_fingerprint=bytes(32))
    with pytest.raises(ValueError, match="reconnect_max_s"):
        LinkSettings(url="ws://x:1/w", reconnect_initial_s=5.0, reconnect_max_s=1.0)
    with pytest.raises(ValueError, match="reconnect_max_s"):
        Backoff(5.0, 1.0)
    with pytest.raises(ValueError, match="reconnect_initial_s"):
        Backoff(0.0, 1.0)
    assert PeerIdentity.from_ss58(ALICE.identity.display) == ALICE.identity
