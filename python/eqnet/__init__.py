"""eqnet: train one elastic quantization supernet, search it, deploy it from one file.

Public names are imported lazily (PEP 562), so `import eqnet` stays cheap and each part's
optional dependencies load only when that part is used.
"""

import importlib

from eqkernels import __version__ as __version__

# `convert` is both a submodule (eqnet/convert.py) and the function users call. Importing the
# submodule anywhere (`from eqnet.convert import calibrate`) would set the package attribute
# `eqnet.convert` to the module object on first load; binding the function here, while that
# first load happens, makes `eqnet.convert(...)` the function however the package is imported.
from .convert import calibrate as calibrate
from .convert import convert as convert
from .convert import recalibrate_bn as recalibrate_bn

_EXPORTS = {
    "ElasticSpace": "eqnet.space",
    "LayerChoice": "eqnet.space",
    "SubnetConfig": "eqnet.space",
    "export": "eqnet.deploy",
    "load": "eqnet.deploy",
    "export_onnx": "eqnet.deploy.onnx",
}

__all__ = sorted([*_EXPORTS, "calibrate", "convert", "recalibrate_bn"])


# Subpackages reachable as attributes after a plain `import eqnet` (eqnet.models.get(...)).
_SUBMODULES = ("data", "deploy", "models", "nn", "search", "space", "train")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"eqnet.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'eqnet' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
