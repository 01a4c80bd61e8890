"""The search's accuracy dataset built by the ranks of a torch.distributed job (torchrun)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.distributed as dist

from eqnet.search.accuracy_data import build_dataset, config_key, read_dataset


def build_dataset_distributed(path, configs, evaluate, metrics=None, progress: bool = False):
    """`build_dataset` with the configs split across ranks.

    The configs still missing from `path` are taken in chunks of world_size; rank r evaluates
    the r-th config of each chunk on its own (a whole evaluation, BN recalibration included, is
    local: `evaluate` must not use collectives), the chunk's rows are gathered and rank 0
    appends them in config order, flushed, so an interrupted run keeps what it finished. Every
    rank returns all rows. `configs` must be the same sequence on every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return build_dataset(path, configs, evaluate, metrics, progress)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    path = Path(path)
    if rank == 0:
        build_dataset(path, [], evaluate)  # creates the file, drops a torn tail
    dist.barrier()
    rows = read_dataset(path)
    seen = {r["key"] for r in rows}
    todo = []
    for cfg in configs:
        k = config_key(cfg)
        if k not in seen:
            seen.add(k)
            todo.append((k, cfg))
    chunks = range(0, len(todo), world_size)
    if progress and rank == 0:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc=f"accuracy dataset ({world_size} ranks)", unit="chunk")
    for start in chunks:
        chunk = todo[start : start + world_size]
        row = None
        if rank < len(chunk):
            k, cfg = chunk[rank]
            row = {
                "key": k,
                "config": {n: c.to_dict() for n, c in cfg},
                "accuracy": float(evaluate(cfg)),
                **(metrics(cfg) if metrics else {}),
            }
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, row)
        new = [r for r in gathered if r is not None]
        if rank == 0:
            with open(path, "a") as f:
                for r in new:
                    f.write(json.dumps(r) + "\n")
                f.flush()
                os.fsync(f.fileno())
        rows.extend(new)
    dist.barrier()
    return rows
