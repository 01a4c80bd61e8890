"""eqnet.data's byte-level text: windows are the files' bytes, splits are disjoint by file.

The reference re-reads the files here and applies the documented rule itself: sorted relative
POSIX paths, split by `zlib.crc32(path) % 10` (0 test, 1 held out, else train), each split
its files' bytes concatenated up to its share of text_bytes (10 %, 10 %, the rest).
"""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path

import pytest
import torch
from eqnet.data import DataError, load_data


def _expected_streams(root: Path, text_bytes: int) -> dict[str, tuple[bytes, list[str]]]:
    tenth = text_bytes // 10
    budget = {"train": text_bytes - 2 * tenth, "holdout": tenth, "test": tenth}
    streams = {s: b"" for s in budget}
    names = {s: [] for s in budget}
    paths = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if not {"site-packages", "dist-packages", "__pycache__"} & set(p.relative_to(root).parts)
    )
    for rel in paths:
        bucket = zlib.crc32(rel.encode()) % 10
        split = "test" if bucket == 0 else "holdout" if bucket == 1 else "train"
        room = budget[split] - len(streams[split])
        data = (root / rel).read_bytes()[: max(room, 0)]
        if data:
            streams[split] += data
            names[split].append(rel)
    return {s: (streams[s], names[s]) for s in budget}


def _windows(ds) -> tuple[bytes, bytes]:
    """Every window's inputs and targets, concatenated, as bytes."""
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return bytes(torch.cat(xs).tolist()), bytes(torch.cat(ys).tolist())


def _tree(root: Path, count: int = 60) -> None:
    for i in range(count):
        folder = root / f"pkg{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        body = "".join(f"x_{i}_{j} = {j * i} + {chr(97 + j % 26)!r}\n" for j in range(5 + i % 7))
        (folder / f"mod{i:02d}.py").write_text(body)
    (root / "notes.txt").write_text("not python\n")  # not a .py file: never read
    site = root / "site-packages"
    site.mkdir()
    (site / "installed.py").write_text("INSTALLED = True\n")  # not the library: never read


@pytest.mark.parametrize("seq_len", [1, 7, 16])
def test_source_tree_windows_are_the_files_bytes(tmp_path, seq_len):
    _tree(tmp_path)
    text_bytes = 2000
    data = load_data(f"source-tree:{tmp_path}", seq_len=seq_len, text_bytes=text_bytes)
    assert data.task == "causal-lm" and data.num_classes == 256
    assert data.input_shape == (seq_len,)
    expected = _expected_streams(tmp_path, text_bytes)
    seen = {}
    for split in ("train", "holdout", "test"):
        stream, names = expected[split]
        ds = getattr(data, split)
        n = (len(stream) - 1) // seq_len
        assert len(ds) == n > 0
        x, y = _windows(ds)
        assert x == stream[: n * seq_len]  # windows in order, no overlap, no gap
        assert y == stream[1 : n * seq_len + 1]  # the next byte of each input byte
        first_x, first_y = ds[0]
        assert first_x.dtype == first_y.dtype == torch.int64 and first_x.shape == (seq_len,)
        assert [name for name, _ in ds.files] == names
        seen[split] = set(names)
        assert not any("site-packages" in name for name in names)
    assert not (seen["train"] & seen["holdout"] or seen["train"] & seen["test"])
    assert not seen["holdout"] & seen["test"]


def test_budgets_cut_the_last_file_and_fill_each_share(tmp_path):
    _tree(tmp_path)
    data = load_data(f"source-tree:{tmp_path}", seq_len=4, text_bytes=1000)
    sizes = {s: len(getattr(data, s).data) for s in ("train", "holdout", "test")}
    assert sizes == {"train": 800, "holdout": 100, "test": 100}


def test_stdlib_source_is_the_standard_library(tmp_path):
    root = Path(sysconfig.get_paths()["stdlib"])
    seq_len, text_bytes = 64, 40_000
    data = load_data("stdlib-source", seq_len=seq_len, text_bytes=text_bytes)
    assert data.name.startswith("stdlib-source (Python ")
    expected = _expected_streams(root, text_bytes)
    for split in ("train", "holdout", "test"):
        stream, names = expected[split]
        ds = getattr(data, split)
        n = (len(stream) - 1) // seq_len
        x, y = _windows(ds)
        assert len(ds) == n and x == stream[: n * seq_len] and y == stream[1 : n * seq_len + 1]
        assert [name for name, _ in ds.files] == names
    # the same bytes on every call: a fixed order, no randomness
    again = load_data("stdlib-source", seq_len=seq_len, text_bytes=text_bytes)
    assert torch.equal(again.test.data, data.test.data)


def test_limits_keep_the_first_windows(tmp_path):
    _tree(tmp_path)
    full = load_data(f"source-tree:{tmp_path}", seq_len=8, text_bytes=2000)
    cut = load_data(f"source-tree:{tmp_path}", seq_len=8, text_bytes=2000, limit_test=3)
    assert len(cut.test) == 3
    assert all(torch.equal(cut.test[i][0], full.test[i][0]) for i in range(3))


def test_text_errors_are_clear(tmp_path):
    with pytest.raises(DataError, match="is not a directory"):
        load_data(f"source-tree:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no non-empty \.py files"):
        load_data(f"source-tree:{tmp_path / 'empty'}", seq_len=4, text_bytes=100)
    with pytest.raises(ValueError, match=r"seq_len=0: must be an int in 1\.\.65536"):
        load_data("stdlib-source", seq_len=0)
    with pytest.raises(ValueError, match="text_bytes=50: must be an int in 110"):
        load_data("stdlib-source", seq_len=10, text_bytes=50)
    with pytest.raises(ValueError, match="holdout=5: the text data holds out its own files"):
        load_data("stdlib-source", holdout=5)
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    (tiny / "a.py").write_text("a = 1\n")
    with pytest.raises(DataError, match=r"split holds \d+ bytes, fewer than one window"):
        load_data(f"source-tree:{tiny}", seq_len=4, text_bytes=100)
