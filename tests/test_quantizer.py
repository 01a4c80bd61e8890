"""ElasticQuantizer against a float64 oracle written here from DESIGN.md's equations."""

import math

import pytest
import torch
from eqnet.nn import ElasticQuantizer
from eqnet.nn.quantizer import SCALE_EPS


# -- oracle -------------------------------------------------------------------------------------
def _bcast(p, x, axis):
    if axis is None:
        return p.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


def _v(x, s, axis):
    """v = fl32(x * fl32(1/s)), the only fp32 step of the oracle; the rest is float64."""
    inv = torch.reciprocal(s.detach().float())
    return (x.detach().float() * _bcast(inv, x, axis)).double()


def oracle_fq(x, s, z, qmin, qmax, axis):
    v = _v(x, s, axis)
    r = torch.round(v)  # torch.round rounds half to even
    zr = 0.0 if z is None else _bcast(torch.round(z.detach().double()), x, axis)
    q = torch.clamp(r + zr, qmin, qmax)
    return (q - zr) * _bcast(s.detach().double(), x, axis)


def oracle_layered(x, s, bits, top, axis):
    v = _v(x, s, axis)
    qn = torch.clamp(torch.round(v), -(2 ** (top - 1)), 2 ** (top - 1) - 1)
    k = top - bits
    qb = torch.floor(qn / 2**k)
    c = (1 - 2.0**-k) / 2
    return (qb + c) * 2**k * _bcast(s.detach().double(), x, axis)


def oracle_scale_grad(x, s, z, qmin, qmax, dy, g):
    """Per-tensor LSQ/LSQ+ step gradient: G * sum(dy * t), t = r - v inside, q - z_r outside."""
    v = _v(x, s, None)
    r = torch.round(v)
    zr = 0.0 if z is None else torch.round(z.detach().double()).reshape(())
    u = r + zr
    inside = (u >= qmin) & (u <= qmax)
    t = torch.where(inside, r - v, torch.clamp(u, qmin, qmax) - zr)
    return g * (dy.double() * t).sum()


# -- construction -------------------------------------------------------------------------------
def test_parameters_exist_with_final_shapes_at_construction():
    q = ElasticQuantizer("weight", (2, 4), ("tensor", "channel"), ("sym", "asym"), channels=5)
    names = dict(q.named_parameters())
    assert set(names) == {
        f"{kind}_w{b}_{g}_{s}"
        for b in (2, 4)
        for g in ("tensor", "channel")
        for s in ("sym", "asym")
        for kind in (("scale", "zero_point") if s == "asym" else ("scale",))
    }
    assert names["scale_w4_channel_sym"].shape == (5,)
    assert names["zero_point_w2_tensor_asym"].shape == (1,)
    a = ElasticQuantizer("activation", (4, 8), ("tensor",), ("sym", "asym"))
    assert set(dict(a.named_parameters())) == {
        "scale_a4_sym", "scale_a8_sym", "scale_a4_asym", "scale_a8_asym",
        "zero_point_a4_asym", "zero_point_a8_asym",
    }  # fmt: skip
    n = ElasticQuantizer(
        "weight", (2, 4, 8), ("tensor", "channel"), ("sym",), channels=3, nested=True
    )
    assert {k: tuple(p.shape) for k, p in n.named_parameters()} == {
        "scale_nested_tensor": (1,),
        "scale_nested_channel": (3,),
    }


@pytest.mark.parametrize(
    "kwargs",
    [
        {"role": "bias", "bits": (4,)},
        {"role": "weight", "bits": (9,)},
        {"role": "activation", "bits": (4,), "granularities": ("channel",)},
        {"role": "weight", "bits": (4,), "symmetries": ("asym",), "nested": True},
        {"role": "activation", "bits": (4,), "nested": True},
    ],
)
def test_bad_construction_raises(kwargs):
    with pytest.raises(ValueError):
        ElasticQuantizer(**kwargs)


def test_form_outside_quantizer_raises_naming_allowed():
    q = ElasticQuantizer("weight", (2, 4), ("channel",), ("sym",), channels=2)
    with pytest.raises(ValueError, match=r"allowed bits \[2, 4\]"):
        q.params(3, "channel", "sym")
    with pytest.raises(ValueError, match="granularities"):
        q.params(4, "tensor", "sym")


# -- forward vs oracle --------------------------------------------------------------------------
FORMS = [(b, g, s) for b in (2, 3, 4, 8) for g in ("tensor", "channel") for s in ("sym", "asym")]


@pytest.mark.parametrize("bits, gran, sym", FORMS)
def test_weight_forward_matches_oracle(bits, gran, sym):
    w = torch.randn(7, 3, 3, 3)
    q = ElasticQuantizer("weight", (2, 3, 4, 8), ("tensor", "channel"), ("sym", "asym"), channels=7)
    q.calibrate(w)
    p = q.params(bits, gran, sym)
    y = q(w, bits, gran, sym)
    axis = 0 if gran == "channel" else None
    assert (
        p.axis == axis and p.quant_min == -(2 ** (bits - 1)) and p.quant_max == 2 ** (bits - 1) - 1
    )
    assert (p.zero_point is None) == (sym == "sym")
    expected = oracle_fq(w, p.scale, p.zero_point, p.quant_min, p.quant_max, axis).float()
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("gran", ["tensor", "channel"])
def test_nested_forward_matches_oracle(bits, gran):
    w = torch.randn(6, 11)
    q = ElasticQuantizer(
        "weight", (2, 4, 8), ("tensor", "channel"), ("sym",), channels=6, nested=True
    )
    q.calibrate(w)
    p = q.params(bits, gran, "sym")
    assert p.nested and p.top_bits == 8 and p.bits == bits
    # the same scale parameter serves every width
    assert q.raw_parameters(bits, gran, "sym")[0] is q.raw_parameters(8, gran, "sym")[0]
    axis = 0 if gran == "channel" else None
    expected = oracle_layered(w, p.scale, bits, 8, axis).float()
    torch.testing.assert_close(q(w, bits, gran, "sym"), expected, rtol=0, atol=0)


@pytest.mark.parametrize("sym", ["sym", "asym"])
def test_activation_unsigned_after_relu_and_signed_otherwise(sym):
    a = ElasticQuantizer("activation", (4,), ("tensor",), (sym,))
    x = torch.randn(4, 3, 5, 5)
    a.calibrate(x.relu())
    assert a.signed is False
    p = a.params(4, "tensor", sym)
    assert (p.quant_min, p.quant_max) == (0, 15)
    y = a(x.relu(), 4, "tensor", sym)
    torch.testing.assert_close(
        y, oracle_fq(x.relu(), p.scale, p.zero_point, 0, 15, None).float(), rtol=0, atol=0
    )
    a.calibrate(x)
    assert a.signed is True and a.params(4, "tensor", sym).quant_min == -8


def test_activation_grad_factor_uses_per_sample_count():
    a = ElasticQuantizer("activation", (4,), ("tensor",), ("asym",))
    x = torch.randn(6, 3, 4, 4)
    a.calibrate(x)
    dy = torch.randn_like(x)
    a(x, 4, "tensor", "asym").backward(dy)
    p = a.params(4, "tensor", "asym")
    g = 1.0 / math.sqrt(3 * 4 * 4 * p.quant_max)  # per sample: 48 features, not 6*48
    expected = oracle_scale_grad(x, p.scale, p.zero_point, p.quant_min, p.quant_max, dy, g)
    grad = a.scale_a4_asym.grad
    torch.testing.assert_close(grad.double().reshape(()), expected, rtol=1e-5, atol=1e-6)


def test_scale_stays_positive_and_gradient_passes_through():
    q = ElasticQuantizer("weight", (4,), ("tensor",), ("sym",))
    with torch.no_grad():
        q.scale_w4_tensor_sym.fill_(-0.5)
    p = q.params(4, "tensor", "sym")
    assert p.scale.item() == pytest.approx(SCALE_EPS) and p.scale.item() > 0
    w = torch.randn(3, 4)
    q(w, 4, "tensor", "sym").sum().backward()
    grad = q.scale_w4_tensor_sym.grad
    assert grad is not None and grad.abs().item() > 0  # not frozen by the clamp
    with torch.no_grad():
        q.scale_w4_tensor_sym.fill_(0.25)
    assert q.params(4, "tensor", "sym").scale.item() == 0.25  # the parameter is the step


# -- calibration --------------------------------------------------------------------------------
def _mse64(x, s, z, qmin, qmax, axis=None):
    return (oracle_fq(x, s, z, qmin, qmax, axis) - x.double()).pow(2).mean().item()


def test_lsq_rule():
    x = torch.randn(5000) * 0.3
    q = ElasticQuantizer("weight", (3, 6), ("tensor",), ("sym",))
    q.calibrate(x, method="lsq")
    for b in (3, 6):
        expected = 2 * x.double().abs().mean() / math.sqrt(2 ** (b - 1) - 1)
        assert q.params(b, "tensor", "sym").scale.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("sym", ["sym", "asym"])
def test_mse_search_close_to_fine_grid_optimum(bits, sym):
    x = torch.randn(8000)
    q = ElasticQuantizer("weight", (bits,), ("tensor",), (sym,))
    q.calibrate(x)
    p = q.params(bits, "tensor", sym)
    got = _mse64(x, p.scale, p.zero_point, p.quant_min, p.quant_max)
    # independent fine search (float64 oracle, all ratios at once as channels of one call)
    qmin, qmax = p.quant_min, p.quant_max
    r = torch.linspace(0.05, 1.0, 400, dtype=torch.float64)
    rows = x[None].expand(len(r), -1)
    if sym == "sym":
        s = (r * x.abs().max().item() / qmax).float()
        z = None
    else:
        s = (r * (x.max() - x.min()).item() / (qmax - qmin)).float()
        z = qmin - torch.round(r * x.min().item() / s.double())
    errs = (oracle_fq(rows, s, z, qmin, qmax, 0) - rows.double()).pow(2).mean(1)
    best = errs.min().item()
    if sym == "sym":
        lsq = torch.tensor([2 * x.abs().mean().item() / math.sqrt(qmax)])
        best = min(best, _mse64(x, lsq, None, qmin, qmax))
    assert got <= best * 1.05
    # and clipping is used where it pays: at <= 4 bits a Gaussian's optimum clips well inside max
    if bits <= 4 and sym == "sym":
        assert p.scale.item() * qmax < 0.8 * x.abs().max().item()


def test_per_channel_calibration_is_per_channel():
    w = torch.randn(4, 100) * torch.tensor([[0.01], [0.1], [1.0], [10.0]])
    q = ElasticQuantizer("weight", (4,), ("channel",), ("sym",), channels=4)
    q.calibrate(w)
    s = q.params(4, "channel", "sym").scale
    ratios = (s[1:] / s[:-1]).tolist()
    assert all(5 < r < 20 for r in ratios)  # follows each channel's 10x larger range


def test_signedness_travels_with_state_dict():
    a = ElasticQuantizer("activation", (4,), ("tensor",), ("sym",))
    a.calibrate(torch.rand(100))
    b = ElasticQuantizer("activation", (4,), ("tensor",), ("sym",))
    assert b.signed is True
    b.load_state_dict(a.state_dict())
    assert b.signed is False
    x = torch.rand(50)
    assert torch.equal(a(x, 4), b(x, 4))
    # the loaded quantizer uses the unsigned 4-bit range: clamp(round(x * fl32(1/s)), 0, 15) s
    p = b.params(4, "tensor", "sym")
    assert (p.quant_min, p.quant_max) == (0, 15)
    codes = torch.clamp(torch.round(x * torch.reciprocal(p.scale.float())).double(), 0, 15)
    assert torch.allclose(b(x, 4).double(), codes * p.scale.double(), rtol=0, atol=1e-7)
