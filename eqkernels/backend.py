"""Backend choice shared by every op.

`backend` is one of "auto", "torch", "triton", "cpp", "cuda". `None` means the environment
variable EQK_BACKEND, else "auto". "auto" picks the fastest implementation available for the
tensor's device in the op's preference order and falls back to the next one (logged once at
INFO). An explicit backend that cannot run raises `BackendUnavailable`.

The C++ CPU kernels take an ISA cap: `cpu_isa_cap()` is the value every op passes (-1, the
detected level, itself capped by EQK_CPU_ISA read once per process), and `force_cpu_isa` lowers
it per thread inside a block, so that one process can run every ISA path (a testing aid).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import threading

import torch

from . import _ext

BACKENDS = ("auto", "torch", "triton", "cpp", "cuda")

log = logging.getLogger("eqkernels")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run this op on this tensor."""


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def validate_name(backend: str | None) -> str:
    if backend is None:
        backend = os.environ.get("EQK_BACKEND", "auto") or "auto"
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: accepted values are {', '.join(BACKENDS)}")
    return backend


def _why_not(name: str, device: torch.device, kernel: str | None) -> str | None:
    """None when `name` can run on `device`, else the reason it cannot."""
    if name == "torch":
        return None
    if name == "triton":
        if not triton_importable():
            return "triton is not installed"
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreted()):
            return None
        return f"triton runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {device.type}"
    if name == "cpp":
        if device.type != "cpu":
            return f"the cpp backend runs on CPU tensors, got {device.type}"
        if not _ext.available():
            return f"eqkernels._C is not built; {_ext.BUILD_HINT}"
        if kernel is not None and not _ext.has_kernel(kernel):
            return f"eqkernels._C has no kernel {kernel!r}"
        return None
    if name == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, got {device.type}"
        if not _ext.cuda_available():
            return "eqkernels._C was built without CUDA (EQK_BUILD_CUDA=0 or no nvcc)"
        if kernel is not None and not _ext.has_kernel(kernel):
            return f"eqkernels._C has no kernel {kernel!r}"
        return None
    raise AssertionError(name)


_logged: set[tuple] = set()


def choose(
    backend: str | None,
    device: torch.device,
    op: str,
    preference: dict[str, tuple[str, ...]],
    kernels: dict[str, str] | None = None,
) -> str:
    """Resolve `backend` for `op` on `device`.

    preference maps a device type ("cpu", "cuda") to the op's backends in the order "auto"
    tries them; "torch" (the reference) is always last. kernels maps a backend to the `_C`
    kernel whose presence it needs.
    """
    name = validate_name(backend)
    kernels = kernels or {}
    order = (*tuple(preference.get(device.type, ())), "torch")
    if name != "auto":
        if name not in order:
            raise BackendUnavailable(
                f"{op}: backend={name!r} has no implementation for {device.type} tensors; "
                f"available there: {', '.join(order)}"
            )
        reason = _why_not(name, device, kernels.get(name))
        if reason is not None:
            raise BackendUnavailable(f"{op}: backend={name!r} is unavailable: {reason}")
        return name
    skipped = []
    for candidate in order:
        reason = _why_not(candidate, device, kernels.get(candidate))
        if reason is None:
            if skipped:
                key = (op, device.type, candidate)
                if key not in _logged:
                    _logged.add(key)
                    log.info(
                        "%s on %s: using %s (%s)", op, device.type, candidate, "; ".join(skipped)
                    )
            return candidate
        skipped.append(f"{candidate}: {reason}")
    raise AssertionError("the torch backend is always available")


def check_values_enabled(t: torch.Tensor) -> bool:
    """Whether data-dependent value checks (scale > 0, finite) run for this tensor.

    They run in eager mode on CPU tensors, or everywhere with EQK_CHECK=1; never inside a
    compiled graph or on CUDA by default, because they need a host sync.
    """
    if os.environ.get("EQK_CHECK", "0") == "1":
        return True
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "cpu" and not isinstance(t, torch._subclasses.FakeTensor)


_isa_state = threading.local()


def cpu_isa_cap() -> int:
    """The ISA cap passed to the C++ kernels (-1 = the detected level)."""
    return getattr(_isa_state, "cap", -1)


def cpu_isa_levels() -> dict[str, int]:
    """ISA level names and the numbers the C++ kernels use for them (from `eqkernels._C`)."""
    return dict(_ext.ext().ISA_LEVELS)


@contextlib.contextmanager
def force_cpu_isa(name: str):
    """Run the C++ CPU kernels at most at ISA level `name` ("portable", "avx2", "avx512",
    "avx512gfni": AVX-512 plus VBMI and GFNI, for the tiled-plane integer linear) inside the
    block, on this thread. The detected level (and EQK_CPU_ISA) still caps it. Needs the
    extension (the levels are its numbers)."""
    levels = cpu_isa_levels()
    if name not in levels:
        raise ValueError(f"isa={name!r}: accepted values are {', '.join(levels)}")
    previous = cpu_isa_cap()
    _isa_state.cap = levels[name]
    try:
        yield
    finally:
        _isa_state.cap = previous
