"""The scoring-cycle benchmark runs at a tiny size and reports every figure it promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_scoring_cycle_bench_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "cycle.json"
    args = ["--miners", "3", "--workers", "4", "--repeats", "1", "--finishes", "5"]
    subprocess.run(
        [sys.executable, "-m", "tests.perf.bench_scoring_cycle", *args, "--out", str(out)],
        check=True,
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        timeout=300,
    )
    result = json.loads(out.read_text())
    assert (result["miners"], result["workers_per_miner"]) == (3, 4)
    backends = [result["sqlite"]]
    if "skipped" in result["postgresql"]:
        assert "not reachable" in result["postgresql"]["skipped"]
        if os.environ.get("BYTELEAP_REQUIRE_SYSTEM_TESTS", "") not in ("", "0"):
            pytest.fail(f"PostgreSQL skipped: {result['postgresql']['skipped']}")
    else:
        backends.append(result["postgresql"])
    for figures in backends:
        assert figures["workers"] == 12
        parts = figures["scoring_inputs_s"] + figures["score_network_s"] + figures["record_cycle_s"]
        assert figures["cycle_s"] == pytest.approx(parts)
        assert figures["peak_rss_mib"] >= figures["baseline_rss_mib"] > 0
        assert figures["finish_per_s"] > 0 and figures["mark_present_all_s"] > 0
        assert isinstance(figures["within_targets"], bool)
