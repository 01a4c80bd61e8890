"""Atomic training checkpoints and the run directory's metric files.

A checkpoint is a dict of tensors and primitive containers only, so it loads with
`torch.load(weights_only=True)` (nothing is unpickled but tensors, dicts, lists, strings and
numbers). Writes go to a temporary file in the same directory, are fsynced, renamed over the
old file and the directory is fsynced: a crash leaves either the old or the new checkpoint.
All writing goes through this module so a distributed run needs one rank-0 guard.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path

import torch

CHECKPOINT_NAME = "checkpoint.pt"
CONFIG_NAME = "config.json"
METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
FORMAT = "eqnet.train.checkpoint"
VERSION = 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; give the file the permissions a plain open() would (umask).
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(out_dir: str | os.PathLike, state: dict) -> Path:
    """Atomically write `state` (plus format tag) to OUT_DIR/checkpoint.pt."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **state}, buf)
    path = Path(out_dir) / CHECKPOINT_NAME
    _atomic_write_bytes(path, buf.getvalue())
    return path


def checkpoint_path(run: str | os.PathLike) -> Path:
    """The checkpoint file of a run directory (or the file itself)."""
    p = Path(run)
    return p / CHECKPOINT_NAME if p.is_dir() else p


def load_checkpoint(run: str | os.PathLike, map_location="cpu") -> dict:
    path = checkpoint_path(run)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (expected a run directory or a .pt file)")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not an eqnet training checkpoint")
    if state.get("version") != VERSION:
        raise ValueError(f"{path}: unsupported checkpoint version {state.get('version')!r}")
    return state


def save_json(path: str | os.PathLike, obj) -> None:
    _atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_metrics(out_dir: str | os.PathLike, rows: list[dict]) -> None:
    """Rewrite metrics.jsonl and metrics.csv from all epochs' rows (rewriting, not appending,
    keeps them consistent with the checkpoint after a resume)."""
    out_dir = Path(out_dir)
    jsonl = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    _atomic_write_bytes(out_dir / METRICS_JSONL, jsonl.encode())
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    _atomic_write_bytes(out_dir / METRICS_CSV, buf.getvalue().encode())
