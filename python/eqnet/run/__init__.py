"""A trained run as data: its config schema (`TrainConfig`), its checkpoint format, and
rebuilding its network (`load_run`). Below training, search and deploy, which all read runs."""

from .checkpoint import load_checkpoint
from .config import KEEP_FIRST_LAST, TrainConfig, recipe_space
from .trained import (
    TrainedRun,
    build_model,
    build_supernet_from_run,
    evaluate,
    load_float_weights,
    load_run,
)

__all__ = [
    "KEEP_FIRST_LAST",
    "TrainConfig",
    "TrainedRun",
    "build_model",
    "build_supernet_from_run",
    "evaluate",
    "load_checkpoint",
    "load_float_weights",
    "load_run",
    "recipe_space",
]
