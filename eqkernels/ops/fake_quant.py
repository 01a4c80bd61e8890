"""Fused elastic fake quantization (LSQ / LSQ+ forward and backward, and the nested quantizer).

Public ops:
  qrange(bits, signed) -> (quant_min, quant_max)
  fake_quant(x, scale, zero_point, quant_min, quant_max, *, axis, grad_factor, backend)
  fake_quant_layered(x, scale, bits, top_bits, *, axis, compensate, grad_factor, backend)
and their pure-torch references `fake_quant_ref` / `fake_quant_layered_ref` (the specification,
DESIGN.md "Quantization math"; also the "torch" backend).

Each public op is a `torch.library.custom_op` under `eqk` with a fake impl and an autograd
formula whose backward is itself a custom op, so opcheck and torch.compile see no Python
autograd. quant_min/quant_max/bits are runtime arguments: switching width recompiles nothing.

The fast kernels (C++ CPU, Triton) implement one *unified* element map that covers both ops,
with a per-channel view `[outer, C, inner]` and fp32 per-channel parameters:
  v = x * inv_s;  r = rne(v);  u = r + zr;  q = clamp(u, qmin, qmax);
  a = (floor((q - zr) * inv_step) + comp) * step;  y = a * s
  in = qmin <= u <= qmax;  dx = dy * in;  t = in ? a - v : a;  dz_e = in ? 0 : -s
For fake_quant inv_step = step = 1, comp = 0 (so a = q - zr, exactly DESIGN's formula); for the
layered quantizer zr = 0, [qmin, qmax] is the top-width range, inv_step = 2^-k, step = 2^k and
comp = c_k (all products are exact powers of two, so y = (q_b + c_k) * (2^k s) bit for bit).
A NaN x gives NaN y, NaN dx and NaN scale / zero-point gradients for its group.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from .. import _ext
from .. import backend as _backend

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Kernels round with the fp32 magic-number trick (exact for |v| < 2^22) after clamping v to
# just beyond the grid; keeping the integer range well inside that keeps the clamp exact.
QRANGE_LIMIT = 1 << 16
CPP_KERNEL = "fake_quant_fwd_cpu"
PER_TENSOR = -1  # the `axis` op argument for per-tensor quantization


# --------------------------------------------------------------------------------------------
# Ranges and argument validation


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of a `bits`-bit code: signed [-2^(b-1), 2^(b-1)-1], unsigned [0, 2^b-1]."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits={bits!r}: accepted values are integers 1-8")
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_x(x) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x has dtype {x.dtype}: accepted dtypes are float32, float16, bfloat16")


def _normalize_axis(x: Tensor, axis) -> int:
    if axis is None:
        return PER_TENSOR
    if not _is_int(axis) or x.dim() == 0 or not -x.dim() <= axis < x.dim():
        raise ValueError(
            f"axis={axis!r}: accepted values are None (per-tensor) or an integer in "
            f"[{-x.dim()}, {x.dim() - 1}] for x of shape {tuple(x.shape)}"
        )
    return axis % x.dim()


def _check_param(name: str, p, x: Tensor, axis: int) -> None:
    """scale / zero_point: floating tensors of shape [1] or [] per-tensor, [C] per-channel."""
    if not isinstance(p, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(p).__name__}")
    if not p.dtype.is_floating_point:
        raise ValueError(f"{name} has dtype {p.dtype}: accepted are floating dtypes")
    if p.device != x.device:
        raise ValueError(f"{name} is on {p.device} but x is on {x.device}")
    if axis == PER_TENSOR:
        if tuple(p.shape) not in ((), (1,)):
            raise ValueError(
                f"{name} has shape {tuple(p.shape)}: per-tensor (axis=None) accepts [1] or []"
            )
    elif tuple(p.shape) != (x.shape[axis],):
        raise ValueError(
            f"{name} has shape {tuple(p.shape)}: per-channel along axis={axis} accepts "
            f"[{x.shape[axis]}] for x of shape {tuple(x.shape)}"
        )


def _check_values(name: str, p: Tensor, positive: bool) -> None:
    # Host sync: only in eager mode on CPU or with EQK_CHECK=1 (backend.check_values_enabled).
    # One aminmax (NaN propagates into both) keeps the per-call cost to one small op. While
    # compiling, the op bodies check instead when EQK_CHECK=1 (they run on real tensors).
    if p.numel() == 0 or torch.compiler.is_compiling() or not _backend.check_values_enabled(p):
        return
    low, high = (float(t) for t in torch.aminmax(p.detach()))
    if positive and low > 0 and high < math.inf:
        return
    if not positive and -QRANGE_LIMIT <= low and high <= QRANGE_LIMIT:
        return
    if not bool(torch.isfinite(p).all()):
        raise ValueError(f"{name} has non-finite values: accepted are finite values")
    if positive:
        raise ValueError(f"{name} has values <= 0: accepted are positive values")
    raise ValueError(f"{name} has values beyond +-{QRANGE_LIMIT}: accepted are values within")


def _check_grad_factor(grad_factor) -> None:
    if grad_factor is None:
        return
    if isinstance(grad_factor, bool) or not isinstance(grad_factor, (int, float)):
        raise ValueError(f"grad_factor={grad_factor!r}: accepted are None or a finite float")
    if not math.isfinite(grad_factor):
        raise ValueError(f"grad_factor={grad_factor!r}: accepted are None or a finite float")


def _n_per_scale(x: Tensor, axis: int) -> int:
    channels = 1 if axis == PER_TENSOR else x.shape[axis]
    return max(x.numel() // max(channels, 1), 1)


def _preference(backend: str | None) -> dict[str, tuple[str, ...]]:
    # "auto" never picks the Triton interpreter on CPU tensors (far slower than the reference);
    # an explicit backend="triton" on CPU runs it when TRITON_INTERPRET=1 (how tests verify it).
    cpu = ("cpp", "triton") if backend == "triton" else ("cpp",)
    return {"cpu": cpu, "cuda": ("triton",)}


def _resolve(backend: str | None, device: torch.device, op: str) -> str:
    if backend == "torch":  # always available; skips the probes on the hot path
        return backend
    return _backend.choose(backend, device, op, _preference(backend), kernels={"cpp": CPP_KERNEL})


def _backend_arg(backend: str | None, x: Tensor, op: str) -> str:
    """The backend string passed to the custom op (resolved eagerly; inside a compiled graph
    the op body resolves it, so that tracing does not enter the environment probes)."""
    if torch.compiler.is_compiling():
        if backend is None:
            backend = os.environ.get("EQK_BACKEND", "auto") or "auto"
        return backend
    return _resolve(backend, x.device, op)


# --------------------------------------------------------------------------------------------
# Pure-torch reference (the specification, written as DESIGN.md states it)


def _bcast(p: Tensor, x: Tensor, axis: int) -> Tensor:
    """fp32 per-channel parameter shaped to broadcast against x."""
    p = p.float()
    if axis == PER_TENSOR:
        return p.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


def _reduce_to(e: Tensor, like: Tensor, axis: int) -> Tensor:
    """Sum fp32 per-element terms over each scale group; shaped like the parameter."""
    if axis == PER_TENSOR:
        return e.sum().reshape(like.shape)
    dims = [d for d in range(e.dim()) if d != axis]
    return (e.sum(dim=dims) if dims else e).reshape(like.shape)


def _nan_where(mask: Tensor, t: Tensor) -> Tensor:
    return torch.where(mask, torch.full_like(t, float("nan")), t)


def _fq_forward_torch(x, scale, zero_point, quant_min, quant_max, axis):
    s = _bcast(scale, x, axis)
    inv_s = torch.reciprocal(s)  # IEEE fp32 1/s, the same value every backend multiplies by
    v = x.float() * inv_s
    r = torch.round(v)  # round half to even; NaN stays NaN, +-inf stays +-inf
    zr = torch.round(_bcast(zero_point, x, axis)) if zero_point is not None else torch.zeros_like(s)
    u = r + zr
    q = torch.clamp(u, quant_min, quant_max)  # NaN propagates
    return ((q - zr) * s).to(x.dtype)


def _fq_backward_torch(grad, x, scale, zero_point, quant_min, quant_max, axis, grad_factor):
    s = _bcast(scale, x, axis)
    inv_s = torch.reciprocal(s)
    v = x.float() * inv_s
    nan = torch.isnan(v)
    r = torch.round(v)
    zr = torch.round(_bcast(zero_point, x, axis)) if zero_point is not None else torch.zeros_like(s)
    u = r + zr
    q = torch.clamp(u, quant_min, quant_max)
    inside = (u >= quant_min) & (u <= quant_max)
    dy = grad.float()
    # Selects on the integer codes, never v * inside: v = +-inf must not make inf * 0.
    dx = _nan_where(nan, torch.where(inside, dy, torch.zeros_like(dy)))
    t = torch.where(inside, r - v, q - zr)  # q is NaN where v is: t NaN there
    dz_e = _nan_where(nan, dy * torch.where(inside, torch.zeros_like(v), -s))
    ds = grad_factor * _reduce_to(dy * t, scale, axis)
    dz = grad_factor * _reduce_to(dz_e, scale, axis)
    return dx.to(x.dtype), ds.to(scale.dtype), dz.to(scale.dtype)


def _layered_consts(bits: int, top_bits: int, compensate: bool):
    k = top_bits - bits
    comp = (1.0 - 2.0**-k) / 2.0 if compensate else 0.0  # mean of the k dropped bits
    return -(1 << (top_bits - 1)), (1 << (top_bits - 1)) - 1, 2.0**-k, 2.0**k, comp


def _layered_forward_torch(x, scale, bits, top_bits, axis, compensate):
    qmin, qmax, inv_step, step, comp = _layered_consts(bits, top_bits, compensate)
    s = _bcast(scale, x, axis)
    v = x.float() * torch.reciprocal(s)
    q_n = torch.clamp(torch.round(v), qmin, qmax)
    q_b = torch.floor(q_n * inv_step)  # arithmetic shift by k: floor, not truncation
    return ((q_b + comp) * (step * s)).to(x.dtype)


def _layered_backward_torch(grad, x, scale, bits, top_bits, axis, compensate, grad_factor):
    qmin, qmax, inv_step, step, comp = _layered_consts(bits, top_bits, compensate)
    s = _bcast(scale, x, axis)
    v = x.float() * torch.reciprocal(s)
    nan = torch.isnan(v)
    r = torch.round(v)
    inside = (r >= qmin) & (r <= qmax)
    a = (torch.floor(torch.clamp(r, qmin, qmax) * inv_step) + comp) * step
    dy = grad.float()
    dx = _nan_where(nan, torch.where(inside, dy, torch.zeros_like(dy)))
    t = torch.where(inside, a - v, a)
    ds = grad_factor * _reduce_to(dy * t, scale, axis)
    return dx.to(x.dtype), ds.to(scale.dtype)


class _FakeQuantRef(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, quant_min, quant_max, axis, grad_factor):
        ctx.save_for_backward(x, scale, zero_point)
        ctx.args = (quant_min, quant_max, axis, grad_factor)
        return _fq_forward_torch(x, scale, zero_point, quant_min, quant_max, axis)

    @staticmethod
    def backward(ctx, grad):
        x, scale, zero_point = ctx.saved_tensors
        dx, ds, dz = _fq_backward_torch(grad, x, scale, zero_point, *ctx.args)
        return dx, ds, (dz if zero_point is not None else None), None, None, None, None


class _LayeredRef(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, bits, top_bits, axis, compensate, grad_factor):
        ctx.save_for_backward(x, scale)
        ctx.args = (bits, top_bits, axis, compensate, grad_factor)
        return _layered_forward_torch(x, scale, bits, top_bits, axis, compensate)

    @staticmethod
    def backward(ctx, grad):
        x, scale = ctx.saved_tensors
        dx, ds = _layered_backward_torch(grad, x, scale, *ctx.args)
        return dx, ds, None, None, None, None, None


def _validate_fq(x, scale, zero_point, quant_min, quant_max, axis, grad_factor):
    _check_x(x)
    for name, value in (("quant_min", quant_min), ("quant_max", quant_max)):
        if not _is_int(value) or not -QRANGE_LIMIT <= value <= QRANGE_LIMIT:
            raise ValueError(
                f"{name}={value!r}: accepted are integers in [{-QRANGE_LIMIT}, {QRANGE_LIMIT}]"
            )
    if quant_min >= quant_max:
        raise ValueError(
            f"quant_min={quant_min} >= quant_max={quant_max}: accepted is quant_min < quant_max"
        )
    ax = _normalize_axis(x, axis)
    _check_param("scale", scale, x, ax)
    if zero_point is not None:
        _check_param("zero_point", zero_point, x, ax)
    _check_grad_factor(grad_factor)
    _check_values("scale", scale, positive=True)
    if zero_point is not None:
        _check_values("zero_point", zero_point, positive=False)
    if grad_factor is None:
        grad_factor = 1.0 / math.sqrt(_n_per_scale(x, ax) * max(quant_max, 1))
    return ax, float(grad_factor)


def _validate_layered(x, scale, bits, top_bits, axis, compensate, grad_factor):
    _check_x(x)
    for name, value in (("bits", bits), ("top_bits", top_bits)):
        if not _is_int(value) or not 1 <= value <= 8:
            raise ValueError(f"{name}={value!r}: accepted values are integers 1-8")
    if top_bits < bits:
        raise ValueError(f"top_bits={top_bits} < bits={bits}: accepted is top_bits >= bits")
    if not isinstance(compensate, bool):
        raise ValueError(f"compensate={compensate!r}: accepted values are True or False")
    ax = _normalize_axis(x, axis)
    _check_param("scale", scale, x, ax)
    _check_grad_factor(grad_factor)
    _check_values("scale", scale, positive=True)
    if grad_factor is None:
        top_max = max((1 << (top_bits - 1)) - 1, 1)
        grad_factor = 1.0 / math.sqrt(_n_per_scale(x, ax) * top_max)
    return ax, float(grad_factor)


def fake_quant_ref(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    quant_min: int,
    quant_max: int,
    *,
    axis: int | None = None,
    grad_factor: float | None = None,
) -> Tensor:
    """Pure-torch reference of `fake_quant` (same arguments, differentiable with LSQ/LSQ+)."""
    ax, g = _validate_fq(x, scale, zero_point, quant_min, quant_max, axis, grad_factor)
    return _FakeQuantRef.apply(x, scale, zero_point, quant_min, quant_max, ax, g)


def fake_quant_layered_ref(
    x: Tensor,
    scale: Tensor,
    bits: int,
    top_bits: int,
    *,
    axis: int | None = None,
    compensate: bool = True,
    grad_factor: float | None = None,
) -> Tensor:
    """Pure-torch reference of `fake_quant_layered`."""
    ax, g = _validate_layered(x, scale, bits, top_bits, axis, compensate, grad_factor)
    return _LayeredRef.apply(x, scale, bits, top_bits, ax, compensate, g)


# --------------------------------------------------------------------------------------------
# Fast kernels: the unified element map on a [outer, C, inner] view


def _view3(x: Tensor, axis: int) -> Tensor:
    if axis == PER_TENSOR:
        return x.reshape(1, 1, -1)
    outer = math.prod(x.shape[:axis])
    return x.reshape(outer, x.shape[axis], -1)


def _params(x: Tensor, scale: Tensor, zero_point: Tensor | None, axis: int):
    """fp32 [C] scale, its IEEE reciprocal (kernels only multiply) and the rounded zero point."""
    channels = 1 if axis == PER_TENSOR else x.shape[axis]
    s = scale.float().reshape(channels).contiguous()
    inv_s = torch.reciprocal(s)
    if zero_point is None:
        zr = torch.zeros_like(s)
    else:
        zr = torch.round(zero_point.float().reshape(channels)).contiguous()
    return s, inv_s, zr


def _kernel_forward(name, x, s, inv_s, zr, qmin, qmax, inv_step, step, comp, axis):
    x3 = _view3(x, axis).contiguous()
    if name == "cpp":
        y3 = _ext.kernel("fake_quant_fwd_cpu")(
            x3, s, inv_s, zr, qmin, qmax, inv_step, step, comp, -1
        )
    else:
        from ..triton import fake_quant as tfq

        y3 = tfq.forward(x3, s, inv_s, zr, qmin, qmax, inv_step, step, comp)
    return y3.reshape(x.shape)


def _kernel_backward(name, grad, x, s, inv_s, zr, qmin, qmax, inv_step, step, comp, axis):
    """(dx, sum over each group of dy * t, sum of dy * dz_e), the sums fp32 [C]."""
    x3 = _view3(x, axis).contiguous()
    dy3 = _view3(grad.to(x.dtype), axis).contiguous()
    if name == "cpp":
        dx3, sum_t, sum_z = _ext.kernel("fake_quant_bwd_cpu")(
            dy3, x3, s, inv_s, zr, qmin, qmax, inv_step, step, comp, -1
        )
    else:
        from ..triton import fake_quant as tfq

        dx3, sum_t, sum_z = tfq.backward(dy3, x3, s, inv_s, zr, qmin, qmax, inv_step, step, comp)
    return dx3.reshape(x.shape), sum_t, sum_z


def _body_checks(scale: Tensor, zero_point: Tensor | None) -> None:
    """EQK_CHECK=1: value checks inside the op, so compiled graphs get them too."""
    if os.environ.get("EQK_CHECK", "0") == "1":
        _check_values("scale", scale, positive=True)
        if zero_point is not None:
            _check_values("zero_point", zero_point, positive=False)


def _run_forward(backend, x, scale, zero_point, quant_min, quant_max, axis):
    _body_checks(scale, zero_point)
    name = _resolve(backend, x.device, "fake_quant")
    if name == "torch":
        return _fq_forward_torch(x, scale, zero_point, quant_min, quant_max, axis)
    s, inv_s, zr = _params(x, scale, zero_point, axis)
    return _kernel_forward(name, x, s, inv_s, zr, quant_min, quant_max, 1.0, 1.0, 0.0, axis)


def _run_backward(backend, grad, x, scale, zero_point, quant_min, quant_max, axis, grad_factor):
    name = _resolve(backend, x.device, "fake_quant")
    if name == "torch":
        return _fq_backward_torch(
            grad, x, scale, zero_point, quant_min, quant_max, axis, grad_factor
        )
    s, inv_s, zr = _params(x, scale, zero_point, axis)
    dx, sum_t, sum_z = _kernel_backward(
        name, grad, x, s, inv_s, zr, quant_min, quant_max, 1.0, 1.0, 0.0, axis
    )
    ds = (grad_factor * sum_t).reshape(scale.shape).to(scale.dtype)
    dz = (grad_factor * sum_z).reshape(scale.shape).to(scale.dtype)
    return dx, ds, dz


def _run_layered_forward(backend, x, scale, bits, top_bits, axis, compensate):
    _body_checks(scale, None)
    name = _resolve(backend, x.device, "fake_quant_layered")
    if name == "torch":
        return _layered_forward_torch(x, scale, bits, top_bits, axis, compensate)
    qmin, qmax, inv_step, step, comp = _layered_consts(bits, top_bits, compensate)
    s, inv_s, zr = _params(x, scale, None, axis)
    return _kernel_forward(name, x, s, inv_s, zr, qmin, qmax, inv_step, step, comp, axis)


def _run_layered_backward(backend, grad, x, scale, bits, top_bits, axis, compensate, g):
    name = _resolve(backend, x.device, "fake_quant_layered")
    if name == "torch":
        return _layered_backward_torch(grad, x, scale, bits, top_bits, axis, compensate, g)
    qmin, qmax, inv_step, step, comp = _layered_consts(bits, top_bits, compensate)
    s, inv_s, zr = _params(x, scale, None, axis)
    dx, sum_t, _ = _kernel_backward(
        name, grad, x, s, inv_s, zr, qmin, qmax, inv_step, step, comp, axis
    )
    return dx, (g * sum_t).reshape(scale.shape).to(scale.dtype)


# --------------------------------------------------------------------------------------------
# torch.library registration


@torch.library.custom_op("eqk::fake_quant", mutates_args=())
def _fake_quant_op(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    quant_min: int,
    quant_max: int,
    axis: int,
    grad_factor: float,
    backend: str,
) -> Tensor:
    return _run_forward(backend, x, scale, zero_point, quant_min, quant_max, axis)


@_fake_quant_op.register_fake
def _(x, scale, zero_point, quant_min, quant_max, axis, grad_factor, backend):
    return torch.empty_like(x)


@torch.library.custom_op("eqk::fake_quant_backward", mutates_args=())
def _fake_quant_backward_op(
    grad: Tensor,
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    quant_min: int,
    quant_max: int,
    axis: int,
    grad_factor: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return _run_backward(
        backend, grad, x, scale, zero_point, quant_min, quant_max, axis, grad_factor
    )


@_fake_quant_backward_op.register_fake
def _(grad, x, scale, zero_point, quant_min, quant_max, axis, grad_factor, backend):
    return torch.empty_like(x), torch.empty_like(scale), torch.empty_like(scale)


def _fq_setup_context(ctx, inputs, output):
    x, scale, zero_point, quant_min, quant_max, axis, grad_factor, backend = inputs
    ctx.save_for_backward(x, scale, zero_point)
    ctx.args = (quant_min, quant_max, axis, grad_factor, backend)
    ctx.has_zero_point = zero_point is not None


def _fq_backward(ctx, grad):
    x, scale, zero_point = ctx.saved_tensors
    quant_min, quant_max, axis, grad_factor, backend = ctx.args
    dx, ds, dz = torch.ops.eqk.fake_quant_backward(
        grad, x, scale, zero_point, quant_min, quant_max, axis, grad_factor, backend
    )
    return dx, ds, (dz if ctx.has_zero_point else None), None, None, None, None, None


_fake_quant_op.register_autograd(_fq_backward, setup_context=_fq_setup_context)


@torch.library.custom_op("eqk::fake_quant_layered", mutates_args=())
def _fake_quant_layered_op(
    x: Tensor,
    scale: Tensor,
    bits: int,
    top_bits: int,
    axis: int,
    compensate: bool,
    grad_factor: float,
    backend: str,
) -> Tensor:
    return _run_layered_forward(backend, x, scale, bits, top_bits, axis, compensate)


@_fake_quant_layered_op.register_fake
def _(x, scale, bits, top_bits, axis, compensate, grad_factor, backend):
    return torch.empty_like(x)


@torch.library.custom_op("eqk::fake_quant_layered_backward", mutates_args=())
def _fake_quant_layered_backward_op(
    grad: Tensor,
    x: Tensor,
    scale: Tensor,
    bits: int,
    top_bits: int,
    axis: int,
    compensate: bool,
    grad_factor: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return _run_layered_backward(
        backend, grad, x, scale, bits, top_bits, axis, compensate, grad_factor
    )


@_fake_quant_layered_backward_op.register_fake
def _(grad, x, scale, bits, top_bits, axis, compensate, grad_factor, backend):
    return torch.empty_like(x), torch.empty_like(scale)


def _layered_setup_context(ctx, inputs, output):
    x, scale, bits, top_bits, axis, compensate, grad_factor, backend = inputs
    ctx.save_for_backward(x, scale)
    ctx.args = (bits, top_bits, axis, compensate, grad_factor, backend)


def _layered_backward(ctx, grad):
    x, scale = ctx.saved_tensors
    dx, ds = torch.ops.eqk.fake_quant_layered_backward(grad, x, scale, *ctx.args)
    return dx, ds, None, None, None, None, None, None


_fake_quant_layered_op.register_autograd(_layered_backward, setup_context=_layered_setup_context)


# --------------------------------------------------------------------------------------------
# Public wrappers


def fake_quant(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    quant_min: int,
    quant_max: int,
    *,
    axis: int | None = None,
    grad_factor: float | None = None,
    backend: str | None = "auto",
) -> Tensor:
    """Fake-quantize x to the integer grid [quant_min, quant_max] with step `scale`.

    zero_point=None is symmetric; axis=None per-tensor (scale of shape [1] or []), else
    per-channel along `axis` (scale of shape [x.shape[axis]]). Differentiable in x, scale and
    zero_point (LSQ / LSQ+ gradients); grad_factor=None is 1/sqrt(n_per_scale * max(qmax, 1)).
    backend: "auto" | "torch" | "triton" | "cpp" (None: env EQK_BACKEND).
    """
    ax, g = _validate_fq(x, scale, zero_point, quant_min, quant_max, axis, grad_factor)
    name = _backend_arg(backend, x, "fake_quant")
    return torch.ops.eqk.fake_quant(x, scale, zero_point, quant_min, quant_max, ax, g, name)


def fake_quant_layered(
    x: Tensor,
    scale: Tensor,
    bits: int,
    top_bits: int,
    *,
    axis: int | None = None,
    compensate: bool = True,
    grad_factor: float | None = None,
    backend: str | None = "auto",
) -> Tensor:
    """Nested (vertically layered) symmetric quantizer: quantize at `top_bits` with `scale`,
    keep the top `bits` bits (floor), dequantize with step 2^k*scale and, when `compensate`,
    the offset c_k = (1 - 2^-k)/2 (k = top_bits - bits). Differentiable in x and scale;
    grad_factor=None is 1/sqrt(n_per_scale * max(2^(top_bits-1)-1, 1))."""
    ax, g = _validate_layered(x, scale, bits, top_bits, axis, compensate, grad_factor)
    name = _backend_arg(backend, x, "fake_quant_layered")
    return torch.ops.eqk.fake_quant_layered(x, scale, bits, top_bits, ax, compensate, g, name)
