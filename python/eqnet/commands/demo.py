"""`eqnet demo` (what `make demo` runs): the whole job on the embedded digits data.

1. train a float digits_cnn on digits;
2. train a layered (vertically nested, widths 2-4, per-bit BN) supernet from it;
3. search a mixed-precision config with the layered allocation (under --constraint);
4. export one .eqk file holding every width and the mixed config;
5. load it at 2, 3, 4 bits and the mixed config (each from the file prefix it needs) and print
   one table: accuracy of the integer model (and of the fake-quant subnet it must equal),
   bytes read from the file, plane bytes, batch-1 latency; plus the Pareto PNG path.

Everything goes to --out (default demo_out/, git-ignored): the run directories, the search
results (configs.json, pareto.csv/png), model.eqk, results.md and results.csv.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from eqnet.commands.argtypes import count


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_out", metavar="DIR", help="output directory")
    p.add_argument("--float-epochs", type=count(1), default=15)
    p.add_argument("--epochs", type=count(1), default=10, help="layered supernet epochs")
    p.add_argument("--constraint", default="avg_bits<=3.5", help="search budget (eqnet search)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-steps-per-epoch", type=count(1), default=None, help="for quick smoke runs"
    )
    p.add_argument("--latency-runs", type=count(1), default=30)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--keep", action="store_true", help="reuse finished steps in --out")


class _Steps:
    def __init__(self):
        self.start = time.perf_counter()
        self.times: list[tuple[str, float]] = []

    def run(self, label: str, fn):
        _log(f"== {label}")
        t0 = time.perf_counter()
        result = fn()
        self.times.append((label, time.perf_counter() - t0))
        _log(f"== {label}: {self.times[-1][1]:.1f} s")
        return result


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _cli(argv: list[str]) -> None:
    from eqnet.cli import main

    code = main(argv)
    if code:
        raise RuntimeError(f"eqnet {' '.join(argv)} failed with exit code {code}")


def _train_args(args, out: Path) -> list[str]:
    extra = ["--seed", str(args.seed), "--device", "cpu"]
    if args.max_steps_per_epoch:
        extra += ["--max-steps-per-epoch", str(args.max_steps_per_epoch)]
    if args.no_progress:
        extra.append("--no-progress")
    return [*extra, "--out", str(out)]


def _done(run_dir: Path, keep: bool) -> bool:
    if (run_dir / "checkpoint.pt").exists():
        if keep:
            _log(f"   reusing {run_dir}")
            return True
        shutil.rmtree(run_dir)
    return False


def run(args) -> int:
    try:
        return _run(args)
    except (RuntimeError, ValueError, FileNotFoundError, NotImplementedError) as exc:
        print(f"eqnet demo: error: {exc}", file=sys.stderr)
        return 1


def _run(args) -> int:
    import torch

    from eqkernels import atomic

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    float_dir, layered_dir, search_dir = out / "float", out / "layered", out / "search"
    eqk_path = out / "model.eqk"
    steps = _Steps()

    def train_float():
        if not _done(float_dir, args.keep):
            _cli(["train", "--recipe", "float", "--model", "digits_cnn", "--data", "digits",
                  "--epochs", str(args.float_epochs), *_train_args(args, float_dir)])  # fmt: skip

    def train_layered():
        if not _done(layered_dir, args.keep):
            _cli(["train", "--recipe", "layered", "--model", "digits_cnn", "--data", "digits",
                  "--init", str(float_dir), "--epochs", str(args.epochs),
                  *_train_args(args, layered_dir)])  # fmt: skip

    def search():
        argv = ["search", str(layered_dir), "--method", "layered", "--constraint",
                args.constraint, "--out", str(search_dir), "--device", "cpu"]  # fmt: skip
        if args.no_progress:
            argv.append("--no-progress")
        _cli(argv)

    steps.run("1/5 train float digits_cnn", train_float)
    steps.run("2/5 train layered supernet (W2-4, per-bit BN)", train_layered)
    steps.run(f"3/5 search a mixed config ({args.constraint})", search)
    rows = steps.run(
        "4/5 export one .eqk", lambda: _export(args, layered_dir, search_dir, eqk_path)
    )
    table = steps.run(
        "5/5 load at 2/3/4 bits and mixed; evaluate", lambda: _evaluate(args, eqk_path, rows)
    )

    from eqnet.commands.eval import markdown, write_csv

    columns = ("selection", "mean_w_bits", "accuracy", "fake_quant_accuracy", "bytes_read",
               "file_bytes", "elastic_plane_bytes", "latency_ms_b1")  # fmt: skip
    text = markdown(table, columns)
    atomic.write_text(out / "results.md", text + "\n")
    write_csv(out / "results.csv", table, columns)
    total = time.perf_counter() - steps.start
    print()
    print(text)
    print()
    print(f"file: {eqk_path} ({eqk_path.stat().st_size} bytes, every width in one file)")
    print(f"pareto: {(search_dir / 'pareto.png').resolve()}")
    print(f"results: {out / 'results.md'}, {out / 'results.csv'}")
    print("times: " + ", ".join(f"{label.split(' ', 1)[0]} {t:.0f}s" for label, t in steps.times)
          + f"; total {total:.0f} s on {torch.get_num_threads()} threads")  # fmt: skip
    return 0


def _export(args, layered_dir: Path, search_dir: Path, eqk_path: Path) -> dict:
    """Export, and measure the fake-quant accuracy of each selection on the same supernet."""
    import torch

    from eqnet.commands.export import read_configs, recalibrate_widths
    from eqnet.data import load_data
    from eqnet.deploy import export
    from eqnet.run import evaluate, load_run

    run = load_run(layered_dir)
    bundle = load_data("digits", augment=False, holdout=run.config.holdout)
    hold = torch.utils.data.DataLoader(bundle.holdout, batch_size=run.config.batch_size)
    recalibrate_widths(run.model, hold, run.config.bn_batches)
    configs = read_configs(search_dir / "configs.json")
    mixed = {"mixed": next(iter(configs.values()))} if configs else {}
    header = export(
        run.model,
        eqk_path,
        configs=mixed,
        arch="digits_cnn",
        arch_kwargs={"num_classes": run.num_classes},
        extra={"data": "digits", "recipe": "layered", "run": str(layered_dir)},
    )
    _log(f"   wrote {eqk_path}: sections {[s['nbytes'] for s in header['sections']]} bytes")
    test = torch.utils.data.DataLoader(bundle.test, batch_size=256)
    fake = {}
    from eqnet.space import SubnetConfig

    for name, cfg in header["quant"]["configs"].items():
        run.model.set_config(SubnetConfig(cfg.items()))
        fake[name] = evaluate(run.model, test, torch.device("cpu"))
    return {"fake": fake, "test": bundle.test}


def _evaluate(args, eqk_path: Path, info: dict) -> list[dict]:
    from eqkernels.format import read_eqk_header
    from eqnet.commands.eval import evaluate_file, selections

    header = read_eqk_header(eqk_path)
    sel = selections(header)
    rows = evaluate_file(eqk_path, info["test"], sel, latency_runs=args.latency_runs, progress=_log)
    for row, (_label, kwargs) in zip(rows, sel):
        key = str(kwargs["bits"]) if "bits" in kwargs else kwargs["config"]
        row["fake_quant_accuracy"] = info["fake"][key]
        row["file_bytes"] = eqk_path.stat().st_size
    return rows
