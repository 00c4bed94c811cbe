"""``byteleapctl db``: the validator's database schema (``upgrade``, ``check``, ``status``).

The store URL is taken from ``--url``, else ``BYTELEAP_VALIDATOR__STORE__URL`` (the validator's
own environment override), else the validator's credential (``$CREDENTIALS_DIRECTORY/store-url``)
or ``--url-file`` (a 0600 file holding the URL), else the validator's default SQLite path. A
URL on the command line is visible to other users in ``ps``: prefer the file for passwords.
Output never shows a password: locations are redacted, errors name the file, not its content.

Exit status: 0 done, 1 the store said no (not current, unreachable, newer than this code), 2 a
usage problem (unreadable URL file).
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Annotated, NoReturn

import msgspec
import typer
from rich.console import Console
from rich.table import Table

from ..validator.config import StoreSettings, StoreUrlError
from ..validator.store import Store, StoreError, StoreStatus, open_store

__all__ = ["URL_ENV", "app", "resolve_store_url", "status_table"]

URL_ENV = "BYTELEAP_VALIDATOR__STORE__URL"

app = typer.Typer(
    help="The validator's database: upgrade the schema, check it, show its status.",
    no_args_is_help=True,
)

UrlOption = Annotated[
    str | None,
    typer.Option("--url", help="store URL (sqlite:///path or postgresql://user@host/db)"),
]
UrlFileOption = Annotated[
    Path | None, typer.Option("--url-file", help="0600 file holding the store URL")
]
TimeoutOption = Annotated[
    float, typer.Option("--timeout", min=0.1, help="seconds to wait for the database")
]


def resolve_store_url(url: str | None, url_file: Path | None) -> str:
    """``--url``, else the environment override, else the credential or ``--url-file``, else
    the validator's default."""
    if url:
        return url
    if env := os.environ.get(URL_ENV):
        return env
    settings = StoreSettings(url_file=None if url_file is None else str(url_file))
    try:
        return settings.resolve_url()
    except StoreUrlError as exc:
        _fail(str(exc), code=2)


def _fail(message: str, *, code: int = 1) -> NoReturn:
    typer.echo(f"byteleapctl db: {message}", err=True)
    raise typer.Exit(code)


def _open(url: str | None, url_file: Path | None, timeout: float) -> Store:
    try:
        return open_store(resolve_store_url(url, url_file), timeout_s=timeout)
    except StoreError as exc:
        _fail(str(exc))


@app.command()
def upgrade(
    url: UrlOption = None, url_file: UrlFileOption = None, timeout: TimeoutOption = 10.0
) -> None:
    """Apply the missing schema migrations (safe to run while the validator runs)."""
    store = _open(url, url_file, timeout)
    try:
        applied = store.upgrade()
        version = store.schema_version()
    except StoreError as exc:
        _fail(str(exc))
    finally:
        store.close()
    if applied:
        done = ", ".join(str(v) for v in applied)
        typer.echo(f"applied migration(s) {done}: schema is at version {version}")
    else:
        typer.echo(f"schema is already at version {version}")


@app.command()
def check(
    url: UrlOption = None, url_file: UrlFileOption = None, timeout: TimeoutOption = 10.0
) -> None:
    """Exit 0 when the schema is exactly the version this code needs, else 1 with one line."""
    store = _open(url, url_file, timeout)
    try:
        store.check()
    except StoreError as exc:
        _fail(str(exc))
    finally:
        store.close()
    typer.echo("schema is current")


@app.command()
def status(
    url: UrlOption = None,
    url_file: UrlFileOption = None,
    timeout: TimeoutOption = 10.0,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
) -> None:
    """Backend, location, schema version and what the database holds."""
    store = _open(url, url_file, timeout)
    try:
        current = store.status()
    except StoreError as exc:
        _fail(str(exc))
    finally:
        store.close()
    if as_json:
        typer.echo(msgspec.json.encode(current).decode())
    else:
        Console().print(status_table(current))


def status_table(s: StoreStatus) -> Table:
    """:class:`StoreStatus` as a two-column table."""
    if s.schema_version == s.expected_version:
        schema = f"{s.schema_version} (current)"
    elif s.schema_version < s.expected_version:
        schema = f"{s.schema_version} (needs {s.expected_version}: run byteleapctl db upgrade)"
    else:
        schema = f"{s.schema_version} (newer than this code: {s.expected_version})"
    last = (
        "never"
        if s.last_cycle_at is None
        else datetime.datetime.fromtimestamp(s.last_cycle_at, datetime.UTC).strftime(
            "%Y-%m-%d %H:%M:%S UTC"
        )
    )
    table = Table(title="validator store", show_header=False, title_justify="left")
    table.add_column("what")
    table.add_column("value", overflow="fold")
    for what, value in (
        ("backend", s.backend),
        ("location", s.location),
        ("schema version", schema),
        ("miners", str(s.miners)),
        ("workers (online)", f"{s.workers} ({s.online_workers})"),
        ("challenges (open)", f"{s.challenges_total} ({s.challenges_open})"),
        ("scoring cycles", str(s.cycles)),
        ("last cycle", last),
    ):
        table.add_row(what, value)
    return table
