"""SearchOptions: every setting of one search, typed and checked before anything is loaded."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from eqnet.forms import TargetForm, get_form, resolve_form
from eqnet.search.genome import parse_constraints

METHODS = ("ga", "limpq", "layered")
PREDICTORS = ("noise-ridge", "mlp")

# The papers' search pipeline (MultiQuant section 3.3, EQ-Net Algorithm 1): a 7-layer, 150-wide
# feed-forward predictor on one-hot encodings (7 linear layers: 6 hidden ReLU layers of 150 and
# the output), a Monte Carlo accuracy dataset of 5K configs (MultiQuant Fig. 3), the genetic
# search with OFA's evolution settings (population 100, a quarter kept as elites, 50 mutations
# and 50 crossovers per generation, 500 generations), and its Top-1 taken as is (no rerank).
PAPER_PRESET = {
    "predictor": "mlp",
    "mlp_depth": 6,
    "mlp_hidden": 150,
    "dataset_size": 5000,
    "population": 100,
    "elites": 25,
    "mutations": 50,
    "crossovers": 50,
    "iterations": 500,
    "rerank": 0,
}


def paper_preset(values: dict, given: set[str]) -> dict:
    """`values` with PAPER_PRESET applied to every key not in `given` (what the user set)."""
    return {**values, **{k: v for k, v in PAPER_PRESET.items() if k not in given}, "paper": True}


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
    errors. limpq: `alpha`, the weight of the weight indicators (None: the LIMPQ
    supplementary's value for the run's model, `eqnet.search.limpq.default_alpha`). layered:
    `a_bits`, the activation width (None: the widest).

    Target forms (ga, limpq): `target_forms` names deployment forms (`eqnet.forms`: tensorrt,
    snpe), `w_form`/`a_form` one explicit form (channel/sym, tensor/asym); every elastic layer
    of every candidate is then in one form, and each budget is searched once per form. The ga
    accuracy dataset is split evenly between the forms and one predictor, conditioned on the
    form through each layer's encoding, ranks them all (EQ-Net's conditional predictor)."""

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
    mlp_depth: int = 3  # hidden layers of the mlp predictor
    mlp_hidden: int = 150
    paper: bool = False  # the papers' pipeline (PAPER_PRESET): also report the noise ridge
    val_fraction: float = 0.2
    holdout_images: int | None = None
    dataset_workers: int = 1
    mc_metric: str = "avg_bits"
    forms: bool = False
    rerank: int = 8
    rerank_z: float = 1.0
    rerank_images: int | None = None
    target_forms: tuple[str, ...] = ()
    w_form: str | None = None
    a_form: str | None = None
    # limpq
    alpha: float | None = None
    # layered
    a_bits: int | None = None

    def __post_init__(self):
        if isinstance(self.target_forms, str):
            object.__setattr__(self, "target_forms", (self.target_forms,))
        else:
            object.__setattr__(self, "target_forms", tuple(self.target_forms))
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
        for name in (
            "dataset_workers",
            "dataset_size",
            "population",
            "iterations",
            "mlp_depth",
            "mlp_hidden",
        ):
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
        if self.alpha is not None and not (0 < self.alpha < math.inf):
            raise OptionError("alpha", self.alpha, "accepted values are finite and > 0")
        forms = self.form_list()
        if forms and self.method == "layered":
            raise OptionError(
                "target_forms",
                self.target_forms,
                "the layered method searches nested "
                "symmetric weights only; target forms are for ga and limpq",
            )
        if forms and self.forms:
            raise OptionError("forms", self.forms, "target forms fix the forms; drop forms")
        narrow = [f for f in forms if f.narrow_weights]
        clash = [f for f in forms if not f.narrow_weights and f.w_symmetry == "sym"]
        if narrow and clash:
            raise OptionError(
                "target_forms",
                [f.name for f in forms],
                f"{narrow[0].name} caps symmetric weights to the narrow range for the whole "
                f"search, which {clash[0].name} does not use; search them separately",
            )
        return self

    def form_list(self) -> list[TargetForm]:
        """The target forms, named ones first, then the explicit one; [] for none."""
        try:
            forms = [get_form(name) for name in self.target_forms]
            explicit = resolve_form(None, self.w_form, self.a_form)
        except ValueError as exc:
            raise OptionError("target_forms", self.target_forms, str(exc)) from None
        if explicit is not None:
            forms.append(explicit)
        if len({f.name for f in forms}) != len(forms):
            raise OptionError("target_forms", self.target_forms, "each form once")
        return forms
