"""The accuracy predictor learns a synthetic additive accuracy function."""

import numpy as np
import pytest
import torch
from eqnet.search.genome import ChoiceTable, layer_options
from eqnet.search.predictor import AccuracyPredictor, predictor_fitness, rank_metrics
from eqnet.space import ElasticSpace
from scipy.stats import kendalltau

SPACE = ElasticSpace(
    w_bits=(2, 3, 4, 6, 8),
    a_bits=(2, 4, 8),
    w_granularities=("tensor", "channel"),
    w_symmetries=("sym", "asym"),
)


def synthetic(n_layers=8, n=800, seed=0):
    rng = np.random.default_rng(seed)
    table = ChoiceTable({f"l{i}": layer_options(SPACE) for i in range(n_layers)})
    sens = rng.random((n_layers, 3)) + 0.1
    names = table.names
    # additive, saturating in width, with a per-channel bonus (so the forms matter)
    value = table.table(
        lambda name, c: (
            -sens[names.index(name), 0] * np.exp(-0.7 * c.w_bits)
            - sens[names.index(name), 1] * np.exp(-0.6 * c.a_bits)
            + 0.05 * sens[names.index(name), 2] * (c.w_granularity == "channel")
        )
    )
    genomes = table.uniform(rng, n)
    acc = value[np.arange(n_layers), genomes].sum(axis=1)
    return table, genomes, acc, value


def test_learns_additive_function():
    table, genomes, acc, value = synthetic()
    x = table.encode(genomes)
    model = AccuracyPredictor(x.shape[1], hidden=64, depth=2)
    rep = model.fit(x, torch.tensor(acc), val_fraction=0.25, epochs=40, batch_size=128, lr=3e-3)
    assert rep.n_val == 200 and rep.n_train == 600
    assert rep.kendall_tau > 0.9
    assert rep.pearson_r > 0.95
    # the layers' sensitivities differ, so the learned ranking beats the plain mean width
    assert rep.kendall_tau > rep.mean_bits_kendall_tau + 0.05
    # fresh configs, scored here independently of fit()'s own report
    g2 = table.uniform(np.random.default_rng(99), 300)
    acc2 = value[np.arange(table.n_layers), g2].sum(axis=1)
    pred = predictor_fitness(model, table)(g2)
    assert kendalltau(pred, acc2).statistic > 0.9


def test_mean_bits_baseline():
    table, genomes, _, _ = synthetic(n=200, seed=3)
    x = table.encode(genomes)
    bits = np.array([[(c.w_bits + c.a_bits) / 2 for _, c in table.decode(g)] for g in genomes])
    model = AccuracyPredictor(x.shape[1], hidden=8, depth=1)
    # accuracy that is the mean width itself: the baseline ranks it perfectly
    rep = model.fit(x, torch.tensor(bits.mean(1)), epochs=1)
    assert rep.mean_bits_kendall_tau == pytest.approx(1.0)
    # accuracy set by the granularity flags alone, independent of width: no baseline rank
    flags = np.array([[c.w_granularity == "channel" for _, c in table.decode(g)] for g in genomes])
    rep = model.fit(x, torch.tensor(flags.sum(1), dtype=torch.float64), epochs=1)
    assert abs(rep.mean_bits_kendall_tau) < 0.2


def test_rank_metrics_reference():
    p = np.array([0.1, 0.4, 0.35, 0.8])
    t = np.array([1.0, 2.0, 3.0, 4.0])
    tau, r = rank_metrics(p, t)
    # 6 pairs, one discordant (0.4 vs 0.35): (5 - 1) / 6
    assert tau == pytest.approx(4 / 6)
    pc, tc = p - p.mean(), t - t.mean()
    assert r == pytest.approx((pc @ tc) / np.sqrt((pc @ pc) * (tc @ tc)))


def test_save_load_roundtrip(tmp_path):
    model = AccuracyPredictor(10, hidden=8, depth=1)
    x = torch.randn(30, 10)
    model.fit(x, x.sum(1), epochs=2)
    model.save(tmp_path / "p.pt")
    again = AccuracyPredictor.load(tmp_path / "p.pt")
    assert torch.equal(model.predict(x), again.predict(x))


def test_bad_inputs():
    model = AccuracyPredictor(10)
    with pytest.raises(ValueError, match="expected x"):
        model.fit(torch.randn(5, 9), torch.randn(5))
    with pytest.raises(ValueError, match="val_fraction"):
        model.fit(torch.randn(20, 10), torch.randn(20), val_fraction=1.5)
    with pytest.raises(ValueError, match="expected \\[N, 10\\]"):
        model.predict(torch.randn(3, 4))


def test_fast_fitness_equals_predict():
    table, genomes, acc, _ = synthetic(n_layers=4, n=64)
    model = AccuracyPredictor(20, hidden=16, depth=2)
    model.fit(table.encode(genomes), torch.tensor(acc), epochs=3)
    got = predictor_fitness(model, table)(genomes)
    want = model.predict(table.encode(genomes)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
