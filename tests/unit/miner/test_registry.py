"""The miner's worker registry: pinning, capacity, presence, persistence across restarts."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from byteleap.core import wire
from byteleap.core.identity import WorkerKey, worker_id_of
from byteleap.miner.registry import RegistryError, WorkerRegistry

from .builders import inventory


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _key() -> bytes:
    return WorkerKey.generate().identity.public_key


def test_register_pins_key_and_survives_restart(tmp_path: Path) -> None:
    db = tmp_path / "miner.db"
    key = _key()
    worker_id = worker_id_of(key)
    reg = WorkerRegistry(db)
    assert reg.register(key, "0.1.0", inventory("GPU-1"), enroll=True) is True
    assert reg.online_ids() == {worker_id}
    reg.update_inventory(worker_id, inventory("GPU-1", "GPU-2"))
    reg.record_challenge(worker_id, ok=True)
    reg.record_challenge(worker_id, ok=False)
    reg.close()

    again = WorkerRegistry(db)
    record = again.get(worker_id)
    assert record is not None
    assert record.public_key == key
    assert record.inventory == inventory("GPU-1", "GPU-2")
    assert record.agent_version == "0.1.0"
    assert (record.challenges_ok, record.challenges_failed) == (1, 1)
    assert again.check_known(key) == worker_id
    again.mark_all_offline()
    assert again.online_ids() == set()


def test_unknown_key_must_enroll(tmp_path: Path) -> None:
    reg = WorkerRegistry(tmp_path / "m.db")
    key = _key()
    assert reg.check_known(key) is None
    with pytest.raises(RegistryError) as refused:
        reg.register(key, "0.1.0", inventory(), enroll=False)
    assert refused.value.code == wire.ErrorCode.NOT_ENROLLED
    assert reg.count() == 0


def test_register_again_updates_without_pinning_twice(tmp_path: Path) -> None:
    clock = Clock()
    reg = WorkerRegistry(tmp_path / "m.db", clock=clock)
    key = _key()
    worker_id = worker_id_of(key)
    assert reg.register(key, "0.1.0", inventory(), enroll=True) is True
    reg.mark_offline(worker_id)
    clock.now += 10
    assert reg.register(key, "0.2.0", inventory("GPU-1"), enroll=False) is False
    assert reg.register(key, "0.2.0", inventory("GPU-1"), enroll=True) is False
    assert reg.count() == 1
    record = reg.get(worker_id)
    assert record is not None and record.online
    assert record.agent_version == "0.2.0" and record.inventory == inventory("GPU-1")
    assert record.enrolled_at == clock.now - 10 and record.last_seen == clock.now


def test_the_101st_worker_is_refused_with_a_reason(tmp_path: Path) -> None:
    reg = WorkerRegistry(tmp_path / "m.db", max_workers=100)
    keys = [_key() for _ in range(101)]
    for key in keys[:100]:
        reg.register(key, "0.1.0", inventory(), enroll=True)

    def enroll_101st() -> None:
        reg.register(keys[100], "0.1.0", inventory(), enroll=True)

    for refusal in (reg.check_capacity, enroll_101st):
        with pytest.raises(RegistryError) as refused:
            refusal()
        assert refused.value.code == wire.ErrorCode.CAPACITY_REACHED
        assert "100 workers" in str(refused.value) and "maximum 100" in refused.value.message
        assert refused.value.to_error().code == wire.ErrorCode.CAPACITY_REACHED
    assert reg.count() == 100
    # A known worker still comes back, and removing one frees a slot.
    assert reg.check_known(keys[0]) == worker_id_of(keys[0])
    assert reg.register(keys[0], "0.1.0", inventory(), enroll=False) is False
    assert reg.remove(worker_id_of(keys[0]))
    reg.check_capacity()
    assert reg.register(keys[100], "0.1.0", inventory(), enroll=True) is True


def test_touch_records_last_seen_only(tmp_path: Path) -> None:
    clock = Clock()
    reg = WorkerRegistry(tmp_path / "m.db", clock=clock)
    key = _key()
    worker_id = worker_id_of(key)
    reg.register(key, "0.1.0", inventory(), enroll=True)
    reg.mark_offline(worker_id)
    clock.now += 60
    reg.touch(worker_id)
    record = reg.get(worker_id)
    assert record is not None and record.last_seen == clock.now
    assert not record.online  # presence is the connection handler's business, not touch's


def test_registry_file_is_wal(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    WorkerRegistry(db).close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
