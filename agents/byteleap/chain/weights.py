"""Weights as the chain takes them: clipped to the subnet's cap, max-upscaled to u16, zeros dropped.

These are the same steps, with the same floating-point operations in the same order, as
bittensor 11.3.0's ``SetWeights`` (``bittensor/intents/weights.py``: ``clip_to_max_weight`` then
``normalize``), so an adapter that computes weights here gets bit-identical u16 values to what
the SDK would submit. The devnet uses them to store exactly what mainnet would see; the tests
check the equivalence against the SDK itself.

Two bittensor behaviours are kept on purpose because the chain-side result depends on them:

* if the cap cannot be met by the uids that have weight (``k * max_share <= 1`` for the ``k``
  uids given, zeros included), the clip falls back to a uniform distribution over *all* given
  uids, so uids given a zero weight can end up with weight; pass only the uids you mean to weight;
* rounding is Python's ``round`` (half to even).

Inputs are validated here (finite, non-negative, at least one positive, uids in u16 range) and
every problem is a :class:`ValueError` whose message says what was wrong.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Mapping, Sequence
from itertools import accumulate
from typing import Final

from .port import U16_MAX

__all__ = ["clip_to_max_weight", "quantize_weights"]

_CLIP_EPSILON: Final = 1e-7  # bittensor's; keeps the clipped maximum just under the cap


def _checked_weight(label: str, weight: object) -> float:
    # numbers.Real admits numpy scalars; bool and str are refused, not coerced.
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
        raise ValueError(f"{label} is {weight!r}, expected a real number")
    value = float(weight)
    if not math.isfinite(value):
        raise ValueError(f"{label} is {value}, weights must be finite")
    if value < 0:
        raise ValueError(f"{label} is {value}, weights must not be negative")
    return value


def _require_positive(values: Sequence[float]) -> None:
    if not values:
        raise ValueError("no weights given: at least one uid needs a positive weight")
    if not any(value > 0 for value in values):
        raise ValueError("all weights are zero: at least one uid needs a positive weight")


def clip_to_max_weight(weights: Sequence[float], max_share: float) -> list[float]:
    """Normalise ``weights`` to sum 1 with no element above ``max_share`` (a fraction in (0, 1]).

    Weights already within the cap are only sum-normalised. Otherwise everything above a cutoff
    is clipped to it, the cutoff chosen so the largest share lands on the cap: mass is
    redistributed to the others, never discarded, and the order of the weights is kept. When
    no distribution over ``len(weights)`` uids can meet the cap, the result is uniform.
    """
    limit = float(max_share)
    if not math.isfinite(limit) or not 0 < limit <= 1:
        raise ValueError(f"max_share is {max_share!r}, expected a fraction in (0, 1]")
    values = [_checked_weight(f"weight #{i}", w) for i, w in enumerate(weights)]
    _require_positive(values)
    n = len(values)
    total = float(sum(values))
    if n * limit <= 1:
        return [1.0 / n] * n

    estimation = sorted(w / total for w in values)
    if estimation[-1] <= limit:
        return [w / total for w in values]

    cumsum = list(accumulate(estimation))
    n_values = sum(
        1
        for i, e in enumerate(estimation)
        if e / ((n - i - 1) * e + cumsum[i] + _CLIP_EPSILON) < limit
    )
    cutoff_scale = (limit * cumsum[n_values - 1] - _CLIP_EPSILON) / (1 - limit * (n - n_values))
    cutoff = cutoff_scale * total

    clipped = [min(w, cutoff) for w in values]
    clipped_total = sum(clipped)
    return [w / clipped_total for w in clipped]


def _checked_uid(uid: object) -> int:
    if isinstance(uid, bool):
        raise ValueError(f"uid {uid!r} is not an integer")
    try:
        value = operator.index(uid)  # type: ignore[arg-type]  # runtime-checked right here
    except TypeError:
        raise ValueError(f"uid {uid!r} is not an integer") from None
    if not 0 <= value <= U16_MAX:
        raise ValueError(f"uid {value} is outside 0..{U16_MAX}")
    return value


def quantize_weights(weights: Mapping[int, float], max_weight_limit_u16: int) -> dict[int, int]:
    """The u16 weights the chain would store for ``weights`` (uid -> any non-negative scale).

    ``max_weight_limit_u16`` is the subnet's ``max_weight_limit`` (65535: no cap). The result is
    ordered by uid; its largest value is 65535 and it holds no zeros. Raises :class:`ValueError`
    for an empty or all-zero mapping, a negative or non-finite weight, a uid outside u16, or a
    limit outside 1..65535.
    """
    if (
        isinstance(max_weight_limit_u16, bool)
        or not isinstance(max_weight_limit_u16, int)
        or not 1 <= max_weight_limit_u16 <= U16_MAX
    ):
        raise ValueError(
            f"max_weight_limit is {max_weight_limit_u16!r}, expected an integer in 1..{U16_MAX}"
        )
    if not isinstance(weights, Mapping):
        raise ValueError(f"weights must be a mapping uid -> weight, got {type(weights).__name__}")
    items = sorted(
        ((_checked_uid(uid), weight) for uid, weight in weights.items()), key=lambda item: item[0]
    )
    uids = [uid for uid, _ in items]
    if len(set(uids)) != len(uids):  # e.g. 3 and numpy.int64(3) as separate keys
        raise ValueError("duplicate uids in weights: each uid may appear once")
    values = [_checked_weight(f"the weight of uid {uid}", weight) for uid, weight in items]
    _require_positive(values)
    if max_weight_limit_u16 < U16_MAX:
        values = clip_to_max_weight(values, max_weight_limit_u16 / U16_MAX)

    top = max(values)
    quantized: dict[int, int] = {}
    for uid, value in zip(uids, values, strict=True):
        u16 = round((value / top) * U16_MAX)
        if u16 != 0:
            quantized[uid] = int(u16)
    return quantized
