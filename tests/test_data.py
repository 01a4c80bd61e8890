"""eqnet.data: the embedded digits, .npz images, augmentations, splits, errors."""

import numpy as np
import pytest
import torch
from eqnet.data import DataError, EpochShuffleSampler, load_data, train_loader


def test_digits_split_is_fixed_and_complete():
    a = load_data("digits")
    b = load_data("digits")
    assert a.num_classes == 10 and a.input_shape == (1, 8, 8)
    assert len(a.train) + len(a.holdout) + len(a.test) == 1797
    assert len(a.test) == 1797 // 5
    assert torch.equal(a.train.images, b.train.images)
    assert torch.equal(a.holdout.labels, b.holdout.labels)
    x, y = a.train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and 0 <= int(y) < 10
    # normalized with the training split's statistics
    allx = torch.stack([a.train[i][0] for i in range(len(a.train))])
    assert float(allx.mean()) == pytest.approx(0.0, abs=0.05)


def _write_npz(path, n_train=30, n_test=10, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    np.savez(
        path,
        x_train=rng.integers(0, 256, (n_train, 6, 6, 3), dtype=np.uint8),
        y_train=rng.integers(0, classes, n_train),
        x_test=rng.integers(0, 256, (n_test, 6, 6, 3), dtype=np.uint8),
        y_test=np.arange(n_test) % classes,
    )


def test_npz_normalization_and_holdout(tmp_path):
    path = tmp_path / "d.npz"
    _write_npz(path)
    data = load_data(str(path), holdout=5)
    assert (len(data.train), len(data.holdout), len(data.test)) == (25, 5, 10)
    assert data.input_shape == (3, 6, 6) and data.num_classes == 10
    raw = np.load(path)
    x, y = data.test[3]
    mean = torch.tensor([0.4914, 0.4822, 0.4465], dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616], dtype=torch.float64).view(3, 1, 1)
    expected = (torch.from_numpy(raw["x_test"][3]).permute(2, 0, 1).double() / 255 - mean) / std
    assert torch.allclose(x.double(), expected, atol=1e-5)
    assert int(y) == 3


def test_npz_hundred_classes(tmp_path):
    path = tmp_path / "c100.npz"
    _write_npz(path, classes=100, n_train=300)
    assert load_data(str(path)).num_classes == 100


def test_crop_flip_augmentation_is_a_shifted_crop(tmp_path):
    path = tmp_path / "d.npz"
    _write_npz(path)
    data = load_data(str(path), holdout=5)
    ds = data.train
    plain = (ds.images[0].float() / 255 - ds.mean) / ds.std
    padded = torch.nn.functional.pad(ds.images[0].float() / 255, (4, 4, 4, 4))
    candidates = []
    for dy in range(9):
        for dx in range(9):
            crop = (padded[:, dy : dy + 6, dx : dx + 6] - ds.mean) / ds.std
            candidates += [crop, crop.flip(-1)]
    seen_different = False
    for _ in range(20):
        x, _ = ds[0]
        assert any(torch.allclose(x, c) for c in candidates)
        seen_different |= not torch.allclose(x, plain)
    assert seen_different
    # held-out samples are never augmented
    h = data.holdout
    for _ in range(5):
        assert torch.allclose(h[0][0], (h.images[0].float() / 255 - h.mean) / h.std)


def test_bad_inputs_fail_clearly(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_data(str(tmp_path / "missing.npz"))
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(DataError, match="missing arrays"):
        load_data(str(bad))
    empty = tmp_path / "empty.npz"
    np.savez(
        empty,
        x_train=np.zeros((0, 4, 4, 3), np.uint8),
        y_train=np.zeros(0, np.int64),
        x_test=np.zeros((0, 4, 4, 3), np.uint8),
        y_test=np.zeros(0, np.int64),
    )
    with pytest.raises(DataError, match="empty"):
        load_data(str(empty))
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="neither"):
        load_data(str(tmp_path / "folder"))
    with pytest.raises(DataError, match="not a directory"):
        load_data(f"cifar10:{tmp_path / 'nope'}")
    with pytest.raises(ValueError, match="holdout"):
        load_data("digits", holdout=0)


def test_epoch_sampler_is_a_function_of_seed_and_epoch():
    s = EpochShuffleSampler(50, seed=4)
    s.set_epoch(2)
    first = list(s)
    assert sorted(first) == list(range(50))
    s.set_epoch(3)
    assert list(s) != first
    t = EpochShuffleSampler(50, seed=4)
    t.set_epoch(2)
    assert list(t) == first


def test_train_loader_rejects_tiny_split():
    data = load_data("digits", limit_train=10)
    with pytest.raises(DataError, match="batch_size"):
        train_loader(data.train, 32, seed=0)


def test_imagefolder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("val", 2)):
        for cls in ("cat", "dog"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(
                    d / f"{i}.png"
                )
    data = load_data(f"imagefolder:{tmp_path}", image_size=8, holdout=2)
    assert data.num_classes == 2 and data.input_shape == (3, 8, 8)
    assert (len(data.train), len(data.holdout), len(data.test)) == (8, 2, 4)
    x, y = data.test[0]
    assert x.shape == (3, 8, 8) and int(y) == 0
    with pytest.raises(DataError, match="train/ and val/"):
        load_data(f"imagefolder:{tmp_path / 'val'}")
