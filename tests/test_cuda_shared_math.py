"""The arithmetic of the CUDA bit-plane kernels, run on the host.

There is no GPU here: the CUDA kernels (csrc/bitplanes/bitplanes_kernels_cuda.cu,
csrc/lowbit_gemm/lowbit_gemm_kernels_cuda.cu) are only compiled. Their per-thread work lives in
csrc/common/lowbit_gemm_tile.h (__host__ __device__), and `_C.*_emulated_cpu` runs those same
functions thread by thread and barrier phase by barrier phase (test-only kernels, built with
EQK_BUILD_EMULATION=1 as CI does). These tests check the emulation against an oracle written
here from the definitions (DESIGN.md "Bit planes and the low-bit GEMM"): planes built bit by
bit in int64, codes q_b = floor(q / 2^(n-b)), products in float64 (exact: every sum here is
far below 2^53).
"""

import os

import pytest
import torch

from eqkernels import _ext

KERNELS = (
    "pack_bitplanes_emulated_cpu",
    "unpack_bitplanes_emulated_cpu",
    "lowbit_gemm_int_emulated_cpu",
)

pytestmark = pytest.mark.skipif(
    os.environ.get("EQK_REQUIRE_EXT") != "1" and not all(_ext.has_kernel(k) for k in KERNELS),
    reason="eqkernels._C is built without the CUDA emulation kernels (EQK_BUILD_EMULATION=1)",
)


def _k(name):
    return _ext.kernel(name)


def oracle_planes(q: torch.Tensor, n: int) -> torch.Tensor:
    """Canonical int32[n, N, ceil(K/32)] planes of signed n-bit codes q[N, K], from the
    definition: plane p is bit n-1-p of the two's complement; bit t of word j is column 32j+t."""
    N, K = q.shape
    W = (K + 31) // 32
    u = q.to(torch.int64) & ((1 << n) - 1)
    planes = torch.zeros(n, N, W, dtype=torch.int64)
    for p in range(n):
        bits = (u >> (n - 1 - p)) & 1
        for k in range(K):
            planes[p, :, k // 32] |= bits[:, k] << (k % 32)
    planes = torch.where(planes >= 2**31, planes - 2**32, planes)
    return planes.to(torch.int32)


def oracle_codes(q: torch.Tensor, n: int, b: int) -> torch.Tensor:
    """q_b = floor(q / 2^(n-b)) (the top b bits), as int64."""
    return torch.div(q.to(torch.int64), 2 ** (n - b), rounding_mode="floor")


def random_codes(N, K, n, gen):
    q = torch.randint(-(2 ** (n - 1)), 2 ** (n - 1), (N, K), generator=gen, dtype=torch.int64)
    if q.numel() > 1:  # make sure both extremes appear
        q.view(-1)[0] = -(2 ** (n - 1))
        q.view(-1)[-1] = 2 ** (n - 1) - 1
    return q.to(torch.int8)


def random_activations(M, K, unsigned, gen):
    if unsigned:
        x = torch.randint(0, 256, (M, K), generator=gen, dtype=torch.int64)
        if x.numel():
            x.view(-1)[0] = 255
        return x.to(torch.uint8)
    x = torch.randint(-128, 128, (M, K), generator=gen, dtype=torch.int64)
    if x.numel():
        x.view(-1)[0] = -128
    return x.to(torch.int8)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("N, K", [(1, 1), (1, 33), (5, 31), (3, 70), (4, 96)])
def test_pack_matches_definition(bits, N, K):
    gen = torch.Generator().manual_seed(bits * 100 + K)
    q = random_codes(N, K, bits, gen)
    got = _k("pack_bitplanes_emulated_cpu")(q, bits)
    assert got.dtype == torch.int32 and got.shape == (bits, N, (K + 31) // 32)
    assert torch.equal(got, oracle_planes(q, bits))


@pytest.mark.parametrize("n", [1, 3, 4, 8])
@pytest.mark.parametrize("N, K", [(1, 37), (3, 64), (2, 100)])
def test_unpack_prefix_property(n, N, K):
    gen = torch.Generator().manual_seed(n * 1000 + K)
    q = random_codes(N, K, n, gen)
    planes = oracle_planes(q, n)
    for b in range(1, n + 1):
        got = _k("unpack_bitplanes_emulated_cpu")(planes, b, K)
        assert got.dtype == torch.int8 and got.shape == (N, K)
        assert torch.equal(got.to(torch.int64), oracle_codes(q, n, b)), b
        # A file prefix holding exactly b planes decodes the same.
        got_prefix = _k("unpack_bitplanes_emulated_cpu")(planes[:b].contiguous(), b, K)
        assert torch.equal(got_prefix, got)


def _gemm_oracle(xq, q_b):
    return (xq.to(torch.float64) @ q_b.to(torch.float64).T).to(torch.int64)


@pytest.mark.parametrize("unsigned", [True, False], ids=["u8", "s8"])
@pytest.mark.parametrize("bits", range(1, 9))
def test_gemm_all_widths_both_paths(bits, unsigned):
    gen = torch.Generator().manual_seed(bits + 17 * unsigned)
    n = 8
    N, K = 70, 200  # N spans two 64-row tiles; K = 6.25 words, two 128-column K steps
    q = random_codes(N, K, n, gen)
    planes = oracle_planes(q, n)
    q_b = oracle_codes(q, n, bits)
    fn = _k("lowbit_gemm_int_emulated_cpu")
    for M, path in [(1, "auto"), (3, "gemv"), (8, "gemv"), (3, "tile"), (40, "auto")]:
        xq = random_activations(M, K, unsigned, gen)
        got = fn(xq, planes, bits, path)
        assert got.dtype == torch.int32 and got.shape == (M, N)
        assert torch.equal(got.to(torch.int64), _gemm_oracle(xq, q_b)), (M, path)


@pytest.mark.parametrize("unsigned", [True, False], ids=["u8", "s8"])
@pytest.mark.parametrize("M, N, K", [(1, 1, 1), (9, 1, 31), (33, 65, 33), (70, 3, 257), (2, 5, 0)])
def test_gemm_shapes_and_exact_prefix(M, N, K, unsigned):
    gen = torch.Generator().manual_seed(M * 7 + N * 3 + K)
    bits, n = 3, 5
    q = random_codes(N, K, n, gen)
    planes = oracle_planes(q, n)
    xq = random_activations(M, K, unsigned, gen)
    want = _gemm_oracle(xq, oracle_codes(q, n, bits))
    fn = _k("lowbit_gemm_int_emulated_cpu")
    for p in (planes, planes[:bits].contiguous()):  # all planes, or a file prefix of `bits`
        for path in ("auto", "tile") + (("gemv",) if M <= 8 else ()):
            assert torch.equal(fn(xq, p, bits, path).to(torch.int64), want), path


def test_gemm_extreme_values_and_nonzero_padding_bits():
    """All-extreme codes (largest |products|) and planes whose padding bits are set: the zero
    padding of the activation words must make the padding bits irrelevant."""
    n, N, K, M = 8, 6, 45, 10
    q = torch.full((N, K), -128, dtype=torch.int8)
    q[1::2] = 127
    planes = oracle_planes(q, n)
    dirty = planes.clone()
    dirty[:, :, -1] |= torch.tensor(-(1 << (K % 32)), dtype=torch.int32)  # bits K%32..31 set
    fn = _k("lowbit_gemm_int_emulated_cpu")
    for unsigned in (True, False):
        xq = torch.full((M, K), 255 if unsigned else -128, dtype=torch.int64)
        xq = xq.to(torch.uint8 if unsigned else torch.int8)
        for bits in (1, 2, 7, 8):
            want = _gemm_oracle(xq, oracle_codes(q, n, bits))
            for path in ("tile", "gemv"):
                x = xq[:8] if path == "gemv" else xq
                w = want[:8] if path == "gemv" else want
                assert torch.equal(fn(x, dirty, bits, path).to(torch.int64), w)
    got = _k("unpack_bitplanes_emulated_cpu")(dirty, 8, K)
    assert torch.equal(got, q)


def test_bad_arguments_raise_value_error():
    q = torch.zeros(2, 40, dtype=torch.int8)
    planes = torch.zeros(4, 2, 2, dtype=torch.int32)
    x = torch.zeros(3, 40, dtype=torch.uint8)
    pack = _k("pack_bitplanes_emulated_cpu")
    unpack = _k("unpack_bitplanes_emulated_cpu")
    gemm = _k("lowbit_gemm_int_emulated_cpu")
    for bits in (0, 9):
        with pytest.raises(ValueError, match="bits"):
            pack(q, bits)
        with pytest.raises(ValueError, match="bits"):
            gemm(x, planes, bits)
    with pytest.raises(ValueError, match="int8"):
        pack(q.to(torch.int32), 2)
    with pytest.raises(ValueError, match="contiguous"):
        pack(torch.zeros(40, 2, dtype=torch.int8).T, 2)
    with pytest.raises(ValueError, match="at least"):
        unpack(planes, 5, 40)
    with pytest.raises(ValueError, match="words per row"):
        unpack(planes, 2, 65)
    with pytest.raises(ValueError, match="xq"):
        gemm(x.to(torch.int32), planes, 2)
    with pytest.raises(ValueError, match="words per row"):
        gemm(torch.zeros(3, 70, dtype=torch.uint8), planes, 2)
    with pytest.raises(ValueError, match="path"):
        gemm(x, planes, 2, "mma")
    with pytest.raises(ValueError, match="gemv"):
        gemm(torch.zeros(9, 40, dtype=torch.uint8), planes, 2, "gemv")


@pytest.mark.skipif(not _ext.cuda_available(), reason="eqkernels._C built without CUDA")
def test_cuda_entry_points_exist_and_reject_cpu_tensors():
    """Without a GPU the CUDA kernels cannot run; their wrappers must still be exposed under the
    names the Python ops call and reject CPU tensors before touching a device."""
    q = torch.zeros(2, 40, dtype=torch.int8)
    planes = torch.zeros(3, 2, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="CUDA tensor"):
        _k("pack_bitplanes_cuda")(q, 3)
    with pytest.raises(ValueError, match="CUDA tensor"):
        _k("unpack_bitplanes_cuda")(planes, 3, 40)
    with pytest.raises(ValueError, match="CUDA tensor"):
        _k("lowbit_gemm_int_cuda")(torch.zeros(1, 40, dtype=torch.uint8), planes, 3)
    with pytest.raises(ValueError, match="bits"):
        _k("pack_bitplanes_cuda")(q, 9)
