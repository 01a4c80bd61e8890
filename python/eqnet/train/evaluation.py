"""Evaluation during training: the recipe's evaluation subnets on the test split, each after BN
re-estimation, measured by the run's task (top-1 accuracy, or next-token NLL and perplexity)."""

from __future__ import annotations

import torch


def bn_buffers(model) -> dict[str, torch.Tensor]:
    """Copies of every BN running statistic of `model`, by name."""
    return {
        n: b.clone()
        for n, b in model.named_buffers()
        if n.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }


def evaluate_subnets(trainer) -> dict[str, float]:
    """The task's metrics (`acc_<subnet>`, or `nll_<subnet>` and `ppl_<subnet>`) of the
    recipe's evaluation subnets (lowest, highest, the fixed random one; every width for
    layered), each after BN recalibration on the augmented held-out batches (`bn_split`). The
    training BN statistics and the active subnet are restored afterwards, so evaluation does
    not change the training state."""
    model = trainer.model
    saved = bn_buffers(model)
    active = model.config() if trainer.space is not None else None
    results = {}
    for name, cfg in trainer.recipe.eval_configs(trainer).items():
        if cfg is not None:
            model.set_config(cfg)
            if trainer.recipe.recalibrate_bn:
                trainer.recalibrate(trainer.bn_images, trainer.config.bn_batches)
        metrics = trainer.task.evaluate(model, trainer.test_loader, trainer.device)
        results.update({f"{key}_{name}": value for key, value in metrics.items()})
    with torch.no_grad():
        buffers = dict(model.named_buffers())
        for n, b in saved.items():
            buffers[n].copy_(b)
    if active is not None:
        model.set_config(active)
    return results
