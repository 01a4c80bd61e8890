"""The pure-torch quantization math (DESIGN.md "Quantization math"): integer codes, the
fake-quant and nested-quantizer forward and LSQ / LSQ+ backward, as the specification of every
kernel and the "torch" backend."""

from __future__ import annotations

import torch
from torch import Tensor

PER_TENSOR = -1  # the `axis` op argument for per-tensor quantization


def bcast(p: Tensor, x: Tensor, axis: int) -> Tensor:
    """fp32 per-channel parameter shaped to broadcast against x."""
    p = p.float()
    if axis == PER_TENSOR:
        return p.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


def rounded_zero_point(zero_point: Tensor | None, x: Tensor) -> Tensor:
    """A per-tensor zero point rounded half to even, fp32 0-d (0 when None)."""
    if zero_point is None:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    return torch.round(zero_point.reshape(()).to(torch.float32))


def _code_parts(x: Tensor, s: Tensor, zr: Tensor, quant_min, quant_max):
    """(v, r, u, q): v = fl32(x * fl32(1/s)), r = rne(v), u = r + zr, q = clamp(u)."""
    inv_s = torch.reciprocal(s)  # IEEE fp32 1/s, the same value every backend multiplies by
    v = x.float() * inv_s
    r = torch.round(v)  # round half to even; NaN stays NaN, +-inf stays +-inf
    u = r + zr
    return v, r, u, torch.clamp(u, quant_min, quant_max)  # NaN propagates


def _zero(zero_point: Tensor | None, x: Tensor, s: Tensor, axis: int) -> Tensor:
    return (
        torch.round(bcast(zero_point, x, axis)) if zero_point is not None else torch.zeros_like(s)
    )


def quantize_codes(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    quant_min: int,
    quant_max: int,
    *,
    axis: int | None = None,
) -> Tensor:
    """Integer codes of `x` as every path computes them: `clamp(rne(fl32(x * fl32(1/s))) +
    rne(z), quant_min, quant_max)`, returned as a float32 tensor of x's shape holding integers.

    `scale` / `zero_point` (None: 0) hold one value (axis=None) or one per index of x's dimension
    `axis`. NaN in x gives NaN codes. No validation (the ops validate their arguments)."""
    ax = PER_TENSOR if axis is None else axis % x.dim()
    s = bcast(scale, x, ax)
    return _code_parts(x, s, _zero(zero_point, x, s, ax), quant_min, quant_max)[3]


def reduce_to(e: Tensor, like: Tensor, axis: int) -> Tensor:
    """Sum fp32 per-element terms over each scale group; shaped like the parameter."""
    if axis == PER_TENSOR:
        return e.sum().reshape(like.shape)
    dims = [d for d in range(e.dim()) if d != axis]
    return (e.sum(dim=dims) if dims else e).reshape(like.shape)


def nan_where(mask: Tensor, t: Tensor) -> Tensor:
    return torch.where(mask, torch.full_like(t, float("nan")), t)


def fq_forward(x, scale, zero_point, quant_min, quant_max, axis):
    s = bcast(scale, x, axis)
    zr = _zero(zero_point, x, s, axis)
    q = _code_parts(x, s, zr, quant_min, quant_max)[3]
    return ((q - zr) * s).to(x.dtype)


def fq_backward(grad, x, scale, zero_point, quant_min, quant_max, axis, grad_factor):
    s = bcast(scale, x, axis)
    zr = _zero(zero_point, x, s, axis)
    v, r, u, q = _code_parts(x, s, zr, quant_min, quant_max)
    nan = torch.isnan(v)
    inside = (u >= quant_min) & (u <= quant_max)
    dy = grad.float()
    # Selects on the integer codes, never v * inside: v = +-inf must not make inf * 0.
    dx = nan_where(nan, torch.where(inside, dy, torch.zeros_like(dy)))
    t = torch.where(inside, r - v, q - zr)  # q is NaN where v is: t NaN there
    dz_e = nan_where(nan, dy * torch.where(inside, torch.zeros_like(v), -s))
    ds = grad_factor * reduce_to(dy * t, scale, axis)
    dz = grad_factor * reduce_to(dz_e, scale, axis)
    return dx.to(x.dtype), ds.to(scale.dtype), dz.to(scale.dtype)


def layered_consts(bits: int, top_bits: int, compensate: bool):
    """(top-width qmin, qmax, 2^-k, 2^k, c_k) of the nested quantizer, k = top_bits - bits."""
    k = top_bits - bits
    comp = (1.0 - 2.0**-k) / 2.0 if compensate else 0.0  # mean of the k dropped bits
    return -(1 << (top_bits - 1)), (1 << (top_bits - 1)) - 1, 2.0**-k, 2.0**k, comp


def layered_forward(x, scale, bits, top_bits, axis, compensate):
    qmin, qmax, inv_step, step, comp = layered_consts(bits, top_bits, compensate)
    s = bcast(scale, x, axis)
    q_n = _code_parts(x, s, torch.zeros_like(s), qmin, qmax)[3]
    q_b = torch.floor(q_n * inv_step)  # arithmetic shift by k: floor, not truncation
    return ((q_b + comp) * (step * s)).to(x.dtype)


def layered_backward(grad, x, scale, bits, top_bits, axis, compensate, grad_factor):
    qmin, qmax, inv_step, step, comp = layered_consts(bits, top_bits, compensate)
    s = bcast(scale, x, axis)
    v, r, _, q_n = _code_parts(x, s, torch.zeros_like(s), qmin, qmax)
    nan = torch.isnan(v)
    inside = (r >= qmin) & (r <= qmax)
    a = (torch.floor(q_n * inv_step) + comp) * step
    dy = grad.float()
    dx = nan_where(nan, torch.where(inside, dy, torch.zeros_like(dy)))
    t = torch.where(inside, a - v, a)
    ds = grad_factor * reduce_to(dy * t, scale, axis)
    return dx.to(x.dtype), ds.to(scale.dtype)


class FakeQuantRef(torch.autograd.Function):
    """`fake_quant_ref`'s autograd: the torch forward and the LSQ / LSQ+ backward."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, quant_min, quant_max, axis, grad_factor):
        ctx.save_for_backward(x, scale, zero_point)
        ctx.args = (quant_min, quant_max, axis, grad_factor)
        return fq_forward(x, scale, zero_point, quant_min, quant_max, axis)

    @staticmethod
    def backward(ctx, grad):
        x, scale, zero_point = ctx.saved_tensors
        dx, ds, dz = fq_backward(grad, x, scale, zero_point, *ctx.args)
        return dx, ds, (dz if zero_point is not None else None), None, None, None, None


class LayeredRef(torch.autograd.Function):
    """`fake_quant_layered_ref`'s autograd."""

    @staticmethod
    def forward(ctx, x, scale, bits, top_bits, axis, compensate, grad_factor):
        ctx.save_for_backward(x, scale)
        ctx.args = (bits, top_bits, axis, compensate, grad_factor)
        return layered_forward(x, scale, bits, top_bits, axis, compensate)

    @staticmethod
    def backward(ctx, grad):
        x, scale = ctx.saved_tensors
        dx, ds = layered_backward(grad, x, scale, *ctx.args)
        return dx, ds, None, None, None, None, None
