"""Low-bit GEMM / GEMV / conv on bit planes against torch baselines, in one run.

Shapes: M in {1, 16, 256} with (N, K) = (4096, 14336) (ggml's GEMV perf shape) and
(4096, 4096); one ResNet-style 3x3 conv (64 -> 64 channels, 32x32, batch 1 and 32).
Ours: `lowbit_linear` / `lowbit_conv2d` (the public ops, quantization and epilogue included)
at bits 2, 3, 4, 8 of one 8-plane weight, float and int8 activations. Baselines: torch fp32
and bf16 matmul (conv: fp32 conv2d), `torch._int_mm` on the unpacked int8 weight with int8
activations (quantization not timed).

Weights are cache-resident: one weight set is reused every call (ggml's perf mode). The
"weight MB" column is the bytes of weights one call reads (planes: bits * N * ceil(K/32) * 4);
"GB/s" is that over the time. Ratios are baseline time / our time (higher = faster).

The default run also has per-group rows (g = 32, 128; W2/W3/W4, --quick: W4) of the integer
path through `prepare_linear`. `--ggml BUILD` adds ggml's q4_0 and q4_K GEMV (M=1, N=4096,
K=14336, from its `test-backend-ops perf`, which runs hardware_concurrency() threads) as rows
beside our M=1, K=14336 shape (bench/ggml_perf.py).

Usage: `python -m bench.bench_lowbit_gemm [--quick] [--float] [--m 1 16] [--ggml BUILD]
[--sample-seconds S] [--paired]`
(EQK_BENCH_THREADS sets threads; run with nothing else on the machine; EQK_EXT_DIR selects a
private build of eqkernels._C).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import eqkernels as E
from bench.harness import Table, threads_from_env
from eqkernels import _ext

BITS = (2, 3, 4, 8)
ACT = dict(act_scale=torch.tensor([0.02]), act_quant_min=-128, act_quant_max=127)


def bench_linear(table, M, N, K, quick=False):
    shape = f"linear M={M} N={N} K={K}"
    q8 = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    planes = E.pack_bitplanes(q8, 8)
    scale = torch.tensor([0.01])
    x = torch.randn(M, K)
    heavy = M * N * K > 2**32
    w32 = q8.float() * 0.01
    row = dict(shape=shape, M=M, N=N, K=K)

    def add(provider, bits, act, fn, wbytes):
        t, t_min, cpu = timed_wall_cpu(fn, heavy)
        table.add(**row, provider=provider, bits=bits, act=act, time_ms=t * 1e3,
                  min_ms=t_min * 1e3, cpu_ms=cpu * 1e3, weight_MB=wbytes / 1e6,
                  GB_s=wbytes / t / 1e9)  # fmt: skip

    add("torch fp32", 32, "fp32", lambda: x @ w32.T, 4 * N * K)
    wbf = (q8.float() * 0.01).to(torch.bfloat16)
    xbf = x.to(torch.bfloat16)
    add("torch bf16", 16, "bf16", lambda: xbf @ wbf.T, 2 * N * K)
    xq = torch.randint(-128, 128, (M, K), dtype=torch.int8)
    wt = q8.T
    add("torch _int_mm", 8, "int8", lambda: torch._int_mm(xq, wt), N * K)
    for bits in BITS:
        pb = planes[:bits].contiguous()  # a file prefix holds exactly `bits` planes
        wbytes = pb.numel() * 4
        add("eqk lowbit_linear", bits, "fp32",
            lambda pb=pb, bits=bits: E.lowbit_linear(x, pb, scale, bits, 8, K=K), wbytes)  # fmt: skip
        add("eqk lowbit_linear", bits, "int8",
            lambda pb=pb, bits=bits: E.lowbit_linear(x, pb, scale, bits, 8, K=K, **ACT), wbytes)  # fmt: skip
    # Per-group scales on the integer path, through the prepared call (weights decoded once).
    act = E.ActQuant(ACT["act_scale"], None, ACT["act_quant_min"], ACT["act_quant_max"])
    for bits in (4,) if quick else (2, 3, 4):
        pb = planes[:bits].contiguous()
        for gs in (32, 128):
            s = torch.rand(N, K // gs) * 0.01 + 0.001
            op = E.prepare_linear(pb, s, bits, 8, K=K, act=act, group_size=gs)
            add(f"eqk lowbit_linear g{gs}", bits, "int8", lambda op=op: op(x),
                pb.numel() * 4 + s.numel() * 4)  # fmt: skip


def bench_conv(table, B, C=64, H=32):
    shape = f"conv3x3 B={B} C={C} {H}x{H}"
    K = C * 9
    q8 = torch.randint(-128, 128, (C, K), dtype=torch.int8)
    planes = E.pack_bitplanes(q8, 8)
    scale = torch.tensor([0.01])
    x = torch.randn(B, C, H, H)
    w = (q8.float() * 0.01).view(C, C, 3, 3)
    row = dict(shape=shape, M=B * H * H, N=C, K=K)

    def add(provider, bits, act, fn, wbytes):
        t, t_min, cpu = timed_wall_cpu(fn, B > 8)
        table.add(**row, provider=provider, bits=bits, act=act, time_ms=t * 1e3,
                  min_ms=t_min * 1e3, cpu_ms=cpu * 1e3, weight_MB=wbytes / 1e6,
                  GB_s=wbytes / t / 1e9)  # fmt: skip

    add("torch fp32", 32, "fp32", lambda: F.conv2d(x, w, padding=1), 4 * C * K)
    for bits in BITS:
        pb = planes[:bits].contiguous()
        kw = dict(in_channels=C, kernel_size=3, padding=1)
        add("eqk lowbit_conv2d", bits, "fp32",
            lambda pb=pb, bits=bits, kw=kw: E.lowbit_conv2d(x, pb, scale, bits, 8, **kw), pb.numel() * 4)  # fmt: skip
        add("eqk lowbit_conv2d", bits, "int8",
            lambda pb=pb, bits=bits, kw=kw: E.lowbit_conv2d(x, pb, scale, bits, 8, **kw, **ACT), pb.numel() * 4)  # fmt: skip


SAMPLE_SECONDS = 0.0  # --sample-seconds: time each row at least this long


def timed_wall_cpu(fn, heavy):
    """Median wall time, minimum wall time and median process CPU time (all threads, OpenMP
    spin-waits included) of fn(), in seconds. On a shared, oversubscribed machine the median
    wall time of a millisecond call is mostly other processes' time slices; the minimum is the
    closest to an idle machine."""
    warmup, repeat, min_time = (1, 5, 0.05) if heavy else (2, 10, 0.2)
    min_time = max(min_time, SAMPLE_SECONDS)
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    start = time.perf_counter()
    while len(walls) < repeat or time.perf_counter() - start < min_time:
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        cpus.append(time.process_time() - c0)
        walls.append(time.perf_counter() - w0)
        if len(walls) >= 10 * repeat and time.perf_counter() - start >= SAMPLE_SECONDS:
            break
    return statistics.median(walls), min(walls), statistics.median(cpus)


PAIRED = False  # --paired: x_torch_paired, minima of alternated calls


def paired_ratio(base_fn, fn):
    """min(base_fn) / min(fn) over calls alternated for max(1 s, --sample-seconds): on a shared
    machine both minima then come from the same window of load."""
    base_fn()
    fn()
    base, ours = [], []
    start = time.perf_counter()
    while len(ours) < 10 or time.perf_counter() - start < max(1.0, SAMPLE_SECONDS):
        t0 = time.perf_counter()
        base_fn()
        t1 = time.perf_counter()
        fn()
        ours.append(time.perf_counter() - t1)
        base.append(t1 - t0)
    return min(base) / min(ours)


FLOAT_MS = (1, 4, 16, 64, 256)
FLOAT_QUICK_MS = (1, 16)


def bench_float_kernel(table, M, N, K, quick):
    """The float-activation kernel (fp32 FMA / vdpbf16ps on decoded plane panels) at W2/W3/W4,
    per-channel and per-group (g = 32, 128) scales, against torch fp32 and bf16 matmul on the
    same shapes. Time of the kernel call alone (scale and cz prepared once, as at load)."""
    kern = _ext.kernel("lowbit_linear_float_cpu")
    shape = f"float-act M={M} N={N} K={K}"
    q8 = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    planes = E.pack_bitplanes(q8, 8)
    x = torch.randn(M, K)
    xbf = x.to(torch.bfloat16)
    heavy = M * N * K > 2**32
    row = dict(shape=shape, M=M, N=N, K=K)

    w32 = q8.float() * 0.01
    wbf = w32.to(torch.bfloat16)
    torch_fn = {"fp32": lambda: x @ w32.T, "bf16": lambda: xbf @ wbf.T}

    def add(provider, bits, act, fn, wbytes):
        t, t_min, cpu = timed_wall_cpu(fn, heavy)
        extra = {}
        if PAIRED:
            extra["x_torch_paired"] = (
                1.0 if fn is torch_fn[act] else paired_ratio(torch_fn[act], fn)
            )
        table.add(**row, provider=provider, bits=bits, act=act, time_ms=t * 1e3,
                  min_ms=t_min * 1e3, cpu_ms=cpu * 1e3, weight_MB=wbytes / 1e6, **extra)  # fmt: skip

    add("torch fp32", 32, "fp32", torch_fn["fp32"], 4 * N * K)
    add("torch bf16", 16, "bf16", torch_fn["bf16"], 2 * N * K)
    granularities = (
        ((128, "g128"), (K, "channel")) if quick else ((32, "g32"), (128, "g128"), (K, "channel"))
    )
    for bits in (4,) if quick else (2, 3, 4):
        pb = planes[:bits].contiguous()
        c = 0.5 * (1 - 2.0 ** -(8 - bits))
        for gs, gname in granularities:
            G = K // gs
            s = torch.rand(N, G) * 0.01 + 0.001
            cz = torch.full((N, G), c)
            wbytes = pb.numel() * 4 + s.numel() * 4
            for act, xa in (("fp32", x), ("bf16", xbf)):
                add(f"eqk float-act {gname}", bits, act,
                    lambda xa=xa, pb=pb, bits=bits, s=s, cz=cz, gs=gs: kern(xa, pb, bits, K, s, cz, gs, -1),
                    wbytes)  # fmt: skip


def add_ggml_rows(table, build_dir, prefix, extra):
    """ggml's q4_0 / q4_K GEMV (M=1, N=4096, K=14336, f32 activations that ggml quantizes to
    8 bits inside) from its own `test-backend-ops perf`, as rows of our fp32 shape."""
    from bench import ggml_perf

    N, K = 4096, 14336
    for type_a in ggml_perf.GGML_TYPES:
        row = ggml_perf.run(build_dir, type_a, m=N, n=1, k=K)
        t = row["us_per_run"] * 1e-6
        wbytes = ggml_perf.BYTES_PER_WEIGHT[type_a] * N * K
        values = dict(time_ms=t * 1e3, weight_MB=wbytes / 1e6, GB_s=wbytes / t / 1e9) | extra
        values = {key: v for key, v in values.items() if key in table.columns}
        table.add(shape=f"{prefix} M=1 N={N} K={K}", M=1, N=N, K=K,
                  provider=f"ggml {type_a} (test-backend-ops, {row['runs']} runs)", bits=4,
                  act="fp32", **values)  # fmt: skip


def main_float(args):
    threads = threads_from_env()
    print(f"threads: {threads}; float-activation kernel; weights cache-resident")
    cols = ["shape", "M", "N", "K", "provider", "bits", "act", "time_ms", "min_ms", "cpu_ms"]
    cols.append("weight_MB")
    table = Table("lowbit_gemm_float", cols)
    ms = args.m or (FLOAT_QUICK_MS if args.quick else FLOAT_MS)
    for K in (14336,) if args.quick else (14336, 4096):
        for M in ms:
            bench_float_kernel(table, M, 4096, K, args.quick)
    if args.ggml:
        add_ggml_rows(
            table, args.ggml, "float-act", extra=dict(min_ms=float("nan"), cpu_ms=float("nan"))
        )
    # Each activation dtype against torch's matmul in the same dtype (fp32 or bf16).
    is_torch = lambda r: r["provider"].startswith("torch")  # noqa: E731
    table.ratio_to("x_torch", "time_ms", is_torch, ["shape", "act"])
    table.ratio_to("x_torch_min", "min_ms", is_torch, ["shape", "act"])
    table.ratio_to("x_torch_cpu", "cpu_ms", is_torch, ["shape", "act"])
    if PAIRED:
        table.columns.append("x_torch_paired")
    table.finish()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the M=1 and M=16 shapes")
    parser.add_argument(
        "--m", type=int, nargs="+", help="only these linear row counts (and skip the convs)"
    )
    parser.add_argument(
        "--float",
        action="store_true",
        help="only the float-activation kernel rows (W2/W3/W4, per-channel and g=32/128, fp32 "
        "and bf16 activations, M=1..256, K=14336 and 4096; --quick: W4, M=1 and 16, K=14336)",
    )
    parser.add_argument(
        "--ggml",
        metavar="PATH",
        help="a ggml build dir holding bin/test-backend-ops: add its q4_0 and q4_K MUL_MAT perf "
        "rows (M=1, N=4096, K=14336) beside ours (ggml is never a dependency)",
    )
    parser.add_argument(
        "--sample-seconds",
        type=float,
        default=0.0,
        help="time every row for at least this long (on a shared machine more calls make an "
        "undisturbed minimum likelier)",
    )
    parser.add_argument(
        "--paired",
        action="store_true",
        help="--float rows: also x_torch_paired, torch's minimum over ours from alternated calls",
    )
    args = parser.parse_args(argv)
    global SAMPLE_SECONDS, PAIRED
    SAMPLE_SECONDS, PAIRED = args.sample_seconds, args.paired
    if args.float:
        return main_float(args)
    threads = threads_from_env()
    print(f"threads: {threads}; weights cache-resident (one weight set reused)")
    cols = ["shape", "M", "N", "K", "provider", "bits", "act", "time_ms", "min_ms", "cpu_ms"]
    cols += ["weight_MB", "GB_s"]
    table = Table("lowbit_gemm", cols)
    ms = args.m or ((1, 16) if args.quick else (1, 16, 256))
    for N, K in ((4096, 14336), (4096, 4096)):
        for M in ms:
            bench_linear(table, M, N, K, args.quick)
    for B in () if args.m else (1,) if args.quick else (1, 32):
        bench_conv(table, B)
    if args.ggml:
        add_ggml_rows(
            table, args.ggml, "linear", extra=dict(min_ms=float("nan"), cpu_ms=float("nan"))
        )
    table.ratio_to("x_torch_fp32", "time_ms", lambda r: r["provider"] == "torch fp32", ["shape"])
    is_fp32 = lambda r: r["provider"] == "torch fp32"  # noqa: E731
    table.ratio_to("x_fp32_min", "min_ms", is_fp32, ["shape"])
    table.ratio_to("x_fp32_cpu", "cpu_ms", is_fp32, ["shape"])
    table.ratio_to("x_int_mm", "time_ms", lambda r: r["provider"] == "torch _int_mm", ["shape"])
    for r in table.rows:
        if r["act"] != "int8" or r["shape"].startswith("conv"):
            r["x_int_mm"] = float("nan")
    table.finish()


if __name__ == "__main__":
    main()
