"""Supernet training: recipes (float, qat, multiquant, eqnet, layered, limpq), the Trainer,
evaluation, checkpoints, and loading a trained run (`load_run`, `build_supernet_from_run`).

Names are imported lazily so `import eqnet.train` builds nothing and touches no device.
"""

import importlib

_EXPORTS = {
    "Trainer": "eqnet.train.trainer",
    "TrainConfig": "eqnet.train.config",
    "evaluate": "eqnet.train.trainer",
    "load_run": "eqnet.train.trainer",
    "build_supernet_from_run": "eqnet.train.trainer",
    "TrainedRun": "eqnet.train.trainer",
    "NonFiniteLossError": "eqnet.train.trainer",
    "importance_indicators": "eqnet.train.recipes",
    "OnlineAdaptiveLabels": "eqnet.train.labels",
    "ConfigSampler": "eqnet.train.sampler",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'eqnet.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
