"""Post-training quantization of a float run at one config (MultiQuant's Table 2 PTQ column).

No training: the quantizers of the float model are calibrated (the same MSE calibration every
recipe starts from) on held-out batches, the BN statistics are re-estimated at the config on
the augmented held-out batches, and the result is written as a `qat` run at epoch 0 (its
metrics row holds `acc_ptq`, or `nll_ptq` and `ppl_ptq` for a language model), so search,
export and eval read it like any run; resuming it trains QAT from this start.
"""

from __future__ import annotations

from pathlib import Path

from eqnet.run import TrainConfig
from eqnet.run import checkpoint as ckpt

from .trainer import Trainer


def post_training_quantize(config: TrainConfig, out_dir: str | Path | None = None, data=None):
    """Calibrate `config` (recipe qat: one width, or a `policy`; `init` a float run) without
    training; returns the Trainer, whose `metrics` hold one row with the test accuracy."""
    if config.recipe != "qat":
        raise ValueError(f"recipe={config.recipe!r}: post-training quantization takes qat")
    if not config.init:
        raise ValueError("init: post-training quantization needs the float run to quantize")
    trainer = Trainer(config, out_dir, data)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        ckpt.save_json(Path(out_dir) / ckpt.CONFIG_NAME, trainer.run_record())
    trainer.calibrate()
    target = trainer.recipe.target(trainer)
    trainer.model.set_config(target)
    trainer.recalibrate(trainer.bn_images, trainer.config.bn_batches)
    metrics = trainer.task.evaluate(trainer.model, trainer.test_loader, trainer.device)
    row = {"epoch": 0, **{f"{key}_ptq": value for key, value in metrics.items()}}
    trainer.metrics.append(row)
    if out_dir is not None:
        ckpt.save_checkpoint(out_dir, trainer.state_dict())
        ckpt.write_metrics(out_dir, trainer.metrics)
    return trainer
