"""The (config, accuracy) dataset the predictor learns from, cached on disk as JSONL.

One line per evaluated config: {"key", "config" (SubnetConfig JSON object), "accuracy",
metrics...}. Lines are appended and flushed one at a time, so an interrupted run loses at most
the config being evaluated; a rerun reads the file, skips configs already present and
evaluates only the rest. A torn last line (killed mid-write) is dropped on reading.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from eqkernels import atomic
from eqnet.space import SubnetConfig


def config_key(config: SubnetConfig) -> str:
    return json.dumps({n: c.to_dict() for n, c in config}, sort_keys=True, separators=(",", ":"))


def read_dataset(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # torn final line of an interrupted write
            raise ValueError(f"{path}:{i + 1}: not a JSON line") from None
        if not {"key", "config", "accuracy"} <= set(row):
            raise ValueError(f"{path}:{i + 1}: needs key, config and accuracy")
        rows.append(row)
    return rows


def row_config(row: dict) -> SubnetConfig:
    return SubnetConfig.from_json(
        json.dumps({"format": "eqnet.SubnetConfig", "version": 1, "layers": row["config"]})
    )


def build_dataset(
    path: str | Path,
    configs: Iterable[SubnetConfig],
    evaluate: Callable[[SubnetConfig], float],
    metrics: Callable[[SubnetConfig], dict] | None = None,
    progress: bool = False,
    imap: Callable[[list[SubnetConfig]], Iterable[float]] | None = None,
) -> list[dict]:
    """Evaluate every config not yet in `path` and append it; returns all rows of the file.

    imap: evaluates a list of configs elsewhere (e.g. in worker processes) and yields their
    accuracies in the list's order, each as soon as it and all before it are done; `evaluate`
    is then not called. Rows are appended in config order either way, so the file is the same
    as a sequential run's."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = read_dataset(path)
    if path.exists():  # rewrite without a torn tail, so appends start on a fresh line
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if path.read_text() != text:
            atomic.write_text(path, text)
    done = {r["key"] for r in rows}
    todo, seen = [], set(done)
    for cfg in configs:
        k = config_key(cfg)
        if k not in seen:
            seen.add(k)
            todo.append((k, cfg))
    if imap is None:
        accuracies = (evaluate(cfg) for _, cfg in todo)
    else:
        accuracies = imap([cfg for _, cfg in todo]) if todo else iter(())
    it = zip(todo, accuracies)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=len(todo), desc="accuracy dataset", unit="cfg")
    with open(path, "a") as f:
        for (k, cfg), acc in it:
            acc = float(acc)
            row = {
                "key": k,
                "config": {n: c.to_dict() for n, c in cfg},
                "accuracy": acc,
                **(metrics(cfg) if metrics else {}),
            }
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
            rows.append(row)
    return rows


def supernet_correctness(supernet, bn_loader, eval_loader, bn_batches: int = 20, device=None):
    """correct(config) -> bool [N]: set the subnet, re-estimate its BN statistics on the
    first `bn_batches` batches of `bn_loader` (input tensors or (input, label) pairs, e.g.
    `eqnet.data.fixed_batches`), then mark which of `eval_loader`'s images (the same fixed
    held-out images for every config) it classifies correctly. The BN batches are drawn once,
    so every config is re-estimated on the same images."""
    import itertools

    import torch

    from eqnet.convert import recalibrate_bn

    if device is None:
        device = next(supernet.parameters()).device
    bn = [
        (b[0] if isinstance(b, (tuple, list)) else b).to(device)
        for b in itertools.islice(bn_loader, bn_batches)
    ]
    if not bn:
        raise ValueError("supernet_correctness: bn_loader yielded no batches")

    def correct(cfg: SubnetConfig) -> torch.Tensor:
        supernet.set_config(cfg)
        recalibrate_bn(supernet, bn, batches=len(bn))
        was_training = supernet.training
        supernet.eval()
        out = []
        with torch.no_grad():
            for x, y in eval_loader:
                out.append(supernet(x.to(device)).argmax(dim=1).cpu() == y)
        supernet.train(was_training)
        if not out:
            raise ValueError("supernet_correctness: the eval loader yielded no samples")
        return torch.cat(out)

    return correct


def fraction_correct(correct) -> float:
    """Top-1 accuracy of a bool correctness vector, as an exact ratio of counts."""
    return int(correct.sum()) / correct.numel()


def supernet_evaluator(supernet, bn_loader, eval_loader, bn_batches: int = 20, device=None):
    """evaluate(config) -> accuracy: `supernet_correctness`, reduced to top-1 accuracy."""
    correct = supernet_correctness(supernet, bn_loader, eval_loader, bn_batches, device)
    return lambda cfg: fraction_correct(correct(cfg))
