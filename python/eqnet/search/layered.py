"""Bit allocation for a nested (vertical-layered) supernet, vertical layering §5 eq. 12.

Every layer's weights are stored once at the top width n with step s_n; its b-bit weights drop
k = n - b low bits, q_b = floor(q_n / 2^k), with step s_b = 2^k s_n and the positive
compensation c_k = (1 - 2^-k) / 2 (DESIGN.md, "Nested quantizer"). The allocation picks one
width per layer to

    minimize  sum_m || s_b (q_b + c_k) - s_n q_n ||^2     (downsampling error, dequantized)
    subject to sum_m N_m b_m <= B                         (total weight bits)

which is eq. 12 with the budget read as total bits rather than bits above the top width (the
two differ by the constant sum_m N_m n). Other additive limits (size, BitOPs) use the same
solver through `layered_search`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from eqnet.search.cost import CostModel
from eqnet.search.genome import ChoiceTable, Constraint
from eqnet.search.ilp import budget_rows, choose_per_layer
from eqnet.space import SubnetConfig


def top_codes(weight: torch.Tensor, scale: torch.Tensor, top_bits: int, axis: int | None):
    """q_n as the nested quantizer computes it: v = fl32(w * fl32(1/s_n)), round half to
    even, clamp to the signed top-width range. Returns (q_n, s_n broadcast to the weight)."""
    if not isinstance(top_bits, int) or not 2 <= top_bits <= 8:
        raise ValueError(f"top_bits={top_bits!r}: must be an int in 2..8")
    w = weight.detach().float()
    s = scale.detach().float().reshape(-1)
    if (s <= 0).any() or not torch.isfinite(s).all():
        raise ValueError("scale must be positive and finite")
    if axis is None:
        if s.numel() != 1:
            raise ValueError(f"per-tensor scale must have 1 element, got {s.numel()}")
        s_b = s.reshape([1] * w.ndim)
    else:
        if not -w.ndim <= axis < w.ndim or s.numel() != w.shape[axis]:
            raise ValueError(
                f"axis={axis}: scale has {s.numel()} elements, weight shape {tuple(w.shape)}"
            )
        shape = [1] * w.ndim
        shape[axis] = -1
        s_b = s.reshape(shape)
    v = w * (1.0 / s_b)
    lo, hi = -(2 ** (top_bits - 1)), 2 ** (top_bits - 1) - 1
    return torch.round(v).clamp(lo, hi), s_b


def downsampling_error(
    weight: torch.Tensor, scale: torch.Tensor, top_bits: int, bits: int, axis: int | None = 0
) -> float:
    """|| s_b (q_b + c_k) - s_n q_n ||^2 of one layer at `bits` (float64 sum)."""
    if not isinstance(bits, int) or not 1 <= bits <= top_bits:
        raise ValueError(f"bits={bits!r}: must be an int in 1..top_bits ({top_bits})")
    q_n, s_n = top_codes(weight, scale, top_bits, axis)
    k = top_bits - bits
    q_n, s_n = q_n.double(), s_n.double()
    q_b = torch.floor(q_n / 2**k)  # arithmetic shift: floor, not truncation
    c_k = (1.0 - 2.0**-k) / 2.0
    err = (2**k * s_n) * (q_b + c_k) - s_n * q_n
    return float((err**2).sum())


def layer_errors(
    weights: Mapping[str, tuple[torch.Tensor, torch.Tensor, int | None]],
    top_bits: int,
    bits_options: Sequence[int],
) -> dict[str, np.ndarray]:
    """name -> errors at each of bits_options, from {name: (weight, top-width scale, axis)}."""
    return {
        name: np.array([downsampling_error(w, s, top_bits, b, axis) for b in bits_options])
        for name, (w, s, axis) in weights.items()
    }


def layered_allocation(
    errors: Mapping[str, Sequence[float]],
    n_params: Mapping[str, int],
    bits_options: Sequence[int],
    budget_bits: float,
) -> dict[str, int]:
    """Eq. 12: name -> width minimizing the summed error under sum_m N_m b_m <= budget_bits."""
    bits = list(bits_options)
    if set(errors) != set(n_params):
        raise ValueError(f"errors layers {sorted(errors)} != n_params layers {sorted(n_params)}")
    names = list(errors)
    obj = [np.asarray(errors[n], dtype=np.float64) for n in names]
    for n, o in zip(names, obj):
        if o.shape != (len(bits),):
            raise ValueError(f"errors[{n!r}] has shape {o.shape}, expected ({len(bits)},)")
    costs = {"bits": [np.array([n_params[n] * b for b in bits], dtype=np.float64) for n in names]}
    chosen = choose_per_layer(obj, costs, {"bits": budget_bits})
    return {n: bits[i] for n, i in zip(names, chosen)}


def weights_from_supernet(supernet) -> dict[str, tuple[torch.Tensor, torch.Tensor, int | None]]:
    """{name: (weight, top-width scale, axis)} of every elastic layer of a nested supernet, in
    the layer's preferred granularity."""
    space = supernet.space
    if not space.nested:
        raise ValueError("layered allocation needs a nested supernet (ElasticSpace(nested=True))")
    gran = space.preferred_forms()[0]
    out = {}
    with torch.no_grad():
        for name, layer in supernet.quantized_layers().items():
            if layer.fixed_choice is not None:
                continue
            p = layer.weight_quantizer.params(space.top_bits, gran, "sym")
            out[name] = (layer.weight.detach(), p.scale.detach(), p.axis)
    return out


def layered_search(
    table: ChoiceTable,
    cost: CostModel,
    errors: Mapping[str, Sequence[float]],
    constraints: Sequence[Constraint],
) -> tuple[SubnetConfig, float]:
    """Eq. 12 over a ChoiceTable (each elastic layer's errors indexed by its w_bits through
    `errors[name][w_bits]`), under any additive cost-model constraints."""
    objective = []
    for name, opts in zip(table.names, table.choices):
        if name not in errors:
            if len(opts) != 1:
                raise ValueError(f"no downsampling errors for elastic layer {name!r}")
            objective.append(np.zeros(1))
            continue
        objective.append(np.array([float(errors[name][c.w_bits]) for c in opts]))
    costs, limits = budget_rows(table, cost, constraints)
    chosen = choose_per_layer(objective, costs, limits)
    return table.decode(chosen), float(sum(o[i] for o, i in zip(objective, chosen)))
