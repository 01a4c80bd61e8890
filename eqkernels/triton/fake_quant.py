"""Triton kernels of the fused fake-quant ops (host launchers included).

Both kernels work on a contiguous `[outer, C, inner]` view; program `pid` handles block
`pid % blocks_per_row` of row `pid // blocks_per_row` (channel `row % C`), and computes the
unified element map documented in eqkernels/ops/fake_quant.py with per-channel fp32 `s`,
`inv_s = 1/s` (computed by torch: Triton's `/` may be approximate on GPUs) and the rounded zero
point `zr`. The backward writes `dx` and one partial sum per program of `dy * t` and of
`dy * (in ? 0 : 1)`; the final per-channel sums over the fixed `[outer, C, blocks]` partial
layout are a torch sum (deterministic: no atomics).

`quant_min`/`quant_max` are `do_not_specialize`: Triton specializes integer arguments equal to 1
or divisible by 16 (e.g. quant_max = 1 at 1 bit, quant_min = -16 at 5 bits), which would compile
a new variant per width. The layered op's width enters through float arguments (`inv_step`,
`step`, `comp`), which Triton never specializes, so switching width reuses the compiled kernel.
`channels` and `blocks_per_row` are `do_not_specialize` too (per-tensor, channels = 1, would
otherwise be a variant of its own); `inner` stays specialized, because its divisibility by 16 lets
the compiler vectorize the loads and stores.

`AOT_SPECS` lists every (kernel, signature, constexprs) the launchers below can produce: input
dtype fp32/fp16/bf16 (bf16 outputs through an int16 view, `OUT_BF16`), `inner` as i32, as i64
(> 2^31 - 1 elements per row) or the constant 1 (Triton turns an integer argument equal to 1
into a constexpr). The launchers keep the grid below 2^31 programs, so `channels` and
`blocks_per_row` are always i32. tests/test_triton_aot.py compiles each entry for sm_80 and sm_90.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
# 1.5 * 2^23: adding and subtracting it rounds an fp32 to the nearest integer, ties to even,
# exactly for |v| < 2^22 (libdevice.rint fails in the interpreter; this works everywhere).
# A tl.constexpr: the compiler reads no other module globals inside @triton.jit functions.
MAGIC = tl.constexpr(12582912.0)
NO_SPECIALIZE = ("quant_min", "quant_max", "channels", "blocks_per_row")
# CUDA's grid x dimension holds at most 2^31 - 1 programs.
MAX_PROGRAMS = 2**31 - 1


@triton.jit
def _element(x, s, inv_s, zr, quant_min, quant_max, inv_step, step, comp):
    """(v, u, a, is_nan) of the unified element map, all fp32."""
    qmin = quant_min.to(tl.float32)
    qmax = quant_max.to(tl.float32)
    v = x * inv_s
    is_nan = v != v
    # Clamp to one code beyond the grid so the magic-number rounding is exact; in-range codes
    # and the out-of-range mask are unchanged.
    vc = tl.minimum(tl.maximum(v, qmin - zr - 1.0), qmax - zr + 1.0)
    r = (vc + MAGIC) - MAGIC
    u = r + zr
    q = tl.minimum(tl.maximum(u, qmin), qmax)
    a = (tl.floor((q - zr) * inv_step) + comp) * step
    return v, u, a, is_nan


@triton.jit
def _store(ptr, value, mask, OUT_BF16: tl.constexpr):
    """Store fp32 `value` in the output dtype. bf16 outputs arrive as an int16 view and are
    rounded to nearest even here with integer ops, because the interpreter's fp32 -> bf16 cast
    truncates while the GPU's rounds to nearest even (torch's .to() does too)."""
    if OUT_BF16:
        bits = value.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bf16 = tl.where(value != value, 0x7FC0, rounded)  # the canonical quiet NaN
        tl.store(ptr, bf16.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def fake_quant_fwd_kernel(
    x_ptr,
    y_ptr,
    s_ptr,
    inv_s_ptr,
    zr_ptr,
    quant_min,
    quant_max,
    inv_step,
    step,
    comp,
    inner,
    channels,
    blocks_per_row,
    BLOCK_SIZE: tl.constexpr,
    OUT_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    row = pid // blocks_per_row
    start = (pid % blocks_per_row) * BLOCK_SIZE
    c = row % channels
    s = tl.load(s_ptr + c)
    inv_s = tl.load(inv_s_ptr + c)
    zr = tl.load(zr_ptr + c)
    cols = start + tl.arange(0, BLOCK_SIZE)
    mask = cols < inner
    offs = row.to(tl.int64) * inner + cols
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v, _u, a, is_nan = _element(x, s, inv_s, zr, quant_min, quant_max, inv_step, step, comp)
    y = tl.where(is_nan, v, a * s)  # v is the NaN itself
    _store(y_ptr + offs, y, mask, OUT_BF16)


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def fake_quant_bwd_kernel(
    dy_ptr,
    x_ptr,
    dx_ptr,
    part_t_ptr,
    part_o_ptr,
    s_ptr,
    inv_s_ptr,
    zr_ptr,
    quant_min,
    quant_max,
    inv_step,
    step,
    comp,
    inner,
    channels,
    blocks_per_row,
    BLOCK_SIZE: tl.constexpr,
    OUT_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    row = pid // blocks_per_row
    start = (pid % blocks_per_row) * BLOCK_SIZE
    c = row % channels
    s = tl.load(s_ptr + c)
    inv_s = tl.load(inv_s_ptr + c)
    zr = tl.load(zr_ptr + c)
    cols = start + tl.arange(0, BLOCK_SIZE)
    mask = cols < inner
    offs = row.to(tl.int64) * inner + cols
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v, u, a, is_nan = _element(x, s, inv_s, zr, quant_min, quant_max, inv_step, step, comp)
    inside = (u >= quant_min.to(tl.float32)) & (u <= quant_max.to(tl.float32))
    zero = tl.zeros_like(dy)
    # Selects on the codes, never v * inside (v = +-inf must not make inf * 0); NaN selected
    # through explicitly because min/max drop it.
    dx = tl.where(is_nan, v, tl.where(inside, dy, zero))
    t = tl.where(inside, a - v, a)
    st = tl.where(is_nan, v, dy * t)
    so = tl.where(is_nan, v, tl.where(inside, zero, dy))
    _store(dx_ptr + offs, dx, mask, OUT_BF16)
    # Masked lanes loaded x = dy = 0, so they add exact zeros.
    tl.store(part_t_ptr + pid, tl.sum(st, axis=0))
    tl.store(part_o_ptr + pid, tl.sum(so, axis=0))


def _layout(x3: torch.Tensor):
    outer, channels, inner = x3.shape
    blocks_per_row = max(triton.cdiv(inner, BLOCK), 1)
    items = outer * channels * blocks_per_row
    if items > MAX_PROGRAMS:
        raise ValueError(
            f"x: {x3.numel()} elements in {outer * channels} rows need {items} Triton programs; "
            f"accepted are at most {MAX_PROGRAMS} (use backend='torch')"
        )
    return outer, channels, inner, blocks_per_row, items


def _out(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def forward(x3, s, inv_s, zr, quant_min, quant_max, inv_step, step, comp):
    """y3 = fake-quant(x3) (x3 contiguous [outer, C, inner]; s, inv_s, zr fp32 [C])."""
    _, channels, inner, blocks_per_row, items = _layout(x3)
    y3 = torch.empty_like(x3)
    if x3.numel() == 0:
        return y3
    fake_quant_fwd_kernel[(items,)](
        x3, _out(y3), s, inv_s, zr, quant_min, quant_max, float(inv_step), float(step),
        float(comp), inner, channels, blocks_per_row, BLOCK_SIZE=BLOCK,
        OUT_BF16=x3.dtype == torch.bfloat16,
    )  # fmt: skip
    return y3


def backward(dy3, x3, s, inv_s, zr, quant_min, quant_max, inv_step, step, comp):
    """(dx3, sum_t[C], sum_z[C]) with sum_t = sum dy*t and sum_z = sum dy*(in ? 0 : -s)."""
    outer, channels, inner, blocks_per_row, items = _layout(x3)
    dx3 = torch.empty_like(x3)
    part_t = torch.zeros(items, dtype=torch.float32, device=x3.device)
    part_o = torch.zeros(items, dtype=torch.float32, device=x3.device)
    if x3.numel() > 0:
        fake_quant_bwd_kernel[(items,)](
            dy3, x3, _out(dx3), part_t, part_o, s, inv_s, zr, quant_min, quant_max,
            float(inv_step), float(step), float(comp), inner, channels, blocks_per_row,
            BLOCK_SIZE=BLOCK, OUT_BF16=x3.dtype == torch.bfloat16,
        )  # fmt: skip
    sum_t = part_t.view(outer, channels, blocks_per_row).sum(dim=(0, 2))
    sum_o = part_o.view(outer, channels, blocks_per_row).sum(dim=(0, 2))
    return dx3, sum_t, -s * sum_o


# --------------------------------------------------------------------------------------------
# Ahead-of-time specializations (see the module docstring)

_PARAMS = ("s_ptr", "inv_s_ptr", "zr_ptr")
_RUNTIME = {"quant_min": "i32", "quant_max": "i32", "inv_step": "fp32", "step": "fp32"}
_RUNTIME |= {"comp": "fp32", "channels": "i32", "blocks_per_row": "i32"}


def _signature(kernel, dtype: str, inner) -> tuple[dict, dict]:
    out = "i16" if dtype == "bf16" else dtype
    types = {"x_ptr": f"*{dtype}", "dy_ptr": f"*{dtype}", "y_ptr": f"*{out}", "dx_ptr": f"*{out}"}
    types |= {p: "*fp32" for p in (*_PARAMS, "part_t_ptr", "part_o_ptr")} | _RUNTIME
    constexprs = {"BLOCK_SIZE": BLOCK, "OUT_BF16": dtype == "bf16"}
    if isinstance(inner, int):
        constexprs["inner"] = inner
    else:
        types["inner"] = inner
    signature = {a: "constexpr" if a in constexprs else types[a] for a in kernel.arg_names}
    return signature, constexprs


AOT_SPECS = [
    (kernel, *_signature(kernel, dtype, inner))
    for kernel in (fake_quant_fwd_kernel, fake_quant_bwd_kernel)
    for dtype in ("fp32", "fp16", "bf16")
    for inner in ("i32", "i64", 1)
]
