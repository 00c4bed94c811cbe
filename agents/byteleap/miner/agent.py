"""byteleap-miner: the daemon (``main``), a ``Type=notify`` systemd service.

Start-up validates everything before it serves: configuration (``--config``, env prefix
``BYTELEAP_MINER``), the enrollment secret (systemd credential ``enrollment-secret`` or
``policy.enrollment_secret_file``), the hotkey (``--hotkey-uri``, else the systemd credential
``hotkey``, else the wallet: :func:`~byteleap.core.identity.load_hotkey`), TLS material, the
``chain:`` section, and the miner's registration on ``chain.netuid``. Any of those failing is
exit code 2 with one line on stderr: a miner that the chain says is not registered cannot earn,
so it says so and stops. A chain that cannot be reached is not fatal: the miner serves its
workers and keeps retrying (the validator links start as soon as a snapshot arrives).

Then it opens the worker registry in ``state_dir`` (marking every worker offline: nobody is
connected yet), listens for workers, opens the local control socket, starts the validator links
(:mod:`byteleap.miner.uplink`) and only then sends ``READY=1`` with
``STATUS=<n> workers online, <e>/<max> enrolled, <c>/<v> validators connected``. ``WATCHDOG=1``
comes from the event loop; SIGTERM/SIGINT send ``STOPPING=1`` and drain: validators told
``GOING_AWAY`` first (no new challenges arrive), then the control socket closed, workers told
``GOING_AWAY``, pending requests failed, registry marked offline and closed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import ssl
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..chain.config import open_chain
from ..chain.port import ChainError, ChainPort, ChainUnavailable
from ..core.config import ConfigError, load_config
from ..core.credentials import CredentialError, read_secret
from ..core.identity import (
    HotkeySigner,
    IdentityError,
    add_hotkey_arguments,
    hotkey_from_arguments,
)
from ..core.logs import log_fields, setup_logging
from ..core.systemd import Notifier, install_signal_handlers, run_watchdog, watchdog_interval
from .config import DEFAULT_CONFIG_PATH, ENV_PREFIX, MinerConfig
from .control import ControlServer, default_control_path
from .registry import WorkerRegistry
from .relay import WorkerConnections
from .server import MinerServer, tls_context
from .uplink import UplinkSettings, ValidatorUplinks, client_session, worker_roster

__all__ = [
    "Prepared",
    "StartupError",
    "main",
    "open_miner_chain",
    "open_registry",
    "parse_args",
    "prepare",
    "run",
]

log = logging.getLogger("byteleap.miner")

PROG = "byteleap-miner"
REGISTRY_FILE = "workers.db"
STATUS_INTERVAL_S = 10.0
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


class StartupError(Exception):
    """Configuration, credential or identity problem: exit 2 with this one line."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description="ByteLeap miner: aggregates workers and relays challenges."
    )
    parser.add_argument(
        "--config", default=DEFAULT_CONFIG_PATH, help=f"YAML config (default {DEFAULT_CONFIG_PATH})"
    )
    add_hotkey_arguments(parser)
    parser.add_argument(
        "--control-socket",
        help="control API socket (default $RUNTIME_DIRECTORY/control.sock or <state_dir>/...)",
    )
    return parser.parse_args(argv)


@dataclass(frozen=True)
class Prepared:
    """A validated start-up: nothing is bound or opened yet."""

    config: MinerConfig
    signer: HotkeySigner
    secret: bytes
    control_path: Path
    server_tls: ssl.SSLContext | None
    hotkey_source: str = ""
    """Where the hotkey came from (dev URI, systemd credential or wallet file), for the log."""


def prepare(args: argparse.Namespace) -> Prepared:
    """Everything that can be validated before binding anything (raises StartupError)."""
    try:
        config = load_config(Path(args.config), MinerConfig, env_prefix=ENV_PREFIX)
    except ConfigError as exc:
        raise StartupError(f"config: {exc}") from None
    try:
        secret = read_secret("enrollment-secret", config.policy.enrollment_secret_file)
    except CredentialError as exc:
        raise StartupError(f"enrollment secret: {exc}") from None
    try:
        hotkey = hotkey_from_arguments(args)
    except IdentityError as exc:
        raise StartupError(f"hotkey: {exc}") from None
    try:
        server_tls = tls_context(config.workers)
    except (ValueError, OSError) as exc:
        raise StartupError(f"workers TLS: {exc}") from None
    control_path = (
        Path(args.control_socket) if args.control_socket else default_control_path(config.state_dir)
    )
    return Prepared(
        config, hotkey.signer, secret, control_path, server_tls, hotkey_source=hotkey.describe()
    )


async def open_miner_chain(config: MinerConfig, signer: HotkeySigner) -> ChainPort:
    """The chain port, after checking that ``signer``'s hotkey is registered on ``chain.netuid``.

    Raises StartupError when the chain section is unusable or the chain answers that the hotkey
    is not registered; an unreachable chain is only logged (the uplinks keep retrying).
    """
    netuid = config.chain.netuid
    hotkey_ss58 = signer.ss58_address
    try:
        chain = open_chain(config.chain, signer)
    except (ChainError, ValueError) as exc:
        raise StartupError(f"chain: {exc}") from None
    try:
        uid = await chain.uid_of(netuid, hotkey_ss58)
    except ChainUnavailable as exc:
        log.warning(
            "chain unreachable at start-up (%s); serving workers and retrying; the "
            "registration of %s on netuid %d is not checked yet",
            exc,
            hotkey_ss58,
            netuid,
        )
        return chain
    except ChainError as exc:
        await chain.close()
        raise StartupError(f"chain: {exc}") from None
    if uid is None:
        await chain.close()
        raise StartupError(
            f"hotkey {hotkey_ss58} is not registered on netuid {netuid}; register it "
            f"(btcli subnet register --netuid {netuid}) and start the miner again"
        )
    log.info("hotkey %s is uid %d on netuid %d", hotkey_ss58, uid, netuid)
    return chain


def open_registry(config: MinerConfig) -> WorkerRegistry:
    """Create ``state_dir`` (0700) if needed and open the registry, every worker offline."""
    state_dir = Path(config.state_dir)
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    registry = WorkerRegistry(state_dir / REGISTRY_FILE, max_workers=config.policy.max_workers)
    registry.mark_all_offline()  # nobody is connected yet, whatever the file says
    return registry


async def run(prepared: Prepared, registry: WorkerRegistry, chain: ChainPort) -> int:
    """Serve until SIGTERM/SIGINT; closes ``registry`` on the way out (not ``chain``)."""
    config = prepared.config
    notifier = Notifier()
    loop = asyncio.get_running_loop()
    http = client_session()

    connections = WorkerConnections(
        on_outcome=lambda worker_id, ok: registry.record_challenge(worker_id, ok=ok)
    )
    server: MinerServer | None = None

    def refresh_status() -> None:
        if server is not None:
            notifier.status(status_line())

    uplinks = ValidatorUplinks(
        chain=chain,
        signer=prepared.signer,
        relay=connections,
        roster=lambda: worker_roster(registry, connections),
        http=http,
        settings=UplinkSettings.from_config(config),
        on_status=refresh_status,
    )

    def status_line() -> str:
        assert server is not None
        return f"{server.status_line()}, {uplinks.status_line()}"

    def workers_changed() -> None:
        refresh_status()
        uplinks.roster_changed()

    server = MinerServer(
        config,
        signer=prepared.signer,
        registry=registry,
        enrollment_secret=prepared.secret,
        connections=connections,
        ssl_context=prepared.server_tls,
        on_change=workers_changed,
    )
    control = ControlServer(
        registry=registry,
        connections=connections,
        miner_hotkey=prepared.signer.ss58_address,
        path=prepared.control_path,
        status=status_line,
        close_worker=server.disconnect,
        validators=uplinks.status,
    )

    async def shutdown() -> None:
        assert server is not None
        try:
            try:
                await uplinks.stop()  # first: no validator request reaches a draining relay
            finally:
                await control.stop()
        finally:
            await server.stop()
            await http.close()

    trigger = install_signal_handlers(loop, shutdown, notifier)
    try:
        await server.start()
        await control.start()
    except OSError as exc:
        log.error("cannot listen: %s", exc)
        with contextlib.suppress(Exception):
            await shutdown()
        registry.close()
        return EXIT_FAILURE
    uplinks.start()

    notifier.ready(status_line())
    log.info(
        "miner %s ready: %s",
        prepared.signer.ss58_address,
        status_line(),
        extra=log_fields(control_socket=str(control.path), urls=" ".join(server.urls)),
    )
    watchdog = asyncio.create_task(run_watchdog(notifier, watchdog_interval()), name="watchdog")
    status = asyncio.create_task(_status_loop(refresh_status), name="status")
    try:
        await trigger.wait()
    finally:
        for task in (watchdog, status):
            task.cancel()
        await asyncio.gather(watchdog, status, return_exceptions=True)
        registry.close()  # server.stop() marked every worker offline
    log.info("miner stopped")
    return EXIT_OK


async def _status_loop(refresh: Callable[[], None]) -> None:
    while True:
        await asyncio.sleep(STATUS_INTERVAL_S)
        refresh()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        prepared = prepare(args)
    except StartupError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging("miner", prepared.config.logging.level)
    log.debug("pid %d", os.getpid())
    try:
        return asyncio.run(_serve(prepared))
    except KeyboardInterrupt:  # pragma: no cover - SIGINT is handled on the loop
        return EXIT_OK


async def _serve(prepared: Prepared) -> int:
    """Chain and registration check, registry, then :func:`run`."""
    try:
        chain = await open_miner_chain(prepared.config, prepared.signer)
    except StartupError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    log.info("hotkey %s from %s", prepared.signer.ss58_address, prepared.hotkey_source)
    try:
        try:
            registry = open_registry(prepared.config)
        except Exception as exc:  # OSError, sqlite3.Error
            log.error("cannot open the worker registry in %s: %s", prepared.config.state_dir, exc)
            return EXIT_FAILURE
        return await run(prepared, registry, chain)
    finally:
        await chain.close()


if __name__ == "__main__":
    sys.exit(main())
