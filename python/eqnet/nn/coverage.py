"""Which quantized layers a forward really runs through their quantized path.

A converted layer can be bypassed silently: a parent may read its `.weight` and call a
functional op itself, or take a fused fast path in eval mode without grad. Such a layer stays
float while the subnet config still lists a width for it. `check_quantized_paths` runs the
model once in each of the four modes (train/eval x grad/no grad) and raises a ValueError
naming every quantized layer that did not run in some mode. The model's state is untouched:
modes, buffers and the random generators are restored. BatchNorm layers run in eval mode
throughout (their mode selects no path, and batch statistics would reject a batch of one).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

MODES = (("train", True), ("train", False), ("eval", True), ("eval", False))


@dataclass(frozen=True)
class Call:
    """The positional and keyword arguments of one captured call."""

    args: tuple
    kwargs: dict


def call_model(model, inputs):
    """model(inputs): a tensor is one positional argument, a tuple/list the positional
    arguments, a dict the keyword arguments (as torch.onnx.export takes example inputs)."""
    if isinstance(inputs, Call):
        return model(*inputs.args, **inputs.kwargs)
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    raise ValueError(
        f"example input must be a tensor, a tuple/list of positional arguments or a dict of "
        f"keyword arguments, got {type(inputs).__name__}"
    )


def to_device(inputs, device):
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, Call):
        return Call(to_device(inputs.args, device), to_device(inputs.kwargs, device))
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(to_device(x, device) for x in inputs)
    if isinstance(inputs, Mapping):
        return {k: to_device(v, device) for k, v in inputs.items()}
    return inputs


def quantized_layer_names(model: nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, m in model.named_modules():
        if getattr(m, "is_elastic_layer", False) and id(m) not in names:
            names[id(m)] = name
    return names


def check_quantized_paths(model: nn.Module, inputs, forward=None) -> None:
    """Raise ValueError naming each quantized layer of `model` that a forward on `inputs`
    does not run through its quantized path, with the modes where it did not run.
    forward: what to call instead of model (model.forward skips its hooks)."""
    names = quantized_layer_names(model)
    layers = [m for m in model.modules() if id(m) in names]
    ran = {mode: set() for mode in MODES}
    modes = {id(m): m.training for m in model.modules()}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted(
        {
            p.device.index or 0
            for p in itertools.chain(model.parameters(), model.buffers())
            if p.device.type == "cuda"
        }
    )
    try:
        with torch.random.fork_rng(devices=devices):
            for mode in MODES:
                model.train(mode[0] == "train")
                for m in model.modules():
                    # BN's mode changes no path, and batch statistics need > 1 value per
                    # channel (a batch-1 example input would fail in train mode).
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
                for layer in layers:
                    layer.path_recorder = ran[mode]
                try:
                    with torch.set_grad_enabled(mode[1]):
                        call_model(forward or model, inputs)
                except Exception as e:
                    raise ValueError(
                        f"the example forward failed in {_mode_name(mode)} mode "
                        f"({type(e).__name__}: {e}); every mode must run to check that each "
                        "quantized layer is used"
                    ) from e
    finally:
        for layer in layers:
            layer.path_recorder = None
        for m in model.modules():
            m.training = modes[id(m)]
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    missing = []
    for m in layers:
        absent = [_mode_name(mode) for mode in MODES if id(m) not in ran[mode]]
        if absent:
            missing.append((names[id(m)], absent))
    if missing:
        raise ValueError(format_missing(missing))


def format_missing(missing) -> str:
    lines = []
    for name, absent in missing:
        if len(absent) == len(MODES):
            why = "never called (its parent may read its .weight and call a functional op)"
        else:
            why = f"not run in {', '.join(absent)} (a fused fast path of its parent?)"
        lines.append(f"{name!r}: {why}")
    return (
        f"{len(missing)} quantized layer(s) would silently stay float: "
        + "; ".join(lines)
        + ". Convert their parent so the layer is called, or leave them float with "
        "convert(..., exclude=[patterns])"
    )


def _mode_name(mode) -> str:
    return f"{mode[0]}/{'grad' if mode[1] else 'no_grad'}"
