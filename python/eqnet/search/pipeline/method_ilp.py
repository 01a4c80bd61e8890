"""The `limpq` and `layered` methods: one integer program per budget over per-layer scores
read from the supernet (LIMPQ's learned step sizes, vertical layering's down-sampling error)."""

from __future__ import annotations

import time

from eqnet.search.genome import ChoiceTable
from eqnet.search.layered import layer_errors, layered_search, weights_from_supernet
from eqnet.search.limpq import importance_indicators, limpq_search

from .context import SearchContext
from .options import OptionError, SearchOptions


def search_limpq(options: SearchOptions, ctx: SearchContext, budgets):
    """[(spec, SubnetConfig, info)] for every budget, and the method's record (alpha)."""
    table = ChoiceTable.from_model(ctx.space, ctx.supernet, forms=False)
    indicators = importance_indicators(ctx.supernet)
    results = []
    for spec, constraints in budgets:
        t0 = time.perf_counter()
        res = limpq_search(table, ctx.cost, indicators, constraints, alpha=options.alpha)
        results.append(
            (
                spec,
                res.config,
                {
                    "objective": res.objective,
                    "search_seconds": time.perf_counter() - t0,
                    "masked": res.masked,
                },
            )
        )
    return results, {"alpha": options.alpha}


def search_layered(options: SearchOptions, ctx: SearchContext, budgets):
    """[(spec, SubnetConfig, info)] for every budget at one activation width, and the method's
    record (a_bits)."""
    space = ctx.space
    a_bits = options.a_bits if options.a_bits is not None else max(space.a_bits)
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
