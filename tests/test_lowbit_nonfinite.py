"""Non-finite inputs and bad scales in lowbit_linear / lowbit_conv2d, per backend, against
float64 oracles written from the rules in docs/numerics.md: on the integer path a NaN input
makes every output that depends on it NaN and +-Inf takes the end code of the range (as
fake_quant's forward clamps it); the float path is IEEE x @ W^T; scales below 2^-126 (whose
fp32 reciprocal overflows) and non-finite zero points are rejected."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import need_kernel
from plane_oracle import pack_planes as _pack

import eqkernels as E
from eqkernels.backend import force_cpu_isa

# The cuda backend takes CUDA tensors; this file runs on CPU tensors only.
BACKENDS = ["torch", "cpp-portable", "cpp-avx2", "cpp-avx512", "cpp-avx512gfni"]
NAN, INF = float("nan"), float("inf")


def _backend(backend):
    if backend == "torch":
        return "torch", contextlib.nullcontext()
    need_kernel("lowbit_gemm_int_cpu")
    return "cpp", force_cpu_isa(backend.split("-", 1)[1])


def _problem(N=6, K=45, bits=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (N, K), generator=g)
    q[0, :3] = 0  # zero weights: inf * 0 is NaN on the float path
    scale = torch.rand(N, generator=g) * 0.05 + 0.01
    bias = torch.randn(N, generator=g)
    w64 = q.double() * scale.double().reshape(-1, 1)
    return q, _pack(q, bits), scale, bias, w64


def _codes64(x, s, z, qmin, qmax):
    """fake_quant's forward codes in float64: clamp(rne(fl32(x * fl32(1/s))) + z); +-inf
    clamps to the range's ends, NaN stays NaN."""
    inv = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(s, dtype=torch.float32)
    v = (x.to(torch.float32) * inv).double()
    return torch.clamp(torch.round(v) + z, qmin, qmax)


def _assert_same(y, ref):
    assert torch.equal(torch.isnan(y), torch.isnan(ref)), (torch.isnan(y), torch.isnan(ref))
    finite = torch.isfinite(ref)
    assert torch.equal(y[~finite & ~torch.isnan(ref)], ref[~finite & ~torch.isnan(ref)].float())
    torch.testing.assert_close(y[finite].double(), ref[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_integer_path_nan_rows_and_inf_clamps(backend):
    name, ctx = _backend(backend)
    _q, planes, scale, bias, w64 = _problem()
    x = torch.randn(5, 45, generator=torch.Generator().manual_seed(1))
    x[1, 3] = NAN
    x[2, 5] = INF
    x[3, 7] = -INF
    x[4, 0], x[4, 9] = INF, NAN
    s_a, z_a, qmin, qmax = 0.03, 7.0, 0, 255
    with ctx:
        y = E.lowbit_linear(x, planes, scale, 4, 4, K=45, bias=bias,
                            act_scale=torch.tensor([s_a]), act_zero_point=torch.tensor([z_a]),
                            act_quant_min=qmin, act_quant_max=qmax, backend=name)  # fmt: skip
    codes = _codes64(x, s_a, z_a, qmin, qmax)
    ref = ((codes - z_a) * s_a) @ w64.T + bias.double()
    ref[torch.isnan(x).any(1)] = NAN
    assert torch.isnan(y[1]).all() and torch.isnan(y[4]).all()
    assert torch.isfinite(y[[0, 2, 3]]).all()
    _assert_same(y, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_float_path_is_ieee(backend):
    name, ctx = _backend(backend)
    _q, planes, scale, bias, w64 = _problem()
    x = torch.randn(4, 45, generator=torch.Generator().manual_seed(2))
    x[1, 0] = INF  # row 0 of W is 0 there: y[1, 0] = NaN, elsewhere +-inf
    x[2, 4] = NAN
    x[3, 10], x[3, 11] = INF, -INF
    with ctx:
        y = E.lowbit_linear(x, planes, scale, 4, 4, K=45, bias=bias, backend=name)
    ref = x.double() @ w64.T + bias.double()
    assert torch.isnan(y[1, 0]) and torch.isinf(y[1, 1:]).all()
    _assert_same(y, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("groups, padding", [(1, 1), (2, 0)])
def test_conv_integer_path_nan_receptive_fields(backend, groups, padding):
    name, ctx = _backend(backend)
    C, N, k = 4, 6, 3
    _q, planes, scale, bias, w64 = _problem(N=N, K=C // groups * k * k, seed=3)
    x = torch.randn(2, C, 7, 7, generator=torch.Generator().manual_seed(4))
    x[0, 1, 2, 3] = NAN
    x[1, 3, 6, 6] = INF
    x[1, 0, 0, 0] = -INF
    s_a, z_a, qmin, qmax = 0.05, -3.0, -128, 127
    with ctx:
        y = E.lowbit_conv2d(x, planes, scale, 4, 4, in_channels=C, kernel_size=k,
                            padding=padding, groups=groups, bias=bias,
                            act_scale=torch.tensor([s_a]), act_zero_point=torch.tensor([z_a]),
                            act_quant_min=qmin, act_quant_max=qmax, backend=name)  # fmt: skip
    real = (_codes64(x, s_a, z_a, qmin, qmax) - z_a) * s_a  # padding is real zero
    ref = F.conv2d(torch.nan_to_num(real), w64.view(N, C // groups, k, k), bias.double(),
                   padding=padding, groups=groups)  # fmt: skip
    # NaN exactly where the receptive field (the group's channels, the window) holds the NaN.
    for b, n, oy, ox in torch.cartesian_prod(*(torch.arange(s) for s in ref.shape)).tolist():
        g = n // (N // groups)
        channels = range(g * C // groups, (g + 1) * C // groups)
        rows = range(oy - padding, oy - padding + k)
        cols = range(ox - padding, ox - padding + k)
        if b == 0 and 1 in channels and 2 in rows and 3 in cols:
            ref[b, n, oy, ox] = NAN
    assert torch.isnan(y).any()
    _assert_same(y, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_float_path_is_ieee(backend):
    name, ctx = _backend(backend)
    _q, planes, scale, bias, w64 = _problem(N=4, K=2 * 9, seed=5)
    x = torch.randn(1, 2, 5, 5, generator=torch.Generator().manual_seed(6))
    x[0, 0, 2, 2] = INF
    x[0, 1, 4, 0] = NAN
    with ctx:
        y = E.lowbit_conv2d(x, planes, scale, 4, 4, in_channels=2, kernel_size=3, padding=1,
                            bias=bias, backend=name)  # fmt: skip
    ref = F.conv2d(x.double(), w64.view(4, 2, 3, 3), bias.double(), padding=1)
    _assert_same(y, ref)


@pytest.mark.parametrize("bad", [1e-45, 1e-39, 0.0, -1.0, INF, NAN])
def test_scales_whose_reciprocal_overflows_are_rejected(bad):
    _, planes, scale, _, _ = _problem()
    x = torch.randn(2, 45)
    act = dict(act_zero_point=torch.tensor([0.0]), act_quant_min=0, act_quant_max=255)
    with pytest.raises(ValueError, match="act_scale"):
        E.lowbit_linear(x, planes, scale, 4, 4, K=45, act_scale=torch.tensor([bad]), **act)
    bad_scale = scale.clone()
    bad_scale[2] = bad
    with pytest.raises(ValueError, match="scale"):
        E.lowbit_linear(x, planes, bad_scale, 4, 4, K=45)
    with pytest.raises(ValueError, match="scale"):
        E.fake_quant(x, torch.tensor([bad]), None, -8, 7)


def test_smallest_normal_scale_is_accepted():
    x = torch.full((3,), 2.0**-118)  # 256 steps: clamps to 127
    y = E.fake_quant(x, torch.tensor([2.0**-126]), None, -128, 127)
    assert torch.isfinite(y).all() and math.isclose(float(y[0]), 127 * 2.0**-126)


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_non_finite_zero_points_are_rejected(bad):
    _, planes, scale, _, _ = _problem()
    x = torch.randn(2, 45)
    with pytest.raises(ValueError, match="act_zero_point"):
        E.lowbit_linear(x, planes, scale, 4, 4, K=45, act_scale=torch.tensor([0.1]),
                        act_zero_point=torch.tensor([bad]), act_quant_min=0,
                        act_quant_max=255)  # fmt: skip
    with pytest.raises(ValueError, match="weight_zero_point"):
        E.lowbit_linear(x, planes, scale, 4, 4, K=45,
                        weight_zero_point=torch.tensor([bad] * 6))  # fmt: skip
    with pytest.raises(ValueError, match="zero_point"):
        E.fake_quant(x, torch.tensor([0.1]), torch.tensor([bad]), 0, 255)
