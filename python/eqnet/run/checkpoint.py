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
from pathlib import Path

import torch

from eqkernels import atomic
from eqkernels.atomic import remove_stale_temps as remove_stale_temps

CHECKPOINT_NAME = "checkpoint.pt"
CONFIG_NAME = "config.json"
METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
FORMAT = "eqnet.train.checkpoint"
VERSION = 1


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(path, data)


def first_non_finite(tensors) -> str | None:
    """The name of the first floating tensor of `tensors` (name -> Tensor) holding NaN or Inf."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(t.isfinite().all()):
            return name
    return None


def check_device(name) -> torch.device:
    """`name` as a torch.device this machine has; ValueError naming it otherwise."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device={name!r}: accepted values are cpu, cuda, cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r}: no CUDA device is available here; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={name!r}: only {torch.cuda.device_count()} CUDA devices")
    elif device.type != "cpu":
        raise ValueError(f"device={name!r}: accepted values are cpu, cuda, cuda:N")
    return device


def read_torch_file(path: Path, what: str, map_location="cpu"):
    """torch.load(weights_only=True) with every failure as one ValueError naming `what` (and
    never torch's advice to retry with weights_only=False)."""
    if isinstance(map_location, str | torch.device):
        check_device(map_location)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, OSError...
        text = str(exc).strip()
        reason = text.splitlines()[0].split(". ")[0] if text else type(exc).__name__
        if "weights_only" in text or "Unpickl" in type(exc).__name__:
            reason = "it holds objects other than tensors and plain containers; not loaded"
        raise ValueError(f"{what}: {path} is not a readable checkpoint ({reason})") from None


def save_checkpoint(out_dir: str | os.PathLike, state: dict) -> Path:
    """Atomically write `state` (plus format tag) to OUT_DIR/checkpoint.pt."""
    bad = first_non_finite(state.get("model", {}))
    if bad is not None:
        raise ValueError(f"model tensor {bad!r} holds NaN or Inf: not writing the checkpoint")
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
    if path.suffix == ".eqk":
        raise ValueError(f"{path} is a deployment file (.eqk), not a training run or checkpoint")
    state = read_torch_file(path, "checkpoint", map_location)
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
