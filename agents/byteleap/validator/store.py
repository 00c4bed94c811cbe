"""The validator's persistent state: one schema, two backends (DESIGN §7).

``sqlite:///path/validator.db`` (default, one box) and ``postgresql://...`` (production, psycopg 3
with a pool). Only ``validator/store*`` speaks SQL; everything else uses :class:`Store`.

The model
---------
* **miners / workers**: the latest roster each miner sent, per worker ``online`` and the devices
  it reports. Device UUIDs are unique network-wide: the first (miner, worker) to claim a UUID owns
  it; any other claimant is recorded as a conflict and that device is excluded from challenges.
* **worker stats**: per worker one availability bitmap (:class:`~byteleap.core.scoring.
  AvailabilityBitmap`, 254 bytes for 169 h) and a compact history of its round outcomes inside the
  challenge window (time, success, FLOP/s). Scoring reads one row per worker, never raw events.
* **challenges**: one row per device challenge, written *before* dispatch, moved through
  ``issued -> committed -> verified | failed | expired`` (terminal states never change). A
  worker's round is finished in one transaction that makes its challenges terminal and appends
  the outcome to its history, so a crash can neither lose nor double-count it; the startup sweep
  expires what a crash left open, without counting it against the worker (the validator failed,
  not the worker).
* **cycles**: every scoring cycle with every factor of every worker and miner (``byteleapctl
  scores`` explains any weight from this), and the outcome of its weights submission.
* **leases**: per ``(gateway_id, lease_id)`` the newest signed record read from that gateway's feed
  (the exact signed bytes are kept, so it can be verified again), and per gateway the feed cursor
  (the last sequence number stored). Records and cursor move together in one transaction
  (:meth:`Store.record_lease_page`); an older record never replaces a newer one.

All methods are synchronous and thread-safe; the validator calls them from worker threads.
Transient backend failures (PostgreSQL restarting, SQLite busy) raise :class:`StoreUnavailable`
so the caller can retry the same call; every write is idempotent for that reason.

Open a store with :func:`open_store` (the backend modules are imported only when used, so a
SQLite validator never loads psycopg); show a URL with :func:`redact_url`, never as given.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import NamedTuple, Protocol

import msgspec

from ..core.lease import LeaseRecord, SignedLeaseRecord
from ..core.scoring import DEFAULT_PARAMS, NetworkScore, ScoringParams, WorkerInput
from ..core.sqlstore import (
    DEFAULT_TIMEOUT_S,
    StoreError,
    StoreUnavailable,
    redact_url,
    store_scheme,
)

__all__ = [
    "SCHEMA_VERSION",
    "ChallengeState",
    "CycleRecord",
    "DeviceClaim",
    "DeviceConflict",
    "DeviceOutcome",
    "IssuedChallenge",
    "RosterWorker",
    "Store",
    "StoreError",
    "StoreStatus",
    "StoreUnavailable",
    "VerifiedLease",
    "WeightsRecord",
    "WorkerRoundOutcome",
    "open_store",
    "redact_url",
]

SCHEMA_VERSION = 2
"""The schema version this code needs; ``byteleapctl db upgrade`` brings a database to it."""


class ChallengeState(enum.StrEnum):
    ISSUED = "issued"
    COMMITTED = "committed"
    VERIFIED = "verified"
    FAILED = "failed"
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return self in (ChallengeState.VERIFIED, ChallengeState.FAILED, ChallengeState.EXPIRED)


class DeviceClaim(msgspec.Struct, frozen=True, kw_only=True):
    uuid: str
    name: str = ""
    mem_bytes: int = 0


class RosterWorker(msgspec.Struct, frozen=True, kw_only=True):
    worker_id: str
    online: bool
    devices: tuple[DeviceClaim, ...]
    leased_devices: tuple[str, ...] = ()


class DeviceConflict(msgspec.Struct, frozen=True, kw_only=True):
    """``uuid`` is owned by (owner_miner, owner_worker); (miner, worker) claimed it too."""

    uuid: str
    owner_miner: str
    owner_worker: str
    miner_hotkey: str
    worker_id: str
    first_seen: float
    last_seen: float


class IssuedChallenge(msgspec.Struct, frozen=True, kw_only=True):
    challenge_id: bytes
    round_id: int
    miner_hotkey: str
    worker_id: str
    device_uuid: str
    n: int
    precision: str
    seed: bytes
    issued_at: float
    """Unix time on the validator's clock."""


class DeviceOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """How one device challenge ended."""

    challenge_id: bytes
    state: ChallengeState
    """Terminal: verified, failed or expired."""
    reason: str
    """Stable code: ``ok``, a verifier reason, a wire error code name, ``no_commit``..."""
    merkle_root: bytes | None = None
    committed_at: float | None = None
    rtt_s: float | None = None
    elapsed_s: float | None = None
    """Dispatch to commit minus the measured round trip (the time the score uses)."""
    flops: float | None = None
    """2 n^3 / elapsed_s, for verified challenges only."""


class WorkerRoundOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """One worker's result in one round: all its device challenges, finished together.

    The worker succeeded when every device verified; its throughput is then the sum of its
    devices' FLOP/s. Anything else is one failure in its history.
    """

    round_id: int
    miner_hotkey: str
    worker_id: str
    finished_at: float
    devices: tuple[DeviceOutcome, ...]

    @property
    def ok(self) -> bool:
        return bool(self.devices) and all(d.state is ChallengeState.VERIFIED for d in self.devices)

    @property
    def flops(self) -> float | None:
        if not self.ok:
            return None
        return float(sum(d.flops or 0.0 for d in self.devices))


class WeightsRecord(msgspec.Struct, frozen=True, kw_only=True):
    at: float
    status: str
    """``submitted``, ``rate_limited``, ``unavailable``, ``rejected``, ``not_registered``,
    ``skipped`` (every score was 0)."""
    block: int | None = None
    path: str | None = None
    message: str = ""
    weights: dict[int, float] = {}
    """uid -> normalised weight as submitted."""


class CycleRecord(msgspec.Struct, frozen=True, kw_only=True):
    cycle_id: int
    at: float
    block: int | None
    uids: dict[str, int]
    """Miner hotkey -> uid at scoring time."""
    result: NetworkScore
    weights: WeightsRecord | None = None


class VerifiedLease(NamedTuple):
    """A lease record whose signature the feed reader checked, with the bytes it checked."""

    record: LeaseRecord
    signed: SignedLeaseRecord


class StoreStatus(msgspec.Struct, frozen=True, kw_only=True):
    backend: str
    """``sqlite`` or ``postgresql``."""
    location: str
    """Path or DSN with any password removed."""
    schema_version: int
    """0 for an empty database."""
    expected_version: int
    miners: int
    workers: int
    online_workers: int
    challenges_open: int
    challenges_total: int
    cycles: int
    last_cycle_at: float | None


class Store(Protocol):
    @property
    def backend(self) -> str: ...

    def close(self) -> None: ...

    # ---- schema ----------------------------------------------------------------------------

    def schema_version(self) -> int:
        """The database's version (0 when empty)."""
        ...

    def upgrade(self) -> list[int]:
        """Apply missing migrations in order, each in a transaction; returns those applied.

        A database newer than this code raises :class:`StoreError`.
        """
        ...

    def check(self) -> None:
        """Raise :class:`StoreError` unless the schema is exactly :data:`SCHEMA_VERSION`."""
        ...

    def status(self) -> StoreStatus: ...

    # ---- roster and presence ---------------------------------------------------------------

    def sync_roster(
        self, miner_hotkey: str, uid: int | None, workers: Sequence[RosterWorker], now: float
    ) -> list[DeviceConflict]:
        """Replace the miner's roster (workers absent from it are offline), claim devices
        (first claim wins) and return the conflicts that concern this miner's workers."""
        ...

    def excluded_devices(self) -> set[tuple[str, str, str]]:
        """(miner, worker, uuid) triples that must not be challenged (conflicting claims)."""
        ...

    def mark_offline(self, miner_hotkey: str, now: float) -> None:
        """The miner disconnected: its workers are offline until its next roster."""
        ...

    def mark_present(self, workers: Iterable[tuple[str, str]], now: float) -> None:
        """Set the ``now`` bucket in these (miner, worker) availability bitmaps (idempotent).

        Pairs that no roster listed are ignored. New bitmaps take the geometry of the
        ``params`` the store was opened with (:func:`open_store`)."""
        ...

    # ---- challenges ------------------------------------------------------------------------

    def issue(self, challenges: Sequence[IssuedChallenge]) -> None:
        """Record challenges as ``issued`` (before dispatch). Re-issuing an id raises
        :class:`StoreError`, except an identical challenge still ``issued`` (a retried call)."""
        ...

    def record_commit(self, challenge_id: bytes, merkle_root: bytes, committed_at: float) -> None:
        """``issued -> committed``; a no-op if the challenge is already past ``issued``.
        An unknown id raises :class:`StoreError`."""
        ...

    def finish(self, outcome: WorkerRoundOutcome) -> bool:
        """Make the worker's challenges terminal and append the outcome to its history, in one
        transaction. Returns False (and changes nothing) if any of them was already terminal,
        so replaying a finish never counts twice."""
        ...

    def sweep_unfinished(self, now: float, reason: str) -> int:
        """Expire every non-terminal challenge (not counted in any history); returns how many."""
        ...

    def challenge_states(self, round_id: int | None = None) -> dict[bytes, ChallengeState]:
        """challenge_id -> state, for one round or all (tests and ``byteleapctl``)."""
        ...

    # ---- scoring ---------------------------------------------------------------------------

    def scoring_inputs(
        self,
        now: float,
        params: ScoringParams,
        *,
        lease_gateways: Collection[str] | None = None,
    ) -> list[WorkerInput]:
        """One :class:`WorkerInput` per worker seen within the window: bitmap, outcomes in the
        challenge window (successes, failures, throughputs of successes) and the
        ``[start, active_until]`` of every stored lease signed for exactly that (miner, worker)
        that overlaps the window. ``lease_gateways``: only leases of these gateway ids count
        (the configured ones); None: every stored gateway's."""
        ...

    # ---- leases ----------------------------------------------------------------------------

    def lease_cursor(self, gateway_id: str) -> int:
        """The last sequence number stored from this gateway's feed (0 before the first)."""
        ...

    def record_lease_page(
        self, gateway_id: str, after: int, leases: Sequence[VerifiedLease], now: float
    ) -> int:
        """Store verified records ``after + 1, after + 2, ...`` of one gateway and move its cursor
        to the last of them, in one transaction; returns the new cursor.

        Per lease the record with the highest seq is kept. Records out of sequence, of another
        gateway, or a cursor that is no longer ``after`` raise :class:`StoreError` and change
        nothing; a retried call whose first attempt committed is a no-op."""
        ...

    def active_leases(self, since: float) -> list[LeaseRecord]:
        """The newest record of every lease that has not ended and whose ``active_until`` is
        at or after ``since``."""
        ...

    def record_cycle(
        self, result: NetworkScore, *, block: int | None, uids: Mapping[str, int]
    ) -> int:
        """Store a scoring cycle with every factor; returns its id. Retrying with the same
        result returns the same id; another result for the same ``result.now`` is an error."""
        ...

    def record_weights(self, cycle_id: int, record: WeightsRecord) -> None: ...

    def latest_cycle(self) -> CycleRecord | None: ...

    def cycle(self, cycle_id: int) -> CycleRecord | None: ...

    def last_submitted_weights(self) -> WeightsRecord | None:
        """The last weights the chain accepted (status ``submitted``)."""
        ...

    # ---- retention -------------------------------------------------------------------------

    def prune(
        self, now: float, *, keep_challenges_s: float, keep_cycles: int, history_window_s: float
    ) -> int:
        """Delete terminal challenges older than ``keep_challenges_s``, all but the newest
        ``keep_cycles`` cycles, history entries older than ``history_window_s``, workers not
        seen for longer than the availability window and leases whose ``active_until`` is
        before that window (they can no longer count); returns the number of challenges,
        cycles, history entries, workers, miners and leases deleted. The cycle holding the last
        submitted weights is kept whatever its age."""
        ...


# ---- opening a store ----------------------------------------------------------------------------


def open_store(
    url: str,
    *,
    params: ScoringParams = DEFAULT_PARAMS,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    pool_size: int = 4,
) -> Store:
    """Open ``sqlite:///relative/path``, ``sqlite:////absolute/path`` or ``postgresql://...``.

    ``params`` are the validator's scoring parameters: they give new availability bitmaps their
    geometry and bound the history kept per worker. ``timeout_s`` bounds every wait (connection,
    lock, statement); ``pool_size`` is PostgreSQL's connection pool size. Opening does not need
    the database to be reachable: an unreachable PostgreSQL makes each call raise
    :class:`StoreUnavailable` until it is back. Raises :class:`StoreError` for a URL that names no
    supported backend or a SQLite file that cannot be created.
    """
    if not (timeout_s > 0):
        raise StoreError(f"timeout_s must be > 0, got {timeout_s!r}")
    scheme = store_scheme(url)
    if scheme == "sqlite":
        from .store_sqlite import SQLiteStore

        return SQLiteStore.from_url(url, params=params, timeout_s=timeout_s)
    if scheme in ("postgresql", "postgres"):
        from .store_postgres import PostgresStore

        return PostgresStore(url, params=params, timeout_s=timeout_s, pool_size=pool_size)
    raise StoreError(
        f"unsupported store URL {redact_url(url)!r}: use sqlite:///path or postgresql://..."
    )
