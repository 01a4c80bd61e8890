"""Weight side of the low-bit GEMM: the step and compensation of a width, the decoded codes,
their row sums, and the kernel-layout repacking cache of the C++ fused path."""

from __future__ import annotations

import weakref

import torch

from .. import _ext
from ..backend import cpu_isa_cap
from .bitplanes import unpack_bitplanes_ref


def compensation(k: int) -> float:
    """c_k = (1 - 2^-k)/2, the mean of the k dropped low bits (exact in binary)."""
    return 0.0 if k <= 0 else 0.5 * (1.0 - 2.0**-k)


def step(scale, bits, top_bits, N):
    """s_b per output channel [N], or per group [N, G] for a 2-D scale (fp32; the power-of-two
    factor is exact)."""
    if scale.dim() == 2:
        return scale.to(torch.float32) * float(2 ** (top_bits - bits))
    s = scale.to(torch.float32).reshape(-1)
    return (s * float(2 ** (top_bits - bits))).expand(N)


def unpack(planes, bits, K, backend):
    """The first `bits` planes decoded to int8 [N, K] on `backend`."""
    if backend == "cpp":
        return _ext.kernel("unpack_bitplanes_cpu")(planes.contiguous(), bits, K, cpu_isa_cap())
    if backend == "cuda":
        return _ext.kernel("unpack_bitplanes_cuda")(planes.contiguous(), bits, K)
    return unpack_bitplanes_ref(planes, bits, K)


def rowsums(planes, bits, K, backend):
    """sum_k q_b[n, k] as int64 [N] (needed when the activation zero point is not 0)."""
    if backend == "cpp" and _ext.has_kernel("bitplane_rowsums_cpu"):
        return _ext.kernel("bitplane_rowsums_cpu")(planes[:bits].contiguous(), bits, K).to(
            torch.int64
        )
    return unpack(planes, bits, K, backend).sum(1, dtype=torch.int64)


def dequantized(planes, bits, K, s_b, c, weight_zero_point, backend):
    """The float weight ((q_b + c - z_w) * s_b) as fp32 [N, K]."""
    q = unpack(planes, bits, K, backend).to(torch.float32)
    w = q + c
    per_group = s_b.dim() == 2 and s_b.shape[1] > 1  # [N, G]: each scale covers K / G columns

    def columns(t):
        t = t.to(torch.float32)
        if per_group and t.dim() == 2:
            return t.repeat_interleave(K // s_b.shape[1], dim=1)
        return t.reshape(-1, 1)

    if weight_zero_point is not None:
        w = w - columns(weight_zero_point)
    return w * columns(s_b)


# id(planes) -> (weakref to planes, (version, data_ptr), {geometry key: kernel tensors}).
# DESIGN.md lets kernels repack the planes into a kernel layout at load time; this cache is
# that repacking, done on first use and dropped with the planes tensor (or when it changes).
_PACKED: dict[int, tuple] = {}


def _planes_stamp(planes):
    try:
        version = planes._version
    except RuntimeError:  # inference tensors have no version counter (and cannot change)
        version = -1
    return (version, planes.data_ptr())


def kernel_weights(planes, key, make):
    """make() cached per planes tensor under `key` (rebuilt when the planes change)."""
    pid = id(planes)
    entry = _PACKED.get(pid)
    stamp = _planes_stamp(planes)
    if entry is None or entry[0]() is not planes or entry[1] != stamp:

        def drop(ref, pid=pid):
            current = _PACKED.get(pid)
            if current is not None and current[0] is ref:
                del _PACKED[pid]

        entry = (weakref.ref(planes, drop), stamp, {})
        _PACKED[pid] = entry
    found = entry[2].get(key)
    if found is None:
        found = make()
        entry[2][key] = found
    return found


def packed_weights(planes, bits, K, cin_g, kh, kw, groups, layout):
    """(kernel-layout int8 weights, int64 weight code row sums), cached per planes tensor.

    `layout` is one of `_C.PACKED_LAYOUTS`' values."""
    return kernel_weights(
        planes,
        ("packed", bits, K, cin_g, kh, kw, groups, layout),
        lambda: _ext.kernel("lowbit_pack_weights_cpu")(
            planes[:bits].contiguous(), bits, K, cin_g, kh, kw, groups, layout, cpu_isa_cap()
        ),
    )


def cached_rowsums(planes, bits, K):
    """`rowsums` on the cpp backend, cached per planes tensor."""
    return kernel_weights(
        planes, ("rowsums", bits, K), lambda: rowsums(planes, bits, K, "cpp").contiguous()
    )
