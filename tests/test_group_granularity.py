"""Per-group weight granularity in the model API: the space, the quantizer modules (LSQ steps
per group of g consecutive input elements of each output row), compile-once, and the cost.

The oracles are float64 code written here from DESIGN.md "Quantization math": the only fp32
steps are `inv = fl32(1/s)` and `v = fl32(x * inv)`; everything else is float64.
"""

import math

import eqnet
import pytest
import torch
from conftest import requires_cpp
from eqnet.nn import form_data
from eqnet.search.cost import CostModel
from eqnet.space import ElasticSpace, LayerChoice, SubnetConfig
from graph_counter import GraphCounter
from torch import nn

import eqkernels


# -- oracle -------------------------------------------------------------------------------------
def group_oracle(w, s, z, qmin, qmax, g, dy, k=0, comp=0.0):
    """(y, dw, ds, dz) of LSQ(+) fake quantization of w [N, ...] flattened to [N, K] with one
    (s, z) [N, K/g] per group of g consecutive columns; k > 0: the nested quantizer at top range
    [qmin, qmax] keeping all but k low bits (floor) plus compensation `comp`. The gradient
    scale is 1/sqrt(g * max(qmax, 1)) (the op's default, elements per scale = g)."""
    n = w.shape[0]
    wf = w.reshape(n, -1, g)  # [N, G, g]
    sf = s.reshape(n, -1, 1)
    zr = torch.round(z.double()).reshape(n, -1, 1)
    inv = torch.reciprocal(sf.float())
    v = (wf.float() * inv).double()
    u = torch.round(v) + zr
    q = torch.clamp(u, qmin, qmax)
    a = (torch.floor((q - zr) / 2**k) + comp) * 2**k
    y = a * sf.double()
    inside = (u >= qmin) & (u <= qmax)
    dyf = dy.double().reshape(wf.shape)
    dw = torch.where(inside, dyf, 0.0)
    t = torch.where(inside, a - v, a)
    gf = 1.0 / math.sqrt(g * max(qmax, 1))
    ds = gf * (dyf * t).sum(-1)
    dz = gf * (dyf * torch.where(inside, 0.0, -sf.double())).sum(-1)
    return y.reshape(w.shape), dw.reshape(w.shape), ds.reshape(s.shape), dz.reshape(s.shape)


def _space(**kw):
    args = dict(w_bits=(2, 4), a_bits=(None,), w_granularities=("channel", "group"))
    args.update(kw)
    return ElasticSpace(group_size=32, **args)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(27, 64), nn.ReLU(), nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 5)
    )


# -- the space ------------------------------------------------------------------------------------
def test_space_takes_group_granularity_and_checks_group_size():
    space = _space()
    assert space.group_size == 32 and "group" in space.w_granularities
    assert ElasticSpace.from_dict(space.to_dict()) == space
    assert ElasticSpace().group_size == 128  # default; old dicts without the key still load
    assert ElasticSpace.from_dict({"w_bits": [4]}).group_size == 128
    for bad in (0, 48, -32, 32.0, True, "32"):
        with pytest.raises(ValueError, match=r"group_size=.*multiples of 32"):
            ElasticSpace(group_size=bad)
    assert LayerChoice(4, None, "group").w_granularity == "group"
    with pytest.raises(ValueError, match="accepted values are tensor, channel, group"):
        LayerChoice(4, 4, "block")


def test_convert_names_the_layer_whose_input_dimension_g_does_not_divide():
    model = nn.Sequential(nn.Linear(27, 40), nn.ReLU(), nn.Linear(40, 40), nn.Linear(40, 5))
    with pytest.raises(ValueError, match=r"layer '2': group_size=32 does not divide .* K=40"):
        eqnet.convert(model, _space(), example_input=torch.randn(2, 27))
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(32, 2))
    # conv K = in_channels/groups * kh * kw = 8 * 9 = 72
    with pytest.raises(ValueError, match=r"layer '1': group_size=32 .* K=72"):
        eqnet.convert(conv, _space(), example_input=torch.randn(1, 3, 6, 6))


# -- the quantizer modules ------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=requires_cpp)])
@pytest.mark.parametrize("sym", ["sym", "asym"])
def test_layer_weight_per_group_lsq_matches_oracle(backend, sym):
    space = _space(w_symmetries=("sym", "asym"))
    net = eqnet.convert(_mlp(), space, example_input=torch.randn(2, 27))
    layer = net.model[2]  # elastic, K = 64: two groups per row
    wq = layer.weight_quantizer
    wq.backend = backend
    scale, zp = wq.raw_parameters(4, "group", sym)
    assert tuple(scale.shape) == (96, 2)
    with torch.no_grad():
        scale.copy_(torch.rand(96, 2) * 0.02 + 0.004)
        scale[0, 1] = 2.0**-6  # power of two: x / s exact, ties at .5 reachable
        layer.weight[0, 32:36] = torch.tensor([2.5, -2.5, 1.5, 40.0]) * 2.0**-6
        if zp is not None:
            zp.copy_(torch.randint(-3, 4, (96, 2)).float() + 0.4)
    layer.set_choice(LayerChoice(4, None, "group", sym))
    w = layer.weight
    y = layer.quantized_weight()
    dy = torch.randn_like(y)
    y.backward(dy)
    z = zp.detach() if zp is not None else torch.zeros(96, 2)
    qmin, qmax = -8, 7
    ry, rdw, rds, rdz = group_oracle(w.detach(), scale.detach(), z, qmin, qmax, 32, dy)
    torch.testing.assert_close(y, ry.float(), rtol=0, atol=0)
    torch.testing.assert_close(w.grad.double(), rdw, rtol=0, atol=0)
    torch.testing.assert_close(scale.grad.double(), rds, rtol=1e-5, atol=1e-6)
    if zp is not None:
        torch.testing.assert_close(zp.grad.double(), rdz, rtol=1e-5, atol=1e-6)
    # the channel form of the same layer is untouched by the group one
    assert wq.raw_parameters(4, "channel", sym)[0].grad is None


def test_nested_conv_weight_one_top_width_step_per_group():
    space = _space(w_bits=(2, 3, 4), nested=True, w_granularities=("group",))
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 6, 2), nn.Flatten(), nn.Linear(54, 2))
    net = eqnet.convert(model, space, example_input=torch.randn(1, 3, 6, 6))
    layer = net.model[1]  # K = 8 * 2 * 2 = 32: one group per row
    scale, _ = layer.weight_quantizer.raw_parameters(4, "group", "sym")
    assert tuple(scale.shape) == (6, 1)
    # every width reads the one top-width step of its group
    assert scale is layer.weight_quantizer.raw_parameters(2, "group", "sym")[0]
    with torch.no_grad():
        scale.copy_(torch.rand(6, 1) * 0.05 + 0.01)
    for bits in (2, 3):
        layer.weight.grad, scale.grad = None, None
        layer.set_choice(LayerChoice(bits, None, "group"))
        y = layer.quantized_weight()
        dy = torch.randn_like(y)
        y.backward(dy)
        k = 4 - bits
        ry, rdw, rds, _ = group_oracle(
            layer.weight.detach(), scale.detach(), torch.zeros(6, 1), -8, 7, 32, dy, k,
            (1 - 2.0**-k) / 2,
        )  # fmt: skip
        torch.testing.assert_close(y, ry.float(), rtol=0, atol=0)
        torch.testing.assert_close(layer.weight.grad.double(), rdw, rtol=0, atol=0)
        torch.testing.assert_close(scale.grad.double(), rds, rtol=1e-5, atol=1e-6)


def test_calibration_takes_per_group_statistics():
    net = eqnet.convert(_mlp(), _space(), example_input=torch.randn(2, 27))
    wq = net.model[2].weight_quantizer
    w = net.model[2].weight.detach().double()
    wq.calibrate(net.model[2].weight, method="lsq")
    # LSQ: s = 2 mean|w| / sqrt(qmax), the mean over each group of 32 of a row
    for bits in (2, 4):
        want = 2 * w.reshape(96, 2, 32).abs().mean(-1) / math.sqrt(2 ** (bits - 1) - 1)
        got = wq.raw_parameters(bits, "group", "sym")[0].detach().double()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        want_c = 2 * w.abs().mean(-1) / math.sqrt(2 ** (bits - 1) - 1)
        got_c = wq.raw_parameters(bits, "channel", "sym")[0].detach().double()
        torch.testing.assert_close(got_c, want_c, rtol=1e-6, atol=0)


def test_fixed_layer_whose_k_g_does_not_divide_keeps_channel_scales():
    net = eqnet.convert(_mlp(), _space(), example_input=torch.randn(2, 27))
    first = net.model[0]  # fixed W8, K = 27
    wq = first.weight_quantizer
    assert wq.group_size is None and "group" not in wq.granularities
    cfg = SubnetConfig.uniform(net.space, net, 2, None, "group")
    net.set_config(cfg)
    assert cfg["model.0"].w_granularity == "group"
    s = wq.raw_parameters(8, "channel", "sym")[0]
    assert wq.raw_parameters(8, "group", "sym")[0] is s
    p = wq.params(8, "group", "sym")
    assert p.group_size is None and p.axis == 0
    with torch.no_grad():
        s.copy_(torch.rand(64) * 0.01 + 0.002)
    y = first.quantized_weight()
    inv = torch.reciprocal(s.detach().float())[:, None]
    want = torch.clamp(torch.round((first.weight.detach() * inv).double()), -128, 127)
    torch.testing.assert_close(y, (want * s.detach().double()[:, None]).float(), rtol=0, atol=0)
    # the last layer (K = 96) does take per-group scales
    assert net.model[4].weight_quantizer.group_size == 32


# -- compile once -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kernel_in_graphs",
    [False, pytest.param(True, marks=[pytest.mark.slow, requires_cpp])],
    ids=["inline", "kernel-op"],
)
def test_group_space_switches_tensor_channel_group_forms_in_one_graph(
    monkeypatch, kernel_in_graphs
):
    torch._dynamo.reset()
    monkeypatch.setattr(form_data, "KERNEL_IN_GRAPHS", kernel_in_graphs)
    space = _space(
        a_bits=(4,),
        w_granularities=("tensor", "channel", "group"),
        w_symmetries=("sym", "asym"),
    )
    net = eqnet.convert(_mlp(), space, example_input=torch.randn(2, 27))
    eqnet.calibrate(net, [(torch.randn(16, 27), None)], batches=1, method="lsq")
    net.train()
    counter = GraphCounter()
    # one elastic layer compiled (a whole network only costs more tracing time)
    layer = net.model[2]
    compiled = torch.compile(layer, backend=counter.backend)
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(4, 64)
    grans = set()
    for _ in range(4):
        cfg = SubnetConfig.random(space, net, generator=gen)
        grans.add(cfg["model.2"].w_granularity)
        net.set_config(cfg)
        net.zero_grad(set_to_none=True)
        got = compiled(x)
        got.square().sum().backward()
        got_grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
        net.zero_grad(set_to_none=True)
        want = layer(x)
        want.square().sum().backward()
        assert torch.equal(got, want)
        want_grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
        assert got_grads.keys() == want_grads.keys()
        for name in want_grads:
            torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-6)
    assert grans == {"tensor", "channel", "group"}
    assert counter.forward_graphs == 1


# -- search cost --------------------------------------------------------------------------------
def test_size_counts_one_fp32_scale_per_group_per_row():
    space = _space(w_symmetries=("sym", "asym"))
    net = eqnet.convert(_mlp(), space, example_input=torch.randn(2, 27))
    cost = CostModel.trace(net, (1, 27))
    base = SubnetConfig.uniform(space, net, 4, None, "channel")
    grouped = SubnetConfig.uniform(space, net, 4, None, "group", "asym")
    # layer 2: [96, 64], g = 32 -> 192 scales + 192 zero points; layer 4: [5, 96] -> 15 + 15;
    # layer 0 (K = 27) keeps per-channel scales: 64 + 64
    biases = 64 + 96 + 5
    codes = (64 * 27 * 8 + 96 * 64 * 4 + 5 * 96 * 8) / 8
    want = codes + 4 * (2 * 64 + 2 * 192 + 2 * 15 + biases)
    assert cost.size_bytes(grouped) == pytest.approx(want, rel=1e-12)
    assert cost.size_bytes(base) == pytest.approx(codes + 4 * (64 + 96 + 5 + biases), rel=1e-12)
    assert cost.bitops(grouped) == cost.bitops(base)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=requires_cpp), "inline"])
def test_fake_quant_form_per_group_matches_oracle(backend):
    """The compile-once op with scales [N, K/g] (the form of compiled supernets)."""
    torch.manual_seed(3)
    x = torch.randn(5, 4, 3, 2)  # a conv weight: K = 24, g = 8 -> 3 groups per row
    s = torch.rand(5, 3) * 0.3 + 0.05
    z = torch.randint(-2, 3, (5, 3)).float() + 0.3
    form = torch.tensor(eqkernels.form_row(0, 15), dtype=torch.float64)
    gf = torch.tensor(0.37, dtype=torch.float64)
    xs, ss, zs = (t.clone().requires_grad_() for t in (x, s, z))
    if backend == "inline":
        y = eqkernels.fake_quant_form_inline(xs, ss, zs, form, gf, axis=0, group_size=8)
    else:
        y = eqkernels.fake_quant_form(xs, ss, zs, form, gf, axis=0, group_size=8, backend=backend)
    dy = torch.randn_like(x)
    y.backward(dy)
    ry, rdx, rds, rdz = group_oracle(x, s, z, 0, 15, 8, dy)
    scale = 0.37 * math.sqrt(8 * 15)  # the oracle's gradient scale is the op default's
    torch.testing.assert_close(y, ry.float(), rtol=0, atol=0)
    torch.testing.assert_close(xs.grad, rdx.float(), rtol=0, atol=0)
    torch.testing.assert_close(ss.grad.double(), rds * scale, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(zs.grad.double(), rdz * scale, rtol=1e-5, atol=1e-6)


def test_train_config_group_size_gives_every_recipe_group_weights():
    from eqnet.run.config import TrainConfig, recipe_space

    def space(recipe, **kw):
        w_bits = [4] if recipe == "qat" else [2, 3, 4]
        cfg = TrainConfig(
            recipe=recipe, model="digits_cnn", data="digits", w_bits=w_bits, a_bits=[None], **kw
        )
        return recipe_space(cfg.resolved())

    for recipe in ("qat", "multiquant", "layered"):
        got = space(recipe, group_size=64)
        assert got.w_granularities == ("group",) and got.group_size == 64
    assert space("layered", group_size=64).nested
    assert space("eqnet", group_size=32).w_granularities == ("channel", "tensor", "group")
    assert "group" not in space("qat").w_granularities  # no group_size: as before
    with pytest.raises(ValueError, match="group_size=40: accepted values are positive multiples"):
        TrainConfig(recipe="qat", model="digits_cnn", data="digits", group_size=40)
