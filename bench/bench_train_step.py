"""One SGD step (forward, backward, update) of ResNet-20, batch 128, 32x32, on this CPU:
the float model vs the converted supernet with one active subnet (W4 per-channel symmetric,
A4 asymmetric; first/last layers at 8 bits). Target: supernet step <= 1.5x the float step.

Compiled rows (`torch.compile`, backend EQK_BENCH_COMPILE, default inductor; "none" skips
them): the float model, and the supernet with a new random subnet every step (EQ-Net's
sampling of per-layer widths), next to the same random sampling in eager mode. The table
counts the graphs dynamo compiled after warm-up (target 0) and compares the compiled supernet
step with the compiled float step (target <= 1.2x). In compiled graphs the quantizers' forward
runs plain torch ops that inductor fuses with the batch norm and ReLU before them; the
activation quantizers' backward takes its step-size sums from the fake-quant kernel and dx from
plain ops fused into the batch-norm backward. A fourth row traces the sums as plain ops too
(EQK_COMPILE_INLINE_BACKWARD=1, the earlier form). A fifth converts the model over a space of
forms as well (weights per-tensor or per-channel, sym or asym; activations sym or asym) and
samples per-layer widths and forms, so its graph picks each quantizer's form group as data.
These five rows are timed in rotation. EQK_COMPILE_KERNEL=1 makes the quantizers call the
kernel ops for the forward as well.

The fake-quant backend is whatever `auto` resolves to (the C++ kernel when eqkernels._C has
it, else the pure-torch reference); the table says which. Run with nothing else on the
machine: `EQK_EXT_DIR=<private build>/eqkernels .venv/bin/python -m bench.bench_train_step`.
After changing the fake-quant ops, add TORCHINDUCTOR_FORCE_DISABLE_CACHES=1: inductor's graph
cache keys on the graph, not on a custom op's tags or body, and would serve the old kernels.
The allocator's state moves both compiled rows: glibc returns large freed blocks to the system
and the steps fault them in again, more so after in-process compiles; for stable ratios run
with MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=1073741824
MALLOC_TOP_PAD_=268435456 (docs/benchmarks.md has rows with and without).
"""

from __future__ import annotations

import copy
import os
import time

import eqnet
import torch
from eqnet import models
from eqnet.nn import form_data
from eqnet.space import ElasticSpace, SubnetConfig

from bench.deploy_vs_ort import rotation_medians
from bench.harness import Table, threads_from_env, time_fn
from eqkernels import _ext
from eqkernels.ops import fake_quant as fq_ops

BATCH = int(os.environ.get("EQK_BENCH_BATCH", 128))
COMPILE_BACKEND = os.environ.get("EQK_BENCH_COMPILE", "inductor")
RANDOM_CONFIGS = 64  # drawn before timing; each step activates the next one
INLINE_ROW = "compiled, plain-op act. backward"
# glibc's knobs that keep freed memory in the process (see the module docstring)
ALLOCATOR_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def sgd_step(model, opt, x, y):
    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


def random_config_step(run, net, opt, x, y, configs):
    """One SGD step of `run` (net or its compiled form) after activating the next config."""
    inner = sgd_step(run, opt, x, y)
    cursor = iter(range(1 << 62))

    def step():
        net.set_config(configs[next(cursor) % len(configs)])
        inner()

    return step


def with_inline_backward(step):
    """`step` with the activation quantizers' backward traced as plain ops (the form before
    the kernel's step-size sums; dynamo guards on the flag, so this is a graph of its own)."""

    def run():
        form_data.INLINE_BACKWARD = True
        try:
            step()
        finally:
            form_data.INLINE_BACKWARD = False

    return run


def unique_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def compiled_rows(table, float_model, supernets, x, y, threads):
    """Compiled float, eager and compiled supernet with a new random subnet every step (the
    compiled one twice: activation backward by the kernel op, and as plain ops), and the
    compiled supernet of a space of forms. `supernets`: (net, space) of widths and of forms.

    The steps are compiled (warmed up) first, then timed in rotation, one step of each
    per round, so that load from other processes hits every row alike. Each supernet row has a
    copy of its own, as a training run would: on one shared module the compiled row would also
    check the guards of the other row's cached graph on every call (dynamo keeps them on the
    module's code)."""
    gen = torch.Generator().manual_seed(0)

    def sample(net, space):
        net.train()
        return [SubnetConfig.random(space, net, generator=gen) for _ in range(RANDOM_CONFIGS)]

    (net, space), (forms_net, forms_space) = supernets["widths"], supernets["forms"]
    widths, forms = sample(net, space), sample(forms_net, forms_space)
    rows = [
        ("resnet20 float", float_model, None, "compiled", "-"),
        ("resnet20 supernet", copy.deepcopy(net), widths, "eager", "random widths per step"),
        ("resnet20 supernet", net, widths, "compiled", "random widths per step"),
        ("resnet20 supernet", copy.deepcopy(net), widths, INLINE_ROW, "random widths per step"),
        ("resnet20 supernet", forms_net, forms, "compiled", "random forms per step"),
    ]
    steps, compile_s = [], []
    torch._dynamo.reset()
    for _label, model, cfgs, mode, _subnet in rows:
        run = model if mode == "eager" else torch.compile(model, backend=COMPILE_BACKEND)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        if cfgs is None:
            step = sgd_step(run, opt, x, y)
        else:
            step = random_config_step(run, model, opt, x, y, cfgs)
        if mode == INLINE_ROW:
            step = with_inline_backward(step)
        t0 = time.perf_counter()
        step()  # warm-up: the compile
        compile_s.append(time.perf_counter() - t0)
        steps.append(step)
    graphs = unique_graphs()
    medians = rotation_medians(steps, warmup=2, rounds=8, min_time=1.0)
    after = unique_graphs() - graphs
    for (label, _model, cfgs, mode, subnet), t, c in zip(rows, medians, compile_s):
        table.add(
            model=label,
            subnet=subnet,
            backend="-" if cfgs is None else fq_ops.resolve_backend(None, x.device, "fake_quant"),
            mode=mode if mode == "eager" else f"{mode} ({COMPILE_BACKEND})",
            threads=threads,
            batch=BATCH,
            step_ms=t * 1e3,
            compile_s=c if mode != "eager" else 0.0,
            graphs_after_warmup=after if mode != "eager" else 0,
        )


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

    columns = ["model", "subnet", "backend", "mode", "threads", "batch", "step_ms"]
    columns += ["compile_s", "graphs_after_warmup"]
    table = Table("train_step", columns)
    eager_rows = [
        ("resnet20 float", float_model, "-", "-"),
        ("resnet20 supernet", net, "W4 channel sym / A4 asym", backend),
    ]
    # In rotation, like the compiled rows: load and the allocator's state hit both alike.
    eager_steps = []
    for _label, model, _subnet, _be in eager_rows:
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        eager_steps.append(sgd_step(model, opt, x, y))
    eager_ms = rotation_medians(eager_steps, warmup=2, rounds=8, min_time=1.0)
    for (label, _model, subnet, be), t in zip(eager_rows, eager_ms):
        table.add(
            model=label,
            subnet=subnet,
            backend=be,
            mode="eager",
            threads=threads,
            batch=BATCH,
            step_ms=t * 1e3,
            compile_s=0.0,
            graphs_after_warmup=0,
        )
    if COMPILE_BACKEND != "none":
        # EQ-Net's space of forms: every layer also picks its granularity and symmetries.
        forms_space = ElasticSpace(
            w_bits=space.w_bits,
            a_bits=space.a_bits,
            w_granularities=("tensor", "channel"),
            w_symmetries=("sym", "asym"),
            a_symmetries=("sym", "asym"),
        )
        forms_net = eqnet.convert(float_model, forms_space, keep_first_last="8bit")
        eqnet.calibrate(forms_net, [(x[:64], None)], batches=1, method="lsq")
        supernets = {"widths": (net, space), "forms": (forms_net, forms_space)}
        compiled_rows(table, float_model, supernets, x, y, threads)
    base = table.rows[0]["step_ms"]
    compiled_float = [r for r in table.rows if r["mode"] != "eager" and r["subnet"] == "-"]
    for row in table.rows:
        row["x_float"] = row["step_ms"] / base
        row["x_compiled_float"] = (
            row["step_ms"] / compiled_float[0]["step_ms"] if compiled_float else float("nan")
        )
    table.columns += ["x_float", "x_compiled_float"]
    table.finish()
    print(
        f"\ncalibrate(resnet20, every form: {forms} (scale, zero point) sets, method=mse, "
        f"2 batches of 64): {calib_s:.2f} s = {calib_s / (base / 1e3):.1f} float SGD steps"
    )
    tuned = [k for k in ALLOCATOR_SETTINGS if k in os.environ]
    print(f"\nglibc allocator settings from the environment: {', '.join(tuned) or 'none'}")
    print(
        f"\nextension: {'loaded' if _ext.available() else 'not built'}; targets: eager "
        "supernet x_float <= 1.5; compiled random-subnet supernet (widths) x_compiled_float "
        "<= 1.2 with graphs_after_warmup 0"
    )


if __name__ == "__main__":
    main()
