"""eqkernels: kernels for elastic quantization.

Importing this package touches no device and builds nothing; the compiled extension
`eqkernels._C` is loaded on first use by the ops that need it.
"""

from ._ext import ExtensionUnavailable
from .backend import BACKENDS, BackendUnavailable

__all__ = ["BACKENDS", "BackendUnavailable", "ExtensionUnavailable"]
__version__ = "0.1.0"
