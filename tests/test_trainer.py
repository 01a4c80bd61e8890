"""The supernet trainer on a tiny digits run: recipes, gradient accumulation, resume, NaN."""

import math

import pytest
import torch
import torch.nn.functional as F
from digits_runs import digits_data, tiny_config
from eqnet.data import DataError, load_data
from eqnet.run import TrainConfig, evaluate, load_run
from eqnet.run.checkpoint import CHECKPOINT_NAME, load_checkpoint
from eqnet.search.limpq import importance_indicators
from eqnet.train import NonFiniteLossError, Trainer
from eqnet.train.recipes import RECIPE_CLASSES
from eqnet.train.sampler import ConfigSampler


@pytest.fixture(scope="module")
def digits():
    return digits_data()


def tiny(recipe, **kw):
    """Two epochs of three steps; elastic recipes on widths 2 and 4."""
    base = dict(epochs=2, max_steps_per_epoch=3)
    if recipe not in ("float", "qat"):
        base.update(w_bits=[2, 4], a_bits=[2, 4])
    base.update(kw)
    return tiny_config(recipe, **base)


def _batches(data, n, bs=32):
    return [
        (
            torch.stack([data.train[i][0] for i in range(k * bs, (k + 1) * bs)]),
            torch.stack([data.train[i][1] for i in range(k * bs, (k + 1) * bs)]),
        )
        for k in range(n)
    ]


@pytest.mark.parametrize("recipe", sorted(RECIPE_CLASSES))
def test_each_recipe_two_steps_change_weights(recipe, digits):
    trainer = Trainer(tiny(recipe), data=digits)
    trainer.calibrate()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    for x, y in _batches(digits, 2):
        metrics = trainer.train_step(x, y)
        assert torch.isfinite(torch.tensor(metrics["loss"]))
    after = dict(trainer.model.named_parameters())
    changed = [n for n, p in before.items() if not torch.equal(p, after[n].detach())]
    weights = [n for n in before if n.endswith("weight") and before[n].dim() > 1]
    assert all(n in changed for n in weights), set(weights) - set(changed)
    if recipe != "float":
        assert any(".scale_" in n for n in changed)
    assert all(bool(torch.isfinite(p).all()) for p in after.values())
    if recipe in ("multiquant", "eqnet"):
        assert {"loss_highest", "loss_random", "loss_lowest"} <= set(metrics)
    if recipe == "eqnet":
        assert metrics["loss_wdr"] > 0


def test_lrh_accumulates_every_subnet_gradient(digits):
    """multiquant's step = one backward per sampled subnet, summed; compare with a manual sum
    of F.cross_entropy gradients over the same lowest/random/highest configs."""
    trainer = Trainer(tiny("multiquant", oal=False, num_random=2), data=digits)
    trainer.calibrate()
    model = trainer.model
    model.train()
    ((x, y),) = _batches(digits, 1)
    state = trainer.sampler.state_dict()
    replay = ConfigSampler(trainer.space, model, seed=0, forms=False)
    replay.load_state_dict(state)
    params = [p for p in model.parameters() if p.requires_grad]
    reference = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    configs = replay.lrh(2)
    assert [r for r, _ in configs] == ["highest", "random", "random", "lowest"]
    for _, cfg in configs:
        model.set_config(cfg)
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params, allow_unused=True)
        for r, g in zip(reference, grads):
            if g is not None:
                r += g.double()
    model.zero_grad(set_to_none=True)
    trainer.recipe.step(trainer, x, y)
    for p, r in zip(params, reference):
        got = torch.zeros_like(r) if p.grad is None else p.grad.double()
        assert torch.allclose(got, r, rtol=1e-4, atol=1e-6)


def test_layered_mgd_step(digits):
    trainer = Trainer(tiny("layered", joint="mgd", w_bits=[2, 3, 4], a_bits=[2, 3, 4]), data=digits)
    ((x, y),) = _batches(digits, 1)
    m = trainer.train_step(x, y)
    alphas = [m[f"mgd_alpha_w{b}a{b}"] for b in (4, 3, 2)]
    assert sum(alphas) == pytest.approx(1.0, abs=1e-9)
    assert min(alphas) >= 0.0


@pytest.mark.slow
def test_resume_equals_uninterrupted_run(digits, tmp_path):
    cfg = tiny("multiquant", oal=True, max_steps_per_epoch=2)
    full = Trainer(cfg, tmp_path / "full", data=digits)
    full.fit()
    part = Trainer(cfg, tmp_path / "part", data=digits)
    part.fit(stop_after=1)
    assert load_checkpoint(tmp_path / "part")["epoch"] == 1
    resumed = Trainer.from_run(tmp_path / "part", data=digits)
    assert resumed.epoch == 1
    resumed.fit()
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(full.labels.soft, resumed.labels.soft)
    assert full.metrics[-1]["acc_lowest"] == resumed.metrics[-1]["acc_lowest"]
    for name in ("metrics.jsonl", "metrics.csv", "config.json", CHECKPOINT_NAME):
        assert (tmp_path / "part" / name).is_file()
    # the stored run rebuilds the same network
    run = load_run(tmp_path / "full")
    assert run.epoch == 2 and run.config.recipe == "multiquant"
    assert torch.equal(
        run.load_data().holdout.images, load_data("digits", holdout=64).holdout.images
    )
    loaded = run.model.state_dict()
    for k in a:
        assert torch.equal(loaded[k], a[k]), k
    run.model.set_config(full.sampler.highest())
    full.model.set_config(full.sampler.highest())
    assert evaluate(run.model, full.test_loader) == evaluate(full.model, full.test_loader)


def test_nan_loss_stops_and_keeps_checkpoint(digits, tmp_path):
    trainer = Trainer(tiny("qat"), tmp_path, data=digits)
    trainer.fit(stop_after=1)
    saved = (tmp_path / CHECKPOINT_NAME).read_bytes()
    with torch.no_grad():
        next(iter(trainer.model.quantized_layers().values())).weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss .* epoch 2.*checkpoint"):
        trainer.fit()
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == saved
    state = load_checkpoint(tmp_path)
    assert state["epoch"] == 1
    assert all(
        bool(torch.isfinite(v).all()) for v in state["model"].values() if v.is_floating_point()
    )


def test_importance_indicators(digits):
    trainer = Trainer(tiny("limpq"), data=digits)
    trainer.calibrate()
    ind = importance_indicators(trainer.model)
    layers = trainer.model.quantized_layers()
    elastic = [n for n, m in layers.items() if m.fixed_choice is None]
    assert sorted(ind) == sorted(elastic) and elastic
    for name in elastic:
        layer = layers[name]
        assert set(ind[name]) == {("w", 2), ("w", 4), ("a", 2), ("a", 4)}
        raw, _ = layer.weight_quantizer.raw_parameters(2, "channel", "sym")
        assert ind[name][("w", 2)] == pytest.approx(
            float(layer.weight_quantizer.params(2, "channel", "sym").scale.detach().mean())
        )
        assert raw.shape[0] == layer.weight.shape[0]  # per-channel steps averaged
        # a coarser grid needs a larger step
        assert ind[name][("w", 2)] > ind[name][("w", 4)]


def test_bad_data_fails_before_training(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        Trainer(tiny("float", data=str(tmp_path / "nope.npz")), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_config_validation():
    with pytest.raises(ValueError, match="recipe"):
        TrainConfig(recipe="nope")
    with pytest.raises(ValueError, match="qat recipe trains one width"):
        TrainConfig(recipe="qat", w_bits=[2, 4])
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lamb")
    with pytest.raises(ValueError, match="uniform_prob"):
        TrainConfig(recipe="eqnet", uniform_prob=-0.1)


def test_eqnet_uniform_prob_reaches_the_sampler(digits):
    trainer = Trainer(tiny("eqnet", uniform_prob=1.0), data=digits)
    from eqnet.space import layer_specs

    elastic = [n for n, spec in layer_specs(trainer.model).items() if spec is None]
    for _ in range(10):
        cfg = trainer.sampler.random()
        assert len({(cfg[n].w_bits, cfg[n].a_bits) for n in elastic}) == 1


def test_warmup_cosine_schedule():
    from eqnet.train.schedule import WarmupCosine

    s = WarmupCosine(total=10, warmup=4)
    got = [s.factor(i) for i in range(10)]
    expected = [(i + 1) / 5 for i in range(4)] + [
        0.5 * (1 + math.cos(math.pi * (i - 4) / 6)) for i in range(4, 10)
    ]
    assert got == pytest.approx(expected, abs=1e-12)


def test_parameter_groups_and_optimizer_options(digits):
    trainer = Trainer(
        tiny("qat", optimizer="adam", weight_decay=0.01, scale_lr_mult=0.1, lr=0.002),
        data=digits,
    )
    groups = trainer.model.parameter_groups()
    by_id = {id(p): g for g in trainer.optimizer.param_groups for p in g["params"]}
    assert isinstance(trainer.optimizer, torch.optim.Adam)
    for name, params in groups.items():
        for p in params:
            g = by_id[id(p)]
            assert g["weight_decay"] == (0.01 if name == "weight" else 0.0)
            assert g["base_lr"] == pytest.approx(0.0002 if name == "scale" else 0.002)


def test_grad_clip_bounds_the_update(digits):
    trainer = Trainer(tiny("float", grad_clip=1e-3, momentum=0.0, weight_decay=0.0), data=digits)
    ((x, y),) = _batches(digits, 1)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train_step(x, y)
    # plain SGD: the step is lr * clipped gradient, so its norm is at most lr * max_norm
    step = torch.cat(
        [(b - p.detach()).flatten() for b, p in zip(before, trainer.model.parameters())]
    )
    assert 0 < float(step.norm()) <= 0.05 * 1e-3 * (1 + 1e-5)


def test_start_from_float_run(digits, tmp_path):
    Trainer(tiny("float", epochs=1, max_steps_per_epoch=1), tmp_path / "f", data=digits).fit()
    float_weights = load_checkpoint(tmp_path / "f")["model"]
    q = Trainer(tiny("qat", init=str(tmp_path / "f")), data=digits)
    qw = {n.removeprefix("model."): p for n, p in q.model.named_parameters()}
    for name, w in float_weights.items():
        if name.endswith("weight") and w.dim() > 1:
            assert torch.equal(qw[name], w), name
    Trainer(tiny("qat", epochs=1, max_steps_per_epoch=1), tmp_path / "q", data=digits).fit()
    with pytest.raises(ValueError, match="float run"):
        Trainer(tiny("qat", init=str(tmp_path / "q")), data=digits)


def test_resume_a_run_saved_when_fixed_layers_held_one_form(digits, tmp_path):
    """A checkpoint whose fixed W8A8 layers hold one form (runs saved before their forms were
    elastic record keep_first_last='8bit') resumes in that layout and continues exactly as
    the same run under '8bit-fixed-form'."""
    import json
    import shutil

    from eqnet.run.checkpoint import save_checkpoint

    cfg = tiny("eqnet", keep_first_last="8bit-fixed-form", max_steps_per_epoch=2)
    part = Trainer(cfg, tmp_path / "new", data=digits)
    part.fit(stop_after=1)
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    state = load_checkpoint(tmp_path / "old")
    old_config = json.loads(state["config"])
    old_config["keep_first_last"] = "8bit"
    state["config"] = json.dumps(old_config)
    state.pop("format"), state.pop("version")
    save_checkpoint(tmp_path / "old", state)
    runs = [Trainer.from_run(tmp_path / d, data=digits) for d in ("new", "old")]
    for run in runs:
        fixed = [m for m in run.model.quantized_layers().values() if m.fixed_choice is not None]
        assert len(fixed) == 2 and all(m.fixed_form for m in fixed)
        run.fit()
    a, b = (run.model.state_dict() for run in runs)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    loaded = load_run(tmp_path / "old").model.quantized_layers().values()
    assert [m.fixed_form for m in loaded if m.fixed_choice is not None] == [True, True]
