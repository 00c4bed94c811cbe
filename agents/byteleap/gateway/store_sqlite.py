"""The gateway store on SQLite (the default): one WAL-mode file, one locked connection.

Writes run in ``BEGIN IMMEDIATE`` transactions, so a write never fails half-way on a lock
upgrade and ``byteleapctl gateway`` can write while the daemon runs; a lock wait that runs out is
:class:`StoreUnavailable`. A missing parent directory is created 0700, a new file 0600.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from .store import DEFAULT_TIMEOUT_S, Dialect, GatewayStore, StoreError, StoreUnavailable, Tx

__all__ = ["SQLITE", "SQLiteStore", "sqlite_path"]

SQLITE = Dialect(
    name="sqlite",
    placeholder="?",
    table_exists="SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
)


def sqlite_path(url: str) -> Path:
    """The file a ``sqlite:///...`` URL names (``sqlite:////abs`` is absolute)."""
    prefix = "sqlite:///"
    if not url.lower().startswith(prefix):
        raise StoreError("a SQLite store URL must look like sqlite:///path/to/gateway.db")
    rest = url[len(prefix) :]
    if not rest or rest.endswith("/") or "?" in rest or "#" in rest or "\0" in rest:
        raise StoreError(f"SQLite store URL {url!r} must name a file (no query, no fragment)")
    return Path(rest)


def _is_busy(exc: sqlite3.Error) -> bool:
    message = str(exc).lower()
    return "locked" in message or "busy" in message


class SQLiteStore(GatewayStore):
    def __init__(self, path: Path, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        super().__init__(SQLITE, str(path))
        self._path = path
        self._lock = threading.Lock()
        _create_file(path)
        try:
            conn = sqlite3.connect(
                path, timeout=timeout_s, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open SQLite database {path}: {exc}") from None
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()
            if mode is None or str(mode[0]).lower() != "wal":
                raise StoreError(f"SQLite database {path} refused WAL mode (got {mode!r})")
            conn.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
            conn.execute("PRAGMA foreign_keys=ON")
            # FULL: a lease record once acknowledged survives a power cut (the feed is a ledger).
            conn.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as exc:
            conn.close()
            if _is_busy(exc):
                raise StoreUnavailable(f"SQLite database {path} is busy: {exc}") from None
            raise StoreError(f"cannot use SQLite database {path}: {exc}") from None
        except StoreError:
            conn.close()
            raise
        self._conn: sqlite3.Connection | None = conn

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> SQLiteStore:
        return cls(sqlite_path(url), timeout_s=timeout_s)

    @contextlib.contextmanager
    def _transaction(self, *, write: bool) -> Iterator[Tx]:
        with self._lock:
            conn = self._conn
            if conn is None:
                raise StoreError("the store is closed")
            try:
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            except sqlite3.Error as exc:
                raise self._mapped(exc) from None
            try:
                yield Tx(conn.cursor(), SQLITE)
                conn.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise self._mapped(exc) from None
                raise

    def _mapped(self, exc: sqlite3.Error) -> StoreError:
        if isinstance(exc, sqlite3.OperationalError) and _is_busy(exc):
            return StoreUnavailable(f"SQLite database {self._path} is busy: {exc}")
        return StoreError(f"SQLite database {self._path}: {exc}")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _create_file(path: Path) -> None:
    try:
        if not path.parent.exists():
            path.parent.mkdir(mode=0o700, parents=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise StoreError(f"cannot create SQLite database {path}: {exc.strerror}") from None
    os.close(fd)
