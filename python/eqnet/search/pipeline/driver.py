"""`run_search`: search one config per budget, measure every chosen config and the uniform
widths on the test split, and write configs.json and the Pareto CSV/PNG."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from eqkernels import atomic
from eqnet.search import pareto
from eqnet.search.accuracy_data import fraction_correct
from eqnet.search.genome import parse_constraints
from eqnet.search.rerank import paired_z

from .context import SearchContext, log
from .method_ga import search_ga
from .method_ilp import search_layered, search_limpq
from .options import SearchOptions


@dataclass
class SearchResult:
    """What `run_search` wrote: the output directory and configs.json's content (`record`);
    `chosen` is its list, one entry per constraint."""

    out: Path
    record: dict

    @property
    def chosen(self) -> list[dict]:
        return self.record["chosen"]


def output_dir(options: SearchOptions) -> Path:
    """`options.out`, or RUN/search-METHOD."""
    if options.out is not None:
        return Path(options.out)
    return Path(options.run) / f"search-{options.method}"


def run_search(options: SearchOptions) -> SearchResult:
    """Search the trained run `options.run` once per constraint with `options.method`, then
    measure each chosen config on the test split against the widest uniform width inside its
    budget (McNemar z on the same images). Writes into `output_dir(options)`:

      configs.json     the chosen configs with their constraint, metrics, test accuracy and
                       uniform comparison (uniform_at_budget, uniform_test_accuracy,
                       test_z_vs_uniform), plus the method's own record
      pareto.csv/.png  accuracy vs BitOPs and vs size, chosen configs and uniform widths
      accuracy.jsonl   (ga) the Monte Carlo accuracy dataset on the held-out split
                       (accuracy_setting.json: the images and BN batches it was measured with)
      predictor-noise-ridge.json or predictor-mlp.pt (+ .json), predictor_report.json (ga)

    Raises ValueError (OptionError for a bad option) on a bad constraint or an infeasible
    budget, FileNotFoundError when the run does not exist. Progress goes to stderr."""
    budgets = [(spec, parse_constraints(spec)) for spec in options.constraints]
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    out = output_dir(options)
    out.mkdir(parents=True, exist_ok=True)
    atomic.remove_stale_temps(out)  # left by a killed run
    ctx = SearchContext(options)
    if options.method == "ga":
        results, extra = search_ga(options, ctx, budgets, out)
    elif options.method == "limpq":
        results, extra = search_limpq(options, ctx, budgets)
    else:
        results, extra = search_layered(options, ctx, budgets)

    # the uniform widths first: each chosen config is compared with the widest one in its
    # budget on the same test images (paired, so the z says whether the gap is real)
    uniforms = []  # (label, metrics, per-image test correctness)
    if options.uniform:
        for label, cfg in ctx.uniform_widths():
            uniforms.append((label, ctx.cost.metrics(cfg), ctx.correct(cfg, ctx.test_loader)))
    constraints_of = dict(budgets)
    rows, chosen = [], []
    for spec, cfg, info in results:
        cfg.validate(ctx.space, ctx.supernet)
        metrics = ctx.cost.metrics(cfg)
        correct = ctx.correct(cfg, ctx.test_loader)
        acc = fraction_correct(correct)
        versus = versus_uniform(correct, uniforms, constraints_of[spec])
        chosen.append(
            {
                "constraint": spec,
                "method": options.method,
                "test_accuracy": acc,
                **versus,
                **metrics,
                **info,
                "config": json.loads(cfg.to_json())["layers"],
            }
        )
        rows.append({"label": spec, "kind": options.method, "accuracy": acc, **metrics})
        against = (
            f"; uniform {versus['uniform_at_budget']} {versus['uniform_test_accuracy']:.4f}, "
            f"paired z {versus['test_z_vs_uniform']:+.2f}"
            if versus["uniform_at_budget"]
            else ""
        )
        log(f"{spec}: test accuracy {acc:.4f}{against}, {cfg.summary()}")
    for label, metrics, correct in uniforms:
        rows.append(
            {"label": label, "kind": "uniform", "accuracy": fraction_correct(correct), **metrics}
        )
    record = {"run": str(options.run), "method": options.method, **extra, "chosen": chosen}
    atomic.write_text(out / "configs.json", json.dumps(record, indent=2))
    pareto.write_csv(out / "pareto.csv", rows)
    pareto.plot(out / "pareto.png", rows, title=f"{options.method}: {Path(options.run).name}")
    log(f"wrote {out}/configs.json, pareto.csv, pareto.png")
    return SearchResult(out, record)


def versus_uniform(correct, uniforms, constraints) -> dict:
    """The chosen config's test result against the widest uniform width that meets all of
    `constraints` (at a BitOPs budget set by a uniform width: that width). The z is McNemar's
    on the same test images (eqnet.search.rerank.paired_z): positive when the chosen config is
    better, 0 when both are right on the same images."""
    inside = [
        (label, c)
        for label, metrics, c in uniforms
        if all(con.ok(np.asarray(metrics[con.metric])) for con in constraints)
    ]
    if not inside:
        return {"uniform_at_budget": None, "uniform_test_accuracy": None, "test_z_vs_uniform": None}
    label, ref = inside[-1]
    return {
        "uniform_at_budget": label,
        "uniform_test_accuracy": fraction_correct(ref),
        "test_z_vs_uniform": paired_z(correct, ref),
    }
