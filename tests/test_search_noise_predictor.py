"""The quantization-noise ridge predictor against synthetic accuracies written from its model."""

import json

import numpy as np
import pytest
import torch
from eqnet.search.genome import ChoiceTable, layer_options
from eqnet.search.noise_predictor import NoiseRidgePredictor, noise_features
from eqnet.space import ElasticSpace
from scipy.stats import kendalltau

SPACE = ElasticSpace(
    w_bits=(2, 3, 4, 6, 8),
    a_bits=(2, 4, 8),
    w_granularities=("tensor", "channel"),
    w_symmetries=("sym", "asym"),
)


def noise_accuracy(n_layers=10, n=400, seed=0, form_effect=3.0, noise=0.0):
    """Accuracy = 0.9 - Σ_l [s_w 4^-b_w (1 + form_effect · per_tensor) + s_a 4^-b_a], in
    float64 from the layer choices (not from the encoding), plus Gaussian measurement noise."""
    rng = np.random.default_rng(seed)
    table = ChoiceTable({f"l{i}": layer_options(SPACE) for i in range(n_layers)})
    sens = rng.uniform(0.5, 5.0, (n_layers, 2))

    def drop(name, c):
        i = table.names.index(name)
        per_tensor = c.w_granularity == "tensor"
        return (
            sens[i, 0] * 4.0**-c.w_bits * (1 + form_effect * per_tensor)
            + sens[i, 1] * 4.0**-c.a_bits
        )

    value = -table.table(drop)
    genomes = table.uniform(rng, n)
    acc = 0.9 + value[np.arange(n_layers), genomes].sum(axis=1)
    return table, genomes, acc + rng.normal(0, noise, n), value


def test_features_are_the_noise_powers_of_each_layer():
    table, genomes, _, _ = noise_accuracy(n_layers=3, n=20)
    got = noise_features(table.encode(genomes).reshape(20, 3, 5).double())
    for row, g in zip(got, genomes):
        for (_, c), f in zip(table.decode(g), row):
            nw, na = 4.0**-c.w_bits, 4.0**-c.a_bits
            want = [
                nw,
                na,
                nw * (c.w_granularity == "channel"),
                nw * (c.w_symmetry == "asym"),
                na * (c.a_symmetry == "asym"),
            ]
            np.testing.assert_allclose(f.numpy(), want, rtol=1e-12)


def test_recovers_a_noise_model_accuracy_with_its_forms():
    table, genomes, acc, value = noise_accuracy(noise=2e-3)
    model = NoiseRidgePredictor(table.n_layers * 5)
    rep = model.fit(table.encode(genomes), torch.tensor(acc), val_fraction=0.5)
    assert rep.n_val == 200 and rep.kendall_tau > 0.9 and rep.pearson_r > 0.97
    # per-layer sensitivities differ: the ranking beats the plain mean width
    assert rep.kendall_tau > rep.mean_bits_kendall_tau + 0.1
    # per-tensor weights cost 4x the noise here, so the form terms are kept at full weight
    assert model.gamma == 1.0
    # fresh configs, scored by the GA's fitness and by predict, against the noise-free truth
    g2 = table.uniform(np.random.default_rng(7), 300)
    truth = 0.9 + value[np.arange(table.n_layers), g2].sum(axis=1)
    fit = model.fitness(table)(g2)
    assert kendalltau(fit, truth).statistic > 0.9
    np.testing.assert_allclose(fit, model.predict(table.encode(g2)).numpy(), rtol=1e-12)


def test_exact_noise_model_is_fitted_almost_exactly():
    table, genomes, acc, _ = noise_accuracy(n_layers=4, n=300, form_effect=0.0)
    model = NoiseRidgePredictor(20)
    rep = model.fit(table.encode(genomes), torch.tensor(acc), val_fraction=0.2, alphas=[1e-6])
    assert rep.val_rmse < 1e-4 and rep.kendall_tau > 0.99


def test_split_is_the_mlp_split():
    from eqnet.search.predictor import AccuracyPredictor

    table, genomes, acc, _ = noise_accuracy(n_layers=3, n=40)
    x, y = table.encode(genomes), torch.tensor(acc)
    a = NoiseRidgePredictor(15).fit(x, y, val_fraction=0.25, seed=3)
    b = AccuracyPredictor(15, hidden=4, depth=1).fit(x, y, val_fraction=0.25, seed=3, epochs=1)
    # same held-out configs: the no-learning baseline is computed on them alike
    assert a.mean_bits_kendall_tau == b.mean_bits_kendall_tau and a.n_val == b.n_val == 10


def test_save_load_roundtrip_and_validation(tmp_path):
    table, genomes, acc, _ = noise_accuracy(n_layers=3, n=60)
    x = table.encode(genomes)
    model = NoiseRidgePredictor(15)
    model.fit(x, torch.tensor(acc))
    model.save(tmp_path / "p.json")
    again = NoiseRidgePredictor.load(tmp_path / "p.json")
    assert torch.equal(model.predict(x), again.predict(x))
    assert (again.alpha, again.gamma) == (model.alpha, model.gamma)
    doc = json.loads((tmp_path / "p.json").read_text())
    doc["weights"] = doc["weights"][:2]
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="weights must be finite, of shape"):
        NoiseRidgePredictor.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something"}))
    with pytest.raises(ValueError, match=r"not a eqnet.NoiseRidgePredictor file"):
        NoiseRidgePredictor.load(tmp_path / "other.json")
    (tmp_path / "torn.json").write_text('{"format": ')
    with pytest.raises(ValueError, match="not a JSON file"):
        NoiseRidgePredictor.load(tmp_path / "torn.json")


def test_bad_inputs():
    with pytest.raises(ValueError, match="in_features=12"):
        NoiseRidgePredictor(12)
    model = NoiseRidgePredictor(10)
    with pytest.raises(ValueError, match="expected x"):
        model.fit(torch.rand(6, 9), torch.rand(6))
    with pytest.raises(ValueError, match="val_fraction"):
        model.fit(torch.rand(20, 10), torch.rand(20), val_fraction=0.0)
    with pytest.raises(ValueError, match="alphas"):
        model.fit(torch.rand(20, 10), torch.rand(20), alphas=[])
    with pytest.raises(ValueError, match="gammas"):
        model.fit(torch.rand(20, 10), torch.rand(20), gammas=[-1.0])
    with pytest.raises(ValueError, match="expected \\[N, 10\\]"):
        model.predict(torch.rand(3, 4))
