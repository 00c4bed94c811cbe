"""The whole network through `byteleapctl devnet up`: real processes, sockets and chain file.

Two miners, five CPU workers: one worker reveals garbage (cheater), one is offline every other
round (flaky). What an operator would check in the printout is asserted on the records behind it:
the cheater's challenge factor is 0, the flaky worker's availability is below every honest one,
and the weights on the devnet chain rank the miners as their scores do.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from byteleap.chain.devnet import DevnetChain
from byteleap.core.identity import HotkeySigner, WorkerKey
from byteleap.devnet.network import NETUID, VALIDATOR_URI
from byteleap.validator.store import ChallengeState, open_store

pytestmark = pytest.mark.slow

ROUNDS = 4


def _worker_ids(root: Path) -> dict[str, str]:
    return {
        WorkerKey.load(root / f"worker-{i}" / "worker.key").worker_id: f"worker-{i}"
        for i in range(1, 6)
    }


def test_devnet_scores_a_cheater_zero_and_ranks_miners_on_chain(tmp_path: Path) -> None:
    root = tmp_path / "devnet"
    command = [
        str(Path(sys.executable).with_name("byteleapctl")),
        "devnet",
        "up",
        "--miners",
        "2",
        "--workers",
        "5",
        "--cheaters",
        "1",
        "--flaky",
        "1",
        "--rounds",
        str(ROUNDS),
        "--dir",
        str(root),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for heading in ("workers, cycle", "miners, cycle", "weights on the devnet chain"):
        assert heading in out
    assert "weights: submitted at block" in out

    names = _worker_ids(root)  # worker-1 is the cheater, worker-2 the flaky one
    store = open_store(f"sqlite:///{root / 'validator' / 'validator.db'}")
    try:
        cycle = store.latest_cycle()
        states = store.challenge_states()
    finally:
        store.close()
    assert cycle is not None
    by_name = {names[w.worker_id]: w for w in cycle.result.workers}
    assert set(by_name) == {f"worker-{i}" for i in range(1, 6)}

    cheater, flaky = by_name["worker-1"], by_name["worker-2"]
    honest = [by_name[f"worker-{i}"] for i in (3, 4, 5)]
    assert cheater.challenge == 0.0
    assert cheater.successes == 0 and cheater.failures >= ROUNDS - 1
    assert all(w.successes >= ROUNDS - 1 and w.challenge > 0 for w in honest)
    assert flaky.availability < min(w.availability for w in honest)
    assert all(state.terminal for state in states.values())
    assert ChallengeState.FAILED in set(states.values())  # the cheater's reveals

    chain = DevnetChain(root / "chain.db")
    on_chain = chain.weights_sync(NETUID)
    snapshot = chain.snapshot_sync(NETUID)
    validator = snapshot.by_hotkey(HotkeySigner.from_uri(VALIDATOR_URI).ss58_address)
    assert validator is not None
    weights = on_chain[validator.uid]
    scores = {cycle.uids[m.miner_hotkey]: m.score for m in cycle.result.miners}
    assert set(weights) == {uid for uid, s in scores.items() if s > 0}
    ranked_by_score = sorted(scores, key=lambda uid: scores[uid])
    ranked_on_chain = sorted(weights, key=lambda uid: weights[uid])
    assert ranked_on_chain == ranked_by_score
    best, worst = ranked_by_score[-1], ranked_by_score[0]
    assert weights[best] == 65535
    assert weights[worst] == pytest.approx(65535 * scores[worst] / scores[best], abs=1)


def test_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    root = tmp_path / "devnet"
    command = [
        str(Path(sys.executable).with_name("byteleapctl")),
        "devnet",
        "up",
        "--workers",
        "2",
        "--rounds",
        "100",
        "--dir",
        str(root),
    ]

    def children() -> list[str]:  # every agent process has the devnet directory in its argv
        found = subprocess.run(["pgrep", "-f", f"{root}/"], capture_output=True, text=True)
        return found.stdout.split()

    # a terminal's Ctrl-C: SIGINT to the whole foreground process group
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "workers online at the validator" in line:
                break
        else:
            pytest.fail("the devnet never came up")
        assert len(children()) == 4  # validator, miner, two workers
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 130
        assert "interrupted: every process was stopped" in proc.stdout.read()
        assert children() == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
