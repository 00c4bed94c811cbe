"""The benchmark harness runs and writes the figures `make bench` promises (tiny sizes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_bench_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, "-m", "tests.perf.run", "--quick", "--out", str(out)],
        check=True,
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
    )
    result = json.loads(out.read_text())
    assert {p["n"] for p in result["prover"]} == {256, 512}
    assert all(p["prover_s"] > 0 and p["bare_matmul_s"] > 0 for p in result["prover"])
    assert {v["n"] for v in result["verifier"]} == {256, 2048}
    process = result["prover_process"]
    assert process["start_s"] > 0 and [p["n"] for p in process["sizes"]] == [256]
    assert all(p["child_process_s"] > 0 for p in process["sizes"])
    assert result["merkle"]["build_gbps_1_thread"] > 0
