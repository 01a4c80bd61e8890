"""pack_bitplanes / unpack_bitplanes against an oracle built from the layout definition
(DESIGN.md "Bit planes and the low-bit GEMM"), on every backend and CPU ISA path, and on each
device of the `device` fixture (the torch and cuda backends on CUDA tensors when a GPU is there)."""

import contextlib

import pytest
import torch
from conftest import need_kernel, on
from plane_oracle import pack_planes

import eqkernels as E
from eqkernels import _ext
from eqkernels.backend import force_cpu_isa

ISAS = ("portable", "avx2", "avx512")
BACKENDS = ["torch"] + [f"cpp-{isa}" for isa in ISAS] + ["cuda"]


def run_on(backend):
    """(backend name, context manager) for a test id like 'cpp-avx2'."""
    if backend == "torch":
        return "torch", contextlib.nullcontext()
    if backend == "cuda":
        need_kernel("pack_bitplanes_cuda")
        return "cuda", contextlib.nullcontext()
    need_kernel("unpack_bitplanes_cpu")
    return "cpp", force_cpu_isa(backend.split("-", 1)[1])


def oracle_pack(q, bits):
    """Canonical planes from the definition, one Python int per 32-bit word."""
    N, K = q.shape
    W = (K + 31) // 32
    out = torch.zeros((bits, N, W), dtype=torch.int64)
    values = q.tolist()
    for n in range(N):
        for k in range(K):
            code = values[n][k] % (1 << bits)  # two's complement in `bits` bits
            for j in range(bits):
                if (code >> (bits - 1 - j)) & 1:
                    out[j, n, k // 32] += 1 << (k % 32)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def random_codes(N, K, bits):
    return torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (N, K), dtype=torch.int64)


@pytest.mark.parametrize("bits", range(1, 9))
def test_vectorized_test_packer_matches_the_definition(bits):
    """The other op tests build their planes with tests/plane_oracle.py: it must equal the
    per-bit loop of the definition."""
    torch.manual_seed(bits)
    for N, K in [(1, 1), (3, 33), (2, 97), (4, 64)]:
        q = random_codes(N, K, bits)
        assert torch.equal(pack_planes(q, bits), oracle_pack(q, bits))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("N,K", [(1, 1), (1, 31), (3, 33), (2, 97), (5, 64)])
def test_pack_unpack_exact(backend, bits, N, K, device):
    name, ctx = run_on(backend)
    q = random_codes(N, K, bits)
    # Make the extremes appear whatever the draw.
    q[0, 0] = -(1 << (bits - 1))
    q[-1, -1] = (1 << (bits - 1)) - 1
    with ctx:
        planes = E.pack_bitplanes(on(device, q.to(torch.int8)), bits, backend=name)
        assert planes.dtype == torch.int32 and planes.shape == (bits, N, (K + 31) // 32)
        assert planes.device == device
        assert torch.equal(planes.cpu(), oracle_pack(q, bits))
        back = E.unpack_bitplanes(planes, bits, K, backend=name)
    assert back.dtype == torch.int8 and back.device == device
    assert torch.equal(back.cpu().to(torch.int64), q)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_prefix_property(backend, n, device):
    name, ctx = run_on(backend)
    N, K = 7, 97
    q = random_codes(N, K, n)
    planes = on(device, oracle_pack(q, n))
    with ctx:
        for b in range(1, n + 1):
            expect = torch.floor(q.to(torch.float64) / 2.0 ** (n - b)).to(torch.int64)
            got = E.unpack_bitplanes(planes, b, K, backend=name).cpu().to(torch.int64)
            assert torch.equal(got, expect), b
            # A file prefix holds exactly b planes.
            prefix = planes[:b].clone()
            got = E.unpack_bitplanes(prefix, b, K, backend=name).cpu().to(torch.int64)
            assert torch.equal(got, expect), b


@pytest.mark.parametrize("backend", BACKENDS)
def test_pack_any_integer_dtype_and_noncontiguous(backend, device):
    name, ctx = run_on(backend)
    q = random_codes(40, 9, 5)
    expect = oracle_pack(q.T, 5)
    with ctx:
        for dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
            got = E.pack_bitplanes(on(device, q.to(dtype)).T, 5, backend=name)  # transposed view
            assert torch.equal(got.cpu(), expect), dtype
        planes_nc = on(device, torch.cat([expect, expect], dim=2))[:, :, :2]  # non-contiguous
        assert not planes_nc.is_contiguous()
        got = E.unpack_bitplanes(planes_nc, 5, 40, backend=name)
    assert torch.equal(got.cpu().to(torch.int64), q.T)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pack_out_of_range_raises(backend, device):
    name, ctx = run_on(backend)
    with ctx:
        for bits, bad in ((1, 1), (1, -2), (4, 8), (4, -9), (8, 128)):
            q = torch.zeros((2, 3), dtype=torch.int32)
            q[1, 2] = bad
            with pytest.raises(ValueError, match="q: values"):
                E.pack_bitplanes(on(device, q), bits, backend=name)


def test_bad_arguments():
    q = torch.zeros((2, 3), dtype=torch.int8)
    for bits in (0, 9, 2.0, True):
        with pytest.raises(ValueError, match="bits="):
            E.pack_bitplanes(q, bits)
    with pytest.raises(ValueError, match="q: dtype"):
        E.pack_bitplanes(q.float(), 2)
    with pytest.raises(ValueError, match="q: expected a 2-D"):
        E.pack_bitplanes(q[0], 2)
    planes = E.pack_bitplanes(q, 3, backend="torch")
    with pytest.raises(ValueError, match="bits=4"):
        E.unpack_bitplanes(planes, 4, 3)
    with pytest.raises(ValueError, match="does not match K"):
        E.unpack_bitplanes(planes, 3, 33)
    with pytest.raises(ValueError, match="planes: expected an int32"):
        E.unpack_bitplanes(planes.to(torch.int64), 3, 3)
    with pytest.raises(ValueError, match="K=0"):
        E.unpack_bitplanes(planes, 3, 0)
    with pytest.raises(ValueError, match="backend="):
        E.unpack_bitplanes(planes, 3, 3, backend="fast")


def test_opcheck():
    q = random_codes(3, 40, 6).to(torch.int8)
    backends = ["torch"] + (["cpp"] if _ext.has_kernel("pack_bitplanes_cpu") else [])
    for name in backends:
        torch.library.opcheck(torch.ops.eqk.pack_bitplanes.default, (q, 6, name))
        planes = oracle_pack(q.to(torch.int64), 6)
        torch.library.opcheck(torch.ops.eqk.unpack_bitplanes.default, (planes, 4, 40, name))
