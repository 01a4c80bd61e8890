"""torch.library registration of `eqk::lowbit_linear` and `eqk::lowbit_conv2d` (inference ops:
no autograd), and the rule for when a validated call may skip the dispatcher."""

from __future__ import annotations

import torch
from torch.utils import _python_dispatch

from ._lowbit_gemm_checks import conv_out
from ._lowbit_gemm_paths import conv2d_forward, linear_forward


@torch.library.custom_op("eqk::lowbit_linear", mutates_args=())
def _linear_op(
    x: torch.Tensor,
    planes: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    top_bits: int,
    K: int,
    compensate: bool,
    bias: torch.Tensor | None,
    weight_zero_point: torch.Tensor | None,
    act_scale: torch.Tensor | None,
    act_zero_point: torch.Tensor | None,
    act_quant_min: int | None,
    act_quant_max: int | None,
    backend: str,
    group_size: int = 0,
) -> torch.Tensor:
    return linear_forward(
        x,
        planes,
        scale,
        bits,
        top_bits,
        K,
        compensate,
        bias,
        weight_zero_point,
        act_scale,
        act_zero_point,
        act_quant_min,
        act_quant_max,
        backend,
        group_size,
    )


@_linear_op.register_fake
def _(x, planes, *rest):
    return x.new_empty((*x.shape[:-1], planes.shape[1]))


@torch.library.custom_op("eqk::lowbit_conv2d", mutates_args=())
def _conv_op(
    x: torch.Tensor,
    planes: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    top_bits: int,
    in_channels: int,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    compensate: bool,
    bias: torch.Tensor | None,
    weight_zero_point: torch.Tensor | None,
    act_scale: torch.Tensor | None,
    act_zero_point: torch.Tensor | None,
    act_quant_min: int | None,
    act_quant_max: int | None,
    backend: str,
    group_size: int = 0,
) -> torch.Tensor:
    geometry = (in_channels, *(tuple(v) for v in (kernel_size, stride, padding, dilation)), groups)
    return conv2d_forward(
        x,
        planes,
        scale,
        bits,
        top_bits,
        geometry,
        compensate,
        bias,
        weight_zero_point,
        act_scale,
        act_zero_point,
        act_quant_min,
        act_quant_max,
        backend,
        group_size,
    )


@_conv_op.register_fake
def _(x, planes, scale, bits, top_bits, in_channels, kernel_size, stride, padding, dilation, *_):
    oh = conv_out(x.shape[2], kernel_size[0], stride[0], padding[0], dilation[0])
    ow = conv_out(x.shape[3], kernel_size[1], stride[1], padding[1], dilation[1])
    return x.new_empty((x.shape[0], planes.shape[1], oh, ow))


def run_eagerly(x) -> bool:
    """Whether a validated call may skip the custom op's dispatch (~45 us, a tenth of a batch-1
    GEMV): plain eager CPU execution. Graph capture (dynamo, export, jit tracing), fake or
    meta tensors and Python dispatch modes see the registered op."""
    return (
        x.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and type(x) is torch.Tensor  # not a fake tensor or another subclass
        and not _python_dispatch.is_in_torch_dispatch_mode()  # fake mode, op counters
    )


def linear_call(x, args: tuple) -> torch.Tensor:
    """`lowbit_linear` on validated op arguments `args` (the schema after x)."""
    if run_eagerly(x):
        return linear_forward(x, *args)
    return torch.ops.eqk.lowbit_linear.default(x, *args)


def conv2d_call(x, planes, scale, bits, top_bits, geometry, rest: tuple) -> torch.Tensor:
    """`lowbit_conv2d` on validated arguments; `rest` = the schema's arguments after groups."""
    if run_eagerly(x):
        return conv2d_forward(x, planes, scale, bits, top_bits, geometry, *rest)
    in_channels, kernel_size, stride, padding, dilation, groups = geometry
    lists = (list(kernel_size), list(stride), list(padding), list(dilation))
    return torch.ops.eqk.lowbit_conv2d.default(
        x, planes, scale, bits, top_bits, in_channels, *lists, groups, *rest
    )
