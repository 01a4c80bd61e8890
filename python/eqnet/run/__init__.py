"""A trained run as data: its config schema (`TrainConfig`), its checkpoint format, and
rebuilding its network (`load_run`), and the task its network is measured on (`tasks`). Below training, search and deploy, which all read runs."""

from .checkpoint import load_checkpoint
from .config import KEEP_FIRST_LAST, TrainConfig, recipe_space
from .tasks import get_task, mean_token_nll, perplexity
from .trained import (
    TrainedRun,
    build_model,
    build_supernet_from_run,
    evaluate,
    init_is_quantized,
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
    "get_task",
    "init_is_quantized",
    "load_checkpoint",
    "load_float_weights",
    "load_run",
    "mean_token_nll",
    "perplexity",
    "recipe_space",
]
