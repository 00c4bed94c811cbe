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

from ..core.scoring import DEFAULT_PARAMS, ScoringParams
from ..core.sqlstore import DEFAULT_TIMEOUT_S, PostgresPool
from .store import StoreError, redact_url
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
        self._pool = PostgresPool(
            url,
            location=self.location,
            timeout_s=timeout_s,
            pool_size=pool_size,
            application_name="byteleap-validator",
        )

    def _transaction(self, *, write: bool) -> contextlib.AbstractContextManager[Tx]:
        # write is not needed: every transaction may write, row locks order the writers.
        return self._pool.transaction(POSTGRESQL)

    def close(self) -> None:
        self._pool.close()
