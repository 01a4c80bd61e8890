"""Ahead-of-time compilation of the Triton kernels with the real compiler (no GPU needed).

Every kernel module of this package declares `AOT_SPECS`, a list of `(kernel, signature,
constexprs)`: the `triton.compile` signature dict (`{"x_ptr": "*fp32", "n": "i32", "BLOCK":
"constexpr", ...}`) and the constexpr values, one entry per specialization its launchers can
produce. `compile_all` compiles each entry for a `GPUTarget("cuda", arch, 32)` down to a cubin,
reads the spill report of Triton's own `ptxas -v` run (TRITON_DUMP_PTXAS_LOG; a triton without
it gets its PTX run through ptxas -v again) and the cubin's `cuobjdump -res-usage` (registers,
shared and local memory), and returns one record per (entry, arch).

Under TRITON_INTERPRET=1 `@triton.jit` builds interpreter objects that the compiler cannot take,
so `run_isolated` runs this module in a subprocess without that variable and with its own
TRITON_CACHE_DIR (a cached cubin would skip the front end):
    python -m eqkernels.triton.aot --arch 80 --arch 90 --out DIR   (prints JSON records)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
from pathlib import Path

PACKAGE = "eqkernels.triton"
NOT_KERNEL_MODULES = ("aot",)


def kernel_modules() -> list:
    """Every module of eqkernels.triton that may hold kernels (all but this one)."""
    package = importlib.import_module(PACKAGE)
    names = sorted(m.name for m in pkgutil.iter_modules(package.__path__))
    return [importlib.import_module(f"{PACKAGE}.{n}") for n in names if n not in NOT_KERNEL_MODULES]


def _is_jit(obj) -> bool:
    from triton.runtime.jit import JITFunction

    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - older layouts
        InterpretedFunction = JITFunction
    return isinstance(obj, (JITFunction, InterpretedFunction))


def jit_functions(module) -> dict:
    """name -> @triton.jit object, for those defined in `module` itself."""
    return {
        name: obj
        for name, obj in vars(module).items()
        if _is_jit(obj) and getattr(obj.fn, "__module__", None) == module.__name__
    }


def _source(obj) -> str:
    import inspect

    return getattr(obj, "src", None) or inspect.getsource(obj.fn)


def uncovered(module) -> list[str]:
    """@triton.jit functions of `module` that no AOT_SPECS entry compiles: neither a listed
    kernel nor a helper called (transitively) from one."""
    jits = jit_functions(module)
    specs = getattr(module, "AOT_SPECS", None)
    if specs is None:
        return sorted(jits)
    reached = {kernel.fn.__name__ for kernel, _, _ in specs}
    frontier = list(reached)
    while frontier:
        name = frontier.pop()
        src = _source(jits[name]) if name in jits else ""
        for callee in jits:
            if callee not in reached and re.search(rf"\b{re.escape(callee)}\s*\(", src):
                reached.add(callee)
                frontier.append(callee)
    return sorted(set(jits) - reached)


def spec_label(module, kernel, signature: dict, constexprs: dict) -> str:
    """`kernel key=value ...` naming what differs between this kernel's entries in AOT_SPECS."""
    mine = [(s, c) for k, s, c in module.AOT_SPECS if k is kernel]

    def value(sig, const, key):
        return str(const[key]) if key in const else sig[key]

    varying = [
        key
        for key in signature
        if len({value(s, c, key) for s, c in mine}) > 1 and not key.endswith("_ptr")
    ]
    first_ptr = next((key for key in signature if signature[key].startswith("*")), None)
    parts = [kernel.fn.__name__]
    if first_ptr is not None:
        parts.append(signature[first_ptr].lstrip("*"))
    parts += [f"{key}={value(signature, constexprs, key)}" for key in varying]
    return " ".join(parts)


def tool(name: str) -> str | None:
    """A CUDA binary tool: the copy shipped in the triton wheel, else CUDA_HOME/bin, else PATH."""
    import triton

    shipped = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if shipped.exists():
        return str(shipped)
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    local = Path(cuda_home) / "bin" / name
    return str(local) if local.exists() else shutil.which(name)


def tool_version(path: str | None) -> str:
    if path is None:
        return "absent"
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False).stdout
    found = re.findall(r"release [\d.]+, V[\d.]+", out)
    return found[-1] if found else out.strip().splitlines()[-1] if out.strip() else "unknown"


_RES_FUNCTION = re.compile(r"Function (\S+):\s*\n\s*(.*)")
_RES_FIELD = re.compile(r"([A-Z]+(?:\[\d+\])?):(\d+)")


def resource_usage(cubin: str) -> dict[str, dict[str, int]]:
    """{function: {"REG": n, "SHARED": bytes, "LOCAL": bytes, "STACK": bytes, ...}} read from
    a cubin by `cuobjdump -res-usage` (no GPU needed)."""
    out = subprocess.run(
        [tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True, check=True
    ).stdout
    return {
        name: {k: int(v) for k, v in _RES_FIELD.findall(fields)}
        for name, fields in _RES_FUNCTION.findall(out)
    }


_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_spills(log: str) -> tuple[int, int]:
    """(spill store bytes, spill load bytes) summed over a `ptxas -v` log."""
    pairs = _SPILL.findall(log)
    return sum(int(s) for s, _ in pairs), sum(int(lo) for _, lo in pairs)


def _ptx_spills(ptx: str, path: Path) -> tuple[int, int, str]:
    """Run the PTX Triton produced through ptxas -v for its own target (the spill report that
    Triton itself does not return)."""
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1).rstrip(",")
    path.write_text(ptx)
    res = subprocess.run(
        [tool("ptxas"), "-v", f"--gpu-name={target}", str(path), "-o", os.devnull],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed on {path}:\n{res.stderr}")
    stores, loads = ptxas_spills(res.stderr)
    return stores, loads, target


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text)


def compile_all(archs: list[int], out_dir: str) -> list[dict]:
    """One record per (AOT_SPECS entry, arch); compile errors are recorded, not raised."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for module in kernel_modules():
        short = module.__name__.rsplit(".", 1)[-1]
        for kernel, signature, constexprs in getattr(module, "AOT_SPECS", []):
            label = spec_label(module, kernel, signature, constexprs)
            for arch in archs:
                rec = {"module": short, "kernel": kernel.fn.__name__, "label": label, "arch": arch}
                try:
                    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
                    log = io.StringIO()
                    with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints here
                        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32))
                    stem = _safe(f"{short}.{label}.sm{arch}")
                    cubin = out / f"{stem}.cubin"
                    cubin.write_bytes(compiled.asm["cubin"])
                    target = re.search(r"^\.target\s+(\S+)", compiled.asm["ptx"], re.M).group(1)
                    if _SPILL.search(log.getvalue()):
                        stores, loads = ptxas_spills(log.getvalue())
                    else:  # a triton without that log: run its PTX through ptxas -v again
                        stores, loads, target = _ptx_spills(
                            compiled.asm["ptx"], out / f"{stem}.ptx"
                        )
                    usage = resource_usage(str(cubin))
                    name = compiled.metadata.name
                    rec |= {
                        "ok": True,
                        "target": target,
                        "cubin": str(cubin),
                        "num_warps": compiled.metadata.num_warps,
                        "dynamic_shared": compiled.metadata.shared,
                        "spill_stores": stores,
                        "spill_loads": loads,
                        "usage": usage.get(name, {}),
                    }
                except Exception as exc:  # the record carries the compiler's message
                    rec |= {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                records.append(rec)
    return records


def run_isolated(archs: list[int], out_dir: str, cache_dir: str, timeout: float = 600) -> dict:
    """compile_all in a fresh process: no TRITON_INTERPRET, TRITON_CACHE_DIR = cache_dir.
    Returns {"records": [...], "uncovered": {module: [names]}, "versions": {...}}."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = cache_dir
    env["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton's own ptxas -v report (spills), where supported
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "eqkernels.triton.aot", "--out", out_dir]
    for arch in archs:
        cmd += ["--arch", str(arch)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=root)
    if not res.stdout.strip():
        raise RuntimeError(
            f"{' '.join(cmd)} printed nothing (exit {res.returncode}):\n{res.stderr}"
        )
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, action="append", required=True, help="e.g. 80, 90")
    parser.add_argument("--out", required=True, help="folder for the cubins")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("TRITON_INTERPRET=1 is set: the compiler cannot take interpreted kernels")
    import triton

    records = compile_all(args.arch, args.out)
    result = {
        "records": records,
        "uncovered": {m.__name__: uncovered(m) for m in kernel_modules()},
        "versions": {
            "triton": triton.__version__,
            "ptxas": tool_version(tool("ptxas")),
            "cuobjdump": tool_version(tool("cuobjdump")),
        },
    }
    print(json.dumps(result))
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
