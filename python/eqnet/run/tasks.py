"""What a run's network is trained and measured on, from its data (`DataBundle.task`):

- `classification`: logits [B, C] against class labels; measured by top-1 accuracy (`acc`).
- `causal-lm`: logits [B, T, V] (or a transformers output carrying `.logits`) against the next
  tokens [B, T]. Training sees one row per token (logits [B*T, V], targets [B*T]), so every
  recipe's loss (cross-entropy, distillation between widths, LRH labels) applies per token.
  Measured by the mean next-token negative log-likelihood over every test token (`nll`, nats)
  and the perplexity `ppl = exp(nll)`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .trained import evaluate


def model_logits(out) -> torch.Tensor:
    """The logits tensor of a model's output (transformers' outputs carry it as `.logits`)."""
    return out.logits if hasattr(out, "logits") and not isinstance(out, torch.Tensor) else out


class ClassificationTask:
    name = "classification"
    metrics = ("acc",)

    def outputs(self, out) -> torch.Tensor:
        return model_logits(out)

    def targets(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def evaluate(self, model, loader, device=None) -> dict[str, float]:
        return {"acc": evaluate(model, loader, device)}


class CausalLMTask:
    name = "causal-lm"
    metrics = ("nll", "ppl")

    def outputs(self, out) -> torch.Tensor:
        logits = model_logits(out)
        if logits.dim() != 3:
            raise ValueError(
                f"a causal-LM model must return logits [batch, tokens, vocab], got shape "
                f"{tuple(logits.shape)}"
            )
        return logits.reshape(-1, logits.shape[-1])

    def targets(self, y: torch.Tensor) -> torch.Tensor:
        return y.reshape(-1)

    def evaluate(self, model, loader, device=None) -> dict[str, float]:
        nll = mean_token_nll(model, loader, device)
        return {"nll": nll, "ppl": perplexity(nll)}


TASK_CLASSES = {t.name: t for t in (ClassificationTask, CausalLMTask)}


def get_task(name: str):
    if name not in TASK_CLASSES:
        raise ValueError(f"task={name!r}: accepted values are {', '.join(TASK_CLASSES)}")
    return TASK_CLASSES[name]()


def perplexity(mean_nll: float) -> float:
    """exp(mean NLL); inf when it overflows, NaN stays NaN."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf


@torch.no_grad()
def mean_token_nll(model, loader, device=None) -> float:
    """Mean over every target token of `loader`'s (tokens, next tokens) batches of
    -log softmax(logits)[next token], with the log-softmax and the sum in float64 (a NaN logit
    gives a NaN mean: never hidden)."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    if device is None:
        first = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        device = first.device if first is not None else torch.device("cpu")
    total, count = 0.0, 0
    try:
        for x, y in loader:
            logits = CausalLMTask().outputs(model(x.to(device)))
            target = y.reshape(-1).to(logits.device)
            if target.numel() != logits.shape[0]:
                raise ValueError(
                    f"{logits.shape[0]} logit rows for {target.numel()} target tokens: the model "
                    "must return one row of logits per input token"
                )
            total += float(F.cross_entropy(logits.double(), target, reduction="sum"))
            count += target.numel()
    finally:
        if hasattr(model, "train"):
            model.train(was_training)
    if count == 0:
        raise ValueError("mean_token_nll: the loader yielded no tokens")
    return total / count


def summary(row: dict) -> str:
    """The evaluation metrics of a metrics row, for a progress line: accuracies as %,
    perplexities as they are."""
    parts = []
    for k, v in row.items():
        if k.startswith("acc_"):
            parts.append(f"{k[4:]}={v * 100:.2f}%")
        elif k.startswith("ppl_"):
            parts.append(f"{k[4:]} ppl={v:.3f}")
    return " ".join(parts)
