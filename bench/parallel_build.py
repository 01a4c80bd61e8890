"""`setup.py build_ext --inplace` with the sources compiled in parallel even without ninja.

torch's BuildExtension compiles in parallel through ninja; without ninja it falls back to the
setuptools compiler, one source at a time, which on a many-core GPU machine turns a one-minute
build into several. Here `CCompiler.compile` is replaced by a version that forks one process per
object file, at most `jobs` at a time. Forked processes (not threads) because torch's compile
wrapper switches the compiler executable to nvcc for `.cu` files on the shared compiler object.

    python -m bench.parallel_build [JOBS]      (run from the repository root)
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parallel_compile(jobs: int):
    """A drop-in for CCompiler.compile that compiles each object in a forked child."""

    def compile(
        self,
        sources,
        output_dir=None,
        macros=None,
        include_dirs=None,
        debug=False,
        extra_preargs=None,
        extra_postargs=None,
        depends=None,
    ):
        macros, objects, extra_postargs, pp_opts, build = self._setup_compile(
            output_dir, macros, include_dirs, sources, depends, extra_postargs
        )
        cc_args = self._get_cc_args(pp_opts, debug, extra_preargs)
        ctx = multiprocessing.get_context("fork")
        running, failed = [], []

        def wait_one():
            proc, obj = running.pop(0)
            proc.join()
            if proc.exitcode != 0:
                failed.append(obj)

        for obj in objects:
            try:
                src, ext = build[obj]
            except KeyError:
                continue
            while len(running) >= jobs:
                wait_one()
            args = (obj, src, ext, cc_args, extra_postargs, pp_opts)
            proc = ctx.Process(target=self._compile, args=args)
            proc.start()
            running.append((proc, obj))
        while running:
            wait_one()
        if failed:
            from setuptools.errors import CompileError

            raise CompileError(f"compiling failed: {', '.join(failed)}")
        return objects

    return compile


def patch(jobs: int) -> None:
    import setuptools  # noqa: F401  (makes `distutils` the setuptools copy)

    modules = []
    try:
        from setuptools._distutils import ccompiler as vendored

        modules.append(vendored)
    except ImportError:
        pass
    try:
        from distutils import ccompiler as plain

        modules.append(plain)
    except ImportError:
        pass
    for module in modules:
        module.CCompiler.compile = parallel_compile(jobs)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    jobs = int(argv[0]) if argv else int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))
    if jobs < 1:
        raise SystemExit(f"JOBS={jobs}: accepted values are integers >= 1")
    patch(jobs)
    os.chdir(ROOT)
    sys.argv = ["setup.py", "-q", "build_ext", "--inplace"]
    sys.path.insert(0, str(ROOT))  # what `python setup.py` would have on sys.path
    runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
