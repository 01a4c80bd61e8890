"""The papers' training options: fixed forms of the fixed-form recipes, label smoothing, the
LRH extremes' forms, the vertical-layering paper's setup, and QAT fine-tuning of a searched
policy from its supernet. Tiny digits runs."""

import json
import math

import pytest
import torch
from digits_runs import digits_data, tiny_config
from eqnet.run import load_run
from eqnet.space import SubnetConfig
from eqnet.train import Trainer
from eqnet.train.labels import OnlineAdaptiveLabels, SmoothedLabels


@pytest.fixture(scope="module")
def digits():
    return digits_data()


def test_labels_option_and_validation(digits):
    assert tiny_config("multiquant").resolved().labels == "oal"
    assert tiny_config("qat").resolved().labels == "hard"
    assert tiny_config("multiquant", oal=False).resolved().labels == "hard"
    t = Trainer(tiny_config("multiquant", labels="smooth", label_smoothing=0.2), data=digits)
    assert isinstance(t.labels, SmoothedLabels) and t.labels.smoothing == 0.2
    assert not t.config.oal
    assert isinstance(Trainer(tiny_config("multiquant"), data=digits).labels, OnlineAdaptiveLabels)
    with pytest.raises(ValueError, match="oal=True contradicts labels='smooth'"):
        tiny_config("multiquant", labels="smooth", oal=True)
    with pytest.raises(ValueError, match="labels='soft': accepted values are hard, oal, smooth"):
        tiny_config("multiquant", labels="soft")


@pytest.mark.parametrize("recipe", ["qat", "multiquant", "limpq"])
def test_fixed_form_recipes_train_one_form(recipe, digits):
    kw = {} if recipe == "qat" else dict(w_bits=[2, 4], a_bits=[2, 4])
    t = Trainer(tiny_config(recipe, w_form="tensor/asym", a_form="tensor/sym", **kw), data=digits)
    assert t.space.w_granularities == ("tensor",)
    assert (t.space.w_symmetries, t.space.a_symmetries) == (("asym",), ("sym",))
    t = Trainer(tiny_config(recipe, form="tensorrt", **kw), data=digits)
    assert (t.space.w_granularities, t.space.w_symmetries) == (("channel",), ("sym",))
    assert t.space.a_symmetries == ("sym",)
    layers = [m for m in t.model.quantized_layers().values() if m.fixed_choice is None]
    assert layers and all(m.weight_quantizer.narrow_range for m in layers)
    with pytest.raises(ValueError, match="the eqnet recipe trains its own forms"):
        tiny_config("eqnet", form="snpe")
    with pytest.raises(ValueError, match="target form 'tpu'"):
        tiny_config(recipe, form="tpu")


def test_tensorrt_form_run_reloads_narrow(digits, tmp_path):
    Trainer(tiny_config("qat", form="tensorrt"), tmp_path / "q", data=digits).fit()
    model = load_run(tmp_path / "q").model
    assert all(m.weight_quantizer.narrow_range for m in model.quantized_layers().values())


def test_eqnet_lrh_forms_reach_the_sampler(digits):
    kw = dict(w_bits=[2, 4], a_bits=[2, 4], keep_first_last="elastic")
    assert Trainer(tiny_config("eqnet", **kw), data=digits).sampler.extreme_forms == "drawn"
    fixed = Trainer(tiny_config("eqnet", lrh_forms="fixed", **kw), data=digits)
    assert fixed.sampler.extreme_forms == "fixed"
    with pytest.raises(ValueError, match="lrh_forms='sometimes'"):
        tiny_config("eqnet", lrh_forms="sometimes")


def test_vl_paper_init_setup(digits):
    c = tiny_config("layered", w_bits=[2, 3, 4], a_bits=[2, 3, 4], vl_paper_init=True)
    t = Trainer(c, data=digits)
    assert t.config.keep_first_last == "fp" and t.space.w_granularities == ("tensor",)
    t.calibrate()
    for layer in t.model.quantized_layers().values():
        step = float(layer.weight_quantizer.params(4, "tensor", "sym").scale)
        want = 2 * float(layer.weight.detach().double().abs().mean()) / math.sqrt(15)
        assert step == pytest.approx(want, rel=1e-6)
        a = {i: float(layer.act_quantizer.params(i, "tensor", "asym").scale) for i in (2, 4)}
        assert a[2] / a[4] == pytest.approx(31 / 7, rel=1e-6)
    with pytest.raises(ValueError, match="vl_paper_init: the layered recipe's option"):
        tiny_config("qat", vl_paper_init=True)


def test_qat_fine_tunes_a_policy_from_its_supernet(digits, tmp_path):
    sup = tiny_config("limpq", w_bits=[2, 3, 4], a_bits=[2, 3, 4])
    Trainer(sup, tmp_path / "sup", data=digits).fit()
    supernet = load_run(tmp_path / "sup")
    cfg = SubnetConfig.uniform(supernet.space, supernet.model, 3, 3)
    first = next(n for n, c in cfg if supernet.model.get_submodule(n).fixed_choice is None)
    cfg = cfg.replace(first, w_bits=4, a_bits=2)
    path = tmp_path / "configs.json"
    path.write_text(json.dumps({"chosen": [{"config": json.loads(cfg.to_json())["layers"]}]}))
    policy = SubnetConfig.from_file(path, 0)
    assert policy == cfg
    q = tiny_config("qat", policy=policy.to_json(), init=str(tmp_path / "sup"))
    assert q.resolved().w_bits == [3, 4, 8] and q.resolved().a_bits == [2, 3, 8]
    t = Trainer(q, tmp_path / "ft", data=digits)
    assert not t.needs_calibration  # the supernet's steps are the start
    src = supernet.model.state_dict()
    shared = [k for k in t.model.state_dict() if k in src]
    assert len(shared) > 0.8 * len(t.model.state_dict())
    for name, choice in cfg:  # the policy's own steps and every weight come from the supernet
        wq = t.model.get_submodule(name).weight_quantizer
        sq = supernet.model.get_submodule(name).weight_quantizer
        args = (choice.w_bits, choice.w_granularity, choice.w_symmetry)
        assert torch.equal(wq.params(*args).scale, sq.params(*args).scale), name
    for k, v in t.model.state_dict().items():
        if "_quantizer." not in k and not k.endswith("_extra_state"):  # space, config
            assert torch.equal(v, src[k]), k
    t.fit()
    assert t.recipe.eval_configs(t) == {"qat": cfg}
    assert "acc_qat" in t.metrics[-1]
    with pytest.raises(ValueError, match="pick=1"):
        SubnetConfig.from_file(path, 1)
    with pytest.raises(ValueError, match="policy: the policy sets every layer"):
        tiny_config("qat", policy=policy.to_json(), w_bits=[4])
    with pytest.raises(FileNotFoundError, match="no float checkpoint"):
        Trainer(
            tiny_config("qat", policy=policy.to_json(), init=str(tmp_path / "ft0")),
            data=digits,
        )
