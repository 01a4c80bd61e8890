"""Fused elastic fake quantization (LSQ / LSQ+ forward and backward, and the nested quantizer).

Public ops:
  qrange(bits, signed) -> (quant_min, quant_max)
  quantize_codes(x, scale, zero_point, quant_min, quant_max, *, axis, group_size) -> codes
  fake_quant(x, scale, zero_point, quant_min, quant_max, *, axis, group_size, grad_factor, backend)
  fake_quant_layered(x, scale, bits, top_bits, *, axis, group_size, compensate, grad_factor, ...)
and their pure-torch references `fake_quant_ref` / `fake_quant_layered_ref` (the specification,
DESIGN.md "Quantization math"; also the "torch" backend). `quantize_codes` is the one Python
implementation of the codes (the references, the low-bit GEMM's activation quantization and
the exporters call it).

Each op is a `torch.library.custom_op` under `eqk` with a fake impl and an autograd formula
whose backward is itself a custom op (_fake_quant_register.py). quant_min/quant_max/bits are
runtime arguments: switching width recompiles nothing.

The fast kernels (C++ CPU, Triton) implement one *unified* element map that covers both ops,
with a per-channel view `[outer, C, inner]` and fp32 per-channel parameters:
  v = x * inv_s;  r = rne(v);  u = r + zr;  q = clamp(u, qmin, qmax);
  a = (floor((q - zr) * inv_step) + comp) * step;  y = a * s
  in = qmin <= u <= qmax;  dx = dy * in;  t = in ? a - v : a;  dz_e = in ? 0 : -s
For fake_quant inv_step = step = 1, comp = 0 (so a = q - zr, exactly DESIGN's formula); for the
layered quantizer zr = 0, [qmin, qmax] is the top-width range, inv_step = 2^-k, step = 2^k and
comp = c_k (all products are exact powers of two, so y = (q_b + c_k) * (2^k s) bit for bit).
A NaN x gives NaN y, NaN dx and NaN scale / zero-point gradients for its group.

Per-group scales (group_size=g, axis=0): x of shape [N, K] (or [N, ...] flattened to [N, K], as
a conv weight [Cout, Cin/groups, kh, kw]) with scale / zero_point of shape [N, K // g] is
quantized as the per-channel form of x viewed [N*K/g, g] along axis 0, on every backend: the
element map is per element, each group's gradient sums are a per-channel sum (n_per_scale = g in
the grad_factor default), so no kernel has a separate per-group variant.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _fake_quant_register  # noqa: F401  (registers torch.ops.eqk.fake_quant*)
from ._fake_quant_checks import (
    FLOAT_DTYPES,
    QRANGE_LIMIT,
    backend_arg,
    group_view,
    resolve,
    validate_fq,
    validate_layered,
)
from ._fake_quant_ref import FakeQuantRef, LayeredRef
from ._fake_quant_ref import quantize_codes as _quantize_codes

__all__ = [
    "FLOAT_DTYPES",
    "QRANGE_LIMIT",
    "fake_quant",
    "fake_quant_layered",
    "fake_quant_layered_ref",
    "fake_quant_ref",
    "qrange",
    "quantize_codes",
    "resolve_backend",
]


def quantize_codes(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    quant_min: int,
    quant_max: int,
    *,
    axis: int | None = None,
    group_size: int | None = None,
) -> Tensor:
    """Integer codes of `x` as every path computes them: `clamp(rne(fl32(x * fl32(1/s))) +
    rne(z), quant_min, quant_max)`, a float32 tensor of x's shape holding integers. `scale` /
    `zero_point` (None: 0) per tensor (axis=None), per channel along `axis`, or per group
    (group_size=g, axis=0, shape [N, K // g], as in `fake_quant`). NaN in x gives NaN codes."""
    if group_size is not None:
        xg, sg, zg = group_view(x, scale, zero_point, axis, group_size)
        return _quantize_codes(xg, sg, zg, quant_min, quant_max, axis=0).reshape(x.shape)
    return _quantize_codes(x, scale, zero_point, quant_min, quant_max, axis=axis)


def resolve_backend(backend: str | None, device: torch.device, op: str = "fake_quant") -> str:
    """The backend `op` ("fake_quant" or "fake_quant_layered") runs on for tensors on `device`
    (raises BackendUnavailable for an explicit backend that cannot run there)."""
    return resolve(backend, device, op)


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of a `bits`-bit code: signed [-2^(b-1), 2^(b-1)-1], unsigned [0, 2^b-1]."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits={bits!r}: accepted values are integers 1-8")
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def fake_quant_ref(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    quant_min: int,
    quant_max: int,
    *,
    axis: int | None = None,
    group_size: int | None = None,
    grad_factor: float | None = None,
) -> Tensor:
    """Pure-torch reference of `fake_quant` (same arguments, differentiable with LSQ/LSQ+)."""
    if group_size is not None:
        xg, sg, zg = group_view(x, scale, zero_point, axis, group_size)
        y = fake_quant_ref(xg, sg, zg, quant_min, quant_max, axis=0, grad_factor=grad_factor)
        return y.reshape(x.shape)
    ax, g = validate_fq(x, scale, zero_point, quant_min, quant_max, axis, grad_factor)
    return FakeQuantRef.apply(x, scale, zero_point, quant_min, quant_max, ax, g)


def fake_quant_layered_ref(
    x: Tensor,
    scale: Tensor,
    bits: int,
    top_bits: int,
    *,
    axis: int | None = None,
    group_size: int | None = None,
    compensate: bool = True,
    grad_factor: float | None = None,
) -> Tensor:
    """Pure-torch reference of `fake_quant_layered`."""
    if group_size is not None:
        xg, sg, _ = group_view(x, scale, None, axis, group_size)
        y = fake_quant_layered_ref(
            xg, sg, bits, top_bits, axis=0, compensate=compensate, grad_factor=grad_factor
        )
        return y.reshape(x.shape)
    ax, g = validate_layered(x, scale, bits, top_bits, axis, compensate, grad_factor)
    return LayeredRef.apply(x, scale, bits, top_bits, ax, compensate, g)


def fake_quant(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    quant_min: int,
    quant_max: int,
    *,
    axis: int | None = None,
    group_size: int | None = None,
    grad_factor: float | None = None,
    backend: str | None = "auto",
) -> Tensor:
    """Fake-quantize x to the integer grid [quant_min, quant_max] with step `scale`.

    zero_point=None is symmetric; axis=None per-tensor (scale of shape [1] or []), else
    per-channel along `axis` (scale of shape [x.shape[axis]]); with group_size=g (axis=0) per
    group: x of shape [N, K] (or [N, ...] flattened to [N, K]), scale / zero_point of shape
    [N, K // g], group j of row n being x[n, j*g:(j+1)*g] (g must divide K). Differentiable in
    x, scale and zero_point (LSQ / LSQ+ gradients); grad_factor=None is
    1/sqrt(n_per_scale * max(qmax, 1)), n_per_scale = g per group.
    backend: "auto" | "torch" | "triton" | "cpp" (None: env EQK_BACKEND).
    """
    if group_size is not None:
        xg, sg, zg = group_view(x, scale, zero_point, axis, group_size)
        y = fake_quant(
            xg, sg, zg, quant_min, quant_max, axis=0, grad_factor=grad_factor, backend=backend
        )
        return y.reshape(x.shape)
    ax, g = validate_fq(x, scale, zero_point, quant_min, quant_max, axis, grad_factor)
    name = backend_arg(backend, x, "fake_quant")
    return torch.ops.eqk.fake_quant(x, scale, zero_point, quant_min, quant_max, ax, g, name)


def fake_quant_layered(
    x: Tensor,
    scale: Tensor,
    bits: int,
    top_bits: int,
    *,
    axis: int | None = None,
    group_size: int | None = None,
    compensate: bool = True,
    grad_factor: float | None = None,
    backend: str | None = "auto",
) -> Tensor:
    """Nested (vertically layered) symmetric quantizer: quantize at `top_bits` with `scale`,
    keep the top `bits` bits (floor), dequantize with step 2^k*scale and, when `compensate`,
    the offset c_k = (1 - 2^-k)/2 (k = top_bits - bits). `axis` / `group_size` as in
    `fake_quant` (per group: one top-width scale per group, shape [N, K // g]). Differentiable
    in x and scale; grad_factor=None is 1/sqrt(n_per_scale * max(2^(top_bits-1)-1, 1))."""
    if group_size is not None:
        xg, sg, _ = group_view(x, scale, None, axis, group_size)
        y = fake_quant_layered(
            xg,
            sg,
            bits,
            top_bits,
            axis=0,
            compensate=compensate,
            grad_factor=grad_factor,
            backend=backend,
        )
        return y.reshape(x.shape)
    ax, g = validate_layered(x, scale, bits, top_bits, axis, compensate, grad_factor)
    name = backend_arg(backend, x, "fake_quant_layered")
    return torch.ops.eqk.fake_quant_layered(x, scale, bits, top_bits, ax, compensate, g, name)
