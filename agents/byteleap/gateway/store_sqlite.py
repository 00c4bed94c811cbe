"""The gateway store on SQLite (the default): one WAL-mode file, one locked connection.

Writes run in ``BEGIN IMMEDIATE`` transactions, so a write never fails half-way on a lock
upgrade and ``byteleapctl gateway`` can write while the daemon runs; a lock wait that runs out is
:class:`StoreUnavailable`. A missing parent directory is created 0700, a new file 0600.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from ..core import sqlstore
from ..core.sqlstore import DEFAULT_TIMEOUT_S, SQLiteDatabase
from .store import Dialect, GatewayStore, Tx

__all__ = ["SQLITE", "SQLiteStore", "sqlite_path"]

SQLITE = Dialect(
    name="sqlite",
    placeholder="?",
    table_exists="SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
)


def sqlite_path(url: str) -> Path:
    """The file a ``sqlite:///...`` URL names (``sqlite:////abs`` is absolute)."""
    return sqlstore.sqlite_path(url, "gateway.db")


class SQLiteStore(GatewayStore):
    def __init__(self, path: Path, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        super().__init__(SQLITE, str(path))
        # FULL: a lease record once acknowledged survives a power cut (the feed is a ledger).
        self._db = SQLiteDatabase(path, timeout_s=timeout_s, synchronous="FULL")

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> SQLiteStore:
        return cls(sqlite_path(url), timeout_s=timeout_s)

    def _transaction(self, *, write: bool) -> contextlib.AbstractContextManager[Tx]:
        return self._db.transaction(SQLITE, write=write)

    def close(self) -> None:
        self._db.close()
