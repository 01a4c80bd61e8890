"""Argument checks of the low-bit linear and conv2d (public ops and prepared calls): every bad
argument raises a one-line ValueError naming it and the accepted values."""

from __future__ import annotations

import math

import torch

from ..backend import check_values_enabled
from .bitplanes import check_bits, check_planes


def is_float_tensor(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype.is_floating_point


# The smallest scale accepted: the smallest normal fp32 (2^-126), so fl32(1/s) is finite.
MIN_SCALE = torch.finfo(torch.float32).tiny


def _positive_finite(t):
    # One value (the common per-tensor case) as a Python float: three tensor ops cost ~20 us
    # per call, a fifth of a batch-1 layer.
    if t.numel() == 1:
        v = float(t.reshape(()))
        return math.isfinite(v) and v >= MIN_SCALE
    return bool(torch.all((t >= MIN_SCALE) & torch.isfinite(t)))


def check_x(x) -> None:
    if not is_float_tensor(x):
        raise ValueError("x: expected a floating-point tensor")


def check_group_size(group_size, K) -> int:
    """None (per-tensor or per-channel scales) -> 0; else a multiple of 32 dividing K."""
    if group_size is None:
        return 0
    if (
        isinstance(group_size, bool)
        or not isinstance(group_size, int)
        or group_size < 32
        or group_size % 32
        or K % group_size
    ):
        raise ValueError(
            f"group_size={group_size!r}: accepted values are None or a multiple of 32 dividing K={K}"
        )
    return group_size


def check_weights(
    planes, scale, bits, top_bits, K, bias, weight_zero_point, dev=None, x=None, group_size=0
):
    """The weight-side arguments, on device `dev` (or x's: x, when given, is checked first
    after the widths); `group_size` > 0 (checked by check_group_size): scales per group."""
    check_bits(bits)
    check_bits(top_bits, "top_bits", bits, 8)
    if x is not None:
        check_x(x)
        dev = x.device
    check_planes(planes, bits, K)
    N = planes.shape[1]
    for name, t in (("planes", planes), ("scale", scale)):
        if isinstance(t, torch.Tensor) and t.device != dev:
            raise ValueError(f"{name}: on {t.device}, x on {dev}; accepted: the same device")
    if group_size:
        G = K // group_size
        if not is_float_tensor(scale) or tuple(scale.shape) != (N, G):
            raise ValueError(
                f"scale: expected a float tensor of shape [N={N}, K/group_size={G}] with "
                f"group_size={group_size}, got {getattr(scale, 'shape', scale)!r}"
            )
    elif not is_float_tensor(scale) or scale.numel() not in (1, N) or scale.dim() > 1:
        raise ValueError(
            f"scale: expected a float tensor of shape [1], [] or [N={N}], got "
            f"{getattr(scale, 'shape', scale)!r}"
        )
    if check_values_enabled(scale) and not _positive_finite(scale):
        raise ValueError("scale: accepted values are finite and >= 2^-126 (1/scale finite)")
    if bias is not None and (not is_float_tensor(bias) or tuple(bias.shape) != (N,)):
        raise ValueError(f"bias: expected None or a float tensor of shape [N={N}]")
    if weight_zero_point is not None:
        z = weight_zero_point
        if group_size:
            if not isinstance(z, torch.Tensor) or tuple(z.shape) not in ((N,), tuple(scale.shape)):
                raise ValueError(
                    f"weight_zero_point: expected None or a tensor of shape [N={N}] or "
                    f"[N, K/group_size]={list(scale.shape)}"
                )
        elif not isinstance(z, torch.Tensor) or z.numel() not in (1, N) or z.dim() > 1:
            raise ValueError(f"weight_zero_point: expected None or a tensor of shape [N={N}]")
        zd = z.double()
        if check_values_enabled(z) and not bool(torch.all((zd == torch.round(zd)) & zd.isfinite())):
            raise ValueError("weight_zero_point: accepted values are finite integers")


def check_act(act_scale, act_zero_point, act_quant_min, act_quant_max, dev=None) -> None:
    """The activation quantization arguments (all None: float activations); `dev`, when given,
    is the device they must be on."""
    if act_scale is None:
        given = [
            n
            for n, v in (
                ("act_zero_point", act_zero_point),
                ("act_quant_min", act_quant_min),
                ("act_quant_max", act_quant_max),
            )
            if v is not None
        ]
        if given:
            raise ValueError(f"{given[0]}: only accepted together with act_scale")
        return
    if not is_float_tensor(act_scale) or act_scale.numel() != 1:
        raise ValueError("act_scale: expected None or a per-tensor float tensor of shape [1]")
    if check_values_enabled(act_scale) and not _positive_finite(act_scale):
        raise ValueError("act_scale: accepted values are finite and >= 2^-126 (1/scale finite)")
    if act_zero_point is not None and (
        not isinstance(act_zero_point, torch.Tensor) or act_zero_point.numel() != 1
    ):
        raise ValueError("act_zero_point: expected None or a tensor of shape [1]")
    if (
        act_zero_point is not None
        and check_values_enabled(act_zero_point)
        and not math.isfinite(float(act_zero_point.reshape(())))
    ):
        raise ValueError("act_zero_point: accepted values are finite")
    for name, v in (("act_quant_min", act_quant_min), ("act_quant_max", act_quant_max)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(
                f"{name}={v!r}: accepted values are integers (required with act_scale)"
            )
    if act_quant_min >= act_quant_max:
        raise ValueError(
            f"act_quant_min={act_quant_min}, act_quant_max={act_quant_max}: accepted "
            "act_quant_min < act_quant_max"
        )
    if act_quant_min >= 0 and act_quant_max > 255:
        raise ValueError(f"act_quant_max={act_quant_max}: accepted values are <= 255 (uint8)")
    if act_quant_min < 0 and (act_quant_min < -128 or act_quant_max > 127):
        raise ValueError(
            f"act_quant_min={act_quant_min}, act_quant_max={act_quant_max}: a signed range "
            "must lie in [-128, 127]"
        )
    if dev is None:
        return
    for name, t in (("act_scale", act_scale), ("act_zero_point", act_zero_point)):
        if isinstance(t, torch.Tensor) and t.device != dev:
            raise ValueError(f"{name}: on {t.device}, x on {dev}; accepted: the same device")


def pair(v, name, lo):
    """An int or a pair of ints >= lo, as a tuple of two ints."""
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    if (
        not isinstance(v, (tuple, list))
        or len(v) != 2
        or not all(isinstance(i, int) and not isinstance(i, bool) and i >= lo for i in v)
    ):
        raise ValueError(f"{name}={v!r}: accepted values are an integer >= {lo} or a pair of them")
    return (int(v[0]), int(v[1]))


def conv_out(size, k, s, p, d):
    """Output length of a convolution along one dimension."""
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def conv_geometry(in_channels, kernel_size, stride, padding, dilation, groups):
    """(in_channels, kernel_size, stride, padding, dilation, groups), pairs normalized, and K."""
    kernel_size = pair(kernel_size, "kernel_size", 1)
    stride = pair(stride, "stride", 1)
    padding = pair(padding, "padding", 0)
    dilation = pair(dilation, "dilation", 1)
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels={in_channels!r}: accepted values are integers >= 1")
    if (
        isinstance(groups, bool)
        or not isinstance(groups, int)
        or groups < 1
        or in_channels % groups
    ):
        raise ValueError(f"groups={groups!r}: accepted values are divisors of in_channels")
    K = in_channels // groups * kernel_size[0] * kernel_size[1]
    return (in_channels, kernel_size, stride, padding, dilation, groups), K


def check_conv_out_channels(planes, groups) -> None:
    if planes.shape[1] % groups:
        raise ValueError(
            f"groups={groups}: accepted values divide the output channels ({planes.shape[1]})"
        )


def check_conv_input(x, geometry) -> None:
    """x is [B, in_channels, H, W] and at least as large as the dilated kernel."""
    in_channels, kernel_size, stride, padding, dilation, _ = geometry
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(
            f"x: shape {tuple(x.shape)}; accepted: [B, in_channels={in_channels}, H, W]"
        )
    for i, name in ((2, "height"), (3, "width")):
        j = i - 2
        if conv_out(x.shape[i], kernel_size[j], stride[j], padding[j], dilation[j]) < 1:
            raise ValueError(f"x: {name} {x.shape[i]} is smaller than the dilated kernel")
