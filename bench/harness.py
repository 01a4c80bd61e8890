"""Shared benchmark harness: timing, machine record, CSV rows and a markdown table.

Every row records the machine, the thread count, torch/triton versions and the git commit, so
a CSV read later says what produced it. Speed claims are ratios between providers measured in
the same run (`ratio_to`), never absolute numbers compared across runs.
"""

from __future__ import annotations

import csv
import datetime as _dt
import functools
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


@functools.cache
def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            check=False,
        ).stdout.strip()
        commit = (commit or "unknown") + ("+dirty" if dirty else "")
    except OSError:
        commit = "unknown"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": commit,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def time_fn(fn: Callable[[], object], *, warmup: int = 3, repeat: int = 20, min_time: float = 0.2):
    """Median wall time of fn() in seconds (after warm-up; at least `repeat` runs and
    `min_time` seconds)."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 10 * repeat:
            break
    return statistics.median(times)


class Table:
    """Collects rows of one benchmark; prints markdown and appends the CSV."""

    def __init__(self, name: str, columns: list[str]):
        self.name = name
        self.columns = columns
        self.rows: list[dict] = []

    def add(self, **row):
        missing = [c for c in self.columns if c not in row]
        if missing:
            raise ValueError(f"row misses columns {missing}")
        self.rows.append(row)
        return row

    def ratio_to(self, key: str, column: str, baseline_filter: Callable[[dict], bool], group_by):
        """Fill `key` with baseline[column] / row[column] within each group (higher = faster)."""
        groups: dict = {}
        for row in self.rows:
            groups.setdefault(tuple(row[g] for g in group_by), []).append(row)
        for rows in groups.values():
            base = [r for r in rows if baseline_filter(r)]
            for row in rows:
                row[key] = (base[0][column] / row[column]) if base and row[column] else float("nan")
        if key not in self.columns:
            self.columns.append(key)

    def markdown(self) -> str:
        def fmt(v):
            if isinstance(v, float):
                return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
            return str(v)

        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        for row in self.rows:
            lines.append("| " + " | ".join(fmt(row.get(c, "")) for c in self.columns) + " |")
        m = machine()
        lines.append(
            f"\n{m['cpu']}, {m['threads']} threads, torch {m['torch']}, triton {m['triton']}, "
            f"commit {m['commit']}"
        )
        return "\n".join(lines)

    def write_csv(self, path: Path | None = None) -> Path:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = path or RESULTS / f"{self.name}.csv"
        meta = machine()
        fields = self.columns + list(meta)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            for row in self.rows:
                writer.writerow({**{c: row.get(c, "") for c in self.columns}, **meta})
        return path

    def finish(self) -> None:
        print(self.markdown())
        print(f"\nCSV: {self.write_csv()}")


def threads_from_env() -> int:
    n = int(os.environ.get("EQK_BENCH_THREADS", torch.get_num_threads()))
    torch.set_num_threads(n)
    return n
