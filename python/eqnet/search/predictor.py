"""Accuracy predictor (MultiQuant §3.3; EQ-Net's conditional quantization-aware predictor).

An MLP maps `SubnetConfig.encode()` (per layer: weight width, activation width, per-channel
flag, asymmetric-weight flag, asymmetric-activation flag) to accuracy. Because the encoding
carries the granularity and symmetry of every layer, one predictor is conditional on those
forms, as CQAP is. As MultiQuant's predictor takes one-hot widths, the widths of the encoding
are expanded to one-hot vectors over 1..8 inside the model (so an additive accuracy is linear
in the first layer's input); the three form flags pass through. MultiQuant uses 150-wide
hidden layers; width and depth are configurable. Targets are standardized for training and
de-standardized on prediction.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from eqkernels import atomic
from eqnet.space import ENCODING_WIDTH


@dataclass
class FitReport:
    kendall_tau: float
    pearson_r: float
    n_train: int
    n_val: int
    val_rmse: float
    train_rmse: float
    # Kendall tau of the held-out configs' plain mean bit-width (weights and activations,
    # every layer alike) against their accuracy: the no-learning baseline a predictor must beat
    mean_bits_kendall_tau: float

    def to_dict(self) -> dict:
        return asdict(self)


def rank_metrics(pred, target) -> tuple[float, float]:
    """Kendall tau and Pearson r of predictions against targets."""
    from scipy.stats import kendalltau, pearsonr

    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    if p.shape != t.shape or p.ndim != 1 or p.size < 2:
        raise ValueError(f"pred {p.shape} and target {t.shape} must be equal 1-D of size >= 2")
    tau = float(kendalltau(p, t).statistic)
    r = float(pearsonr(p, t).statistic) if p.std() > 0 and t.std() > 0 else float("nan")
    return tau, r


def check_xy(x, y, in_features: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, in_features] encodings and y [N] accuracies as `dtype` tensors, or a clear error."""
    x = torch.as_tensor(x, dtype=dtype)
    y = torch.as_tensor(y, dtype=dtype).flatten()
    if x.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[1] != in_features:
        raise ValueError(
            f"x {tuple(x.shape)} / y {tuple(y.shape)}: expected x [N, {in_features}] and y [N]"
        )
    return x, y


def check_encodings(x: torch.Tensor, in_features: int) -> None:
    """x must be [N, in_features] encodings (what `predict` takes)."""
    if x.ndim != 2 or x.shape[1] != in_features:
        raise ValueError(f"encodings have shape {tuple(x.shape)}, expected [N, {in_features}]")


def table_encodings(table, in_features: int) -> torch.Tensor:
    """`table.encodings()` [L, C, 5], checked against a predictor's input width (for the GA
    fitness, which scores every (layer, choice) once)."""
    enc = table.encodings()
    if enc.shape[0] * enc.shape[2] != in_features:
        raise ValueError(
            f"the predictor takes {in_features} features, the table encodes "
            f"{enc.shape[0] * enc.shape[2]}"
        )
    return enc


def split_indices(n: int, val_fraction: float, seed: int):
    """The random train/validation split every predictor's fit uses: (val_idx, train_idx,
    generator), the generator seeded with `seed` and advanced past the permutation (the MLP
    draws its batch order from it). The same seed gives every predictor the same split."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction}: must be in (0, 1)")
    n_val = max(2, round(val_fraction * n))
    if n - n_val < 2:
        raise ValueError(f"{n} samples are too few for a train/validation split")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    return perm[:n_val], perm[n_val:], gen


def fit_report(x, y, pred, val_idx, train_idx) -> FitReport:
    """Kendall tau, Pearson r and RMSEs of predictions `pred` [N] of all samples, on the
    held-out and training parts, with the mean-bit-width baseline on the held-out part."""
    pred, y = pred.double(), y.double()
    pv, yv = pred[val_idx], y[val_idx]
    tau, r = rank_metrics(pv.numpy(), yv.numpy())
    n_layers = x.shape[1] // ENCODING_WIDTH
    mean_bits = x[val_idx].reshape(len(val_idx), n_layers, ENCODING_WIDTH)[..., :2].mean((1, 2))
    baseline_tau, _ = rank_metrics(mean_bits.double().numpy(), yv.numpy())
    return FitReport(
        kendall_tau=tau,
        pearson_r=r,
        n_train=len(train_idx),
        n_val=len(val_idx),
        val_rmse=float(((pv - yv) ** 2).mean().sqrt()),
        train_rmse=float(((pred[train_idx] - y[train_idx]) ** 2).mean().sqrt()),
        mean_bits_kendall_tau=baseline_tau,
    )


def expand_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., 5] per-layer encodings -> [..., 19]: one-hot widths over 1..8, then the flags."""
    bits = (x[..., :2] * 8).round().long().clamp(1, 8) - 1
    onehot = nn.functional.one_hot(bits, 8).flatten(-2).to(x.dtype)
    return torch.cat([onehot, x[..., 2:]], dim=-1)


class AccuracyPredictor(nn.Module):
    """MLP: encoding [N, in_features] -> accuracy [N]."""

    def __init__(self, in_features: int, hidden: int = 150, depth: int = 3):
        super().__init__()
        if in_features < 1 or hidden < 1 or depth < 1:
            raise ValueError(
                f"in_features={in_features}, hidden={hidden}, depth={depth}: all must be >= 1"
            )
        if in_features % ENCODING_WIDTH:
            raise ValueError(
                f"in_features={in_features}: SubnetConfig.encode() gives {ENCODING_WIDTH} "
                "numbers per layer"
            )
        self.in_features, self.hidden, self.depth = in_features, hidden, depth
        self.n_layers = in_features // ENCODING_WIDTH
        layers: list[nn.Module] = []
        width = self.n_layers * (2 * 8 + ENCODING_WIDTH - 2)
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)
        self.register_buffer("y_mean", torch.zeros(()))
        self.register_buffer("y_std", torch.ones(()))

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 5L] encodings -> [N, 19L]: one-hot weight and activation widths, flags."""
        return expand_rows(x.reshape(x.shape[0], self.n_layers, ENCODING_WIDTH)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.expand(x)).squeeze(-1) * self.y_std + self.y_mean

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        check_encodings(x, self.in_features)
        was = self.training
        self.eval()
        out = self(x.float())
        self.train(was)
        return out

    def fit(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        val_fraction: float = 0.2,
        epochs: int = 300,
        batch_size: int = 64,
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        seed: int = 0,
        threads: int | None = 1,
    ) -> FitReport:
        """Train on a random split; report Kendall tau / Pearson r on the held-out part.

        threads: intra-op threads while training (restored afterwards); one is fastest for
        an MLP this small, where thread hand-offs cost more than the arithmetic."""
        previous = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            return self._fit(x, y, val_fraction, epochs, batch_size, lr, weight_decay, seed)
        finally:
            torch.set_num_threads(previous)

    def _fit(self, x, y, val_fraction, epochs, batch_size, lr, weight_decay, seed) -> FitReport:
        x, y = check_xy(x, y, self.in_features, torch.float32)
        val_idx, tr_idx, gen = split_indices(x.shape[0], val_fraction, seed)
        xt, yt = x[tr_idx], y[tr_idx]
        et = self.expand(xt)

        with torch.no_grad():
            torch.manual_seed(seed)  # reproducible initial weights
            for m in self.net:
                if isinstance(m, nn.Linear):
                    m.reset_parameters()
            self.y_mean.fill_(float(yt.mean()))
            self.y_std.fill_(float(yt.std()) if yt.numel() > 1 and yt.std() > 0 else 1.0)
        opt = torch.optim.Adam(self.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        target = (yt - self.y_mean) / self.y_std
        self.train()
        for _ in range(epochs):
            order = torch.randperm(len(tr_idx), generator=gen)
            for start in range(0, len(order), batch_size):
                b = order[start : start + batch_size]
                loss = nn.functional.mse_loss(self.net(et[b]).squeeze(-1), target[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
        self.eval()
        return fit_report(x, y, self.predict(x), val_idx, tr_idx)

    def fitness(self, table):
        """Batched GA fitness over `table`'s genomes: `predictor_fitness(self, table)`."""
        return predictor_fitness(self, table)

    # -- persistence (state dict + JSON meta; no pickled objects) --------------------------
    def save(self, path: str | Path) -> None:
        path = Path(path)
        with atomic.atomic_write(path, "wb") as f:
            torch.save(self.state_dict(), f)
        meta = {"in_features": self.in_features, "hidden": self.hidden, "depth": self.depth}
        atomic.write_text(path.with_suffix(".json"), json.dumps(meta))

    @classmethod
    def load(cls, path: str | Path) -> AccuracyPredictor:
        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        model = cls(**meta)
        model.load_state_dict(torch.load(path, weights_only=True))
        model.eval()
        return model


def predictor_fitness(predictor: AccuracyPredictor, table):
    """A batched fitness for genetic_search: genomes [N, L] -> predicted accuracy [N].

    The first layer is linear in the per-layer one-hot input, so its output for a genome is a
    sum over layers of a per-(layer, choice) vector; those vectors are computed once here and
    each call only gathers and sums them, then runs the remaining layers. This equals
    `predictor.predict(table.encode(genomes))` up to float32 summation order."""
    enc = table_encodings(table, predictor.in_features)
    n_layers = enc.shape[0]
    first, rest = predictor.net[0], predictor.net[1:]
    with torch.no_grad():
        expanded = expand_rows(enc)  # [L, C, 19]
        w = first.weight.reshape(first.out_features, n_layers, expanded.shape[-1])
        per_choice = torch.einsum("hlk,lck->lch", w, expanded).contiguous()  # [L, C, H]
        bias = first.bias.clone()
        y_std, y_mean = predictor.y_std.clone(), predictor.y_mean.clone()
    layer_idx = torch.arange(n_layers)

    def fitness(genomes: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            g = torch.as_tensor(np.atleast_2d(genomes))
            h = per_choice[layer_idx, g].sum(dim=1) + bias
            return (rest(h).squeeze(-1) * y_std + y_mean).numpy()

    return fitness
