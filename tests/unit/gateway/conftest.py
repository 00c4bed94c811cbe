"""Gateway store fixtures: every store test runs on SQLite and on PostgreSQL.

``store_url`` is a SQLite file in ``tmp_path`` or a fresh PostgreSQL schema (skipped, or failed
under ``BYTELEAP_REQUIRE_SYSTEM_TESTS=1``, when PostgreSQL is unreachable); ``store`` is an
upgraded store on it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from byteleap.gateway.store import GatewayStore, open_store
from tests.support.postgres import postgres_url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'gateway.db'}"
    return postgres_url(request)


@pytest.fixture
def store(store_url: str) -> Iterator[GatewayStore]:
    opened = open_store(store_url, timeout_s=10)
    try:
        opened.upgrade()
        yield opened
    finally:
        opened.close()
