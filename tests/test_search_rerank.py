"""eqnet.search.rerank: McNemar z on paired correctness and the keep-uniform rule, against
counts written out by hand."""

import math

import pytest
import torch
from eqnet.search.rerank import Measured, choose, paired_z


def _vec(bits: str) -> torch.Tensor:
    return torch.tensor([c == "1" for c in bits])


def test_paired_z_hand_counts():
    a = _vec("1111100000")
    b = _vec("1100011000")
    # a right, b wrong: images 2, 3, 4 -> n10 = 3; b right, a wrong: 5, 6 -> n01 = 2
    assert paired_z(a, b) == pytest.approx((3 - 2) / math.sqrt(5))
    assert paired_z(b, a) == pytest.approx(-(3 - 2) / math.sqrt(5))
    assert paired_z(a, a.clone()) == 0.0
    with pytest.raises(ValueError, match="bool tensors of one shape"):
        paired_z(a, b[:5])


def test_choose_keeps_uniform_unless_the_mixed_config_wins_clearly():
    n = 400
    uniform = torch.zeros(n, dtype=torch.bool)
    uniform[:300] = True  # 75 %
    close = uniform.clone()
    close[300:306] = True  # +6 images, n10 = 6, n01 = 0 ... but flip 4 the other way
    close[:4] = False  # n10 = 6, n01 = 4: z = 2 / sqrt(10) = 0.63
    clear = uniform.clone()
    clear[300:320] = True  # n10 = 20, n01 = 0: z = 20 / sqrt(20) = 4.47
    worse = uniform.clone()
    worse[:10] = False

    cands = [
        Measured("ga", close, 0.8),
        Measured("ga", worse, 0.79),
        Measured("uniform W3A3", uniform),
    ]
    i, rec = choose(cands, z_min=1.0)
    assert i == 2 and rec["best_measured"] == "ga"
    assert rec["z_vs_uniform"] == pytest.approx(2 / math.sqrt(10))
    # z_min = 0: the plain most accurate candidate
    assert choose(cands, z_min=0.0)[0] == 0
    # a clear win is kept
    i, rec = choose([Measured("ga", clear), *cands], z_min=1.0)
    assert i == 0 and rec["z_vs_uniform"] == pytest.approx(20 / math.sqrt(20))
    # no uniform candidate in the budget: the most accurate mixed config
    assert choose(cands[:2], z_min=3.0) == (0, {"best_measured": "ga", "z_vs_uniform": None})
    # a uniform width measuring best is kept without a test; the first of equals wins
    i, rec = choose([Measured("ga", uniform.clone()), Measured("uniform W4A4", clear)])
    assert i == 1 and rec["z_vs_uniform"] is None
    assert choose([Measured("ga", uniform), Measured("ga", uniform.clone())])[0] == 0


def test_choose_rejects_bad_input():
    with pytest.raises(ValueError, match="no measured candidates"):
        choose([])
    with pytest.raises(ValueError, match="z_min=-1"):
        choose([Measured("ga", _vec("10"))], z_min=-1)
