"""Every GPU kernel through the real compilers, for sm_80 and sm_90, without a GPU.

Triton: each `AOT_SPECS` entry of `eqkernels/triton/<op>.py` is compiled by `triton.compile`
down to a cubin, in a subprocess without TRITON_INTERPRET (the interpreter's `@triton.jit`
objects cannot be compiled) and with a fresh TRITON_CACHE_DIR (a cached cubin skips the front
end). The specs must cover every `@triton.jit` kernel and every specialization the launchers
produce (checked by recording the launchers' arguments and applying Triton's own specialization
rule). CUDA: each `.cu` under csrc/ is compiled by nvcc to a cubin with `-Xptxas -v`. For both,
`cuobjdump -res-usage` reads the resources; the tests assert no compile error and no spill, and
never compare register counts with a table (they move with the ptxas version).

nvcc missing skips the CUDA test, except in CI (CI=true) or with EQK_REQUIRE_NVCC=1, where it
fails. The compiles run once per session, two nvcc processes at a time.
"""

from __future__ import annotations

import inspect
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from bench import gpu_resources
from eqkernels.triton import aot
from eqkernels.triton import fake_quant as tfq

ROOT = Path(__file__).resolve().parent.parent

ARCHS = (80, 90)


def _nvcc_required() -> bool:
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("EQK_REQUIRE_NVCC") == "1"


@pytest.fixture(scope="module")
def triton_compiled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("triton-aot")
    return aot.run_isolated(list(ARCHS), str(tmp / "cubins"), str(tmp / "cache"))


@pytest.fixture(scope="module")
def cuda_compiled(tmp_path_factory):
    if gpu_resources.nvcc() is None:
        if _nvcc_required():
            pytest.fail("nvcc not found (CUDA_HOME/bin or PATH) and CI=true/EQK_REQUIRE_NVCC=1")
        pytest.skip("nvcc is not installed on this machine")
    return gpu_resources.cuda_resources(tmp_path_factory.mktemp("cuda-cubins"), ARCHS, jobs=2)


def _assert_clean(rec: dict, what: str) -> None:
    assert rec["ok"], f"{what}: {rec.get('error')}"
    usage = rec["usage"]
    assert usage.get("REG", 0) > 0, f"{what}: no register count in cuobjdump -res-usage"
    assert rec["spill_stores"] == 0 and rec["spill_loads"] == 0, f"{what} spills: {rec}"
    assert usage.get("LOCAL", 0) == 0, f"{what} uses local memory: {usage}"


# ---------------------------------------------------------------------------------------------
# Triton


@pytest.mark.slow  # ~50 s on 2 shared cores: 44 compiles, ptxas and cuobjdump runs
def test_triton_specs_compile_to_cubin_without_spills(triton_compiled):
    records = triton_compiled["records"]
    specs = [(m, s) for m in aot.kernel_modules() for s in getattr(m, "AOT_SPECS", [])]
    assert specs, "no AOT_SPECS found in eqkernels/triton"
    assert len(records) == len(specs) * len(ARCHS)
    for rec in records:
        _assert_clean(rec, f"{rec['module']}: {rec['label']} sm_{rec['arch']}")
    assert {r["target"] for r in records} == {"sm_80", "sm_90a"}
    assert len({r["cubin"] for r in records}) == len(records)  # one cubin file per record
    assert triton_compiled["uncovered"] == {m.__name__: [] for m in aot.kernel_modules()}


def test_every_jit_function_is_covered_by_aot_specs():
    for module in aot.kernel_modules():
        assert hasattr(module, "AOT_SPECS"), f"{module.__name__} declares no AOT_SPECS"
        assert aot.jit_functions(module), f"{module.__name__}: no @triton.jit function found"
        assert aot.uncovered(module) == [], module.__name__


def test_a_kernel_without_spec_is_reported(tmp_path):
    """The coverage check itself: a module with a listed kernel, its helper, and a new kernel
    nobody listed."""
    import triton
    import triton.language as tl

    src = """
import triton
import triton.language as tl

@triton.jit
def _helper(x):
    return x + 1

@triton.jit
def listed_kernel(x_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, _helper(tl.load(x_ptr + offs)))

@triton.jit
def forgotten_kernel(x_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) * 2)
"""
    path = tmp_path / "aot_probe_module.py"
    path.write_text(src)
    module = types.ModuleType("aot_probe_module")
    module.__file__ = str(path)
    sys.modules[module.__name__] = module
    try:
        exec(compile(src, str(path), "exec"), module.__dict__)
        assert set(aot.jit_functions(module)) == {"_helper", "listed_kernel", "forgotten_kernel"}
        assert aot.uncovered(module) == ["_helper", "forgotten_kernel", "listed_kernel"]
        module.AOT_SPECS = [(module.listed_kernel, {"x_ptr": "*fp32", "BLOCK": "constexpr"}, {})]
        assert aot.uncovered(module) == ["forgotten_kernel"]
    finally:
        del sys.modules[module.__name__]
    assert triton and tl


# ---------------------------------------------------------------------------------------------
# The specs cover what the launchers produce


def _specialization_rule():
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError:
        pytest.skip("this triton has no native_specialize_impl (the rule is read from triton)")

    def rule(value, is_const, specialize):
        return native_specialize_impl(BaseBackend, value, is_const, specialize, False)

    return rule


class _Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the call."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.kernel, args, kwargs))


def _do_not_specialize(kernel) -> set[str]:
    names = getattr(kernel, "do_not_specialize", None)
    if names is None:
        names = getattr(kernel, "kwargs", {}).get("do_not_specialize") or ()
    return {kernel.arg_names[n] if isinstance(n, int) else n for n in names}


def _launch_signature(kernel, args, kwargs, rule):
    """(signature, constexprs) as Triton's JIT would build them for this call (alignment and
    divisibility attributes aside)."""
    params = inspect.signature(kernel.fn).parameters
    bound = dict(zip(kernel.arg_names, args)) | kwargs
    no_spec = _do_not_specialize(kernel)
    signature, constexprs = {}, {}
    for name in kernel.arg_names:
        value = bound[name]
        is_const = "constexpr" in str(params[name].annotation)
        kind, _key = rule(value, is_const, name not in no_spec)
        if is_const or kind == "constexpr":
            signature[name] = "constexpr"
            constexprs[name] = value
        else:
            signature[name] = kind
    return signature, constexprs


LAUNCH_SHAPES = [(2, 3, 40), (1, 1, 5000), (4, 6, 1), (1, 1, 2**31 + 7)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_aot_specs_cover_every_launch_specialization(monkeypatch, dtype):
    rule = _specialization_rule()
    calls = []
    for name in ("fake_quant_fwd_kernel", "fake_quant_bwd_kernel"):
        monkeypatch.setattr(tfq, name, _Recorder(getattr(tfq, name), calls))
    for shape in LAUNCH_SHAPES:
        x3 = torch.empty(shape, dtype=dtype, device="meta")  # the largest has no storage
        s = torch.ones(shape[1], device="meta")
        for qmin, qmax, inv_step, step, comp in ((-8, 7, 1.0, 1.0, 0.0), (0, 1, 0.25, 4.0, 0.375)):
            tfq.forward(x3, s, s, s, qmin, qmax, inv_step, step, comp)
            tfq.backward(x3, x3, s, s, s, qmin, qmax, inv_step, step, comp)
    assert len(calls) == 2 * 2 * len(LAUNCH_SHAPES)
    specs = [(k, sig, const) for k, sig, const in tfq.AOT_SPECS]
    seen = set()
    for kernel, args, kwargs in calls:
        signature, constexprs = _launch_signature(kernel, args, kwargs, rule)
        assert (kernel, signature, constexprs) in specs, (kernel.arg_names, signature, constexprs)
        seen.add(str((kernel.fn.__name__, signature, constexprs)))
    # All three `inner` forms of both kernels appear: i32, i64 and the constant 1.
    assert len(seen) == 6


def test_launcher_rejects_a_grid_beyond_cuda_limits():
    x3 = torch.empty((2**20, 2**11, 1025), device="meta")
    s = torch.ones(2**11, device="meta")
    with pytest.raises(ValueError, match=r"x: .* Triton programs"):
        tfq.forward(x3, s, s, s, -8, 7, 1.0, 1.0, 0.0)


# ---------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.slow  # ~8 s on 2 cores: 2 .cu files x 2 archs, two nvcc at a time
def test_every_cu_file_compiles_for_sm80_sm90_without_spills(cuda_compiled):
    sources = {p.relative_to(ROOT).as_posix() for p in gpu_resources.cuda_sources()}
    assert sources, "no .cu file under csrc/"
    for rec in cuda_compiled:
        assert rec["ok"], f"{rec['source']} sm_{rec['arch']}: {rec['error']}"
        _assert_clean(rec, f"{rec['kernel']} ({rec['source']}) sm_{rec['arch']}")
    assert {(r["source"], r["arch"]) for r in cuda_compiled} == {
        (s, a) for s in sources for a in ARCHS
    }


def test_resource_parsing_reads_spills_and_names():
    log = (
        "ptxas info    : Function properties for _ZN3eqk6kernelILb1EEEvv\n"
        "    8 bytes stack frame, 12 bytes spill stores, 4 bytes spill loads\n"
    )
    assert aot.ptxas_spills(log) == (12, 4)
    assert gpu_resources._PTXAS_FUNCTION.findall(log) == [
        ("_ZN3eqk6kernelILb1EEEvv", "8", "12", "4")
    ]
    assert gpu_resources.short_name("_ZN3eqk6kernelILb1EEEvv") == "kernel<true>"
    assert gpu_resources.short_name("_ZN12_GLOBAL__N_14packEPKal") == "pack"
    assert gpu_resources.short_name("fake_quant_fwd_kernel") == "fake_quant_fwd_kernel"


def test_doc_table_is_written_between_markers(tmp_path):
    doc = tmp_path / "backends.md"
    doc.write_text("# Backends\n\ntext\n")
    cuda = [
        {"source": "csrc/a.cu", "arch": 80, "ok": True, "kernel": "k<true>",
         "usage": {"REG": 40, "SHARED": 128, "LOCAL": 0}, "spill_stores": 0, "spill_loads": 0},
    ]  # fmt: skip
    triton = {"records": [{"label": "t fp32", "arch": 90, "ok": False, "error": "x"}]}
    text = gpu_resources.table(cuda, triton, {"nvcc": "13.0"})
    gpu_resources.write_doc(text, doc)
    gpu_resources.write_doc(text, doc)  # replaced, not appended twice
    body = doc.read_text()
    assert body.count(gpu_resources.BEGIN) == 1 and body.startswith("# Backends\n\ntext\n")
    assert "| CUDA | `k<true>` (csrc/a.cu) | sm_80 | 40 | 128 | 0 | 0 | 0 / 0 |" in body
    assert "| Triton | t fp32 | sm_90 | compile error |" in body


LOWBIT_LAUNCHES = [  # M, N, K, group_size
    (1, 4096, 4096, None), (16, 4096, 14336, 128), (17, 33, 100, None), (256, 1, 64, 32),
]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lowbit_gemm_aot_specs_cover_every_launch(monkeypatch, dtype):
    """The low-bit float GEMM's launcher (with the compiled kernel's choice: not the
    interpreter's bf16 workaround) produces only listed specializations, and both BLOCK_M."""
    from eqkernels.triton import lowbit_gemm as tlg

    rule = _specialization_rule()
    calls = []
    kernel = tlg.lowbit_float_gemm_kernel
    monkeypatch.setattr(tlg, "lowbit_float_gemm_kernel", _Recorder(kernel, calls))
    monkeypatch.setattr(tlg, "triton_interpreted", lambda: False)
    for M, N, K, g in LOWBIT_LAUNCHES:
        W = (K + 31) // 32
        x2 = torch.empty((M, K), dtype=dtype, device="meta")
        planes = torch.empty((4, N, W), dtype=torch.int32, device="meta")
        G = K // g if g else 1
        scale = torch.empty((N, G), device="meta")
        for bits in (1, 2, 4):
            tlg.float_gemm(x2, planes, bits, K, scale, scale)
    seen = set()
    for kern, args, kwargs in calls:
        signature, constexprs = _launch_signature(kern, args, kwargs, rule)
        assert (kern, signature, constexprs) in tlg.AOT_SPECS, (signature, constexprs)
        seen.add(constexprs["BLOCK_M"])
    assert len(calls) == 3 * len(LOWBIT_LAUNCHES) and seen == {16, 32}
