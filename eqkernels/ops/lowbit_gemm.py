"""Low-bit linear and conv2d on canonical bit planes (DESIGN.md "Bit planes and the low-bit
GEMM").

`planes` holds at least the first `bits` of the `top_bits` planes of the weight `W[N, K]`
(a conv weight flattened as `[Cout, Cin/groups*kh*kw]` in PyTorch's order). `scale` is the
top-width scale (`[1]`, 0-dim or `[N]`), so `s_b = 2^(top_bits-bits) * scale` and the nested
compensation is `c = (1 - 2^-k)/2`, `k = top_bits - bits` (0 when `compensate=False`).
An optional integer weight zero point `z_w[N]` (asymmetric, non-nested weights) makes the
effective weight `(q_b + c - z_w) * s_b`.

* Float activations (`act_scale=None`): `y = x @ ((q_b + c - z_w) * s_b)^T + bias`, summed in
  fp32 (cpp: plane tiles decoded in registers or into cache-sized panels, fp32 FMA, or
  `vdpbf16ps` for bf16 `x`; never a whole decoded weight; on CUDA, fp16/bf16 `x` runs the
  Triton GEMM of `eqkernels/triton/lowbit_gemm.py`), cast to x's dtype.
* Per group (`group_size=g`, both paths, linear and conv2d): `s_b` (and `z_w`) hold one value
  per group of g consecutive columns of each row, `[N, K // g]`. The integer path then sums
  each group's integers on their own and meets the groups in float64:
  `y = s_a sum_j s_b[:, j] (acc_j - z_a rowsum_j + (c - z_w[:, j])(xsum_j - g z_a)) + bias`.
* Integer activations: `x` is quantized inside the op exactly as fake_quant's forward
  (fp32: `inv = fl32(1/s_a)`, `v = fl32(x*inv)`, round half to even, `+ round(z_a)`, clamp)
  to codes `xq` (uint8 when `act_quant_min >= 0`, else int8); the integer part is accumulated
  exactly (int32 chunks of K, summed in int64) and the epilogue
  `y = s_a s_b (sum xq q_b - z_a sum q_b + (c - z_w)(sum xq - K z_a)) + bias`
  runs in float64 with a fixed order, then is cast to x's dtype.

`lowbit_linear` / `lowbit_conv2d` validate every argument on each call. A layer that runs many
times with the same weights uses the prepared calls instead: `prepare_linear` /
`prepare_conv2d` validate the weights and the activation quantization (`ActQuant`) once,
resolve the backend and repack the weights, and return a callable that checks only `x`.

Backends: "torch" (reference, any device), "cpp" (eqkernels._C CPU kernels: bit-serial
AVX-512 VNNI / AVX2 / portable GEMV and GEMM with run-time ISA dispatch), "cuda" (_C raw
int32 accumulators from `lowbit_gemm_int_cuda`, decode by `unpack_bitplanes_cuda`; epilogue
in torch; fp16/bf16 float activations through the Triton GEMM; compiled in CI only, no GPU
here), "triton" (named explicitly, never picked by "auto": the fp16/bf16 float-activation
`lowbit_linear` only; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1). These are
inference ops: no autograd.

Files: this module (public API), `_lowbit_gemm_checks` (argument checks),
`_lowbit_gemm_register` (torch.library ops), `_lowbit_gemm_paths` (the computations),
`_lowbit_gemm_fused` (routing of the fused C++ integer path), `_lowbit_gemm_weights` (weight
decoding and the repacking cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _ext
from ..backend import BackendUnavailable, choose, validate_name
from ._lowbit_gemm_checks import (
    check_act,
    check_conv_input,
    check_conv_out_channels,
    check_group_size,
    check_weights,
    check_x,
    conv_geometry,
)
from ._lowbit_gemm_fused import FUSED_CONV, FUSED_LINEAR, conv_weights, int32_exact, linear_weights
from ._lowbit_gemm_group import GROUP_INT_KERNEL, group_weights
from ._lowbit_gemm_paths import INT_KERNELS, TRITON_FLOAT_ONLY, conv2d_forward, linear_forward
from ._lowbit_gemm_register import conv2d_call, linear_call
from ._lowbit_gemm_weights import compensation

__all__ = [
    "ActQuant",
    "PreparedConv2d",
    "PreparedLinear",
    "compensation",
    "lowbit_conv2d",
    "lowbit_conv2d_ref",
    "lowbit_linear",
    "lowbit_linear_ref",
    "prepare_conv2d",
    "prepare_linear",
]

PREFERENCE = {"cpu": ("cpp",), "cuda": ("cuda",)}
TRITON_PREFERENCE = {"cpu": ("triton",), "cuda": ("triton",)}


def _resolve(backend, device, op, float_act=True):
    """The backend for `op` on `device`. "triton" (never chosen by "auto") is the fp16/bf16
    float-activation GEMM of `lowbit_linear` only."""
    if validate_name(backend) == "triton":
        if op != "lowbit_linear":
            raise BackendUnavailable(
                f"{op}: backend='triton' is implemented for lowbit_linear only"
            )
        if not float_act:
            raise BackendUnavailable(TRITON_FLOAT_ONLY)
        return choose("triton", device, op, TRITON_PREFERENCE)
    return choose(backend, device, op, PREFERENCE, INT_KERNELS)


# --------------------------------------------------------------------------------------------
# Public ops (validated on every call)


def lowbit_linear(
    x: torch.Tensor,
    planes: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    top_bits: int,
    *,
    K: int,
    compensate: bool = True,
    bias: torch.Tensor | None = None,
    weight_zero_point: torch.Tensor | None = None,
    act_scale: torch.Tensor | None = None,
    act_zero_point: torch.Tensor | None = None,
    act_quant_min: int | None = None,
    act_quant_max: int | None = None,
    backend: str | None = None,
    group_size: int | None = None,
) -> torch.Tensor:
    """`y[..., N]` of `x[..., K]` and the `bits`-bit weight decoded from canonical `planes`.

    See the module docstring for the math. `planes` holds >= `bits` planes (int32
    `[planes, N, ceil(K/32)]`); `scale` is the top-width scale (`[1]`, `[]` or `[N]`);
    `bias` float `[N]`; `weight_zero_point` integer-valued `[N]`; the activation arguments
    (per-tensor `act_scale`, `act_zero_point`, and the code range `act_quant_min/max`, which
    must fit uint8 or int8) select the integer path. `group_size=g` (a multiple of 32 dividing
    K): per-group scales `[N, K // g]`, group `j` of row `n` being columns `j*g .. (j+1)*g - 1`
    (and `weight_zero_point` `[N]` or `[N, K // g]`), on both activation paths. Inference op:
    no autograd. A layer that runs many times with the same weights calls `prepare_linear`
    once instead.
    """
    gs = check_group_size(group_size, K)
    check_weights(planes, scale, bits, top_bits, K, bias, weight_zero_point, x=x, group_size=gs)
    check_act(act_scale, act_zero_point, act_quant_min, act_quant_max, x.device)
    if x.shape[-1] != K:
        raise ValueError(f"x: last dimension {x.shape[-1]}; accepted: K={K}")
    name = _resolve(backend, x.device, "lowbit_linear", act_scale is None)
    act = (act_scale, act_zero_point, act_quant_min, act_quant_max)
    args = (planes, scale, bits, top_bits, K, bool(compensate), bias, weight_zero_point)
    return linear_call(x, (*args, *act, name, gs))


def lowbit_conv2d(
    x: torch.Tensor,
    planes: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    top_bits: int,
    *,
    in_channels: int,
    kernel_size,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    compensate: bool = True,
    bias: torch.Tensor | None = None,
    weight_zero_point: torch.Tensor | None = None,
    act_scale: torch.Tensor | None = None,
    act_zero_point: torch.Tensor | None = None,
    act_quant_min: int | None = None,
    act_quant_max: int | None = None,
    backend: str | None = None,
    group_size: int | None = None,
) -> torch.Tensor:
    """2-D convolution of `x[B, in_channels, H, W]` with a `bits`-bit weight decoded from
    canonical `planes` (the weight `[Cout, in_channels/groups, kh, kw]` flattened to
    `[Cout, in_channels/groups*kh*kw]` in PyTorch's order; `Cout = planes.shape[1]`).

    `kernel_size`, `stride`, `padding` (zeros; integer activations pad with the code of real
    zero `z_a`), `dilation`: an int or a pair `(h, w)`; `groups` divides `in_channels` and
    `Cout` (`groups == in_channels` is depthwise). The remaining arguments are
    `lowbit_linear`'s (per-channel `scale`, `bias`, `weight_zero_point` are over `Cout`;
    `group_size=g`: `scale` and `weight_zero_point` per group of g consecutive elements of
    the flattened input dimension `in_channels/groups*kh*kw`, `[Cout, that // g]`, on both
    activation paths). Returns `[B, Cout, OH, OW]` in x's dtype. Inference op: no autograd. A layer that runs
    many times with the same weights calls `prepare_conv2d` once instead.
    """
    geometry, K = conv_geometry(in_channels, kernel_size, stride, padding, dilation, groups)
    gs = check_group_size(group_size, K)
    check_weights(planes, scale, bits, top_bits, K, bias, weight_zero_point, x=x, group_size=gs)
    check_act(act_scale, act_zero_point, act_quant_min, act_quant_max, x.device)
    check_conv_out_channels(planes, groups)
    check_conv_input(x, geometry)
    name = _resolve(backend, x.device, "lowbit_conv2d")
    act = (act_scale, act_zero_point, act_quant_min, act_quant_max)
    rest = (bool(compensate), bias, weight_zero_point, *act, name, gs)
    return conv2d_call(x, planes, scale, bits, top_bits, geometry, rest)


def lowbit_linear_ref(
    x, planes, scale, bits, top_bits, *, K, compensate=True, bias=None,
    weight_zero_point=None, act_scale=None, act_zero_point=None, act_quant_min=None,
    act_quant_max=None, group_size=None,
):  # fmt: skip
    """Pure-torch reference of `lowbit_linear` (no validation)."""
    act = (act_scale, act_zero_point, act_quant_min, act_quant_max)
    args = (planes, scale, bits, top_bits, K, compensate, bias, weight_zero_point)
    return linear_forward(x, *args, *act, "torch", group_size or 0)


def lowbit_conv2d_ref(
    x, planes, scale, bits, top_bits, *, in_channels, kernel_size, stride=1, padding=0,
    dilation=1, groups=1, compensate=True, bias=None, weight_zero_point=None, act_scale=None,
    act_zero_point=None, act_quant_min=None, act_quant_max=None, group_size=None,
):  # fmt: skip
    """Pure-torch reference of `lowbit_conv2d` (no validation beyond normalizing pairs)."""
    geometry, _ = conv_geometry(in_channels, kernel_size, stride, padding, dilation, groups)
    act = (act_scale, act_zero_point, act_quant_min, act_quant_max)
    rest = (compensate, bias, weight_zero_point, *act, "torch", group_size or 0)
    return conv2d_forward(x, planes, scale, bits, top_bits, geometry, *rest)


# --------------------------------------------------------------------------------------------
# Prepared calls (validated and repacked once)


@dataclass(frozen=True, eq=False)
class ActQuant:
    """Per-tensor quantization of a low-bit op's input activation (the integer path).

    Codes `clamp(rne(fl32(x * fl32(1/scale))) + rne(zero_point), quant_min, quant_max)`
    (`eqkernels.quantize_codes`), stored as uint8 when `quant_min >= 0`, else int8, so the
    range must fit one of them. `scale`: a positive finite float tensor of one element (a
    Python float becomes fp32 `[1]`); `zero_point`: None (symmetric) or a one-element tensor
    (a Python number becomes fp32 `[1]`). Validated on construction.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor | None
    quant_min: int
    quant_max: int

    def __post_init__(self):
        for name in ("scale", "zero_point"):
            value = getattr(self, name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                object.__setattr__(self, name, torch.tensor([float(value)], dtype=torch.float32))
        if self.scale is None:
            raise ValueError("scale: expected a positive float or a float tensor of shape [1]")
        check_act(self.scale, self.zero_point, self.quant_min, self.quant_max)

    def op_args(self) -> tuple:
        """(act_scale, act_zero_point, act_quant_min, act_quant_max) of the ops."""
        return (self.scale, self.zero_point, self.quant_min, self.quant_max)


_FLOAT_ACT = (None, None, None, None)


class PreparedLinear:
    """`lowbit_linear` with its weights, activation quantization and backend fixed: made by
    `prepare_linear`, which validates every argument once; calling it with `x[..., K]` checks
    only x (type, K, device) and gives `lowbit_linear`'s result bit for bit. Eager CPU calls
    skip the dispatcher; graph capture (torch.compile, export, tracing) sees the registered
    op `eqk::lowbit_linear`. The tensors it holds must not be changed in place afterwards.

    Attributes (what it runs with; to change one, prepare again): planes, scale, bits,
    top_bits, K, compensate, bias, weight_zero_point, act (ActQuant or None: float
    activations), backend (resolved), group_size (None or the per-group scales' group),
    device, out_features.
    """

    def __init__(self, planes, scale, bits, top_bits, K, compensate, bias, wzp, act, backend,
                 group_size=None):  # fmt: skip
        self.planes, self.scale, self.bits, self.top_bits = planes, scale, bits, top_bits
        self.K, self.compensate, self.bias, self.weight_zero_point = K, compensate, bias, wzp
        self.act, self.backend, self.group_size = act, backend, group_size
        self.device, self.out_features = planes.device, planes.shape[1]
        act_args = _FLOAT_ACT if act is None else act.op_args()
        weights = (planes, scale, bits, top_bits, K, compensate, bias, wzp)
        self._args = (*weights, *act_args, backend, group_size or 0)

    def check_input(self, x) -> None:
        check_x(x)
        if x.shape[-1] != self.K:
            raise ValueError(f"x: last dimension {x.shape[-1]}; accepted: K={self.K}")
        if x.device != self.device:
            raise ValueError(f"x: on {x.device}; accepted: {self.device} (the weights' device)")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return linear_call(x, self._args)


class PreparedConv2d:
    """`lowbit_conv2d` with its weights, geometry, activation quantization and backend fixed:
    made by `prepare_conv2d`; calling it with `x[B, in_channels, H, W]` checks only x and gives
    `lowbit_conv2d`'s result bit for bit (see `PreparedLinear`).

    Attributes (what it runs with; to change one, prepare again): planes, scale, bits,
    top_bits, geometry (in_channels, kernel_size, stride, padding, dilation, groups; pairs as
    tuples), K, compensate, bias, weight_zero_point, act, backend, group_size, device,
    out_channels.
    """

    def __init__(
        self, planes, scale, bits, top_bits, geometry, compensate, bias, wzp, act, backend,
        group_size=None,
    ):  # fmt: skip
        self.planes, self.scale, self.bits, self.top_bits = planes, scale, bits, top_bits
        self.geometry, self.compensate = geometry, compensate
        self.bias, self.weight_zero_point = bias, wzp
        self.act, self.backend = act, backend
        in_channels, (kh, kw), _, _, _, groups = geometry
        self.K = in_channels // groups * kh * kw
        self.device, self.out_channels = planes.device, planes.shape[1]
        self.group_size = group_size
        act_args = _FLOAT_ACT if act is None else act.op_args()
        self._rest = (compensate, bias, wzp, *act_args, backend, group_size or 0)

    def check_input(self, x) -> None:
        check_x(x)
        check_conv_input(x, self.geometry)
        if x.device != self.device:
            raise ValueError(f"x: on {x.device}; accepted: {self.device} (the weights' device)")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        p = self
        return conv2d_call(x, p.planes, p.scale, p.bits, p.top_bits, p.geometry, p._rest)


def _check_act_quant(act, device):
    if act is None:
        return
    if not isinstance(act, ActQuant):
        raise ValueError(f"act: expected None (float activations) or an ActQuant, got {act!r}")
    check_act(*act.op_args(), device)


def prepare_linear(
    planes: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    top_bits: int,
    *,
    K: int,
    compensate: bool = True,
    bias: torch.Tensor | None = None,
    weight_zero_point: torch.Tensor | None = None,
    act: ActQuant | None = None,
    backend: str | None = None,
    group_size: int | None = None,
) -> PreparedLinear:
    """Validate `lowbit_linear`'s weight arguments and `act` once, resolve the backend for the
    planes' device, repack the weights into the kernel layout the backend reads (a cache tied
    to the planes tensor), and return the callable `PreparedLinear` (`y = prepared(x)`).
    `act=None` is float activations, an `ActQuant` the integer path; `group_size` as in
    `lowbit_linear` (per-group scales)."""
    device = planes.device if isinstance(planes, torch.Tensor) else torch.device("cpu")
    gs = check_group_size(group_size, K)
    check_weights(planes, scale, bits, top_bits, K, bias, weight_zero_point, device, group_size=gs)
    _check_act_quant(act, device)
    name = _resolve(backend, device, "lowbit_linear", act is None)
    if name == "cpp" and act is not None and gs and _ext.has_kernel(GROUP_INT_KERNEL):
        group_weights(planes, bits, K, gs)
    if name == "cpp" and act is not None and not gs and _ext.has_kernel(FUSED_LINEAR):
        if int32_exact(K, max(abs(act.quant_min), abs(act.quant_max)), bits):
            linear_weights(planes, bits, K, 1)
    wzp = weight_zero_point
    return PreparedLinear(
        planes, scale, bits, top_bits, K, bool(compensate), bias, wzp, act, name, gs or None
    )


def prepare_conv2d(
    planes: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    top_bits: int,
    *,
    in_channels: int,
    kernel_size,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    compensate: bool = True,
    bias: torch.Tensor | None = None,
    weight_zero_point: torch.Tensor | None = None,
    act: ActQuant | None = None,
    backend: str | None = None,
    group_size: int | None = None,
) -> PreparedConv2d:
    """`prepare_linear` for `lowbit_conv2d` (same geometry arguments, `group_size` along the
    flattened input dimension); returns the callable `PreparedConv2d` (`y = prepared(x)`)."""
    geometry, K = conv_geometry(in_channels, kernel_size, stride, padding, dilation, groups)
    device = planes.device if isinstance(planes, torch.Tensor) else torch.device("cpu")
    gs = check_group_size(group_size, K)
    check_weights(planes, scale, bits, top_bits, K, bias, weight_zero_point, device, group_size=gs)
    _check_act_quant(act, device)
    check_conv_out_channels(planes, groups)
    name = _resolve(backend, device, "lowbit_conv2d")
    if name == "cpp" and act is not None and not gs and _ext.has_kernel(FUSED_CONV):
        cin_g, (kh, kw) = in_channels // groups, geometry[1]
        if cin_g == 1 or int32_exact(K, 255, bits):
            conv_weights(planes, bits, cin_g, kh, kw, groups)
    wzp = weight_zero_point
    return PreparedConv2d(
        planes, scale, bits, top_bits, geometry, bool(compensate), bias, wzp, act, name,
        gs or None,
    )  # fmt: skip
