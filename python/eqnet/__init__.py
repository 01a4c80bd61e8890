"""eqnet: train one elastic quantization supernet, search it, deploy it from one file.

Public names are imported lazily (PEP 562), so `import eqnet` stays cheap and each part's
optional dependencies load only when that part is used.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ElasticSpace": "eqnet.space",
    "LayerChoice": "eqnet.space",
    "SubnetConfig": "eqnet.space",
    "convert": "eqnet.convert",
    "calibrate": "eqnet.convert",
    "recalibrate_bn": "eqnet.convert",
    "export": "eqnet.deploy",
    "load": "eqnet.deploy",
    "export_onnx": "eqnet.deploy.onnx",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'eqnet' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
