"""byteleap.chain.weights: bittensor-identical clipping and u16 quantisation."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from bittensor.intents.weights import clip_to_max_weight as bt_clip_to_max_weight
from bittensor.intents.weights import normalize as bt_normalize
from hypothesis import given, settings
from hypothesis import strategies as st

from byteleap.chain.weights import clip_to_max_weight, quantize_weights

U16 = 65535

positive = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False)
weight = st.one_of(st.just(0.0), positive)
uid = st.integers(min_value=0, max_value=U16)
weight_maps = st.dictionaries(uid, weight, min_size=1, max_size=64).filter(
    lambda m: any(v > 0 for v in m.values())
)
limits = st.integers(min_value=1, max_value=U16)


class IndexLike:
    """An integer-like key that hashes apart from the int it stands for."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


def bittensor_result(weights: dict[int, float], limit: int) -> dict[int, int]:
    """What bittensor 11.3's SetWeights submits for these weights (its own functions)."""
    uids = sorted(weights)
    values = [weights[u] for u in uids]
    if limit < U16:
        values = bt_clip_to_max_weight(values, limit / U16)
    out_uids, out_values = bt_normalize(uids, values)
    return dict(zip(out_uids, out_values, strict=True))


@settings(max_examples=300, deadline=None)  # no deadline: CI machines are loaded
@given(weight_maps, limits)
def test_same_values_as_bittensor(weights: dict[int, float], limit: int) -> None:
    assert quantize_weights(weights, limit) == bittensor_result(weights, limit)


@settings(max_examples=200, deadline=None)
@given(st.lists(weight, min_size=1, max_size=64).filter(any), st.floats(0.001, 1.0))
def test_clip_matches_bittensor(values: list[float], share: float) -> None:
    assert clip_to_max_weight(values, share) == bt_clip_to_max_weight(values, share)


@settings(deadline=None)
@given(weight_maps, limits)
def test_largest_value_is_u16_max_and_no_zeros(weights: dict[int, float], limit: int) -> None:
    result = quantize_weights(weights, limit)

    assert max(result.values()) == U16
    assert all(0 < v <= U16 for v in result.values())
    assert set(result) <= set(weights)


@settings(deadline=None)
@given(weight_maps)
def test_without_a_cap_zero_weights_are_dropped(weights: dict[int, float]) -> None:
    result = quantize_weights(weights, U16)

    assert not {u for u, w in weights.items() if w == 0} & set(result)


@settings(deadline=None)
@given(weight_maps, limits)
def test_result_is_ordered_by_uid(weights: dict[int, float], limit: int) -> None:
    assert list(quantize_weights(weights, limit)) == sorted(quantize_weights(weights, limit))


@settings(deadline=None)
@given(weight_maps, limits)
def test_ranking_is_preserved(weights: dict[int, float], limit: int) -> None:
    result = quantize_weights(weights, limit)

    for a in result:
        for b in result:
            if weights[a] > weights[b]:
                assert result[a] >= result[b]


@settings(deadline=None)
@given(weight_maps)
def test_proportions_are_preserved_within_rounding(weights: dict[int, float]) -> None:
    result = quantize_weights(weights, U16)
    top = max(weights.values())

    for u, w in weights.items():
        # each value is round(w / top * 65535): off by at most half a step (plus float noise)
        assert abs(result.get(u, 0) - w / top * U16) <= 0.5 + 1e-6


@settings(deadline=None)
@given(weight_maps, st.integers(min_value=1, max_value=U16 - 1))
def test_cap_is_respected_when_it_can_be(weights: dict[int, float], limit: int) -> None:
    share = limit / U16
    if len(weights) * share <= 1:
        return  # no distribution over these uids meets the cap: bittensor goes uniform
    if sum(1 for w in weights.values() if w > 0) * share <= 1:
        return  # mass is redistributed proportionally, so zero weights never take any
    result = quantize_weights(weights, limit)

    # u16 rounding may push the largest share up by about half a step per entry
    assert max(result.values()) / sum(result.values()) <= share + len(result) / U16


@settings(deadline=None)
@given(weight_maps, st.integers(min_value=1, max_value=U16 - 1))
def test_impossible_cap_gives_every_given_uid_the_same_weight(
    weights: dict[int, float], limit: int
) -> None:
    if len(weights) * (limit / U16) > 1:
        return
    assert quantize_weights(weights, limit) == dict.fromkeys(sorted(weights), U16)


def test_weights_below_the_cap_are_untouched_by_clipping() -> None:
    assert clip_to_max_weight([1.0, 1.0, 2.0], 0.5) == [0.25, 0.25, 0.5]


def test_cap_redistributes_mass_to_the_others() -> None:
    clipped = clip_to_max_weight([10.0, 1.0, 1.0], 0.5)

    assert math.isclose(sum(clipped), 1.0)
    assert clipped[0] <= 0.5
    assert math.isclose(clipped[1], clipped[2]) and clipped[1] > 1 / 12


def test_numpy_inputs_are_accepted() -> None:
    weights: dict[Any, Any] = {np.int64(1): np.float32(2.0), 2: np.float64(1.0)}

    assert quantize_weights(weights, U16) == {1: U16, 2: 32768}


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({}, "no weights"),
        ({1: 0.0, 2: 0.0}, "all weights are zero"),
        ({1: -0.5, 2: 1.0}, "uid 1 is -0.5, weights must not be negative"),
        ({1: math.nan}, "uid 1 is nan, weights must be finite"),
        ({3: math.inf}, "uid 3 is inf, weights must be finite"),
        ({1: "1.0"}, "expected a real number"),
        ({1: True}, "expected a real number"),
        ({-1: 1.0}, "uid -1 is outside 0..65535"),
        ({65536: 1.0}, "uid 65536 is outside 0..65535"),
        ({1.5: 1.0}, "uid 1.5 is not an integer"),
        ({3: 1.0, IndexLike(3): 2.0}, "duplicate uids"),
    ],
)
def test_invalid_weights_are_refused_with_a_clear_message(
    weights: dict[object, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        quantize_weights(weights, U16)  # type: ignore[arg-type]


@pytest.mark.parametrize("limit", [0, 65536, -1, 1.5, True])
def test_invalid_limit_is_refused(limit: object) -> None:
    with pytest.raises(ValueError, match="max_weight_limit"):
        quantize_weights({1: 1.0}, limit)  # type: ignore[arg-type]


@pytest.mark.parametrize("share", [0.0, -0.1, 1.5, math.nan])
def test_invalid_share_is_refused(share: float) -> None:
    with pytest.raises(ValueError, match="max_share"):
        clip_to_max_weight([1.0], share)
