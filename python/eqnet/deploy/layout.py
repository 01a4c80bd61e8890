"""The layout of a deployment .eqk file, shared by the writer (export.py) and the reader
(loader.py): the model record, the tensor names of weight, activation and BN forms, and which
tensors and sections a configuration needs. The tensor naming is described in export.py."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from eqkernels.format import EqkFormatError, plane_tensor_name

from .. import models
from ..space import LayerChoice, SubnetConfig
from .fold import is_switchable_bn

RECORD_VERSION = 1


# ------------------------------------------------------------------------------- model record


def model_record(supernet, arch: str | None, arch_kwargs: Mapping | None) -> dict | None:
    """The registered architecture name + kwargs eqnet.models.get rebuilds the float network
    from, or None for a user's own model (then eqnet.load needs `model=`)."""
    if arch is None:
        rec = getattr(supernet, "arch", None) or getattr(supernet.model, "eqnet_arch", None)
        if isinstance(rec, Mapping):
            arch, arch_kwargs = rec.get("name"), rec.get("kwargs", arch_kwargs)
        elif isinstance(rec, str):
            arch = rec
            arch_kwargs = arch_kwargs or getattr(supernet.model, "eqnet_arch_kwargs", None)
    if arch is None:
        return None
    if not models.is_registered(arch):
        raise ValueError(
            f"arch={arch!r}: a registered model name as given to eqnet.models.get "
            "(digits_cnn, resnet20, resnet56, llama-tiny, torchvision:<name>); a user's own "
            "model needs no arch (load it with eqnet.load(path, model=...))"
        )
    return {"name": arch, "kwargs": dict(arch_kwargs or {})}


def build_float_model(record: Mapping) -> nn.Module:
    if not models.is_registered(record["name"]):
        # Never import a module a file names: only registered architectures are rebuilt.
        raise ValueError(f"{record['name']!r} is not a registered architecture")
    return models.get(record["name"], **record["kwargs"])


def float_tensors(net: nn.Module, skip) -> dict[str, torch.Tensor]:
    """state_dict entries (name -> tensor) of every module of `net` the integer runtime keeps
    as a float module: all but the modules named in `skip` and their children."""
    out = {}
    for mname, module in net.named_modules():
        if any(mname == s or mname.startswith(s + ".") for s in skip):
            continue
        own = list(module._parameters.items()) + [
            (n, b)
            for n, b in module._buffers.items()
            if n not in module._non_persistent_buffers_set
        ]
        for tname, tensor in own:
            if tensor is not None:
                out[f"{mname}.{tname}" if mname else tname] = tensor
    return out


def layer_geometry(module: nn.Module) -> dict:
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            raise NotImplementedError(
                f"padding_mode={module.padding_mode!r}: the integer conv pads with zeros only"
            )
        if isinstance(module.padding, str):
            raise NotImplementedError(
                f"padding={module.padding!r}: give explicit padding for deployment"
            )
        return {
            "kind": "conv2d",
            "in_channels": module.in_channels,
            "out_channels": module.out_channels,
            "kernel_size": list(module.kernel_size),
            "stride": list(module.stride),
            "padding": list(module.padding),
            "dilation": list(module.dilation),
            "groups": module.groups,
        }
    if isinstance(module, nn.Linear):
        return {
            "kind": "linear",
            "in_features": module.in_features,
            "out_features": module.out_features,
        }
    raise NotImplementedError(
        f"deploying a quantized {type(module).__name__} is not implemented (Conv2d, Linear only)"
    )


# ------------------------------------------------------------------------------- naming


def weight_form_key(params, choice: LayerChoice) -> str:
    if params.nested:
        return f"nested-{choice.w_granularity}"
    return f"w{choice.w_bits}-{choice.w_granularity}-{choice.w_symmetry}"


FLOAT_ACT_KEY = "float"  # the activation form of a_bits=None: no quantizer, no tensors


def act_form_key(choice: LayerChoice) -> str:
    if choice.a_bits is None:
        return FLOAT_ACT_KEY
    return f"a{choice.a_bits}-{choice.a_symmetry}"


def bn_width_key(bn: nn.Module, w_bits: int) -> str:
    return f"w{w_bits}" if is_switchable_bn(bn) else "w*"


# ------------------------------------------------------------------------------- reading


def deployment_records(header: dict) -> tuple[dict, dict]:
    """The header's model and quant records, checked to be an eqnet deployment's."""
    model, quant = header.get("model", {}), header.get("quant", {})
    for key in ("layers", "bn_folds"):
        if key not in model:
            raise EqkFormatError(f"model record lacks {key!r}: not an eqnet deployment file")
    if "layers" not in quant or "configs" not in quant:
        raise EqkFormatError("quant record lacks 'layers'/'configs': not an eqnet deployment file")
    return model, quant


def weight_key(quant_layer: dict, choice: LayerChoice) -> str:
    nested = f"nested-{choice.w_granularity}"
    if nested in quant_layer["weights"]:
        return nested
    return f"w{choice.w_bits}-{choice.w_granularity}-{choice.w_symmetry}"


def bn_key(model_meta: dict, bn_name: str, w_bits: int) -> str:
    widths = model_meta["bn_folds"][bn_name]["widths"]
    return "w*" if "w*" in widths else f"w{w_bits}"


def required_tensors(header: dict, config: SubnetConfig) -> list[str]:
    """Names of every tensor the integer model of `config` reads."""
    model, quant = deployment_records(header)
    names = [t["name"] for t in header["tensors"] if t["name"].startswith("float/")]
    for lname, choice in config:
        if lname not in quant["layers"]:
            raise ValueError(f"config: layer {lname!r} is not in the file")
        ql, geometry = quant["layers"][lname], model["layers"][lname]
        wkey = weight_key(ql, choice)
        if wkey not in ql["weights"]:
            raise ValueError(
                f"config: layer {lname!r} weight form {wkey} is not in the file; stored forms "
                f"are {sorted(ql['weights'])}"
            )
        wform = ql["weights"][wkey]
        n_planes = choice.w_bits if wform["nested"] else wform["stored_bits"]
        base = f"w/{lname}/{wkey}"
        names += [plane_tensor_name(base + "/planes", j) for j in range(n_planes)]
        names.append(base + "/scale")
        if wform["has_zero_point"]:
            names.append(base + "/zero_point")
        akey = act_form_key(choice)
        if akey not in ql["acts"]:
            raise ValueError(
                f"config: layer {lname!r} activation form {akey} is not in the file; stored "
                f"forms are {sorted(ql['acts'])}"
            )
        if akey != FLOAT_ACT_KEY:
            names.append(f"a/{lname}/{akey}/scale")
        if ql["acts"][akey].get("has_zero_point"):
            names.append(f"a/{lname}/{akey}/zero_point")
        bn = geometry.get("bn")
        if bn is not None:
            bkey = bn_key(model, bn, choice.w_bits)
            names += [f"bn/{bn}/{bkey}/mul", f"bn/{bn}/{bkey}/add"]
        elif geometry["has_bias"]:
            names.append(f"bias/{lname}")
    return names


def sections_needed(header: dict, config: SubnetConfig) -> list[int]:
    where = {t["name"]: t["section"] for t in header["tensors"]}
    missing = [n for n in required_tensors(header, config) if n not in where]
    if missing:
        raise ValueError(
            f"config: the file does not hold {missing[0]!r} (and {len(missing) - 1} more)"
        )
    return sorted({where[n] for n in required_tensors(header, config)})


def config_from(header: dict, bits: int | None, config) -> SubnetConfig:
    """The SubnetConfig selected by `bits` (a stored uniform width) or `config` (a SubnetConfig,
    its JSON, or the name of a config stored in the file)."""
    _, quant = deployment_records(header)
    stored = quant["configs"]
    if bits is not None and config is not None:
        raise ValueError("give at most one of bits=, config=")
    if bits is not None:
        if str(bits) not in stored:
            widths = sorted(int(k) for k in stored if k.isdecimal())
            raise ValueError(f"bits={bits!r}: accepted values are the stored widths {widths}")
        return SubnetConfig(stored[str(bits)].items())
    if isinstance(config, SubnetConfig):
        return config
    if isinstance(config, str):
        if config in stored:
            return SubnetConfig(stored[config].items())
        if config.lstrip().startswith("{"):
            return SubnetConfig.from_json(config)
        raise ValueError(
            f"config={config!r}: accepted names are {sorted(stored)} or a SubnetConfig"
        )
    raise ValueError("config: expected a SubnetConfig, its JSON, or a stored config name")
