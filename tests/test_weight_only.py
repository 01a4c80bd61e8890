"""Weight-only quantization: a_bits=None (float activations) in the space, configs, layers,
cost model and training recipes."""

import pytest
import torch
from eqnet import convert
from eqnet.data import load_data
from eqnet.run import TrainConfig
from eqnet.search.cost import CostModel
from eqnet.space import ElasticSpace, LayerChoice, SubnetConfig
from eqnet.train import Trainer


def test_space_accepts_none_alone_and_mixed():
    assert ElasticSpace(a_bits=(None,)).a_bits == (None,)
    assert ElasticSpace(a_bits=(None,)).weight_only
    mixed = ElasticSpace(a_bits=(None, 8, 4))
    assert mixed.a_bits == (4, 8, None)  # None orders as the widest
    assert not mixed.weight_only
    assert mixed.lowest_a_bits == 4 and mixed.highest_a_bits is None
    assert ElasticSpace.from_dict(mixed.to_dict()) == mixed
    with pytest.raises(ValueError, match=r"int in 1\.\.8 or None"):
        ElasticSpace(a_bits=(None, 9))
    with pytest.raises(ValueError, match="w_bits"):
        ElasticSpace(w_bits=(None,))
    with pytest.raises(ValueError, match="a_bits"):
        LayerChoice(4, "float")


def _tiny_model(space, keep_first_last="8bit"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 5), torch.nn.Linear(5, 3)
    )
    return convert(model, space, keep_first_last=keep_first_last, example_input=torch.randn(2, 6))


def test_constructors_and_json_round_trip():
    space = ElasticSpace(w_bits=(2, 4), a_bits=(4, None))
    model = _tiny_model(space)
    hi, lo = SubnetConfig.highest(space, model), SubnetConfig.lowest(space, model)
    assert hi["model.2"].a_bits is None and hi["model.2"].w_bits == 4
    assert lo["model.2"].a_bits == 4 and lo["model.2"].w_bits == 2
    assert hi["model.0"] == LayerChoice(8, 8)  # mixed space: the fixed layers stay A8
    uni = SubnetConfig.uniform(space, model, 2, None)
    assert uni["model.2"].a_bits is None
    text = uni.to_json()
    assert '"a_bits": null' in text
    assert SubnetConfig.from_json(text) == uni
    g = torch.Generator().manual_seed(0)
    drawn = {SubnetConfig.random(space, model, g)["model.2"].a_bits for _ in range(40)}
    assert drawn == {4, None}
    g = torch.Generator().manual_seed(0)
    assert SubnetConfig.random(space, model, g, a_bits=None)["model.2"].a_bits is None
    with pytest.raises(ValueError, match="a_bits=8"):
        SubnetConfig.random(space, model, g, a_bits=8)
    # a float activation counts as 16 bits in the mean
    assert uni.mean_a_bits() == pytest.approx((8 + 16 + 8) / 3)


def test_weight_only_layer_skips_activation_quantizer():
    space = ElasticSpace(w_bits=(3,), a_bits=(None,))
    model = _tiny_model(space)
    for layer in (model.model[0], model.model[2], model.model[3]):
        assert layer.act_quantizer is None  # no activation scale exists
    assert model.model[0].fixed_choice == LayerChoice(8, None)  # W8, float activations
    layer = model.model[2]
    x = torch.randn(4, 5, dtype=torch.float64)
    # reference: per-channel symmetric 3-bit weight with the layer's own scale, float input
    s = layer.weight_quantizer.params(3, "channel", "sym").scale.detach().double()
    w = layer.weight.detach().double()
    wq = torch.clamp(torch.round(w / s[:, None]), -4, 3) * s[:, None]
    ref = x @ wq.T + layer.bias.detach().double()
    got = layer(x.float()).double()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_mixed_space_switches_activation_quantizer_per_choice():
    space = ElasticSpace(w_bits=(4,), a_bits=(2, None))
    layer = _tiny_model(space).model[2]
    x = torch.linspace(-1.0, 1.0, 10).reshape(2, 5)
    with torch.no_grad():
        layer.weight_quantizer.raw_parameters(4, "channel", "sym")[0].fill_(0.05)
        layer.act_quantizer.raw_parameters(2, "tensor", "asym")[0].fill_(0.5)
    layer.set_choice(LayerChoice(4, None))
    float_out = layer(x)
    w = layer.quantized_weight()
    torch.testing.assert_close(float_out, torch.nn.functional.linear(x, w, layer.bias))
    layer.set_choice(LayerChoice(4, 2))
    # reference: the 2-bit signed asymmetric input (codes -2..1, step 0.5, zero point 0)
    xq = torch.clamp(torch.round(x / 0.5), -2, 1) * 0.5
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(xq, w, layer.bias))
    assert not torch.allclose(layer(x), float_out)


def test_cost_counts_float_activation_as_16_bits():
    space = ElasticSpace(w_bits=(2, 4), a_bits=(4, None))
    model = _tiny_model(space, keep_first_last="elastic")
    cost = CostModel.trace(model, (1, 6))
    cfg = SubnetConfig(
        [
            ("model.0", LayerChoice(2, None)),
            ("model.2", LayerChoice(4, 4)),
            ("model.3", LayerChoice(4, None)),
        ]
    )
    macs = {"model.0": 6 * 5, "model.2": 5 * 5, "model.3": 5 * 3}
    assert (
        cost.bitops(cfg)
        == macs["model.0"] * 2 * 16 + macs["model.2"] * 4 * 4 + macs["model.3"] * 4 * 16
    )
    assert cost.avg_a_bits(cfg) == pytest.approx((16 + 4 + 16) / 3)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", holdout=32, limit_train=64, limit_test=32)


@pytest.mark.parametrize("recipe", ["qat", "layered", "eqnet", "multiquant"])
def test_weight_only_train_step(recipe, digits):
    bits = [4] if recipe == "qat" else [2, 4]
    config = TrainConfig(
        recipe=recipe,
        epochs=1,
        batch_size=32,
        calib_batches=1,
        bn_batches=1,
        max_steps_per_epoch=1,
        progress=False,
        holdout=32,
        limit_train=64,
        limit_test=32,
        w_bits=bits,
        a_bits=[None],
    )
    trainer = Trainer(config, data=digits)
    assert trainer.space.weight_only
    trainer.calibrate()
    x = torch.stack([digits.train[i][0] for i in range(32)])
    y = torch.stack([digits.train[i][1] for i in range(32)])
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    metrics = trainer.train_step(x, y)
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    after = dict(trainer.model.named_parameters())
    assert not any("act_quantizer" in n for n in after)
    changed = [n for n, p in before.items() if not torch.equal(p, after[n].detach())]
    assert any("weight_quantizer.scale_w" in n for n in changed)


def test_search_side_handles_float_activations():
    from eqnet.forms import FORMS
    from eqnet.nn import Supernet
    from eqnet.search.genome import ChoiceTable
    from eqnet.search.limpq import importance_indicators

    space = ElasticSpace(w_bits=(2, 4), a_bits=(4, None))
    model = _tiny_model(space, keep_first_last="elastic")
    table = ChoiceTable.from_model(space, model, forms=False)
    assert {c.a_bits for c in table.choices[0]} == {4, None}
    # a float activation fits any engine's activation code range
    assert FORMS["tensorrt"].allows(LayerChoice(4, None, "channel", "sym", "sym"))
    assert isinstance(model, Supernet)
    with pytest.raises(NotImplementedError, match="a_bits=None"):
        importance_indicators(model)


def test_cli_trains_a_weight_only_space(tmp_path, capsys):
    import json

    from eqnet.cli import main

    out = tmp_path / "run"
    tiny = [
        "--limit-train", "64", "--limit-test", "32", "--holdout", "32", "--batch-size", "32",
        "--max-steps-per-epoch", "1", "--calib-batches", "1", "--bn-batches", "1",
        "--no-progress", "--epochs", "1",
    ]  # fmt: skip
    args = ["train", "--recipe", "qat", "--w-bits", "4", "--a-bits", "float", "--out", str(out)]
    assert main([*args, *tiny]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["space"]["a_bits"] == [None]
    with pytest.raises(SystemExit) as exc:
        main(["train", "--a-bits", "4,x", "--out", str(tmp_path / "bad")])
    assert exc.value.code == 2
    assert "--a-bits" in capsys.readouterr().err
