"""The gateway store's schema as versioned migrations (one schema, SQLite and PostgreSQL).

Statements use ``{placeholders}`` for the few types the two engines spell differently
(:data:`TYPES`); everything else is SQL both accept. ``schema_migrations`` records what was
applied. Migrations are append-only: a released one is never edited, a change is a new version.
"""

from __future__ import annotations

from typing import Final, NamedTuple

__all__ = ["MIGRATIONS", "MIGRATIONS_TABLE", "SCHEMA_VERSION", "TYPES", "Migration", "render"]


class Migration(NamedTuple):
    version: int
    description: str
    statements: tuple[str, ...]


TYPES: Final[dict[str, dict[str, str]]] = {
    "sqlite": {"blob": "BLOB", "double": "REAL", "bigint": "INTEGER"},
    "postgresql": {"blob": "BYTEA", "double": "DOUBLE PRECISION", "bigint": "BIGINT"},
}

MIGRATIONS_TABLE: Final = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version {bigint} PRIMARY KEY,
    description TEXT NOT NULL,
    applied_at {double} NOT NULL
)
"""

LEASE_STATES: Final = "('pending', 'starting', 'running', 'ended', 'failed')"

MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(
        1,
        "gateway identity, API keys, enrollment tokens, workers, certificates, leases, feed",
        (
            # gateway_id: the signing key this store's feed belongs to (a new key is refused).
            """
            CREATE TABLE gateway_meta (
                name TEXT PRIMARY KEY,
                value TEXT NOT NULL
            )
            """,
            # One row: the last feed sequence number. Taking the next one updates (and so locks)
            # this row until the transaction ends, which keeps the feed gap-free and in order.
            """
            CREATE TABLE feed_state (
                id {bigint} PRIMARY KEY CHECK (id = 1),
                last_seq {bigint} NOT NULL
            )
            """,
            "INSERT INTO feed_state (id, last_seq) VALUES (1, 0)",
            """
            CREATE TABLE api_keys (
                kind TEXT NOT NULL CHECK (kind IN ('renter', 'validator')),
                name TEXT NOT NULL,
                key_hash {blob} NOT NULL UNIQUE,
                created_at {double} NOT NULL,
                revoked_at {double},
                PRIMARY KEY (kind, name)
            )
            """,
            """
            CREATE TABLE enrollment_tokens (
                token_hash {blob} PRIMARY KEY,
                worker_id TEXT NOT NULL,
                miner_hotkey TEXT NOT NULL,
                issued_by TEXT NOT NULL,
                created_at {double} NOT NULL,
                expires_at {double} NOT NULL,
                used_at {double}
            )
            """,
            "CREATE INDEX enrollment_tokens_expiry ON enrollment_tokens (expires_at)",
            """
            CREATE TABLE workers (
                worker_id TEXT PRIMARY KEY,
                public_key {blob} NOT NULL,
                miner_hotkey TEXT NOT NULL,
                enrolled_at {double} NOT NULL,
                revoked_at {double}
            )
            """,
            # serial: lowercase hex (up to 159 bits, more than a BIGINT holds).
            """
            CREATE TABLE certificates (
                serial TEXT PRIMARY KEY,
                worker_id TEXT NOT NULL REFERENCES workers (worker_id) ON DELETE CASCADE,
                not_before {double} NOT NULL,
                not_after {double} NOT NULL,
                issued_at {double} NOT NULL,
                revoked_at {double}
            )
            """,
            "CREATE INDEX certificates_worker ON certificates (worker_id)",
            # device_uuids: a JSON list. recorded_until: active_until of the newest record.
            f"""
            CREATE TABLE leases (
                lease_id TEXT PRIMARY KEY,
                renter TEXT NOT NULL,
                worker_id TEXT NOT NULL REFERENCES workers (worker_id),
                miner_hotkey TEXT NOT NULL,
                device_uuids TEXT NOT NULL,
                ssh_public_key TEXT NOT NULL,
                vcpus {{bigint}} NOT NULL,
                memory_mib {{bigint}} NOT NULL,
                disk_gib {{bigint}} NOT NULL,
                state TEXT NOT NULL CHECK (state IN {LEASE_STATES}),
                created_at {{double}} NOT NULL,
                ends_at {{double}} NOT NULL,
                started_at {{double}},
                ended_at {{double}},
                confirmed_at {{double}},
                recorded_until {{double}},
                last_record_at {{double}},
                ssh_host TEXT,
                ssh_port {{bigint}},
                ssh_user TEXT,
                end_reason TEXT,
                message TEXT NOT NULL
            )
            """,
            "CREATE INDEX leases_renter ON leases (renter, created_at)",
            "CREATE INDEX leases_active ON leases (state)"
            " WHERE state IN ('pending', 'starting', 'running')",
            """
            CREATE TABLE lease_records (
                seq {bigint} PRIMARY KEY,
                lease_id TEXT NOT NULL REFERENCES leases (lease_id),
                record {blob} NOT NULL,
                signature {blob} NOT NULL,
                issued_at {double} NOT NULL
            )
            """,
            "CREATE INDEX lease_records_lease ON lease_records (lease_id)",
        ),
    ),
)

SCHEMA_VERSION: Final = MIGRATIONS[-1].version


def render(statement: str, dialect: str) -> str:
    return statement.format(**TYPES[dialect]).strip()


def _check_migrations() -> None:
    versions = [m.version for m in MIGRATIONS]
    if versions != list(range(1, len(versions) + 1)):
        raise RuntimeError(f"migration versions must be 1..n in order, got {versions}")


_check_migrations()
