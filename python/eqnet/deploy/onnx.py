"""ONNX QDQ export of one subnet of an elastic supernet (QuantizeLinear / DequantizeLinear).

How the graph is built: the supernet is deep-copied with the chosen subnet active, and every
quantized layer is replaced by a float layer whose input activation and weight pass through a
placeholder autograd function. `torch.onnx.export(dynamo=False)` (the TorchScript exporter,
which runs offline and handles every torchvision model) traces it to a float ONNX graph in which
each placeholder is one node of a private domain; `onnx.version_converter` lifts the graph to
the requested opset when it is above 20 (the TorchScript exporter's last), and each placeholder
is then replaced by its QDQ nodes, built from the exact `QuantParams` the fake-quant forward
uses. No placeholder survives; `onnx.checker.check_model(full_check=True)` runs before saving.

Why this reproduces the fake-quant forward (DESIGN.md "Quantization math"):
- Weights: the integer codes are computed here with the forward's own fp32 arithmetic and
  checked bit for bit against the quantizer's output before export. Stored as the
  DequantizeLinear initializer ("dq" format) they dequantize to exactly `(q - z_r) * s`; in the
  "qdq" format (TensorRT) the initializer holds those dequantized floats and QuantizeLinear
  recovers the same codes (|x/s - (q - z_r)| is ~1e-7 relative, far below the 0.5 rounding step).
- Activations: QuantizeLinear computes `saturate(round_half_even(x / s) + z)`. The forward
  computes `clamp(round_half_even(x * fl32(1/s)) + z_r, qmin, qmax)`. Saturation is to the
  container type's range, so a code range narrower than the type (widths below the container,
  e.g. 3-bit codes in int4, or 7-bit codes in int8) gets a float `Clip` to
  `[(qmin - z_r) s, (qmax - z_r) s]` before QuantizeLinear, which gives the same codes.
  `x / s` and `x * fl32(1/s)` can differ by one ulp, which changes a code only when x / s lies
  within an ulp of a rounding tie: rare, and each such flip moves one activation by one step.
- Nested weights (vertical layering) at width b < top width n dequantize to
  `(q_b + c_k) 2^k s` with c_k = (2^k - 1) / 2^(k+1); an integer zero point cannot add c_k, so
  the codes are stored as q' = 2^(k+1) q_b + 2^k - 1 with step s / 2 (the same real number,
  rounded once: bit-exact). q' needs n + 1 bits, so n = 8 lands in int16 (generic preset).
- BatchNorm: "keep" leaves BatchNormalization after the conv (exact: the same eval formula);
  "affine" replaces it by an output-side per-channel Mul + Add (a, b computed in float64, equal
  to BN up to fp32 rounding); "scale" folds a into the per-channel weight scale and b into the
  bias (TensorRT). Folding into the float weight before quantization is never done: it would
  change the codes, and the fake-quant subnet quantizes the unfolded weight.

The choice of container, offset and clip of every tensor is recorded in the model's
metadata_props (`eqnet.layers`, JSON), with the preset, the config and the BN mode.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import os
import warnings

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from eqkernels import atomic

from ..space import SubnetConfig
from .onnx_presets import (
    BN_MODES,
    CONTAINERS,
    WEIGHT_FORMATS,
    TargetProfile,
    allowed_containers,
    check_layers,
    get_preset,
    pick_container,
    raise_problems,
)

MIN_OPSET = 13  # per-axis QuantizeLinear / DequantizeLinear
MAX_OPSET = 21  # the newest opset this exporter emits and tests (onnxruntime 1.31 runs it)
TORCH_MAX_OPSET = 20  # the TorchScript exporter's last opset; newer ones go through onnx
PLACEHOLDER_DOMAIN = "eqnet_export"
INPUT_NAME = "input"
OUTPUT_NAME = "output"


# --------------------------------------------------------------------------------------------
# What each quantized tensor becomes


@dataclasses.dataclass
class TensorQDQ:
    """The QDQ of one tensor: container type, code offset, scale/zero point (offset applied)."""

    layer: str
    role: str  # "activation" or "weight"
    bits: int
    container: str
    offset: int
    scale: np.ndarray  # float32, 0-d (per-tensor) or [C] (per-channel)
    zero_point: np.ndarray  # int64, same shape as scale, offset applied
    axis: int | None
    clip: tuple[float, float] | None = None  # activations narrower than the container
    codes: np.ndarray | None = None  # weights: int64 codes, offset applied
    dequantized: np.ndarray | None = None  # weights: float32 (q - z) * s
    notes: list = dataclasses.field(default_factory=list)

    def record(self) -> dict:
        return {
            "bits": self.bits,
            "container": self.container,
            "offset": self.offset,
            "granularity": "tensor" if self.axis is None else "channel",
            "clip": self.clip is not None,
            **({"notes": self.notes} if self.notes else {}),
        }


class _Mark(torch.autograd.Function):
    """Identity in torch; one placeholder node (domain eqnet_export, attribute key) in ONNX."""

    @staticmethod
    def forward(ctx, x, key):
        return x.clone()

    @staticmethod
    def symbolic(g, x, key):
        out = g.op(f"{PLACEHOLDER_DOMAIN}::Mark", x, key_i=key)
        out.setType(x.type())  # the exporter needs the shape for the conv that follows
        return out


class _ExportLayer(nn.Module):
    """Float stand-in of one quantized layer: marked input and weight, then conv/linear and an
    optional output-side per-channel affine (folded BN)."""

    def __init__(self, layer, act_key, weight_key, weight, bias, affine):
        super().__init__()
        self.layer = layer  # the QConv2d / QLinear, for its conv hyper-parameters only
        self.act_key = act_key
        self.weight_key = weight_key
        self.register_buffer("w", weight)
        self.register_buffer("b", bias)
        self.mul = None if affine is None else nn.Parameter(affine[0], requires_grad=False)
        self.add = None if affine is None else nn.Parameter(affine[1], requires_grad=False)

    def forward(self, x):
        x = _Mark.apply(x, self.act_key)
        w = _Mark.apply(self.w, self.weight_key)
        if isinstance(self.layer, nn.Conv2d):
            y = nn.Conv2d._conv_forward(self.layer, x, w, self.b)
        else:
            y = F.linear(x, w, self.b)
        if self.mul is not None:
            shape = [-1] + [1] * (y.dim() - 2)
            y = y * self.mul.reshape(shape) + self.add.reshape(shape)
        return y


# --------------------------------------------------------------------------------------------
# Codes, exactly as the fake-quant forward computes them


def _per_axis(t: torch.Tensor, like: torch.Tensor, axis: int | None) -> torch.Tensor:
    t = t.detach().float()
    if axis is None:
        return t.reshape(())
    shape = [1] * like.dim()
    shape[axis] = -1
    return t.reshape(shape)


def weight_codes(w: torch.Tensor, p) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
    """(codes, scale, zero point, notes) with (codes - zero point) * scale == the forward.

    Codes are float tensors holding integers; scale / zero point are per-tensor 0-d or [C]."""
    w = w.detach().float()
    s = _per_axis(p.scale, w, p.axis)
    v = w * torch.reciprocal(s)  # fp32 1/s, as the forward (DESIGN.md)
    if not p.nested:
        zr = (
            torch.zeros_like(s)
            if p.zero_point is None
            else torch.round(_per_axis(p.zero_point, w, p.axis))
        )
        q = torch.clamp(torch.round(v) + zr, p.quant_min, p.quant_max)
        return q, s, zr + torch.zeros_like(s), []
    k = p.top_bits - p.bits
    q_n = torch.clamp(torch.round(v), p.quant_min, p.quant_max)
    q_b = torch.floor(q_n * 2.0**-k)  # arithmetic shift by k
    if k == 0:
        return q_b, s, torch.zeros_like(s), []
    # (q_b + c_k) 2^k s with c_k = (2^k - 1) / 2^(k+1)  ==  (2^(k+1) q_b + 2^k - 1) (s / 2)
    codes = q_b * 2.0 ** (k + 1) + (2.0**k - 1.0)
    note = f"nested {p.bits} of {p.top_bits} bits: codes 2^{k + 1} q_b + {2**k - 1}, step s/2"
    return codes, s * 0.5, torch.zeros_like(s), [note]


def _weight_code_range(p, k_nested: int) -> tuple[int, int]:
    """Every code a weight of this form can take (data-independent, so containers are too)."""
    if not p.nested:
        return p.quant_min, p.quant_max
    lo, hi = -(1 << (p.bits - 1)), (1 << (p.bits - 1)) - 1
    if k_nested == 0:
        return lo, hi
    m, c = 1 << (k_nested + 1), (1 << k_nested) - 1
    return lo * m + c, hi * m + c


# --------------------------------------------------------------------------------------------
# Planning: every tensor's QDQ, checked against the preset


def _plan_activation(name, layer, choice, profile, opset, problems):
    p = layer.act_quantizer.params(choice.a_bits, "tensor", choice.a_symmetry)
    s = p.scale.detach().float().reshape(())
    z = 0 if p.zero_point is None else int(torch.round(p.zero_point.detach().float()).item())
    lo, hi = min(p.quant_min, z), max(p.quant_max, z)
    names = allowed_containers(profile.act_containers, opset)
    picked = pick_container(lo, hi, names, shift=profile.shift_codes)
    if picked is None:
        problems.append(
            f"layer {name!r}: activation codes [{p.quant_min}, {p.quant_max}] with zero point "
            f"{z} ({choice.a_bits}-bit, {'signed' if p.quant_min < 0 else 'unsigned'}) fit none "
            f"of {profile.name}'s activation types {list(names)} at opset {opset}"
        )
        return None
    container, offset = picked
    tmin, tmax, _ = CONTAINERS[container]
    clip = None
    if (p.quant_min + offset, p.quant_max + offset) != (tmin, tmax):
        # QuantizeLinear saturates to the type's range; clip to the code range first (fp32).
        lo_f = (torch.tensor(float(p.quant_min - z)) * s).item()
        hi_f = (torch.tensor(float(p.quant_max - z)) * s).item()
        clip = (lo_f, hi_f)
    return TensorQDQ(
        layer=name,
        role="activation",
        bits=choice.a_bits,
        container=container,
        offset=offset,
        scale=s.numpy().astype(np.float32),
        zero_point=np.array(z + offset, dtype=np.int64),
        axis=None,
        clip=clip,
    )


def _plan_weight(name, layer, choice, profile, opset, bn_mul, problems):
    p = layer.weight_quantizer.params(choice.w_bits, choice.w_granularity, choice.w_symmetry)
    codes, s, z, notes = weight_codes(layer.weight, p)
    # The codes must reproduce the quantizer's own output bit for bit (whatever backend runs).
    with torch.no_grad():
        expected = layer.weight_quantizer(
            layer.weight, choice.w_bits, choice.w_granularity, choice.w_symmetry
        ).float()
    if not torch.equal((codes - z) * s, expected):
        raise RuntimeError(
            f"layer {name!r}: the exporter's weight codes do not reproduce the fake-quant "
            f"weight ({choice}); the quantizer's forward differs from DESIGN.md's formula"
        )
    k = (p.top_bits - p.bits) if p.nested else 0
    lo, hi = _weight_code_range(p, k)
    axis = p.axis
    if bn_mul is not None:
        # Fold BN's a into the per-channel step: (q - z) s a. A negative a flips the codes.
        if axis is None:
            problems.append(
                f"layer {name!r}: fold_bn='scale' needs per-channel weights (BN's factor is "
                f"per channel); got w_granularity='tensor' (use fold_bn='keep' or 'affine')"
            )
            return None
        a = bn_mul.detach().double().reshape(s.shape)
        if bool((a == 0).any()):
            problems.append(f"layer {name!r}: BN factor gamma/sqrt(var+eps) is 0 for a channel")
            return None
        sign = torch.sign(a).float()
        if bool((sign < 0).any()):
            if p.zero_point is not None:
                problems.append(
                    f"layer {name!r}: fold_bn='scale' with a negative BN factor needs "
                    f"symmetric weights (codes are negated); got asymmetric"
                )
                return None
            codes = codes * sign
            lo, hi = min(lo, -hi), max(hi, -lo)
            notes.append("codes negated where the BN factor is negative")
        s = (s.double() * a.abs()).float()
    if profile.weight_code_range is not None:
        rmin, rmax = profile.weight_code_range
        bad = int(((codes < rmin) | (codes > rmax)).sum())
        if bad:
            problems.append(
                f"layer {name!r}: {bad} weight codes lie outside {profile.name}'s range "
                f"[{rmin}, {rmax}] (the {choice.w_bits}-bit codes span [{int(codes.min())}, "
                f"{int(codes.max())}]); {profile.name} takes narrow-range weights only"
            )
            return None
        lo, hi = max(lo, rmin), min(hi, rmax)
    zero = z.reshape(-1)
    lo, hi = min(lo, int(zero.min())), max(hi, int(zero.max()))
    names = allowed_containers(profile.weight_containers, opset)
    picked = pick_container(lo, hi, names, shift=profile.shift_codes)
    if picked is None:
        problems.append(
            f"layer {name!r}: weight codes [{lo}, {hi}] ({choice.w_bits}-bit"
            f"{', nested' if p.nested else ''}) fit none of {profile.name}'s weight types "
            f"{list(names)} at opset {opset}"
        )
        return None
    container, offset = picked
    scale = s.reshape(-1) if axis is not None else s.reshape(())
    zp = z.reshape(-1) if axis is not None else z.reshape(())
    deq = (codes - z) * s
    return TensorQDQ(
        layer=name,
        role="weight",
        bits=choice.w_bits,
        container=container,
        offset=offset,
        scale=scale.numpy().astype(np.float32),
        zero_point=(zp.numpy().astype(np.int64) + offset),
        axis=axis,
        codes=codes.numpy().astype(np.int64) + offset,
        dequantized=deq.numpy().astype(np.float32),
        notes=notes,
    )


# --------------------------------------------------------------------------------------------
# The export model (float graph with placeholders)


def _bn_pairs(supernet, fold_bn):
    if fold_bn == "keep":
        return {}
    from .fold import find_foldable_bn

    # Traced on .model (the Supernet's forward takes *args); names made Supernet-relative.
    pairs = find_foldable_bn(supernet.model)
    return {f"model.{bn}": f"model.{layer}" for bn, layer in pairs.items()}


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _build(supernet, config, profile, opset, fold_bn):
    from .fold import bn_affine, bn_for_width, fold_affine

    problems: list[str] = []
    layers = supernet.quantized_layers()
    check_layers(profile, dict(config.layers))
    pairs = _bn_pairs(supernet, fold_bn)  # bn name -> layer name
    bn_of = {layer: bn for bn, layer in pairs.items()}
    export = copy.deepcopy(supernet)
    plans: dict[int, TensorQDQ] = {}
    for i, (name, layer) in enumerate(layers.items()):
        choice = config[name]
        if not isinstance(layer, nn.Conv2d | nn.Linear):
            raise NotImplementedError(
                f"layer {name!r}: ONNX export handles QConv2d and QLinear, not "
                f"{type(layer).__name__}"
            )
        bias = None if layer.bias is None else layer.bias.detach().float().clone()
        affine = None
        bn_mul = None
        if name in bn_of:
            bn = bn_for_width(supernet.get_submodule(bn_of[name]), choice.w_bits)
            a, b = bn_affine(bn)
            mul, add = fold_affine(a, b, layer.bias)
            if fold_bn == "affine":
                affine, bias = (mul, add), None
            else:
                bn_mul, bias = mul, add
            _set_module(export, bn_of[name], nn.Identity())
        act = _plan_activation(name, layer, choice, profile, opset, problems)
        wt = _plan_weight(name, layer, choice, profile, opset, bn_mul, problems)
        if act is None or wt is None:
            continue
        plans[2 * i], plans[2 * i + 1] = act, wt
        stand_in = _ExportLayer(
            export.get_submodule(name),
            2 * i,
            2 * i + 1,
            torch.from_numpy(wt.dequantized),
            bias,
            affine,
        )
        _set_module(export, name, stand_in)
    raise_problems(profile, problems)
    return export.eval(), plans


# --------------------------------------------------------------------------------------------
# Graph rewriting: placeholders -> QDQ


def _numpy_type(container):
    if container in ("int4", "uint4"):
        import ml_dtypes

        return getattr(ml_dtypes, container)
    return np.dtype(container)


def _tensor(name, values, container=None):
    from onnx import numpy_helper

    values = np.asarray(values)
    if container is None:
        return numpy_helper.from_array(values.astype(np.float32), name)
    # Raw little-endian bytes; int4/uint4 (ml_dtypes, an onnx dependency) packed two per byte.
    return numpy_helper.from_array(values.astype(_numpy_type(container)), name)


def _qdq_nodes(plan: TensorQDQ, src: str, dst: str, prefix: str, weight_format: str):
    """(nodes, initializers) computing dst from src (activations) or from constants."""
    from onnx import helper

    axis = {} if plan.axis is None else {"axis": plan.axis}
    inits = [
        _tensor(f"{prefix}.scale", plan.scale),
        _tensor(f"{prefix}.zero_point", plan.zero_point, plan.container),
    ]
    nodes = []
    if plan.role == "weight":
        if weight_format == "dq":
            inits.append(_tensor(f"{prefix}.codes", plan.codes, plan.container))
            q = f"{prefix}.codes"
        else:
            inits.append(_tensor(f"{prefix}.float", plan.dequantized))
            q = f"{prefix}.q"
            nodes.append(
                helper.make_node(
                    "QuantizeLinear",
                    [f"{prefix}.float", f"{prefix}.scale", f"{prefix}.zero_point"],
                    [q],
                    name=f"{prefix}/QuantizeLinear",
                    **axis,
                )
            )
    else:
        x = src
        if plan.clip is not None:
            inits += [
                _tensor(f"{prefix}.clip_min", plan.clip[0]),
                _tensor(f"{prefix}.clip_max", plan.clip[1]),
            ]
            x = f"{prefix}.clipped"
            nodes.append(
                helper.make_node(
                    "Clip",
                    [src, f"{prefix}.clip_min", f"{prefix}.clip_max"],
                    [x],
                    name=f"{prefix}/Clip",
                )
            )
        q = f"{prefix}.q"
        nodes.append(
            helper.make_node(
                "QuantizeLinear",
                [x, f"{prefix}.scale", f"{prefix}.zero_point"],
                [q],
                name=f"{prefix}/QuantizeLinear",
            )
        )
    nodes.append(
        helper.make_node(
            "DequantizeLinear",
            [q, f"{prefix}.scale", f"{prefix}.zero_point"],
            [dst],
            name=f"{prefix}/DequantizeLinear",
            **axis,
        )
    )
    return nodes, inits


def _rewrite(model, plans, weight_format):
    from onnx import helper

    graph = model.graph
    new_nodes, new_inits = [], []
    uses: dict[int, int] = {}
    for node in graph.node:
        if node.domain != PLACEHOLDER_DOMAIN:
            new_nodes.append(node)
            continue
        key = next(a.i for a in node.attribute if a.name == "key")
        plan = plans[key]
        prefix = f"{plan.layer}.{'input' if plan.role == 'activation' else 'weight'}"
        uses[key] = uses.get(key, 0) + 1
        if uses[key] > 1:  # a layer called more than once: unique names per call
            prefix = f"{prefix}.call{uses[key]}"
        nodes, inits = _qdq_nodes(plan, node.input[0], node.output[0], prefix, weight_format)
        new_nodes += nodes
        new_inits += inits
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    opsets = [o for o in model.opset_import if o.domain != PLACEHOLDER_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    # The exporter's value_info predates the rewrite; shape inference in the checker redoes it.
    del graph.value_info[:]


# --------------------------------------------------------------------------------------------
# Public API


def _check_args(supernet, config, input_shape, opset, profile, fold_bn, weight_format):
    if not hasattr(supernet, "quantized_layers") or not hasattr(supernet, "set_config"):
        raise ValueError(
            f"supernet must be an eqnet Supernet (eqnet.convert), got {type(supernet).__name__}"
        )
    if not isinstance(config, SubnetConfig):
        raise ValueError(f"config must be a SubnetConfig, got {type(config).__name__}")
    shape = tuple(input_shape) if isinstance(input_shape, list | tuple | torch.Size) else None
    if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise ValueError(
            f"input_shape={input_shape!r}: must be a tuple of positive ints including the batch "
            f"dimension, e.g. (1, 3, 32, 32)"
        )
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset={opset!r}: accepted values are integers {MIN_OPSET}..{MAX_OPSET}")
    if fold_bn not in BN_MODES:
        raise ValueError(f"fold_bn={fold_bn!r}: accepted values are {', '.join(BN_MODES)}")
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(
            f"weight_format={weight_format!r}: accepted values are {', '.join(WEIGHT_FORMATS)}"
        )
    if profile.name == "tensorrt" and fold_bn == "keep":
        raise ValueError(
            "fold_bn='keep': the tensorrt preset needs BN folded ('scale' or 'affine'): its "
            "QDQ convolution takes no BatchNormalization"
        )
    return shape


def export_onnx(
    supernet,
    config: SubnetConfig,
    path: str | os.PathLike,
    input_shape,
    opset: int = 21,
    preset: str | TargetProfile = "generic",
    *,
    fold_bn: str | None = None,
    weight_format: str | None = None,
    int4: bool = True,
):
    """Export subnet `config` of `supernet` as ONNX QDQ to `path`; returns the onnx.ModelProto.

    input_shape: the input's shape including the batch dimension (exported as dynamic).
    preset: "generic", "tensorrt" or "snpe" (eqnet.deploy.onnx_presets); a config the engine
    cannot run raises ValueError naming each offending layer before anything is written.
    fold_bn: "keep" | "affine" | "scale" (default: the preset's); weight_format: "dq" (integer
    codes -> DequantizeLinear) or "qdq" (float weights -> QuantizeLinear -> DequantizeLinear).
    int4: allow int4/uint4 containers (opset >= 21). onnxruntime 1.31 runs them with graph
    optimizations up to ORT_ENABLE_BASIC; its extended QDQ transformers reject int4 (QDQ
    propagation across MaxPool, Clip->QuantizeLinear fusion), so pass int4=False for graphs
    meant for ORT's fully optimized mode.
    """
    import onnx

    profile = get_preset(preset)
    if not isinstance(int4, bool):
        raise ValueError(f"int4={int4!r}: accepted values are True, False")
    if not int4:
        profile = dataclasses.replace(
            profile,
            weight_containers=tuple(c for c in profile.weight_containers if "4" not in c),
            act_containers=tuple(c for c in profile.act_containers if "4" not in c),
        )
    fold_bn = profile.fold_bn if fold_bn is None else fold_bn
    weight_format = profile.weight_format if weight_format is None else weight_format
    shape = _check_args(supernet, config, input_shape, opset, profile, fold_bn, weight_format)

    previous, was_training = supernet.config(), supernet.training
    supernet.set_config(config)  # validates the config against the space and the model
    try:
        supernet.eval()
        with torch.no_grad():
            export, plans = _build(supernet, config, profile, opset, fold_bn)
            buf = io.BytesIO()
            device = next(supernet.parameters()).device
            with warnings.catch_warnings():
                # The TorchScript exporter is deprecated but is the one that runs custom
                # symbolic placeholders offline on every torchvision model (module docstring).
                warnings.simplefilter("ignore", DeprecationWarning)
                # strided slices (ResNet-20's option-A shortcut) stay Slice nodes; harmless
                warnings.filterwarnings("ignore", "Constant folding - Only steps=1")
                torch.onnx.export(
                    export,
                    (torch.zeros(shape, device=device),),
                    buf,
                    dynamo=False,
                    opset_version=min(opset, TORCH_MAX_OPSET),
                    custom_opsets={PLACEHOLDER_DOMAIN: 1},
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                    do_constant_folding=True,
                )
    finally:
        supernet.set_config(previous)
        supernet.train(was_training)

    model = onnx.load_from_string(buf.getvalue())
    if opset > TORCH_MAX_OPSET:
        model = onnx.version_converter.convert_version(model, opset)
    _rewrite(model, plans, weight_format)
    left = [n.name for n in model.graph.node if n.op_type == "BatchNormalization"]
    if fold_bn != "keep" and left:
        # Float convs' BNs are fused by the exporter itself; these follow something else.
        raise_problems(
            profile,
            [
                f"fold_bn={fold_bn!r}: {len(left)} BatchNorm op(s) do not directly follow a "
                f"conv/linear and cannot be folded ({', '.join(left[:4])}); use fold_bn='keep'"
            ],
        )
    model.producer_name = "eqnet"
    layers = {}
    for plan in plans.values():
        layers.setdefault(plan.layer, {})[plan.role] = plan.record()
    meta = {
        "eqnet.preset": profile.name,
        "eqnet.opset": str(opset),
        "eqnet.fold_bn": fold_bn,
        "eqnet.weight_format": weight_format,
        "eqnet.int4": str(int4),
        "eqnet.config": config.to_json(),
        "eqnet.layers": json.dumps(layers),
        "eqnet.containers": (
            "weights: integer codes in the smallest allowed type; activations below the type's "
            "width: float Clip to the code range before QuantizeLinear (it saturates to the "
            "type's range); offset != 0: codes and zero point shifted into an unsigned type"
        ),
    }
    onnx.helper.set_model_props(model, meta)
    onnx.checker.check_model(model, full_check=True)
    with atomic.atomic_output(path) as tmp:
        onnx.save(model, tmp)
    return model


def run_onnx(path, inputs: torch.Tensor, optimize: bool = False) -> torch.Tensor:
    """Outputs of an exported model under onnxruntime on CPU. optimize=False disables graph
    optimizations, so the graph's own semantics run (ORT's QDQ fusion would requantize conv
    outputs in integer arithmetic, which the fake-quant subnet does not do)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])
    out = session.run(None, {INPUT_NAME: inputs.detach().float().cpu().numpy()})[0]
    return torch.from_numpy(out)


def compare_onnx(supernet, config, path, inputs, batch_size=256, optimize=False) -> dict:
    """Agreement of the exported model with the fake-quant subnet on `inputs`: max / mean
    |onnx - fake-quant|, the fraction of samples whose outputs all agree within
    1e-4 * max|output| (`samples_close`; the rest hold a flipped activation code), and top-1
    agreement."""
    previous, was_training = supernet.config(), supernet.training
    supernet.set_config(config)
    supernet.eval()
    try:
        ref, got = [], []
        with torch.no_grad():
            for chunk in torch.split(inputs, batch_size):
                ref.append(supernet(chunk).float().cpu())
                got.append(run_onnx(path, chunk, optimize))
    finally:
        supernet.set_config(previous)
        supernet.train(was_training)
    ref, got = torch.cat(ref), torch.cat(got)
    diff = (ref - got).abs()
    scale = float(ref.abs().max())
    return {
        "n": len(ref),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "max_abs_output": scale,
        "samples_close": float((diff.flatten(1).amax(1) <= 1e-4 * scale).float().mean()),
        "top1_agreement": float((ref.argmax(1) == got.argmax(1)).float().mean()),
    }
