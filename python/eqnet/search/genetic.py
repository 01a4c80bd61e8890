"""Genetic search over per-layer choices (EQ-Net supplement Algorithm 1, lines 11-19;
MultiQuant §3.3).

The population is scored by a batched fitness (the accuracy predictor); the elites are the top
`elites` of every genome scored so far (line 14: TopK over O_0..O_n); the next population is
`mutations` mutated elites plus `crossovers` uniform crossovers of two elites. A child that
breaks the budget is redrawn (from fresh random parents and genes) until it fits, so every
member of every population meets the constraints; after `max_redraws` failed rounds the
remaining slots copy their (feasible) parents.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from eqnet.search.genome import Budget, ChoiceTable


@dataclass
class GAResult:
    best: np.ndarray  # genome [L]
    best_fitness: float
    elites: np.ndarray  # [elites, L], best first
    elite_fitness: np.ndarray
    history: list[float] = field(default_factory=list)  # best fitness after each iteration
    evaluations: int = 0


def _check_counts(**counts):
    for name, v in counts.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r}: must be an int >= 1")


def genetic_search(
    table: ChoiceTable,
    fitness: Callable[[np.ndarray], np.ndarray],
    budget: Budget,
    *,
    initial: np.ndarray | None = None,
    population: int = 100,
    elites: int = 25,
    mutations: int = 50,
    crossovers: int = 50,
    iterations: int = 500,
    mutation_prob: float = 0.1,
    max_redraws: int = 50,
    seed: int = 0,
    threads: int | None = 1,
) -> GAResult:
    """Maximize `fitness` (genomes [N, L] -> scores [N]) over genomes meeting `budget`.

    `initial` is the first population (e.g. Monte Carlo samples; must meet the budget); by
    default it is drawn by rejection from uniform choices. `threads` caps torch's intra-op
    threads during the search (restored afterwards): a fitness call scores ~100 configs, far
    too little work to share, and on a busy machine idle-spinning worker threads made each
    call ~15x slower than one thread.
    """
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _search(
            table,
            fitness,
            budget,
            initial,
            population,
            elites,
            mutations,
            crossovers,
            iterations,
            mutation_prob,
            max_redraws,
            seed,
        )
    finally:
        torch.set_num_threads(previous)


def _search(
    table,
    fitness,
    budget,
    initial,
    population,
    elites,
    mutations,
    crossovers,
    iterations,
    mutation_prob,
    max_redraws,
    seed,
) -> GAResult:
    _check_counts(
        population=population,
        elites=elites,
        mutations=mutations,
        crossovers=crossovers,
        iterations=iterations,
    )
    if elites > population:
        raise ValueError(f"elites={elites} must not exceed population={population}")
    if not 0.0 < mutation_prob <= 1.0:
        raise ValueError(f"mutation_prob={mutation_prob}: must be in (0, 1]")
    rng = np.random.default_rng(seed)
    n_layers = table.n_layers

    if initial is None:
        from eqnet.search.montecarlo import uniform_sample

        initial, _rep = uniform_sample(table, budget, population, rng)
        if len(initial) < population:
            raise ValueError(
                f"uniform sampling found {len(initial)} of {population} configs meeting the "
                "budget; pass `initial` from a MonteCarloSampler"
            )
    pop = np.asarray(initial, dtype=np.int64)
    if pop.ndim != 2 or pop.shape[1] != n_layers or len(pop) == 0:
        raise ValueError(f"initial has shape {pop.shape}, expected [N >= 1, {n_layers}]")
    if (pop < 0).any() or (pop >= table.n_choices).any():
        raise ValueError("initial holds choice indices outside the table")
    if not budget.ok(pop).all():
        raise ValueError("every genome of `initial` must meet the budget")

    def score(g):
        s = np.asarray(fitness(g), dtype=np.float64).reshape(-1)
        if s.shape[0] != len(g):
            raise ValueError(f"fitness returned {s.shape[0]} scores for {len(g)} genomes")
        return s

    fit = score(pop)
    evaluations = len(pop)
    elite_g, elite_f = _top(pop, fit, elites)
    history = []

    for _ in range(iterations):
        mutated = _feasible(
            lambda k, parents=elite_g: _mutate(parents, k, table, mutation_prob, rng),
            mutations,
            budget,
            elite_g,
            rng,
            max_redraws,
        )
        crossed = _feasible(
            lambda k, parents=elite_g: _crossover(parents, k, rng),
            crossovers,
            budget,
            elite_g,
            rng,
            max_redraws,
        )
        children = np.concatenate([mutated, crossed])
        child_f = score(children)
        evaluations += len(children)
        elite_g, elite_f = _top(
            np.concatenate([elite_g, children]), np.concatenate([elite_f, child_f]), elites
        )
        history.append(float(elite_f[0]))

    return GAResult(elite_g[0].copy(), float(elite_f[0]), elite_g, elite_f, history, evaluations)


def _top(genomes: np.ndarray, fit: np.ndarray, k: int):
    """The k best distinct genomes (duplicates would let one config crowd out the elite)."""
    _, first = np.unique(genomes, axis=0, return_index=True)
    genomes, fit = genomes[first], fit[first]
    # stable sort on -fitness, ties broken by the unique order: deterministic
    order = np.argsort(-fit, kind="stable")[:k]
    return genomes[order], fit[order]


def _mutate(parents, k, table, prob, rng):
    base = parents[rng.integers(len(parents), size=k)]
    fresh = table.uniform(rng, k)
    flip = rng.random(base.shape) < prob
    return np.where(flip, fresh, base)


def _crossover(parents, k, rng):
    a = parents[rng.integers(len(parents), size=k)]
    b = parents[rng.integers(len(parents), size=k)]
    return np.where(rng.random(a.shape) < 0.5, a, b)


def _feasible(make, k, budget, parents, rng, max_redraws):
    out = np.empty((0, parents.shape[1]), dtype=np.int64)
    for _ in range(max_redraws):
        need = k - len(out)
        if need == 0:
            return out
        # draw extra candidates so one round usually fills every slot
        cand = make(2 * need)
        out = np.concatenate([out, cand[budget.ok(cand)][:need]])
    need = k - len(out)
    if need:
        out = np.concatenate([out, parents[rng.integers(len(parents), size=need)]])
    return out
