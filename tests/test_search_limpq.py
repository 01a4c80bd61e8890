"""LIMPQ integer program against brute force, with masking of non-monotone indicators."""

import itertools

import numpy as np
import pytest
from eqnet.search.cost import CostModel, LayerCost
from eqnet.search.genome import ChoiceTable, Constraint, layer_options
from eqnet.search.limpq import limpq_search, monotone_mask
from eqnet.space import ElasticSpace, LayerChoice

SPACE = ElasticSpace(w_bits=(2, 4, 8), a_bits=(4, 8))
LAYERS = {"a": (300, 40), "b": (900, 80), "c": (200, 400)}  # name: (MACs, weights)


def setup(fixed_last=False):
    cost = CostModel([LayerCost(n, macs, p, 4, 10, 0) for n, (macs, p) in LAYERS.items()])
    opts = {n: layer_options(SPACE, forms=False) for n in LAYERS}
    if fixed_last:
        opts["c"] = [LayerChoice(8, 8)]
    return cost, ChoiceTable(opts)


INDICATORS = {
    "a": {"weight": {2: 0.9, 4: 0.3, 8: 0.05}, "activation": {4: 0.4, 8: 0.1}},
    "b": {"weight": {2: 0.2, 4: 0.1, 8: 0.02}, "activation": {4: 0.5, 8: 0.2}},
    # non-monotone: the 8-bit weight step is larger than the 4-bit one
    "c": {"weight": {2: 0.6, 4: 0.2, 8: 0.3}, "activation": {4: 0.3, 8: 0.05}},
}


def reference(alpha, bitops_limit, size_limit):
    """Brute force over every (w, a) per layer, written from the LIMPQ objective."""
    best, best_val = None, np.inf
    per_layer = [list(itertools.product((2, 4, 8), (4, 8))) for _ in LAYERS]
    for combo in itertools.product(*per_layer):
        bitops = sum(LAYERS[n][0] * w * a for n, (w, a) in zip(LAYERS, combo))
        # size: weights at w bits + one fp32 scale per each of 4 channels + act scale/zp
        size = sum(LAYERS[n][1] * w / 8 + 4 * (4 + 2) for n, (w, a) in zip(LAYERS, combo))
        if bitops > bitops_limit or size > size_limit:
            continue
        if combo[2][0] == 8:  # masked: layer c's 8-bit weight indicator is not below 4-bit's
            continue
        val = sum(
            INDICATORS[n]["activation"][a] + alpha * INDICATORS[n]["weight"][w]
            for n, (w, a) in zip(LAYERS, combo)
        )
        if val < best_val:
            best, best_val = combo, val
    return best, best_val


@pytest.mark.parametrize("alpha", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("frac", [0.2, 0.5])
def test_matches_brute_force(alpha, frac):
    cost, table = setup()
    lo = sum(m * 2 * 4 for m, _ in LAYERS.values())
    hi = sum(m * 8 * 8 for m, _ in LAYERS.values())
    bitops_limit = lo + frac * (hi - lo)
    size_limit = 250.0
    want, want_val = reference(alpha, bitops_limit, size_limit)
    res = limpq_search(
        table,
        cost,
        INDICATORS,
        [Constraint("bitops", "<=", bitops_limit), Constraint("size", "<=", size_limit)],
        alpha=alpha,
    )
    got = tuple((c.w_bits, c.a_bits) for _, c in res.config)
    assert res.objective == pytest.approx(want_val)
    assert got == want
    assert res.masked["c"] == {"w": [8], "a": []}
    assert cost.bitops(res.config) <= bitops_limit and cost.size_bytes(res.config) <= size_limit


def test_fixed_layer_and_errors():
    cost, table = setup(fixed_last=True)
    ind = {k: v for k, v in INDICATORS.items() if k != "c"}
    res = limpq_search(table, cost, ind, [Constraint("avg_w_bits", "<=", 7.0)])
    assert res.config["c"] == LayerChoice(8, 8)
    with pytest.raises(ValueError, match="infeasible"):
        limpq_search(table, cost, ind, [Constraint("avg_w_bits", "<=", 6.5)])
    with pytest.raises(ValueError, match="alpha"):
        limpq_search(table, cost, ind, [], alpha=-1.0)
    with pytest.raises(ValueError, match="no importance indicators"):
        limpq_search(table, cost, {"a": ind["a"]}, [])
    with pytest.raises(ValueError, match="accepted roles"):
        limpq_search(table, cost, {**ind, "a": {"w": {2: 1.0}, "bias": {2: 1.0}}}, [])


def test_monotone_mask():
    assert monotone_mask({2: 1.0, 3: 0.5, 4: 0.7, 5: 0.4}) == {2: True, 3: True, 4: False, 5: True}
    assert monotone_mask({2: 0.1, 4: 0.1}) == {2: True, 4: False}


def test_trainer_indicator_format():
    # eqnet.search.limpq.importance_indicators gives {layer: {("w", bits): v, ("a", bits): v}}
    cost, table = setup()
    flat = {
        n: {
            **{("w", b): v for b, v in d["weight"].items()},
            **{("a", b): v for b, v in d["activation"].items()},
        }
        for n, d in INDICATORS.items()
    }
    cons = [Constraint("bitops", "<=", 20_000.0)]
    assert (
        limpq_search(table, cost, flat, cons).config
        == limpq_search(table, cost, INDICATORS, cons).config
    )
