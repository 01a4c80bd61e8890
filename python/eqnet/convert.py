"""Model conversion (float model -> elastic quantization Supernet), calibration, BN re-estimation."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable

import torch
from torch import nn

from .nn.batchnorm import SwitchableBatchNorm2d
from .nn.layers import QConv2d, QLinear
from .nn.quantizer import CALIB_SAMPLES, ElasticQuantizer
from .nn.supernet import Supernet
from .space import ElasticSpace, LayerChoice

_QUANTIZABLE = (nn.Conv2d, nn.Linear)
# first and last layers: fixed 8-bit, float, or elastic like the rest (see `convert`)
KEEP_FIRST_LAST = ("8bit", "fp", "elastic")


def convert(
    model: nn.Module,
    space: ElasticSpace,
    keep_first_last: str = "8bit",
    per_bit_bn: bool = False,
    example_input: torch.Tensor | None = None,
) -> Supernet:
    """Deep-copy `model` and swap every nn.Conv2d / nn.Linear for QConv2d / QLinear.

    keep_first_last: "8bit" fixes the first and last quantized layers (in execution order) at
    LayerChoice(fixed_bits, fixed_bits, "channel", "sym", "asym" if allowed else the space's
    first activation symmetry); "fp" leaves them float; "elastic" treats them like the others.
    per_bit_bn: replace each BatchNorm2d fed directly by an elastic layer with a
    SwitchableBatchNorm2d over space.w_bits.
    example_input: one input batch, used for a hooked forward that finds the execution order
    and the dataflow; needed unless keep_first_last="elastic" and per_bit_bn=False. Models
    from `eqnet.models.get` carry a default (`eqnet_input_size`).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(space, ElasticSpace):
        raise ValueError(f"space must be an ElasticSpace, got {type(space).__name__}")
    if keep_first_last not in KEEP_FIRST_LAST:
        raise ValueError(
            f"keep_first_last={keep_first_last!r}: accepted values are {', '.join(KEEP_FIRST_LAST)}"
        )
    if not isinstance(per_bit_bn, bool):
        raise ValueError(f"per_bit_bn={per_bit_bn!r}: accepted values are True, False")
    if isinstance(model, Supernet):
        raise ValueError("model is already a Supernet")
    model = copy.deepcopy(model)
    layers = [m for m in model.modules() if isinstance(m, _QUANTIZABLE)]  # unique, module order
    if not layers:
        raise ValueError("model has no nn.Conv2d or nn.Linear to convert")

    order: list[nn.Module] = layers
    bn_source: dict[int, nn.Module] = {}
    if keep_first_last != "elastic" or per_bit_bn:
        example_input = _example_input(model, example_input)
        order, bn_source = _trace(model, example_input)
        if not order:
            raise ValueError("the example forward called no nn.Conv2d / nn.Linear")

    first, last = order[0], order[-1]
    fixed = LayerChoice(
        space.fixed_bits,
        space.fixed_bits,
        "channel",
        "sym",
        "asym" if "asym" in space.a_symmetries else space.a_symmetries[0],
    )
    replacement: dict[int, nn.Module] = {}
    for layer in layers:
        is_edge = layer is first or layer is last
        if is_edge and keep_first_last == "fp":
            continue
        choice = fixed if is_edge and keep_first_last == "8bit" else None
        qcls = QConv2d if isinstance(layer, nn.Conv2d) else QLinear
        replacement[id(layer)] = qcls.from_float(layer, space, fixed_choice=choice)

    if per_bit_bn:
        for bn_id, src in bn_source.items():
            q = replacement.get(id(src))
            if q is None or q.fixed_choice is not None:
                continue  # a float or fixed-width layer feeds it: nothing to switch
            bn = _module_by_id(model, bn_id)
            if type(bn) is not nn.BatchNorm2d:
                continue
            sw = SwitchableBatchNorm2d.from_bn(bn, space.w_bits)
            replacement[bn_id] = sw
            q.switched_bns.append(sw)

    _swap(model, replacement)
    names = {id(m): n for n, m in model.named_modules()}
    edge_names = (
        names.get(id(replacement.get(id(first), first))),
        names.get(id(replacement.get(id(last), last))),
    )
    return Supernet(
        model, space, keep_first_last=keep_first_last, per_bit_bn=per_bit_bn, first_last=edge_names
    )


def _example_input(model, example_input):
    if example_input is not None:
        if not isinstance(example_input, torch.Tensor):
            raise ValueError(f"example_input must be a tensor, got {type(example_input).__name__}")
        return example_input
    size = getattr(model, "eqnet_input_size", None)
    if size is None:
        raise ValueError(
            "example_input is required to find the first/last layers in execution order and the "
            "BN inputs (keep_first_last='8bit'/'fp' or per_bit_bn=True): pass one input batch, "
            "e.g. example_input=torch.randn(1, 3, 32, 32)"
        )
    p = next(itertools.chain(model.parameters(), model.buffers()), None)
    x = torch.randn(tuple(size), generator=torch.Generator().manual_seed(0))
    return x.to(p.device) if p is not None else x


@torch.no_grad()
def _trace(model: nn.Module, x: torch.Tensor):
    """Hooked eval-mode forward: quantizable layers in first-call order, and for every
    BatchNorm2d the quantizable layer whose output it receives directly (dataflow, not names).
    """
    order: list[nn.Module] = []
    seen: set[int] = set()
    produced: dict[int, nn.Module] = {}  # id(output tensor) -> layer
    keep_alive: list[torch.Tensor] = []  # ids stay unique while the outputs live
    bn_source: dict[int, nn.Module] = {}

    def after_layer(module, args, out):
        if id(module) not in seen:
            seen.add(id(module))
            order.append(module)
        if isinstance(out, torch.Tensor):
            produced[id(out)] = module
            keep_alive.append(out)

    def before_bn(module, args):
        if args and isinstance(args[0], torch.Tensor) and id(module) not in bn_source:
            src = produced.get(id(args[0]))
            if src is not None:
                bn_source[id(module)] = src

    handles = []
    for m in model.modules():
        if isinstance(m, _QUANTIZABLE):
            handles.append(m.register_forward_hook(after_layer))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            handles.append(m.register_forward_pre_hook(before_bn))
    was_training = {id(m): m.training for m in model.modules()}
    model.eval()
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
        for m in model.modules():
            m.training = was_training[id(m)]
    return order, bn_source


def _module_by_id(model, target_id):
    for m in model.modules():
        if id(m) == target_id:
            return m
    raise KeyError(target_id)


def _swap(model: nn.Module, replacement: dict[int, nn.Module]) -> None:
    """Replace every reference (a shared module used in several places included)."""
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacement:
                parent._modules[name] = replacement[id(child)]


# ------------------------------------------------------------------------------------------------
# Calibration


def _quantized_layers(model: nn.Module):
    return [m for m in _unique_modules(model) if getattr(m, "is_elastic_layer", False)]


def _unique_modules(model):
    seen = set()
    for m in model.modules():
        if id(m) not in seen:
            seen.add(id(m))
            yield m


class _ActivationObserver:
    """Keeps, per layer, a bounded random subsample of its float input values (for the
    clipping search and the LSQ mean) and the per-sample element count."""

    def __init__(self, samples: int, seed: int = 0):
        self.samples = samples
        self.generator = torch.Generator().manual_seed(seed)
        self.values: dict[int, list[torch.Tensor]] = {}
        self.negative: dict[int, bool] = {}

    def __call__(self, layer, x):
        flat = x.detach().reshape(-1)
        self.negative[id(layer)] = self.negative.get(id(layer), False) or bool((flat < 0).any())
        if flat.numel() > self.samples:
            idx = torch.randint(flat.numel(), (self.samples,), generator=self.generator)
            flat = flat[idx.to(flat.device)]
        self.values.setdefault(id(layer), []).append(flat.float().cpu())

    def data(self, layer) -> torch.Tensor | None:
        chunks = self.values.get(id(layer))
        if not chunks:
            return None
        x = torch.cat(chunks)
        if x.numel() > self.samples:
            idx = torch.randint(x.numel(), (self.samples,), generator=self.generator)
            x = x[idx]
        return x


def _batches(loader: Iterable, batches: int):
    if not isinstance(batches, int) or isinstance(batches, bool) or batches < 1:
        raise ValueError(f"batches={batches!r}: must be a positive int")
    for i, item in enumerate(loader):
        if i >= batches:
            break
        yield item[0] if isinstance(item, (tuple, list)) else item


def _device_of(model):
    p = next(itertools.chain(model.parameters(), model.buffers()), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def calibrate(model: nn.Module, loader: Iterable, batches: int = 4, method: str = "mse") -> None:
    """Initialize every form of every quantizer: weight quantizers from the weights,
    activation quantizers from the float inputs each layer sees on `batches` batches of
    `loader`.

    The model runs in the mode it is in, so the ranges match how it will be used: in train
    mode BN normalizes with batch statistics (as during QAT), in eval mode with its running
    statistics. BN buffers are restored afterwards, so calibration has no side effect on them.
    """
    layers = _quantized_layers(model)
    if not layers:
        raise ValueError("model has no quantized layers: convert it with eqnet.convert first")
    observer = _ActivationObserver(CALIB_SAMPLES)
    bn_buffers = {
        id(m): {k: v.clone() for k, v in m.named_buffers(recurse=False)}
        for m in _unique_modules(model)
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }
    device = _device_of(model)
    try:
        for layer in layers:
            layer.observer = observer
        n = 0
        for x in _batches(loader, batches):
            model(x.to(device))
            n += 1
        if n == 0:
            raise ValueError("loader yielded no batches")
    finally:
        for layer in layers:
            layer.observer = None
        for m in _unique_modules(model):
            for k, v in bn_buffers.get(id(m), {}).items():
                getattr(m, k).copy_(v)
    for layer in layers:
        layer.weight_quantizer.calibrate(layer.weight, method=method)
        data = observer.data(layer)
        if data is None:
            continue  # the layer did not run on this data; its activation forms keep defaults
        aq: ElasticQuantizer = layer.act_quantizer
        # Signedness follows all the data seen, not just the subsample.
        aq.calibrate(
            data.to(aq.signed_range.device), method=method, signed=observer.negative[id(layer)]
        )


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable, batches: int = 16) -> None:
    """Reset and re-estimate the BN running statistics of the active subnet.

    Only the BNs the active subnet uses are touched (for SwitchableBatchNorm2d, the active
    width's). Statistics are the cumulative average over the batches (momentum=None); the
    model runs in eval mode with only those BNs in train mode (so dropout and the like stay
    off), and every module's mode and momentum are restored afterwards.
    """
    bns = []
    skip = set()
    for m in _unique_modules(model):
        if isinstance(m, SwitchableBatchNorm2d):
            skip.update(id(b) for b in m.bns.values())
            bns.append(m.active_bn)
    for m in _unique_modules(model):
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in skip:
            if m.track_running_stats:
                bns.append(m)
    if not bns:
        return
    modes = {id(m): m.training for m in _unique_modules(model)}
    momenta = {id(b): b.momentum for b in bns}
    device = _device_of(model)
    model.eval()
    try:
        for b in bns:
            b.reset_running_stats()
            b.momentum = None
            b.train()
        n = 0
        for x in _batches(loader, batches):
            model(x.to(device))
            n += 1
        if n == 0:
            raise ValueError("loader yielded no batches")
    finally:
        for b in bns:
            b.momentum = momenta[id(b)]
        for m in _unique_modules(model):
            m.training = modes[id(m)]
