"""eqkernels: kernels for elastic quantization.

Importing this package touches no device and builds nothing. The ops are imported lazily
(PEP 562), which also registers their torch.library schemas under `torch.ops.eqk`; the compiled
extension `eqkernels._C` is loaded on first use by the backends that need it.
"""

import importlib

from ._ext import ExtensionUnavailable as ExtensionUnavailable
from .backend import BACKENDS as BACKENDS
from .backend import BackendUnavailable as BackendUnavailable

__version__ = "0.1.0"

_OPS = {
    "qrange": "eqkernels.ops.fake_quant",
    "fake_quant": "eqkernels.ops.fake_quant",
    "fake_quant_ref": "eqkernels.ops.fake_quant",
    "fake_quant_layered": "eqkernels.ops.fake_quant",
    "fake_quant_layered_ref": "eqkernels.ops.fake_quant",
    "fake_quant_form": "eqkernels.ops.fake_quant_form",
    "fake_quant_form_inline": "eqkernels.ops.fake_quant_form",
    "form_row": "eqkernels.ops.fake_quant_form",
    "layered_form_row": "eqkernels.ops.fake_quant_form",
    "pack_bitplanes": "eqkernels.ops.bitplanes",
    "pack_bitplanes_ref": "eqkernels.ops.bitplanes",
    "unpack_bitplanes": "eqkernels.ops.bitplanes",
    "unpack_bitplanes_ref": "eqkernels.ops.bitplanes",
    "lowbit_linear": "eqkernels.ops.lowbit_gemm",
    "lowbit_linear_ref": "eqkernels.ops.lowbit_gemm",
    "lowbit_conv2d": "eqkernels.ops.lowbit_gemm",
    "lowbit_conv2d_ref": "eqkernels.ops.lowbit_gemm",
    "prepare_linear": "eqkernels.ops.lowbit_gemm",
    "prepare_conv2d": "eqkernels.ops.lowbit_gemm",
    "PreparedLinear": "eqkernels.ops.lowbit_gemm",
    "PreparedConv2d": "eqkernels.ops.lowbit_gemm",
    "ActQuant": "eqkernels.ops.lowbit_gemm",
    "StepProgram": "eqkernels.ops.step_program",
    "quantize_codes": "eqkernels.ops.fake_quant",
    "EqkFormatError": "eqkernels.format",
}

__all__ = sorted(["BACKENDS", "BackendUnavailable", "ExtensionUnavailable", *_OPS])


def __getattr__(name):
    module = _OPS.get(name)
    if module is None:
        raise AttributeError(f"module 'eqkernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
