"""ElasticSpace and SubnetConfig: validation, constructors, JSON, encoding."""

import pytest
import torch
from eqnet.space import ElasticSpace, LayerChoice, SubnetConfig, layer_specs
from torch import nn

FIXED = LayerChoice(8, 8, "channel", "sym", "asym")


class _Layer(nn.Module):
    is_elastic_layer = True

    def __init__(self, fixed=None, fixed_form=False):
        super().__init__()
        self.fixed_choice = fixed
        self.fixed_form = fixed_form


class _Net(nn.Module):
    """Three stand-in quantized layers; the first and last fixed at 8 bits."""

    def __init__(self, fixed_form=False):
        super().__init__()
        self.a = _Layer(FIXED, fixed_form)
        self.b = _Layer()
        self.c = _Layer(FIXED, fixed_form)


SPACE = ElasticSpace(
    w_bits=(2, 4, 8),
    a_bits=(4, 8),
    w_granularities=("tensor", "channel"),
    w_symmetries=("sym", "asym"),
    a_symmetries=("sym", "asym"),
)


def test_space_rejects_nested_with_asymmetric_weights():
    with pytest.raises(ValueError, match="nested"):
        ElasticSpace(w_symmetries=("sym", "asym"), nested=True)
    assert ElasticSpace(nested=True).nested  # symmetric nested is fine


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"w_bits": (0, 4)}, "w_bits"),
        ({"a_bits": (4, 9)}, "a_bits"),
        ({"w_bits": ()}, "w_bits"),
        ({"w_granularities": ("row",)}, "tensor, channel"),
        ({"a_symmetries": ("both",)}, "sym, asym"),
        ({"w_bits": (4, 4)}, "duplicate"),
    ],
)
def test_space_rejects_bad_values(kwargs, word):
    with pytest.raises(ValueError, match=word):
        ElasticSpace(**kwargs)


def test_space_dict_round_trip():
    assert ElasticSpace.from_dict(SPACE.to_dict()) == SPACE
    assert SPACE.top_bits == 8


def test_layer_specs_in_module_order():
    specs = layer_specs(_Net())
    assert list(specs) == ["a", "b", "c"]
    assert specs["a"] == FIXED and specs["b"] is None


def test_lowest_highest_uniform_keep_fixed_layers():
    net = _Net()
    low = SubnetConfig.lowest(SPACE, net)
    high = SubnetConfig.highest(SPACE, net)
    assert low["a"] == FIXED and low["c"] == FIXED and high["a"] == FIXED
    assert low["b"] == LayerChoice(2, 4, "channel", "sym", "asym")
    assert high["b"] == LayerChoice(8, 8, "channel", "sym", "asym")
    u = SubnetConfig.uniform(SPACE, net, 4, 4, "tensor", "asym", "sym")
    assert u["b"] == LayerChoice(4, 4, "tensor", "asym", "sym")
    with pytest.raises(ValueError, match=r"'b'.*\[2, 4, 8\]"):
        SubnetConfig.uniform(SPACE, net, 3, 4)


def test_random_draws_inside_space_and_is_reproducible():
    net = _Net()
    seen, fixed_forms = set(), set()
    for seed in range(30):
        cfg = SubnetConfig.random(SPACE, net, torch.Generator().manual_seed(seed))
        cfg.validate(SPACE, net)
        assert [(cfg[n].w_bits, cfg[n].a_bits) for n in "ac"] == [(8, 8), (8, 8)]
        seen.add(cfg["b"])
        fixed_forms.add(cfg["a"])
        again = SubnetConfig.random(SPACE, net, torch.Generator().manual_seed(seed))
        assert again == cfg
    assert len(seen) > 5  # 3*2*2*2*2 = 48 forms; 30 draws hit several
    # fixed-width layers draw their forms too: 8 forms at W8A8, P(30 draws hit < 3) < 1e-20
    assert len(fixed_forms) > 2


def test_fixed_layers_fix_widths_not_forms():
    """A fixed-width layer takes any form of the space at its fixed widths, and nothing else;
    a layer that also fixes its form (older runs) takes its fixed choice only."""
    net = _Net()
    base = SubnetConfig.highest(SPACE, net)
    other_form = LayerChoice(8, 8, "tensor", "asym", "sym")
    base.replace("a", **other_form.to_dict()).validate(SPACE, net)
    with pytest.raises(ValueError, match=r"'a' is fixed at W8A8"):
        base.replace("a", w_bits=4).validate(SPACE, net)
    narrow = ElasticSpace(w_bits=(2, 4, 8), a_bits=(4, 8), w_granularities=("channel",))
    with pytest.raises(ValueError, match=r"'a'.*w_granularity='tensor'.*\['channel'\]"):
        base.replace("a", w_granularity="tensor").validate(narrow, net)
    uniform = SubnetConfig.uniform(SPACE, net, 2, 4, "tensor", "asym", "sym")
    assert uniform["a"] == other_form and uniform["b"] == LayerChoice(2, 4, "tensor", "asym", "sym")
    old = _Net(fixed_form=True)
    with pytest.raises(ValueError, match=r"'a' is fixed at LayerChoice"):
        base.replace("a", **other_form.to_dict()).validate(SPACE, old)
    assert SubnetConfig.uniform(SPACE, old, 2, 4, "tensor", "asym", "sym")["a"] == FIXED
    assert SubnetConfig.random(SPACE, old, torch.Generator().manual_seed(0))["c"] == FIXED


def test_json_round_trip_and_equality():
    net = _Net()
    cfg = SubnetConfig.random(SPACE, net, torch.Generator().manual_seed(3))
    back = SubnetConfig.from_json(cfg.to_json())
    assert back == cfg and list(back.layers) == list(cfg.layers)
    assert back != SubnetConfig.lowest(SPACE, net) or cfg == SubnetConfig.lowest(SPACE, net)
    for bad in ("not json", '{"format": "x"}', '{"format": "eqnet.SubnetConfig", "version": 2}'):
        with pytest.raises(ValueError):
            SubnetConfig.from_json(bad)


def test_validate_errors_name_layer_and_allowed_values():
    net = _Net()
    good = SubnetConfig.highest(SPACE, net)
    unknown = SubnetConfig([*good.layers.items(), ("zz", LayerChoice(4, 4))])
    with pytest.raises(ValueError, match=r"'zz'.*\['a', 'b', 'c'\]"):
        unknown.validate(SPACE, net)
    short = SubnetConfig(list(good.layers.items())[:2])
    with pytest.raises(ValueError, match=r"2 layers.*3.*'c'"):
        short.validate(SPACE, net)
    with pytest.raises(ValueError, match=r"'b'.*w_bits=3.*\[2, 4, 8\]"):
        good.replace("b", w_bits=3).validate(SPACE, net)
    with pytest.raises(ValueError, match=r"'a'.*fixed"):
        good.replace("a", w_bits=4).validate(SPACE, net)


def test_encoding_fixed_length_and_values():
    net = _Net()
    cfg = SubnetConfig.uniform(SPACE, net, 4, 8, "tensor", "asym", "sym")
    enc = cfg.encode()
    assert enc.shape == (3 * 5,)
    assert enc[5:10].tolist() == [0.5, 1.0, 0.0, 1.0, 0.0]
    assert cfg.mean_bits() == pytest.approx(((8 + 4 + 8) / 3 + 8) / 2)
