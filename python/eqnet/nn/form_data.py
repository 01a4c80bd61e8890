"""An elastic quantizer's active form as tensor data, for compiled graphs.

Under `torch.compile` the quantizer must not read its active form from Python attributes:
dynamo would guard on them and recompile for every new configuration (and fall back to eager
after its recompile limit). Instead the form is an integer buffer (`form_index`) that
`ElasticQuantizer.select` fills in place, and the compiled forward gathers everything that
depends on it from tensors:

- the parameters: the forms fall into groups of one granularity and symmetry, whose
  parameters have one shape across widths, and `select` binds each group's parameters at the
  active width to `active_tensors`; a tensor attribute is a graph input, and dynamo guards on
  its shape, not on which parameter it is. With one group (an elastic-width quantizer) the
  graph uses them directly; with several, each group's scale is broadcast to [C] (a per-tensor
  scale repeated per channel), stacked and indexed by `group_index`; the zero points likewise
  (a symmetric form has a zero offset). A quantizer that holds the per-group form broadcasts
  every group to its group shape [C, K // group_size] instead and runs the group form of the
  op: the per-element map of a broadcast scale is that form's own, so the tensor, channel and
  group forms share one graph;
- the form row (range, layering step, compensation: `eqkernels.form_row`) from `form_table`,
  run by `eqkernels.fake_quant_form_inline` (or the kernel op, KERNEL_IN_GRAPHS); an activation
  (per-tensor) quantizer takes its step-size gradients from the kernel (kernel_backward=True)
  and its dx from plain ops that inductor folds into the batch norm / ReLU backward;
- the LSQ gradient scale 1/sqrt(n * max(qmax, 1)), with n the elements sharing one scale.

Per-bit batch norm (`SwitchableBatchNorm2d`) binds the active width's tensors the same way
(`switchable_batchnorm`).

Inactive widths are not graph inputs, so they get no gradient, as in eager mode. With several
groups the inactive groups' bound parameters are inputs of the compiled graph, and autograd
hands them a zero gradient where eager mode gives none (an optimizer with momentum or weight
decay would move them). `install_grad_gate` restores eager's rule there: a parameter of a form
that is not active gets its gradient dropped again when it had none before the backward.
"""

from __future__ import annotations

import os
import weakref

import torch
from torch.nn import functional as F

import eqkernels

# In compiled graphs the quantizer runs `fake_quant_form_inline` (plain torch ops that
# inductor fuses with the neighbouring batch norm and ReLU); EQK_COMPILE_KERNEL=1 calls the
# C++/Triton kernel through the opaque `eqk::fake_quant_form` op instead.
KERNEL_IN_GRAPHS = os.environ.get("EQK_COMPILE_KERNEL", "0") == "1"
# An activation quantizer's backward takes its step-size sums from the kernel (see
# `fake_quant_form_inline`'s kernel_backward); EQK_COMPILE_INLINE_BACKWARD=1 traces them as
# plain torch ops instead (slower: inductor stores extra full-size buffers around them).
INLINE_BACKWARD = os.environ.get("EQK_COMPILE_INLINE_BACKWARD", "0") == "1"


def form_table(quantizer) -> torch.Tensor:
    """float32 [forms, 5]: the `fake_quant_form` row of each of `quantizer.forms()`.

    float32 holds every field exactly (integer ranges, powers of two, c_k = (1 - 2^-k) / 2),
    and it is the precision the map runs in: a float64 row would make the compiled element
    loops convert each field on every iteration."""
    rows = []
    for bits, _gran, _sym in quantizer.forms():
        if quantizer.nested:
            rows.append(eqkernels.layered_form_row(bits, quantizer.top_bits))
        else:
            rows.append(eqkernels.form_row(*eqkernels.qrange(bits, quantizer.signed)))
    return torch.tensor(rows, dtype=torch.float32)


def forward(quantizer, x: torch.Tensor, positive) -> torch.Tensor:
    """The active form's fake quantization, selected by `quantizer.form_index` (a tensor)."""
    channels = quantizer.channels if quantizer.role == "weight" else 1
    group_size = getattr(quantizer, "group_size", None)
    # [C] per channel, [C, G] when the quantizer holds the group form (every form broadcast)
    shape = (channels,) if group_size is None else quantizer.scale_shape("group")
    # Per form group (one granularity and symmetry), its parameters at the active width.
    groups = quantizer.active_tensors
    scales = [_broadcast(positive(raw), shape) for raw, _ in groups]
    zero_points = [
        _broadcast(z, shape) if z is not None else raw.new_zeros(shape) for raw, z in groups
    ]
    shares = [_share(quantizer, x, gran) for gran, _ in quantizer.form_groups]
    share = torch.tensor(shares, dtype=torch.float64, device=x.device)
    if len(groups) == 1:
        scale, zero_point = scales[0], zero_points[0]
    else:
        group = quantizer.group_index.reshape(1)
        scale = torch.stack(scales).index_select(0, group).reshape(shape)
        zero_point = torch.stack(zero_points).index_select(0, group).reshape(shape)
        share = share.index_select(0, group)
    index = quantizer.form_index.reshape(1)
    form = quantizer.form_table.index_select(0, index).reshape(-1)
    # float64 like the eager path's Python float, so both give the same fp32 product.
    grad_factor = 1.0 / torch.sqrt(share * form[1].clamp_min(1.0))
    axis = quantizer.axis if quantizer.role == "weight" else None
    options = dict(axis=axis, group_size=group_size, backend=quantizer.backend)
    if KERNEL_IN_GRAPHS:
        return eqkernels.fake_quant_form(x, scale, zero_point, form, grad_factor, **options)
    return eqkernels.fake_quant_form_inline(
        x, scale, zero_point, form, grad_factor, kernel_backward=not INLINE_BACKWARD, **options
    )


def _share(quantizer, x: torch.Tensor, granularity: str) -> int:
    """n of LSQ's gradient scale 1/sqrt(n * qmax): the elements that share one scale."""
    if quantizer.role == "activation":
        # LSQ's activation gradient scale counts the features of one sample.
        return x[0].numel() if x.dim() > 1 else x.numel()
    if granularity == "group":
        return quantizer.group_size
    return x.numel() // quantizer.channels if granularity == "channel" else x.numel()


def _broadcast(param: torch.Tensor, shape) -> torch.Tensor:
    """A scale or zero point of shape [1], [C] or [C, G] broadcast to [C] or [C, G]."""
    if len(shape) == 2 and param.dim() == 1:
        return param[:, None].expand(shape)
    return param.expand(shape)


def form_owners(quantizer) -> dict[str, frozenset[int]]:
    """Parameter name -> indices (into `forms()`) of the forms it backs."""
    owners: dict[str, set[int]] = {}
    for i, (bits, gran, sym) in enumerate(quantizer.forms()):
        scale, zp = quantizer.raw_parameters(bits, gran, sym)
        for p in (scale, zp):
            if p is None:
                continue
            for name, q in quantizer.named_parameters(recurse=False):
                if q is p:
                    owners.setdefault(name, set()).add(i)
    return {name: frozenset(v) for name, v in owners.items()}


def install_grad_gate(module, is_active) -> None:
    """Hooks on each direct parameter of `module` (`recurse=False`, else all of them) that drop
    a gradient a compiled graph gave a parameter for which `is_active(name)` is False, when
    that parameter had no gradient before the backward (so accumulation over several subnets
    keeps what the earlier ones gave)."""
    owner_ref = weakref.ref(module)
    for name, param in module.named_parameters():
        if getattr(param, "_eqk_grad_gate", False):
            continue  # hooked already (a deep copy gets fresh parameters without hooks)
        param._eqk_grad_gate = True
        param_ref = weakref.ref(param)

        def before(grad, param_ref=param_ref):
            p = param_ref()
            if p is not None:
                p._eqk_had_grad = p.grad is not None

        def after(p, name=name):
            owner = owner_ref()
            if owner is None or getattr(p, "_eqk_had_grad", True) or is_active(owner, name):
                return
            p.grad = None

        param.register_hook(before)
        param.register_post_accumulate_grad_hook(after)


def quantizer_form_is_active(quantizer, name: str) -> bool:
    return quantizer.active_index in quantizer.form_owners.get(name, ())


def switchable_batchnorm(bn, x: torch.Tensor) -> torch.Tensor:
    """SwitchableBatchNorm2d's forward on the active width's tensors (`bn.active_tensors`):
    in training, that width's running statistics updated in place as nn.BatchNorm2d does."""
    weight, bias, running_mean, running_var, tracked = bn.active_tensors
    first = next(iter(bn.bns.values()))  # eps, momentum and the flags are every width's
    use_batch = bn.training or not first.track_running_stats
    if not use_batch:
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, first.eps)
    y = F.batch_norm(x, None, None, weight, bias, True, 0.0, first.eps)
    if bn.training and first.track_running_stats:
        with torch.no_grad():
            dims = [0, 2, 3]
            n = x.numel() // x.shape[1]
            mean = x.mean(dims)
            var = x.var(dims, correction=1 if n > 1 else 0)
            tracked.add_(1)
            if first.momentum is None:  # cumulative moving average
                m = (1.0 / tracked.double()).float()
            else:
                m = first.momentum
            running_mean.copy_((1 - m) * running_mean + m * mean)
            running_var.copy_((1 - m) * running_var + m * var)
    return y
