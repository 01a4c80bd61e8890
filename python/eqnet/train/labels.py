"""Online adaptive labels (MultiQuant, eq. 3-4).

During epoch e every training sample that at least one sampled subnet classifies correctly
adds the mean of the subnets' predicted distributions to its class's row of an N x N
accumulator (eq. 3; the paper writes it as the class's column). At the end of the epoch every
row is normalized to sum 1 and becomes that class's soft label for epoch e + 1, where the
training target is `(1 - zeta) * one_hot + zeta * soft` (eq. 4, zeta = 0.5). The first epoch has
no soft labels yet and trains on hard labels; a class with no correctly classified sample in
the previous epoch keeps its one-hot label.

The accumulator is a plain tensor so a distributed run can all-reduce it before
`end_epoch`: pass `reduce=` a function that sums it across ranks in place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class OnlineAdaptiveLabels:
    def __init__(self, num_classes: int, zeta: float = 0.5):
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes={num_classes!r}: must be an int >= 2")
        if not 0.0 <= zeta <= 1.0:
            raise ValueError(f"zeta={zeta!r}: must be in [0, 1]")
        self.num_classes = num_classes
        self.zeta = float(zeta)
        # float64: the sums run over a whole epoch of samples.
        self.accumulator = torch.zeros(num_classes, num_classes, dtype=torch.float64)
        self.soft: torch.Tensor | None = None  # [N, N] row y = soft label of class y

    @torch.no_grad()
    def update(self, probs: Sequence[torch.Tensor], targets: torch.Tensor) -> None:
        """Eq. 3: `probs` are the softmax outputs [B, N] of the subnets trained on this batch
        (lowest, random(s), highest), `targets` the class indices [B]."""
        if not probs:
            raise ValueError("probs: update needs the outputs of at least one subnet")
        stacked = torch.stack([p.detach().to("cpu", torch.float64) for p in probs])
        if stacked.shape[-1] != self.num_classes:
            raise ValueError(
                f"probs have {stacked.shape[-1]} classes, the labels {self.num_classes}"
            )
        y = targets.detach().to("cpu", torch.int64)
        correct = (stacked.argmax(dim=-1) == y.unsqueeze(0)).any(dim=0)
        if correct.any():
            mean = stacked.mean(dim=0)[correct]
            self.accumulator.index_add_(0, y[correct], mean)

    def end_epoch(self, reduce: Callable[[torch.Tensor], None] | None = None) -> None:
        """Normalize each class's accumulated row into its soft label for the next epoch."""
        if reduce is not None:
            reduce(self.accumulator)
        totals = self.accumulator.sum(dim=1, keepdim=True)
        eye = torch.eye(self.num_classes, dtype=torch.float64)
        seen = totals > 0
        self.soft = torch.where(seen, self.accumulator / totals.clamp_min(1e-300), eye)
        self.accumulator.zero_()

    def targets(self, y: torch.Tensor) -> torch.Tensor:
        """[B, N] training targets (eq. 4): one-hot before the first end_epoch."""
        y = y.long()
        one_hot = torch.nn.functional.one_hot(y, self.num_classes).to(torch.float32)
        if self.soft is None:
            return one_hot
        soft = self.soft.to(device=y.device, dtype=torch.float32)[y]
        return (1.0 - self.zeta) * one_hot + self.zeta * soft

    def state_dict(self) -> dict:
        return {
            "num_classes": self.num_classes,
            "zeta": self.zeta,
            "accumulator": self.accumulator.clone(),
            "soft": None if self.soft is None else self.soft.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["num_classes"] != self.num_classes:
            raise ValueError(
                f"adaptive-label state has {state['num_classes']} classes, expected "
                f"{self.num_classes}"
            )
        self.zeta = float(state["zeta"])
        self.accumulator = state["accumulator"].to(torch.float64).clone()
        soft = state["soft"]
        self.soft = None if soft is None else soft.to(torch.float64).clone()
