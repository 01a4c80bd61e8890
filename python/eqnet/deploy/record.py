"""Validation of the deployment record of a .eqk file, before the model is built.

`eqkernels.eqk` validates the file's structure; this module validates what eqnet puts in it
(export.py): the model and quant records (types, ranges, keys), their agreement with each
other and with the file's tensor list (every tensor a layer form needs exists with the shape
and dtype its geometry implies), the network the record declares (built on the meta device:
each quantized layer's geometry, bias and folded BN must equal the module it replaces, and
the float tensors must be exactly the rest of its state), and the values of the loaded tensors
(finite; scales positive and normal). Every violation raises `EqkFormatError` naming the layer,
field or tensor.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from eqkernels.eqk import GROUP_QUANTUM, EqkFormatError, plane_tensor_name
from eqkernels.eqk.fields import (
    any_object,
    boolean,
    dict_of,
    fail,
    integer,
    list_of,
    one_of,
    optional,
    record,
    string,
)

from ..models import LLAMA_TINY_DEFAULTS
from .layout import FLOAT_ACT_KEY, config_from, layer_geometry, required_tensors

MAX_CHANNELS = 1 << 20
MAX_KERNEL = 64
MAX_STRIDE = 64
MAX_PADDING = 1024
MAX_CLASSES = 1 << 20
ARCH_KWARGS = ("num_classes", *LLAMA_TINY_DEFAULTS)
_BITS = integer(1, 8)
_FLOAT_TINY = torch.finfo(torch.float32).tiny
_ACT_KEY = re.compile(r"a([1-8])-(?:sym|asym)")
_GRANULARITIES = ("tensor", "channel", "group")

_CHOICE = record(
    {
        "w_bits": _BITS,
        "a_bits": optional(_BITS),  # null: float activation
        "w_granularity": one_of(*_GRANULARITIES),
        "w_symmetry": one_of("sym", "asym"),
        "a_symmetry": one_of("sym", "asym"),
    }
)
_PAIR = {
    "kernel_size": integer(1, MAX_KERNEL),
    "stride": integer(1, MAX_STRIDE),
    "padding": integer(0, MAX_PADDING),
    "dilation": integer(1, MAX_KERNEL),
}
_COMMON = {
    "kind": one_of("conv2d", "linear"),
    "has_bias": boolean,
    "fixed": optional(_CHOICE),
    "bn": optional(string()),
}
_CONV = record(
    {
        **_COMMON,
        "in_channels": integer(1, MAX_CHANNELS),
        "out_channels": integer(1, MAX_CHANNELS),
        "groups": integer(1, MAX_CHANNELS),
        **{k: list_of(check, 2, 2) for k, check in _PAIR.items()},
    }
)
_LINEAR = record(
    {**_COMMON, "in_features": integer(1, MAX_CHANNELS), "out_features": integer(1, MAX_CHANNELS)}
)
_ARCH = record(
    {
        "name": string(256),
        # the registered models' integer arguments (llama-tiny's size); models.get checks
        # their ranges before anything is built
        "kwargs": dict_of(
            integer(1, MAX_CLASSES),
            key_check=one_of(*ARCH_KWARGS),
            max_len=len(ARCH_KWARGS),
        ),
    }
)
_MODEL = record(
    {
        "arch": optional(_ARCH),  # null: a user's model, loaded with load(path, model=...)
        "layers": dict_of(any_object, min_len=1, max_len=1 << 16),
        "bn_folds": dict_of(
            record({"layer": string(), "widths": list_of(string(3, r"w\*|w[1-8]"), 1, 8)}),
            max_len=1 << 16,
        ),
    }
)
_WEIGHT_FORM = record(
    {
        "nested": boolean,
        "stored_bits": _BITS,
        "K": integer(1, MAX_CHANNELS * MAX_KERNEL * MAX_KERNEL),
        "N": integer(1, MAX_CHANNELS),
        "has_zero_point": boolean,
        # per-group forms: the group size of their scales [N, K / group_size]
        "group_size": integer(GROUP_QUANTUM, MAX_CHANNELS),
    },
    optional_keys=("group_size",),
)
_INT_ACT_FORM = record(
    {"quant_min": integer(-128, 0), "quant_max": integer(1, 255), "has_zero_point": boolean}
)
_FLOAT_ACT_FORM = record({"float": one_of(True)})


def _act_form(value, path):
    if isinstance(value, dict) and "float" in value:
        return _FLOAT_ACT_FORM(value, path)
    return _INT_ACT_FORM(value, path)


_QUANT_LAYER = record(
    {
        "weights": dict_of(_WEIGHT_FORM, min_len=1, max_len=64),
        "acts": dict_of(_act_form, min_len=1, max_len=64),
    }
)
_QUANT = record(
    {
        "nested": boolean,
        "layers": dict_of(_QUANT_LAYER, min_len=1, max_len=1 << 16),
        "configs": dict_of(dict_of(_CHOICE, max_len=1 << 16), min_len=1, max_len=4096),
    }
)


def check_record(header: dict) -> None:
    """Types, ranges and cross-field rules of the model/quant records and their tensors."""
    model, quant = header["model"], header["quant"]
    for key in ("arch", "layers", "bn_folds"):
        if key not in model:
            raise EqkFormatError(f"model record lacks {key!r}: not an eqnet deployment file")
    for key in ("layers", "configs"):
        if key not in quant:
            raise EqkFormatError(f"quant record lacks {key!r}: not an eqnet deployment file")
    _MODEL(model, "model")
    _QUANT(quant, "quant")
    if quant["nested"] != header["nested"]:
        raise fail("quant.nested", "differs from the file's 'nested'")
    if set(quant["layers"]) != set(model["layers"]):
        raise fail("quant.layers", "does not name the same layers as model.layers")
    entries = {t["name"]: t for t in header["tensors"]}
    for lname, geometry in model["layers"].items():
        _check_geometry(lname, geometry)
        _check_layer_forms(header, lname, geometry, quant["layers"][lname], entries)
    for bn, fold in model["bn_folds"].items():
        layer = model["layers"].get(fold["layer"])
        if layer is None or layer["bn"] != bn:
            raise fail(f"model.bn_folds[{bn!r}].layer", "is not the layer whose 'bn' names it")
        if "w*" in fold["widths"] and len(fold["widths"]) != 1:
            raise fail(f"model.bn_folds[{bn!r}].widths", "'w*' must stand alone")
        if len(set(fold["widths"])) != len(fold["widths"]):
            raise fail(f"model.bn_folds[{bn!r}].widths", "lists a width twice")
        n = _out_features(layer)
        for key in fold["widths"]:
            for part in ("mul", "add"):
                _expect(entries, f"bn/{bn}/{key}/{part}", "float32", [n])
    for cname, cfg in quant["configs"].items():
        _check_config(cname, cfg, model, quant)
    _check_width_sections(header, entries)


def _check_width_sections(header: dict, entries: dict) -> None:
    """Every width has a stored config of its name (the export writes one per width), which
    finds its tensors in that width's sections (what a prefix load of the width reads)."""

    missing = sorted(set(header["widths"]) - set(header["quant"]["configs"]))
    if missing:
        raise fail("quant.configs", f"lacks the config of width {missing[0]!r}")
    for key, needed in header["widths"].items():
        if key not in header["quant"]["configs"]:
            continue
        try:
            names = required_tensors(header, config_from(header, None, key))
        except ValueError as exc:
            raise fail(f"quant.configs[{key!r}]", str(exc)) from None
        outside = [n for n in names if n not in entries or entries[n]["section"] not in needed]
        if outside:
            raise fail(f"header.widths[{key!r}]", f"does not hold {outside[0]!r} that the "
                                                  "config of that name needs")  # fmt: skip


def _out_features(geometry: dict) -> int:
    return geometry["out_channels"] if geometry["kind"] == "conv2d" else geometry["out_features"]


def _reduction(geometry: dict) -> int:
    if geometry["kind"] == "linear":
        return geometry["in_features"]
    kh, kw = geometry["kernel_size"]
    return geometry["in_channels"] // geometry["groups"] * kh * kw


def _check_geometry(lname: str, geometry: dict) -> None:
    path = f"model.layers[{lname!r}]"
    kind = geometry.get("kind") if isinstance(geometry, dict) else None
    if kind == "conv2d":
        _CONV(geometry, path)
        g = geometry["groups"]
        if geometry["in_channels"] % g or geometry["out_channels"] % g:
            raise fail(path + ".groups", f"{g} does not divide the channel counts")
    else:
        _LINEAR(geometry, path)


def _expect(entries: dict, name: str, dtype: str, shape: list[int]) -> None:
    entry = entries.get(name)
    if entry is None:
        raise EqkFormatError(f"tensor {name!r}: missing from the file")
    if entry["dtype"] != dtype or entry["shape"] != shape:
        raise EqkFormatError(
            f"tensor {name!r}: {entry['dtype']}{entry['shape']} in the file, the layer needs "
            f"{dtype}{shape}"
        )


def _check_layer_forms(header, lname, geometry, qlayer, entries) -> None:
    n, k = _out_features(geometry), _reduction(geometry)
    words = -(-k // 32)
    for wkey, form in qlayer["weights"].items():
        path = f"quant.layers[{lname!r}].weights[{wkey!r}]"
        if form["N"] != n or form["K"] != k:
            source = "in_features" if geometry["kind"] == "linear" else (
                "in_channels / groups * kernel_size")  # fmt: skip
            raise fail(path, f"N={form['N']}, K={form['K']}; the layer's geometry gives N={n}, "
                             f"K={k} ({source})")  # fmt: skip
        bits = form["stored_bits"]
        if form["nested"]:
            granularity = wkey.removeprefix("nested-")
            if not wkey.startswith("nested-") or granularity not in _GRANULARITIES:
                raise fail(path, "a nested form's key must be nested-<granularity>")
            if bits != header["top_bits"]:
                raise fail(path + ".stored_bits", f"{bits}, the file's top width is "
                                                  f"{header['top_bits']}")  # fmt: skip
        else:
            parts = wkey.split("-")
            if len(parts) != 3 or parts[0] != f"w{bits}" or parts[1] not in _GRANULARITIES:
                raise fail(path + ".stored_bits", f"{bits} does not match the form key {wkey!r}")
            granularity = parts[1]
        base = f"w/{lname}/{wkey}"
        for j in range(bits):
            _expect(entries, plane_tensor_name(base + "/planes", j), "int32", [n, words])
        if plane_tensor_name(base + "/planes", bits) in entries:
            raise fail(path + ".stored_bits", f"{bits}, but the file holds more planes")
        shape = _scale_shape(path, geometry, form, granularity, n, k)
        _expect(entries, base + "/scale", "float32", shape)
        if form["has_zero_point"]:
            _expect(entries, base + "/zero_point", "int32", shape if len(shape) == 2 else [n])
        if len(shape) == 2:
            zp = base + "/zero_point" if form["has_zero_point"] else None
            want = {"group_size": form["group_size"], "K": k, "scale": base + "/scale",
                    "zero_point": zp}  # fmt: skip
            if header.get("groups", {}).get(base + "/planes") != want:
                raise fail(path, f"the file's groups record of {base + '/planes'!r} is not {want}")
    for akey, form in qlayer["acts"].items():
        path = f"quant.layers[{lname!r}].acts[{akey!r}]"
        if (akey == FLOAT_ACT_KEY) != ("float" in form):
            raise fail(
                path, f"only the key {FLOAT_ACT_KEY!r} holds the float form {{'float': true}}"
            )
        if akey == FLOAT_ACT_KEY:
            continue  # float activation: no tensors
        match = _ACT_KEY.fullmatch(akey)
        if match is None:
            raise fail(path, f"key must be a<bits>-<symmetry> or {FLOAT_ACT_KEY!r}")
        bits = int(match.group(1))
        ranges = [(-(1 << (bits - 1)), (1 << (bits - 1)) - 1), (0, (1 << bits) - 1)]
        if (form["quant_min"], form["quant_max"]) not in ranges:
            raise fail(path, f"range [{form['quant_min']}, {form['quant_max']}] is not the "
                             f"signed or unsigned {bits}-bit range")  # fmt: skip
        _expect(entries, f"a/{lname}/{akey}/scale", "float32", [1])
        if form["has_zero_point"]:
            _expect(entries, f"a/{lname}/{akey}/zero_point", "float32", [1])
    if geometry["bn"] is None and geometry["has_bias"]:
        _expect(entries, f"bias/{lname}", "float32", [n])


def _scale_shape(path, geometry, form, granularity, n, k) -> list[int]:
    """The stored scale shape of one weight form: [N, K / g] per group, [N] per channel, [1]
    per tensor; a fixed layer's group form may hold per-channel scales (g not dividing K)."""
    g = form.get("group_size")
    if g is not None and granularity != "group":
        raise fail(path + ".group_size", f"only a group form has one, not {granularity!r}")
    if granularity == "group" and g is None:
        if geometry["fixed"] is None:
            raise fail(path, "an elastic layer's group form needs 'group_size'")
        return [n]  # a fixed layer whose K the space's group size does not divide
    if g is not None:
        if k % g:
            raise fail(path + ".group_size", f"{g} does not divide K={k}")
        return [n, k // g]
    return [n if granularity == "channel" else 1]


def _check_config(cname: str, cfg: dict, model: dict, quant: dict) -> None:
    path = f"quant.configs[{cname!r}]"
    if set(cfg) != set(model["layers"]):
        raise fail(path, "does not name every quantized layer exactly once")
    for lname, choice in cfg.items():
        ql = quant["layers"][lname]
        wkey = f"nested-{choice['w_granularity']}"
        if wkey in ql["weights"]:
            if choice["w_bits"] > ql["weights"][wkey]["stored_bits"]:
                raise fail(f"{path}[{lname!r}].w_bits", "exceeds the stored planes")
        elif (
            f"w{choice['w_bits']}-{choice['w_granularity']}-{choice['w_symmetry']}"
            not in (ql["weights"])
        ):
            raise fail(f"{path}[{lname!r}]", "names a weight form the file does not hold")
        akey = (
            FLOAT_ACT_KEY
            if choice["a_bits"] is None
            else f"a{choice['a_bits']}-{choice['a_symmetry']}"
        )
        if akey not in ql["acts"]:
            raise fail(f"{path}[{lname!r}]", "names an activation form the file does not hold")
        bn = model["layers"][lname]["bn"]
        if bn is not None:
            widths = model["bn_folds"].get(bn, {}).get("widths", [])
            if "w*" not in widths and f"w{choice['w_bits']}" not in widths:
                raise fail(f"{path}[{lname!r}]", f"needs BN {bn!r} at a width the file lacks")


# ------------------------------------------------------------------------------ the network


def _module_geometry(module: nn.Module) -> dict | None:
    try:
        return layer_geometry(module)
    except NotImplementedError:
        return None


def check_network(header: dict, net: nn.Module) -> None:
    """`net` (the float network the record declares, best built on the meta device) against
    the record: every quantized layer's geometry, bias and folded BN equal the module it
    replaces, and the file's float tensors are exactly the rest of its state."""
    model = header["model"]
    root = nn.Module()
    root.model = net
    replaced = []
    for lname, geometry in model["layers"].items():
        module = _submodule(root, lname)
        actual = _module_geometry(module)
        if actual is None:
            raise EqkFormatError(f"layer {lname!r}: the network has a {type(module).__name__} "
                                 "there, not a Conv2d or Linear")  # fmt: skip
        for key, value in actual.items():
            if geometry.get(key) != value:
                raise EqkFormatError(
                    f"layer {lname!r}: {key} is {geometry.get(key)!r} in the file, the network's "
                    f"module has {value!r}"
                )
        if geometry["has_bias"] != (getattr(module, "bias", None) is not None):
            raise EqkFormatError(f"layer {lname!r}: has_bias does not match the network's module")
        replaced.append(lname)
        bn = geometry["bn"]
        if bn is not None:
            bn_module = _submodule(root, bn)
            if not isinstance(bn_module, nn.BatchNorm1d | nn.BatchNorm2d | nn.SyncBatchNorm):
                raise EqkFormatError(f"layer {lname!r}: bn {bn!r} is not a BatchNorm module")
            if bn_module.num_features != _out_features(geometry):
                raise EqkFormatError(f"layer {lname!r}: bn {bn!r} has {bn_module.num_features} "
                                     "channels, the layer's output differs")  # fmt: skip
            replaced.append(bn)
    _check_float_state(header, root, replaced)


def _submodule(root: nn.Module, name: str) -> nn.Module:
    try:
        return root.get_submodule(name)
    except AttributeError:
        raise EqkFormatError(f"model record: module {name!r} is not in the network") from None


def _check_float_state(header: dict, root: nn.Module, replaced: list[str]) -> None:
    skip = tuple(r.removeprefix("model.") + "." for r in replaced)
    expected = {
        k: v for k, v in root.model.state_dict(keep_vars=True).items() if not k.startswith(skip)
    }
    stored = {
        t["name"].removeprefix("float/"): t
        for t in header["tensors"]
        if t["name"].startswith("float/")
    }
    for key in sorted(set(expected) | set(stored)):
        if key not in stored:
            raise EqkFormatError(f"tensor 'float/{key}': missing; the network has it")
        if key not in expected:
            raise EqkFormatError(f"tensor 'float/{key}': the network has no such parameter")
        want, got = expected[key], stored[key]
        if (
            list(want.shape) != got["shape"]
            or str(want.dtype).removeprefix("torch.") != got["dtype"]
        ):
            raise EqkFormatError(
                f"tensor 'float/{key}': {got['dtype']}{got['shape']} in the file, the network "
                f"has {str(want.dtype).removeprefix('torch.')}{list(want.shape)}"
            )


# ------------------------------------------------------------------------------ values


def check_values(tensors: dict[str, torch.Tensor]) -> None:
    """Scales finite, positive and normal; every other float tensor finite; zero points
    integer-valued. Raises EqkFormatError naming the first bad tensor."""
    for name, t in tensors.items():
        if not t.is_floating_point():
            if name.endswith("/zero_point") and t.numel() and int(t.long().abs().max()) > 2**16:
                raise EqkFormatError(f"tensor {name!r}: a zero point is out of range")
            continue
        if not bool(torch.isfinite(t).all()):
            raise EqkFormatError(f"tensor {name!r}: holds NaN or Inf")
        if name.endswith("/scale") and t.numel() and not bool((t >= _FLOAT_TINY).all()):
            raise EqkFormatError(f"tensor {name!r}: a scale is not a positive normal number")
        if name.endswith("/zero_point") and not bool((t == torch.round(t)).all()):
            raise EqkFormatError(f"tensor {name!r}: a zero point is not an integer")
        if name.endswith("/zero_point") and t.numel() and float(t.abs().max()) > 2.0**16:
            raise EqkFormatError(f"tensor {name!r}: a zero point is out of range")
