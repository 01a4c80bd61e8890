"""The `limpq` and `layered` methods: one integer program per budget over per-layer scores
read from the supernet (LIMPQ's learned step sizes, vertical layering's down-sampling error)."""

from __future__ import annotations

import time

from eqnet.search.genome import ChoiceTable
from eqnet.search.layered import layer_errors, layered_search, weights_from_supernet
from eqnet.search.limpq import default_alpha, importance_indicators, limpq_search

from .context import SearchContext
from .options import OptionError, SearchOptions


def search_limpq(options: SearchOptions, ctx: SearchContext, budgets):
    """[(spec, SubnetConfig, info)] for every budget (and target form), and the method's record
    (alpha: the option, else the supplementary's value for the run's model)."""
    alpha = options.alpha if options.alpha is not None else default_alpha(ctx.run.config.model)
    results = []
    for form in ctx.forms or [None]:
        table = ChoiceTable.from_model(ctx.space, ctx.supernet, forms=False, form=form)
        # the indicators of the form searched: layer-wise steps for per-tensor weights
        indicators = importance_indicators(ctx.supernet, form)
        for spec, constraints in budgets:
            t0 = time.perf_counter()
            res = limpq_search(table, ctx.cost, indicators, constraints, alpha=alpha)
            info = {
                "objective": res.objective,
                "search_seconds": time.perf_counter() - t0,
                "masked": res.masked,
            }
            if form is not None:
                info["target_form"] = form.to_dict()
            results.append((spec, res.config, info))
    return results, {"alpha": alpha}


def search_layered(options: SearchOptions, ctx: SearchContext, budgets):
    """[(spec, SubnetConfig, info)] for every budget at one activation width, and the method's
    record (a_bits)."""
    space = ctx.space
    # the widest: float (None) in a weight-only space
    a_bits = options.a_bits if options.a_bits is not None else space.highest_a_bits
    if a_bits not in space.a_bits:
        accepted = f"the space's activation widths are {space.a_bits}"
        raise OptionError("a_bits", a_bits, accepted)
    full = ChoiceTable.from_model(space, ctx.supernet, forms=False)
    table = ChoiceTable(
        {
            n: [c for c in opts if c.a_bits == a_bits] if len(opts) > 1 else opts
            for n, opts in zip(full.names, full.choices)
        }
    )
    weights = weights_from_supernet(ctx.supernet)
    errors = {
        n: dict(zip(space.w_bits, e))
        for n, e in layer_errors(weights, space.top_bits, list(space.w_bits)).items()
    }
    results = []
    for spec, constraints in budgets:
        t0 = time.perf_counter()
        cfg, err = layered_search(table, ctx.cost, errors, constraints)
        results.append(
            (spec, cfg, {"downsampling_error": err, "search_seconds": time.perf_counter() - t0})
        )
    return results, {"a_bits": a_bits}
