"""Deployed ResNet-20 from one .eqk file vs the float torch model vs the fake-quant subnet.

    .venv/bin/python -m bench.bench_deploy                 # batch 1 and 64
    .venv/bin/python -m bench.bench_deploy --quick         # ResNet-20 vs onnxruntime only
    EQK_BENCH_THREADS=2 .venv/bin/python -m bench.bench_deploy --models resnet20
    EQK_EXT_DIR=/tmp/me/lib/eqkernels .venv/bin/python -m bench.bench_deploy

ResNet-20 (random init; latency does not depend on the weights' values), converted to a
nested supernet (W 2-4, A 2/3/4/8, first/last layer 8-bit, per-bit BN), calibrated on random
data and exported to one .eqk. Rows: the float torch model, the fake-quant subnet (eqnet
modules) and the deployed integer model (eqkernels.lowbit_conv2d/linear, backend auto; the
step-list runtime and the per-layer module runtime) at W2A2, W3A3, W4A4 and a fixed mixed
config, at batch 1 and 64; `speedup` is float_ms / ms in the
same run. Bytes: `plane_bytes` are the weight-plane bytes one forward reads for the elastic
layers, `float_bytes` those layers' fp32 weight bytes (target: plane/float <= bits/32);
`prefix_bytes` is everything read from the file to load that width (header, scales, folded BN,
activation steps, the 8-bit first/last layers).

The second table (deploy_vs_ort.py) compares the deployed runtime at W8A8, W4A4 and W2A2 with
torch fp32, onnxruntime fp32 and onnxruntime's own int8 QDQ quantization, at the same thread
count: ResNet-20 (batch 1, 64), torchvision mobilenet_v2 and resnet18 at 224x224 (batch 1, 8).
EQK_BENCH_ORT_MODELS (or --models) picks a comma-separated subset (default all; "none" skips
the table). The deployed rows run the step-list runtime (`eqk WbAb steps`) next to the
per-layer module runtime (`eqk W4A4 modules`). `--quick`: only the onnxruntime table, ResNet-20,
W4A4 and W8A8, fewer rounds. Thread count: EQK_BENCH_THREADS (torch and onnxruntime alike).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

from bench.deploy_vs_ort import WIDTHS, compare
from bench.harness import Table, threads_from_env, time_fn

# model -> (input size, batches, rotation timing per batch)
ORT_MODELS = {
    "resnet20": ((3, 32, 32), (1, 64), {1: (5, 200, 2.0), 64: (2, 10, 2.0)}),
    "torchvision:mobilenet_v2": ((3, 224, 224), (1, 8), {1: (2, 10, 0.0), 8: (1, 5, 0.0)}),
    "torchvision:resnet18": ((3, 224, 224), (1, 8), {1: (2, 10, 0.0), 8: (1, 5, 0.0)}),
}


def build(tmp: Path):
    import eqnet
    from eqnet import models
    from eqnet.deploy import export
    from eqnet.space import ElasticSpace, SubnetConfig

    torch.manual_seed(0)
    float_model = models.get("resnet20").eval()
    space = ElasticSpace(w_bits=(2, 3, 4), a_bits=(2, 3, 4, 8), nested=True)
    sn = eqnet.convert(float_model, space, keep_first_last="8bit", per_bit_bn=True)
    gen = torch.Generator().manual_seed(1)
    calib = [(torch.randn(16, 3, 32, 32, generator=gen), None) for _ in range(2)]
    eqnet.calibrate(sn, calib, batches=2, method="lsq")
    sn.eval()
    mixed = SubnetConfig.random(space, sn, torch.Generator().manual_seed(2), forms=False)
    path = tmp / "resnet20.eqk"
    export(sn, path, configs={"mixed": mixed}, arch="resnet20")
    return float_model, sn, path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="ResNet-20 vs onnxruntime only")
    parser.add_argument("--models", help=f"onnxruntime table models, of {','.join(ORT_MODELS)}")
    args = parser.parse_args(argv)
    if args.quick:
        threads = threads_from_env()
        compare_with_onnxruntime(threads, args.models or "resnet20", quick=True)
        return
    from eqnet.deploy import load
    from eqnet.deploy.loader import config_from

    from eqkernels.backend import choose
    from eqkernels.format import read_eqk_header

    threads = threads_from_env()
    table = Table(
        "bench_deploy",
        ["model", "config", "batch", "backend", "ms", "plane_bytes", "float_bytes",
         "plane/float", "prefix_bytes"],
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        float_model, sn, path = build(Path(tmp))
        elastic = {n for n, m in sn.quantized_layers().items() if m.fixed_choice is None}
        float_bytes = sum(sn.get_submodule(n).weight.numel() * 4 for n in elastic)
        header = read_eqk_header(path)
        backend = choose(None, torch.device("cpu"), "lowbit_conv2d", {"cpu": ("cpp",)},
                         {"cpp": "lowbit_gemm_int_cpu"})  # fmt: skip
        selections = [("W2A2", {"bits": 2, "max_bits": 2}), ("W3A3", {"bits": 3, "max_bits": 3}),
                      ("W4A4", {"bits": 4, "max_bits": 4}), ("mixed", {"config": "mixed"})]  # fmt: skip
        for batch in (1, 64):
            x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
            # batch 64 on the reference backend takes seconds per call: fewer runs there.
            timing = (
                {"repeat": 20, "warmup": 3}
                if batch == 1
                else {"repeat": 3, "warmup": 1, "min_time": 0.0}
            )
            with torch.no_grad():
                ms = time_fn(lambda x=x: float_model(x), **timing) * 1e3
                table.add(model="float torch", config="fp32", batch=batch, backend="aten",
                          ms=ms, plane_bytes="", float_bytes=float_bytes, **{"plane/float": ""},
                          prefix_bytes="")  # fmt: skip
                for label, kwargs in selections:
                    cfg = config_from(header, kwargs.get("bits"), kwargs.get("config"))
                    sn.set_config(cfg)
                    ms = time_fn(lambda x=x: sn(x), **timing) * 1e3
                    table.add(model="fake-quant", config=label, batch=batch, backend="auto",
                              ms=ms, plane_bytes="", float_bytes="", **{"plane/float": ""},
                              prefix_bytes="")  # fmt: skip
                    for runtime in ("steps", "modules"):
                        deployed = load(path, runtime=runtime, **kwargs)
                        ms = time_fn(lambda d=deployed, x=x: d(x), **timing) * 1e3
                        planes = deployed.plane_bytes()
                        table.add(model=f"deployed {runtime}", config=label, batch=batch,
                                  backend=backend, ms=ms, plane_bytes=planes,
                                  float_bytes=float_bytes, **{"plane/float": planes / float_bytes},
                                  prefix_bytes=deployed.bytes_read)  # fmt: skip
                        print(f"batch {batch} {label}: {runtime} {ms:.2f} ms", file=sys.stderr)
    table.ratio_to(
        "speedup_vs_float", "ms", lambda r: r["model"] == "float torch", group_by=["batch"]
    )
    table.finish()
    print(f"\n{threads} threads; file sections {[s['nbytes'] for s in header['sections']]} bytes")
    compare_with_onnxruntime(threads, args.models)


def compare_with_onnxruntime(threads: int, models: str | None = None, quick=False) -> None:
    chosen = models or os.environ.get("EQK_BENCH_ORT_MODELS", ",".join(ORT_MODELS))
    if chosen == "none":
        return
    table = Table("bench_deploy_vs_ort", ["model", "batch", "runtime", "threads", "ms"])
    for name in chosen.split(","):
        if name not in ORT_MODELS:
            raise ValueError(f"EQK_BENCH_ORT_MODELS: {name!r}; accepted are {sorted(ORT_MODELS)}")
        size, batches, timing = ORT_MODELS[name]
        timing = {b: dict(zip(("warmup", "rounds", "min_time"), t)) for b, t in timing.items()}
        if quick:
            timing = {b: {**t, "min_time": t["min_time"] / 2} for b, t in timing.items()}
        compare(table, name, size, batches, threads, timing, (8, 4) if quick else WIDTHS)
        print(f"{name}: done", file=sys.stderr)
    for base in ("ORT fp32", "ORT int8"):
        table.ratio_to(
            f"speedup_vs_{base.replace(' ', '_')}",
            "ms",
            lambda r, base=base: r["runtime"] == base,
            group_by=["model", "batch"],
        )
    table.finish()


if __name__ == "__main__":
    main()
