"""byteleapctl: the operator's command line.

Agents add their own command groups (status, workers, scores, keys, db, devnet) as they land.
"""

from __future__ import annotations

import typer

from .. import __version__
from .challenge import app as challenge_app
from .db import app as db_app
from .devnet import app as devnet_app
from .gateway import app as gateway_app
from .keys import app as keys_app
from .scores import app as scores_app

app = typer.Typer(
    name="byteleapctl",
    help="Operate ByteLeap agents: worker, miner, validator, gateway.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(challenge_app, name="challenge")
app.add_typer(db_app, name="db")
app.add_typer(devnet_app, name="devnet")
app.add_typer(gateway_app, name="gateway")
app.add_typer(keys_app, name="keys")
app.add_typer(scores_app, name="scores")


@app.command()
def version() -> None:
    """Print the installed version."""
    typer.echo(f"byteleap {__version__}")


def main() -> None:
    app()
