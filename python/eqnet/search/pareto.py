"""Pareto front (accuracy up, cost down) as CSV and PNG."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from eqkernels import atomic

from .cost import METRICS

COLUMNS = ("label", "kind", "accuracy", *METRICS)


def pareto_front(rows: Sequence[dict], cost: str = "bitops") -> list[dict]:
    """Rows not dominated in (lower `cost`, higher accuracy), sorted by cost."""
    ordered = sorted(rows, key=lambda r: (r[cost], -r["accuracy"]))
    front, best = [], float("-inf")
    for r in ordered:
        if r["accuracy"] > best:
            front.append(r)
            best = r["accuracy"]
    return front


def write_csv(path: str | Path, rows: Sequence[dict]) -> Path:
    path = Path(path)
    with atomic.atomic_write(path, "w") as f:
        w = csv.DictWriter(f, fieldnames=[*COLUMNS, "on_front"], extrasaction="ignore")
        w.writeheader()
        front = {id(r) for r in pareto_front([r for r in rows if r["kind"] != "uniform"])}
        for r in rows:
            w.writerow({**r, "on_front": int(id(r) in front)})
    return path


def plot(path: str | Path, rows: Sequence[dict], title: str = "") -> Path:
    """Accuracy vs BitOPs and vs size; searched configs, their front, uniform widths."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, cost, label in ((axes[0], "bitops", "BitOPs"), (axes[1], "size", "size (bytes)")):
        searched = [r for r in rows if r["kind"] != "uniform"]
        uniform = [r for r in rows if r["kind"] == "uniform"]
        if searched:
            ax.scatter(
                [r[cost] for r in searched],
                [r["accuracy"] for r in searched],
                s=18,
                alpha=0.5,
                label="searched",
            )
            front = pareto_front(searched, cost)
            ax.plot(
                [r[cost] for r in front],
                [r["accuracy"] for r in front],
                "-o",
                ms=4,
                label="Pareto front",
            )
        if uniform:
            ax.scatter(
                [r[cost] for r in uniform],
                [r["accuracy"] for r in uniform],
                marker="s",
                color="k",
                s=24,
                label="uniform W/A",
            )
            for r in uniform:
                ax.annotate(
                    r["label"],
                    (r[cost], r["accuracy"]),
                    fontsize=6,
                    xytext=(2, 2),
                    textcoords="offset points",
                )
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # labels collide
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic.atomic_write(path, "wb") as f:
        fig.savefig(f, dpi=120, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)
    return path
