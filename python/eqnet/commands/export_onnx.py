"""`eqnet export-onnx RUN --out model.onnx [--config cfg.json | --uniform W,A] --preset P`

Exports one subnet of a trained run's supernet as ONNX QDQ (eqnet.deploy.onnx). The BN
statistics a supernet holds after training are a mix over the subnets it sampled, so the chosen
subnet's BN statistics are re-estimated first (`--bn-batches`, on the run's held-out split under
the training augmentation, as `eqnet export` and the trainer's evaluation do; 0 keeps the
stored ones). With
`--check N` (N seeded random inputs) and/or `--check-test` (the run's test split) it then runs
the file under onnxruntime (CPU, graph optimizations off) and prints its agreement with the
fake-quant subnet as one JSON line per input set.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from eqnet.commands.argtypes import count


def add_arguments(p: argparse.ArgumentParser) -> None:
    from eqnet.deploy.onnx_presets import BN_MODES, PRESETS, WEIGHT_FORMATS

    p.add_argument("run", metavar="RUN", help="trained run directory (eqnet train --out)")
    p.add_argument("--out", required=True, metavar="FILE", help="the .onnx file to write")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--config",
        metavar="FILE",
        help="a SubnetConfig JSON file, or eqnet search's configs.json (with --pick)",
    )
    which.add_argument("--uniform", metavar="W,A", help="uniform weight,activation bits")
    which.add_argument("--lowest", action="store_true", help="the lowest subnet")
    p.add_argument("--pick", type=count(0), default=0, help="which chosen config of configs.json")
    p.add_argument("--preset", choices=sorted(PRESETS), default="generic")
    p.add_argument("--opset", type=int, default=21)
    p.add_argument("--fold-bn", choices=BN_MODES, default=None, help="default: the preset's")
    p.add_argument("--weight-format", choices=WEIGHT_FORMATS, default=None)
    p.add_argument(
        "--int4",
        action="store_true",
        help="allow int4/uint4 containers (opset 21; onnxruntime runs them only up to "
        "ORT_ENABLE_BASIC); default: int8/uint8 with clipped ranges",
    )
    # The default since int4 became opt-in; still accepted.
    p.add_argument("--no-int4", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--input-shape",
        default=None,
        metavar="N,C,H,W",
        help="default: the model's own input size (eqnet.models)",
    )
    p.add_argument(
        "--check", type=count(0), default=0, metavar="N", help="validate on N seeded random inputs"
    )
    p.add_argument(
        "--check-test",
        action="store_true",
        help="validate on the run's test split (top-1 agreement with the fake-quant subnet)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--bn-batches",
        type=int,
        default=None,
        metavar="N",
        help="re-estimate the subnet's BN statistics on N held-out batches before export "
        "(default: the run's --bn-batches; 0: keep the stored statistics)",
    )


def _config(args, supernet):
    from eqnet.space import SubnetConfig, layer_specs

    space = supernet.space
    if args.config:
        text = Path(args.config).read_text()
        data = json.loads(text)
        if isinstance(data, dict) and "chosen" in data:  # eqnet search's configs.json
            chosen = data["chosen"]
            if not 0 <= args.pick < len(chosen):
                raise ValueError(f"--pick={args.pick}: {args.config} holds {len(chosen)} configs")
            layers = chosen[args.pick]["config"]
            text = json.dumps({"format": "eqnet.SubnetConfig", "version": 1, "layers": layers})
        return SubnetConfig.from_json(text)
    if args.lowest:
        return SubnetConfig.lowest(space, supernet)
    if args.uniform:
        try:
            w, a = (int(v) for v in args.uniform.split(","))
        except ValueError:
            raise ValueError(f"--uniform={args.uniform!r}: expected two ints, e.g. 4,8") from None
        # Forms (granularity, symmetries) as the highest subnet's elastic layers take them.
        highest = SubnetConfig.highest(space, supernet)
        elastic = [n for n, fixed in layer_specs(supernet).items() if fixed is None]
        c = highest[elastic[0]] if elastic else next(iter(highest))[1]
        return SubnetConfig.uniform(
            space, supernet, w, a, c.w_granularity, c.w_symmetry, c.a_symmetry
        )
    return SubnetConfig.highest(space, supernet)


def _shape(args, supernet):
    if args.input_shape:
        try:
            shape = tuple(int(v) for v in args.input_shape.split(","))
        except ValueError:
            raise ValueError(f"--input-shape={args.input_shape!r}: expected N,C,H,W") from None
        first = next((m for m in supernet.model.modules() if hasattr(m, "in_channels")), None)
        if first is not None and len(shape) >= 3 and shape[-3] != first.in_channels:
            raise ValueError(
                f"--input-shape={args.input_shape!r}: the model's first layer takes "
                f"{first.in_channels} channels, the shape gives {shape[-3]}"
            )
        return shape
    shape = getattr(supernet.model, "eqnet_input_size", None)
    if shape is None:
        raise ValueError("--input-shape is required: the model does not record its input size")
    return tuple(shape)


def _recalibrate(trained, supernet, config, batches: int) -> None:
    from eqnet.convert import recalibrate_bn

    supernet.set_config(config)
    recalibrate_bn(supernet, trained.bn_images(batches), batches=batches)
    print(f"re-estimated the subnet's BN statistics on {batches} batches", file=sys.stderr)


def run(args) -> int:
    import torch

    from eqkernels import atomic
    from eqnet.deploy.onnx import compare_onnx, export_onnx
    from eqnet.run import load_run

    try:
        atomic.remove_stale_temps(Path(args.out).resolve().parent)
        trained = load_run(args.run)
        supernet = trained.model.eval()
        if not hasattr(supernet, "set_config"):
            raise ValueError(f"run {args.run!r} holds a float model, not a supernet")
        config = _config(args, supernet)
        shape = _shape(args, supernet)
        bn_batches = trained.config.bn_batches if args.bn_batches is None else args.bn_batches
        if bn_batches < 0:
            raise ValueError(f"--bn-batches={bn_batches}: expected >= 0 (0: no re-estimation)")
        if bn_batches:
            _recalibrate(trained, supernet, config, bn_batches)
        export_onnx(
            supernet,
            config,
            args.out,
            input_shape=shape,
            opset=args.opset,
            preset=args.preset,
            fold_bn=args.fold_bn,
            weight_format=args.weight_format,
            int4=args.int4 and not args.no_int4,
        )
    except (ValueError, OSError) as exc:  # json.JSONDecodeError is a ValueError
        print(f"eqnet export-onnx: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({config.summary()}, preset {args.preset})", file=sys.stderr)
    if args.check > 0:
        g = torch.Generator().manual_seed(args.seed)
        inputs = torch.randn((args.check, *shape[1:]), generator=g)
        print(json.dumps({"inputs": "random", **compare_onnx(supernet, config, args.out, inputs)}))
    if args.check_test:
        test = trained.load_data(augment=False).test
        inputs = torch.stack([test[i][0] for i in range(len(test))])
        print(json.dumps({"inputs": "test", **compare_onnx(supernet, config, args.out, inputs)}))
    return 0
