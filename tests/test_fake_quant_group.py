"""Per-group fake quantization (group_size=g) against an independent float64 oracle.

The oracle works on x viewed [N, K // g, g] with the parameters broadcast over the last dim,
straight from DESIGN.md "Quantization math": v = fl32(x * fl32(1/s)) (the one fp32 quantity),
rounding half to even, clamping, dequantization and the LSQ / LSQ+ gradient terms in float64,
each group's terms summed over its g elements, grad_factor = 1/sqrt(g * max(qmax, 1)).
Forwards must match bit for bit on every backend ("ref", "torch", "cpp", "triton" on CPU under
TRITON_INTERPRET=1, and cuda through the `device` fixture); gradient sums within the fp32
summation bound (g + 4) * 2^-24 * grad_factor * sum|terms| of the group.
"""

import math

import pytest
import torch
from conftest import on, requires_cpp

import eqkernels
from eqkernels import fake_quant, fake_quant_layered, fake_quant_layered_ref, fake_quant_ref, qrange

BACKENDS = [
    "ref",
    "torch",
    pytest.param("cpp", marks=requires_cpp),
    pytest.param("triton", marks=pytest.mark.triton),
]
NAN = float("nan")

# (x shape, group size): a linear weight, a conv weight [Cout, Cin/groups, kh, kw] (K = 18),
# an odd K = 15 with g = 5 and g = 3, one group per row (g = K) and g = 1.
SHAPES = [
    pytest.param((4, 12), 4, id="linear-g4"),
    pytest.param((3, 2, 3, 3), 6, id="conv-g6"),
    pytest.param((3, 15), 5, id="oddK-g5"),
    pytest.param((2, 15), 3, id="oddK-g3"),
    pytest.param((3, 8), 8, id="g=K"),
    pytest.param((2, 5), 1, id="g1"),
]


def _groups(t, g):
    """[N, ...] -> [N, K // g, g] (row-major: group j of row n is x[n, j*g:(j+1)*g])."""
    return t.reshape(t.shape[0], -1, g)


def oracle(x, scale, zero_point, qmin, qmax, g, dy=None):
    xg = _groups(x.float().double(), g)
    inv = (1.0 / scale.float().double()).float().double().unsqueeze(-1)  # fl32(1/s)
    v = (xg * inv).float().double()  # fl32(x * fl32(1/s))
    s = scale.float().double().unsqueeze(-1)
    zr = torch.round(zero_point.double()).unsqueeze(-1) if zero_point is not None else 0 * s
    nan = torch.isnan(v)
    r = torch.round(torch.nan_to_num(v, nan=0.0))
    u = r + zr
    q = torch.clamp(u, qmin, qmax)
    y = torch.where(nan, NAN, ((q - zr) * s).float().double()).float().to(x.dtype)
    y = y.reshape(x.shape)
    if dy is None:
        return y
    gf = 1.0 / math.sqrt(g * max(qmax, 1))
    dyg = _groups(dy.double(), g)
    inside = (u >= qmin) & (u <= qmax) & ~nan
    dx = torch.where(nan, NAN, torch.where(inside, dyg, 0.0)).reshape(x.shape)
    te = torch.where(nan, NAN, dyg * torch.where(inside, r - v, q - zr))
    ze = torch.where(nan, NAN, dyg * torch.where(inside, 0.0, -s))
    return y, dx, gf * te.sum(-1), gf * ze.sum(-1), (te, ze, gf)


def oracle_layered(x, scale, bits, top_bits, g, compensate, dy):
    xg = _groups(x.float().double(), g)
    inv = (1.0 / scale.float().double()).float().double().unsqueeze(-1)
    v = (xg * inv).float().double()
    s = scale.double().unsqueeze(-1)
    lo, hi = -(2 ** (top_bits - 1)), 2 ** (top_bits - 1) - 1
    r = torch.round(v)
    k = top_bits - bits
    q_b = torch.bitwise_right_shift(torch.clamp(r, lo, hi).long(), k).double()
    c = (1.0 - 2.0**-k) / 2.0 if compensate else 0.0
    a = (2.0**k) * (q_b + c)
    y = (a * s).float().reshape(x.shape)
    gf = 1.0 / math.sqrt(g * max(hi, 1))
    dyg = _groups(dy.double(), g)
    inside = (r >= lo) & (r <= hi)
    dx = torch.where(inside, dyg, 0.0).reshape(x.shape)
    te = dyg * torch.where(inside, a - v, a)
    return y, dx, gf * te.sum(-1), te, gf


def assert_group_sums(got, want, terms, gf, g):
    got = got.double()
    bound = (g + 4) * 2.0**-24 * gf * terms.abs().sum(-1) + 1e-35
    assert torch.isnan(got).equal(torch.isnan(want)), (got, want)
    ok = torch.isnan(want) | ((got - want).abs() <= bound)
    assert bool(ok.all()), f"got {got}, want {want}, bound {bound}"


def make_case(shape, g, qmin, qmax, asym):
    """x spread over each group's grid plus codes beyond it; random positive scales per group."""
    n, k = shape[0], math.prod(shape[1:])
    scale = torch.rand(n, k // g) * 0.4 + 0.05
    zp = torch.rand(n, k // g) * (qmax - qmin) * 0.5 + qmin + 0.25 * (qmax - qmin) if asym else None
    zr = torch.round(zp) if asym else torch.zeros(n, k // g)
    codes = torch.rand(n, k // g, g) * (qmax - qmin + 6) + (qmin - 3)
    x = ((codes - zr.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(shape)
    x.view(-1)[:: max(x.numel() // 4, 1)] *= 1e4
    return x, scale, zp


def run_fq(backend, x, scale, zp, qmin, qmax, g, device):
    x, scale, zp = on(device, x, scale, zp)
    if backend == "ref":
        y = fake_quant_ref(x, scale, zp, qmin, qmax, axis=0, group_size=g)
    else:
        y = fake_quant(x, scale, zp, qmin, qmax, axis=0, group_size=g, backend=backend)
    assert y.device == x.device and y.shape == x.shape
    return y.cpu()


def run_layered(backend, x, scale, bits, top_bits, g, compensate, device):
    x, scale = on(device, x, scale)
    kw = {"axis": 0, "group_size": g, "compensate": compensate}
    if backend == "ref":
        y = fake_quant_layered_ref(x, scale, bits, top_bits, **kw)
    else:
        y = fake_quant_layered(x, scale, bits, top_bits, backend=backend, **kw)
    return y.cpu()


def assert_same(got, want):
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,g", SHAPES)
@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
def test_forward_and_gradients_match_oracle(backend, shape, g, asym, device):
    for bits, signed in ((2, True), (4, False), (8, True)):
        qmin, qmax = qrange(bits, signed)
        x, scale, zp = make_case(shape, g, qmin, qmax, asym)
        dy = torch.randn(shape)
        xl, sl = x.clone().requires_grad_(), scale.clone().requires_grad_()
        zl = zp.clone().requires_grad_() if asym else None
        y = run_fq(backend, xl, sl, zl, qmin, qmax, g, device)
        y.backward(dy)
        want_y, want_dx, want_ds, want_dz, (te, ze, gf) = oracle(x, scale, zp, qmin, qmax, g, dy)
        assert_same(y, want_y)
        assert_same(xl.grad.double(), want_dx)
        assert sl.grad.shape == scale.shape
        assert_group_sums(sl.grad, want_ds, te, gf, g)
        if asym:
            assert_group_sums(zl.grad, want_dz, ze, gf, g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_round_half_to_even_per_group(backend, device):
    # power-of-two scales: x * fl32(1/s) lands exactly on k + 0.5
    scale = torch.tensor([[0.5, 0.25], [2.0, 1.0]])
    halves = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5])
    x = (halves.repeat(2, 2).reshape(2, 2, 6) * scale.unsqueeze(-1)).reshape(2, 12)
    y = run_fq(backend, x, scale, None, -8, 7, 6, device)
    codes = torch.tensor([0.0, 2.0, 2.0, -0.0, -2.0, -2.0])
    assert_same(y, (codes * scale.unsqueeze(-1)).reshape(2, 12))
    assert_same(y, oracle(x, scale, None, -8, 7, 6))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_poisons_its_group_only(backend, device):
    x, scale, zp = make_case((2, 12), 4, 0, 15, asym=True)
    x[1, 5] = NAN  # row 1, group 1
    xl, sl, zl = (t.clone().requires_grad_() for t in (x, scale, zp))
    y = run_fq(backend, xl, sl, zl, 0, 15, 4, device)
    y.sum().backward()
    assert torch.isnan(y).nonzero().tolist() == [[1, 5]]
    assert torch.isnan(xl.grad).nonzero().tolist() == [[1, 5]]
    assert torch.isnan(sl.grad).nonzero().tolist() == [[1, 1]]
    assert torch.isnan(zl.grad).nonzero().tolist() == [[1, 1]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_equals_contiguous(backend, device):
    x, scale, _ = make_case((12, 6), 3, -8, 7, asym=False)
    xt = x.t()  # [6, 12], non-contiguous
    assert not xt.is_contiguous()
    scale = torch.rand(6, 4) * 0.3 + 0.05
    a, sa = xt.clone().requires_grad_(), scale.clone().requires_grad_()
    b, sb = xt.contiguous().requires_grad_(), scale.clone().requires_grad_()
    ya = run_fq(backend, a, sa, None, -8, 7, 3, device)
    yb = run_fq(backend, b, sb, None, -8, 7, 3, device)
    ya.sum().backward()
    yb.sum().backward()
    assert_same(ya, yb)
    assert_same(sa.grad, sb.grad)
    assert_same(ya, oracle(xt, scale, None, -8, 7, 3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compensate", [True, False])
def test_layered_one_top_width_scale_per_group(backend, compensate, device):
    shape, g = (3, 2, 2, 3), 4  # a conv weight, K = 12
    scale = torch.rand(3, 3) * 0.05 + 0.01
    x = torch.randn(shape) * 0.3
    dy = torch.randn(shape)
    for bits in (2, 3, 6):
        xl, sl = x.clone().requires_grad_(), scale.clone().requires_grad_()
        y = run_layered(backend, xl, sl, bits, 6, g, compensate, device)
        y.backward(dy)
        want_y, want_dx, want_ds, te, gf = oracle_layered(x, scale, bits, 6, g, compensate, dy)
        assert_same(y, want_y)
        assert_same(xl.grad.double(), want_dx)
        assert_group_sums(sl.grad, want_ds, te, gf, g)


def test_quantize_codes_per_group():
    x, scale, zp = make_case((3, 10), 5, -8, 7, asym=True)
    x[0, 0] = NAN
    for z in (None, zp):
        got = eqkernels.quantize_codes(x, scale, z, -8, 7, axis=0, group_size=5)
        xg = _groups(x.double(), 5)
        v = (xg * (1.0 / scale.double()).float().double().unsqueeze(-1)).float().double()
        zr = torch.round(z.double()).unsqueeze(-1) if z is not None else 0.0
        want = torch.clamp(torch.round(v) + zr, -8, 7).reshape(x.shape)
        assert got.dtype == torch.float32 and got.shape == x.shape
        assert_same(got.double(), want)


@pytest.mark.parametrize(
    "fn", [fake_quant, fake_quant_ref, fake_quant_layered, fake_quant_layered_ref]
)
def test_bad_group_arguments_name_the_argument(fn):
    layered = fn in (fake_quant_layered, fake_quant_layered_ref)

    def call(x, scale, **kw):
        kw.setdefault("axis", 0)
        if layered:
            return fn(x, scale, 2, 4, **kw)
        return fn(x, scale, None, -8, 7, **kw)

    x, s = torch.randn(4, 15), torch.ones(4, 3)
    cases = [
        (
            {"group_size": 4},
            r"group_size=4: accepted values are the divisors of K=15 .*\[1, 3, 5, 15\]",
        ),
        ({"group_size": 0}, r"group_size=0: accepted are None or a positive integer"),
        ({"group_size": True}, r"group_size=True: accepted"),
        ({"group_size": 5, "axis": None}, r"axis=None: with group_size the accepted value is 0"),
        ({"group_size": 5, "axis": 1}, r"axis=1: with group_size the accepted value is 0"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            call(x, s, **kw)
    with pytest.raises(
        ValueError, match=r"scale has shape \(4, 5\): group_size=5 accepts .*\[4, 3\]"
    ):
        call(x, torch.ones(4, 5), group_size=5)
    with pytest.raises(ValueError, match=r"group_size accepts x of shape \[N, K\]"):
        call(torch.randn(15), torch.ones(3), group_size=5)
    with pytest.raises(ValueError, match=r"scale has values <= 0"):
        call(x, -torch.ones(4, 3), group_size=5)
    if not layered:
        with pytest.raises(ValueError, match=r"zero_point has shape \(4,\)"):
            fn(x, s, torch.zeros(4), -8, 7, axis=0, group_size=5)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=requires_cpp)])
def test_opcheck_the_per_group_calls(backend):
    # The per-group op calls are the per-channel ops on x viewed [N*K/g, g] with
    # grad_factor = 1/sqrt(g * qmax): check those exact calls.
    x = torch.randn(3, 12).reshape(-1, 4).requires_grad_()
    s = (torch.rand(9) + 0.1).requires_grad_()
    z = (torch.rand(9) * 4).requires_grad_()
    gf = 1.0 / math.sqrt(4 * 15)
    ops = torch.ops.eqk
    torch.library.opcheck(ops.fake_quant.default, (x, s, z, 0, 15, 0, gf, backend))
    gl = 1.0 / math.sqrt(4 * 31)
    torch.library.opcheck(ops.fake_quant_layered.default, (x, s, 3, 6, 0, True, gl, backend))


def test_torch_compile_fullgraph_per_group_matches_eager():
    torch._dynamo.reset()

    def f(w, s, z, bits):
        lo, hi = qrange(bits, False)
        return fake_quant(w, s, z, lo, hi, axis=0, group_size=4)

    w = (torch.randn(6, 8) * 0.3).requires_grad_()
    s = torch.full((6, 2), 0.05, requires_grad=True)
    z = torch.full((6, 2), 7.0, requires_grad=True)
    out = torch.compile(f, fullgraph=True, dynamic=False)(w, s, z, 4)
    out.square().sum().backward()
    got = [t.grad.clone() for t in (w, s, z)]
    for t in (w, s, z):
        t.grad = None
    ref = f(w, s, z, 4)
    ref.square().sum().backward()
    assert_same(out, ref)
    for g_c, t in zip(got, (w, s, z), strict=True):
        torch.testing.assert_close(g_c, t.grad, rtol=1e-6, atol=1e-7)
