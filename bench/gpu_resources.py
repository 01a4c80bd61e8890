"""Registers, shared memory and spills of every CUDA and Triton kernel, for sm_80 and sm_90.

No GPU needed. CUDA: each `csrc/**/*.cu` is compiled by nvcc to a cubin per architecture with
`-Xptxas -v` (an incremental ninja build does not show that report), at most two compilers at a
time. Triton: every `AOT_SPECS` entry of `eqkernels/triton/` is compiled by the real Triton
compiler (eqkernels.triton.aot, in a process without TRITON_INTERPRET). Both kinds of cubin are
read with `cuobjdump -res-usage` (the copy in the triton wheel). tests/test_gpu_compile.py asserts
no compile error and no spill; register counts move with the ptxas version and are never compared
with a table.

    python -m bench.gpu_resources            # rewrite the table in docs/backends.md
    python -m bench.gpu_resources --print    # print it only
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from eqkernels.triton import aot

ROOT = Path(__file__).resolve().parent.parent

ARCHS = (80, 90)
DOC = ROOT / "docs" / "backends.md"
BEGIN = "<!-- gpu-resources:begin (python -m bench.gpu_resources) -->"
END = "<!-- gpu-resources:end -->"
# The flags of the extension build (setup.py) plus those torch's CUDAExtension adds that change
# code generation; -Xptxas -v prints the per-kernel report.
NVCC_FLAGS = (
    "-O3",
    "-std=c++20",
    "--expt-relaxed-constexpr",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "-DEQK_WITH_CUDA=1",
)


def nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    local = Path(home) / "bin" / "nvcc"
    return str(local) if local.exists() else shutil.which("nvcc")


def cuda_sources() -> list[Path]:
    return sorted((ROOT / "csrc").rglob("*.cu"))


def short_name(mangled: str) -> str:
    """`lowbit_gemv_kernel<true>` from an Itanium-mangled kernel name (no c++filt ships with a
    minimal CUDA install); the name itself when it is not mangled."""
    m = re.match(r"_Z(N?)", mangled)
    if not m:
        return mangled
    pos, names = m.end(), []
    while pos < len(mangled) and mangled[pos].isdigit():
        digits = re.match(r"\d+", mangled[pos:]).group()
        pos += len(digits)
        names.append(mangled[pos : pos + int(digits)])
        pos += int(digits)
    if not names:
        return mangled
    args = re.match(r"I((?:Lb[01]E|Li-?\d+E|Lj\d+E)+)E", mangled[pos:])
    if not args:
        return names[-1]
    values = re.findall(r"L([bij])(-?\d+)E", args.group(1))
    shown = [("true" if v == "1" else "false") if t == "b" else v for t, v in values]
    return f"{names[-1]}<{', '.join(shown)}>"


_PTXAS_FUNCTION = re.compile(
    r"Function properties for (\S+)\s*\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, "
    r"(\d+) bytes spill loads"
)


def compile_cu(source: Path, arch: int, out_dir: Path) -> list[dict]:
    """Compile one .cu for sm_<arch>; one record per kernel (or one error record)."""
    rel = source.relative_to(ROOT).as_posix()
    cubin = out_dir / f"{source.stem}.sm{arch}.cubin"
    cmd = [nvcc(), "-cubin", "-Xptxas", "-v", *NVCC_FLAGS, f"-arch=sm_{arch}"]
    cmd += [f"-I{ROOT / 'csrc'}", str(source), "-o", str(cubin)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        return [{"source": rel, "arch": arch, "ok": False, "error": res.stderr + res.stdout}]
    spills = {
        name: (int(stack), int(stores), int(loads))
        for name, stack, stores, loads in _PTXAS_FUNCTION.findall(res.stderr + res.stdout)
    }
    records = []
    for mangled, usage in aot.resource_usage(str(cubin)).items():
        _stack, stores, loads = spills.get(mangled, (None, None, None))
        records.append(
            {
                "source": rel,
                "arch": arch,
                "ok": stores is not None,
                "error": None if stores is not None else "no ptxas -v report for this kernel",
                "kernel": short_name(mangled),
                "usage": usage,
                "spill_stores": stores,
                "spill_loads": loads,
            }
        )
    if not records:
        records.append({"source": rel, "arch": arch, "ok": False, "error": "no kernel in cubin"})
    return records


def cuda_resources(out_dir: Path, archs=ARCHS, jobs: int = 2) -> list[dict]:
    """Every .cu for every arch, `jobs` nvcc processes at a time."""
    if nvcc() is None:
        raise FileNotFoundError("nvcc not found (CUDA_HOME/bin or PATH)")
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = [(src, arch) for src in cuda_sources() for arch in archs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        results = pool.map(lambda t: compile_cu(t[0], t[1], out_dir), tasks)
        return [rec for recs in results for rec in recs]


def triton_resources(out_dir: Path, archs=ARCHS) -> dict:
    return aot.run_isolated(list(archs), str(out_dir / "triton"), str(out_dir / "triton-cache"))


def versions(triton_result: dict | None) -> dict:
    import torch

    found = {"torch": torch.__version__, "nvcc": aot.tool_version(nvcc())}
    if triton_result is not None:
        found |= {
            f"triton {k}" if k != "triton" else k: v for k, v in triton_result["versions"].items()
        }
    return found


def table(cuda: list[dict], triton: dict, found: dict) -> str:
    def usage(rec, key):
        return rec.get("usage", {}).get(key, "")

    lines = [
        "| kind | kernel | arch | registers | static shared (B) | dynamic shared (B) | local (B) "
        "| spill stores / loads (B) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rec in cuda:
        if not rec["ok"]:
            lines.append(f"| CUDA | {rec['source']} | sm_{rec['arch']} | compile error | | | | |")
            continue
        lines.append(
            f"| CUDA | `{rec['kernel']}` ({rec['source']}) | sm_{rec['arch']} | "
            f"{usage(rec, 'REG')} | {usage(rec, 'SHARED')} | 0 | {usage(rec, 'LOCAL')} | "
            f"{rec['spill_stores']} / {rec['spill_loads']} |"
        )
    for rec in triton["records"]:
        if not rec["ok"]:
            lines.append(f"| Triton | {rec['label']} | sm_{rec['arch']} | compile error | | | | |")
            continue
        lines.append(
            f"| Triton | `{rec['label']}` ({rec['num_warps']} warps) | {rec['target']} | "
            f"{usage(rec, 'REG')} | {usage(rec, 'SHARED')} | {rec['dynamic_shared']} | "
            f"{usage(rec, 'LOCAL')} | {rec['spill_stores']} / {rec['spill_loads']} |"
        )
    tools = ", ".join(f"{k} {v}" for k, v in found.items())
    return "\n".join(
        [
            BEGIN,
            f"Compiled without a GPU by `python -m bench.gpu_resources` with {tools}. Registers "
            "per thread and static shared memory per block come from `cuobjdump -res-usage`; "
            "dynamic shared memory is what Triton requests at launch; spills from `ptxas -v`. "
            "sm_90 static shared memory includes the 1 KiB the driver reserves per block.",
            "",
            *lines,
            END,
        ]
    )


def write_doc(text: str, doc: Path = DOC) -> None:
    """Replace the marked section of the doc (appended when absent), atomically."""
    current = doc.read_text()
    if BEGIN in current and END in current:
        head, rest = current.split(BEGIN, 1)
        new = head + text + rest.split(END, 1)[1]
    else:
        new = current.rstrip("\n") + "\n\n## Registers, shared memory and spills\n\n" + text + "\n"
    tmp = doc.with_suffix(".md.tmp")
    tmp.write_text(new)
    os.replace(tmp, doc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--print", action="store_true", help="print the table, leave the doc")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cuda = cuda_resources(Path(tmp) / "cuda")
        triton = triton_resources(Path(tmp))
    text = table(cuda, triton, versions(triton))
    print(text)
    if not args.print:
        write_doc(text)
        print(f"wrote {DOC.relative_to(ROOT)}")
    bad = [r for r in cuda + triton["records"] if not r["ok"] or r.get("spill_stores")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
