"""The validator store's logic, written once for SQLite and PostgreSQL (DESIGN §7).

:class:`SqlStore` holds every query and every rule of :class:`~byteleap.validator.store.Store`.
A backend only supplies a :class:`Dialect` (``?`` or ``%s`` parameters, ``FOR UPDATE`` or not,
how to take the migration lock) and ``_transaction()``, which runs one transaction on one
connection and turns the driver's exceptions into :class:`StoreUnavailable` (retry) or
:class:`StoreError` (do not). The SQL itself is the subset both engines accept: ``ON CONFLICT ...
DO UPDATE``, ``RETURNING``, partial indexes, row values with ``VALUES`` lists.

Per-worker stats, one row per worker
------------------------------------
Scoring reads one ``workers`` row per worker and never raw events:

* ``availability``: :meth:`AvailabilityBitmap.to_bytes` (275 bytes for 169 h), updated by
  :meth:`SqlStore.mark_present` only when a new bucket is marked.
* ``history``: the worker's round outcomes as packed records of ``(finished_at float64, ok uint8,
  flops float64)`` (17 bytes each, one version byte in front; :func:`encode_history`). ``finish``
  appends in the same transaction that makes the challenges terminal, and trims on write to the
  entries within ``params.challenge_window_seconds`` of the newest one (``params`` given when the
  store is opened); :meth:`SqlStore.prune` trims every row to ``history_window_s`` before ``now``.
  So a row holds about one challenge window (45 entries, 766 bytes at the defaults).

:meth:`SqlStore.scoring_inputs` decodes all rows' histories in one numpy pass. Bitmaps whose
geometry differs from the requested :class:`ScoringParams` are resized (same bucket length) or
restarted empty (different bucket length), so a changed window never breaks scoring.

Cycles
------
A scoring cycle is stored as ``zlib(msgpack(NetworkScore))`` in one row, with a few typed columns
for listings; ``cycle()`` decodes back an equal :class:`NetworkScore`. Measured for 25 600 workers:
9.6 MiB of msgpack compress to 1.1 MiB (level 1; level 6 saves 10 % more), encode + compress
~60 ms, decode ~40 ms. One typed row per worker instead took 6.4 MiB (SQLite) to 9.1 MiB
(PostgreSQL) per cycle and 80-300 ms to insert, for queries nobody needs: ``byteleapctl scores``
explains one cycle at a time.

Device claims
-------------
The first (miner, worker) to report a UUID owns it (``device_claims``); any other claimant gets a
``device_conflicts`` row and that device is excluded. A claim is released only when the owner's own
miner stops reporting the device for that worker (a reinstalled worker, a moved GPU) or the owning
worker is pruned; releasing it drops its conflicts, and the next roster of a former loser claims
it. So two workers reporting one GPU at the same time never both count.

Leases
------
``lease_records`` holds the newest record of every ``(gateway_id, lease_id)``: typed columns for
scoring and rounds, plus the exact signed bytes and signature. The upsert only replaces a row with a
higher ``seq`` (``ON CONFLICT ... DO UPDATE ... WHERE lease_records.seq < excluded.seq``), so a
late, older record never undoes a newer one. ``lease_feeds`` holds each gateway's cursor;
:meth:`SqlStore.record_lease_page` stores a page and moves the cursor in one transaction, and only
from the cursor the reader started at (compare and set), so records and cursor never disagree.
Scoring reads the intervals of leases overlapping the window in the same transaction as the
workers; rows of leases whose ``active_until`` left the window are pruned.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from functools import lru_cache
from typing import Any, Final, NamedTuple

import msgspec
import numpy as np
import numpy.typing as npt

from ..core.lease import LeaseRecord, LeaseRecordError, SignedLeaseRecord
from ..core.scoring import (
    AvailabilityBitmap,
    NetworkScore,
    ScoringError,
    ScoringParams,
    WorkerInput,
)
from ..core.sqlstore import Dialect, Schema, SqlStoreBase, Tx
from .store import (
    SCHEMA_VERSION,
    ChallengeState,
    CycleRecord,
    DeviceConflict,
    IssuedChallenge,
    RosterWorker,
    StoreError,
    StoreStatus,
    VerifiedLease,
    WeightsRecord,
    WorkerRoundOutcome,
)
from .store_schema import MIGRATIONS, MIGRATIONS_TABLE, render

__all__ = [
    "HISTORY_DTYPE",
    "Dialect",
    "HistoryEntry",
    "SqlStore",
    "Tx",
    "decode_history",
    "encode_history",
]

if MIGRATIONS[-1].version != SCHEMA_VERSION:  # pragma: no cover - caught by any test run
    raise RuntimeError(f"SCHEMA_VERSION {SCHEMA_VERSION} != last migration {MIGRATIONS[-1]}")

_CHUNK: Final = 400
"""Rows per ``IN (...)`` list: far below both engines' parameter limits."""
_SCORING_BATCH: Final = 2048
"""Workers decoded together by ``scoring_inputs``."""
_ZLIB_LEVEL: Final = 1
"""Cycle blobs: level 1 already removes the repeated field names, higher levels buy ~nothing."""

# ---------------------------------------------------------------------------------------------
# History encoding
# ---------------------------------------------------------------------------------------------

HISTORY_VERSION: Final = 1
HISTORY_DTYPE: Final = np.dtype([("finished_at", "<f8"), ("ok", "u1"), ("flops", "<f8")])
"""One round outcome: packed (no padding), 17 bytes."""

HistoryArray = npt.NDArray[np.void]


class HistoryEntry(NamedTuple):
    finished_at: float
    ok: bool
    flops: float
    """Sum of the devices' verified FLOP/s when ``ok``, else 0."""


def encode_history(entries: Iterable[tuple[float, bool, float]]) -> bytes:
    """Pack outcomes for the ``workers.history`` column (version byte + 17-byte records)."""
    return _encode_array(np.array(list(entries), dtype=HISTORY_DTYPE))


def decode_history(blob: bytes | None) -> list[HistoryEntry]:
    """Inverse of :func:`encode_history`; ``None`` (no history yet) gives ``[]``."""
    arr = _history_array(blob)
    return [
        HistoryEntry(float(t), bool(ok), float(f))
        for t, ok, f in zip(
            arr["finished_at"].tolist(), arr["ok"].tolist(), arr["flops"].tolist(), strict=True
        )
    ]


def _encode_array(arr: HistoryArray) -> bytes:
    return bytes((HISTORY_VERSION,)) + arr.tobytes()


def _history_array(blob: bytes | None) -> HistoryArray:
    if blob is None or len(blob) == 0:
        return np.empty(0, dtype=HISTORY_DTYPE)
    if blob[0] != HISTORY_VERSION:
        raise StoreError(f"unsupported history encoding version {blob[0]}")
    if (len(blob) - 1) % HISTORY_DTYPE.itemsize:
        raise StoreError(f"history blob of {len(blob)} bytes is not whole records")
    arr = np.frombuffer(blob, dtype=HISTORY_DTYPE, offset=1)
    if not _sane(arr).all():
        raise StoreError("history holds a non-finite time or throughput, or a bad success flag")
    return arr


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@lru_cache(maxsize=256)
def _in(sql: str, n: int, width: int = 1) -> str:
    """``sql`` with its ``?...`` spelled for ``n`` values (``?, ?``) or ``n`` rows of ``width``
    (``(?, ?), (?, ?)``)."""
    one = "?" if width == 1 else "(" + ", ".join("?" * width) + ")"
    return sql.replace("?...", ", ".join([one] * n))


# ---------------------------------------------------------------------------------------------
# Input checks (the validator checked the wire; these catch a caller's bug before it is stored)
# ---------------------------------------------------------------------------------------------


def _text(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise StoreError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _time(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise StoreError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _optional_time(name: str, value: object) -> float | None:
    return None if value is None else _time(name, value)


def _non_negative(name: str, value: object) -> float:
    number = _time(name, value)
    if number < 0:
        raise StoreError(f"{name} must be >= 0, got {value!r}")
    return number


def _integer(name: str, value: object, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise StoreError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value >= 1 << 63:
        raise StoreError(f"{name} does not fit in 64 bits: {value!r}")
    return value


def _blob(name: str, value: object) -> bytes:
    if not isinstance(value, bytes) or not value:
        raise StoreError(f"{name} must be non-empty bytes")
    return value


def _bitmap_for(blob: bytes | None, params: ScoringParams, where: str) -> AvailabilityBitmap:
    """The stored bitmap in ``params``' geometry (resized, or empty if the bucket changed)."""
    if blob is None:
        return AvailabilityBitmap.empty(params)
    try:
        bitmap = AvailabilityBitmap.from_bytes(bytes(blob))
    except ScoringError as exc:
        raise StoreError(f"availability of {where} is corrupt: {exc}") from None
    if bitmap.bucket_seconds != params.bucket_seconds:
        return AvailabilityBitmap.empty(params)
    if bitmap.n_buckets != params.window_buckets:
        return bitmap.resized(params.window_buckets)
    return bitmap


_STATES: Final = {s.value: s for s in ChallengeState}
_NETWORK_DECODER: Final = msgspec.msgpack.Decoder(NetworkScore)
_UIDS_DECODER: Final = msgspec.msgpack.Decoder(dict[str, int])
_WEIGHTS_DECODER: Final = msgspec.msgpack.Decoder(dict[int, float])
_ENCODER: Final = msgspec.msgpack.Encoder()
_DEVICES_ENCODER: Final = msgspec.json.Encoder()
_DEVICES_DECODER: Final = msgspec.json.Decoder(list[str])
_LEASE_DECODER: Final = msgspec.json.Decoder(LeaseRecord)
_LEASE_SELECT: Final = (
    "SELECT gateway_id, lease_id, seq, miner_hotkey, worker_id, device_uuids, lease_start,"
    " active_until, ended, issued_at FROM lease_records"
)


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------


class SqlStore(SqlStoreBase):
    """Everything of :class:`~byteleap.validator.store.Store` except connections.

    ``params`` gives new availability bitmaps their geometry and bounds the history kept per
    worker (the challenge window); pass the validator's scoring parameters.
    """

    def __init__(self, dialect: Dialect, location: str, params: ScoringParams) -> None:
        super().__init__(dialect, location, _SCHEMA)
        self._params = params

    # ---- schema --------------------------------------------------------------------------

    def status(self) -> StoreStatus:
        with self._transaction(write=False) as tx:
            version = self._version(tx)
            counts: list[Any] = [0] * 7
            last_cycle_at: float | None = None
            if version >= 1:
                row = tx.one(
                    "SELECT"
                    " (SELECT COUNT(*) FROM miners),"
                    " (SELECT COUNT(*) FROM workers),"
                    " (SELECT COUNT(*) FROM workers WHERE online = ?),"
                    " (SELECT COUNT(*) FROM challenges WHERE state IN ('issued', 'committed')),"
                    " (SELECT COUNT(*) FROM challenges),"
                    " (SELECT COUNT(*) FROM cycles),"
                    " (SELECT MAX(scored_at) FROM cycles)",
                    (True,),
                )
                assert row is not None  # an aggregate always returns a row
                counts = list(row)
                last_cycle_at = None if row[6] is None else float(row[6])
        return StoreStatus(
            backend=self.backend,
            location=self._location,
            schema_version=version,
            expected_version=SCHEMA_VERSION,
            miners=int(counts[0]),
            workers=int(counts[1]),
            online_workers=int(counts[2]),
            challenges_open=int(counts[3]),
            challenges_total=int(counts[4]),
            cycles=int(counts[5]),
            last_cycle_at=last_cycle_at,
        )

    # ---- roster and presence -------------------------------------------------------------

    def sync_roster(
        self, miner_hotkey: str, uid: int | None, workers: Sequence[RosterWorker], now: float
    ) -> list[DeviceConflict]:
        miner = _text("miner_hotkey", miner_hotkey)
        at = _time("now", now)
        if uid is not None:
            _integer("uid", uid)
        listed: list[RosterWorker] = []
        seen: set[str] = set()
        for worker in workers:
            wid = _text("worker_id", worker.worker_id)
            if wid in seen:
                raise StoreError(f"worker {wid!r} listed twice in the roster of {miner!r}")
            seen.add(wid)
            uuids = [_text("device uuid", d.uuid) for d in worker.devices]
            if len(set(uuids)) != len(uuids):
                raise StoreError(f"worker {wid!r} lists a device twice")
            if not set(worker.leased_devices) <= set(uuids):
                raise StoreError(f"worker {wid!r} leases a device it does not list")
            for d in worker.devices:
                _integer("mem_bytes", d.mem_bytes)
            listed.append(worker)

        with self._transaction(write=True) as tx:
            tx.execute(
                "INSERT INTO miners (hotkey, uid, first_seen, last_seen) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (hotkey) DO UPDATE SET uid = excluded.uid,"
                " last_seen = excluded.last_seen",
                (miner, uid, at, at),
            )
            known = {
                r[0]: float(r[1])
                for r in tx.all(
                    "SELECT worker_id, last_seen FROM workers WHERE miner_hotkey = ?", (miner,)
                )
            }
            # Listed online: seen now. Listed offline: last_seen stays (only presence counts).
            tx.many(
                "INSERT INTO workers (miner_hotkey, worker_id, online, first_seen, last_seen)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (miner_hotkey, worker_id) DO UPDATE"
                " SET online = excluded.online, last_seen = excluded.last_seen",
                [
                    (
                        miner,
                        w.worker_id,
                        bool(w.online),
                        at,
                        max(at, known.get(w.worker_id, at))
                        if w.online
                        else known.get(w.worker_id, at),
                    )
                    for w in listed
                ],
            )
            absent = sorted(set(known) - seen)
            for chunk in _chunks(absent):
                tx.execute(
                    _in(
                        "UPDATE workers SET online = ?"
                        " WHERE miner_hotkey = ? AND worker_id IN (?...)",
                        len(chunk),
                    ),
                    (False, miner, *chunk),
                )

            # The roster replaces what this miner's workers report, and releases its claims on
            # devices it no longer reports (see the module docstring).
            tx.execute("DELETE FROM worker_devices WHERE miner_hotkey = ?", (miner,))
            tx.many(
                "INSERT INTO worker_devices"
                " (miner_hotkey, worker_id, uuid, name, mem_bytes, leased)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (miner, w.worker_id, d.uuid, d.name, d.mem_bytes, d.uuid in w.leased_devices)
                    for w in listed
                    for d in w.devices
                ],
            )
            reported = {(w.worker_id, d.uuid) for w in listed for d in w.devices}
            released = [
                uuid
                for uuid, wid in tx.all(
                    "SELECT uuid, worker_id FROM device_claims WHERE miner_hotkey = ?", (miner,)
                )
                if (wid, uuid) not in reported
            ]
            for chunk in _chunks(released):
                tx.execute(_in("DELETE FROM device_claims WHERE uuid IN (?...)", len(chunk)), chunk)
            claims = [(d.uuid, w.worker_id) for w in listed for d in w.devices]
            tx.many(
                "INSERT INTO device_claims (uuid, miner_hotkey, worker_id, first_seen, last_seen)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (uuid) DO UPDATE"
                " SET last_seen = excluded.last_seen"
                " WHERE device_claims.miner_hotkey = excluded.miner_hotkey"
                " AND device_claims.worker_id = excluded.worker_id",
                [(uuid, miner, wid, at, at) for uuid, wid in claims],
            )
            owners: dict[str, tuple[str, str]] = {}
            uuids = sorted({uuid for uuid, _ in claims})
            for chunk in _chunks(uuids):
                for uuid, owner_miner, owner_worker in tx.all(
                    _in(
                        "SELECT uuid, miner_hotkey, worker_id FROM device_claims"
                        " WHERE uuid IN (?...)",
                        len(chunk),
                    ),
                    chunk,
                ):
                    owners[uuid] = (owner_miner, owner_worker)
            tx.many(
                "INSERT INTO device_conflicts"
                " (uuid, miner_hotkey, worker_id, first_seen, last_seen) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (uuid, miner_hotkey, worker_id) DO UPDATE"
                " SET last_seen = excluded.last_seen",
                [
                    (uuid, miner, wid, at, at)
                    for uuid, wid in claims
                    if owners.get(uuid) != (miner, wid)
                ],
            )
            # A claimant that stopped reporting a device no longer conflicts over it.
            stale = [
                (uuid, wid)
                for uuid, wid in tx.all(
                    "SELECT uuid, worker_id FROM device_conflicts WHERE miner_hotkey = ?", (miner,)
                )
                if (wid, uuid) not in reported
            ]
            tx.many(
                "DELETE FROM device_conflicts"
                " WHERE uuid = ? AND miner_hotkey = ? AND worker_id = ?",
                [(uuid, miner, wid) for uuid, wid in stale],
            )
            rows = tx.all(
                _CONFLICTS_SQL
                + " WHERE c.miner_hotkey = ? OR o.miner_hotkey = ?"
                + _CONFLICTS_ORDER,
                (miner, miner),
            )
        return [_conflict(r) for r in rows]

    def conflicts(self) -> list[DeviceConflict]:
        """Every recorded device conflict (``byteleapctl`` and tests)."""
        with self._transaction(write=False) as tx:
            rows = tx.all(_CONFLICTS_SQL + _CONFLICTS_ORDER)
        return [_conflict(r) for r in rows]

    def excluded_devices(self) -> set[tuple[str, str, str]]:
        with self._transaction(write=False) as tx:
            rows = tx.all("SELECT miner_hotkey, worker_id, uuid FROM device_conflicts")
        return {(str(m), str(w), str(u)) for m, w, u in rows}

    def mark_offline(self, miner_hotkey: str, now: float) -> None:
        miner = _text("miner_hotkey", miner_hotkey)
        _time("now", now)
        with self._transaction(write=True) as tx:
            tx.execute("UPDATE workers SET online = ? WHERE miner_hotkey = ?", (False, miner))

    def mark_present(self, workers: Iterable[tuple[str, str]], now: float) -> None:
        """Unknown (miner, worker) pairs are ignored: presence needs a roster first."""
        at = _time("now", now)
        keys = sorted({(_text("miner_hotkey", m), _text("worker_id", w)) for m, w in workers})
        if not keys:
            return
        with self._transaction(write=True) as tx:
            updates: list[tuple[bytes, float, str, str]] = []
            for chunk in _chunks(keys):
                rows = tx.all(
                    _in(
                        "SELECT miner_hotkey, worker_id, availability, last_seen FROM workers"
                        " WHERE (miner_hotkey, worker_id) IN (VALUES ?...)"
                        " ORDER BY miner_hotkey, worker_id FOR UPDATE",
                        len(chunk),
                        2,
                    ),
                    [part for key in chunk for part in key],
                )
                for miner, wid, blob, last_seen in rows:
                    before = _bitmap_for(blob, self._params, f"worker {wid!r} of {miner!r}")
                    after = before.mark(at)
                    if after is not before or blob is None:
                        updates.append((after.to_bytes(), max(at, float(last_seen)), miner, wid))
            tx.many(
                "UPDATE workers SET availability = ?, last_seen = ?"
                " WHERE miner_hotkey = ? AND worker_id = ?",
                updates,
            )

    def availability(self, miner_hotkey: str, worker_id: str) -> AvailabilityBitmap | None:
        """The stored bitmap of one worker (``byteleapctl`` and tests); None if unknown."""
        with self._transaction(write=False) as tx:
            row = tx.one(
                "SELECT availability FROM workers WHERE miner_hotkey = ? AND worker_id = ?",
                (miner_hotkey, worker_id),
            )
        if row is None:
            return None
        return _bitmap_for(row[0], self._params, f"worker {worker_id!r} of {miner_hotkey!r}")

    def history(self, miner_hotkey: str, worker_id: str) -> list[HistoryEntry]:
        """One worker's stored round outcomes, oldest first (``byteleapctl`` and tests)."""
        with self._transaction(write=False) as tx:
            row = tx.one(
                "SELECT history FROM workers WHERE miner_hotkey = ? AND worker_id = ?",
                (miner_hotkey, worker_id),
            )
        return [] if row is None else decode_history(row[0])

    # ---- challenges ----------------------------------------------------------------------

    def issue(self, challenges: Sequence[IssuedChallenge]) -> None:
        """Re-issuing an id raises :class:`StoreError`, except the identical still-``issued``
        challenge (a retried call whose first attempt committed): that is a no-op."""
        rows: dict[bytes, tuple[object, ...]] = {}
        for c in challenges:
            cid = _blob("challenge_id", c.challenge_id)
            if cid in rows:
                raise StoreError(f"challenge {cid.hex()} given twice")
            rows[cid] = (
                cid,
                _integer("round_id", c.round_id),
                _text("miner_hotkey", c.miner_hotkey),
                _text("worker_id", c.worker_id),
                _text("device_uuid", c.device_uuid),
                _integer("n", c.n, 1),
                _text("precision", c.precision),
                _blob("seed", c.seed),
                _time("issued_at", c.issued_at),
            )
        if not rows:
            return
        with self._transaction(write=True) as tx:
            ids = list(rows)
            for chunk in _chunks(ids):
                for existing in tx.all(
                    _in(
                        "SELECT challenge_id, round_id, miner_hotkey, worker_id, device_uuid, n,"
                        " precision, seed, issued_at, state FROM challenges"
                        " WHERE challenge_id IN (?...)",
                        len(chunk),
                    ),
                    chunk,
                ):
                    cid = bytes(existing[0])
                    same = (cid, *existing[1:7], bytes(existing[7]), float(existing[8]))
                    if same != rows[cid] or existing[9] != ChallengeState.ISSUED.value:
                        raise StoreError(f"challenge {cid.hex()} was already issued")
                    del rows[cid]
            tx.many(
                "INSERT INTO challenges (challenge_id, round_id, miner_hotkey, worker_id,"
                " device_uuid, n, precision, seed, issued_at, state)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(*row, ChallengeState.ISSUED.value) for row in rows.values()],
            )

    def record_commit(self, challenge_id: bytes, merkle_root: bytes, committed_at: float) -> None:
        """Unknown challenge ids raise :class:`StoreError`."""
        cid = _blob("challenge_id", challenge_id)
        root = _blob("merkle_root", merkle_root)
        at = _time("committed_at", committed_at)
        with self._transaction(write=True) as tx:
            changed = tx.execute(
                "UPDATE challenges SET state = ?, merkle_root = ?, committed_at = ?"
                " WHERE challenge_id = ? AND state = ?",
                (ChallengeState.COMMITTED.value, root, at, cid, ChallengeState.ISSUED.value),
            )
            if changed == 0 and not tx.one(
                "SELECT 1 FROM challenges WHERE challenge_id = ?", (cid,)
            ):
                raise StoreError(f"unknown challenge {cid.hex()}")

    def finish(self, outcome: WorkerRoundOutcome) -> bool:
        """Unknown challenges, or ones of another worker or round, raise :class:`StoreError`."""
        miner = _text("miner_hotkey", outcome.miner_hotkey)
        wid = _text("worker_id", outcome.worker_id)
        finished_at = _time("finished_at", outcome.finished_at)
        round_id = _integer("round_id", outcome.round_id)
        if not outcome.devices:
            raise StoreError(f"round {round_id} of worker {wid!r} has no device outcome")
        updates: list[tuple[object, ...]] = []
        ids: list[bytes] = []
        for d in outcome.devices:
            cid = _blob("challenge_id", d.challenge_id)
            if not isinstance(d.state, ChallengeState) or not d.state.terminal:
                raise StoreError(f"challenge {cid.hex()} must end terminal, not {d.state!r}")
            if d.flops is not None:
                _non_negative("flops", d.flops)
                if d.state is not ChallengeState.VERIFIED:
                    raise StoreError(f"challenge {cid.hex()} has a throughput but did not verify")
            root = None if d.merkle_root is None else _blob("merkle_root", d.merkle_root)
            updates.append(
                (
                    d.state.value,
                    _text("reason", d.reason),
                    root,
                    _optional_time("committed_at", d.committed_at),
                    finished_at,
                    _optional_time("rtt_s", d.rtt_s),
                    _optional_time("elapsed_s", d.elapsed_s),
                    d.flops,
                    cid,
                )
            )
            ids.append(cid)
        ids.sort()
        if len(set(ids)) != len(ids):
            raise StoreError(f"round {round_id} of worker {wid!r} names a challenge twice")
        flops = outcome.flops
        entry_flops = _non_negative("flops", flops) if flops is not None else 0.0

        with self._transaction(write=True) as tx:
            found: dict[bytes, tuple[Any, ...]] = {}
            for chunk in _chunks(ids):
                for row in tx.all(
                    _in(
                        "SELECT challenge_id, round_id, miner_hotkey, worker_id, state"
                        " FROM challenges WHERE challenge_id IN (?...)"
                        " ORDER BY challenge_id FOR UPDATE",
                        len(chunk),
                    ),
                    chunk,
                ):
                    found[bytes(row[0])] = row
            for cid in ids:
                known = found.get(cid)
                if known is None:
                    raise StoreError(f"unknown challenge {cid.hex()}")
                if (int(known[1]), known[2], known[3]) != (round_id, miner, wid):
                    raise StoreError(
                        f"challenge {cid.hex()} belongs to round {known[1]} of worker "
                        f"{known[3]!r} of {known[2]!r}, not round {round_id} of worker {wid!r} "
                        f"of {miner!r}"
                    )
            if any(_STATES[known[4]].terminal for known in found.values()):
                return False
            tx.many(
                "UPDATE challenges SET state = ?, reason = ?,"
                " merkle_root = COALESCE(?, merkle_root), committed_at = COALESCE(?, committed_at),"
                " finished_at = ?, rtt_s = ?, elapsed_s = ?, flops = ? WHERE challenge_id = ?",
                updates,
            )
            stats = tx.one(
                "SELECT history FROM workers WHERE miner_hotkey = ? AND worker_id = ? FOR UPDATE",
                (miner, wid),
            )
            if stats is None:  # pruned (or never listed) since the challenge was issued
                tx.execute(
                    "INSERT INTO miners (hotkey, uid, first_seen, last_seen) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (hotkey) DO NOTHING",
                    (miner, None, finished_at, finished_at),
                )
                tx.execute(
                    "INSERT INTO workers (miner_hotkey, worker_id, online, first_seen, last_seen)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (miner, wid, False, finished_at, finished_at),
                )
            history = _history_array(None if stats is None else stats[0])
            newest = max(finished_at, float(history["finished_at"].max(initial=finished_at)))
            kept = history[history["finished_at"] >= newest - self._params.challenge_window_seconds]
            entry = np.array([(finished_at, outcome.ok, entry_flops)], dtype=HISTORY_DTYPE)
            tx.execute(
                "UPDATE workers SET history = ? WHERE miner_hotkey = ? AND worker_id = ?",
                (_encode_array(np.concatenate([kept, entry])), miner, wid),
            )
        return True

    def sweep_unfinished(self, now: float, reason: str) -> int:
        at = _time("now", now)
        why = _text("reason", reason)
        with self._transaction(write=True) as tx:
            return tx.execute(
                "UPDATE challenges SET state = ?, reason = ?, finished_at = ?"
                " WHERE state IN ('issued', 'committed')",
                (ChallengeState.EXPIRED.value, why, at),
            )

    def challenge_states(self, round_id: int | None = None) -> dict[bytes, ChallengeState]:
        with self._transaction(write=False) as tx:
            if round_id is None:
                rows = tx.all("SELECT challenge_id, state FROM challenges")
            else:
                rows = tx.all(
                    "SELECT challenge_id, state FROM challenges WHERE round_id = ?",
                    (_integer("round_id", round_id),),
                )
        return {bytes(cid): _STATES[state] for cid, state in rows}

    # ---- scoring -------------------------------------------------------------------------

    def scoring_inputs(
        self,
        now: float,
        params: ScoringParams,
        *,
        lease_gateways: Collection[str] | None = None,
    ) -> list[WorkerInput]:
        """Workers whose ``last_seen`` (online in a roster, or present) is in the window.

        Outcomes count when ``challenge_window_start <= finished_at <= now``. A lease counts
        for the (miner, worker) its record names and nobody else, when its ``active_until`` is
        in the window and its gateway is in ``lease_gateways`` (None: any); a lease of a worker
        without a row here credits nothing (it was never seen, so it has no availability).
        """
        at = _time("now", now)
        window_start = at - params.window_seconds
        trusted = None if lease_gateways is None else frozenset(lease_gateways)
        leases: dict[tuple[str, str], list[tuple[float, float]]] = {}
        with self._transaction(write=False) as tx:
            rows = list(
                tx.stream(
                    "SELECT miner_hotkey, worker_id, availability, history FROM workers"
                    " WHERE last_seen >= ? ORDER BY miner_hotkey, worker_id",
                    (window_start,),
                )
            )
            if trusted is None or trusted:
                for gateway_id, miner, wid, start, until in tx.all(
                    "SELECT gateway_id, miner_hotkey, worker_id, lease_start, active_until"
                    " FROM lease_records WHERE active_until >= ?"
                    " ORDER BY miner_hotkey, worker_id, lease_start",
                    (window_start,),
                ):
                    if trusted is None or gateway_id in trusted:
                        leases.setdefault((miner, wid), []).append((float(start), float(until)))
        inputs: list[WorkerInput] = []
        # In batches, dropping each batch's rows when done: bounds the decoding's extra memory.
        for start in range(0, len(rows), _SCORING_BATCH):
            batch = rows[start : start + _SCORING_BATCH]
            rows[start : start + _SCORING_BATCH] = [()] * len(batch)
            inputs.extend(_worker_inputs(batch, at, params, leases))
        return inputs

    # ---- leases --------------------------------------------------------------------------

    def lease_cursor(self, gateway_id: str) -> int:
        gid = _text("gateway_id", gateway_id)
        with self._transaction(write=False) as tx:
            row = tx.one("SELECT last_seq FROM lease_feeds WHERE gateway_id = ?", (gid,))
        return 0 if row is None else int(row[0])

    def record_lease_page(
        self, gateway_id: str, after: int, leases: Sequence[VerifiedLease], now: float
    ) -> int:
        gid = _text("gateway_id", gateway_id)
        start = _integer("after", after)
        at = _time("now", now)
        if not leases:
            raise StoreError(f"no lease records to store for gateway {gid}")
        rows: list[tuple[object, ...]] = []
        for offset, (record, signed) in enumerate(leases):
            if record.gateway_id != gid:
                raise StoreError(
                    f"a lease record of gateway {record.gateway_id} in the feed of {gid}"
                )
            if record.seq != start + 1 + offset:
                raise StoreError(
                    f"lease records of gateway {gid} must follow seq {start} without a gap: "
                    f"got {record.seq} at position {offset + 1}"
                )
            try:
                record.check()
            except LeaseRecordError as exc:
                raise StoreError(str(exc)) from None
            rows.append(
                (
                    gid,
                    record.lease_id,
                    record.seq,
                    record.miner_hotkey,
                    record.worker_id,
                    _DEVICES_ENCODER.encode(record.device_uuids).decode(),
                    record.start,
                    record.active_until,
                    record.ended,
                    record.issued_at,
                    _blob("signed record", signed.record),
                    _blob("signature", signed.signature),
                    at,
                )
            )
        last = start + len(rows)
        with self._transaction(write=True) as tx:
            row = tx.one("SELECT last_seq FROM lease_feeds WHERE gateway_id = ? FOR UPDATE", (gid,))
            current = 0 if row is None else int(row[0])
            if current == last:  # a retry whose first attempt committed
                return last
            if current != start:
                raise StoreError(
                    f"the lease feed cursor of gateway {gid} is at {current}, not {start}: "
                    "another reader stored records meanwhile"
                )
            # Oldest first, and only ever replacing a lower seq: the newest record wins.
            tx.many(
                "INSERT INTO lease_records (gateway_id, lease_id, seq, miner_hotkey, worker_id,"
                " device_uuids, lease_start, active_until, ended, issued_at, signed_record,"
                " signature, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (gateway_id, lease_id) DO UPDATE SET seq = excluded.seq,"
                " miner_hotkey = excluded.miner_hotkey, worker_id = excluded.worker_id,"
                " device_uuids = excluded.device_uuids, lease_start = excluded.lease_start,"
                " active_until = excluded.active_until, ended = excluded.ended,"
                " issued_at = excluded.issued_at, signed_record = excluded.signed_record,"
                " signature = excluded.signature, received_at = excluded.received_at"
                " WHERE lease_records.seq < excluded.seq",
                rows,
            )
            tx.execute(
                "INSERT INTO lease_feeds (gateway_id, last_seq, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (gateway_id) DO UPDATE SET last_seq = excluded.last_seq,"
                " updated_at = excluded.updated_at",
                (gid, last, at),
            )
        return last

    def active_leases(self, since: float) -> list[LeaseRecord]:
        """Ordered by gateway and lease id."""
        cutoff = _time("since", since)
        with self._transaction(write=False) as tx:
            rows = tx.all(
                _LEASE_SELECT
                + " WHERE ended = ? AND active_until >= ? ORDER BY gateway_id, lease_id",
                (False, cutoff),
            )
        return [_lease_record(r) for r in rows]

    def leases(self, gateway_id: str | None = None) -> list[VerifiedLease]:
        """Every stored lease (of one gateway) with the bytes its gateway signed, ordered by
        gateway and lease id (``byteleapctl`` and tests)."""
        query = "SELECT signed_record, signature FROM lease_records"
        params: tuple[object, ...] = ()
        if gateway_id is not None:
            query += " WHERE gateway_id = ?"
            params = (gateway_id,)
        with self._transaction(write=False) as tx:
            rows = tx.all(query + " ORDER BY gateway_id, lease_id", params)
        out = []
        for data, signature in rows:
            signed = SignedLeaseRecord(record=bytes(data), signature=bytes(signature))
            try:
                record = _LEASE_DECODER.decode(signed.record)
            except msgspec.DecodeError as exc:
                raise StoreError(f"a stored lease record is corrupt: {exc}") from None
            out.append(VerifiedLease(record, signed))
        return out

    def record_cycle(
        self, result: NetworkScore, *, block: int | None, uids: Mapping[str, int]
    ) -> int:
        """A second call with the same ``result.now`` (a retry) returns the first cycle's id;
        with a different result for that time it raises :class:`StoreError`."""
        if block is not None:
            _integer("block", block)
        uid_map = {_text("miner hotkey", hk): _integer("uid", uid) for hk, uid in uids.items()}
        packed = _ENCODER.encode(result)
        uids_blob = _ENCODER.encode(dict(sorted(uid_map.items())))
        with self._transaction(write=True) as tx:
            row = tx.one(
                "INSERT INTO cycles (scored_at, block, miners, workers, uids, result)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (scored_at) DO NOTHING RETURNING cycle_id",
                (
                    _time("result.now", result.now),
                    block,
                    len(result.miners),
                    len(result.workers),
                    uids_blob,
                    zlib.compress(packed, _ZLIB_LEVEL),
                ),
            )
            if row is not None:
                return int(row[0])
            existing = tx.one(
                "SELECT cycle_id, block, uids, result FROM cycles WHERE scored_at = ?",
                (result.now,),
            )
        assert existing is not None  # the insert conflicted on it
        cycle_id, old_block, old_uids, old_result = existing
        if (old_block, bytes(old_uids), _inflate(bytes(old_result), cycle_id)) != (
            block,
            uids_blob,
            packed,
        ):
            raise StoreError(f"a different cycle was already recorded for time {result.now}")
        return int(cycle_id)

    def record_weights(self, cycle_id: int, record: WeightsRecord) -> None:
        """Recording the same (cycle, time, status) twice is a no-op (a retried call)."""
        cid = _integer("cycle_id", cycle_id, 1)
        weights = {
            _integer("uid", uid): _non_negative(f"weight of uid {uid}", w)
            for uid, w in record.weights.items()
        }
        values = (
            cid,
            _time("at", record.at),
            _text("status", record.status),
            None if record.block is None else _integer("block", record.block),
            record.path,
            record.message,
            _ENCODER.encode(weights),
        )
        with self._transaction(write=True) as tx:
            if tx.one("SELECT 1 FROM cycles WHERE cycle_id = ?", (cid,)) is None:
                raise StoreError(f"no cycle {cid} to record weights for")
            tx.execute(
                "INSERT INTO weights (cycle_id, at, status, block, path, message, weights)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (cycle_id, at, status) DO NOTHING",
                values,
            )

    def latest_cycle(self) -> CycleRecord | None:
        return self._cycle(
            "SELECT cycle_id, scored_at, block, uids, result FROM cycles"
            " ORDER BY cycle_id DESC LIMIT 1",
            (),
        )

    def cycle(self, cycle_id: int) -> CycleRecord | None:
        return self._cycle(
            "SELECT cycle_id, scored_at, block, uids, result FROM cycles WHERE cycle_id = ?",
            (_integer("cycle_id", cycle_id),),
        )

    def _cycle(self, query: str, params: Sequence[object]) -> CycleRecord | None:
        with self._transaction(write=False) as tx:
            row = tx.one(query, params)
            if row is None:
                return None
            weights = tx.one(
                "SELECT at, status, block, path, message, weights FROM weights WHERE cycle_id = ?"
                " ORDER BY at DESC, weights_id DESC LIMIT 1",
                (row[0],),
            )
        cycle_id = int(row[0])
        try:
            result = _NETWORK_DECODER.decode(_inflate(bytes(row[4]), cycle_id))
            uids = _UIDS_DECODER.decode(bytes(row[3]))
        except (msgspec.DecodeError, ScoringError) as exc:
            raise StoreError(f"cycle {cycle_id} is corrupt: {exc}") from None
        return CycleRecord(
            cycle_id=cycle_id,
            at=float(row[1]),
            block=None if row[2] is None else int(row[2]),
            uids=uids,
            result=result,
            weights=None if weights is None else _weights(weights),
        )

    def last_submitted_weights(self) -> WeightsRecord | None:
        with self._transaction(write=False) as tx:
            row = tx.one(
                "SELECT at, status, block, path, message, weights FROM weights WHERE status = ?"
                " ORDER BY at DESC, weights_id DESC LIMIT 1",
                ("submitted",),
            )
        return None if row is None else _weights(row)

    # ---- retention -----------------------------------------------------------------------

    def prune(
        self, now: float, *, keep_challenges_s: float, keep_cycles: int, history_window_s: float
    ) -> int:
        """Deletes terminal challenges finished before ``now - keep_challenges_s``; cycles other
        than the newest ``keep_cycles`` and the one holding the last submitted weights (their
        weights go with them); history entries before ``now - history_window_s``; workers whose
        ``last_seen`` is older than the store's availability window (with their devices, claims
        and conflicts), miners left without workers, and leases whose ``active_until`` is older
        than that window (the feed cursors stay). Returns challenges + cycles + history entries
        + workers + miners + leases deleted."""
        at = _time("now", now)
        keep_s = _non_negative("keep_challenges_s", keep_challenges_s)
        keep_n = _integer("keep_cycles", keep_cycles)
        history_from = at - _non_negative("history_window_s", history_window_s)
        worker_cutoff = at - self._params.window_seconds
        deleted = 0
        with self._transaction(write=True) as tx:
            deleted += tx.execute(
                "DELETE FROM challenges WHERE state IN ('verified', 'failed', 'expired')"
                " AND finished_at < ?",
                (at - keep_s,),
            )
            deleted += tx.execute(
                "DELETE FROM cycles WHERE cycle_id NOT IN"
                " (SELECT cycle_id FROM cycles ORDER BY cycle_id DESC LIMIT ?)"
                " AND cycle_id NOT IN (SELECT cycle_id FROM weights WHERE status = ?"
                " ORDER BY at DESC, weights_id DESC LIMIT 1)",
                (keep_n, "submitted"),
            )
            deleted += tx.execute("DELETE FROM workers WHERE last_seen < ?", (worker_cutoff,))
            deleted += tx.execute(
                "DELETE FROM lease_records WHERE active_until < ?", (worker_cutoff,)
            )
            deleted += tx.execute(
                "DELETE FROM miners WHERE last_seen < ? AND NOT EXISTS"
                " (SELECT 1 FROM workers WHERE workers.miner_hotkey = miners.hotkey)",
                (worker_cutoff,),
            )
            trimmed: list[tuple[bytes | None, str, str]] = []
            for miner, wid, blob in tx.stream(
                "SELECT miner_hotkey, worker_id, history FROM workers WHERE history IS NOT NULL"
                " ORDER BY miner_hotkey, worker_id FOR UPDATE"
            ):
                history = _history_array(bytes(blob))
                kept = history[history["finished_at"] >= history_from]
                if len(kept) < len(history):
                    deleted += len(history) - len(kept)
                    trimmed.append((_encode_array(kept) if len(kept) else None, miner, wid))
            tx.many(
                "UPDATE workers SET history = ? WHERE miner_hotkey = ? AND worker_id = ?", trimmed
            )
        return deleted

    # ---- bulk loading ----------------------------------------------------------------------

    def load_worker_stats(
        self, rows: Iterable[tuple[str, str, AvailabilityBitmap, Sequence[HistoryEntry]]]
    ) -> int:
        """Overwrite availability and history of existing workers in bulk; returns how many.

        For restoring stats exported from another store and for benchmarks that need a full
        week of history without replaying it; the validator itself never calls this.
        """
        updates = [
            (
                bitmap.to_bytes(),
                encode_history(history) if history else None,
                _text("miner_hotkey", miner),
                _text("worker_id", wid),
            )
            for miner, wid, bitmap, history in rows
        ]
        with self._transaction(write=True) as tx:
            for chunk in _chunks(updates, 5000):
                tx.many(
                    "UPDATE workers SET availability = ?, history = ?"
                    " WHERE miner_hotkey = ? AND worker_id = ?",
                    chunk,
                )
        return len(updates)


# ---------------------------------------------------------------------------------------------
# Row helpers
# ---------------------------------------------------------------------------------------------


def _worker_inputs(
    rows: Sequence[tuple[Any, ...]],
    now: float,
    params: ScoringParams,
    leases: Mapping[tuple[str, str], Sequence[tuple[float, float]]],
) -> list[WorkerInput]:
    """WorkerInputs of ``(miner, worker, availability, history)`` rows: every history decoded
    and counted in one numpy pass; lease intervals from ``leases`` by (miner, worker)."""
    counts = np.zeros(len(rows), dtype=np.int64)
    parts: list[memoryview] = []
    for i, (_, _, _, history) in enumerate(rows):
        if history:
            view = memoryview(history)
            if view[0] != HISTORY_VERSION or (len(view) - 1) % HISTORY_DTYPE.itemsize:
                _history_array(bytes(history))  # raises, saying what is wrong
            counts[i] = (len(view) - 1) // HISTORY_DTYPE.itemsize
            parts.append(view[1:])
    entries = np.frombuffer(b"".join(parts), dtype=HISTORY_DTYPE)
    owner = np.repeat(np.arange(len(rows)), counts)
    sane = _sane(entries)
    if not sane.all():
        bad = rows[int(owner[~sane][0])]
        raise StoreError(f"history of worker {bad[1]!r} of {bad[0]!r} is corrupt")
    t = entries["finished_at"]
    in_window = (t >= now - params.challenge_window_seconds) & (t <= now)
    ok = entries["ok"].astype(bool)
    good = in_window & ok
    successes = np.bincount(owner[good], minlength=len(rows)).tolist()
    failures = np.bincount(owner[in_window & ~ok], minlength=len(rows)).tolist()
    flops = np.split(entries["flops"][good], np.cumsum(successes)[:-1])
    return [
        WorkerInput(
            miner_hotkey=miner,
            worker_id=wid,
            availability=_bitmap_for(blob, params, f"worker {wid!r} of {miner!r}"),
            lease_intervals=tuple(leases.get((miner, wid), ())),
            throughputs=flops[i].tolist(),
            successes=successes[i],
            failures=failures[i],
        )
        for i, (miner, wid, blob, _) in enumerate(rows)
    ]


def _sane(entries: HistoryArray) -> npt.NDArray[np.bool_]:
    """Per history entry: finite time and throughput, throughput >= 0, flag 0 or 1."""
    flops = entries["flops"]
    sane: npt.NDArray[np.bool_] = (
        np.isfinite(entries["finished_at"])
        & np.isfinite(flops)
        & (flops >= 0)
        & (entries["ok"] <= 1)
    )
    return sane


_CONFLICTS_SQL: Final = (
    "SELECT c.uuid, o.miner_hotkey, o.worker_id, c.miner_hotkey, c.worker_id,"
    " c.first_seen, c.last_seen FROM device_conflicts c JOIN device_claims o ON o.uuid = c.uuid"
)
_CONFLICTS_ORDER: Final = " ORDER BY c.uuid, c.miner_hotkey, c.worker_id"


_SCHEMA: Final = Schema(
    MIGRATIONS,
    MIGRATIONS_TABLE,
    render,
    too_new="database schema version {version} is newer than this code ({expected}): "
    "upgrade byteleap, or point it at another database",
    too_old="database schema is version {version}, this code needs {expected}: "
    "run 'byteleapctl db upgrade'",
)


def _inflate(blob: bytes, cycle_id: int) -> bytes:
    try:
        return zlib.decompress(blob)
    except zlib.error as exc:
        raise StoreError(f"cycle {cycle_id} is corrupt: {exc}") from None


def _lease_record(row: tuple[Any, ...]) -> LeaseRecord:
    """A :data:`_LEASE_SELECT` row as the record it came from."""
    try:
        devices = _DEVICES_DECODER.decode(row[5])
    except msgspec.DecodeError as exc:
        raise StoreError(f"lease {row[0]}/{row[1]} has corrupt devices: {exc}") from None
    return LeaseRecord(
        gateway_id=row[0],
        lease_id=row[1],
        seq=int(row[2]),
        miner_hotkey=row[3],
        worker_id=row[4],
        device_uuids=devices,
        start=float(row[6]),
        active_until=float(row[7]),
        ended=bool(row[8]),
        issued_at=float(row[9]),
    )


def _conflict(row: tuple[Any, ...]) -> DeviceConflict:
    return DeviceConflict(
        uuid=row[0],
        owner_miner=row[1],
        owner_worker=row[2],
        miner_hotkey=row[3],
        worker_id=row[4],
        first_seen=float(row[5]),
        last_seen=float(row[6]),
    )


def _weights(row: tuple[Any, ...]) -> WeightsRecord:
    try:
        weights = _WEIGHTS_DECODER.decode(bytes(row[5]))
    except msgspec.DecodeError as exc:
        raise StoreError(f"weights record is corrupt: {exc}") from None
    return WeightsRecord(
        at=float(row[0]),
        status=row[1],
        block=None if row[2] is None else int(row[2]),
        path=row[3],
        message=row[4],
        weights=weights,
    )
