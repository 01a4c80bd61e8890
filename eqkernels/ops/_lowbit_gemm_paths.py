"""The low-bit linear and conv2d computations behind the registered ops (arguments already
validated, backend resolved): the float-activation path, the integer path (activation codes,
exact integer accumulation, float64 epilogue) and the fused C++ integer path."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _ext
from ..backend import BackendUnavailable, cpu_isa_cap, triton_importable
from ._fake_quant_ref import quantize_codes, rounded_zero_point
from ._lowbit_gemm_fused import fused_conv, fused_linear
from ._lowbit_gemm_group import group_int_linear
from ._lowbit_gemm_nonfinite import (
    all_finite,
    finite_stand_in,
    nan_receptive_fields,
    nan_rows,
)
from ._lowbit_gemm_weights import compensation, dequantized, rowsums, step, unpack
from .bitplanes import unpack_bitplanes_ref

# The `_C` integer accumulation kernel of each backend.
INT_KERNELS = {"cpp": "lowbit_gemm_int_cpu", "cuda": "lowbit_gemm_int_cuda"}

# The cpp float-activation GEMM; builds without it fall back to the two paths below.
FLOAT_KERNEL = "lowbit_linear_float_cpu"

# Backends whose fp16/bf16 float-activation path is the Triton GEMM (eqkernels/triton).
TRITON_FLOAT_BACKENDS = ("triton", "cuda")
TRITON_FLOAT_ONLY = (
    "lowbit_linear: backend='triton' runs float activations only (act_scale=None); "
    "integer activations run on 'cpp', 'cuda' or 'torch'"
)

# Below this many activation rows the cpp fallback uses the bit-serial kernel (reads only the
# planes); above it, decoding the weights once and calling the float GEMM wins.
FLOAT_BITSERIAL_MAX_M = 8

# Above this many groups the integer conv accumulates the codes in a float64 convolution
# (exact: every partial sum is an integer far below 2^53) instead of one GEMM per group.
GROUP_LOOP_MAX = 8


def code_dtype(qmin):
    """uint8 codes for a range starting at >= 0, else int8."""
    return torch.uint8 if qmin >= 0 else torch.int8


def _activation_codes(x, act_scale, act_zero_point, qmin, qmax):
    """(codes of x as float32 integers, the rounded zero point as a float32 0-d tensor)."""
    codes = quantize_codes(x, act_scale.reshape(()), act_zero_point, qmin, qmax)
    return codes, rounded_zero_point(act_zero_point, x)


def int_accumulate(xq, planes, bits, qmin, qmax, backend):
    """sum_k xq[m,k] * q_b[n,k] exactly, as int64 [M, N]. xq: int8/uint8 [M, K]."""
    _M, K = xq.shape
    if backend == "torch":
        q = unpack_bitplanes_ref(planes, bits, K).to(torch.int64)
        return xq.to(torch.int64) @ q.T
    # int32 accumulation is exact while K * max|xq| * max|q_b| < 2^31: split K into chunks of
    # whole 32-column words otherwise, and sum the chunks in int64.
    max_x = max(abs(qmin), abs(qmax))
    max_w = 1 << (bits - 1)
    chunk = ((2**31 - 1) // max(max_x * max_w, 1)) // 32 * 32
    fn = _ext.kernel(INT_KERNELS[backend])
    extra = (cpu_isa_cap(),) if backend == "cpp" else ()
    if K <= chunk:
        return fn(xq.contiguous(), planes[:bits].contiguous(), bits, *extra).to(torch.int64)
    total = None
    for k0 in range(0, K, chunk):
        k1 = min(K, k0 + chunk)
        part = fn(
            xq[:, k0:k1].contiguous(),
            planes[:bits, :, k0 // 32 : (k1 + 31) // 32].contiguous(),
            bits,
            *extra,
        ).to(torch.int64)
        total = part if total is None else total + part
    return total


def epilogue(acc, xsum, rowsum, z_r, K, c, s_a, s_b, weight_zero_point, bias, out_dtype):
    """y = s_a s_b (acc - z_a rowsum + (c - z_w)(xsum - K z_a)) + bias, in float64.

    acc int64 [..., N] (N last); xsum int64 [..., 1]; rowsum int64 [N] or None."""
    z = z_r.to(torch.float64)
    total = acc.to(torch.float64)
    if rowsum is not None:
        total = total - z * rowsum.to(torch.float64)
    cw = torch.full_like(s_b, c, dtype=torch.float64)
    if weight_zero_point is not None:
        cw = cw - weight_zero_point.to(torch.float64)
    total = total + (xsum.to(torch.float64) - K * z) * cw
    y = total * (s_a.reshape(()).to(torch.float64) * s_b.to(torch.float64))
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(out_dtype)


def _needs_rowsums(x, act_zero_point, z_r):
    return act_zero_point is not None and (x.device.type != "cpu" or bool(z_r != 0))


def _scale_and_offset(s_b, c, weight_zero_point, N):
    """(s_b, c - z_w) as contiguous fp32 [N, G] (G = 1 per channel)."""
    G = s_b.shape[1] if s_b.dim() == 2 else 1
    scale = s_b.to(torch.float32).reshape(N, G).contiguous()
    cz = torch.full((N, G), c, dtype=torch.float32, device=s_b.device)
    if weight_zero_point is not None:
        z = weight_zero_point.to(torch.float32)
        cz = cz - (z if z.dim() == 2 else z.reshape(N, 1))
    return scale, cz.contiguous()


def _float_kernel_linear(x2, planes, bits, K, c, s_b, weight_zero_point):
    """The C++ float-activation GEMM (plane panels decoded per cache block, fp32 FMA or
    vdpbf16ps) with one scale and one `c - z_w` per output row."""
    N = planes.shape[1]
    scale, cz = _scale_and_offset(s_b, c, weight_zero_point, N)
    G = scale.shape[1]
    # bf16 panels hold q + c - z exactly while it needs <= 8 significant bits: true for nested
    # widths (z = 0) and for integer zero points without compensation (c = 0).
    exact_bf16 = weight_zero_point is None or c == 0.0
    xk = x2 if x2.dtype == torch.float32 or (x2.dtype == torch.bfloat16 and exact_bf16) else None
    xk = (x2.to(torch.float32) if xk is None else xk).contiguous()
    kernel = _ext.kernel(FLOAT_KERNEL)
    return kernel(xk, planes[:bits].contiguous(), bits, K, scale, cz, K // G, cpu_isa_cap())


def _float_linear(x2, planes, bits, K, c, s_b, bias, weight_zero_point, backend):
    N = planes.shape[1]
    per_group = s_b.dim() == 2
    if backend == "cpp" and _ext.has_kernel(FLOAT_KERNEL):
        y = _float_kernel_linear(x2, planes, bits, K, c, s_b, weight_zero_point)
    elif (
        backend in TRITON_FLOAT_BACKENDS
        and x2.dtype in (torch.float16, torch.bfloat16)
        and triton_importable()
    ):
        from ..triton.lowbit_gemm import float_gemm  # imports triton: only when it runs

        scale, cz = _scale_and_offset(s_b, c, weight_zero_point, N)
        y = float_gemm(x2.contiguous(), planes[:bits].contiguous(), bits, K, scale, cz)
    elif backend == "cpp" and x2.shape[0] <= FLOAT_BITSERIAL_MAX_M and not per_group:
        xf = x2.to(torch.float32).contiguous()
        acc = _ext.kernel("lowbit_gemm_float_cpu")(
            xf, planes[:bits].contiguous(), bits, cpu_isa_cap()
        )
        cw = torch.full((N,), c, dtype=torch.float32, device=x2.device)
        if weight_zero_point is not None:
            cw = cw - weight_zero_point.to(torch.float32).reshape(-1)
        y = (acc + xf.sum(1, keepdim=True) * cw) * s_b
    else:
        w = dequantized(planes, bits, K, s_b, c, weight_zero_point, backend)
        y = x2.to(torch.float32) @ w.T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y


def linear_forward(
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
    group_size=0,
):
    """`lowbit_linear` on validated arguments (the registered op's schema)."""
    N = planes.shape[1]
    if backend == "triton" and act_scale is not None:
        raise BackendUnavailable(TRITON_FLOAT_ONLY)
    if group_size:
        scale = scale.reshape(N, K // group_size)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    c = compensation(top_bits - bits) if compensate else 0.0
    act = (act_scale, act_zero_point, act_quant_min, act_quant_max)
    if not all_finite(x2):  # the rules of _lowbit_gemm_nonfinite, the same for every backend
        if act_scale is None:
            s_b = step(scale, bits, top_bits, N)
            w = dequantized(planes, bits, K, s_b, c, weight_zero_point, "torch")
            y = x2.to(torch.float32) @ w.T
            y = y if bias is None else y + bias.to(torch.float32)
            return y.to(x.dtype).reshape(*lead, N)
        stand_in = finite_stand_in(x2, *act)  # float32: finite by construction
        args = (planes, scale, bits, top_bits, K, compensate, bias, weight_zero_point)
        y = linear_forward(stand_in, *args, *act, backend, group_size)
        return nan_rows(y, x2).to(x.dtype).reshape(*lead, N)
    if act_scale is not None and backend == "cpp" and not group_size:
        y = fused_linear(x2, planes, scale, bits, top_bits, K, c, bias, weight_zero_point, act)
        if y is not None:
            return y.reshape(*lead, N)
    if act_scale is None:
        s_b = step(scale, bits, top_bits, N)
        y = _float_linear(x2, planes, bits, K, c, s_b, bias, weight_zero_point, backend)
        return y.to(x.dtype).reshape(*lead, N)
    codes, z_r = _activation_codes(x2, *act)
    xq = codes.to(code_dtype(act_quant_min))
    if group_size:
        max_x = max(abs(act_quant_min), abs(act_quant_max))
        steps = (scale, 2 ** (top_bits - bits))
        wts = (planes, bits, K, group_size, c, act_scale, steps, weight_zero_point, bias, backend)
        y = group_int_linear(xq, z_r, *wts, max_x)
        return y.to(x.dtype).reshape(*lead, N)
    s_b = step(scale, bits, top_bits, N)
    acc = int_accumulate(xq, planes, bits, act_quant_min, act_quant_max, backend)
    xsum = xq.sum(1, keepdim=True, dtype=torch.int64)
    rowsum = rowsums(planes, bits, K, backend) if _needs_rowsums(x, act_zero_point, z_r) else None
    y = epilogue(acc, xsum, rowsum, z_r, K, c, act_scale, s_b, weight_zero_point, bias, x.dtype)
    return y.reshape(*lead, N)


def _padded_codes(codes, z_r, padding):
    """Integer convolution pads with the code of real zero (z_a), not with code 0."""
    ph, pw = padding
    if not (ph or pw):
        return codes
    codes = F.pad(codes, (pw, pw, ph, ph), value=0.0)
    border = torch.ones_like(codes, dtype=torch.bool)
    border[..., ph : codes.shape[-2] - ph, pw : codes.shape[-1] - pw] = False
    return torch.where(border, z_r, codes)


def _conv_accumulate(codes, planes, bits, geometry, act, backend):
    """sum over each receptive field of codes * q_b, int64 [B, N, OH, OW]."""
    in_channels, (kh, kw), stride, _, dilation, groups = geometry
    N = planes.shape[1]
    cin_g = in_channels // groups
    K = cin_g * kh * kw
    if backend == "torch" or groups > GROUP_LOOP_MAX:
        # Exact: every partial sum is an integer of magnitude < K * 255 * 128 << 2^53.
        q = unpack(planes, bits, K, backend).to(torch.float64).view(N, cin_g, kh, kw)
        acc = F.conv2d(codes.to(torch.float64), q, None, stride, 0, dilation, groups)
        return acc.round().to(torch.int64)
    n_g = N // groups
    qmin, qmax = act[2], act[3]

    def part(g, xq):
        rows = planes[:bits, g * n_g : (g + 1) * n_g]
        return int_accumulate(xq, rows, bits, qmin, qmax, backend)

    return _per_conv_group(codes, geometry, N, code_dtype(qmin), part)


def _per_conv_group(codes, geometry, N, dtype, part):
    """Runs `part(g, xq)` on each conv group's receptive fields (im2col of `codes` in the
    weight's flattened order, `xq` [B*OH*OW, K] of `dtype`), each returning [B*OH*OW, N/groups];
    assembled to [B, N, OH, OW]."""
    _, (kh, kw), stride, _, dilation, groups = geometry
    B, n_g = codes.shape[0], N // groups
    oh = (codes.shape[-2] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (codes.shape[-1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cols = F.unfold(codes, (kh, kw), dilation=dilation, stride=stride)  # [B, Cin*kh*kw, L]
    K = cols.shape[1] // groups
    cols = cols.view(B, groups, K, oh * ow).permute(1, 0, 3, 2)  # [groups, B, L, K]
    parts = [
        part(g, cols[g].reshape(B * oh * ow, K).to(dtype)).view(B, oh * ow, n_g)
        for g in range(groups)
    ]
    return torch.cat(parts, dim=2).permute(0, 2, 1).reshape(B, N, oh, ow)


def _group_int_conv(codes, z_r, geometry, weights, qmin, qmax):
    """The integer conv with per-group scales: each conv group's receptive fields (im2col of
    the padded codes, in the weight's flattened order) through the per-group linear; float64
    [B, N, OH, OW]."""
    in_channels, (kh, kw), _, _, _, groups = geometry
    planes, bits, g, c, act_scale, (scale, factor), wzp, bias, backend = weights
    N = planes.shape[1]
    n_g, K = N // groups, in_channels // groups * kh * kw

    def part(gi, xq):
        rows = slice(gi * n_g, (gi + 1) * n_g)
        return group_int_linear(
            xq, z_r, planes[:, rows], bits, K, g, c, act_scale, (scale[rows], factor),
            None if wzp is None else wzp[rows], None if bias is None else bias[rows],
            backend, max(abs(qmin), abs(qmax)), cache=False,
        )  # fmt: skip

    return _per_conv_group(codes, geometry, N, code_dtype(qmin), part)


def conv2d_forward(
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
    group_size=0,
):
    """`lowbit_conv2d` on validated arguments; `geometry` = (in_channels, kernel_size,
    stride, padding, dilation, groups), each of the four middle entries an int pair;
    `group_size` > 0: per-group scales along the flattened input dimension."""
    in_channels, (kh, kw), stride, padding, dilation, groups = geometry
    N = planes.shape[1]
    cin_g = in_channels // groups
    K = cin_g * kh * kw
    if group_size:
        scale = scale.reshape(N, K // group_size)
    c = compensation(top_bits - bits) if compensate else 0.0
    act = (act_scale, act_zero_point, act_quant_min, act_quant_max)
    if not all_finite(x):  # the rules of _lowbit_gemm_nonfinite, the same for every backend
        if act_scale is None:
            backend = "torch"  # IEEE fp32 convolution of the dequantized weights
        else:
            stand_in = finite_stand_in(x, *act)  # float32: finite by construction
            rest = (compensate, bias, weight_zero_point, *act, backend, group_size)
            y = conv2d_forward(stand_in, planes, scale, bits, top_bits, geometry, *rest)
            return nan_receptive_fields(y, x, geometry).to(x.dtype)
    if act_scale is not None and backend == "cpp" and not group_size:
        y = fused_conv(x, planes, scale, bits, top_bits, geometry, c, bias, weight_zero_point, act)
        if y is not None:
            return y
    s_b = step(scale, bits, top_bits, N)
    if act_scale is None:
        w = dequantized(planes, bits, K, s_b, c, weight_zero_point, backend)
        y = F.conv2d(
            x.to(torch.float32),
            w.view(N, cin_g, kh, kw),
            None if bias is None else bias.to(torch.float32),
            stride,
            0 if padding == (0, 0) else padding,
            dilation,
            groups,
        )
        return y.to(x.dtype)
    codes, z_r = _activation_codes(x, *act)
    codes = _padded_codes(codes, z_r, padding)
    if group_size:
        steps = (scale, 2 ** (top_bits - bits))
        wts = (planes, bits, group_size, c, act_scale, steps, weight_zero_point, bias, backend)
        return _group_int_conv(codes, z_r, geometry, wts, act_quant_min, act_quant_max).to(x.dtype)
    # Per-position code sums of each group's receptive field (for the (c - z_w) term).
    ones = torch.ones((groups, cin_g, kh, kw), dtype=torch.float64, device=x.device)
    xsum = F.conv2d(codes.to(torch.float64), ones, None, stride, 0, dilation, groups)
    xsum = xsum.round().to(torch.int64).repeat_interleave(N // groups, dim=1)  # [B, N, oh, ow]
    acc = _conv_accumulate(codes, planes, bits, geometry, act, backend)
    rowsum = rowsums(planes, bits, K, backend) if _needs_rowsums(x, act_zero_point, z_r) else None
    y = epilogue(
        acc.permute(0, 2, 3, 1),
        xsum.permute(0, 2, 3, 1),
        rowsum,
        z_r,
        K,
        c,
        act_scale,
        s_b,
        weight_zero_point,
        bias,
        x.dtype,
    )
    return y.permute(0, 3, 1, 2).contiguous()
