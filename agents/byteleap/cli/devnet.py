"""``byteleapctl devnet up``: the whole network on this machine, on loopback (DESIGN §9)."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ..devnet.network import Devnet, DevnetError, DevnetPlan, DevnetReport, default_root
from .scores import render_cycle

__all__ = ["app", "print_report"]

app = typer.Typer(help="Run a local network: devnet chain, validator, miners, workers.")


def print_report(console: Console, report: DevnetReport) -> None:
    labels = {wid: f"{role.name} ({role.kind})" for wid, role in report.roles.items()}
    render_cycle(console, report.cycle, names=report.miner_names, labels=labels)
    table = Table(title="weights on the devnet chain", title_justify="left")
    for column in ("validator uid", "miner uid", "u16 weight"):
        table.add_column(column, justify="right")
    for validator_uid, row in sorted(report.chain_weights.items()):
        for uid, value in sorted(row.items()):
            table.add_row(str(validator_uid), str(uid), str(value))
    if not report.chain_weights:
        table.add_row("-", "-", "none yet")
    console.print(table)
    lease = report.lease
    if lease is not None:
        how = f" ({lease.end_reason})" if lease.end_reason else ""
        console.print(
            f"lease {lease.lease_id} on {lease.worker} ({', '.join(lease.device_uuids)}): "
            f"{lease.state}{how}"
        )


@app.command()
def up(
    workers: Annotated[int, typer.Option(min=1, max=100, help="CPU workers in all")] = 3,
    rounds: Annotated[int, typer.Option(min=1, help="challenge rounds to run")] = 3,
    miners: Annotated[int, typer.Option(min=1, max=16, help="miners")] = 1,
    cheaters: Annotated[int, typer.Option(min=0, help="workers that reveal garbage")] = 0,
    flaky: Annotated[int, typer.Option(min=0, help="workers offline half the time")] = 0,
    interval: Annotated[int, typer.Option(min=2, help="seconds between rounds")] = 4,
    n: Annotated[int, typer.Option(min=64, help="CPU challenge matrix size")] = 512,
    gateway: Annotated[
        bool,
        typer.Option(
            "--gateway",
            help="also run a gateway: workers get simulated GPUs (libvirt's test driver) and a "
            "renter leases one for part of the run",
        ),
    ] = False,
    directory: Annotated[
        Path | None, typer.Option("--dir", help="run in this directory (kept afterwards)")
    ] = None,
    keep: Annotated[bool, typer.Option(help="keep the temporary directory and its logs")] = False,
) -> None:
    """Start everything, run the rounds, print factors, scores and weights, stop everything."""
    console = Console()
    if not console.is_terminal and console.width < 132:
        console = Console(width=132)  # make demo, CI logs: room for every factor column
    try:
        plan = DevnetPlan(
            miners=miners,
            workers=workers,
            cheaters=cheaters,
            flaky=flaky,
            rounds=rounds,
            round_interval_s=interval,
            n=n,
            gateway=gateway,
        )
    except DevnetError as exc:
        raise typer.BadParameter(str(exc)) from None
    root = directory if directory is not None else default_root()
    started = time.monotonic()

    def progress(line: str) -> None:
        console.print(f"[dim]{time.monotonic() - started:6.1f}s[/dim] {line}")

    progress(f"devnet in {root}")
    failed = False
    code = 1
    try:
        report = asyncio.run(_run(plan, root, progress))
    except DevnetError as exc:
        console.print(f"[red]devnet failed:[/red] {exc}")
        failed = True
    except KeyboardInterrupt:
        console.print("interrupted: every process was stopped")
        failed = True
        code = 130  # the shell's convention for SIGINT
    else:
        print_report(console, report)
        progress("done")
    if directory is None and not keep and not failed:
        shutil.rmtree(root, ignore_errors=True)
    elif failed or keep:
        console.print(f"logs and state kept in {root}")
    if failed:
        raise typer.Exit(code)


async def _run(plan: DevnetPlan, root: Path, progress: Callable[[str], None]) -> DevnetReport:
    async with Devnet(plan, root, progress=progress) as devnet:
        report = await devnet.run()
        progress("stopping")
        return report
