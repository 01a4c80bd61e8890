"""Byte-level text from Python source files, for causal language models (vocabulary 256).

- `stdlib-source`: the `.py` files of the running Python's standard library
  (`sysconfig.get_paths()["stdlib"]`), which every machine with Python has: nothing is
  downloaded. `site-packages` and `dist-packages` are left out (installed packages, not the
  standard library). The text depends on the Python version; the bundle's name records it.
- `source-tree:DIR`: the `.py` files under any directory, read the same way.

Files are read as bytes (no decoding) in the order of their sorted relative POSIX paths. Each
file belongs to one split by its path alone: `zlib.crc32(path) % 10` is 0 for the test split, 1
for the held-out split, anything else for training, so no file is in two splits and a file
added elsewhere in the tree moves no other file. A split is its files concatenated in path
order up to its share of `text_bytes` (test and held-out 10 % each, training the rest), the
last file cut at the limit. A sample is a window of that stream: input bytes
`[i L, (i+1) L)` and the next bytes `[i L + 1, (i+1) L + 1)` as int64 tokens (L = `seq_len`;
windows do not overlap, the tail shorter than a window is dropped).
"""

from __future__ import annotations

import os
import sys
import sysconfig
import zlib
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .bundle import DataBundle, DataError

VOCAB_SIZE = 256  # one token per byte value
MAX_SEQ_LEN = 1 << 16
MAX_TEXT_BYTES = 1 << 31
SPLITS = ("train", "holdout", "test")
# installed packages live inside some stdlib trees (pyenv, python.org builds): not the stdlib
_NOT_STDLIB = ("site-packages", "dist-packages", "__pycache__")


def is_text_spec(spec: str) -> bool:
    return spec == "stdlib-source" or spec.startswith("source-tree:")


def split_of(relative_path: str) -> str:
    """The split a file belongs to, from its relative POSIX path."""
    bucket = zlib.crc32(relative_path.encode("utf-8")) % 10
    return "test" if bucket == 0 else "holdout" if bucket == 1 else "train"


def source_files(root: Path) -> list[tuple[str, Path]]:
    """(relative POSIX path, path) of every `.py` file under `root`, sorted by that path."""
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _NOT_STDLIB]  # pruned, never walked
        for name in names:
            path = Path(folder, name)
            if name.endswith(".py") and path.is_file():
                files.append((path.relative_to(root).as_posix(), path))
    return sorted(files)


def split_budgets(text_bytes: int) -> dict[str, int]:
    """Bytes of each split: 10 % test, 10 % held out, the rest for training."""
    tenth = text_bytes // 10
    return {"train": text_bytes - 2 * tenth, "holdout": tenth, "test": tenth}


class TextWindows(Dataset):
    """Non-overlapping next-token windows over a byte stream (`data`, uint8 [n]): sample `i`
    is (data[i L : i L + L], data[i L + 1 : i L + L + 1]) as int64, L = seq_len. `files`
    lists (relative path, bytes taken) of the files the stream concatenates."""

    def __init__(self, data: torch.Tensor, seq_len: int, files: list[tuple[str, int]]):
        if data.dtype != torch.uint8 or data.dim() != 1:
            raise ValueError(f"data must be a uint8 vector, got {data.dtype} {tuple(data.shape)}")
        self.data = data
        self.seq_len = int(seq_len)
        self.files = list(files)

    def __len__(self):
        return max(0, (len(self.data) - 1) // self.seq_len)

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} of {len(self)}")
        i %= len(self)
        start = i * self.seq_len
        chunk = self.data[start : start + self.seq_len + 1].long()
        return chunk[:-1], chunk[1:]


def _check_int(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name}={value!r}: must be an int in {low}..{high}")
    return value


def _root(spec: str) -> Path:
    if spec == "stdlib-source":
        root = Path(sysconfig.get_paths()["stdlib"])
    else:
        root = Path(spec.partition(":")[2])
    if not root.is_dir():
        raise DataError(f"data {spec!r}: {root} is not a directory")
    return root


def read_splits(root: Path, text_bytes: int) -> dict[str, tuple[bytes, list[tuple[str, int]]]]:
    """split -> (its byte stream, [(relative path, bytes taken)]) under `root`."""
    budgets = split_budgets(text_bytes)
    parts = {s: [] for s in SPLITS}
    used = dict.fromkeys(SPLITS, 0)
    files = {s: [] for s in SPLITS}
    for rel, path in source_files(root):
        split = split_of(rel)
        room = budgets[split] - used[split]
        if room <= 0:
            if all(used[s] >= budgets[s] for s in SPLITS):
                break
            continue
        try:
            data = path.read_bytes()[:room]
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc})") from None
        if not data:
            continue
        parts[split].append(data)
        files[split].append((rel, len(data)))
        used[split] += len(data)
    return {s: (b"".join(parts[s]), files[s]) for s in SPLITS}


def load_text(spec: str, *, seq_len: int = 128, text_bytes: int = 1 << 20) -> DataBundle:
    """The text data set of `spec` (see the module docstring) as a causal-LM DataBundle whose
    splits are `TextWindows` of `seq_len` tokens. Fails with DataError on a missing
    directory, no source files, or a split too short for one window."""
    _check_int("seq_len", seq_len, 1, MAX_SEQ_LEN)
    _check_int("text_bytes", text_bytes, 10 * (seq_len + 1), MAX_TEXT_BYTES)
    root = _root(spec)
    streams = read_splits(root, text_bytes)
    if not any(files for _, files in streams.values()):
        raise DataError(f"data {spec!r}: no non-empty .py files under {root}")
    splits = {}
    for split, (data, files) in streams.items():
        if len(data) < seq_len + 1:
            raise DataError(
                f"data {spec!r}: the {split} split holds {len(data)} bytes, fewer than one "
                f"window of seq_len + 1 = {seq_len + 1}; raise text_bytes or lower seq_len"
            )
        tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        splits[split] = TextWindows(tensor, seq_len, files)
    version = ".".join(str(v) for v in sys.version_info[:3])
    name = spec if spec != "stdlib-source" else f"stdlib-source (Python {version})"
    return DataBundle(
        name=name,
        train=splits["train"],
        holdout=splits["holdout"],
        test=splits["test"],
        num_classes=VOCAB_SIZE,
        input_shape=(seq_len,),
        task="causal-lm",
    )
