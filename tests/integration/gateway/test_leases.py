"""Renters rent GPUs through the API; a scripted worker answers over mTLS."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from byteleap.core import gateway_protocol as p

from .conftest import SSH_KEY, Gw
from .worker_double import FakeWorker, WorkerConnection, gpu


async def _started(gw: Gw, conn: WorkerConnection, gpus: int = 1) -> Any:
    status, lease = await gw.lease(gpus=gpus)
    assert status == 201, lease
    start = await conn.expect(p.StartLease)
    assert start.lease_id == lease["lease_id"]
    await conn.send(
        p.LeaseStarted(
            lease_id=start.lease_id, ssh_host="203.0.113.7", ssh_port=22022, ssh_user="ubuntu"
        )
    )
    await _wait_state(gw, start.lease_id, "running")
    return lease


async def _wait_state(gw: Gw, lease_id: str, state: str) -> Any:
    for _ in range(200):
        status, view = await gw.call("GET", f"/v1/leases/{lease_id}", gw.renters["alice"])
        assert status == 200, view
        if view["state"] == state:
            return view
        await asyncio.sleep(0.01)
    raise AssertionError(f"lease {lease_id} never became {state}: {view}")


async def test_a_renter_creates_lists_extends_and_terminates_a_lease(gw: Gw) -> None:
    worker, conn = await gw.online(gpus=[gpu(0), gpu(1), gpu(2, "busy")])
    status, gpus = await gw.call("GET", "/v1/gpus", gw.renters["alice"])
    assert status == 200
    assert gpus["workers"][0]["worker_id"] == worker.worker_id
    assert gpus["workers"][0]["idle"] == 2

    status, lease = await gw.lease(gpus=2, duration_s=7200)
    assert status == 201, lease
    assert lease["state"] == "starting" and lease["worker_id"] == worker.worker_id
    assert lease["ends_at"] == pytest.approx(gw.clock() + 7200)
    start = await conn.expect(p.StartLease)
    assert start.device_uuids == [gpu(0).uuid, gpu(1).uuid]
    assert start.ssh_public_key == SSH_KEY
    assert (start.vcpus, start.memory_mib, start.disk_gib) == (16, 2 * 65536, 400)
    assert start.ends_at == lease["ends_at"]

    status, gpus = await gw.call("GET", "/v1/gpus", gw.renters["alice"])
    states = {g["uuid"]: g["state"] for g in gpus["workers"][0]["gpus"]}
    assert states == {gpu(0).uuid: "leased", gpu(1).uuid: "leased", gpu(2).uuid: "busy"}
    assert gpus["workers"][0]["idle"] == 0
    status, refused = await gw.lease()
    assert (status, refused["error"]) == (409, "no_capacity")

    await conn.send(
        p.LeaseStarted(
            lease_id=start.lease_id, ssh_host="203.0.113.7", ssh_port=22022, ssh_user="ubuntu"
        )
    )
    view = await _wait_state(gw, start.lease_id, "running")
    assert view["ssh"] == {"host": "203.0.113.7", "port": 22022, "user": "ubuntu"}

    status, listed = await gw.call("GET", "/v1/leases", gw.renters["alice"])
    assert status == 200 and [x["lease_id"] for x in listed["leases"]] == [start.lease_id]

    status, extended = await gw.call(
        "POST", f"/v1/leases/{start.lease_id}/extend", gw.renters["alice"], {"duration_s": 600}
    )
    assert status == 200 and extended["ends_at"] == pytest.approx(lease["ends_at"] + 600)
    extend = await conn.expect(p.ExtendLease)
    assert (extend.lease_id, extend.ends_at) == (start.lease_id, extended["ends_at"])

    gw.clock.advance(60)
    status, ended = await gw.call("DELETE", f"/v1/leases/{start.lease_id}", gw.renters["alice"])
    assert status == 200 and ended["state"] == "ended" and ended["end_reason"] == "terminated"
    assert ended["ssh"] is None
    stop = await conn.expect(p.StopLease)
    assert stop.lease_id == start.lease_id
    # Ending an ended lease is a no-op, extending it is refused.
    status, again = await gw.call("DELETE", f"/v1/leases/{start.lease_id}", gw.renters["alice"])
    assert status == 200 and again["state"] == "ended"
    status, refused = await gw.call(
        "POST", f"/v1/leases/{start.lease_id}/extend", gw.renters["alice"], {"duration_s": 60}
    )
    assert (status, refused["error"]) == (409, "lease_not_active")
    status, gpus = await gw.call("GET", "/v1/gpus", gw.renters["alice"])
    assert gpus["workers"][0]["idle"] == 2


async def test_another_renter_s_lease_is_not_found(gw: Gw) -> None:
    _, conn = await gw.online()
    lease = await _started(gw, conn)
    lease_id = lease["lease_id"]
    bob = gw.renters["bob"]
    unknown = "0" * 32
    for method, path, body in (
        ("GET", f"/v1/leases/{lease_id}", None),
        ("DELETE", f"/v1/leases/{lease_id}", None),
        ("POST", f"/v1/leases/{lease_id}/extend", {"duration_s": 60}),
    ):
        theirs = await gw.call(method, path, bob, body)
        missing = await gw.call(method, path.replace(str(lease_id), unknown), bob, body)
        assert theirs[0] == missing[0] == 404
        assert theirs[1]["error"] == missing[1]["error"] == "not_found"
    status, listed = await gw.call("GET", "/v1/leases", bob)
    assert (status, listed) == (200, {"leases": []})
    view = await _wait_state(gw, str(lease_id), "running")  # untouched
    assert view["end_reason"] is None


async def test_placement_uses_one_worker_and_honours_the_named_worker(gw: Gw) -> None:
    small, small_conn = await gw.online("small", gpus=[gpu(0, worker=1)])
    big, big_conn = await gw.online("big", gpus=[gpu(i, worker=2) for i in range(5)])
    status, lease = await gw.lease(gpus=3)
    assert status == 201 and lease["worker_id"] == big.worker_id
    status, lease = await gw.lease(gpus=1)  # best fit: the worker with the fewest free GPUs
    assert status == 201 and lease["worker_id"] == small.worker_id
    status, refused = await gw.lease(gpus=3)  # 2 free on big, 0 on small: no single worker
    assert (status, refused["error"]) == (409, "no_capacity")
    status, refused = await gw.lease(gpus=1, worker_id="e" * 32)
    assert (status, refused["error"]) == (409, "worker_unavailable")
    status, lease = await gw.lease(gpus=1, worker_id=big.worker_id)
    assert status == 201 and lease["worker_id"] == big.worker_id
    assert small_conn and big_conn


async def test_capacity_beyond_gpus_is_respected(gw: Gw) -> None:
    worker = await gw.enroll(FakeWorker(gw.home / "w"))
    conn = await worker.connect()
    gw.connections.append(conn)
    await conn.hello(
        gpus=[gpu(0), gpu(1)], capacity=p.Capacity(vcpus=8, memory_mib=1 << 20, disk_gib=1000)
    )
    status, refused = await gw.lease(gpus=2)  # 16 vCPUs wanted, 8 offered
    assert (status, refused["error"]) == (409, "no_capacity")
    status, _ = await gw.lease(gpus=1)
    assert status == 201


@pytest.mark.parametrize(
    ("ssh_key", "why"),
    [
        ("ssh-dss AAAAB3NzaC1kc3MAAACBAP", "must start with"),
        (SSH_KEY + "\nssh-ed25519 AAAA second", "one line"),
        ('command="rm -rf /" ' + SSH_KEY, "must start with"),
        ("ssh-ed25519 AAAAnotbase64!!", "does not parse"),
        (SSH_KEY.replace("renter@laptop", "$(reboot)"), "comment"),
    ],
)
async def test_bad_ssh_keys_are_refused(gw: Gw, ssh_key: str, why: str) -> None:
    await gw.online()
    status, body = await gw.lease(ssh_public_key=ssh_key)
    assert (status, body["error"]) == (400, "invalid_ssh_key")
    assert why in body["message"]


async def test_short_rsa_keys_are_refused_and_long_ones_accepted(gw: Gw) -> None:
    await gw.online()

    def rsa_key(bits: int) -> str:
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits).public_key()
        return key.public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        ).decode()

    status, body = await gw.lease(ssh_public_key=rsa_key(2048))
    assert (status, body["error"]) == (400, "invalid_ssh_key") and "3072" in body["message"]
    status, body = await gw.lease(ssh_public_key=rsa_key(3072))
    assert status == 201, body


async def test_requests_are_validated(gw: Gw) -> None:
    await gw.online()
    alice = gw.renters["alice"]
    for body, code in (
        ({"gpus": 0, "ssh_public_key": SSH_KEY, "duration_s": 3600}, "bad_request"),
        ({"gpus": 1, "ssh_public_key": SSH_KEY, "duration_s": 10}, "duration_out_of_range"),
        ({"gpus": 1, "ssh_public_key": SSH_KEY, "duration_s": 3600, "x": 1}, "bad_request"),
        ({"gpus": "1", "ssh_public_key": SSH_KEY, "duration_s": 3600}, "bad_request"),
        ({"gpus": 1, "ssh_public_key": SSH_KEY, "duration_s": 1e12}, "bad_request"),
    ):
        status, answer = await gw.call("POST", "/v1/leases", alice, body)
        assert (status, answer["error"]) == (400, code), body
    async with gw.http.post(
        gw.api + "/v1/leases", data=b"{not json", headers={"Authorization": f"Bearer {alice}"}
    ) as response:
        assert response.status == 400 and (await response.json())["error"] == "bad_request"
    async with gw.http.post(
        gw.api + "/v1/leases", data=b"x" * 70_000, headers={"Authorization": f"Bearer {alice}"}
    ) as response:
        assert response.status == 413 and (await response.json())["error"] == "body_too_large"
    status, answer = await gw.call("GET", "/v1/leases/not-a-lease-id", alice)
    assert (status, answer["error"]) == (404, "not_found")
    status, answer = await gw.call("GET", "/v1/nothing-here", alice)
    assert (status, answer["error"]) == (404, "not_found")
    status, answer = await gw.call("PUT", "/v1/leases", alice, {})
    assert (status, answer["error"]) == (405, "method_not_allowed")


async def test_keys_are_checked_per_role_and_failures_rate_limited(gw: Gw) -> None:
    status, body = await gw.call("GET", "/v1/gpus", None)
    assert (status, body["error"]) == (401, "unauthorized")
    status, body = await gw.call("GET", "/v1/gpus", gw.validator_key)
    assert (status, body["error"]) == (401, "invalid_api_key")
    status, body = await gw.call("GET", "/v1/lease-feed", gw.renters["alice"])
    assert (status, body["error"]) == (401, "invalid_api_key")
    gw.gateway.store.revoke_api_key("renter", "bob", gw.clock())
    status, body = await gw.call("GET", "/v1/gpus", gw.renters["bob"])
    assert (status, body["error"]) == (401, "invalid_api_key")
    # Four failures so far; the default bucket holds 20. Then even a good key waits.
    for _ in range(16):
        status, _ = await gw.call("GET", "/v1/gpus", "blr_" + "x" * 43)
        assert status == 401
    status, body = await gw.call("GET", "/v1/gpus", gw.renters["alice"])
    assert (status, body["error"]) == (429, "rate_limited")
