"""The float-activation low-bit GEMM kernel (`_C.lowbit_linear_float_cpu`) against a float64
oracle written from DESIGN.md's equations: the b-bit code q_b of the canonical planes, the
weight `w = fl32((q_b + cz) * s)` with `cz = c_k - z_w` and `s` per output row and group of
`group_size` consecutive columns (`[N, K // group_size]`; one group per row is per-channel),
and `y = x @ w^T` summed in float64. fp32 activations agree within fp32 summation error;
bf16 activations (vdpbf16ps: exact bf16 products, fp32 sums, each group's sum scaled in fp32)
within the same bound, because the oracle takes the same bf16 values of x."""

import functools

import pytest
import torch
from plane_oracle import pack_planes, random_group_weights

from eqkernels import _ext

# 0 portable, 1 AVX2, 2 AVX-512 (mask decode, fp32 FMA), 3 + VBMI/GFNI decode, 4 + BF16
# (vdpbf16ps for bf16 activations).
LEVELS = (0, 1, 2, 3, 4)


def kernel():
    if not _ext.has_kernel("lowbit_linear_float_cpu"):
        pytest.fail("eqkernels._C is built but lacks lowbit_linear_float_cpu")
    return _ext.kernel("lowbit_linear_float_cpu")


@pytest.fixture(autouse=True)
def _needs_ext():
    if not _ext.available():
        pytest.skip("eqkernels._C is not built")


def level_or_skip(level):
    got = _ext.kernel("lowbit_float_cpu_level")(level)
    if got < level:
        pytest.skip(f"this CPU runs the float low-bit GEMM at level {got} < {level}")


def oracle(x, q, s, cz, group_size):
    """float64 x @ w^T with w = fl32((q + cz) * s) (q + cz is exact in fp32)."""
    rep = lambda t: t.repeat_interleave(group_size, dim=1)  # noqa: E731
    w = ((q.to(torch.float32) + rep(cz)) * rep(s)).to(torch.float64)
    return x.to(torch.float64) @ w.T


def fp32_bound(x, q, s, cz, group_size):
    """A bound on fp32 summation error of sum_k x*w: K * 2^-23 * sum_k |x w| (a loose but
    standard worst case; reordered sums stay inside it)."""
    rep = lambda t: t.repeat_interleave(group_size, dim=1)  # noqa: E731
    w = ((q.to(torch.float32) + rep(cz)) * rep(s)).to(torch.float64)
    K = q.shape[1]
    return (x.to(torch.float64).abs() @ w.abs().T) * (K * 2.0**-23) + 1e-30


def make_case(M, N, K, bits, group_size, compensated, zero_point, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (N, K), generator=g, dtype=torch.int64)
    G = K // group_size
    s = torch.rand(N, G, generator=g) * 0.1 + 0.01
    # c_k = (1 - 2^-k) / 2 of a nested b-bit weight cut from an 8-bit top width
    c = 0.5 * (1 - 2.0 ** -(8 - bits)) if compensated else 0.0
    cz = torch.full((N, G), c)
    if zero_point:
        cz = cz - torch.randint(-3, 4, (N, G), generator=g).to(torch.float32)
    x = torch.randn(M, K, generator=g)
    return x, q, pack_planes(q, bits), s, cz


CASES = [  # M, N, K, group_size
    (1, 17, 97, 97),  # per-channel, K not a multiple of 32, odd N
    (3, 33, 256, 32),  # per-group, g = 32
    (5, 20, 512, 128),
    (70, 9, 320, 64),  # more activation rows than one row block
    (2, 6, 4160, 64),  # K spans several panels
    (4, 5, 4100, 4100),  # per-channel over several panels, K % 32 != 0
]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}N{}K{}g{}".format(*c))
def test_fp32_activations_match_float64_oracle(level, bits, case):
    level_or_skip(level)
    M, N, K, gs = case
    x, q, planes, s, cz = make_case(M, N, K, bits, gs, compensated=bits < 8, zero_point=bits == 8)
    y = kernel()(x, planes, bits, K, s, cz, gs, level)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    ref = oracle(x, q, s, cz, gs)
    err = (y.to(torch.float64) - ref).abs()
    assert torch.all(err <= fp32_bound(x, q, s, cz, gs)), err.max()


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("bits", [2, 4, 7])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}N{}K{}g{}".format(*c))
def test_bf16_activations_match_float64_oracle(level, bits, case):
    level_or_skip(level)
    M, N, K, gs = case
    x, q, planes, s, cz = make_case(M, N, K, bits, gs, compensated=True, zero_point=False, seed=1)
    xb = x.to(torch.bfloat16)
    y = kernel()(xb, planes, bits, K, s, cz, gs, level)
    ref = oracle(xb, q, s, cz, gs)
    err = (y.to(torch.float64) - ref).abs()
    assert torch.all(err <= fp32_bound(xb, q, s, cz, gs)), err.max()


# From 16 activation rows (AVX-512): outer-product panels of 32 weight rows (the last one
# partial here) over several panels of columns (2048 fp32, 4096 bf16).
OUTER_CASES = [(19, 40, 4160, 64), (16, 33, 4100, 4100)]  # per-group; per-channel, K % 32 != 0


@functools.cache
def outer_case(case, bits):
    M, N, K, gs = case
    return make_case(M, N, K, bits, gs, compensated=bits < 8, zero_point=bits == 8, seed=2)


@pytest.mark.parametrize("level", (2, 3, 4))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bits", [2, 4, 7])
@pytest.mark.parametrize("case", OUTER_CASES, ids=lambda c: "M{}N{}K{}g{}".format(*c))
def test_outer_panels_match_float64_oracle(level, dtype, bits, case):
    level_or_skip(level)
    gs = case[3]
    x, q, planes, s, cz = outer_case(case, bits)
    x = x.to(dtype)
    y = kernel()(x, planes, bits, case[2], s, cz, gs, level)
    err = (y.to(torch.float64) - oracle(x, q, s, cz, gs)).abs()
    assert torch.all(err <= fp32_bound(x, q, s, cz, gs)), err.max()


# bf16 activations at level 4 with b <= 4 run on the weight codes (a constant bf16 table, the
# (c - z) term from per-group activation sums): in registers up to 7 rows, on outer panels from
# 8 to 63 rows. Every group layout: 32 / 64 / 96 columns (per-lane scales, 96 also straddling
# 128-column blocks), 128 / 256 (whole blocks), per-channel with K % 32 != 0 and K % 128 != 0,
# several 4096-column outer panels; partial 32-row panels; every register tile height (1-7).
CODES_CASES = [  # M, N, K, group_size
    (1, 19, 1248, 32),  # K % 128 == 96: a partial last block
    (2, 7, 1536, 64),
    (3, 9, 1248, 96),
    (4, 33, 1536, 128),
    (5, 6, 1536, 256),
    (6, 5, 4100, 4100),
    (7, 18, 97, 97),
    (8, 40, 1248, 32),
    (13, 33, 4608, 64),  # two outer panels of columns
    (21, 7, 1152, 96),
    (30, 35, 4100, 4100),
    (63, 9, 512, 128),
]


@functools.cache
def codes_case(case, bits, variant):
    M, N, K, gs = case
    zero_point, compensated = variant == "zero_point", variant != "uncompensated"
    return make_case(M, N, K, bits, gs, compensated, zero_point, seed=4)


@pytest.mark.parametrize("variant", ["compensated", "zero_point", "uncompensated"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("case", CODES_CASES, ids=lambda c: "M{}N{}K{}g{}".format(*c))
def test_bf16_code_kernels_match_float64_oracle(case, bits, variant):
    level_or_skip(4)
    K, gs = case[2:]
    x, q, planes, s, cz = codes_case(case, bits, variant)
    xb = x.to(torch.bfloat16)
    y = kernel()(xb, planes, bits, K, s, cz, gs, 4)
    err = (y.to(torch.float64) - oracle(xb, q, s, cz, gs)).abs()
    assert torch.all(err <= fp32_bound(xb, q, s, cz, gs)), err.max()


@pytest.mark.parametrize("M", [3, 12])  # registers, outer panels
def test_bf16_code_kernels_keep_nan_rows(M):
    x, _q, planes, s, cz = make_case(M, 37, 640, 4, 32, compensated=True, zero_point=True)
    x[1, 77] = float("nan")
    y = kernel()(x.to(torch.bfloat16), planes, 4, 640, s, cz, 32, -1)
    assert torch.isnan(y[1]).all() and not torch.isnan(y[[0, *range(2, M)]]).any()


def test_planes_beyond_bits_are_not_read():
    """A b-bit call reads only the first b planes (a file prefix): garbage after them changes
    nothing."""
    x, _q, planes, s, cz = make_case(2, 8, 128, 3, 32, compensated=True, zero_point=False)
    extra = torch.randint(-(2**31), 2**31 - 1, (2, 8, 4), dtype=torch.int32)
    f = kernel()
    assert torch.equal(f(x, planes, 3, 128, s, cz, 32, -1),
                       f(x, torch.cat([planes, extra]), 3, 128, s, cz, 32, -1))  # fmt: skip


@pytest.mark.parametrize("M", [3, 9, 20])  # registers, dot-product / outer-product panels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_results_do_not_depend_on_thread_count(M, dtype):
    x, _q, planes, s, cz = make_case(M, 300, 640, 4, 64, compensated=True, zero_point=False)
    x = x.to(dtype)
    f = kernel()
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = f(x, planes, 4, 640, s, cz, 64, -1)
        torch.set_num_threads(2)
        two = f(x, planes, 4, 640, s, cz, 64, -1)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


def test_nan_activation_is_not_hidden():
    x, _q, planes, s, cz = make_case(2, 4, 64, 2, 32, compensated=True, zero_point=False)
    x[1, 5] = float("nan")
    y = kernel()(x, planes, 2, 64, s, cz, 32, -1)
    assert torch.isnan(y[1]).all() and not torch.isnan(y[0]).any()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(group_size=48), "group_size must divide K"),
        (dict(group_size=16), "group_size must be a multiple of 32"),
        (dict(bits=5), "bits must be in 1..4"),
        (dict(K=200), "words per row"),
        (dict(scale=torch.ones(8, 3)), "scale and cz must be"),
    ],
)
def test_bad_arguments_raise_clear_errors(change, message):
    x, _q, planes, s, cz = make_case(2, 8, 128, 4, 32, compensated=True, zero_point=False)
    args = dict(x=x, planes=planes, bits=4, K=128, scale=s, cz=cz, group_size=32)
    args.update(change)
    if "K" in change:
        args["x"] = torch.randn(2, change["K"])
    with pytest.raises(RuntimeError, match=message):
        kernel()(*args.values(), -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("M", [1, 3, 40])
def test_public_lowbit_linear_float_path_matches_float64_oracle(dtype, zero_point, M):
    """`eqkernels.lowbit_linear` with float activations on the cpp backend runs this kernel:
    `y = x @ ((floor(q_n / 2^k) + c_k - z_w) * 2^k s)^T + bias` from a 6-bit top width read at
    4 bits, per-channel scale, optional integer weight zero point (then c_k is still applied)."""
    import eqkernels as E

    g = torch.Generator().manual_seed(3)
    N, K, n, b = 12, 200, 6, 4
    q = torch.randint(-(2 ** (n - 1)), 2 ** (n - 1), (N, K), generator=g)
    planes = pack_planes(q, n)
    scale = torch.rand(N, generator=g) * 0.05 + 0.01
    bias = torch.randn(N, generator=g)
    zw = torch.randint(-3, 4, (N,), generator=g).to(torch.float32) if zero_point else None
    x = torch.randn(2, M, K, generator=g).to(dtype)
    y = E.lowbit_linear(x, planes, scale, b, n, K=K, bias=bias, weight_zero_point=zw, backend="cpp")
    k = n - b
    w = torch.floor(q.to(torch.float64) / 2**k) + 0.5 * (1 - 2.0**-k)
    if zw is not None:
        w = w - zw.to(torch.float64).reshape(-1, 1)
    w = w * (2.0**k * scale.to(torch.float32).to(torch.float64).reshape(-1, 1))
    xd = x.to(torch.float64)
    ref = xd @ w.T + bias.to(torch.float64)
    bound = (xd.abs() @ w.abs().T) * (K * 2.0**-23) + bias.abs().to(torch.float64) * 2.0**-23
    if dtype == torch.bfloat16:  # the fp32 result rounded once to bf16
        bound = bound + ref.abs() * 2.0**-8
    assert y.dtype == dtype and y.shape == (2, M, N)
    assert torch.all((y.to(torch.float64) - ref).abs() <= bound)


def group_case(seed, N=10, K=256, n=4, b=3, g=64, zero_point=None):
    gen = torch.Generator().manual_seed(seed)
    q, scale, zw = random_group_weights(gen, N, K, n, g, zero_point)
    return q, pack_planes(q, n), scale, zw


def group_oracle(x, q, n, b, scale, zw, g, bias=None):
    """float64 y = x @ ((floor(q_n / 2^k) + c_k - z) * 2^k s)^T with s, z repeated over each
    group of g columns."""
    k = n - b
    w = torch.floor(q.to(torch.float64) / 2**k) + 0.5 * (1 - 2.0**-k)
    if zw is not None:
        z = zw.to(torch.float64)
        w = w - (z.repeat_interleave(g, dim=1) if z.dim() == 2 else z.reshape(-1, 1))
    w = w * (2.0**k * scale.to(torch.float64)).repeat_interleave(g, dim=1)
    y = x.to(torch.float64) @ w.T
    bound = (x.to(torch.float64).abs() @ w.abs().T) * (q.shape[1] * 2.0**-23)
    if bias is not None:
        y = y + bias.to(torch.float64)
        bound = bound + bias.abs().to(torch.float64) * 2.0**-23
    return y, bound


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("g", [32, 64, 256])
@pytest.mark.parametrize("zero_point", [None, "group", "channel"])
def test_public_lowbit_linear_per_group_scales(backend, dtype, g, zero_point):
    import eqkernels as E

    q, planes, scale, zw = group_case(g + len(str(zero_point)), g=g, zero_point=zero_point)
    bias = torch.randn(10)
    x = torch.randn(7, 256).to(dtype)
    kw = dict(K=256, bias=bias, weight_zero_point=zw, backend=backend, group_size=g)
    y = E.lowbit_linear(x, planes, scale, 3, 4, **kw)
    ref, bound = group_oracle(x, q, 4, 3, scale, zw, g, bias)
    if dtype == torch.bfloat16:
        bound = bound + ref.abs() * 2.0**-8
    assert y.dtype == dtype and y.shape == (7, 10)
    assert torch.all((y.to(torch.float64) - ref).abs() <= bound)
    prepared = E.prepare_linear(planes, scale, 3, 4, **kw)
    assert prepared.group_size == g and torch.equal(prepared(x), y)


def test_per_group_opcheck():
    _q, planes, scale, zw = group_case(5, g=32, zero_point="group")
    x = torch.randn(3, 256)
    args = (x, planes, scale, 3, 4, 256, True, None, zw, None, None, None, None, "cpp", 32)
    torch.library.opcheck(torch.ops.eqk.lowbit_linear.default, args)


def test_per_group_bad_arguments():
    import eqkernels as E

    _q, planes, scale, _zw = group_case(6, g=64)
    x = torch.randn(2, 256)
    for g in (48, 16, 96, 0, True):
        with pytest.raises(ValueError, match="group_size="):
            E.lowbit_linear(x, planes, scale, 3, 4, K=256, group_size=g)
    with pytest.raises(ValueError, match=r"scale: expected a float tensor of shape \[N=10, K/gr"):
        E.lowbit_linear(x, planes, scale, 3, 4, K=256, group_size=32)
    with pytest.raises(ValueError, match="scale: expected a float tensor of shape"):
        E.lowbit_conv2d(
            torch.randn(1, 256, 1, 1), planes, scale, 3, 4, in_channels=256, kernel_size=1
        )
    with pytest.raises(ValueError, match="group_size=48: accepted values are None or a multiple"):
        E.lowbit_conv2d(torch.randn(1, 256, 1, 1), planes, scale, 3, 4, in_channels=256,
                        kernel_size=1, group_size=48)  # fmt: skip
