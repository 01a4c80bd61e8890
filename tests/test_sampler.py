"""The Lowest-Random-Highest config sampler."""

import pytest
import torch
from eqnet.space import ElasticSpace, LayerChoice, SubnetConfig
from eqnet.train.sampler import ConfigSampler


class _Layer(torch.nn.Module):
    is_elastic_layer = True

    def __init__(self, fixed=None, fixed_form=False):
        super().__init__()
        self.fixed_choice = fixed
        self.fixed_form = fixed_form


class _Net(torch.nn.Module):
    """Four quantized layers; first and last fixed at W8A8 (the sampler must keep the widths;
    with fixed_form, the one form of older runs, the whole choice)."""

    def __init__(self, fixed_form=False):
        super().__init__()
        fixed = LayerChoice(8, 8, "channel", "sym", "asym")
        self.first = _Layer(fixed, fixed_form)
        self.a = _Layer()
        self.b = _Layer()
        self.last = _Layer(fixed, fixed_form)


def _fixed_widths(cfg):
    return [(cfg[n].w_bits, cfg[n].a_bits) for n in ("first", "last")]


SPACE = ElasticSpace(
    w_bits=(2, 3, 4, 8),
    a_bits=(2, 4, 8),
    w_granularities=("channel", "tensor"),
    w_symmetries=("sym", "asym"),
    a_symmetries=("asym", "sym"),
)


FORM_KEYS = ("w_granularity", "w_symmetry", "a_symmetry")


def test_lrh_order_and_contents():
    net = _Net()
    sampler = ConfigSampler(SPACE, net, seed=3, forms=True)
    out = sampler.lrh(4)
    roles = [r for r, _ in out]
    assert roles == ["highest", "random", "random", "random", "random", "lowest"]
    high, low = out[0][1], out[-1][1]
    for name in ("a", "b"):
        assert (high[name].w_bits, high[name].a_bits) == (8, 8)
        assert (low[name].w_bits, low[name].a_bits) == (2, 2)
    for _, cfg in out:
        cfg.validate(SPACE, net)
        assert _fixed_widths(cfg) == [(8, 8), (8, 8)]
    means = [c.mean_bits() for _, c in out[1:-1]]
    assert means == sorted(means, reverse=True)


@pytest.mark.parametrize("role", ["highest", "lowest", "random"])
def test_lrh_every_subnet_draws_every_form_per_layer(role):
    """EQ-Net's rule: every LRH subnet, the highest (all widths 8) and the lowest (all lowest
    widths) included, draws each layer's weight granularity, weight symmetry and activation
    symmetry uniformly and independently; the fixed first and last layers fix only their
    widths (W8A8) and draw their forms like every other layer."""
    net = _Net()
    sampler = ConfigSampler(SPACE, net, seed=7, forms=True)
    n = 400
    layers = ("first", "a", "b", "last")
    counts = {(layer, k): {} for layer in layers for k in FORM_KEYS}
    differ = 0
    for _ in range(n):
        cfg = dict(sampler.lrh(1))[role]
        cfg.validate(SPACE, net)
        assert _fixed_widths(cfg) == [(8, 8), (8, 8)]
        differ += cfg["first"] != cfg["last"]
        for layer in layers:
            c = cfg[layer]
            if role != "random" and layer in ("a", "b"):
                assert (c.w_bits, c.a_bits) == ((8, 8) if role == "highest" else (2, 2))
            for key in FORM_KEYS:
                value = getattr(c, key)
                counts[layer, key][value] = counts[layer, key].get(value, 0) + 1
    for values in counts.values():
        assert len(values) == 2
        # each of two values with p = 1/2 over n draws: sd = sqrt(n) / 2 = 10; 5 sd bound
        for value in values.values():
            assert abs(value - n / 2) < 50
    # layers draw independently: P(first == last in all three forms) = 1/8, so about 350 of
    # 400 differ (sd 6.6); the bound is far below that
    assert differ > n * 0.6


def test_fixed_form_layers_keep_their_one_choice():
    """Layers of older runs that hold one form (fixed_form) keep their whole fixed choice."""
    net = _Net(fixed_form=True)
    sampler = ConfigSampler(SPACE, net, seed=3, forms=True)
    for _ in range(20):
        for _, cfg in sampler.lrh(2):
            cfg.validate(SPACE, net)
            assert cfg["first"] == net.first.fixed_choice and cfg["last"] == net.last.fixed_choice


def test_lrh_extremes_fixed_forms_option():
    net = _Net()
    sampler = ConfigSampler(SPACE, net, seed=3, forms=True, extreme_forms="fixed")
    for _ in range(20):
        out = dict(sampler.lrh(1))
        for role in ("highest", "lowest"):
            for layer in ("first", "a", "b", "last"):
                c = out[role][layer]
                assert (c.w_granularity, c.w_symmetry, c.a_symmetry) == ("channel", "sym", "asym")


def test_lrh_without_forms_keeps_default_extremes():
    sampler = ConfigSampler(SPACE, _Net(), seed=3, forms=False)
    out = dict(sampler.lrh(1))
    assert out["highest"] == sampler.highest() and out["lowest"] == sampler.lowest()


def test_bad_extreme_forms():
    with pytest.raises(ValueError, match="extreme_forms"):
        ConfigSampler(SPACE, _Net(), seed=0, forms=True, extreme_forms="sometimes")


def test_random_covers_space_with_forms():
    sampler = ConfigSampler(SPACE, _Net(), seed=0, forms=True)
    seen = {k: set() for k in ("w_bits", "a_bits", "w_granularity", "w_symmetry", "a_symmetry")}
    for _ in range(200):
        cfg = sampler.random()
        for key in seen:
            seen[key].add(getattr(cfg["a"], key))
    assert seen["w_bits"] == set(SPACE.w_bits)
    assert seen["a_bits"] == set(SPACE.a_bits)
    assert seen["w_granularity"] == {"channel", "tensor"}
    assert seen["w_symmetry"] == {"sym", "asym"}
    assert seen["a_symmetry"] == {"sym", "asym"}


def test_random_without_forms_keeps_default_forms():
    sampler = ConfigSampler(SPACE, _Net(), seed=0, forms=False)
    for _ in range(50):
        c = sampler.random()["b"]
        assert (c.w_granularity, c.w_symmetry, c.a_symmetry) == ("channel", "sym", "asym")


def test_seeded_stream_and_state_restore():
    a = ConfigSampler(SPACE, _Net(), seed=11, forms=True)
    b = ConfigSampler(SPACE, _Net(), seed=11, forms=True)
    torch.manual_seed(0)
    first = [a.random() for _ in range(5)]
    torch.manual_seed(123)  # the global RNG must not matter
    assert [b.random() for _ in range(5)] == first
    state = a.state_dict()
    cont = [a.random() for _ in range(5)]
    c = ConfigSampler(SPACE, _Net(), seed=999, forms=True)
    c.load_state_dict(state)
    assert [c.random() for _ in range(5)] == cont


def test_uniform_widths():
    sampler = ConfigSampler(SPACE, _Net(), seed=0, forms=True)
    out = sampler.uniform_widths()
    assert [n for n, _ in out] == ["w8a8", "w4a4", "w3a2", "w2a2"]
    for name, cfg in out:
        assert isinstance(cfg, SubnetConfig)
        assert f"w{cfg['a'].w_bits}a{cfg['a'].a_bits}" == name
        assert cfg["b"] == cfg["a"]


def test_bad_num_random():
    with pytest.raises(ValueError, match="num_random"):
        ConfigSampler(SPACE, _Net(), seed=0, forms=True).lrh(-1)


def _is_uniform(cfg):
    return len({(cfg[n].w_bits, cfg[n].a_bits) for n in ("a", "b")}) == 1


def test_uniform_prob_zero_is_the_per_layer_stream():
    default = ConfigSampler(SPACE, _Net(), seed=5, forms=True)
    zero = ConfigSampler(SPACE, _Net(), seed=5, forms=True, uniform_prob=0.0)
    g = torch.Generator().manual_seed(5)
    reference = [SubnetConfig.random(SPACE, _Net(), g, forms=True) for _ in range(20)]
    assert [default.random() for _ in range(20)] == reference
    assert [zero.random() for _ in range(20)] == reference


def test_uniform_prob_one_gives_one_width_per_subnet():
    net = _Net()
    sampler = ConfigSampler(SPACE, net, seed=2, forms=True, uniform_prob=1.0)
    widths, grans = set(), set()
    for _ in range(200):
        cfg = sampler.random()
        cfg.validate(SPACE, net)
        assert _is_uniform(cfg)
        assert _fixed_widths(cfg) == [(8, 8), (8, 8)]
        # the activation width pairs as in uniform_widths: 3-bit weights take 2-bit activations
        pair = (cfg["a"].w_bits, cfg["a"].a_bits)
        assert pair in {(2, 2), (3, 2), (4, 4), (8, 8)}
        widths.add(pair)
        grans.update(cfg[n].w_granularity for n in ("a", "b"))
    assert len(widths) == 4  # every weight width is drawn
    assert grans == {"channel", "tensor"}  # forms are still drawn per layer


def test_uniform_prob_half_mixes_both_draws():
    sampler = ConfigSampler(SPACE, _Net(), seed=4, forms=True, uniform_prob=0.5)
    n = 400
    uniform = sum(_is_uniform(sampler.random()) for _ in range(n))
    # P(uniform) = 0.5 + 0.5 * P(per-layer draw happens to be uniform) = 0.5 + 0.5 / 12;
    # the bound is 5 binomial standard deviations (sd = 10 at n = 400)
    expected = n * (0.5 + 0.5 / 12)
    assert abs(uniform - expected) < 50


def test_bad_uniform_prob():
    with pytest.raises(ValueError, match="uniform_prob"):
        ConfigSampler(SPACE, _Net(), seed=0, forms=True, uniform_prob=1.5)
