"""Build the `eqkernels._C` extension; the packages' metadata is in pyproject.toml.

`eqkernels._C` is built with torch.utils.cpp_extension (ninja):
  * the C++ CPU sources under csrc/ always;
  * the CUDA sources (`*_cuda.cu` plus their `*_cuda.cpp` host wrappers) when nvcc and a CUDA
    build of torch are found. `EQK_BUILD_CUDA=0` skips them, `EQK_BUILD_CUDA=1` requires them.
    `EQK_CUDA_ARCHS` is the arch list ("8.0;9.0+PTX" by default: sm_80 and sm_90 SASS, PTX for
    the newest). CI builds one arch to keep compile time down.
`EQK_BUILD_EMULATION=1` also builds the test-only emulation kernels (`*_emulation_cpu.cpp`: the
CUDA kernels' per-thread arithmetic run on the host, for tests/test_cuda_shared_math.py; CI
builds them); an ordinary build leaves them out of `_C`.
`EQK_OPS=fake_quant,bitplanes` restricts the build to some op directories (a development aid:
each op registers its pybind11 functions itself, see csrc/common/registry.h). `EQK_BUILD_EXT=0`
installs the pure-Python packages only (the torch reference backend still works).
"""

import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name):
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"{name}={value!r}: accepted values are 0, 1 or auto")


def _op_dirs():
    wanted = os.environ.get("EQK_OPS", "").strip()
    dirs = sorted(
        d
        for d in glob.glob(os.path.join("csrc", "*"))
        if os.path.isdir(d) and os.path.basename(d) != "common"
    )
    if wanted:
        names = {n.strip() for n in wanted.split(",") if n.strip()}
        unknown = names - {os.path.basename(d) for d in dirs}
        if unknown:
            raise SystemExit(f"EQK_OPS: unknown op directories {sorted(unknown)}")
        dirs = [d for d in dirs if os.path.basename(d) in names]
    return dirs


def _cuda_wanted():
    flag = _env_flag("EQK_BUILD_CUDA")
    if flag is False:
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    found = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and (shutil.which("nvcc") or os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    )
    if flag is True and not found:
        raise SystemExit("EQK_BUILD_CUDA=1 but nvcc or a CUDA build of torch was not found")
    return bool(found)


def _extensions():
    if _env_flag("EQK_BUILD_EXT") is False:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = _cuda_wanted()
    with_emulation = bool(_env_flag("EQK_BUILD_EMULATION"))
    sources = ["csrc/bindings.cpp"]
    for d in _op_dirs():
        for path in sorted(
            glob.glob(os.path.join(d, "*.cpp")) + glob.glob(os.path.join(d, "*.cu"))
        ):
            is_cuda = path.endswith(".cu") or path.endswith("_cuda.cpp")
            if is_cuda and not with_cuda:
                continue
            if path.endswith("_emulation_cpu.cpp") and not with_emulation:
                continue
            sources.append(path)

    # -O3 and OpenMP: at::parallel_for runs on one thread without -fopenmp. No -march: ISA
    # specific kernels use function target attributes and are chosen at run time (cpu_features.h).
    # -ffp-contract=off: no FMA contraction, so C++ results are bit-exact with the torch reference.
    # -g0: Python's default CFLAGS add -g, which doubles compile time and the .so size.
    # -Wall: the project's own code builds warning-free; torch's headers are system headers
    # (-isystem), so warnings inside them are not ours to fix.
    from torch.utils.cpp_extension import include_paths

    system = [f for d in include_paths() for f in ("-isystem", d)]
    cxx = ["-O3", "-g0", "-fopenmp", "-std=c++20", "-fvisibility=hidden", "-ffp-contract=off"]
    cxx += ["-Wall", *system]
    define = [("EQK_WITH_CUDA", "1")] if with_cuda else []
    include = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        archs = os.environ.get("EQK_CUDA_ARCHS", "8.0;9.0+PTX")
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        nvcc = ["-O3", "-std=c++20", "-Xcompiler", "-Wall", *system]
        ext = CUDAExtension(
            "eqkernels._C",
            sources,
            include_dirs=include,
            define_macros=define,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "eqkernels._C",
            sources,
            include_dirs=include,
            define_macros=define,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
