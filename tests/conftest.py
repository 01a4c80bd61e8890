"""Test configuration.

Without a GPU, TRITON_INTERPRET=1 is set before anything imports triton, so that the Triton
kernels run on CPU tensors through the interpreter. With a GPU it is left unset: the Triton
kernels then run compiled, on CUDA tensors.

The `device` fixture yields `cpu` and `cuda`; the cuda cases carry the `gpu` marker (select them
with `-m gpu`) and are skipped, with the reason, when torch.cuda.is_available() is False. A test
that also takes a `backend` parameter skips the pairs that cannot run (the cpp backend on CUDA,
the cuda backend on CPU, Triton on CPU tensors when the interpreter is off).
"""

import os

import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

NO_GPU_REASON = "no CUDA device: torch.cuda.is_available() is False"
requires_gpu = pytest.mark.skipif(not GPU, reason=NO_GPU_REASON)
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, requires_gpu])]


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


def cpp_available() -> bool:
    from eqkernels import _ext

    return _ext.available()


requires_cpp = pytest.mark.skipif(
    os.environ.get("EQK_REQUIRE_EXT") != "1" and not cpp_available(),
    reason="eqkernels._C is not built",
)


def backend_device_mismatch(backend, device: str) -> str | None:
    """Why `backend` (a test's backend id: "ref", "torch", "cpp", "cpp-avx2", "triton",
    "cuda") cannot run on `device`, or None."""
    if not isinstance(backend, str):
        return None
    if backend.startswith("cpp") and device == "cuda":
        return "the cpp backend runs on CPU tensors"
    if backend == "cuda" and device == "cpu":
        return "the cuda backend runs on CUDA tensors"
    if backend == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (set only without a GPU)"
    return None


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    callspec = getattr(request.node, "callspec", None)
    why = backend_device_mismatch(
        callspec.params.get("backend") if callspec else None, request.param
    )
    if why is not None:
        pytest.skip(why)
    return torch.device(request.param)


def on(device, *tensors):
    """The tensors moved to `device` (None stays None); differentiable, so gradients of a
    result computed on the device flow back to CPU leaves."""
    moved = tuple(None if t is None else t.to(device) for t in tensors)
    return moved[0] if len(moved) == 1 else moved


def call_on(device, fn, *args, **kwargs):
    """fn(*args, **kwargs) with every tensor argument moved to `device`; a tensor result is
    checked to be on `device` and returned on the CPU."""
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    out = fn(*args, **kwargs)
    assert out.device.type == torch.device(device).type, (out.device, device)
    return out.cpu()


def need_kernel(name: str) -> None:
    """Skip a test without the `_C` kernel `name`, or fail it where the extension is required
    (EQK_REQUIRE_EXT=1, as in CI)."""
    from eqkernels import _ext

    if not _ext.has_kernel(name):
        if os.environ.get("EQK_REQUIRE_EXT") == "1":
            pytest.fail(f"EQK_REQUIRE_EXT=1 but eqkernels._C has no kernel {name!r}")
        pytest.skip(f"eqkernels._C has no kernel {name!r}")


# The backends of the low-bit op tests: the torch reference, the C++ kernels capped at each
# ISA level, and cuda.
LOWBIT_ISAS = ("portable", "avx2", "avx512", "avx512gfni")
LOWBIT_BACKENDS = ["torch"] + [f"cpp-{isa}" for isa in LOWBIT_ISAS] + ["cuda"]


def lowbit_backend(backend: str, cpu_kernel: str, cuda_kernels=("lowbit_gemm_int_cuda",)):
    """(the op's backend name, a context-manager factory) for one of LOWBIT_BACKENDS, after
    `need_kernel` of what that backend runs (`cpu_kernel`, or `cuda_kernels`)."""
    import contextlib

    from eqkernels.backend import force_cpu_isa

    if backend == "torch":
        return "torch", contextlib.nullcontext
    if backend == "cuda":
        for name in cuda_kernels:
            need_kernel(name)
        return "cuda", contextlib.nullcontext
    need_kernel(cpu_kernel)
    isa = backend.split("-", 1)[1]
    return "cpp", lambda: force_cpu_isa(isa)
