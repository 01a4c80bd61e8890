"""Choosing among measured candidates: the predictor proposes, held-out images decide.

The GA returns the configs the predictor ranks highest. Measured on held-out images, the most
accurate of K candidates is biased upward (the max of K noisy numbers), so a mixed config can
beat the uniform width of the same budget by luck. `choose` keeps a mixed config over the best
uniform candidate only when its advantage is at least `z_min` standard errors of the *paired*
difference (every candidate is measured on the same images): with n10 images only the mixed
config gets right and n01 only the uniform one gets right, z = (n10 - n01) / sqrt(n10 + n01),
the statistic of McNemar's test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from eqnet.search.accuracy_data import fraction_correct


@dataclass(frozen=True)
class Measured:
    """One candidate: where it came from ("ga" or "uniform W{b}A{b}"), its per-image
    correctness on the held-out images (bool [N]) and the predictor's accuracy, if any."""

    origin: str
    correct: torch.Tensor
    predicted: float | None = None

    @property
    def accuracy(self) -> float:
        return fraction_correct(self.correct)


def paired_z(a: torch.Tensor, b: torch.Tensor) -> float:
    """z of a's advantage over b on the same images (McNemar): (n10 - n01) / sqrt(n10 + n01);
    0 when the two are right on exactly the same images."""
    if a.shape != b.shape or a.dtype != torch.bool or b.dtype != torch.bool:
        raise ValueError(f"a and b must be bool tensors of one shape, got {a.shape}, {b.shape}")
    n10 = int((a & ~b).sum())
    n01 = int((~a & b).sum())
    return 0.0 if n10 + n01 == 0 else (n10 - n01) / math.sqrt(n10 + n01)


def choose(measured: list[Measured], z_min: float = 1.0) -> tuple[int, dict]:
    """Index of the kept candidate and a record of the decision.

    The most accurate candidate wins (the first of equals, so order the GA's best first); if it
    is not a uniform width and a uniform candidate exists, it must also beat the most accurate
    uniform one by z >= z_min, else that uniform candidate is kept. z_min = 0 keeps the plain
    most accurate candidate.
    """
    if not measured:
        raise ValueError("choose: no measured candidates")
    if z_min < 0 or not math.isfinite(z_min):
        raise ValueError(f"z_min={z_min}: accepted values are finite and >= 0")
    accs = [m.accuracy for m in measured]
    best = max(range(len(measured)), key=lambda i: accs[i])
    uniform = [i for i, m in enumerate(measured) if m.origin.startswith("uniform")]
    record = {"best_measured": measured[best].origin, "z_vs_uniform": None}
    if uniform and not measured[best].origin.startswith("uniform"):
        u = max(uniform, key=lambda i: accs[i])
        z = paired_z(measured[best].correct, measured[u].correct)
        record["z_vs_uniform"] = z
        if z < z_min:
            return u, record
    return best, record
