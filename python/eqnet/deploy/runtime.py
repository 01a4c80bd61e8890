"""Integer inference layers of a deployed model.

`IntConv2d` / `IntLinear` replace the quantized layers of the float network: their weights are
canonical bit planes (a file prefix may hold exactly the planes the width needs), their input
activation is quantized inside the low-bit ops to uint8/int8 codes (integer accumulation, DESIGN.md
"Bit planes and the low-bit GEMM"); each layer runs one prepared call
(`eqkernels.prepare_conv2d` / `prepare_linear`: validated and repacked once per width, rebuilt
when the width or the device changes), and a BatchNorm that
followed the layer is applied as an output-side per-channel affine `y = mul * conv(x) + add`
(fold.py). When every `mul` is positive it is merged into the op's per-channel output scale
and `add` becomes the op's bias, so the whole layer is one op call; the weight codes are
untouched either way (they are the planes every width shares).

Everything else of the network (ReLU, pooling, residual adds, float first/last layers) stays
the float model's own modules.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

import eqkernels
from eqkernels import ActQuant


@dataclass
class LayerTensors:
    """What one quantized layer runs with at one choice (all CPU/device tensors)."""

    planes: torch.Tensor  # int32 [>= bits, N, ceil(K/32)]
    scale: torch.Tensor  # fp32 [1], [N] or [N, K / group_size], the top-width step
    bits: int
    top_bits: int
    weight_zero_point: torch.Tensor | None  # int32 [N] or [N, K / g] (asymmetric weights)
    act_scale: torch.Tensor | None  # fp32 [1]; None: float activation (weight-only)
    act_zero_point: torch.Tensor | None  # fp32 [1], integer-valued
    act_quant_min: int
    act_quant_max: int
    mul: torch.Tensor | None  # fp32 [N], folded BN multiplier
    add: torch.Tensor | None  # fp32 [N], folded BN shift (+ mul * conv bias), or the bias
    group_size: int | None = None  # per-group scales: columns per scale


class _IntLayer(nn.Module):
    _backend: str | None = None

    @property
    def backend(self) -> str | None:
        """The low-bit ops' backend (None: EQK_BACKEND or auto)."""
        return self._backend

    @backend.setter
    def backend(self, value: str | None) -> None:
        self._backend = value
        self._prepared = None

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features
        self.bits = 0
        self.top_bits = 0
        self.group_size: int | None = None
        self.layer_name = type(self).__name__  # the loader sets the layer's path
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

    # The prepared op of the current tensors (made on the first forward): at batch 1 the
    # argument checks (with their host syncs) cost as much as the small convolutions, so they
    # run once per width, not per call.
    _prepared = None

    def _apply(self, fn, *args, **kwargs):
        self._prepared = None  # .to() / .cuda() replace the buffers the prepared op holds
        return super()._apply(fn, *args, **kwargs)

    def __getattr__(self, name: str):
        # A parent that reads `.weight` would compute with a float weight and float
        # activations around this layer: say so instead of nn.Module's bare "no attribute".
        if name == "weight":
            raise AttributeError(
                f"{type(self).__name__} holds bit planes, not a float weight: its parent reads "
                "`.weight` and so bypasses the integer layer; convert that parent too, or leave "
                "the layer float with convert(..., exclude=[...])"
            )
        return super().__getattr__(name)

    def prepared(self):
        """The prepared op of the current tensors (made on first use, once per width)."""
        op = self._prepared
        if op is None:
            op = self.prepare_now()
        return op

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        return self.prepared()(x)

    def prepare_now(self):
        """Prepare the op of the current tensors; a form the kernels do not implement raises
        NotImplementedError naming this layer."""
        try:
            self._prepared = self.prepare()
        except NotImplementedError as exc:
            raise NotImplementedError(f"layer {self.layer_name!r}: {exc}") from exc
        return self._prepared

    def group_args(self, op) -> dict:
        """`group_size=` for `op` when the scales are per group; NotImplementedError when
        `op` takes no per-group scales."""
        if not self.group_size:
            return {}
        if "group_size" not in inspect.signature(op).parameters:
            raise NotImplementedError(
                f"per-group weight scales (group_size={self.group_size}) are not implemented by "
                f"eqkernels.{op.__name__}; export this layer with per-channel weights"
            )
        return {"group_size": self.group_size}

    def act_repr(self) -> str:
        if self.act_scale is None:
            return "A float"
        return f"A[{self.act_quant_min}, {self.act_quant_max}]"

    def act_quant(self) -> ActQuant | None:
        """The input quantizer of the op; None runs the float-activation path."""
        if self.act_scale is None:
            return None
        return ActQuant(self.act_scale, self.act_zero_point, self.act_quant_min, self.act_quant_max)

    def set_tensors(self, t: LayerTensors) -> None:
        """Switch to another width/form in place (no reallocation of the module)."""
        self._prepared = None
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
        self.group_size = t.group_size
        scale = t.scale if t.group_size else t.scale.reshape(-1)
        self.out_mul = self.out_add = None
        if t.mul is None:
            self.scale, self.bias = scale, t.add
        elif bool(torch.all(t.mul > 0)):
            # y = mul * (s_a s_b acc') + add: the positive per-channel mul scales s_b exactly as
            # the op's epilogue would (one more fp32 rounding), so one op call does it all.
            mul = t.mul[:, None] if t.group_size else t.mul
            self.scale = ((scale if t.group_size else scale.expand(N)) * mul).contiguous()
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

    def prepare(self):
        """The prepared `eqkernels.lowbit_conv2d` of the current tensors."""
        return eqkernels.prepare_conv2d(
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
            act=self.act_quant(),
            backend=self.backend,
            **self.group_args(eqkernels.prepare_conv2d),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._affine(self._run(x))

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_features}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, groups={self.groups}, "
            f"W{self.bits}/{self.top_bits} {self.act_repr()}"
        )


class IntLinear(_IntLayer):
    """Linear on bit planes with integer activations (eqkernels.lowbit_linear)."""

    def __init__(self, geometry: dict):
        super().__init__(geometry["out_features"])
        self.in_features = geometry["in_features"]

    def prepare(self):
        """The prepared `eqkernels.lowbit_linear` of the current tensors."""
        return eqkernels.prepare_linear(
            self.planes,
            self.scale,
            self.bits,
            self.top_bits,
            K=self.in_features,
            bias=self.bias,
            weight_zero_point=self.weight_zero_point,
            act=self.act_quant(),
            backend=self.backend,
            **self.group_args(eqkernels.prepare_linear),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._run(x)
        if self.out_mul is None:
            return y
        return y * self.out_mul + self.out_add

    def extra_repr(self) -> str:
        return (
            f"{self.in_features}, {self.out_features}, "
            f"W{self.bits}/{self.top_bits} {self.act_repr()}"
            + (f", group_size={self.group_size}" if self.group_size else "")
        )


def int_layer(geometry: dict) -> _IntLayer:
    if geometry["kind"] == "conv2d":
        return IntConv2d(geometry)
    if geometry["kind"] == "linear":
        return IntLinear(geometry)
    raise NotImplementedError(f"integer layer kind {geometry['kind']!r} is not implemented")
