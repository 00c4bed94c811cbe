"""Validator store fixtures: every store test runs on SQLite and on PostgreSQL.

``store_url`` is a SQLite file in ``tmp_path`` or a fresh PostgreSQL schema (skipped, or failed
under ``BYTELEAP_REQUIRE_SYSTEM_TESTS=1``, when PostgreSQL is unreachable: tests/support/postgres).
``store`` is an upgraded store on it; ``empty_store`` one with no schema yet; ``pg_url`` is a
fresh PostgreSQL schema for tests about PostgreSQL alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from byteleap.validator.store import open_store
from byteleap.validator.store_sql import SqlStore
from tests.support.postgres import postgres_url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'validator.db'}"
    return postgres_url(request)


@pytest.fixture
def pg_url(request: pytest.FixtureRequest) -> str:
    """PostgreSQL only: a fresh schema's URL."""
    return postgres_url(request)


@pytest.fixture
def empty_store(store_url: str) -> Iterator[SqlStore]:
    store = open_store(store_url, timeout_s=10)
    assert isinstance(store, SqlStore)
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def store(empty_store: SqlStore) -> SqlStore:
    empty_store.upgrade()
    return empty_store
