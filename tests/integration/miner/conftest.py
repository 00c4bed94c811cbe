"""Fixtures for in-process miner tests: a real MinerServer on 127.0.0.1 and fake workers.

The fake worker speaks the worker side of docs/worker-miner.md with ``core.channel.dial`` and
answers challenges with the real ``worker.challenges.ChallengeRunner`` (numpy prover), optionally
held back by a gate so tests can keep a device busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from byteleap.core import wire
from byteleap.core.challenge import ChallengeSpec, ProvenChallenge, prove
from byteleap.core.challenge.prover import Backend, NumpyBackend
from byteleap.core.channel import Channel, ChannelClosed, dial
from byteleap.core.credentials import enrollment_mac
from byteleap.core.identity import HotkeySigner, IdentityKind, PeerIdentity, WorkerKey
from byteleap.miner.config import MinerConfig, WorkerPolicy
from byteleap.miner.registry import WorkerRegistry
from byteleap.miner.relay import WorkerConnections
from byteleap.miner.server import PROLOGUE, MinerServer
from byteleap.worker.challenges import ChallengeRefusedError, ChallengeRunner, Device
from tests.support.fixtures import WAIT
from tests.unit.miner.builders import inventory

SECRET = b"0123456789abcdef0123456789abcdef"
LINK = wire.Link.WORKER_MINER

_ALICE: HotkeySigner | None = None
_CREATED: list[FakeWorker] = []


def alice() -> HotkeySigner:
    global _ALICE
    if _ALICE is None:
        _ALICE = HotkeySigner.from_uri("//Alice")
    return _ALICE


def _accept_miner(_: PeerIdentity) -> bool:
    return True


@dataclass
class Miner:
    server: MinerServer
    registry: WorkerRegistry
    connections: WorkerConnections
    config: MinerConfig
    outcomes: list[tuple[str, bool]]

    @property
    def url(self) -> str:
        host, port = self.server.addresses[0]
        return f"http://{host}:{port}{self.config.workers.path}"


@dataclass
class FakeWorker:
    """Worker side of the link; ``serve()`` answers requests until the channel closes."""

    key: WorkerKey = field(default_factory=WorkerKey.generate)
    secret: bytes = SECRET
    gpus: tuple[str, ...] = ()
    gate: threading.Event | None = None
    agent_version: str = "0.1.0-test"
    channel: Channel | None = None
    ack: wire.RegisterAck | None = None
    received: list[wire.Frame] = field(default_factory=list)
    closed: ChannelClosed | None = None
    runner: ChallengeRunner | None = None
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def __post_init__(self) -> None:
        _CREATED.append(self)

    @property
    def worker_id(self) -> str:
        return self.key.worker_id

    @property
    def errors(self) -> list[wire.Error]:
        """Every Error the miner sent this worker."""
        return [f.msg for f in self.received if isinstance(f.msg, wire.Error)]

    async def dial(self, http: aiohttp.ClientSession, url: str) -> Channel:
        self.channel = await dial(
            http,
            url,
            signer=self.key,
            authorize=_accept_miner,
            prologue=PROLOGUE,
            link=LINK,
            peer_kind=IdentityKind.SR25519,
            handshake_timeout=WAIT,
        )
        return self.channel

    async def connect(
        self,
        http: aiohttp.ClientSession,
        url: str,
        *,
        mac: bytes | None = None,
        worker_id: str | None = None,
    ) -> wire.RegisterAck:
        """Handshake, EnrollProof, Register; returns the RegisterAck (raises ChannelClosed)."""
        channel = await self.dial(http, url)
        proof = mac if mac is not None else enrollment_mac(self.secret, channel.channel_binding)
        await channel.send(wire.EnrollProof(mac=proof))
        await channel.send(
            wire.Register(
                worker_id=worker_id or self.worker_id,
                agent_version=self.agent_version,
                inventory=inventory(*self.gpus),
            ),
            id=1,
        )
        while True:
            frame = await self._recv()
            if isinstance(frame.msg, wire.RegisterAck):
                self.ack = frame.msg
                return frame.msg

    async def _recv(self) -> wire.Frame:
        assert self.channel is not None
        try:
            async with asyncio.timeout(WAIT):
                frame = await self.channel.recv()
        except ChannelClosed as exc:
            self.closed = exc
            await self.channel.close()  # releases the client connection
            raise
        self.received.append(frame)
        return frame

    async def refusal(self) -> tuple[wire.Error | None, ChannelClosed]:
        """The Error (if any) and the close that end this connection."""
        error: wire.Error | None = None
        while True:
            try:
                frame = await self._recv()
            except ChannelClosed as exc:
                return error, exc
            if isinstance(frame.msg, wire.Error):
                error = frame.msg

    def _prover(self, spec: ChallengeSpec, backend: Backend) -> ProvenChallenge:
        if self.gate is not None:
            self.gate.wait(WAIT)
        return prove(spec, backend, threads=1)

    async def serve(self) -> None:
        """Answer challenges, reveals, releases and pings until the channel closes."""
        assert self.channel is not None
        self.runner = ChallengeRunner(
            self.worker_id,
            [
                Device(uuid=uuid, backend=NumpyBackend(), precisions=frozenset({"fp32"}))
                for uuid in ("cpu-0", *self.gpus)
            ],
            max_n=4096,
            result_ttl_s=60.0,
            prover=self._prover,
        )
        try:
            while True:
                try:
                    frame = await self.channel.recv()
                except ChannelClosed as exc:
                    self.closed = exc
                    await self.channel.close()
                    return
                self.received.append(frame)
                msg = frame.msg
                if isinstance(msg, wire.ChallengeRequest):
                    task = asyncio.create_task(self._challenge(frame.id, msg))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                elif isinstance(msg, wire.RevealRequest):
                    try:
                        await self.channel.send(self.runner.reveal(msg), id=frame.id)
                    except ChallengeRefusedError as exc:
                        await self.channel.send_error(exc.code, str(exc), ref=frame.id)
                elif isinstance(msg, wire.ChallengeRelease):
                    self.runner.release(msg.challenge_id)
                elif isinstance(msg, wire.Ping):
                    await self.channel.send(wire.Pong(nonce=msg.nonce), id=frame.id)
        finally:
            for task in list(self._tasks):
                task.cancel()
            self.runner.close()

    async def _challenge(self, frame_id: int, msg: wire.ChallengeRequest) -> None:
        assert self.channel is not None and self.runner is not None
        with contextlib.suppress(ChannelClosed):
            try:
                commit = await self.runner.run(msg)
            except ChallengeRefusedError as exc:
                await self.channel.send_error(exc.code, str(exc), ref=frame_id)
                return
            await self.channel.send(commit, id=frame_id)

    async def heartbeat(self, interval: float) -> None:
        assert self.channel is not None
        with contextlib.suppress(ChannelClosed):
            while True:
                await self.channel.send(
                    wire.Heartbeat(uptime_s=1.0, load1=0.1, mem_used_bytes=1 << 20)
                )
                await asyncio.sleep(interval)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()


MakeMiner = Callable[..., Awaitable[Miner]]


@pytest.fixture(autouse=True)
async def _close_fake_workers() -> AsyncIterator[None]:
    """Every fake worker's client connection is closed when its test ends."""
    yield
    while _CREATED:
        await _CREATED.pop().close()


@pytest.fixture
async def make_miner(tmp_path: Path) -> AsyncIterator[MakeMiner]:
    started: list[Miner] = []

    async def start(
        *,
        connections: WorkerConnections | None = None,
        clock: Callable[[], float] | None = None,
        sweep_interval_s: float | None = None,
        on_change: Callable[[], None] | None = None,
        **policy: Any,
    ) -> Miner:
        """``clock`` drives both the server (liveness) and the registry (timestamps);
        ``on_change`` is the server's hook for worker changes (the daemon's roster trigger)."""
        config = MinerConfig(
            state_dir=str(tmp_path),
            policy=WorkerPolicy(**{"handshake_timeout_s": 5.0, **policy}),
        )
        registry = WorkerRegistry(
            tmp_path / f"workers{len(started)}.db",
            max_workers=config.policy.max_workers,
            clock=clock or time.time,
        )
        outcomes: list[tuple[str, bool]] = []

        def on_outcome(worker_id: str, ok: bool) -> None:  # as the daemon wires it, and recorded
            outcomes.append((worker_id, ok))
            registry.record_challenge(worker_id, ok=ok)

        conns = connections if connections is not None else WorkerConnections(on_outcome=on_outcome)
        server = MinerServer(
            config,
            signer=alice(),
            registry=registry,
            enrollment_secret=SECRET,
            connections=conns,
            close_timeout_s=1.0,
            sweep_interval_s=sweep_interval_s,
            on_change=on_change,
            clock=clock or time.monotonic,
        )
        await server.start(host="127.0.0.1", port=0)
        miner = Miner(server, registry, conns, config, outcomes)
        started.append(miner)
        return miner

    yield start
    for miner in started:
        await miner.server.stop()
        miner.registry.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        yield session
