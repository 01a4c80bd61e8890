"""Benchmark of the fused fake-quant op (LSQ+ with a learnable zero point).

CPU (run here): forward, backward and forward+backward, per-tensor and per-channel, on an
activation-shaped [64, 256, 32, 32] (channels on axis 1) and a weight-shaped [512, 4608]
(channels on axis 0) fp32 tensor. Providers:
  ours (cpp)  eqkernels.fake_quant(backend="cpp")
  built-in    torch._fake_quantize_learnable_per_tensor_affine / _per_channel_affine
  composite   the same LSQ+ math written with plain torch ops (straight-through round)
  mem floor   bytes that must move / bandwidth of an allocating copy (x.clone()), measured in
              this run: forward reads x and writes y (2 tensors), backward reads dy, x and
              writes dx (3), forward+backward 5.
"backward" is torch.autograd.grad over a retained graph (the same for every provider).
Ratios are to the built-in in the same run (higher is faster).

CUDA: when a GPU is present the script also times the Triton kernels with
triton.testing.do_bench. That path exists but has not been run: no machine here has a GPU.

Usage: python -m bench.bench_fake_quant   (EQK_EXT_DIR=... to use a private _C build;
EQK_BENCH_THREADS=n to set the thread count). Run it with nothing else on the machine.
"""

from __future__ import annotations

import math
import sys

import torch

from bench.harness import Table, machine, threads_from_env, time_fn
from eqkernels import fake_quant

SHAPES = {
    "act[64,256,32,32]": ((64, 256, 32, 32), 1, (0, 255)),
    "weight[512,4608]": ((512, 4608), 0, (-128, 127)),
}
# Tensors a mode must move, in units of x.nbytes.
TENSORS_MOVED = {"forward": 2, "backward": 3, "forward+backward": 5}


def _round_ste(t):
    return t + (torch.round(t) - t).detach()


def composite(x, scale, zero_point, qmin, qmax, axis, grad_factor):
    """LSQ+ in plain torch ops: gradient scaling by the detach trick, straight-through round."""
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = -1
    s = scale.reshape(shape)
    z = zero_point.reshape(shape)
    s = s * grad_factor + (s - s * grad_factor).detach()
    z = z * grad_factor + (z - z * grad_factor).detach()
    zr = _round_ste(z)
    q = torch.clamp(_round_ste(x / s) + zr, qmin, qmax)
    return (q - zr) * s


def builtin(x, scale, zero_point, qmin, qmax, axis, grad_factor):
    if axis is None:
        return torch._fake_quantize_learnable_per_tensor_affine(
            x, scale, zero_point, qmin, qmax, grad_factor
        )
    return torch._fake_quantize_learnable_per_channel_affine(
        x, scale, zero_point, axis, qmin, qmax, grad_factor
    )


def ours(x, scale, zero_point, qmin, qmax, axis, grad_factor):
    return fake_quant(
        x, scale, zero_point, qmin, qmax, axis=axis, grad_factor=grad_factor, backend="cpp"
    )


PROVIDERS = {"ours (cpp)": ours, "built-in": builtin, "composite": composite}


def _case(shape, axis, qrange, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    qmin, qmax = qrange
    channels = 1 if axis is None else shape[axis]
    x = torch.randn(shape, generator=gen).to(device)
    scale = (torch.rand(channels, generator=gen) * 0.02 + 0.01).to(device)
    zero_point = torch.round(torch.rand(channels, generator=gen) * (qmax - qmin) * 0.2 + qmin)
    zero_point = (zero_point + 0.3).to(device)
    grad_factor = 1.0 / math.sqrt(x.numel() / channels * qmax)
    return x, scale, zero_point, qmin, qmax, grad_factor


def _timers(fn, x, scale, zero_point, qmin, qmax, axis, g):
    dy = torch.randn_like(x)
    leaves = [t.clone().requires_grad_() for t in (x, scale, zero_point)]

    def forward():
        with torch.no_grad():
            fn(x, scale, zero_point, qmin, qmax, axis, g)

    graph = fn(*leaves, qmin, qmax, axis, g)

    def backward():
        torch.autograd.grad(graph, leaves, dy, retain_graph=True)

    def forward_backward():
        torch.autograd.grad(fn(*leaves, qmin, qmax, axis, g), leaves, dy)

    return {"forward": forward, "backward": backward, "forward+backward": forward_backward}


def run_cpu(table: Table, repeat: int) -> None:
    for shape_name, (shape, channel_axis, qrange) in SHAPES.items():
        for granularity, axis in (("per-tensor", None), ("per-channel", channel_axis)):
            x, scale, zero_point, qmin, qmax, g = _case(shape, axis, qrange)
            nbytes = x.numel() * x.element_size()
            t_clone = time_fn(lambda x=x: x.clone(), repeat=repeat)
            bandwidth = 2 * nbytes / t_clone
            timers = {
                name: _timers(fn, x, scale, zero_point, qmin, qmax, axis, g)
                for name, fn in PROVIDERS.items()
            }
            for mode, moved in TENSORS_MOVED.items():
                rows = [("mem floor", moved * nbytes / bandwidth)]
                rows += [(name, time_fn(t[mode], repeat=repeat)) for name, t in timers.items()]
                for provider, seconds in rows:
                    table.add(
                        device="cpu",
                        shape=shape_name,
                        granularity=granularity,
                        mode=mode,
                        provider=provider,
                        median_ms=seconds * 1e3,
                        GBps=moved * nbytes / seconds / 1e9,
                    )
            del timers


def run_cuda(table: Table) -> None:
    """Triton kernels on a GPU (not run here: no GPU in this workplace)."""
    import triton.testing

    for shape_name, (shape, channel_axis, qrange) in SHAPES.items():
        for granularity, axis in (("per-tensor", None), ("per-channel", channel_axis)):
            x, scale, zero_point, qmin, qmax, g = _case(shape, axis, qrange, device="cuda")
            nbytes = x.numel() * x.element_size()
            for name, backend in (("ours (triton)", "triton"), ("built-in", None)):
                if backend is None:
                    fn = builtin
                else:

                    def fn(*a, backend=backend):
                        x_, s_, z_, lo, hi, ax, gf = a
                        return fake_quant(
                            x_, s_, z_, lo, hi, axis=ax, grad_factor=gf, backend=backend
                        )

                timers = _timers(fn, x, scale, zero_point, qmin, qmax, axis, g)
                for mode, moved in TENSORS_MOVED.items():
                    ms = triton.testing.do_bench(timers[mode])
                    table.add(
                        device="cuda",
                        shape=shape_name,
                        granularity=granularity,
                        mode=mode,
                        provider=name,
                        median_ms=ms,
                        GBps=moved * nbytes / (ms * 1e-3) / 1e9,
                    )


def main() -> int:
    threads = threads_from_env()
    print(f"threads: {threads}; {machine()['cpu']}", flush=True)
    table = Table(
        "bench_fake_quant",
        ["device", "shape", "granularity", "mode", "provider", "median_ms", "GBps"],
    )
    run_cpu(table, repeat=10)
    if torch.cuda.is_available():
        run_cuda(table)
    table.ratio_to(
        "x_vs_builtin",
        "median_ms",
        lambda r: r["provider"].startswith("built-in"),
        group_by=("device", "shape", "granularity", "mode"),
    )
    # Below 1 means slower than the memory floor; the forward target is >= 1/1.5.
    table.ratio_to(
        "x_vs_floor",
        "median_ms",
        lambda r: r["provider"] == "mem floor",
        group_by=("device", "shape", "granularity", "mode"),
    )
    table.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
