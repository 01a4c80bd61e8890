"""One SGD step (forward, backward, update) of ResNet-20, batch 128, 32x32, on this CPU:
the float model vs the converted supernet with one active subnet (W4 per-channel symmetric,
A4 asymmetric; first/last layers at 8 bits). Target: supernet step <= 1.5x the float step.

The fake-quant backend is whatever `auto` resolves to (the C++ kernel when eqkernels._C has
it, else the pure-torch reference); the table says which. Run with nothing else on the
machine: `EQK_EXT_DIR=<private build>/eqkernels .venv/bin/python -m bench.bench_train_step`.
"""

from __future__ import annotations

import os

import eqnet
import torch
from eqnet import models
from eqnet.space import ElasticSpace, SubnetConfig

from bench.harness import Table, threads_from_env, time_fn
from eqkernels import _ext
from eqkernels.ops import fake_quant as fq_ops

BATCH = int(os.environ.get("EQK_BENCH_BATCH", 128))


def sgd_step(model, opt, x, y):
    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    threads = threads_from_env()
    torch.manual_seed(0)
    x = torch.randn(BATCH, 3, 32, 32)
    y = torch.randint(0, 10, (BATCH,))

    float_model = models.get("resnet20").train()
    space = ElasticSpace(w_bits=(2, 3, 4, 5, 6, 7, 8), a_bits=(2, 3, 4, 5, 6, 7, 8))
    net = eqnet.convert(float_model, space, keep_first_last="8bit")
    # Calibration cost: every form of every quantizer (7 weight + 7 activation widths per
    # layer), MSE clipping search, activations from 2 batches of 64.
    forms = sum(len(q.form_keys()) for q in net.quantizers().values())
    calib_s = time_fn(
        lambda: eqnet.calibrate(net, [(x[:64], None), (x[64:], None)], batches=2),
        warmup=1,
        repeat=1,
        min_time=0.0,
    )
    net.set_config(SubnetConfig.uniform(space, net, 4, 4, "channel", "sym", "asym"))
    net.train()
    backend = fq_ops.resolve_backend(None, x.device, "fake_quant")

    table = Table("train_step", ["model", "subnet", "backend", "threads", "batch", "step_ms"])
    for label, model, subnet, be in [
        ("resnet20 float", float_model, "-", "-"),
        ("resnet20 supernet", net, "W4 channel sym / A4 asym", backend),
    ]:
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        t = time_fn(sgd_step(model, opt, x, y), warmup=2, repeat=8, min_time=1.0)
        table.add(
            model=label, subnet=subnet, backend=be, threads=threads, batch=BATCH, step_ms=t * 1e3
        )
    base = table.rows[0]["step_ms"]
    for row in table.rows:
        row["x_float"] = row["step_ms"] / base
    table.columns.append("x_float")
    table.finish()
    print(
        f"\ncalibrate(resnet20, every form: {forms} (scale, zero point) sets, method=mse, "
        f"2 batches of 64): {calib_s:.2f} s = {calib_s / (base / 1e3):.1f} float SGD steps"
    )
    print(f"\nextension: {'loaded' if _ext.available() else 'not built'}; target x_float <= 1.5")


if __name__ == "__main__":
    main()
