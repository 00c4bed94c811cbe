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
import math
from collections.abc import Iterator

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from .store import (
    DEFAULT_TIMEOUT_S,
    Dialect,
    GatewayStore,
    StoreError,
    StoreUnavailable,
    Tx,
    redact_url,
)

__all__ = ["POSTGRESQL", "PostgresStore"]

POSTGRESQL = Dialect(
    name="postgresql",
    placeholder="%s",
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
        self._timeout_s = timeout_s
        try:
            given = conninfo_to_dict(url)
        except psycopg.ProgrammingError:
            raise StoreError(f"malformed PostgreSQL URL {self.location!r}") from None
        defaults: dict[str, str | int] = {
            "connect_timeout": max(1, math.ceil(timeout_s)),
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "application_name": "byteleap-gateway",
        }
        extra = {k: v for k, v in defaults.items() if k not in given}
        statement_ms = int(timeout_s * 1000 * 6)
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
            reconnect_timeout=max(30.0, timeout_s),
            check=ConnectionPool.check_connection,
            configure=configure,
            name="byteleap-gateway-store",
        )
        self._pool.open(wait=False)

    @contextlib.contextmanager
    def _transaction(self, *, write: bool) -> Iterator[Tx]:
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
