"""Integer-activation lowbit_linear with per-group weight scales against a float64 oracle
written from the equation: the weight of group `j` (columns j*g .. (j+1)*g - 1) of row `n` is
`(floor(q_n / 2^k) + c_k - z_w[n, j]) * 2^k s[n, j]`, the activation `(xq - z_a) * s_a` with
`xq` computed as fake_quant's forward (`fl32(x * fl32(1/s_a))`, round half to even, + round(z),
clamp), and `y = sum_k x_k w_k + bias` summed in float64. The op sums each group's integers
exactly and meets the groups in float64, so it agrees up to its final cast to fp32."""

import pytest
import torch
import torch.nn.functional as F
from conftest import LOWBIT_BACKENDS, LOWBIT_ISAS, call_on, lowbit_backend, need_kernel
from plane_oracle import nested_weights, random_group_weights
from plane_oracle import pack_planes as pack

import eqkernels as E
from eqkernels.backend import force_cpu_isa

ISAS = LOWBIT_ISAS
BACKENDS = LOWBIT_BACKENDS


def run_on(backend):
    return lowbit_backend(
        backend, "lowbit_linear_group_int_cpu", ("lowbit_gemm_int_cuda", "unpack_bitplanes_cuda")
    )


def oracle(x, q, n, b, scale, zw, g, compensate, s_a, z_a, qmin, qmax, bias):
    """(float64 y, float64 sum of |terms|) from the equations in the module docstring."""
    w = nested_weights(q, n, b, scale, zw, g, compensate)
    inv = torch.tensor(1.0, dtype=torch.float32) / s_a.reshape(()).to(torch.float32)
    v = (x.to(torch.float32) * inv).to(torch.float64)
    zr = torch.round(z_a.reshape(()).to(torch.float64)) if z_a is not None else 0.0
    xd = (torch.clamp(torch.round(v) + zr, qmin, qmax) - zr) * s_a.to(torch.float64)
    y, mag = xd @ w.T, xd.abs() @ w.abs().T
    if bias is not None:
        y, mag = y + bias.to(torch.float64), mag + bias.to(torch.float64).abs()
    return y, mag


def case(seed, N, K, n, g, zero_point):
    gen = torch.Generator().manual_seed(seed)
    q, scale, zw = random_group_weights(gen, N, K, n, g, zero_point)
    x = torch.randn(5, K, generator=gen) * 3
    return q, scale, zw, x


def assert_matches(y, ref, mag):
    # fp32 rounding of the float64 result, plus float64 summation error of the epilogue.
    err = (y.to(torch.float64) - ref).abs()
    bound = ref.abs() * 2.0**-23 + mag * 1e-12
    assert torch.all(err <= bound), float((err / bound).max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", [(-128, 127), (0, 255), (0, 15)])
@pytest.mark.parametrize("g,n,b", [(32, 4, 2), (64, 8, 8), (160, 3, 3)])
@pytest.mark.parametrize("zero_point", [None, "group", "channel"])
def test_per_group_integer_linear(backend, act, g, n, b, zero_point, device):
    name, ctx = run_on(backend)
    qmin, qmax = act
    N, K = 19, 320
    q, scale, zw, x = case(g * 7 + n + len(str(zero_point)), N, K, n, g, zero_point)
    planes = pack(q, n)
    s_a = torch.tensor([0.05])
    z_a = torch.tensor([3.4 if qmin >= 0 else -2.6])
    bias = torch.randn(N)
    for compensate in (True, False):
        kw = dict(K=K, compensate=compensate, bias=bias, weight_zero_point=zw, group_size=g)
        with ctx():
            y = call_on(device, E.lowbit_linear, x, planes, scale, b, n, backend=name,
                        act_scale=s_a, act_zero_point=z_a, act_quant_min=qmin,
                        act_quant_max=qmax, **kw)  # fmt: skip
        ref, mag = oracle(x, q, n, b, scale, zw, g, compensate, s_a, z_a, qmin, qmax, bias)
        assert y.shape == (5, N) and y.dtype == torch.float32
        assert_matches(y, ref, mag)
        if device.type == "cpu":
            act_q = E.ActQuant(s_a, z_a, qmin, qmax)
            with ctx():
                prepared = E.prepare_linear(planes, scale, b, n, act=act_q, backend=name, **kw)
                assert prepared.group_size == g and torch.equal(prepared(x), y)


@pytest.mark.parametrize("isa", ISAS)
def test_per_group_cpp_independent_of_threads_and_nan_rows(isa):
    need_kernel("lowbit_linear_group_int_cpu")
    q, scale, zw, x = case(3, 37, 256, 4, 32, "group")
    planes = pack(q, 4)
    x = torch.cat([x, x.flip(0)] * 4)  # 40 rows
    x[3, 5] = float("nan")
    kw = dict(K=256, weight_zero_point=zw, group_size=32, backend="cpp")
    act = dict(act_scale=torch.tensor([0.04]), act_quant_min=-8, act_quant_max=7)
    outs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with force_cpu_isa(isa):
                outs.append(E.lowbit_linear(x, planes, scale, 4, 4, **kw, **act))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0, equal_nan=True)
    # Every ISA path runs the same integer sums and the same float64 operation order.
    with force_cpu_isa("portable"):
        portable = E.lowbit_linear(x, planes, scale, 4, 4, **kw, **act)
    torch.testing.assert_close(outs[0], portable, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(outs[0][3]).all() and not torch.isnan(outs[0][[0, 1, 2, 4]]).any()
    ref, mag = oracle(x[:3], q, 4, 4, scale, zw, 32, True, act["act_scale"], None, -8, 7, None)
    assert_matches(outs[0][:3], ref, mag)


def test_per_group_integer_opcheck():
    need_kernel("lowbit_linear_group_int_cpu")
    q, scale, zw, x = case(4, 6, 128, 4, 64, "group")
    args = (x, pack(q, 4), scale, 3, 4, 128, True, None, zw, torch.tensor([0.1]),
            torch.tensor([2.0]), 0, 255, "cpp", 64)  # fmt: skip
    torch.library.opcheck(torch.ops.eqk.lowbit_linear.default, args)


def conv_oracle(x, q, n, b, scale, zw, g, compensate, act, geometry, bias):
    """float64 conv2d with the per-group weight of the flattened input dimension and the
    dequantized codes (the op pads codes with z_a, which is real zero)."""
    _cin, (kh, kw), stride, padding, dilation, groups = geometry
    N = q.shape[0]
    w = nested_weights(q, n, b, scale, zw, g, compensate).view(N, -1, kh, kw)
    if act is None:
        xd = x.to(torch.float64)
    else:
        s_a, z_a, qmin, qmax = act
        inv = torch.tensor(1.0, dtype=torch.float32) / s_a.reshape(()).to(torch.float32)
        v = (x.to(torch.float32) * inv).to(torch.float64)
        zr = torch.round(z_a.reshape(()).to(torch.float64))
        xd = (torch.clamp(torch.round(v) + zr, qmin, qmax) - zr) * s_a.to(torch.float64)
    conv = lambda a, b_: F.conv2d(a, b_, None, stride, padding, dilation, groups)  # noqa: E731
    y, mag = conv(xd, w), conv(xd.abs(), w.abs())
    if bias is not None:
        y = y + bias.to(torch.float64).view(1, -1, 1, 1)
        mag = mag + bias.to(torch.float64).abs().view(1, -1, 1, 1)
    return y, mag


@pytest.mark.parametrize("backend", ["torch", "cpp-avx512gfni", "cpp-portable", "cuda"])
@pytest.mark.parametrize("act", [None, (-128, 127), (0, 255)])
@pytest.mark.parametrize(
    "cin,cout,groups,ks,stride,padding,g",
    [(32, 17, 1, 3, 1, 1, 96), (8, 4, 2, (2, 4), 2, (1, 0), 32), (32, 5, 1, 1, 1, 0, 32)],
)
def test_per_group_conv2d(backend, act, cin, cout, groups, ks, stride, padding, g, device):
    name, ctx = run_on(backend)
    kh, kw = (ks, ks) if isinstance(ks, int) else ks
    K = cin // groups * kh * kw
    n, b = 4, 3
    q, scale, zw, _x = case(K + cin + (act is None), cout, K, n, g, "group")
    planes = pack(q, n)
    x = torch.randn(2, cin, 7, 6) * 2
    bias = torch.randn(cout)
    kw_ = dict(in_channels=cin, kernel_size=ks, stride=stride, padding=padding, groups=groups,
               bias=bias, weight_zero_point=zw, group_size=g, backend=name)  # fmt: skip
    act_kw, act_args = {}, None
    if act is not None:
        s_a, z_a = torch.tensor([0.04]), torch.tensor([5.3 if act[0] >= 0 else -1.6])
        act_kw = dict(act_scale=s_a, act_zero_point=z_a, act_quant_min=act[0],
                      act_quant_max=act[1])  # fmt: skip
        act_args = (s_a, z_a, *act)
    with ctx():
        y = call_on(device, E.lowbit_conv2d, x, planes, scale, b, n, **kw_, **act_kw)
    pair = lambda v: (v, v) if isinstance(v, int) else v  # noqa: E731
    geometry = (cin, (kh, kw), pair(stride), pair(padding), (1, 1), groups)
    ref, mag = conv_oracle(x, q, n, b, scale, zw, g, True, act_args, geometry, bias)
    assert y.shape == ref.shape and y.dtype == torch.float32
    if act is None:  # fp32 convolution: fp32 summation error
        err, bound = (y.double() - ref).abs(), mag * (K * 2.0**-23) + 1e-30
        assert torch.all(err <= bound), float((err / bound).max())
    else:
        assert_matches(y, ref, mag)
    if device.type == "cpu":
        prep_kw = dict(kw_)
        if act is not None:
            prep_kw["act"] = E.ActQuant(*act_args)
        with ctx():
            prepared = E.prepare_conv2d(planes, scale, b, n, **prep_kw)
            assert prepared.group_size == g and torch.equal(prepared(x), y)


def test_per_group_conv2d_nan_reaches_its_receptive_fields_only():
    need_kernel("lowbit_linear_group_int_cpu")
    q, scale, zw, _x = case(11, 4, 64, 4, 32, "group")
    x = torch.randn(1, 16, 5, 5)
    x[0, 3, 0, 0] = float("nan")
    act = dict(act_scale=torch.tensor([0.05]), act_quant_min=0, act_quant_max=255,
               act_zero_point=torch.tensor([7.0]))  # fmt: skip
    kw = dict(in_channels=16, kernel_size=2, weight_zero_point=zw, group_size=32, backend="cpp")
    y = E.lowbit_conv2d(x, pack(q, 4), scale, 4, 4, **kw, **act)
    assert torch.isnan(y[0, :, 0, 0]).all() and not torch.isnan(y[0, :, 1:, :]).any()
    assert not torch.isnan(y[0, :, :, 1:]).any()
    s_a, z_a = act["act_scale"], act["act_zero_point"]
    geometry = (16, (2, 2), (1, 1), (0, 0), (1, 1), 1)
    ref, mag = conv_oracle(x[..., 1:, :], q, 4, 4, scale, zw, 32, True, (s_a, z_a, 0, 255),
                           geometry, None)  # fmt: skip
    assert_matches(y[..., 1:, :], ref, mag)
