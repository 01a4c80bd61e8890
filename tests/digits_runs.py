"""Tiny training runs on the embedded digits set, shared by the trainer tests: the data splits
and a `TrainConfig` of a few steps that records the same splits."""

from eqnet.data import load_data
from eqnet.run import TrainConfig

SPLITS = dict(holdout=64, limit_train=160, limit_test=96)


def digits_data():
    return load_data("digits", **SPLITS)


def tiny_config(recipe, **kw) -> TrainConfig:
    """`recipe` for one epoch of two steps at batch 32 (keyword arguments override)."""
    base = dict(
        recipe=recipe,
        epochs=1,
        batch_size=32,
        lr=0.05,
        calib_batches=1,
        bn_batches=1,
        max_steps_per_epoch=2,
        progress=False,
        **SPLITS,
    )
    base.update(kw)
    return TrainConfig(**base)
