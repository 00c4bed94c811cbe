"""`byteleapctl challenge`: run the proof of compute locally (prove, commit, sample, verify)."""

from __future__ import annotations

import random
import secrets
import time
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from ..core.challenge import ChallengeError, ChallengeSpec, draw_sample, get_backend, prove, verify
from ..core.challenge.prover import available_backends
from ..core.challenge.simulate import skipping_prover
from ..core.challenge.spec import PRECISIONS

app = typer.Typer(help="Run the proof-of-compute challenge locally.", no_args_is_help=True)


def _spec(n: int, device: str, precision: str) -> ChallengeSpec:
    return ChallengeSpec(
        challenge_id=secrets.token_bytes(16),
        seed=secrets.token_bytes(32),
        miner_hotkey="5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY",
        worker_id=secrets.token_hex(16),
        device_uuid=device,
        n=n,
        precision=precision,  # type: ignore[arg-type]  # checked against PRECISIONS below
    )


@app.command()
def demo(
    n: Annotated[int, typer.Option(help="matrix size (multiple of 64)")] = 2048,
    k: Annotated[int, typer.Option(help="rows sampled in phase 2")] = 16,
    m: Annotated[int, typer.Option(help="columns checked per sampled row")] = 8,
    backend: Annotated[str, typer.Option(help="numpy, cupy or auto")] = "auto",
    precision: Annotated[str, typer.Option(help="fp32, tf32, bf16 or fp16 (GPU)")] = "fp32",
    cheater_skip: Annotated[float, typer.Option(help="fraction of rows a cheater skips")] = 0.5,
) -> None:
    """One challenge round trip on this machine: prove, commit, sample, reveal, verify.

    Also shows a cheating prover that skipped part of the work being rejected.
    """
    console = Console()
    if precision not in PRECISIONS:
        raise typer.BadParameter(f"precision must be one of {', '.join(PRECISIONS)}")
    names = available_backends()
    chosen = ("cupy" if "cupy" in names else "numpy") if backend == "auto" else backend
    if chosen not in names:
        console.print(f"[red]backend {chosen!r} is not available here (have: {', '.join(names)})")
        raise typer.Exit(2)
    if chosen == "numpy" and precision != "fp32":
        console.print("[yellow]the CPU prover computes in fp32; using fp32")
        precision = "fp32"
    try:
        spec = _spec(n, "GPU-demo" if chosen == "cupy" else "cpu0", precision)
    except ChallengeError as exc:
        console.print(f"[red]{exc}")
        raise typer.Exit(2) from exc

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    start = time.perf_counter()
    np.matmul(a, a.T)
    bare = time.perf_counter() - start

    proof = prove(spec, get_backend(chosen))
    sample = draw_sample(n, k, m)
    start = time.perf_counter()
    rows = proof.reveal(sample.rows)
    reveal_s = time.perf_counter() - start
    revealed = {r.index: (r.values, r.path) for r in rows}
    start = time.perf_counter()
    verdict = verify(spec, proof.root, sample, revealed)
    verify_s = time.perf_counter() - start
    reveal_bytes = sum(len(r.values) + 32 * len(r.path) for r in rows)

    table = Table(title=f"proof of compute, n={n}, k={k}, m={m}", show_header=False)
    table.add_column("what")
    table.add_column("figure", overflow="fold")
    table.add_row("prover backend", f"{chosen} ({precision})")
    table.add_row("prove (generate + multiply + hash)", f"{proof.elapsed_s * 1e3:.1f} ms")
    table.add_row("throughput", f"{spec.flops / proof.elapsed_s / 1e9:.1f} GFLOP/s")
    table.add_row("bare numpy.matmul, same n (CPU)", f"{bare * 1e3:.1f} ms")
    table.add_row("commitment (Merkle root)", proof.root.hex())
    table.add_row(
        "reveal", f"{len(rows)} rows, {reveal_bytes / 1024:.0f} KiB, {reveal_s * 1e3:.1f} ms"
    )
    table.add_row(
        "verify", f"{verify_s * 1e3:.2f} ms, {verdict.entries_checked} entries recomputed"
    )
    table.add_row("verdict", "[green]verified" if verdict.ok else f"[red]{verdict.reason}")
    proof.release()

    if 0 < cheater_skip < 1 and chosen == "numpy":
        cheat = skipping_prover(prove(spec), cheater_skip, np.random.default_rng())
        caught = 0
        trials = 20
        rng = random.SystemRandom()
        for _ in range(trials):
            s = draw_sample(n, k, m, rng)
            got = {r.index: (r.values, r.path) for r in cheat.reveal(s.rows)}
            caught += not verify(spec, cheat.root, s, got).ok
        predicted = 1 - (1 - cheater_skip) ** k
        table.add_row(
            f"cheater skipping {cheater_skip:.0%} of rows",
            f"rejected {caught}/{trials} (predicted {predicted:.2%})",
        )
    console.print(table)
    if not verdict.ok:
        raise typer.Exit(1)


@app.command()
def backends() -> None:
    """List the prover backends usable on this machine."""
    for name in available_backends():
        typer.echo(name)
