"""QConv2d / QLinear / SwitchableBatchNorm2d against float64 references computed here."""

import pytest
import torch
from eqnet.nn import QConv2d, QLinear, SwitchableBatchNorm2d
from eqnet.space import ElasticSpace, LayerChoice
from torch import nn
from torch.nn import functional as F

SPACE = ElasticSpace(
    w_bits=(2, 4, 8),
    a_bits=(2, 4, 8),
    w_granularities=("tensor", "channel"),
    w_symmetries=("sym", "asym"),
    a_symmetries=("sym", "asym"),
)


def _bcast(p, x, axis):
    if axis is None:
        return p.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


def oracle_fq(x, p):
    """Float64 fake quantization from the equations, with the module's QuantParams."""
    inv = torch.reciprocal(p.scale.detach().float())
    v = (x.detach().float() * _bcast(inv, x, p.axis)).double()
    r = torch.round(v)
    z = (
        0.0
        if p.zero_point is None
        else _bcast(torch.round(p.zero_point.detach().double()), x, p.axis)
    )
    q = torch.clamp(r + z, p.quant_min, p.quant_max)
    return (q - z) * _bcast(p.scale.detach().double(), x, p.axis)


def _calibrated(layer, x):
    layer.weight_quantizer.calibrate(layer.weight)
    layer.act_quantizer.calibrate(x)
    return layer


CHOICES = [
    LayerChoice(8, 8, "channel", "sym", "asym"),
    LayerChoice(4, 2, "tensor", "asym", "sym"),
    LayerChoice(2, 4, "channel", "asym", "asym"),
    LayerChoice(4, 8, "tensor", "sym", "sym"),
]


@pytest.mark.parametrize("choice", CHOICES, ids=str)
def test_qlinear_equals_float64_reference(choice):
    lin = nn.Linear(13, 6)
    x = torch.randn(5, 13)
    q = _calibrated(QLinear.from_float(lin, SPACE), x)
    q.set_choice(choice)
    wp = q.weight_quantizer.params(choice.w_bits, choice.w_granularity, choice.w_symmetry)
    ap = q.act_quantizer.params(choice.a_bits, "tensor", choice.a_symmetry)
    expected = oracle_fq(x, ap) @ oracle_fq(lin.weight, wp).T + lin.bias.double()
    torch.testing.assert_close(q(x).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 2, 6], ids=["dense", "grouped", "depthwise"])
@pytest.mark.parametrize("choice", CHOICES[:2], ids=str)
def test_qconv2d_equals_float64_reference(groups, choice):
    conv = nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=groups, bias=True)
    x = torch.randn(2, 6, 9, 9).relu()
    q = _calibrated(QConv2d.from_float(conv, SPACE), x)
    q.set_choice(choice)
    wp = q.weight_quantizer.params(choice.w_bits, choice.w_granularity, choice.w_symmetry)
    ap = q.act_quantizer.params(choice.a_bits, "tensor", choice.a_symmetry)
    assert ap.quant_min == 0  # post-ReLU input: unsigned range
    expected = F.conv2d(
        oracle_fq(x, ap), oracle_fq(conv.weight, wp), conv.bias.double(), 2, 1, 1, groups
    )
    torch.testing.assert_close(q(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_from_float_to_float_round_trip():
    conv = nn.Conv2d(3, 4, (3, 1), stride=(2, 1), padding=(1, 0), dilation=(1, 1), bias=False)
    q = QConv2d.from_float(conv, SPACE)
    back = q.to_float()
    assert type(back) is nn.Conv2d and back.bias is None
    assert (back.kernel_size, back.stride, back.padding) == ((3, 1), (2, 1), (1, 0))
    assert torch.equal(back.weight, conv.weight)
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(back(x), conv(x))
    lin = nn.Linear(4, 3)
    ql = QLinear.from_float(lin, SPACE)
    assert isinstance(ql, nn.Linear) and ql.is_elastic_layer and ql.fixed_choice is None
    assert torch.equal(ql.to_float().bias, lin.bias)


def test_gradients_reach_weight_and_active_form_only():
    lin = nn.Linear(8, 4)
    x = torch.randn(3, 8)
    q = _calibrated(QLinear.from_float(lin, SPACE), x)
    q.set_choice(LayerChoice(4, 4, "channel", "asym", "asym"))
    with torch.no_grad():  # smaller steps clip some values, so the zero points get gradient
        q.weight_quantizer.scale_w4_channel_asym.mul_(0.3)
        q.act_quantizer.scale_a4_asym.mul_(0.3)
    q(x).square().sum().backward()
    assert q.weight.grad is not None and q.weight.grad.abs().sum() > 0
    active = {
        "weight_quantizer.scale_w4_channel_asym",
        "weight_quantizer.zero_point_w4_channel_asym",
        "act_quantizer.scale_a4_asym",
        "act_quantizer.zero_point_a4_asym",
    }
    for name, p in q.named_parameters():
        if "quantizer" not in name:
            continue
        if name in active:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            # never part of the graph: autograd leaves .grad unset (None), not zero
            assert p.grad is None, name


def test_set_choice_outside_space_raises():
    q = QLinear.from_float(nn.Linear(4, 4), SPACE)
    with pytest.raises(ValueError, match=r"w_bits=3.*\[2, 4, 8\]"):
        q.set_choice(LayerChoice(3, 4))
    fixed = QLinear.from_float(nn.Linear(4, 4), SPACE, fixed_choice=LayerChoice(8, 8))
    # a fixed-width layer holds every form of the space at its widths
    w_forms = {f"w8_{g}_{s}" for g in SPACE.w_granularities for s in SPACE.w_symmetries}
    a_forms = {f"a8_{s}" for s in SPACE.a_symmetries}
    assert {n for n, _ in fixed.named_parameters() if "scale" in n} == {
        *(f"weight_quantizer.scale_{f}" for f in w_forms),
        *(f"act_quantizer.scale_{f}" for f in a_forms),
    }
    fixed.set_choice(LayerChoice(8, 8, "tensor", "asym", "sym"))
    assert fixed.weight_quantizer.active_form == (8, "tensor", "asym")
    with pytest.raises(ValueError, match="fixed at W8A8"):
        fixed.set_choice(LayerChoice(4, 4))


def test_switchable_bn_uses_the_active_width_statistics():
    bn = nn.BatchNorm2d(3).eval()
    sw = SwitchableBatchNorm2d.from_bn(bn, (2, 4, 8)).eval()
    for b in (2, 4, 8):
        sw.bns[str(b)].running_mean.fill_(float(b))
        sw.bns[str(b)].running_var.fill_(float(b * b))
    x = torch.randn(2, 3, 4, 4)
    for b in (2, 8, 4):
        sw.active_bits = b
        expected = (x.double() - b) / torch.sqrt(torch.tensor(b * b + bn.eps, dtype=torch.float64))
        torch.testing.assert_close(sw(x).double(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[2, 4, 8\]"):
        sw.active_bits = 3


def test_layer_switches_its_bns():
    q = QConv2d.from_float(nn.Conv2d(2, 3, 1), SPACE)
    sw = SwitchableBatchNorm2d.from_bn(nn.BatchNorm2d(3), SPACE.w_bits)
    q.switched_bns.append(sw)
    q.set_choice(LayerChoice(2, 8))
    assert sw.active_bits == 2


def test_one_form_state_loads_even_outside_the_space():
    """Fixed layers of older runs held per-channel symmetric weights whatever the space (a
    per-tensor asymmetric target, say): that state loads into the one-form layout, values
    and all, and the layer runs that form only."""
    space = ElasticSpace(
        w_bits=(2, 4),
        a_bits=(2, 4),
        w_granularities=("tensor",),
        w_symmetries=("asym",),
        a_symmetries=("asym",),
    )
    torch.manual_seed(0)
    old_choice = LayerChoice(8, 8, "channel", "sym", "asym")
    old = QLinear.from_float(nn.Linear(4, 3), space, fixed_choice=old_choice, fixed_form=True)
    with torch.no_grad():
        old.weight_quantizer.raw_parameters(8, "channel", "sym")[0].copy_(
            torch.tensor([0.1, 0.2, 0.3])
        )
    new = QLinear.from_float(
        nn.Linear(4, 3), space, fixed_choice=LayerChoice(8, 8, "tensor", "asym", "asym")
    )
    assert not new.fixed_form and len(new.weight_quantizer.forms()) == 1
    new.load_state_dict(old.state_dict())
    assert new.fixed_form and new.fixed_choice == old_choice and new.active == old_choice
    x = torch.randn(5, 4)
    torch.testing.assert_close(new(x), old(x), atol=0, rtol=0)
    with pytest.raises(ValueError, match="fixed at"):
        new.set_choice(LayerChoice(8, 8, "tensor", "asym", "asym"))
