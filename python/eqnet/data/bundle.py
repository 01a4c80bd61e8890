"""What every data set returns (`DataBundle`), its loaders and the fixed splits.

Splits are fixed by `split_seed` (not the training seed), so every recipe trained on the same
data sees the same train/holdout/test samples and results are comparable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

# What a bundle's samples train: (image, class) pairs or (input bytes, next bytes) windows.
TASKS = ("classification", "causal-lm")


class DataError(ValueError):
    """A data set that cannot be used (missing path, wrong format, empty split)."""


@dataclass
class DataBundle:
    name: str
    train: Dataset
    holdout: Dataset
    test: Dataset
    # classes of an image set; the vocabulary (256 bytes) of a text set
    num_classes: int
    # one sample's input shape: (C, H, W) of an image, (seq_len,) of a text window
    input_shape: tuple[int, ...]
    # The held-out images with the training augmentation. A subnet's BN statistics are
    # re-estimated on these: its weights and activation step sizes were learned under the
    # training distribution's statistics, and statistics of unaugmented images cost a
    # ResNet-20 W4A4 model 2 points on CIFAR-10 (83.2 % with its own statistics, 81.2 %
    # re-estimated on unaugmented images, 82.9 % on augmented ones). None: use `holdout`.
    bn: Dataset | None = None
    # "classification": samples (input, class); "causal-lm": (tokens [T], next tokens [T])
    task: str = "classification"


def fixed_split(n: int, n_out: int, seed: int) -> tuple[list[int], list[int]]:
    """(kept, held-out) sorted index lists: `n_out` of `n` indices drawn by `seed`."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_out:]), sorted(perm[:n_out])


def default_holdout(n_train: int) -> int:
    return min(5000, max(1, n_train // 10))


def check_nonempty(name, **splits) -> None:
    for split, ds in splits.items():
        if len(ds) == 0:
            raise DataError(f"data {name!r}: the {split} split is empty")


def limit_splits(bundle: DataBundle, limit_train, limit_test) -> DataBundle:
    """Keep only the first `limit_train` training and `limit_test` test samples."""
    for key, limit in (("train", limit_train), ("test", limit_test)):
        if limit is None:
            continue
        if not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit_{key}={limit!r}: must be an int >= 1")
        ds = getattr(bundle, key)
        if limit < len(ds):
            setattr(bundle, key, Subset(ds, range(limit)))
    return bundle


class EpochShuffleSampler(Sampler[int]):
    """A permutation per epoch from (seed, epoch) alone, so that epoch e's order does not
    depend on what ran before: resuming at epoch e sees the same order (same contract as
    DistributedSampler.set_epoch, which replaces it under torch.distributed)."""

    def __init__(self, n: int, seed: int):
        self.n = int(n)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self):
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


def train_loader(dataset: Dataset, batch_size: int, seed: int, workers: int = 0) -> DataLoader:
    """Shuffled (EpochShuffleSampler: call `loader.sampler.set_epoch(e)`), last partial batch
    dropped (a batch of one breaks BatchNorm)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    if len(dataset) < batch_size:
        raise DataError(
            f"the training split has {len(dataset)} samples, fewer than batch_size={batch_size}"
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochShuffleSampler(len(dataset), seed),
        drop_last=True,
        num_workers=workers,
        persistent_workers=False,
    )


def eval_loader(dataset: Dataset, batch_size: int = 256, workers: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


def bn_split(data: DataBundle) -> Dataset:
    """The images BN statistics are re-estimated on: the held-out split under the training
    augmentation (`DataBundle.bn`), else the held-out split as it is."""
    return data.bn if data.bn is not None else data.holdout


def fixed_batches(dataset: Dataset, batch_size: int, batches: int, seed: int = 0) -> list:
    """The first `batches` batches of `dataset` in order (inputs only), drawn once with the
    augmentation's randomness fixed by `seed`; the global RNG is left as it was. Every subnet
    whose BN statistics are re-estimated on the same list sees the same images, so accuracy
    differences between subnets are not differences between BN samples."""
    if not isinstance(batches, int) or isinstance(batches, bool) or batches < 1:
        raise ValueError(f"batches={batches!r}: must be an int >= 1")
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for x, _ in eval_loader(dataset, batch_size):
            if len(out) == batches:
                break
            out.append(x)
    return out
