"""The fake-quant ops' bodies: the torch reference, or the fast kernels (C++ CPU, Triton) of
the unified element map on a [outer, C, inner] view with fp32 per-channel parameters."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _ext
from ._fake_quant_checks import body_checks, resolve
from ._fake_quant_ref import (
    PER_TENSOR,
    fq_backward,
    fq_forward,
    layered_backward,
    layered_consts,
    layered_forward,
)


def _view3(x: Tensor, axis: int) -> Tensor:
    if axis == PER_TENSOR:
        return x.reshape(1, 1, -1)
    outer = math.prod(x.shape[:axis])
    return x.reshape(outer, x.shape[axis], -1)


def _memory_order(x: Tensor) -> list[int] | None:
    """The permutation that makes a dense, non-contiguous x contiguous (a channels-last
    activation: NHWC order), or None. A per-tensor form maps every element alike, so the kernels
    can run over memory in that order instead of copying x into NCHW order first."""
    if x.is_contiguous() or x.dim() < 2:
        return None
    perm = sorted(range(x.dim()), key=lambda d: (-x.stride(d), d))
    return perm if x.permute(perm).is_contiguous() else None


def kernel_params(x: Tensor, scale: Tensor, zero_point: Tensor | None, axis: int):
    """fp32 [C] scale, its IEEE reciprocal (kernels only multiply) and the rounded zero point."""
    channels = 1 if axis == PER_TENSOR else x.shape[axis]
    s = scale.float().reshape(channels).contiguous()
    inv_s = torch.reciprocal(s)
    if zero_point is None:
        zr = torch.zeros_like(s)
    else:
        zr = torch.round(zero_point.float().reshape(channels)).contiguous()
    return s, inv_s, zr


def kernel_forward(name, x, s, inv_s, zr, qmin, qmax, inv_step, step, comp, axis):
    perm = _memory_order(x) if axis == PER_TENSOR else None
    if perm is not None:
        xp = x.permute(perm)
        yp = kernel_forward(name, xp, s, inv_s, zr, qmin, qmax, inv_step, step, comp, axis)
        return yp.permute(_inverse(perm))
    x3 = _view3(x, axis).contiguous()
    if name == "cpp":
        y3 = _ext.kernel("fake_quant_fwd_cpu")(
            x3, s, inv_s, zr, qmin, qmax, inv_step, step, comp, -1
        )
    else:
        from ..triton import fake_quant as tfq

        y3 = tfq.forward(x3, s, inv_s, zr, qmin, qmax, inv_step, step, comp)
    return y3.reshape(x.shape)


def kernel_backward(
    name, grad, x, s, inv_s, zr, qmin, qmax, inv_step, step, comp, axis, with_dx=True
):
    """(dx, sum over each group of dy * t, sum of dy * dz_e), the sums fp32 [C].
    with_dx=False: dx is None; the C++ kernel then only reads (the Triton kernel computes dx
    anyway and it is dropped)."""
    perm = _memory_order(x) if axis == PER_TENSOR else None
    if perm is not None:  # dy in x's memory order: no copy when it has x's layout
        dyp, xp = grad.permute(perm), x.permute(perm)
        dxp, sum_t, sum_z = kernel_backward(
            name, dyp, xp, s, inv_s, zr, qmin, qmax, inv_step, step, comp, axis, with_dx
        )
        return (dxp.permute(_inverse(perm)) if with_dx else None), sum_t, sum_z
    x3 = _view3(x, axis).contiguous()
    dy3 = _view3(grad.to(x.dtype), axis).contiguous()
    if name == "cpp":
        dx3, sum_t, sum_z = _ext.kernel("fake_quant_bwd_cpu")(
            dy3, x3, s, inv_s, zr, qmin, qmax, inv_step, step, comp, -1, with_dx
        )
    else:
        from ..triton import fake_quant as tfq

        dx3, sum_t, sum_z = tfq.backward(dy3, x3, s, inv_s, zr, qmin, qmax, inv_step, step, comp)
    return (dx3.reshape(x.shape) if with_dx else None), sum_t, sum_z


def _inverse(perm: list[int]) -> list[int]:
    return [perm.index(d) for d in range(len(perm))]


def run_forward(backend, x, scale, zero_point, quant_min, quant_max, axis):
    body_checks(scale, zero_point)
    name = resolve(backend, x.device, "fake_quant")
    if name == "torch":
        return fq_forward(x, scale, zero_point, quant_min, quant_max, axis)
    s, inv_s, zr = kernel_params(x, scale, zero_point, axis)
    return kernel_forward(name, x, s, inv_s, zr, quant_min, quant_max, 1.0, 1.0, 0.0, axis)


def run_backward(backend, grad, x, scale, zero_point, quant_min, quant_max, axis, grad_factor):
    name = resolve(backend, x.device, "fake_quant")
    if name == "torch":
        return fq_backward(grad, x, scale, zero_point, quant_min, quant_max, axis, grad_factor)
    s, inv_s, zr = kernel_params(x, scale, zero_point, axis)
    dx, sum_t, sum_z = kernel_backward(
        name, grad, x, s, inv_s, zr, quant_min, quant_max, 1.0, 1.0, 0.0, axis
    )
    ds = (grad_factor * sum_t).reshape(scale.shape).to(scale.dtype)
    dz = (grad_factor * sum_z).reshape(scale.shape).to(scale.dtype)
    return dx, ds, dz


def run_layered_forward(backend, x, scale, bits, top_bits, axis, compensate):
    body_checks(scale, None)
    name = resolve(backend, x.device, "fake_quant_layered")
    if name == "torch":
        return layered_forward(x, scale, bits, top_bits, axis, compensate)
    qmin, qmax, inv_step, step, comp = layered_consts(bits, top_bits, compensate)
    s, inv_s, zr = kernel_params(x, scale, None, axis)
    return kernel_forward(name, x, s, inv_s, zr, qmin, qmax, inv_step, step, comp, axis)


def run_layered_backward(backend, grad, x, scale, bits, top_bits, axis, compensate, g):
    name = resolve(backend, x.device, "fake_quant_layered")
    if name == "torch":
        return layered_backward(grad, x, scale, bits, top_bits, axis, compensate, g)
    qmin, qmax, inv_step, step, comp = layered_consts(bits, top_bits, compensate)
    s, inv_s, zr = kernel_params(x, scale, None, axis)
    dx, sum_t, _ = kernel_backward(
        name, grad, x, s, inv_s, zr, qmin, qmax, inv_step, step, comp, axis
    )
    return dx, (g * sum_t).reshape(scale.shape).to(scale.dtype)
