"""Statistics of the ablation harness: a known synthetic effect is detected, a null effect is not."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from trainer.study.stats import balanced_log_ppl, factor_effects, paired_effect


def test_balanced_log_ppl_is_the_mean_of_domain_log_ppls():
    # domain a: 2.0 nats/token over 10 tokens; domain b: 1.0 over 1000 tokens -> balanced 1.5, not ~1.01
    assert balanced_log_ppl({"a": (20.0, 10), "b": (1000.0, 1000)}) == pytest.approx(1.5)
    # = log of the geometric mean of the per-domain perplexities
    assert balanced_log_ppl({"a": (20.0, 10), "b": (1000.0, 1000)}) == pytest.approx(
        math.log(math.sqrt(math.exp(2.0) * math.exp(1.0)))
    )


@pytest.mark.parametrize(
    "bad, message",
    [({}, "at least one domain"), ({"a": (1.0, 0)}, "no tokens"), ({"a": (math.nan, 3)}, "non-finite")],
)
def test_balanced_log_ppl_refuses_bad_input(bad, message):
    with pytest.raises(ValueError, match=message):
        balanced_log_ppl(bad)


def test_paired_effect_matches_a_hand_computation():
    ref, test = [3.0, 2.5, 2.0], [2.0, 2.0, 1.5]  # deltas 1.0, 0.5, 0.5
    e = paired_effect(ref, test)
    assert e.deltas == (1.0, 0.5, 0.5) and e.mean == pytest.approx(2 / 3)
    sd = math.sqrt(((1 / 3) ** 2 + 2 * (1 / 6) ** 2) / 2)
    assert e.se == pytest.approx(sd / math.sqrt(3))
    assert e.t == pytest.approx((2 / 3) / (sd / math.sqrt(3)))
    assert 0.0 < e.p < 0.1


def test_paired_effect_degenerate_cases():
    assert paired_effect([1.0], [0.5]).p is None  # one seed: no test
    same = paired_effect([1.0, 2.0], [1.0, 2.0])
    assert same.mean == 0.0 and same.p == 1.0
    shifted = paired_effect([1.5, 2.5], [1.0, 2.0])
    assert shifted.p == 0.0 and shifted.t == math.inf
    with pytest.raises(ValueError, match="length"):
        paired_effect([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="finite"):
        paired_effect([1.0, math.inf], [1.0, 2.0])


def _design(effects: dict[str, float], seeds: int, noise: float, rng_seed: int = 0):
    """A full 2^k design whose log-PPL drops by `effects[f]` when factor f is on, plus seeded noise."""
    rng = random.Random(rng_seed)
    factors = sorted(effects)
    cells = {}
    seed_offset = {s: rng.gauss(0, 0.3) for s in range(seeds)}  # seeds differ a lot: pairing must remove it
    for levels in itertools.product([False, True], repeat=len(factors)):
        cell = tuple(sorted(zip(factors, levels)))
        cells[cell] = {
            s: 2.0 + seed_offset[s] - sum(effects[f] for f, on in cell if on) + rng.gauss(0, noise)
            for s in range(seeds)
        }
    return cells, factors


def test_a_known_effect_is_detected_and_a_null_effect_is_not():
    cells, factors = _design({"router": 0.10, "scope": 0.0, "lifecycle": -0.05}, seeds=5, noise=0.01)
    effects = factor_effects(cells, factors)
    assert effects["router"].mean == pytest.approx(0.10, abs=0.02) and effects["router"].p < 0.01
    assert effects["lifecycle"].mean == pytest.approx(-0.05, abs=0.02) and effects["lifecycle"].p < 0.01
    assert abs(effects["scope"].mean) < 0.02 and effects["scope"].p > 0.05


def test_factor_effects_refuses_an_impossible_design():
    cells = {(("router", True),): {0: 1.0, 1: 1.1}}
    with pytest.raises(ValueError, match="router.*off"):
        factor_effects(cells, ["router"])
    cells = {(("router", False),): {0: 1.0}, (("router", True),): {1: 1.1}}
    with pytest.raises(ValueError, match="no seed"):
        factor_effects(cells, ["router"])
