"""eqnet.data: the embedded digits, .npz images, augmentations, splits, errors."""

import numpy as np
import pytest
import torch
from eqnet.data import (
    DataError,
    EpochShuffleSampler,
    bn_split,
    fixed_batches,
    load_data,
    train_loader,
)


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


def _crops_and_flips(image_uint8, mean, std, pad=4):
    """Every padded random crop of a [C, H, W] uint8 image, unflipped and flipped, normalized."""
    h, w = image_uint8.shape[1:]
    padded = torch.nn.functional.pad(image_uint8.double() / 255, (pad, pad, pad, pad))
    out = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = (padded[:, dy : dy + h, dx : dx + w] - mean.double()) / std.double()
            out += [crop, crop.flip(-1)]
    return out


def test_bn_split_is_the_holdout_under_training_augmentation(tmp_path):
    path = tmp_path / "d.npz"
    _write_npz(path, n_train=60)
    # the BN split is augmented even when the training split is not
    data = load_data(str(path), holdout=20, augment=False)
    assert bn_split(data) is data.bn and len(data.bn) == len(data.holdout) == 20
    h = data.holdout
    assert torch.equal(data.bn.labels, h.labels)
    for i in range(len(h)):
        x, _ = data.bn[i]
        assert any(
            torch.allclose(x.double(), c, atol=1e-5)
            for c in _crops_and_flips(h.images[i], h.mean, h.std)
        )
    # the digits are not augmented, so their BN split is the held-out split itself
    digits = load_data("digits")
    assert all(torch.equal(digits.bn[i][0], digits.holdout[i][0]) for i in range(10))


def test_fixed_batches_are_reproducible_and_leave_the_global_rng(tmp_path):
    path = tmp_path / "d.npz"
    _write_npz(path, n_train=60)
    data = load_data(str(path), holdout=20)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = fixed_batches(data.bn, batch_size=8, batches=2)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = fixed_batches(data.bn, batch_size=8, batches=2)
    assert [x.shape[0] for x in a] == [8, 8]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # another seed draws other crops of the same images
    c = fixed_batches(data.bn, batch_size=8, batches=2, seed=1)
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    # fewer batches than asked when the split runs out; a bad count is refused
    assert len(fixed_batches(data.bn, batch_size=8, batches=10)) == 3
    with pytest.raises(ValueError, match="batches"):
        fixed_batches(data.bn, batch_size=8, batches=0)


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
