"""byteleap-gateway: the daemon (``main``), a ``Type=notify`` systemd service.

Start-up, in order (a problem in steps 1-3 is exit code 2 with one line on stderr):

1. configuration (``--config``, env prefix ``BYTELEAP_GATEWAY``) and the store URL;
2. key material in ``state_dir``: the CA (``ca.key``/``ca.crt``) and the lease-signing key
   (``signing.key``), created on first start when absent (or taken from the ``ca-key`` and
   ``signing-key`` credentials); the listeners' certificate is (re-)issued when needed;
3. the store: opened, migrated, and bound to this gateway's id (a store written under another
   signing key is refused). A PostgreSQL that is down is waited for, not fatal;
4. active leases of the previous run are taken over (their workers get ``worker_grace_s`` to
   come back), both listeners start, READY=1.

Then: the lease clock (expiries, timeouts, grace periods, checkpoints), the session watcher
(revocations, silent workers), a daily check of the listeners' certificate, an hourly prune of
expired tokens, WATCHDOG=1 from the loop and ``STATUS=3 workers connected, 10 GPUs idle, 2 leases
running``. SIGTERM/SIGINT: STOPPING=1, listeners closed, workers told GOING_AWAY; leases stay as
they are (a restart is not the end of a lease), the store is closed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from .. import __version__
from ..core.config import ConfigError, load_config
from ..core.logs import setup_logging
from ..core.systemd import Notifier, install_signal_handlers, run_watchdog, watchdog_interval
from .api import GatewayApi
from .ca import SERVER_CERT_FILE, CaError, GatewayCA, load_or_create_ca
from .config import DEFAULT_CONFIG_PATH, ENV_PREFIX, GatewayConfig, StoreUrlError
from .keys import LeaseSigner, SigningKeyError, load_or_create_signing_key
from .leases import LeaseManager
from .sessions import WorkerHub
from .store import GatewayStore, StoreError, StoreUnavailable, open_store, redact_url

__all__ = ["Gateway", "StartupError", "main", "prepare_keys", "run"]

log = logging.getLogger("byteleap.gateway")

PROG: Final = "byteleap-gateway"
EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_CONFIG: Final = 2
STATUS_INTERVAL_S: Final = 10.0
CERT_CHECK_INTERVAL_S: Final = 86400.0
TOKEN_PRUNE_INTERVAL_S: Final = 3600.0
TOKEN_KEEP_S: Final = 86400.0
STORE_RETRY_MAX_S: Final = 30.0


class StartupError(Exception):
    """Configuration, key material or store problem: exit 2."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="ByteLeap gateway: enrolls workers, rents out their GPUs, signs lease records.",
    )
    parser.add_argument(
        "--config", default=DEFAULT_CONFIG_PATH, help=f"YAML config (default {DEFAULT_CONFIG_PATH})"
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return parser.parse_args(argv)


def prepare_keys(config: GatewayConfig) -> tuple[GatewayCA, LeaseSigner]:
    """The CA and the signing key (created when absent) and a current listener certificate."""
    state_dir = Path(config.state_dir)
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"state_dir {state_dir}: {exc.strerror or exc}") from None
    try:
        ca, created = load_or_create_ca(state_dir)
        signer, signer_created = load_or_create_signing_key(state_dir)
        ca.ensure_server_cert(state_dir, config.public_names, config.tls.server_cert_days)
    except (CaError, SigningKeyError) as exc:
        raise StartupError(str(exc)) from None
    except OSError as exc:
        raise StartupError(f"cannot write key material in {state_dir}: {exc}") from None
    if created:
        log.info("created the gateway CA (fingerprint %s)", ca.fingerprint)
    if signer_created:
        log.info("created the lease-signing key (gateway %s)", signer.gateway_id)
    return ca, signer


@dataclass
class Gateway:
    """The running daemon's parts."""

    config: GatewayConfig
    store: GatewayStore
    ca: GatewayCA
    signer: LeaseSigner
    clock: Callable[[], float] = time.time
    """Wall clock of leases, records and tokens (tests move it)."""

    def __post_init__(self) -> None:
        self.state_dir = Path(self.config.state_dir)
        self.notifier = Notifier()
        self.leases = LeaseManager(self.store, self.signer, self.config.leases, clock=self.clock)
        self.hub = WorkerHub(
            self.config, ca=self.ca, store=self.store, leases=self.leases, wall_clock=self.clock
        )
        self.api = GatewayApi(
            self.config,
            store=self.store,
            ca=self.ca,
            signer=self.signer,
            leases=self.leases,
            clock=self.clock,
        )
        self._contexts: list[ssl.SSLContext] = []

    def status_line(self) -> str:
        counts = self.leases.counts()
        return (
            f"{counts.workers} workers connected, {counts.idle_gpus} GPUs idle, "
            f"{counts.running} leases running"
        )

    async def open_store(self) -> int:
        """Migrate and bind the store and take over its active leases (returns how many),
        waiting out an unreachable PostgreSQL."""
        delay = 1.0
        while True:
            try:
                applied = await asyncio.to_thread(self.store.upgrade)
                await asyncio.to_thread(self.store.bind_gateway_id, self.signer.gateway_id)
                taken = await self.leases.load()
            except StoreUnavailable as exc:
                self.notifier.status(f"waiting for the store: {exc}")
                log.warning("store unavailable, retrying: %s", exc)
                await asyncio.sleep(delay)
                delay = min(STORE_RETRY_MAX_S, delay * 2)
                continue
            except StoreError as exc:
                raise StartupError(f"store {redact_url(self.store.location)}: {exc}") from None
            if applied:
                log.info("store migrated to schema %d", applied[-1])
            return taken

    async def start(self, *, api_port: int | None = None, worker_port: int | None = None) -> None:
        taken = await self.open_store()
        if taken:
            log.info("took over %d active lease(s)", taken)
        api_context = self.ca.server_context(self.state_dir, require_client_cert=False)
        worker_context = self.ca.server_context(self.state_dir, require_client_cert=True)
        self._contexts = [api_context, worker_context]
        await self.api.start(api_context, port=api_port)
        try:
            await self.hub.start(worker_context, port=worker_port)
        except BaseException:
            await self.api.stop()
            raise

    async def stop(self) -> None:
        await self.hub.stop()
        await self.api.stop()

    async def status_loop(self) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL_S)
            self.notifier.status(self.status_line())

    async def certificate_loop(self) -> None:
        """Re-issue the listeners' certificate before it expires (new connections use it)."""
        while True:
            await asyncio.sleep(CERT_CHECK_INTERVAL_S)
            try:
                server_cert = self.state_dir / SERVER_CERT_FILE
                before = server_cert.stat().st_mtime_ns
                await asyncio.to_thread(
                    self.ca.ensure_server_cert,
                    self.state_dir,
                    self.config.public_names,
                    self.config.tls.server_cert_days,
                )
                if server_cert.stat().st_mtime_ns != before:
                    for context in self._contexts:
                        self.ca.reload_server_cert(context, self.state_dir)
                    log.info("listener certificate re-issued")
            except Exception:
                log.exception("could not renew the listener certificate")

    async def prune_loop(self) -> None:
        while True:
            try:
                deleted = await asyncio.to_thread(
                    self.store.prune_tokens, time.time() - TOKEN_KEEP_S
                )
                if deleted:
                    log.info("pruned %d expired enrollment token(s)", deleted)
            except StoreError as exc:
                log.error("token prune failed: %s", exc)
            await asyncio.sleep(TOKEN_PRUNE_INTERVAL_S)


async def run(config: GatewayConfig, store_url: str) -> int:
    """Start (module docstring), serve until SIGTERM/SIGINT, drain. Returns the exit code."""
    try:
        ca, signer = await asyncio.to_thread(prepare_keys, config)
    except StartupError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        store = await asyncio.to_thread(open_store, store_url)
    except StoreError as exc:
        print(f"{PROG}: error: store {redact_url(store_url)}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    gateway = Gateway(config, store, ca, signer)
    try:
        return await _serve(gateway)
    finally:
        await asyncio.to_thread(store.close)


async def _serve(gateway: Gateway) -> int:
    loop = asyncio.get_running_loop()
    notifier = gateway.notifier
    tasks: list[asyncio.Task[Any]] = []
    started = False

    async def shutdown() -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if started:
            await gateway.stop()

    trigger = install_signal_handlers(loop, shutdown, notifier)
    watchdog = asyncio.create_task(run_watchdog(notifier, watchdog_interval()), name="watchdog")
    try:
        startup = asyncio.create_task(gateway.start(), name="startup")
        stop_wait = asyncio.create_task(trigger.stopping.wait(), name="stop-wait")
        await asyncio.wait({startup, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if not startup.done():  # SIGTERM while still starting
            startup.cancel()
            await asyncio.gather(startup, return_exceptions=True)
            await trigger.wait()
            return EXIT_OK
        stop_wait.cancel()
        try:
            startup.result()
        except StartupError as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        except OSError as exc:
            print(f"{PROG}: error: cannot listen: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        started = True
        coroutines: list[tuple[Coroutine[Any, Any, None], str]] = [
            (gateway.leases.run(), "lease-clock"),
            (gateway.status_loop(), "status"),
            (gateway.certificate_loop(), "listener-certificate"),
            (gateway.prune_loop(), "token-prune"),
        ]
        tasks.extend(asyncio.create_task(coro, name=name) for coro, name in coroutines)
        notifier.ready(gateway.status_line())
        log.info(
            "gateway %s ready: API %s, workers %s, CA %s",
            gateway.signer.gateway_id,
            gateway.config.api_url,
            gateway.config.ws_url,
            gateway.ca.fingerprint,
        )
        await trigger.wait()
    finally:
        watchdog.cancel()
        await asyncio.gather(watchdog, return_exceptions=True)
        if not trigger.stopping.is_set():
            await shutdown()
    log.info("gateway stopped")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(Path(args.config), GatewayConfig, env_prefix=ENV_PREFIX)
        store_url = config.store.resolve_url()
    except ConfigError as exc:
        print(f"{PROG}: error: config: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except StoreUrlError as exc:
        print(f"{PROG}: error: store: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging("gateway", config.logging.level)
    try:
        return asyncio.run(run(config, store_url))
    except KeyboardInterrupt:  # pragma: no cover - SIGINT is handled on the loop
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
