"""The learning-rate schedule of training: linear warm-up, then cosine decay, per iteration."""

from __future__ import annotations

import math


class WarmupCosine:
    """Per-iteration schedule: linear warm-up from 0 over `warmup` steps, then cosine decay
    to 0 at `total` steps. A learning-rate factor; the state is the step counter."""

    def __init__(self, total: int, warmup: int = 0):
        self.total = max(1, int(total))
        self.warmup = max(0, min(int(warmup), self.total - 1))
        self.step_count = 0

    def factor(self, step: int | None = None) -> float:
        s = self.step_count if step is None else step
        if s < self.warmup:
            return (s + 1) / (self.warmup + 1)
        t = min(1.0, (s - self.warmup) / max(1, self.total - self.warmup))
        return 0.5 * (1.0 + math.cos(math.pi * t))

    def state_dict(self) -> dict:
        return {"step": self.step_count, "total": self.total, "warmup": self.warmup}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step"])
