"""One supernet vs dedicated QAT at each width (run by hand).

Trains, with the `eqnet train` CLI in process, a float model, then from it an `eqnet` supernet
(W/A 2-8), a `layered` supernet (nested, widths 2-4) and one dedicated `qat` model per width,
all with the same number of epochs; then evaluates every model at each width after BN
recalibration on the held-out split, and prints a markdown table (accuracy and training
time). Learning rates: `--lr` is the QAT runs' and the layered run's (layered averages its
widths' losses); the `eqnet` recipe sums the losses of its three LRH subnets, so with SGD it
takes three times the per-subnet step at the same lr, and `--eqnet-lr` defaults to about a
third of `--lr` (0.0033 at the default 0.01). Every run directory is resumable: rerunning the
script continues unfinished runs (`--resume`) and skips finished ones, so the experiment can be
split across sessions.
Never run it beside a benchmark.

    python -m bench.exp_cifar_supernet --data ../shared/data/cifar10.npz --model resnet20 \\
        --float-epochs 12 --epochs 2 --root runs/cifar
    python -m bench.exp_cifar_supernet --data digits --model digits_cnn --float-epochs 3 \\
        --epochs 2 --root /tmp/exp_digits          # a smoke run in about a minute
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from bench.harness import Table, threads_from_env


def _run(root: Path, name: str, epochs: int, args: list[str]) -> Path:
    from eqnet.cli import main
    from eqnet.run.checkpoint import load_checkpoint

    out = root / name
    if (out / "checkpoint.pt").exists():
        done = int(load_checkpoint(out)["epoch"])
        if done >= epochs:
            print(f"[{name}] finished ({done} epochs), skipped", flush=True)
            return out
        cmd = ["train", "--out", str(out), "--resume", "--epochs", str(epochs)]
    else:
        cmd = ["train", "--out", str(out), "--epochs", str(epochs), *args]
    print(f"[{name}] eqnet {' '.join(cmd)}", flush=True)
    if main(cmd) != 0:
        raise SystemExit(f"[{name}] training failed")
    return out


def _accuracy_at(run_dir: Path, widths, bn_batches: int) -> dict:
    from eqnet.convert import recalibrate_bn
    from eqnet.data import eval_loader
    from eqnet.run import evaluate, load_run
    from eqnet.space import SubnetConfig

    run = load_run(run_dir)
    c = run.config
    data = run.load_data(augment=False)
    holdout = run.bn_images(bn_batches, data)
    test = eval_loader(data.test, c.eval_batch_size)
    model = run.model
    out = {}
    for b in widths:
        if b not in run.space.w_bits or b not in run.space.a_bits:
            continue
        model.set_config(SubnetConfig.uniform(run.space, model, b, b))
        if c.recipe != "qat":
            recalibrate_bn(model, holdout, batches=bn_batches)
        out[b] = evaluate(model, test)
    total_time = sum(r.get("time_s", 0.0) for r in run.metrics)
    return {"acc": out, "train_time_s": total_time, "subnet_passes": _subnet_passes(run)}


def _subnet_passes(run) -> int:
    """Training cost in forward+backward passes of one subnet over one batch: optimizer steps
    times the subnets each step trains (eqnet: lowest, highest and num_random; layered: one
    per width; qat: one)."""
    c = run.config
    steps = int(run.metrics[-1]["step"]) if run.metrics else 0
    per_step = {"eqnet": 2 + c.num_random, "multiquant": 2 + c.num_random, "qat": 1}
    if c.recipe == "layered":
        return steps * len(run.space.w_bits)
    if c.recipe not in per_step:
        raise ValueError(f"recipe {c.recipe!r}: no subnet-pass count for it")
    return steps * per_step[c.recipe]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/cifar10.npz")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--root", default="runs/exp_cifar_supernet")
    p.add_argument("--float-epochs", type=int, default=12)
    p.add_argument("--epochs", type=int, default=2, help="epochs of every quantized run")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.01, help="lr of the qat and layered runs")
    p.add_argument(
        "--eqnet-lr",
        type=float,
        default=None,
        help="lr of the eqnet run (default: --lr / 3 to 2 significant digits: the recipe sums "
        "the losses of 3 subnets per step)",
    )
    p.add_argument(
        "--eqnet-epochs",
        type=int,
        default=None,
        help="epochs of the eqnet run (default --epochs); with --eqnet-steps-per-epoch this sets "
        "its cost, which the table reports as subnet passes against the QAT runs' sum",
    )
    p.add_argument(
        "--eqnet-steps-per-epoch",
        type=int,
        default=None,
        help="cap on the eqnet run's steps per epoch (default: the whole train split)",
    )
    p.add_argument(
        "--eqnet-uniform-prob",
        type=float,
        default=0.0,
        help="eqnet train --uniform-prob: chance that the random subnet has one width for "
        "every elastic layer (default 0, the paper's per-layer draw)",
    )
    p.add_argument("--qat-widths", default="2,3,4,8")
    p.add_argument("--bn-batches", type=int, default=16)
    p.add_argument(
        "--grad-clip",
        type=float,
        default=5.0,
        help="max grad norm of every quantized run (the same for supernets and QAT)",
    )
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--skip", default="", help="comma list of runs to skip: eqnet,layered,qat")
    args = p.parse_args()
    threads = threads_from_env()
    root = Path(args.root)
    common = ["--model", args.model, "--data", args.data, "--batch-size", str(args.batch_size)]
    if args.limit_train:
        common += ["--limit-train", str(args.limit_train)]
    skip = set(filter(None, args.skip.split(",")))
    widths = [int(b) for b in args.qat_widths.split(",")]

    float_dir = _run(
        root,
        "float",
        args.float_epochs,
        [*common, "--recipe", "float", "--lr", "0.1", "--warmup-epochs", "1"],
    )
    quant = [*common, "--init", str(float_dir), "--grad-clip", str(args.grad_clip)]
    eqnet_lr = args.eqnet_lr if args.eqnet_lr is not None else float(f"{args.lr / 3:.2g}")
    runs = {}
    if "eqnet" not in skip:
        eq_epochs = args.eqnet_epochs or args.epochs
        eq_name, eq_args = f"eqnet_lr{eqnet_lr:g}", ["--lr", str(eqnet_lr), "--recipe", "eqnet"]
        if args.eqnet_epochs is not None or args.eqnet_steps_per_epoch is not None:
            steps = args.eqnet_steps_per_epoch or "all"
            eq_name += f"_{eq_epochs}x{steps}"
            if args.eqnet_steps_per_epoch is not None:
                eq_args += ["--max-steps-per-epoch", str(args.eqnet_steps_per_epoch)]
        if args.eqnet_uniform_prob:
            eq_name += f"_u{args.eqnet_uniform_prob:g}"
            eq_args += ["--uniform-prob", str(args.eqnet_uniform_prob)]
        runs["eqnet"] = _run(root, eq_name, eq_epochs, quant + eq_args)
    quant += ["--lr", str(args.lr)]
    if "layered" not in skip:
        runs["layered"] = _run(root, "layered", args.epochs, [*quant, "--recipe", "layered"])
    if "qat" not in skip:
        for b in widths:
            runs[f"qat{b}"] = _run(
                root,
                f"qat_w{b}a{b}",
                args.epochs,
                [*quant, "--recipe", "qat", "--w-bits", str(b), "--a-bits", str(b)],
            )

    results = {name: _accuracy_at(d, widths, args.bn_batches) for name, d in runs.items()}
    table = Table(
        f"exp_supernet_{Path(args.data).stem}_{args.model}",
        ["model", *[f"W{b}A{b}" for b in widths], "subnet_passes", "train_s"],
    )
    qat_time, qat_passes = 0.0, 0
    qat_row = {"model": f"dedicated qat, one run per width (lr {args.lr:g})"}
    for b in widths:
        r = results.get(f"qat{b}")
        qat_row[f"W{b}A{b}"] = "" if r is None else round(100 * r["acc"][b], 2)
        qat_time += 0.0 if r is None else r["train_time_s"]
        qat_passes += 0 if r is None else r["subnet_passes"]
    qat_row["train_s"] = round(qat_time)
    qat_row["subnet_passes"] = qat_passes
    table.add(**qat_row)
    for name in ("eqnet", "layered"):
        if name in results:
            r = results[name]
            lr = eqnet_lr if name == "eqnet" else args.lr
            row = {"model": f"{name} supernet (lr {lr:g})"}
            if name == "eqnet" and args.eqnet_uniform_prob:
                row["model"] = (
                    f"eqnet supernet (lr {lr:g}, uniform-prob {args.eqnet_uniform_prob:g})"
                )
            for b in widths:
                row[f"W{b}A{b}"] = round(100 * r["acc"][b], 2) if b in r["acc"] else ""
            row["train_s"] = round(r["train_time_s"])
            row["subnet_passes"] = r["subnet_passes"]
            table.add(**row)
    table.finish()
    print(
        f"\n{args.model} on {args.data}: float {args.float_epochs} epochs, every quantized run "
        f"{args.epochs} epochs from it, batch {args.batch_size}, {threads} threads; accuracy "
        "(%) on the test split after BN recalibration (dedicated QAT: its own statistics)"
    )
    (root / "summary.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(main())
