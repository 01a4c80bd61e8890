"""Cost model against hand-computed numbers on small models."""

import numpy as np
import pytest
import torch
from eqnet.search.cost import CostModel
from eqnet.search.genome import Budget, ChoiceTable, Constraint, parse_constraints
from eqnet.space import ElasticSpace, LayerChoice, SubnetConfig
from torch import nn


class FakeQConv(nn.Conv2d):
    is_elastic_layer = True
    fixed_choice = None


class FakeQLinear(nn.Linear):
    is_elastic_layer = True
    fixed_choice = None


def tiny():
    # conv: 1x5x5 -> 2x3x3 (k=3, no padding), bias; linear: 18 -> 4, no bias
    return nn.Sequential(
        FakeQConv(1, 2, 3), nn.ReLU(), nn.Flatten(), FakeQLinear(18, 4, bias=False)
    )


def test_trace_hand_numbers():
    cost = CostModel.trace(tiny(), (1, 1, 5, 5))
    conv, lin = cost.layers["0"], cost.layers["3"]
    # conv MACs: 2*3*3 output elements, each 1*3*3 products
    assert (conv.macs, conv.params, conv.out_channels, conv.act_numel, conv.bias) == (
        2 * 3 * 3 * 9,
        2 * 9,
        2,
        25,
        2,
    )
    assert (lin.macs, lin.params, lin.out_channels, lin.act_numel, lin.bias) == (
        4 * 18,
        72,
        4,
        18,
        0,
    )


def test_grouped_strided_conv_and_batch_independence():
    m = nn.Sequential(FakeQConv(4, 6, 3, stride=2, groups=2))
    # 4x7x7 -> 6x3x3; each output element sums (4/2)*3*3 products
    for batch in (1, 3):
        lc = CostModel.trace(m, (batch, 4, 7, 7)).layers["0"]
        assert lc.macs == 6 * 3 * 3 * 2 * 9
        assert lc.act_numel == 4 * 7 * 7


def test_metrics_hand_numbers():
    cost = CostModel.trace(tiny(), (1, 1, 5, 5))
    cfg = SubnetConfig(
        [
            ("0", LayerChoice(4, 8, "channel", "sym", "asym")),
            ("3", LayerChoice(2, 3, "tensor", "asym", "sym")),
        ]
    )
    m = cost.metrics(cfg)
    assert m["bitops"] == 162 * 4 * 8 + 72 * 2 * 3
    # conv: 18 weights * 4 bits, 2 channel scales, act scale + zero point, 2 bias (fp32)
    # linear: 72 weights * 2 bits, 1 scale + 1 zero point, 1 act scale
    assert m["size"] == pytest.approx(18 * 4 / 8 + 4 * (2 + 2 + 2) + 72 * 2 / 8 + 4 * (2 + 1))
    assert m["avg_w_bits"] == pytest.approx((18 * 4 + 72 * 2) / 90)
    assert m["avg_a_bits"] == pytest.approx((25 * 8 + 18 * 3) / 43)
    assert m["avg_bits"] == pytest.approx(0.5 * ((18 * 4 + 72 * 2) / 90 + (25 * 8 + 18 * 3) / 43))


def test_table_sums_equal_config_metrics():
    model = tiny()
    space = ElasticSpace(
        w_bits=(2, 4, 8),
        a_bits=(3, 8),
        w_granularities=("tensor", "channel"),
        w_symmetries=("sym", "asym"),
        a_symmetries=("sym", "asym"),
    )
    cost = CostModel.trace(model, (1, 1, 5, 5))
    table = ChoiceTable.from_model(space, model)
    genomes = table.uniform(np.random.default_rng(0), 50)
    for metric in ("bitops", "size", "avg_bits", "avg_w_bits", "avg_a_bits"):
        sums = table.gather_sum(table.metric_table(cost, metric), genomes)
        direct = [cost.metrics(table.decode(g))[metric] for g in genomes]
        np.testing.assert_allclose(sums, direct, rtol=1e-12)
    # the batched encoding is SubnetConfig.encode() row by row
    enc = table.encode(genomes)
    for g, e in zip(genomes, enc):
        assert torch.equal(e, table.decode(g).encode())


def test_real_converted_model():
    import eqnet

    sup = eqnet.convert(
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(18, 4)),
        ElasticSpace(),
        keep_first_last="elastic",
    )
    cost = CostModel.trace(sup, (1, 1, 5, 5))
    assert [lc.macs for lc in cost.layers.values()] == [162, 72]


def test_constraints_parse_and_errors():
    assert parse_constraints("bitops<=1.5G,size<=200k") == [
        Constraint("bitops", "<=", 1.5e9),
        Constraint("size", "<=", 2e5),
    ]
    assert parse_constraints("avg_bits>=3") == [Constraint("avg_bits", ">=", 3.0)]
    with pytest.raises(ValueError, match="accepted values are bitops"):
        parse_constraints("latency<=3")
    with pytest.raises(ValueError, match="expected METRIC<=VALUE"):
        parse_constraints("bitops<3")
    model = tiny()
    cost = CostModel.trace(model, (1, 1, 5, 5))
    table = ChoiceTable.from_model(ElasticSpace(), model, forms=False)
    with pytest.raises(ValueError, match="infeasible"):
        Budget(table, cost, parse_constraints("avg_w_bits<=1.5"))
    with pytest.raises(ValueError, match="input_size"):
        CostModel.trace(model, (5,))


def test_model_without_quantized_layers():
    with pytest.raises(ValueError, match="no quantized layers"):
        CostModel.trace(nn.Sequential(nn.Linear(2, 2)), (1, 2))
