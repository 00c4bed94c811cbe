"""``byteleapctl scores``: why each miner has its weight, from the validator's stored cycles."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

import msgspec
import typer
from rich.console import Console
from rich.table import Table

from ..validator.store import CycleRecord, StoreError, open_store
from .db import UrlFileOption, UrlOption, resolve_store_url

__all__ = ["app", "miner_table", "render_cycle", "worker_table"]

app = typer.Typer(help="Explain the validator's scores and weights.", no_args_is_help=False)


def _short(text: str, keep: int = 10) -> str:
    return text if len(text) <= keep + 1 else text[:keep] + "…"


def _gflops(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e9:,.2f}"


def _leased(seconds: float) -> str:
    """Leased time in the window, in the unit that reads best (``-`` when never leased)."""
    if seconds <= 0:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def worker_table(
    cycle: CycleRecord,
    *,
    miner: str | None = None,
    names: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
) -> Table:
    """Every factor of every worker (of one miner when ``miner`` is given); ``leased`` is the
    gateway-signed leased time in the window, ``lease`` its share of the window."""
    names = names or {}
    labels = labels or {}
    table = Table(title=f"workers, cycle {cycle.cycle_id}", title_justify="left")
    for column, justify in (
        ("miner", "left"),
        ("worker", "left"),
        ("role", "left"),
        ("avail", "right"),
        ("ok/fail", "right"),
        ("particip.", "right"),
        ("GFLOP/s", "right"),
        ("rank", "right"),
        ("challenge", "right"),
        ("leased", "right"),
        ("lease", "right"),
        ("score", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for w in cycle.result.workers:
        if miner is not None and w.miner_hotkey != miner:
            continue
        table.add_row(
            names.get(w.miner_hotkey, _short(w.miner_hotkey)),
            _short(w.worker_id, 12),
            labels.get(w.worker_id, ""),
            f"{w.availability:.3f}",
            f"{w.successes}/{w.failures}",
            f"{w.participation:.3f}",
            _gflops(w.throughput),
            f"{w.rank:.3f}",
            f"{w.challenge:.3f}",
            _leased(w.leased_seconds),
            f"{w.lease:.3f}",
            f"{w.score:.4f}" + ("" if w.counted else " (not counted)"),
        )
    return table


def miner_table(cycle: CycleRecord, *, names: Mapping[str, str] | None = None) -> Table:
    names = names or {}
    table = Table(title=f"miners, cycle {cycle.cycle_id}", title_justify="left")
    for column in ("miner", "hotkey", "uid", "workers", "score", "weight"):
        table.add_column(column, justify="left" if column in ("miner", "hotkey") else "right")
    for m in cycle.result.miners:
        uid = cycle.uids.get(m.miner_hotkey)
        table.add_row(
            names.get(m.miner_hotkey, ""),
            m.miner_hotkey,
            "-" if uid is None else str(uid),
            f"{m.counted_workers}/{m.workers}",
            f"{m.score:.4f}" + (" (capped)" if m.capped else ""),
            f"{m.weight:.4f}",
        )
    return table


def render_cycle(
    console: Console,
    cycle: CycleRecord,
    *,
    miner: str | None = None,
    names: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
) -> None:
    console.print(worker_table(cycle, miner=miner, names=names, labels=labels))
    console.print(miner_table(cycle, names=names))
    weights = cycle.weights
    if weights is None:
        console.print("weights: not submitted yet")
    else:
        where = f" at block {weights.block}" if weights.block is not None else ""
        path = f" ({weights.path})" if weights.path else ""
        line = f"weights: {weights.status}{where}{path}"
        if weights.message and weights.status != "submitted":
            line += f": {weights.message}"
        console.print(line)


@app.callback(invoke_without_command=True)
def scores(
    url: UrlOption = None,
    url_file: UrlFileOption = None,
    miner: Annotated[str | None, typer.Option(help="only this miner's workers (hotkey)")] = None,
    cycle_id: Annotated[int | None, typer.Option("--cycle", help="a past cycle id")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="the full record as JSON")] = False,
) -> None:
    """Show the latest scoring cycle (or --cycle N): every factor of every worker and miner."""
    console = Console()
    try:
        store = open_store(resolve_store_url(url, url_file))
    except StoreError as exc:
        console.print(f"[red]cannot open the store:[/red] {exc}")
        raise typer.Exit(1) from None
    try:
        cycle = store.latest_cycle() if cycle_id is None else store.cycle(cycle_id)
    except StoreError as exc:
        console.print(f"[red]cannot read the store:[/red] {exc}")
        raise typer.Exit(1) from None
    finally:
        store.close()
    if cycle is None:
        console.print(
            "no scoring cycle recorded yet" if cycle_id is None else f"no cycle {cycle_id}"
        )
        raise typer.Exit(1)
    if as_json:
        typer.echo(msgspec.json.encode(cycle).decode())
        return
    render_cycle(console, cycle, miner=miner)
