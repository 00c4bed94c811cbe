"""The validator store on SQLite (the one-box default): stdlib ``sqlite3``, one file.

One connection, guarded by a lock, serves every thread: SQLite allows one writer at a time
anyway, and a single connection keeps transactions simple (``BEGIN IMMEDIATE`` for writes, so a
write never fails half-way on a lock upgrade). WAL mode lets ``byteleapctl`` read while the
validator writes; ``busy_timeout`` waits for another process's write, and a wait that runs out
("database is locked") is :class:`StoreUnavailable`. Foreign keys are enforced.

``sqlite:///relative/path`` is relative to the working directory, ``sqlite:////abs/path``
absolute. A missing parent directory is created with mode 0700 and a new database file with
0600 (SQLite gives its ``-wal``/``-shm`` files the database file's mode).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from ..core import sqlstore
from ..core.scoring import DEFAULT_PARAMS, ScoringParams
from ..core.sqlstore import DEFAULT_TIMEOUT_S, SQLiteDatabase
from .store_sql import Dialect, SqlStore, Tx

__all__ = ["SQLITE", "SQLiteStore", "sqlite_path"]

SQLITE = Dialect(
    name="sqlite",
    placeholder="?",
    row_locks=False,
    table_exists="SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
)


def sqlite_path(url: str) -> Path:
    """The file a ``sqlite:///...`` URL names (``sqlite:////abs`` is absolute)."""
    return sqlstore.sqlite_path(url, "validator.db")


class SQLiteStore(SqlStore):
    """:class:`~byteleap.validator.store.Store` on one SQLite file."""

    def __init__(
        self,
        path: Path,
        *,
        params: ScoringParams = DEFAULT_PARAMS,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        super().__init__(SQLITE, str(path), params)
        # NORMAL: durable at each WAL checkpoint.
        self._db = SQLiteDatabase(path, timeout_s=timeout_s, synchronous="NORMAL")

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        params: ScoringParams = DEFAULT_PARAMS,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> SQLiteStore:
        return cls(sqlite_path(url), params=params, timeout_s=timeout_s)

    def _transaction(self, *, write: bool) -> contextlib.AbstractContextManager[Tx]:
        return self._db.transaction(SQLITE, write=write)

    def close(self) -> None:
        self._db.close()
