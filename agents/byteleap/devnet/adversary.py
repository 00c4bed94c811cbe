"""Deliberately dishonest workers for the devnet and its tests.

``python -m byteleap.devnet.adversary garbage-reveal --config worker.yaml`` runs the real worker
agent, except that every reveal carries garbage: plausible integers in place of the computed row
values, with the honest Merkle paths. The commit is honest, so only the phase-2 check can catch
it, which is what the devnet demonstrates: the validator must fail every one of its challenges.
This module is never installed as a command and nothing in the packaged agents imports it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from ..core import wire
from ..core.challenge.prover import ProvenChallenge
from ..worker import agent as worker_agent
from ..worker.challenges import ChallengeRunner

__all__ = ["GarbageRevealRunner", "main"]


class GarbageRevealRunner(ChallengeRunner):
    """Reveals random integers of an honest row's magnitude instead of the row."""

    @staticmethod
    def _reveal_rows(req: wire.RevealRequest, proof: ProvenChallenge) -> wire.ChallengeReveal:
        honest = ChallengeRunner._reveal_rows(req, proof)
        rng = np.random.default_rng()
        rows = []
        for row in honest.rows:
            values = np.frombuffer(row.values, "<f4")
            bound = max(1, int(np.abs(values).max()))
            garbage = rng.integers(-bound, bound + 1, size=values.size).astype("<f4")
            rows.append(wire.RevealedRow(index=row.index, values=garbage.tobytes(), path=row.path))
        return wire.ChallengeReveal(
            challenge_id=honest.challenge_id, device_uuid=honest.device_uuid, rows=rows
        )


_MODES: dict[str, type[ChallengeRunner]] = {"garbage-reveal": GarbageRevealRunner}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m byteleap.devnet.adversary",
        description="Run a dishonest devnet worker (tests and demos only).",
    )
    parser.add_argument("mode", choices=sorted(_MODES))
    args, rest = parser.parse_known_args(argv)
    worker_agent.main(rest, runner_type=_MODES[args.mode])


if __name__ == "__main__":
    main(sys.argv[1:])
