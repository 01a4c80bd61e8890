"""Genetic search finds the known optimum of a synthetic fitness under a budget."""

import itertools

import numpy as np
import pytest
from eqnet.search.cost import CostModel, LayerCost
from eqnet.search.genetic import genetic_search
from eqnet.search.genome import Budget, ChoiceTable, Constraint, layer_options
from eqnet.search.montecarlo import MonteCarloSampler
from eqnet.space import ElasticSpace

SPACE = ElasticSpace(w_bits=(2, 4, 6, 8), a_bits=(4, 8))


def problem(n_layers=5, seed=0):
    rng = np.random.default_rng(seed)
    names = [f"l{i}" for i in range(n_layers)]
    cost = CostModel([LayerCost(n, int(rng.integers(100, 1000)), 10, 2, 10, 0) for n in names])
    table = ChoiceTable({n: layer_options(SPACE, forms=False) for n in names})
    # accuracy-like additive fitness: saturating in both widths, layer-specific sensitivity
    sens = rng.random((n_layers, 2)) + 0.2
    value = table.table(
        lambda name, c: (
            -sens[names.index(name), 0] * np.exp(-0.6 * c.w_bits)
            - sens[names.index(name), 1] * np.exp(-0.5 * c.a_bits)
        )
    )
    return table, cost, value


def brute_force(table, value, budget):
    best, best_val = None, -np.inf
    for combo in itertools.product(*[range(n) for n in table.n_choices]):
        g = np.array(combo)
        if not budget.ok(g)[0]:
            continue
        v = value[np.arange(table.n_layers), g].sum()
        if v > best_val:
            best, best_val = g, v
    return best, best_val


def test_finds_brute_force_optimum_and_children_stay_feasible():
    table, cost, value = problem()
    lo = table.gather_sum(table.metric_table(cost, "bitops"), np.zeros((1, 5), int))[0]
    hi = table.gather_sum(table.metric_table(cost, "bitops"), (table.n_choices - 1)[None])[0]
    budget = Budget(table, cost, [Constraint("bitops", "<=", lo + 0.35 * (hi - lo))])
    want, want_val = brute_force(table, value, budget)
    seen = []

    def fitness(g):
        seen.append(g.copy())
        return value[np.arange(table.n_layers), g].sum(axis=1)

    sampler = MonteCarloSampler(table, table.metric_table(cost, "bitops"), "bitops", pool_size=5000)
    init, _ = sampler.sample(40, budget)
    res = genetic_search(
        table,
        fitness,
        budget,
        initial=init,
        population=40,
        elites=10,
        mutations=20,
        crossovers=20,
        iterations=80,
        seed=1,
    )
    assert res.best_fitness == pytest.approx(want_val, rel=1e-12)
    np.testing.assert_array_equal(res.best, want)
    assert budget.ok(np.concatenate(seen)).all()
    assert res.evaluations == 40 + 80 * 40
    assert all(b >= a for a, b in zip(res.history, res.history[1:]))  # elites never lost


def test_deterministic_under_seed():
    table, cost, value = problem(seed=2)
    budget = Budget(table, cost, [Constraint("avg_w_bits", "<=", 5.0)])

    def fitness(g):
        return value[np.arange(table.n_layers), g].sum(axis=1)

    kw = dict(population=20, elites=5, mutations=10, crossovers=10, iterations=15)
    a = genetic_search(table, fitness, budget, seed=7, **kw)
    b = genetic_search(table, fitness, budget, seed=7, **kw)
    np.testing.assert_array_equal(a.elites, b.elites)
    assert a.history == b.history


def test_bad_arguments():
    table, cost, _value = problem()
    budget = Budget(table, cost, [Constraint("avg_w_bits", "<=", 8.0)])

    def fitness(g):
        return np.zeros(len(g))

    with pytest.raises(ValueError, match="elites=30 must not exceed population=20"):
        genetic_search(table, fitness, budget, population=20, elites=30)
    with pytest.raises(ValueError, match="iterations=0"):
        genetic_search(table, fitness, budget, iterations=0)
    with pytest.raises(ValueError, match="meet the budget"):
        tight = Budget(table, cost, [Constraint("avg_w_bits", "<=", 2.0)])
        genetic_search(table, fitness, tight, initial=np.full((3, 5), 3))
