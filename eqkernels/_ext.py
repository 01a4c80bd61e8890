"""Lazy loader of the compiled kernel module `eqkernels._C`.

Importing eqkernels never loads `_C`; the first op that needs it calls `ext()`, which raises
`ExtensionUnavailable` (a RuntimeError) saying how to build it when it is missing.
"""

from __future__ import annotations

import functools
import glob
import importlib
import importlib.util
import os
import sys

BUILD_HINT = (
    "build it with `make build` (or `pip install --no-build-isolation -e .` inside the repo; "
    "EQK_BUILD_CUDA=0 skips the CUDA sources), or pick backend='torch'"
)


class ExtensionUnavailable(RuntimeError):
    """The compiled extension eqkernels._C (or one of its kernels) is not available."""


@functools.cache
def _load():
    # EQK_EXT_DIR points at a directory holding a privately built _C*.so (a development aid:
    # `setup.py build_ext --build-lib DIR` builds there without touching the in-place module).
    override = os.environ.get("EQK_EXT_DIR")
    try:
        if override:
            found = sorted(glob.glob(os.path.join(override, "_C*.so")))
            if not found:
                raise ImportError(f"EQK_EXT_DIR={override!r} holds no _C*.so")
            spec = importlib.util.spec_from_file_location("eqkernels._C", found[0])
            module = importlib.util.module_from_spec(spec)
            sys.modules["eqkernels._C"] = module
            spec.loader.exec_module(module)
            return module, None
        return importlib.import_module("eqkernels._C"), None
    except ImportError as exc:  # missing or built against another torch
        return None, exc


def available() -> bool:
    """True when eqkernels._C imports."""
    return _load()[0] is not None


def has_kernel(name: str) -> bool:
    """True when eqkernels._C imports and exposes the kernel `name`."""
    module = _load()[0]
    return module is not None and hasattr(module, name)


def cuda_available() -> bool:
    """True when eqkernels._C was built with its CUDA kernels."""
    module = _load()[0]
    return module is not None and bool(getattr(module, "with_cuda", False))


def ext():
    """Return eqkernels._C or raise ExtensionUnavailable with build instructions."""
    module, error = _load()
    if module is None:
        raise ExtensionUnavailable(f"eqkernels._C is not available ({error}); {BUILD_HINT}")
    return module


def kernel(name: str):
    """Return the compiled kernel `name`, or raise ExtensionUnavailable naming it."""
    module = ext()
    try:
        return getattr(module, name)
    except AttributeError:
        raise ExtensionUnavailable(
            f"eqkernels._C has no kernel {name!r} (built without it, e.g. EQK_OPS or "
            f"EQK_BUILD_CUDA=0); {BUILD_HINT}"
        ) from None
