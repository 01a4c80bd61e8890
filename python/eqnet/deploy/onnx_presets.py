"""Target profiles for ONNX QDQ export: what each inference engine can import.

A profile says which quantization forms an engine runs (weight granularity and symmetry,
activation symmetry), which integer types its QuantizeLinear/DequantizeLinear accept (the
*containers*), how BatchNorm is handed over and how weights are stored. `check_layers` turns a
config that an engine cannot run into one ValueError that names every offending layer, before
anything is exported.

Containers: a b-bit code range [qmin, qmax] is stored in the smallest allowed ONNX integer type
that holds it, shifted by a constant offset when the engine takes unsigned types only (SNPE:
a signed 8-bit code q becomes q + 128 with zero point z + 128, which dequantizes to the same
value). Widths below the container's width are exact: weights are stored as precomputed integer
codes, and activations get a float Clip to the code range before QuantizeLinear, because
QuantizeLinear saturates to the *type's* range, not to [qmin, qmax] (see eqnet.deploy.onnx).

TensorRT (explicit quantization): int8 only, weights per-channel symmetric with the narrow
range [-127, 127], activations per-tensor symmetric (zero point 0). Widths below 8 fit the int8
container exactly (codes of a 2..7-bit weight lie inside [-64, 63]); an 8-bit weight whose codes
reach -128 does not, and neither does an unsigned 8-bit activation ([0, 255] needs uint8).
BatchNorm is folded into the per-channel weight scale (TensorRT's QDQ conv takes no BN), and
weights are float initializers followed by QuantizeLinear -> DequantizeLinear, the pattern
TensorRT's builder quantizes itself.

SNPE / QNN: per-tensor weights and activations, uint8 with an offset (asymmetric; a symmetric
form is the special case offset = 2^(b-1) of its signed codes). BatchNorm is kept as its own op
(SNPE's converter folds it); a per-channel BN factor could not be folded into a per-tensor
weight scale anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

from eqnet.forms import FORMS

# name -> (lowest code, highest code, first opset whose QuantizeLinear/DequantizeLinear take it)
CONTAINERS: dict[str, tuple[int, int, int]] = {
    "int4": (-8, 7, 21),
    "uint4": (0, 15, 21),
    "int8": (-128, 127, 13),
    "uint8": (0, 255, 13),
    "int16": (-32768, 32767, 21),
    "uint16": (0, 65535, 21),
}

BN_MODES = ("keep", "affine", "scale")
WEIGHT_FORMATS = ("dq", "qdq")


@dataclass(frozen=True)
class TargetProfile:
    """What one engine imports. Containers are listed smallest first (the first that fits wins)."""

    name: str
    description: str
    weight_containers: tuple[str, ...]
    act_containers: tuple[str, ...]
    w_granularities: tuple[str, ...] = ("tensor", "channel")
    w_symmetries: tuple[str, ...] = ("sym", "asym")
    a_symmetries: tuple[str, ...] = ("sym", "asym")
    weight_code_range: tuple[int, int] | None = None  # e.g. TensorRT's narrow [-127, 127]
    shift_codes: bool = True  # may store codes with an offset (needs a nonzero zero point)
    fold_bn: str = "keep"  # "keep" (BatchNormalization op), "affine" (Mul+Add), "scale"
    weight_format: str = "dq"  # "dq": integer codes -> DQ; "qdq": float weights -> Q -> DQ


PRESETS: dict[str, TargetProfile] = {
    "generic": TargetProfile(
        name="generic",
        description="any form; smallest ONNX container (int4/uint4 at opset >= 21, else int8)",
        weight_containers=("int4", "uint4", "int8", "uint8", "int16", "uint16"),
        act_containers=("int4", "uint4", "int8", "uint8", "int16", "uint16"),
        # per group: blocked DequantizeLinear (opset >= 21)
        w_granularities=("tensor", "channel", "group"),
    ),
    "tensorrt": TargetProfile(
        name="tensorrt",
        description="int8; weights per-channel symmetric [-127, 127]; activations symmetric",
        weight_containers=("int8",),
        act_containers=("int8",),
        # the engine's form, as the search's `--target-form tensorrt` uses it
        w_granularities=(FORMS["tensorrt"].w_granularity,),
        w_symmetries=(FORMS["tensorrt"].w_symmetry,),
        a_symmetries=(FORMS["tensorrt"].a_symmetry,),
        weight_code_range=(-127, 127),
        shift_codes=False,  # TensorRT takes zero point 0 only
        fold_bn="scale",
        weight_format="qdq",
    ),
    "snpe": TargetProfile(
        name="snpe",
        description="uint8 with offset; per-tensor weights and activations",
        weight_containers=("uint8",),
        act_containers=("uint8",),
        # per-tensor as the `snpe` form; a symmetric tensor is the offset-2^(b-1) special case
        w_granularities=(FORMS["snpe"].w_granularity,),
    ),
}


def get_preset(name: str) -> TargetProfile:
    if isinstance(name, TargetProfile):
        return name
    if name not in PRESETS:
        raise ValueError(f"preset={name!r}: accepted values are {', '.join(PRESETS)}")
    return PRESETS[name]


def allowed_containers(names: tuple[str, ...], opset: int) -> tuple[str, ...]:
    return tuple(n for n in names if CONTAINERS[n][2] <= opset)


def pick_container(
    lo: int, hi: int, names: tuple[str, ...], shift: bool = True
) -> tuple[str, int] | None:
    """(container, offset) storing every code in [lo, hi] as code + offset, or None.

    Offset 0 when the range fits as is in some allowed type; else (with `shift`) the range is shifted to start at the type's
    lowest value (signed codes in an unsigned type), which leaves dequantized values unchanged
    when the zero point is shifted by the same offset."""
    for name in names:
        tmin, tmax, _ = CONTAINERS[name]
        if tmin <= lo and hi <= tmax:
            return name, 0
    if shift:
        for name in names:
            tmin, tmax, _ = CONTAINERS[name]
            if hi - lo <= tmax - tmin:
                return name, tmin - lo
    return None


def check_layers(profile: TargetProfile, choices: dict) -> None:
    """Raise one ValueError listing every layer whose form `profile` cannot run.

    `choices`: layer name -> LayerChoice. Data-dependent limits (code ranges, containers)
    are checked later, per tensor, by the exporter."""
    problems = []
    for name, c in choices.items():
        if c.w_granularity not in profile.w_granularities:
            problems.append(
                f"layer {name!r}: w_granularity={c.w_granularity!r}, {profile.name} takes "
                f"{' or '.join(profile.w_granularities)} weights"
            )
        if c.w_symmetry not in profile.w_symmetries:
            problems.append(
                f"layer {name!r}: w_symmetry={c.w_symmetry!r}, {profile.name} takes "
                f"{' or '.join(profile.w_symmetries)} weights"
            )
        if c.a_bits is not None and c.a_symmetry not in profile.a_symmetries:
            problems.append(
                f"layer {name!r}: a_symmetry={c.a_symmetry!r}, {profile.name} takes "
                f"{' or '.join(profile.a_symmetries)} activations"
            )
    raise_problems(profile, problems)


def raise_problems(profile: TargetProfile, problems: list[str]) -> None:
    if not problems:
        return
    shown = "\n  ".join(problems[:12])
    more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
    raise ValueError(
        f"preset {profile.name!r} ({profile.description}) cannot take this config:\n  {shown}{more}"
    )
