"""eqnet.convert / Supernet / calibrate / recalibrate_bn on real models."""

import eqnet
import pytest
import torch
from eqnet import models
from eqnet.nn import QConv2d, QLinear, Supernet, SwitchableBatchNorm2d
from eqnet.space import ElasticSpace, LayerChoice, SubnetConfig
from torch import nn

SPACE = ElasticSpace(w_bits=(2, 4, 8), a_bits=(2, 4, 8))
WIDE = ElasticSpace(
    w_bits=(2, 3, 4, 8),
    a_bits=(2, 4, 8),
    w_granularities=("tensor", "channel"),
    w_symmetries=("sym", "asym"),
    a_symmetries=("sym", "asym"),
)
FIXED8 = LayerChoice(8, 8, "channel", "sym", "asym")


def _loader(shape, n=2, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *shape, generator=g), None) for _ in range(n)]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def resnet20_calibrated():
    torch.manual_seed(0)
    float_model = models.get("resnet20").eval()
    net = eqnet.convert(float_model, SPACE, keep_first_last="elastic").eval()
    eqnet.calibrate(net, _loader((3, 32, 32)), batches=2)
    return float_model, net


def test_8bit_close_to_float_and_2bit_not(resnet20_calibrated):
    float_model, net = resnet20_calibrated
    x = _loader((3, 32, 32), n=1, seed=1)[0][0]
    with torch.no_grad():
        ref = float_model(x)
        net.set_config(SubnetConfig.uniform(SPACE, net, 8, 8, "channel", "sym", "asym"))
        err8 = _rel(net(x), ref)
        net.set_config(SubnetConfig.uniform(SPACE, net, 2, 2))
        err2 = _rel(net(x), ref)
    # Bound: an 8-bit quantizer calibrated to ~3-4 sigma of its input adds noise of about
    # step/sqrt(12) ~ 7/255/3.5 ~ 0.8% of the signal's RMS; ResNet-20 has 40 quantizers whose
    # (independent) noise adds in quadrature and the residual stream does not amplify it, so
    # sqrt(40) * 0.8% ~ 5% is a generous ceiling (measured: ~1%).
    assert err8 < 0.05
    # 2 bits: 4 levels per quantizer; the output must be visibly different
    assert err2 > 0.3


def test_switching_form_and_back_is_bit_exact(resnet20_calibrated):
    _, net = resnet20_calibrated
    x = _loader((3, 32, 32), n=1, seed=2)[0][0][:2]
    a = SubnetConfig.random(SPACE, net, torch.Generator().manual_seed(1))
    b = SubnetConfig.random(SPACE, net, torch.Generator().manual_seed(2))
    with torch.no_grad():
        net.set_config(a)
        ya = net(x)
        net.set_config(b)
        yb = net(x)
        net.set_config(a)
        ya2 = net(x)
    assert torch.equal(ya, ya2) and not torch.equal(ya, yb)


def test_active_form_is_what_config_says(resnet20_calibrated):
    _, net = resnet20_calibrated
    cfg = SubnetConfig.random(SPACE, net, torch.Generator().manual_seed(5))
    net.set_config(cfg)
    layers = net.quantized_layers()
    assert list(layers) == list(cfg.layers)
    for name, layer in layers.items():
        assert layer.active == cfg[name]
    assert net.config() == cfg


class _Reversed(nn.Module):
    """Modules registered in the reverse of their execution order."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.mid = nn.Conv2d(4, 8, 3, padding=1)
        self.stem = nn.Conv2d(2, 4, 3, padding=1)

    def forward(self, x):
        return self.head(self.mid(self.stem(x)).mean((2, 3)))


def test_first_last_follow_execution_order_not_registration():
    net = eqnet.convert(_Reversed(), SPACE, example_input=torch.randn(1, 2, 6, 6))
    assert net.model.stem.fixed_choice == FIXED8 and net.model.head.fixed_choice == FIXED8
    assert net.model.mid.fixed_choice is None


@pytest.mark.parametrize("mode", ["8bit", "8bit-fixed-form", "fp", "elastic"])
def test_lowest_highest_random_respect_keep_first_last(mode):
    net = eqnet.convert(models.get("resnet20"), SPACE, keep_first_last=mode)
    names = list(net.quantized_layers())
    if mode == "fp":
        assert type(net.model.conv1) is nn.Conv2d and type(net.model.fc) is nn.Linear
        assert "model.conv1" not in names and "model.fc" not in names and len(names) == 18
    else:
        assert len(names) == 20 and names[0] == "model.conv1" and names[-1] == "model.fc"
    cfgs = [
        SubnetConfig.lowest(SPACE, net),
        SubnetConfig.highest(SPACE, net),
        SubnetConfig.random(SPACE, net, torch.Generator().manual_seed(0)),
    ]
    for cfg in cfgs:
        net.set_config(cfg)
        for edge in ("model.conv1", "model.fc"):
            if mode.startswith("8bit"):
                assert cfg[edge] == FIXED8
        if mode == "elastic":
            assert cfg["model.conv1"] in (cfgs[0]["model.conv1"], cfg["model.conv1"])
    if mode == "elastic":
        assert cfgs[0]["model.conv1"].w_bits == 2 and cfgs[0]["model.fc"].a_bits == 2
    inner = "model.layer2.0.conv1"
    assert cfgs[0][inner].w_bits == 2 and cfgs[1][inner].w_bits == 8


@pytest.mark.parametrize("mode", ["8bit", "8bit-fixed-form"])
def test_fixed_edges_fix_widths_and_optionally_the_form(mode):
    """'8bit': the edge layers hold every form of the space at W8A8 and random configs draw
    them; '8bit-fixed-form': they hold the one default choice (the earlier rule)."""
    net = eqnet.convert(models.get("digits_cnn"), WIDE, keep_first_last=mode)
    layers = net.quantized_layers()
    edges = [n for n, m in layers.items() if m.fixed_choice is not None]
    assert len(edges) == 2 and edges == [next(iter(layers)), list(layers)[-1]]
    n_forms = 1 if mode == "8bit-fixed-form" else 4  # 2 granularities x 2 weight symmetries
    for name in edges:
        assert len(layers[name].weight_quantizer.forms()) == n_forms
        assert len(layers[name].act_quantizer.forms()) == (1 if n_forms == 1 else 2)
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(20):
        cfg = SubnetConfig.random(WIDE, net, g)
        net.set_config(cfg)
        for name in edges:
            assert (cfg[name].w_bits, cfg[name].a_bits) == (8, 8)
            seen.add(cfg[name])
    # 8 forms per edge layer, 40 draws: fewer than 3 distinct has probability < 1e-25
    assert (seen == {FIXED8}) if mode == "8bit-fixed-form" else len(seen) > 2


def test_gradients_reach_active_forms_only():
    net = eqnet.convert(models.get("digits_cnn"), WIDE)
    eqnet.calibrate(net, _loader((1, 8, 8)), batches=1, method="lsq")
    cfg = SubnetConfig.random(WIDE, net, torch.Generator().manual_seed(3))
    net.set_config(cfg)
    net.train()
    net(torch.randn(4, 1, 8, 8)).logsumexp(1).sum().backward()
    for name, layer in net.quantized_layers().items():
        c = layer.active
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
        ws, _ = layer.weight_quantizer.raw_parameters(c.w_bits, c.w_granularity, c.w_symmetry)
        as_, _ = layer.act_quantizer.raw_parameters(c.a_bits, "tensor", c.a_symmetry)
        active = {id(ws), id(as_)}
        wz = layer.weight_quantizer.raw_parameters(c.w_bits, c.w_granularity, c.w_symmetry)[1]
        az = layer.act_quantizer.raw_parameters(c.a_bits, "tensor", c.a_symmetry)[1]
        assert ws.grad is not None and ws.grad.abs().sum() > 0, name
        assert as_.grad is not None and as_.grad.abs().sum() > 0, name
        for zp in (wz, az):
            if zp is not None:
                active.add(id(zp))
                assert zp.grad is not None, name  # in the graph (may be 0 if nothing clipped)
        for qname, p in list(layer.weight_quantizer.named_parameters()) + list(
            layer.act_quantizer.named_parameters()
        ):
            if id(p) not in active:
                assert p.grad is None, f"{name}.{qname}"


def test_state_dict_round_trip_without_calibration():
    src = eqnet.convert(models.get("resnet20"), WIDE, per_bit_bn=True)
    eqnet.calibrate(src, _loader((3, 32, 32), n=1, batch=4), batches=1, method="lsq")
    cfg = SubnetConfig.random(WIDE, src, torch.Generator().manual_seed(0))
    src.set_config(cfg)
    dst = eqnet.convert(models.get("resnet20"), WIDE, per_bit_bn=True)  # other random init
    missing = dst.load_state_dict(src.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    dst.set_config(cfg)
    src.eval(), dst.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))
    for (n, a), b in zip(src.quantizers().items(), dst.quantizers().values()):
        assert a.signed == b.signed, n


@pytest.mark.parametrize(
    "name, space",
    [("resnet20", WIDE), ("torchvision:resnet18", SPACE), ("torchvision:mobilenet_v2", WIDE)],
)
def test_convert_forward_backward_random_configs(name, space):
    model = models.get(name, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    net = eqnet.convert(model, space, example_input=x[:1])
    layers = net.quantized_layers()
    n_float = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    assert len(layers) == n_float
    if name.endswith("mobilenet_v2"):
        assert any(
            isinstance(m, QConv2d) and m.groups == m.in_channels > 1 for m in layers.values()
        )
    eqnet.calibrate(net, [(x, None)], batches=1, method="lsq")
    net.train()
    for seed in range(2 if name == "resnet20" else 1):
        net.set_config(SubnetConfig.random(space, net, torch.Generator().manual_seed(seed)))
        net.zero_grad(set_to_none=True)
        y = net(x)
        assert y.shape == (2, 10) and torch.isfinite(y).all()
        y.square().mean().backward()
        for lname, layer in layers.items():
            assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all(), lname


def test_shared_module_converted_once():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 1)
            self.shared = nn.Conv2d(4, 4, 3, padding=1)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            x = self.shared(self.shared(self.stem(x)).relu())
            return self.head(x.mean((2, 3)))

    m = Twice()
    m.alias = m.shared  # the same module registered under two names
    net = eqnet.convert(m, SPACE, example_input=torch.randn(1, 3, 5, 5))
    assert isinstance(net.model.shared, QConv2d) and net.model.alias is net.model.shared
    assert list(net.quantized_layers()) == ["model.stem", "model.shared", "model.head"]
    net(torch.randn(2, 3, 5, 5)).sum().backward()


def test_bad_configs_raise_naming_layer_and_allowed_values():
    net = eqnet.convert(models.get("digits_cnn"), SPACE)
    good = SubnetConfig.highest(SPACE, net)
    with pytest.raises(ValueError, match=r"'model.nope'.*model.features.0"):
        net.set_config(SubnetConfig([*good.layers.items(), ("model.nope", LayerChoice(4, 4))]))
    with pytest.raises(ValueError, match=r"'model.features.3'.*w_bits=3.*\[2, 4, 8\]"):
        net.set_config(good.replace("model.features.3", w_bits=3))
    with pytest.raises(ValueError, match=r"'model.features.3'.*a_bits=6.*\[2, 4, 8\]"):
        net.set_config(good.replace("model.features.3", a_bits=6))
    with pytest.raises(ValueError, match=r"3 layers.*4.*'model.fc'"):
        net.set_config(SubnetConfig(list(good.layers.items())[:3]))
    with pytest.raises(ValueError, match=r"'model.fc'.*fixed"):
        net.set_config(good.replace("model.fc", w_bits=4))
    assert net.config() == good  # a rejected config changes nothing


def test_convert_argument_errors():
    with pytest.raises(ValueError, match="8bit, 8bit-fixed-form, fp, elastic"):
        eqnet.convert(models.get("digits_cnn"), SPACE, keep_first_last="int8")
    plain = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Flatten(), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="example_input"):
        eqnet.convert(plain, SPACE)
    net = eqnet.convert(plain, SPACE, keep_first_last="elastic")  # no trace needed
    assert len(net.quantized_layers()) == 2


def test_per_bit_bn_follows_feeding_layer_width():
    class Crossed(nn.Module):
        """BN names deliberately do not match the conv that feeds them."""

        def __init__(self):
            super().__init__()
            self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
            self.conv_b = nn.Conv2d(4, 4, 3, padding=1)
            self.conv_c = nn.Conv2d(4, 4, 1)
            self.bn_b = nn.BatchNorm2d(4)  # fed by conv_a
            self.bn_a = nn.BatchNorm2d(4)  # fed by conv_b
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            x = self.bn_b(self.conv_a(x)).relu()
            x = self.bn_a(self.conv_b(x)).relu()
            return self.head(self.conv_c(x).mean((2, 3)))

    space = ElasticSpace(w_bits=(2, 4, 8), a_bits=(8,))
    net = eqnet.convert(Crossed(), space, keep_first_last="elastic", per_bit_bn=True,
                        example_input=torch.randn(1, 3, 4, 4))  # fmt: skip
    assert isinstance(net.model.bn_a, SwitchableBatchNorm2d)
    assert isinstance(net.model.bn_b, SwitchableBatchNorm2d)
    cfg = SubnetConfig.highest(space, net).replace("model.conv_a", w_bits=2)
    cfg = cfg.replace("model.conv_b", w_bits=4)
    net.set_config(cfg)
    assert net.model.bn_b.active_bits == 2 and net.model.bn_a.active_bits == 4
    # the selected BN is the one that runs: give each width distinct statistics
    net.eval()
    bn = net.model.bn_b
    for b, sub in bn.bns.items():
        sub.running_mean.fill_(float(b))
    x = torch.randn(3, 4, 2, 2)
    expected = (x.double() - 2) / (1 + bn.bns["2"].eps) ** 0.5
    torch.testing.assert_close(bn(x).double(), expected, rtol=1e-5, atol=1e-6)


def test_per_bit_bn_in_resnet_and_fixed_layers_keep_plain_bn():
    net = eqnet.convert(models.get("resnet20"), SPACE, per_bit_bn=True)
    assert type(net.model.bn1) is nn.BatchNorm2d  # fed by the fixed 8-bit conv1
    blk = net.model.layer2[1]
    assert isinstance(blk.bn1, SwitchableBatchNorm2d) and isinstance(blk.bn2, SwitchableBatchNorm2d)
    cfg = SubnetConfig.highest(SPACE, net).replace("model.layer2.1.conv2", w_bits=2)
    net.set_config(cfg)
    assert blk.bn2.active_bits == 2 and blk.bn1.active_bits == 8


def test_calibration_picks_unsigned_after_relu_and_keeps_mode_and_bn(resnet20_calibrated):
    _, net = resnet20_calibrated
    m = net.model
    assert m.conv1.act_quantizer.signed is True  # raw (Gaussian) input
    assert m.layer1[0].conv1.act_quantizer.signed is False  # after ReLU
    assert m.fc.act_quantizer.signed is False  # after ReLU and average pooling
    net.train()
    bn = net.model.layer1[0].bn1
    before = bn.running_mean.clone(), bn.num_batches_tracked.clone()
    eqnet.calibrate(net, _loader((3, 32, 32), n=1, batch=2), batches=1, method="lsq")
    assert net.training and all(mod.training for mod in net.modules())
    # calibration leaves BN statistics alone even in train mode
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(
        bn.num_batches_tracked, before[1]
    )
    net.eval()


def test_recalibrate_bn_cumulative_average_of_active_subnet():
    net = eqnet.convert(models.get("digits_cnn"), SPACE)
    eqnet.calibrate(net, _loader((1, 8, 8)), batches=1, method="lsq")
    net.set_config(SubnetConfig.lowest(SPACE, net))
    bn = net.model.features[1]
    bn.momentum = 0.3
    seen = []
    handle = bn.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().double()))
    data = _loader((1, 8, 8), n=3, batch=5, seed=4)
    net.train()
    eqnet.recalibrate_bn(net, data, batches=3)
    handle.remove()
    assert len(seen) == 3
    # cumulative average of the per-batch statistics (momentum=None), unbiased variance
    means = torch.stack([s.mean((0, 2, 3)) for s in seen])
    var = torch.stack([s.var((0, 2, 3), unbiased=True) for s in seen])
    torch.testing.assert_close(bn.running_mean.double(), means.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), var.mean(0), rtol=1e-5, atol=1e-6)
    assert bn.momentum == 0.3 and net.training and bn.training


def test_parameter_groups_partition_all_parameters():
    net = eqnet.convert(models.get("resnet20"), WIDE, per_bit_bn=True)
    groups = net.parameter_groups()
    assert set(groups) == {"weight", "no_decay", "scale", "zero_point"}
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(list(net.parameters()))
    conv_w = {id(m.weight) for m in net.modules() if isinstance(m, (QConv2d, QLinear))}
    assert conv_w == {id(p) for p in groups["weight"]}
    assert all(p.dim() == 1 for p in groups["no_decay"])
    assert len(groups["zero_point"]) > 0


@pytest.mark.slow
def test_torch_compile_of_converted_model_runs_on_cpu():
    # A tiny model: inductor's compile time on this CPU grows with the graph (digits_cnn with
    # backward took minutes on a loaded 2-core machine); what is tested is that the custom ops,
    # the straight-through scale clamp and the form switching all trace.
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    net = eqnet.convert(model, SPACE, keep_first_last="elastic").eval()
    eqnet.calibrate(net, _loader((1, 8, 8)), batches=1, method="lsq")
    net.set_config(SubnetConfig.uniform(SPACE, net, 4, 4))
    x = torch.randn(3, 1, 8, 8)
    compiled = torch.compile(net)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), net(x), rtol=1e-5, atol=1e-5)


def test_supernet_forward_delegates():
    model = models.get("digits_cnn")
    net = eqnet.convert(model, SPACE)
    assert isinstance(net, Supernet) and net.space == SPACE
    assert net.first_last == ("features.0", "fc")


def test_nested_space_one_scale_per_granularity_and_runs():
    space = ElasticSpace(w_bits=(2, 4, 8), a_bits=(4, 8), w_granularities=("tensor", "channel"),
                         nested=True)  # fmt: skip
    net = eqnet.convert(models.get("digits_cnn"), space)
    layer = net.model.features[3]
    assert {n for n, _ in layer.weight_quantizer.named_parameters()} == {
        "scale_nested_tensor",
        "scale_nested_channel",
    }
    fixed = net.model.features[0]  # first layer: fixed 8-bit, stored in full (not nested)
    assert not fixed.weight_quantizer.nested
    eqnet.calibrate(net, _loader((1, 8, 8)), batches=1)
    x = torch.randn(2, 1, 8, 8)
    outs = []
    for b in (2, 4, 8):
        net.set_config(SubnetConfig.uniform(space, net, b, 8, "channel", "sym", "asym"))
        p = layer.weight_quantizer.params(b, "channel", "sym")
        assert p.nested and p.top_bits == 8 and p.bits == b
        outs.append(net(x))
    assert not torch.equal(outs[0], outs[2])
    outs[0].sum().backward()
