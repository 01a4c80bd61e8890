"""The vertical-layering paper's step-size initialization, against its formulas in float64."""

import math

import eqnet
import pytest
import torch
from eqnet import models
from eqnet.space import ElasticSpace, SubnetConfig
from eqnet.train.paper_init import vl_activation_steps, vl_weight_steps

NESTED = ElasticSpace(
    w_bits=(2, 3, 4), a_bits=(2, 3, 4), w_granularities=("tensor", "channel"), nested=True
)


def _supernet(space=NESTED):
    torch.manual_seed(0)
    return eqnet.convert(models.get("digits_cnn"), space, keep_first_last="elastic")


def test_weight_steps_are_two_mean_abs_over_sqrt_15():
    sn = _supernet()
    assert vl_weight_steps(sn) == len(sn.quantized_layers())
    for layer in sn.quantized_layers().values():
        w = layer.weight.detach().double().abs()
        tensor_step = layer.weight_quantizer.params(4, "tensor", "sym").scale
        assert float(tensor_step) == pytest.approx(2 * float(w.mean()) / math.sqrt(15), rel=1e-6)
        channel_step = layer.weight_quantizer.params(4, "channel", "sym").scale.double()
        want = 2 * w.reshape(w.shape[0], -1).mean(dim=1) / math.sqrt(15)
        torch.testing.assert_close(channel_step, want, rtol=1e-6, atol=0)


def test_activation_steps_from_the_first_batch():
    sn = _supernet()
    sn.set_config(SubnetConfig.uniform(NESTED, sn, 4, 4, "tensor", "sym", "asym"))
    vl_weight_steps(sn)  # (with the default unit weight steps every weight code would be 0)
    x = torch.randn(16, 1, 8, 8) * 3
    assert vl_activation_steps(sn, x) == len(sn.quantized_layers())
    layers = list(sn.quantized_layers().values())
    peak = float(x.abs().max())  # the first layer's input is the batch itself
    for i in (2, 3, 4):
        p = layers[0].act_quantizer.params(i, "tensor", "asym")
        assert float(p.scale) == pytest.approx(peak / (2 ** (i + 1) - 1), rel=1e-6)
        assert float(p.zero_point) == 0.0
    for layer in layers[1:]:
        s = {i: float(layer.act_quantizer.params(i, "tensor", "asym").scale) for i in (2, 3, 4)}
        assert s[2] / s[4] == pytest.approx(31 / 7, rel=1e-6)
        assert s[3] / s[4] == pytest.approx(31 / 15, rel=1e-6)


def test_non_nested_space_is_refused():
    with pytest.raises(ValueError, match="not nested"):
        vl_weight_steps(_supernet(ElasticSpace(w_bits=(2, 4), a_bits=(2, 4))))
