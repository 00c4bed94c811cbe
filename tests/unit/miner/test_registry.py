"""The miner's worker registry: pinning, capacity, presence, persistence across restarts."""

from __future__ import annotations

from pathlib import Path

import pytest

from byteleap.core import wire
from byteleap.core.identity import WorkerKey, worker_id_of
from byteleap.miner.registry import RegistryError, WorkerRegistry


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def inventory() -> wire.Inventory:
    return wire.Inventory(
        cpu_model="Test CPU",
        cpu_cores=8,
        mem_bytes=64 << 30,
        disks=[],
        nics=[],
        gpus=[],
    )


def test_enroll_pins_key_and_survives_restart(tmp_path: Path) -> None:
    db = tmp_path / "miner.db"
    key = WorkerKey.generate().identity.public_key
    reg = WorkerRegistry(db)
    worker_id = reg.enroll(key, "0.1.0")
    assert worker_id == worker_id_of(key)
    reg.mark_online(worker_id, "0.1.0")
    reg.update_inventory(worker_id, inventory())
    reg.record_challenge(worker_id, ok=True)
    reg.record_challenge(worker_id, ok=False)
    reg.close()

    again = WorkerRegistry(db)
    record = again.get(worker_id)
    assert record is not None
    assert record.public_key == key
    assert record.inventory == inventory()
    assert (record.challenges_ok, record.challenges_failed) == (1, 1)
    assert again.check_known(key) == worker_id
    again.mark_all_offline()
    assert again.online_count() == 0


def test_unknown_key_must_enroll(tmp_path: Path) -> None:
    reg = WorkerRegistry(tmp_path / "m.db")
    assert reg.check_known(WorkerKey.generate().identity.public_key) is None
    assert reg.count() == 0


def test_enroll_is_idempotent(tmp_path: Path) -> None:
    reg = WorkerRegistry(tmp_path / "m.db")
    key = WorkerKey.generate().identity.public_key
    assert reg.enroll(key, "0.1.0") == reg.enroll(key, "0.1.0")
    assert reg.count() == 1


def test_the_101st_worker_is_refused_with_a_reason(tmp_path: Path) -> None:
    reg = WorkerRegistry(tmp_path / "m.db", max_workers=100)
    keys = [WorkerKey.generate().identity.public_key for _ in range(101)]
    for key in keys[:100]:
        reg.enroll(key, "0.1.0")
    with pytest.raises(RegistryError) as refused:
        reg.enroll(keys[100], "0.1.0")
    assert refused.value.code == wire.ErrorCode.CAPACITY_REACHED
    assert "100 workers" in str(refused.value)
    assert reg.count() == 100
    # A known worker still comes back, and removing one frees a slot.
    assert reg.check_known(keys[0]) == worker_id_of(keys[0])
    assert reg.remove(worker_id_of(keys[0]))
    assert reg.enroll(keys[100], "0.1.0") == worker_id_of(keys[100])


def test_presence_expires(tmp_path: Path) -> None:
    clock = Clock()
    reg = WorkerRegistry(tmp_path / "m.db", clock=clock)
    a = reg.enroll(WorkerKey.generate().identity.public_key, "0.1.0")
    b = reg.enroll(WorkerKey.generate().identity.public_key, "0.1.0")
    reg.mark_online(a, "0.1.0")
    reg.mark_online(b, "0.1.0")
    clock.now += 60
    reg.touch(b)
    clock.now += 40
    assert reg.expire(90) == [a]
    assert reg.online_count() == 1
    record = reg.get(b)
    assert record is not None and record.online and record.last_seen == clock.now - 40


def test_registry_file_is_wal(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    WorkerRegistry(db).close()
    import sqlite3

    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
