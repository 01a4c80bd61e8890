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
- `imagefolder:DIR` (or a DIR with `train/` and `val/` or `test/` class folders).

Splits are fixed by `split_seed` (not the training seed), so every recipe trained on the same
data sees the same train/holdout/test samples and results are comparable. Augmentation
(CIFAR: 4-pixel padded random crop + horizontal flip) draws from the global torch RNG, which
the trainer saves in its checkpoints, so a resumed run sees the same augmented batches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(ValueError):
    """A data set that cannot be used (missing path, wrong format, empty split)."""


@dataclass
class DataBundle:
    name: str
    train: Dataset
    holdout: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]
    # The held-out images with the training augmentation. A subnet's BN statistics are
    # re-estimated on these: its weights and activation step sizes were learned under the
    # training distribution's statistics, and statistics of unaugmented images cost a
    # ResNet-20 W4A4 model 2 points on CIFAR-10 (83.2 % with its own statistics, 81.2 %
    # re-estimated on unaugmented images, 82.9 % on augmented ones). None: use `holdout`.
    bn: Dataset | None = None


class TensorImageDataset(Dataset):
    """Images held in one tensor [N, C, H, W] (uint8 0..255 or float in [0, 1]) with labels,
    normalized per channel; optional padded random crop and horizontal flip."""

    def __init__(self, images, labels, mean, std, crop_padding=0, flip=False):
        if images.ndim != 4:
            raise DataError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.long()
        c = images.shape[1]
        self.mean = torch.tensor(mean, dtype=torch.float32).view(c, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(c, 1, 1)
        self.crop_padding = int(crop_padding)
        self.flip = bool(flip)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i]
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if self.crop_padding:
            p = self.crop_padding
            h, w = x.shape[1:]
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            dy, dx = torch.randint(0, 2 * p + 1, (2,)).tolist()
            x = padded[:, dy : dy + h, dx : dx + w]
        if self.flip and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        return (x - self.mean) / self.std, self.labels[i]


def _fixed_split(n: int, n_out: int, seed: int) -> tuple[list[int], list[int]]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_out:]), sorted(perm[:n_out])


def _default_holdout(n_train: int) -> int:
    return min(5000, max(1, n_train // 10))


def _check_nonempty(name, **splits):
    for split, ds in splits.items():
        if len(ds) == 0:
            raise DataError(f"data {name!r}: the {split} split is empty")


def _digits(split_seed: int):
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - sklearn is a dependency
        raise DataError(
            "the embedded digits data needs scikit-learn (pip install scikit-learn)"
        ) from exc
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    train_idx, test_idx = _fixed_split(len(y), len(y) // 5, split_seed)
    x_train, y_train = x[train_idx], y[train_idx]
    mean, std = (float(x_train.mean()),), (float(x_train.std()),)
    return x_train, y_train, x[test_idx], y[test_idx], mean, std, 0, False, 10


def _npz(path: Path):
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as d:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(d.files)
            if missing:
                raise DataError(
                    f"{path}: missing arrays {sorted(missing)} (needs x_train, y_train, x_test, y_test)"
                )
            arrays = {k: d[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except (OSError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: not a readable .npz ({exc})") from None
    return _from_nhwc(str(path), **arrays)


def _from_nhwc(name, x_train, y_train, x_test, y_test):
    for key, x in (("x_train", x_train), ("x_test", x_test)):
        if x.ndim != 4 or x.dtype.name != "uint8":
            raise DataError(f"{name}: {key} must be uint8 [N, H, W, C], got {x.dtype} {x.shape}")
    xt = torch.from_numpy(x_train).permute(0, 3, 1, 2).contiguous()
    xs = torch.from_numpy(x_test).permute(0, 3, 1, 2).contiguous()
    yt = torch.as_tensor(y_train).long().flatten()
    ys = torch.as_tensor(y_test).long().flatten()
    if len(yt) == 0 or len(ys) == 0:
        raise DataError(f"data {name!r}: empty train or test split")
    num_classes = 100 if int(max(yt.max(), ys.max())) >= 10 else 10
    c = xt.shape[1]
    mean = CIFAR_MEAN if c == 3 else (0.5,) * c
    std = CIFAR_STD if c == 3 else (0.25,) * c
    # crop + flip: the standard CIFAR augmentation
    return xt, yt, xs, ys, mean, std, 4, True, num_classes


def _cifar_folder(root: Path, classes: int):
    import numpy as np
    from torchvision import datasets

    cls = datasets.CIFAR10 if classes == 10 else datasets.CIFAR100
    try:
        train = cls(str(root), train=True, download=False)
        test = cls(str(root), train=False, download=False)
    except RuntimeError as exc:
        raise DataError(f"{root}: not a torchvision CIFAR-{classes} folder ({exc})") from None
    return _from_nhwc(
        str(root), train.data, np.asarray(train.targets), test.data, np.asarray(test.targets)
    )


def _imagefolder(root: Path, image_size: int, holdout: int | None, split_seed: int):
    from torchvision import datasets, transforms

    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise DataError(f"{root}: an ImageFolder data set needs train/ and val/ (or test/) folders")
    norm = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            norm,
        ]
    )
    eval_tf = transforms.Compose(
        [
            transforms.Resize(int(image_size * 256 / 224)),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            norm,
        ]
    )
    try:
        train_aug = datasets.ImageFolder(str(root / "train"), transform=train_tf)
        train_eval = datasets.ImageFolder(str(root / "train"), transform=eval_tf)
        test = datasets.ImageFolder(str(test_dir), transform=eval_tf)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"{root}: {exc}") from None
    n_hold = _default_holdout(len(train_aug)) if holdout is None else holdout
    keep, held = _fixed_split(len(train_aug), n_hold, split_seed)
    bundle = DataBundle(
        name=f"imagefolder:{root}",
        train=Subset(train_aug, keep),
        holdout=Subset(train_eval, held),
        test=test,
        num_classes=len(train_aug.classes),
        input_shape=(3, image_size, image_size),
        bn=Subset(train_aug, held),
    )
    _check_nonempty(bundle.name, train=bundle.train, holdout=bundle.holdout, test=bundle.test)
    return bundle


def load_data(
    spec: str | os.PathLike | None = "digits",
    *,
    holdout: int | None = None,
    split_seed: int = 0,
    augment: bool = True,
    limit_train: int | None = None,
    limit_test: int | None = None,
    image_size: int = 224,
) -> DataBundle:
    """Load a data set (see the module docstring for `spec`). `holdout` samples of the
    training set (default 10 %, at most 5000) are set aside; `limit_train` / `limit_test`
    keep only the first samples (quick runs and tests). Fails with DataError, before any
    training, on a bad path, a bad format or an empty split."""
    spec = "digits" if spec is None else str(spec)
    if holdout is not None and (not isinstance(holdout, int) or holdout < 1):
        raise ValueError(f"holdout={holdout!r}: must be an int >= 1 (or None for 10 %)")
    if spec.startswith("imagefolder:"):
        return _limit(
            _imagefolder(Path(spec[12:]), image_size, holdout, split_seed), limit_train, limit_test
        )
    if spec == "digits":
        parts = _digits(split_seed)
        name = "digits"
    elif spec.startswith(("cifar10:", "cifar100:")):
        kind, _, path = spec.partition(":")
        root = Path(path)
        if not root.is_dir():
            raise DataError(f"data {spec!r}: {root} is not a directory")
        parts = _cifar_folder(root, 100 if kind == "cifar100" else 10)
        name = spec
    else:
        path = Path(spec)
        if not path.exists():
            raise DataError(
                f"data {spec!r}: no such file or directory; accepted: digits, a .npz path, "
                "cifar10:DIR, cifar100:DIR, imagefolder:DIR"
            )
        if path.is_file():
            if path.suffix != ".npz":
                raise DataError(f"data {spec!r}: a data file must be an .npz")
            parts = _npz(path)
        elif (path / "cifar-10-batches-py").is_dir():
            parts = _cifar_folder(path, 10)
        elif (path / "cifar-100-python").is_dir():
            parts = _cifar_folder(path, 100)
        elif (path / "train").is_dir():
            return _limit(
                _imagefolder(path, image_size, holdout, split_seed), limit_train, limit_test
            )
        else:
            raise DataError(
                f"data {spec!r}: directory is neither a torchvision CIFAR folder nor an "
                "ImageFolder with train/ and val/"
            )
        name = str(path)
    x_train, y_train, x_test, y_test, mean, std, pad, flip, num_classes = parts
    if len(y_train) < 2:
        raise DataError(f"data {name!r}: the training split has {len(y_train)} samples")
    n_hold = _default_holdout(len(y_train)) if holdout is None else holdout
    if n_hold >= len(y_train):
        raise ValueError(
            f"holdout={n_hold}: must be smaller than the training set ({len(y_train)})"
        )
    keep, held = _fixed_split(len(y_train), n_hold, split_seed)
    aug = dict(crop_padding=pad, flip=flip) if augment else {}
    bundle = DataBundle(
        name=name,
        train=TensorImageDataset(x_train[keep], y_train[keep], mean, std, **aug),
        holdout=TensorImageDataset(x_train[held], y_train[held], mean, std),
        test=TensorImageDataset(x_test, y_test, mean, std),
        num_classes=num_classes,
        input_shape=tuple(x_train.shape[1:]),
        # always augmented: `augment` is about the training split only
        bn=TensorImageDataset(x_train[held], y_train[held], mean, std, crop_padding=pad, flip=flip),
    )
    _check_nonempty(name, train=bundle.train, holdout=bundle.holdout, test=bundle.test)
    return _limit(bundle, limit_train, limit_test)


def _limit(bundle: DataBundle, limit_train, limit_test) -> DataBundle:
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
