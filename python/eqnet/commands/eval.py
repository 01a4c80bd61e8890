"""`eqnet eval FILE.eqk`: the integer runtime at each stored width / configuration.

    eqnet eval model.eqk                       # every stored width and config, test split
    eqnet eval model.eqk --bits 2,4 --config mixed --csv eval.csv

For each selection the file is loaded afresh, reading only what that selection needs (nested
files: the prefix up to its widest plane), and reported: top-1 accuracy on the data's test
split, bytes read from the file, model size (bytes of the tensors the selection uses), the
weight-plane bytes one forward reads for the elastic layers, and the median latency of one
forward at batch 1 on this machine. Printed as a markdown table; `--csv` also writes CSV.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

from eqnet.commands.argtypes import count

COLUMNS = (
    "selection",
    "mean_w_bits",
    "accuracy",
    "bytes_read",
    "model_bytes",
    "elastic_plane_bytes",
    "latency_ms_b1",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="a .eqk file written by eqnet export")
    p.add_argument("--bits", default=None, help="stored widths to run, e.g. 2,3,4 (default all)")
    p.add_argument(
        "--config",
        action="append",
        default=None,
        metavar="NAME",
        help="stored config name (repeatable; default: every stored config)",
    )
    p.add_argument("--data", default=None, help="data spec (default: the one in the file)")
    p.add_argument("--limit-test", type=count(1), default=None, help="first N test samples only")
    p.add_argument("--batch-size", type=count(1), default=256)
    p.add_argument("--latency-runs", type=count(1), default=30, help="batch-1 forwards timed")
    p.add_argument("--backend", default=None, help="eqkernels backend (default auto)")
    p.add_argument("--csv", default=None, metavar="PATH", help="also write the rows as CSV")


def selections(header: dict, bits=None, configs=None) -> list[tuple[str, dict]]:
    """(label, load kwargs) for the requested widths and configs (default: all stored)."""
    stored = header["quant"]["configs"]
    widths = sorted(int(k) for k in stored if k.isdecimal())
    named = [k for k in stored if not k.isdecimal()]
    if bits is not None:
        bad = [b for b in bits if b not in widths]
        if bad:
            raise ValueError(f"--bits {bad[0]}: accepted values are the stored widths {widths}")
        widths = list(bits)
    if configs is not None:
        bad = [c for c in configs if c not in named]
        if bad:
            raise ValueError(f"--config {bad[0]!r}: accepted values are {named}")
        named = list(configs)
        if bits is None:
            widths = []
    out = []
    for b in widths:
        kwargs = {"bits": b}
        if header["nested"]:
            kwargs["max_bits"] = b  # read only the prefix this width needs
        out.append((f"W{b}", kwargs))
    for name in named:
        kwargs = {"config": name}
        if header["nested"]:
            kwargs["max_bits"] = prefix_bits(header, name)
        out.append((name, kwargs))
    return out


def prefix_bits(header: dict, config_name: str) -> int:
    """The smallest stored width whose file prefix holds everything `config_name` needs."""
    from eqnet.deploy.layout import config_from, sections_needed

    last = max(sections_needed(header, config_from(header, None, config_name)))
    fits = [int(k) for k, need in header["widths"].items() if last in need]
    return min(fits)


def _latency_ms(model, x, runs: int) -> float:
    import torch

    with torch.no_grad():
        for _ in range(3):
            model(x)
        times = []
        for _ in range(max(1, runs)):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _selection_bytes(deployed) -> int:
    from eqnet.deploy.layout import required_tensors

    sizes = {t["name"]: t["nbytes"] for t in deployed.header["tensors"]}
    return sum(sizes[n] for n in required_tensors(deployed.header, deployed.active_config))


def evaluate_file(
    path,
    test_set,
    sel: list[tuple[str, dict]],
    *,
    batch_size: int = 256,
    latency_runs: int = 30,
    backend: str | None = None,
    progress=None,
) -> list[dict]:
    """One row per selection (see COLUMNS)."""
    import torch

    from eqnet.deploy import load

    loader = torch.utils.data.DataLoader(test_set, batch_size=batch_size)
    rows = []
    for label, kwargs in sel:
        if progress:
            progress(f"eval {label}: loading {Path(path).name}")
        deployed = load(path, backend=backend, **kwargs)
        correct = total = 0
        x1 = None
        with torch.no_grad():
            for x, y in loader:
                correct += int((deployed(x).argmax(1) == y).sum())
                total += len(y)
                if x1 is None:
                    x1 = x[:1]
        if total == 0:
            raise ValueError("the test split is empty")
        rows.append(
            {
                "selection": label,
                "mean_w_bits": round(deployed.active_config.mean_w_bits(), 3),
                "accuracy": correct / total,
                "bytes_read": deployed.bytes_read,
                "model_bytes": _selection_bytes(deployed),
                "elastic_plane_bytes": deployed.plane_bytes(),
                "latency_ms_b1": _latency_ms(deployed, x1, latency_runs),
            }
        )
        if progress:
            r = rows[-1]
            progress(f"eval {label}: accuracy {r['accuracy']:.4f}, {r['bytes_read']} bytes read")
    return rows


def markdown(rows: list[dict], columns=COLUMNS) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4f}" if v < 10 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(path, rows: list[dict], columns=COLUMNS) -> None:
    from eqkernels import atomic

    with atomic.atomic_write(path, "w") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _parse_bits(text):
    try:
        return [int(t) for t in text.split(",") if t]
    except ValueError:
        raise ValueError(f"--bits {text!r}: expected a list like 2,3,4") from None


def run(args) -> int:
    from eqkernels import EqkFormatError
    from eqkernels.format import read_eqk_header
    from eqnet.data import DataError, load_data
    from eqnet.deploy.record import check_record

    try:
        header = read_eqk_header(args.file)
        check_record(header)
        bits = _parse_bits(args.bits) if args.bits else None
        sel = selections(header, bits, args.config)
        spec = args.data or header.get("extra", {}).get("data") or "digits"
        bundle = load_data(spec, augment=False, limit_test=args.limit_test)
        rows = evaluate_file(
            args.file,
            bundle.test,
            sel,
            batch_size=args.batch_size,
            latency_runs=args.latency_runs,
            backend=args.backend,
            progress=lambda m: print(m, file=sys.stderr, flush=True),
        )
    except (EqkFormatError, DataError, FileNotFoundError, ValueError) as exc:
        print(f"eqnet eval: error: {exc}", file=sys.stderr)
        return 1
    print(markdown(rows))
    if args.csv:
        write_csv(args.csv, rows)
        print(f"wrote {args.csv}", file=sys.stderr)
    return 0
