"""Reconnect and retry delays: one full-jitter exponential backoff for every loop that redials.

Attempt k waits ``uniform(0, min(max, initial * 2**k))`` (AWS's "full jitter"), so a fleet of
agents that lost the same peer does not come back in lockstep. :meth:`Backoff.long_delay` is the
wait after a refusal (the peer said no, asking again soon will not help).
"""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    """Full-jitter exponential backoff: attempt k waits uniform(0, min(max, initial * 2**k))."""

    def __init__(self, initial_s: float, max_s: float, *, rng: random.Random | None = None) -> None:
        # The agents configure these as reconnect_initial_s / reconnect_min_s and reconnect_max_s.
        if not initial_s > 0:
            raise ValueError("reconnect_initial_s (reconnect_min_s): must be positive")
        if max_s < initial_s:
            raise ValueError(
                "reconnect_max_s: must not be smaller than reconnect_initial_s (reconnect_min_s)"
            )
        self._initial = initial_s
        self._max = max_s
        self._rng = rng if rng is not None else random.SystemRandom()
        self._attempt = 0

    @property
    def attempt(self) -> int:
        """Delays handed out since the last reset."""
        return self._attempt

    @property
    def max_s(self) -> float:
        return self._max

    def ceiling(self) -> float:
        """The upper bound of the next delay."""
        return min(self._max, self._initial * 2.0 ** min(self._attempt, 62))

    def next_delay(self) -> float:
        ceiling = self.ceiling()
        self._attempt += 1
        return self._rng.uniform(0.0, ceiling)

    def long_delay(self) -> float:
        """A wait near the cap (after a refusal), jittered so many agents do not come at once."""
        self._attempt += 1
        return self._rng.uniform(self._max / 2, self._max)

    def reset(self) -> None:
        self._attempt = 0
