"""The miner's worker endpoint over real sockets: admission, abuse, presence, replacement."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable

import aiohttp
import pytest
from aiohttp import WSMsgType

from byteleap.core import wire
from byteleap.core.channel import ChannelClosed, CloseCode
from byteleap.core.identity import WorkerKey, worker_id_of
from byteleap.core.session import FRAME_OVERHEAD
from byteleap.miner.registry import WorkerRegistry
from tests.support.fixtures import WAIT, eventually
from tests.unit.miner.builders import inventory

from .conftest import FakeWorker, MakeMiner

HEARTBEAT = wire.Heartbeat(uptime_s=1.0, load1=0.0, mem_used_bytes=0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


async def refused(
    worker: FakeWorker,
    close: CloseCode,
    error: wire.ErrorCode,
    connecting: Awaitable[object] | None = None,
) -> wire.Error:
    """The miner refuses ``worker``: exactly one Error ``error``, then it closes with ``close``.

    ``connecting`` is the ``connect()`` that must fail; without it, read until the close.
    """
    if connecting is None:
        await worker.refusal()
    else:
        with pytest.raises(ChannelClosed):
            await connecting
    assert worker.closed is not None and worker.closed.by_peer
    assert worker.closed.code == close, worker.closed
    assert [e.code for e in worker.errors] == [error], worker.errors
    return worker.errors[0]


def online(registry: WorkerRegistry, worker_id: str) -> bool:
    record = registry.get(worker_id)
    assert record is not None, worker_id
    return record.online


async def test_enroll_register_and_ack(make_miner: MakeMiner, http: aiohttp.ClientSession) -> None:
    miner = await make_miner(heartbeat_interval_s=7.0)
    worker = FakeWorker(gpus=("GPU-aaaa",))
    ack = await worker.connect(http, miner.url)

    assert ack.worker_id == worker.worker_id
    assert ack.heartbeat_interval_s == 7.0
    record = miner.registry.get(worker.worker_id)
    assert record is not None and record.online
    assert record.public_key == worker.key.public_key
    assert record.agent_version == "0.1.0-test"
    assert record.inventory == inventory("GPU-aaaa")
    assert worker.worker_id in miner.connections
    assert miner.connections.devices(worker.worker_id) == {"cpu-0", "GPU-aaaa"}
    assert miner.server.status_line() == "1 worker online, 1/100 enrolled"

    # Heartbeats and inventory updates reach the registry.
    assert worker.channel is not None
    await worker.channel.send(wire.Heartbeat(uptime_s=5.0, load1=0.5, mem_used_bytes=1))
    await worker.channel.send(wire.InventoryUpdate(inventory=inventory("GPU-aaaa", "GPU-bbbb")))
    await eventually(lambda: "GPU-bbbb" in miner.connections.devices(worker.worker_id))
    record = miner.registry.get(worker.worker_id)
    assert record is not None and record.inventory == inventory("GPU-aaaa", "GPU-bbbb")

    await worker.close()
    await eventually(lambda: worker.worker_id not in miner.connections)
    assert not online(miner.registry, worker.worker_id)


async def test_pinned_worker_needs_no_valid_proof(
    make_miner: MakeMiner, http: aiohttp.ClientSession
) -> None:
    """A rotated secret does not lock out an enrolled worker: its pinned key is enough."""
    miner = await make_miner()
    worker = FakeWorker()
    await worker.connect(http, miner.url)
    await worker.close()
    await eventually(lambda: worker.worker_id not in miner.connections)

    again = FakeWorker(key=worker.key, secret=b"rotated-secret-rotated-secret!!")
    await again.connect(http, miner.url)
    assert worker.worker_id in miner.connections
    assert miner.registry.count() == 1


async def test_wrong_secret_is_refused_and_stores_nothing(
    make_miner: MakeMiner, http: aiohttp.ClientSession
) -> None:
    miner = await make_miner()
    worker = FakeWorker(secret=b"not-the-enrollment-secret-at-all")
    await refused(
        worker,
        CloseCode.UNAUTHORIZED,
        wire.ErrorCode.AUTH_FAILED,
        worker.connect(http, miner.url),
    )
    assert miner.registry.count() == 0
    assert len(miner.connections) == 0


async def test_register_for_another_worker_id_is_refused(
    make_miner: MakeMiner, http: aiohttp.ClientSession
) -> None:
    miner = await make_miner()
    worker = FakeWorker()
    await refused(
        worker,
        CloseCode.UNAUTHORIZED,
        wire.ErrorCode.KEY_MISMATCH,
        worker.connect(http, miner.url, worker_id="0" * 32),
    )
    assert miner.registry.count() == 0


async def test_refused_pinned_worker_is_not_marked_online(
    make_miner: MakeMiner, http: aiohttp.ClientSession
) -> None:
    """A pinned key whose Register is refused changes nothing: no row online, no live link lost."""
    miner = await make_miner()
    first = FakeWorker()
    await first.connect(http, miner.url)
    link = miner.connections.get(first.worker_id)

    # While its genuine connection is live: the refused one does not replace it.
    while_live = FakeWorker(key=first.key)
    await refused(
        while_live,
        CloseCode.UNAUTHORIZED,
        wire.ErrorCode.KEY_MISMATCH,
        while_live.connect(http, miner.url, worker_id="0" * 32),
    )
    assert link is not None and not link.closed
    assert miner.connections.get(first.worker_id) is link
    assert online(miner.registry, first.worker_id)

    # Offline: the refused connection does not mark it online.
    await first.close()
    await eventually(lambda: first.worker_id not in miner.connections)
    assert not online(miner.registry, first.worker_id)
    later = FakeWorker(key=first.key)
    await refused(
        later,
        CloseCode.UNAUTHORIZED,
        wire.ErrorCode.KEY_MISMATCH,
        later.connect(http, miner.url, worker_id="0" * 32),
    )
    assert not online(miner.registry, first.worker_id)
    assert first.worker_id not in miner.connections
    assert miner.registry.count() == 1


async def test_register_before_enroll_proof_is_refused(
    make_miner: MakeMiner, http: aiohttp.ClientSession
) -> None:
    miner = await make_miner()
    worker = FakeWorker()
    channel = await worker.dial(http, miner.url)
    await channel.send(
        wire.Register(worker_id=worker.worker_id, agent_version="1", inventory=inventory())
    )
    await refused(worker, CloseCode.PROTOCOL_ERROR, wire.ErrorCode.UNEXPECTED_MESSAGE)
    assert miner.registry.count() == 0


async def test_capacity_refuses_new_workers_with_a_reason(
    make_miner: MakeMiner, http: aiohttp.ClientSession
) -> None:
    miner = await make_miner(max_workers=2)
    first, second = FakeWorker(), FakeWorker()
    await first.connect(http, miner.url)
    await second.connect(http, miner.url)

    third = FakeWorker()
    error = await refused(
        third,
        CloseCode.CAPACITY_REACHED,
        wire.ErrorCode.CAPACITY_REACHED,
        third.connect(http, miner.url),
    )
    assert "maximum 2" in error.message
    assert "workers remove" in error.message
    assert miner.registry.count() == 2
    assert miner.registry.get(third.worker_id) is None

    # An enrolled worker still comes back when the miner is full.
    await first.close()
    await eventually(lambda: first.worker_id not in miner.connections)
    back = FakeWorker(key=first.key)
    await back.connect(http, miner.url)
    assert first.worker_id in miner.connections


async def test_the_101st_worker_is_refused_at_the_default_limit(
    make_miner: MakeMiner, http: aiohttp.ClientSession
) -> None:
    miner = await make_miner()
    assert miner.config.policy.max_workers == 100
    for _ in range(100):  # 100 workers enrolled earlier (the registry is what counts)
        key = WorkerKey.generate().identity.public_key
        miner.registry.register(key, "1", inventory(), enroll=True)
    miner.registry.mark_all_offline()
    late = FakeWorker()
    error = await refused(
        late,
        CloseCode.CAPACITY_REACHED,
        wire.ErrorCode.CAPACITY_REACHED,
        late.connect(http, miner.url),
    )
    assert "maximum 100" in error.message
    assert miner.registry.count() == 100 and miner.registry.get(late.worker_id) is None


async def _raw_ws(channel: object) -> aiohttp.ClientWebSocketResponse:
    ws = channel._ws  # type: ignore[attr-defined]  # the attacker bypasses the channel
    assert isinstance(ws, aiohttp.ClientWebSocketResponse)
    return ws


@pytest.mark.parametrize(
    ("attack", "code"),
    [
        ("garbage", CloseCode.BAD_FRAME),
        ("oversize", CloseCode.FRAME_TOO_LARGE),
        ("text", CloseCode.PROTOCOL_ERROR),
    ],
)
async def test_abuse_before_enrollment_closes_and_stores_nothing(
    make_miner: MakeMiner, http: aiohttp.ClientSession, attack: str, code: CloseCode
) -> None:
    miner = await make_miner()
    worker = FakeWorker()
    channel = await worker.dial(http, miner.url)
    ws = await _raw_ws(channel)
    if attack == "garbage":
        await ws.send_bytes(os.urandom(200))
    elif attack == "oversize":
        with contextlib.suppress(ConnectionError, aiohttp.ClientError):  # the miner may cut it
            await ws.send_bytes(b"\0" * (10 * 1024 * 1024))
    else:
        await ws.send_str("hello")
    _, closed = await worker.refusal()
    assert closed.code == code
    assert miner.registry.count() == 0
    await eventually(lambda: miner.server.connection_count == 0)


@pytest.mark.parametrize(
    ("excess", "code"),
    [
        (1, CloseCode.FRAME_TOO_LARGE),
        (0, CloseCode.BAD_FRAME),  # exactly at the limit: read, then fails authentication
    ],
)
async def test_frame_size_limit_after_registration(
    make_miner: MakeMiner, http: aiohttp.ClientSession, excess: int, code: CloseCode
) -> None:
    """The largest legal worker frame plus the session overhead is the limit, to the byte; the
    worker that breaks it is closed and offline, its registry record intact."""
    miner = await make_miner()
    worker = FakeWorker(gpus=("GPU-aaaa",))
    await worker.connect(http, miner.url)
    limit = wire.max_frame_bytes(wire.Link.WORKER_MINER, wire.Direction.UP) + FRAME_OVERHEAD
    ws = await _raw_ws(worker.channel)
    with contextlib.suppress(ConnectionError, aiohttp.ClientError):  # the miner may cut it
        await ws.send_bytes(b"\0" * (limit + excess))
    _, closed = await worker.refusal()
    assert closed.code == code
    await eventually(lambda: worker.worker_id not in miner.connections)
    record = miner.registry.get(worker.worker_id)
    assert record is not None and not record.online
    assert record.public_key == worker.key.public_key
    assert record.inventory == inventory("GPU-aaaa")
    assert miner.registry.count() == 1


async def test_replayed_frame_closes_the_connection(
    make_miner: MakeMiner, http: aiohttp.ClientSession
) -> None:
    miner = await make_miner()
    worker = FakeWorker()
    await worker.connect(http, miner.url)
    ws = await _raw_ws(worker.channel)
    sent: list[bytes] = []
    original = ws.send_bytes

    async def recording(data: bytes, *args: object, **kwargs: object) -> None:
        sent.append(bytes(data))
        await original(data, *args, **kwargs)  # type: ignore[arg-type]

    ws.send_bytes = recording  # type: ignore[method-assign]
    assert worker.channel is not None
    await worker.channel.send(HEARTBEAT)
    await original(sent[-1])  # the same sealed frame again
    _, closed = await worker.refusal()
    assert closed.code == CloseCode.BAD_FRAME
    await eventually(lambda: worker.worker_id not in miner.connections)
    assert not online(miner.registry, worker.worker_id)
    assert miner.registry.count() == 1


async def test_rate_limit_closes_a_flooding_worker_only(
    make_miner: MakeMiner, http: aiohttp.ClientSession
) -> None:
    """The limit is per connection: a second worker is untouched by the first one's flood."""
    miner = await make_miner(messages_per_second=1.0, message_burst=5)
    flooder, bystander = FakeWorker(), FakeWorker()
    await flooder.connect(http, miner.url)
    await bystander.connect(http, miner.url)  # EnrollProof + Register: 2 of its 5 tokens
    assert flooder.channel is not None and bystander.channel is not None
    with contextlib.suppress(ChannelClosed):
        for _ in range(20):
            await flooder.channel.send(HEARTBEAT)
    await refused(flooder, CloseCode.RATE_LIMITED, wire.ErrorCode.RATE_LIMITED)
    await eventually(lambda: flooder.worker_id not in miner.connections)

    link = miner.connections.get(bystander.worker_id)
    assert link is not None and link.heartbeat is None
    for _ in range(2):  # within its own burst, whatever the flooder spent
        await bystander.channel.send(HEARTBEAT)
    await eventually(lambda: link.heartbeat is not None)
    assert miner.connections.get(bystander.worker_id) is link and not link.closed
    assert bystander.closed is None and online(miner.registry, bystander.worker_id)


async def test_connection_flood_is_capped_and_leaves_nothing(
    make_miner: MakeMiner, http: aiohttp.ClientSession
) -> None:
    """200 sockets that never handshake: beyond the cap refused at once, the rest timed out."""
    miner = await make_miner(max_connections=20, handshake_timeout_s=1.5)

    async def idle_client() -> int:
        ws = await http.ws_connect(miner.url, timeout=aiohttp.ClientWSTimeout(ws_close=2.0))
        async with asyncio.timeout(WAIT):
            msg = await ws.receive()
        assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)
        await ws.close()
        return int(ws.close_code or 0)

    codes = await asyncio.gather(*(idle_client() for _ in range(200)))
    assert set(codes) <= {CloseCode.CAPACITY_REACHED, CloseCode.HANDSHAKE_FAILED}
    assert codes.count(CloseCode.CAPACITY_REACHED) >= 100
    assert codes.count(CloseCode.HANDSHAKE_FAILED) >= 1
    assert miner.registry.count() == 0
    await eventually(lambda: miner.server.connection_count == 0)

    # The miner still serves real workers afterwards.
    worker = FakeWorker()
    await worker.connect(http, miner.url)
    assert worker.worker_id in miner.connections


async def test_missed_heartbeats_mark_the_worker_offline(
    make_miner: MakeMiner, http: aiohttp.ClientSession
) -> None:
    """Deterministic: a fake clock and explicit sweeps (the sweeper task never wakes up)."""
    clock = FakeClock()
    miner = await make_miner(clock=clock, sweep_interval_s=3600.0, heartbeat_timeout_s=90.0)
    silent, alive = FakeWorker(), FakeWorker()
    await silent.connect(http, miner.url)
    await alive.connect(http, miner.url)
    alive_link = miner.connections.get(alive.worker_id)
    assert alive_link is not None and alive.channel is not None

    clock.now += 60
    assert miner.server.sweep() == []
    await alive.channel.send(HEARTBEAT)
    await eventually(lambda: alive_link.heartbeat is not None)
    clock.now += 31  # silent for 91 s > 90 s; the other heard from 31 s ago
    assert miner.server.sweep() == [silent.worker_id]

    _, closed = await silent.refusal()
    assert closed.code == CloseCode.GOING_AWAY and "heartbeat" in closed.reason
    assert silent.worker_id not in miner.connections
    assert not online(miner.registry, silent.worker_id)
    assert miner.connections.get(alive.worker_id) is alive_link
    assert online(miner.registry, alive.worker_id)
    assert miner.server.sweep() == []


async def test_sweep_marks_offline_a_row_left_online_without_a_connection(
    make_miner: MakeMiner, http: aiohttp.ClientSession
) -> None:
    """The backstop for a mark_offline that failed: the next sweep repairs the row."""
    miner = await make_miner(sweep_interval_s=3600.0)
    worker = FakeWorker()
    await worker.connect(http, miner.url)
    stray = WorkerKey.generate().identity.public_key
    miner.registry.register(stray, "1", inventory(), enroll=True)  # online, never connected
    stray_id = worker_id_of(stray)
    assert miner.server.sweep() == [stray_id]
    assert not online(miner.registry, stray_id)
    assert online(miner.registry, worker.worker_id) and worker.worker_id in miner.connections
    assert miner.server.sweep() == []


async def test_the_sweeper_task_closes_silent_workers(
    make_miner: MakeMiner, http: aiohttp.ClientSession
) -> None:
    clock = FakeClock()
    miner = await make_miner(clock=clock, sweep_interval_s=0.02, heartbeat_timeout_s=90.0)
    worker = FakeWorker()
    await worker.connect(http, miner.url)
    assert worker.worker_id in miner.connections
    clock.now += 91
    _, closed = await worker.refusal()
    assert closed.code == CloseCode.GOING_AWAY and "heartbeat" in closed.reason
    await eventually(lambda: not online(miner.registry, worker.worker_id))


async def test_heartbeats_write_last_seen_at_most_once_a_minute(
    make_miner: MakeMiner, http: aiohttp.ClientSession
) -> None:
    clock = FakeClock()
    miner = await make_miner(clock=clock, sweep_interval_s=3600.0)
    worker = FakeWorker()
    await worker.connect(http, miner.url)
    registered = clock.now
    link = miner.connections.get(worker.worker_id)
    assert link is not None and worker.channel is not None

    def last_seen() -> float | None:
        record = miner.registry.get(worker.worker_id)
        assert record is not None
        return record.last_seen

    assert last_seen() == registered
    clock.now += 30
    await worker.channel.send(HEARTBEAT)
    await eventually(lambda: link.heartbeat is not None)
    assert link.last_heartbeat == clock.now
    assert last_seen() == registered  # memory only within the interval
    clock.now += 31
    await worker.channel.send(HEARTBEAT)
    await eventually(lambda: last_seen() == clock.now)


async def test_reconnect_replaces_the_old_connection(
    make_miner: MakeMiner, http: aiohttp.ClientSession
) -> None:
    miner = await make_miner()
    old = FakeWorker()
    await old.connect(http, miner.url)
    old_link = miner.connections.get(old.worker_id)
    old_serving = asyncio.create_task(old.serve())

    new = FakeWorker(key=old.key)
    await new.connect(http, miner.url)
    async with asyncio.timeout(WAIT):
        await old_serving
    assert old.closed is not None and old.closed.code == CloseCode.REPLACED
    assert old_link is not None and old_link.closed
    new_link = miner.connections.get(old.worker_id)
    assert new_link is not None and new_link is not old_link
    await asyncio.sleep(0.1)  # the old handler's cleanup must not mark the worker offline
    assert online(miner.registry, old.worker_id)
    assert len(miner.connections) == 1 and miner.registry.count() == 1


async def test_stop_tells_workers_and_marks_them_offline(
    make_miner: MakeMiner, http: aiohttp.ClientSession
) -> None:
    miner = await make_miner()
    worker = FakeWorker()
    await worker.connect(http, miner.url)
    serving = asyncio.create_task(worker.serve())
    await miner.server.stop()
    async with asyncio.timeout(WAIT):
        await serving
    assert worker.closed is not None and worker.closed.code == CloseCode.GOING_AWAY
    assert not online(miner.registry, worker.worker_id)
