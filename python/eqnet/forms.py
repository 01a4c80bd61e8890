"""Deployment forms: the one quantization form an inference engine runs on every layer.

A *target form* fixes, for every elastic layer, the weight granularity, the weight symmetry and
the activation symmetry; only the bit widths stay free. EQ-Net searches bit widths per form
(its conditional predictor conditions on the form), because engines disagree:

- `tensorrt`: per-channel symmetric weights, per-tensor symmetric activations. TensorRT's int8
  weights use the narrow range [-127, 127]; this form carries that to every width: b-bit weight
  codes lie on [-(2^(b-1) - 1), 2^(b-1) - 1], the code -2^(b-1) never occurs. The supernet
  trains on the full range; the narrow range is applied as a cap on the codes wherever the form
  is evaluated (search, PTQ, export): `set_narrow_weights` switches every symmetric weight
  quantizer of a model to it, so what the search measures is what the engine runs. A fixed-form
  recipe (`qat`) trained in this form trains on the narrow range itself.
- `snpe`: per-tensor asymmetric weights and activations (Qualcomm SNPE / QNN, uint8 with an
  offset).

Both the search (`eqnet search --target-form`) and the ONNX presets (`eqnet.deploy.onnx_presets`)
read these definitions; this module sits below both.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from eqnet.space import (
    GRANULARITIES,
    SYMMETRIES,
    ElasticSpace,
    LayerChoice,
    SubnetConfig,
    check_form_fields,
)


@dataclass(frozen=True)
class TargetForm:
    """The quantization form of every elastic layer of one deployment."""

    name: str
    w_granularity: str
    w_symmetry: str
    a_symmetry: str
    narrow_weights: bool = False  # symmetric weight codes on [-(2^(b-1)-1), 2^(b-1)-1]
    onnx_preset: str = "generic"  # the eqnet.deploy.onnx_presets profile that runs this form
    description: str = ""
    # the engine's activation code range (zero point 0), or None for any: TensorRT's int8 holds
    # a signed activation up to 8 bits but an unsigned (post-ReLU) one only up to 7
    act_code_range: tuple[int, int] | None = None

    def __post_init__(self):
        check_form_fields(self.w_granularity, self.w_symmetry, self.a_symmetry)
        if self.narrow_weights and self.w_symmetry != "sym":
            raise ValueError("narrow_weights=True takes symmetric weights only (w_symmetry='sym')")

    def choice(self, w_bits: int, a_bits: int) -> LayerChoice:
        return LayerChoice(w_bits, a_bits, self.w_granularity, self.w_symmetry, self.a_symmetry)

    def allows(self, choice: LayerChoice, act_signed: bool = True) -> bool:
        """True when the engine can run `choice` on a layer whose input activation is signed
        (`act_signed`) or unsigned: its activation codes fit `act_code_range`."""
        if self.act_code_range is None or choice.a_bits is None:
            return True  # a float activation (weight-only) has no codes to fit
        b = choice.a_bits
        lo, hi = (-(2 ** (b - 1)), 2 ** (b - 1) - 1) if act_signed else (0, 2**b - 1)
        return self.act_code_range[0] <= lo and hi <= self.act_code_range[1]

    def holds(self, choice: LayerChoice) -> bool:
        return (choice.w_granularity, choice.w_symmetry, choice.a_symmetry) == (
            self.w_granularity,
            self.w_symmetry,
            self.a_symmetry,
        )

    def apply(self, config: SubnetConfig, elastic: set[str] | None = None) -> SubnetConfig:
        """`config` with every layer (or every layer named in `elastic`) in this form, widths
        kept."""
        return SubnetConfig(
            (
                n,
                replace(
                    c,
                    w_granularity=self.w_granularity,
                    w_symmetry=self.w_symmetry,
                    a_symmetry=self.a_symmetry,
                )
                if elastic is None or n in elastic
                else c,
            )
            for n, c in config
        )

    def check_space(self, space: ElasticSpace) -> None:
        """Raise a ValueError naming what the supernet's space lacks to run this form."""
        missing = [
            f"{key}={value!r} (the space has {list(values)})"
            for key, value, values in (
                ("w_granularity", self.w_granularity, space.w_granularities),
                ("w_symmetry", self.w_symmetry, space.w_symmetries),
                ("a_symmetry", self.a_symmetry, space.a_symmetries),
            )
            if value not in values
        ]
        if missing:
            raise ValueError(
                f"target form {self.name!r} needs {', '.join(missing)}: train the supernet with "
                "that form (the eqnet recipe trains every form)"
            )

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "w_granularity": self.w_granularity,
            "w_symmetry": self.w_symmetry,
            "a_symmetry": self.a_symmetry,
            "narrow_weights": self.narrow_weights,
            "onnx_preset": self.onnx_preset,
            "act_code_range": None if self.act_code_range is None else list(self.act_code_range),
        }

    def runs(self, config: SubnetConfig, model) -> bool:
        """True when every layer of `config` is one the engine runs on `model` (activation
        signedness read from each layer's activation quantizer)."""
        for name, choice in config:
            quantizer = getattr(model.get_submodule(name), "act_quantizer", None)
            if not self.allows(choice, bool(getattr(quantizer, "signed", True))):
                return False
        return True


FORMS: dict[str, TargetForm] = {
    "tensorrt": TargetForm(
        "tensorrt",
        "channel",
        "sym",
        "sym",
        narrow_weights=True,
        onnx_preset="tensorrt",
        act_code_range=(-128, 127),
        description="per-channel symmetric narrow-range weights, per-tensor symmetric activations",
    ),
    "snpe": TargetForm(
        "snpe",
        "tensor",
        "asym",
        "asym",
        onnx_preset="snpe",
        description="per-tensor asymmetric weights and activations",
    ),
}


def get_form(name: str) -> TargetForm:
    if isinstance(name, TargetForm):
        return name
    if name not in FORMS:
        raise ValueError(f"target form {name!r}: accepted values are {', '.join(FORMS)}")
    return FORMS[name]


def parse_form(w_form: str, a_form: str) -> TargetForm:
    """An explicit form from `--w-form GRANULARITY/SYMMETRY --a-form tensor/SYMMETRY`, e.g.
    `channel/sym` and `tensor/asym` (activations are per-tensor only)."""
    w_gran, w_sym = _split("w_form", w_form, GRANULARITIES)
    a_gran, a_sym = _split("a_form", a_form, ("tensor",))
    return TargetForm(f"w:{w_gran}/{w_sym},a:{a_gran}/{a_sym}", w_gran, w_sym, a_sym)


def resolve_form(
    target_form: str | None, w_form: str | None, a_form: str | None
) -> TargetForm | None:
    """The form named by `--target-form`, or the explicit one of `--w-form/--a-form` (both
    needed), or None when no option is given."""
    explicit = (w_form, a_form) != (None, None)
    if target_form is not None and explicit:
        raise ValueError("target form: give either a name or --w-form/--a-form, not both")
    if target_form is not None:
        return get_form(target_form)
    if explicit:
        if w_form is None or a_form is None:
            raise ValueError("--w-form and --a-form go together (e.g. channel/sym, tensor/asym)")
        return parse_form(w_form, a_form)
    return None


def _split(name: str, text: str, granularities) -> tuple[str, str]:
    parts = str(text).split("/")
    if len(parts) != 2 or parts[0] not in granularities or parts[1] not in SYMMETRIES:
        raise ValueError(
            f"{name}={text!r}: expected GRANULARITY/SYMMETRY with granularity in "
            f"{', '.join(granularities)} and symmetry in {', '.join(SYMMETRIES)}"
        )
    return parts[0], parts[1]


def set_narrow_weights(model, narrow: bool) -> int:
    """Switch every non-nested weight quantizer of `model` to (or from) the narrow symmetric
    range; returns how many quantizers were switched. Asymmetric forms are unaffected."""
    count = 0
    for module in model.modules():
        if getattr(module, "role", None) == "weight" and hasattr(module, "narrow_range"):
            module.narrow_range = bool(narrow)
            count += 1
    return count


def narrow_preset(preset: str) -> bool:
    """True when the ONNX preset `preset` runs a form with narrow-range weights (tensorrt)."""
    return any(f.narrow_weights and f.onnx_preset == preset for f in FORMS.values())
