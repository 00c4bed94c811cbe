"""SQL store plumbing shared by the agents that keep state in SQLite or PostgreSQL.

An agent's store writes its queries once, with ``?`` parameters, against :class:`Tx`; a
:class:`Dialect` spells them for the engine. :class:`SqlStoreBase` runs the schema migrations;
:class:`SQLiteDatabase` (one WAL-mode file, one locked connection, ``BEGIN IMMEDIATE`` writes) and
:class:`PostgresPool` (psycopg 3 pool, every wait bounded by ``timeout_s``) open transactions and
turn driver errors into :class:`StoreUnavailable` (retry) or :class:`StoreError` (do not).

The store URL may hold a password: show it with :func:`redact_url` only, and read it from the
``store-url`` credential or a 0600 file with :meth:`SqlStoreSettings.resolve_url`, whose errors
never show it. psycopg is imported only when a PostgreSQL pool is opened, so a SQLite agent never
loads it.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sqlite3
import threading
import time
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple, Protocol

from .config import ConfigStruct
from .credentials import CredentialError, credential_path
from .files import PrivateFileError, read_private_file

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import ConnectionPool

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "STORE_URL_CREDENTIAL",
    "Dialect",
    "Migration",
    "PostgresPool",
    "SQLiteDatabase",
    "Schema",
    "SqlStoreBase",
    "SqlStoreSettings",
    "StoreError",
    "StoreUnavailable",
    "StoreUrlError",
    "Tx",
    "check_store_url",
    "redact_url",
    "sqlite_path",
    "store_scheme",
]

DEFAULT_TIMEOUT_S: Final = 10.0
"""How long one call may wait for a connection or a lock before :class:`StoreUnavailable`."""
STORE_URL_CREDENTIAL: Final = "store-url"
"""systemd credential name (``LoadCredential=store-url:/path``) holding the store URL."""

_STORE_SCHEMES: Final = ("sqlite://", "postgresql://", "postgres://")
_MAX_STORE_URL_BYTES: Final = 4096
_RECONNECT_TIMEOUT_S: Final = 30.0
_STATEMENT_TIMEOUT_FACTOR: Final = 6
"""A statement may run this many ``timeout_s`` (a validator scoring read of 25 600 rows is
~0.1 s)."""


class StoreError(Exception):
    """A store problem that retrying will not fix (bad URL, schema too old or new, conflict)."""


class StoreUnavailable(StoreError):  # noqa: N818 - a state, retry the call
    """The backend cannot be reached right now (restart, network, lock timeout): retry."""


class StoreUrlError(Exception):
    """The store URL (or the file holding it) is unusable; the message never shows the URL."""


# ------------------------------------------------------------------------------------------------
# Store URLs


def check_store_url(url: str, where: str) -> None:
    """:class:`ValueError` unless ``url`` names a supported backend (a config validator)."""
    if not url.startswith(_STORE_SCHEMES):
        # The URL may carry a password: name the accepted schemes, never the value.
        raise ValueError(
            f"{where} must start with sqlite:// or postgresql:// (value not shown: it may hold "
            "a password)"
        )


class SqlStoreSettings(ConfigStruct, frozen=True, kw_only=True):
    """An agent's ``store`` section; the agent's subclass gives ``url`` its default."""

    url: str
    """``sqlite:///path`` or ``postgresql://user@host/db``; put a password in ``url_file``."""
    url_file: str | None = None
    """A 0600 file holding the whole URL (wins over ``url``)."""

    def __post_init__(self) -> None:
        check_store_url(self.url, "url")

    def resolve_url(self, environ: Mapping[str, str] | None = None) -> str:
        """The URL to open: the ``store-url`` systemd credential, else ``url_file``, else ``url``.

        Raises :class:`StoreUrlError` for a missing, unsafe (group/other readable) or malformed
        file; the message names the file, never its content.
        """
        env = os.environ if environ is None else environ
        directory = env.get("CREDENTIALS_DIRECTORY")
        has_credential = bool(directory) and (Path(str(directory)) / STORE_URL_CREDENTIAL).exists()
        if not has_credential and self.url_file is None:
            return self.url
        try:
            path = credential_path(STORE_URL_CREDENTIAL, self.url_file, env)
            raw = read_private_file(path, _MAX_STORE_URL_BYTES, what="store URL file")
        except (CredentialError, PrivateFileError) as exc:
            raise StoreUrlError(str(exc)) from None
        try:
            resolved = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise StoreUrlError(f"store URL file {path} is not UTF-8 text") from None
        if not resolved or any(c.isspace() for c in resolved):
            raise StoreUrlError(f"store URL file {path} must hold exactly one URL on one line")
        try:
            check_store_url(resolved, f"the URL in {path}")
        except ValueError as exc:
            raise StoreUrlError(str(exc)) from None
        return resolved


_PASSWORD_KEYWORD: Final = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S*)", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (in the user part or a ``password=``
    parameter); safe to log or print. Anything unparseable is hidden entirely."""
    if "://" not in url:
        return _PASSWORD_KEYWORD.sub(r"\1***", url)
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return url.split("://", 1)[0] + "://<unparseable, hidden>"
    shown = url
    if "@" in parts.netloc:
        userinfo, host = parts.netloc.rsplit("@", 1)
        if ":" in userinfo:
            hidden = f"{userinfo.split(':', 1)[0]}:***@{host}"
            shown = shown.replace(f"//{parts.netloc}", f"//{hidden}", 1)
    pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    if any(k.lower() == "password" for k, _ in pairs):
        query = urllib.parse.urlencode(
            [(k, "***" if k.lower() == "password" else v) for k, v in pairs], safe="*"
        )
        shown = shown.replace(f"?{parts.query}", f"?{query}", 1)
    return shown


def store_scheme(url: str) -> str:
    """The lower-cased scheme of ``url`` (``""`` when it has none)."""
    return url.split("://", 1)[0].lower() if "://" in url else ""


def sqlite_path(url: str, example_file: str) -> Path:
    """The file a ``sqlite:///...`` URL names (``sqlite:////abs`` is absolute)."""
    prefix = "sqlite:///"
    if not url.lower().startswith(prefix):
        raise StoreError(f"a SQLite store URL must look like sqlite:///path/to/{example_file}")
    rest = url[len(prefix) :]
    if not rest or rest.endswith("/") or "?" in rest or "#" in rest or "\0" in rest:
        raise StoreError(f"SQLite store URL {url!r} must name a file (no query, no fragment)")
    return Path(rest)


# ------------------------------------------------------------------------------------------------
# Dialects and transactions


@dataclass(frozen=True, kw_only=True)
class Dialect:
    """What differs between the engines, beyond the DDL types of an agent's schema."""

    name: str
    """``sqlite`` or ``postgresql``: also the key into the schema's type table."""
    placeholder: str
    table_exists: str
    """A query with one parameter (a table name) that returns a row iff the table exists."""
    row_locks: bool = False
    """Whether ``SELECT ... FOR UPDATE`` locks rows; without (SQLite, which locks the whole
    database for a write transaction) the clause is removed from the SQL."""
    streams: bool = False
    """Whether the driver can stream a large result row by row (psycopg's ``stream``, binary):
    otherwise the whole result sits in the client library's buffer next to its Python copy."""
    migration_lock: str | None = None
    """Run first in every migration transaction, so concurrent upgrades take turns."""
    _cache: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def sql(self, text: str) -> str:
        """``text`` (written with ``?``) with this dialect's parameter marker."""
        cached = self._cache.get(text)
        if cached is None:
            cached = text if self.row_locks else text.replace(" FOR UPDATE", "")
            if self.placeholder != "?":
                cached = cached.replace("?", self.placeholder)
            self._cache[text] = cached
        return cached


class Tx:
    """One transaction's cursor, speaking ``?`` SQL to either driver."""

    __slots__ = ("_cursor", "_dialect")

    def __init__(self, cursor: Any, dialect: Dialect) -> None:
        self._cursor = cursor
        self._dialect = dialect

    def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        """Run one statement; returns the affected row count (-1 when unknown)."""
        self._cursor.execute(self._dialect.sql(sql), tuple(params))
        return int(self._cursor.rowcount)

    def many(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        if rows:
            self._cursor.executemany(self._dialect.sql(sql), [tuple(r) for r in rows])

    def one(self, sql: str, params: Sequence[object] = ()) -> tuple[Any, ...] | None:
        self._cursor.execute(self._dialect.sql(sql), tuple(params))
        row = self._cursor.fetchone()
        return None if row is None else tuple(row)

    def all(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        self._cursor.execute(self._dialect.sql(sql), tuple(params))
        return list(self._cursor.fetchall())  # both drivers return tuples

    def stream(self, sql: str, params: Sequence[object] = ()) -> Iterator[tuple[Any, ...]]:
        """The rows one by one, without buffering the whole result in the driver."""
        if self._dialect.streams:
            yield from self._cursor.stream(self._dialect.sql(sql), tuple(params), binary=True)
        else:
            yield from self._cursor.execute(self._dialect.sql(sql), tuple(params))


# ------------------------------------------------------------------------------------------------
# Schema migrations


class Migration(Protocol):
    @property
    def version(self) -> int: ...

    @property
    def description(self) -> str: ...

    @property
    def statements(self) -> tuple[str, ...]: ...


class Schema(NamedTuple):
    """An agent's migrations: applied in order, versions 1..n, recorded in
    ``schema_migrations``."""

    migrations: Sequence[Migration]
    migrations_table: str
    render: Callable[[str, str], str]
    """``render(statement, dialect_name)``: DDL with its types spelled for the engine."""
    too_new: str
    """The message for a database newer than this code: a template with ``{version}`` (the
    database's) and ``{expected}`` (the code's)."""
    too_old: str
    """The same for a database older than this code (it says how to upgrade)."""

    @property
    def version(self) -> int:
        return self.migrations[-1].version


class SqlStoreBase(ABC):
    """What every SQL store shares: the dialect, where it lives, the migrations; a backend
    supplies ``_transaction`` and ``close``."""

    def __init__(self, dialect: Dialect, location: str, schema: Schema) -> None:
        self._dialect = dialect
        self._location = location
        self._schema = schema

    @property
    def backend(self) -> str:
        return self._dialect.name

    @property
    def location(self) -> str:
        """Where the data lives: a path, or a DSN without its password."""
        return self._location

    @abstractmethod
    def _transaction(self, *, write: bool) -> contextlib.AbstractContextManager[Tx]:
        """One transaction: commits when the block ends, rolls back on any exception."""

    @abstractmethod
    def close(self) -> None: ...

    def _version(self, tx: Tx) -> int:
        if tx.one(self._dialect.table_exists, ("schema_migrations",)) is None:
            return 0
        row = tx.one("SELECT MAX(version) FROM schema_migrations")
        return 0 if row is None or row[0] is None else int(row[0])

    def schema_version(self) -> int:
        """The database's version (0 when empty)."""
        with self._transaction(write=False) as tx:
            return self._version(tx)

    def upgrade(self) -> list[int]:
        """Apply the missing migrations, each in its own transaction; returns those applied.

        A database newer than this code raises :class:`StoreError`.
        """
        schema = self._schema
        applied: list[int] = []
        while True:
            with self._transaction(write=True) as tx:
                if self._dialect.migration_lock:
                    tx.execute(self._dialect.migration_lock)
                tx.execute(schema.render(schema.migrations_table, self._dialect.name))
                current = self._version(tx)
                if current > schema.version:
                    raise StoreError(
                        schema.too_new.format(version=current, expected=schema.version)
                    )
                pending = [m for m in schema.migrations if m.version > current]
                if not pending:
                    return applied
                migration = pending[0]
                for statement in migration.statements:
                    tx.execute(schema.render(statement, self._dialect.name))
                tx.execute(
                    "INSERT INTO schema_migrations (version, description, applied_at)"
                    " VALUES (?, ?, ?)",
                    (migration.version, migration.description, time.time()),
                )
            applied.append(migration.version)

    def check(self) -> None:
        """Raise :class:`StoreError` unless the schema is exactly the code's version."""
        schema = self._schema
        version = self.schema_version()
        if version > schema.version:
            raise StoreError(schema.too_new.format(version=version, expected=schema.version))
        if version < schema.version:
            raise StoreError(schema.too_old.format(version=version, expected=schema.version))


# ------------------------------------------------------------------------------------------------
# SQLite


def _is_busy(exc: sqlite3.Error) -> bool:
    message = str(exc).lower()
    return "locked" in message or "busy" in message


def _create_sqlite_file(path: Path) -> None:
    # 0700 directory, 0600 file: SQLite gives its -wal/-shm files the database file's mode.
    try:
        if not path.parent.exists():
            path.parent.mkdir(mode=0o700, parents=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise StoreError(f"cannot create SQLite database {path}: {exc.strerror}") from None
    os.close(fd)


class SQLiteDatabase:
    """One WAL-mode SQLite file behind one connection and a lock, shared by every thread.

    SQLite allows one writer at a time anyway; ``BEGIN IMMEDIATE`` takes the write lock up
    front so a write never fails half-way on a lock upgrade, and ``busy_timeout`` waits for
    another process's write. A wait that runs out is :class:`StoreUnavailable`.
    """

    def __init__(
        self, path: Path, *, timeout_s: float, synchronous: Literal["NORMAL", "FULL"]
    ) -> None:
        self._path = path
        self._lock = threading.Lock()
        _create_sqlite_file(path)
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
            conn.execute(f"PRAGMA synchronous={synchronous}")
        except sqlite3.Error as exc:
            conn.close()
            if _is_busy(exc):
                raise StoreUnavailable(f"SQLite database {path} is busy: {exc}") from None
            raise StoreError(f"cannot use SQLite database {path}: {exc}") from None
        except StoreError:
            conn.close()
            raise
        self._conn: sqlite3.Connection | None = conn

    @contextlib.contextmanager
    def transaction(self, dialect: Dialect, *, write: bool) -> Iterator[Tx]:
        with self._lock:
            conn = self._conn
            if conn is None:
                raise StoreError("the store is closed")
            try:
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            except sqlite3.Error as exc:
                raise self._mapped(exc) from None
            try:
                yield Tx(conn.cursor(), dialect)
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


# ------------------------------------------------------------------------------------------------
# PostgreSQL


class PostgresPool:
    """A psycopg 3 connection pool in which nothing waits without bound.

    Getting a connection waits at most ``timeout_s``; new connections use ``connect_timeout``
    and TCP keepalives (unless the URL chose its own values); every session runs with
    ``statement_timeout``, ``lock_timeout`` and ``idle_in_transaction_session_timeout``. The
    pool checks each connection before handing it out and gives up reconnecting after
    ``reconnect_timeout``, so the first call after a restart starts afresh. Connection problems,
    pool and statement timeouts, deadlocks (``psycopg.OperationalError``) are
    :class:`StoreUnavailable`; any other database error is :class:`StoreError`.
    """

    def __init__(
        self,
        url: str,
        *,
        location: str,
        timeout_s: float,
        pool_size: int,
        application_name: str,
    ) -> None:
        import psycopg
        from psycopg.conninfo import conninfo_to_dict, make_conninfo
        from psycopg_pool import ConnectionPool

        self._location = location
        self._timeout_s = timeout_s
        try:
            given = conninfo_to_dict(url)
        except psycopg.ProgrammingError:
            # psycopg's message may quote the DSN: say what is wrong without it.
            raise StoreError(f"malformed PostgreSQL URL {location!r}") from None
        defaults: dict[str, str | int] = {
            "connect_timeout": max(1, math.ceil(timeout_s)),
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "application_name": application_name,
        }
        extra = {k: v for k, v in defaults.items() if k not in given}
        statement_ms = int(timeout_s * 1000 * _STATEMENT_TIMEOUT_FACTOR)
        lock_ms = int(timeout_s * 1000)

        def configure(conn: psycopg.Connection[tuple[object, ...]]) -> None:
            conn.execute(f"SET statement_timeout = {statement_ms}")
            conn.execute(f"SET lock_timeout = {lock_ms}")
            conn.execute(f"SET idle_in_transaction_session_timeout = {statement_ms}")
            conn.commit()

        self._pool: ConnectionPool[psycopg.Connection[tuple[object, ...]]] = ConnectionPool(
            make_conninfo(url, **extra),
            min_size=1,
            max_size=pool_size,
            open=False,
            timeout=timeout_s,
            reconnect_timeout=max(_RECONNECT_TIMEOUT_S, timeout_s),
            check=ConnectionPool.check_connection,
            configure=configure,
            name=f"{application_name}-store",
        )
        # Do not wait for the first connection: an unreachable server is a StoreUnavailable on
        # the first call (retried by the caller), not a failure to start.
        self._pool.open(wait=False)

    @contextlib.contextmanager
    def transaction(self, dialect: Dialect) -> Iterator[Tx]:
        """One ``READ COMMITTED`` transaction on one pooled connection."""
        import psycopg
        from psycopg_pool import PoolClosed, PoolTimeout

        try:
            with self._pool.connection() as conn, conn.cursor() as cursor:
                yield Tx(cursor, dialect)
        except PoolClosed:
            raise StoreError("the store is closed") from None
        except PoolTimeout:
            raise StoreUnavailable(
                f"no PostgreSQL connection to {self._location} within {self._timeout_s:g} s"
            ) from None
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"PostgreSQL at {self._location}: {_first_line(exc)}") from None
        except psycopg.Error as exc:
            raise StoreError(f"PostgreSQL at {self._location}: {_first_line(exc)}") from None

    def close(self) -> None:
        self._pool.close(timeout=self._timeout_s)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
