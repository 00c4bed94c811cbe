"""WorkerConnections/WorkerLink without sockets: correlation, refusals, late answers."""

from __future__ import annotations

import asyncio

import pytest

from byteleap.core import wire
from byteleap.core.channel import ChannelClosed
from byteleap.miner.relay import (
    CPU_DEVICE_UUID,
    RelayError,
    WorkerConnections,
    WorkerLink,
    inventory_devices,
)

from .builders import challenge_request, inventory

WID = "ab" * 16


class FakeChannel:
    def __init__(self) -> None:
        self.sent: asyncio.Queue[wire.Frame] = asyncio.Queue()
        self.broken = False

    async def send(self, msg: wire.Message, *, id: int = 0) -> None:
        if self.broken:
            raise ChannelClosed(1006, "gone", by_peer=True)
        await self.sent.put(wire.Frame(msg=msg, id=id))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.broken = True


def _setup(**kwargs: object) -> tuple[WorkerConnections, WorkerLink, FakeChannel]:
    connections = WorkerConnections(**kwargs)  # type: ignore[arg-type]
    channel = FakeChannel()
    link = WorkerLink(WID, channel, inventory("GPU-1"))
    assert connections.attach(link) is None
    return connections, link, channel


def _commit(request: wire.ChallengeRequest) -> wire.ChallengeCommit:
    return wire.ChallengeCommit(
        challenge_id=request.challenge_id,
        device_uuid=request.device_uuid,
        merkle_root=b"\1" * 32,
        elapsed_ms=5,
    )


def test_inventory_devices() -> None:
    assert inventory_devices(None) == {CPU_DEVICE_UUID}
    assert inventory_devices(inventory("GPU-1", "GPU-2")) == {CPU_DEVICE_UUID, "GPU-1", "GPU-2"}


async def test_answer_is_matched_by_frame_id() -> None:
    connections, link, channel = _setup()
    request = challenge_request()
    task = asyncio.create_task(connections.challenge(WID, request, timeout=5))
    sent = await channel.sent.get()
    assert sent.id > 0 and sent.msg == request
    assert not link.deliver(wire.Frame(msg=_commit(request), id=sent.id + 1))  # not ours
    assert link.deliver(wire.Frame(msg=_commit(request), id=sent.id))
    assert (await task).merkle_root == b"\1" * 32
    assert link.busy_devices == frozenset() and link.pending == 0


async def test_error_matched_by_ref_and_wrong_answers() -> None:
    connections, link, channel = _setup()
    task = asyncio.create_task(connections.challenge(WID, challenge_request(), timeout=5))
    sent = await channel.sent.get()
    error = wire.Error(code=wire.ErrorCode.CHALLENGE_INVALID, message="n too big", ref=sent.id)
    assert link.deliver(wire.Frame(msg=error, id=0))
    with pytest.raises(RelayError) as info:
        await task
    assert info.value.code is wire.ErrorCode.CHALLENGE_INVALID and "n too big" in info.value.message

    request = challenge_request()
    task = asyncio.create_task(connections.challenge(WID, request, timeout=5))
    sent = await channel.sent.get()
    assert link.deliver(wire.Frame(msg=wire.Pong(nonce=1), id=sent.id))
    with pytest.raises(RelayError) as wrong:
        await task
    assert wrong.value.code is wire.ErrorCode.UNEXPECTED_MESSAGE

    task = asyncio.create_task(connections.challenge(WID, request, timeout=5))
    sent = await channel.sent.get()
    other = wire.ChallengeCommit(
        challenge_id=b"\0" * 16, device_uuid="cpu-0", merkle_root=b"\1" * 32, elapsed_ms=1
    )
    link.deliver(wire.Frame(msg=other, id=sent.id))
    with pytest.raises(RelayError) as mismatch:
        await task
    assert mismatch.value.code is wire.ErrorCode.CHALLENGE_INVALID


async def test_pong_matched_by_nonce_when_the_id_is_missing() -> None:
    connections, link, channel = _setup()
    task = asyncio.create_task(connections.echo(WID, timeout=5))
    sent = await channel.sent.get()
    assert isinstance(sent.msg, wire.Ping) and sent.msg.nonce == sent.id
    assert link.deliver(wire.Frame(msg=wire.Pong(nonce=sent.msg.nonce), id=0))
    assert await task >= 0


async def test_late_answer_frees_the_device_and_grace_expiry_too() -> None:
    outcomes: list[bool] = []
    connections, link, channel = _setup(
        late_grace_s=0.2, on_outcome=lambda wid, ok: outcomes.append(ok)
    )
    request = challenge_request("GPU-1")
    with pytest.raises(RelayError) as info:
        await connections.challenge(WID, request, timeout=0.05)
    assert info.value.code is wire.ErrorCode.CHALLENGE_EXPIRED
    assert outcomes == [False]
    assert link.busy_devices == {"GPU-1"}
    sent = await channel.sent.get()
    assert link.deliver(wire.Frame(msg=_commit(request), id=sent.id))  # late, dropped quietly
    assert link.busy_devices == frozenset()

    with pytest.raises(RelayError):
        await connections.challenge(WID, challenge_request("GPU-1"), timeout=0.05)
    assert link.busy_devices == {"GPU-1"}
    await asyncio.sleep(0.3)  # no answer at all: the grace period frees it
    assert link.busy_devices == frozenset()


def _heartbeat(*leased: str) -> wire.Heartbeat:
    return wire.Heartbeat(uptime_s=1.0, load1=0.1, mem_used_bytes=1, leased_devices=list(leased))


async def test_a_gpu_the_heartbeat_says_is_leased_is_never_challenged() -> None:
    connections, link, channel = _setup()
    assert link.leased_devices == frozenset()
    # Only what the inventory lists counts: not the CPU, not another worker's or a made-up GPU.
    link.record_heartbeat(_heartbeat("GPU-1", CPU_DEVICE_UUID, "GPU-other"))
    assert link.leased_devices == {"GPU-1"}
    with pytest.raises(RelayError) as info:
        await connections.challenge(WID, challenge_request("GPU-1"), timeout=1)
    assert info.value.code is wire.ErrorCode.DEVICE_LEASED
    assert channel.sent.empty()
    # The lease ended: the next heartbeat lists nothing and the GPU is challenged again.
    link.record_heartbeat(_heartbeat())
    request = challenge_request("GPU-1")
    task = asyncio.create_task(connections.challenge(WID, request, timeout=5))
    sent = await channel.sent.get()
    assert link.deliver(wire.Frame(msg=_commit(request), id=sent.id))
    await task
    # An inventory that no longer lists the GPU drops it from the leased set.
    link.record_heartbeat(_heartbeat("GPU-1"))
    link.inventory = inventory("GPU-2")
    assert link.leased_devices == frozenset()
    assert not connections.leased_by_heartbeat("cd" * 16, "GPU-1")  # no such worker


async def test_refusals_and_disconnect() -> None:
    connections, link, channel = _setup(is_leased=lambda wid, dev: dev == "GPU-1")
    for device, code in (
        ("GPU-1", wire.ErrorCode.DEVICE_LEASED),
        ("GPU-9", wire.ErrorCode.DEVICE_UNKNOWN),
    ):
        with pytest.raises(RelayError) as info:
            await connections.challenge(WID, challenge_request(device), timeout=1)
        assert info.value.code is code
    assert channel.sent.empty()

    task = asyncio.create_task(connections.challenge(WID, challenge_request(), timeout=5))
    await channel.sent.get()
    with pytest.raises(RelayError) as busy:
        await connections.challenge(WID, challenge_request(), timeout=1)
    assert busy.value.code is wire.ErrorCode.DEVICE_BUSY

    assert connections.detach(link)
    with pytest.raises(RelayError) as gone:
        await task
    assert gone.value.code is wire.ErrorCode.WORKER_OFFLINE
    assert WID not in connections and not connections.detach(link)
    with pytest.raises(RelayError) as offline:
        await connections.challenge(WID, challenge_request(), timeout=1)
    assert offline.value.code is wire.ErrorCode.WORKER_OFFLINE


async def test_replacement_fails_the_old_links_requests() -> None:
    connections, old, channel = _setup()
    task = asyncio.create_task(connections.echo(WID, timeout=5))
    await channel.sent.get()
    new = WorkerLink(WID, FakeChannel(), inventory())
    assert connections.attach(new) is old
    with pytest.raises(RelayError) as info:
        await task
    assert info.value.code is wire.ErrorCode.WORKER_OFFLINE
    assert not connections.detach(old)  # the old handler's cleanup leaves the new link alone
    assert connections.get(WID) is new


async def test_send_failure_is_worker_offline() -> None:
    connections, _link, channel = _setup()
    channel.broken = True
    with pytest.raises(RelayError) as info:
        await connections.challenge(WID, challenge_request(), timeout=1)
    assert info.value.code is wire.ErrorCode.WORKER_OFFLINE
    assert connections.busy_devices(WID) == frozenset()


async def test_disconnect_frees_devices_held_for_late_answers() -> None:
    connections, link, channel = _setup(late_grace_s=60.0)
    request = challenge_request("GPU-1")
    with pytest.raises(RelayError) as info:
        await connections.challenge(WID, request, timeout=0.05)
    assert link.busy_devices == {"GPU-1"}
    assert connections.detach(link)
    assert link.busy_devices == frozenset()  # the grace timer is cancelled, nothing is held
    sent = await channel.sent.get()
    assert not link.deliver(wire.Frame(msg=_commit(request), id=sent.id))
    # A relay refusal reports itself to a peer like every other coded error.
    assert isinstance(info.value, wire.CodedError)
    error = info.value.to_error(ref=sent.id)
    assert (error.code, error.ref) == (wire.ErrorCode.CHALLENGE_EXPIRED, sent.id)
