"""The `ga` method: a Monte Carlo accuracy dataset, an accuracy predictor fitted on it, the
genetic search on the predictor, and a rerank of its best configs on held-out images."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from eqkernels import atomic
from eqnet.search.accuracy_data import build_dataset, row_config
from eqnet.search.genetic import genetic_search
from eqnet.search.genome import Budget, ChoiceTable
from eqnet.search.montecarlo import MonteCarloSampler
from eqnet.search.noise_predictor import NoiseRidgePredictor
from eqnet.search.predictor import AccuracyPredictor
from eqnet.search.rerank import Measured, choose

from .context import DatasetWorkers, SearchContext, log
from .options import SearchOptions


def search_ga(options: SearchOptions, ctx: SearchContext, budgets, out: Path):
    """One config per (spec, constraints) of `budgets`: [(spec, SubnetConfig, info)] and the
    method's record (the predictor and its fit). Writes the accuracy dataset and the predictor
    into `out`."""
    table = ChoiceTable.from_model(ctx.space, ctx.supernet, forms=options.forms)
    mt = table.metric_table(ctx.cost, options.mc_metric)
    sampler = MonteCarloSampler(table, mt, options.mc_metric, seed=options.seed)
    # the dataset spans the whole budget range: every populated bucket equally often;
    # distinct configs only (a small space repeats draws), as many as the space holds
    anywhere = Budget(table, ctx.cost, [])
    genomes = np.empty((0, table.n_layers), dtype=np.int64)
    for _ in range(20):
        more, _ = sampler.sample(options.dataset_size, anywhere)
        genomes = np.concatenate([genomes, more])
        _, first = np.unique(genomes, axis=0, return_index=True)
        genomes = genomes[np.sort(first)]
        if len(genomes) >= options.dataset_size:
            break
    genomes = genomes[: options.dataset_size]
    # the cached accuracies are only comparable under the same evaluation
    setting = {"holdout_images": len(ctx.holdout_loader.dataset), "bn_batches": ctx.bn_batches}
    meta = out / "accuracy_setting.json"
    if meta.exists() and json.loads(meta.read_text()) != setting:
        raise ValueError(
            f"{out / 'accuracy.jsonl'} was evaluated with {meta.read_text().strip()}, this run "
            f"asks for {json.dumps(setting)}; choose another --out or the same settings"
        )
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(meta, json.dumps(setting))
    t0 = time.perf_counter()
    with DatasetWorkers(options) as workers:
        rows = build_dataset(
            out / "accuracy.jsonl",
            [table.decode(g) for g in genomes],
            lambda cfg: ctx.accuracy(cfg, ctx.holdout_loader),
            ctx.cost.metrics,
            progress=options.progress,
            imap=workers.imap,
        )
    log(f"accuracy dataset: {len(rows)} configs ({time.perf_counter() - t0:.1f} s)")
    enc = torch.stack([row_config(r).encode() for r in rows])
    acc = torch.tensor([r["accuracy"] for r in rows])
    t0 = time.perf_counter()
    predictor, report, chosen = fit_predictor(options, enc, acc, out)
    atomic.write_text(
        out / "predictor_report.json",
        json.dumps({"predictor": options.predictor, **report.to_dict(), **chosen}, indent=2),
    )
    log(
        f"predictor ({options.predictor}): Kendall tau {report.kendall_tau:.3f}, Pearson r "
        f"{report.pearson_r:.3f} on {report.n_val} held-out configs "
        f"({time.perf_counter() - t0:.1f} s; the plain mean bit-width ranks them with tau "
        f"{report.mean_bits_kendall_tau:.3f})"
    )
    fitness = predictor.fitness(table)
    results = []
    for spec, constraints in budgets:
        budget = Budget(table, ctx.cost, constraints)
        main = constraints[0].metric
        init_sampler = (
            sampler
            if main == options.mc_metric
            else MonteCarloSampler(
                table, table.metric_table(ctx.cost, main), main, seed=options.seed
            )
        )
        try:
            init, rep = init_sampler.sample(options.population, budget)
        except ValueError:
            # a budget at the very edge of the range (e.g. exactly the all-lowest config)
            # leaves no bucket to sample from; start from the cheapest config instead
            cheapest = np.nanargmin(budget.tables[main], axis=1)[None]
            if not budget.ok(cheapest).all():
                raise
            init, rep = cheapest, None
        t0 = time.perf_counter()
        res = genetic_search(
            table,
            fitness,
            budget,
            initial=init,
            population=options.population,
            elites=options.elites,
            mutations=options.mutations,
            crossovers=options.crossovers,
            iterations=options.iterations,
            seed=options.seed,
        )
        wall = time.perf_counter() - t0
        best, info = res.best, {"predicted_accuracy": res.best_fitness}
        if options.rerank > 0:
            best, info = rerank(options, ctx, table, budget, res)
        results.append(
            (
                spec,
                table.decode(best),
                {
                    **info,
                    "search_seconds": wall,
                    "mc_trials_per_sample": rep.trials_per_sample if rep else None,
                },
            )
        )
        log(f"{spec}: GA best predicted {res.best_fitness:.4f} in {wall:.1f} s")
    return results, {"predictor": {"kind": options.predictor, **report.to_dict(), **chosen}}


def fit_predictor(options: SearchOptions, enc, acc, out: Path):
    """The options' predictor, fitted on the accuracy dataset and saved in `out`; returns it,
    its FitReport and the hyperparameters it chose for itself (noise-ridge: alpha, gamma)."""
    if options.predictor == "mlp":
        predictor = AccuracyPredictor(enc.shape[1])
        report = predictor.fit(
            enc,
            acc,
            epochs=options.predictor_epochs,
            seed=options.seed,
            val_fraction=options.val_fraction,
        )
        predictor.save(out / "predictor-mlp.pt")
        return predictor, report, {}
    predictor = NoiseRidgePredictor(enc.shape[1])
    report = predictor.fit(enc, acc, seed=options.seed, val_fraction=options.val_fraction)
    predictor.save(out / "predictor-noise-ridge.json")
    return predictor, report, {"alpha": predictor.alpha, "gamma": predictor.gamma}


def rerank(options: SearchOptions, ctx: SearchContext, table, budget, res):
    """The predictor ranks; the held-out images decide among its K best configs and the
    uniform widths that meet the budget (eqnet.search.rerank: a mixed config is kept only if
    it beats the best uniform one by `rerank_z` paired standard errors)."""
    candidates = {}  # genome -> (origin, predicted accuracy)
    k = options.rerank
    for g, fit in zip(res.elites[:k], res.elite_fitness[:k]):
        candidates.setdefault(tuple(int(v) for v in g), ("ga", float(fit)))
    for label, cfg in ctx.uniform_widths():
        try:
            g = table.genome_of(cfg)
        except (KeyError, ValueError):  # the width is not among the table's choices
            continue
        if budget.ok(g[None])[0]:
            candidates.setdefault(tuple(int(v) for v in g), (f"uniform {label}", None))
    genomes, measured = list(candidates), []
    for g in genomes:
        origin, predicted = candidates[g]
        correct = ctx.correct(table.decode(np.array(g)), ctx.rerank_loader)
        measured.append(Measured(origin, correct, predicted))
        log(f"  rerank: {origin} held-out accuracy {measured[-1].accuracy:.4f}")
    i, record = choose(measured, options.rerank_z)
    if record["z_vs_uniform"] is not None:
        kept = "kept" if measured[i].origin == "ga" else "not kept"
        log(f"  rerank: best mixed config z = {record['z_vs_uniform']:.2f} vs uniform: {kept}")
    info = {
        "predicted_accuracy": measured[i].predicted,
        "ga_best_predicted_accuracy": res.best_fitness,
        "holdout_accuracy": measured[i].accuracy,
        "rerank_images": len(ctx.rerank_loader.dataset),
        "chosen_from": measured[i].origin,
        "reranked": len(measured),
        "rerank_z_min": options.rerank_z,
        **record,
    }
    return np.array(genomes[i]), info
