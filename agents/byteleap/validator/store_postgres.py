"""The validator store on PostgreSQL (production): psycopg 3 with a connection pool.

Each method is one transaction on one pooled connection (``READ COMMITTED``; rows that a method
reads and then rewrites are locked with ``SELECT ... FOR UPDATE`` in a fixed order).

Nothing waits without bound, so a call during an outage raises :class:`StoreUnavailable` instead
of hanging: getting a connection waits at most ``timeout_s``; new connections use
``connect_timeout`` and TCP keepalives; every session runs with ``statement_timeout``,
``lock_timeout`` and ``idle_in_transaction_session_timeout``.

Recovery after a PostgreSQL restart needs no action: the pool checks each connection before
handing it out (``ConnectionPool.check_connection``) and replaces a dead one, a connection that
breaks inside a transaction is discarded when it is returned, and reconnection attempts give up
after ``reconnect_timeout`` so that the next call starts a fresh attempt instead of waiting out
a long backoff. A call during the restart raises :class:`StoreUnavailable`; the next call after
it succeeds.

Errors: connection problems, pool timeouts, statement/lock timeouts, deadlocks and serialization
failures (all ``psycopg.OperationalError``) are :class:`StoreUnavailable`; anything else (missing
table, constraint violation) is :class:`StoreError`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Final

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from ..core.scoring import DEFAULT_PARAMS, ScoringParams
from .store import DEFAULT_TIMEOUT_S, StoreError, StoreUnavailable, redact_url
from .store_sql import Dialect, SqlStore, Tx

__all__ = ["POSTGRESQL", "PostgresStore"]


POSTGRESQL = Dialect(
    name="postgresql",
    placeholder="%s",
    row_locks=True,
    streams=True,
    table_exists=(
        "SELECT 1 FROM information_schema.tables"
        " WHERE table_schema = current_schema() AND table_name = %s"
    ),
    # Any constant: concurrent upgrades (validator start, byteleapctl db upgrade) take turns.
    migration_lock="SELECT pg_advisory_xact_lock(7321880433217805)",
)

_RECONNECT_TIMEOUT_S: Final = 30.0
_STATEMENT_TIMEOUT_FACTOR: Final = 6
"""A statement may run this many ``timeout_s`` (a scoring read of 25 600 rows is ~0.1 s)."""


class PostgresStore(SqlStore):
    """:class:`~byteleap.validator.store.Store` on PostgreSQL."""

    def __init__(
        self,
        url: str,
        *,
        params: ScoringParams = DEFAULT_PARAMS,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        pool_size: int = 4,
    ) -> None:
        super().__init__(POSTGRESQL, redact_url(url), params)
        if pool_size < 1:
            raise StoreError(f"pool_size must be >= 1, got {pool_size}")
        self._timeout_s = timeout_s
        try:
            given = conninfo_to_dict(url)
        except psycopg.ProgrammingError:
            # psycopg's message may quote the DSN: say what is wrong without it.
            raise StoreError(f"malformed PostgreSQL URL {self.location!r}") from None
        # Bounded waits on the network, unless the URL chose its own values.
        defaults: dict[str, str | int] = {
            "connect_timeout": max(1, math.ceil(timeout_s)),
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "application_name": "byteleap-validator",
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
            name="byteleap-validator-store",
        )
        # Do not wait for the first connection: an unreachable server is a StoreUnavailable on
        # the first call (retried by the caller), not a failure to start.
        self._pool.open(wait=False)

    @contextlib.contextmanager
    def _transaction(self, *, write: bool) -> Iterator[Tx]:
        # write is not needed: every transaction may write, row locks order the writers.
        try:
            with self._pool.connection() as conn, conn.cursor() as cursor:
                yield Tx(cursor, POSTGRESQL)
        except PoolClosed:
            raise StoreError("the store is closed") from None
        except PoolTimeout:
            raise StoreUnavailable(
                f"no PostgreSQL connection to {self.location} within {self._timeout_s:g} s"
            ) from None
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"PostgreSQL at {self.location}: {_first_line(exc)}") from None
        except psycopg.Error as exc:
            raise StoreError(f"PostgreSQL at {self.location}: {_first_line(exc)}") from None

    def close(self) -> None:
        self._pool.close(timeout=self._timeout_s)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
