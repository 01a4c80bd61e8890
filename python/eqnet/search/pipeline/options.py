"""SearchOptions: every setting of one search, typed and checked before anything is loaded."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from eqnet.search.genome import parse_constraints

METHODS = ("ga", "limpq", "layered")
PREDICTORS = ("noise-ridge", "mlp")


class OptionError(ValueError):
    """A SearchOptions field with a value outside its accepted range; `field` names it, so a
    command line can report the flag the user typed."""

    def __init__(self, field: str, value, accepted: str):
        super().__init__(f"{field}={value!r}: {accepted}")
        self.field, self.value, self.accepted = field, value, accepted


@dataclass(frozen=True)
class SearchOptions:
    """One search of a trained run. `constraints` holds one spec per target ('bitops<=1.5G',
    'size<=200k,avg_bits<=4': comma = all of them); each gives one chosen config.

    Common: `out` (default RUN/search-METHOD), `seed`, `device`, `threads` (torch intra-op
    threads; None keeps torch's), `bn_batches` (BN re-estimation batches; None: the run's),
    `uniform` (measure the uniform-width baselines on the test split), `progress`.

    ga: the Monte Carlo accuracy dataset (`dataset_size` configs, bucketed on `mc_metric`,
    measured on the first `holdout_images` held-out images, in `dataset_workers` processes),
    the accuracy `predictor` (noise-ridge or mlp, `predictor_epochs`, `val_fraction` held out
    for its Kendall tau), the genetic search (`population`, `elites`, `mutations`,
    `crossovers`, `iterations`; `forms` also searches granularity/symmetry), and the rerank of
    its `rerank` best configs with the in-budget uniform widths on `rerank_images` held-out
    images (None: all), keeping a mixed config only if it wins by `rerank_z` paired standard
    errors. limpq: `alpha`, the weight of the weight indicators. layered: `a_bits`, the
    activation width (None: the widest)."""

    run: str | os.PathLike
    method: str
    constraints: tuple[str, ...]
    out: str | os.PathLike | None = None
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    bn_batches: int | None = None
    uniform: bool = True
    progress: bool = True
    # ga
    dataset_size: int = 500
    population: int = 100
    elites: int = 25
    mutations: int = 50
    crossovers: int = 50
    iterations: int = 500
    predictor: str = "noise-ridge"
    predictor_epochs: int = 200
    val_fraction: float = 0.2
    holdout_images: int | None = None
    dataset_workers: int = 1
    mc_metric: str = "avg_bits"
    forms: bool = False
    rerank: int = 8
    rerank_z: float = 1.0
    rerank_images: int | None = None
    # limpq
    alpha: float = 1.0
    # layered
    a_bits: int | None = None

    def __post_init__(self):
        if isinstance(self.constraints, str):
            object.__setattr__(self, "constraints", (self.constraints,))
        else:
            object.__setattr__(self, "constraints", tuple(self.constraints))
        self.validate()

    def validate(self) -> SearchOptions:
        if self.method not in METHODS:
            raise OptionError("method", self.method, f"accepted values are {', '.join(METHODS)}")
        if self.predictor not in PREDICTORS:
            accepted = f"accepted values are {', '.join(PREDICTORS)}"
            raise OptionError("predictor", self.predictor, accepted)
        if not self.constraints:
            raise OptionError("constraints", self.constraints, "give at least one constraint")
        for spec in self.constraints:
            parse_constraints(spec)  # a clear error for a bad spec before anything is loaded
        if not (0 <= self.rerank_z < math.inf):
            raise OptionError("rerank_z", self.rerank_z, "accepted values are finite and >= 0")
        for name in ("dataset_workers", "dataset_size", "population", "iterations"):
            if getattr(self, name) < 1:
                raise OptionError(name, getattr(self, name), "accepted values are >= 1")
        for name in ("threads", "bn_batches", "holdout_images", "rerank_images"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise OptionError(name, v, "accepted values are >= 1")
        for name in ("elites", "mutations", "crossovers", "rerank", "predictor_epochs"):
            if getattr(self, name) < 0:
                raise OptionError(name, getattr(self, name), "accepted values are >= 0")
        if not 0.0 < self.val_fraction < 1.0:
            raise OptionError("val_fraction", self.val_fraction, "accepted values are in (0, 1)")
        return self
