"""byteleap-validator: the daemon (``main``), a ``Type=notify`` systemd service.

Start-up, in order (any problem in the first three is exit code 2 with one line on stderr):

1. configuration (``--config``, env prefix ``BYTELEAP_VALIDATOR``), the hotkey (a dev URI for
   devnets and tests, else the systemd credential ``hotkey``, else the wallet:
   :func:`~byteleap.core.identity.load_hotkey`), the store URL (credential ``store-url``,
   ``store.url_file`` or ``store.url``), each gateway's API key (credential
   ``gateway-<name>-key`` or ``api_key_file``) and CA (``ca_file``);
2. the store: opened and migrated to the schema this version needs (``byteleapctl db upgrade``
   does the same by hand); a database newer than the code is refused. A PostgreSQL that is down
   is waited for, not fatal;
3. the chain: the first subnet snapshot is waited for (STATUS says so); a hotkey that is not
   registered on the netuid is fatal; a missing validator permit is an error line in the journal
   but not fatal (permits come with stake at epoch boundaries: rounds run, and the chain refuses
   the weights until the permit comes);
4. challenges a previous run left open are expired (not counted against anyone), the endpoint is
   published on chain when ``listen.public_ip`` is set, the miner endpoint listens, READY=1.

Then, concurrently: snapshot refreshes (which also close miners that were deregistered), challenge
rounds every ``rounds.interval_s``, a scoring cycle after a round once ``weights.interval_s`` has
passed since the last one, weight submissions (retried through rate limits and outages), one
lease feed reader per configured gateway (:mod:`~byteleap.validator.leases`), enrollment
tokens from the same gateways for the workers of connected miners
(:mod:`~byteleap.validator.enrollment`), retention, the watchdog and a STATUS line such as
``3 miners, 41 workers online, round 17, weights @ 4411, leases from 2/2 gateways``.
SIGTERM/SIGINT: STOPPING=1, the round in flight is cancelled (its challenges are expired), the
feed readers stop, miners are told GOING_AWAY, the token broker's connections are closed, the
store and the chain are closed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import ssl
import sys
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..chain.config import open_chain
from ..chain.port import ChainError, ChainPort, ChainUnavailable, SubnetSnapshot
from ..chain.snapshot import SnapshotCache
from ..core.config import ConfigError, load_config
from ..core.identity import (
    HotkeySigner,
    IdentityError,
    add_hotkey_arguments,
    hotkey_from_arguments,
)
from ..core.logs import log_fields, setup_logging
from ..core.systemd import Notifier, install_signal_handlers, run_watchdog, watchdog_interval
from .config import (
    DEFAULT_CONFIG_PATH,
    ENV_PREFIX,
    GatewayKeyError,
    StoreUrlError,
    ValidatorConfig,
)
from .db import AsyncStore
from .enrollment import EnrollmentTokens, GatewayAccess
from .leases import GatewayFeed, gateway_ssl_context
from .miners import MinerHub
from .rounds import RoundEngine
from .store import Store, StoreError, WeightsRecord, open_store, redact_url
from .weights import PendingWeights, WeightSetter, run_cycle, uid_weights

__all__ = ["Prepared", "StartupError", "main", "parse_args", "prepare", "run"]

log = logging.getLogger("byteleap.validator")

PROG = "byteleap-validator"
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
STATUS_INTERVAL_S = 10.0
RETENTION_INTERVAL_S = 3600.0
CHAIN_RETRY_MAX_S = 30.0


class StartupError(Exception):
    """Configuration, credential, identity, store schema or registration problem: exit 2."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="ByteLeap validator: challenges workers, scores miners, sets weights.",
    )
    parser.add_argument(
        "--config", default=DEFAULT_CONFIG_PATH, help=f"YAML config (default {DEFAULT_CONFIG_PATH})"
    )
    add_hotkey_arguments(parser)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return parser.parse_args(argv)


@dataclass(frozen=True)
class Prepared:
    config: ValidatorConfig
    signer: HotkeySigner
    store_url: str
    hotkey_source: str = ""
    """Where the hotkey came from (dev URI, systemd credential or wallet file), for the log."""
    gateway_keys: Mapping[str, str] = field(default_factory=dict, repr=False)
    """Gateway name -> the validator's API key there (secret: never shown)."""
    gateway_tls: Mapping[str, ssl.SSLContext] = field(default_factory=dict, repr=False)
    """Gateway name -> a TLS context trusting only that gateway's CA."""


def prepare(args: argparse.Namespace) -> Prepared:
    """Everything that can be validated before opening anything (raises StartupError)."""
    try:
        config = load_config(Path(args.config), ValidatorConfig, env_prefix=ENV_PREFIX)
    except ConfigError as exc:
        raise StartupError(f"config: {exc}") from None
    try:
        hotkey = hotkey_from_arguments(args)
    except IdentityError as exc:
        raise StartupError(f"hotkey: {exc}") from None
    try:
        url = config.store.resolve_url()
    except StoreUrlError as exc:
        raise StartupError(f"store: {exc}") from None
    keys: dict[str, str] = {}
    contexts: dict[str, ssl.SSLContext] = {}
    for gateway in config.gateways:
        try:
            keys[gateway.name] = gateway.resolve_api_key()
            contexts[gateway.name] = gateway_ssl_context(gateway.ca_file)
        except GatewayKeyError as exc:
            raise StartupError(str(exc)) from None
        except ValueError as exc:
            raise StartupError(f"gateway {gateway.name}: {exc}") from None
    return Prepared(
        config,
        hotkey.signer,
        url,
        hotkey_source=hotkey.describe(),
        gateway_keys=keys,
        gateway_tls=contexts,
    )


class Validator:
    """The running daemon: owns the store, the chain, the hub, the engine and their tasks."""

    def __init__(self, prepared: Prepared, store: Store, chain: ChainPort) -> None:
        config = prepared.config
        self.config = config
        self.signer = prepared.signer
        self.hotkey_source = prepared.hotkey_source
        self.netuid = config.chain.netuid
        self.notifier = Notifier()
        self.db = AsyncStore(store)
        self.chain = chain
        self.snapshots = SnapshotCache(
            chain,
            self.netuid,
            refresh_s=config.chain.snapshot_refresh_s,
            retry_max_s=CHAIN_RETRY_MAX_S,
            on_change=self._snapshot_changed,
        )
        self.tokens = EnrollmentTokens(
            [
                GatewayAccess(g, prepared.gateway_keys[g.name], prepared.gateway_tls[g.name])
                for g in config.gateways
            ]
        )
        self.hub = MinerHub(
            config.listen,
            config.policy,
            signer=self.signer,
            snapshot=lambda: self.snapshots.current,
            tokens=self.tokens,
        )
        self.engine = RoundEngine(
            self.db,
            self.hub,
            config.rounds,
            lease_grace_s={g.gateway_id: g.grace_s for g in config.gateways},
        )
        self.hub.listener = self.engine
        self.lease_gateways = frozenset(g.gateway_id for g in config.gateways)
        self.feeds = [
            GatewayFeed(
                g,
                self.db,
                api_key=prepared.gateway_keys[g.name],
                ssl_context=prepared.gateway_tls[g.name],
            )
            for g in config.gateways
        ]
        self.setter: WeightSetter | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._last_cycle_at: float | None = None
        self._cycles = 0
        self._published = False

    # ------------------------------------------------------------------ status

    def status_line(self) -> str:
        sessions = list(self.hub.sessions())
        online = sum(
            1 for s in sessions if s.roster is not None for w in s.roster.workers if w.online
        )
        parts = [f"{len(sessions)} miners", f"{online} workers online"]
        parts.append(f"round {self.engine.rounds_run}")
        if self.setter is not None and self.setter.last_block is not None:
            parts.append(f"weights @ {self.setter.last_block}")
        if self.feeds:
            healthy = sum(1 for feed in self.feeds if feed.healthy)
            parts.append(f"leases from {healthy}/{len(self.feeds)} gateways")
        if self.snapshots.outage is not None:
            parts.append("chain unreachable")
        if self.db.outage is not None:
            parts.append("store unreachable")
        return ", ".join(parts)

    def _refresh_status(self) -> None:
        self.notifier.status(self.status_line())

    # ------------------------------------------------------------------ start-up

    async def wait_for_snapshot(self) -> SubnetSnapshot:
        """First snapshot, retrying while the chain is unreachable (other ChainErrors: exit 2)."""
        delay = 1.0
        while True:
            try:
                return await self.snapshots.refresh()
            except ChainUnavailable as exc:
                self.notifier.status(f"waiting for the chain: {exc}")
            except ChainError as exc:
                raise StartupError(f"chain: {exc}") from None
            await asyncio.sleep(delay)
            delay = min(CHAIN_RETRY_MAX_S, delay * 2)

    def check_identity(self, snapshot: SubnetSnapshot) -> None:
        me = snapshot.by_hotkey(self.signer.ss58_address)
        if me is None:
            raise StartupError(
                f"hotkey {self.signer.ss58_address} is not registered on netuid {self.netuid}; "
                "register it (btcli subnet register) before starting the validator"
            )
        if not me.validator_permit:
            log.error(
                "hotkey %s (uid %d) lacks a validator permit on netuid %d: the chain refuses "
                "its weights until it has one. Permits go to the top stakers at epoch "
                "boundaries: add stake to this hotkey (btcli stake add). Rounds keep running.",
                self.signer.ss58_address,
                me.uid,
                self.netuid,
            )

    async def publish_endpoint(self, snapshot: SubnetSnapshot) -> None:
        """Publish ``listen.public_ip``:port unless the chain already shows it."""
        listen = self.config.listen
        if listen.public_ip is None or self._published:
            return
        me = snapshot.by_hotkey(self.signer.ss58_address)
        port = listen.published_port
        shown = None if me is None or me.endpoint is None else (me.endpoint.ip, me.endpoint.port)
        if shown == (listen.public_ip, port):
            self._published = True
            return
        try:
            outcome = await self.chain.publish_endpoint(self.netuid, listen.public_ip, port)
        except ChainError as exc:
            log.warning("could not publish the endpoint %s:%d yet: %s", listen.public_ip, port, exc)
            return
        self._published = True
        log.info("published endpoint %s:%d at block %d", listen.public_ip, port, outcome.block)

    def _snapshot_changed(self, snapshot: SubnetSnapshot) -> None:
        self._spawn(self.hub.refresh(), "hub-refresh")
        if not self._published:
            self._spawn(self.publish_endpoint(snapshot), "publish-endpoint")

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ loops

    async def rounds_loop(self) -> None:
        interval = self.config.rounds.interval_s
        while True:
            started = time.monotonic()
            try:
                await self.engine.run_round()
            except (StoreError, ChainError) as exc:
                log.error("round failed: %s", exc)
            except Exception:
                log.exception("round failed")
            self._refresh_status()
            await self.maybe_score()
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    async def maybe_score(self) -> None:
        now = time.time()
        due = self._last_cycle_at is None or (
            now - self._last_cycle_at >= self.config.weights.interval_s
        )
        snapshot = self.snapshots.current
        if not due or snapshot is None:
            return
        try:
            cycle_id, result, uids = await self.db.call(
                run_cycle,
                self.db.store,
                snapshot,
                now,
                self.config.scoring,
                lease_gateways=self.lease_gateways,
            )
        except Exception:
            log.exception("scoring cycle failed")
            return
        self._last_cycle_at = now
        self._cycles += 1
        weights = uid_weights(result, uids)
        log.info(
            "scoring cycle %d: %d miners, %d workers, %d weights",
            cycle_id,
            len(result.miners),
            len(result.workers),
            len(weights),
            extra=log_fields(cycle_id=cycle_id),
        )
        assert self.setter is not None
        self.setter.submit(PendingWeights(cycle_id, weights))

    async def retention_loop(self) -> None:
        retention = self.config.retention
        while True:
            try:
                deleted = await self.db.prune(
                    time.time(),
                    keep_challenges_s=retention.challenges_days * 86400.0,
                    keep_cycles=retention.cycles,
                    history_window_s=float(self.config.scoring.challenge_window_seconds),
                )
                if deleted:
                    log.info("retention deleted %d old rows", deleted)
            except StoreError as exc:
                log.error("retention failed: %s", exc)
            await asyncio.sleep(RETENTION_INTERVAL_S)

    async def status_loop(self) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL_S)
            self._refresh_status()

    async def record_weights(self, cycle_id: int, record: WeightsRecord) -> None:
        await self.db.record_weights(cycle_id, record)


async def run(prepared: Prepared) -> int:
    """Start (see the module docstring), serve until SIGTERM/SIGINT, drain."""
    config = prepared.config
    try:
        store = await asyncio.to_thread(open_store, prepared.store_url, params=config.scoring)
    except StoreError as exc:
        print(f"{PROG}: error: store {redact_url(prepared.store_url)}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        chain = open_chain(config.chain, prepared.signer)
    except (ChainError, ValueError) as exc:
        store.close()
        print(f"{PROG}: error: chain: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    validator = Validator(prepared, store, chain)
    try:
        return await _serve(validator)
    except StartupError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        with contextlib.suppress(Exception):
            await chain.close()
        await validator.db.close()


async def _serve(v: Validator) -> int:
    loop = asyncio.get_running_loop()
    notifier = v.notifier
    stopping = asyncio.Event()
    tasks: list[asyncio.Task[Any]] = []

    async def shutdown() -> None:
        stopping.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await v.hub.stop()
        await v.tokens.close()

    trigger = install_signal_handlers(loop, shutdown, notifier)
    watchdog = asyncio.create_task(run_watchdog(notifier, watchdog_interval()), name="watchdog")
    try:
        startup = asyncio.create_task(_start(v), name="startup")
        stop_wait = asyncio.create_task(stopping.wait(), name="stop-wait")
        await asyncio.wait({startup, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if not startup.done():  # SIGTERM while still starting
            startup.cancel()
            await asyncio.gather(startup, return_exceptions=True)
            await trigger.wait()
            return EXIT_OK
        stop_wait.cancel()
        startup.result()  # StartupError -> exit 2; OSError -> exit 1
        block_time = await _block_time(v.chain)
        v.setter = WeightSetter(
            v.chain,
            v.netuid,
            record=v.record_weights,
            version_key=v.config.weights.version_key,
            block_time_s=block_time,
            on_submitted=lambda block: v._refresh_status(),
        )
        tasks.extend(
            asyncio.create_task(coro, name=name)
            for coro, name in (
                (v.snapshots.run(), "snapshots"),
                (v.rounds_loop(), "rounds"),
                (v.setter.run(), "weights"),
                (v.retention_loop(), "retention"),
                (v.status_loop(), "status"),
                *((feed.run(), f"lease-feed-{feed.name}") for feed in v.feeds),
            )
        )
        notifier.ready(v.status_line())
        log.info(
            "validator %s ready on %s: %s",
            v.signer.ss58_address,
            " ".join(v.hub.urls),
            v.status_line(),
        )
        await trigger.wait()
    except OSError as exc:
        log.error("cannot listen: %s", exc)
        return EXIT_FAILURE
    finally:
        watchdog.cancel()
        await asyncio.gather(watchdog, return_exceptions=True)
        if not stopping.is_set():
            await shutdown()
    log.info("validator stopped")
    return EXIT_OK


async def _start(v: Validator) -> None:
    applied = await v.db.upgrade()
    if applied:
        log.info("store migrated to schema %d", applied[-1])
    snapshot = await v.wait_for_snapshot()
    v.check_identity(snapshot)
    log.info("hotkey %s from %s", v.signer.ss58_address, v.hotkey_source)
    await v.engine.recover()
    await v.publish_endpoint(snapshot)
    await v.hub.start()


async def _block_time(chain: ChainPort) -> float:
    try:
        return await chain.block_time()
    except ChainError:
        return 12.0  # bittensor's; only used to turn RateLimited blocks into seconds


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        prepared = prepare(args)
    except StartupError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging("validator", prepared.config.logging.level)
    log.debug("pid %d", os.getpid())
    try:
        Path(prepared.config.state_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        print(f"{PROG}: error: state_dir {prepared.config.state_dir}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        return asyncio.run(run(prepared))
    except KeyboardInterrupt:  # pragma: no cover - SIGINT is handled on the loop
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
