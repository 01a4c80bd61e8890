"""Routing of the fused C++ integer path (csrc/lowbit_gemm/lowbit_fused_cpu.cpp): activation
quantization, integer GEMM, code sums and epilogue in one call, on weights decoded or repacked
once per planes tensor (`_lowbit_gemm_weights.packed_weights`).

The thresholds and layout tags are the C++ file's own constants, read from `eqkernels._C`:
`LOWBIT_DECODED_MIN_M` (rows from which the fused linear feeds decoded int8 weights to the
int8 GEMM; below it, the bit-serial GEMV straight from the planes), `LOWBIT_TILED_MAX_K` (the
tiled-plane kernel's int32 lanes are exact below it), `PACKED_LAYOUTS` and `ISA_LEVELS`.
"""

from __future__ import annotations

import functools

import torch

from .. import _ext
from ..backend import cpu_isa_cap
from ._lowbit_gemm_weights import cached_rowsums, packed_weights

FUSED_LINEAR = "lowbit_linear_int_fused_cpu"
FUSED_CONV = "lowbit_conv2d_int_fused_cpu"


@functools.cache
def fused_constants() -> tuple[int, int, int, dict[str, int]]:
    """(decoded min M, tiled max K, ISA level of the tiled kernel, packed layout tags)."""
    C = _ext.ext()
    return (
        int(C.LOWBIT_DECODED_MIN_M),
        int(C.LOWBIT_TILED_MAX_K),
        int(C.ISA_LEVELS["avx512gfni"]),
        dict(C.PACKED_LAYOUTS),
    )


def int32_exact(K, max_x, bits):
    """Whether K products of |code| <= max_x and a `bits`-bit weight sum exactly in int32."""
    return K * max_x * (1 << (bits - 1)) < 2**31


def linear_weights(planes, bits, K, M):
    """(kernel weights or None, weight code row sums) the fused linear uses for M rows."""
    min_m, max_k, isa_tiled, layouts = fused_constants()
    if K < max_k and _ext.kernel("bitplanes_cpu_isa")(cpu_isa_cap()) >= isa_tiled:
        # Tiled planes, decoded in registers for any M (reads bits/8 bytes per weight).
        return packed_weights(planes, bits, K, K, 1, 1, 1, layouts["tiled"])
    if M >= min_m:
        return packed_weights(planes, bits, K, K, 1, 1, 1, layouts["decoded"])
    return None, cached_rowsums(planes, bits, K)


def conv_weights(planes, bits, cin_g, kh, kw, groups):
    """(kernel weights, weight code row sums) of the fused conv2d."""
    layouts = fused_constants()[3]
    layout = layouts["decoded"] if cin_g == 1 else layouts["k4n16"]
    return packed_weights(planes, bits, cin_g * kh * kw, cin_g, kh, kw, groups, layout)


def fused_linear(x2, planes, scale, bits, top_bits, K, c, bias, weight_zero_point, act):
    """The cpp integer linear in one C++ call, or None when it does not apply.

    `act` = (act_scale, act_zero_point, quant_min, quant_max)."""
    if x2.dtype != torch.float32 or not _ext.has_kernel(FUSED_LINEAR):
        return None
    act_scale, act_zero_point, qmin, qmax = act
    if not int32_exact(K, max(abs(qmin), abs(qmax)), bits):
        return None  # long K: the chunked path
    decoded, wsum = linear_weights(planes, bits, K, x2.shape[0])
    return _ext.kernel(FUSED_LINEAR)(
        x2, planes[:bits].contiguous(), bits, decoded, wsum, scale,
        float(2 ** (top_bits - bits)), c, weight_zero_point, bias, act_scale, act_zero_point,
        qmin, qmax, cpu_isa_cap(),
    )  # fmt: skip


def fused_conv(x, planes, scale, bits, top_bits, geometry, c, bias, weight_zero_point, act):
    """The cpp integer conv2d in one C++ call (quantize, channels-last im2col on byte codes,
    int8 GEMM per group or a direct depthwise loop, epilogue), or None when it does not apply.

    `geometry` = (in_channels, kernel_size, stride, padding, dilation, groups) with pairs."""
    if x.dtype != torch.float32 or not _ext.has_kernel(FUSED_CONV):
        return None
    in_channels, (kh, kw), stride, padding, dilation, groups = geometry
    act_scale, act_zero_point, qmin, qmax = act
    cin_g = in_channels // groups
    # The packed GEMM multiplies unsigned bytes (codes shifted into 0..255) by the weights.
    if cin_g > 1 and not int32_exact(cin_g * kh * kw, 255, bits):
        return None
    packed, wsum = conv_weights(planes, bits, cin_g, kh, kw, groups)
    return _ext.kernel(FUSED_CONV)(
        x, packed, wsum, bits, planes.shape[1], kh, kw, *stride, *padding, *dilation, groups,
        scale, float(2 ** (top_bits - bits)), c, weight_zero_point, bias, act_scale,
        act_zero_point, qmin, qmax, cpu_isa_cap(),
    )  # fmt: skip
