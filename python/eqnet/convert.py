"""Model conversion: a float model -> an elastic quantization Supernet.

Calibration and BN re-estimation live in eqnet.nn.calibration (re-exported here).
"""

from __future__ import annotations

import copy
import fnmatch
import itertools
from collections.abc import Mapping

import torch
from torch import nn

from .nn.attention import ProjectedAttention, disable_fused_paths
from .nn.batchnorm import SwitchableBatchNorm2d
from .nn.calibration import calibrate, recalibrate_bn
from .nn.coverage import call_model, check_quantized_paths
from .nn.layers import QConv2d, QLinear
from .nn.supernet import Supernet
from .space import ElasticSpace, LayerChoice, group_size_error

__all__ = ["calibrate", "convert", "make_projections_modules", "recalibrate_bn"]

_QUANTIZABLE = (nn.Conv2d, nn.Linear)
# first and last layers: fixed at 8 bits (widths only, or "8bit-fixed-form" the whole choice),
# float, or elastic like the rest (see `convert`)
KEEP_FIRST_LAST = ("8bit", "8bit-fixed-form", "fp", "elastic")


def convert(
    model: nn.Module,
    space: ElasticSpace,
    keep_first_last: str = "8bit",
    per_bit_bn: bool = False,
    example_input=None,
    exclude=(),
) -> Supernet:
    """Deep-copy `model`, swap every nn.Conv2d / nn.Linear for QConv2d / QLinear, and return
    the copy wrapped in a `Supernet`.

    The returned Supernet is a wrapper: it calls the converted model, which is
    `supernet.model` (the user's module tree with quantized layers in place; layer names in
    configs are relative to the Supernet, "model.<name>"). The original `model` is untouched.

    Projections that bypass nn.Linear are made modules first, sharing their Parameters:
    nn.MultiheadAttention becomes eqnet.nn.ProjectedAttention (packed `in_proj` or
    `q_proj`/`k_proj`/`v_proj`, and `out_proj`), transformers' Conv1D an nn.Linear (weight
    transposed), torchvision's Swin window attention calls its `qkv`/`proj`. Weights tied
    between modules (GPT-2's lm_head and wte) stay tied.

    keep_first_last: "8bit" fixes the widths of the first and last quantized layers (in
    execution order) at W{fixed_bits}A{fixed_bits} (float activations, a_bits=None, in a
    weight-only space whose a_bits is (None,)); their forms stay elastic over the space's
    (they start in `space.preferred_forms()`); "fp" leaves them float; "elastic" treats them
    like the others; "8bit-fixed-form" fixes their whole choice, form included (one form each).
    With "group" among `space.w_granularities`, `space.group_size` must divide the input
    dimension K of every elastic layer (in_features, or in_channels/groups*kh*kw), else
    ValueError naming the layer; a fixed-width layer whose K it does not divide keeps
    per-channel scales for its "group" form.
    per_bit_bn: replace each BatchNorm2d fed directly by an elastic layer with a
    SwitchableBatchNorm2d over space.w_bits.
    example_input: one input batch: a tensor, a tuple of positional arguments or a dict of
    keyword arguments. Used for a hooked forward that finds the execution order and the
    dataflow (needed unless keep_first_last="elastic" and per_bit_bn=False; models from
    `eqnet.models.get` carry a default: `eqnet_example_input()`, else a random tensor of
    `eqnet_input_size`), and to check that every converted
    layer runs its quantized path in train and eval mode, with and without grad: a layer that
    does not (its parent reads its .weight, a fused fast path skips it) raises ValueError
    naming it. Without an example input, `calibrate` runs this check on its first batch.
    exclude: fnmatch patterns of module names (relative to `model`, e.g. "heads.*" or
    "encoder.layers.0.self_attn"); matching layers, and layers inside matching modules, stay
    float and are left out of the check. Each pattern must match something.
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
    patterns = _patterns(exclude)
    model = copy.deepcopy(model)
    make_projections_modules(model)
    layers = _convertible(model, patterns)  # unique, module order
    if not layers:
        raise ValueError("model has no nn.Conv2d or nn.Linear to convert")

    order: list[nn.Module] = layers
    bn_source: dict[int, nn.Module] = {}
    if example_input is not None or keep_first_last != "elastic" or per_bit_bn:
        example_input = _example_input(model, example_input)
    if keep_first_last != "elastic" or per_bit_bn:
        order, bn_source = _trace(model, example_input)
        converted = {id(m) for m in layers}
        order = [m for m in order if id(m) in converted]
        if not order:
            raise ValueError("the example forward called no nn.Conv2d / nn.Linear")

    first, last = order[0], order[-1]
    fixed = LayerChoice(
        space.fixed_bits,
        # A weight-only space keeps float activations on its fixed layers too (W8, float A).
        None if space.weight_only else space.fixed_bits,
        *space.preferred_forms(),
    )
    replacement: dict[int, nn.Module] = {}
    names = {id(m): n for n, m in model.named_modules()}
    for layer in layers:
        is_edge = layer is first or layer is last
        if is_edge and keep_first_last == "fp":
            continue
        choice = fixed if is_edge and keep_first_last.startswith("8bit") else None
        if choice is None and "group" in space.w_granularities:
            reduction = layer.weight[0].numel()
            if reduction % space.group_size:
                raise ValueError(group_size_error(names[id(layer)], reduction, space.group_size))
        qcls = QConv2d if isinstance(layer, nn.Conv2d) else QLinear
        replacement[id(layer)] = qcls.from_float(
            layer, space, fixed_choice=choice, fixed_form=keep_first_last == "8bit-fixed-form"
        )

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
    supernet = Supernet(
        model, space, keep_first_last=keep_first_last, per_bit_bn=per_bit_bn, first_last=edge_names
    )
    if example_input is not None:
        check_quantized_paths(supernet, example_input)
    supernet.paths_checked = example_input is not None
    return supernet


def _patterns(exclude) -> tuple[str, ...]:
    if isinstance(exclude, str) or not all(isinstance(p, str) for p in exclude):
        raise ValueError(f"exclude={exclude!r}: must be a list of fnmatch patterns (strings)")
    return tuple(exclude)


def _convertible(model: nn.Module, patterns) -> list[nn.Module]:
    """The quantizable modules of model, in module order, minus those excluded by pattern
    (a pattern may name the layer or any module above it)."""
    used = dict.fromkeys(patterns, False)
    layers = []
    for name, m in model.named_modules():
        if not isinstance(m, _QUANTIZABLE):
            continue
        parts = name.split(".")
        scopes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        hits = [p for p in patterns if any(fnmatch.fnmatchcase(s, p) for s in scopes)]
        for p in hits:
            used[p] = True
        if not hits:
            layers.append(m)
    unused = [p for p, hit in used.items() if not hit]
    if unused:
        raise ValueError(f"exclude patterns {unused} match no nn.Conv2d / nn.Linear of the model")
    return layers


def make_projections_modules(model: nn.Module) -> None:
    """Make every weight-bearing projection a called nn.Linear module (sharing Parameters)."""
    replacement: dict[int, nn.Module] = {}
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            replacement[id(m)] = ProjectedAttention.from_float(m)
        elif _is_transformers_conv1d(m):
            replacement[id(m)] = _linear_from_conv1d(m)
        elif type(m).__module__ == "torchvision.models.swin_transformer":
            from .nn.window_attention import REPLACEMENTS

            cls = REPLACEMENTS.get(type(m))
            if cls is not None:
                m.__class__ = cls  # same attributes and state; only forward differs
    _swap(model, replacement)
    disable_fused_paths(model)


def _is_transformers_conv1d(m: nn.Module) -> bool:
    return (
        type(m).__name__ == "Conv1D"
        and type(m).__module__.startswith("transformers.")
        and getattr(m, "weight", None) is not None
        and m.weight.dim() == 2
    )


def _linear_from_conv1d(m: nn.Module) -> nn.Linear:
    """transformers' Conv1D computes x @ W + b with W [in, out]: an nn.Linear with W^T."""
    n_in, n_out = m.weight.shape
    lin = nn.Linear(n_in, n_out, bias=m.bias is not None, device="meta")
    lin.weight = nn.Parameter(m.weight.detach().t().contiguous(), m.weight.requires_grad)
    if m.bias is not None:
        lin.bias = m.bias
    lin.train(m.training)
    return lin


def _example_input(model, example_input):
    if example_input is not None:
        if not isinstance(example_input, (torch.Tensor, tuple, list, Mapping)):
            raise ValueError(
                "example_input must be a tensor, a tuple of positional arguments or a dict of "
                f"keyword arguments, got {type(example_input).__name__}"
            )
        return example_input
    make_example = getattr(model, "eqnet_example_input", None)
    if callable(make_example):  # a model whose inputs are no float tensor (token ids)
        return make_example()
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
def _trace(model: nn.Module, x):
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
        call_model(model, x)
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
