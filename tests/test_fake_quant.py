"""fake_quant / fake_quant_layered against an independent float64 oracle, on every backend.

The oracle follows DESIGN.md "Quantization math": v = fl32(x * fl32(1/s)) (the one quantity
computed in fp32, because that is where the forward's rounding is specified), everything else in
float64: rounding half to even, clamping, dequantization (rounded once to fp32, then to the
input dtype), the masks and the gradient sums. The layered oracle drops low bits with an integer
arithmetic shift, not with floor. Forwards must match bit for bit; gradient sums within the
float32 summation error bound (n + 4) * 2^-24 * sum |terms| of the group.

Backends: "ref" (fake_quant_ref), "torch", "cpp" (needs eqkernels._C) and "triton" (run on CPU
tensors under TRITON_INTERPRET=1, set by conftest.py when there is no GPU; cases kept to a few
hundred elements). The op tests also take the `device` fixture: on `cuda` (marked `gpu`, skipped
without a GPU) the inputs are moved to the GPU, the op runs there (Triton compiled), and the
results come back to the CPU for the same float64 oracle.
"""

import math
import os
import subprocess
import sys

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
FAST_BACKENDS = ["ref", "torch", pytest.param("cpp", marks=requires_cpp)]
NAN = float("nan")


# ---------------------------------------------------------------------------------------------
# Oracle (float64, independent of eqkernels)


def _b(p, x, axis):
    """Per-channel parameter as float64, shaped to broadcast against x."""
    p = p.double()
    if axis is None:
        return p.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


def _v(x, scale, axis):
    inv = (1.0 / scale.float().double()).float()  # fl32(1/s): one rounding of the exact quotient
    return (x.float().double() * _b(inv, x, axis)).float().double()  # fl32(x * inv)


def _group_sum(e, axis):
    if axis is None:
        return e.sum().reshape(1)
    return e.sum(dim=[d for d in range(e.dim()) if d != axis])


def oracle_fake_quant(x, scale, zero_point, qmin, qmax, axis, dy=None, grad_factor=None):
    v = _v(x, scale, axis)
    s = _b(scale.float(), x, axis)
    zr = torch.round(_b(zero_point.float(), x, axis)) if zero_point is not None else 0.0 * s
    nan = torch.isnan(v)
    r = torch.round(torch.nan_to_num(v, nan=0.0))  # half to even in float64
    u = r + zr
    q = torch.clamp(u, qmin, qmax)
    y = ((q - zr) * s).float().to(x.dtype)
    y = torch.where(nan, torch.full_like(y, NAN), y)
    if dy is None:
        return y
    n = x.numel() // (1 if axis is None else x.shape[axis])
    g = grad_factor if grad_factor is not None else 1.0 / math.sqrt(n * max(qmax, 1))
    dy = dy.double()
    inside = (u >= qmin) & (u <= qmax) & ~nan
    dx = torch.where(inside, dy, 0.0)
    dx = torch.where(nan, NAN, dx)
    t = torch.where(inside, r - v, q - zr)
    t = torch.where(nan, NAN, t)
    te = dy * t
    ze = dy * torch.where(inside, 0.0, -s)
    ze = torch.where(nan, NAN, ze)
    return y, dx, g * _group_sum(te, axis), g * _group_sum(ze, axis), n, (te, ze, g)


def oracle_layered(x, scale, bits, top_bits, axis, compensate=True, dy=None, grad_factor=None):
    v = _v(x, scale, axis)
    s = _b(scale.float(), x, axis)
    nan = torch.isnan(v)
    lo, hi = -(2 ** (top_bits - 1)), 2 ** (top_bits - 1) - 1
    r = torch.round(torch.nan_to_num(v, nan=0.0, posinf=1e9, neginf=-1e9))
    q_n = torch.clamp(r, lo, hi).long()
    k = top_bits - bits
    q_b = torch.bitwise_right_shift(q_n, k).double()  # two's complement top `bits` bits
    c = (1.0 - 2.0**-k) / 2.0 if compensate else 0.0
    y = ((q_b + c) * (2.0**k) * s).float().to(x.dtype)
    y = torch.where(nan, torch.full_like(y, NAN), y)
    if dy is None:
        return y
    n = x.numel() // (1 if axis is None else x.shape[axis])
    g = grad_factor if grad_factor is not None else 1.0 / math.sqrt(n * max(hi, 1))
    dy = dy.double()
    inside = (r >= lo) & (r <= hi) & ~nan
    dx = torch.where(nan, NAN, torch.where(inside, dy, 0.0))
    a = (2.0**k) * (q_b + c)
    te = dy * torch.where(nan, NAN, torch.where(inside, a - v, a))
    return y, dx, g * _group_sum(te, axis), n, (te, g)


def assert_sum_close(got, want, terms, g, axis, n):
    """|got - want| <= (n + 4) * 2^-24 * g * sum|terms| per scale group (fp32 summation)."""
    got = got.reshape(-1).double()
    bound = (n + 4) * 2.0**-24 * g * _group_sum(terms.abs(), axis) + 1e-35
    assert torch.isnan(got).equal(torch.isnan(want)), (got, want)
    ok = torch.isnan(want) | ((got - want).abs() <= bound)
    assert bool(ok.all()), f"got {got}, want {want}, bound {bound}"


# ---------------------------------------------------------------------------------------------
# Helpers


def run_fq(backend, x, scale, zero_point, qmin, qmax, axis=None, grad_factor=None, device="cpu"):
    """The op on `device`; the result (and, through the copies, the gradients) on the CPU."""
    x, scale, zero_point = on(device, x, scale, zero_point)
    if backend == "ref":
        y = fake_quant_ref(x, scale, zero_point, qmin, qmax, axis=axis, grad_factor=grad_factor)
    else:
        y = fake_quant(
            x, scale, zero_point, qmin, qmax, axis=axis, grad_factor=grad_factor, backend=backend
        )
    assert y.device == x.device
    return y.cpu()


def run_layered(backend, x, scale, bits, top_bits, axis=None, compensate=True, device="cpu"):
    x, scale = on(device, x, scale)
    if backend == "ref":
        y = fake_quant_layered_ref(x, scale, bits, top_bits, axis=axis, compensate=compensate)
    else:
        y = fake_quant_layered(
            x, scale, bits, top_bits, axis=axis, compensate=compensate, backend=backend
        )
    assert y.device == x.device
    return y.cpu()


def assert_same(got, want):
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def param_shape(x, axis):
    return (1,) if axis is None else (x.shape[axis],)


def make_case(shape, axis, qmin, qmax, asym, far=True):
    """x spread over the grid and a few codes beyond it (per channel), random positive scales."""
    pshape = (1,) if axis is None else (shape[axis],)
    scale = torch.rand(pshape) * 0.4 + 0.05
    zero_point = None
    if asym:
        zero_point = torch.rand(pshape) * (qmax - qmin) * 0.5 + qmin + 0.25 * (qmax - qmin)
    zr = torch.round(zero_point) if asym else torch.zeros(pshape)
    shift = [1] * len(shape)
    if axis is not None:
        shift[axis] = -1
    codes = torch.rand(shape) * (qmax - qmin + 6) + (qmin - 3)
    x = (codes - zr.reshape(shift if axis is not None else ())) * scale.reshape(
        shift if axis is not None else ()
    )
    if far:
        flat = x.view(-1)
        flat[:: max(flat.numel() // 5, 1)] *= 1e4  # far outside the range
    return x, scale, zero_point


FORMS = [
    pytest.param(None, (7, 11), id="tensor"),
    pytest.param(0, (5, 3, 4), id="axis0"),
    pytest.param(1, (3, 4, 5, 2), id="axis1-middle"),
]


# ---------------------------------------------------------------------------------------------
# Forward bit-exactness


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("axis,shape", FORMS)
@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_forward_matches_oracle_every_width(backend, axis, shape, asym, signed, device):
    for bits in range(1, 9):
        qmin, qmax = qrange(bits, signed)
        x, scale, zp = make_case(shape, axis, qmin, qmax, asym)
        y = run_fq(backend, x, scale, zp, qmin, qmax, axis=axis, device=device)
        assert y.dtype == x.dtype and y.shape == x.shape
        assert_same(y, oracle_fake_quant(x, scale, zp, qmin, qmax, axis))


def test_qrange():
    assert [qrange(b, True) for b in (1, 2, 8)] == [(-1, 0), (-2, 1), (-128, 127)]
    assert [qrange(b, False) for b in (1, 2, 8)] == [(0, 1), (0, 3), (0, 255)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_round_half_to_even(backend, device):
    # Power-of-two scale: x / s is exact, so these are exact .5 ties.
    scale = torch.tensor([0.25])
    k = torch.arange(-12, 12, dtype=torch.float32)
    x = (k + 0.5) * 0.25
    y = run_fq(backend, x, scale, None, -8, 7, device=device)
    assert_same(y, oracle_fake_quant(x, scale, None, -8, 7, None))
    codes = (y / 0.25).double()
    expected = torch.clamp(torch.where(torch.remainder(k, 2) == 0, k, k + 1).double(), -8, 7)
    assert torch.equal(codes, expected)  # even neighbour, independently of torch.round


# x · (1/scale) overflows to inf on purpose here; the Triton interpreter runs that product in
# numpy, which warns about it. The clamp must still give finite codes.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_far_out_of_range_and_fp32_overflow(backend, device):
    scale = torch.tensor([1e-3])
    x = torch.tensor([3e38, -3e38, float("inf"), -float("inf"), 1e30, -1e30, 0.0, 2e-3])
    zp = torch.tensor([3.4])
    for z in (None, zp):
        y = run_fq(backend, x, scale, z, 0, 15, device=device)
        assert_same(y, oracle_fake_quant(x, scale, z, 0, 15, None))
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [1, 97, 1025])
def test_odd_sizes(backend, size, device):
    qmin, qmax = qrange(4, True)
    x, scale, zp = make_case((size,), None, qmin, qmax, asym=True)
    assert_same(
        run_fq(backend, x, scale, zp, qmin, qmax, device=device),
        oracle_fake_quant(x, scale, zp, qmin, qmax, None),
    )
    x2, s2, _ = make_case((3, size), 0, qmin, qmax, asym=False)
    assert_same(
        run_fq(backend, x2, s2, None, qmin, qmax, axis=0, device=device),
        oracle_fake_quant(x2, s2, None, qmin, qmax, 0),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_equals_contiguous(backend, device):
    qmin, qmax = qrange(3, False)
    base, scale, zp = make_case((6, 5, 8), 1, qmin, qmax, asym=True)
    x = base.to(device).transpose(0, 2)[::2]  # [4, 5, 6], strided on the device; channel axis 1
    assert not x.is_contiguous()
    y = run_fq(backend, x, scale, zp, qmin, qmax, axis=1, device=device)
    assert_same(y, run_fq(backend, x.contiguous(), scale, zp, qmin, qmax, axis=1, device=device))
    assert_same(y, oracle_fake_quant(x.cpu(), scale, zp, qmin, qmax, 1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes(backend, dtype, device):
    qmin, qmax = qrange(8, False)
    x, scale, zp = make_case((4, 30), 0, qmin, qmax, asym=True, far=False)
    x = x.to(dtype)
    dy = torch.randn(x.shape).to(dtype)
    xg, sg, zg = (t.clone().requires_grad_() for t in (x, scale, zp))
    y = run_fq(backend, xg, sg, zg, qmin, qmax, axis=0, device=device)
    y.backward(dy)
    want, dx, ds, dz, n, (te, ze, g) = oracle_fake_quant(x, scale, zp, qmin, qmax, 0, dy=dy)
    assert y.dtype == dtype and xg.grad.dtype == dtype
    assert sg.grad.dtype == torch.float32 and zg.grad.dtype == torch.float32
    assert_same(y, want)
    assert_same(xg.grad, dx.to(dtype))
    assert_sum_close(sg.grad, ds, te, g, 0, n)
    assert_sum_close(zg.grad, dz, ze, g, 0, n)


# ---------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("axis,shape", FORMS)
@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
def test_gradients_match_oracle(backend, axis, shape, asym, device):
    for bits, signed in ((2, True), (4, False), (8, True)):
        qmin, qmax = qrange(bits, signed)
        x, scale, zp = make_case(shape, axis, qmin, qmax, asym)
        dy = torch.randn(shape)
        leaves = [x.clone().requires_grad_(), scale.clone().requires_grad_()]
        if asym:
            leaves.append(zp.clone().requires_grad_())
        y = run_fq(
            backend, leaves[0], leaves[1], leaves[2] if asym else None, qmin, qmax, axis,
            device=device,
        )  # fmt: skip
        y.backward(dy)
        _, dx, ds, dz, n, (te, ze, g) = oracle_fake_quant(x, scale, zp, qmin, qmax, axis, dy=dy)
        assert_same(leaves[0].grad, dx.float())
        assert leaves[1].grad.shape == scale.shape
        assert_sum_close(leaves[1].grad, ds, te, g, axis, n)
        if asym:
            assert_sum_close(leaves[2].grad, dz, ze, g, axis, n)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_explicit_grad_factor_and_scalar_scale(backend, device):
    x, scale, zp = make_case((50,), None, 0, 15, asym=True)
    s0, z0 = scale.reshape(()).clone().requires_grad_(), zp.reshape(()).clone().requires_grad_()
    dy = torch.randn(50)
    run_fq(backend, x, s0, z0, 0, 15, grad_factor=0.5, device=device).backward(dy)
    _, _, ds, dz, n, (te, ze, g) = oracle_fake_quant(x, scale, zp, 0, 15, None, dy, 0.5)
    assert s0.grad.shape == () and z0.grad.shape == ()
    assert_sum_close(s0.grad, ds, te, g, None, n)
    assert_sum_close(z0.grad, dz, ze, g, None, n)


# ---------------------------------------------------------------------------------------------
# Layered (nested) quantizer


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("axis,shape", FORMS[:2])
@pytest.mark.parametrize("compensate", [True, False])
def test_layered_forward_and_gradients(backend, axis, shape, compensate, device):
    for top_bits in (4, 8):
        lo, hi = qrange(top_bits, True)
        x, scale, _ = make_case(shape, axis, lo, hi, asym=False)
        dy = torch.randn(shape)
        # Every width on the fast backends; the interpreter gets the ends and one middle.
        interpreted = backend == "triton" and device.type == "cpu"
        widths = (1, top_bits // 2, top_bits) if interpreted else range(1, top_bits + 1)
        for bits in widths:
            xg, sg = x.clone().requires_grad_(), scale.clone().requires_grad_()
            y = run_layered(backend, xg, sg, bits, top_bits, axis, compensate, device=device)
            y.backward(dy)
            want, dx, ds, n, (te, g) = oracle_layered(
                x, scale, bits, top_bits, axis, compensate, dy=dy
            )
            assert_same(y, want)
            assert_same(xg.grad, dx.float())
            assert_sum_close(sg.grad, ds, te, g, axis, n)


# ---------------------------------------------------------------------------------------------
# NaN and bad input


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_input_poisons_its_element_and_group_only(backend, device):
    x, scale, zp = make_case((3, 8), 0, 0, 15, asym=True, far=False)
    x[1, 2] = NAN
    xg, sg, zg = (t.clone().requires_grad_() for t in (x, scale, zp))
    y = run_fq(backend, xg, sg, zg, 0, 15, axis=0, device=device)
    y.sum().backward()
    assert torch.isnan(y).nonzero().tolist() == [[1, 2]]
    assert torch.isnan(sg.grad).tolist() == [False, True, False]
    assert torch.isnan(zg.grad).tolist() == [False, True, False]
    assert torch.isnan(xg.grad).nonzero().tolist() == [[1, 2]]
    xl, sl = x.clone().requires_grad_(), scale.clone().requires_grad_()
    yl = run_layered(backend, xl, sl, 2, 4, axis=0, device=device)
    yl.sum().backward()
    assert torch.isnan(yl).nonzero().tolist() == [[1, 2]]
    assert torch.isnan(sl.grad).tolist() == [False, True, False]


@pytest.mark.parametrize("fn", [fake_quant, fake_quant_ref])
def test_bad_input_names_the_argument(fn):
    x, s = torch.randn(4, 3), torch.ones(1)
    cases = [
        (dict(quant_min=5, quant_max=5), "quant_min"),
        (dict(quant_min=7, quant_max=-8), "quant_min"),
        (dict(scale=torch.ones(3), axis=None), "scale"),
        (dict(scale=torch.ones(4), axis=1), "scale"),
        (dict(x=torch.ones(4, 3, dtype=torch.int32)), "x"),
        (dict(axis=2), "axis"),
        (dict(axis=-3), "axis"),
        (dict(scale=torch.tensor([0.0])), "scale"),
        (dict(scale=torch.tensor([-1.0])), "scale"),
        (dict(scale=torch.tensor([NAN])), "scale"),
        (dict(scale=torch.tensor([float("inf")])), "scale"),
        (dict(zero_point=torch.ones(2)), "zero_point"),
        (dict(zero_point=torch.tensor([NAN])), "zero_point"),
    ]
    for override, name in cases:
        kw = dict(x=x, scale=s, zero_point=None, quant_min=-8, quant_max=7, axis=None)
        kw.update(override)
        args = [kw.pop(k) for k in ("x", "scale", "zero_point", "quant_min", "quant_max")]
        with pytest.raises(ValueError, match=name):
            fn(*args, **kw)


@pytest.mark.parametrize("fn", [fake_quant_layered, fake_quant_layered_ref])
def test_layered_bad_input_names_the_argument(fn):
    x, s = torch.randn(4, 3), torch.ones(1)
    for args, name in [
        ((x, s, 0, 8), "bits"),
        ((x, s, 9, 9), "bits"),
        ((x, s, 4, 9), "top_bits"),
        ((x, s, 5, 4), "top_bits"),
        ((x.long(), s, 4, 8), "x"),
        ((x, torch.ones(2), 4, 8), "scale"),
        ((x, torch.tensor([-0.5]), 4, 8), "scale"),
    ]:
        with pytest.raises(ValueError, match=name):
            fn(*args)
    with pytest.raises(ValueError, match="bits"):
        qrange(9, True)


def test_auto_preference_order():
    from eqkernels import _ext
    from eqkernels.ops.fake_quant import resolve_backend

    # CUDA tensors: Triton first (resolved from the device type alone; no GPU is touched).
    assert resolve_backend("auto", torch.device("cuda"), "fake_quant") == "triton"
    # CPU: cpp when built, never the Triton interpreter, else the reference.
    expected = "cpp" if _ext.has_kernel("fake_quant_fwd_cpu") else "torch"
    assert resolve_backend("auto", torch.device("cpu"), "fake_quant") == expected


def test_unknown_or_unavailable_backend():
    x, s = torch.randn(8), torch.ones(1)
    with pytest.raises(ValueError, match="backend"):
        fake_quant(x, s, None, -8, 7, backend="fast")
    with pytest.raises(eqkernels.BackendUnavailable, match="cuda"):
        fake_quant(x, s, None, -8, 7, backend="cuda")


# ---------------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile


def _op_cases(backend):
    """(op, args): forward ops get leaves that require grad, so opcheck checks the autograd
    registration too."""

    def leaf(t):
        return t.clone().requires_grad_()

    x, dy = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    s, z = torch.rand(4) + 0.1, torch.rand(4) * 4
    ops = torch.ops.eqk
    return [
        (ops.fake_quant.default, (leaf(x), leaf(s), leaf(z), 0, 15, 1, 0.3, backend)),
        (ops.fake_quant_backward.default, (dy, x, s, z, 0, 15, 1, 0.3, backend)),
        (ops.fake_quant_layered.default, (leaf(x), leaf(s), 3, 6, 1, True, 0.3, backend)),
        (ops.fake_quant_layered_backward.default, (dy, x, s, 3, 6, 1, True, 0.3, backend)),
    ]


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=requires_cpp)])
def test_opcheck_every_op(backend):
    for op, args in _op_cases(backend):
        torch.library.opcheck(op, args)


@pytest.mark.triton
def test_opcheck_every_op_triton():
    # Only the schema / fake-tensor / autograd-registration checks: the AOT-dispatch check
    # reruns every op several times, which is slow under the interpreter.
    for op, args in _op_cases("triton"):
        torch.library.opcheck(
            op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor")
        )


@pytest.mark.slow
@pytest.mark.triton
def test_opcheck_every_op_triton_full():
    for op, args in _op_cases("triton"):
        torch.library.opcheck(op, args)


class _TinyQuantNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(6, 10) * 0.3)
        self.w_scale = torch.nn.Parameter(torch.full((6,), 0.05))
        self.a_scale = torch.nn.Parameter(torch.tensor([0.1]))
        self.a_zero = torch.nn.Parameter(torch.tensor([3.0]))

    def forward(self, x, bits: int):
        lo, hi = qrange(bits, False)
        xq = fake_quant(x, self.a_scale, self.a_zero, lo, hi)
        wq = fake_quant_layered(self.weight, self.w_scale, bits, 8, axis=0)
        return xq @ wq.t()


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = _TinyQuantNet()
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    x = torch.randn(4, 10)
    for bits in (4,):
        out = compiled(x, bits)
        out.square().sum().backward()
        got = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        ref = model(x, bits)
        ref.square().sum().backward()
        assert_same(out, ref)
        for g_c, p in zip(got, model.parameters()):
            torch.testing.assert_close(g_c, p.grad, rtol=1e-6, atol=1e-7)
        model.zero_grad()


def test_eqk_check_validates_values_inside_compiled_graphs(monkeypatch):
    def f(x, s):
        return fake_quant(x, s, None, -8, 7)

    compiled = torch.compile(f, fullgraph=True, dynamic=False)
    x = torch.randn(8)
    monkeypatch.delenv("EQK_CHECK", raising=False)
    compiled(x, torch.tensor([-1.0]))  # default: no host sync in a compiled graph, no check
    monkeypatch.setenv("EQK_CHECK", "1")
    with pytest.raises(ValueError, match="scale"):
        compiled(x, torch.tensor([-1.0]))


# ---------------------------------------------------------------------------------------------
# C++ kernel: every ISA path, thread-count independence


def _cpp_kernels():
    from eqkernels import _ext

    return (
        _ext.kernel("fake_quant_fwd_cpu"),
        _ext.kernel("fake_quant_bwd_cpu"),
        _ext.kernel("fake_quant_cpu_isa")(),
    )


ISAS = [pytest.param(i, id=n) for i, n in enumerate(["portable", "avx2", "avx512"])]


@requires_cpp
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_every_isa_matches_oracle_and_portable(isa, dtype):
    fwd, bwd, best = _cpp_kernels()
    if isa > best:
        pytest.skip(f"CPU supports ISA level {best} < {isa}")
    # 3 rows of 8192 + 37 elements: full blocks, a partial block and a sub-vector tail.
    x, scale, zp = make_case((1, 3, 8192 + 37), 1, 0, 255, asym=True)
    x = x.to(dtype)
    x.view(-1)[5] = NAN
    dy = torch.randn(x.shape).to(dtype)
    s, inv_s, zr = scale, 1.0 / scale, torch.round(zp)
    y = fwd(x, s, inv_s, zr, 0, 255, 1.0, 1.0, 0.0, isa)
    assert_same(y, oracle_fake_quant(x, scale, zp, 0, 255, 1))
    dx, sum_t, sum_z = bwd(dy, x, s, inv_s, zr, 0, 255, 1.0, 1.0, 0.0, isa, True)
    _, dx_o, ds_o, dz_o, n, (te, ze, _) = oracle_fake_quant(x, scale, zp, 0, 255, 1, dy, 1.0)
    assert_same(dx, dx_o.to(dtype))
    assert_sum_close(sum_t, ds_o, te, 1.0, 1, n)
    assert_sum_close(sum_z, dz_o, ze, 1.0, 1, n)
    # Layered parameters through the same kernel (top 8 bits, keep 3: k = 5).
    y_l = fwd(x, s, inv_s, torch.zeros(3), -128, 127, 2.0**-5, 2.0**5, (1 - 2.0**-5) / 2, isa)
    assert_same(y_l, oracle_layered(x, scale, 3, 8, 1))
    # Every ISA reproduces the portable path bit for bit, gradient sums included.
    ref = bwd(dy, x, s, inv_s, zr, 0, 255, 1.0, 1.0, 0.0, 0, True)
    for got, want in zip((dx, sum_t, sum_z), ref):
        assert_same(got, want)
    # The sums-only mode (a compiled graph computes dx itself): no dx, the same sums.
    no_dx, sum_t2, sum_z2 = bwd(dy, x, s, inv_s, zr, 0, 255, 1.0, 1.0, 0.0, isa, False)
    assert no_dx is None
    assert_same(sum_t2, sum_t)
    assert_same(sum_z2, sum_z)


@requires_cpp
def test_cpp_sums_do_not_depend_on_thread_count():
    _, bwd, _ = _cpp_kernels()
    x, scale, _ = make_case((1, 1, 40 * 8192 + 5), None, -8, 7, asym=False)
    dy = torch.randn(x.shape)
    args = (dy, x, scale, 1.0 / scale, torch.zeros(1), -8, 7, 1.0, 1.0, 0.0, -1, True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = bwd(*args)
        torch.set_num_threads(max(threads, 2))
        many = bwd(*args)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert_same(a, b)


@requires_cpp
def test_cpp_rejects_unsupported_isa():
    fwd, _, _best = _cpp_kernels()
    x, s = torch.randn(1, 1, 4), torch.ones(1)
    with pytest.raises(RuntimeError, match="isa"):
        fwd(x, s, s, torch.zeros(1), -8, 7, 1.0, 1.0, 0.0, 3)
    env = dict(os.environ, EQK_CPU_ISA="portable")
    code = "from eqkernels import _ext; print(_ext.kernel('fake_quant_cpu_isa')())"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "0"  # the EQK_CPU_ISA cap is honoured by the dispatcher


# ---------------------------------------------------------------------------------------------
# Triton: switching width never recompiles


@pytest.mark.triton
def test_triton_width_switch_reuses_one_compiled_variant():
    """Under TRITON_INTERPRET=1 nothing is compiled, so count the distinct cache keys that
    Triton's JIT (JITFunction.run) computes for the launches of widths 2-8, using the kernel's
    own decorator arguments. One key means one compiled variant on a GPU. The same launches
    with specialization allowed give several keys (quant_max = 1, quant_min = -16, ...), which
    shows the count can fail."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature

    from eqkernels.triton import fake_quant as tfq

    def count_keys(kernel, do_not_specialize, make_args):
        jf = JITFunction(kernel.fn, do_not_specialize=do_not_specialize)
        binder = create_function_from_signature(jf.signature, jf.params, BaseBackend)
        keys = set()
        for args in make_args():
            _, spec, options = binder(*args, BLOCK_SIZE=tfq.BLOCK, OUT_BF16=False)
            keys.add(compute_cache_key({}, spec, options))
        return len(keys)

    x = torch.zeros(2, 3, 64)
    p = torch.ones(3)

    def fwd_args():
        for bits in range(2, 9):
            for signed in (True, False):
                lo, hi = qrange(bits, signed)
                yield (x, x, p, p, p, lo, hi, 1.0, 1.0, 0.0, 64, 3, 1)
            k = 8 - bits  # layered, top width 8: the width is in float arguments
            yield (x, x, p, p, p, -128, 127, 2.0**-k, 2.0**k, (1 - 2.0**-k) / 2, 64, 3, 1)

    def bwd_args():
        part = torch.zeros(6)
        for a in fwd_args():
            yield (x, x, x, part, part, *a[2:])

    for kernel, make_args in (
        (tfq.fake_quant_fwd_kernel, fwd_args),
        (tfq.fake_quant_bwd_kernel, bwd_args),
    ):
        decorated = (
            kernel.kwargs["do_not_specialize"]
            if hasattr(kernel, "kwargs")
            else kernel.do_not_specialize
        )
        assert count_keys(kernel, decorated, make_args) == 1
        assert count_keys(kernel, (), make_args) > 1


# ---------------------------------------------------------------------------------------------
# quantize_codes: the one Python implementation of the integer codes


@pytest.mark.parametrize("axis", [None, 0, 1, -1])
@pytest.mark.parametrize("qrange_", [(-128, 127), (0, 15), (-3, 3)])
def test_quantize_codes_matches_oracle(axis, qrange_):
    qmin, qmax = qrange_
    x = torch.randn(5, 7, 3) * 4
    channels = 1 if axis is None else x.shape[axis]
    scale = torch.rand(channels) * 0.5 + 0.05
    zero_point = torch.randn(channels) * 2
    # ties: x * fl32(1/s) lands exactly on k + 0.5 for s = 0.5 (1/s = 2 is exact)
    x.view(-1)[:6] = torch.tensor([0.25, 0.75, -0.25, -0.75, 1.25, NAN])
    if axis is None:
        scale[:] = 0.5
    for zp in (None, zero_point):
        got = eqkernels.quantize_codes(x, scale, zp, qmin, qmax, axis=axis)
        v = _v(x, scale, axis)
        zr = torch.round(_b(zp, x, axis)) if zp is not None else 0.0
        expect = torch.clamp(torch.round(v) + zr, qmin, qmax)
        assert got.dtype == torch.float32 and got.shape == x.shape
        assert torch.equal(torch.isnan(got), torch.isnan(expect))
        ok = ~torch.isnan(expect)
        assert torch.equal(got[ok].double(), expect[ok])
    if axis is None:  # the ties round half to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2
        codes = eqkernels.quantize_codes(x, scale, None, qmin, qmax).view(-1)[:5]
        assert codes.tolist() == [max(qmin, min(qmax, c)) for c in (0, 2, 0, -2, 2)]
