"""Monte Carlo constrained sampling (MultiQuant eq. 5-6)."""

import itertools

import numpy as np
import pytest
from eqnet.search.cost import CostModel
from eqnet.search.genome import Budget, ChoiceTable, parse_constraints
from eqnet.search.montecarlo import MonteCarloSampler, uniform_sample
from eqnet.space import ElasticSpace, LayerChoice
from torch import nn


class FakeQConv(nn.Conv2d):
    is_elastic_layer = True
    fixed_choice = None


class FakeQLinear(nn.Linear):
    is_elastic_layer = True
    fixed_choice = None


def deep_model(n=12):
    layers, c = [], 3
    for i in range(n):
        layers += [FakeQConv(c, 8 + 2 * (i % 3), 3, padding=1), nn.ReLU()]
        c = 8 + 2 * (i % 3)
    return nn.Sequential(*layers, nn.Flatten(), FakeQLinear(c * 16, 10))


@pytest.fixture(scope="module")
def setup():
    model = deep_model()
    cost = CostModel.trace(model, (1, 3, 4, 4))
    table = ChoiceTable.from_model(ElasticSpace(), model, forms=False)
    return table, cost


@pytest.mark.parametrize("text", ["avg_bits<=3", "bitops<=1.5M", "avg_bits>=7.2"])
def test_samples_meet_constraint_and_beat_uniform(setup, text):
    table, cost = setup
    budget = Budget(table, cost, parse_constraints(text))
    metric = budget.constraints[0].metric
    sampler = MonteCarloSampler(table, table.metric_table(cost, metric), metric, pool_size=40_000)
    genomes, rep = sampler.sample(100, budget)
    assert genomes.shape == (100, table.n_layers)
    # independent check on the decoded configs with the direct cost model
    for g in genomes[:20]:
        m = cost.metrics(table.decode(g))[metric]
        c = budget.constraints[0]
        assert (m <= c.value * (1 + 1e-12)) if c.op == "<=" else (m >= c.value * (1 - 1e-12))
    assert budget.ok(genomes).all()
    _base, urep = uniform_sample(table, budget, 100, np.random.default_rng(1), max_trials=20_000)
    # uniform draws rarely reach the tails of the budget range
    assert rep.trials_per_sample < 3
    assert urep.trials_per_sample > 5 * rep.trials_per_sample


@pytest.mark.parametrize(
    "rows", [[[0, 1, 2]] * 3, [[0, 1, 2], [0, 2, 4], [0, 1, 2]]], ids=["equal", "unequal"]
)
def test_conditionals_match_exact_enumeration(rows):
    # 3 layers x 3 choices with integer metric terms: every bucket holds one metric value, so
    # the tilted pool must reproduce the exact conditionals of uniform draws (eq. 6)
    choices = [LayerChoice(w, 8) for w in (2, 3, 4)]
    table = ChoiceTable({f"l{i}": choices for i in range(3)})
    mt = np.array(rows, dtype=float)
    top = int(mt.max(axis=1).sum())
    sampler = MonteCarloSampler(table, mt, "x", buckets=top + 1, pool_size=200_000, seed=3)
    exact = np.zeros((top + 1, 3, 3))
    for combo in itertools.product(range(3), repeat=3):
        total = int(sum(mt[l, c] for l, c in enumerate(combo)))
        for layer, c in enumerate(combo):
            exact[total, layer, c] += 1
    exact /= exact.sum(axis=2, keepdims=True)
    np.testing.assert_allclose(sampler.probs, exact, atol=0.02)
    assert (sampler.counts > 0).all()


def test_uniform_pool_only_is_the_paper_pool(setup):
    table, cost = setup
    mt = table.metric_table(cost, "avg_bits")
    sampler = MonteCarloSampler(table, mt, "avg_bits", pool_size=5_000, tilts=(0.0,))
    # the uniform pool leaves the extreme buckets empty: this is why the tilts exist
    assert sampler.counts[0] == 0 and sampler.counts[-1] == 0
    assert sampler.counts.sum() == 5_000


def test_errors(setup):
    table, cost = setup
    mt = table.metric_table(cost, "avg_bits")
    with pytest.raises(ValueError, match="buckets"):
        MonteCarloSampler(table, mt, buckets=0)
    with pytest.raises(ValueError, match="shape"):
        MonteCarloSampler(table, mt[:, :3])
    with pytest.raises(ValueError, match="infeasible"):
        Budget(table, cost, parse_constraints("avg_bits<=1.5"))
