"""The gateway's persistent state: one schema on SQLite (default) or PostgreSQL.

``sqlite:///path/gateway.db`` (WAL) or ``postgresql://...`` (psycopg 3, pooled). Only
``gateway/store*`` speaks SQL. Every method is one transaction, synchronous and thread-safe; the
daemon calls them from worker threads (:func:`asyncio.to_thread`).

What it holds:

* ``gateway_meta``: the gateway id the feed belongs to (:meth:`GatewayStore.bind_gateway_id`
  refuses a different signing key, so one store never mixes two gateways' sequences);
* ``api_keys``: renter and validator keys, SHA-256 only; revoked rows stay for the record;
* ``enrollment_tokens``: SHA-256, the worker and miner they are bound to, expiry, use;
* ``workers`` and ``certificates``: enrolled worker keys, every certificate serial issued, and
  revocations (a revoked worker's certificates are all refused);
* ``leases``: every lease and its state; ``lease_records``: the signed feed.

Lease state changes that emit a record (:meth:`GatewayStore.update_lease` with ``record=``) take
the next feed sequence number, sign, and insert the record in the same transaction as the state
change, so the feed is gap-free, strictly increasing, and never disagrees with the lease table.

Errors: :class:`StoreUnavailable` (retry: PostgreSQL restarting, SQLite busy) or
:class:`StoreError` (anything else). Open with :func:`open_store`; show a URL with
:func:`redact_url` only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, Literal

import msgspec

from ..core.gateway_protocol import LeaseState
from ..core.lease import SignedLeaseRecord
from ..core.sqlstore import (
    DEFAULT_TIMEOUT_S,
    Dialect,
    Schema,
    SqlStoreBase,
    StoreError,
    StoreUnavailable,
    Tx,
    redact_url,
    store_scheme,
)
from .keys import KeyKind
from .store_schema import MIGRATIONS, MIGRATIONS_TABLE, SCHEMA_VERSION, render

__all__ = [
    "ACTIVE_STATES",
    "SCHEMA_VERSION",
    "ApiKeyRow",
    "CertificateRow",
    "Dialect",
    "FeedEntry",
    "GatewayStore",
    "Lease",
    "RecordMaker",
    "StoreConflict",
    "StoreError",
    "StoreUnavailable",
    "TokenError",
    "TokenRow",
    "Tx",
    "WorkerRow",
    "open_store",
    "redact_url",
]

ACTIVE_STATES: Final[frozenset[str]] = frozenset({"pending", "starting", "running"})


class StoreConflict(StoreError):  # noqa: N818 - a state, like StoreUnavailable
    """The row changed under the caller (a lease no longer in the expected state)."""


class TokenError(StoreError):
    """An enrollment token is unknown, expired or used; ``code`` is the API's error code."""

    def __init__(self, code: Literal["token_unknown", "token_expired", "token_used"]) -> None:
        super().__init__(code.replace("_", " "))
        self.code = code


class ApiKeyRow(msgspec.Struct, frozen=True, kw_only=True):
    kind: KeyKind
    name: str
    created_at: float
    revoked_at: float | None


class TokenRow(msgspec.Struct, frozen=True, kw_only=True):
    worker_id: str
    miner_hotkey: str
    issued_by: str
    created_at: float
    expires_at: float
    used_at: float | None


class WorkerRow(msgspec.Struct, frozen=True, kw_only=True):
    worker_id: str
    public_key: bytes
    miner_hotkey: str
    enrolled_at: float
    revoked_at: float | None


class CertificateRow(msgspec.Struct, frozen=True, kw_only=True):
    serial: str
    worker_id: str
    not_before: float
    not_after: float
    issued_at: float
    revoked_at: float | None


class FeedEntry(msgspec.Struct, frozen=True, kw_only=True):
    seq: int
    signed: SignedLeaseRecord


class Lease(msgspec.Struct, frozen=True, kw_only=True):
    """One lease as stored (times are Unix seconds on the gateway's clock)."""

    lease_id: str
    renter: str
    worker_id: str
    miner_hotkey: str
    device_uuids: tuple[str, ...]
    ssh_public_key: str
    vcpus: int
    memory_mib: int
    disk_gib: int
    state: LeaseState
    created_at: float
    ends_at: float
    started_at: float | None = None
    ended_at: float | None = None
    confirmed_at: float | None = None
    """Last time the worker reported the VM running (in memory; persisted with records)."""
    recorded_until: float | None = None
    """``active_until`` of the newest signed record of this lease."""
    last_record_at: float | None = None
    ssh_host: str | None = None
    ssh_port: int | None = None
    ssh_user: str | None = None
    end_reason: str | None = None
    message: str = ""

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


RecordMaker = Callable[[int], SignedLeaseRecord]
"""Builds and signs the record of a state change, given the feed sequence number it gets."""

_LEASE_COLUMNS: Final = (
    "lease_id, renter, worker_id, miner_hotkey, device_uuids, ssh_public_key, vcpus, memory_mib,"
    " disk_gib, state, created_at, ends_at, started_at, ended_at, confirmed_at, recorded_until,"
    " last_record_at, ssh_host, ssh_port, ssh_user, end_reason, message"
)
_MUTABLE: Final = (
    "state",
    "ends_at",
    "started_at",
    "ended_at",
    "confirmed_at",
    "recorded_until",
    "last_record_at",
    "ssh_host",
    "ssh_port",
    "ssh_user",
    "end_reason",
    "message",
)
_COLUMN_NAMES: Final = tuple(column.strip() for column in _LEASE_COLUMNS.split(","))
_MUTABLE_INDEXES: Final = tuple(_COLUMN_NAMES.index(column) for column in _MUTABLE)
_INSERT_LEASE: Final = (
    f"INSERT INTO leases ({_LEASE_COLUMNS})"  # noqa: S608 - constants
    f" VALUES ({', '.join('?' for _ in _COLUMN_NAMES)})"
)
_UPDATE_LEASE: Final = (
    f"UPDATE leases SET {', '.join(f'{column} = ?' for column in _MUTABLE)}"  # noqa: S608
    " WHERE lease_id = ? AND state = ?"
)
_DEVICES: Final = msgspec.json.Decoder(tuple[str, ...])
_JSON: Final = msgspec.json.Encoder()


def _lease_params(lease: Lease) -> tuple[object, ...]:
    return (
        lease.lease_id,
        lease.renter,
        lease.worker_id,
        lease.miner_hotkey,
        _JSON.encode(list(lease.device_uuids)).decode("ascii"),
        lease.ssh_public_key,
        lease.vcpus,
        lease.memory_mib,
        lease.disk_gib,
        lease.state,
        lease.created_at,
        lease.ends_at,
        lease.started_at,
        lease.ended_at,
        lease.confirmed_at,
        lease.recorded_until,
        lease.last_record_at,
        lease.ssh_host,
        lease.ssh_port,
        lease.ssh_user,
        lease.end_reason,
        lease.message,
    )


def _opt(value: Any) -> float | None:
    return None if value is None else float(value)


def _lease_of(row: Sequence[Any]) -> Lease:
    try:
        devices = _DEVICES.decode(row[4])
    except msgspec.DecodeError:
        raise StoreError(f"lease {row[0]}: device list is corrupt") from None
    return Lease(
        lease_id=row[0],
        renter=row[1],
        worker_id=row[2],
        miner_hotkey=row[3],
        device_uuids=devices,
        ssh_public_key=row[5],
        vcpus=int(row[6]),
        memory_mib=int(row[7]),
        disk_gib=int(row[8]),
        state=row[9],
        created_at=float(row[10]),
        ends_at=float(row[11]),
        started_at=_opt(row[12]),
        ended_at=_opt(row[13]),
        confirmed_at=_opt(row[14]),
        recorded_until=_opt(row[15]),
        last_record_at=_opt(row[16]),
        ssh_host=row[17],
        ssh_port=None if row[18] is None else int(row[18]),
        ssh_user=row[19],
        end_reason=row[20],
        message=row[21],
    )


# ------------------------------------------------------------------------------------------------
# Input checks


def _text(name: str, value: object, max_length: int = 256) -> str:
    if not isinstance(value, str) or not value or len(value) > max_length:
        raise StoreError(f"{name} must be a non-empty string of at most {max_length} characters")
    return value


def _time(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise StoreError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _hash(value: object) -> bytes:
    if not isinstance(value, bytes) or len(value) != 32:
        raise StoreError("a key hash is 32 bytes")
    return value


# ------------------------------------------------------------------------------------------------
# The store


class GatewayStore(SqlStoreBase):
    """Every query of the gateway; a backend supplies ``_transaction`` and ``close``.

    ``location`` is a path, or a DSN without its password.
    """

    def __init__(self, dialect: Dialect, location: str) -> None:
        super().__init__(dialect, location, _SCHEMA)

    # ---- identity -------------------------------------------------------------------------

    def bind_gateway_id(self, gateway_id: str) -> None:
        """Record the gateway id on first use; a different one later is a :class:`StoreError`."""
        with self._transaction(write=True) as tx:
            row = tx.one("SELECT value FROM gateway_meta WHERE name = 'gateway_id'")
            if row is None:
                tx.execute(
                    "INSERT INTO gateway_meta (name, value) VALUES ('gateway_id', ?)", (gateway_id,)
                )
            elif row[0] != gateway_id:
                raise StoreError(
                    f"the store belongs to gateway {row[0]} but the signing key is gateway "
                    f"{gateway_id}'s: restore the original signing key or use a new store"
                )

    def gateway_id(self) -> str | None:
        with self._transaction(write=False) as tx:
            row = tx.one("SELECT value FROM gateway_meta WHERE name = 'gateway_id'")
        return None if row is None else str(row[0])

    # ---- API keys -------------------------------------------------------------------------

    def add_api_key(self, kind: KeyKind, name: str, key_hash: bytes, now: float) -> None:
        """Store a new key for ``name``; a revoked name is given the new key, an active one is
        a :class:`StoreConflict`."""
        _text("name", name, 64)
        with self._transaction(write=True) as tx:
            row = tx.one(
                "SELECT revoked_at FROM api_keys WHERE kind = ? AND name = ?", (kind, name)
            )
            if row is not None and row[0] is None:
                raise StoreConflict(f"{kind} {name!r} already has an active key")
            if row is None:
                tx.execute(
                    "INSERT INTO api_keys (kind, name, key_hash, created_at, revoked_at)"
                    " VALUES (?, ?, ?, ?, NULL)",
                    (kind, name, _hash(key_hash), _time("now", now)),
                )
            else:
                tx.execute(
                    "UPDATE api_keys SET key_hash = ?, created_at = ?, revoked_at = NULL"
                    " WHERE kind = ? AND name = ?",
                    (_hash(key_hash), _time("now", now), kind, name),
                )

    def api_key_owner(self, kind: KeyKind, key_hash: bytes) -> str | None:
        """The name owning this active key, or None."""
        with self._transaction(write=False) as tx:
            row = tx.one(
                "SELECT name FROM api_keys WHERE key_hash = ? AND kind = ? AND revoked_at IS NULL",
                (_hash(key_hash), kind),
            )
        return None if row is None else str(row[0])

    def api_keys(self, kind: KeyKind) -> list[ApiKeyRow]:
        with self._transaction(write=False) as tx:
            rows = tx.all(
                "SELECT name, created_at, revoked_at FROM api_keys WHERE kind = ? ORDER BY name",
                (kind,),
            )
        return [
            ApiKeyRow(kind=kind, name=r[0], created_at=float(r[1]), revoked_at=_opt(r[2]))
            for r in rows
        ]

    def revoke_api_key(self, kind: KeyKind, name: str, now: float) -> bool:
        """True when an active key was revoked."""
        with self._transaction(write=True) as tx:
            count = tx.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE kind = ? AND name = ?"
                " AND revoked_at IS NULL",
                (_time("now", now), kind, name),
            )
        return count == 1

    # ---- enrollment -----------------------------------------------------------------------

    def add_token(
        self,
        token_hash: bytes,
        *,
        worker_id: str,
        miner_hotkey: str,
        issued_by: str,
        now: float,
        expires_at: float,
    ) -> None:
        with self._transaction(write=True) as tx:
            tx.execute(
                "INSERT INTO enrollment_tokens (token_hash, worker_id, miner_hotkey, issued_by,"
                " created_at, expires_at, used_at) VALUES (?, ?, ?, ?, ?, ?, NULL)",
                (
                    _hash(token_hash),
                    _text("worker_id", worker_id),
                    _text("miner_hotkey", miner_hotkey),
                    _text("issued_by", issued_by),
                    _time("now", now),
                    _time("expires_at", expires_at),
                ),
            )

    def token(self, token_hash: bytes) -> TokenRow | None:
        with self._transaction(write=False) as tx:
            row = tx.one(
                "SELECT worker_id, miner_hotkey, issued_by, created_at, expires_at, used_at"
                " FROM enrollment_tokens WHERE token_hash = ?",
                (_hash(token_hash),),
            )
        if row is None:
            return None
        return TokenRow(
            worker_id=row[0],
            miner_hotkey=row[1],
            issued_by=row[2],
            created_at=float(row[3]),
            expires_at=float(row[4]),
            used_at=_opt(row[5]),
        )

    def enroll(
        self,
        token_hash: bytes,
        *,
        now: float,
        worker_id: str,
        public_key: bytes,
        serial: str,
        not_before: float,
        not_after: float,
    ) -> None:
        """Use the token, record the worker (bound to the token's miner) and its certificate,
        all in one transaction.

        :class:`TokenError` when the token is unknown, expired or already used (so of two
        concurrent enrollments with one token exactly one succeeds), :class:`StoreConflict`
        when it names another worker or the worker is revoked.
        """
        with self._transaction(write=True) as tx:
            used = tx.execute(
                "UPDATE enrollment_tokens SET used_at = ?"
                " WHERE token_hash = ? AND used_at IS NULL AND expires_at > ?",
                (_time("now", now), _hash(token_hash), now),
            )
            row = tx.one(
                "SELECT worker_id, miner_hotkey, expires_at, used_at FROM enrollment_tokens"
                " WHERE token_hash = ?",
                (token_hash,),
            )
            if row is None:
                raise TokenError("token_unknown")
            if used != 1:
                raise TokenError("token_used" if row[3] is not None else "token_expired")
            if row[0] != worker_id:
                raise StoreConflict("the enrollment token was issued for another worker")
            revoked = tx.one("SELECT revoked_at FROM workers WHERE worker_id = ?", (worker_id,))
            if revoked is not None and revoked[0] is not None:
                raise StoreConflict(f"worker {worker_id} is revoked")
            tx.execute(
                "INSERT INTO workers (worker_id, public_key, miner_hotkey, enrolled_at, revoked_at)"
                " VALUES (?, ?, ?, ?, NULL) ON CONFLICT (worker_id) DO UPDATE SET"
                " public_key = excluded.public_key, miner_hotkey = excluded.miner_hotkey,"
                " enrolled_at = excluded.enrolled_at",
                (worker_id, public_key, row[1], now),
            )
            self._insert_certificate(tx, serial, worker_id, not_before, not_after, now)

    @staticmethod
    def _insert_certificate(
        tx: Tx, serial: str, worker_id: str, not_before: float, not_after: float, now: float
    ) -> None:
        tx.execute(
            "INSERT INTO certificates (serial, worker_id, not_before, not_after, issued_at,"
            " revoked_at) VALUES (?, ?, ?, ?, ?, NULL)",
            (
                _text("serial", serial, 64),
                worker_id,
                _time("not_before", not_before),
                _time("not_after", not_after),
                _time("now", now),
            ),
        )

    def add_certificate(
        self, serial: str, worker_id: str, *, not_before: float, not_after: float, now: float
    ) -> None:
        """Record a renewed certificate of an enrolled, unrevoked worker."""
        with self._transaction(write=True) as tx:
            row = tx.one("SELECT revoked_at FROM workers WHERE worker_id = ?", (worker_id,))
            if row is None:
                raise StoreConflict(f"worker {worker_id} is not enrolled")
            if row[0] is not None:
                raise StoreConflict(f"worker {worker_id} is revoked")
            self._insert_certificate(tx, serial, worker_id, not_before, not_after, now)

    def certificate(self, serial: str) -> CertificateRow | None:
        with self._transaction(write=False) as tx:
            row = tx.one(
                "SELECT serial, worker_id, not_before, not_after, issued_at, revoked_at"
                " FROM certificates WHERE serial = ?",
                (serial,),
            )
        if row is None:
            return None
        return CertificateRow(
            serial=row[0],
            worker_id=row[1],
            not_before=float(row[2]),
            not_after=float(row[3]),
            issued_at=float(row[4]),
            revoked_at=_opt(row[5]),
        )

    def session_allowed(self, worker_id: str, serial: str) -> str | None:
        """None when a session with this certificate may open, else why not."""
        with self._transaction(write=False) as tx:
            row = tx.one(
                "SELECT c.worker_id, c.revoked_at, w.revoked_at FROM certificates c"
                " JOIN workers w ON w.worker_id = c.worker_id WHERE c.serial = ?",
                (serial,),
            )
        if row is None:
            return "certificate unknown to this gateway"
        if row[0] != worker_id:
            return "certificate belongs to another worker"
        if row[1] is not None or row[2] is not None:
            return "worker revoked"
        return None

    def prune_tokens(self, before: float) -> int:
        """Delete tokens that expired before ``before``; returns how many."""
        with self._transaction(write=True) as tx:
            return tx.execute(
                "DELETE FROM enrollment_tokens WHERE expires_at < ?", (_time("before", before),)
            )

    # ---- workers --------------------------------------------------------------------------

    def worker(self, worker_id: str) -> WorkerRow | None:
        with self._transaction(write=False) as tx:
            row = tx.one(
                "SELECT worker_id, public_key, miner_hotkey, enrolled_at, revoked_at"
                " FROM workers WHERE worker_id = ?",
                (worker_id,),
            )
        return None if row is None else _worker_of(row)

    def workers(self) -> list[WorkerRow]:
        with self._transaction(write=False) as tx:
            rows = tx.all(
                "SELECT worker_id, public_key, miner_hotkey, enrolled_at, revoked_at"
                " FROM workers ORDER BY worker_id"
            )
        return [_worker_of(r) for r in rows]

    def revoke_worker(self, worker_id: str, now: float) -> bool:
        """Revoke the worker and every certificate it holds; True when it was not revoked."""
        with self._transaction(write=True) as tx:
            count = tx.execute(
                "UPDATE workers SET revoked_at = ? WHERE worker_id = ? AND revoked_at IS NULL",
                (_time("now", now), worker_id),
            )
            tx.execute(
                "UPDATE certificates SET revoked_at = ? WHERE worker_id = ? AND revoked_at IS NULL",
                (now, worker_id),
            )
        return count == 1

    def revoked_workers(self) -> set[str]:
        with self._transaction(write=False) as tx:
            rows = tx.all("SELECT worker_id FROM workers WHERE revoked_at IS NOT NULL")
        return {str(r[0]) for r in rows}

    # ---- leases ---------------------------------------------------------------------------

    def insert_lease(self, lease: Lease) -> None:
        with self._transaction(write=True) as tx:
            tx.execute(_INSERT_LEASE, _lease_params(lease))

    def update_lease(
        self, lease: Lease, *, expect: LeaseState, record: RecordMaker | None = None
    ) -> int | None:
        """Write ``lease``'s mutable fields if the stored lease is still in state ``expect``
        (else :class:`StoreConflict`); with ``record``, append the record it signs under the
        next feed sequence number. Returns that number, or None without a record."""
        params = _lease_params(lease)
        with self._transaction(write=True) as tx:
            count = tx.execute(
                _UPDATE_LEASE, (*(params[i] for i in _MUTABLE_INDEXES), lease.lease_id, expect)
            )
            if count != 1:
                raise StoreConflict(f"lease {lease.lease_id} is no longer {expect}")
            if record is None:
                return None
            return self._append_record(tx, lease.lease_id, record)

    def _append_record(self, tx: Tx, lease_id: str, record: RecordMaker) -> int:
        row = tx.one(
            "UPDATE feed_state SET last_seq = last_seq + 1 WHERE id = 1 RETURNING last_seq"
        )
        if row is None:  # pragma: no cover - the migration inserts the row
            raise StoreError("feed_state is missing its row")
        seq = int(row[0])
        signed = record(seq)
        tx.execute(
            "INSERT INTO lease_records (seq, lease_id, record, signature, issued_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (seq, lease_id, signed.record, signed.signature, time.time()),
        )
        return seq

    def lease(self, lease_id: str) -> Lease | None:
        with self._transaction(write=False) as tx:
            row = tx.one(
                f"SELECT {_LEASE_COLUMNS} FROM leases WHERE lease_id = ?",  # noqa: S608
                (lease_id,),
            )
        return None if row is None else _lease_of(row)

    def leases_of(self, renter: str, limit: int = 1000) -> list[Lease]:
        """The renter's leases, newest first."""
        with self._transaction(write=False) as tx:
            rows = tx.all(
                f"SELECT {_LEASE_COLUMNS} FROM leases WHERE renter = ?"  # noqa: S608
                " ORDER BY created_at DESC, lease_id LIMIT ?",
                (renter, limit),
            )
        return [_lease_of(r) for r in rows]

    def active_leases(self) -> list[Lease]:
        with self._transaction(write=False) as tx:
            rows = tx.all(
                f"SELECT {_LEASE_COLUMNS} FROM leases"  # noqa: S608
                " WHERE state IN ('pending', 'starting', 'running') ORDER BY created_at"
            )
        return [_lease_of(r) for r in rows]

    # ---- feed -----------------------------------------------------------------------------

    def feed(self, after: int, limit: int) -> list[FeedEntry]:
        """Records with ``seq > after`` in order, at most ``limit``."""
        with self._transaction(write=False) as tx:
            rows = tx.all(
                "SELECT seq, record, signature FROM lease_records WHERE seq > ?"
                " ORDER BY seq LIMIT ?",
                (after, limit),
            )
        return [
            FeedEntry(
                seq=int(r[0]), signed=SignedLeaseRecord(record=bytes(r[1]), signature=bytes(r[2]))
            )
            for r in rows
        ]

    def last_seq(self) -> int:
        with self._transaction(write=False) as tx:
            row = tx.one("SELECT last_seq FROM feed_state WHERE id = 1")
        return 0 if row is None else int(row[0])


def _worker_of(row: Sequence[Any]) -> WorkerRow:
    return WorkerRow(
        worker_id=row[0],
        public_key=bytes(row[1]),
        miner_hotkey=row[2],
        enrolled_at=float(row[3]),
        revoked_at=_opt(row[4]),
    )


_SCHEMA: Final = Schema(
    MIGRATIONS,
    MIGRATIONS_TABLE,
    render,
    too_new="gateway store schema is version {version}, newer than this code ({expected}): "
    "upgrade byteleap",
    too_old="gateway store schema is version {version}, this code needs {expected}: "
    "start byteleap-gateway or run 'byteleapctl gateway init' to upgrade it",
)


# ------------------------------------------------------------------------------------------------
# Opening


def open_store(url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> GatewayStore:
    """Open ``sqlite:///path`` or ``postgresql://...`` (not migrated: call ``upgrade``)."""
    scheme = store_scheme(url)
    if scheme == "sqlite":
        from .store_sqlite import SQLiteStore

        return SQLiteStore.from_url(url, timeout_s=timeout_s)
    if scheme in ("postgresql", "postgres"):  # psycopg is loaded only for PostgreSQL
        from .store_postgres import PostgresStore

        return PostgresStore(url, timeout_s=timeout_s)
    raise StoreError(
        f"unsupported store URL {redact_url(url)!r}: use sqlite:///path or postgresql://"
    )
