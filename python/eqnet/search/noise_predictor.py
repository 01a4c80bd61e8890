"""Accuracy predictor from a quantization-noise model: ridge regression on per-layer noise powers.

A b-bit uniform quantizer adds noise of power proportional to its squared step, i.e. to 4^-b
for a given range. To first order the accuracy drop of a mixed config is then a weighted sum of
the noise its layers add (the additive model behind HAWQ's and LIMPQ's per-layer
sensitivities), with a learned weight per layer for the weight noise and one for the activation
noise. The forms change a layer's noise at the same width, so per layer three interaction terms
carry them: 4^-b_w for per-channel weights, 4^-b_w for asymmetric weights and 4^-b_a for
asymmetric activations. That makes the model conditional on every layer's granularity and
symmetry, as EQ-Net's CQAP is. Per layer, the features are

    4^-b_w,  4^-b_a,  4^-b_w · per_channel,  4^-b_w · asym_w,  4^-b_a · asym_a

and the prediction is `bias + Σ_l weights[l] · features[l]`, fitted by ridge regression
(`sklearn.linear_model.RidgeCV`) on standardized features. Two penalties are chosen by
leave-one-out error on the training configs only: the ridge `alpha`, and `gamma`, a factor on
the standardized form terms (gamma < 1 penalizes them more; 0 drops them). When the forms barely
matter the form terms only add variance, and the fit then turns them down itself.

Why not only the MLP (`eqnet.search.predictor`): with a few hundred measured configs the MLP
interpolates the training configs and ranks held-out ones no better than their mean width; this
model has five numbers per layer to learn and encodes how width acts (README, "Search on the
CIFAR-10 eqnet supernet"). Being additive per layer, its GA fitness is an exact table lookup.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from eqkernels import atomic
from eqnet.search.predictor import (
    FitReport,
    check_encodings,
    check_xy,
    fit_report,
    split_indices,
    table_encodings,
)
from eqnet.space import ENCODING_WIDTH

FORMAT = "eqnet.NoiseRidgePredictor"
N_FEATURES = 5  # per layer; the last three are the form terms
DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-3, 3, 25))
DEFAULT_GAMMAS = (0.0, 0.25, 0.5, 1.0)


def noise_features(x: torch.Tensor) -> torch.Tensor:
    """[..., 5] per-layer encodings (`SubnetConfig.encode()` rows) -> [..., 5] noise features."""
    w_bits = (x[..., 0] * 8).round()
    a_bits = (x[..., 1] * 8).round()
    nw, na = torch.pow(4.0, -w_bits), torch.pow(4.0, -a_bits)
    return torch.stack([nw, na, nw * x[..., 2], nw * x[..., 3], na * x[..., 4]], dim=-1)


class NoiseRidgePredictor:
    """Encoding [N, in_features] -> accuracy [N]; see the module docstring."""

    def __init__(self, in_features: int):
        if in_features < 1 or in_features % ENCODING_WIDTH:
            raise ValueError(
                f"in_features={in_features}: SubnetConfig.encode() gives {ENCODING_WIDTH} "
                "numbers per layer"
            )
        self.in_features = in_features
        self.n_layers = in_features // ENCODING_WIDTH
        self.weights = np.zeros((self.n_layers, N_FEATURES))  # in raw (unstandardized) units
        self.bias = 0.0
        self.alpha: float | None = None
        self.gamma: float | None = None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 5L] encodings -> [N, L, 5] noise features, float64."""
        return noise_features(x.double().reshape(x.shape[0], self.n_layers, ENCODING_WIDTH))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x)
        check_encodings(x, self.in_features)
        f = self.features(x)
        return (f * torch.from_numpy(self.weights)).sum((1, 2)) + self.bias

    def fit(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        val_fraction: float = 0.2,
        seed: int = 0,
        alphas=DEFAULT_ALPHAS,
        gammas=DEFAULT_GAMMAS,
    ) -> FitReport:
        """Fit on the random split `split_indices(n, val_fraction, seed)` (the same split the
        MLP uses under the same seed); report on the held-out part."""
        from sklearn.linear_model import RidgeCV

        if not alphas or min(alphas) <= 0:
            raise ValueError(f"alphas={alphas}: accepted values are a non-empty list of > 0")
        if not gammas or min(gammas) < 0:
            raise ValueError(f"gammas={gammas}: accepted values are a non-empty list of >= 0")
        x, y = check_xy(x, y, self.in_features, torch.float64)
        val_idx, tr_idx, _ = split_indices(x.shape[0], val_fraction, seed)
        feats = self.features(x).reshape(x.shape[0], -1).numpy()
        ft, yt = feats[tr_idx.numpy()], y[tr_idx].numpy()
        mu, sd = ft.mean(0), ft.std(0)
        used = sd > 1e-12 * np.maximum(1.0, np.abs(mu))  # constant features (fixed layers) out
        is_form = np.tile(np.arange(N_FEATURES) >= 2, self.n_layers)
        z = np.zeros_like(ft)
        z[:, used] = (ft[:, used] - mu[used]) / sd[used]
        best = None
        for gamma in sorted(gammas):  # the smaller gamma wins a tie: fewer effective terms
            scale = np.where(is_form, gamma, 1.0) * used
            cols = scale > 0
            if not cols.any():
                continue
            model = RidgeCV(alphas=list(alphas)).fit(z[:, cols] * scale[cols], yt)
            if best is None or model.best_score_ > best[0]:
                best = (model.best_score_, gamma, scale, cols, model)
        if best is None:
            raise ValueError("every feature is constant over the training configs")
        _, gamma, scale, cols, model = best
        w = np.zeros(feats.shape[1])
        w[cols] = model.coef_ * scale[cols] / sd[cols]
        self.weights = w.reshape(self.n_layers, N_FEATURES)
        self.bias = float(model.intercept_ - (w * mu).sum())
        self.alpha, self.gamma = float(model.alpha_), float(gamma)
        return fit_report(x, y, self.predict(x), val_idx, tr_idx)

    def fitness(self, table):
        """A batched fitness for genetic_search: genomes [N, L] -> predicted accuracy [N].
        The model is additive per layer, so each (layer, choice) value is computed once and
        a genome's fitness is the sum of its choices' values plus the bias."""
        enc = table_encodings(table, self.in_features)  # [L, C, 5]
        values = (noise_features(enc.double()).numpy() * self.weights[:, None, :]).sum(-1)
        layer_idx = np.arange(enc.shape[0])

        def fitness(genomes: np.ndarray) -> np.ndarray:
            g = np.atleast_2d(genomes)
            return values[layer_idx, g].sum(axis=1) + self.bias

        return fitness

    # -- persistence: one JSON file ----------------------------------------------------------
    def save(self, path: str | Path) -> None:
        doc = {
            "format": FORMAT,
            "version": 1,
            "in_features": self.in_features,
            "weights": self.weights.tolist(),
            "bias": self.bias,
            "alpha": self.alpha,
            "gamma": self.gamma,
        }
        atomic.write_text(path, json.dumps(doc, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> NoiseRidgePredictor:
        try:
            doc = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not a JSON file ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != 1:
            raise ValueError(f"{path}: not a {FORMAT} file of version 1")
        model = cls(int(doc["in_features"]))
        weights = np.asarray(doc["weights"], dtype=np.float64)
        if weights.shape != model.weights.shape or not np.isfinite(weights).all():
            raise ValueError(
                f"{path}: weights must be finite, of shape {model.weights.shape}, "
                f"got {weights.shape}"
            )
        model.weights, model.bias = weights, float(doc["bias"])
        model.alpha, model.gamma = doc.get("alpha"), doc.get("gamma")
        return model
