"""The gateway store, on SQLite and PostgreSQL alike (fixtures in conftest.py)."""

from __future__ import annotations

import threading
from pathlib import Path

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from byteleap.core.gateway_protocol import LeaseState
from byteleap.core.lease import LeaseRecord, SignedLeaseRecord, verify_record
from byteleap.gateway.keys import LeaseSigner, secret_hash
from byteleap.gateway.store import (
    SCHEMA_VERSION,
    GatewayStore,
    Lease,
    RecordMaker,
    StoreConflict,
    StoreError,
    TokenError,
    open_store,
    redact_url,
)

NOW = 1_800_000_000.0
W1, W2 = "a" * 32, "b" * 32
MINER = "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty"


def _token(store: GatewayStore, name: str, worker: str = W1, ttl: float = 600) -> bytes:
    digest = secret_hash(name)
    store.add_token(
        digest, worker_id=worker, miner_hotkey=MINER, issued_by="v", now=NOW, expires_at=NOW + ttl
    )
    return digest


def _enroll(store: GatewayStore, worker: str = W1, serial: str = "01") -> None:
    store.enroll(
        _token(store, f"t-{worker}-{serial}", worker),
        now=NOW,
        worker_id=worker,
        public_key=b"k" * 32,
        serial=serial,
        not_before=NOW,
        not_after=NOW + 86400,
    )


def _lease(lease_id: str = "1" * 32, worker: str = W1, state: LeaseState = "pending") -> Lease:
    return Lease(
        lease_id=lease_id,
        renter="alice",
        worker_id=worker,
        miner_hotkey=MINER,
        device_uuids=("GPU-1", "GPU-2"),
        ssh_public_key="ssh-ed25519 AAAA",
        vcpus=16,
        memory_mib=1024,
        disk_gib=10,
        state=state,
        created_at=NOW,
        ends_at=NOW + 3600,
    )


def _signer() -> LeaseSigner:
    return LeaseSigner(Ed25519PrivateKey.generate())


def _maker(signer: LeaseSigner, lease: Lease, until: float) -> RecordMaker:
    def make(seq: int) -> SignedLeaseRecord:
        return signer.sign(
            LeaseRecord(
                gateway_id=signer.gateway_id,
                seq=seq,
                lease_id=lease.lease_id,
                miner_hotkey=lease.miner_hotkey,
                worker_id=lease.worker_id,
                device_uuids=list(lease.device_uuids),
                start=NOW,
                active_until=until,
                ended=False,
                issued_at=until,
            )
        )

    return make


def test_upgrade_is_idempotent_and_check_passes(store: GatewayStore) -> None:
    assert store.schema_version() == SCHEMA_VERSION
    assert store.upgrade() == []
    store.check()


def test_an_empty_store_fails_check_and_a_newer_one_is_refused(store_url: str) -> None:
    store = open_store(store_url)
    try:
        with pytest.raises(StoreError, match="needs 1"):
            store.check()
        assert store.upgrade() == [1]
        with store._transaction(write=True) as tx:
            tx.execute(
                "INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
                (99, "future", NOW),
            )
        with pytest.raises(StoreError, match="newer than this code"):
            store.upgrade()
        with pytest.raises(StoreError, match="newer than this code"):
            store.check()
    finally:
        store.close()


def test_the_store_belongs_to_one_gateway(store: GatewayStore) -> None:
    assert store.gateway_id() is None
    store.bind_gateway_id("1" * 32)
    store.bind_gateway_id("1" * 32)
    with pytest.raises(StoreError, match="signing key"):
        store.bind_gateway_id("2" * 32)
    assert store.gateway_id() == "1" * 32


def test_api_keys_are_found_by_hash_per_kind_and_revocable(store: GatewayStore) -> None:
    store.add_api_key("renter", "alice", secret_hash("blr_one"), NOW)
    store.add_api_key("validator", "alice", secret_hash("blv_two"), NOW)
    assert store.api_key_owner("renter", secret_hash("blr_one")) == "alice"
    assert store.api_key_owner("validator", secret_hash("blr_one")) is None
    assert store.api_key_owner("renter", secret_hash("blr_other")) is None
    with pytest.raises(StoreConflict, match="already has an active key"):
        store.add_api_key("renter", "alice", secret_hash("blr_three"), NOW)
    assert store.revoke_api_key("renter", "alice", NOW + 1)
    assert not store.revoke_api_key("renter", "alice", NOW + 2)
    assert store.api_key_owner("renter", secret_hash("blr_one")) is None
    store.add_api_key("renter", "alice", secret_hash("blr_three"), NOW + 3)  # a new key
    assert store.api_key_owner("renter", secret_hash("blr_three")) == "alice"
    assert store.api_key_owner("renter", secret_hash("blr_one")) is None
    [row] = store.api_keys("renter")
    assert (row.name, row.created_at, row.revoked_at) == ("alice", NOW + 3, None)
    with pytest.raises(StoreError):  # a key hash is unique across everyone
        store.add_api_key("renter", "bob", secret_hash("blr_three"), NOW)


def test_a_token_enrolls_once_and_binds_the_miner(store: GatewayStore) -> None:
    digest = _token(store, "tok")
    row = store.token(digest)
    assert row is not None and (row.worker_id, row.miner_hotkey, row.used_at) == (W1, MINER, None)

    def enroll(token: bytes, serial: str, now: float = NOW, worker: str = W1) -> None:
        store.enroll(
            token,
            now=now,
            worker_id=worker,
            public_key=b"k" * 32,
            serial=serial,
            not_before=NOW,
            not_after=NOW + 86400,
        )

    enroll(digest, "0a", NOW + 1)
    with pytest.raises(TokenError) as used:
        enroll(digest, "0b", NOW + 2)
    assert used.value.code == "token_used"
    worker = store.worker(W1)
    assert worker is not None and worker.miner_hotkey == MINER and worker.revoked_at is None
    assert store.certificate("0a") is not None and store.certificate("0b") is None
    expired = _token(store, "old", ttl=10)
    with pytest.raises(TokenError) as late:
        enroll(expired, "0c", NOW + 11)
    assert late.value.code == "token_expired"
    with pytest.raises(TokenError) as unknown:
        enroll(secret_hash("x"), "0d")
    assert unknown.value.code == "token_unknown"
    other = _token(store, "other", worker=W2)
    with pytest.raises(StoreConflict, match="another worker"):
        enroll(other, "0e")
    unused = store.token(other)
    assert unused is not None and unused.used_at is None  # the refusal rolled back


def test_concurrent_enrollments_with_one_token_let_exactly_one_through(
    store_url: str, store: GatewayStore
) -> None:
    digest = _token(store, "race")
    stores = [open_store(store_url) for _ in range(4)]
    results: list[str] = []
    barrier = threading.Barrier(len(stores))

    def attempt(index: int) -> None:
        barrier.wait()
        try:
            stores[index].enroll(
                digest,
                now=NOW,
                worker_id=W1,
                public_key=b"k" * 32,
                serial=f"{index:02x}",
                not_before=NOW,
                not_after=NOW + 10,
            )
            results.append("ok")
        except TokenError as exc:
            results.append(exc.code)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for opened in stores:
        opened.close()
    assert sorted(results) == ["ok", "token_used", "token_used", "token_used"]


def test_revocation_refuses_every_certificate_and_further_enrollment(store: GatewayStore) -> None:
    _enroll(store, W1, "01")
    store.add_certificate("02", W1, not_before=NOW, not_after=NOW + 10, now=NOW)
    assert store.session_allowed(W1, "01") is None
    assert store.session_allowed(W1, "02") is None
    assert store.session_allowed(W2, "01") == "certificate belongs to another worker"
    assert store.session_allowed(W1, "ff") == "certificate unknown to this gateway"
    assert store.revoke_worker(W1, NOW)
    assert not store.revoke_worker(W1, NOW)
    assert store.session_allowed(W1, "01") == "worker revoked"
    assert store.session_allowed(W1, "02") == "worker revoked"
    assert store.revoked_workers() == {W1}
    with pytest.raises(StoreConflict, match="revoked"):
        store.add_certificate("03", W1, not_before=NOW, not_after=NOW + 10, now=NOW)
    with pytest.raises(StoreConflict, match="revoked"):
        _enroll(store, W1, "04")
    with pytest.raises(StoreConflict, match="not enrolled"):
        store.add_certificate("05", W2, not_before=NOW, not_after=NOW + 10, now=NOW)


def test_lease_changes_are_conditional_and_records_take_gap_free_seqs(store: GatewayStore) -> None:
    _enroll(store)
    signer = _signer()
    lease = _lease()
    store.insert_lease(lease)
    assert store.lease(lease.lease_id) == lease
    starting = msgspec.structs.replace(lease, state="starting")
    assert store.update_lease(starting, expect="pending") is None
    with pytest.raises(StoreConflict, match="no longer pending"):
        store.update_lease(starting, expect="pending")
    running = msgspec.structs.replace(starting, state="running", started_at=NOW, ssh_port=22)
    assert store.update_lease(running, expect="starting", record=_maker(signer, running, NOW)) == 1

    def broken(seq: int) -> SignedLeaseRecord:
        raise RuntimeError(f"signing {seq} failed")

    with pytest.raises(RuntimeError):  # the whole change rolls back, the seq is not spent
        store.update_lease(running, expect="running", record=broken)
    assert store.last_seq() == 1
    later = _maker(signer, running, NOW + 5)
    assert store.update_lease(running, expect="running", record=later) == 2
    feed = store.feed(0, 10)
    assert [e.seq for e in feed] == [1, 2]
    trusted = {signer.gateway_id: Ed25519PublicKey.from_public_bytes(signer.public_key)}
    assert [verify_record(e.signed, trusted).active_until for e in feed] == [NOW, NOW + 5]
    assert [e.seq for e in store.feed(1, 10)] == [2]
    assert [e.seq for e in store.feed(0, 1)] == [1]
    assert store.active_leases() == [running]
    ended = msgspec.structs.replace(running, state="ended", ended_at=NOW + 9)
    store.update_lease(ended, expect="running")
    assert store.active_leases() == []
    assert store.leases_of("alice") == [ended] and store.leases_of("bob") == []


def test_concurrent_record_writers_never_leave_gaps(store_url: str, store: GatewayStore) -> None:
    _enroll(store)
    signer = _signer()
    leases = [_lease(f"{i:032x}", state="running") for i in range(1, 5)]
    for lease in leases:
        store.insert_lease(lease)
    stores = [open_store(store_url) for _ in leases]
    errors: list[BaseException] = []

    def write(index: int) -> None:
        try:
            for step in range(10):
                lease = leases[index]
                stores[index].update_lease(
                    lease, expect="running", record=_maker(signer, lease, NOW + step)
                )
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(len(leases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for opened in stores:
        opened.close()
    assert errors == []
    trusted = {signer.gateway_id: Ed25519PublicKey.from_public_bytes(signer.public_key)}
    records = [verify_record(e.signed, trusted) for e in store.feed(0, 1000)]
    assert [r.seq for r in records] == list(range(1, 41))


def test_expired_tokens_are_pruned(store: GatewayStore) -> None:
    _token(store, "short", ttl=10)
    _token(store, "long", ttl=1000)
    assert store.prune_tokens(NOW + 100) == 1
    assert store.token(secret_hash("short")) is None
    assert store.token(secret_hash("long")) is not None


def test_open_store_refuses_other_schemes_and_hides_passwords() -> None:
    with pytest.raises(StoreError, match="unsupported"):
        open_store("mysql://root:hunter2@db/x")
    assert "hunter2" not in redact_url("postgresql://u:hunter2@h/db")
    assert "hunter2" not in redact_url("postgresql://u@h/db?password=hunter2")
    assert redact_url("postgresql://u@h/db") == "postgresql://u@h/db"


def test_sqlite_files_are_private(tmp_path: Path) -> None:
    base = tmp_path / "new" / "gateway.db"
    store = open_store(f"sqlite:///{base}")
    try:
        store.upgrade()
    finally:
        store.close()
    assert base.stat().st_mode & 0o777 == 0o600
    assert base.parent.stat().st_mode & 0o777 == 0o700
