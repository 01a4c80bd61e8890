"""Search speed on a ResNet-18-sized space (21 quantized layers x 49 (w, a) choices).

1. Genetic search, 500 generations x 100, scored by each accuracy predictor (the MLP with
   untrained weights, the noise ridge fitted to random accuracies: the time does not depend on
   the weights); baseline: that predictor alone on the same number of configs in one batch
   (the irreducible scoring cost). Target: GA under 30 s.
2. The ILP `choose_per_layer` (LIMPQ objective with random indicators) under BitOPs + size;
   baseline: its LP relaxation (scipy linprog, HiGHS) on the same problem. Target: under 1 s.
3. Monte Carlo sampling vs uniform rejection sampling: trials per accepted config.

Run: .venv/bin/python -m bench.bench_search   (EQK_BENCH_QUICK=1: fewer GA generations)
`cpu_seconds` is the process CPU time: on a shared machine it shows what the wall time would
be without the other jobs.
"""

from __future__ import annotations

import os
import time

import eqnet
import numpy as np
import torch
from eqnet.models import get as get_model
from eqnet.search.cost import CostModel
from eqnet.search.genetic import genetic_search
from eqnet.search.genome import Budget, ChoiceTable, Constraint, parse_constraints
from eqnet.search.ilp import budget_rows, choose_per_layer
from eqnet.search.montecarlo import MonteCarloSampler, uniform_sample
from eqnet.search.noise_predictor import NoiseRidgePredictor
from eqnet.search.predictor import AccuracyPredictor, predictor_fitness
from eqnet.space import ElasticSpace

from bench.harness import Table, threads_from_env


def resnet18_space():
    space = ElasticSpace()  # W and A in 2..8: 49 choices per layer
    supernet = eqnet.convert(
        get_model("torchvision:resnet18", 1000), space, keep_first_last="elastic"
    )
    cost = CostModel.trace(supernet, (1, 3, 224, 224))
    table = ChoiceTable.from_model(space, supernet, forms=False)
    return table, cost


def bench_ga(table, cost, iterations):
    t = Table(
        "search_ga",
        ["predictor", "what", "generations", "population", "configs", "seconds", "cpu_seconds"],
    )
    mlp = AccuracyPredictor(table.n_layers * 5)  # 150 wide, 3 hidden layers
    ridge = NoiseRidgePredictor(table.n_layers * 5)
    rng = np.random.default_rng(0)
    g = table.uniform(rng, 200)
    ridge.fit(table.encode(g), torch.tensor(rng.random(200)))
    budget = Budget(table, cost, parse_constraints("avg_bits<=4"))
    mt = table.metric_table(cost, "avg_bits")
    sampler = MonteCarloSampler(table, mt, "avg_bits")
    init, _ = sampler.sample(100, budget)
    for name, fitness in (
        ("mlp", predictor_fitness(mlp, table)),
        ("noise-ridge", ridge.fitness(table)),
    ):
        t0, c0 = time.perf_counter(), time.process_time()
        res = genetic_search(table, fitness, budget, initial=init, iterations=iterations, seed=0)
        ga, ga_cpu = time.perf_counter() - t0, time.process_time() - c0
        t.add(
            predictor=name,
            what="GA",
            generations=iterations,
            population=100,
            configs=res.evaluations,
            seconds=ga,
            cpu_seconds=ga_cpu,
        )
        assert budget.ok(res.elites).all()
        genomes = table.uniform(np.random.default_rng(0), res.evaluations)
        torch.set_num_threads(1)  # as genetic_search runs it
        t0, c0 = time.perf_counter(), time.process_time()
        fitness(genomes)
        base, base_cpu = time.perf_counter() - t0, time.process_time() - c0
        t.add(
            predictor=name,
            what="predictor alone, one batch",
            generations=1,
            population=res.evaluations,
            configs=res.evaluations,
            seconds=base,
            cpu_seconds=base_cpu,
        )
    t.ratio_to("x_vs_ga", "seconds", lambda r: r["what"] == "GA", group_by=["predictor"])
    return t


def bench_ilp(table, cost):
    from scipy.optimize import linprog

    t = Table("search_ilp", ["solver", "layers", "choices", "seconds", "cpu_seconds"])
    rng = np.random.default_rng(0)
    ind_w = np.sort(rng.random((table.n_layers, 7)), axis=1)[:, ::-1]
    ind_a = np.sort(rng.random((table.n_layers, 7)), axis=1)[:, ::-1]
    objective = [
        np.array([ind_a[i, c.a_bits - 2] + 2.0 * ind_w[i, c.w_bits - 2] for c in opts])
        for i, opts in enumerate(table.choices)
    ]
    lo = {m: np.nanmin(table.metric_table(cost, m), 1).sum() for m in ("bitops", "size")}
    hi = {m: np.nanmax(table.metric_table(cost, m), 1).sum() for m in ("bitops", "size")}
    cons = [Constraint(m, "<=", lo[m] + 0.3 * (hi[m] - lo[m])) for m in ("bitops", "size")]
    costs, limits = budget_rows(table, cost, cons)
    times, cpu = [], []
    for _ in range(5):
        t0, c0 = time.perf_counter(), time.process_time()
        choose_per_layer(objective, costs, limits)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    t.add(
        solver="choose_per_layer (milp)",
        layers=table.n_layers,
        choices=int(table.n_choices[0]),
        seconds=float(np.median(times)),
        cpu_seconds=float(np.median(cpu)),
    )
    # LP relaxation of the same program
    n = int(table.n_choices.sum())
    c = np.concatenate(objective)
    a_eq = np.zeros((table.n_layers, n))
    off = np.concatenate([[0], np.cumsum(table.n_choices)])
    for i in range(table.n_layers):
        a_eq[i, off[i] : off[i + 1]] = 1
    a_ub = np.stack([np.concatenate(costs[k]) / limits[k] for k in costs])
    times, cpu = [], []
    for _ in range(5):
        t0, c0 = time.perf_counter(), time.process_time()
        linprog(
            c,
            A_ub=a_ub,
            b_ub=np.ones(len(costs)),
            A_eq=a_eq,
            b_eq=np.ones(table.n_layers),
            bounds=(0, 1),
            method="highs",
        )
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    t.add(
        solver="LP relaxation (linprog)",
        layers=table.n_layers,
        choices=int(table.n_choices[0]),
        seconds=float(np.median(times)),
        cpu_seconds=float(np.median(cpu)),
    )
    t.ratio_to("x_vs_milp", "seconds", lambda r: "milp" in r["solver"], group_by=[])
    return t


def bench_mc(table, cost):
    t = Table(
        "search_mc",
        ["constraint", "mc_trials_per_sample", "uniform_trials_per_sample", "uniform_accepted"],
    )
    samplers = {}
    for spec in ("avg_bits<=3", "avg_bits<=4", "avg_bits<=5", "avg_bits>=7", "bitops<=40G"):
        budget = Budget(table, cost, parse_constraints(spec))
        metric = budget.constraints[0].metric
        if metric not in samplers:
            samplers[metric] = MonteCarloSampler(table, table.metric_table(cost, metric), metric)
        _, rep = samplers[metric].sample(200, budget)
        _, urep = uniform_sample(table, budget, 200, np.random.default_rng(0), max_trials=200_000)
        t.add(
            constraint=spec,
            mc_trials_per_sample=rep.trials_per_sample,
            uniform_trials_per_sample=urep.trials_per_sample if urep.accepted else float("inf"),
            uniform_accepted=f"{urep.accepted}/200 in {urep.trials}",
        )
    return t


def main():
    threads_from_env()
    quick = os.environ.get("EQK_BENCH_QUICK") == "1"
    with torch.no_grad():
        table, cost = resnet18_space()
    print(
        f"space: {table.n_layers} layers x {int(table.n_choices[0])} choices; "
        f"BitOPs {np.nanmin(table.metric_table(cost, 'bitops'), 1).sum():.3g} .. "
        f"{np.nanmax(table.metric_table(cost, 'bitops'), 1).sum():.3g}\n"
    )
    for t in (
        bench_ilp(table, cost),
        bench_mc(table, cost),
        bench_ga(table, cost, 50 if quick else 500),
    ):
        print(f"\n### {t.name}\n")
        t.finish()


if __name__ == "__main__":
    main()
