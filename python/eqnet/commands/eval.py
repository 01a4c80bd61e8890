"""`eqnet eval FILE.eqk`: the integer runtime at each stored width / configuration.

    eqnet eval model.eqk                       # every stored width and config, test split
    eqnet eval model.eqk --bits 2,4 --config mixed --csv eval.csv
    eqnet eval lm.eqk --bits 2,3,4 --reference runs/lm_float --reference runs/lm_layered

For each selection the file is loaded afresh, reading only what that selection needs (nested
files: the prefix up to its widest plane), and reported: top-1 accuracy on the data's test
split (a language model: the mean next-token NLL over every test token and the perplexity
exp(NLL)), bytes read from the file, model size (bytes of the tensors the selection uses), the
weight-plane bytes one forward reads for the elastic layers, and the median latency of one
forward at batch 1 on this machine. `--reference RUN` adds a float run as a row of its own, or
the exported supernet run's fake-quant subnet at each selection as a column (BN re-estimated as
eqnet export does). Printed as a markdown table; `--csv` also writes CSV.
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
# the task's metrics (eqnet.run.tasks) -> the columns they fill
METRIC_COLUMNS = {"acc": "accuracy", "nll": "nll", "ppl": "perplexity"}
TASK_METRICS = {"classification": ("accuracy",), "causal-lm": ("perplexity", "nll")}
# text data options an LM file records for eval (eqnet export writes them)
TEXT_OPTIONS = ("seq_len", "text_bytes")


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
    p.add_argument(
        "--reference",
        action="append",
        default=None,
        metavar="RUN",
        help="a float run (a row of its own) or the exported supernet run (its fake-quant "
        "subnet at each selection, a column); repeatable",
    )
    p.add_argument("--seq-len", type=count(1), default=None, help="text: default the file's")
    p.add_argument("--text-bytes", type=count(1), default=None, help="text: default the file's")


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
    task: str = "classification",
    reference=None,
) -> list[dict]:
    """One row per selection (see COLUMNS; a causal-LM `task` reports perplexity and nll in
    place of accuracy). `reference(config) -> metrics` (e.g. a fake-quant supernet's) fills
    the `fake_quant_*` columns."""
    import torch

    from eqnet.deploy import load
    from eqnet.run import get_task

    measure = get_task(task)
    loader = torch.utils.data.DataLoader(test_set, batch_size=batch_size)
    if len(loader) == 0:
        raise ValueError("the test split is empty")
    x1 = next(iter(loader))[0][:1]
    rows = []
    for label, kwargs in sel:
        if progress:
            progress(f"eval {label}: loading {Path(path).name}")
        deployed = load(path, backend=backend, **kwargs)
        row = {"selection": label, "mean_w_bits": round(deployed.active_config.mean_w_bits(), 3)}
        metrics = measure.evaluate(deployed, loader, torch.device("cpu"))
        row.update({METRIC_COLUMNS[k]: v for k, v in metrics.items()})
        if reference is not None:
            ref = reference(deployed.active_config)
            row.update({f"fake_quant_{METRIC_COLUMNS[k]}": v for k, v in ref.items()})
        row.update(
            {
                "bytes_read": deployed.bytes_read,
                "model_bytes": _selection_bytes(deployed),
                "elastic_plane_bytes": deployed.plane_bytes(),
                "latency_ms_b1": _latency_ms(deployed, x1, latency_runs),
            }
        )
        rows.append(row)
        if progress:
            shown = ", ".join(f"{c} {row[c]:.4f}" for c in TASK_METRICS[task])
            progress(f"eval {label}: {shown}, {row['bytes_read']} bytes read")
    return rows


def columns_for(task: str, fake_quant: bool = False) -> tuple[str, ...]:
    """The table's columns: COLUMNS with the task's metrics (and their fake-quant reference)."""
    metrics = TASK_METRICS[task]
    refs = tuple(f"fake_quant_{m}" for m in metrics) if fake_quant else ()
    return ("selection", "mean_w_bits", *metrics, *refs, *COLUMNS[3:])


def text_options(header: dict, args) -> dict:
    """seq_len / text_bytes for text data: the arguments, else what the file records."""
    recorded = header.get("extra", {}).get("data_options") or {}
    if not isinstance(recorded, dict):
        raise ValueError("the file's extra.data_options is not an object; pass --seq-len")
    out = {}
    for key in TEXT_OPTIONS:
        value = getattr(args, key, None)
        if value is None and key in recorded:
            value = recorded[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"the file's extra.data_options.{key}={value!r} is not an int >= 1"
                )
        if value is not None:
            out[key] = value
    return out


def references(paths, bundle, batch_size: int, header: dict):
    """(float rows, fake-quant callable or None) of the --reference runs; a supernet run's BN
    statistics are re-estimated on as many batches as eqnet export did (the file records it;
    else the run's bn_batches)."""
    import torch

    from eqnet.commands.export import recalibrate_widths
    from eqnet.run import get_task, load_run

    measure = get_task(bundle.task)
    loader = torch.utils.data.DataLoader(bundle.test, batch_size=batch_size)
    rows, fake_quant = [], None
    for path in paths or []:
        run = load_run(path)
        if run.space is None:
            metrics = measure.evaluate(run.model, loader, torch.device("cpu"))
            row = {"selection": f"float ({Path(path).name})", "mean_w_bits": 32}
            rows.append(row | {METRIC_COLUMNS[k]: v for k, v in metrics.items()})
            continue
        if fake_quant is not None:
            raise ValueError(f"--reference {path}: one supernet run at most (its fake-quant)")
        batches = header.get("extra", {}).get("bn_batches", run.config.bn_batches)
        if isinstance(batches, bool) or not isinstance(batches, int) or batches < 0:
            raise ValueError(f"the file's extra.bn_batches={batches!r} is not an int >= 0")
        if batches:  # the statistics eqnet export stored
            recalibrate_widths(run.model, run.bn_images(batches), batches)
        supernet = run.model

        def fake_quant(config, supernet=supernet):
            supernet.set_config(config)
            return measure.evaluate(supernet, loader, torch.device("cpu"))

    return rows, fake_quant


def markdown(rows: list[dict], columns=COLUMNS) -> str:
    def fmt(v, column):
        if isinstance(v, float):
            if "perplexity" in column:  # widths differ in the second decimal
                return f"{v:.3f}"
            return f"{v:.4f}" if v < 10 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, ""), c) for c in columns) + " |" for r in rows]
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
        options = text_options(header, args)
        bundle = load_data(spec, augment=False, limit_test=args.limit_test, **options)
        float_rows, fake_quant = references(args.reference, bundle, args.batch_size, header)
        rows = evaluate_file(
            args.file,
            bundle.test,
            sel,
            batch_size=args.batch_size,
            latency_runs=args.latency_runs,
            backend=args.backend,
            progress=lambda m: print(m, file=sys.stderr, flush=True),
            task=bundle.task,
            reference=fake_quant,
        )
    except (EqkFormatError, DataError, FileNotFoundError, ValueError) as exc:
        print(f"eqnet eval: error: {exc}", file=sys.stderr)
        return 1
    rows = float_rows + rows
    columns = columns_for(bundle.task, fake_quant is not None)
    print(markdown(rows, columns))
    if args.csv:
        write_csv(args.csv, rows, columns)
        print(f"wrote {args.csv}", file=sys.stderr)
    return 0
