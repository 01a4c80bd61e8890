"""The Triton float-activation low-bit GEMM (`eqkernels/triton/lowbit_gemm.py`) behind
`lowbit_linear(..., act_scale=None, backend="triton" | "cuda")` for fp16/bf16 activations,
against a float64 oracle written from the equation: the weight of group `j` of row `n` is
`(floor(q_n / 2^k) + c_k - z_w) * 2^k s[n, j]` and `y = x @ w^T + bias` in float64. The kernel
multiplies exact codes in fp32 (tl.dot) and scales each 32-column step in fp32, so it agrees
within fp32 summation error, plus the rounding of the fp16/bf16 result.

Without a GPU these run on CPU tensors under TRITON_INTERPRET=1 (set by conftest.py); the
`cuda` cases (marker `gpu`) run the compiled kernel on a GPU and skip here. The compiled
kernel's specializations are checked in tests/test_gpu_compile.py."""

import pytest
import torch
from conftest import call_on, need_kernel
from plane_oracle import nested_weights
from plane_oracle import pack_planes as pack

import eqkernels as E
from eqkernels.backend import BackendUnavailable


def oracle(x, q, n, b, scale, zw, g, compensate, bias):
    """(float64 y, float64 x-magnitude-weighted sum |x| @ |w|^T) from the module docstring."""
    w = nested_weights(q, n, b, scale, zw, g, compensate)
    xd = x.to(torch.float64)
    y, mag = xd @ w.T, xd.abs() @ w.abs().T
    if bias is not None:
        y, mag = y + bias.to(torch.float64), mag + bias.to(torch.float64).abs()
    return y, mag


CASES = [  # M, N, K, group_size (None: per channel), zero point
    (1, 70, 100, None, None),  # GEMV tile, K not a multiple of 32, three N blocks
    (3, 9, 128, 32, "group"),
    (40, 65, 192, 64, "channel"),  # 32-row tiles, partial M and N blocks
    (2, 33, 96, None, "channel"),
]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_triton_float_gemm_matches_float64_oracle(backend, dtype, case, device):
    if backend == "cuda":
        need_kernel("lowbit_gemm_int_cuda")  # what the cuda backend's resolution requires
    M, N, K, g, zero_point = case
    n, b = 4, 3
    gen = torch.Generator().manual_seed(M * N + K)
    q = torch.randint(-8, 8, (N, K), generator=gen)
    G = K // g if g else 1
    scale = torch.rand(N, G, generator=gen) * 0.05 + 0.01
    scale = scale if g else scale.reshape(N)
    zw = None
    if zero_point == "group":
        zw = torch.randint(-3, 4, (N, G), generator=gen).to(torch.float32)
    elif zero_point == "channel":
        zw = torch.randint(-3, 4, (N,), generator=gen).to(torch.float32)
    bias = torch.randn(N, generator=gen)
    x = (torch.randn(M, K, generator=gen) * 2).to(dtype)
    kw = dict(K=K, bias=bias, weight_zero_point=zw, group_size=g, backend=backend)
    y = call_on(device, E.lowbit_linear, x, pack(q, n), scale, b, n, **kw)
    ref, mag = oracle(x, q, n, b, scale, zw, g or K, True, bias)
    unit = 2.0**-11 if dtype == torch.float16 else 2.0**-8  # the result's rounding
    bound = mag * (K * 2.0**-23) + ref.abs() * unit
    assert y.dtype == dtype and y.shape == (M, N)
    err = (y.to(torch.float64) - ref).abs()
    assert torch.all(err <= bound), float((err / bound).max())
    if device.type == "cpu":
        prepared = E.prepare_linear(pack(q, n), scale, b, n, **kw)
        assert prepared.backend == backend and torch.equal(prepared(x), y)


def test_triton_backend_is_float_activation_linear_only():
    q = torch.randint(-8, 8, (4, 64))
    planes, scale = pack(q, 4), torch.tensor([0.1])
    x = torch.randn(2, 64, dtype=torch.float16)
    act = dict(act_scale=torch.tensor([0.1]), act_quant_min=-128, act_quant_max=127)
    with pytest.raises(BackendUnavailable, match="backend='triton' runs float activations only"):
        E.lowbit_linear(x, planes, scale, 4, 4, K=64, backend="triton", **act)
    with pytest.raises(BackendUnavailable, match="backend='triton' runs float activations only"):
        E.prepare_linear(planes, scale, 4, 4, K=64, backend="triton",
                         act=E.ActQuant(0.1, None, -128, 127))  # fmt: skip
    with pytest.raises(BackendUnavailable, match="implemented for lowbit_linear only"):
        E.lowbit_conv2d(x.view(2, 64, 1, 1), planes, scale, 4, 4, in_channels=64, kernel_size=1,
                        backend="triton")  # fmt: skip
