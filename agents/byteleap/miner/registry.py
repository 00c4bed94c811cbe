"""The miner's durable record of its workers (SQLite through sqlite-utils).

A restart loses nothing: pinned keys, last inventory, presence and challenge counters live in one
WAL-mode SQLite file in the miner's state directory. Only authenticated workers reach this module:
the connection handler verifies the enrollment proof (or finds the key pinned) and the Register
before :meth:`WorkerRegistry.register`, so an unauthenticated client never leaves a row behind.

Capacity counts *enrolled* workers (pinned keys), not connections: a known worker can always come
back, and the 101st new one is refused until an operator removes a retired worker.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import sqlite_utils

from ..core import wire
from ..core.identity import worker_id_of

MAX_WORKERS = 100
SCHEMA_VERSION = 1


class RegistryError(wire.CodedError):
    """A registry operation was refused; ``code`` is the wire error to send the worker."""


class WorkerRecord(msgspec.Struct, frozen=True):
    worker_id: str
    public_key: bytes
    enrolled_at: float
    last_seen: float | None
    online: bool
    agent_version: str
    inventory: wire.Inventory | None
    challenges_ok: int
    challenges_failed: int


class WorkerRegistry:
    """Thread-safe (one lock) registry; every change is one transaction."""

    def __init__(
        self,
        path: Path | str,
        *,
        max_workers: int = MAX_WORKERS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._max_workers = max_workers
        self._lock = threading.Lock()
        conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        self._db = sqlite_utils.Database(conn)
        self._migrate()

    def _migrate(self) -> None:
        with self._transaction():
            if "workers" not in self._db.table_names():
                self._db.table("workers").create(
                    {
                        "worker_id": str,
                        "public_key": bytes,
                        "enrolled_at": float,
                        "last_seen": float,
                        "online": int,
                        "agent_version": str,
                        "inventory": bytes,
                        "challenges_ok": int,
                        "challenges_failed": int,
                    },
                    pk="worker_id",
                    not_null={"public_key", "enrolled_at", "online", "agent_version"},
                    defaults={"online": 0, "challenges_ok": 0, "challenges_failed": 0},
                )
                self._db.table("workers").create_index(["public_key"], unique=True)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---------------------------------------------------------------- admission

    def check_known(self, public_key: bytes) -> str | None:
        """The worker id of a pinned key, or None for a key that must enroll first."""
        with self._lock:
            rows = list(
                self._db.query("SELECT worker_id FROM workers WHERE public_key = ?", [public_key])
            )
        return str(rows[0]["worker_id"]) if rows else None

    def check_capacity(self) -> None:
        """Raise ``CAPACITY_REACHED`` when no new worker may enroll."""
        with self._lock:
            self._check_capacity()

    def _check_capacity(self) -> None:  # the caller holds the lock
        count = int(next(self._db.query("SELECT count(*) AS n FROM workers"))["n"])
        if count >= self._max_workers:
            raise RegistryError(
                wire.ErrorCode.CAPACITY_REACHED,
                f"this miner already has {count} workers (maximum {self._max_workers}); "
                "remove a retired worker with 'byteleapctl workers remove' first",
            )

    def register(
        self,
        public_key: bytes,
        agent_version: str,
        inventory: wire.Inventory,
        *,
        enroll: bool,
    ) -> bool:
        """Mark a worker online with its inventory, in one transaction; True if pinned just now.

        ``enroll``: the caller verified the enrollment proof, so an unknown key is pinned (within
        capacity); without it an unknown key (e.g. removed by the operator since its proof was
        checked) is refused with ``NOT_ENROLLED``.
        """
        worker_id = worker_id_of(public_key)
        blob = msgspec.msgpack.encode(inventory)
        now = self._clock()
        with self._transaction():
            # worker_id is derived from the key, so a lookup by key is the pinning check.
            known = list(self._db.query("SELECT 1 FROM workers WHERE public_key = ?", [public_key]))
            if known:
                self._db.execute(
                    "UPDATE workers SET online = 1, last_seen = ?, agent_version = ?, "
                    "inventory = ? WHERE worker_id = ?",
                    [now, agent_version, blob, worker_id],
                )
                return False
            if not enroll:
                raise RegistryError(
                    wire.ErrorCode.NOT_ENROLLED, "this worker is not enrolled (was it removed?)"
                )
            self._check_capacity()
            self._db.table("workers").insert(
                {
                    "worker_id": worker_id,
                    "public_key": public_key,
                    "enrolled_at": now,
                    "last_seen": now,
                    "online": 1,
                    "agent_version": agent_version,
                    "inventory": blob,
                }
            )
        return True

    def remove(self, worker_id: str) -> bool:
        with self._transaction():
            cursor = self._db.execute("DELETE FROM workers WHERE worker_id = ?", [worker_id])
            return cursor.rowcount > 0

    # ---------------------------------------------------------------- presence and state

    def touch(self, worker_id: str) -> None:
        """Record that the worker was seen now (the caller rate-limits these writes)."""
        with self._transaction():
            self._db.execute(
                "UPDATE workers SET last_seen = ? WHERE worker_id = ?", [self._clock(), worker_id]
            )

    def mark_offline(self, worker_id: str) -> None:
        with self._transaction():
            self._db.execute("UPDATE workers SET online = 0 WHERE worker_id = ?", [worker_id])

    def mark_all_offline(self) -> None:
        """At start-up and shutdown nobody is connected, whatever the file says."""
        with self._transaction():
            self._db.execute("UPDATE workers SET online = 0")

    def update_inventory(self, worker_id: str, inventory: wire.Inventory) -> None:
        blob = msgspec.msgpack.encode(inventory)
        with self._transaction():
            self._db.execute(
                "UPDATE workers SET inventory = ? WHERE worker_id = ?", [blob, worker_id]
            )

    def record_challenge(self, worker_id: str, *, ok: bool) -> None:
        column = "challenges_ok" if ok else "challenges_failed"
        with self._transaction():
            self._db.execute(
                f"UPDATE workers SET {column} = {column} + 1 WHERE worker_id = ?",  # noqa: S608
                [worker_id],
            )

    # ---------------------------------------------------------------- reading

    def get(self, worker_id: str) -> WorkerRecord | None:
        with self._lock:
            rows = list(self._db.query("SELECT * FROM workers WHERE worker_id = ?", [worker_id]))
        return _record(rows[0]) if rows else None

    def workers(self) -> list[WorkerRecord]:
        with self._lock:
            rows = list(self._db.query("SELECT * FROM workers ORDER BY worker_id"))
        return [_record(r) for r in rows]

    def count(self) -> int:
        with self._lock:
            return int(next(self._db.query("SELECT count(*) AS n FROM workers"))["n"])

    def online_ids(self) -> set[str]:
        """Ids of the workers marked online (cheap: no inventories decoded)."""
        with self._lock:
            rows = list(self._db.query("SELECT worker_id FROM workers WHERE online = 1"))
        return {str(r["worker_id"]) for r in rows}


def _record(row: dict[str, Any]) -> WorkerRecord:
    inventory_blob = row["inventory"]
    inventory = (
        msgspec.msgpack.decode(bytes(inventory_blob), type=wire.Inventory)
        if inventory_blob
        else None
    )
    last_seen = row["last_seen"]
    return WorkerRecord(
        worker_id=str(row["worker_id"]),
        public_key=bytes(row["public_key"]),
        enrolled_at=float(row["enrolled_at"]),
        last_seen=float(last_seen) if last_seen is not None else None,
        online=bool(row["online"]),
        agent_version=str(row["agent_version"]),
        inventory=inventory,
        challenges_ok=int(row["challenges_ok"] or 0),
        challenges_failed=int(row["challenges_failed"] or 0),
    )
