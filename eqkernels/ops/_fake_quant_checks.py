"""Argument checks and backend resolution of the fake-quant ops."""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from .. import backend as _backend
from ._fake_quant_ref import PER_TENSOR

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Kernels round with the fp32 magic-number trick (exact for |v| < 2^22) after clamping v to
# just beyond the grid; keeping the integer range well inside that keeps the clamp exact.
QRANGE_LIMIT = 1 << 16
CPP_KERNEL = "fake_quant_fwd_cpu"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_x(x) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x has dtype {x.dtype}: accepted dtypes are float32, float16, bfloat16")


def normalize_axis(x: Tensor, axis) -> int:
    if axis is None:
        return PER_TENSOR
    if not _is_int(axis) or x.dim() == 0 or not -x.dim() <= axis < x.dim():
        raise ValueError(
            f"axis={axis!r}: accepted values are None (per-tensor) or an integer in "
            f"[{-x.dim()}, {x.dim() - 1}] for x of shape {tuple(x.shape)}"
        )
    return axis % x.dim()


def check_param(name: str, p, x: Tensor, axis: int) -> None:
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


# The smallest scale accepted: the smallest normal fp32 (2^-126), so fl32(1/s) is finite.
MIN_SCALE = torch.finfo(torch.float32).tiny


def check_values(name: str, p: Tensor, positive: bool) -> None:
    # Host sync: only in eager mode on CPU or with EQK_CHECK=1 (backend.check_values_enabled).
    # One aminmax (NaN propagates into both) keeps the per-call cost to one small op. While
    # compiling, the op bodies check instead when EQK_CHECK=1 (they run on real tensors).
    if p.numel() == 0 or torch.compiler.is_compiling() or not _backend.check_values_enabled(p):
        return
    low, high = (float(t) for t in torch.aminmax(p.detach()))
    if positive and low >= MIN_SCALE and high < math.inf:
        return
    if not positive and -QRANGE_LIMIT <= low and high <= QRANGE_LIMIT:
        return
    if not bool(torch.isfinite(p).all()):
        raise ValueError(f"{name} has non-finite values: accepted are finite values")
    if positive and low > 0:
        raise ValueError(
            f"{name} has values below 2^-126: accepted are values whose fp32 reciprocal is finite"
        )
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


def resolve(backend: str | None, device: torch.device, op: str) -> str:
    if backend == "torch":  # always available; skips the probes on the hot path
        return backend
    return _backend.choose(backend, device, op, _preference(backend), kernels={"cpp": CPP_KERNEL})


def backend_arg(backend: str | None, x: Tensor, op: str) -> str:
    """The backend string passed to the custom op (resolved eagerly; inside a compiled graph
    the op body resolves it, so that tracing does not enter the environment probes)."""
    if torch.compiler.is_compiling():
        if backend is None:
            backend = os.environ.get("EQK_BACKEND", "auto") or "auto"
        return backend
    return resolve(backend, x.device, op)


def _divisors(k: int) -> list[int]:
    return [d for d in range(1, k + 1) if k % d == 0] if k > 0 else []


def group_view(x, scale, zero_point, axis, group_size):
    """Per-group quantization as per-channel quantization of a reshaped tensor: x of shape
    [N, K] (or [N, ...], flattened to [N, K] as a conv weight [Cout, Cin/groups, kh, kw] is)
    with parameters of shape [N, K // g] is viewed as [N * K / g, g] quantized per channel along
    axis 0; group j of row n is x[n, j*g:(j+1)*g], i.e. row n * K / g + j of the view. Every
    element map, gradient sum and grad_factor default (n_per_scale = g) of the per-channel form
    is then the per-group one. Returns (x, scale, zero_point) viewed so."""
    if not _is_int(group_size) or group_size < 1:
        raise ValueError(
            f"group_size={group_size!r}: accepted are None or a positive integer dividing K"
        )
    check_x(x)
    if x.dim() < 2:
        raise ValueError(
            f"x has shape {tuple(x.shape)}: group_size accepts x of shape [N, K] or [N, ...] "
            "(flattened to [N, K])"
        )
    if not _is_int(axis) or axis % x.dim() != 0:
        raise ValueError(f"axis={axis!r}: with group_size the accepted value is 0 (row groups)")
    n, k = x.shape[0], math.prod(x.shape[1:])
    if k % group_size:
        raise ValueError(
            f"group_size={group_size}: accepted values are the divisors of K={k} "
            f"(x of shape {tuple(x.shape)}): {_divisors(k)}"
        )
    shape = (n, k // group_size)
    for name, p in (("scale", scale), ("zero_point", zero_point)):
        if name == "zero_point" and p is None:
            continue
        if not isinstance(p, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(p).__name__}")
        if tuple(p.shape) != shape:
            raise ValueError(
                f"{name} has shape {tuple(p.shape)}: group_size={group_size} accepts "
                f"[N, K // group_size] = {list(shape)} for x of shape {tuple(x.shape)}"
            )
    zp = None if zero_point is None else zero_point.reshape(-1)
    return x.reshape(-1, group_size), scale.reshape(-1), zp


def validate_fq(x, scale, zero_point, quant_min, quant_max, axis, grad_factor):
    check_x(x)
    for name, value in (("quant_min", quant_min), ("quant_max", quant_max)):
        if not _is_int(value) or not -QRANGE_LIMIT <= value <= QRANGE_LIMIT:
            raise ValueError(
                f"{name}={value!r}: accepted are integers in [{-QRANGE_LIMIT}, {QRANGE_LIMIT}]"
            )
    if quant_min >= quant_max:
        raise ValueError(
            f"quant_min={quant_min} >= quant_max={quant_max}: accepted is quant_min < quant_max"
        )
    ax = normalize_axis(x, axis)
    check_param("scale", scale, x, ax)
    if zero_point is not None:
        check_param("zero_point", zero_point, x, ax)
    _check_grad_factor(grad_factor)
    check_values("scale", scale, positive=True)
    if zero_point is not None:
        check_values("zero_point", zero_point, positive=False)
    if grad_factor is None:
        grad_factor = 1.0 / math.sqrt(_n_per_scale(x, ax) * max(quant_max, 1))
    return ax, float(grad_factor)


def validate_layered(x, scale, bits, top_bits, axis, compensate, grad_factor):
    check_x(x)
    for name, value in (("bits", bits), ("top_bits", top_bits)):
        if not _is_int(value) or not 1 <= value <= 8:
            raise ValueError(f"{name}={value!r}: accepted values are integers 1-8")
    if top_bits < bits:
        raise ValueError(f"top_bits={top_bits} < bits={bits}: accepted is top_bits >= bits")
    if not isinstance(compensate, bool):
        raise ValueError(f"compensate={compensate!r}: accepted values are True or False")
    ax = normalize_axis(x, axis)
    check_param("scale", scale, x, ax)
    _check_grad_factor(grad_factor)
    check_values("scale", scale, positive=True)
    if grad_factor is None:
        top_max = max((1 << (top_bits - 1)) - 1, 1)
        grad_factor = 1.0 / math.sqrt(_n_per_scale(x, ax) * top_max)
    return ax, float(grad_factor)


def body_checks(scale: Tensor, zero_point: Tensor | None) -> None:
    """EQK_CHECK=1: value checks inside the op, so compiled graphs get them too."""
    if os.environ.get("EQK_CHECK", "0") == "1":
        check_values("scale", scale, positive=True)
        if zero_point is not None:
            check_values("zero_point", zero_point, positive=False)
