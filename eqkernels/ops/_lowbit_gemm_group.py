"""The integer-activation low-bit linear with per-group weight scales.

Each group `j` of `g` consecutive columns has its own step `s_b[n, j]` and weight zero point,
so its integer dot product is accumulated on its own and the groups meet in float64:
`y[m, n] = s_a * sum_j s_b[n, j] * (acc_j - z_a rowsum_j + (c - z_w[n, j]) (xsum_j - g z_a))
+ bias`, with `acc_j = sum_{k in j} xq[m, k] q_b[n, k]` exact (int32 in the C++ kernel, which
the caller keeps below 2^31; float64 here, exact below 2^53)."""

from __future__ import annotations

import torch

from .. import _ext
from ..backend import cpu_isa_cap
from ._lowbit_gemm_fused import fused_constants
from ._lowbit_gemm_weights import kernel_weights, packed_weights, unpack

GROUP_INT_KERNEL = "lowbit_linear_group_int_cpu"


def _group_terms(act_scale, s_b, c, weight_zero_point, N, G):
    """(s_a * s_b, c - z_w) as contiguous float64 [N, G]."""
    scale = act_scale.reshape(()).to(torch.float64) * s_b.to(torch.float64)
    cz = torch.full((N, G), c, dtype=torch.float64, device=s_b.device)
    if weight_zero_point is not None:
        z = weight_zero_point.to(torch.float64)
        cz = cz - (z if z.dim() == 2 else z.reshape(N, 1))
    return scale.contiguous(), cz.contiguous()


def _group_accumulate(xq, planes, bits, K, g, scale, cz, z, backend):
    """The per-group sum on any device: codes and weights in float64 (every partial sum is an
    integer far below 2^53, so exact), the epilogue in float64."""
    M, N = xq.shape[0], planes.shape[1]
    G = K // g
    q = unpack(planes, bits, K, backend).to(torch.float64).view(N, G, g)
    xg = xq.to(torch.float64).view(M, G, g)
    acc = torch.einsum("mjk,njk->mnj", xg, q)
    xs = (xg.sum(-1) - g * z).unsqueeze(1)  # [M, 1, G]
    total = (acc - z * q.sum(-1)) + cz * xs
    return (total * scale).sum(-1)


def group_weights(planes, bits, K, g):
    """(int8 [N, K] decoded weights, int32 [N, K // g] group sums), cached per planes tensor."""

    def make():
        layout = fused_constants()[3]["decoded"]
        decoded = packed_weights(planes, bits, K, K, 1, 1, 1, layout)[0]
        sums = decoded.view(decoded.shape[0], K // g, g).sum(-1, dtype=torch.int32)
        return decoded, sums.contiguous()

    return kernel_weights(planes, ("group", bits, K, g), make)


def group_int_linear(
    xq, z_r, planes, bits, K, g, c, act_scale, weights, wzp, bias, backend, max_x, cache=True
):
    """float64 `y` [M, N] (bias included) from codes `xq` (int8/uint8 [M, K]) and the rounded
    activation zero point `z_r` (0-d). `weights` = (top-width scale [N, G], 2^(top_bits -
    bits)). `cache`: the cpp kernel reads int8 weights decoded once per planes tensor (else it
    decodes the planes on each call: for temporary plane views)."""
    N = planes.shape[1]
    scale, factor = weights
    exact = g * max_x * (1 << (bits - 1)) < 2**31
    if backend == "cpp" and exact and _ext.has_kernel(GROUP_INT_KERNEL):
        # The epilogue's [N, G] terms are formed inside the kernel: as torch temporaries they
        # cost more than the GEMV itself.
        decoded, sums = group_weights(planes, bits, K, g) if cache else (None, None)
        y = _ext.kernel(GROUP_INT_KERNEL)(
            xq.contiguous(), planes[:bits].contiguous(), bits, g,
            scale.to(torch.float32).contiguous(), float(factor),
            float(act_scale.reshape(()).to(torch.float64)), float(c),
            None if wzp is None else wzp.to(torch.float32).contiguous(), float(z_r),
            decoded, sums, cpu_isa_cap(),
        )  # fmt: skip
    else:
        s_b = scale.to(torch.float32) * float(factor)  # exact: a power of two
        scale64, cz = _group_terms(act_scale, s_b, c, wzp, N, K // g)
        z = z_r.to(torch.float64)
        y = _group_accumulate(xq, planes, bits, K, g, scale64, cz, z, backend)
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y
