"""LIMPQ mixed-precision search: learned importance indicators + integer program.

LIMPQ trains one step size per layer and width (its "importance indicators"; for per-channel
weights the mean over channels; `importance_indicators(supernet)` reads them from a supernet
trained with the `limpq` recipe) and then solves, for every layer l and its (w_bits, a_bits),

    minimize  sum_l  I_a^l(a_bits) + alpha * I_w^l(w_bits)
    subject to BitOPs and size limits (any additive cost-model limit here).

A narrower width has a larger step, so the objective pulls every layer to wide widths and the
budget decides where width is spent; layers whose steps grow fastest when narrowed (important
ones) keep their width. The supplement uses alpha = 3.0 / 2.0 / 1.0 for ResNet18 / ResNet50 /
MobileNetV1.

Masking. The indicator of a layer is trusted only where it decreases with width: a width whose
indicator is not strictly below the indicator of every narrower width of the same layer and
role (its step did not shrink, so the training gave no evidence that the extra bits help) is
removed from that layer's choices. The narrowest width is never masked, so every layer keeps a
choice. Fixed-width layers keep their one choice with objective 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from eqnet.search.cost import CostModel
from eqnet.search.genome import ChoiceTable, Constraint
from eqnet.search.ilp import budget_rows, choose_per_layer
from eqnet.space import SubnetConfig

_ROLE_KEYS = {"w": "w", "weight": "w", "a": "a", "activation": "a"}


def importance_indicators(supernet) -> dict[str, dict[tuple[str, int], float]]:
    """LIMPQ's layer-wise importance indicators: layer -> {("w", bits): step, ("a", bits):
    step} for every elastic layer and every width of the space. A per-channel weight step is
    the mean over channels; nested weights report their effective step 2^(top-b) s_top. The
    forms are those of the uniform configs (per-channel symmetric weights when the space has
    them)."""
    space = supernet.space
    w_gran, w_sym, a_sym = space.preferred_forms()
    out = {}
    with torch.no_grad():
        for name, layer in supernet.quantized_layers().items():
            if layer.fixed_choice is not None:
                continue
            entry = {}
            for b in space.w_bits:
                p = layer.weight_quantizer.params(b, w_gran, w_sym)
                step = p.scale.float().mean()
                if p.nested:
                    step = step * 2.0 ** (p.top_bits - b)
                entry[("w", b)] = float(step)
            for b in space.a_bits:
                p = layer.act_quantizer.params(b, "tensor", a_sym)
                entry[("a", b)] = float(p.scale.float().mean())
            out[name] = entry
    return out


def normalize_indicators(indicators: Mapping) -> dict[str, dict[str, dict[int, float]]]:
    """Accepts {layer: {(role, bits): value}} (what importance_indicators gives)
    or {layer: {role: {bits: value}}}, role in w/weight/a/activation; values may be tensors
    (averaged, as for per-channel steps). Returns {layer: {"w": {bits: v}, "a": {bits: v}}}
    with positive finite values."""
    out = {}
    for layer, entry in indicators.items():
        if not isinstance(entry, Mapping):
            raise ValueError(f"indicators[{layer!r}]: expected a mapping, got {type(entry)}")
        pairs = []
        for key, v in entry.items():
            if isinstance(key, tuple) and len(key) == 2:
                pairs.append((key[0], key[1], v))
            elif isinstance(v, Mapping):
                pairs.extend((key, b, x) for b, x in v.items())
            else:
                raise ValueError(
                    f"indicators[{layer!r}]: keys must be (role, bits) or role -> {{bits: v}}"
                )
        norm: dict[str, dict[int, float]] = {"w": {}, "a": {}}
        for role, b, v in pairs:
            r = _ROLE_KEYS.get(role)
            if r is None:
                raise ValueError(
                    f"indicators[{layer!r}]: role {role!r}; accepted roles are weight, activation"
                )
            v = float(v.float().mean()) if isinstance(v, torch.Tensor) else float(np.mean(v))
            if not np.isfinite(v) or v <= 0:
                raise ValueError(f"indicators[{layer!r}][{role!r}][{b}]={v}: must be > 0")
            norm[r][int(b)] = v
        missing = [r for r in ("w", "a") if not norm[r]]
        if missing:
            raise ValueError(f"indicators[{layer!r}]: missing roles {missing}")
        out[layer] = norm
    return out


def monotone_mask(values: Mapping[int, float]) -> dict[int, bool]:
    """bits -> kept: kept when the value is strictly below that of every narrower width."""
    kept, best = {}, np.inf
    for b in sorted(values):
        kept[b] = values[b] < best
        best = min(best, values[b])
    kept[min(values)] = True
    return kept


@dataclass
class LimpqResult:
    config: SubnetConfig
    objective: float
    masked: dict[str, dict[str, list[int]]] = field(default_factory=dict)


def limpq_search(
    table: ChoiceTable,
    cost: CostModel,
    indicators: Mapping,
    constraints: Sequence[Constraint],
    alpha: float = 1.0,
) -> LimpqResult:
    """The LIMPQ integer program over `table` (one form per layer: build it with forms=False)."""
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha={alpha}: must be a positive number")
    ind = normalize_indicators(indicators)
    objective, masked = [], {}
    for name, opts in zip(table.names, table.choices):
        if len(opts) == 1 and name not in ind:  # fixed-width layer
            objective.append(np.zeros(1))
            continue
        if name not in ind:
            raise ValueError(f"no importance indicators for elastic layer {name!r}")
        iw, ia = ind[name]["w"], ind[name]["a"]
        need_w = {c.w_bits for c in opts} - set(iw)
        need_a = {c.a_bits for c in opts} - set(ia)
        if need_w or need_a:
            raise ValueError(
                f"indicators of layer {name!r} miss weight widths {sorted(need_w)} / "
                f"activation widths {sorted(need_a)}"
            )
        kw, ka = monotone_mask(iw), monotone_mask(ia)
        masked[name] = {
            "w": [b for b, k in kw.items() if not k],
            "a": [b for b, k in ka.items() if not k],
        }
        objective.append(
            np.array(
                [
                    ia[c.a_bits] + alpha * iw[c.w_bits] if kw[c.w_bits] and ka[c.a_bits] else np.inf
                    for c in opts
                ]
            )
        )
    costs, limits = budget_rows(table, cost, constraints)
    chosen = choose_per_layer(objective, costs, limits)
    total = float(sum(o[i] for o, i in zip(objective, chosen)))
    return LimpqResult(table.decode(chosen), total, masked)
