"""PostgreSQL for tests and benchmarks: a fresh schema per user, dropped afterwards.

The server is ``postgresql://postgres@127.0.0.1:5432/test`` unless ``BYTELEAP_TEST_PG_URL`` names
another. Each test gets its own schema (``CREATE SCHEMA``) and a DSN whose ``search_path`` points
at it (``options=-csearch_path=...``), so tests never see each other's tables and need no
database of their own; ``DROP SCHEMA ... CASCADE`` removes everything afterwards.

When the server cannot be reached, :func:`postgres_url` skips the test with the reason, or fails
it when ``BYTELEAP_REQUIRE_SYSTEM_TESTS=1`` (CI), so a green CI run means PostgreSQL really ran.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import urllib.parse
from collections.abc import Iterator
from functools import cache

import psycopg
import pytest
from psycopg import sql

from byteleap.validator.store import redact_url

PG_URL_ENV = "BYTELEAP_TEST_PG_URL"
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
REQUIRE_ENV = "BYTELEAP_REQUIRE_SYSTEM_TESTS"
CONNECT_TIMEOUT_S = 5


def base_url() -> str:
    return os.environ.get(PG_URL_ENV) or DEFAULT_PG_URL


@cache
def unreachable_reason(url: str) -> str | None:
    """Why ``url`` cannot be used (checked once per process), or None when it can."""
    try:
        with psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_S, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"PostgreSQL at {redact_url(url)} is not reachable ({first}); set {PG_URL_ENV}"
    return None


def with_search_path(url: str, schema: str) -> str:
    """``postgresql://`` ``url`` whose sessions use ``schema`` (keeps any ``options`` it had)."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    options = " ".join([v for k, v in query if k == "options"] + [f"-csearch_path={schema}"])
    query = [(k, v) for k, v in query if k != "options"] + [("options", options)]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def create_schema(url: str) -> str:
    """A new, empty schema's name."""
    schema = f"t_{secrets.token_hex(8)}"
    with psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_S, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    return schema


def drop_schema(url: str, schema: str) -> None:
    with psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_S, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@contextlib.contextmanager
def fresh_schema(url: str | None = None) -> Iterator[str]:
    """A DSN on a schema of its own, dropped when the block ends (the server must be up)."""
    server = url or base_url()
    schema = create_schema(server)
    try:
        yield with_search_path(server, schema)
    finally:
        drop_schema(server, schema)


def require_postgres() -> str:
    """The server URL; skips (or, under ``BYTELEAP_REQUIRE_SYSTEM_TESTS=1``, fails) the
    current test when it is unreachable."""
    server = base_url()
    reason = unreachable_reason(server)
    if reason is not None:
        if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
            pytest.fail(f"{reason}, but {REQUIRE_ENV}=1")
        pytest.skip(reason)
    return server


def postgres_url(request: pytest.FixtureRequest) -> str:
    """A DSN with a fresh schema for the requesting test; the schema is dropped after it."""
    server = require_postgres()
    schema = create_schema(server)
    request.addfinalizer(lambda: drop_schema(server, schema))
    return with_search_path(server, schema)
