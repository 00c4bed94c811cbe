"""The miner's worker endpoint over real sockets: admission, abuse, presence, replacement."""

from __future__ import annotations

import asyncio
import contextlib
import os

import aiohttp
import pytest
from aiohttp import WSMsgType

from byteleap.core import wire
from byteleap.core.channel import ChannelClosed, CloseCode
from byteleap.core.identity import WorkerKey

from .conftest import WAIT, FakeWorker, MakeMiner, eventually, inventory


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
    assert record.inventory == inventory(("GPU-aaaa",))
    assert worker.worker_id in miner.connections
    assert miner.connections.devices(worker.worker_id) == {"cpu-0", "GPU-aaaa"}
    assert miner.server.status_line() == "1 worker online, 1/100 enrolled"

    # Heartbeats and inventory updates reach the registry.
    assert worker.channel is not None
    await worker.channel.send(wire.Heartbeat(uptime_s=5.0, load1=0.5, mem_used_bytes=1))
    await worker.channel.send(wire.InventoryUpdate(inventory=inventory(("GPU-aaaa", "GPU-bbbb"))))
    await eventually(lambda: "GPU-bbbb" in miner.connections.devices(worker.worker_id))
    record = miner.registry.get(worker.worker_id)
    assert record is not None and record.inventory == inventory(("GPU-aaaa", "GPU-bbbb"))

    await worker.close()
    await eventually(lambda: worker.worker_id not in miner.connections)
    record = miner.registry.get(worker.worker_id)
    assert record is not None and not record.online


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
    with pytest.raises(ChannelClosed):
        await worker.connect(http, miner.url)
    assert worker.closed is not None
    assert worker.closed.code == CloseCode.UNAUTHORIZED and worker.closed.by_peer
    errors = [f.msg for f in worker.received if isinstance(f.msg, wire.Error)]
    assert [e.code for e in errors] == [wire.ErrorCode.AUTH_FAILED]
    assert miner.registry.count() == 0
    assert len(miner.connections) == 0


async def test_register_for_another_worker_id_is_refused(
    make_miner: MakeMiner, http: aiohttp.ClientSession
) -> None:
    miner = await make_miner()
    worker = FakeWorker()
    with pytest.raises(ChannelClosed):
        await worker.connect(http, miner.url, worker_id="0" * 32)
    assert worker.closed is not None and worker.closed.code == CloseCode.UNAUTHORIZED
    errors = [f.msg for f in worker.received if isinstance(f.msg, wire.Error)]
    assert [e.code for e in errors] == [wire.ErrorCode.KEY_MISMATCH]
    assert miner.registry.count() == 0


async def test_register_before_enroll_proof_is_refused(
    make_miner: MakeMiner, http: aiohttp.ClientSession
) -> None:
    miner = await make_miner()
    worker = FakeWorker()
    channel = await worker.dial(http, miner.url)
    await channel.send(
        wire.Register(worker_id=worker.worker_id, agent_version="1", inventory=inventory())
    )
    error, closed = await worker.refusal()
    assert error is not None and error.code == wire.ErrorCode.UNEXPECTED_MESSAGE
    assert closed.code == CloseCode.PROTOCOL_ERROR
    assert miner.registry.count() == 0


async def test_capacity_refuses_new_workers_with_a_reason(
    make_miner: MakeMiner, http: aiohttp.ClientSession
) -> None:
    miner = await make_miner(max_workers=2)
    first, second = FakeWorker(), FakeWorker()
    await first.connect(http, miner.url)
    await second.connect(http, miner.url)

    third = FakeWorker()
    with pytest.raises(ChannelClosed):
        await third.connect(http, miner.url)
    assert third.closed is not None and third.closed.code == CloseCode.CAPACITY_REACHED
    errors = [f.msg for f in third.received if isinstance(f.msg, wire.Error)]
    assert [e.code for e in errors] == [wire.ErrorCode.CAPACITY_REACHED]
    assert "maximum 2" in errors[0].message
    assert "workers remove" in errors[0].message
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
        miner.registry.enroll(WorkerKey.generate().identity.public_key, "1")
    late = FakeWorker()
    with pytest.raises(ChannelClosed):
        await late.connect(http, miner.url)
    assert late.closed is not None and late.closed.code == CloseCode.CAPACITY_REACHED
    (error,) = [f.msg for f in late.received if isinstance(f.msg, wire.Error)]
    assert error.code == wire.ErrorCode.CAPACITY_REACHED
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
    await worker.channel.send(wire.Heartbeat(uptime_s=1.0, load1=0.0, mem_used_bytes=0))
    await original(sent[-1])  # the same sealed frame again
    _, closed = await worker.refusal()
    assert closed.code == CloseCode.BAD_FRAME
    await eventually(lambda: worker.worker_id not in miner.connections)
    record = miner.registry.get(worker.worker_id)
    assert record is not None and not record.online
    assert miner.registry.count() == 1


async def test_rate_limit_closes_a_flooding_worker(
    make_miner: MakeMiner, http: aiohttp.ClientSession
) -> None:
    miner = await make_miner(messages_per_second=1.0, message_burst=5)
    worker = FakeWorker()
    await worker.connect(http, miner.url)
    assert worker.channel is not None
    with contextlib.suppress(ChannelClosed):
        for _ in range(20):
            await worker.channel.send(wire.Heartbeat(uptime_s=1.0, load1=0.0, mem_used_bytes=0))
    error, closed = await worker.refusal()
    assert closed.code == CloseCode.RATE_LIMITED
    assert error is not None and error.code == wire.ErrorCode.RATE_LIMITED
    await eventually(lambda: worker.worker_id not in miner.connections)


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
    miner = await make_miner(heartbeat_interval_s=0.1, heartbeat_timeout_s=0.6)
    silent, alive = FakeWorker(), FakeWorker()
    await silent.connect(http, miner.url)
    await alive.connect(http, miner.url)
    beating = asyncio.create_task(alive.heartbeat(0.1))
    try:
        _, closed = await silent.refusal()
        assert closed.code == CloseCode.GOING_AWAY and "heartbeat" in closed.reason
        await eventually(lambda: silent.worker_id not in miner.connections)
        silent_record = miner.registry.get(silent.worker_id)
        assert silent_record is not None and not silent_record.online
        await asyncio.sleep(0.7)  # longer than the timeout: the heartbeating worker stays
        alive_record = miner.registry.get(alive.worker_id)
        assert alive_record is not None and alive_record.online
        assert alive.worker_id in miner.connections
    finally:
        beating.cancel()
        await asyncio.gather(beating, return_exceptions=True)


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
    record = miner.registry.get(old.worker_id)
    assert record is not None and record.online
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
    record = miner.registry.get(worker.worker_id)
    assert record is not None and not record.online
