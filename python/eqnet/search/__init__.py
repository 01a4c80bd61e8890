"""Mixed-precision search in a trained supernet.

cost.py         CostModel: per-layer MACs, params; BitOPs, size, average widths at a config
genome.py       ChoiceTable (configs as int arrays), Constraint / parse_constraints, Budget
montecarlo.py   MonteCarloSampler (MultiQuant eq. 5-6) and the uniform rejection baseline
accuracy_data.py  resumable JSONL (config, accuracy) dataset with BN recalibration
distributed_dataset.py  the same dataset built by the ranks of a torchrun job
predictor.py    AccuracyPredictor (MLP on SubnetConfig.encode()), Kendall tau / Pearson r
noise_predictor.py  NoiseRidgePredictor (ridge on per-layer quantization-noise powers)
genetic.py      genetic_search (EQ-Net Algorithm 1)
ilp.py          choose_per_layer: one choice per layer under budgets (scipy milp / HiGHS)
limpq.py        LIMPQ importance-indicator search
layered.py      vertical-layering eq. 12 bit allocation
pareto.py       Pareto front CSV and PNG
"""

import importlib

_EXPORTS = {
    "CostModel": "eqnet.search.cost",
    "METRICS": "eqnet.search.cost",
    "ChoiceTable": "eqnet.search.genome",
    "Constraint": "eqnet.search.genome",
    "Budget": "eqnet.search.genome",
    "parse_constraints": "eqnet.search.genome",
    "MonteCarloSampler": "eqnet.search.montecarlo",
    "uniform_sample": "eqnet.search.montecarlo",
    "build_dataset": "eqnet.search.accuracy_data",
    "read_dataset": "eqnet.search.accuracy_data",
    "build_dataset_distributed": "eqnet.search.distributed_dataset",
    "AccuracyPredictor": "eqnet.search.predictor",
    "predictor_fitness": "eqnet.search.predictor",
    "NoiseRidgePredictor": "eqnet.search.noise_predictor",
    "rank_metrics": "eqnet.search.predictor",
    "genetic_search": "eqnet.search.genetic",
    "choose_per_layer": "eqnet.search.ilp",
    "limpq_search": "eqnet.search.limpq",
    "importance_indicators": "eqnet.search.limpq",
    "downsampling_error": "eqnet.search.layered",
    "layered_allocation": "eqnet.search.layered",
    "layered_search": "eqnet.search.layered",
    "pareto_front": "eqnet.search.pareto",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'eqnet.search' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
