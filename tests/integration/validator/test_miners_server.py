"""The validator's miner endpoint over real loopback sockets: admission, sessions, rounds.

A scripted miner dials with btauth/1 headers and ``core.channel.dial`` exactly as the protocol
says (docs/miner-validator.md); refusals before the upgrade are read as plain HTTP answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from byteleap.chain.port import Neuron, SubnetSnapshot
from byteleap.core import wire
from byteleap.core.challenge import ProvenChallenge, prove
from byteleap.core.challenge.prover import NumpyBackend
from byteleap.core.channel import Channel, ChannelClosed, CloseCode, dial
from byteleap.core.identity import HotkeySigner, IdentityKind
from byteleap.validator.config import MinerListen, MinerPolicy, RoundSettings
from byteleap.validator.db import AsyncStore
from byteleap.validator.miners import (
    LINK,
    PROLOGUE,
    MinerHub,
    MinerRequestError,
    MinerSession,
)
from byteleap.validator.rounds import RoundEngine
from byteleap.validator.store import ChallengeState
from byteleap.validator.store_sqlite import SQLiteStore
from tests.support.fixtures import WAIT, eventually

NETUID = 128
PATH = "/v1/miner"
N = 128


@functools.cache
def key(name: str) -> HotkeySigner:
    return HotkeySigner.from_uri(f"//byteleap-test/{name}")


def validator() -> HotkeySigner:
    return key("validator")


def snapshot(*names: str) -> SubnetSnapshot:
    """The subnet with the validator (uid 0) and these miners (uids 1...)."""
    neurons = [
        Neuron(
            uid=uid,
            hotkey=key(name).ss58_address,
            coldkey=key(name).ss58_address,
            stake_rao=10**12 if name == "validator" else 0,
            validator_permit=name == "validator",
            active=True,
            last_update=0,
        )
        for uid, name in enumerate(("validator", *names))
    ]
    return SubnetSnapshot(
        netuid=NETUID,
        block=1,
        tempo=360,
        weights_rate_limit=100,
        min_allowed_weights=0,
        max_weight_limit=65535,
        commit_reveal_enabled=False,
        max_uids=256,
        neurons=tuple(neurons),
    )


@dataclass
class Recorder:
    """A HubListener that remembers what it was told."""

    rosters: list[tuple[str, int, int]] = field(default_factory=list)
    disconnects: list[str] = field(default_factory=list)

    async def on_roster(self, session: MinerSession, roster: wire.WorkerRoster) -> None:
        self.rosters.append((session.hotkey, session.uid, len(roster.workers)))

    async def on_disconnect(self, session: MinerSession) -> None:
        self.disconnects.append(session.hotkey)


@dataclass
class Validator:
    hub: MinerHub
    recorder: Recorder
    current: list[SubnetSnapshot | None]

    @property
    def url(self) -> str:
        host, port = self.hub.addresses[0]
        return f"http://{host}:{port}{PATH}"

    def register_only(self, *names: str) -> None:
        self.current[0] = snapshot(*names)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        yield session


@pytest.fixture
async def make_validator() -> AsyncIterator[Any]:
    started: list[MinerHub] = []

    async def start(**policy: Any) -> Validator:
        current: list[SubnetSnapshot | None] = [snapshot("miner1", "miner2")]
        recorder = Recorder()
        hub = MinerHub(
            MinerListen(path=PATH),
            MinerPolicy(**{"handshake_timeout_s": WAIT, **policy}),
            signer=validator(),
            snapshot=lambda: current[0],
            listener=recorder,
            close_timeout_s=1.0,
        )
        await hub.start(host="127.0.0.1", port=0)
        started.append(hub)
        return Validator(hub, recorder, current)

    yield start
    for hub in started:
        await hub.stop()


def worker_summary(worker_id: str) -> wire.WorkerSummary:
    return wire.WorkerSummary(
        worker_id=worker_id,
        online=True,
        inventory=wire.Inventory(cpu_model="Test CPU", cpu_cores=2, mem_bytes=8 << 30),
    )


WORKER = "ab" * 16


@dataclass
class Miner:
    """The miner side of the link, scripted."""

    signer: HotkeySigner
    channel: Channel | None = None
    frames: list[wire.Frame] = field(default_factory=list)
    closed: ChannelClosed | None = None
    proofs: dict[bytes, ProvenChallenge] = field(default_factory=dict)
    vanish_on_batch: bool = False
    echo_error: wire.ErrorCode | None = None

    def headers(self, receiver: str | None = None) -> dict[str, str]:
        return self.signer.btauth_headers(
            method="GET", path=PATH, receiver_ss58=receiver or validator().ss58_address
        )

    async def dial(
        self,
        http: aiohttp.ClientSession,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        session_signer: HotkeySigner | None = None,
    ) -> Channel:
        self.channel = await dial(
            http,
            url,
            signer=session_signer or self.signer,
            authorize=lambda peer: peer == validator().identity,
            prologue=PROLOGUE,
            link=LINK,
            peer_kind=IdentityKind.SR25519,
            handshake_timeout=WAIT,
            headers=headers if headers is not None else self.headers(),
        )
        return self.channel

    async def connect(
        self, http: aiohttp.ClientSession, url: str, *, hello_hotkey: str | None = None
    ) -> Channel:
        channel = await self.dial(http, url)
        await channel.send(
            wire.MinerHello(
                miner_hotkey=hello_hotkey or self.signer.ss58_address, agent_version="0.1.0-test"
            )
        )
        return channel

    async def send(self, msg: wire.Message, *, id: int = 0) -> None:
        assert self.channel is not None
        await self.channel.send(msg, id=id)

    async def recv(self) -> wire.Frame:
        assert self.channel is not None
        try:
            async with asyncio.timeout(WAIT):
                frame = await self.channel.recv()
        except ChannelClosed as exc:
            self.closed = exc
            await self.channel.close()
            raise
        self.frames.append(frame)
        return frame

    async def until_closed(self) -> tuple[list[wire.Error], ChannelClosed]:
        """Read until the validator closes; the Errors it sent and the close."""
        while True:
            try:
                await self.recv()
            except ChannelClosed as exc:
                return [f.msg for f in self.frames if isinstance(f.msg, wire.Error)], exc

    async def serve(self) -> None:
        """Answer echoes, batches and reveals honestly until the connection closes."""
        with contextlib.suppress(ChannelClosed):
            while True:
                frame = await self.recv()
                msg = frame.msg
                if isinstance(msg, wire.EchoRequest):
                    if self.echo_error is not None:
                        await self.send(
                            wire.Error(code=self.echo_error, message="worker offline"),
                            id=frame.id,
                        )
                    else:
                        reply = wire.EchoReply(nonce=msg.nonce, worker_id=msg.worker_id)
                        await self.send(reply, id=frame.id)
                elif isinstance(msg, wire.ChallengeBatch):
                    if self.vanish_on_batch:
                        assert self.channel is not None
                        await self.channel.close()
                        return
                    for c in msg.challenges:
                        proof = prove(c.request().spec(c.worker_id), NumpyBackend(), threads=1)
                        self.proofs[c.challenge_id] = proof
                        await self.send(
                            wire.DeviceCommit(
                                challenge_id=c.challenge_id,
                                worker_id=c.worker_id,
                                device_uuid=c.device_uuid,
                                merkle_root=proof.root,
                                elapsed_ms=1,
                            )
                        )
                elif isinstance(msg, wire.RevealBatch):
                    for r in msg.requests:
                        rows = self.proofs[r.challenge_id].reveal(r.rows)
                        await self.send(
                            wire.DeviceReveal(
                                challenge_id=r.challenge_id,
                                worker_id=r.worker_id,
                                device_uuid=r.device_uuid,
                                rows=[
                                    wire.RevealedRow(index=x.index, values=x.values, path=x.path)
                                    for x in rows
                                ],
                            )
                        )

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()


async def plain_get(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    async with http.get(url, headers=headers or {}) as response:
        return response.status, await response.text()


# ---------------------------------------------------------------------------- admission


async def test_unsigned_upgrade_is_refused_with_401(make_validator: Any, http: Any) -> None:
    v = await make_validator()
    status, text = await plain_get(http, v.url)
    assert status == 401 and "btauth/1" in text
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await Miner(key("miner1")).dial(http, v.url, headers={})
    assert refused.value.status == 401
    assert len(v.hub) == 0


async def test_bad_signature_is_refused_with_401(make_validator: Any, http: Any) -> None:
    v = await make_validator()
    headers = Miner(key("miner1")).headers()
    signature = headers["X-Bittensor-Signature"]
    headers["X-Bittensor-Signature"] = signature[:-2] + ("00" if signature[-2:] != "00" else "11")
    status, text = await plain_get(http, v.url, headers)
    assert (status, text.strip()) == (401, "bad btauth/1 signature")


async def test_replayed_headers_are_refused_with_403(make_validator: Any, http: Any) -> None:
    v = await make_validator()
    headers = Miner(key("miner1")).headers()
    first, _ = await plain_get(http, v.url, headers)
    assert first == 400  # admitted, then refused only because a plain GET is no WebSocket
    status, text = await plain_get(http, v.url, headers)
    assert status == 403 and "replayed" in text


async def test_request_for_another_validator_is_refused_with_403(
    make_validator: Any, http: Any
) -> None:
    v = await make_validator()
    headers = Miner(key("miner1")).headers(receiver=key("other-validator").ss58_address)
    status, text = await plain_get(http, v.url, headers)
    assert status == 403 and "another hotkey" in text


async def test_unregistered_hotkey_is_refused_with_403(make_validator: Any, http: Any) -> None:
    v = await make_validator()
    eve = Miner(key("eve"))
    status, text = await plain_get(http, v.url, eve.headers())
    assert (status, text.strip()) == (403, f"not registered on netuid {NETUID}")
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await eve.dial(http, v.url)
    assert refused.value.status == 403


async def test_no_snapshot_yet_is_503(make_validator: Any, http: Any) -> None:
    v = await make_validator()
    v.current[0] = None
    status, text = await plain_get(http, v.url, Miner(key("miner1")).headers())
    assert status == 503 and "snapshot" in text


async def test_session_must_prove_the_btauth_hotkey(make_validator: Any, http: Any) -> None:
    v = await make_validator()
    # Signed as miner1, but the session is run with miner2's (also registered) key.
    miner = Miner(key("miner1"))
    with pytest.raises(ChannelClosed) as refused:
        await miner.dial(http, v.url, session_signer=key("miner2"))
    assert refused.value.code == CloseCode.UNAUTHORIZED
    assert len(v.hub) == 0 and v.recorder.rosters == []


async def test_hello_must_name_the_session_hotkey(make_validator: Any, http: Any) -> None:
    v = await make_validator()
    miner = Miner(key("miner1"))
    await miner.connect(http, v.url, hello_hotkey=key("miner2").ss58_address)
    errors, closed = await miner.until_closed()
    assert [e.code for e in errors] == [wire.ErrorCode.KEY_MISMATCH]
    assert closed.code == CloseCode.UNAUTHORIZED
    assert len(v.hub) == 0


async def test_first_frame_must_be_the_hello(make_validator: Any, http: Any) -> None:
    v = await make_validator()
    miner = Miner(key("miner1"))
    await miner.dial(http, v.url)
    await miner.send(wire.WorkerRoster(workers=[]))
    errors, closed = await miner.until_closed()
    assert [e.code for e in errors] == [wire.ErrorCode.UNEXPECTED_MESSAGE]
    assert closed.code == CloseCode.PROTOCOL_ERROR
    assert v.recorder.rosters == []


# ---------------------------------------------------------------------------- sessions


async def test_roster_and_disconnect_reach_the_listener(make_validator: Any, http: Any) -> None:
    v = await make_validator()
    miner = Miner(key("miner2"))
    await miner.connect(http, v.url)
    await miner.send(wire.WorkerRoster(workers=[worker_summary(WORKER)]))
    hotkey = key("miner2").ss58_address
    await eventually(lambda: v.recorder.rosters == [(hotkey, 2, 1)])
    session = v.hub.get(hotkey)
    assert session is not None and session.roster is not None and session.uid == 2
    await miner.close()
    await eventually(lambda: v.recorder.disconnects == [hotkey])
    assert v.hub.sessions() == []


async def test_a_second_connection_replaces_the_first(make_validator: Any, http: Any) -> None:
    v = await make_validator()
    hotkey = key("miner1").ss58_address
    first, second = Miner(key("miner1")), Miner(key("miner1"))
    await first.connect(http, v.url)
    await eventually(lambda: v.hub.get(hotkey) is not None)
    old = v.hub.get(hotkey)
    await second.connect(http, v.url)
    _, closed = await first.until_closed()
    assert closed.code == CloseCode.REPLACED
    await second.send(wire.WorkerRoster(workers=[worker_summary(WORKER)]))
    await eventually(lambda: len(v.recorder.rosters) == 1)
    current = v.hub.get(hotkey)
    assert current is not None and current is not old and not current.closed
    assert v.recorder.disconnects == []  # the replaced connection is not the miner going away
    assert [s.hotkey for s in v.hub.sessions()] == [hotkey]


async def test_revoked_registration_closes_the_session(make_validator: Any, http: Any) -> None:
    v = await make_validator()
    stays, leaves = Miner(key("miner1")), Miner(key("miner2"))
    await stays.connect(http, v.url)
    await leaves.connect(http, v.url)
    await eventually(lambda: len(v.hub) == 2)
    v.register_only("miner1")
    assert await v.hub.refresh() == [key("miner2").ss58_address]
    errors, closed = await leaves.until_closed()
    assert [(e.code, e.message) for e in errors] == [
        (wire.ErrorCode.NOT_PERMITTED, f"not registered on netuid {NETUID}")
    ]
    assert closed.code == CloseCode.UNAUTHORIZED
    await eventually(lambda: v.recorder.disconnects == [key("miner2").ss58_address])
    assert [s.hotkey for s in v.hub.sessions()] == [key("miner1").ss58_address]


async def test_unsolicited_answers_are_dropped_and_floods_closed(
    make_validator: Any, http: Any
) -> None:
    v = await make_validator(messages_per_second=0.001, message_burst=5)
    miner = Miner(key("miner1"))
    await miner.connect(http, v.url)
    # A commit for a challenge nobody issued: dropped, the session lives on.
    await miner.send(
        wire.DeviceCommit(
            challenge_id=b"\x01" * 16,
            worker_id=WORKER,
            device_uuid="cpu-0",
            merkle_root=b"\x02" * 32,
            elapsed_ms=1,
        )
    )
    await miner.send(wire.WorkerRoster(workers=[worker_summary(WORKER)]))
    await eventually(lambda: len(v.recorder.rosters) == 1)
    for nonce in range(10):  # the rest of the burst, and then some
        with contextlib.suppress(ChannelClosed):
            await miner.send(wire.Pong(nonce=nonce))
    errors, closed = await miner.until_closed()
    assert [e.code for e in errors] == [wire.ErrorCode.RATE_LIMITED]
    assert closed.code == CloseCode.RATE_LIMITED


async def test_echo_error_and_disconnect_answer_waiters(make_validator: Any, http: Any) -> None:
    v = await make_validator()
    miner = Miner(key("miner1"), echo_error=wire.ErrorCode.WORKER_OFFLINE)
    await miner.connect(http, v.url)
    serving = asyncio.create_task(miner.serve())
    hotkey = key("miner1").ss58_address
    await eventually(lambda: v.hub.get(hotkey) is not None)
    session = v.hub.get(hotkey)
    assert session is not None
    with pytest.raises(MinerRequestError) as failed:
        await session.echo(WORKER, WAIT)
    assert failed.value.reason == "WORKER_OFFLINE"
    miner.echo_error = None
    assert await session.echo(WORKER, WAIT) >= 0
    await miner.close()
    await serving
    await eventually(lambda: session.closed)
    with pytest.raises(MinerRequestError) as gone:
        await session.echo(WORKER, WAIT)
    assert gone.value.reason == "disconnected"


# ---------------------------------------------------------------------------- rounds


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    db = SQLiteStore(tmp_path / "validator.db")
    db.upgrade()
    yield db
    db.close()


async def start_round_engine(
    make_validator: Any, store: SQLiteStore, settings: RoundSettings
) -> tuple[Validator, RoundEngine]:
    v = await make_validator()
    engine = RoundEngine(AsyncStore(store), v.hub, settings)
    v.hub.listener = engine
    return v, engine


async def test_a_round_over_the_wire_verifies_an_honest_miner(
    make_validator: Any, http: Any, store: SQLiteStore
) -> None:
    v, engine = await start_round_engine(make_validator, store, RoundSettings(cpu_n=N))
    miner = Miner(key("miner1"))
    await miner.connect(http, v.url)
    serving = asyncio.create_task(miner.serve())
    await miner.send(wire.WorkerRoster(workers=[worker_summary(WORKER)]))
    await eventually(lambda: store.status().online_workers == 1)

    report = await engine.run_round()
    (device,) = report.devices()
    assert (device.state, device.reason, device.n) == ("verified", "ok", N)
    assert device.flops is not None and device.flops > 0
    assert device.rtt_s is not None and device.measured_s is not None
    assert device.elapsed_s == max(device.measured_s - device.rtt_s, device.measured_s / 2)
    assert set(store.challenge_states(report.round_id).values()) == {ChallengeState.VERIFIED}
    await eventually(lambda: any(isinstance(f.msg, wire.ReleaseBatch) for f in miner.frames))
    await miner.close()
    await serving
    await eventually(lambda: store.status().online_workers == 0)


async def test_a_miner_vanishing_mid_round_expires_without_waiting_for_the_deadline(
    make_validator: Any, http: Any, store: SQLiteStore
) -> None:
    # Deadlines far beyond the test's own timeout: only the disconnect can end the round.
    settings = RoundSettings(cpu_n=N, commit_deadline_s=3600, reveal_deadline_s=3600)
    v, engine = await start_round_engine(make_validator, store, settings)
    miner = Miner(key("miner1"), vanish_on_batch=True)
    await miner.connect(http, v.url)
    serving = asyncio.create_task(miner.serve())
    await miner.send(wire.WorkerRoster(workers=[worker_summary(WORKER)]))
    await eventually(lambda: store.status().online_workers == 1)

    async with asyncio.timeout(WAIT * 3):
        report = await engine.run_round()
    await serving
    (device,) = report.devices()
    assert (device.state, device.reason) == ("expired", "no_commit")
    assert set(store.challenge_states(report.round_id).values()) == {ChallengeState.EXPIRED}
