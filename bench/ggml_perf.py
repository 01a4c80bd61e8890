"""Side-by-side rows from ggml's `test-backend-ops perf` (an optional comparison: ggml is never
a dependency of eqkernels).

`run(build_dir, type_a)` runs `BUILD/bin/test-backend-ops perf -o MUL_MAT -b CPU -p
"type_a=<type_a>,type_b=f32,m=4096,n=1,k=14336"` (ggml's GEMV perf shape: one weight set
reused, as our bench does; ggml quantizes the f32 activation row to 8 bits inside) and parses
its console lines:

    MUL_MAT(type_a=q4_0,type_b=f32,m=4096,n=1,k=14336,...):   69 runs -  20753.80 us/run - ...

test-backend-ops runs the CPU backend with `std::thread::hardware_concurrency()` threads.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

GGML_TYPES = ("q4_0", "q4_K")
# Bytes per weight of each ggml block format: q4_0 = 32 weights in 18 bytes (fp16 scale +
# 16 bytes of nibbles); q4_K = 256 weights in 144 bytes (4.5 bits per weight).
BYTES_PER_WEIGHT = {"q4_0": 18 / 32, "q4_K": 144 / 256}

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ROW = re.compile(
    r"MUL_MAT\((?P<params>[^)]*)\):\s+(?P<runs>\d+) runs -\s+(?P<us>[\d.]+) us/run -\s+"
    r"(?P<flop>[\d.]+) (?P<flop_unit>[kKMGT]?)FLOP/run -\s+(?P<rate>[\d.]+) (?P<rate_unit>[kKMGT]?)FLOPS"
)


def parse(text: str) -> list[dict]:
    """Every MUL_MAT perf line of test-backend-ops' console output as {"params": {name:
    value}, "runs", "us_per_run", "gflops"}."""
    scale = {"": 1e-9, "k": 1e-6, "K": 1e-6, "M": 1e-3, "G": 1.0, "T": 1e3}
    rows = []
    for match in _ROW.finditer(_ANSI.sub("", text)):
        params = dict(
            item.split("=", 1)
            for item in re.split(r",(?![^\[]*\])", match["params"])
            if "=" in item
        )
        rows.append(
            {
                "params": params,
                "runs": int(match["runs"]),
                "us_per_run": float(match["us"]),
                "gflops": float(match["rate"]) * scale[match["rate_unit"]],
            }
        )
    return rows


def binary(build_dir: str | Path) -> Path:
    path = Path(build_dir) / "bin" / "test-backend-ops"
    if not path.is_file():
        raise SystemExit(
            f"--ggml {build_dir}: no bin/test-backend-ops there; accepted: a ggml build dir "
            "(cmake -DGGML_BUILD_TESTS=ON ... --target test-backend-ops)"
        )
    return path


def run(build_dir: str | Path, type_a: str, m=4096, n=1, k=14336, timeout=900) -> dict:
    """The parsed perf row of ggml's MUL_MAT for `type_a` weights and f32 activations."""
    cmd = [str(binary(build_dir)), "perf", "-o", "MUL_MAT", "-b", "CPU", "-p",
           f"type_a={type_a},type_b=f32,m={m},n={n},k={k}"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    rows = [
        r for r in parse(res.stdout) if r["params"].get("type_a") == type_a
        and r["params"].get("m") == str(m) and r["params"].get("n") == str(n)
        and r["params"].get("k") == str(k)
    ]  # fmt: skip
    if res.returncode != 0 or not rows:
        raise RuntimeError(f"{' '.join(cmd)} (exit {res.returncode}) gave no perf row:\n"
                           f"{res.stdout[-2000:]}{res.stderr[-2000:]}")  # fmt: skip
    return rows[0]
