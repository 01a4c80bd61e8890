"""The vertical-layering paper's step-size initialization (section 6.1, "Initialization").

Weights: one step per nested weight quantizer at the top width, from the float weights,

    s_w = 2 * mean(|w|) / sqrt(2^top - 1)

(the paper trains top = 4: s_w = 2 mean|w| / sqrt(2^4 - 1), LSQ's initialization at the stored
width; the mean runs over the whole tensor, or over each output channel for a per-channel
step). Activations: every width i of a layer's activation quantizer from the layer's input on
the first training batch,

    s_a^i = max(|a|) / (2^(i+1) - 1),

with zero points at 0. The paper pairs this with per-tensor weight steps and float first and
last layers; the layered recipe's `vl_paper_init` option sets all three.
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def vl_weight_steps(supernet) -> int:
    """Set every nested weight quantizer's top-width steps from its layer's float weight;
    returns the number of layers set. Raises ValueError for a non-nested space."""
    count = 0
    for name, layer in supernet.quantized_layers().items():
        if layer.fixed_choice is not None:
            continue
        wq = layer.weight_quantizer
        if not wq.nested:
            raise ValueError(
                f"layer {name!r}: vl_paper_init initializes nested (vertical-layered) weights; "
                "this space is not nested"
            )
        w = layer.weight.detach().abs().double()
        denom = math.sqrt(2.0**wq.top_bits - 1.0)
        for granularity in wq.granularities:
            scale, _ = wq.raw_parameters(wq.top_bits, granularity, "sym")
            if granularity == "channel":
                mean = w.reshape(w.shape[0], -1).mean(dim=1)
            elif granularity == "group":
                mean = w.reshape(-1, wq.group_size).mean(dim=1).reshape(scale.shape)
            else:
                mean = w.mean().reshape(1)
            scale.copy_((2.0 * mean / denom).to(scale.dtype))
        count += 1
    return count


@torch.no_grad()
def vl_activation_steps(supernet, x: torch.Tensor) -> int:
    """Run `x` (the first training batch) through the active subnet and set every width i of
    each elastic layer's activation quantizer to max|a| / (2^(i+1) - 1), zero point 0, where
    a is the layer's float input; returns the number of layers set."""
    seen: dict[str, float] = {}
    hooks = []
    layers = {n: m for n, m in supernet.quantized_layers().items() if m.fixed_choice is None}
    for name, layer in layers.items():

        def hook(module, args, name=name):
            value = float(args[0].detach().abs().max())
            seen[name] = max(seen.get(name, 0.0), value)

        hooks.append(layer.register_forward_pre_hook(hook))
    try:
        supernet(x)
    finally:
        for h in hooks:
            h.remove()
    for name, peak in seen.items():
        if not math.isfinite(peak):
            raise ValueError(f"layer {name!r}: the first batch's input holds {peak}")
        aq = layers[name].act_quantizer
        if aq is None:
            continue  # weight-only layer: float activations
        for bits in aq.bits:
            for symmetry in aq.symmetries:
                scale, zero_point = aq.raw_parameters(bits, "tensor", symmetry)
                # an all-zero input keeps a tiny positive step instead of 0
                scale.fill_(max(peak, 1e-8) / (2.0 ** (bits + 1) - 1.0))
                if zero_point is not None:
                    zero_point.zero_()
    return len(seen)
