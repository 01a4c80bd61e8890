"""Export a trained supernet to one .eqk file (DESIGN.md "The .eqk file").

What the file holds (names are the tensor names in the file; `<layer>` is the quantized layer's
name relative to the Supernet, e.g. "model.conv1"):

- `float/<path>`: every parameter and buffer of the rebuilt float network that the integer
  runtime keeps as is (float first/last layers, BN layers that could not be folded, ...).
- `w/<layer>/<form>/planes@plane<j>`: the weight codes as canonical bit planes, MSB first, one
  tensor per plane; `w/<layer>/<form>/scale` (fp32, top-width step) and, for asymmetric weights,
  `w/<layer>/<form>/zero_point` (int32 per output channel). Per-group forms (`w<b>-group-<sym>`,
  `nested-group`) store both as [N, K / group_size] and list them in the file's `groups`
  record; a fixed layer whose K the group size does not divide stores per-channel ones there. Nested layers have one form per
  granularity (`nested-<granularity>`, the top-width codes every width shares); non-nested and
  fixed-width layers one form per exported (bits, granularity, symmetry).
- `a/<layer>/a<bits>-<symmetry>/scale|zero_point`: input activation quantizer of each form (a float
  activation, `a_bits=None`, is the form `float` and has no tensors).
- `bn/<bn>/w<bits>/mul|add` (`w*` when the BN is shared by every width): the BN that follows a
  quantized layer folded into an output-side affine of that layer (see fold.py); `bias/<layer>`
  holds a quantized layer's own bias when no BN follows it.

Section order. Nested (vertically layered) supernet: section 0 holds everything any width needs
(float tensors, fixed-width layers, scales, planes 0..m-1 of every elastic layer with m the
lowest width, and that width's extras); section j >= 1 holds plane m-1+j of every elastic
layer plus the extras (folded per-bit BN, activation steps) first needed at width m+j. So the
first sections are the lower-width model and `max_bits=b` reads only that prefix. Non-nested:
section 0 holds what every exported configuration shares, each configuration its own section.

The header's model record holds the registered architecture name and its keyword arguments
(for `eqnet.models.get`; None for a user's own model, which `eqnet.load(path, model=...)`
takes), the space, the convert options and the per-layer geometry; no code. Tensors are named
by module path in the converted network, so the loader checks a given model against them.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch

import eqkernels
from eqkernels.format import split_planes, write_eqk

from ..space import ElasticSpace, LayerChoice, SubnetConfig, fixed_layer_choices
from .fold import bn_affine, bn_for_width, find_foldable_bn, fold_affine, is_switchable_bn
from .layout import (
    RECORD_VERSION,
    act_form_key,
    bn_width_key,
    float_tensors,
    layer_geometry,
    model_record,
    required_tensors,
    weight_form_key,
)

# ------------------------------------------------------------------------------- weight codes


def weight_codes(weight: torch.Tensor, params) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Integer codes of `weight` exactly as the fake-quant forward computes them.

    Returns (codes int32 [N, K] in the signed range of the stored width, weight zero point as
    int32 [N] (per group: [N, K / group_size]) or None, stored width). Nested: the top-width codes `clamp(round(w * fl32(1/s)))`
    (DESIGN.md "Quantization math", nested quantizer). Otherwise `clamp(round(v) + z_r)`; the
    op computes with `(q - z_w)` so the zero point rides along per channel.
    """
    w = weight.detach().to(torch.float32)
    N = w.shape[0]
    if params.axis is not None and params.axis != 0:
        raise NotImplementedError(
            f"weight quantization along axis {params.axis}: deployment needs the output "
            "channel axis 0"
        )
    scale = params.scale.detach()
    group = {"axis": params.axis, "group_size": params.group_size}
    if params.nested:
        bits = params.top_bits
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        q = eqkernels.quantize_codes(w, scale, None, lo, hi, **group)
        return q.reshape(N, -1).to(torch.int32), None, bits
    bits = params.bits
    zp = None if params.zero_point is None else params.zero_point.detach()
    q = eqkernels.quantize_codes(w, scale, zp, params.quant_min, params.quant_max, **group)
    q = q.reshape(N, -1).to(torch.int32)
    z_r = None if zp is None else torch.round(zp.to(torch.float32))
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if params.quant_max - params.quant_min > hi - lo:
        raise ValueError(
            f"weight range [{params.quant_min}, {params.quant_max}] does not fit {bits} bits"
        )
    # The planes hold signed codes: shift an unsigned range down (the zero point moves along).
    offset = 0 if params.quant_min >= lo and params.quant_max <= hi else params.quant_min - lo
    zero = None
    if z_r is not None or offset:
        shape = tuple(scale.shape) if params.group_size else (N,)
        zp = torch.zeros(shape) if z_r is None else z_r.reshape(-1 if len(shape) == 1 else shape)
        zero = (zp.expand(shape) - offset).to(torch.int32).contiguous()
    return q - offset, zero, bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return eqkernels.pack_bitplanes(codes, bits)


# ------------------------------------------------------------------------------- planning


class _Plan:
    """Tensors with the level (nested: the width that first needs them) or the configuration
    that first needs them (non-nested)."""

    def __init__(self):
        self.tensors: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.where: dict[str, int] = {}
        self.groups: dict[str, dict] = {}  # planes -> per-group scales (write_eqk's `groups`)

    def add(self, name: str, tensor: torch.Tensor, where: int) -> None:
        if name in self.tensors:
            self.where[name] = min(self.where[name], where)
            return
        self.tensors[name] = tensor.detach().to("cpu").contiguous()
        self.where[name] = where


def default_configs(supernet) -> OrderedDict[str, SubnetConfig]:
    """One uniform configuration per weight width; activations at the same width when the
    space has it, else at its widest activation width."""
    space: ElasticSpace = supernet.space
    configs = OrderedDict()
    for b in space.w_bits:
        a = b if b in space.a_bits else space.highest_a_bits
        configs[str(b)] = SubnetConfig.uniform(
            space,
            supernet,
            b,
            a,
            *space.preferred_forms(),
        )
    return configs


def _normalize_configs(supernet, configs) -> OrderedDict[str, SubnetConfig]:
    if configs is None:
        return OrderedDict()
    if isinstance(configs, SubnetConfig):
        configs = [configs]
    if isinstance(configs, Mapping):
        items = [(str(k), v) for k, v in configs.items()]
    elif isinstance(configs, Sequence) and not isinstance(configs, str):
        items = [(f"config{i}", c) for i, c in enumerate(configs)]
    else:
        raise ValueError("configs: expected None, a SubnetConfig, a list or a dict name -> config")
    out = OrderedDict()
    for name, cfg in items:
        if not isinstance(cfg, SubnetConfig):
            raise ValueError(
                f"configs[{name!r}]: expected a SubnetConfig, got {type(cfg).__name__}"
            )
        if name.isdecimal():
            raise ValueError(f"configs: name {name!r} is reserved for the uniform widths")
        out[name] = cfg.validate(supernet.space, supernet)
    return out


def _all_forms(layer, supernet) -> list[LayerChoice]:
    """Every choice a nested export stores for one layer (all forms of the space; for a
    fixed-width layer, all forms at its fixed widths)."""
    s = supernet.space
    if layer.fixed_choice is not None:
        return fixed_layer_choices(s, layer.fixed_choice, layer.fixed_form)
    return [
        LayerChoice(wb, ab, g, ws, asym)
        for wb in s.w_bits
        for ab in s.a_bits
        for g in s.w_granularities
        for ws in s.w_symmetries
        for asym in s.a_symmetries
    ]


def export(
    supernet,
    path: str | os.PathLike,
    configs=None,
    *,
    arch: str | None = None,
    arch_kwargs: Mapping | None = None,
    extra: Mapping | None = None,
) -> dict:
    """Write `supernet` to one .eqk file at `path`; returns the written header.

    configs: for a nested (layered) supernet, extra named configurations (e.g. a searched mixed
        config) recorded in the file; every width of the space is stored anyway, and any config
        of the space can be loaded. For a non-nested supernet, the configurations to store
        (default: one uniform config per weight width), each in its own section.
    arch, arch_kwargs: the registered architecture (eqnet.models.get) the network was built
        from, for `eqnet.load` to rebuild it; by default what `eqnet.models.get` recorded on
        the model, or none (a user's model: load with `eqnet.load(path, model=...)`).
    extra: a JSON object stored in the header as is (e.g. {"data": "digits"} for eqnet eval).
    """
    if not hasattr(supernet, "quantized_layers") or not hasattr(supernet, "space"):
        raise ValueError("supernet: expected an eqnet Supernet (eqnet.convert(...))")
    space: ElasticSpace = supernet.space
    record = model_record(supernet, arch, arch_kwargs)
    nested = bool(space.nested)
    layers = supernet.quantized_layers()
    prefix = "model."
    for name in layers:
        if not name.startswith(prefix):
            raise ValueError(f"quantized layer {name!r} is not under the Supernet's .model")

    try:
        folds = find_foldable_bn(supernet.model)
    except NotImplementedError:
        folds = OrderedDict()  # BN stays a float module (per-bit BN then cannot deploy)
    fold_of_layer = {prefix + conv: prefix + bn for bn, conv in folds.items()}

    uniform = default_configs(supernet)
    named = _normalize_configs(supernet, configs)
    if nested:
        stored = OrderedDict(list(uniform.items()) + list(named.items()))
    else:
        stored = named or uniform

    was_training = supernet.training
    supernet.eval()
    try:
        with torch.no_grad():
            header = _write(supernet, path, record, layers, fold_of_layer, stored, nested, extra)
    finally:
        supernet.train(was_training)
    return header


def _write(supernet, path, record, layers, fold_of_layer, stored, nested, extra):
    space = supernet.space
    plan = _Plan()
    uses = _first_needed(supernet, layers, stored, nested)
    quant_layers: dict[str, dict] = {}
    model_layers: dict[str, dict] = {}
    bns: dict[str, dict] = {}
    for name, layer in layers.items():
        geometry = layer_geometry(layer)
        geometry["has_bias"] = layer.bias is not None
        geometry["fixed"] = None if layer.fixed_choice is None else layer.fixed_choice.to_dict()
        geometry["bn"] = fold_of_layer.get(name)
        model_layers[name] = geometry
        quant_layers[name] = _plan_layer(
            plan, supernet, name, layer, uses[name], geometry["bn"], nested, bns
        )
    _plan_float_tensors(plan, supernet, layers, fold_of_layer)

    model = {
        "record_version": RECORD_VERSION,
        "arch": record,
        "space": space.to_dict(),
        "convert": {
            "keep_first_last": getattr(supernet, "keep_first_last", None),
            "per_bit_bn": bool(getattr(supernet, "per_bit_bn", False)),
        },
        "layers": model_layers,
        "bn_folds": bns,
    }
    quant = {
        "nested": nested,
        "min_bits": min(space.w_bits) if nested else None,
        "layers": quant_layers,
        "configs": {name: _config_dict(cfg) for name, cfg in stored.items()},
    }
    if nested:
        sections, widths = _nested_sections(plan, space)
    else:
        sections, widths = _config_sections(plan, stored, model, quant)
    return write_eqk(
        path,
        sections=sections,
        model=model,
        nested=nested,
        top_bits=space.top_bits,
        widths=widths,
        quant=quant,
        extra=extra,
        groups=plan.groups,
    )


def _first_needed(supernet, layers, stored, nested) -> dict[str, dict[LayerChoice, int]]:
    """layer -> {stored choice: where it is first needed}: nested, the width level (the widest
    nested weight width of the cheapest config using it; 0 for fixed layers); otherwise the
    index + 1 of the first stored configuration using it (0 for fixed layers)."""
    uses = {name: {} for name in layers}
    if nested:
        for name, layer in layers.items():
            for choice in _all_forms(layer, supernet):
                level = 0 if layer.fixed_choice is not None else choice.w_bits
                uses[name][choice] = level
        for cfg in stored.values():
            need = max(c.w_bits for n, c in cfg if layers[n].fixed_choice is None)
            for n, c in cfg:
                if layers[n].fixed_choice is None and c in uses[n]:
                    uses[n][c] = min(uses[n][c], max(need, c.w_bits))
    else:
        for index, cfg in enumerate(stored.values()):
            for n, c in cfg:
                where = 0 if layers[n].fixed_choice is not None else index + 1
                uses[n][c] = min(uses[n].get(c, where), where)
    return uses


def _plan_layer(plan, supernet, name, layer, uses, bn_name, nested, bns) -> dict:
    """Plan every tensor of one quantized layer's stored choices (`bn_name`: the BN folded
    into its output, or None); returns the layer's quant record."""
    wforms, aforms = {}, {}
    for choice, where in uses.items():
        qp = layer.weight_quantizer.params(choice.w_bits, choice.w_granularity, choice.w_symmetry)
        wkey = weight_form_key(qp, choice)
        if wkey not in wforms:
            wforms[wkey] = _plan_weight_form(plan, f"w/{name}/{wkey}", layer, qp, where, nested)
        elif not (qp.nested and layer.fixed_choice is None):
            base = f"w/{name}/{wkey}/"
            for key in list(plan.where):
                if key.startswith(base):
                    plan.add(key, plan.tensors[key], where)
        akey = act_form_key(choice)
        aforms[akey] = _plan_act_form(plan, f"a/{name}/{akey}", layer, choice, where)
        _plan_output_affine(plan, supernet, name, layer, bn_name, choice, where, nested, bns)
    return {"weights": wforms, "acts": aforms}


def _plan_weight_form(plan, base, layer, qp, where, nested) -> dict:
    codes, zero, bits = weight_codes(layer.weight, qp)
    planes = pack_codes(codes, bits)
    nested_layer = qp.nested and layer.fixed_choice is None
    for j, part in enumerate(split_planes(base + "/planes", planes)):
        ((pname, ptensor),) = part.items()
        # Plane j is first needed at width j + 1 (nested); else with the form.
        plan.add(pname, ptensor, j + 1 if nested_layer else where)
    scale = qp.scale.detach().float()
    # per group: [N, K / g] beside the planes (the file's `groups` record); else [N] or [1]
    scale = scale.reshape(scale.shape if qp.group_size else (-1,))
    plan.add(base + "/scale", scale, 0 if nested else where)
    if zero is not None:
        plan.add(base + "/zero_point", zero, where)
    form = {
        "nested": bool(qp.nested),
        "stored_bits": bits,
        "K": codes.shape[1],
        "N": codes.shape[0],
        "has_zero_point": zero is not None,
    }
    if qp.group_size:
        form["group_size"] = qp.group_size
        plan.groups[base + "/planes"] = {
            "group_size": qp.group_size,
            "K": codes.shape[1],
            "scale": base + "/scale",
            "zero_point": base + "/zero_point" if zero is not None else None,
        }
    return form


def _plan_act_form(plan, base, layer, choice, where) -> dict:
    if choice.a_bits is None:  # float activation: the runtime reads the input as is
        return {"float": True}
    ap = layer.act_quantizer.params(choice.a_bits, "tensor", choice.a_symmetry)
    plan.add(base + "/scale", ap.scale.detach().float().reshape(1), where)
    if ap.zero_point is not None:
        zero = torch.round(ap.zero_point.detach().float()).reshape(1)
        plan.add(base + "/zero_point", zero, where)
    return {
        "quant_min": ap.quant_min,
        "quant_max": ap.quant_max,
        "has_zero_point": ap.zero_point is not None,
    }


def _plan_output_affine(plan, supernet, name, layer, bn_name, choice, where, nested, bns):
    """The folded BN that follows the layer (per width when switchable), or its own bias."""
    if bn_name is not None:
        bn = supernet.get_submodule(bn_name)
        bkey = bn_width_key(bn, choice.w_bits)
        a, b = bn_affine(bn_for_width(bn, choice.w_bits))
        mul, add = fold_affine(a, b, layer.bias)
        bbase = f"bn/{bn_name}/{bkey}"
        bn_where = 0 if bkey == "w*" else where
        plan.add(bbase + "/mul", mul, bn_where)
        plan.add(bbase + "/add", add, bn_where)
        bns.setdefault(bn_name, {"layer": name, "widths": []})
        if bkey not in bns[bn_name]["widths"]:
            bns[bn_name]["widths"].append(bkey)
    elif layer.bias is not None:
        plan.add(f"bias/{name}", layer.bias.detach().float(), 0 if nested else where)


def _nested_sections(plan, space):
    """One section per plane from the lowest width up (section 0 = the lowest width's planes
    and everything it needs); a section may be empty but stays, so section indices follow
    plane order. Returns the sections and, per width, the sections it reads."""
    top, min_bits = space.top_bits, min(space.w_bits)

    def section_of(level):
        return max(0, min(level, top) - min_bits)

    sections = [OrderedDict() for _ in range(top - min_bits + 1)]
    for name, tensor in plan.tensors.items():
        sections[section_of(plan.where[name])][name] = tensor
    widths = {str(b): list(range(section_of(b) + 1)) for b in space.w_bits}
    return sections, widths


def _config_sections(plan, stored, model, quant):
    """Section 0 for what every configuration shares, then one per configuration; returns
    them and, per configuration, the sections it reads."""
    sections = [OrderedDict() for _ in range(len(stored) + 1)]
    for name, tensor in plan.tensors.items():
        sections[plan.where[name]][name] = tensor
    where = {name: plan.where[name] for name in plan.tensors}
    layout = {"tensors": [{"name": n, "section": s} for n, s in where.items()]}
    layout.update(model=model, quant=quant)
    widths = {
        cname: sorted({0} | {where[n] for n in required_tensors(layout, cfg)})
        for cname, cfg in stored.items()
    }
    return sections, widths


def _config_dict(cfg: SubnetConfig) -> dict:
    return {n: c.to_dict() for n, c in cfg}


def _plan_float_tensors(plan, supernet, layers, fold_of_layer):
    """Store the state of every module of the converted network that the runtime keeps as a
    float module (all but the quantized layers and the BNs folded into them), by path."""
    prefix = "model."
    replaced = {n[len(prefix) :] for n in layers}
    folded = {bn[len(prefix) :] for bn in fold_of_layer.values()}
    skip = replaced | folded
    for mname, module in supernet.model.named_modules():
        if is_switchable_bn(module) and mname not in skip:
            raise NotImplementedError(
                f"per-bit BN {prefix + mname!r} does not directly follow a quantized layer, so "
                "it cannot be folded per width"
            )
    for tname, tensor in float_tensors(supernet.model, skip).items():
        plan.add(f"float/{tname}", tensor, 0)
