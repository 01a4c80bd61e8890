"""Integer inference layers of a deployed model (issue 7 item 2).

`IntConv2d` / `IntLinear` replace the quantized layers of the float network: their weights are
canonical bit planes (a file prefix may hold exactly the planes the width needs), their input
activation is quantized inside `eqkernels.lowbit_conv2d` / `lowbit_linear` to uint8/int8 codes
(integer accumulation, DESIGN.md "Bit planes and the low-bit GEMM"), and a BatchNorm that
followed the layer is applied as an output-side per-channel affine `y = mul * conv(x) + add`
(fold.py). When every `mul` is positive it is merged into the op's per-channel output scale
and `add` becomes the op's bias, so the whole layer is one op call; the weight codes are
untouched either way (they are the planes every width shares).

Everything else of the network (ReLU, pooling, residual adds, float first/last layers) stays
the float model's own modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import eqkernels
from eqkernels.backend import choose


def _resolve_backend(backend: str | None, device: torch.device, op: str) -> str | None:
    """The backend name the public op would pick, or None if it cannot be known here."""
    try:
        from eqkernels.ops.lowbit_gemm import _KERNELS, _PREFERENCE
    except ImportError:
        return None
    return choose(backend, device, op, _PREFERENCE, _KERNELS)


def _op(registered, unchecked: str):
    """The registered op when traced (torch.compile, export), else its implementation called
    directly: in eager mode the dispatcher's per-call cost is a large share of a batch-1
    layer's time."""
    if torch.compiler.is_compiling():
        return registered
    try:
        from eqkernels.ops import lowbit_gemm
    except ImportError:
        return registered
    return getattr(lowbit_gemm, unchecked, registered)


@dataclass
class LayerTensors:
    """What one quantized layer runs with at one choice (all CPU/device tensors)."""

    planes: torch.Tensor  # int32 [>= bits, N, ceil(K/32)]
    scale: torch.Tensor  # fp32 [1] or [N], the top-width step
    bits: int
    top_bits: int
    weight_zero_point: torch.Tensor | None  # int32 [N] (asymmetric weights)
    act_scale: torch.Tensor  # fp32 [1]
    act_zero_point: torch.Tensor | None  # fp32 [1], integer-valued
    act_quant_min: int
    act_quant_max: int
    mul: torch.Tensor | None  # fp32 [N], folded BN multiplier
    add: torch.Tensor | None  # fp32 [N], folded BN shift (+ mul * conv bias), or the bias


class _IntLayer(nn.Module):
    backend: str | None = None

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features
        self.bits = 0
        self.top_bits = 0
        self.act_quant_min = 0
        self.act_quant_max = 0
        # Non-persistent: the float state_dict of the deployed network stays the float model's.
        for name in (
            "planes",
            "scale",
            "weight_zero_point",
            "act_scale",
            "act_zero_point",
            "bias",
            "out_mul",
            "out_add",
        ):
            self.register_buffer(name, None, persistent=False)

    # After one call through the public op (which validates every argument and the values of
    # the scales), the same arguments go straight to the registered op: at batch 1 the
    # argument checks (with their host syncs) cost as much as the small convolutions.
    _fast: tuple | None = None

    def set_tensors(self, t: LayerTensors) -> None:
        """Switch to another width/form in place (no reallocation of the module)."""
        self._fast = None
        N = self.out_features
        if t.planes.shape[1] != N or t.planes.shape[0] < t.bits:
            raise ValueError(
                f"planes: shape {tuple(t.planes.shape)} does not hold {t.bits} planes of {N} rows"
            )
        self.planes = t.planes
        self.bits, self.top_bits = int(t.bits), int(t.top_bits)
        self.weight_zero_point = t.weight_zero_point
        self.act_scale, self.act_zero_point = t.act_scale, t.act_zero_point
        self.act_quant_min, self.act_quant_max = int(t.act_quant_min), int(t.act_quant_max)
        scale = t.scale.reshape(-1)
        self.out_mul = self.out_add = None
        if t.mul is None:
            self.scale, self.bias = scale, t.add
        elif bool(torch.all(t.mul > 0)):
            # y = mul * (s_a s_b acc') + add: the positive per-channel mul scales s_b exactly as
            # the op's epilogue would (one more fp32 rounding), so one op call does it all.
            self.scale = (scale.expand(N) * t.mul).contiguous()
            self.bias = t.add
        else:
            # The op requires positive scales: keep the affine as a separate multiply-add.
            self.scale, self.bias = scale, None
            self.out_mul, self.out_add = t.mul, t.add

    def _affine(self, y: torch.Tensor) -> torch.Tensor:
        if self.out_mul is None:
            return y
        shape = (1, -1) + (1,) * (y.dim() - 2)
        return y * self.out_mul.view(shape) + self.out_add.view(shape)

    def act_args(self) -> dict:
        return {
            "act_scale": self.act_scale,
            "act_zero_point": self.act_zero_point,
            "act_quant_min": self.act_quant_min,
            "act_quant_max": self.act_quant_max,
        }

    def plane_bytes(self) -> int:
        """Bytes of weight planes one forward reads (the first `bits` planes)."""
        if self.planes is None:
            return 0
        return self.bits * self.planes.shape[1] * self.planes.shape[2] * 4


class IntConv2d(_IntLayer):
    """Conv2d on bit planes with integer activations (eqkernels.lowbit_conv2d)."""

    def __init__(self, geometry: dict):
        super().__init__(geometry["out_channels"])
        self.in_channels = geometry["in_channels"]
        self.kernel_size = tuple(geometry["kernel_size"])
        self.stride = tuple(geometry["stride"])
        self.padding = tuple(geometry["padding"])
        self.dilation = tuple(geometry["dilation"])
        self.groups = geometry["groups"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = self._fast
        if fast is not None and fast[0] == (x.device, x.dtype):
            y = _op(torch.ops.eqk.lowbit_conv2d.default, "lowbit_conv2d_unchecked")(
                x, self.planes, self.scale, self.bits, self.top_bits, self.in_channels,
                *fast[1:5], self.groups, True, self.bias, self.weight_zero_point,
                self.act_scale, self.act_zero_point, self.act_quant_min, self.act_quant_max,
                fast[-1],
            )  # fmt: skip
            return self._affine(y)
        y = eqkernels.lowbit_conv2d(
            x,
            self.planes,
            self.scale,
            self.bits,
            self.top_bits,
            in_channels=self.in_channels,
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias,
            weight_zero_point=self.weight_zero_point,
            backend=self.backend,
            **self.act_args(),
        )
        name = _resolve_backend(self.backend, x.device, "lowbit_conv2d")
        if name is not None:
            geometry = [list(self.kernel_size), list(self.stride), list(self.padding)]
            self._fast = ((x.device, x.dtype), *geometry, list(self.dilation), name)
        return self._affine(y)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_features}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, groups={self.groups}, "
            f"W{self.bits}/{self.top_bits} A[{self.act_quant_min}, {self.act_quant_max}]"
        )


class IntLinear(_IntLayer):
    """Linear on bit planes with integer activations (eqkernels.lowbit_linear)."""

    def __init__(self, geometry: dict):
        super().__init__(geometry["out_features"])
        self.in_features = geometry["in_features"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = self._fast
        if fast is not None and fast[0] == (x.device, x.dtype):
            y = _op(torch.ops.eqk.lowbit_linear.default, "lowbit_linear_unchecked")(
                x, self.planes, self.scale, self.bits, self.top_bits, self.in_features, True,
                self.bias, self.weight_zero_point, self.act_scale, self.act_zero_point,
                self.act_quant_min, self.act_quant_max, fast[1],
            )  # fmt: skip
        else:
            y = eqkernels.lowbit_linear(
                x,
                self.planes,
                self.scale,
                self.bits,
                self.top_bits,
                K=self.in_features,
                bias=self.bias,
                weight_zero_point=self.weight_zero_point,
                backend=self.backend,
                **self.act_args(),
            )
            name = _resolve_backend(self.backend, x.device, "lowbit_linear")
            if name is not None:
                self._fast = ((x.device, x.dtype), name)
        if self.out_mul is None:
            return y
        return y * self.out_mul + self.out_add

    def extra_repr(self) -> str:
        return (
            f"{self.in_features}, {self.out_features}, "
            f"W{self.bits}/{self.top_bits} A[{self.act_quant_min}, {self.act_quant_max}]"
        )


def int_layer(geometry: dict) -> _IntLayer:
    if geometry["kind"] == "conv2d":
        return IntConv2d(geometry)
    if geometry["kind"] == "linear":
        return IntLinear(geometry)
    raise NotImplementedError(f"integer layer kind {geometry['kind']!r} is not implemented")
