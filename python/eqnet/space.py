"""The elastic quantization space and subnet configurations.

An `ElasticSpace` lists what every elastic layer may take: weight and activation bit widths,
weight granularities, weight and activation symmetries, and whether weights are nested
(vertical layering: one top-width scale, lower widths drop low bits; symmetric only).

A `SubnetConfig` holds one `LayerChoice` per quantized layer of a converted model, in the
model's module order. Layers are found through a small protocol so this module knows no layer
class: a module is a quantized layer when it has `is_elastic_layer = True`; its attribute
`fixed_choice` is a `LayerChoice` for fixed-width layers (e.g. first/last at 8 bits) and
`None` for elastic ones. A fixed-width layer fixes its widths only: its form (weight
granularity, weight symmetry, activation symmetry) is any of the space's, unless its attribute
`fixed_form` is True (the one-form layout of older runs), when it holds its fixed choice only.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace

import torch

GRANULARITIES = ("tensor", "channel")
SYMMETRIES = ("sym", "asym")
BITS_RANGE = range(1, 9)
# A float (unquantized) activation, `a_bits=None`, orders and costs as 16 bits: wider than any
# integer width, the width of the fp16/bf16 activations that weight-only kernels read.
FLOAT_ACT_BITS = 16


def a_bits_width(a_bits: int | None) -> int:
    """The width an activation choice counts as: its bits, or 16 for a float activation."""
    return FLOAT_ACT_BITS if a_bits is None else a_bits


def _tuple_of(name, values, allowed=None, kind=None, allow_none=False):
    if isinstance(values, (str, int)) or values is None:
        values = (values,)
    values = tuple(values)
    if not values:
        raise ValueError(f"{name} must not be empty")
    if len(set(values)) != len(values):
        raise ValueError(f"{name}={values}: duplicate entries")
    for v in values:
        if allow_none and v is None:
            continue
        if kind is int and (isinstance(v, bool) or not isinstance(v, int) or v not in BITS_RANGE):
            accepted = "an int in 1..8 or None (float)" if allow_none else "an int in 1..8"
            raise ValueError(f"{name}={values}: every entry must be {accepted}")
        if allowed is not None and v not in allowed:
            raise ValueError(f"{name}={values}: accepted values are {', '.join(allowed)}")
    return tuple(sorted(values, key=a_bits_width)) if kind is int else values


DRAW = object()  # SubnetConfig.random: draw the width (None means a float activation)


@dataclass(frozen=True)
class ElasticSpace:
    """Candidate quantization forms of every elastic layer."""

    w_bits: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
    # None: float activations (weight-only quantization); may be mixed with integer widths.
    a_bits: tuple[int | None, ...] = (2, 3, 4, 5, 6, 7, 8)
    w_granularities: tuple[str, ...] = ("channel",)
    w_symmetries: tuple[str, ...] = ("sym",)
    a_symmetries: tuple[str, ...] = ("asym",)
    nested: bool = False
    fixed_bits: int = 8  # width of first/last layers under keep_first_last="8bit"

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "w_bits", _tuple_of("w_bits", self.w_bits, kind=int))
        set_(self, "a_bits", _tuple_of("a_bits", self.a_bits, kind=int, allow_none=True))
        set_(
            self,
            "w_granularities",
            _tuple_of("w_granularities", self.w_granularities, GRANULARITIES),
        )
        set_(self, "w_symmetries", _tuple_of("w_symmetries", self.w_symmetries, SYMMETRIES))
        set_(self, "a_symmetries", _tuple_of("a_symmetries", self.a_symmetries, SYMMETRIES))
        if not isinstance(self.nested, bool):
            raise ValueError(f"nested={self.nested!r}: must be True or False")
        if self.nested and "asym" in self.w_symmetries:
            raise ValueError(
                "nested=True takes symmetric weights only (w_symmetries=('sym',)): the nested "
                "quantizer drops low bits of one symmetric top-width code"
            )
        if self.fixed_bits not in BITS_RANGE:
            raise ValueError(f"fixed_bits={self.fixed_bits}: must be an int in 1..8")

    @property
    def top_bits(self) -> int:
        """The widest weight width (the stored width of nested weights)."""
        return max(self.w_bits)

    @property
    def weight_only(self) -> bool:
        """True when every activation is float (a_bits == (None,))."""
        return self.a_bits == (None,)

    @property
    def int_a_bits(self) -> tuple[int, ...]:
        """The integer activation widths (without None)."""
        return tuple(b for b in self.a_bits if b is not None)

    @property
    def lowest_a_bits(self) -> int | None:
        return min(self.a_bits, key=a_bits_width)

    @property
    def highest_a_bits(self) -> int | None:
        """The widest activation choice (None, float, when the space holds it)."""
        return max(self.a_bits, key=a_bits_width)

    def preferred_forms(self) -> tuple[str, str, str]:
        """(w_granularity, w_symmetry, a_symmetry) of the uniform, lowest and highest configs:
        per-channel symmetric weights and asymmetric activations where the space has them,
        else its first form."""
        return (
            _prefer(self.w_granularities, "channel"),
            _prefer(self.w_symmetries, "sym"),
            _prefer(self.a_symmetries, "asym"),
        )

    def to_dict(self) -> dict:
        return {
            f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
            for f in fields(self)
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> ElasticSpace:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"ElasticSpace: unknown keys {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class LayerChoice:
    """The quantization form of one layer."""

    w_bits: int
    a_bits: int | None  # None: float activation (the activation quantizer is skipped)
    w_granularity: str = "channel"
    w_symmetry: str = "sym"
    a_symmetry: str = "asym"

    def __post_init__(self):
        v = self.w_bits
        if isinstance(v, bool) or not isinstance(v, int) or v not in BITS_RANGE:
            raise ValueError(f"w_bits={v!r}: must be an int in 1..8")
        v = self.a_bits
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v not in BITS_RANGE):
            raise ValueError(f"a_bits={v!r}: must be an int in 1..8 or None (float activation)")
        if self.w_granularity not in GRANULARITIES:
            raise ValueError(
                f"w_granularity={self.w_granularity!r}: accepted values are tensor, channel"
            )
        for name in ("w_symmetry", "a_symmetry"):
            if getattr(self, name) not in SYMMETRIES:
                raise ValueError(f"{name}={getattr(self, name)!r}: accepted values are sym, asym")

    def to_dict(self) -> dict:
        return asdict(self)


def layer_specs(model: torch.nn.Module) -> OrderedDict[str, LayerChoice | None]:
    """name -> fixed choice (or None if elastic) for every quantized layer, in module order."""
    specs: OrderedDict[str, LayerChoice | None] = OrderedDict()
    for name, module in model.named_modules():
        if getattr(module, "is_elastic_layer", False):
            specs[name] = getattr(module, "fixed_choice", None)
    if not specs:
        raise ValueError("the model has no quantized layers: convert it with eqnet.convert first")
    return specs


def fixed_form_layers(model: torch.nn.Module) -> set[str]:
    """Names of the fixed-width layers that also fix their form (`fixed_form` True)."""
    return {
        name
        for name, module in model.named_modules()
        if getattr(module, "fixed_choice", None) is not None
        and getattr(module, "fixed_form", False)
    }


def fixed_layer_choices(
    space: ElasticSpace, fixed: LayerChoice, form_fixed: bool, forms: bool = True
) -> list[LayerChoice]:
    """Every choice of one fixed-width layer: the space's forms at its fixed widths (only its
    fixed choice when its form is fixed too or `forms` is False)."""
    if form_fixed or not forms:
        return [fixed]
    return [
        LayerChoice(fixed.w_bits, fixed.a_bits, g, ws, asym)
        for g in space.w_granularities
        for ws in space.w_symmetries
        for asym in space.a_symmetries
    ]


def check_choice(space: ElasticSpace, layer: str, choice: LayerChoice, widths: bool = True) -> None:
    """Raise ValueError naming `layer` and the allowed values when `choice` is outside `space`
    (widths=False: its form only, for a fixed-width layer)."""
    allowed = {
        "w_bits": space.w_bits if widths else (choice.w_bits,),
        "a_bits": space.a_bits if widths else (choice.a_bits,),
        "w_granularity": space.w_granularities,
        "w_symmetry": space.w_symmetries,
        "a_symmetry": space.a_symmetries,
    }
    for key, values in allowed.items():
        if getattr(choice, key) not in values:
            raise ValueError(
                f"layer {layer!r}: {key}={getattr(choice, key)!r} is outside the space; "
                f"allowed values are {list(values)}"
            )


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
    def validate(self, space: ElasticSpace, model: torch.nn.Module) -> SubnetConfig:
        """Check the config against the space and the model; returns self."""
        specs = layer_specs(model)
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
        form_fixed = fixed_form_layers(model)
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
        activation as 16/8), per-channel flag, asymmetric-weight flag, asymmetric-activation
        flag."""
        rows = [
            (
                c.w_bits / 8.0,
                a_bits_width(c.a_bits) / 8.0,
                float(c.w_granularity == "channel"),
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


ENCODING_WIDTH = 5  # numbers per layer in SubnetConfig.encode()


def _prefer(values, preferred):
    return preferred if preferred in values else values[0]
