"""Bit-plane packing of signed integer weights (DESIGN.md "Bit planes and the low-bit GEMM").

Canonical layout: `planes: int32[n, N, ceil(K/32)]`, most significant (sign) plane first, bit
`t` of word `j` holds column `32*j + t`, padding bits zero. The first `b` planes decode to
`q_b = -2^(b-1) P_0 + sum_{j=1}^{b-1} 2^(b-1-j) P_j`, which is `floor(q_n / 2^(n-b))`: the top
`b` bits of the two's-complement code, so a prefix of the planes is the lower-width model.

Backends: "torch" (the reference, any device), "cpp" (eqkernels._C CPU kernels with run-time
ISA dispatch), "cuda" (eqkernels._C CUDA kernels, compiled in CI only; nothing here has a GPU).
These are inference ops: no autograd is registered (integer tensors have no gradient).
"""

from __future__ import annotations

import torch

from .. import _ext
from ..backend import check_values_enabled, choose, cpu_isa_cap

_PREFERENCE = {"cpu": ("cpp",), "cuda": ("cuda",)}


def words_per_row(K: int) -> int:
    return (K + 31) // 32


def _signed_words(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> the same bits as int32."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


# --------------------------------------------------------------------------------------------
# Reference implementations (the specification)


def pack_bitplanes_ref(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pure-torch packing of `q[N, K]` (signed, in `[-2^(bits-1), 2^(bits-1)-1]`) into
    `int32[bits, N, ceil(K/32)]`. No range check (the public op checks)."""
    N, K = q.shape
    W = words_per_row(K)
    codes = q.to(torch.int64) & ((1 << bits) - 1)  # two's complement in `bits` bits
    shifts = torch.arange(bits - 1, -1, -1, device=q.device, dtype=torch.int64)  # MSB first
    planes = (codes.unsqueeze(0) >> shifts.view(bits, 1, 1)) & 1  # [bits, N, K]
    planes = torch.nn.functional.pad(planes, (0, W * 32 - K))  # padding bits are zero
    weights = torch.ones(32, dtype=torch.int64, device=q.device) << torch.arange(
        32, device=q.device, dtype=torch.int64
    )
    words = (planes.view(bits, N, W, 32) * weights).sum(-1)
    return _signed_words(words)


def unpack_bitplanes_ref(planes: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """Pure-torch decode of the first `bits` planes to `int8[N, K]`."""
    _, N, W = planes.shape
    words = planes[:bits].to(torch.int64) & 0xFFFFFFFF
    t = torch.arange(32, device=planes.device, dtype=torch.int64)
    bit = ((words.unsqueeze(-1) >> t) & 1).reshape(bits, N, W * 32)[:, :, :K]
    value = -bit[0]
    for j in range(1, bits):
        value = value * 2 + bit[j]
    return value.to(torch.int8)


# --------------------------------------------------------------------------------------------
# Validation


def check_bits(bits, name: str = "bits", lo: int = 1, hi: int = 8) -> None:
    """`bits` is an integer in [lo, hi], else a ValueError naming `name`."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not lo <= bits <= hi:
        raise ValueError(f"{name}={bits!r}: accepted values are integers {lo}..{hi}")


def check_planes(planes, bits: int, K: int, name: str = "planes") -> None:
    """Validate a canonical plane tensor holding at least `bits` planes of K columns."""
    if not isinstance(planes, torch.Tensor):
        raise ValueError(f"{name}: expected an int32 tensor [planes, N, ceil(K/32)]")
    layout = getattr(planes, "eqk_layout", "canonical")
    if layout != "canonical":
        raise ValueError(f"{name}: layout {layout!r} is not accepted; accepted: 'canonical'")
    if planes.dtype != torch.int32 or planes.dim() != 3:
        raise ValueError(
            f"{name}: expected an int32 tensor [planes, N, ceil(K/32)], got "
            f"{planes.dtype} of shape {tuple(planes.shape)}"
        )
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ValueError(f"K={K!r}: accepted values are integers >= 1")
    if planes.shape[2] != words_per_row(K):
        raise ValueError(
            f"{name}: last dimension {planes.shape[2]} does not match K={K} "
            f"(accepted: ceil(K/32) = {words_per_row(K)})"
        )
    if planes.shape[0] < bits:
        raise ValueError(
            f"bits={bits}: {name} holds only {planes.shape[0]} planes; accepted bits are "
            f"1..{planes.shape[0]}"
        )
    if planes.shape[1] < 1:
        raise ValueError(f"{name}: N must be >= 1")


# --------------------------------------------------------------------------------------------
# Ops


@torch.library.custom_op("eqk::pack_bitplanes", mutates_args=())
def _pack_op(q: torch.Tensor, bits: int, backend: str) -> torch.Tensor:
    if backend == "torch":
        return pack_bitplanes_ref(q, bits)
    q8 = q.to(torch.int8).contiguous()
    if backend == "cpp":
        return _ext.kernel("pack_bitplanes_cpu")(q8, bits)
    return _ext.kernel("pack_bitplanes_cuda")(q8, bits)


@_pack_op.register_fake
def _(q, bits, backend):
    return q.new_empty((bits, q.shape[0], words_per_row(q.shape[1])), dtype=torch.int32)


@torch.library.custom_op("eqk::unpack_bitplanes", mutates_args=())
def _unpack_op(planes: torch.Tensor, bits: int, K: int, backend: str) -> torch.Tensor:
    if backend == "torch":
        return unpack_bitplanes_ref(planes, bits, K)
    p = planes.contiguous()
    if backend == "cpp":
        return _ext.kernel("unpack_bitplanes_cpu")(p, bits, K, cpu_isa_cap())
    return _ext.kernel("unpack_bitplanes_cuda")(p, bits, K)


@_unpack_op.register_fake
def _(planes, bits, K, backend):
    return planes.new_empty((planes.shape[1], K), dtype=torch.int8)


def pack_bitplanes(q: torch.Tensor, bits: int, *, backend: str | None = None) -> torch.Tensor:
    """Pack signed integers `q[N, K]` (any integer dtype, values in
    `[-2^(bits-1), 2^(bits-1)-1]`) into canonical planes `int32[bits, N, ceil(K/32)]`.

    Out-of-range values raise ValueError (checked in eager mode on CPU, or with EQK_CHECK=1).
    Inference op: no autograd.
    """
    check_bits(bits)
    if not isinstance(q, torch.Tensor) or q.dim() != 2:
        raise ValueError("q: expected a 2-D integer tensor [N, K]")
    if q.dtype.is_floating_point or q.dtype.is_complex or q.dtype == torch.bool:
        raise ValueError(f"q: dtype {q.dtype} is not accepted; accepted: integer dtypes")
    if q.shape[0] < 1 or q.shape[1] < 1:
        raise ValueError(f"q: shape {tuple(q.shape)}; accepted: N >= 1 and K >= 1")
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if check_values_enabled(q):
        qmin, qmax = int(q.min()), int(q.max())
        if qmin < lo or qmax > hi:
            raise ValueError(
                f"q: values in [{qmin}, {qmax}] are out of range for bits={bits}; "
                f"accepted values are [{lo}, {hi}]"
            )
    name = choose(
        backend,
        q.device,
        "pack_bitplanes",
        _PREFERENCE,
        {"cpp": "pack_bitplanes_cpu", "cuda": "pack_bitplanes_cuda"},
    )
    return _pack_op(q, bits, name)


def unpack_bitplanes(
    planes: torch.Tensor, bits: int, K: int, *, backend: str | None = None
) -> torch.Tensor:
    """Decode the first `bits` canonical planes to `int8[N, K]`; with `n` planes packed from
    `q`, this is `floor(q / 2^(n-bits))`. `planes` may hold exactly `bits` planes (a file
    prefix). Inference op: no autograd."""
    check_bits(bits)
    check_planes(planes, bits, K)
    name = choose(
        backend,
        planes.device,
        "unpack_bitplanes",
        _PREFERENCE,
        {"cpp": "unpack_bitplanes_cpu", "cuda": "unpack_bitplanes_cuda"},
    )
    return _unpack_op(planes, bits, K, name)
