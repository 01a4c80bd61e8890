"""The elastic quantization space: what every elastic layer may take.

An `ElasticSpace` lists weight and activation bit widths, weight granularities, weight and
activation symmetries, and whether weights are nested (vertical layering: one top-width scale,
lower widths drop low bits; symmetric only). A `LayerChoice` is one layer's pick from it.

Layers are found through a small protocol so this module knows no layer class: a module is a
quantized layer when it has `is_elastic_layer = True`; its attribute `fixed_choice` is a
`LayerChoice` for fixed-width layers (e.g. first/last at 8 bits) and `None` for elastic ones. A
fixed-width layer fixes its widths only: its form (weight granularity, weight symmetry,
activation symmetry) is any of the space's, unless its attribute `fixed_form` is True (the
one-form layout of older runs), when it holds its fixed choice only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

import torch

GRANULARITIES = ("tensor", "channel", "group")
# Per-group weight scales: one per `group_size` consecutive input elements of each output row.
# A multiple of 32 so that a group covers whole 32-column words of the bit planes (what the
# low-bit GEMM's per-group path reads); 128 is the common language-model choice.
DEFAULT_GROUP_SIZE = 128
GROUP_SIZE_QUANTUM = 32
SYMMETRIES = ("sym", "asym")
BITS_RANGE = range(1, 9)
# A float (unquantized) activation, `a_bits=None`, orders and costs as 16 bits: wider than any
# integer width, the width of the fp16/bf16 activations that weight-only kernels read.
FLOAT_ACT_BITS = 16


def check_group_size(group_size) -> int:
    """Raise ValueError unless `group_size` is a positive multiple of 32; returns it."""
    g = group_size
    if isinstance(g, bool) or not isinstance(g, int) or g < 1 or g % GROUP_SIZE_QUANTUM:
        raise ValueError(
            f"group_size={g!r}: accepted values are positive multiples of {GROUP_SIZE_QUANTUM} "
            f"(32, 64, 128, ...; default {DEFAULT_GROUP_SIZE})"
        )
    return g


def group_size_error(layer: str, reduction: int, group_size: int) -> str:
    """The one-line message for a layer whose input dimension `group_size` does not divide."""
    return (
        f"layer {layer!r}: group_size={group_size} does not divide its input dimension "
        f"K={reduction} (in_features, or in_channels/groups*kh*kw of a conv); accepted "
        f"group sizes are multiples of {GROUP_SIZE_QUANTUM} dividing K, or leave 'group' out "
        "of w_granularities"
    )


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
    # Elements per weight scale of the "group" granularity (input elements of one output row).
    group_size: int = DEFAULT_GROUP_SIZE

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
        check_group_size(self.group_size)

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


def check_form_fields(w_granularity, w_symmetry, a_symmetry) -> None:
    """One-line ValueErrors for a form's weight granularity and weight/activation symmetry."""
    if w_granularity not in GRANULARITIES:
        raise ValueError(
            f"w_granularity={w_granularity!r}: accepted values are {', '.join(GRANULARITIES)}"
        )
    for name, value in (("w_symmetry", w_symmetry), ("a_symmetry", a_symmetry)):
        if value not in SYMMETRIES:
            raise ValueError(f"{name}={value!r}: accepted values are {', '.join(SYMMETRIES)}")


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
        check_form_fields(self.w_granularity, self.w_symmetry, self.a_symmetry)

    def to_dict(self) -> dict:
        return asdict(self)


def quantized_layers(model: torch.nn.Module) -> OrderedDict[str, torch.nn.Module]:
    """name -> module of every quantized layer (`is_elastic_layer`), in module order."""
    return OrderedDict(
        (name, m) for name, m in model.named_modules() if getattr(m, "is_elastic_layer", False)
    )


def layer_specs(model: torch.nn.Module, layers=None) -> OrderedDict[str, LayerChoice | None]:
    """name -> fixed choice (or None if elastic) for every quantized layer, in module order.
    `layers`: `quantized_layers(model)` when the caller has it (one walk of the model less)."""
    layers = quantized_layers(model) if layers is None else layers
    if not layers:
        raise ValueError("the model has no quantized layers: convert it with eqnet.convert first")
    return OrderedDict((name, getattr(m, "fixed_choice", None)) for name, m in layers.items())


def fixed_form_layers(model: torch.nn.Module, layers=None) -> set[str]:
    """Names of the fixed-width layers that also fix their form (`fixed_form` True)."""
    layers = quantized_layers(model) if layers is None else layers
    return {
        name
        for name, module in layers.items()
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


def _prefer(values, preferred):
    return preferred if preferred in values else values[0]
