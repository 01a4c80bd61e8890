"""An elastic quantizer's active form as tensor data, for compiled graphs.

Under `torch.compile` the quantizer must not read its active form from Python attributes:
dynamo would guard on them and recompile for every new configuration (and fall back to eager
after its recompile limit). Instead the form is an integer buffer (`form_index`) that
`ElasticQuantizer.select` fills in place, and the compiled forward gathers everything that
depends on it from tensors:

- the scale of every form, broadcast to [C] (a per-tensor scale repeated per channel), stacked
  and indexed by `form_index`; the zero points likewise (a symmetric form has a zero offset);
- the form row (range, layering step, compensation: `eqkernels.form_row`) from `form_table`;
- the LSQ gradient scale 1/sqrt(n * max(qmax, 1)), with n the elements sharing one scale.

Every form's parameters are inputs of the compiled graph, so autograd hands the inactive ones
a zero gradient where eager mode gives none (and an optimizer with momentum or weight decay
would move them). `install_grad_gate` restores eager's rule: a parameter of a form that is not
active gets its gradient dropped again when it had none before the backward.
"""

from __future__ import annotations

import weakref

import torch

import eqkernels


def form_table(quantizer) -> torch.Tensor:
    """float64 [forms, 5]: the `fake_quant_form` row of each of `quantizer.forms()`."""
    rows = []
    for bits, _gran, _sym in quantizer.forms():
        if quantizer.nested:
            rows.append(eqkernels.layered_form_row(bits, quantizer.top_bits))
        else:
            rows.append(eqkernels.form_row(*eqkernels.qrange(bits, quantizer.signed)))
    return torch.tensor(rows, dtype=torch.float64)


def forward(quantizer, x: torch.Tensor, positive) -> torch.Tensor:
    """The active form's fake quantization, selected by `quantizer.form_index` (a tensor)."""
    channels = quantizer.channels if quantizer.role == "weight" else 1
    scales, zero_points, shares = [], [], []
    for bits, gran, sym in quantizer.forms():
        scale, zp = quantizer.raw_parameters(bits, gran, sym)
        scales.append(positive(scale).expand(channels))
        zero_points.append(zp.expand(channels) if zp is not None else scale.new_zeros(channels))
        if quantizer.role == "activation":
            # LSQ's activation gradient scale counts the features of one sample.
            shares.append(x[0].numel() if x.dim() > 1 else x.numel())
        else:
            shares.append(x.numel() // channels if gran == "channel" else x.numel())
    index = quantizer.form_index.reshape(1)
    scale = torch.stack(scales).index_select(0, index).reshape(channels)
    zero_point = torch.stack(zero_points).index_select(0, index).reshape(channels)
    form = quantizer.form_table.index_select(0, index).reshape(-1)
    share = torch.tensor(shares, dtype=torch.float64, device=x.device).index_select(0, index)
    # float64 like the eager path's Python float, so both give the same fp32 product.
    grad_factor = 1.0 / torch.sqrt(share * form[1].clamp_min(1.0))
    axis = quantizer.axis if quantizer.role == "weight" else None
    return eqkernels.fake_quant_form(
        x, scale, zero_point, form, grad_factor, axis=axis, backend=quantizer.backend
    )


def form_indices_by_parameter(quantizer) -> dict[str, frozenset[int]]:
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


def install_grad_gate(quantizer) -> None:
    """Hooks on each parameter that drop a gradient a compiled graph gave an inactive form."""
    owners = form_indices_by_parameter(quantizer)
    owner_ref = weakref.ref(quantizer)
    for name, param in quantizer.named_parameters(recurse=False):
        if getattr(param, "_eqk_grad_gate", False):
            continue  # hooked already (a deep copy gets fresh parameters without hooks)
        param._eqk_grad_gate = True
        param_ref = weakref.ref(param)
        forms = owners.get(name, frozenset())

        def before(grad, param_ref=param_ref):
            p = param_ref()
            if p is not None:
                p._eqk_had_grad = p.grad is not None

        def after(p, forms=forms):
            q = owner_ref()
            if q is None or q.active_index in forms or getattr(p, "_eqk_had_grad", True):
                return
            p.grad = None

        param.register_hook(before)
        param.register_post_accumulate_grad_hook(after)
