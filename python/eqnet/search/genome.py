"""Integer encoding of subnet configs for fast search.

A `ChoiceTable` lists, for every quantized layer in model order, the LayerChoices it may take
(for a fixed-width layer, the space's forms at its fixed widths). A genome is an int array of one choice index per layer, so a
population is an `[N, L]` int array and every additive metric of a population is a gather from
an `[L, C_max]` table followed by a row sum.
"""

from __future__ import annotations

import itertools
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from eqnet.search.cost import METRICS, CostModel, check_metric
from eqnet.space import (
    ElasticSpace,
    LayerChoice,
    SubnetConfig,
    fixed_form_layers,
    fixed_layer_choices,
    layer_specs,
)


def layer_options(space: ElasticSpace, forms: bool = True, form=None) -> list[LayerChoice]:
    """Every LayerChoice of an elastic layer; forms=False keeps the preferred granularity and
    symmetries (per-channel, symmetric weights, asymmetric activations when available).
    `form` (an `eqnet.forms.TargetForm`) puts every choice in that one deployment form, bit
    widths free; it overrides `forms` and must be a form the space holds."""
    if form is not None:
        form.check_space(space)
        grans, wsyms, asyms = (form.w_granularity,), (form.w_symmetry,), (form.a_symmetry,)
    elif forms:
        grans, wsyms, asyms = space.w_granularities, space.w_symmetries, space.a_symmetries
    else:
        grans, wsyms, asyms = ((value,) for value in space.preferred_forms())
    return [
        LayerChoice(w, a, g, ws, as_)
        for w, a, g, ws, as_ in itertools.product(space.w_bits, space.a_bits, grans, wsyms, asyms)
    ]


class ChoiceTable:
    """Per-layer candidate choices; genomes index into them."""

    def __init__(self, layers: Mapping[str, Sequence[LayerChoice]]):
        self.names = list(layers)
        self.choices = [list(v) for v in layers.values()]
        if not self.names:
            raise ValueError("ChoiceTable needs at least one layer")
        for name, opts in zip(self.names, self.choices):
            if not opts:
                raise ValueError(f"layer {name!r} has no choices")
        self.n_choices = np.array([len(c) for c in self.choices], dtype=np.int64)
        self._index = [{c: i for i, c in enumerate(opts)} for opts in self.choices]

    @classmethod
    def from_model(
        cls, space: ElasticSpace, model: torch.nn.Module, forms: bool = True, form=None
    ) -> ChoiceTable:
        """Elastic layers take `layer_options`; fixed-width layers the forms at their widths
        (`fixed_layer_choices`). With a target `form`, a layer keeps only the choices in that
        form the engine can run on its input's signedness (TensorRT's int8 takes no unsigned
        8-bit activation); a fixed-width layer with none keeps its fixed choice."""
        opts = layer_options(space, forms, form)
        specs = layer_specs(model)
        form_fixed = fixed_form_layers(model)
        layers = OrderedDict()
        for name, fixed in specs.items():
            if fixed is not None:
                here = fixed_layer_choices(space, fixed, name in form_fixed, forms)
            else:
                here = opts
            if form is None:
                layers[name] = here
                continue
            quantizer = getattr(model.get_submodule(name), "act_quantizer", None)
            signed = bool(getattr(quantizer, "signed", True))
            allowed = [c for c in here if form.holds(c) and form.allows(c, signed)]
            layers[name] = allowed if allowed or fixed is None else [fixed]
        return cls(layers)

    @property
    def n_layers(self) -> int:
        return len(self.names)

    @property
    def max_choices(self) -> int:
        return int(self.n_choices.max())

    def decode(self, genome) -> SubnetConfig:
        g = np.asarray(genome)
        return SubnetConfig((n, opts[int(i)]) for n, opts, i in zip(self.names, self.choices, g))

    def genome_of(self, config: SubnetConfig) -> np.ndarray:
        if list(config.layers) != self.names:
            raise ValueError(f"config layers {list(config.layers)} differ from {self.names}")
        out = np.empty(self.n_layers, dtype=np.int64)
        for i, (name, choice) in enumerate(config):
            if choice not in self._index[i]:
                raise ValueError(f"layer {name!r}: {choice} is not among the table's choices")
            out[i] = self._index[i][choice]
        return out

    def uniform(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n genomes, each layer's choice drawn uniformly."""
        return (rng.random((n, self.n_layers)) * self.n_choices).astype(np.int64)

    def table(self, fn) -> np.ndarray:
        """[L, C_max] float64 array of fn(layer_name, choice); padding is NaN."""
        out = np.full((self.n_layers, self.max_choices), np.nan)
        for i, (name, opts) in enumerate(zip(self.names, self.choices)):
            out[i, : len(opts)] = [fn(name, c) for c in opts]
        return out

    def metric_table(self, cost: CostModel, metric: str) -> np.ndarray:
        check_metric(metric)
        return self.table(lambda name, c: cost.layer_term(metric, name, c))

    def gather_sum(self, table: np.ndarray, genomes: np.ndarray) -> np.ndarray:
        """Row sums of table[l, genome[l]] for a batch of genomes [N, L]."""
        g = np.atleast_2d(genomes)
        return table[np.arange(self.n_layers), g].sum(axis=1)

    def encodings(self) -> torch.Tensor:
        """[L, C_max, 5] float32: each choice's rows of SubnetConfig.encode()."""
        width = 5
        out = torch.zeros(self.n_layers, self.max_choices, width)
        for i, (name, opts) in enumerate(zip(self.names, self.choices)):
            # one-layer configs, so the rows are exactly what SubnetConfig.encode() gives
            out[i, : len(opts)] = torch.stack([SubnetConfig([(name, c)]).encode() for c in opts])
        return out

    def encode(self, genomes: np.ndarray, enc: torch.Tensor | None = None) -> torch.Tensor:
        """[N, 5L] float32 encodings of genomes, equal to SubnetConfig.encode() row by row."""
        enc = self.encodings() if enc is None else enc
        g = torch.as_tensor(np.atleast_2d(genomes))
        return enc[torch.arange(self.n_layers), g].reshape(g.shape[0], -1)


# -- constraints ---------------------------------------------------------------------------
_SUFFIX = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_CONSTRAINT_RE = re.compile(r"^\s*([a-z_]+)\s*(<=|>=)\s*([-+0-9.eE]+)\s*([kKMGT]?)\s*$")


@dataclass(frozen=True)
class Constraint:
    """metric <= value or metric >= value."""

    metric: str
    op: str
    value: float

    def __post_init__(self):
        check_metric(self.metric)
        if self.op not in ("<=", ">="):
            raise ValueError(f"op={self.op!r}: accepted values are <=, >=")
        if not np.isfinite(self.value):
            raise ValueError(f"constraint {self.metric}: value must be finite, got {self.value}")

    def ok(self, values: np.ndarray) -> np.ndarray:
        # a relative slack absorbs float summation-order differences at the boundary
        tol = 1e-9 * max(abs(self.value), 1.0)
        return values <= self.value + tol if self.op == "<=" else values >= self.value - tol

    def __str__(self):
        return f"{self.metric}{self.op}{self.value:g}"


def parse_constraints(text: str) -> list[Constraint]:
    """Parse 'bitops<=1.5G,size<=200k' (comma separated; suffixes k, M, G, T are powers of
    1000). Metrics: bitops, size (bytes), avg_bits, avg_w_bits, avg_a_bits."""
    out = []
    for part in text.split(","):
        m = _CONSTRAINT_RE.match(part)
        if not m:
            raise ValueError(
                f"constraint {part!r}: expected METRIC<=VALUE or METRIC>=VALUE with METRIC one "
                f"of {', '.join(METRICS)}, e.g. 'bitops<=1.5G' or 'avg_bits<=4'"
            )
        metric, op, number, suffix = m.groups()
        try:
            value = float(number) * _SUFFIX[suffix]
        except ValueError:
            raise ValueError(f"constraint {part!r}: {number!r} is not a number") from None
        out.append(Constraint(metric, op, value))
    return out


class Budget:
    """Constraints evaluated on genomes through per-metric tables."""

    def __init__(self, table: ChoiceTable, cost: CostModel, constraints: Sequence[Constraint]):
        self.table = table
        self.constraints = list(constraints)
        self.tables = {c.metric: table.metric_table(cost, c.metric) for c in self.constraints}
        self.check_feasible()

    def values(self, genomes: np.ndarray) -> dict[str, np.ndarray]:
        return {m: self.table.gather_sum(t, genomes) for m, t in self.tables.items()}

    def ok(self, genomes: np.ndarray) -> np.ndarray:
        g = np.atleast_2d(genomes)
        mask = np.ones(g.shape[0], dtype=bool)
        for c in self.constraints:
            mask &= c.ok(self.table.gather_sum(self.tables[c.metric], g))
        return mask

    def check_feasible(self) -> None:
        """Each constraint on its own must be reachable (a joint check is the ILP's job)."""
        for c in self.constraints:
            t = self.tables[c.metric]
            lo, hi = np.nanmin(t, axis=1).sum(), np.nanmax(t, axis=1).sum()
            if (c.op == "<=" and not c.ok(np.array([lo]))[0]) or (
                c.op == ">=" and not c.ok(np.array([hi]))[0]
            ):
                raise ValueError(
                    f"constraint {c} is infeasible: {c.metric} ranges from {lo:g} to {hi:g} "
                    "over this space"
                )
