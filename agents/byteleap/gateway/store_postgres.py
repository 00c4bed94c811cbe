"""The gateway store on PostgreSQL: psycopg 3 with a small connection pool.

Each method is one ``READ COMMITTED`` transaction on one pooled connection. Taking a feed
sequence number updates the single ``feed_state`` row, which PostgreSQL locks until the
transaction ends: record writers take turns, so sequence numbers commit in order and without
gaps. Nothing waits without bound: pool waits, ``connect_timeout``, ``statement_timeout`` and
``lock_timeout`` all derive from ``timeout_s``. Connection problems and timeouts are
:class:`StoreUnavailable`; any other database error is :class:`StoreError`.
"""

from __future__ import annotations

import contextlib

from ..core.sqlstore import DEFAULT_TIMEOUT_S, PostgresPool
from .store import Dialect, GatewayStore, Tx, redact_url

__all__ = ["POSTGRESQL", "PostgresStore"]

POSTGRESQL = Dialect(
    name="postgresql",
    placeholder="%s",
    row_locks=True,
    table_exists=(
        "SELECT 1 FROM information_schema.tables"
        " WHERE table_schema = current_schema() AND table_name = %s"
    ),
    # Any constant: concurrent upgrades (daemon start, byteleapctl) take turns.
    migration_lock="SELECT pg_advisory_xact_lock(7321880433217806)",
)


class PostgresStore(GatewayStore):
    def __init__(self, url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, pool_size: int = 4):
        super().__init__(POSTGRESQL, redact_url(url))
        self._pool = PostgresPool(
            url,
            location=self.location,
            timeout_s=timeout_s,
            pool_size=pool_size,
            application_name="byteleap-gateway",
        )

    def _transaction(self, *, write: bool) -> contextlib.AbstractContextManager[Tx]:
        return self._pool.transaction(POSTGRESQL)

    def close(self) -> None:
        self._pool.close()
