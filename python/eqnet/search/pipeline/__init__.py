"""The search pipeline as a Python API: `run_search(SearchOptions(...))` does what
`eqnet search` does (the CLI only parses arguments into a SearchOptions).

    from eqnet.search.pipeline import SearchOptions, run_search

    result = run_search(SearchOptions("runs/layered", "layered", ["bitops<=7M"]))
    result.chosen[0]["test_accuracy"]

options.py     SearchOptions (typed, validated on construction), OptionError
context.py     SearchContext: the run's supernet, splits, cost model and real evaluator;
               DatasetWorkers: spawned processes that measure the accuracy dataset
method_ga.py   Monte Carlo dataset, accuracy predictor, genetic search, held-out rerank
method_ilp.py  LIMPQ and vertical-layering integer programs
driver.py      run_search: the methods, the test-split comparison, configs.json and Pareto
"""

from .driver import SearchResult, output_dir, run_search
from .options import METHODS, PREDICTORS, OptionError, SearchOptions

__all__ = [
    "METHODS",
    "PREDICTORS",
    "OptionError",
    "SearchOptions",
    "SearchResult",
    "output_dir",
    "run_search",
]
