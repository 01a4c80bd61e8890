"""The GPU check in one command: `make gpu-check` (or `python3 -m bench.gpu_check OUTDIR`).

For a machine with a CUDA GPU and a CUDA build of torch (2.11 or newer) with its triton and
nvcc, no network and no virtual environment: it uses the Python it is started with and what is
installed there, and never calls pip. Stages, each timed and each writing its results into
OUTDIR as it finishes (a run cut short still leaves what it measured):

  env       versions of python, torch, triton, nvcc and the GPU          -> env.md
  build     eqkernels._C in place for the local GPU's architecture,
            all cores (setup.py build_ext --inplace, EQK_BUILD_CUDA=1)   -> build.log
  tests     pytest -m gpu (the op tests on CUDA, models on CUDA),
            EQK_REQUIRE_EXT=1 so a missing kernel fails                  -> tests.md, tests.xml
  fake_quant, lowbit, supernet   GPU benchmarks (bench/gpu_bench.py)     -> <name>.md, .csv

Without a GPU it says so in one line and exits 1. `--dry-run` checks the environment, prints
the stages it would run and exits 0 (1 if something other than the GPU is missing); it needs no
GPU and builds nothing. The whole check is sized to finish in under 5 minutes on one H100.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("env", "build", "tests", "fake_quant", "lowbit", "supernet")
BENCH_STAGES = ("fake_quant", "lowbit", "supernet")
MIN_TORCH = (2, 11)
# Per-stage wall limits (seconds); the sum stays under the 5-minute budget with the start-up.
LIMITS = {"build": 150, "tests": 120}


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def nvcc_path() -> str | None:
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    local = Path(home) / "bin" / "nvcc"
    return str(local) if local.exists() else shutil.which("nvcc")


def environment() -> dict:
    """What is installed, and the problems that stop the check (the GPU listed apart)."""
    info: dict = {"python": sys.version.split()[0], "executable": sys.executable}
    problems: list[str] = []
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch cuda"] = torch.version.cuda or "none"
        if _version_tuple(torch.__version__) < MIN_TORCH:
            problems.append(f"torch {torch.__version__} is older than 2.11")
        if torch.version.cuda is None:
            problems.append("torch is not a CUDA build")
        info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        if info["gpu"]:
            major, minor = torch.cuda.get_device_capability()
            info["arch"] = f"{major}.{minor}"
    except ImportError:
        problems.append("torch is not installed")
        info["gpu"] = None
    for module in ("triton", "pytest", "numpy"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            problems.append(f"{module} is not installed")
    nvcc = nvcc_path()
    info["nvcc"] = nvcc or "absent"
    if nvcc is None:
        problems.append("nvcc not found (CUDA_HOME/bin or PATH)")
    info["cpus"] = os.cpu_count()
    info["ninja"] = "yes" if ninja_available() else "no (forked parallel setuptools build)"
    return {"info": info, "problems": problems}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _run_logged(cmd: list[str], log: Path, env: dict, timeout: float) -> int:
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            return subprocess.run(
                cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\nstopped after {timeout} s\n")
            return 124


def stage_env(out: Path, env_report: dict) -> bool:
    rows = [f"| {k} | {v} |" for k, v in env_report["info"].items()]
    text = "# GPU check: environment\n\n| item | value |\n|---|---|\n" + "\n".join(rows) + "\n"
    if env_report["problems"]:
        text += "\nProblems:\n" + "".join(f"- {p}\n" for p in env_report["problems"])
    _atomic_write(out / "env.md", text)
    return not env_report["problems"]


def stage_build(out: Path, env_report: dict) -> bool:
    env = dict(os.environ)
    env.update(
        EQK_BUILD_CUDA="1",
        EQK_CUDA_ARCHS=env_report["info"]["arch"],
        MAX_JOBS=str(os.cpu_count() or 1),
        CUDA_HOME=os.environ.get("CUDA_HOME", str(Path(nvcc_path()).parent.parent)),
    )
    # torch's ninja build is parallel; without ninja (not installable there) the sources are
    # compiled by forked setuptools compilers, all cores at a time (bench/parallel_build.py).
    if ninja_available():
        cmd = [sys.executable, "setup.py", "-q", "build_ext", "--inplace"]
    else:
        cmd = [sys.executable, "-m", "bench.parallel_build", env["MAX_JOBS"]]
    return _run_logged(cmd, out / "build.log", env, LIMITS["build"]) == 0


def ninja_available() -> bool:
    try:
        from torch.utils.cpp_extension import is_ninja_available

        return is_ninja_available()
    except ImportError:
        return shutil.which("ninja") is not None


def stage_tests(out: Path, env_report: dict) -> bool:
    env = dict(os.environ, EQK_REQUIRE_EXT="1")
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(ROOT / "python"), env.get("PYTHONPATH", "")]
    )
    xml = out / "tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-ra", "-m", "gpu", "-p", "no:cacheprovider"]
    # A test module that cannot import there (a missing optional package) must not stop the
    # others: its error is reported in tests.md with the failures.
    cmd += ["--continue-on-collection-errors", f"--junitxml={xml}", "tests"]
    code = _run_logged(cmd, out / "tests.log", env, LIMITS["tests"])
    _atomic_write(out / "tests.md", _junit_summary(xml, code))
    return code == 0


def _junit_summary(xml: Path, code: int) -> str:
    import xml.etree.ElementTree as ET

    if not xml.exists():
        return f"# GPU tests\n\npytest exited {code} without a report; see tests.log\n"
    root = ET.parse(xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: suite.get(k, "0") for k in ("tests", "failures", "errors", "skipped")}
    lines = [f"# GPU tests (pytest -m gpu, exit {code})", ""]
    lines.append(
        ", ".join(f"{k}: {v}" for k, v in counts.items()) + f", time: {suite.get('time')} s"
    )
    bad = [
        (case.get("classname"), case.get("name"), child.get("message", "")[:200])
        for case in suite.iter("testcase")
        for child in case
        if child.tag in ("failure", "error")
    ]
    if bad:
        lines += ["", "| test | message |", "|---|---|"]
        lines += [f"| {c}::{n} | {m.replace('|', '/')} |" for c, n, m in bad]
    return "\n".join(lines) + "\n"


def stage_bench(name: str, out: Path) -> bool:
    import torch

    from bench import gpu_bench

    note = f"Device: {torch.cuda.get_device_name()}, torch {torch.__version__}."
    rows = gpu_bench.STAGES[name](lambda partial: gpu_bench.write(name, partial, out, note))
    gpu_bench.write(name, rows, out, note=note)
    return not any(r.get("error") and "eqkernels" in r.get("provider", "") for r in rows)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python3 -m bench.gpu_check", description=__doc__.split("\n")[0]
    )
    parser.add_argument("outdir", nargs="?", help="folder for the results (created)")
    parser.add_argument("--dry-run", action="store_true", help="check and list stages only")
    parser.add_argument(
        "--stages",
        default=",".join(STAGES),
        help=f"comma-separated subset of {','.join(STAGES)} (default: all)",
    )
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        parser.error(f"--stages={args.stages!r}: accepted values are {', '.join(STAGES)}")
    args.stages = [s for s in STAGES if s in stages]
    if args.outdir is None and not args.dry_run:
        parser.error("OUTDIR is required (the folder the results are written to)")
    if args.outdir is not None and Path(args.outdir).exists() and not Path(args.outdir).is_dir():
        parser.error(f"OUTDIR={args.outdir!r} exists and is not a folder")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    report = environment()
    gpu = report["info"].get("gpu")
    if args.dry_run:
        for key, value in report["info"].items():
            print(f"  {key}: {value}")
        for problem in report["problems"]:
            print(f"  problem: {problem}")
        print("gpu-check would run: " + ", ".join(args.stages))
        print(f"GPU: {gpu or 'none here (the real run needs one)'}")
        return 1 if report["problems"] else 0
    if not gpu:
        print("gpu-check: no CUDA GPU (torch.cuda.is_available() is False); nothing run")
        return 1
    # Nothing is installed on a GPU machine: eqnet is imported from this checkout.
    if str(ROOT / "python") not in sys.path:
        sys.path.insert(0, str(ROOT / "python"))
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    started, failed = time.monotonic(), []
    for stage in args.stages:
        t0 = time.monotonic()
        try:
            if stage == "env":
                ok = stage_env(out, report)
            elif stage == "build":
                ok = stage_build(out, report)
            elif stage == "tests":
                ok = stage_tests(out, report)
            else:
                ok = stage_bench(stage, out)
        except Exception as exc:  # one stage's failure must not lose the others' results
            _atomic_write(out / f"{stage}.error.txt", f"{type(exc).__name__}: {exc}\n")
            ok = False
        took = time.monotonic() - t0
        print(f"[{stage}] {'ok' if ok else 'FAILED'} in {took:.1f} s", flush=True)
        new_file = not (out / "stages.csv").exists()
        with open(out / "stages.csv", "a") as f:
            if new_file:
                f.write("stage,status,seconds\n")
            f.write(f"{stage},{'ok' if ok else 'failed'},{took:.1f}\n")
        if not ok:
            failed.append(stage)
            if stage in ("env", "build"):
                break  # nothing after them can run
    print(f"gpu-check: {time.monotonic() - started:.1f} s, results in {out}", flush=True)
    if failed:
        print("failed stages: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
