"""Subnet configurations: one `LayerChoice` per quantized layer of a converted model, in the
model's module order, with JSON round trip, the uniform/lowest/highest/random constructors and
the numeric encoding the search's predictors read."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import replace

import torch

from .elastic import (
    DRAW,
    GRANULARITIES,
    ElasticSpace,
    LayerChoice,
    a_bits_width,
    check_choice,
    fixed_form_layers,
    layer_specs,
    quantized_layers,
)

ENCODING_WIDTH = 5  # numbers per layer in SubnetConfig.encode()


class SubnetConfig:
    """One LayerChoice per quantized layer, ordered as the model's modules."""

    def __init__(self, layers: Mapping[str, LayerChoice] | Iterable[tuple[str, LayerChoice]]):
        items = list(layers.items()) if isinstance(layers, Mapping) else list(layers)
        self.layers: OrderedDict[str, LayerChoice] = OrderedDict()
        for name, choice in items:
            if isinstance(choice, Mapping):
                choice = LayerChoice(**choice)
            if not isinstance(choice, LayerChoice):
                raise ValueError(
                    f"layer {name!r}: expected a LayerChoice, got {type(choice).__name__}"
                )
            if name in self.layers:
                raise ValueError(f"layer {name!r} appears twice")
            self.layers[name] = choice

    # -- container protocol -------------------------------------------------------------
    def __len__(self):
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers.items())

    def __getitem__(self, name: str) -> LayerChoice:
        return self.layers[name]

    def __eq__(self, other):
        return isinstance(other, SubnetConfig) and list(self.layers.items()) == list(
            other.layers.items()
        )

    def __hash__(self):
        return hash(tuple(self.layers.items()))

    def __repr__(self):
        return f"SubnetConfig({self.summary()})"

    def summary(self) -> str:
        wb = [c.w_bits for c in self.layers.values()]
        ab = [c.a_bits for c in self.layers.values()]
        lo, hi = min(ab, key=a_bits_width), max(ab, key=a_bits_width)
        a = "float" if lo is None else (f"{lo}-float" if hi is None else f"{lo}-{hi}")
        return f"{len(self)} layers, W {min(wb)}-{max(wb)} (mean {self.mean_w_bits():.2f}), A {a}"

    def mean_w_bits(self) -> float:
        return sum(c.w_bits for c in self.layers.values()) / len(self)

    def mean_a_bits(self) -> float:
        """Mean activation width, a float activation counted as 16 bits."""
        return sum(a_bits_width(c.a_bits) for c in self.layers.values()) / len(self)

    def mean_bits(self) -> float:
        """Unweighted mean of weight and activation widths (ordering subnets in GPG)."""
        return 0.5 * (self.mean_w_bits() + self.mean_a_bits())

    # -- JSON ---------------------------------------------------------------------------
    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(
            {
                "format": "eqnet.SubnetConfig",
                "version": 1,
                "layers": {n: c.to_dict() for n, c in self.layers.items()},
            },
            indent=indent,
        )

    @classmethod
    def from_json(cls, s: str) -> SubnetConfig:
        try:
            data = json.loads(s)
        except json.JSONDecodeError as exc:
            raise ValueError(f"SubnetConfig.from_json: not JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != "eqnet.SubnetConfig":
            raise ValueError("SubnetConfig.from_json: missing format 'eqnet.SubnetConfig'")
        if data.get("version") != 1:
            raise ValueError(f"SubnetConfig.from_json: unsupported version {data.get('version')!r}")
        layers = data.get("layers")
        if not isinstance(layers, dict):
            raise ValueError("SubnetConfig.from_json: 'layers' must be an object")
        try:
            return cls((n, LayerChoice(**c)) for n, c in layers.items())
        except TypeError as exc:
            raise ValueError(f"SubnetConfig.from_json: bad layer entry ({exc})") from None

    @classmethod
    def from_file(cls, path, pick: int = 0) -> SubnetConfig:
        """A SubnetConfig JSON file, or an `eqnet search` configs.json (its `pick`-th chosen
        config)."""
        from pathlib import Path

        text = Path(path).read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON ({exc})") from None
        if isinstance(data, dict) and "chosen" in data:  # eqnet search's configs.json
            chosen = data["chosen"]
            if not isinstance(chosen, list) or not all(isinstance(c, dict) for c in chosen):
                raise ValueError(f"{path}: 'chosen' must be a list of objects")
            if isinstance(pick, bool) or not isinstance(pick, int) or not 0 <= pick < len(chosen):
                raise ValueError(f"pick={pick!r}: {path} holds {len(chosen)} configs")
            layers = chosen[pick].get("config")
            text = json.dumps({"format": "eqnet.SubnetConfig", "version": 1, "layers": layers})
        return cls.from_json(text)

    # -- validation ---------------------------------------------------------------------
    def validate(self, space: ElasticSpace, model: torch.nn.Module, layers=None) -> SubnetConfig:
        """Check the config against the space and the model; returns self. `layers`: the
        model's `quantized_layers`, when the caller has them (one walk of the model less)."""
        layers = quantized_layers(model) if layers is None else layers
        specs = layer_specs(model, layers)
        unknown = [n for n in self.layers if n not in specs]
        if unknown:
            raise ValueError(
                f"unknown layer {unknown[0]!r}; the model's quantized layers are {list(specs)}"
            )
        missing = [n for n in specs if n not in self.layers]
        if missing or len(self) != len(specs):
            raise ValueError(
                f"config has {len(self)} layers, the model has {len(specs)}; missing {missing}"
            )
        form_fixed = fixed_form_layers(model, layers)
        for name, fixed in specs.items():
            choice = self.layers[name]
            if fixed is not None:
                if name in form_fixed:
                    if choice != fixed:
                        raise ValueError(f"layer {name!r} is fixed at {fixed}; got {choice}")
                    continue
                if (choice.w_bits, choice.a_bits) != (fixed.w_bits, fixed.a_bits):
                    raise ValueError(
                        f"layer {name!r} is fixed at W{fixed.w_bits}A{fixed.a_bits} (any form "
                        f"of the space); got {choice}"
                    )
                check_choice(space, name, choice, widths=False)
            else:
                check_choice(space, name, choice)
        return self

    # -- constructors -------------------------------------------------------------------
    @classmethod
    def uniform(
        cls,
        space,
        model,
        w_bits,
        a_bits,
        w_granularity="channel",
        w_symmetry="sym",
        a_symmetry="asym",
    ) -> SubnetConfig:
        """One choice on every elastic layer; fixed-width layers keep their widths and take
        the same form (their fixed choice when their form is fixed too)."""
        choice = LayerChoice(w_bits, a_bits, w_granularity, w_symmetry, a_symmetry)
        form_fixed = fixed_form_layers(model)
        layers = []
        for name, fixed in layer_specs(model).items():
            if fixed is None:
                check_choice(space, name, choice)
                layers.append((name, choice))
            elif name in form_fixed:
                layers.append((name, fixed))
            else:
                here = replace(choice, w_bits=fixed.w_bits, a_bits=fixed.a_bits)
                check_choice(space, name, here, widths=False)
                layers.append((name, here))
        return cls(layers)

    @classmethod
    def lowest(cls, space, model) -> SubnetConfig:
        return cls.uniform(
            space,
            model,
            min(space.w_bits),
            space.lowest_a_bits,
            *space.preferred_forms(),
        )

    @classmethod
    def highest(cls, space, model) -> SubnetConfig:
        return cls.uniform(
            space,
            model,
            max(space.w_bits),
            space.highest_a_bits,
            *space.preferred_forms(),
        )

    @classmethod
    def random(
        cls,
        space,
        model,
        generator: torch.Generator | None = None,
        *,
        forms: bool = True,
        w_bits: int | None = None,
        a_bits=DRAW,
    ) -> SubnetConfig:
        """Each elastic layer draws its widths uniformly; with forms=True also its
        granularity and symmetries (with forms=False the lowest/highest defaults).

        `w_bits` / `a_bits` fix that width on every elastic layer instead of drawing it (the
        forms are still drawn): EQ-Net's highest and lowest LRH subnets. Fixed-width layers
        keep their widths and draw their forms alike (with forms=False, or when their form is
        fixed too, they keep their fixed choice). `a_bits=None` fixes float activations;
        leaving `a_bits` out draws it (None among the space's widths is drawn like any other)."""

        def pick(values):
            i = int(torch.randint(len(values), (1,), generator=generator).item())
            return values[i]

        for name, value, values, drawn in (
            ("w_bits", w_bits, space.w_bits, w_bits is None),
            ("a_bits", a_bits, space.a_bits, a_bits is DRAW),
        ):
            if not drawn and value not in values:
                raise ValueError(f"{name}={value!r}: the space's widths are {list(values)}")
        form_fixed = fixed_form_layers(model)
        layers = []
        for name, fixed in layer_specs(model).items():
            if fixed is not None and (name in form_fixed or not forms):
                layers.append((name, fixed))
                continue
            if fixed is not None:
                wb, ab = fixed.w_bits, fixed.a_bits
            else:
                wb = pick(space.w_bits) if w_bits is None else w_bits
                ab = pick(space.a_bits) if a_bits is DRAW else a_bits
            if forms:
                choice = LayerChoice(
                    wb,
                    ab,
                    pick(space.w_granularities),
                    pick(space.w_symmetries),
                    pick(space.a_symmetries),
                )
            else:
                choice = LayerChoice(
                    wb,
                    ab,
                    *space.preferred_forms(),
                )
            layers.append((name, choice))
        return cls(layers)

    # -- numeric encoding ---------------------------------------------------------------
    def encode(self) -> torch.Tensor:
        """Fixed-length float encoding, 5 numbers per layer: w_bits/8, a_bits/8 (a float
        activation as 16/8), weight granularity level (0 per tensor, 1 per channel, 2 per
        group: finer scales, higher level), asymmetric-weight flag, asymmetric-activation
        flag."""
        rows = [
            (
                c.w_bits / 8.0,
                a_bits_width(c.a_bits) / 8.0,
                float(GRANULARITIES.index(c.w_granularity)),
                float(c.w_symmetry == "asym"),
                float(c.a_symmetry == "asym"),
            )
            for c in self.layers.values()
        ]
        return torch.tensor(rows, dtype=torch.float32).flatten()

    def replace(self, name: str, **changes) -> SubnetConfig:
        """A copy with layer `name` changed."""
        if name not in self.layers:
            raise ValueError(f"unknown layer {name!r}; layers are {list(self.layers)}")
        layers = OrderedDict(self.layers)
        layers[name] = LayerChoice(**{**layers[name].to_dict(), **changes})
        return SubnetConfig(layers)
