"""`eqnet search RUN --method ga|limpq|layered --constraint bitops<=X ...`

Reads a trained run directory, searches one mixed-precision config per --constraint, then
evaluates every chosen config and the uniform widths for real (BN re-estimated on the held-out
images under the training augmentation, accuracy on the test split). Writes to --out (default
RUN/search-METHOD):

  configs.json     the chosen configs with their constraint, metrics and test accuracy, and
                   the widest uniform width inside the budget on the same test images
                   (uniform_at_budget, uniform_test_accuracy, test_z_vs_uniform: McNemar z)
                   (ga: the predictor's K best and the uniform widths inside the budget are
                   measured on the held-out images and the most accurate is kept, --rerank)
  pareto.csv/.png  accuracy vs BitOPs and vs size, chosen configs and uniform widths
  accuracy.jsonl   (ga) the Monte Carlo balanced accuracy dataset on the held-out split
                   (accuracy_setting.json: the images and BN batches it was measured with)
  predictor-noise-ridge.json or predictor-mlp.pt (+ .json, its shape)
                   (ga) the accuracy predictor (--predictor); predictor_report.json its
                   Kendall tau / Pearson r on the held-out configs

Building the accuracy dataset is most of a GA search's time; --dataset-workers N measures its
configs in N worker processes, each with its own copy of the run (see _DatasetWorkers).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

METHODS = ("ga", "limpq", "layered")
PREDICTORS = ("noise-ridge", "mlp")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="trained run directory (eqnet train --out)")
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument(
        "--constraint",
        action="append",
        required=True,
        metavar="SPEC",
        help="e.g. 'bitops<=1.5G', 'size<=200k', 'avg_bits<=4' (comma = all of them); "
        "repeat for several targets",
    )
    p.add_argument("--out", default=None, metavar="DIR", help="default RUN/search-METHOD")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    p.add_argument("--bn-batches", type=int, default=None, help="default: the run's bn_batches")
    p.add_argument("--no-uniform", action="store_true", help="skip the uniform-width baselines")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("ga")
    g.add_argument("--dataset-size", type=int, default=500, help="configs in the accuracy data")
    g.add_argument("--population", type=int, default=100)
    g.add_argument("--elites", type=int, default=25)
    g.add_argument("--mutations", type=int, default=50)
    g.add_argument("--crossovers", type=int, default=50)
    g.add_argument("--iterations", type=int, default=500)
    g.add_argument(
        "--predictor",
        choices=PREDICTORS,
        default="noise-ridge",
        help="noise-ridge (default): ridge regression on per-layer quantization-noise powers "
        "(eqnet.search.noise_predictor); mlp: MultiQuant's MLP on the one-hot encoding",
    )
    g.add_argument("--predictor-epochs", type=int, default=200, help="mlp training epochs")
    g.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="share of the accuracy dataset held out to report the predictor's Kendall tau",
    )
    g.add_argument(
        "--holdout-images",
        type=int,
        default=None,
        metavar="N",
        help="evaluate the accuracy dataset on the first N held-out images (default: all; "
        "the same fixed images for every config)",
    )
    g.add_argument(
        "--dataset-workers",
        type=int,
        default=1,
        metavar="N",
        help="processes that measure the accuracy dataset's configs in parallel (default 1; "
        "each loads the run once and uses --threads threads, default cores / N)",
    )
    g.add_argument("--mc-metric", default="avg_bits", help="metric the MC sampler buckets")
    g.add_argument(
        "--forms", action="store_true", help="also search granularity/symmetry (if the space has)"
    )
    g.add_argument(
        "--rerank",
        type=int,
        default=8,
        metavar="K",
        help="measure the GA's K best configs, and every uniform width inside the budget, on "
        "the held-out images and keep the most accurate (0: the predictor's best)",
    )
    g.add_argument(
        "--rerank-z",
        type=float,
        default=1.0,
        metavar="Z",
        help="keep the best mixed config over the best in-budget uniform width only if it "
        "wins by at least Z standard errors of the paired difference on the same images "
        "(McNemar; default 1; 0: plain most accurate)",
    )
    g.add_argument(
        "--rerank-images",
        type=int,
        default=None,
        metavar="N",
        help="held-out images the rerank measures on (default: all of them, even when "
        "--holdout-images limits the accuracy dataset: fewer images add noise that the max "
        "over candidates turns into a bias toward lucky configs)",
    )
    lp = p.add_argument_group("limpq")
    lp.add_argument("--alpha", type=float, default=1.0, help="weight of I_w (LIMPQ: 1-3)")
    ly = p.add_argument_group("layered")
    ly.add_argument("--a-bits", type=int, default=None, help="activation width (default: max)")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _Context:
    """The trained run, its data, the cost model and the real evaluator."""

    def __init__(self, args):
        import torch

        from eqnet.data import bn_split, eval_loader, fixed_batches, load_data
        from eqnet.run import load_run
        from eqnet.search.cost import CostModel

        self.run = load_run(args.run, map_location=args.device)
        if self.run.space is None:
            raise ValueError(f"{args.run}: a float run has no quantization space to search")
        self.supernet = self.run.model.to(args.device)
        self.space = self.run.space
        c = self.run.config
        self.device = torch.device(args.device)
        self.bn_batches = args.bn_batches or c.bn_batches
        # the run's own held-out / test split; BN statistics from the augmented held-out images
        self.data = load_data(
            c.data,
            holdout=c.holdout,
            limit_train=c.limit_train,
            limit_test=c.limit_test,
            augment=False,
        )
        # on the device once: every config's re-estimation reads the same batches
        self.bn_images = [
            x.to(self.device)
            for x in fixed_batches(bn_split(self.data), c.batch_size, self.bn_batches)
        ]
        holdout = self.data.holdout
        n = getattr(args, "holdout_images", None)
        self.holdout_loader = eval_loader(
            self._first(holdout, n, "--holdout-images"), c.eval_batch_size
        )
        self.rerank_loader = eval_loader(
            self._first(holdout, getattr(args, "rerank_images", None), "--rerank-images"),
            c.eval_batch_size,
        )
        self.test_loader = eval_loader(self.data.test, c.eval_batch_size)
        self.cost = CostModel.trace(self.supernet, (1, *self.data.input_shape))

    @staticmethod
    def _first(dataset, n, option):
        import torch

        if n is None:
            return dataset
        if n < 1:
            raise ValueError(f"{option}={n}: accepted values are >= 1")
        return torch.utils.data.Subset(dataset, range(min(n, len(dataset))))

    def correct(self, cfg, loader):
        """Per-image correctness (bool [N]) of subnet cfg on loader, after its BN
        re-estimation; `accuracy` reduces it to top-1."""
        from eqnet.search.accuracy_data import supernet_correctness

        return supernet_correctness(
            self.supernet, self.bn_images, loader, self.bn_batches, self.device
        )(cfg)

    def accuracy(self, cfg, loader) -> float:
        from eqnet.search.accuracy_data import fraction_correct

        return fraction_correct(self.correct(cfg, loader))

    def uniform_widths(self):
        """[(label 'WbAb', config)] of every width both weights and activations take, narrowest
        first: the baselines the rerank and the final comparison measure."""
        from eqnet.space import SubnetConfig

        return [
            (f"W{b}A{b}", SubnetConfig.uniform(self.space, self.supernet, b, b))
            for b in sorted(set(self.space.w_bits) & set(self.space.a_bits))
        ]


class _DatasetWorkers:
    """--dataset-workers: a pool of spawned processes that measure configs' held-out accuracy.

    Every worker builds its own `_Context` from the same arguments, so it re-estimates BN on
    the same fixed batches and measures the same images as the main process: a config's
    accuracy does not depend on which process measured it. Workers split the configs where
    intra-op threads split each forward; they help where the threads stop scaling (on 2 cores
    both give the same rate, docs/search.md). Spawned rather than forked, because a forked
    child of a process that has used OpenMP threads may hang. `imap` is None with one worker
    (the main process evaluates)."""

    def __init__(self, args):
        self.args, self.pool = args, None
        self.imap = self._imap if args.dataset_workers > 1 else None  # >= 1: checked in _run

    def _imap(self, configs):
        if self.pool is None:  # started only when there is something to measure
            import multiprocessing

            import torch

            n = self.args.dataset_workers
            threads = self.args.threads or max(1, torch.get_num_threads() // n)
            _log(f"accuracy dataset: {n} worker processes, {threads} thread(s) each")
            self.pool = multiprocessing.get_context("spawn").Pool(
                n, initializer=_worker_start, initargs=(self.args, threads)
            )
        return self.pool.imap(_worker_accuracy, [c.to_json() for c in configs])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate()  # on an error too: no orphaned workers
            self.pool.join()
        return False


_worker_ctx = None


def _worker_start(args, threads: int) -> None:
    global _worker_ctx
    import torch

    torch.set_num_threads(threads)
    _worker_ctx = _Context(args)


def _worker_accuracy(config_json: str) -> float:
    from eqnet.space import SubnetConfig

    return _worker_ctx.accuracy(SubnetConfig.from_json(config_json), _worker_ctx.holdout_loader)


def _search_ga(args, ctx, budgets, out: Path):
    import numpy as np
    import torch

    from eqnet.search.accuracy_data import build_dataset, row_config
    from eqnet.search.genetic import genetic_search
    from eqnet.search.genome import Budget, ChoiceTable
    from eqnet.search.montecarlo import MonteCarloSampler

    table = ChoiceTable.from_model(ctx.space, ctx.supernet, forms=args.forms)
    mt = table.metric_table(ctx.cost, args.mc_metric)
    sampler = MonteCarloSampler(table, mt, args.mc_metric, seed=args.seed)
    # the dataset spans the whole budget range: every populated bucket equally often;
    # distinct configs only (a small space repeats draws), as many as the space holds
    anywhere = Budget(table, ctx.cost, [])
    genomes = np.empty((0, table.n_layers), dtype=np.int64)
    for _ in range(20):
        more, _ = sampler.sample(args.dataset_size, anywhere)
        genomes = np.concatenate([genomes, more])
        _, first = np.unique(genomes, axis=0, return_index=True)
        genomes = genomes[np.sort(first)]
        if len(genomes) >= args.dataset_size:
            break
    genomes = genomes[: args.dataset_size]
    # the cached accuracies are only comparable under the same evaluation
    setting = {"holdout_images": len(ctx.holdout_loader.dataset), "bn_batches": ctx.bn_batches}
    meta = out / "accuracy_setting.json"
    if meta.exists() and json.loads(meta.read_text()) != setting:
        raise ValueError(
            f"{out / 'accuracy.jsonl'} was evaluated with {meta.read_text().strip()}, this run "
            f"asks for {json.dumps(setting)}; choose another --out or the same settings"
        )
    out.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps(setting))
    t0 = time.perf_counter()
    with _DatasetWorkers(args) as workers:
        rows = build_dataset(
            out / "accuracy.jsonl",
            [table.decode(g) for g in genomes],
            lambda cfg: ctx.accuracy(cfg, ctx.holdout_loader),
            ctx.cost.metrics,
            progress=not args.no_progress,
            imap=workers.imap,
        )
    _log(f"accuracy dataset: {len(rows)} configs ({time.perf_counter() - t0:.1f} s)")
    enc = torch.stack([row_config(r).encode() for r in rows])
    acc = torch.tensor([r["accuracy"] for r in rows])
    t0 = time.perf_counter()
    predictor, report, chosen = _fit_predictor(args, enc, acc, out)
    (out / "predictor_report.json").write_text(
        json.dumps({"predictor": args.predictor, **report.to_dict(), **chosen}, indent=2)
    )
    _log(
        f"predictor ({args.predictor}): Kendall tau {report.kendall_tau:.3f}, Pearson r "
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
            if main == args.mc_metric
            else MonteCarloSampler(table, table.metric_table(ctx.cost, main), main, seed=args.seed)
        )
        try:
            init, rep = init_sampler.sample(args.population, budget)
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
            population=args.population,
            elites=args.elites,
            mutations=args.mutations,
            crossovers=args.crossovers,
            iterations=args.iterations,
            seed=args.seed,
        )
        wall = time.perf_counter() - t0
        best, info = res.best, {"predicted_accuracy": res.best_fitness}
        if args.rerank > 0:
            best, info = _rerank(args, ctx, table, budget, res)
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
        _log(f"{spec}: GA best predicted {res.best_fitness:.4f} in {wall:.1f} s")
    return results, {"predictor": {"kind": args.predictor, **report.to_dict(), **chosen}}


def _fit_predictor(args, enc, acc, out: Path):
    """The --predictor, fitted on the accuracy dataset and saved in `out`; returns it, its
    FitReport and the hyperparameters it chose for itself (noise-ridge: alpha, gamma)."""
    if args.predictor == "mlp":
        from eqnet.search.predictor import AccuracyPredictor

        predictor = AccuracyPredictor(enc.shape[1])
        report = predictor.fit(
            enc, acc, epochs=args.predictor_epochs, seed=args.seed, val_fraction=args.val_fraction
        )
        predictor.save(out / "predictor-mlp.pt")
        return predictor, report, {}
    from eqnet.search.noise_predictor import NoiseRidgePredictor

    predictor = NoiseRidgePredictor(enc.shape[1])
    report = predictor.fit(enc, acc, seed=args.seed, val_fraction=args.val_fraction)
    predictor.save(out / "predictor-noise-ridge.json")
    return predictor, report, {"alpha": predictor.alpha, "gamma": predictor.gamma}


def _versus_uniform(correct, uniforms, constraints) -> dict:
    """The chosen config's test result against the widest uniform width that meets all of
    `constraints` (at a BitOPs budget set by a uniform width: that width). The z is McNemar's
    on the same test images (eqnet.search.rerank.paired_z): positive when the chosen config is
    better, 0 when both are right on the same images."""
    import numpy as np

    from eqnet.search.accuracy_data import fraction_correct
    from eqnet.search.rerank import paired_z

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


def _rerank(args, ctx, table, budget, res):
    """The predictor ranks; the held-out images decide among its K best configs and the
    uniform widths that meet the budget (eqnet.search.rerank: a mixed config is kept only if
    it beats the best uniform one by --rerank-z paired standard errors)."""
    import numpy as np

    from eqnet.search.rerank import Measured, choose

    candidates = {}  # genome -> (origin, predicted accuracy)
    for g, fit in zip(res.elites[: args.rerank], res.elite_fitness[: args.rerank]):
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
        _log(f"  rerank: {origin} held-out accuracy {measured[-1].accuracy:.4f}")
    i, record = choose(measured, args.rerank_z)
    if record["z_vs_uniform"] is not None:
        kept = "kept" if measured[i].origin == "ga" else "not kept"
        _log(f"  rerank: best mixed config z = {record['z_vs_uniform']:.2f} vs uniform: {kept}")
    info = {
        "predicted_accuracy": measured[i].predicted,
        "ga_best_predicted_accuracy": res.best_fitness,
        "holdout_accuracy": measured[i].accuracy,
        "rerank_images": len(ctx.rerank_loader.dataset),
        "chosen_from": measured[i].origin,
        "reranked": len(measured),
        "rerank_z_min": args.rerank_z,
        **record,
    }
    return np.array(genomes[i]), info


def _search_ilp(args, ctx, budgets):
    from eqnet.search.genome import ChoiceTable
    from eqnet.search.layered import layer_errors, layered_search, weights_from_supernet
    from eqnet.search.limpq import limpq_search

    results = []
    if args.method == "limpq":
        from eqnet.search.limpq import importance_indicators

        table = ChoiceTable.from_model(ctx.space, ctx.supernet, forms=False)
        indicators = importance_indicators(ctx.supernet)
        for spec, constraints in budgets:
            t0 = time.perf_counter()
            res = limpq_search(table, ctx.cost, indicators, constraints, alpha=args.alpha)
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
        return results, {"alpha": args.alpha}
    # layered
    space = ctx.space
    a_bits = args.a_bits if args.a_bits is not None else max(space.a_bits)
    if a_bits not in space.a_bits:
        raise ValueError(f"--a-bits={a_bits}: the space's activation widths are {space.a_bits}")
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
    for spec, constraints in budgets:
        t0 = time.perf_counter()
        cfg, err = layered_search(table, ctx.cost, errors, constraints)
        results.append(
            (spec, cfg, {"downsampling_error": err, "search_seconds": time.perf_counter() - t0})
        )
    return results, {"a_bits": a_bits}


def run(args) -> int:
    try:
        return _run(args)
    except (FileNotFoundError, ValueError) as exc:  # bad constraint, infeasible budget, no run
        print(f"eqnet search: error: {exc}", file=sys.stderr)
        return 1


def _run(args) -> int:
    from eqnet.search import pareto
    from eqnet.search.accuracy_data import fraction_correct
    from eqnet.search.genome import parse_constraints

    budgets = [(spec, parse_constraints(spec)) for spec in args.constraint]
    rerank_z = getattr(args, "rerank_z", 1.0)
    if not 0 <= rerank_z < float("inf"):
        raise ValueError(f"--rerank-z={rerank_z}: accepted values are finite and >= 0")
    if getattr(args, "dataset_workers", 1) < 1:
        raise ValueError(f"--dataset-workers={args.dataset_workers}: accepted values are >= 1")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads={args.threads}: must be >= 1")
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else Path(args.run) / f"search-{args.method}"
    out.mkdir(parents=True, exist_ok=True)
    ctx = _Context(args)
    if args.method == "ga":
        results, extra = _search_ga(args, ctx, budgets, out)
    else:
        results, extra = _search_ilp(args, ctx, budgets)

    # the uniform widths first: each chosen config is compared with the widest one in its
    # budget on the same test images (paired, so the z says whether the gap is real)
    uniforms = []  # (label, metrics, per-image test correctness)
    if not args.no_uniform:
        for label, cfg in ctx.uniform_widths():
            uniforms.append((label, ctx.cost.metrics(cfg), ctx.correct(cfg, ctx.test_loader)))
    constraints_of = dict(budgets)
    rows, chosen = [], []
    for spec, cfg, info in results:
        cfg.validate(ctx.space, ctx.supernet)
        metrics = ctx.cost.metrics(cfg)
        correct = ctx.correct(cfg, ctx.test_loader)
        acc = fraction_correct(correct)
        versus = _versus_uniform(correct, uniforms, constraints_of[spec])
        chosen.append(
            {
                "constraint": spec,
                "method": args.method,
                "test_accuracy": acc,
                **versus,
                **metrics,
                **info,
                "config": json.loads(cfg.to_json())["layers"],
            }
        )
        rows.append({"label": spec, "kind": args.method, "accuracy": acc, **metrics})
        against = (
            f"; uniform {versus['uniform_at_budget']} {versus['uniform_test_accuracy']:.4f}, "
            f"paired z {versus['test_z_vs_uniform']:+.2f}"
            if versus["uniform_at_budget"]
            else ""
        )
        _log(f"{spec}: test accuracy {acc:.4f}{against}, {cfg.summary()}")
    for label, metrics, correct in uniforms:
        rows.append(
            {"label": label, "kind": "uniform", "accuracy": fraction_correct(correct), **metrics}
        )
    (out / "configs.json").write_text(
        json.dumps(
            {"run": str(args.run), "method": args.method, **extra, "chosen": chosen}, indent=2
        )
    )
    pareto.write_csv(out / "pareto.csv", rows)
    pareto.plot(out / "pareto.png", rows, title=f"{args.method}: {Path(args.run).name}")
    _log(f"wrote {out}/configs.json, pareto.csv, pareto.png")
    print(
        json.dumps(
            [{k: c[k] for k in ("constraint", "test_accuracy", "bitops", "size")} for c in chosen]
        )
    )
    return 0
