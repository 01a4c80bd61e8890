"""Evidence that ONNX QDQ exports of trained supernets reproduce the fake-quant subnet
(run by hand, after training; never beside a benchmark).

For every run directory and every preset, one uniform and one mixed config in the forms the
preset's engine takes (TensorRT: per-channel symmetric weights and symmetric activations of at
most 7 bits; SNPE: per-tensor weights; generic: anything) get their BN statistics re-estimated
on the run's held-out split (as `eqnet export-onnx` does), are exported with
`eqnet.export_onnx`, run under onnxruntime (CPU, graph optimizations off) on the run's test
split, and compared with the fake-quant subnet: top-1 agreement, and the largest output
difference relative to the largest output. Prints a markdown table.

    python -m bench.exp_onnx_agreement runs/cifar/eqnet runs/mbv2/eqnet --out /tmp/onnx_exp
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from bench.harness import Table

PRESET_FORMS = {  # preset -> (weight granularity, weight symmetry, activation symmetry)
    "generic": ("channel", "asym", "asym"),
    "snpe": ("tensor", "asym", "asym"),
    "tensorrt": ("channel", "sym", "sym"),
}


def _pick(allowed, preferred):
    return preferred if preferred in allowed else allowed[0]


def configs_for(preset, space, supernet, seed):
    """(uniform, mixed) configs of the elastic space in the forms the preset takes; the
    fixed-width first and last layers keep their own choice."""
    from eqnet.space import SubnetConfig, layer_specs

    wg, ws, as_ = PRESET_FORMS[preset]
    forms = dict(
        w_granularity=_pick(space.w_granularities, wg),
        w_symmetry=_pick(space.w_symmetries, ws),
        a_symmetry=_pick(space.a_symmetries, as_),
    )
    uniform = SubnetConfig.uniform(space, supernet, 4, 4, *forms.values())
    mixed = SubnetConfig.random(space, supernet, torch.Generator().manual_seed(seed))
    if preset == "generic":
        return uniform, mixed
    elastic = [n for n, fixed in layer_specs(supernet).items() if fixed is None]
    for name in elastic:
        changes = dict(forms) if preset == "tensorrt" else {"w_granularity": forms["w_granularity"]}
        if preset == "tensorrt":
            # int8 only: the narrow weight range [-127, 127] cannot hold every 8-bit code, and
            # unsigned 8-bit activation codes [0, 255] need uint8
            if mixed[name].w_bits > 7:
                changes["w_bits"] = max(b for b in space.w_bits if b <= 7)
            if mixed[name].a_bits > 7:
                changes["a_bits"] = max(b for b in space.a_bits if b <= 7)
        mixed = mixed.replace(name, **changes)
    return uniform, mixed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="trained supernet run directories")
    p.add_argument("--out", default="runs/onnx_agreement", help="where the .onnx files go")
    p.add_argument("--presets", default="generic,tensorrt,snpe")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--limit", type=int, default=None, help="first N test images (default all)")
    p.add_argument(
        "--bn-batches", type=int, default=16, help="held-out batches for BN re-estimation (0: off)"
    )
    args = p.parse_args()
    from eqnet.convert import recalibrate_bn
    from eqnet.deploy.onnx import compare_onnx, export_onnx
    from eqnet.run import load_run

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = Table(
        "exp_onnx_agreement",
        ["run", "preset", "config", "images", "top1_agreement", "max_rel_diff", "test_acc_fq"],
    )
    for run_dir in args.runs:
        run = load_run(run_dir)
        supernet = run.model.eval()
        data = run.load_data(augment=False)
        test = data.test
        holdout = run.bn_images(args.bn_batches, data) if args.bn_batches else None
        n = len(test) if args.limit is None else min(args.limit, len(test))
        inputs = torch.stack([test[i][0] for i in range(n)])
        labels = torch.tensor([int(test[i][1]) for i in range(n)])
        shape = (1, *inputs.shape[1:])
        for preset in args.presets.split(","):
            for kind, cfg in zip(("uniform W4A4", "mixed"), configs_for(
                preset, run.space, supernet, args.seed
            )):  # fmt: skip
                path = (
                    out
                    / f"{Path(run_dir).parent.name}_{Path(run_dir).name}_{preset}_{kind[:5]}.onnx"
                )
                if args.bn_batches:
                    supernet.set_config(cfg)
                    recalibrate_bn(supernet, holdout, batches=args.bn_batches)
                try:
                    export_onnx(supernet, cfg, path, shape, preset=preset)
                except ValueError as exc:
                    print(f"[{run_dir} {preset} {kind}] not exportable: {exc}", flush=True)
                    continue
                r = compare_onnx(supernet, cfg, path, inputs)
                supernet.set_config(cfg)
                with torch.no_grad():
                    acc = float((supernet(inputs).argmax(1) == labels).float().mean())
                table.add(
                    run=run_dir,
                    preset=preset,
                    config=f"{kind}: {cfg.summary()}",
                    images=n,
                    top1_agreement=f"{r['top1_agreement']:.4f}",  # 99.9 % needs 4 digits
                    max_rel_diff=r["max_abs_diff"] / r["max_abs_output"],
                    test_acc_fq=acc,
                )
                print(f"[{run_dir} {preset} {kind}] {r}", flush=True)
    table.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
