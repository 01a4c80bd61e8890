"""Monte Carlo constrained sampling (MultiQuant §3.3, eq. 5-6).

Uniform sampling draws almost every config near the middle of the budget range, so a low or
high budget accepts a uniform sample only rarely. MultiQuant estimates, from a large pool of
(config, average width) pairs, the per-layer distribution of widths given the average width's
bucket, pi(b_l | tau) = #(b_l = k, tau = tau_0) / #(tau = tau_0) (eq. 6), and samples every
layer independently from it (eq. 5).

Here the pooled quantity is any additive metric of the cost model (avg_bits, bitops, size, ...)
and each layer's whole choice (weight and activation width and forms) is conditioned on it.
Extreme buckets hold almost no uniform samples, so the pool also contains samples from
exponentially tilted per-layer distributions p_l(c) ~ exp(lam * m_l(c) / scale), one scale
for all layers, so the product over layers is ~ exp(lam * metric / scale): given the
value of the metric (the sufficient statistic of that family), a tilted draw has the same
conditional distribution as a uniform one, so tilted samples estimate the same eq. 6
conditionals, only in buckets that uniform draws never reach. `tilts=(0,)` is the plain
uniform pool of the paper.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from eqnet.search.genome import Budget, ChoiceTable, Constraint

DEFAULT_TILTS = (-8.0, -4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0, 8.0)


def _sample_from(probs: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """n genomes from per-layer categorical probabilities probs [L, C_max]."""
    cdf = np.cumsum(probs, axis=1)
    cdf[:, -1] = np.maximum(cdf[:, -1], 1.0)  # rounding must not leave mass above 1
    u = rng.random((n, probs.shape[0], 1))
    return (u > cdf[None, :, :]).sum(axis=2).astype(np.int64)


@dataclass
class SamplerReport:
    accepted: int
    trials: int

    @property
    def trials_per_sample(self) -> float:
        return self.trials / self.accepted if self.accepted else float("inf")


class MonteCarloSampler:
    """Bucketed per-layer choice distributions of one additive metric."""

    def __init__(
        self,
        table: ChoiceTable,
        metric_table: np.ndarray,
        metric: str = "avg_bits",
        *,
        buckets: int = 40,
        pool_size: int = 100_000,
        tilts: Sequence[float] = DEFAULT_TILTS,
        smoothing: float = 0.0,
        seed: int = 0,
    ):
        if buckets < 1:
            raise ValueError(f"buckets={buckets}: must be >= 1")
        if pool_size < buckets:
            raise ValueError(f"pool_size={pool_size}: must be >= buckets ({buckets})")
        if not tilts:
            raise ValueError("tilts must not be empty; (0,) is the uniform pool")
        self.table = table
        self.metric = metric
        self.metric_table = np.asarray(metric_table, dtype=np.float64)
        if self.metric_table.shape != (table.n_layers, table.max_choices):
            raise ValueError(
                f"metric_table has shape {self.metric_table.shape}, expected "
                f"{(table.n_layers, table.max_choices)}"
            )
        self.rng = np.random.default_rng(seed)
        valid = np.arange(table.max_choices)[None, :] < table.n_choices[:, None]
        self.valid = valid
        self.lo = float(np.nanmin(self.metric_table, axis=1).sum())
        self.hi = float(np.nanmax(self.metric_table, axis=1).sum())
        self.edges = np.linspace(self.lo, self.hi, buckets + 1)

        # the pool: equal shares from each tilt. One scale for all layers, so that the tilt
        # exp(lam / scale * sum_l m_l) depends on the config through the metric only.
        masked = np.where(valid, self.metric_table, np.nan)
        centered = np.nan_to_num(self.metric_table - np.nanmean(masked, axis=1, keepdims=True))
        scale = float(np.nanstd(masked, axis=1).mean()) or 1.0
        per_tilt = -(-pool_size // len(tilts))
        pools = []
        for lam in tilts:
            logits = np.where(valid, lam * centered / scale, -np.inf)
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            pools.append(_sample_from(p / p.sum(axis=1, keepdims=True), self.rng, per_tilt))
        pool = np.concatenate(pools)[:pool_size]
        values = table.gather_sum(self.metric_table, pool)
        bucket = self.bucket_of(values)

        # eq. 6: counts of (layer choice, bucket) over counts of the bucket
        self.counts = np.bincount(bucket, minlength=buckets)
        probs = np.zeros((buckets, table.n_layers, table.max_choices))
        layer_idx = np.broadcast_to(np.arange(table.n_layers), pool.shape)
        np.add.at(probs, (bucket[:, None], layer_idx, pool), 1.0)
        probs += smoothing * valid[None]
        totals = probs.sum(axis=2, keepdims=True)
        self.probs = np.divide(probs, totals, out=np.zeros_like(probs), where=totals > 0)
        self.pool_size = len(pool)

    def bucket_of(self, values: np.ndarray) -> np.ndarray:
        b = np.searchsorted(self.edges, values, side="right") - 1
        return np.clip(b, 0, len(self.edges) - 2)

    def bucket_centers(self) -> np.ndarray:
        return 0.5 * (self.edges[:-1] + self.edges[1:])

    def sample_bucket(self, bucket: int, n: int) -> np.ndarray:
        """n genomes from the eq. 5 product distribution of one bucket."""
        if not 0 <= bucket < len(self.counts) or self.counts[bucket] == 0:
            raise ValueError(f"bucket={bucket}: empty or out of range")
        return _sample_from(self.probs[bucket], self.rng, n)

    def target_buckets(self, constraint: Constraint) -> np.ndarray:
        """Populated buckets whose centers satisfy the constraint (on the pooled metric)."""
        ok = constraint.ok(self.bucket_centers()) & (self.counts > 0)
        return np.flatnonzero(ok)

    def sample(
        self,
        n: int,
        budget: Budget,
        *,
        buckets: Sequence[int] | None = None,
        max_trials: int = 1_000_000,
        batch: int = 256,
    ) -> tuple[np.ndarray, SamplerReport]:
        """n genomes meeting every constraint of `budget`, each drawn from a bucket chosen
        uniformly among `buckets` (default: the populated buckets whose centers satisfy the
        budget's constraints on the pooled metric). Returns the genomes and the trial count."""
        if buckets is None:
            ok = self.counts > 0
            for c in budget.constraints:
                if c.metric == self.metric:
                    ok &= c.ok(self.bucket_centers())
            buckets = np.flatnonzero(ok)
            if len(buckets) == 0:  # the budget is narrower than one bucket: take the nearest
                buckets = self._nearest_feasible(budget)
        buckets = np.asarray(buckets, dtype=np.int64)
        out, trials = [], 0
        have = 0
        while have < n:
            if trials >= max_trials:
                raise ValueError(
                    f"only {have} of {n} samples met {[str(c) for c in budget.constraints]} in "
                    f"{trials} trials; the budget is probably infeasible or very narrow"
                )
            which = self.rng.choice(buckets, size=batch)
            cand = np.empty((batch, self.table.n_layers), dtype=np.int64)
            for b in np.unique(which):
                sel = which == b
                cand[sel] = _sample_from(self.probs[b], self.rng, int(sel.sum()))
            ok = budget.ok(cand)
            # trials are counted up to the last accepted sample kept, as one-at-a-time
            # sampling would have counted them
            idx = np.flatnonzero(ok)[: n - have]
            trials += (idx[-1] + 1) if len(idx) and have + len(idx) >= n else batch
            out.append(cand[idx])
            have += len(idx)
        return np.concatenate(out)[:n], SamplerReport(n, int(trials))

    def _nearest_feasible(self, budget: Budget) -> np.ndarray:
        """Populated buckets ranked by how often their draws meet the budget (a probe)."""
        pop = np.flatnonzero(self.counts > 0)
        rates = np.array([budget.ok(self.sample_bucket(b, 64)).mean() for b in pop])
        if rates.max() == 0:
            raise ValueError(
                f"no bucket of the pooled metric produces samples meeting "
                f"{[str(c) for c in budget.constraints]}"
            )
        return pop[rates >= 0.5 * rates.max()]


def uniform_sample(
    table: ChoiceTable,
    budget: Budget,
    n: int,
    rng: np.random.Generator,
    *,
    max_trials: int = 1_000_000,
    batch: int = 4096,
) -> tuple[np.ndarray, SamplerReport]:
    """Rejection sampling from uniform per-layer choices (the baseline). Stops at max_trials;
    the report then holds fewer accepted samples than asked for."""
    out, trials, have = [], 0, 0
    while have < n and trials < max_trials:
        cand = table.uniform(rng, batch)
        idx = np.flatnonzero(budget.ok(cand))[: n - have]
        trials += (idx[-1] + 1) if len(idx) and have + len(idx) >= n else batch
        out.append(cand[idx])
        have += len(idx)
    genomes = np.concatenate(out) if out else np.empty((0, table.n_layers), dtype=np.int64)
    return genomes, SamplerReport(len(genomes), int(trials))
