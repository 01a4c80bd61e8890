"""Vertical-layering eq. 12 allocation: downsampling error against a float64 oracle, and the
allocation against brute force."""

import itertools

import numpy as np
import pytest
import torch
from eqnet.search.layered import downsampling_error, layer_errors, layered_allocation


def oracle_error(w, s, n, b, axis):
    """||s_b (q_b + c_k) - s_n q_n||^2 written from DESIGN.md's nested quantizer."""
    s32 = s.float().reshape(
        [-1 if d == axis else 1 for d in range(w.ndim)] if axis is not None else [1] * w.ndim
    )
    v = (w.float() * (1.0 / s32)).double()  # v = fl32(w * fl32(1/s_n))
    q_n = torch.clamp(torch.round(v), -(2 ** (n - 1)), 2 ** (n - 1) - 1)
    k = n - b
    q_b = torch.div(q_n, 2**k, rounding_mode="floor")
    c_k = 0.5 * (1 - 2.0**-k)
    s64 = s32.double()
    return float((((2**k) * s64 * (q_b + c_k) - s64 * q_n) ** 2).sum())


@pytest.mark.parametrize("axis", [None, 0])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_error_matches_oracle(axis, bits):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 3, 3, 3, generator=g)
    s = torch.tensor([0.125]) if axis is None else 2.0 ** -torch.randint(2, 5, (6,), generator=g)
    got = downsampling_error(w, s, 4, bits, axis)
    assert got == pytest.approx(oracle_error(w, s, 4, bits, axis), rel=1e-12)


def test_error_hand_values():
    # one value: q_4 = 5 (0b0101), s = 1; b = 2 drops k = 2 bits: q_2 = 1, c_2 = 3/8,
    # dequantized 4 * (1 + 3/8) = 5.5, error (5.5 - 5)^2 = 0.25
    assert downsampling_error(torch.tensor([5.0]), torch.tensor([1.0]), 4, 2, None) == 0.25
    # negative: q_4 = -3 (0b1101) -> floor(-3/4) = -1, 4 * (-1 + 3/8) = -2.5, error 0.25
    assert downsampling_error(torch.tensor([-3.0]), torch.tensor([1.0]), 4, 2, None) == 0.25
    # the top width loses nothing
    assert downsampling_error(torch.randn(10), torch.tensor([0.1]), 4, 4, None) == 0.0
    with pytest.raises(ValueError, match="bits=5"):
        downsampling_error(torch.randn(3), torch.tensor([1.0]), 4, 5, None)
    with pytest.raises(ValueError, match="scale"):
        downsampling_error(torch.randn(3), torch.tensor([-1.0]), 4, 2, None)


def test_allocation_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    shapes = {"l0": (4, 2, 3, 3), "l1": (8, 4, 3, 3), "l2": (10, 16), "l3": (3, 5)}
    weights = {
        n: (torch.randn(*sh, generator=g) * (i + 1), torch.tensor([0.2 * (i + 1)]), None)
        for i, (n, sh) in enumerate(shapes.items())
    }
    bits = [2, 3, 4]
    errors = layer_errors(weights, 4, bits)
    n_params = {n: int(np.prod(sh)) for n, sh in shapes.items()}
    total = sum(n_params.values())
    for budget in (2.2 * total, 3.0 * total, 3.6 * total):
        best_val = np.inf
        for combo in itertools.product(bits, repeat=len(shapes)):
            if sum(n_params[n] * b for n, b in zip(shapes, combo)) > budget:
                continue
            val = sum(oracle_error(*weights[n][:2], 4, b, None) for n, b in zip(shapes, combo))
            if val < best_val:
                best_val = val
        got = layered_allocation(errors, n_params, bits, budget)
        assert sum(n_params[n] * got[n] for n in shapes) <= budget
        got_val = sum(oracle_error(*weights[n][:2], 4, got[n], None) for n in shapes)
        assert got_val == pytest.approx(best_val, rel=1e-9)
    with pytest.raises(ValueError, match="infeasible"):
        layered_allocation(errors, n_params, bits, 1.5 * total)
