"""Benchmark of bit-plane packing and unpacking (eqkernels.pack_bitplanes / unpack_bitplanes).

CPU (run here), weight-shaped int8 codes [N, K] at several widths. Providers:
  ours (cpp)     backend="cpp" (eqkernels._C, run-time ISA dispatch)
  torch          backend="torch": the pure-torch reference written with tensor ops (the
                 baseline every ratio is to)
  int8 copy      q.clone() of the int8 codes [N, K]: the cost of touching the unpacked
                 weights once, a floor for unpacking into them
Ratios are to the torch provider in the same run (higher is faster).

Usage: python -m bench.bench_bitplanes [--quick]   (EQK_EXT_DIR=... to use a private _C build;
EQK_BENCH_THREADS=n to set the thread count). Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import sys

import torch

import eqkernels as E
from bench.harness import Table, machine, threads_from_env, time_fn

SHAPES = {"conv[512,4608]": (512, 4608), "linear[4096,4096]": (4096, 4096)}
BITS = (2, 4, 8)


def _codes(shape, bits):
    gen = torch.Generator().manual_seed(0)
    lo, hi = -(1 << (bits - 1)), 1 << (bits - 1)
    return torch.randint(lo, hi, shape, generator=gen, dtype=torch.int8)


def run(table: Table, shapes: dict, repeat: int) -> None:
    for shape_name, shape in shapes.items():
        for bits in BITS:
            q = _codes(shape, bits)
            planes = E.pack_bitplanes(q, bits, backend="torch")
            assert torch.equal(E.pack_bitplanes(q, bits, backend="cpp"), planes)
            K = shape[1]
            for backend, name in (("cpp", "ours (cpp)"), ("torch", "torch")):
                timers = {
                    "pack": lambda q=q, n=bits, b=backend: E.pack_bitplanes(q, n, backend=b),
                    "unpack": lambda p=planes, n=bits, k=K, b=backend: E.unpack_bitplanes(
                        p, n, k, backend=b
                    ),
                }
                for op, fn in timers.items():
                    seconds = time_fn(fn, repeat=repeat)
                    table.add(op=op, shape=shape_name, bits=bits, provider=name,
                              median_ms=seconds * 1e3)  # fmt: skip
            seconds = time_fn(q.clone, repeat=repeat)
            for op in ("pack", "unpack"):
                table.add(op=op, shape=shape_name, bits=bits, provider="int8 copy",
                          median_ms=seconds * 1e3)  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the smaller shape only")
    args = parser.parse_args(argv)
    threads = threads_from_env()
    print(f"threads: {threads}; {machine()['cpu']}", flush=True)
    table = Table("bench_bitplanes", ["op", "shape", "bits", "provider", "median_ms"])
    shapes = dict(list(SHAPES.items())[:1]) if args.quick else SHAPES
    run(table, shapes, repeat=5 if args.quick else 10)
    table.ratio_to(
        "x_vs_torch",
        "median_ms",
        lambda r: r["provider"] == "torch",
        group_by=("op", "shape", "bits"),
    )
    table.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
