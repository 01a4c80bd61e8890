"""`eqnet ptq RUN --uniform W,A | --config FILE --out DIR`: post-training quantization of a
float run at one config, no training (BN statistics re-estimated at the config). The output is
a run directory that `eqnet search`, `export`, `export-onnx` and `eval` read.

    eqnet ptq runs/cifar/float --uniform 4,4 --out runs/cifar/ptq_w4a4
    eqnet ptq runs/cifar/float --config search/configs.json --pick 0 --keep-first-last elastic \\
        --out runs/cifar/ptq_mixed
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    from eqnet.run.config import KEEP_FIRST_LAST

    p.add_argument("run", metavar="RUN", help="the float run to quantize (eqnet train --out)")
    p.add_argument("--out", required=True, metavar="DIR", help="the run directory to write")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--uniform", metavar="W,A", help="uniform weight,activation bits")
    which.add_argument(
        "--config", metavar="FILE", help="a SubnetConfig JSON or a search's configs.json"
    )
    p.add_argument("--pick", type=int, default=0, help="which chosen config of configs.json")
    p.add_argument("--form", default=None, metavar="NAME", help="with --uniform: tensorrt, snpe")
    p.add_argument("--w-form", default=None, metavar="G/S", help="with --uniform: e.g. tensor/asym")
    p.add_argument("--a-form", default=None, metavar="tensor/S", help="e.g. tensor/sym")
    p.add_argument("--keep-first-last", choices=KEEP_FIRST_LAST, default=None)
    p.add_argument("--calib-batches", type=int, default=None)
    p.add_argument("--bn-batches", type=int, default=None)
    p.add_argument("--device", default=None)


def _config(args):
    from eqnet.run import TrainConfig, load_run
    from eqnet.space import SubnetConfig

    source = load_run(args.run).config
    if source.recipe != "float":
        raise ValueError(f"{args.run}: a {source.recipe!r} run; ptq quantizes a float run")
    keep = (
        "model model_kwargs data batch_size seed holdout limit_train limit_test calib_batches "
        "bn_batches eval_batch_size device seq_len text_bytes"
    ).split()
    d = {k: getattr(source, k) for k in keep}
    d.update(recipe="qat", init=str(args.run), epochs=1, progress=False)
    for k in ("keep_first_last", "calib_batches", "bn_batches", "device"):
        if getattr(args, k) is not None:
            d[k] = getattr(args, k)
    if args.uniform:
        try:
            w, a = (int(v) for v in args.uniform.split(","))
        except ValueError:
            raise ValueError(f"--uniform={args.uniform!r}: expected two ints, e.g. 4,8") from None
        d.update(w_bits=[w], a_bits=[a], form=args.form, w_form=args.w_form, a_form=args.a_form)
    else:
        if (args.form, args.w_form, args.a_form) != (None, None, None):
            raise ValueError("--form/--w-form/--a-form: a --config sets every layer's form")
        policy = SubnetConfig.from_file(args.config, args.pick)
        d["policy"] = policy.to_json()
    return TrainConfig(**d)


def run(args) -> int:
    from eqnet.data import DataError
    from eqnet.train.ptq import post_training_quantize

    try:
        trainer = post_training_quantize(_config(args), args.out)
    except (DataError, FileNotFoundError, ValueError) as exc:
        print(f"eqnet ptq: error: {exc}", file=sys.stderr)
        return 1
    from eqnet.run.tasks import summary

    target = trainer.recipe.target(trainer)
    print(
        f"post-training quantized {args.run} ({target.summary()}): "
        f"{summary(trainer.metrics[-1])}; run in {args.out}"
    )
    return 0
