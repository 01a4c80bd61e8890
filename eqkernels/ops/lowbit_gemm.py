"""Low-bit linear and conv2d on canonical bit planes (DESIGN.md "Bit planes and the low-bit
GEMM").

`planes` holds at least the first `bits` of the `top_bits` planes of the weight `W[N, K]`
(a conv weight flattened as `[Cout, Cin/groups*kh*kw]` in PyTorch's order). `scale` is the
top-width scale (`[1]`, 0-dim or `[N]`), so `s_b = 2^(top_bits-bits) * scale` and the nested
compensation is `c = (1 - 2^-k)/2`, `k = top_bits - bits` (0 when `compensate=False`).
An optional integer weight zero point `z_w[N]` (asymmetric, non-nested weights) makes the
effective weight `(q_b + c - z_w) * s_b`.

* Float activations (`act_scale=None`): `y = x @ ((q_b + c - z_w) * s_b)^T + bias`.
* Integer activations: `x` is quantized inside the op exactly as fake_quant's forward
  (fp32: `inv = fl32(1/s_a)`, `v = fl32(x*inv)`, round half to even, `+ round(z_a)`, clamp)
  to codes `xq` (uint8 when `act_quant_min >= 0`, else int8); the integer part is accumulated
  exactly (int32 chunks of K, summed in int64) and the epilogue
  `y = s_a s_b (sum xq q_b - z_a sum q_b + (c - z_w)(sum xq - K z_a)) + bias`
  runs in float64 with a fixed order, then is cast to x's dtype.

Backends: "torch" (reference, any device), "cpp" (eqkernels._C CPU kernels: bit-serial
AVX-512 VNNI / AVX2 / portable GEMV and GEMM with run-time ISA dispatch), "cuda" (_C raw
int32 accumulators from `lowbit_gemm_int_cuda`, decode by `unpack_bitplanes_cuda`; epilogue
in torch; compiled in CI only, no GPU here). These are inference ops: no autograd.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch.utils import _python_dispatch

from .. import _ext
from ..backend import check_values_enabled, choose
from .bitplanes import (
    _check_bits,
    check_planes,
    cpu_isa_cap,
    unpack_bitplanes_ref,
)

_PREFERENCE = {"cpu": ("cpp",), "cuda": ("cuda",)}
_KERNELS = {"cpp": "lowbit_gemm_int_cpu", "cuda": "lowbit_gemm_int_cuda"}

# Below this many activation rows the cpp float path uses the bit-serial kernel (reads only the
# planes); above it, decoding the weights once and calling the float GEMM wins.
_FLOAT_BITSERIAL_MAX_M = 8

# Above this many groups the integer conv accumulates the codes in a float64 convolution
# (exact: every partial sum is an integer far below 2^53) instead of one GEMM per group.
_GROUP_LOOP_MAX = 8


# Fused C++ integer path (csrc/lowbit_gemm/lowbit_fused_cpu.cpp): quantization, integer GEMM,
# code sums and epilogue in one call, on weights decoded / repacked once per planes tensor.
_FUSED_LINEAR = "lowbit_linear_int_fused_cpu"
_FUSED_CONV = "lowbit_conv2d_int_fused_cpu"
# Rows from which the fused linear feeds decoded int8 weights to torch._int_mm (below: the
# bit-serial GEMV straight from the planes). Mirrors kDecodedMinM in the C++ file.
_FUSED_DECODED_MIN_M = 16
# With AVX-512 VBMI + GFNI (ISA level 3) the fused linear runs on tiled planes for every M
# (csrc/common/lowbit_cpu_gfni.h), for K below 2^20 (its int32 lanes are exact there).
_ISA_TILED = 3
_TILED_MAX_K = 1 << 20

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


def _kernel_weights(planes, key, make):
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


def _packed_weights(planes, bits, K, cin_g, kh, kw, groups, layout):
    """(kernel-layout int8 weights, int64 weight code row sums), cached per planes tensor."""
    return _kernel_weights(
        planes,
        ("packed", bits, K, cin_g, kh, kw, groups, layout),
        lambda: _ext.kernel("lowbit_pack_weights_cpu")(
            planes[:bits].contiguous(), bits, K, cin_g, kh, kw, groups, layout, cpu_isa_cap()
        ),
    )


def _cached_rowsums(planes, bits, K):
    return _kernel_weights(
        planes, ("rowsums", bits, K), lambda: _rowsums(planes, bits, K, "cpp").contiguous()
    )


def _int32_exact(K, max_x, bits):
    return K * max_x * (1 << (bits - 1)) < 2**31


def _fused_linear(x2, planes, scale, bits, top_bits, K, c, bias, weight_zero_point,
                  act_scale, act_zero_point, qmin, qmax):  # fmt: skip
    """The cpp integer linear in one C++ call, or None when it does not apply."""
    if x2.dtype != torch.float32 or not _ext.has_kernel(_FUSED_LINEAR):
        return None
    if not _int32_exact(K, max(abs(qmin), abs(qmax)), bits):
        return None  # long K: the chunked path below
    if K < _TILED_MAX_K and _ext.kernel("bitplanes_cpu_isa")(cpu_isa_cap()) >= _ISA_TILED:
        # Tiled planes, decoded in registers for any M (reads bits/8 bytes per weight).
        decoded, wsum = _packed_weights(planes, bits, K, K, 1, 1, 1, 2)
    elif x2.shape[0] >= _FUSED_DECODED_MIN_M:
        decoded, wsum = _packed_weights(planes, bits, K, K, 1, 1, 1, 0)
    else:
        decoded, wsum = None, _cached_rowsums(planes, bits, K)
    return _ext.kernel(_FUSED_LINEAR)(
        x2, planes[:bits].contiguous(), bits, decoded, wsum, scale, float(2 ** (top_bits - bits)),
        c, weight_zero_point, bias, act_scale, act_zero_point, qmin, qmax, cpu_isa_cap(),
    )  # fmt: skip


def _fused_conv(x, planes, scale, bits, top_bits, in_channels, kernel_size, stride, padding,
                dilation, groups, c, bias, weight_zero_point, act_scale, act_zero_point,
                qmin, qmax):  # fmt: skip
    """The cpp integer conv2d in one C++ call (quantize, channels-last im2col on byte codes,
    int8 GEMM per group or a direct depthwise loop, epilogue), or None when it does not
    apply."""
    if x.dtype != torch.float32 or not _ext.has_kernel(_FUSED_CONV):
        return None
    kh, kw = kernel_size
    cin_g = in_channels // groups
    K = cin_g * kh * kw
    # The packed GEMM multiplies unsigned bytes (codes shifted into 0..255) by the weights.
    if cin_g > 1 and not _int32_exact(K, 255, bits):
        return None
    packed, wsum = _packed_weights(planes, bits, K, cin_g, kh, kw, groups, 0 if cin_g == 1 else 1)
    return _ext.kernel(_FUSED_CONV)(
        x, packed, wsum, bits, planes.shape[1], kh, kw, *stride, *padding, *dilation, groups, scale,
        float(2 ** (top_bits - bits)), c, weight_zero_point, bias, act_scale, act_zero_point,
        qmin, qmax, cpu_isa_cap(),
    )  # fmt: skip


def compensation(k: int) -> float:
    """c_k = (1 - 2^-k)/2, the mean of the k dropped low bits (exact in binary)."""
    return 0.0 if k <= 0 else 0.5 * (1.0 - 2.0**-k)


def _unpack(planes, bits, K, backend):
    if backend == "cpp":
        return _ext.kernel("unpack_bitplanes_cpu")(planes.contiguous(), bits, K, cpu_isa_cap())
    if backend == "cuda":
        return _ext.kernel("unpack_bitplanes_cuda")(planes.contiguous(), bits, K)
    return unpack_bitplanes_ref(planes, bits, K)


def quantize_activations(x, act_scale, act_zero_point, qmin, qmax):
    """Codes of x as fake_quant's forward computes them (fp32), and the rounded zero point.

    Returns (codes as a float32 tensor holding integers, z_r as a float32 tensor of shape [])."""
    s = act_scale.reshape(()).to(torch.float32)
    inv = torch.reciprocal(s)  # fl32(1/s), IEEE
    v = x.to(torch.float32) * inv
    z_r = (
        torch.zeros((), dtype=torch.float32, device=x.device)
        if act_zero_point is None
        else torch.round(act_zero_point.reshape(()).to(torch.float32))
    )
    codes = torch.clamp(torch.round(v) + z_r, qmin, qmax)
    return codes, z_r


def _code_dtype(qmin):
    return torch.uint8 if qmin >= 0 else torch.int8


def _int_accumulate(xq, planes, bits, qmin, qmax, backend):
    """sum_k xq[m,k] * q_b[n,k] exactly, as int64 [M, N]. xq: int8/uint8 [M, K]."""
    M, K = xq.shape
    if backend == "torch":
        q = unpack_bitplanes_ref(planes, bits, K).to(torch.int64)
        return xq.to(torch.int64) @ q.T
    # int32 accumulation is exact while K * max|xq| * max|q_b| < 2^31: split K into chunks of
    # whole 32-column words otherwise, and sum the chunks in int64.
    max_x = max(abs(qmin), abs(qmax))
    max_w = 1 << (bits - 1)
    chunk = ((2**31 - 1) // max(max_x * max_w, 1)) // 32 * 32
    fn = _ext.kernel(_KERNELS[backend])
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


def _rowsums(planes, bits, K, backend):
    """sum_k q_b[n, k] as int64 [N] (needed when the activation zero point is not 0)."""
    if backend == "cpp" and _ext.has_kernel("bitplane_rowsums_cpu"):
        return _ext.kernel("bitplane_rowsums_cpu")(planes[:bits].contiguous(), bits, K).to(
            torch.int64
        )
    return _unpack(planes, bits, K, backend).sum(1, dtype=torch.int64)


def _epilogue(acc, xsum, rowsum, z_r, K, c, s_a, s_b, weight_zero_point, bias, out_dtype):
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


def _step(scale, bits, top_bits, N):
    """s_b per output channel [N] (fp32; the power-of-two factor is exact)."""
    s = scale.to(torch.float32).reshape(-1)
    return (s * float(2 ** (top_bits - bits))).expand(N)


def _dequantized(planes, bits, K, s_b, c, weight_zero_point, backend):
    q = _unpack(planes, bits, K, backend).to(torch.float32)
    w = q + c
    if weight_zero_point is not None:
        w = w - weight_zero_point.to(torch.float32).reshape(-1, 1)
    return w * s_b.reshape(-1, 1)


# --------------------------------------------------------------------------------------------
# Linear


def _linear_impl(
    x, planes, scale, bits, top_bits, K, compensate, bias, weight_zero_point,
    act_scale, act_zero_point, act_quant_min, act_quant_max, backend,
):  # fmt: skip
    N = planes.shape[1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    out_dtype = x.dtype
    c = compensation(top_bits - bits) if compensate else 0.0
    if act_scale is not None and backend == "cpp":
        y = _fused_linear(
            x2, planes, scale, bits, top_bits, K, c, bias, weight_zero_point,
            act_scale, act_zero_point, act_quant_min, act_quant_max,
        )  # fmt: skip
        if y is not None:
            return y.reshape(*lead, N)
    s_b = _step(scale, bits, top_bits, N)
    if act_scale is None:
        if backend == "cpp" and x2.shape[0] <= _FLOAT_BITSERIAL_MAX_M:
            xf = x2.to(torch.float32).contiguous()
            acc = _ext.kernel("lowbit_gemm_float_cpu")(
                xf, planes[:bits].contiguous(), bits, cpu_isa_cap()
            )
            cw = torch.full((N,), c, dtype=torch.float32, device=x.device)
            if weight_zero_point is not None:
                cw = cw - weight_zero_point.to(torch.float32).reshape(-1)
            y = (acc + xf.sum(1, keepdim=True) * cw) * s_b
        else:
            w = _dequantized(planes, bits, K, s_b, c, weight_zero_point, backend)
            y = x2.to(torch.float32) @ w.T
        if bias is not None:
            y = y + bias.to(torch.float32)
        return y.to(out_dtype).reshape(*lead, N)
    codes, z_r = quantize_activations(x2, act_scale, act_zero_point, act_quant_min, act_quant_max)
    xq = codes.to(_code_dtype(act_quant_min))
    acc = _int_accumulate(xq, planes, bits, act_quant_min, act_quant_max, backend)
    xsum = xq.sum(1, keepdim=True, dtype=torch.int64)
    rowsum = None
    if act_zero_point is not None and (x.device.type != "cpu" or bool(z_r != 0)):
        rowsum = _rowsums(planes, bits, K, backend)
    y = _epilogue(acc, xsum, rowsum, z_r, K, c, act_scale, s_b, weight_zero_point, bias, out_dtype)
    return y.reshape(*lead, N)


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
) -> torch.Tensor:
    return _linear_impl(
        x, planes, scale, bits, top_bits, K, compensate, bias, weight_zero_point,
        act_scale, act_zero_point, act_quant_min, act_quant_max, backend,
    )  # fmt: skip


@_linear_op.register_fake
def _(x, planes, scale, bits, top_bits, K, compensate, bias, weight_zero_point, *rest):
    return x.new_empty((*x.shape[:-1], planes.shape[1]))


def _run_eagerly(x) -> bool:
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


def lowbit_linear_unchecked(*args):
    """`lowbit_conv2d_unchecked` for `torch.ops.eqk.lowbit_linear.default`'s arguments."""
    return _linear_impl(*args)


def lowbit_linear_ref(
    x, planes, scale, bits, top_bits, *, K, compensate=True, bias=None,
    weight_zero_point=None, act_scale=None, act_zero_point=None, act_quant_min=None,
    act_quant_max=None,
):  # fmt: skip
    """Pure-torch reference of `lowbit_linear` (no validation)."""
    return _linear_impl(
        x, planes, scale, bits, top_bits, K, compensate, bias, weight_zero_point,
        act_scale, act_zero_point, act_quant_min, act_quant_max, "torch",
    )  # fmt: skip


def _is_float_tensor(t):
    return isinstance(t, torch.Tensor) and t.dtype.is_floating_point


def _positive_finite(t):
    # One value (the common per-tensor case) as a Python float: three tensor ops cost ~20 us
    # per call, a fifth of a batch-1 layer.
    if t.numel() == 1:
        v = float(t.reshape(()))
        return math.isfinite(v) and v > 0
    return bool(torch.all((t > 0) & torch.isfinite(t)))


def _validate_common(
    x, planes, scale, bits, top_bits, K, bias, weight_zero_point,
    act_scale, act_zero_point, act_quant_min, act_quant_max,
):  # fmt: skip
    _check_bits(bits)
    _check_bits(top_bits, "top_bits", bits, 8)
    if not _is_float_tensor(x):
        raise ValueError("x: expected a floating-point tensor")
    check_planes(planes, bits, K)
    N = planes.shape[1]
    dev = x.device
    for name, t in (("planes", planes), ("scale", scale)):
        if isinstance(t, torch.Tensor) and t.device != dev:
            raise ValueError(f"{name}: on {t.device}, x on {dev}; accepted: the same device")
    if not _is_float_tensor(scale) or scale.numel() not in (1, N) or scale.dim() > 1:
        raise ValueError(
            f"scale: expected a float tensor of shape [1], [] or [N={N}], got "
            f"{getattr(scale, 'shape', scale)!r}"
        )
    if check_values_enabled(scale) and not _positive_finite(scale):
        raise ValueError("scale: accepted values are finite and > 0")
    if bias is not None and (not _is_float_tensor(bias) or tuple(bias.shape) != (N,)):
        raise ValueError(f"bias: expected None or a float tensor of shape [N={N}]")
    if weight_zero_point is not None:
        z = weight_zero_point
        if not isinstance(z, torch.Tensor) or z.numel() not in (1, N) or z.dim() > 1:
            raise ValueError(f"weight_zero_point: expected None or a tensor of shape [N={N}]")
        if check_values_enabled(z) and not bool(torch.all(z == torch.round(z.double()))):
            raise ValueError("weight_zero_point: accepted values are integers")
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
    if not _is_float_tensor(act_scale) or act_scale.numel() != 1:
        raise ValueError("act_scale: expected None or a per-tensor float tensor of shape [1]")
    if check_values_enabled(act_scale) and not _positive_finite(act_scale):
        raise ValueError("act_scale: accepted values are finite and > 0")
    if act_zero_point is not None and (
        not _is_float_tensor(act_zero_point)
        and not isinstance(act_zero_point, torch.Tensor)
        or act_zero_point.numel() != 1
    ):
        raise ValueError("act_zero_point: expected None or a tensor of shape [1]")
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
    for name, t in (("act_scale", act_scale), ("act_zero_point", act_zero_point)):
        if isinstance(t, torch.Tensor) and t.device != dev:
            raise ValueError(f"{name}: on {t.device}, x on {dev}; accepted: the same device")


def lowbit_linear(
    x: torch.Tensor,
    planes: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    top_bits: int,
    *,
    K: int,
    compensate: bool = True,
    bias: torch.Tensor | None = None,
    weight_zero_point: torch.Tensor | None = None,
    act_scale: torch.Tensor | None = None,
    act_zero_point: torch.Tensor | None = None,
    act_quant_min: int | None = None,
    act_quant_max: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """`y[..., N]` of `x[..., K]` and the `bits`-bit weight decoded from canonical `planes`.

    See the module docstring for the math. `planes` holds >= `bits` planes (int32
    `[planes, N, ceil(K/32)]`); `scale` is the top-width scale (`[1]`, `[]` or `[N]`);
    `bias` float `[N]`; `weight_zero_point` integer-valued `[N]`; the activation arguments
    (per-tensor `act_scale`, `act_zero_point`, and the code range `act_quant_min/max`, which
    must fit uint8 or int8) select the integer path. Inference op: no autograd.
    """
    _validate_common(
        x, planes, scale, bits, top_bits, K, bias, weight_zero_point,
        act_scale, act_zero_point, act_quant_min, act_quant_max,
    )  # fmt: skip
    if x.shape[-1] != K:
        raise ValueError(f"x: last dimension {x.shape[-1]}; accepted: K={K}")
    name = choose(backend, x.device, "lowbit_linear", _PREFERENCE, _KERNELS)
    op = _linear_impl if _run_eagerly(x) else _linear_op
    return op(
        x, planes, scale, bits, top_bits, K, bool(compensate), bias, weight_zero_point,
        act_scale, act_zero_point, act_quant_min, act_quant_max, name,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Conv2d


def _pair(v, name, lo):
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    if (
        not isinstance(v, (tuple, list))
        or len(v) != 2
        or not all(isinstance(i, int) and not isinstance(i, bool) and i >= lo for i in v)
    ):
        raise ValueError(f"{name}={v!r}: accepted values are an integer >= {lo} or a pair of them")
    return (int(v[0]), int(v[1]))


def _conv_impl(
    x, planes, scale, bits, top_bits, in_channels, kernel_size, stride, padding, dilation,
    groups, compensate, bias, weight_zero_point, act_scale, act_zero_point, act_quant_min,
    act_quant_max, backend,
):  # fmt: skip
    c = compensation(top_bits - bits) if compensate else 0.0
    if act_scale is not None and backend == "cpp":
        y = _fused_conv(
            x, planes, scale, bits, top_bits, in_channels, kernel_size, stride, padding,
            dilation, groups, c, bias, weight_zero_point, act_scale, act_zero_point,
            act_quant_min, act_quant_max,
        )  # fmt: skip
        if y is not None:
            return y
    N = planes.shape[1]
    kh, kw = kernel_size
    cin_g = in_channels // groups
    K = cin_g * kh * kw
    s_b = _step(scale, bits, top_bits, N)
    if act_scale is None:
        w = _dequantized(planes, bits, K, s_b, c, weight_zero_point, backend)
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
    codes, z_r = quantize_activations(x, act_scale, act_zero_point, act_quant_min, act_quant_max)
    # Integer convolution pads with the code of real zero (z_a), not with code 0.
    ph, pw = padding
    codes = F.pad(codes, (pw, pw, ph, ph), value=0.0) if (ph or pw) else codes
    if ph or pw:
        border = torch.ones_like(codes, dtype=torch.bool)
        border[..., ph : codes.shape[-2] - ph, pw : codes.shape[-1] - pw] = False
        codes = torch.where(border, z_r, codes)
    B = x.shape[0]
    oh = (codes.shape[-2] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (codes.shape[-1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    # Per-position code sums of each group's receptive field (for the (c - z_w) term).
    ones = torch.ones((groups, cin_g, kh, kw), dtype=torch.float64, device=x.device)
    xsum = F.conv2d(codes.to(torch.float64), ones, None, stride, 0, dilation, groups)
    xsum = xsum.round().to(torch.int64).repeat_interleave(N // groups, dim=1)  # [B, N, oh, ow]
    if backend == "torch" or groups > _GROUP_LOOP_MAX:
        # Exact: every partial sum is an integer of magnitude < K * 255 * 128 << 2^53.
        q = _unpack(planes, bits, K, backend).to(torch.float64).view(N, cin_g, kh, kw)
        acc = F.conv2d(codes.to(torch.float64), q, None, stride, 0, dilation, groups)
        acc = acc.round().to(torch.int64)
    else:
        cols = F.unfold(codes, (kh, kw), dilation=dilation, stride=stride)  # [B, Cin*kh*kw, L]
        cols = cols.view(B, groups, K, oh * ow).permute(1, 0, 3, 2)  # [g, B, L, K]
        n_g = N // groups
        parts = []
        dtype = _code_dtype(act_quant_min)
        for g in range(groups):
            xq = cols[g].reshape(B * oh * ow, K).to(dtype)
            p = planes[:bits, g * n_g : (g + 1) * n_g]
            parts.append(
                _int_accumulate(xq, p, bits, act_quant_min, act_quant_max, backend).view(
                    B, oh * ow, n_g
                )
            )
        acc = torch.cat(parts, dim=2).permute(0, 2, 1).reshape(B, N, oh, ow)
    rowsum = None
    if act_zero_point is not None and (x.device.type != "cpu" or bool(z_r != 0)):
        rowsum = _rowsums(planes, bits, K, backend)
    y = _epilogue(
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
) -> torch.Tensor:
    return _conv_impl(
        x, planes, scale, bits, top_bits, in_channels, tuple(kernel_size), tuple(stride),
        tuple(padding), tuple(dilation), groups, compensate, bias, weight_zero_point, act_scale,
        act_zero_point, act_quant_min, act_quant_max, backend,
    )  # fmt: skip


def _conv_out(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


@_conv_op.register_fake
def _(x, planes, scale, bits, top_bits, in_channels, kernel_size, stride, padding, dilation,
      *rest):  # fmt: skip
    oh = _conv_out(x.shape[2], kernel_size[0], stride[0], padding[0], dilation[0])
    ow = _conv_out(x.shape[3], kernel_size[1], stride[1], padding[1], dilation[1])
    return x.new_empty((x.shape[0], planes.shape[1], oh, ow))


def lowbit_conv2d_unchecked(*args):
    """The registered op's implementation called directly with the op's positional arguments
    (`torch.ops.eqk.lowbit_conv2d.default`'s schema, backend resolved), skipping validation
    and the dispatcher (whose per-call cost rivals a small layer's kernel). Eager mode only:
    callers that may be traced use the registered op. For callers that validated the same
    arguments once through `lowbit_conv2d` (eqnet.deploy.runtime)."""
    geometry = tuple(tuple(v) for v in args[6:10])  # kernel_size, stride, padding, dilation
    return _conv_impl(*args[:6], *geometry, *args[10:])


def lowbit_conv2d_ref(
    x, planes, scale, bits, top_bits, *, in_channels, kernel_size, stride=1, padding=0,
    dilation=1, groups=1, compensate=True, bias=None, weight_zero_point=None, act_scale=None,
    act_zero_point=None, act_quant_min=None, act_quant_max=None,
):  # fmt: skip
    """Pure-torch reference of `lowbit_conv2d` (no validation beyond normalizing pairs)."""
    return _conv_impl(
        x, planes, scale, bits, top_bits, in_channels, _pair(kernel_size, "kernel_size", 1),
        _pair(stride, "stride", 1), _pair(padding, "padding", 0), _pair(dilation, "dilation", 1),
        groups, compensate, bias, weight_zero_point, act_scale, act_zero_point, act_quant_min,
        act_quant_max, "torch",
    )  # fmt: skip


def lowbit_conv2d(
    x: torch.Tensor,
    planes: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    top_bits: int,
    *,
    in_channels: int,
    kernel_size,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    compensate: bool = True,
    bias: torch.Tensor | None = None,
    weight_zero_point: torch.Tensor | None = None,
    act_scale: torch.Tensor | None = None,
    act_zero_point: torch.Tensor | None = None,
    act_quant_min: int | None = None,
    act_quant_max: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """2-D convolution of `x[B, in_channels, H, W]` with a `bits`-bit weight decoded from
    canonical `planes` (the weight `[Cout, in_channels/groups, kh, kw]` flattened to
    `[Cout, in_channels/groups*kh*kw]` in PyTorch's order; `Cout = planes.shape[1]`).

    `kernel_size`, `stride`, `padding` (zeros; integer activations pad with the code of real
    zero `z_a`), `dilation`: an int or a pair `(h, w)`; `groups` divides `in_channels` and
    `Cout` (`groups == in_channels` is depthwise). The remaining arguments are
    `lowbit_linear`'s (per-channel `scale`, `bias`, `weight_zero_point` are over `Cout`).
    Returns `[B, Cout, OH, OW]` in x's dtype. Inference op: no autograd.
    """
    kernel_size = _pair(kernel_size, "kernel_size", 1)
    stride = _pair(stride, "stride", 1)
    padding = _pair(padding, "padding", 0)
    dilation = _pair(dilation, "dilation", 1)
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
    _validate_common(
        x, planes, scale, bits, top_bits, K, bias, weight_zero_point,
        act_scale, act_zero_point, act_quant_min, act_quant_max,
    )  # fmt: skip
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(
            f"x: shape {tuple(x.shape)}; accepted: [B, in_channels={in_channels}, H, W]"
        )
    if planes.shape[1] % groups:
        raise ValueError(
            f"groups={groups}: accepted values divide the output channels ({planes.shape[1]})"
        )
    for i, name in ((2, "height"), (3, "width")):
        j = i - 2
        if _conv_out(x.shape[i], kernel_size[j], stride[j], padding[j], dilation[j]) < 1:
            raise ValueError(f"x: {name} {x.shape[i]} is smaller than the dilated kernel")
    name = choose(backend, x.device, "lowbit_conv2d", _PREFERENCE, _KERNELS)
    if _run_eagerly(x):
        return _conv_impl(
            x, planes, scale, bits, top_bits, in_channels, kernel_size, stride, padding,
            dilation, groups, bool(compensate), bias, weight_zero_point, act_scale,
            act_zero_point, act_quant_min, act_quant_max, name,
        )  # fmt: skip
    return _conv_op(
        x, planes, scale, bits, top_bits, in_channels, list(kernel_size), list(stride),
        list(padding), list(dilation), groups, bool(compensate), bias, weight_zero_point,
        act_scale, act_zero_point, act_quant_min, act_quant_max, name,
    )  # fmt: skip
