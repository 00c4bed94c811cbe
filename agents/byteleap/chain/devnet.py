"""DevnetChain: a ChainPort on one SQLite file that several local processes share.

The one-box devnet (DESIGN §9) and the integration tests need a chain without a network. This
adapter keeps the subnet in a SQLite file (WAL mode, so one writer and many readers in different
processes do not block each other; a busy timeout for the rest) and derives the block height from
a clock::

    head = floor((clock() - genesis_unix) / block_time)

so every process agrees on the head without talking to each other, and tests drive time with a
manual clock instead of sleeping.

It enforces the rules the real chain (and bittensor 11.3's ``SetWeights`` preflight) enforces,
so that agent bugs surface offline: the acting hotkey must be registered (:class:`NotRegistered`)
and hold a validator permit to set weights (``NOT_AUTHORIZED``), the weights rate limit
(allowed when ``head - last_update >= weights_rate_limit``, else :class:`RateLimited` with the
blocks still to wait), weights are clipped and quantised to u16 exactly as the SDK does
(:mod:`byteleap.chain.weights`), submitted uids must exist and number at least
``min_allowed_weights`` (a single self-weight is exempt), and a subnet holds at most
``max_uids`` (<= 256) neurons.

Modelling choices (the devnet is not a blockchain):

* Commit-reveal: with ``commit_reveal`` on, weights are stored at once but become visible in
  :meth:`DevnetChain.weights` one tempo later (``TxOutcome.path == "timelocked"``,
  ``reveal_round`` = the block they become visible). The newest visible set of a validator wins.
* ``Neuron.last_update`` is the block of the last weights submission, 0 for never (the port's
  definition; a submission at block 0 still counts for the rate limit).
* ``Neuron.active``: the neuron registered or set weights within the last ``activity_cutoff``
  blocks (default 5000, the chain's default ``ActivityCutoff``), i.e.
  ``head - max(last_update, registered_at) <= activity_cutoff``.
* Validator permits and stake are set by the operator (:meth:`DevnetChain.set_permit`,
  :meth:`DevnetChain.set_stake`), not computed from stake ranks. Stake is in rao (1 TAO = 1e9).
* No deregistration and no serving rate limit.
* An outage switch (:meth:`DevnetChain.set_available`), stored in the file so every process sees
  it, makes every port method raise :class:`ChainUnavailable`; fault tests use it.

A missing file, a file that is not a devnet chain, a corrupt or locked database and the outage
switch all raise :class:`ChainUnavailable` whose message names the file and the cause. Each call
opens its own connection in a worker thread (``asyncio.to_thread``), so the event loop never
blocks on SQLite and an instance is safe to share between tasks and threads.

The admin API (:meth:`DevnetChain.create`, :meth:`~DevnetChain.register`, ...) is synchronous and
is what the devnet orchestrator, the CLI and the tests use to set a chain up.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import secrets
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from byteleap.core.identity import PeerIdentity

from .port import (
    DEFAULT_NETUID,
    MAX_UIDS,
    U16_MAX,
    ChainRejected,
    ChainUnavailable,
    Endpoint,
    Neuron,
    NotRegistered,
    RateLimited,
    SubnetSnapshot,
    TxOutcome,
    check_endpoint,
    check_ss58,
    check_version_key,
    check_weights_mapping,
)
from .weights import quantize_weights

__all__ = ["DEFAULT_ACTIVITY_CUTOFF", "DevnetChain"]

T = TypeVar("T")

SCHEMA_VERSION: Final = 1
DEFAULT_ACTIVITY_CUTOFF: Final = 5000
_MAX_INT64: Final = 2**63 - 1  # SQLite INTEGER; total TAO supply (2.1e16 rao) is far below
# Clocks set to exact block boundaries (genesis + k * block_time) can land a hair below k after
# the float division; this keeps such a clock on block k.
_BLOCK_ROUNDING: Final = 1e-9

_SCHEMA: Final = """
CREATE TABLE chain (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    schema_version INTEGER NOT NULL,
    genesis_unix REAL NOT NULL,
    block_time REAL NOT NULL,
    available INTEGER NOT NULL
);
CREATE TABLE subnet (
    netuid INTEGER PRIMARY KEY,
    tempo INTEGER NOT NULL,
    weights_rate_limit INTEGER NOT NULL,
    min_allowed_weights INTEGER NOT NULL,
    max_weight_limit INTEGER NOT NULL,
    commit_reveal INTEGER NOT NULL,
    max_uids INTEGER NOT NULL,
    activity_cutoff INTEGER NOT NULL
);
CREATE TABLE neuron (
    netuid INTEGER NOT NULL REFERENCES subnet (netuid),
    uid INTEGER NOT NULL,
    hotkey TEXT NOT NULL,
    coldkey TEXT NOT NULL,
    stake_rao INTEGER NOT NULL,
    validator_permit INTEGER NOT NULL,
    ip TEXT,
    port INTEGER,
    last_update INTEGER,  -- NULL: never set weights
    registered_at INTEGER NOT NULL,
    PRIMARY KEY (netuid, uid),
    UNIQUE (netuid, hotkey)
);
CREATE TABLE weights (
    netuid INTEGER NOT NULL,
    validator_uid INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    value INTEGER NOT NULL,
    committed_at INTEGER NOT NULL,
    visible_at INTEGER NOT NULL,
    PRIMARY KEY (netuid, validator_uid, committed_at, uid)
);
"""

_LATEST_VISIBLE_WEIGHTS: Final = """
SELECT w.validator_uid, w.uid, w.value
FROM weights AS w
JOIN (
    SELECT validator_uid, MAX(committed_at) AS committed_at
    FROM weights WHERE netuid = ? AND visible_at <= ? GROUP BY validator_uid
) AS latest ON w.validator_uid = latest.validator_uid AND w.committed_at = latest.committed_at
WHERE w.netuid = ?
ORDER BY w.validator_uid, w.uid
"""


@dataclass(frozen=True, slots=True)
class _Subnet:
    netuid: int
    tempo: int
    weights_rate_limit: int
    min_allowed_weights: int
    max_weight_limit: int
    commit_reveal: bool
    max_uids: int
    activity_cutoff: int


@dataclass(frozen=True, slots=True)
class _NeuronRow:
    uid: int
    hotkey: str
    coldkey: str
    stake_rao: int
    validator_permit: bool
    ip: str | None
    port: int | None
    last_update: int | None
    registered_at: int


_SELECT_NEURONS: Final = """
SELECT uid, hotkey, coldkey, stake_rao, validator_permit, ip, port, last_update, registered_at
FROM neuron WHERE netuid = ? ORDER BY uid
"""
_SELECT_NEURON: Final = """
SELECT uid, hotkey, coldkey, stake_rao, validator_permit, ip, port, last_update, registered_at
FROM neuron WHERE netuid = ? AND hotkey = ?
"""
_UPDATE_NEURON: Final = {
    column: f"UPDATE neuron SET {column} = ? WHERE netuid = ? AND uid = ?"  # noqa: S608 - constants
    for column in ("stake_rao", "validator_permit", "last_update")
}


def _neuron_row(row: tuple[Any, ...]) -> _NeuronRow:
    uid, hotkey, coldkey, stake, permit, ip, port, last_update, registered_at = row
    return _NeuronRow(
        uid=int(uid),
        hotkey=str(hotkey),
        coldkey=str(coldkey),
        stake_rao=int(stake),
        validator_permit=bool(permit),
        ip=None if ip is None else str(ip),
        port=None if port is None else int(port),
        last_update=None if last_update is None else int(last_update),
        registered_at=int(registered_at),
    )


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f"{low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def _describe_sqlite_error(exc: sqlite3.Error) -> str:
    text = str(exc) or type(exc).__name__
    if "locked" in text or "busy" in text:
        return f"the database is locked by another process ({text})"
    if "no such table" in text or "no such column" in text:
        return f"the file is not a devnet chain of this version ({text})"
    if isinstance(exc, sqlite3.DatabaseError) and "not a database" in text:
        return f"the file is corrupt or not a SQLite database ({text})"
    return text


class DevnetChain:
    """A :class:`~byteleap.chain.port.ChainPort` on a shared SQLite file (see the module doc).

    ``hotkey`` is the SS58 hotkey this instance acts as for :meth:`publish_endpoint` and
    :meth:`set_weights`; ``None`` makes a read-only port whose writes raise
    ``ChainRejected("NOT_AUTHORIZED")``. ``clock`` returns Unix seconds and decides the head.
    """

    default_netuid: Final = DEFAULT_NETUID

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        hotkey: str | None = None,
        clock: Callable[[], float] = time.time,
        busy_timeout_s: float = 5.0,
    ) -> None:
        if hotkey is not None:
            try:
                PeerIdentity.from_ss58(hotkey)
            except ValueError:
                raise ValueError(f"acting hotkey {hotkey!r} is not an SS58 address") from None
        if not math.isfinite(busy_timeout_s) or busy_timeout_s < 0:
            raise ValueError(f"busy_timeout_s must be a finite number >= 0, got {busy_timeout_s}")
        self._path = Path(path)
        self._hotkey = hotkey
        self._clock = clock
        self._busy_timeout_s = float(busy_timeout_s)
        self._closed = False
        self._head_lock = threading.Lock()
        self._last_head = 0

    def __repr__(self) -> str:
        return f"DevnetChain({str(self._path)!r}, hotkey={self._hotkey!r})"

    @property
    def path(self) -> Path:
        return self._path

    @property
    def hotkey(self) -> str | None:
        return self._hotkey

    def as_hotkey(self, hotkey: str | None) -> DevnetChain:
        """Another port on the same file and clock, acting as ``hotkey``."""
        return DevnetChain(
            self._path, hotkey=hotkey, clock=self._clock, busy_timeout_s=self._busy_timeout_s
        )

    # --------------------------------------------------------------------------------------------
    # Creation

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        netuid: int = DEFAULT_NETUID,
        block_time: float = 0.25,
        tempo: int = 20,
        weights_rate_limit: int = 10,
        min_allowed_weights: int = 1,
        max_weight_limit: int = U16_MAX,
        max_uids: int = MAX_UIDS,
        commit_reveal: bool = False,
        activity_cutoff: int = DEFAULT_ACTIVITY_CUTOFF,
        clock: Callable[[], float] = time.time,
        overwrite: bool = False,
    ) -> DevnetChain:
        """Create a chain file with one subnet whose block 0 is now; return a read-only port.

        Refuses to replace an existing file (:class:`FileExistsError`) unless ``overwrite``; the
        file appears atomically, complete, so a process polling for it never reads half a chain.
        Invalid parameters raise :class:`ValueError`.
        """
        _check_int("netuid", netuid, 0, U16_MAX)
        if (
            isinstance(block_time, bool)
            or not isinstance(block_time, int | float)
            or not (math.isfinite(block_time) and block_time > 0)
        ):
            raise ValueError(f"block_time must be a positive number of seconds, got {block_time!r}")
        _check_int("tempo", tempo, 1, U16_MAX)
        _check_int("weights_rate_limit", weights_rate_limit, 0, _MAX_INT64)
        _check_int("max_uids", max_uids, 1, MAX_UIDS)
        _check_int("min_allowed_weights", min_allowed_weights, 0, max_uids)
        _check_int("max_weight_limit", max_weight_limit, 1, U16_MAX)
        _check_int("activity_cutoff", activity_cutoff, 1, _MAX_INT64)
        target = Path(path)
        if not target.parent.is_dir():
            raise FileNotFoundError(
                f"cannot create devnet chain {target}: no directory {target.parent}"
            )
        if target.exists() and not overwrite:
            raise FileExistsError(
                f"devnet chain {target} already exists; refusing to overwrite it "
                "(remove it or pass overwrite=True)"
            )
        genesis = float(clock())
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
        try:
            try:
                db = sqlite3.connect(tmp, isolation_level=None)
                try:
                    db.execute("PRAGMA journal_mode = WAL")  # persistent: stored in the file
                    db.executescript(_SCHEMA)
                    db.execute("BEGIN")
                    db.execute(
                        "INSERT INTO chain VALUES (1, ?, ?, ?, 1)",
                        (SCHEMA_VERSION, genesis, float(block_time)),
                    )
                    db.execute(
                        "INSERT INTO subnet VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            netuid,
                            tempo,
                            weights_rate_limit,
                            min_allowed_weights,
                            max_weight_limit,
                            int(commit_reveal),
                            max_uids,
                            activity_cutoff,
                        ),
                    )
                    db.execute("COMMIT")
                finally:
                    db.close()  # checkpoints the WAL into the file and removes it
            except sqlite3.Error as exc:
                raise OSError(f"cannot create devnet chain {target}: {exc}") from exc
            if overwrite:
                for stale in (target, Path(f"{target}-wal"), Path(f"{target}-shm")):
                    stale.unlink(missing_ok=True)
            try:
                os.link(tmp, target)  # unlike rename, never replaces a file created meanwhile
            except FileExistsError:
                raise FileExistsError(
                    f"devnet chain {target} was created by someone else meanwhile; not replaced"
                ) from None
        finally:
            for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
                leftover.unlink(missing_ok=True)
        return cls(target, clock=clock)

    # --------------------------------------------------------------------------------------------
    # Database plumbing

    def _connect(self) -> sqlite3.Connection:
        if not self._path.is_file():
            raise ChainUnavailable(
                f"devnet chain {self._path} does not exist or is not a file "
                "(create it first: DevnetChain.create or the devnet CLI)"
            )
        # mode=rw: never create an empty database where the chain file should be.
        uri = f"file:{urllib.parse.quote(str(self._path))}?mode=rw"
        try:
            return sqlite3.connect(
                uri, uri=True, timeout=self._busy_timeout_s, isolation_level=None
            )
        except sqlite3.Error as exc:
            raise ChainUnavailable(
                f"devnet chain {self._path}: cannot open: {_describe_sqlite_error(exc)}"
            ) from None

    @contextlib.contextmanager
    def _transaction(
        self, *, write: bool, honour_outage: bool = True
    ) -> Iterator[tuple[sqlite3.Connection, int]]:
        """A connection inside one transaction, and the head block; sqlite errors -> unavailable.

        Writes take the write lock up front (BEGIN IMMEDIATE) so that the rule checks and the
        write see the same state even with several writer processes.
        """
        if self._closed:
            raise ChainUnavailable(f"devnet chain {self._path}: this port has been closed")
        db = self._connect()
        try:
            try:
                db.execute("PRAGMA foreign_keys = ON")
                # WAL + NORMAL: commits survive a crash of the process, only power loss can
                # undo the last ones; a devnet needs no more, and writes stay fast.
                db.execute("PRAGMA synchronous = NORMAL")
                db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                row = db.execute(
                    "SELECT schema_version, genesis_unix, block_time, available FROM chain"
                ).fetchone()
                if row is None or int(row[0]) != SCHEMA_VERSION:
                    found = "no chain row" if row is None else f"schema version {row[0]}"
                    raise ChainUnavailable(
                        f"devnet chain {self._path}: {found}, this agent needs version "
                        f"{SCHEMA_VERSION}; recreate the chain"
                    )
                if honour_outage and not row[3]:
                    raise ChainUnavailable(
                        f"devnet chain {self._path} is down (outage switch set with "
                        "DevnetChain.set_available(False))"
                    )
                head = self._head_from(float(row[1]), float(row[2]))
                yield db, head
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise ChainUnavailable(
                f"devnet chain {self._path}: {_describe_sqlite_error(exc)}"
            ) from None
        finally:
            db.close()

    def _head_from(self, genesis_unix: float, block_time: float) -> int:
        elapsed = self._clock() - genesis_unix
        computed = max(0, math.floor(elapsed / block_time + _BLOCK_ROUNDING))
        # A wall clock stepped back (NTP) must not move this port's head backwards.
        with self._head_lock:
            self._last_head = max(self._last_head, computed)
            return self._last_head

    @staticmethod
    def _subnet(db: sqlite3.Connection, netuid: object) -> _Subnet:
        if isinstance(netuid, bool) or not isinstance(netuid, int):
            raise ChainRejected("INVALID_ARGUMENT", f"netuid must be an integer, got {netuid!r}")
        row = db.execute(
            "SELECT netuid, tempo, weights_rate_limit, min_allowed_weights, max_weight_limit,"
            " commit_reveal, max_uids, activity_cutoff FROM subnet WHERE netuid = ?",
            (netuid,),
        ).fetchone()
        if row is None:
            raise ChainRejected(
                "SUBNET_NOT_EXISTS", f"subnet {netuid} does not exist on the devnet"
            )
        return _Subnet(
            netuid=int(row[0]),
            tempo=int(row[1]),
            weights_rate_limit=int(row[2]),
            min_allowed_weights=int(row[3]),
            max_weight_limit=int(row[4]),
            commit_reveal=bool(row[5]),
            max_uids=int(row[6]),
            activity_cutoff=int(row[7]),
        )

    @staticmethod
    def _neurons(db: sqlite3.Connection, netuid: int) -> list[_NeuronRow]:
        rows = db.execute(_SELECT_NEURONS, (netuid,)).fetchall()
        return [_neuron_row(row) for row in rows]

    @staticmethod
    def _neuron(db: sqlite3.Connection, netuid: int, hotkey: str) -> _NeuronRow:
        row = db.execute(_SELECT_NEURON, (netuid, hotkey)).fetchone()
        if row is None:
            raise NotRegistered(f"hotkey {hotkey} is not registered on subnet {netuid}")
        return _neuron_row(row)

    def _acting_hotkey(self, action: str) -> str:
        if self._hotkey is None:
            raise ChainRejected(
                "NOT_AUTHORIZED", f"cannot {action}: this devnet port is read-only (no hotkey)"
            )
        return self._hotkey

    # --------------------------------------------------------------------------------------------
    # Reads (sync cores shared by the port and the admin API)

    def _read_head(self) -> int:
        with self._transaction(write=False) as (_, head):
            return head

    def _read_block_time(self) -> float:
        with self._transaction(write=False) as (db, _):
            return float(db.execute("SELECT block_time FROM chain").fetchone()[0])

    def snapshot_sync(self, netuid: int) -> SubnetSnapshot:
        """The subnet as :meth:`subnet` returns it, for synchronous callers (CLI, orchestrator)."""
        with self._transaction(write=False) as (db, head):
            subnet = self._subnet(db, netuid)
            neurons = tuple(
                Neuron(
                    uid=row.uid,
                    hotkey=row.hotkey,
                    coldkey=row.coldkey,
                    stake_rao=row.stake_rao,
                    validator_permit=row.validator_permit,
                    active=head - max(row.last_update or 0, row.registered_at)
                    <= subnet.activity_cutoff,
                    last_update=row.last_update or 0,
                    endpoint=None
                    if row.ip is None or row.port is None
                    else Endpoint(ip=row.ip, port=row.port),
                )
                for row in self._neurons(db, subnet.netuid)
            )
            return SubnetSnapshot(
                netuid=subnet.netuid,
                block=head,
                tempo=subnet.tempo,
                weights_rate_limit=subnet.weights_rate_limit,
                min_allowed_weights=subnet.min_allowed_weights,
                max_weight_limit=subnet.max_weight_limit,
                commit_reveal_enabled=subnet.commit_reveal,
                max_uids=subnet.max_uids,
                neurons=neurons,
            )

    def _read_uid(self, netuid: int, hotkey: str) -> int | None:
        if not isinstance(hotkey, str):
            raise ChainRejected("INVALID_ARGUMENT", f"hotkey must be a string, got {hotkey!r}")
        with self._transaction(write=False) as (db, _):
            subnet = self._subnet(db, netuid)
            row = db.execute(
                "SELECT uid FROM neuron WHERE netuid = ? AND hotkey = ?", (subnet.netuid, hotkey)
            ).fetchone()
            return None if row is None else int(row[0])

    def weights_sync(self, netuid: int) -> dict[int, dict[int, int]]:
        """The weights visible now, as :meth:`weights` returns them, for synchronous callers."""
        with self._transaction(write=False) as (db, head):
            subnet = self._subnet(db, netuid)
            visible: dict[int, dict[int, int]] = {}
            for validator_uid, uid, value in db.execute(
                _LATEST_VISIBLE_WEIGHTS, (subnet.netuid, head, subnet.netuid)
            ):
                visible.setdefault(int(validator_uid), {})[int(uid)] = int(value)
            return visible

    # --------------------------------------------------------------------------------------------
    # Writes as the acting hotkey

    def _write_endpoint(self, netuid: int, ip: str, port: int) -> TxOutcome:
        hotkey = self._acting_hotkey("publish an endpoint")
        canonical_ip = check_endpoint(ip, port)
        with self._transaction(write=True) as (db, head):
            subnet = self._subnet(db, netuid)
            neuron = self._neuron(db, subnet.netuid, hotkey)
            db.execute(
                "UPDATE neuron SET ip = ?, port = ? WHERE netuid = ? AND uid = ?",
                (canonical_ip, port, subnet.netuid, neuron.uid),
            )
            endpoint = Endpoint(ip=canonical_ip, port=port)
            return TxOutcome(
                block=head, path="serve", message=f"uid {neuron.uid} serves at {endpoint}"
            )

    def _write_weights(
        self, netuid: int, weights: Mapping[int, float], version_key: int
    ) -> TxOutcome:
        hotkey = self._acting_hotkey("set weights")
        check_weights_mapping(weights)
        check_version_key(version_key)
        with self._transaction(write=True) as (db, head):
            subnet = self._subnet(db, netuid)
            me = self._neuron(db, subnet.netuid, hotkey)
            if not me.validator_permit:
                raise ChainRejected(
                    "NOT_AUTHORIZED",
                    f"uid {me.uid} ({hotkey}) has no validator permit on subnet {subnet.netuid}",
                )
            if subnet.weights_rate_limit and me.last_update is not None:
                since = head - me.last_update
                if since < subnet.weights_rate_limit:
                    remaining = subnet.weights_rate_limit - since
                    raise RateLimited(
                        f"uid {me.uid} set weights {since} blocks ago; the rate limit on subnet "
                        f"{subnet.netuid} is {subnet.weights_rate_limit} blocks: retry in "
                        f"{remaining} blocks",
                        remaining,
                    )
            try:
                quantized = quantize_weights(weights, subnet.max_weight_limit)
            except ValueError as exc:
                raise ChainRejected("INVALID_ARGUMENT", str(exc)) from None
            known = {row.uid for row in self._neurons(db, subnet.netuid)}
            unknown = sorted(set(quantized) - known)
            if unknown:
                raise ChainRejected(
                    "INVALID_ARGUMENT",
                    f"weights name uids not registered on subnet {subnet.netuid}: "
                    + ", ".join(map(str, unknown[:10]))
                    + (" ..." if len(unknown) > 10 else ""),
                )
            is_self_weight = list(weights) == [me.uid]
            if not is_self_weight and len(quantized) < subnet.min_allowed_weights:
                raise ChainRejected(
                    "INVALID_ARGUMENT",
                    f"subnet {subnet.netuid} requires at least {subnet.min_allowed_weights} "
                    f"weights; only {len(quantized)} are non-zero after quantisation",
                )
            visible_at = head + subnet.tempo if subnet.commit_reveal else head
            self._store_weights(db, subnet.netuid, me.uid, quantized, head, visible_at)
            db.execute(
                "UPDATE neuron SET last_update = ? WHERE netuid = ? AND uid = ?",
                (head, subnet.netuid, me.uid),
            )
            if subnet.commit_reveal:
                return TxOutcome(
                    block=head,
                    path="timelocked",
                    reveal_round=visible_at,
                    message=f"{len(quantized)} weights committed, visible at block {visible_at}",
                )
            return TxOutcome(block=head, path="direct", message=f"{len(quantized)} weights set")

    @staticmethod
    def _store_weights(
        db: sqlite3.Connection,
        netuid: int,
        validator_uid: int,
        quantized: Mapping[int, int],
        head: int,
        visible_at: int,
    ) -> None:
        # Drop sets the newest visible one supersedes (and a same-block resubmission), so the
        # table holds at most the visible set plus pending commits per validator.
        newest_visible = db.execute(
            "SELECT MAX(committed_at) FROM weights WHERE netuid = ? AND validator_uid = ?"
            " AND visible_at <= ?",
            (netuid, validator_uid, head),
        ).fetchone()[0]
        db.execute(
            "DELETE FROM weights WHERE netuid = ? AND validator_uid = ?"
            " AND (committed_at < ? OR committed_at = ?)",
            (netuid, validator_uid, newest_visible if newest_visible is not None else -1, head),
        )
        db.executemany(
            "INSERT INTO weights VALUES (?, ?, ?, ?, ?, ?)",
            [
                (netuid, validator_uid, uid, value, head, visible_at)
                for uid, value in quantized.items()
            ],
        )

    # --------------------------------------------------------------------------------------------
    # ChainPort

    async def _run(self, call: Callable[..., T], *args: object) -> T:
        return await asyncio.to_thread(call, *args)

    async def head_block(self) -> int:
        return await self._run(self._read_head)

    async def block_time(self) -> float:
        return await self._run(self._read_block_time)

    async def subnet(self, netuid: int) -> SubnetSnapshot:
        return await self._run(self.snapshot_sync, netuid)

    async def uid_of(self, netuid: int, hotkey: str) -> int | None:
        return await self._run(self._read_uid, netuid, hotkey)

    async def publish_endpoint(self, netuid: int, ip: str, port: int) -> TxOutcome:
        return await self._run(self._write_endpoint, netuid, ip, port)

    async def set_weights(
        self, netuid: int, weights: Mapping[int, float], *, version_key: int = 0
    ) -> TxOutcome:
        # Copy now: the caller may mutate its dict while the worker thread reads it.
        snapshot = dict(weights) if isinstance(weights, Mapping) else weights
        return await self._run(self._write_weights, netuid, snapshot, version_key)

    async def weights(self, netuid: int) -> dict[int, dict[int, int]]:
        return await self._run(self.weights_sync, netuid)

    async def close(self) -> None:
        """Refuse further calls; nothing else to release (each call opens its own connection)."""
        self._closed = True

    # --------------------------------------------------------------------------------------------
    # Admin API (synchronous; the operator's hand, so it ignores the outage switch)

    def register(
        self,
        netuid: int,
        hotkey: str,
        *,
        coldkey: str | None = None,
        stake_rao: int = 0,
        validator_permit: bool = False,
    ) -> int:
        """Register ``hotkey`` on the subnet and return its uid (the next free one).

        ``coldkey`` defaults to the hotkey itself. Raises ``ChainRejected`` ``SUBNET_FULL`` when
        ``max_uids`` neurons are registered, ``ALREADY_EXISTS`` for a registered hotkey and
        ``INVALID_ARGUMENT`` for a malformed address or stake.
        """
        check_ss58("hotkey", hotkey)
        owner = hotkey if coldkey is None else check_ss58("coldkey", coldkey)
        stake = self._check_stake(stake_rao)
        with self._transaction(write=True, honour_outage=False) as (db, head):
            subnet = self._subnet(db, netuid)
            taken = db.execute(
                "SELECT 1 FROM neuron WHERE netuid = ? AND hotkey = ?", (subnet.netuid, hotkey)
            ).fetchone()
            if taken is not None:
                raise ChainRejected(
                    "ALREADY_EXISTS", f"hotkey {hotkey} is already registered on subnet {netuid}"
                )
            (count,) = db.execute(
                "SELECT COUNT(*) FROM neuron WHERE netuid = ?", (subnet.netuid,)
            ).fetchone()
            if count >= subnet.max_uids:
                raise ChainRejected(
                    "SUBNET_FULL", f"subnet {netuid} is full ({subnet.max_uids} uids registered)"
                )
            uid = int(count)  # no deregistration, so uids are 0..count-1
            db.execute(
                "INSERT INTO neuron (netuid, uid, hotkey, coldkey, stake_rao, validator_permit,"
                " registered_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (subnet.netuid, uid, hotkey, owner, stake, int(bool(validator_permit)), head),
            )
            return uid

    @staticmethod
    def _check_stake(stake_rao: object) -> int:
        if (
            isinstance(stake_rao, bool)
            or not isinstance(stake_rao, int)
            or not 0 <= stake_rao <= _MAX_INT64
        ):
            raise ChainRejected(
                "INVALID_ARGUMENT",
                f"stake must be a non-negative integer of rao, got {stake_rao!r}",
            )
        return stake_rao

    def _update_neuron(self, netuid: int, hotkey: str, column: str, value: object) -> None:
        with self._transaction(write=True, honour_outage=False) as (db, _):
            subnet = self._subnet(db, netuid)
            neuron = self._neuron(db, subnet.netuid, hotkey)
            db.execute(_UPDATE_NEURON[column], (value, subnet.netuid, neuron.uid))

    def set_stake(self, netuid: int, hotkey: str, stake_rao: int) -> None:
        """Set the stake of a registered hotkey, in rao (NotRegistered if it has no uid)."""
        self._update_neuron(netuid, hotkey, "stake_rao", self._check_stake(stake_rao))

    def set_permit(self, netuid: int, hotkey: str, validator_permit: bool) -> None:
        """Grant or withdraw a validator permit (NotRegistered if the hotkey has no uid)."""
        self._update_neuron(netuid, hotkey, "validator_permit", int(bool(validator_permit)))

    def set_last_update(self, netuid: int, hotkey: str, block: int | None) -> None:
        """Pretend the hotkey last set weights at ``block`` (None: never); for seeding fixtures."""
        if block is not None:
            try:
                _check_int("block", block, 0, _MAX_INT64)
            except ValueError as exc:
                raise ChainRejected("INVALID_ARGUMENT", str(exc)) from None
        self._update_neuron(netuid, hotkey, "last_update", block)

    def set_available(self, available: bool) -> None:
        """The outage switch: while False, every port method of every process raises
        :class:`ChainUnavailable` (admin calls keep working)."""
        with self._transaction(write=True, honour_outage=False) as (db, _):
            db.execute("UPDATE chain SET available = ?", (int(bool(available)),))
