"""One choice per layer under additive budgets, as an integer linear program (HiGHS).

Variables x[l, c] in {0, 1}; each layer takes exactly one choice (sum_c x[l, c] = 1);
minimize sum_{l,c} objective[l][c] x[l, c] subject to sum_{l,c} costs[k][l][c] x[l, c] <=
limits[k] for every budget k. LIMPQ (eq. 4 of its paper) and the layered allocation
(vertical layering eq. 12) are both this program with different objectives and costs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def _as_rows(name: str, rows, lengths=None) -> list[np.ndarray]:
    if isinstance(rows, np.ndarray) and rows.ndim == 2:
        rows = list(rows)
    if not isinstance(rows, Sequence) or isinstance(rows, (str, bytes)) or len(rows) == 0:
        raise ValueError(f"{name}: expected a non-empty sequence of 1-D arrays, one per layer")
    out = []
    for i, r in enumerate(rows):
        a = np.asarray(r, dtype=np.float64)
        if a.ndim != 1 or a.size == 0:
            raise ValueError(f"{name}[{i}]: expected a non-empty 1-D array, got shape {a.shape}")
        if lengths is not None and a.size != lengths[i]:
            raise ValueError(
                f"{name}[{i}] has {a.size} entries, objective[{i}] has {lengths[i]}: every "
                "budget needs one value per choice"
            )
        out.append(a)
    if lengths is not None and len(out) != len(lengths):
        raise ValueError(f"{name} has {len(out)} layers, objective has {len(lengths)}")
    return out


def choose_per_layer(
    objective: Sequence, costs: Mapping[str, Sequence], limits: Mapping[str, float]
) -> list[int]:
    """Index of the chosen entry of every layer.

    objective[l]: 1-D array of layer l's choice values (the sum is minimized); +inf marks a
    forbidden choice. costs[name][l]: 1-D array of layer l's contributions to budget `name`
    (finite). limits[name]: upper bound of that budget. Raises ValueError on malformed input
    or when no assignment meets every limit.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    obj = _as_rows("objective", objective)
    lengths = [a.size for a in obj]
    if not isinstance(costs, Mapping) or not isinstance(limits, Mapping):
        raise ValueError("costs and limits must be mappings from budget name to values")
    if set(costs) != set(limits):
        raise ValueError(
            f"costs budgets {sorted(costs)} and limits budgets {sorted(limits)} must match"
        )
    names = list(costs)
    cost_rows = {k: _as_rows(f"costs[{k!r}]", costs[k], lengths) for k in names}
    lim = {}
    for k in names:
        try:
            lim[k] = float(limits[k])
        except (TypeError, ValueError):
            raise ValueError(f"limits[{k!r}]={limits[k]!r}: expected a number") from None
        if not np.isfinite(lim[k]):
            raise ValueError(f"limits[{k!r}]={lim[k]}: must be finite")
        if not all(np.isfinite(r).all() for r in cost_rows[k]):
            raise ValueError(f"costs[{k!r}]: every value must be finite")
    for i, a in enumerate(obj):
        if np.isnan(a).any() or np.isneginf(a).any():
            raise ValueError(f"objective[{i}]: values must be finite or +inf (forbidden)")
        if np.isposinf(a).all():
            raise ValueError(f"objective[{i}]: every choice is forbidden (+inf)")

    allowed = [np.isfinite(a) for a in obj]
    # quick infeasibility report per budget (the joint check is the solver's)
    for k in names:
        lo = sum(r[m].min() for r, m in zip(cost_rows[k], allowed))
        if lo > lim[k] + 1e-9 * max(abs(lim[k]), 1.0):
            raise ValueError(
                f"budget {k!r} is infeasible: its smallest reachable value is {lo:g}, the "
                f"limit is {lim[k]:g}"
            )

    offsets = np.concatenate([[0], np.cumsum(lengths)])
    n = int(offsets[-1])
    c = np.concatenate([np.where(m, a, 0.0) for a, m in zip(obj, allowed)])
    # objectives may mix magnitudes (step sizes, squared errors); scaling keeps HiGHS's
    # absolute tolerances meaningful
    c_scale = np.abs(c).max() or 1.0
    upper = np.concatenate(allowed).astype(np.float64)

    rows = np.zeros((len(obj) + len(names), n))
    lb = np.zeros(len(obj) + len(names))
    ub = np.zeros(len(obj) + len(names))
    for i in range(len(obj)):
        rows[i, offsets[i] : offsets[i + 1]] = 1.0
        lb[i] = ub[i] = 1.0
    for j, k in enumerate(names):
        row = np.concatenate(cost_rows[k])
        scale = max(np.abs(row).max(), abs(lim[k]), 1e-300)  # budgets like BitOPs reach 1e10
        rows[len(obj) + j] = row / scale
        lb[len(obj) + j] = -np.inf
        ub[len(obj) + j] = lim[k] / scale
    res = milp(
        c / c_scale,
        integrality=np.ones(n),
        bounds=Bounds(np.zeros(n), upper),
        constraints=LinearConstraint(rows, lb, ub),
        options={"mip_rel_gap": 0.0},
    )
    if res.status == 2:
        raise ValueError(
            f"no choice per layer meets all limits {dict(lim)} at once (infeasible budgets)"
        )
    if res.x is None:
        raise RuntimeError(f"scipy.optimize.milp failed: {res.message}")
    chosen = [int(np.argmax(res.x[offsets[i] : offsets[i + 1]])) for i in range(len(obj))]
    for k in names:
        total = sum(r[i] for r, i in zip(cost_rows[k], chosen))
        if total > lim[k] + 1e-6 * max(abs(lim[k]), 1.0):
            raise RuntimeError(
                f"milp returned an assignment with {k}={total:g} over the limit {lim[k]:g}"
            )
    return chosen


def budget_rows(table, cost, constraints) -> tuple[dict, dict]:
    """costs/limits for choose_per_layer from Constraint objects over a ChoiceTable; a
    `metric >= v` bound becomes `-metric <= -v`."""
    costs, limits = {}, {}
    for i, c in enumerate(constraints):
        t = table.metric_table(cost, c.metric)
        sign = 1.0 if c.op == "<=" else -1.0
        key = f"{c.metric}{c.op}#{i}"
        costs[key] = [sign * t[l, :n] for l, n in enumerate(table.n_choices)]
        limits[key] = sign * c.value
    return costs, limits
