"""Triton float-activation low-bit GEMM (host launcher included).

`y[m, n] = sum_k x[m, k] * (q_b[n, k] + cz[n, j]) * s[n, j]` for fp16/bf16 activations `x`,
with `q_b` decoded in registers from the first `bits` canonical planes (int32 words
`[planes, N, ceil(K/32)]`, plane 0 the sign plane, bit t of word w column 32 w + t), `j` the
group of column k (`group_cols` consecutive columns; per channel: one group covering the
padded row) and `cz = c_k - z_w`. Each program owns a `BLOCK_M x BLOCK_N` output tile and walks
K in steps of `BLOCK_K` = 32 columns (one plane word per row and plane, and a whole part of any
group, since groups are multiples of 32): the codes are exact in fp16 and bf16 (|q| <= 128), so
`tl.dot` of x with the codes accumulates in fp32, and the step's partial sum is scaled in fp32,
`(dot + cz * sum_k x) * s`. The result is fp32 `[M, N]`; the op adds the bias and casts.

Every integer argument is `do_not_specialize` (Triton would otherwise compile a variant for
each value equal to 1 or divisible by 16), so the specializations are the activation dtype
(fp16, bf16) and `BLOCK_M` (16 for M <= 16: a GEMV-shaped tile, else 32): `AOT_SPECS` lists
all four (with `DOT_FP32=False`; True is the interpreter's bf16 workaround, never compiled), and tests/test_gpu_compile.py compiles them for sm_80 and sm_90 and checks that the
launcher produces nothing else. The launcher keeps every integer below 2^31 (i32 arguments;
addresses are formed in int64 inside the kernel).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import triton_interpreted

BLOCK_N = 32
BLOCK_K = 32  # one plane word per row and plane
GEMV_MAX_M = 16
NO_SPECIALIZE = ("M", "N", "K", "W", "bits", "group_cols", "G")
MAX_INT32 = 2**31 - 1


@triton.jit
def _decode_codes(
    planes_ptr, rn, n_mask, word, bit, N, W, bits, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
):
    """The `bits`-bit codes q_b [BLOCK_N, BLOCK_K] (int32) of rows `rn` at plane word `word`
    (one word per row and plane, its 32 bits spread over the columns): the MSB-first plane
    bits form the two's-complement code."""
    offs = rn.to(tl.int64)[:, None] * W + word
    code = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
    plane_size = N.to(tl.int64) * W
    for j in range(0, bits):
        words = tl.load(planes_ptr + j * plane_size + offs, mask=n_mask[:, None], other=0)
        code = code * 2 + ((words >> bit[None, :]) & 1)
    sign = 1 << (bits - 1)
    return tl.where(code >= sign, code - 2 * sign, code)


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def lowbit_float_gemm_kernel(
    x_ptr,
    planes_ptr,
    scale_ptr,
    cz_ptr,
    y_ptr,
    M,
    N,
    K,
    W,
    bits,
    group_cols,
    G,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    rk = tl.arange(0, BLOCK_K)
    bit = rk % 32
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + rk
        x = tl.load(x_rows + ks[None, :], mask=m_mask[:, None] & (ks[None, :] < K), other=0.0)
        q = _decode_codes(planes_ptr, rn, n_mask, k0 // 32, bit, N, W, bits, BLOCK_N, BLOCK_K)
        if DOT_FP32:
            part = tl.dot(x.to(tl.float32), tl.trans(q.to(tl.float32)))
        else:
            part = tl.dot(x, tl.trans(q.to(x.dtype)))
        xsum = tl.sum(x.to(tl.float32), axis=1)
        gidx = rn.to(tl.int64) * G + k0 // group_cols
        s = tl.load(scale_ptr + gidx, mask=n_mask, other=0.0)
        cz = tl.load(cz_ptr + gidx, mask=n_mask, other=0.0)
        acc += (part + xsum[:, None] * cz[None, :]) * s[None, :]
    y_offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(y_ptr + y_offs, acc, mask=m_mask[:, None] & n_mask[None, :])


def block_m(M: int) -> int:
    return 16 if M <= GEMV_MAX_M else 32


def float_gemm(x2, planes, bits, K, scale, cz):
    """fp32 [M, N] = x2 @ ((q_b + cz) * scale)^T per group (scale, cz fp32 [N, G], G dividing
    the padded row into groups of K // G columns, or G = 1). x2 fp16/bf16 [M, K] contiguous;
    planes int32 with >= `bits` planes, contiguous."""
    M = x2.shape[0]
    N, W = planes.shape[1], planes.shape[2]
    G = scale.shape[1]
    group_cols = 32 * W if G == 1 else K // G
    if max(M, N * W, K, M * K, M * N) > MAX_INT32:
        raise ValueError(
            f"x: [{M}, {K}] with N={N} exceeds the Triton GEMM's 32-bit index range; "
            "accepted are sizes below 2^31 (use backend='torch')"
        )
    y = torch.empty((M, N), dtype=torch.float32, device=x2.device)
    if M == 0 or N == 0:
        return y
    bm = block_m(M)
    # The interpreter's tl.dot multiplies bf16 operands as their raw 16-bit patterns; there
    # the bf16 values (and the codes) go to fp32 first, which holds each product exactly.
    dot_fp32 = x2.dtype == torch.bfloat16 and triton_interpreted()
    grid = (triton.cdiv(M, bm), triton.cdiv(N, BLOCK_N))
    lowbit_float_gemm_kernel[grid](
        x2, planes, scale, cz, y, M, N, K, W, bits, group_cols, G,
        BLOCK_M=bm, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, DOT_FP32=dot_fp32,
    )  # fmt: skip
    return y


# --------------------------------------------------------------------------------------------
# Ahead-of-time specializations (see the module docstring)


def _signature(dtype: str, bm: int) -> tuple[dict, dict]:
    kernel = lowbit_float_gemm_kernel
    types = {"x_ptr": f"*{dtype}", "planes_ptr": "*i32", "scale_ptr": "*fp32"}
    types |= {"cz_ptr": "*fp32", "y_ptr": "*fp32"} | {name: "i32" for name in NO_SPECIALIZE}
    constexprs = {"BLOCK_M": bm, "BLOCK_N": BLOCK_N, "BLOCK_K": BLOCK_K, "DOT_FP32": False}
    signature = {a: "constexpr" if a in constexprs else types[a] for a in kernel.arg_names}
    return signature, constexprs


AOT_SPECS = [
    (lowbit_float_gemm_kernel, *_signature(dtype, bm))
    for dtype in ("fp16", "bf16")
    for bm in (16, 32)
]
