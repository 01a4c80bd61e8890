"""Supernet training: recipes (float, qat, multiquant, eqnet, layered, limpq), the Trainer and
its distributed form. Reading a trained run lives in `eqnet.run`; `TrainConfig`, `load_run`,
`evaluate` are re-exported here for callers of the training API.

Names are imported lazily so `import eqnet.train` builds nothing and touches no device.
"""

import importlib

_EXPORTS = {
    "Trainer": "eqnet.train.trainer",
    "TrainConfig": "eqnet.run.config",
    "evaluate": "eqnet.run.trained",
    "load_run": "eqnet.run.trained",
    "build_supernet_from_run": "eqnet.run.trained",
    "TrainedRun": "eqnet.run.trained",
    "NonFiniteLossError": "eqnet.train.trainer",
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
