"""The miner's validator links against fake validators on loopback and a devnet chain.

Each fake validator is an aiohttp app serving ``GET /v1/miner`` as docs/miner-validator.md says:
it checks the btauth/1 headers with ``BtAuthVerifier``, runs ``core.channel.accept`` with its
own hotkey, and records every frame the miner sends. The miner side is real: a ``MinerServer``
with fake workers that prove challenges with the numpy prover, and ``ValidatorUplinks`` reading
a ``DevnetChain`` file.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import msgspec
import pytest
from aiohttp import web

from byteleap.chain.devnet import DevnetChain
from byteleap.chain.port import SubnetSnapshot, TxOutcome
from byteleap.core import wire
from byteleap.core.challenge import ChallengeSpec, draw_sample, verify
from byteleap.core.channel import AcceptFailed, Channel, ChannelClosed, CloseCode, accept
from byteleap.core.identity import (
    BtAuthError,
    BtAuthVerifier,
    HotkeySigner,
    IdentityKind,
    PeerIdentity,
)
from byteleap.core.session import SessionConfig
from byteleap.miner.config import MinerConfig
from byteleap.miner.uplink import (
    VALIDATOR_PATH,
    UplinkSettings,
    ValidatorState,
    ValidatorUplinks,
    client_session,
    tao_to_rao,
    worker_roster,
)
from tests.support.fixtures import WAIT, eventually

from .conftest import FakeWorker, MakeMiner, Miner, alice

NETUID = 7
TAO = 10**9
M = TypeVar("M", bound=wire.Message)


# ------------------------------------------------------------------------------------------------
# A fake validator


@dataclass
class FakeValidator:
    """One validator endpoint. ``signer`` proves the session; ``hotkey`` is what the chain says.

    ``refuse``: answer every upgrade with this HTTP status. ``check_btauth``: verify the headers
    (a man in the middle cannot: they are addressed to the real validator).
    """

    signer: HotkeySigner
    hotkey: str
    refuse: int | None = None
    check_btauth: bool = True
    port: int = 0
    upgrades: list[Mapping[str, str]] = field(default_factory=list)
    callers: list[str] = field(default_factory=list)
    refusals: list[AcceptFailed] = field(default_factory=list)
    channels: list[Channel] = field(default_factory=list)
    frames: asyncio.Queue[wire.Frame] = field(default_factory=asyncio.Queue)
    closes: asyncio.Queue[ChannelClosed] = field(default_factory=asyncio.Queue)
    verifier: BtAuthVerifier | None = None

    def __post_init__(self) -> None:
        self.verifier = BtAuthVerifier(self.signer.ss58_address)

    @property
    def channel(self) -> Channel:
        return self.channels[-1]

    async def handler(self, request: web.Request) -> web.StreamResponse:
        self.upgrades.append(dict(request.headers))
        if self.refuse is not None:
            return web.Response(status=self.refuse, text="not registered on netuid 7")
        caller: str | None = None
        if self.check_btauth:
            assert self.verifier is not None
            try:
                caller = self.verifier.verify(
                    request.headers, method=request.method, path=request.path_qs
                )
            except BtAuthError as exc:
                return web.Response(status=exc.status, text=exc.reason)
            self.callers.append(caller)
        expected = PeerIdentity.from_ss58(caller) if caller is not None else None
        try:
            channel = await accept(
                request,
                signer=self.signer,
                authorize=lambda peer: expected is None or peer == expected,
                prologue=wire.MINER_VALIDATOR_PROLOGUE,
                link=wire.Link.MINER_VALIDATOR,
                peer_kind=IdentityKind.SR25519,
                handshake_timeout=WAIT,
                close_timeout=1.0,
            )
        except AcceptFailed as exc:
            self.refusals.append(exc)
            return exc.response
        self.channels.append(channel)
        try:
            while True:
                await self.frames.put(await channel.recv())
        except ChannelClosed as exc:
            await self.closes.put(exc)
        finally:
            await channel.close()
        return channel.response

    async def expect(self, kind: type[M], check: Callable[[M], bool] = lambda _: True) -> M:
        """The next frame carrying a ``kind`` that passes ``check`` (others are skipped)."""
        return (await self.expect_frame(kind, check)).msg  # type: ignore[return-value]

    async def expect_frame(
        self, kind: type[M], check: Callable[[M], bool] = lambda _: True
    ) -> wire.Frame:
        async with asyncio.timeout(WAIT):
            while True:
                frame = await self.frames.get()
                if isinstance(frame.msg, kind) and check(frame.msg):
                    return frame

    async def answers(self, count: int) -> dict[bytes, wire.Message]:
        """``count`` batch answers (commits, reveals, failures) by challenge id."""
        found: dict[bytes, wire.Message] = {}
        kinds = (wire.DeviceCommit, wire.DeviceReveal, wire.DeviceFailure)
        async with asyncio.timeout(WAIT):
            while len(found) < count:
                msg = (await self.frames.get()).msg
                if isinstance(msg, kinds):
                    assert msg.challenge_id not in found, msg
                    found[msg.challenge_id] = msg
        return found

    async def closed(self) -> ChannelClosed:
        return await asyncio.wait_for(self.closes.get(), WAIT)


class CountingChain:
    """A devnet port that counts snapshot reads (to know that refreshes happened)."""

    def __init__(self, inner: DevnetChain) -> None:
        self.inner = inner
        self.reads = 0

    async def head_block(self) -> int:
        return await self.inner.head_block()

    async def block_time(self) -> float:
        return await self.inner.block_time()

    async def subnet(self, netuid: int) -> SubnetSnapshot:
        self.reads += 1
        return await self.inner.subnet(netuid)

    async def uid_of(self, netuid: int, hotkey: str) -> int | None:
        return await self.inner.uid_of(netuid, hotkey)

    async def publish_endpoint(self, netuid: int, ip: str, port: int) -> TxOutcome:
        return await self.inner.publish_endpoint(netuid, ip, port)

    async def set_weights(
        self, netuid: int, weights: Mapping[int, float], *, version_key: int = 0
    ) -> TxOutcome:
        return await self.inner.set_weights(netuid, weights, version_key=version_key)

    async def weights(self, netuid: int) -> dict[int, dict[int, int]]:
        return await self.inner.weights(netuid)

    async def close(self) -> None:
        await self.inner.close()


# ------------------------------------------------------------------------------------------------
# The harness


@dataclass
class Harness:
    chain: DevnetChain
    port: CountingChain
    miner: Miner
    http: aiohttp.ClientSession
    """For the fake workers."""
    uplink_http: aiohttp.ClientSession
    """For the uplinks: what the daemon uses."""
    uplinks: ValidatorUplinks | None = None
    runners: list[web.AppRunner] = field(default_factory=list)

    def workers_changed(self) -> None:
        if self.uplinks is not None:
            self.uplinks.roster_changed()

    async def validator(
        self,
        uri: str,
        *,
        stake_tao: int = 2000,
        permit: bool = True,
        publish: bool = True,
        impostor: str | None = None,
        refuse: int | None = None,
    ) -> FakeValidator:
        """A validator registered on the chain as ``uri``'s hotkey. ``impostor``: the endpoint
        is served by that key instead (a man in the middle)."""
        registered = HotkeySigner.from_uri(uri)
        signer = HotkeySigner.from_uri(impostor) if impostor else registered
        fake = FakeValidator(
            signer=signer,
            hotkey=registered.ss58_address,
            refuse=refuse,
            check_btauth=impostor is None,
        )
        app = web.Application()
        app.router.add_get(VALIDATOR_PATH, fake.handler)
        runner = web.AppRunner(app, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.runners.append(runner)
        fake.port = int(runner.addresses[0][1])
        self.chain.register(NETUID, fake.hotkey, stake_rao=stake_tao * TAO, validator_permit=permit)
        if publish:
            await self.chain.as_hotkey(fake.hotkey).publish_endpoint(NETUID, "127.0.0.1", fake.port)
        return fake

    async def worker(self, *gpus: str) -> FakeWorker:
        worker = FakeWorker(gpus=gpus)
        await worker.connect(self.http, self.miner.url)
        asyncio.create_task(worker.serve())  # noqa: RUF006 - it ends when its channel closes
        await eventually(lambda: worker.worker_id in self.miner.connections)
        return worker

    def start(
        self,
        session_config: SessionConfig | None = None,
        http: aiohttp.ClientSession | None = None,
        **overrides: Any,
    ) -> ValidatorUplinks:
        options: dict[str, Any] = {
            "netuid": NETUID,
            "min_stake_rao": 1000 * TAO,
            "snapshot_refresh_s": 0.1,
            "reconnect_min_s": 0.05,
            "reconnect_max_s": 0.4,
            "roster_debounce_s": 0.05,
            "connect_timeout_s": WAIT,
            "close_timeout_s": 1.0,
        }
        options.update(overrides)
        self.uplinks = ValidatorUplinks(
            chain=self.port,
            signer=alice(),
            relay=self.miner.connections,
            roster=lambda: worker_roster(self.miner.registry, self.miner.connections),
            http=http or self.uplink_http,
            settings=UplinkSettings(**options),
            session_config=session_config,
        )
        self.uplinks.start()
        return self.uplinks

    def status(self, fake: FakeValidator) -> Any:
        assert self.uplinks is not None
        (status,) = [s for s in self.uplinks.status() if s.hotkey == fake.hotkey]
        return status

    async def refreshes(self, count: int = 2) -> None:
        """Wait until ``count`` more snapshot reads have happened."""
        target = self.port.reads + count
        await eventually(lambda: self.port.reads >= target)


@pytest.fixture
async def harness(
    tmp_path: Path, make_miner: MakeMiner, http: aiohttp.ClientSession
) -> AsyncIterator[Harness]:
    chain = DevnetChain.create(tmp_path / "chain.db", netuid=NETUID)
    chain.register(NETUID, alice().ss58_address)
    holder: list[Harness] = []
    miner = await make_miner(on_change=lambda: holder[0].workers_changed() if holder else None)
    port = CountingChain(chain.as_hotkey(alice().ss58_address))
    async with client_session() as uplink_http:
        h = Harness(chain, port, miner, http, uplink_http)
        holder.append(h)
        yield h
        if h.uplinks is not None:
            await h.uplinks.stop()
        for runner in h.runners:
            await runner.cleanup()


def _challenge(
    worker_id: str, device: str = "cpu-0", *, hotkey: str | None = None, n: int = 128
) -> wire.DeviceChallenge:
    return wire.DeviceChallenge(
        worker_id=worker_id,
        challenge_id=secrets.token_bytes(16),
        seed=secrets.token_bytes(32),
        miner_hotkey=hotkey or alice().ss58_address,
        device_uuid=device,
        n=n,
        precision="fp32",
        deadline_ms=60_000,
    )


async def _hello(fake: FakeValidator) -> tuple[wire.MinerHello, wire.WorkerRoster]:
    """The session's first two frames: the hello, then the full roster."""
    async with asyncio.timeout(WAIT):
        first = (await fake.frames.get()).msg
        second = (await fake.frames.get()).msg
    assert isinstance(first, wire.MinerHello), first
    assert isinstance(second, wire.WorkerRoster), second
    return first, second


# ------------------------------------------------------------------------------------------------
# Whom the miner dials


async def test_dials_only_permitted_validators_with_stake_and_endpoint(harness: Harness) -> None:
    worker = await harness.worker()
    bob = await harness.validator("//Bob")
    poor = await harness.validator("//Charlie", stake_tao=10)
    no_permit = await harness.validator("//Dave", permit=False)
    hidden = await harness.validator("//Eve", publish=False)
    uplinks = harness.start()

    hello, roster = await _hello(bob)
    assert hello.miner_hotkey == alice().ss58_address and hello.agent_version
    assert [(w.worker_id, w.online) for w in roster.workers] == [(worker.worker_id, True)]
    # btauth/1 on the upgrade, bound to this validator, verified by its own verifier.
    (headers,) = bob.upgrades
    assert headers["X-Bittensor-Receiver"] == bob.hotkey
    assert headers["X-Bittensor-Hotkey"] == alice().ss58_address
    assert bob.callers == [alice().ss58_address]
    assert bob.channel.peer == alice().identity

    await harness.refreshes()
    assert [s.hotkey for s in uplinks.status()] == [bob.hotkey]
    assert harness.status(bob).state is ValidatorState.CONNECTED
    assert uplinks.status_line() == "1/1 validator connected"
    for ignored in (poor, no_permit, hidden):
        assert ignored.upgrades == []


async def test_impostor_at_the_endpoint_is_refused_before_anything_is_sent(
    harness: Harness,
) -> None:
    mitm = await harness.validator("//Bob", impostor="//Mallory")
    harness.start()
    await eventually(lambda: len(mitm.refusals) >= 2)  # refused, and again after the backoff
    assert mitm.channels == [] and mitm.frames.empty()
    assert all(r.code == CloseCode.UNAUTHORIZED for r in mitm.refusals)
    status = harness.status(mitm)
    assert status.sessions == 0 and status.state is not ValidatorState.CONNECTED
    assert "man in the middle" in (status.last_error or "")


@pytest.mark.parametrize(
    ("status", "daemon_session", "reason"),
    [
        (403, True, 'validator said "not registered on netuid 7"'),
        (401, False, "check this host's clock"),  # another session: no body, a hint instead
    ],
)
async def test_http_refusal_is_logged_and_retried_with_the_long_backoff(
    harness: Harness,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    status: int,
    daemon_session: bool,
    reason: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="byteleap.miner.uplink")
    refusing = await harness.validator("//Bob", refuse=status)
    harness.start(reconnect_max_s=0.4, http=None if daemon_session else http)
    await eventually(lambda: len(refusing.upgrades) >= 2)
    last_error = harness.status(refusing).last_error or ""
    assert f"HTTP {status}" in last_error and reason in last_error, last_error
    retry_in_s = harness.status(refusing).retry_in_s
    assert retry_in_s is not None and retry_in_s >= 0.2  # at least half the cap
    logged = [r.getMessage() for r in caplog.records if f"HTTP {status}" in r.getMessage()]
    assert len(logged) == 1, logged  # the same refusal again is not logged again
    assert reason in logged[0]


# ------------------------------------------------------------------------------------------------
# Requests


async def test_challenge_batch_reveal_and_release_end_to_end(harness: Harness) -> None:
    cpu = await harness.worker()
    gpu = await harness.worker("GPU-1")
    gone = await harness.worker()
    bob = await harness.validator("//Bob")
    harness.start()
    await _hello(bob)
    await gone.close()
    await eventually(lambda: gone.worker_id not in harness.miner.connections)

    good = [_challenge(cpu.worker_id), _challenge(gpu.worker_id, "GPU-1")]
    bad = {
        "unknown worker": (_challenge("cd" * 16), wire.ErrorCode.DEVICE_UNKNOWN),
        "unknown device": (_challenge(cpu.worker_id, "GPU-9"), wire.ErrorCode.DEVICE_UNKNOWN),
        "offline worker": (_challenge(gone.worker_id), wire.ErrorCode.WORKER_OFFLINE),
        "other miner": (
            _challenge(gpu.worker_id, hotkey=HotkeySigner.from_uri("//Ferdie").ss58_address),
            wire.ErrorCode.CHALLENGE_INVALID,
        ),
    }
    batch = wire.ChallengeBatch(round_id=1, challenges=[*good, *(c for c, _ in bad.values())])
    await bob.channel.send(batch)
    answers = await bob.answers(len(batch.challenges))
    for what, (dc, code) in bad.items():
        failure = answers[dc.challenge_id]
        assert isinstance(failure, wire.DeviceFailure), what
        assert failure.code is code, (what, failure)
        assert (failure.worker_id, failure.device_uuid) == (dc.worker_id, dc.device_uuid)
    commits = {dc.challenge_id: answers[dc.challenge_id] for dc in good}
    assert all(isinstance(c, wire.DeviceCommit) for c in commits.values()), commits

    # Phase 2: the revealed rows verify against the committed roots.
    samples = {dc.challenge_id: draw_sample(dc.n, 4, 4) for dc in good}
    stranger = wire.DeviceRevealRequest(
        worker_id=cpu.worker_id, challenge_id=secrets.token_bytes(16), device_uuid="cpu-0", rows=[0]
    )
    requests = [
        wire.DeviceRevealRequest(
            worker_id=dc.worker_id,
            challenge_id=dc.challenge_id,
            device_uuid=dc.device_uuid,
            rows=list(samples[dc.challenge_id].rows),
        )
        for dc in good
    ]
    await bob.channel.send(wire.RevealBatch(round_id=1, requests=[*requests, stranger]))
    reveals = await bob.answers(3)
    refused = reveals[stranger.challenge_id]
    assert isinstance(refused, wire.DeviceFailure)
    assert refused.code is wire.ErrorCode.CHALLENGE_UNKNOWN
    for dc in good:
        reveal, commit = reveals[dc.challenge_id], commits[dc.challenge_id]
        assert isinstance(reveal, wire.DeviceReveal) and isinstance(commit, wire.DeviceCommit)
        spec = ChallengeSpec(
            challenge_id=dc.challenge_id,
            seed=dc.seed,
            miner_hotkey=dc.miner_hotkey,
            worker_id=dc.worker_id,
            device_uuid=dc.device_uuid,
            n=dc.n,
            precision=dc.precision,
        )
        rows = {row.index: (row.values, row.path) for row in reveal.rows}
        verdict = verify(spec, commit.merkle_root, samples[dc.challenge_id], rows)
        assert verdict.ok, verdict

    # Release: each worker is told to free its own result; the miner forgets the challenges.
    assert harness.uplinks is not None
    (link,) = harness.uplinks.links()
    assert link.remembered_challenges == 2
    await bob.channel.send(
        wire.ReleaseBatch(round_id=1, challenge_ids=[dc.challenge_id for dc in good])
    )
    for worker, dc in ((cpu, good[0]), (gpu, good[1])):
        await eventually(
            lambda w=worker, d=dc: any(
                isinstance(f.msg, wire.ChallengeRelease) and f.msg.challenge_id == d.challenge_id
                for f in w.received
            )
        )
    assert link.remembered_challenges == 0
    # A reveal after the release is refused by the miner, not relayed.
    await bob.channel.send(wire.RevealBatch(round_id=1, requests=requests[:1]))
    (late,) = (await bob.answers(1)).values()
    assert isinstance(late, wire.DeviceFailure)
    assert late.code is wire.ErrorCode.CHALLENGE_UNKNOWN


async def test_echo_answers_with_the_request_id_or_worker_offline(harness: Harness) -> None:
    worker = await harness.worker()
    bob = await harness.validator("//Bob")
    harness.start()
    await _hello(bob)
    await bob.channel.send(wire.EchoRequest(nonce=41, worker_id=worker.worker_id), id=9)
    reply = await bob.expect_frame(wire.EchoReply)
    assert reply == wire.Frame(msg=wire.EchoReply(nonce=41, worker_id=worker.worker_id), id=9)
    assert any(isinstance(f.msg, wire.Ping) for f in worker.received)  # it went to the worker

    await bob.channel.send(wire.EchoRequest(nonce=42, worker_id="ef" * 16), id=10)
    error = await bob.expect_frame(wire.Error)
    assert error.id == 10
    assert isinstance(error.msg, wire.Error)
    assert error.msg.code is wire.ErrorCode.WORKER_OFFLINE and error.msg.ref == 10
    # The link is still up: a ping is answered.
    await bob.channel.send(wire.Ping(nonce=5), id=11)
    assert (await bob.expect_frame(wire.Pong)).id == 11


# ------------------------------------------------------------------------------------------------
# Roster, reconnects, chain changes, shutdown


async def test_roster_is_resent_on_change(harness: Harness) -> None:
    first = await harness.worker()
    bob = await harness.validator("//Bob")
    harness.start(roster_interval_s=60)  # only a change can bring a new roster in time
    _hello_msg, roster = await _hello(bob)
    assert {w.worker_id for w in roster.workers} == {first.worker_id}

    second = await harness.worker("GPU-1")
    updated = await bob.expect(
        wire.WorkerRoster, lambda r: second.worker_id in {w.worker_id for w in r.workers}
    )
    (summary,) = [w for w in updated.workers if w.worker_id == second.worker_id]
    assert summary.online and [g.uuid for g in summary.inventory.gpus] == ["GPU-1"]

    await second.close()
    offline = await bob.expect(
        wire.WorkerRoster,
        lambda r: any(w.worker_id == second.worker_id and not w.online for w in r.workers),
    )
    assert len(offline.workers) == 2  # still enrolled, now offline


async def test_roster_is_resent_periodically_without_changes(harness: Harness) -> None:
    worker = await harness.worker()
    bob = await harness.validator("//Bob")
    harness.start(roster_interval_s=0.2)
    await _hello(bob)
    for _ in range(2):
        roster = await bob.expect(wire.WorkerRoster)
        assert [w.worker_id for w in roster.workers] == [worker.worker_id]


async def test_reconnects_and_resyncs_after_the_validator_drops(harness: Harness) -> None:
    worker = await harness.worker()
    bob = await harness.validator("//Bob")
    harness.start()
    await _hello(bob)
    await bob.channel.close(CloseCode.GOING_AWAY, "validator restarting")
    hello, roster = await _hello(bob)  # a new session: hello and full roster again
    assert hello.miner_hotkey == alice().ss58_address
    assert [w.worker_id for w in roster.workers] == [worker.worker_id]
    assert len(bob.channels) == 2 and len(set(bob.callers)) == 1
    # Every attempt was signed afresh: no nonce was reused (the verifier refuses replays).
    assert len({h["X-Bittensor-Nonce"] for h in bob.upgrades}) == len(bob.upgrades)
    await eventually(lambda: harness.status(bob).state is ValidatorState.CONNECTED)
    assert harness.status(bob).sessions == 2


async def test_session_is_renewed_before_its_maximum_age(harness: Harness) -> None:
    bob = await harness.validator("//Bob")
    harness.start(session_config=SessionConfig(max_age_seconds=2.0))
    await _hello(bob)
    closed = await bob.closed()  # the miner renews, it does not wait for the session to expire
    assert closed.by_peer and closed.code == CloseCode.NORMAL
    await _hello(bob)
    await eventually(lambda: harness.status(bob).sessions == 2)


async def test_chain_outage_keeps_links_and_is_logged_once(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="byteleap.miner.uplink")
    worker = await harness.worker()
    bob = await harness.validator("//Bob")
    uplinks = harness.start(reconnect_min_s=0.05, snapshot_refresh_s=0.1)
    await _hello(bob)

    harness.chain.set_available(False)
    await eventually(lambda: not uplinks.chain_reachable)
    await harness.refreshes(3)  # failed reads, retried
    assert harness.status(bob).state is ValidatorState.CONNECTED
    assert uplinks.status_line() == "1/1 validator connected, chain unreachable"
    # The same session still serves requests.
    await bob.channel.send(wire.EchoRequest(nonce=1, worker_id=worker.worker_id), id=3)
    assert (await bob.expect_frame(wire.EchoReply)).id == 3
    assert len(bob.channels) == 1 and bob.closes.empty()

    harness.chain.set_available(True)
    await eventually(lambda: uplinks.chain_reachable)
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if m.startswith("cannot read the subnet")]) == 1, messages
    assert len([m for m in messages if m.startswith("chain reachable again")]) == 1, messages


async def test_chain_down_at_start_then_links_when_it_answers(harness: Harness) -> None:
    bob = await harness.validator("//Bob")
    harness.chain.set_available(False)
    uplinks = harness.start()
    await harness.refreshes(2)
    assert uplinks.status() == [] and bob.upgrades == []
    assert uplinks.status_line() == "0/0 validators connected, chain unreachable"
    harness.chain.set_available(True)
    await _hello(bob)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("permit", "lost its validator permit"),
        ("stake", "below the minimum"),
    ],
)
async def test_validator_losing_permit_or_stake_is_closed_at_the_next_refresh(
    harness: Harness, change: str, reason: str
) -> None:
    bob = await harness.validator("//Bob")
    uplinks = harness.start()
    await _hello(bob)
    if change == "permit":
        harness.chain.set_permit(NETUID, bob.hotkey, False)
    else:
        harness.chain.set_stake(NETUID, bob.hotkey, 999 * TAO)
    closed = await bob.closed()
    assert closed.by_peer and closed.code == CloseCode.UNAUTHORIZED and reason in closed.reason
    assert uplinks.status() == []
    await harness.refreshes(2)
    assert len(bob.upgrades) == 1  # not dialed again


async def test_endpoint_move_reconnects_at_the_new_address(harness: Harness) -> None:
    bob = await harness.validator("//Bob")
    harness.start()
    await _hello(bob)
    moved = FakeValidator(signer=bob.signer, hotkey=bob.hotkey)
    app = web.Application()
    app.router.add_get(VALIDATOR_PATH, moved.handler)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    harness.runners.append(runner)
    port = int(runner.addresses[0][1])
    await harness.chain.as_hotkey(bob.hotkey).publish_endpoint(NETUID, "127.0.0.1", port)
    closed = await bob.closed()
    assert closed.code == CloseCode.NORMAL and "moved" in closed.reason
    await _hello(moved)


async def test_shutdown_closes_every_link_with_going_away(harness: Harness) -> None:
    bob = await harness.validator("//Bob")
    charlie = await harness.validator("//Charlie")
    uplinks = harness.start()
    await _hello(bob)
    await _hello(charlie)
    await uplinks.stop()
    for fake in (bob, charlie):
        closed = await fake.closed()
        assert closed.by_peer and closed.code == CloseCode.GOING_AWAY
    assert uplinks.status() == []


# ------------------------------------------------------------------------------------------------
# Settings


def test_settings_from_the_miner_config() -> None:
    config = msgspec.convert(
        {"chain": {"netuid": 9, "snapshot_refresh_s": 5}, "validators": {"min_stake_tao": 1.5}},
        MinerConfig,
    )
    settings = UplinkSettings.from_config(config)
    assert settings.netuid == 9 and settings.snapshot_refresh_s == 5
    assert settings.min_stake_rao == 1_500_000_000 == tao_to_rao(1.5)
    with pytest.raises(ValueError, match="reconnect_max_s"):
        UplinkSettings(netuid=1, reconnect_min_s=2, reconnect_max_s=1)
    with pytest.raises(ValueError, match="non-negative"):
        tao_to_rao(-1)
