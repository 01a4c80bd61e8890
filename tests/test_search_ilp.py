"""choose_per_layer against brute force over every assignment."""

import itertools

import numpy as np
import pytest
from eqnet.search.ilp import choose_per_layer


def brute_force(objective, costs, limits):
    best, best_val = None, np.inf
    for combo in itertools.product(*[range(len(o)) for o in objective]):
        if any(sum(costs[k][l][c] for l, c in enumerate(combo)) > limits[k] for k in costs):
            continue
        val = sum(objective[l][c] for l, c in enumerate(combo))
        if val < best_val - 1e-12:
            best, best_val = combo, val
    return best, best_val


@pytest.mark.parametrize("seed", range(8))
def test_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_layers = 5
    sizes = rng.integers(2, 5, size=n_layers)
    objective = [rng.random(n) for n in sizes]
    costs = {
        "bitops": [rng.integers(1, 100, size=n).astype(float) * 1e7 for n in sizes],
        "size": [rng.random(n) * 10 for n in sizes],
    }
    # limits between the minimum and the maximum so the budgets bind
    limits = {
        k: float(
            sum(r.min() for r in v) + 0.4 * (sum(r.max() for r in v) - sum(r.min() for r in v))
        )
        for k, v in costs.items()
    }
    _want, want_val = brute_force(objective, costs, limits)
    got = choose_per_layer(objective, costs, limits)
    got_val = sum(objective[l][c] for l, c in enumerate(got))
    assert got_val == pytest.approx(want_val, rel=1e-9, abs=1e-12)
    for k in costs:
        assert sum(costs[k][l][c] for l, c in enumerate(got)) <= limits[k]
    assert all(0 <= c < n for c, n in zip(got, sizes))


def test_forbidden_choices_and_unconstrained_optimum():
    objective = [np.array([3.0, np.inf, 1.0]), np.array([np.inf, 2.0])]
    got = choose_per_layer(objective, {}, {})
    assert got == [2, 1]


def test_infeasible_and_malformed():
    obj = [np.array([1.0, 0.0]), np.array([1.0, 0.0])]
    costs = {"bits": [np.array([2.0, 4.0]), np.array([2.0, 4.0])]}
    with pytest.raises(ValueError, match="infeasible"):
        choose_per_layer(obj, costs, {"bits": 3.0})
    # each budget alone feasible, jointly not
    costs2 = {"a": [np.array([0.0, 1.0])] * 2, "b": [np.array([1.0, 0.0])] * 2}
    with pytest.raises(ValueError, match="infeasible"):
        choose_per_layer(obj, costs2, {"a": 0.5, "b": 0.5})
    with pytest.raises(ValueError, match="must match"):
        choose_per_layer(obj, costs, {"size": 3.0})
    with pytest.raises(ValueError, match=r"costs\['bits'\]\[1\] has 3 entries"):
        choose_per_layer(obj, {"bits": [np.ones(2), np.ones(3)]}, {"bits": 10.0})
    with pytest.raises(ValueError, match="has 1 layers"):
        choose_per_layer(obj, {"bits": [np.ones(2)]}, {"bits": 10.0})
    with pytest.raises(ValueError, match="every choice is forbidden"):
        choose_per_layer([np.array([np.inf])], {}, {})
    with pytest.raises(ValueError, match="non-empty"):
        choose_per_layer([], {}, {})
