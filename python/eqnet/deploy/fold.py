"""BatchNorm folding for deployment.

The weight codes of a nested supernet are shared by every width (they are the stored bit
planes), so BatchNorm cannot be folded into the weights: with per-bit BN each width has its own
statistics. Instead an eval-mode BN after a quantized conv becomes an output-side per-channel
affine of that conv, `y = a * conv(x) + b`, with

    a = gamma / sqrt(var + eps),   b = beta - mean * a   (+ a * conv_bias when the conv has one)

computed in float64 and rounded once to float32. The runtime applies `a` through the op's
per-channel output scale when every `a` is positive (one fused epilogue), else as a separate
multiply-add.

Which BN follows which conv is found with torch.fx on the converted network, treating quantized
layers and BN modules as leaves; only a BN whose input is a quantized layer's output used by
nothing else is folded (anything else stays a float module in the deployed network).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import fx, nn


def is_quantized_layer(module: nn.Module) -> bool:
    return bool(getattr(module, "is_elastic_layer", False))


def is_switchable_bn(module: nn.Module) -> bool:
    """SwitchableBatchNorm2d (one BN per weight width, `.bns[str(bits)]`), found by protocol."""
    return isinstance(getattr(module, "bns", None), nn.ModuleDict)


def _is_bn(module: nn.Module) -> bool:
    return isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d) or is_switchable_bn(module)


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_quantized_layer(m) or _is_bn(m) or super().is_leaf_module(m, qualname)


def find_foldable_bn(model: nn.Module) -> OrderedDict[str, str]:
    """bn module name -> name of the quantized layer feeding it, for every foldable pair.

    Raises NotImplementedError if the network cannot be traced symbolically (its BN layers
    could then not be matched to their convs)."""
    try:
        graph = _LeafTracer().trace(model)
    except Exception as exc:  # fx raises many types for untraceable Python control flow
        raise NotImplementedError(
            f"cannot trace {type(model).__name__} with torch.fx to match BatchNorm layers to "
            f"their convs ({type(exc).__name__}: {exc})"
        ) from exc
    modules = dict(model.named_modules())
    pairs: OrderedDict[str, str] = OrderedDict()
    for node in graph.nodes:
        if node.op != "call_module" or not _is_bn(modules[node.target]):
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node) or src.op != "call_module":
            continue
        if not is_quantized_layer(modules[src.target]) or len(src.users) != 1:
            continue
        pairs[node.target] = src.target
    return pairs


def bn_for_width(bn: nn.Module, w_bits: int) -> nn.Module:
    """The BatchNorm a width uses: the per-bit one of a SwitchableBatchNorm2d, else `bn`."""
    if is_switchable_bn(bn):
        key = str(w_bits)
        if key not in bn.bns:
            raise ValueError(
                f"w_bits={w_bits}: the switchable BN has widths {sorted(bn.bns.keys(), key=int)}"
            )
        return bn.bns[key]
    return bn


def bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) float32 per channel with eval-mode `bn(x) == a * x + b` (up to fp32 rounding)."""
    if not isinstance(bn, nn.BatchNorm2d | nn.BatchNorm1d):
        raise ValueError(f"bn: expected an nn.BatchNorm1d/2d, got {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise NotImplementedError(
            "folding a BatchNorm without running statistics (track_running_stats=False) is not "
            "implemented: its eval output depends on the batch"
        )
    mean = bn.running_mean.detach().double()
    var = bn.running_var.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    a = gamma / torch.sqrt(var + bn.eps)
    b = beta - mean * a
    return a.float(), b.float()


def fold_affine(
    a: torch.Tensor, b: torch.Tensor, conv_bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mul, add) with `a * (conv + conv_bias) + b == mul * conv + add` (float64, then fp32)."""
    add = b.double()
    if conv_bias is not None:
        add = add + a.double() * conv_bias.detach().double()
    return a.float().clone(), add.float()
