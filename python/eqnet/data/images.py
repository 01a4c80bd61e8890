"""Image data sets: scikit-learn's digits, `.npz` arrays, torchvision's CIFAR folders and
ImageFolder trees (the specs are listed in `eqnet.data`). Augmentation (CIFAR: 4-pixel padded
random crop + horizontal flip) draws from the global torch RNG, which the trainer saves in its
checkpoints, so a resumed run sees the same augmented batches.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from .bundle import (
    DataBundle,
    DataError,
    check_nonempty,
    default_holdout,
    fixed_split,
)

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
    train_idx, test_idx = fixed_split(len(y), len(y) // 5, split_seed)
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
    n_hold = default_holdout(len(train_aug)) if holdout is None else holdout
    keep, held = fixed_split(len(train_aug), n_hold, split_seed)
    bundle = DataBundle(
        name=f"imagefolder:{root}",
        train=Subset(train_aug, keep),
        holdout=Subset(train_eval, held),
        test=test,
        num_classes=len(train_aug.classes),
        input_shape=(3, image_size, image_size),
        bn=Subset(train_aug, held),
    )
    check_nonempty(bundle.name, train=bundle.train, holdout=bundle.holdout, test=bundle.test)
    return bundle


def load_images(
    spec: str, *, holdout: int | None, split_seed: int, augment: bool, image_size: int
) -> DataBundle:
    """An image data set (the specs of `eqnet.data`). `holdout` samples of the training set
    (default 10 %, at most 5000) are set aside. Fails with DataError on a bad path, a bad
    format or an empty split."""
    if spec.startswith("imagefolder:"):
        return _imagefolder(Path(spec[12:]), image_size, holdout, split_seed)
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
                "cifar10:DIR, cifar100:DIR, imagefolder:DIR, stdlib-source, source-tree:DIR"
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
            return _imagefolder(path, image_size, holdout, split_seed)
        else:
            raise DataError(
                f"data {spec!r}: directory is neither a torchvision CIFAR folder nor an "
                "ImageFolder with train/ and val/"
            )
        name = str(path)
    x_train, y_train, x_test, y_test, mean, std, pad, flip, num_classes = parts
    if len(y_train) < 2:
        raise DataError(f"data {name!r}: the training split has {len(y_train)} samples")
    n_hold = default_holdout(len(y_train)) if holdout is None else holdout
    if n_hold >= len(y_train):
        raise ValueError(
            f"holdout={n_hold}: must be smaller than the training set ({len(y_train)})"
        )
    keep, held = fixed_split(len(y_train), n_hold, split_seed)
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
    check_nonempty(name, train=bundle.train, holdout=bundle.holdout, test=bundle.test)
    return bundle
