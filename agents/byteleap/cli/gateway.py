"""``byteleapctl gateway``: the gateway's keys, renters, validator keys and workers.

Every command reads the gateway's config (``--config``, default /etc/byteleap/gateway.yaml, with
its ``BYTELEAP_GATEWAY__*`` overrides) and works on the same state directory and store as the
daemon, which may be running: revocations reach live sessions within
``workers.revocation_check_s``.

* ``init``: create the CA, the lease-signing key and the listeners' certificate if absent,
  migrate the store and bind it to the gateway id, then ``show``. The daemon does the same on its
  first start; ``init`` lets an operator publish the gateway id and CA fingerprint first.
* ``show``: what validators put in their config: gateway id, signing public key, CA fingerprint.
* ``renter add NAME`` / ``renter list`` / ``renter revoke NAME``, and the same for
  ``validator-key``: a new key is printed once on stdout (only its SHA-256 is stored).
* ``worker list`` / ``worker revoke WORKER_ID``.

Run as root, files created in the state directory are handed to the directory's owner (the
service user), so the daemon can still read them.

Exit status: 0 done, 1 refused (name taken, nothing to revoke, store unavailable), 2 unusable
config, key material or store.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Final, NoReturn

import msgspec
import typer
from rich.console import Console
from rich.table import Table

from ..core.config import ConfigError, load_config
from ..gateway.agent import StartupError, prepare_keys
from ..gateway.ca import CaError, load_ca
from ..gateway.config import DEFAULT_CONFIG_PATH, ENV_PREFIX, GatewayConfig, StoreUrlError
from ..gateway.keys import (
    KEY_PREFIXES,
    KeyKind,
    SigningKeyError,
    load_signing_key,
    new_secret,
    secret_hash,
)
from ..gateway.store import GatewayStore, StoreConflict, StoreError, open_store, redact_url

__all__ = ["app"]

EXIT_REFUSED: Final = 1
EXIT_USAGE: Final = 2
_NAME: Final = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_WORKER_ID: Final = re.compile(r"\A[0-9a-f]{32}\Z")

app = typer.Typer(
    help="The gateway: key material, renters, validator keys, workers.", no_args_is_help=True
)
renter_app = typer.Typer(help="Renter API keys.", no_args_is_help=True)
validator_app = typer.Typer(help="Validator API keys (enrollment tokens, lease feed).")
validator_app.info.no_args_is_help = True
worker_app = typer.Typer(help="Enrolled workers.", no_args_is_help=True)
app.add_typer(renter_app, name="renter")
app.add_typer(validator_app, name="validator-key")
app.add_typer(worker_app, name="worker")

ConfigOption = Annotated[
    Path, typer.Option("--config", help=f"gateway config (default {DEFAULT_CONFIG_PATH})")
]
JsonOption = Annotated[bool, typer.Option("--json", help="machine-readable output")]


class Shown(msgspec.Struct, frozen=True, kw_only=True):
    gateway_id: str
    signing_public_key: str
    ca_fingerprint_sha256: str
    api_url: str
    ws_url: str


def _fail(message: str, code: int = EXIT_REFUSED) -> NoReturn:
    typer.echo(f"byteleapctl gateway: {message}", err=True)
    raise typer.Exit(code)


def _config(path: Path) -> GatewayConfig:
    try:
        return load_config(path, GatewayConfig, env_prefix=ENV_PREFIX)
    except ConfigError as exc:
        _fail(f"config: {exc}", EXIT_USAGE)


def _store(config: GatewayConfig, *, upgrade: bool = False) -> GatewayStore:
    try:
        url = config.store.resolve_url()
    except StoreUrlError as exc:
        _fail(f"store: {exc}", EXIT_USAGE)
    try:
        store = open_store(url)
    except StoreError as exc:
        _fail(f"store {redact_url(url)}: {exc}", EXIT_USAGE)
    try:
        if upgrade:
            store.upgrade()
        else:
            store.check()
    except StoreError as exc:
        store.close()
        _fail(f"store {redact_url(url)}: {exc}", EXIT_USAGE)
    return store


@contextlib.contextmanager
def _opened(settings: GatewayConfig, *, hand_over: bool = False) -> Iterator[GatewayStore]:
    """The checked store, closed after the block; a store error in the block refuses (exit 1).

    With ``hand_over``, files root created in the state directory go to its owner afterwards.
    """
    store = _store(settings)
    try:
        yield store
    except StoreError as exc:
        _fail(str(exc))
    finally:
        store.close()
        if hand_over:
            _hand_over(Path(settings.state_dir))


def _hand_over(state_dir: Path) -> None:
    """As root, give files root created in ``state_dir`` to the directory's owner."""
    if os.geteuid() != 0:
        return
    try:
        owner = state_dir.stat()
    except OSError:
        return
    if owner.st_uid == 0:
        return
    for entry in state_dir.iterdir():
        info = entry.lstat()
        if stat.S_ISREG(info.st_mode) and info.st_uid == 0:
            os.chown(entry, owner.st_uid, owner.st_gid, follow_symlinks=False)


def _when(at: float | None) -> str:
    if at is None:
        return "-"
    moment = datetime.datetime.fromtimestamp(at, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _shown(config: GatewayConfig) -> Shown:
    state_dir = Path(config.state_dir)
    try:
        ca = load_ca(state_dir)
        signer = load_signing_key(state_dir)
    except (CaError, SigningKeyError) as exc:
        _fail(f"{exc} (run byteleapctl gateway init)", EXIT_USAGE)
    return Shown(
        gateway_id=signer.gateway_id,
        signing_public_key=signer.public_key.hex(),
        ca_fingerprint_sha256=ca.fingerprint,
        api_url=config.api_url,
        ws_url=config.ws_url,
    )


def _print_shown(shown: Shown, as_json: bool) -> None:
    if as_json:
        typer.echo(msgspec.json.encode(shown).decode())
        return
    for label, value in msgspec.structs.asdict(shown).items():
        typer.echo(f"{label:<22}{value}")


@app.command()
def init(config: ConfigOption = Path(DEFAULT_CONFIG_PATH), as_json: JsonOption = False) -> None:
    """Create key material and the store if absent, then show what validators need."""
    settings = _config(config)
    try:
        _, signer = prepare_keys(settings)
    except StartupError as exc:
        _fail(str(exc), EXIT_USAGE)
    store = _store(settings, upgrade=True)
    try:
        store.bind_gateway_id(signer.gateway_id)
    except StoreError as exc:
        _fail(str(exc), EXIT_USAGE)
    finally:
        store.close()
        _hand_over(Path(settings.state_dir))
    _print_shown(_shown(settings), as_json)


@app.command()
def show(config: ConfigOption = Path(DEFAULT_CONFIG_PATH), as_json: JsonOption = False) -> None:
    """Gateway id, signing public key (hex) and CA SHA-256 fingerprint, for validators."""
    _print_shown(_shown(_config(config)), as_json)


# ------------------------------------------------------------------------------------------------
# API keys

NameArgument = Annotated[str, typer.Argument(help="who the key belongs to")]


def _key_commands(group: typer.Typer, kind: KeyKind, revoke_note: str = "") -> None:
    """``add``, ``list`` and ``revoke`` for one kind of API key."""

    @group.command("add", help=f"Issue a {kind} API key (printed once).")
    def add(name: NameArgument, config: ConfigOption = Path(DEFAULT_CONFIG_PATH)) -> None:
        if not _NAME.match(name):
            _fail(f"{name!r}: a name is 1-64 letters, digits, '.', '_' or '-'", EXIT_USAGE)
        secret = new_secret(KEY_PREFIXES[kind])
        with _opened(_config(config), hand_over=True) as store:
            try:
                store.add_api_key(kind, name, secret_hash(secret), time.time())
            except StoreConflict as exc:
                _fail(f"{exc} (revoke it first to issue a new one)")
        typer.echo(secret)
        typer.echo(f"{kind} key for {name!r}: shown once, only its hash is kept", err=True)

    @group.command("list", help=f"{kind.capitalize()} keys and when they were created or revoked.")
    def list_keys(
        config: ConfigOption = Path(DEFAULT_CONFIG_PATH), as_json: JsonOption = False
    ) -> None:
        with _opened(_config(config)) as store:
            rows = store.api_keys(kind)
        if as_json:
            typer.echo(msgspec.json.encode(rows).decode())
            return
        table = Table(title=f"{kind} keys", title_justify="left")
        for column in ("name", "created", "revoked"):
            table.add_column(column)
        for row in rows:
            table.add_row(row.name, _when(row.created_at), _when(row.revoked_at))
        Console().print(table)

    @group.command("revoke", help=f"Revoke a {kind}'s key{revoke_note}.")
    def revoke(name: NameArgument, config: ConfigOption = Path(DEFAULT_CONFIG_PATH)) -> None:
        with _opened(_config(config)) as store:
            revoked = store.revoke_api_key(kind, name, time.time())
        if not revoked:
            _fail(f"{kind} {name!r} has no active key")
        typer.echo(f"revoked the {kind} key of {name!r}")


_key_commands(renter_app, "renter", " (its leases run on until they end)")
_key_commands(validator_app, "validator")


# ------------------------------------------------------------------------------------------------
# Workers


@worker_app.command("list")
def worker_list(
    config: ConfigOption = Path(DEFAULT_CONFIG_PATH), as_json: JsonOption = False
) -> None:
    """Enrolled workers, their miners and revocations."""
    with _opened(_config(config)) as store:
        rows = store.workers()
    if as_json:
        shown = [
            {
                "worker_id": r.worker_id,
                "miner_hotkey": r.miner_hotkey,
                "enrolled_at": r.enrolled_at,
                "revoked_at": r.revoked_at,
            }
            for r in rows
        ]
        typer.echo(msgspec.json.encode(shown).decode())
        return
    table = Table(title="workers", title_justify="left")
    for column in ("worker", "miner", "enrolled", "revoked"):
        table.add_column(column)
    for r in rows:
        table.add_row(r.worker_id, r.miner_hotkey, _when(r.enrolled_at), _when(r.revoked_at))
    Console().print(table)


@worker_app.command("revoke")
def worker_revoke(
    worker_id: Annotated[str, typer.Argument(help="32 hex digits")],
    config: ConfigOption = Path(DEFAULT_CONFIG_PATH),
) -> None:
    """Revoke a worker: every certificate it holds is refused, its session is cut, its leases
    fail, and it cannot enroll again."""
    if not _WORKER_ID.match(worker_id):
        _fail(f"{worker_id!r} is not a worker id (32 lowercase hex digits)", EXIT_USAGE)
    with _opened(_config(config)) as store:
        known = store.worker(worker_id)
        revoked = known is not None and store.revoke_worker(worker_id, time.time())
    if known is None:
        _fail(f"worker {worker_id} is not enrolled")
    if not revoked:
        _fail(f"worker {worker_id} is already revoked")
    typer.echo(f"revoked worker {worker_id}")
