"""LIMPQ mixed-precision search: learned importance indicators + integer program.

LIMPQ trains one step size per layer and width (its "importance indicators"; for per-channel
weights the mean over channels; `importance_indicators(supernet)` reads them from a supernet
trained with the `limpq` recipe) and then solves, for every layer l and its (w_bits, a_bits),

    minimize  sum_l  I_a^l(a_bits) + alpha * I_w^l(w_bits)
    subject to BitOPs and size limits (any additive cost-model limit here).

A narrower width has a larger step, so the objective pulls every layer to wide widths and the
budget decides where width is spent; layers whose steps grow fastest when narrowed (important
ones) keep their width. The supplement uses alpha = 3.0 / 2.0 / 1.0 for ResNet18 / ResNet50 /
MobileNetV1 (`PAPER_ALPHA`, `default_alpha`); other models take 1.0 unless alpha is given.

Masking (`mask="official"`, as the official search). A narrower width must have a larger step.
For consecutive candidate widths b' < b of one layer and role, an indicator at b' *smaller* than
the one at b is an outlier of the joint training, and width b' is forbidden: its term costs
`MASK_COST` = 1e8, so the program takes it only when nothing else meets the budget. Weights and
activations are masked separately. `mask="monotone"` is the package's earlier rule: a width
whose indicator is not strictly below that of every narrower width is removed (the narrowest
is never removed). Fixed-width layers keep their one choice with objective 0.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from eqnet.search.cost import CostModel
from eqnet.search.genome import ChoiceTable, Constraint
from eqnet.search.ilp import budget_rows, choose_per_layer
from eqnet.space import SubnetConfig

_ROLE_KEYS = {"w": "w", "weight": "w", "a": "a", "activation": "a"}


def importance_indicators(supernet, form=None) -> dict[str, dict[tuple[str, int], float]]:
    """LIMPQ's layer-wise importance indicators: layer -> {("w", bits): step, ("a", bits):
    step} for every elastic layer and every width of the space, read in one form: `form` (an
    `eqnet.forms.TargetForm`), else the uniform configs' default (per-channel symmetric weights
    and asymmetric activations when the space has them). With per-tensor weights the weight
    indicator is the layer-wise step itself, as in the paper; a per-channel step is the mean
    over channels; nested weights report their effective step 2^(top-b) s_top."""
    space = supernet.space
    if None in space.a_bits:
        raise NotImplementedError(
            "LIMPQ: a float activation (a_bits=None) has no learned step size to serve as its "
            "importance indicator; search a space of integer activation widths"
        )
    if form is not None:
        form.check_space(space)
        w_gran, w_sym, a_sym = form.w_granularity, form.w_symmetry, form.a_symmetry
    else:
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


MASKS = ("official", "monotone")
MASK_COST = 1e8  # the official search's cost of a forbidden width

# alpha of the LIMPQ supplementary (section 1), by the package's model name
PAPER_ALPHA = {"resnet18": 3.0, "resnet50": 2.0, "mobilenet_v1": 1.0}


def default_alpha(model: str | None) -> float:
    """The supplementary's alpha for `model`, 1.0 for every other model."""
    return PAPER_ALPHA.get(str(model).lower(), 1.0) if model is not None else 1.0


def official_mask(values: Mapping[int, float]) -> dict[int, bool]:
    """bits -> allowed: for consecutive widths b' < b, b' is forbidden when value[b'] <
    value[b] (its step is smaller than the wider width's, against quantization's order)."""
    widths = sorted(values)
    allowed = {b: True for b in widths}
    for narrow, wide in itertools.pairwise(widths):
        if values[narrow] < values[wide]:
            allowed[narrow] = False
    return allowed


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
    mask: str = "official",
) -> LimpqResult:
    """The LIMPQ integer program over `table` (one form per layer: build it with forms=False
    or a target form)."""
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha={alpha}: must be a positive number")
    if mask not in MASKS:
        raise ValueError(f"mask={mask!r}: accepted values are {', '.join(MASKS)}")
    masker = official_mask if mask == "official" else monotone_mask
    ind = normalize_indicators(indicators)
    objective, forbidden, masked = [], [], {}
    for name, opts in zip(table.names, table.choices):
        if name not in ind and len({(c.w_bits, c.a_bits) for c in opts}) == 1:
            # a fixed-width layer: no indicator, no objective among its forms
            objective.append(np.zeros(len(opts)))
            forbidden.append(np.zeros(len(opts)))
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
        kw, ka = masker(iw), masker(ia)
        masked[name] = {
            "w": [b for b, k in kw.items() if not k],
            "a": [b for b, k in ka.items() if not k],
        }
        objective.append(np.array([ia[c.a_bits] + alpha * iw[c.w_bits] for c in opts]))
        forbidden.append(np.array([(not kw[c.w_bits]) + (not ka[c.a_bits]) for c in opts], float))
    costs, limits = budget_rows(table, cost, constraints)
    if mask == "monotone":
        chosen = choose_per_layer(
            [np.where(f > 0, np.inf, o) for o, f in zip(objective, forbidden)], costs, limits
        )
        total = float(sum(o[i] for o, i in zip(objective, chosen)))
        return LimpqResult(table.decode(chosen), total, masked)
    # Each forbidden width costs MASK_COST: the fewest forbidden widths first, then the least
    # objective. Solved with a penalty just above the objective's whole spread (exactly the
    # same order as 1e8 while that exceeds the spread, which it does for step sizes), so the
    # solver's tolerances still see the objective's differences.
    spread = sum(float(o.max() - o.min()) for o in objective)
    penalty = max(1.0, 2.0 * spread)
    chosen = choose_per_layer(
        [o + penalty * f for o, f in zip(objective, forbidden)], costs, limits
    )
    total = float(sum(o[i] + MASK_COST * f[i] for o, f, i in zip(objective, forbidden, chosen)))
    return LimpqResult(table.decode(chosen), total, masked)
