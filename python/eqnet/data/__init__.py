"""Data sets for training and searching supernets.

`load_data(spec)` returns a `DataBundle` with three splits: `train` (augmented), `holdout` (a
fixed part of the training set, never trained on, not augmented: for quantizer calibration and
search) and `test`, plus `bn`: the held-out images under the training augmentation, on which
BN statistics are re-estimated (`fixed_batches`). Accepted specs:

- `"digits"` (the default): scikit-learn's 8x8 digits, embedded in scikit-learn, 1x8x8,
  a fixed 80/20 train/test split;
- a path to an `.npz` with `x_train, y_train, x_test, y_test` (uint8 NHWC images, integer
  labels), e.g. CIFAR-10/100; 10 or 100 classes from the labels;
- `cifar10:DIR` / `cifar100:DIR` (or a DIR holding `cifar-10-batches-py` /
  `cifar-100-python`): torchvision's CIFAR format, never downloaded;
- `imagefolder:DIR` (or a DIR with `train/` and `val/` or `test/` class folders);
- `stdlib-source` / `source-tree:DIR`: byte-level text of Python source files (the standard
  library's own, or a directory's) for causal language models: windows of `seq_len` bytes and
  the next bytes, splits by file, `text_bytes` in all (`eqnet.data.text`).

Image splits are fixed by `split_seed` (not the training seed), so every recipe trained on the
same data sees the same train/holdout/test samples and results are comparable. Augmentation
(CIFAR: 4-pixel padded random crop + horizontal flip) draws from the global torch RNG, which
the trainer saves in its checkpoints, so a resumed run sees the same augmented batches.
"""

from __future__ import annotations

import os

from .bundle import (
    TASKS,
    DataBundle,
    DataError,
    EpochShuffleSampler,
    bn_split,
    eval_loader,
    fixed_batches,
    limit_splits,
    train_loader,
)
from .images import (
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    TensorImageDataset,
    load_images,
)
from .text import TextWindows, is_text_spec, load_text

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TASKS",
    "DataBundle",
    "DataError",
    "EpochShuffleSampler",
    "TensorImageDataset",
    "TextWindows",
    "bn_split",
    "data_task",
    "eval_loader",
    "fixed_batches",
    "load_data",
    "train_loader",
]


def data_task(spec: str | os.PathLike | None) -> str:
    """The task a data spec's samples train: "causal-lm" for text, else "classification"."""
    return "causal-lm" if spec is not None and is_text_spec(str(spec)) else "classification"


def load_data(
    spec: str | os.PathLike | None = "digits",
    *,
    holdout: int | None = None,
    split_seed: int = 0,
    augment: bool = True,
    limit_train: int | None = None,
    limit_test: int | None = None,
    image_size: int = 224,
    seq_len: int = 128,
    text_bytes: int = 1 << 20,
) -> DataBundle:
    """Load a data set (see the module docstring for `spec`). Images: `holdout` samples of the
    training set (default 10 %, at most 5000) are set aside. Text: `seq_len` tokens per
    window, `text_bytes` read in all (its held-out split is 10 % of the bytes, by file, so
    `holdout` must be left unset). `limit_train` / `limit_test` keep only the first samples
    (quick runs and tests). Fails with DataError, before any training, on a bad path, a bad
    format or an empty split."""
    spec = "digits" if spec is None else str(spec)
    if holdout is not None and (not isinstance(holdout, int) or holdout < 1):
        raise ValueError(f"holdout={holdout!r}: must be an int >= 1 (or None for 10 %)")
    if is_text_spec(spec):
        if holdout is not None:
            raise ValueError(
                f"holdout={holdout}: the text data holds out its own files (10 % of "
                "text_bytes); leave holdout unset"
            )
        bundle = load_text(spec, seq_len=seq_len, text_bytes=text_bytes)
    else:
        bundle = load_images(
            spec, holdout=holdout, split_seed=split_seed, augment=augment, image_size=image_size
        )
    return limit_splits(bundle, limit_train, limit_test)
